"""--quant {nf4,int4} 的测试（issue 16 第 3 条），全部在 CPU 上、不需要 GPU：

- 配置：无意义的组合（关掉 4-bit 却给 --quant / --int4-group-size，nf4 却给组大小，不支持的组大小）在加载任何东西之前
  报错；格式写进 config.json 并参与续跑比较（与其他配置字段一样）。
- model_loader：每种格式构造的 quantization_config 对象（bitsandbytes NF4 双重量化 / torchao Int4WeightOnlyConfig
  tile-packed）、load_model 交给 from_pretrained 的参数；没有 CUDA、没有所选格式的库、GPU 太旧时的清楚错误；
  内存估计里 int4 的字节数。
- benchmarks/quant_quality.py 的量化函数：int4 与手写的 torchao tinygemm 公式相同、跳过 in_features 不是组大小倍数的
  Linear；nf4 与项目自己的纯 torch NF4 参考实现一致；只替换解码层 Linear、不动嵌入与 lm_head；KL 与前缀的算术。
"""
from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

import config
import model_loader
from config import Config, ConfigError, config_diff, config_from_dict, parse_config
from model_loader import ModelLoadError, quantization_config, require_quant_library, resolve_device, weight_bytes
from shared_runs import tiny_llama as shared_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # 原因见 tests/conftest.py

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="没有 torchao（requirements.txt 固定了 torchao==0.18.0）")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="没有 bitsandbytes")
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="本测试检查没有 CUDA 时的行为")


