"""fast/stacked.py：M 个同形状 Llama 叠成一次前向。

- 叠加前向的 logits（预填充 + 若干解码步，左填充、每个模型提示不同）== transformers 前向（float32，舍入误差内）；
- 叠加只改变参数的存储位置，不改变 transformers 前向的结果，不多占参数内存；同一组只叠一次；
- FastDecoder(stack="pair" / "all") == 慢速参考循环逐 token（贪心与采样、各种 overlap、编译、结束记号、批不满）；
- 不能叠时给出原因（check_stackable / resolve_stack）；
- Triton 解码注意力（CPU 上用 Triton 解释器，TRITON_INTERPRET=1）== SDPA（float64 参考），含左填充、切段合并、
  空段；FastDecoder(attention="triton") == 慢速参考循环逐 token。编译成 GPU 代码的 kernel 只能在 GPU 上检查
  （bench.py --check）；kernel 作为不透明算子进编译图的整步在 CPU 上也测（test_nf4_stacked 的 compiled 测试）。
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from evaluator import ModelAdapter, left_pad
from fast.attention import load_triton_attention, split_count, triton_decode_attention
from fast.decoder import FastDecoder, _GraphedStep, resolve_attention, resolve_overlap, resolve_stack
from fast.stacked import StackedLlama, check_stackable, stack_weights
from sampling import Sampling
from test_evaluator import PAD, PROMPTS, STEER, VOCAB, run, tiny_llama
from shared_runs import tiny_llama as shared_tiny_llama

# 每个角色自己的提示（长度各不相同）：叠加单元里两个模型的左填充宽度不同，必须不影响结果。
PER_ROLE = [PROMPTS, [[9, 8, 7, 6], [1, 3, 5, 7, 9, 11, 13, 15, 17], [4]], [[20, 21], [22], [23, 24, 25, 26, 27, 28]]]


@pytest.fixture(scope="module")
def trio() -> list[LlamaForCausalLM]:
    """本文件自己的三个模型：叠加会改变参数的存储位置，不与其他测试文件共用模型对象。"""
    return [tiny_llama(10), tiny_llama(11), tiny_llama(12)]


def tied_llama(seed: int) -> LlamaForCausalLM:
    """权重绑定（lm_head 即嵌入表，1B 专家/基座的结构）的小随机 Llama；嵌入表放大，argmax 无近似平局。"""
    model = shared_tiny_llama(VOCAB, seed, head_scale=8.0, kv_heads=1, head_dim=32, max_positions=256, tie=True,
                              pad_id=PAD)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@torch.no_grad()
def _hf_logits(models: list[LlamaForCausalLM], prompts: list[list[list[int]]], feed: list[list[int]]
               ) -> list[torch.Tensor]:
    """transformers 的逐模型参考：预填充后依次喂 feed[s]（每行一个 token），返回每步的 (M, B, V) logits。"""
    adapters = [ModelAdapter(m) for m in models]
    steps = [torch.stack([a.prefill(*left_pad(p, PAD, torch.device("cpu"))) for a, p in zip(adapters, prompts)])]
    for tokens in feed:
        t = torch.tensor(tokens)[:, None]
        steps.append(torch.stack([a.decode(t) for a in adapters]))
    return steps


@torch.no_grad()
def _stacked_logits(models: list[LlamaForCausalLM], prompts: list[list[list[int]]], feed: list[list[int]],
                    length: int = 64) -> list[torch.Tensor]:
    """同样的输入走 StackedLlama：所有模型左填充到同一宽度（FastDecoder 的做法），槽位从 T 起逐步 +1。"""
    s = StackedLlama(models)
    batch = len(prompts[0])
    s.allocate(batch, length)
    ids, mask = left_pad([row for p in prompts for row in p], PAD, torch.device("cpu"))
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    full = torch.ones(ids.shape[0], length, dtype=torch.long)
    full[:, : mask.shape[1]] = mask
    steps = [s.prefill(ids, mask, pos).float()]
    nxt, slot = pos[:, -1:] + 1, torch.tensor([ids.shape[1]])
    for tokens in feed:
        steps.append(s.decode(torch.tensor(tokens)[:, None], nxt, full, slot).float())
        nxt, slot = nxt + 1, slot + 1
    return steps


@pytest.mark.parametrize("kind", ["untied_pair", "tied_pair", "single"])
def test_stacked_forward_matches_transformers(kind: str) -> None:
    """预填充与 5 个解码步的 logits 与 transformers 一致（float32 舍入误差内），每个模型的提示长度不同。"""
    models = {"untied_pair": lambda: [tiny_llama(20), tiny_llama(21)],
              "tied_pair": lambda: [tied_llama(22), tied_llama(23)],
              "single": lambda: [tiny_llama(24)]}[kind]()
    prompts = PER_ROLE[1:1 + len(models)]
    feed = [[5, 6, 7], [60, 2, 31], [1, 1, 1], [90, 45, 12], [3, 77, 8]]
    ref = _hf_logits(models, prompts, feed)  # 先算参考：叠加之前的 transformers
    got = _stacked_logits(models, prompts, feed)
    assert len(got) == len(ref) == 6
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)
    # 叠加之后 transformers 前向读的是同一份数据：结果逐位不变。
    for r, h in zip(ref, _hf_logits(models, prompts, feed)):
        assert torch.equal(r, h)


def test_chunked_prefill_matches_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """预填充按行分块（PREFILL_TOKENS 很小：每块一行）：logits、写进缓存的 K/V 与之后的解码步仍与 transformers 一致，
    与不分块的结果在 float32 舍入误差内相同。分块只是为了压低预填充的显存峰值。"""
    import fast.stacked as stacked

    models = [tiny_llama(25), tiny_llama(26)]
    prompts = PER_ROLE[1:3]
    feed = [[5, 6, 7], [60, 2, 31], [1, 1, 1]]
    ref = _hf_logits(models, prompts, feed)
    whole = _stacked_logits(models, prompts, feed)
    monkeypatch.setattr(stacked, "PREFILL_TOKENS", 1)  # 每块一行（每个模型）：三块
    chunked = _stacked_logits(models, prompts, feed)
    monkeypatch.setattr(stacked, "PREFILL_TOKENS", 2 * 9)  # 提示宽 9：每块两行，最后一块一行
    pairs = _stacked_logits(models, prompts, feed)
    for r, w, c, p in zip(ref, whole, chunked, pairs):
        torch.testing.assert_close(c, r, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(c, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p, w, rtol=1e-5, atol=1e-5)


def test_stacking_shares_storage_and_is_done_once() -> None:
    """参数改为指向叠好的张量的切片（不多占内存）；同一组再叠直接复用；模型被移动（地址变了）后重新叠。"""
    models = [tiny_llama(30), tiny_llama(31)]
    w = stack_weights(models)
    assert w is stack_weights(models)
    base, size = w.qkv[0].data_ptr(), w.qkv[0].numel() * w.qkv[0].element_size()
    for m in models:
        attn = m.model.layers[0].self_attn
        for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
            assert base <= p.data_ptr() < base + size
    assert models[1].lm_head.weight.data_ptr() == w.lm_head[1].data_ptr()
    assert models[0].model.embed_tokens.weight.data_ptr() == w.embed[0].data_ptr()
    models[0].to(torch.float64).to(torch.float32)  # 新的存储：旧视图失效
    again = stack_weights(models)
    assert again is not w and torch.equal(again.qkv[1], w.qkv[1])


def test_check_stackable_reasons() -> None:
    a, b = tiny_llama(40), tiny_llama(41)
    assert check_stackable([a, b]) is None
    assert "twice" in check_stackable([a, a])
    assert "num_key_value_heads" in check_stackable([a, tied_llama(42)])
    assert "dtype" in check_stackable([a, tiny_llama(43).to(torch.float64)])
    q = tiny_llama(44)
    q.hf_quantizer = object()  # transformers 给量化模型设置的属性
    assert "quantized" in check_stackable([a, q])
    biased = tiny_llama(45)
    biased.config.attention_bias = True
    assert "biases" in check_stackable([a, biased])
    spread = tiny_llama(46)
    spread.hf_device_map = {"model.layers.0": 0, "model.layers.1": "cpu"}  # accelerate 分散加载时设置的属性
    assert "several devices" in check_stackable([a, spread])
    with pytest.raises(ValueError, match="cannot be stacked into one forward"):
        StackedLlama([a, a])


def test_resolve_stack_rules(trio: list[LlamaForCausalLM]) -> None:
    """auto 只在 CUDA 上编译时叠加，且目标与专家/基座各自判断：目标走哪条前向只取决于目标本身
    （基线与引导两个臂里相同）；显式给出做不到时报错。"""
    assert resolve_stack("auto", trio, steering=STEER, compile=True, device_type="cuda") == "all"
    assert resolve_stack("auto", trio[:1], steering=None, compile=True, device_type="cuda") == "target"
    assert resolve_stack("auto", trio, steering=STEER, compile=True, device_type="cpu") == "off"
    assert resolve_stack("auto", trio, steering=STEER, compile=False, device_type="cuda") == "off"
    odd = tied_llama(50)  # 与 trio 的形状不同：专家/基座叠不起来，目标仍然叠
    assert resolve_stack("auto", [trio[0], trio[1], odd], steering=STEER, compile=True, device_type="cuda") == "target"
    quantized = tiny_llama(51)
    quantized.hf_quantizer = object()
    assert resolve_stack("auto", [quantized, trio[1], trio[2]], steering=STEER, compile=True,
                         device_type="cuda") == "pair"
    assert resolve_stack("auto", [quantized], steering=None, compile=True, device_type="cuda") == "off"
    assert resolve_stack("all", trio[:1], steering=None, compile=False, device_type="cpu") == "all"
    with pytest.raises(ValueError, match="only for steered"):
        resolve_stack("pair", trio[:1], steering=None, compile=False, device_type="cpu")
    with pytest.raises(ValueError, match="is not possible"):
        resolve_stack("pair", [trio[0], trio[1], trio[1]], steering=STEER, compile=False, device_type="cpu")
    with pytest.raises(ValueError, match="is not possible"):
        resolve_stack("target", [quantized], steering=None, compile=False, device_type="cpu")
    with pytest.raises(ValueError, match="auto / off / pair / target / all"):
        resolve_stack("yes", trio, steering=STEER, compile=False, device_type="cpu")


@pytest.mark.parametrize("stack", ["pair", "target", "all"])
@pytest.mark.parametrize("overlap", ["off", "graph", "streams"])
def test_fast_decoder_stacked_equals_reference_loop(trio: list[LlamaForCausalLM], stack: str, overlap: str) -> None:
    """叠加路径 == 慢速循环逐 token（α 也一致）：每个角色的提示不同、批不满（补占位行）。"""
    decoder = FastDecoder(trio, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                          compile=False, overlap=overlap, stack=stack)
    pair = stack in ("pair", "all")
    assert decoder.units == ([(0,), (1, 2)] if pair else [(0,), (1,), (2,)])
    assert (decoder.stacked[0] is not None) == (stack in ("target", "all"))
    quick = decoder.generate(PER_ROLE, 14)
    slow = run(trio, None, steps=14, steering=STEER, per_role=PER_ROLE)
    assert quick.tokens == slow.tokens
    for a, b in zip(quick.alpha, slow.alpha):
        assert a == pytest.approx(b, abs=1e-5)
    assert [c is None for c in decoder.caches] == [stack != "pair", pair, pair]
    if overlap != "off":
        assert isinstance(decoder.step, _GraphedStep) and decoder.step.calls == 13


def test_fast_decoder_stacked_target_only_and_end_tokens(trio: list[LlamaForCausalLM]) -> None:
    """stack="all" 的基线（只有目标，M = 1）；带结束记号、跨批复用与换桶重新分配缓存。"""
    decoder = FastDecoder(trio[:1], vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=3, steering=None,
                          compile=False, stack="all")
    assert decoder.units == [(0,)] and decoder.stacked[0] is not None
    long_prompts = [[3 + i % 90 for i in range(140)], [7] * 20]
    for prompts, steps in ((PROMPTS, 10), (long_prompts, 6), (PROMPTS[1:], 8)):
        assert decoder.generate([prompts], steps).tokens == run(trio[:1], prompts, steps=steps).tokens
    free = run(trio, PROMPTS, steps=16, steering=STEER).tokens
    end = free[0][3]
    decoder = FastDecoder(trio, vocab_size=VOCAB, end_ids=[end], pad_id=PAD, batch_size=5, steering=STEER,
                          compile=False, overlap="graph", check_every=4, stack="pair")
    assert decoder.generate([PROMPTS] * 3, 16).tokens == run(trio, PROMPTS, steps=16, steering=STEER,
                                                             ends=[end]).tokens


def test_fast_decoder_stacked_sampling_equals_reference(trio: list[LlamaForCausalLM]) -> None:
    """采样时叠加路径也与参考循环逐 token 相同（随机数由题目 index 与步数决定）。"""
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=3)
    decoder = FastDecoder(trio, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                          compile=False, sampling=sampling, overlap="streams", stack="pair")
    fast = decoder.generate(PER_ROLE, 10, question_ids=[10, 11, 12]).tokens
    from evaluator import generate_batch

    slow = generate_batch(trio, PER_ROLE, vocab_size=VOCAB, max_new_tokens=10, end_ids=[], pad_id=PAD,
                          steering=STEER, sampling=sampling, question_ids=[10, 11, 12]).tokens
    assert fast == slow
    greedy = run(trio, None, steps=10, steering=STEER, per_role=PER_ROLE).tokens
    assert fast != greedy  # 采样真的改变了输出


def test_fast_decoder_stacked_compiled_equals_reference(trio: list[LlamaForCausalLM]) -> None:
    """CPU 上真的编译（fullgraph）叠加单元：分开编译（streams）与慢速循环逐 token 一致。整步编译（overlap="off"）
    的同一检查在 test_fast_arm_leaves_shared_models_as_before 里（stack="all"，含叠加的 pair 单元）：每次编译在 CPU 上
    要好几秒，一次编译同时检查结果与“不改共享模型”。"""
    decoder = FastDecoder(trio, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                          compile=True, overlap="streams", stack="pair")
    assert decoder.generate(PER_ROLE, 8).tokens == run(trio, None, steps=8, steering=STEER,
                                                       per_role=PER_ROLE).tokens


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="没有 triton 包（.ci/run 会安装它，用解释器在 CPU 上跑 kernel）")


@pytest.fixture
def interpreted_triton() -> None:
    """Triton kernel 在 CPU 上由解释器执行：conftest 在导入 triton 之前设了 TRITON_INTERPRET=1。"""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET 不是 1：kernel 要编译给 GPU，CPU 测试跑不了")
    load_triton_attention()


def _sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, slot: int,
                    scale: float) -> torch.Tensor:
    """float64 的 SDPA：可见 = mask ∧ 槽位 ≤ slot（StackedLlama 的 SDPA 路径的规则）。"""
    visible = (mask.bool() & (torch.arange(mask.shape[1])[None, :] <= slot))[:, None, None, :]
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=visible, scale=scale)


@needs_triton
@pytest.mark.parametrize("rows, kv_heads, groups, dim, length, slot, n_split", [
    (3, 2, 4, 16, 40, 25, 1),    # 不切段：kernel 直接写输出
    (3, 2, 4, 16, 40, 25, 3),    # 切段 + 合并
    (2, 1, 8, 32, 130, 129, 2),  # slot 在缓存末尾，块数不整除
    (2, 2, 1, 16, 64, 0, 1),     # 第一个解码位置：只看见自己；G = 1（补零到 16 行）
    (4, 2, 4, 16, 64, 5, 8),     # 段数多于已写的块：后面的段是空段（m = −inf、l = 0），合并时权重为 0
])
def test_triton_attention_matches_sdpa(interpreted_triton: None, rows: int, kv_heads: int, groups: int, dim: int,
                                       length: int, slot: int, n_split: int) -> None:
    """随机输入（每行左填充不同、槽位之后写着不该被读到的值）：与 float64 SDPA 一致，不改输入，输出全部写到。"""
    torch.manual_seed(rows * 100 + slot)
    q = torch.randn(rows, kv_heads, groups, dim)
    k, v = torch.randn(rows, kv_heads, length, dim), torch.randn(rows, kv_heads, length, dim)
    k[:, :, slot + 1:] = 1e4  # 还没写的槽位：读到就会改变结果
    mask = torch.ones(rows, length, dtype=torch.long)
    for r in range(rows):
        mask[r, : min(r * 3, slot)] = 0  # 左填充（本步 token 所在槽位总是可见）
    before = [t.clone() for t in (q, k, v, mask)]
    out = triton_decode_attention(q, k, v, mask, torch.tensor([slot]), dim ** -0.5, n_split=n_split)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _sdpa_reference(q, k, v, mask, slot, dim ** -0.5), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, mask)))


@needs_triton
@pytest.mark.parametrize("t, n_split", [(3, 1), (3, 2), (5, 4), (2, 1)])
def test_triton_verify_attention_matches_sdpa(interpreted_triton: None, t: int, n_split: int) -> None:
    """投机解码的验证（t 个位置写在 slot..slot+t−1）：第 g 个打包查询是位置 g % t，只看 mask ∧ 槽位 ≤ slot + i——
    与 float64 SDPA（按位置的因果掩码，StackedLlama.verify 的 SDPA 路径的规则）一致；slot + t 之后的槽位不被读到。"""
    rows, kv_heads, heads_per_kv, dim, length, slot = 3, 2, 4, 16, 64, 20
    torch.manual_seed(t * 10 + n_split)
    q = torch.randn(rows, kv_heads, heads_per_kv * t, dim)  # 查询 (r, i) → r·t + i
    k, v = torch.randn(rows, kv_heads, length, dim), torch.randn(rows, kv_heads, length, dim)
    k[:, :, slot + t:] = 1e4  # 还没写的槽位
    mask = torch.ones(rows, length, dtype=torch.long)
    for r in range(rows):
        mask[r, : r * 3] = 0  # 左填充
    mask[1, slot + 1] = 0  # 被拒的草稿列（掩掉、不裁剪）：之后的位置也看不见它
    out = triton_decode_attention(q, k, v, mask, torch.tensor([slot]), dim ** -0.5, n_split=n_split, t=t)
    cols = slot + torch.arange(t)
    visible = mask.bool()[:, None, :] & (torch.arange(length)[None, :] <= cols[:, None])[None]  # (R, t, L)
    visible = visible[:, None, None].expand(rows, 1, heads_per_kv, t, length).reshape(rows, 1, heads_per_kv * t, length)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=visible, scale=dim ** -0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must divide"):
        triton_decode_attention(q[:, :, :-1], k, v, mask, torch.tensor([slot]), dim ** -0.5, t=t)


@needs_triton
def test_triton_attention_strided_query(interpreted_triton: None) -> None:
    """q 是转置出来的视图（StackedLlama 里 (R, H, 1, D) 经 reshape 得到）：kernel 按步长读，不要求连续。"""
    torch.manual_seed(5)
    q = torch.randn(2, 1, 8, 16).transpose(1, 2).reshape(2, 2, 4, 16)  # (R, H_kv, G, D)，第 0 维步长非连续布局
    wide = torch.randn(2, 2, 48, 32)
    k, v = wide[..., :16], wide[..., 16:]  # 最后一维连续、其他维带步长的 K/V
    mask = torch.ones(2, 48, dtype=torch.long)
    out = triton_decode_attention(q, k, v, mask, torch.tensor([30]), 0.25, n_split=2)
    torch.testing.assert_close(out.double(), _sdpa_reference(q, k, v, mask, 30, 0.25), rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_attention_refuses_bad_shapes(interpreted_triton: None) -> None:
    """形状不符、head_dim 不是 ≥ 16 的 2 的幂、最后一维不连续：在算之前报错并说明怎么办。"""
    q, k = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 32, 16)
    mask, slot = torch.ones(2, 32, dtype=torch.long), torch.tensor([5])
    with pytest.raises(ValueError, match="K/V shapes"):
        triton_decode_attention(q, k, torch.randn(2, 2, 31, 16), mask, slot, 0.25)
    with pytest.raises(ValueError, match="mask must be"):
        triton_decode_attention(q, k, k, mask[:, :30], slot, 0.25)
    odd_q, odd_k = torch.randn(2, 2, 4, 24), torch.randn(2, 2, 32, 24)
    with pytest.raises(ValueError, match="head_dim a power of 2 >= 16"):
        triton_decode_attention(odd_q, odd_k, odd_k, mask, slot, 0.25)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        triton_decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, mask, slot, 0.25)
    with pytest.raises(ValueError, match="head_dim=24 is not supported"):
        StackedLlama([odd_llama()], attention="triton")


def odd_llama() -> LlamaForCausalLM:
    """head_dim 24 的小 Llama：Triton kernel 不支持（不是 2 的幂）。"""
    torch.manual_seed(60)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_split_count() -> None:
    """程序数足够（≥ 2 × SM）时不切；不够时切到 ≥ 2 × SM 个程序，但不超过块数。"""
    assert split_count(1024, 4, 132) == 1
    assert split_count(512, 8, 132) == 1
    assert split_count(8, 8, 132) == 8
    assert split_count(16, 40, 132) == 17
    assert split_count(1, 1, 132) == 1


def test_resolve_attention_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto：CUDA 上有 triton 取 triton，CPU 或没有 triton 取 sdpa；没有叠加单元时总是 sdpa，显式要 triton 报错。"""
    monkeypatch.setattr("fast.attention.triton_available", lambda: True)
    assert resolve_attention("auto", head_dims=[64], device_type="cuda") == "triton"
    assert resolve_attention("auto", head_dims=[64], device_type="cpu") == "sdpa"
    assert resolve_attention("auto", head_dims=[], device_type="cuda") == "sdpa"
    assert resolve_attention("sdpa", head_dims=[64], device_type="cuda") == "sdpa"
    assert resolve_attention("triton", head_dims=[64], device_type="cpu") == "triton"
    with pytest.raises(ValueError, match="only for stacked forwards"):
        resolve_attention("triton", head_dims=[], device_type="cuda")
    with pytest.raises(ValueError, match="auto / sdpa / triton"):
        resolve_attention("flash", head_dims=[64], device_type="cuda")
    assert resolve_attention("auto", device_type="cuda", head_dims=[64, 128]) == "triton"
    assert resolve_attention("auto", device_type="cuda", head_dims=[128, 80]) == "sdpa"
    with pytest.raises(ValueError, match="is not supported"):
        resolve_attention("triton", device_type="cuda", head_dims=[80])
    monkeypatch.setattr("fast.attention.triton_available", lambda: False)
    assert resolve_attention("auto", head_dims=[64], device_type="cuda") == "sdpa"
    with pytest.raises(ValueError, match="needs the triton package"):
        resolve_attention("triton", head_dims=[64], device_type="cuda")


