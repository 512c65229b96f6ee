"""4 位（bitsandbytes NF4）模型走叠加前向（issue 16）：fast/stacked.py + fast/nf4.py。

- weight_kind / check_stackable / resolve_stack / resolve_overlap：NF4 的 Linear4bit 可以叠（auto 时叠、可上侧流），
  部分量化、混合、其他量化给出原因；
- 叠加只改打包字节的存储位置（每个 Params4bit 指向叠好的张量的切片），bitsandbytes 的前向结果逐位不变，
  4 位权重不多一份；
- FastDecoder(stack="all") 在 NF4 模型上 == 慢速参考循环（同一份量化权重，bitsandbytes 的前向）逐 token：
  引导与基线、各种 overlap；投机解码的验证前向（M = B·(K+1)，tl.dot kernel）也一样。
CPU 上 kernel 由 Triton 解释器执行（conftest 设 TRITON_INTERPRET=1），float32；GPU 上编译出的 kernel 由
bench.py --check --quant nf4 检查。
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from fast.decoder import FastDecoder, resolve_overlap, resolve_stack
from fast.nf4 import NF4Weight
from fast.stacked import PROJECTIONS, check_stackable, stack_weights, weight_kind
from test_evaluator import PAD, PROMPTS, STEER, VOCAB, run, tiny_llama
from test_stacked import PER_ROLE

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="没有 bitsandbytes"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="没有 triton 包（.ci/run 会安装它，用解释器在 CPU 上跑 kernel）"),
]


@pytest.fixture(autouse=True)
def interpreted_triton() -> None:
    """kernel 在 CPU 上由解释器执行：conftest 在导入 triton 之前设了 TRITON_INTERPRET=1。"""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET 不是 1：kernel 要编译给 GPU，CPU 测试跑不了")


def to_nf4(model: LlamaForCausalLM, layers: tuple[int, ...] | None = None) -> LlamaForCausalLM:
    """bench.nf4_in_place（float32 计算）：解码层的 7 个投影换成 bitsandbytes 的 NF4 Linear4bit，与 BitsAndBytesConfig
    加载出的模块相同。layers 给出时只换这些层（部分量化的反例：先整体换掉，再把其余层换回普通 Linear）。"""
    from bench import nf4_in_place

    if layers is None:
        return nf4_in_place(model, torch.float32)
    plain = {i: {n: model.model.layers[i].get_submodule(n) for n in PROJECTIONS} for i in range(len(model.model.layers))
             if i not in layers}
    nf4_in_place(model, torch.float32)
    for i, mods in plain.items():
        for name, mod in mods.items():
            parent, attr = name.split(".")
            setattr(getattr(model.model.layers[i], parent), attr, mod)
    return model


@pytest.fixture(scope="module")
def trio() -> list[LlamaForCausalLM]:
    """本文件自己的三个 NF4 模型（叠加会改变打包字节的存储位置，不与其他测试共用）。"""
    return [to_nf4(tiny_llama(60 + i)) for i in range(3)]


def test_weight_kind_and_stacking_rules() -> None:
    a, b = to_nf4(tiny_llama(70)), to_nf4(tiny_llama(71))
    assert weight_kind(a) == "nf4" and weight_kind(tiny_llama(72)) == "plain"
    assert check_stackable([a, b]) is None
    assert "different kinds (nf4 and plain)" in check_stackable([a, tiny_llama(73)])
    assert "only some projections" in check_stackable([to_nf4(tiny_llama(74), layers=(0,))])
    odd = tiny_llama(75)
    odd.hf_quantizer = object()  # 有 hf_quantizer，投影却是普通张量：不认识的量化，不叠
    assert "other than bitsandbytes NF4" in check_stackable([odd])
    fp4 = to_nf4(tiny_llama(76))
    fp4.model.layers[1].mlp.down_proj.weight.quant_state.quant_type = "fp4"
    assert "must be NF4" in check_stackable([fp4])
    stored = to_nf4(tiny_llama(78))
    stored.model.layers[0].self_attn.o_proj.weight.data = stored.model.layers[0].self_attn.o_proj.weight.data.view(
        torch.int8)  # 例如 bnb_4bit_quant_storage 不是 uint8
    assert "bnb_4bit_quant_storage" in check_stackable([stored])
    models = [a, b, to_nf4(tiny_llama(77))]
    assert resolve_stack("auto", models, steering=STEER, compile=True, device_type="cuda") == "all"
    # 叠加的 NF4 模型可以上侧流；不叠的量化模型（bitsandbytes 自己的前向）不上
    for m in models:
        m.hf_quantizer = object()
    assert resolve_overlap("auto", models, steering=STEER, compile=True, device_type="cuda",
                           stacked=models) == "streams"
    assert resolve_overlap("auto", models, steering=STEER, compile=True, device_type="cuda",
                           stacked=models[1:]) == "off"


@torch.no_grad()
def test_stacking_shares_the_packed_bytes() -> None:
    """叠加后每个 Params4bit 指向叠好的 (M, ΣN, K/2) 张量的切片（4 位权重不多一份），bitsandbytes 的前向逐位不变。"""
    models = [to_nf4(tiny_llama(80)), to_nf4(tiny_llama(81))]
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    before = [m(ids).logits for m in models]
    for name in PROJECTIONS:  # 从检查点加载的 Linear4bit 自己也存一份状态（bitsandbytes 的恢复用）：第一个模型模拟它
        mod = models[0].model.layers[1].get_submodule(name)
        mod.quant_state = mod.weight.quant_state
    w = stack_weights(models)
    assert isinstance(w.qkv[0], NF4Weight) and w.qkv[0].qweight.shape == (2, 64 + 2 * 32, 32)
    assert w.gate_up[1].qweight.shape == (2, 256, 32) and w.down[0].absmax.shape == (2, 64, 2)
    base = w.gate_up[1].qweight
    for k, m in enumerate(models):
        mlp = m.model.layers[1].mlp
        assert mlp.gate_proj.weight.data_ptr() == base[k].data_ptr()
        assert mlp.up_proj.weight.data_ptr() == base[k, 128:].data_ptr()
        assert mlp.up_proj.weight.shape == (128 * 64 // 2, 1)  # bitsandbytes 的形状不变
    # bitsandbytes 的状态换成指向叠好的 float32 absmax 切片的非嵌套状态（两处引用都换），双重量化的 uint8 absmax 不再被引用
    ends = w.gate_up[1].absmax.data_ptr(), w.gate_up[1].absmax.data_ptr() + w.gate_up[1].absmax.nbytes
    for k, m in enumerate(models):
        for name in PROJECTIONS:
            mod = m.model.layers[1].get_submodule(name)
            state = mod.weight.quant_state
            assert not state.nested and state.absmax.dtype == torch.float32
            assert mod.quant_state is (state if k == 0 else None)
            assert state.absmax.numel() == mod.out_features * mod.in_features // 64
        up = m.model.layers[1].mlp.up_proj.weight.quant_state.absmax
        assert ends[0] <= up.data_ptr() < ends[1] and up.data_ptr() == w.gate_up[1].absmax[k, 128:].data_ptr()
    for m, ref in zip(models, before):
        assert torch.equal(m(ids).logits, ref)


@torch.no_grad()
def test_floor_counts_the_format_as_loaded() -> None:
    """bench 的 floor 按加载时的格式数字节（双重量化：uint8 absmax 与第二层的表）：叠加把状态换成 float32 absmax 之后，
    记下的数不变，各提交的 share of floor time 仍可比。"""
    import bench

    models = [to_nf4(tiny_llama(82)), to_nf4(tiny_llama(83))]
    before = bench.floor_bytes(models, 2, 8.0)
    loaded = bench.weight_bytes(models[0])
    bench.remember_weight_bytes(models)
    stack_weights(models)
    state = models[0].model.layers[0].self_attn.q_proj.weight.quant_state
    assert not state.nested and bench.weight_bytes(models[0]) != loaded  # 现在数到的是 float32 absmax 与 NF4 码表
    assert bench.floor_bytes(models, 2, 8.0) == before


@pytest.mark.parametrize("overlap", ["off", "streams"])
def test_fast_decoder_nf4_equals_reference_loop(trio: list[LlamaForCausalLM], overlap: str) -> None:
    """NF4 的叠加路径（fast.nf4 kernel）== 慢速循环（bitsandbytes 的前向，同一份量化权重）逐 token，α 一致；
    每个角色的提示不同、批不满。"""
    decoder = FastDecoder(trio, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                          compile=False, overlap=overlap, stack="all")
    assert all(s is not None and s.nf4 for s in decoder.stacked)
    quick = decoder.generate(PER_ROLE, 10)
    slow = run(trio, None, steps=10, steering=STEER, per_role=PER_ROLE)
    assert quick.tokens == slow.tokens
    for a, b in zip(quick.alpha, slow.alpha):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("overlap", ["off", "streams"])
def test_compiled_fast_decoder_nf4_with_triton_attention_equals_reference_loop(trio: list[LlamaForCausalLM],
                                                                               overlap: str) -> None:
    """CPU 上真的编译（inductor，fullgraph）NF4 的叠加前向与 Triton 解码注意力：两个 kernel 是不透明的 custom_op
    （TRITON_OPS_NOTE），编译追踪只用它们的 fake 形状，运行时由解释器执行 kernel；结果与慢速循环逐 token 一致。
    overlap="off" 编译整步；"streams" 分开编译每个前向单元（GPU 上引导的默认路径，CPU 上没有侧流与图）。
    （traced 的 triton_op 在 CPU 上编译不了：追踪时要在假张量上跑解释器。）"""
    decoder = FastDecoder(trio, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                          compile=True, overlap=overlap, stack="all", attention="triton")
    assert decoder.attention == "triton" and all(s is not None and s.nf4 for s in decoder.stacked)
    quick = decoder.generate(PER_ROLE, 8)
    slow = run(trio, None, steps=8, steering=STEER, per_role=PER_ROLE)
    assert quick.tokens == slow.tokens
    for a, b in zip(quick.alpha, slow.alpha):
        assert a == pytest.approx(b, abs=1e-5)


class _ForcedSplit(dict):
    """替代 fast.nf4._TUNED：每个形状都“调优”成 NB = 1 的配置与 split_k = 4（_launch 再按 K 的块数夹小：K = 64 的投影
    只有一块，仍是 1 段；MLP 的 down，K = 128，是 2 段）。记下要过的 K，确认真的有切 K 的调用。"""

    def __init__(self) -> None:
        super().__init__()
        self.ks: set[int] = set()

    def get(self, key: tuple[Any, ...], default: Any = None) -> Any:
        self.ks.add(key[2])
        return (("gemvW", 1, 16, 1, 4, 1) if key[3] == 1 else ("dotA", 16, 16, 1, 4, 1)), 4


def test_compiled_nf4_split_k_sums_in_graph_equal_reference_loop(trio: list[LlamaForCausalLM],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """切 K 的 NF4 矩阵乘在编译的整步里，部分和在图里相加、由 inductor 并进下一个 kernel（fast.SPLIT_SUM = "graph"，
    SPLIT_SUM_NOTE）：与慢速循环逐 token 一致。（求和 kernel 的默认方式由 tests/test_nf4.py 的算子测试覆盖；
    解释器里的编译整步很慢，这里只跑一种，注意力用 sdpa。）"""
    import fast
    import fast.nf4

    forced = _ForcedSplit()
    monkeypatch.setattr(fast.nf4, "_TUNED", forced)
    monkeypatch.setattr(fast, "SPLIT_SUM", "graph")
    decoder = FastDecoder(trio, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                          compile=True, overlap="off", stack="all", attention="sdpa")
    quick = decoder.generate(PER_ROLE, 3)
    assert 128 in forced.ks  # down 投影（K = 128）切了 2 段
    assert quick.tokens == run(trio, None, steps=3, steering=STEER, per_role=PER_ROLE).tokens


def test_fast_decoder_nf4_target_only(trio: list[LlamaForCausalLM]) -> None:
    """基线（只有目标，M = 1 的 NF4 叠加前向）== 慢速循环。"""
    decoder = FastDecoder(trio[:1], vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=3, steering=None,
                          compile=False, stack="all")
    assert decoder.generate([PROMPTS], 10).tokens == run(trio[:1], PROMPTS, steps=10).tokens


def test_speculative_verify_on_nf4(trio: list[LlamaForCausalLM]) -> None:
    """投机解码的 K+1 位置验证前向（M = B·(K+1) 行，tl.dot kernel）在 NF4 上与不投机的参考逐 token 相同。"""
    from fast.speculative import SpeculativeDecoder

    dec = SpeculativeDecoder(trio, k=2, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                             compile=False, stack="all")
    got = dec.generate(PER_ROLE, 6)
    assert got.tokens == run(trio, None, steps=6, steering=STEER, per_role=PER_ROLE).tokens
    assert sum(got.drafted) > 0


def test_bitsandbytes_kernels_as_a_tuned_choice(trio: list[LlamaForCausalLM], monkeypatch: pytest.MonkeyPatch) -> None:
    """调优可以为某个形状选 bitsandbytes 自己的 matmul_4bit（方式 "bnb"，读同一份打包字节与 float32 absmax）：
    全部形状都选它时，叠加路径仍与参考循环逐 token 相同。"""
    import fast.nf4 as nf4

    monkeypatch.setattr(nf4, "config_for", lambda m: ("bnb", 0, 0, 0, 0, 0))
    decoder = FastDecoder(trio, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                          compile=False, stack="all")
    assert all(s.weights.qkv[0].states for s in decoder.stacked)  # QuantState 在叠加时就建好了
    assert decoder.generate(PER_ROLE, 8).tokens == run(trio, None, steps=8, steering=STEER, per_role=PER_ROLE).tokens


def test_tuning_time_is_recorded(trio: list[LlamaForCausalLM], monkeypatch: pytest.MonkeyPatch) -> None:
    """allocate 调 tune_nf4（每个新的 (批, 长度) 一次）并累计它用的秒数 tune_s、合并它的报告：基准把启动时间里的
    调优与编译、录图分开记。CPU 上真的 tune_nf4 什么也不做，这里换成一个会花时间、有报告的替身。"""
    import time

    import fast.stacked as stacked

    calls: list[int] = []

    def fake_tune(weights, rows, dtype):  # noqa: ANN001, ANN202 —— 替身：记下批大小，睡 20 ms，返回一条报告
        calls.append(rows)
        time.sleep(0.02)
        return {f"fake_M{rows}": {"us": 1.0}}

    monkeypatch.setattr(stacked, "tune_nf4", fake_tune)
    decoder = FastDecoder(trio[:1], vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=3, steering=None,
                          compile=False, stack="all")
    unit = decoder.stacked[0]
    assert unit is not None and unit.nf4 and unit.tune_s == 0.0
    unit.allocate(3, 64)
    unit.allocate(3, 64)  # 形状没变：不再调优
    assert calls == [3] and unit.tune_s >= 0.02 and unit.tuned == {"fake_M3": {"us": 1.0}}
    unit.allocate(5, 64)
    assert calls == [3, 5] and unit.tune_s >= 0.04 and set(unit.tuned) == {"fake_M3", "fake_M5"}


@pytest.fixture()
def fresh_tuning(monkeypatch: pytest.MonkeyPatch, tmp_path) -> "object":  # noqa: ANN001
    """调优的进程级状态（选择表、报告、缓存）换成空的，测试结束后还原；返回 fast.nf4 模块。"""
    import fast.nf4 as nf4

    monkeypatch.setattr(nf4, "_TUNED", {})
    monkeypatch.setattr(nf4, "_TUNED_REPORT", {})
    nf4.use_tuning_cache(None)
    return nf4


def _cache_names(unit: object, rows: int) -> list[str]:
    """一个叠加单元的四种权重形状在缓存里的名字（S、N、K 取自叠好的 NF4Weight，精度取嵌入的）。"""
    w = unit.weights  # type: ignore[attr-defined]
    dtype = str(w.embed.dtype).removeprefix("torch.")
    return [f"S{p.qweight.shape[0]}_N{p.out_features}_K{p.in_features}_M{rows}_{dtype}"
            for p in (w.qkv[0], w.o[0], w.gate_up[0], w.down[0])]


def test_tuning_cache_gives_the_same_kernels_in_a_later_run(trio: list[LlamaForCausalLM], fresh_tuning: object,
                                                            tmp_path) -> None:  # noqa: ANN001
    """缓存里有这台机器（指纹相符）的选择时，解码器直接用它们（不计时，报告带 cached），输出仍与参考循环逐 token
    相同；这里记的是一个非默认的 dotT 配置与 split-K 2，证明用的确实是缓存里的选择。"""
    import json

    nf4 = fresh_tuning
    path = tmp_path / "tuning.json"
    decoder = FastDecoder(trio, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                          compile=False, stack="all")
    chosen = {"config": ["dotT", 16, 32, 1, 4, 1], "split_k": 2, "us": 1.0, "us_by_method": {"dotT": 1.0}}
    names = [n for unit in decoder.stacked for n in _cache_names(unit, 4)]
    path.write_text(json.dumps({"fingerprint": nf4.tuning_fingerprint(torch.device("cpu")),
                                "entries": {n: chosen for n in names}}))
    nf4.use_tuning_cache(str(path))
    got = decoder.generate(PER_ROLE, 3)
    assert got.tokens == run(trio, None, steps=3, steering=STEER, per_role=PER_ROLE).tokens
    report = nf4.tuned_report()
    assert set(report) == set(names) and all(r["cached"] and r["config"] == chosen["config"] for r in report.values())
    assert all(cfg == (("dotT", 16, 32, 1, 4, 1), 2) for cfg in nf4._TUNED.values())


def test_tuning_cache_from_another_setup_or_unreadable_is_ignored(trio: list[LlamaForCausalLM], fresh_tuning: object,
                                                                  tmp_path) -> None:  # noqa: ANN001
    """指纹不同（这里是 kernel 源码的散列）、文件坏了或某条记录坏了：警告说明原因、不用它们（CPU 上不计时：什么也
    不选）。"off" 时根本不读文件。"""
    import json

    nf4 = fresh_tuning
    path = tmp_path / "tuning.json"
    unit = FastDecoder(trio[:1], vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=3, steering=None,
                       compile=False, stack="all").stacked[0]
    entry = {"config": ["dotT", 16, 32, 1, 4, 1], "split_k": 2, "us": 1.0, "us_by_method": {}}
    other = {**nf4.tuning_fingerprint(torch.device("cpu")), "kernels": "0" * 16}
    path.write_text(json.dumps({"fingerprint": other, "entries": {n: entry for n in _cache_names(unit, 3)}}))
    nf4.use_tuning_cache(str(path))
    with pytest.warns(UserWarning, match=r"written for another setup \(kernels changed\)"):
        unit.allocate(3, 64)
    assert nf4._TUNED == {} and nf4.tuned_report() == {}
    path.write_text("{not json")
    nf4.use_tuning_cache(str(path))
    with pytest.warns(UserWarning, match="could not be read"):
        unit.allocate(5, 64)
    assert nf4._TUNED == {}
    path.write_text(json.dumps({"fingerprint": nf4.tuning_fingerprint(torch.device("cpu")),
                                "entries": {n: entry for n in _cache_names(unit, 7)}}))
    nf4.use_tuning_cache("off")
    unit.allocate(7, 64)
    assert nf4._TUNED == {}
    bad = {**entry, "config": ["gemvX", 1, 16, 8, 4, 1]}  # 手改坏的记录：不认识的方式
    path.write_text(json.dumps({"fingerprint": nf4.tuning_fingerprint(torch.device("cpu")),
                                "entries": {n: bad for n in _cache_names(unit, 9)}}))
    nf4.use_tuning_cache(str(path))
    with pytest.warns(UserWarning, match="is malformed"):
        unit.allocate(9, 64)
    assert nf4._TUNED == {}


def test_tuning_cache_store_round_trip(fresh_tuning: object, tmp_path) -> None:  # noqa: ANN001
    """_store 整份写回（临时文件 + rename，不留临时文件）；下一个“进程”（重新 use_tuning_cache）读回同样的记录；
    目录不存在时先建好；写不了时警告、不抛错。"""
    nf4 = fresh_tuning
    path = tmp_path / "sub" / "tuning.json"
    cpu = torch.device("cpu")
    nf4.use_tuning_cache(str(path))
    assert nf4._cache_entries(cpu) == {}
    nf4._store("S1_N8_K64_M1_bfloat16", {"config": ["bnb", 0, 0, 0, 0, 0], "split_k": 1})
    assert sorted(p.name for p in path.parent.iterdir()) == ["tuning.json"]
    nf4.use_tuning_cache(str(path))
    assert nf4._cache_entries(cpu) == {"S1_N8_K64_M1_bfloat16": {"config": ["bnb", 0, 0, 0, 0, 0], "split_k": 1}}
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    nf4.use_tuning_cache(str(blocked / "tuning.json"))  # 父“目录”是个文件：写不了 → 警告，运行照常
    nf4._cache_entries(cpu)
    with pytest.warns(UserWarning, match="could not be written"):
        nf4._store("S1_N8_K64_M1_bfloat16", {"config": ["bnb", 0, 0, 0, 0, 0], "split_k": 1})