def tiny_llama(hidden: int = 192, intermediate: int = 256, seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    """微型随机 Llama（默认 hidden 192 = 1.5 × 128：与 SmolLM2 的 576 一样，q/k/v/o/gate/up 不是 128 的倍数）。"""
    return shared_tiny_llama(96, seed, head_scale=1.0, hidden=hidden, intermediate=intermediate, heads=3, kv_heads=1,
                             max_positions=64, tie=tie, pad_id=None)


# ---------------------------------------------------------------------------
# 配置
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv, needle", [
    (["--no-load-in-4bit", "--quant", "int4"], "4-bit loading is off"),
    (["--no-load-in-4bit", "--quant", "int4", "--int4-group-size", "128"], "4-bit loading is off"),
    (["--demo", "--quant", "int4"], "4-bit loading is off"),
    (["--int4-group-size", "128"], "only applies to --quant int4"),
    (["--quant", "int4", "--int4-group-size", "32"], "choose one of: 64, 128"),
])
def test_meaningless_combinations_are_refused(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config(argv)


def test_bad_quant_value_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(["--quant", "int8"])
    assert info.value.code == 2


def test_defaults_and_explicit_formats() -> None:
    assert Config().quant == config.QUANT == "nf4" and Config().int4_group_size == config.INT4_GROUP_SIZE
    assert parse_config(["--demo"]).quant == "nf4"  # 4-bit 关掉时默认格式不算“无意义的组合”
    cfg = parse_config(["--quant", "int4", "--int4-group-size", "128"])
    assert (cfg.load_in_4bit, cfg.quant, cfg.int4_group_size) == (True, "int4", 128)


def test_format_is_recorded_and_compared_on_resume() -> None:
    """格式写进 config.json（to_dict），能原样读回；与另一格式的配置比较时列出差异（续跑因此拒绝换格式）。"""
    int4 = parse_config(["--quant", "int4"]).to_dict()
    assert int4["quant"] == "int4" and int4["int4_group_size"] == config.INT4_GROUP_SIZE
    assert config_from_dict(int4, "config.json") == parse_config(["--quant", "int4"])
    assert config_diff(Config().to_dict(), int4) == ["quant: 'nf4' → 'int4'"]
    old = {k: v for k, v in Config().to_dict().items() if k not in ("quant", "int4_group_size")}
    assert config_from_dict(old, "config.json").quant == "nf4"  # 旧版本写的 config.json：格式取默认（当时唯一的 nf4）
    with pytest.raises(ConfigError, match="int4_group_size"):
        config_from_dict({**int4, "int4_group_size": "64"}, "config.json")


# ---------------------------------------------------------------------------
# model_loader
# ---------------------------------------------------------------------------


def test_nf4_quantization_config() -> None:
    q = quantization_config(Config())
    assert type(q).__name__ == "BitsAndBytesConfig"
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16


@needs_torchao
@pytest.mark.parametrize("group", config.INT4_GROUP_SIZES)
def test_int4_quantization_config(group: int) -> None:
    from torchao.quantization import Int4WeightOnlyConfig
    from transformers import TorchAoConfig

    q = quantization_config(parse_config(["--quant", "int4", "--int4-group-size", str(group)]))
    assert isinstance(q, TorchAoConfig) and isinstance(q.quant_type, Int4WeightOnlyConfig)
    assert q.quant_type.group_size == group and q.quant_type.int4_packing_format == "tile_packed_to_4d"
    assert q.quant_type.set_inductor_config is False  # 不改全局 inductor 设置：两种格式按同样的设置编译
    assert q.quant_type.int4_choose_qparams_algorithm == "tinygemm"  # 不需要校准数据的 min/max 仿射
    assert not q.include_input_output_embeddings and q.modules_to_not_convert is None  # 嵌入与 lm_head 不量化
    assert q.to_dict()["quant_type"]["default"]["_data"]["group_size"] == group  # 能序列化（写进模型的 config）


@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_load_model_passes_the_format_to_from_pretrained(quant: str, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Any) -> None:
    """load_model 的 4-bit 参数：bf16、所选格式的 quantization_config、整个模型放在该 GPU 上（不真的加载）。"""
    if quant == "int4" and importlib.util.find_spec("torchao") is None:
        pytest.skip("没有 torchao")
    seen: dict[str, Any] = {}

    class Loaded:
        def eval(self) -> "Loaded":
            return self

    def fake(path: str, **kwargs: Any) -> Loaded:
        seen.update(kwargs, path=path)
        return Loaded()

    monkeypatch.setattr(model_loader.AutoModelForCausalLM, "from_pretrained", fake)
    model_loader.load_model(str(tmp_path), parse_config(["--quant", quant]), torch.device("cuda", 1))
    assert seen["path"] == str(tmp_path) and seen["dtype"] == torch.bfloat16 and seen["device_map"] == {"": 1}
    assert type(seen["quantization_config"]).__name__ == ("BitsAndBytesConfig" if quant == "nf4" else "TorchAoConfig")


@CPU_ONLY
@pytest.mark.parametrize("quant", ["nf4", "int4"])
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_4bit_without_cuda_names_the_format(quant: str, device: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_device(Config(load_in_4bit=True, quant=quant, device=device))
    text = str(info.value)
    assert f"--quant {quant}" in text and "CUDA" in text and "--no-load-in-4bit" in text


@pytest.mark.parametrize("quant, package, pin", [("nf4", "bitsandbytes", "bitsandbytes==0.50.2"),
                                                 ("int4", "torchao", "torchao==0.18.0")])
def test_missing_library_is_refused_before_loading(quant: str, package: str, pin: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU 在、库不在：resolve_device（main 在任何 hub 访问之前调用）就以安装命令拒绝。"""
    real = importlib.util.find_spec
    monkeypatch.setattr(model_loader.importlib.util, "find_spec", lambda name, *a: None if name == package
                        else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    cfg = Config(load_in_4bit=True, quant=quant, device="cuda")
    with pytest.raises(ModelLoadError, match=f"pip install {pin}"):
        require_quant_library(cfg)
    with pytest.raises(ModelLoadError, match=f"pip install {pin}"):
        resolve_device(cfg)


@needs_torchao
def test_int4_on_an_old_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """tinygemm 需要计算能力 ≥ 8.0：更旧的 GPU 在加载之前拒绝，并建议 --quant nf4；8.0 及以上放行。"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    cfg = Config(load_in_4bit=True, quant="int4", device="cuda")
    with pytest.raises(ModelLoadError, match=r"Tesla T4.*7\.5.*--quant nf4"):
        resolve_device(cfg)
    assert resolve_device(Config(load_in_4bit=True, quant="nf4", device="cuda")).type == "cuda"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert resolve_device(cfg) == torch.device("cuda:0")


def test_weight_estimate_per_format() -> None:
    """int4：每组一对 bf16 (scale, zero)；in_features 不是组大小倍数的 Linear 按 bf16 计（torchao 不量化它）。"""
    cfg = tiny_llama().config
    bf16 = weight_bytes(cfg, torch.bfloat16)
    linears = {n: m for n, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    numel = {n: m.weight.numel() for n, m in linears.items()}
    total = sum(numel.values())
    assert weight_bytes(cfg, torch.bfloat16, True, "nf4") == bf16 - 2 * total + sum(n // 2 + n // 64 for n in numel.values())
    # 快速路径的叠加前向把块尺度换成 float32（双重量化的 1 字节随之释放）：每 64 个权重 4 字节
    assert weight_bytes(cfg, torch.bfloat16, True, "nf4", nf4_fast_scales=True) == \
        bf16 - 2 * total + sum(n // 2 + 4 * (n // 64) for n in numel.values())
    assert weight_bytes(cfg, torch.bfloat16, True, "int4", 64) == \
        bf16 - 2 * total + sum(n // 2 + n // 64 * 4 for n in numel.values())
    down = sum(v for k, v in numel.items() if k.endswith("down_proj"))  # 只有 down_proj 的 in_features（256）是 128 的倍数
    assert weight_bytes(cfg, torch.bfloat16, True, "int4", 128) == bf16 - 2 * down + down // 2 + down // 128 * 4


# ---------------------------------------------------------------------------
# benchmarks/quant_quality.py 的量化函数与度量
# ---------------------------------------------------------------------------


@needs_torchao
@pytest.mark.parametrize("group", [64, 128])
def test_int4_roundtrip_is_torchaos_tinygemm_affine(group: int) -> None:
    """与手写的 torchao tinygemm 规则相同：每组 scale = (max − min)/15（bf16）、zero = min + 8·scale（bf16）、
    q = clamp(round((w − (zero − 8·scale))/scale), 0, 15)、w' = (q − 8)·scale + zero（bf16）；每个权重误差不超过 0.6 格
    （半格，加上 scale 与 zero 舍入到 bf16 的偏移）。"""
    from benchmarks.quant_quality import int4_roundtrip

    w = torch.randn(8, 2 * group, generator=torch.Generator().manual_seed(group)).to(torch.bfloat16)
    got = int4_roundtrip(w, group)
    g = w.reshape(8, 2, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).to(torch.bfloat16)
    zero = (lo + scale * 8).to(torch.bfloat16)
    q = torch.clamp(torch.round((g - (zero - scale * 8)) / scale), 0, 15)
    want = ((q - 8).to(torch.bfloat16) * scale + zero).reshape(8, 2 * group)
    assert got is not None and got.dtype == torch.bfloat16 and torch.equal(got, want)
    step = scale.float().repeat_interleave(group, -1).reshape(8, -1)
    assert ((got.float() - w.float()).abs() <= 0.6 * step).all()
    assert int4_roundtrip(w[:, : group + group // 2], group) is None  # in_features 不是组大小的倍数：torchao 跳过


@needs_bnb
def test_nf4_roundtrip_matches_the_pure_torch_reference() -> None:
    """bitsandbytes 的量化再反量化 == 项目纯 torch 的 NF4 参考（fast/nf4.py，tests/test_nf4.py 逐位对过）：
    打包的 4 位码逐位相同，反量化值只在个别嵌套 absmax 码差一格的块里有不到 1% 的相对差。"""
    from benchmarks.quant_quality import nf4_roundtrip
    from fast.nf4 import dequantize_nf4, quantize_nf4_reference, repack_nf4

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got = nf4_roundtrip(w)
    want = dequantize_nf4(repack_nf4(*quantize_nf4_reference(w, blocksize=64)))[:64]
    assert got.dtype == torch.bfloat16 and got.shape == w.shape
    blocks_equal = (got.reshape(-1, 64) == want.reshape(-1, 64)).all(-1)
    assert blocks_equal.float().mean() > 0.95
    assert ((got.float() - want.float()).abs() <= 0.01 * want.float().abs() + 1e-6).all()


@needs_torchao
@needs_bnb
def test_quantized_copy_replaces_only_decoder_linears() -> None:
    """每一行只替换所选的解码层 Linear：嵌入、lm_head、归一化不变；g128 跳过 in_features 不是 128 倍数的 Linear；
    down_proj only 只动 down_proj；bf16 compute 不量化、整个模型转成 bf16。参照本身不被修改。"""
    from benchmarks.quant_quality import bf16_reference, decoder_linears, quantized_copy, variants

    ref = bf16_reference(tiny_llama())
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    rows = {v.name: v for v in variants()}
    linears = {n for n, _ in decoder_linears(ref)}
    assert len(linears) == 2 * 7
    for name, want_linears, want_skipped in [("nf4", 14, 0), ("int4 g64", 14, 0), ("int4 g128", 2, 12),
                                             ("nf4, down_proj only", 2, 0), ("int4 g64, down_proj only", 2, 0),
                                             ("bf16 compute", 0, 0)]:
        model, counts = quantized_copy(ref, rows[name])
        assert (counts["linears"], counts["skipped"]) == (want_linears, want_skipped), name
        state = model.state_dict()
        changed = {k for k in before if not torch.equal(state[k].float(), before[k])}
        if name == "bf16 compute":
            assert next(model.parameters()).dtype == torch.bfloat16 and not changed
            continue
        assert all(k.removesuffix(".weight") in linears for k in changed), name
        assert len(changed) == want_linears
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())


def test_kl_and_prefix_arithmetic() -> None:
    from benchmarks.quant_quality import common_prefix, kl_per_position

    a = torch.log_softmax(torch.randn(5, 11, generator=torch.Generator().manual_seed(0)), -1)
    b = torch.log_softmax(torch.randn(5, 11, generator=torch.Generator().manual_seed(1)), -1)
    assert torch.allclose(kl_per_position(a, a), torch.zeros(5, dtype=torch.float64))
    want = torch.nn.functional.kl_div(b.double(), a.double(), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_per_position(a, b), want) and (want > 0).all()
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([5], [6]) == 0 and common_prefix([1, 2], [1, 2]) == 2


@needs_torchao
def test_bench_counts_the_storage_of_torchao_weights() -> None:
    """bench.py 的每步字节数：torchao 的量化权重是张量子类，numel × element_size 是逻辑形状 × 原精度，不是存储；
    按它的内部张量（qdata、scale……）数。CPU 上用 int8 只量化权重的同类子类检查（int4 tile-packed 只能在 CUDA 上构造）。"""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    import bench

    lin = torch.nn.Linear(256, 64, bias=False)
    quantize_(lin, Int8WeightOnlyConfig(set_inductor_config=False))
    w = lin.weight
    parts = [getattr(w, n) for n in ("qdata", "scale", "zero_point") if getattr(w, n, None) is not None]
    assert bench._param_bytes(w) == sum(t.numel() * t.element_size() for t in parts)
    assert 64 * 256 < bench._param_bytes(w) < 64 * 256 * 2  # int8 加每行的量化参数，远小于 float32 的 64 KiB
    plain = torch.nn.Parameter(torch.zeros(64, 256, dtype=torch.bfloat16))
    assert bench._param_bytes(plain) == 64 * 256 * 2


@needs_torchao
def test_torchao_quantize_on_load_touches_only_decoder_linears(tmp_path: Any) -> None:
    """transformers 的 torchao 加载时量化（与 --quant int4 同一个 TorchAoConfig 外壳）只量化解码层的 Linear：嵌入与
    lm_head（共享与不共享两种）保持普通参数。int4 tile-packed 只能在 CUDA 上构造，所以 CPU 上把里面的 torchao 配置
    换成同一族、能在 CPU 上量化的 Int8WeightOnlyConfig——选哪些参数只由外壳与 transformers 决定。"""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM

    outer = quantization_config(parse_config(["--quant", "int4"]))
    outer.quant_type = Int8WeightOnlyConfig(set_inductor_config=False)
    for tie in (True, False):
        folder = tmp_path / f"tie{tie}"
        tiny_llama(hidden=192, seed=1, tie=tie).save_pretrained(folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=outer,
                                                      device_map={"": "cpu"})
        kinds = {n: type(p).__name__ for n, p in loaded.named_parameters() if "norm" not in n}
        quantized = {n for n, k in kinds.items() if k != "Parameter"}
        assert quantized == {n for n in kinds if n.startswith("model.layers.")}, tie
        assert len(quantized) == 2 * 7 and kinds["model.embed_tokens.weight"] == "Parameter"
        assert kinds.get("lm_head.weight", "Parameter") == "Parameter"


def test_report_prints_the_table_and_paired_differences() -> None:
    """--report：由 JSON 重印表与成对差（均值与自助区间；差恒定时区间就是那个值）。"""
    from benchmarks.quant_quality import paired_difference, report

    assert paired_difference([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]) == {"mean": 0.5, "ci95_low": 0.5, "ci95_high": 0.5}
    d = paired_difference([0.0, 1.0, 0.0, 1.0], [0.0] * 4)
    assert d["mean"] == 0.5 and 0.0 <= d["ci95_low"] < 0.5 < d["ci95_high"] <= 1.0

    def row(name: str, kl: list[float], prefix: list[int]) -> dict[str, Any]:
        return {"name": name, "bits_per_quantized_weight": 4.5, "linears": 2, "weights": 10**6, "kl_mean": 0.1,
                "kl_p95": 0.2, "top1_agreement": 0.9, "free_prefix_mean": 3.0, "free_identical": 1, "questions": 2,
                "per_question_kl_mean": kl, "per_question_prefix": prefix}

    text = report({"rows": [row("nf4", [0.2, 0.4], [1, 3]), row("int4 g64", [0.1, 0.3], [2, 4])]})
    assert "| nf4 | 4.500 | 2 (1.0 M) | 0.1000 |" in text
    assert "- int4 g64 − nf4: mean KL -0.1000 [-0.1000, -0.1000]; tokens before divergence +1.0 [+1.0, +1.0]" in text


def test_nf4_tuning_cache_flag_and_run_folder_event(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """--nf4-tuning-cache：默认在 ~/.cache 下，"off" 可以；它不属于实验配置（续跑时可以不同，config_diff 忽略它）。
    main.log_nf4_kernels 把本进程用到的 kernel 选择记进 events.jsonl；没有 NF4 叠加前向（报告为空）时什么也不记。"""
    import fast.nf4 as nf4
    import main
    from run_folder import read_events

    default = parse_config([])
    assert default.nf4_tuning_cache == config.NF4_TUNING_CACHE
    off = parse_config(["--nf4-tuning-cache", "off"])
    assert off.nf4_tuning_cache == "off" and config_diff(default.to_dict(), off.to_dict()) == []
    run_dir = str(tmp_path)
    monkeypatch.setattr(nf4, "tuned_report", lambda: {})
    main.log_nf4_kernels(off, run_dir, "baseline", 0)
    assert read_events(run_dir) == []
    chosen = {"S1_N4096_K4096_M8_bfloat16": {"config": ["dotT", 16, 128, 1, 4, 1], "split_k": 16, "us": 21.2,
                                             "us_by_method": {"dotT": 21.2}, "cached": True}}
    monkeypatch.setattr(nf4, "tuned_report", lambda: chosen)
    main.log_nf4_kernels(default, run_dir, "steered", 0)
    (event,) = read_events(run_dir)
    assert event.pop("time")  # log_event 加的时间戳
    assert event == {"event": "nf4_kernels", "mode": "steered", "rank": 0, "cache": config.NF4_TUNING_CACHE,
                     "kernels": chosen}