@needs_triton
@pytest.mark.parametrize("stack, overlap", [("all", "streams"), ("pair", "off")])
def test_fast_decoder_triton_attention_equals_reference(interpreted_triton: None, trio: list[LlamaForCausalLM],
                                                        stack: str, overlap: str) -> None:
    """attention="triton" 的叠加路径 == 慢速循环逐 token（α 也一致）：每个角色的提示不同、批不满。"""
    decoder = FastDecoder(trio, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                          compile=False, overlap=overlap, stack=stack, attention="triton")
    assert decoder.attention == "triton"
    assert all(s.attention == "triton" for s in decoder.stacked if s is not None)
    quick = decoder.generate(PER_ROLE, 12)
    slow = run(trio, None, steps=12, steering=STEER, per_role=PER_ROLE)
    assert quick.tokens == slow.tokens
    for a, b in zip(quick.alpha, slow.alpha):
        assert a == pytest.approx(b, abs=1e-5)


@needs_triton
def test_fast_decoder_triton_attention_target_only_equals_reference(interpreted_triton: None,
                                                                    trio: list[LlamaForCausalLM]) -> None:
    """基线（只有目标、M = 1）的 triton 叠加路径 == 慢速循环，再加一批 140 个 token 的长提示：已写的槽位跨过多个
    64 槽位的块，且 3 行 × 2 个 KV 头的程序数少于 2 × 4（CPU 上按 4 个 SM 算），kernel 走“切段 + 合并”。
    （与上面的参数无关：以前在两个参数里各跑一遍。）"""
    target = FastDecoder(trio[:1], vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=3, steering=None,
                         compile=False, stack="target", attention="triton")
    assert target.attention == "triton" and target.stacked[0] is not None
    assert target.generate([PROMPTS], 10).tokens == run(trio[:1], PROMPTS, steps=10).tokens
    long_prompts = [[3 + i % 90 for i in range(140)], [7] * 20, [5, 6]]
    assert split_count(3 * 2, 256 // 64, 4) == 2
    assert target.generate([long_prompts], 6).tokens == run(trio[:1], long_prompts, steps=6).tokens


def test_fast_arm_leaves_shared_models_as_before() -> None:
    """快速路径不改变共享模型：跑过叠加 + 编译的 FastDecoder 之后，同一组模型对象上的参考循环输出逐 token 不变，
    注意力实现、dynamo 的重编译上限与每个权重的取值都与之前相同（叠加后参数是叠加存储的视图，值不变）。
    同一次编译也是整步编译（overlap="off"，stack="all"）== 慢速循环逐 token 的检查（每个角色的提示不同、批不满）。"""
    from evaluator import generate_batch

    models = [tiny_llama(s) for s in (20, 21, 22)]
    impl = [m.config._attn_implementation for m in models]
    limit = torch._dynamo.config.recompile_limit
    weights = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]

    def reference() -> tuple[list[list[int]], list[list[int]]]:
        kw = dict(vocab_size=VOCAB, max_new_tokens=8, end_ids=[], pad_id=PAD)
        return (generate_batch(models, PER_ROLE, steering=STEER, **kw).tokens,
                generate_batch(models[:1], [PROMPTS], **kw).tokens)

    before = reference()
    decoder = FastDecoder(models, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                          compile=True, overlap="off", stack="all")
    assert decoder.generate(PER_ROLE, 8).tokens == before[0]
    assert [m.config._attn_implementation for m in models] == impl
    assert torch._dynamo.config.recompile_limit == limit
    for m, saved in zip(models, weights):
        assert all(torch.equal(v, saved[k]) for k, v in m.state_dict().items())
    assert reference() == before


