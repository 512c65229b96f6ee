"""解码循环的正确性：与 HF generate()、无缓存全量重算参考、单条 vs 批量、逐行停止、α≡0 等价性。

全部用 LlamaConfig 构造的小随机模型（fp32、CPU、确定性）。lm_head 放大若干倍，
让 logits 拉开距离，argmax 不会出现近似平局——否则浮点噪声就可能让两条正确路径选出不同 token。
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from evaluator import generate_batch, left_pad
from steering_utils import SteeringParams
from steering_utils import calculate_adaptive_alpha, compute_steered_logits
from shared_runs import tiny_llama as shared_tiny_llama

VOCAB = 96
PAD = 0
# 三条长度不同的提示：左填充时真实 token 的位置编号必须不受影响。
PROMPTS = [[5, 17, 23, 9, 41, 7, 3], [11, 2, 60], [33, 34, 35, 36, 37]]


def tiny_llama(seed: int, vocab: int = VOCAB, max_positions: int = 256) -> LlamaForCausalLM:
    """shared_runs.tiny_llama 的默认尺寸（2 层、hidden 64、GQA 4/2 头，lm_head ×40 使 argmax 无近似平局）。"""
    return shared_tiny_llama(vocab, seed, max_positions=max_positions, pad_id=PAD)


@pytest.fixture(scope="module")
def trio() -> tuple[LlamaForCausalLM, LlamaForCausalLM, LlamaForCausalLM]:
    return tiny_llama(0), tiny_llama(1), tiny_llama(2)


def run(models, prompts, steps=12, ends=(), steering=None, per_role=None):
    """generate_batch 的简写：默认三个角色看同一份提示。"""
    role_prompts = per_role or [prompts] * len(models)
    return generate_batch(models, role_prompts, vocab_size=VOCAB, max_new_tokens=steps, end_ids=list(ends),
                          pad_id=PAD, steering=steering)


@torch.no_grad()
def reference_greedy(models, role_prompts, steps, steering=None, ends=()):
    """慢但显然正确的参考：每一步把“提示 + 已生成”整段重新前向（无 KV 缓存），逐行独立处理。

    与被测循环共享的只有 steering_utils 的纯函数；填充、位置编号、缓存一概不用。
    """
    outputs = []
    for row in range(len(role_prompts[0])):
        generated: list[int] = []
        for _ in range(steps):
            z = [m(torch.tensor([role_prompts[k][row] + generated])).logits[:, -1].float()
                 for k, m in enumerate(models)]
            if steering is None:
                fused = z[0]
            else:
                a = calculate_adaptive_alpha(z[0], z[1], steering.base_alpha, steering.adaptive_scale,
                                             steering.max_boost, steering.metric)
                fused = compute_steered_logits(z[0], z[1], z[2], a)
            tok = int(fused.argmax(-1))
            generated.append(tok)
            if tok in ends:
                break
        outputs.append(generated)
    return outputs


STEER = SteeringParams(base_alpha=1.0, adaptive_scale=10.0, max_boost=1.0, metric="js")


def test_left_pad_shapes_and_mask():
    ids, mask = left_pad(PROMPTS, PAD, torch.device("cpu"))
    assert ids.shape == mask.shape == (3, 7)
    assert mask.sum(1).tolist() == [7, 3, 5]
    assert ids[1].tolist() == [PAD] * 4 + [11, 2, 60]


def test_baseline_matches_hf_generate(trio):
    """条目 1：基线循环与 HF generate(do_sample=False) 在左填充的变长批次上逐 token 一致。"""
    target = trio[0]
    ids, mask = left_pad(PROMPTS, PAD, torch.device("cpu"))
    with torch.no_grad():
        hf = target.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                             pad_token_id=PAD, eos_token_id=None)
    ours = run([target], PROMPTS, steps=16)
    assert ours.tokens == hf[:, ids.shape[1]:].tolist()
    assert ours.steps == 16


def test_baseline_matches_hf_generate_with_eos(trio):
    """带结束记号时同样一致：HF 在结束后填 pad，我们的输出截止到结束记号（含）。"""
    target = trio[0]
    free = run([target], PROMPTS, steps=16).tokens
    end = free[0][5]  # 第 0 行第 6 个 token 作为结束记号
    ids, mask = left_pad(PROMPTS, PAD, torch.device("cpu"))
    with torch.no_grad():
        hf = target.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                             pad_token_id=PAD, eos_token_id=end)[:, ids.shape[1]:].tolist()
    ours = run([target], PROMPTS, steps=16, ends=[end]).tokens
    for h, o in zip(hf, ours):
        cut = h.index(end) + 1 if end in h else len(h)
        assert o == h[:cut]


def test_cached_loop_matches_full_recompute(trio):
    """条目 3（后半）：带缓存的循环 == 无缓存全量重算的参考，基线与引导都成立。"""
    assert run([trio[0]], PROMPTS, steps=10).tokens == reference_greedy([trio[0]], [PROMPTS], 10)
    steered = run(list(trio), PROMPTS, steps=10, steering=STEER)
    assert steered.tokens == reference_greedy(list(trio), [PROMPTS] * 3, 10, STEER)


def test_per_role_prompts_match_reference(trio):
    """三个角色看不同的提示（不同系统提示、不同长度）时，循环仍与逐行参考一致。"""
    per_role = [PROMPTS, [[8, 8] + p for p in PROMPTS], [p[1:] for p in PROMPTS]]
    ours = run(list(trio), PROMPTS, steps=10, steering=STEER, per_role=per_role)
    assert ours.tokens == reference_greedy(list(trio), per_role, 10, STEER)


def test_steering_changes_the_output(trio):
    """健全性检查：引导确实改变了生成（否则上面的“等价”测试可能什么都没测）。"""
    assert run(list(trio), PROMPTS, steering=STEER).tokens != run([trio[0]], PROMPTS).tokens


@pytest.mark.parametrize("batch_prompts", [PROMPTS, PROMPTS[::-1]])
def test_batch_equals_each_prompt_alone(trio, batch_prompts):
    """条目 3（前半）：批量结果 == 每条提示单独跑的结果（左填充不泄漏到真实 token）。"""
    for steering, models in ((None, [trio[0]]), (STEER, list(trio))):
        batch = run(models, batch_prompts, steering=steering).tokens
        alone = [run(models, [p], steering=steering).tokens[0] for p in batch_prompts]
        assert batch == alone


def test_alpha_zero_equals_baseline(trio):
    """条目 2：α ≡ 0（base_alpha = max_boost = 0）时引导 == 基线，逐 token 完全相同。"""
    zero = SteeringParams(base_alpha=0.0, adaptive_scale=10.0, max_boost=0.0)
    steered = run(list(trio), PROMPTS, steps=16, steering=zero)
    assert steered.tokens == run([trio[0]], PROMPTS, steps=16).tokens
    assert all(a == 0.0 for row in steered.alpha for a in row)


def test_expert_equal_to_base_equals_baseline(trio):
    """条目 2：专家与基座是同一模型（同一对象、同一提示）时 z_e − z_b ≡ 0，引导 == 基线。"""
    target, other = trio[0], trio[1]
    steered = run([target, other, other], PROMPTS, steps=16, steering=STEER)
    assert steered.tokens == run([target], PROMPTS, steps=16).tokens


def test_per_row_stop(trio):
    """条目 4：一行生成结束记号后停止、之后什么都不出现，其他行继续到上限且不受影响。"""
    target = trio[0]
    free = run([target], PROMPTS, steps=16).tokens
    # 选一个只在第 0 行出现、且不在其他行出现的 token 作为结束记号。
    candidates = [t for t in free[0][2:] if all(t not in r for r in free[1:])]
    assert candidates, "测试前提：第 0 行应有其他行没有的 token"
    end = candidates[0]
    stop_at = free[0].index(end) + 1
    result = run([target], PROMPTS, steps=16, ends=[end])
    assert result.tokens[0] == free[0][:stop_at] and result.tokens[0][-1] == end
    assert result.tokens[1:] == free[1:]
    assert result.steps == 16


def test_all_rows_stop_early(trio):
    """所有行都结束时循环提前退出（不再浪费前向）。"""
    target = trio[0]
    free = run([target], PROMPTS[:1], steps=16).tokens[0]
    result = run([target], PROMPTS[:1], steps=16, ends=[free[3]])
    assert result.steps == free.index(free[3]) + 1
    assert result.tokens[0] == free[: result.steps]


def test_alpha_recorded_per_active_step(trio):
    """引导模式按行记录活跃步上的 α：长度等于该行生成的 token 数，且落在 [base, base + boost]。"""
    free = run(list(trio), PROMPTS, steps=12, steering=STEER).tokens
    end = next(t for t in free[1][1:] if all(t not in r for r in (free[0], free[2])))
    result = run(list(trio), PROMPTS, steps=12, steering=STEER, ends=[end])
    for toks, alphas in zip(result.tokens, result.alpha):
        assert len(alphas) == len(toks)
        assert all(1.0 <= a <= 2.0 for a in alphas)
    assert len(result.tokens[1]) < 12


def test_vocab_slice_excludes_padded_rows():
    """模型的 lm_head 比分词器词表多出的填充行永远不会被选中（即使它们的 logit 最大）。"""
    model = tiny_llama(3, vocab=VOCAB + 32)
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] = 0.0
        model.lm_head.bias = None
        model.lm_head.weight[VOCAB:, 0] = 1e4  # 让填充行在几乎所有位置上都是最大 logit
    out = generate_batch([model], [PROMPTS], vocab_size=VOCAB, max_new_tokens=8, end_ids=[], pad_id=PAD)
    assert all(t < VOCAB for row in out.tokens for t in row)


def test_argument_validation(trio):
    with pytest.raises(ValueError, match="three models"):
        generate_batch([trio[0]], [PROMPTS], vocab_size=VOCAB, max_new_tokens=2, end_ids=[], pad_id=PAD,
                       steering=STEER)
    with pytest.raises(ValueError, match="is empty"):
        left_pad([[1, 2], []], PAD, torch.device("cpu"))


# ---------------------------------------------------------------------------
# 快速路径（FastDecoder，CPU 上不编译）== 慢速参考循环，逐 token
# ---------------------------------------------------------------------------

from fast.decoder import FastDecoder, length_bucket  # noqa: E402


def fast(models, prompts, steps=12, ends=(), steering=None, per_role=None, batch_size=4, decoder=None):
    """FastDecoder 的简写；decoder 给出时复用它（检验缓存跨批复用）。"""
    decoder = decoder or FastDecoder(models, vocab_size=VOCAB, end_ids=list(ends), pad_id=PAD,
                                     batch_size=batch_size, steering=steering, compile=False)
    return decoder.generate(per_role or [prompts] * len(models), steps)


@pytest.mark.parametrize("steered", [False, True])
def test_fast_path_matches_reference_loop(trio, steered):
    models, steering = (list(trio), STEER) if steered else ([trio[0]], None)
    slow = run(models, PROMPTS, steps=16, steering=steering)
    quick = fast(models, PROMPTS, steps=16, steering=steering)
    assert quick.tokens == slow.tokens
    if steered:
        for a, b in zip(quick.alpha, slow.alpha):
            assert a == pytest.approx(b, abs=1e-6)


def test_fast_path_with_end_ids_and_per_role_prompts(trio):
    """带结束记号、三个角色提示不同、批不满（3 行、batch_size 5，补 2 个占位行）时仍一致。"""
    per_role = [PROMPTS, [[8, 8] + p for p in PROMPTS], [p[1:] for p in PROMPTS]]
    free = run(list(trio), PROMPTS, steps=16, steering=STEER, per_role=per_role).tokens
    end = next(t for t in free[0][2:] if all(t not in r for r in free[1:]))
    slow = run(list(trio), PROMPTS, steps=16, steering=STEER, per_role=per_role, ends=[end])
    quick = fast(list(trio), PROMPTS, steps=16, steering=STEER, per_role=per_role, ends=[end], batch_size=5)
    assert quick.tokens == slow.tokens
    assert len(quick.tokens[0]) < 16 and quick.tokens[0][-1] == end
    assert [len(a) for a in quick.alpha] == [len(t) for t in quick.tokens]


def test_fast_path_reuses_caches_across_batches(trio):
    """同一个 FastDecoder 连续处理不同长度的批（同桶复用缓存、换桶重新分配），结果都与参考一致。"""
    decoder = FastDecoder(list(trio), vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=3, steering=STEER,
                          compile=False)
    long_prompts = [[3 + i % 90 for i in range(140)], [7] * 20]
    for prompts, steps in ((PROMPTS, 10), (PROMPTS[:1], 6), (long_prompts, 8), (PROMPTS[1:], 10)):
        assert fast(list(trio), prompts, steps=steps, steering=STEER, decoder=decoder).tokens == \
            run(list(trio), prompts, steps=steps, steering=STEER).tokens
    assert decoder.cache_key == (3, length_bucket(max(len(p) for p in PROMPTS[1:]) + 10))


def test_fast_path_all_finished_stops_early(trio):
    target = trio[0]
    free = run([target], PROMPTS[:1], steps=40).tokens[0]
    decoder = FastDecoder([target], vocab_size=VOCAB, end_ids=[free[2]], pad_id=PAD, batch_size=1, steering=None,
                          compile=False, check_every=4)
    out = decoder.generate([PROMPTS[:1]], 40)
    assert out.tokens[0] == free[: free.index(free[2]) + 1]
    assert out.steps <= 4  # 每 4 步检查一次“全部结束”，不会跑满 40 步


def test_length_bucket():
    assert [length_bucket(n) for n in (1, 128, 129, 700)] == [128, 128, 256, 768]


# ---------------------------------------------------------------------------
# α 调度与可信度约束：两条路径都经过 fuse_step，与无缓存参考逐 token 一致
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,beta", [("adaptive_inverse", 0.0), ("constant", 0.0), ("adaptive", 0.05)])
def test_schedules_and_plausibility_fast_equals_slow_equals_reference(trio, schedule, beta):
    from steering_utils import apply_plausibility, schedule_alpha

    s = SteeringParams(base_alpha=1.5, adaptive_scale=10.0, max_boost=1.0, schedule=schedule, plausibility_beta=beta)
    slow = run(list(trio), PROMPTS, steps=10, steering=s)
    assert fast(list(trio), PROMPTS, steps=10, steering=s).tokens == slow.tokens
    # 独立参考：逐行全量重算，融合规则直接由 steering_utils 的纯函数拼出
    ref = []
    with torch.no_grad():
        for p in PROMPTS:
            gen: list[int] = []
            for _ in range(10):
                z = [m(torch.tensor([p + gen])).logits[:, -1].float() for m in trio]
                a = schedule_alpha(z[0], z[1], s)
                fused = compute_steered_logits(z[0], z[1], z[2], a)
                gen.append(int((apply_plausibility(fused, z[0], beta) if beta else fused).argmax(-1)))
            ref.append(gen)
    assert slow.tokens == ref
    if schedule == "constant":
        assert all(x == 1.5 for row in slow.alpha for x in row)


def test_plausibility_beta_one_reproduces_baseline(trio):
    """β = 1：只剩目标的 argmax 可选，引导退化为基线（可信度约束确实生效的端到端检查）。"""
    s = SteeringParams(base_alpha=3.0, adaptive_scale=10.0, max_boost=1.0, plausibility_beta=1.0)
    assert run(list(trio), PROMPTS, steps=12, steering=s).tokens == run([trio[0]], PROMPTS, steps=12).tokens
    assert run(list(trio), PROMPTS, steps=12, steering=STEER).tokens != run([trio[0]], PROMPTS, steps=12).tokens


def test_compiled_fullgraph_step_matches_slow_loop_across_recompiles(trio):
    """CPU 上真的编译解码步（fullgraph=True，graph break 即报错）：两组不同的引导参数先后编译
    （第二次会触发 dynamo 的重新编译与符号化浮点），结果都与慢速循环逐 token 一致。"""
    for s in (STEER, SteeringParams(1.5, 10.0, 1.0, schedule="adaptive_inverse", plausibility_beta=0.05)):
        decoder = FastDecoder(list(trio), vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=s,
                              compile=True)
        assert decoder.generate([PROMPTS] * 3, 8).tokens == run(list(trio), PROMPTS, steps=8, steering=s).tokens


# ---------------------------------------------------------------------------
# overlap 模式（_GraphedStep：分开编译的前向 + 手动录制的整步图；CPU 上没有图，但走同一套静态缓冲）
# ---------------------------------------------------------------------------

from fast.decoder import _copy_tree, _GraphedStep  # noqa: E402


@pytest.mark.parametrize("overlap", ["graph", "streams"])
@pytest.mark.parametrize("steered", [False, True])
def test_overlap_step_matches_reference_loop(trio, overlap, steered):
    """overlap 模式 == 慢速循环逐 token（α 也一致）；超过预热次数的步走“复制进静态缓冲再执行”的路径。"""
    models, steering = (list(trio), STEER) if steered else ([trio[0]], None)
    decoder = FastDecoder(models, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=steering,
                          compile=False, overlap=overlap)
    assert isinstance(decoder.step, _GraphedStep)
    quick = decoder.generate([PROMPTS] * len(models), 16)
    slow = run(models, PROMPTS, steps=16, steering=steering)
    assert quick.tokens == slow.tokens
    assert decoder.step.static_in is not None and decoder.step.calls == 15  # 16 步 = 1 步来自 prefill + 15 次调用
    if steered:
        for a, b in zip(quick.alpha, slow.alpha):
            assert a == pytest.approx(b, abs=1e-6)


def test_overlap_step_across_batches_and_cache_reallocation(trio):
    """同一解码器：同桶的批复用静态缓冲（不重新预热），换桶时 invalidate 后重新预热；带结束记号、批不满。"""
    decoder = FastDecoder(list(trio), vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=3, steering=STEER,
                          compile=False, overlap="streams")
    long_prompts = [[3 + i % 90 for i in range(140)], [7] * 20]
    calls = []
    for prompts, steps in ((PROMPTS, 10), (PROMPTS[:1], 6), (long_prompts, 8), (PROMPTS[1:], 10)):
        assert decoder.generate([prompts] * 3, steps).tokens == run(list(trio), prompts, steps=steps,
                                                                    steering=STEER).tokens
        calls.append(decoder.step.calls)
    # 第 1、2 批同桶：调用次数累计（9 + 5）；第 3 批换桶重新开始（7）；第 4 批又换桶（9）。
    assert calls == [9, 14, 7, 9]
    free = run(list(trio), PROMPTS, steps=16, steering=STEER).tokens
    end = free[0][3]
    decoder = FastDecoder(list(trio), vocab_size=VOCAB, end_ids=[end], pad_id=PAD, batch_size=5, steering=STEER,
                          compile=False, overlap="graph", check_every=4)
    assert decoder.generate([PROMPTS] * 3, 16).tokens == run(list(trio), PROMPTS, steps=16, steering=STEER,
                                                             ends=[end]).tokens


def test_overlap_compiled_matches_slow_loop(trio):
    """CPU 上真的编译（每个模型的前向与融合各自 fullgraph 编译）：与慢速循环逐 token 一致。"""
    decoder = FastDecoder(list(trio), vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                          compile=True, overlap="streams")
    assert decoder.generate([PROMPTS] * 3, 8).tokens == run(list(trio), PROMPTS, steps=8, steering=STEER).tokens


def test_streams_fork_every_side_stream_before_any_forward(trio, monkeypatch):
    """streams 的依赖边：每一步里所有侧流都在主流排入任何前向之前 fork（wait_stream(主流)），融合之前 join。

    回归测试：1d60ef9 … 2d9bffe 先排目标的前向、再 fork，侧流于是要等整个 8B 前向做完，图里两条支路首尾相接、
    没有并行。CPU 上没有流，这里用记录调用顺序的假流替换 torch.cuda 的两个入口，数值仍由真实前向算出。
    """
    import contextlib

    log: list[tuple[str, ...]] = []

    class FakeStream:
        def __init__(self, name: str) -> None:
            self.name = name

        def wait_stream(self, other: "FakeStream") -> None:
            log.append(("wait", self.name, other.name))

    main = FakeStream("main")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    decoder = FastDecoder(list(trio), vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER,
                          compile=False, overlap="streams", stack="pair")
    step = decoder.step
    assert isinstance(step, _GraphedStep) and decoder.units == [(0,), (1, 2)]
    step.cuda, step.streams = True, [None, FakeStream("side")]
    forward, choose = step.forward, step.choose
    step.forward = lambda u, *a: (log.append(("forward", str(u))), forward(u, *a))[1]
    step.choose = lambda *a: (log.append(("choose",)), choose(*a))[1]
    assert decoder.generate([PROMPTS] * 3, 6).tokens == run(list(trio), PROMPTS, steps=6, steering=STEER).tokens
    one_step = [("wait", "side", "main"), ("forward", "0"), ("forward", "1"), ("wait", "main", "side"), ("choose",)]
    assert log == one_step * 5  # 6 个 token = prefill 的 1 个 + 5 次解码步


def test_copy_tree_rejects_mismatched_inputs():
    dst = (torch.zeros(2, 1), [torch.zeros(2, 3)], 5)
    _copy_tree(dst, (torch.ones(2, 1), [torch.full((2, 3), 2.0)], 5))
    assert dst[0].sum() == 2 and dst[1][0].sum() == 12
    with pytest.raises(ValueError, match="shape"):
        _copy_tree(dst, (torch.ones(1), [torch.zeros(2, 3)], 5))
    with pytest.raises(ValueError, match="structure"):
        _copy_tree(dst, (torch.ones(2, 1), [], 5))
    with pytest.raises(ValueError, match="constant"):
        _copy_tree(dst, (torch.ones(2, 1), [torch.zeros(2, 3)], 6))
    with pytest.raises(ValueError, match="overlap"):
        FastDecoder([tiny_llama(0)], vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=1, steering=None,
                    compile=False, overlap="yes")


def test_overlap_auto_resolution_and_oom_unwrapping(trio):
    """auto：只有 CUDA 上编译的引导解码才用 streams；CPU / 不编译 / 只有目标时都是 off（走原来的整步编译路径）。
    录图中途 OOM 时，capture_end 抛出的 RuntimeError 里找回原来的 OutOfMemoryError（run_arm 的减半只认它）。"""
    from fast.decoder import _root_oom

    for models, steering in ((list(trio), STEER), ([trio[0]], None)):
        decoder = FastDecoder(models, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=2, steering=steering,
                              compile=False)
        assert decoder.overlap == "off" and not isinstance(decoder.step, _GraphedStep)
    oom = torch.OutOfMemoryError("CUDA out of memory")
    try:
        try:
            raise oom
        except torch.OutOfMemoryError:
            raise RuntimeError("operation failed due to a previous error during capture")
    except RuntimeError as wrapped:
        assert _root_oom(wrapped) is oom
    plain = RuntimeError("x")
    assert _root_oom(plain) is plain


def test_resolve_overlap_auto_rules(trio):
    """auto → streams 只在：CUDA、编译、引导、没有量化模型；显式给出的模式原样返回。"""
    from fast.decoder import resolve_overlap

    models = list(trio)
    assert resolve_overlap("auto", models, steering=STEER, compile=True, device_type="cuda") == "streams"
    assert resolve_overlap("auto", models, steering=STEER, compile=True, device_type="cpu") == "off"
    assert resolve_overlap("auto", models, steering=STEER, compile=False, device_type="cuda") == "off"
    assert resolve_overlap("auto", models[:1], steering=None, compile=True, device_type="cuda") == "off"
    assert resolve_overlap("graph", models, steering=STEER, compile=False, device_type="cpu") == "graph"
    quantized = tiny_llama(5)
    quantized.hf_quantizer = object()  # 只看这个属性是否存在（transformers 给 4-bit 模型设置它）
    assert resolve_overlap("auto", [quantized, *models[1:]], steering=STEER, compile=True,
                           device_type="cuda") == "off"


def test_compile_rule_shared_by_main_and_bench():
    """--compile 的规则只有一处（fast.decoder.compiles）：auto 只在 CUDA 上编译，on / off 照字面；
    main.compiles_step 另外要求走快速路径；拼错的值报错而不是当成 off。"""
    import dataclasses

    from config import Config
    from fast.decoder import compiles
    from main import compiles_step

    assert [compiles(c, d) for c in ("auto", "on", "off") for d in ("cuda", "cpu")] == \
        [True, False, True, True, False, False]
    with pytest.raises(ValueError, match="auto / on / off"):
        compiles("yes", "cuda")
    cfg = Config(compile="on")
    assert compiles_step(cfg, torch.device("cpu")) and not compiles_step(dataclasses.replace(cfg, fast=False),
                                                                       torch.device("cpu"))


# ---------------------------------------------------------------------------
# 进度回调 on_step（issue 19）：批内推进；各次 token 数之和 = 输出的 token 总数
# ---------------------------------------------------------------------------


def test_on_step_reference_loop_counts_every_token(trio):
    """参考循环每步调用一次：步数 1, 2, …；本步 token 数 = 本步之前仍活跃的行数；总和 = 输出 token 总数。"""
    free = run(list(trio), PROMPTS, steps=12, steering=STEER).tokens
    end = next(t for t in free[1][1:] if all(t not in r for r in (free[0], free[2])))
    calls: list[tuple[int, int]] = []
    result = generate_batch(list(trio), [PROMPTS] * 3, vocab_size=VOCAB, max_new_tokens=12, end_ids=[end],
                            pad_id=PAD, steering=STEER, on_step=lambda s, n: calls.append((s, n)))
    assert [s for s, _ in calls] == list(range(1, result.steps + 1))
    assert sum(n for _, n in calls) == sum(len(t) for t in result.tokens)
    # 第 1 行在 len(tokens[1]) 步之后不再计数：之后每步恰好少 1
    cut = len(result.tokens[1])
    assert cut < 12 and all(n == 3 for _, n in calls[:cut]) and all(n == 2 for _, n in calls[cut:])
    # 回调不改变输出
    assert result.tokens == run(list(trio), PROMPTS, steps=12, steering=STEER, ends=[end]).tokens


def test_on_step_fast_path_reports_at_checkpoints(trio):
    """快速路径只在每 check_every 步（本来就同步的地方）与结束时调用；占位行不计；总和 = 输出 token 总数。"""
    free = run(list(trio), PROMPTS, steps=14, steering=STEER).tokens
    end = next(t for t in free[0][2:] if all(t not in r for r in free[1:]))
    decoder = FastDecoder(list(trio), vocab_size=VOCAB, end_ids=[end], pad_id=PAD, batch_size=5, steering=STEER,
                          compile=False, check_every=4)
    calls: list[tuple[int, int]] = []
    out = decoder.generate([PROMPTS] * 3, 14, on_step=lambda s, n: calls.append((s, n)))
    assert [s for s, _ in calls] == [4, 8, 12, 14]
    assert sum(n for _, n in calls) == sum(len(t) for t in out.tokens)
    # 每个检查点的 token 数 = 各真实行在这一段步数里生成的 token 数（2 个占位行不计）
    bounds = [0] + [s for s, _ in calls]
    for (lo, hi), (_, n) in zip(zip(bounds, bounds[1:]), calls):
        assert n == sum(max(0, min(len(t), hi) - lo) for t in out.tokens)
    assert min(len(t) for t in out.tokens) < 14
    assert out.tokens == decoder.generate([PROMPTS] * 3, 14).tokens
