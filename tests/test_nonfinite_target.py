"""目标模型自己的 logits 非有限（NaN / ±inf）：每条解码路径（参考循环、FastDecoder、投机循环；基线与引导）都逐行检测，
该行在那一步干净地停止（不输出那一步的 token，更不会悄悄选出 token 0），计数写进记录与 metrics（issue 15）。

故障注入：给目标模型挂一个前向钩子，凡是“刚喂入的 token 是 X”的位置，logits 整行写成 NaN/+inf/−inf。
它只依赖内容、不依赖调用次数，所以三条路径（投机循环一次验证 K+1 个位置）注入的是同一个故障。
全部是 2 层的微型随机 Llama（fp32、CPU、不编译）。
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from evaluator import BatchResult, generate_batch, run_arm
from fast.decoder import FastDecoder
from scoring import ForcedAnswer
from speculative import generate_speculative
from stats import arm_metrics
from steering_utils import SteeringParams, nonfinite_rows, stop_nonfinite_target
from shared_runs import tiny_llama

VOCAB = 96
PROMPTS = [[5, 17, 23, 9, 41, 7, 3], [11, 2, 60], [33, 34, 35, 36, 37]]
STEER = SteeringParams(base_alpha=1.0, adaptive_scale=10.0, max_boost=1.0, metric="js")
STEPS = 10


# ---------------------------------------------------------------------------
# 纯函数
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stop_rule_on_random_rows(dtype: torch.dtype) -> None:
    """NaN、+inf、整行 −inf 的行停止；只含个别 −inf（被屏蔽的词）的行不停；输出为 float32 新张量，停止行有限，
    其余行等于 fused（转 float32），输入不被原地修改。"""
    gen = torch.Generator().manual_seed(0)
    zt = torch.randn(7, 50, generator=gen).to(dtype)
    fused = torch.randn(7, 50, generator=gen).to(dtype)
    zt[1, 3] = float("nan")
    zt[2, 10] = float("inf")
    zt[3] = float("-inf")
    zt[4, :40] = float("-inf")  # 被屏蔽的词：合法
    zt[5, 0] = float("-inf")
    zt[6] = float("nan")
    fused[3, 5] = float("nan")  # 目标坏的行里融合结果也坏：换成有限值
    fused[5, 7] = float("-inf")
    before_t, before_f = zt.clone(), fused.clone()
    out, stop = stop_nonfinite_target(zt, fused)
    assert stop.tolist() == [False, True, True, True, False, False, True]
    assert torch.equal(nonfinite_rows(zt), stop)
    assert out.dtype == torch.float32 and out.shape == fused.shape and out.data_ptr() != fused.data_ptr()
    assert (out[stop] == 0).all()
    assert torch.equal(out[~stop], fused.float()[~stop])
    # 输入未被修改（NaN 与自身不相等：逐位比较）
    assert torch.equal(zt.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       before_t.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert torch.equal(fused.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       before_f.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_stop_rule_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="2-D"):
        stop_nonfinite_target(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="same shape"):
        stop_nonfinite_target(torch.zeros(2, 5), torch.zeros(3, 5))


# ---------------------------------------------------------------------------
# 解码路径
# ---------------------------------------------------------------------------

def _tiny_llama(seed: int) -> LlamaForCausalLM:
    return tiny_llama(VOCAB, seed, max_positions=256)  # lm_head ×40 拉开 logits：argmax 没有近似平局


pytestmark = pytest.mark.usefixtures("one_thread")  # 原因见 tests/conftest.py


@pytest.fixture(scope="module")
def trio() -> list[LlamaForCausalLM]:
    return [_tiny_llama(seed) for seed in range(3)]


def _poison_after(model: LlamaForCausalLM, token: int, value: float) -> Any:
    """前向钩子：logits 的位置 j 对应输入的最后 T 个 token；刚喂入的 token 等于 `token` 的位置整行写成 value。"""
    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        ids = kwargs["input_ids"]
        logits = output.logits
        hit = ids[:, -logits.shape[1]:] == token  # (B, T)
        if hit.any():
            logits = logits.clone()
            logits[hit] = value
            output.logits = logits
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def draft() -> LlamaForCausalLM:
    """基线臂投机解码的独立草稿模型（run_arm 里是专家）。"""
    return _tiny_llama(7)


def _decode(path: str, models: list[LlamaForCausalLM], steering: SteeringParams | None,
            draft: LlamaForCausalLM) -> BatchResult:
    """同一批提示走四条路径之一：参考循环、FastDecoder（CPU、不编译）、投机循环（K = 3）、快速路径的投机解码（K = 3）。"""
    prompts = [PROMPTS] * len(models)
    if path == "reference":
        return generate_batch(models, prompts, vocab_size=VOCAB, max_new_tokens=STEPS, end_ids=[], pad_id=0,
                              steering=steering)
    if path == "fast":
        decoder = FastDecoder(models, vocab_size=VOCAB, end_ids=[], pad_id=0, batch_size=4, steering=steering,
                              compile=False)
        return decoder.generate(prompts, STEPS)
    if path == "fast_speculative":  # 快速路径的投机解码（CPU、不编译），K = 3；基线臂的草稿是独立模型
        from fast.speculative import SpeculativeDecoder

        spec = SpeculativeDecoder(models if steering is not None else models + [draft], k=3, steering=steering,
                                  vocab_size=VOCAB, end_ids=[], pad_id=0, batch_size=4, compile=False)
        return spec.generate(prompts if steering is not None else prompts + [PROMPTS], STEPS)
    extra: dict[str, Any] = {} if steering is not None else {"draft_model": draft, "draft_prompts": PROMPTS}
    return generate_speculative(models, prompts, vocab_size=VOCAB, max_new_tokens=STEPS, end_ids=[], pad_id=0,
                                steering=steering, k=3, **extra)


def _trigger(clean: list[list[int]]) -> tuple[int, int]:
    """干净输出里只在第 0 行出现、且不在任何提示里的 token X，以及它在第 0 行第一次出现的步 s。"""
    others = {t for row in clean[1:] for t in row} | {t for p in PROMPTS for t in p}
    for s, t in enumerate(clean[0][:STEPS - 2]):
        if t not in others and t not in clean[0][:s]:
            return t, s
    pytest.skip("no token unique to row 0 in the clean output")


@pytest.mark.parametrize(("path", "steered", "value"),
                         [(p, s, float("nan")) for p in ("reference", "fast", "speculative", "fast_speculative")
                          for s in (False, True)]
                         + [("fast", True, float("inf")), ("reference", False, float("-inf"))])
def test_nonfinite_target_row_stops_cleanly(trio: list[LlamaForCausalLM], draft: LlamaForCausalLM, path: str,
                                            steered: bool, value: float) -> None:
    """目标在第 0 行第 s+1 步（喂入 X 之后）的 logits 整行非有限：第 0 行输出恰为干净输出的前 s+1 个 token，
    计一次停止；其他行与干净运行逐 token 相同；α 里没有 NaN。（三条路径的干净输出逐 token 相同由
    test_evaluator / test_speculative 保证，所以三条路径在同一故障下也给出同样的输出。）"""
    models = list(trio) if steered else [trio[0]]
    steering = STEER if steered else None
    clean = _decode(path, models, steering, draft)
    assert clean.target_stops == [0, 0, 0]
    token, s = _trigger(clean.tokens)
    handle = _poison_after(trio[0], token, value)
    try:
        hit = _decode(path, models, steering, draft)
    finally:
        handle.remove()
    assert hit.target_stops == [1, 0, 0]
    assert hit.tokens[0] == clean.tokens[0][:s + 1]  # 停在 X 之后：没有 token 0，没有伪造的结束记号
    assert hit.tokens[1:] == clean.tokens[1:]
    if steered:
        assert hit.nonfinite == [0, 0, 0]  # 停止的那一步不算作“融合退回目标”
        assert all(a == a for row in hit.alpha for a in row)
        assert len(hit.alpha[0]) == s + 1 and hit.alpha[1:] == clean.alpha[1:]


def test_prefill_nan_stops_before_the_first_token(trio: list[LlamaForCausalLM], draft: LlamaForCausalLM) -> None:
    """提示的最后一个 token 就触发：该行一个 token 都不输出（而不是输出 token 0）。"""
    handle = _poison_after(trio[0], PROMPTS[1][-1], float("nan"))
    try:
        for path in ("reference", "fast", "speculative", "fast_speculative"):
            result = _decode(path, [trio[0]], None, draft)
            assert result.tokens[1] == [] and result.target_stops == [0, 1, 0]
    finally:
        handle.remove()


class _Tok:
    pad_token_id = 0

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, tokens))


@pytest.mark.parametrize("fast", [True, False])
def test_counter_in_records_and_metrics(trio: list[LlamaForCausalLM], fast: bool) -> None:
    """run_arm：每条记录（基线也有）带 nonfinite_target_stops；arm_metrics 求和；停止的题不走第二阶段。"""
    roles = {"target": trio[0], "expert": trio[1], "base": trio[2]}
    options = {"A": "a", "B": "b", "C": "c", "D": "d"}
    questions = [SimpleNamespace(index=10 + j, answer_idx="A", options=options) for j in range(len(PROMPTS))]
    role_prompts = {r: [list(p) for p in PROMPTS] for r in roles}
    clean = generate_batch([trio[0]], [PROMPTS], vocab_size=VOCAB, max_new_tokens=STEPS, end_ids=[], pad_id=0)
    token, s = _trigger(clean.tokens)
    forced = ForcedAnswer(cue_ids=(4,), letter_ids=(60, 61, 62, 63))
    handle = _poison_after(trio[0], token, float("nan"))
    try:
        result = run_arm("baseline", questions, role_prompts, roles, _Tok(), vocab_size=VOCAB, batch_size=4,
                         max_new_tokens=STEPS, end_ids=[], steering=None, fast=fast, progress=False,
                         forced=forced)
    finally:
        handle.remove()
    recs = {r["index"]: r for r in result.records}
    assert [recs[10 + j]["nonfinite_target_stops"] for j in range(3)] == [1, 0, 0]
    assert recs[10]["num_tokens"] == s + 1
    assert recs[10]["pred"] is None and recs[10]["pred_forced"] is None  # 没有从 NaN 里读出一个字母
    assert recs[11]["pred_forced"] is not None  # 其他没读出答案的题照常走第二阶段
    assert arm_metrics("baseline", result.records)["nonfinite_target_stops"] == 1
