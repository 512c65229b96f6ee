"""steering_utils.triton_greedy_steer：贪心引导一步的分段 Triton kernel == 纯张量参考（逐项规则）。

参考 = schedule_alpha → compute_steered_logits → [apply_plausibility] → guard_nonfinite → argmax（即 evaluator.fuse_step
+ pick_tokens 的贪心分支）。CPU 上由 Triton 解释器执行（conftest 设 TRITON_INTERPRET=1）；GPU 上编译出的 kernel
由 bench.py --check 在真实形状上检查。覆盖：三种调度 × 两种度量 × 可信度约束开/关、bf16 输入、多段与空段、
−inf 的各种组合、α = 0、并列（取最小位置）、含 NaN / +inf 的行（守卫退回目标、NaN 视为最大）、上溢成 +inf、
输入不被修改、参数校验。
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import Tensor

import steering_utils
from steering_utils import (SCHEDULES, apply_plausibility, compute_steered_logits, guard_nonfinite, schedule_alpha,
                            steer_chunks, triton_greedy_steer)

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="没有 triton 包（.ci/run 会安装它，用解释器在 CPU 上跑 kernel）"),
    # 解释器用 numpy 逐元素执行：where 未选中的分支里的 0·inf 等会触发 numpy 的 RuntimeWarning，与结果无关
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

KW = dict(base_alpha=1.0, adaptive_scale=10.0, max_boost=1.0)


@pytest.fixture(autouse=True)
def interpreted() -> None:
    """kernel 在 CPU 上由解释器执行：conftest 在导入 triton 之前设了 TRITON_INTERPRET=1。"""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET 不是 1：kernel 要编译给 GPU，CPU 测试跑不了")
    steering_utils.load_triton_steering()


def reference(zt: Tensor, ze: Tensor, zb: Tensor, schedule: str, metric: str, beta: float,
              base_alpha: float = 1.0, adaptive_scale: float = 10.0, max_boost: float = 1.0
              ) -> tuple[Tensor, Tensor, Tensor]:
    """纯张量参考：(token (B,), α (B,), bad (B,))，与 evaluator.fuse_step + argmax 相同的步骤。"""
    alpha = schedule_alpha(zt, ze, schedule, base_alpha=base_alpha, adaptive_scale=adaptive_scale,
                           max_boost=max_boost, metric=metric)
    fused = compute_steered_logits(zt, ze, zb, alpha)
    if beta > 0:
        fused = apply_plausibility(fused, zt, beta)
    fused, bad = guard_nonfinite(fused, zt)
    return fused.argmax(-1), alpha, bad


def check(zt: Tensor, ze: Tensor, zb: Tensor, schedule: str = "adaptive", metric: str = "js", beta: float = 0.0,
          chunks: int | None = 3, **kw: float) -> tuple[Tensor, Tensor, Tensor]:
    """kernel 与参考比较：token、bad 完全相同，α 在 float32 求和顺序的误差内（NaN 位置相同）；输入不被修改。"""
    params = {**KW, **kw}
    before = [t.clone() for t in (zt, ze, zb)]
    token, alpha, bad = triton_greedy_steer(zt, ze, zb, schedule=schedule, metric=metric, beta=beta, chunks=chunks,
                                            **params)
    ref_token, ref_alpha, ref_bad = reference(zt, ze, zb, schedule, metric, beta, **params)
    assert token.dtype == torch.int64 and alpha.dtype == torch.float32 and bad.dtype == torch.bool
    assert torch.equal(bad, ref_bad)
    assert torch.equal(token, ref_token)
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-5, atol=1e-6, equal_nan=True)
    for a, b in zip(before, (zt, ze, zb)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    return token, alpha, bad


def logits(batch: int, vocab: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """三路随机 logits（尺度 3：分布不太平，也不太尖），每行不同。"""
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(batch, vocab, generator=g) * 3).to(dtype) for _ in range(3))  # type: ignore[return-value]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("metric", ["js", "l2"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_matches_reference_all_settings(schedule: str, metric: str, beta: float) -> None:
    """三种调度 × 两种度量 × 可信度约束开/关；V = 2,500 不是块长 1,024 的倍数，分 3 段（最后一段不满）。"""
    zt, ze, zb = logits(4, 2500, seed=len(schedule) + 7 * len(metric) + int(beta * 100))
    zt[0, 5], ze[1, 7], zb[1, 7], ze[2, 9], zb[3, 11] = (float("-inf"),) * 5  # 各种 −inf 组合
    _, alpha, _ = check(zt, ze, zb, schedule, metric, beta)
    assert torch.isfinite(alpha).all()


@pytest.mark.parametrize("chunks, config", [(1, None), (2, None), (5, None), (3, (256, 2)), (2, (4096, 8))])
def test_chunking_does_not_change_the_result(chunks: int, config: tuple[int, int] | None) -> None:
    """一段、两段、段数多于块数（后面的段是空段：不读任何词，合并时不会胜出）；块长 256（每段循环多次）与 4,096
    （一块大于整行）。"""
    zt, ze, zb = logits(3, 3000, seed=chunks)
    params = {**KW}
    token, alpha, bad = triton_greedy_steer(zt, ze, zb, schedule="adaptive", metric="js", beta=0.0, chunks=chunks,
                                            config=config, **params)
    ref_token, ref_alpha, ref_bad = reference(zt, ze, zb, "adaptive", "js", 0.0)
    assert torch.equal(token, ref_token) and torch.equal(bad, ref_bad)
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_and_strided_rows() -> None:
    """bf16 输入（内部转 float32，与参考的 .float() 相同），并且每行是更宽张量的切片（按行步长读，
    FastDecoder 传入的是 (M, B, V_model)[:, :, :V] 的切片）。"""
    wide = [t for t in logits(3, 2100, seed=4, dtype=torch.bfloat16)]
    zt, ze, zb = (t[:, :2000] for t in wide)
    assert zt.stride(0) == 2100 and not zt.is_contiguous()
    check(zt, ze, zb, beta=0.1)


def test_alpha_zero_returns_target_argmax() -> None:
    """α = 0（base_alpha = max_boost = 0）：融合 logits 逐位等于目标的，token = argmax z_t。"""
    zt, ze, zb = logits(3, 1500, seed=5)
    token, alpha, _ = check(zt, ze, zb, base_alpha=0.0, max_boost=0.0)
    assert torch.equal(token, zt.argmax(-1)) and torch.equal(alpha, torch.zeros(3))


def test_ties_pick_the_smallest_index_across_blocks_and_chunks() -> None:
    """并列最大值（同一块内、同一段的不同块、不同段）取最小位置，同 torch.argmax。diff = 0（专家 = 基座）时融合值 = 目标值。
    V = 2,500：1 段时段长 3,072（块 0..1,023 / 1,024..2,047 / 2,048..），3 段时段长 1,024（每段一块）。"""
    zt, ze, _ = logits(3, 2500, seed=6)
    zb = ze.clone()
    zt[0, [40, 41]] = 50.0       # 同一块内
    zt[1, [1500, 300]] = 50.0    # 1 段时：同一段的两个块；3 段时：两段
    zt[2, [2400, 1100]] = 50.0   # 同上
    for chunks in (1, 3):
        token, _, _ = check(zt, ze, zb, schedule="constant", chunks=chunks)
        assert token.tolist() == [40, 300, 1100]


def test_identical_distributions_give_base_alpha_exactly() -> None:
    """专家 = 目标：距离恰为 0（_kl_to_mixture 的 l_t == l_e 项记 0），α 恰为 base_alpha（调度 inverse 时 base + boost）。"""
    zt, _, zb = logits(3, 2500, seed=11)
    for metric in ("js", "l2"):
        _, alpha, _ = check(zt, zt.clone(), zb, metric=metric)
        assert torch.equal(alpha, torch.full((3,), 1.0))
        _, alpha, _ = check(zt, zt.clone(), zb, schedule="adaptive_inverse", metric=metric)
        assert torch.equal(alpha, torch.full((3,), 2.0))


def test_nonfinite_rows() -> None:
    """含 NaN / +inf 的行：distance 给 NaN → α = NaN → 守卫把整行退回 z_t（bad = True），token = argmax z_t
    （NaN 视为最大，取第一个 NaN，同 torch.argmax）。z_e − z_b = ±inf 的词 diff 记 0，不算坏。"""
    zt, ze, zb = logits(6, 2500, seed=8)
    zt[0, 2400], zt[0, 1500] = float("nan"), float("nan")  # 目标有 NaN（两段里）：token = 第一个 NaN 的位置 1,500，
    zt[0, 50] = 100.0                                     # 即使别的段有更大的有限值
    ze[1, 3] = float("nan")                               # 专家有 NaN；退回的 z_t 里有跨块的并列最大值
    zt[1, [1800, 200]] = 60.0
    zt[2, 10] = float("inf")                              # 目标有 +inf
    zb[3, 4] = float("inf")                               # diff = −inf → 记 0：这一行正常
    zt[4, 6], ze[4, 6], zb[4, 6] = 3e38, 5e37, -5e37      # diff = 1e38 有限，融合值 3e38 + α·1e38 上溢成 +inf → 坏行
    token, alpha, bad = check(zt, ze, zb, schedule="adaptive")
    assert bad.tolist() == [True, True, True, False, True, False]
    assert token[:2].tolist() == [1500, 200] and torch.isnan(alpha[:3]).all()
    check(zt, ze, zb, schedule="adaptive", chunks=1)  # 一段：并列与 NaN 都在段内的不同块之间比较
    check(zt, ze, zb, schedule="constant")  # 常数 α：NaN 不进 α，但融合值里的 NaN 仍让守卫退回
    check(zt, ze, zb, schedule="adaptive", beta=0.2)  # 可信度约束用的行最大值同样让 NaN / +inf 传播


def test_rows_masked_to_one_candidate() -> None:
    """目标只剩一个有限词（其余 −inf）：可信度约束、融合都只能选它。"""
    zt, ze, zb = logits(2, 1200, seed=9)
    zt[0] = float("-inf")
    zt[0, 777] = 1.0
    token, _, bad = check(zt, ze, zb, beta=0.5)
    assert token[0].item() == 777 and not bad[0]


def test_validation_errors() -> None:
    """与参考函数相同的校验：形状、调度、度量、β、超参数；整数 logits 或最后一维不连续时说明用参考路径。"""
    zt, ze, zb = logits(2, 1100, seed=10)
    args = dict(schedule="adaptive", metric="js", beta=0.0, **KW)
    with pytest.raises(ValueError, match="形状相同"):
        triton_greedy_steer(zt, ze[:, :10], zb, **args)
    with pytest.raises(ValueError, match="schedule="):
        triton_greedy_steer(zt, ze, zb, **{**args, "schedule": "cosine"})
    with pytest.raises(ValueError, match="metric="):
        triton_greedy_steer(zt, ze, zb, **{**args, "metric": "kl"})
    with pytest.raises(ValueError, match="beta="):
        triton_greedy_steer(zt, ze, zb, **{**args, "beta": 1.5})
    with pytest.raises(ValueError, match="max_boost"):
        triton_greedy_steer(zt, ze, zb, **{**args, "max_boost": -1.0})
    with pytest.raises(ValueError, match="最后一维连续"):
        triton_greedy_steer(zt.t().contiguous().t(), ze, zb, **args)


def test_steer_chunks() -> None:
    """段数：行数 × 段数 ≥ 8 × SM，且每段至少一个块。"""
    assert steer_chunks(64, 128256, 132) == 17
    assert steer_chunks(1, 128256, 132) == 126
    assert steer_chunks(4, 1000, 4) == 1
    assert steer_chunks(1024, 128256, 132) == 2
