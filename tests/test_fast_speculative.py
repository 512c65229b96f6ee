"""快速路径的投机解码（fast.speculative.SpeculativeDecoder）：与参考循环逐 token、接受统计逐行相同。

对照两个慢而显然正确的参考：evaluator.generate_batch（不投机：输出 token、α、守卫计数）与
speculative.generate_speculative（投机参考循环：drafted / accepted / verify_steps / 关闭起草）。
覆盖：transformers 前向单元（stack="off"）与叠加单元（stack="all"，专家+基座一次前向、目标单独叠加）；
基线臂（专家作为独立草稿）与三种引导设置；草稿规则 expert / fusion；K = 1、2、4（max_new_tokens 不是 K+1 的倍数）；
结束记号落在被接受的草稿里；自适应关闭起草后改走 K = 0 的普通步；同一解码器连续两批（状态缓冲原地重填，
第二批行数更少、补占位行）；oracle 草稿（接受率 1 与 0、免费与付费草稿）。CPU、fp32、不编译：
编译后的同一代码在 GPU 上由 `bench.py --speculate K --check` 核对（BENCHMARKS.md）。
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from evaluator import generate_batch
from fast.speculative import SpeculativeDecoder
from speculative import SpecResult, generate_speculative
from test_speculative import NEW, PAD, PER_ROLE, STEERINGS, VOCAB, check_accounting, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trio() -> list[Any]:
    return [tiny_llama(0), tiny_llama(1), tiny_llama(2)]


def plain(trio: list[Any], steering: Any, new: int = NEW, ends: tuple[int, ...] = (),
          prompts: list[list[list[int]]] | None = None) -> Any:
    """不投机的参考循环（基线只有目标）。"""
    prompts = prompts or PER_ROLE
    models, p = (trio, prompts) if steering else ([trio[0]], prompts[:1])
    return generate_batch(models, p, vocab_size=VOCAB, max_new_tokens=new, end_ids=list(ends), pad_id=PAD,
                          steering=steering)


def spec_reference(trio: list[Any], steering: Any, k: int, draft: str, new: int = NEW, ends: tuple[int, ...] = (),
                   **kw: Any) -> SpecResult:
    """投机参考循环；基线臂的草稿是专家（trio[1]，看专家的提示）。"""
    models, p = (trio, PER_ROLE) if steering else ([trio[0]], PER_ROLE[:1])
    extra = {} if steering else {"draft_model": trio[1], "draft_prompts": PER_ROLE[1]}
    return generate_speculative(models, p, vocab_size=VOCAB, max_new_tokens=new, end_ids=list(ends), pad_id=PAD,
                                steering=steering, k=k, draft=draft, **extra, **kw)


def decoder(trio: list[Any], steering: Any, k: int, draft: str = "expert", stack: str = "off",
            ends: tuple[int, ...] = (), batch: int = 4, attention: str = "sdpa", **kw: Any) -> SpeculativeDecoder:
    """快速路径的投机解码器（CPU、不编译）：引导 [目标, 专家, 基座]，基线 [目标, 专家（只作草稿）]。"""
    models = trio if steering else trio[:2]
    return SpeculativeDecoder(models, k=k, draft=draft, steering=steering, vocab_size=VOCAB, end_ids=list(ends),
                              pad_id=PAD, batch_size=batch, compile=False, stack=stack, attention=attention, **kw)


def prompts_for(steering: Any) -> list[list[list[int]]]:
    """引导臂三份提示；基线臂 [目标的提示, 专家的提示]。"""
    return PER_ROLE if steering else PER_ROLE[:2]


def same_as_references(got: SpecResult, ref: Any, spec: SpecResult, steering: Any) -> None:
    """输出 token、步数、α、守卫计数与不投机的参考相同；接受统计逐行与投机参考循环相同。"""
    assert got.tokens == ref.tokens
    assert got.steps == ref.steps
    assert got.target_stops == ref.target_stops
    if steering is not None:
        assert got.nonfinite == ref.nonfinite
        for a, b in zip(got.alpha, ref.alpha):
            assert a == pytest.approx(b, abs=1e-5)
    assert (got.drafted, got.accepted, got.verify_steps, got.switched_off) == \
        (spec.drafted, spec.accepted, spec.verify_steps, spec.switched_off)
    check_accounting(got)


CASES = [(None, "expert", k, s) for k in (1, 4) for s in ("off", "all")] + \
        [("adaptive_js", d, k, s) for d in ("expert", "fusion") for k in (1, 2, 4) for s in ("off", "all")] + \
        [(arm, d, 2, "all") for arm in ("constant", "l2_plausible") for d in ("expert", "fusion")]


@pytest.mark.parametrize("arm,draft,k,stack", CASES)
def test_identical_to_the_reference_loops(trio, arm, draft, k, stack):
    """每个 token 与不投机的循环相同；drafted / accepted / verify_steps 逐行与投机参考循环相同。"""
    steering = STEERINGS[arm] if arm else None
    dec = decoder(trio, steering, k, draft, stack)
    # 叠加时：fusion 草稿要专家与基座的 logits，两者叠成一次前向；专家草稿时各自单独叠加（起草只读专家的权重）
    assert dec.units == ([(0,), (1, 2)] if stack == "all" and steering and draft == "fusion" else
                         [(k_,) for k_ in range(3 if steering else 2)])
    if stack == "all":  # 基线臂只叠加目标（草稿专家走 transformers 的前向）
        assert [s is not None for s in dec.stacked] == ([True] * len(dec.units) if steering else [True, False])
    got = dec.generate(prompts_for(steering), NEW)
    same_as_references(got, plain(trio, steering), spec_reference(trio, steering, k, draft), steering)
    if arm == "adaptive_js":
        assert max(got.accepted) > 0  # 草稿确实被接受过：接受的路径被走到


@pytest.mark.parametrize("arm, draft, k", [("adaptive_js", "expert", 2), (None, "expert", 3)])
def test_triton_verify_attention(trio, arm, draft, k):
    """叠加单元的 Triton 注意力（CPU 上由解释器执行）：解码步与 K+1 位置的验证都只读到已写的槽位，块内因果在 kernel
    里；每个 token 与不投机的循环相同，接受统计与投机参考循环相同。"""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET 不是 1：kernel 要编译给 GPU")
    steering = STEERINGS[arm] if arm else None
    dec = decoder(trio, steering, k, draft, "all", attention="triton")
    assert dec.attention == "triton"
    new = 7  # 解释器很慢：7 个 token 已有多轮验证（含被拒的草稿列）
    got = dec.generate(prompts_for(steering), new)
    same_as_references(got, plain(trio, steering, new=new), spec_reference(trio, steering, k, draft, new=new), steering)
    if steering is not None:  # 引导臂：接受与拒绝都发生过（基线臂的随机专家一个也不接受：全是被拒的草稿列）
        assert sum(got.drafted) > sum(got.accepted) > 0


@pytest.mark.parametrize("stack", ["off", "all"])
def test_end_id_inside_an_accepted_draft(trio, stack):
    """结束记号落在被接受的草稿里：行恰在那里结束（之后的草稿不输出），与两个参考相同。"""
    steering = STEERINGS["adaptive_js"]
    clean = plain(trio, steering).tokens
    row = max(range(4), key=lambda r: len(clean[r]))
    end = clean[row][NEW // 2]  # 输出中途的一个 token 作为结束记号
    ends = (end,)
    for k in (2, 4):
        got = decoder(trio, steering, k, stack=stack, ends=ends).generate(PER_ROLE, NEW)
        ref, spec = plain(trio, steering, ends=ends), spec_reference(trio, steering, k, "expert", ends=ends)
        same_as_references(got, ref, spec, steering)
        assert any(len(t) < NEW for t in got.tokens)
        assert any(0 < a for a in got.accepted)


def test_switch_off_then_plain_steps(trio):
    """基线臂的专家几乎从不被接受：起草 2 个之后接受率低于 0.5 的行关闭起草；全部关闭后走 K = 0 的普通步。
    输出与统计（含 switched_off）与投机参考循环相同。"""
    dec = decoder(trio, None, 3, min_acceptance=0.5, warmup=2, check_every=1)
    got = dec.generate(PER_ROLE[:2], NEW)
    spec = spec_reference(trio, None, 3, "expert", min_acceptance=0.5, warmup=2)
    same_as_references(got, plain(trio, None), spec, None)
    assert all(got.switched_off)
    assert 0 in dec.rounds and 3 in dec.rounds  # 普通步（K = 0）确实被用过
    assert max(got.drafted) <= 2 * 3


@pytest.mark.parametrize("stack", ["off", "all"])
def test_steered_switch_off_uses_the_plain_step(trio, stack):
    """引导臂：oracle 草稿从不一致（接受率 0），起草 2 个后全部关闭；此后走 FastDecoder 自己的解码步（_plain_round），
    输出、α 与不投机相同，每行只起草过一轮。"""
    steering = STEERINGS["adaptive_js"]
    ref = plain(trio, steering)
    dec = decoder(trio, steering, 2, stack=stack, min_acceptance=0.5, warmup=2)
    dec.set_oracle(ref.tokens, 0.0)
    got = dec.generate(PER_ROLE, NEW)
    assert got.tokens == ref.tokens and got.nonfinite == ref.nonfinite
    for a, b in zip(got.alpha, ref.alpha):
        assert a == pytest.approx(b, abs=1e-5)
    assert all(got.switched_off) and got.drafted == [2, 2, 2, 2] and got.accepted == [0, 0, 0, 0]
    assert list(dec.rounds) == [2]  # K = 0 的轮没有建：关闭后走的是 FastDecoder 的步
    assert got.verify_steps == [len(t) for t in got.tokens]  # 每个 token 一次验证（第一轮只产出 1 个）
    check_accounting(got)


def test_two_batches_on_one_decoder(trio):
    """同一解码器连续解码：状态缓冲原地重填；第二批只有 2 行（补 2 个已结束的占位行），结果与新建的解码器相同。"""
    steering = STEERINGS["adaptive_js"]
    dec = decoder(trio, steering, 2, stack="all")
    first = dec.generate(PER_ROLE, NEW)
    small = [p[2:] for p in PER_ROLE]
    second = dec.generate(small, NEW)
    again = dec.generate(PER_ROLE, NEW)
    fresh = decoder(trio, steering, 2, stack="all").generate(small, NEW)
    assert again.tokens == first.tokens and again.accepted == first.accepted
    assert second.tokens == fresh.tokens and second.accepted == fresh.accepted
    assert second.tokens == [first.tokens[2], first.tokens[3]]  # 行与批的组成无关（fp32）
    assert len(second.drafted) == 2


@pytest.mark.parametrize("free", [False, True])
def test_oracle_draft_sets_the_acceptance(trio, free):
    """oracle 草稿（基准用）：接受率 1 时每个草稿都被接受，0 时一个都不；输出始终与不投机相同（无损）。"""
    steering = STEERINGS["adaptive_js"]
    ref = plain(trio, steering)
    dec = decoder(trio, steering, 3, stack="all")
    dec.set_oracle(ref.tokens, 1.0, free=free)
    full = dec.generate(PER_ROLE, NEW)
    assert full.tokens == ref.tokens and full.accepted == full.drafted and sum(full.drafted) > 0
    assert max(full.verify_steps) <= 1 + -(-(NEW - 1) // 4)  # 每轮 4 个 token
    # 没有空转的轮：同步间隔按最慢一行至少还要的轮数定，最后一段不会在全部结束后继续跑（轮数含预填充那一次）
    assert full.rounds == 1 + -(-(NEW - 1) // 4)
    dec.set_oracle(ref.tokens, 0.0, free=free)
    none = dec.generate(PER_ROLE, NEW)
    assert none.tokens == ref.tokens and none.accepted == [0, 0, 0, 0]
    dec.set_oracle(ref.tokens, 0.5, free=free, seed=1)
    half = dec.generate(PER_ROLE, NEW)
    assert half.tokens == ref.tokens and 0 < sum(half.accepted) < sum(half.drafted)
    assert half.rounds == max(half.verify_steps)  # 每轮每个活跃行验证一次：轮数 = 最慢一行的验证次数
    check_accounting(half)


def test_refusals(trio):
    steering = STEERINGS["adaptive_js"]
    with pytest.raises(ValueError, match="reference loop only"):
        from sampling import Sampling
        decoder(trio, steering, 2, sampling=Sampling(1.0, 1.0, seed=0, chain=0))
    with pytest.raises(ValueError, match="not available on the fast path"):
        decoder(trio, steering, 2, draft="model")
    with pytest.raises(ValueError, match="steered arms only"):
        decoder(trio, None, 2, draft="fusion")
    with pytest.raises(ValueError, match=">= 1"):
        decoder(trio, steering, 0)
    with pytest.raises(ValueError, match="two models"):
        SpeculativeDecoder(trio[:1], k=2, steering=None, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4,
                           compile=False)
    dec = decoder(trio, steering, 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dec.set_oracle([[1]], 1.5)
    empty = dec.generate(PER_ROLE, 0)
    assert empty.tokens == [[], [], [], []] and empty.verify_steps == [0, 0, 0, 0]
    assert torch.is_inference_mode_enabled() is False