# ---------------------------------------------------------------------------------------------------------------
# 张量子类的量化权重（weight_kind "module"，例如 torchao int4）：投影逐模型、逐个走库的 F.linear，其余照常叠加
# ---------------------------------------------------------------------------------------------------------------
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="没有 torchao（.ci/run 会安装它）")


def _subclass_weights(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """解码层的 7 个投影换成 torchao 的 int8 只量化权重张量子类（Int8Tensor）。为什么不是 int4：torchao 的
    tile-packed int4 只能在 CUDA 上构造；int8 是 CPU 上能跑的同一类张量子类（nn.Linear 不变、weight 是子类），
    叠加路径对两者的处理完全相同（只调用 F.linear）。嵌入与 lm_head 不动（与 model_loader 的 int4 相同）。"""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear)
              and ".layers." in f".{fqn}")
    return model


@pytest.fixture(scope="module")
def subclass_trio() -> list[LlamaForCausalLM]:
    return [_subclass_weights(tiny_llama(90 + i)) for i in range(3)]


@needs_torchao
def test_subclass_weights_stack_on_cuda_compile(subclass_trio: list[LlamaForCausalLM]) -> None:
    """张量子类权重能叠（"module"）：CUDA 编译时 stack="auto" 选 "all"（H200 上量过，比 transformers 前向快，
    BENCHMARKS.md 的 ff2a723 一节），侧流也跟着开；CPU / 不编译时仍是 "off"。
    叠加不拷贝也不改指向：ModuleWeights 里就是模型自己的参数对象。"""
    from fast.stacked import ModuleWeights, weight_kind

    assert weight_kind(subclass_trio[0]) == "module" and check_stackable(subclass_trio) is None
    assert resolve_stack("auto", subclass_trio, steering=STEER, compile=True, device_type="cuda") == "all"
    assert resolve_stack("auto", subclass_trio, steering=None, compile=True, device_type="cuda") == "target"
    assert resolve_stack("auto", subclass_trio, steering=STEER, compile=True, device_type="cpu") == "off"
    assert resolve_stack("auto", subclass_trio, steering=STEER, compile=False, device_type="cuda") == "off"
    assert resolve_overlap("auto", subclass_trio, steering=STEER, compile=True, device_type="cuda",
                           stacked=subclass_trio) == "streams"
    plain = tiny_llama(95)
    assert "different kinds (module and plain)" in check_stackable([subclass_trio[1], plain])
    w = stack_weights(subclass_trio[1:])
    attn = subclass_trio[1].model.layers[0].self_attn
    assert isinstance(w.qkv[0], ModuleWeights)
    assert [p is q for p, q in zip(w.qkv[0].weights[0], (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))] \
        == [True, True, True]


@needs_torchao
@pytest.mark.parametrize("compile", [False, True])
def test_fast_decoder_subclass_weights_equal_reference_loop(subclass_trio: list[LlamaForCausalLM],
                                                            compile: bool) -> None:
    """stack="all" 的张量子类路径 == 慢速循环（transformers 的前向，同一份量化权重）逐 token：引导（叠加的 pair 走
    逐模型 F.linear）与基线；compile=True 时整步由 inductor 编译（子类在编译图里）。"""
    decoder = FastDecoder(subclass_trio, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                          compile=compile, overlap="off", stack="all")
    assert decoder.stack == "all" and all(s is not None for s in decoder.stacked)
    assert decoder.generate(PER_ROLE, 8).tokens == run(subclass_trio, None, steps=8, steering=STEER,
                                                       per_role=PER_ROLE).tokens
    target = FastDecoder(subclass_trio[:1], vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=3, steering=None,
                         compile=compile, stack="target")
    assert target.generate([PROMPTS], 8).tokens == run(subclass_trio[:1], PROMPTS, steps=8).tokens


@needs_torchao
def test_speculative_decoding_on_subclass_weights(subclass_trio: list[LlamaForCausalLM]) -> None:
    """stack auto 现在也叠 torchao int4（张量子类），--speculate 因此也走叠加的 K+1 位置验证前向（投影逐模型的
    F.linear，M = B·(K+1) 行）：与不投机的参考循环逐 token 相同（CPU 上用 int8 子类代替只能在 CUDA 上构造的 int4）。"""
    from fast.speculative import SpeculativeDecoder

    dec = SpeculativeDecoder(subclass_trio, k=2, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4,
                             steering=STEER, compile=False, stack="all")
    assert dec.stack == "all" and all(s is not None for s in dec.stacked)
    assert dec.generate(PER_ROLE, 6).tokens == run(subclass_trio, None, steps=6, steering=STEER,
                                                   per_role=PER_ROLE).tokens
