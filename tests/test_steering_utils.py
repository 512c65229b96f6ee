"""steering_utils 的单元测试：距离、自适应 α、α 调度、三路 logits 融合与可行性约束。

全部使用固定种子的随机张量（CPU，float32 / bf16 / fp16），每个测试都断言一条具体性质：
取值区间、单调性、逐行独立、与 float64 参考实现一致、−inf 不产生 NaN、输入不被修改、参数校验。
"""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import Tensor

import steering_utils
from steering_utils import (
    METRICS,
    SCHEDULES,
    apply_plausibility,
    calculate_adaptive_alpha,
    compute_steered_logits,
    distance,
    SteeringParams,
    plausibility_mask,
)
from steering_utils import schedule_alpha as _schedule_alpha

LN2: float = math.log(2.0)
SQRT2: float = math.sqrt(2.0)
UPPER: dict[str, float] = {"js": LN2, "l2": SQRT2}


def schedule_alpha(t: Tensor, e: Tensor, schedule: str = "adaptive", *args: object, **kw: object) -> Tensor:
    """测试的简写：散开的超参数 → SteeringParams（构造时校验一次）→ steering_utils.schedule_alpha。"""
    return _schedule_alpha(t, e, SteeringParams(*args, schedule=schedule, **kw))  # type: ignore[arg-type]


def _gen(seed: int) -> torch.Generator:
    """固定种子的独立随机数发生器，避免测试之间通过全局 RNG 相互影响。"""
    return torch.Generator().manual_seed(seed)


def _logits(b: int, v: int, seed: int, scale: float = 3.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """形状 (b, v) 的随机 logits；scale 控制分布的尖锐程度。"""
    return (torch.randn(b, v, generator=_gen(seed)) * scale).to(dtype)


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """返回 x 的副本，mask 为 True 的位置置为 −inf（模拟被屏蔽的词表项）。"""
    return x.masked_fill(mask, float("-inf"))


def _assert_close(got: Tensor, want: Tensor, atol: float = 1e-6) -> None:
    """形状相同且最大绝对误差 ≤ atol（−inf 位置须同为 −inf）。

    不用 torch.testing.assert_close：它首次调用有近 1 秒的惰性导入开销，会拖慢整个测试文件。
    """
    assert got.shape == want.shape, (got.shape, want.shape)
    got, want = got.double(), want.double()
    assert torch.equal(got.isneginf(), want.isneginf())
    fin = torch.isfinite(want)
    err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= atol, f"最大误差 {err:.3g} > {atol:.3g}"


def _js_reference(a: Tensor, b: Tensor) -> Tensor:
    """按定义在 float64 下独立计算 JS：½KL(p‖m) + ½KL(q‖m)，m = (p + q)/2，0·log0 = 0。形状 (B, V) → (B,)。"""
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    m = 0.5 * (p + q)

    def kl(x: Tensor) -> Tensor:
        return torch.where(x > 0, x * torch.log(x / m), torch.zeros_like(x)).sum(-1)

    return 0.5 * (kl(p) + kl(q))


# ---------------------------------------------------------------------------
# distance
# ---------------------------------------------------------------------------


def test_js_matches_float64_reference() -> None:
    for seed, scale in [(0, 1.0), (1, 3.0), (2, 8.0)]:
        a, b = _logits(8, 300, seed, scale), _logits(8, 300, seed + 100, scale)
        got = distance(a, b, "js")
        assert got.dtype == torch.float32 and got.shape == (8,)
        _assert_close(got.double(), _js_reference(a, b), atol=1e-5)


def test_js_reference_with_masked_vocab() -> None:
    a, b = _logits(4, 64, 3), _logits(4, 64, 4)
    ma = torch.rand(4, 64, generator=_gen(5)) < 0.3
    mb = torch.rand(4, 64, generator=_gen(6)) < 0.3
    a, b = _masked(a, ma), _masked(b, mb)
    _assert_close(distance(a, b, "js").double(), _js_reference(a, b), atol=1e-5)


def test_l2_matches_float64_reference() -> None:
    a, b = _logits(8, 200, 7), _logits(8, 200, 8)
    ref = (torch.softmax(a.double(), -1) - torch.softmax(b.double(), -1)).norm(dim=-1)
    _assert_close(distance(a, b, "l2").double(), ref, atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_distance_symmetric_and_in_range(metric: str) -> None:
    for seed in range(10):
        a, b = _logits(16, 100, seed, scale=0.5 + seed), _logits(16, 100, seed + 50, scale=0.5 + seed)
        d_ab, d_ba = distance(a, b, metric), distance(b, a, metric)
        assert torch.equal(d_ab, d_ba)  # 交换参数只交换加法顺序，逐位相同
        assert (d_ab >= 0).all() and (d_ab <= UPPER[metric]).all()


@pytest.mark.parametrize("metric", METRICS)
def test_distance_zero_for_identical_rows(metric: str) -> None:
    a = _masked(_logits(5, 40, 9), torch.rand(5, 40, generator=_gen(10)) < 0.2)
    assert torch.equal(distance(a, a.clone(), metric), torch.zeros(5))


@pytest.mark.parametrize("metric", METRICS)
def test_near_identical_rows_never_negative(metric: str) -> None:
    """几乎相同的两行：未 clamp 的 JS 约有三分之一会因舍入变成 ~−1e-8；clamp 后必须 ≥ 0，α ≥ base_alpha。"""
    a = _logits(64, 1000, 46)
    b = a + torch.randn(64, 1000, generator=_gen(47)) * 1e-6
    assert (distance(a, b, metric) >= 0).all()
    assert (calculate_adaptive_alpha(a, b, base_alpha=1.0, metric=metric) >= 1.0).all()


@pytest.mark.parametrize("masked", [False, True])
def test_disjoint_distributions_reach_upper_bound(masked: bool) -> None:
    """两个支撑集（几乎）不相交的 one-hot 式分布：JS → ln 2，L2 → √2。"""
    low = float("-inf") if masked else -1e4
    a = torch.full((2, 10), low)
    b = torch.full((2, 10), low)
    a[0, 0], b[0, 1] = 0.0, 0.0
    a[1, 3], b[1, 7] = 5.0, -2.0
    js, l2 = distance(a, b, "js"), distance(a, b, "l2")
    assert not js.isnan().any() and not l2.isnan().any()
    _assert_close(js, torch.full((2,), LN2), atol=1e-6)
    _assert_close(l2, torch.full((2,), SQRT2), atol=1e-6)
    assert (js <= LN2).all() and (l2 <= SQRT2).all()  # clamp 把浮点误差压回区间


# ---------------------------------------------------------------------------
# calculate_adaptive_alpha
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_alpha_equals_base_at_zero_distance(metric: str) -> None:
    x = _masked(_logits(4, 50, 11), torch.rand(4, 50, generator=_gen(12)) < 0.2)
    alpha = calculate_adaptive_alpha(x, x.clone(), base_alpha=0.7, adaptive_scale=10.0, max_boost=2.0, metric=metric)
    assert alpha.dtype == torch.float32
    assert torch.equal(alpha, torch.full((4,), 0.7))


@pytest.mark.parametrize("metric", METRICS)
def test_alpha_within_bounds(metric: str) -> None:
    base, boost = 0.5, 1.5
    for seed in range(20):
        scale = 0.1 * (seed + 1) ** 1.5  # 从近均匀到非常尖锐
        t, e = _logits(8, 128, seed, scale), _logits(8, 128, seed + 1000, scale)
        alpha = calculate_adaptive_alpha(t, e, base, adaptive_scale=10.0, max_boost=boost, metric=metric)
        assert alpha.shape == (8,)
        assert (alpha >= base).all() and (alpha <= base + boost).all()


@pytest.mark.parametrize("metric", METRICS)
def test_alpha_monotone_in_distance(metric: str) -> None:
    """专家 logits 从目标线性插值到另一个向量：d 严格递增，α 单调不减。"""
    t, u = _logits(1, 200, 13), _logits(1, 200, 14)
    lam = torch.linspace(0.0, 1.0, 12).unsqueeze(1)  # (K, 1)
    experts = t + lam * (u - t)  # (K, V)
    targets = t.expand_as(experts)
    d = distance(targets, experts, metric)
    alpha = calculate_adaptive_alpha(targets, experts, 1.0, adaptive_scale=3.0, max_boost=1.0, metric=metric)
    assert d[0] == 0 and (d[1:] > d[:-1]).all()
    assert (alpha[1:] >= alpha[:-1]).all() and alpha[-1] > alpha[0]


# ---------------------------------------------------------------------------
# 逐行独立性
# ---------------------------------------------------------------------------


def _row_fns() -> list[Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """三个被测函数统一成 (t, e, b) -> 逐行结果 的形式，供逐行/置换测试复用。"""
    return [
        lambda t, e, b: distance(t, e, "js"),
        lambda t, e, b: distance(t, e, "l2"),
        lambda t, e, b: calculate_adaptive_alpha(t, e, 1.0, 10.0, 1.0, "js"),
        lambda t, e, b: compute_steered_logits(t, e, b, calculate_adaptive_alpha(t, e)),
    ]


@pytest.mark.parametrize("fn_index", range(4))
def test_rows_are_independent(fn_index: int) -> None:
    fn = _row_fns()[fn_index]
    t, e, b = _logits(6, 80, 15), _logits(6, 80, 16), _logits(6, 80, 17)
    full = fn(t, e, b)
    for i in range(6):
        _assert_close(fn(t[i:i + 1], e[i:i + 1], b[i:i + 1])[0], full[i], atol=1e-6)
    perm = torch.randperm(6, generator=_gen(18))
    _assert_close(fn(t[perm], e[perm], b[perm]), full[perm], atol=1e-6)


# ---------------------------------------------------------------------------
# compute_steered_logits
# ---------------------------------------------------------------------------


def test_fusion_formula_by_hand() -> None:
    zt = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    ze = torch.tensor([[0.5, 1.0, -1.0], [2.0, 2.0, 2.0]])
    zb = torch.tensor([[0.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    # 标量 α = 1.5：z_t + 1.5·(z_e − z_b)
    expected = torch.tensor([[1.75, 0.5, 0.0], [1.5, -2.5, 4.0]])
    _assert_close(compute_steered_logits(zt, ze, zb, 1.5), expected, atol=0.0)
    # 逐行 α = [2, −1]，(B,) 与 (B, 1) 两种形状结果相同
    alpha = torch.tensor([2.0, -1.0])
    expected = torch.tensor([[2.0, 0.0, -1.0], [-1.0, 0.0, 4.0]])
    _assert_close(compute_steered_logits(zt, ze, zb, alpha), expected, atol=0.0)
    _assert_close(compute_steered_logits(zt, ze, zb, alpha.unsqueeze(1)), expected, atol=0.0)


def test_fusion_matches_formula_on_random_inputs() -> None:
    zt, ze, zb = _logits(4, 64, 19), _logits(4, 64, 20), _logits(4, 64, 21)
    alpha = torch.rand(4, generator=_gen(22)) * 2
    _assert_close(compute_steered_logits(zt, ze, zb, alpha), zt + alpha[:, None] * (ze - zb))


def test_alpha_zero_returns_target_exactly() -> None:
    zt = _masked(_logits(3, 32, 23), torch.rand(3, 32, generator=_gen(24)) < 0.25)
    ze = _masked(_logits(3, 32, 25), torch.rand(3, 32, generator=_gen(26)) < 0.25)
    zb = _masked(_logits(3, 32, 27), torch.rand(3, 32, generator=_gen(28)) < 0.25)
    # 第 0 列：z_t = −0.0 且 z_e − z_b = 1 > 0，于是 z_t + 0·diff = −0.0 + 0.0 = +0.0（符号位改变），
    # 只有显式选择 z_t 才能逐位保持 −0.0。
    zt[:, 0], ze[:, 0], zb[:, 0] = -0.0, 1.0, 0.0
    for alpha in (0.0, 0, torch.zeros(3)):
        out = compute_steered_logits(zt, ze, zb, alpha)
        assert torch.equal(out, zt) and torch.equal(out.signbit(), zt.signbit())
        assert out.data_ptr() != zt.data_ptr()  # 返回新张量而不是输入本身
    # 逐行 α：只有 α == 0 的行逐位等于 z_t
    out = compute_steered_logits(zt, ze, zb, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(out[0], zt[0]) and torch.equal(out[2], zt[2]) and not torch.equal(out[1], zt[1])


def test_neg_inf_never_produces_nan() -> None:
    """−inf 出现在一个、两个或全部三个输入的同一位置：距离、α、融合结果都没有 NaN，且符合文档规则。"""
    v = 12
    zt, ze, zb = _logits(1, v, 29).repeat(7, 1), _logits(1, v, 30).repeat(7, 1), _logits(1, v, 31).repeat(7, 1)
    ninf = float("-inf")
    # 每一行在第 0 列按一种组合屏蔽：(t, e, b)
    combos = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1)]
    for row, (mt, me, mb) in enumerate(combos):
        if mt:
            zt[row, 0] = ninf
        if me:
            ze[row, 0] = ninf
        if mb:
            zb[row, 0] = ninf
    for metric in METRICS:
        assert not distance(zt, ze, metric).isnan().any()
        alpha = calculate_adaptive_alpha(zt, ze, metric=metric)
        assert not alpha.isnan().any()
        for a in (alpha, 1.3, 0.0):
            out = compute_steered_logits(zt, ze, zb, a)
            assert not out.isnan().any()
            # 规则 2：z_t 为 −inf 的位置保持 −inf
            assert torch.equal(out.isneginf(), zt.isneginf())
            # 规则 1：z_e − z_b 非有限（只有第 0 列）时引导项被丢弃，结果等于 z_t
            bad = ~torch.isfinite(ze - zb)
            assert torch.equal(out[bad], zt[bad])
    # α·(z_e − z_b) 上溢为 +inf 时，z_t = −inf 的位置仍保持 −inf（−inf + inf 会是 NaN）
    huge = compute_steered_logits(zt, ze + 1e30, zb, 1e30)
    assert not huge.isnan().any() and torch.equal(huge.isneginf(), zt.isneginf())
    # 两行都屏蔽同一批词（第 0 列）时 JS 仍与参考一致
    _assert_close(distance(zt[3:4], ze[3:4]).double(), _js_reference(zt[3:4], ze[3:4]), atol=1e-5)


# ---------------------------------------------------------------------------
# 精度、纯函数性、inference_mode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_inputs_unchanged_and_float32_outputs(dtype: torch.dtype) -> None:
    mask = torch.rand(3, 40, generator=_gen(32)) < 0.2
    zt = _masked(_logits(3, 40, 33, dtype=dtype), mask)
    ze = _masked(_logits(3, 40, 34, dtype=dtype), mask.roll(1, dims=1))
    zb = _logits(3, 40, 35, dtype=dtype)
    alpha_in = torch.tensor([0.0, 1.0, 2.0])
    snapshot = [x.clone() for x in (zt, ze, zb, alpha_in)]
    outs = [
        distance(zt, ze, "js"),
        distance(zt, ze, "l2"),
        calculate_adaptive_alpha(zt, ze),
        compute_steered_logits(zt, ze, zb, 0.8),
        compute_steered_logits(zt, ze, zb, alpha_in),
    ]
    for before, after in zip(snapshot, (zt, ze, zb, alpha_in)):
        assert torch.equal(before, after) and before.dtype == after.dtype
    assert all(o.dtype == torch.float32 and not o.isnan().any() for o in outs)


def test_bf16_close_to_float32() -> None:
    """bf16 输入在 float32 下计算：结果与"同值的 float32 输入"逐位一致。"""
    t, e = _logits(4, 100, 36, dtype=torch.bfloat16), _logits(4, 100, 37, dtype=torch.bfloat16)
    assert torch.equal(calculate_adaptive_alpha(t, e), calculate_adaptive_alpha(t.float(), e.float()))


def test_works_under_inference_mode() -> None:
    t, e, b = _logits(2, 30, 38), _logits(2, 30, 39), _logits(2, 30, 40)
    expected = compute_steered_logits(t, e, b, calculate_adaptive_alpha(t, e))
    with torch.inference_mode():
        ti, ei, bi = t.clone(), e.clone(), b.clone()
        out = compute_steered_logits(ti, ei, bi, calculate_adaptive_alpha(ti, ei, metric="l2"))
        out_js = compute_steered_logits(ti, ei, bi, calculate_adaptive_alpha(ti, ei))
    assert out.shape == (2, 30) and torch.equal(out_js, expected)


# ---------------------------------------------------------------------------
# 参数校验
# ---------------------------------------------------------------------------


def test_bad_metric_lists_choices() -> None:
    a = _logits(2, 5, 41)
    with pytest.raises(ValueError, match="js.*l2"):
        distance(a, a, "kl")
    with pytest.raises(ValueError, match="js.*l2"):
        calculate_adaptive_alpha(a, a, metric="JS")


def test_shape_errors_name_the_shapes() -> None:
    a, b = _logits(2, 5, 42), _logits(2, 6, 43)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\)"):
        distance(a, b)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        distance(a[0], a[1])  # 1-D 输入
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\)"):
        calculate_adaptive_alpha(a, b)
    with pytest.raises(ValueError, match=r"\(2, 6\)"):
        compute_steered_logits(a, a, b, 1.0)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        compute_steered_logits(a[0], a[0], a[0], 1.0)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        compute_steered_logits(a, a, a, torch.ones(3))  # α 的行数与 batch 不符


# α 超参数的非法取值及错误消息应点名的字段：calculate_adaptive_alpha 与各调度共用这张表。
BAD_ALPHA_KWARGS: list[tuple[dict, str]] = [
        ({"max_boost": -0.1}, "max_boost"),
        ({"adaptive_scale": -1.0}, "adaptive_scale"),
        ({"base_alpha": float("nan")}, "base_alpha"),
        ({"max_boost": float("inf")}, "max_boost"),
        ({"adaptive_scale": True}, "adaptive_scale"),
]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    BAD_ALPHA_KWARGS,
)
def test_bad_alpha_hyperparameters(kwargs: dict[str, float], pattern: str) -> None:
    a = _logits(2, 5, 44)
    with pytest.raises(ValueError, match=pattern):
        calculate_adaptive_alpha(a, a, **kwargs)


def test_bad_scalar_alpha_in_fusion() -> None:
    a = _logits(2, 5, 45)
    with pytest.raises(ValueError, match="alpha"):
        compute_steered_logits(a, a, a, float("nan"))


# ---------------------------------------------------------------------------
# guard_nonfinite：NaN / +inf / 全 −inf 的行整行退回目标 logits
# ---------------------------------------------------------------------------

def test_guard_nonfinite_replaces_only_bad_rows():
    from steering_utils import guard_nonfinite

    torch.manual_seed(7)
    fused, target = torch.randn(5, 11), torch.randn(5, 11)
    fused[1, 3] = float("nan")
    fused[2, 0] = float("inf")
    fused[3] = float("-inf")
    fused[4, 2] = float("-inf")  # 单个 −inf 是正常的屏蔽词，不算坏行
    before = fused.clone()
    out, bad = guard_nonfinite(fused, target)
    assert bad.tolist() == [False, True, True, True, False]
    assert torch.equal(out[[0, 4]], fused[[0, 4]])
    assert torch.equal(out[1:4], target[1:4])
    assert torch.equal(fused.isnan(), before.isnan()) and torch.equal(fused.nan_to_num(), before.nan_to_num())
    assert out.dtype == torch.float32 and not out.isnan().any()


def test_guard_nonfinite_shape_check():
    from steering_utils import guard_nonfinite

    with pytest.raises(ValueError):
        guard_nonfinite(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------------------
# schedule_alpha：constant / adaptive / adaptive_inverse
# ---------------------------------------------------------------------------


def _interpolated_rows(seed: int, k: int = 12) -> tuple[Tensor, Tensor]:
    """目标固定、专家从目标线性插值到另一个向量的 k 行：第 i 行的距离随 i 严格递增（第 0 行距离为 0）。"""
    t, u = _logits(1, 200, seed), _logits(1, 200, seed + 1)
    lam = torch.linspace(0.0, 1.0, k).unsqueeze(1)  # (K, 1)
    experts = t + lam * (u - t)  # (K, V)
    return t.expand_as(experts), experts


def test_constant_schedule_is_base_alpha_and_ignores_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    t, e = _logits(5, 60, 50), _logits(5, 60, 51)
    want = torch.full((5,), 0.7)
    # 不计算距离：把 distance 换成一调用就失败的函数，constant 仍须正常返回。
    def _no_distance(*args: object, **kwargs: object) -> Tensor:
        raise AssertionError("constant 调度不应计算距离")

    monkeypatch.setattr(steering_utils, "distance", _no_distance)
    for expert in (e, t.clone(), torch.full_like(e, float("nan")), e.bfloat16()):
        got = schedule_alpha(t, expert, "constant", base_alpha=0.7, adaptive_scale=10.0, max_boost=2.0)
        assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("metric", METRICS)
def test_adaptive_schedule_is_calculate_adaptive_alpha_bitwise(metric: str) -> None:
    for seed, (base, scale, boost) in enumerate([(1.0, 10.0, 1.0), (0.3, 2.5, 1.7), (-0.5, 40.0, 0.25)]):
        t = _masked(_logits(8, 100, 60 + seed, dtype=torch.bfloat16), torch.rand(8, 100, generator=_gen(63 + seed)) < 0.2)
        e = _logits(8, 100, 66 + seed, scale=1.0 + seed)
        got = schedule_alpha(t, e, "adaptive", base, scale, boost, metric)
        assert torch.equal(got, calculate_adaptive_alpha(t, e, base, scale, boost, metric))
    # 默认调度就是 adaptive
    assert torch.equal(schedule_alpha(t, e), calculate_adaptive_alpha(t, e))


@pytest.mark.parametrize("metric", METRICS)
def test_inverse_schedule_at_zero_distance_is_base_plus_boost(metric: str) -> None:
    x = _masked(_logits(4, 50, 70), torch.rand(4, 50, generator=_gen(71)) < 0.2)
    got = schedule_alpha(x, x.clone(), "adaptive_inverse", base_alpha=0.5, adaptive_scale=10.0, max_boost=1.5, metric=metric)
    assert got.dtype == torch.float32 and torch.equal(got, torch.full((4,), 2.0))  # 0.5 + 1.5，float32 精确
    got = schedule_alpha(x, x.clone(), "adaptive_inverse", base_alpha=0.7, adaptive_scale=3.0, max_boost=0.2, metric=metric)
    _assert_close(got, torch.full((4,), 0.9), atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_inverse_schedule_within_bounds(metric: str) -> None:
    base, boost = 0.5, 1.5
    for seed in range(0, 20, 3):
        scale = 0.1 * (seed + 1) ** 1.5  # 从近均匀到非常尖锐（包括 tanh 饱和的情形）
        t, e = _logits(8, 128, seed, scale), _logits(8, 128, seed + 1000, scale)
        alpha = schedule_alpha(t, e, "adaptive_inverse", base, adaptive_scale=10.0, max_boost=boost, metric=metric)
        assert alpha.shape == (8,)
        assert (alpha >= base).all() and (alpha <= base + boost).all()


@pytest.mark.parametrize("metric", METRICS)
def test_inverse_schedule_monotone_non_increasing_in_distance(metric: str) -> None:
    """第 i 行的专家离目标越来越远：adaptive 单调不减，adaptive_inverse 单调不增，且首尾确有变化。"""
    targets, experts = _interpolated_rows(72)
    d = distance(targets, experts, metric)
    assert d[0] == 0 and (d[1:] > d[:-1]).all()
    inv = schedule_alpha(targets, experts, "adaptive_inverse", 1.0, adaptive_scale=3.0, max_boost=1.0, metric=metric)
    assert inv[0] == 2.0 and (inv[1:] <= inv[:-1]).all() and inv[-1] < inv[0]
    ada = schedule_alpha(targets, experts, "adaptive", 1.0, adaptive_scale=3.0, max_boost=1.0, metric=metric)
    assert (ada[1:] >= ada[:-1]).all() and ada[-1] > ada[0]


@pytest.mark.parametrize("metric", METRICS)
def test_inverse_plus_adaptive_is_constant(metric: str) -> None:
    """tanh + (1 − tanh) = 1：两种自适应调度逐行相加恒为 2·base_alpha + max_boost。"""
    for seed, (base, scale, boost) in enumerate([(1.0, 10.0, 1.0), (0.25, 3.0, 2.0), (-1.0, 50.0, 0.5)]):
        t, e = _logits(16, 120, 80 + seed, scale=0.5 + 3 * seed), _logits(16, 120, 90 + seed, scale=0.5 + 3 * seed)
        ada = schedule_alpha(t, e, "adaptive", base, scale, boost, metric)
        inv = schedule_alpha(t, e, "adaptive_inverse", base, scale, boost, metric)
        _assert_close(ada + inv, torch.full((16,), 2 * base + boost), atol=1e-6)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_rows_are_independent(schedule: str) -> None:
    t, e = _logits(6, 80, 100), _logits(6, 80, 101)
    full = schedule_alpha(t, e, schedule, 0.8, 5.0, 1.2, "js")
    for i in range(6):
        _assert_close(schedule_alpha(t[i:i + 1], e[i:i + 1], schedule, 0.8, 5.0, 1.2, "js")[0], full[i], atol=1e-6)
    perm = torch.randperm(6, generator=_gen(102))
    _assert_close(schedule_alpha(t[perm], e[perm], schedule, 0.8, 5.0, 1.2, "js"), full[perm], atol=1e-6)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_inputs_unchanged_and_no_nan(schedule: str) -> None:
    mask = torch.rand(3, 40, generator=_gen(103)) < 0.2
    t = _masked(_logits(3, 40, 104, dtype=torch.bfloat16), mask)
    e = _masked(_logits(3, 40, 105, dtype=torch.bfloat16), mask.roll(1, dims=1))
    snapshot = [t.clone(), e.clone()]
    out = schedule_alpha(t, e, schedule)
    assert torch.equal(snapshot[0], t) and torch.equal(snapshot[1], e) and t.dtype == torch.bfloat16
    assert out.shape == (3,) and out.dtype == torch.float32 and not out.isnan().any()


def test_bad_schedule_lists_choices() -> None:
    a = _logits(2, 5, 106)
    for bad in ("inverse", "Adaptive", ""):
        with pytest.raises(ValueError, match="constant.*adaptive.*adaptive_inverse"):
            schedule_alpha(a, a, bad)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    BAD_ALPHA_KWARGS + [({"metric": "kl"}, "js.*l2")],
)
def test_bad_schedule_hyperparameters(schedule: str, kwargs: dict[str, object], pattern: str) -> None:
    """超参数按 calculate_adaptive_alpha 的规则校验，且对每种调度都校验（constant 也不例外）。"""
    a = _logits(2, 5, 107)
    with pytest.raises(ValueError, match=pattern):
        schedule_alpha(a, a, schedule, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_shape_errors(schedule: str) -> None:
    a, b = _logits(2, 5, 108), _logits(2, 6, 109)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\)"):
        schedule_alpha(a, b, schedule)


# ---------------------------------------------------------------------------
# plausibility_mask / apply_plausibility：目标模型的自适应可行性约束
# ---------------------------------------------------------------------------

BETAS: tuple[float, ...] = (0.0, 1e-4, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0)


def _target_with_masks(seed: int, b: int = 8, v: int = 200, dtype: torch.dtype = torch.float32) -> Tensor:
    """带约 20% −inf 屏蔽词的随机目标 logits（每行至少留下有限值）。"""
    return _masked(_logits(b, v, seed, dtype=dtype), torch.rand(b, v, generator=_gen(seed + 1)) < 0.2)


def test_plausibility_beta_zero_is_all_true() -> None:
    t = _target_with_masks(110)
    m = plausibility_mask(t, 0.0)
    assert m.dtype == torch.bool and m.shape == t.shape and m.all()  # 连 −inf 的词也为 True：约束被关闭
    assert plausibility_mask(t, 0).all()


def test_plausibility_beta_one_keeps_only_the_max_with_ties() -> None:
    t = _target_with_masks(112, b=4, v=50)
    rowmax = t.amax(-1)
    t[0, [3, 17, 40]] = rowmax[0] + 1.0  # 第 0 行三个并列最大
    t[1, 5] = rowmax[1] + 1e-3  # 第 1 行的最大值只比第二名高一点点，也不能被舍入成并列
    m = plausibility_mask(t, 1.0)
    assert torch.equal(m, t == t.amax(-1, keepdim=True))
    assert m[0].nonzero().flatten().tolist() == [3, 17, 40] and m[1].sum() == 1 and (m.sum(-1) >= 1).all()


def test_plausibility_monotone_in_beta() -> None:
    """beta 越大，可行集合越小（嵌套的子集）。"""
    t = _target_with_masks(114)
    masks = [plausibility_mask(t, beta) for beta in BETAS]
    for looser, stricter in zip(masks, masks[1:]):
        assert not (stricter & ~looser).any()
    counts = torch.stack([m.sum(-1) for m in masks])  # (len(BETAS), B)
    assert (counts[1:] <= counts[:-1]).all() and (counts[0] > counts[-1]).all()


@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_plausibility_matches_float64_softmax_reference(scale: float) -> None:
    """与 float64 概率域的定义 p ≥ beta · max p 一致；只豁免比值与 beta 相差 < 1e-5（相对）的边界词。"""
    t = _masked(_logits(8, 300, 116, scale=scale), torch.rand(8, 300, generator=_gen(117)) < 0.2)
    p = torch.softmax(t.double(), -1)
    ratio = p / p.amax(-1, keepdim=True)  # (B, V)，float64
    for beta in BETAS[1:]:
        got = plausibility_mask(t, beta)
        ref = ratio >= beta
        decided = (ratio.log() - math.log(beta)).abs() > 1e-5
        assert decided.float().mean() > 0.99
        assert torch.equal(got[decided], ref[decided])
        assert got.any(-1).all() and ref.any(-1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_target_argmax_always_plausible_and_neg_inf_never(dtype: torch.dtype) -> None:
    t = _target_with_masks(118, b=16, v=100, dtype=dtype)
    top = t.float().argmax(-1, keepdim=True)  # (B, 1)
    for beta in BETAS:
        m = plausibility_mask(t, beta)
        assert m.gather(-1, top).all()
        if beta > 0:
            assert not m[t.isneginf()].any()


def test_apply_plausibility_keeps_plausible_values_and_masks_the_rest() -> None:
    zt, ze, zb = _target_with_masks(120), _logits(8, 200, 121), _logits(8, 200, 122)
    fused = compute_steered_logits(zt, ze, zb, calculate_adaptive_alpha(zt, ze))
    for beta in BETAS[1:]:
        mask = plausibility_mask(zt, beta)
        out = apply_plausibility(fused, zt, beta)
        assert out.dtype == torch.float32 and out.shape == fused.shape
        assert torch.equal(out[mask], fused[mask])
        assert out[~mask].isneginf().all()
        # 融合后的 argmax 一定是目标自己认为可行的词
        assert mask.gather(-1, out.argmax(-1, keepdim=True)).all()
    # beta = 1：只剩目标的 argmax，融合结果的 argmax 必然退化为目标的 argmax（无并列时）
    assert torch.equal(apply_plausibility(fused, zt, 1.0).argmax(-1), zt.argmax(-1))


def test_apply_plausibility_beta_zero_is_bit_identical() -> None:
    zt = _target_with_masks(124)
    for fused in (_target_with_masks(126), _target_with_masks(128, dtype=torch.bfloat16)):
        fused[:, 0] = -0.0
        out = apply_plausibility(fused, zt, 0.0)
        assert torch.equal(out, fused.float()) and torch.equal(out.signbit(), fused.float().signbit())
        assert out.dtype == torch.float32 and out.data_ptr() != fused.data_ptr()  # 新张量，不与输入共享存储


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_apply_plausibility_inputs_unchanged_and_no_nan(dtype: torch.dtype) -> None:
    zt = _target_with_masks(130, dtype=dtype)
    fused = _masked(_logits(8, 200, 132, dtype=dtype), torch.rand(8, 200, generator=_gen(133)) < 0.2)
    snapshot = [zt.clone(), fused.clone()]
    for beta in BETAS:
        m = plausibility_mask(zt, beta)
        out = apply_plausibility(fused, zt, beta)
        assert m.dtype == torch.bool and m.shape == zt.shape
        assert not out.isnan().any()
        assert torch.equal(out.isneginf(), fused.isneginf() | ~m)
    assert torch.equal(snapshot[0], zt) and torch.equal(snapshot[1], fused) and zt.dtype == dtype


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_bad_beta(beta: object) -> None:
    t = _logits(2, 5, 134)
    with pytest.raises(ValueError, match="beta"):
        plausibility_mask(t, beta)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        apply_plausibility(t, t, beta)  # type: ignore[arg-type]


def test_plausibility_shape_errors() -> None:
    a, b = _logits(2, 5, 135), _logits(2, 6, 136)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        plausibility_mask(a[0], 0.1)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\)"):
        apply_plausibility(a, b, 0.1)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\)"):
        apply_plausibility(a, b, 0.0)  # beta = 0 的捷径也先校验形状


@pytest.mark.parametrize("schedule", ["constant", "adaptive", "adaptive_inverse"])
@pytest.mark.parametrize("metric", ["js", "l2"])
def test_alpha_from_distance_matches_schedule_alpha(schedule, metric):
    """扫参用的 alpha_from_distance(distance(z_t, z_e)) 与 schedule_alpha 逐位相同。"""
    from steering_utils import alpha_from_distance

    torch.manual_seed(11)
    zt, ze = torch.randn(9, 40) * 3, torch.randn(9, 40) * 3
    params = SteeringParams(base_alpha=0.4, adaptive_scale=7.0, max_boost=1.3, metric=metric, schedule=schedule)
    expected = _schedule_alpha(zt, ze, params)
    assert torch.equal(alpha_from_distance(distance(zt, ze, metric), params), expected)
    with pytest.raises(ValueError):
        SteeringParams(schedule="cosine")


def test_steering_params_defaults_come_from_config() -> None:
    """SteeringParams 的缺省就是 config.py 的常量（唯一来源），非法值在构造时报错。"""
    import config

    assert SteeringParams() == SteeringParams(config.BASE_ALPHA, config.ADAPTIVE_SCALE, config.MAX_BOOST,
                                              config.DISTANCE_METRIC, config.SCHEDULE, config.PLAUSIBILITY_BETA)
    for bad in ({"max_boost": -1.0}, {"plausibility_beta": 1.5}, {"metric": "kl"}, {"base_alpha": float("nan")}):
        with pytest.raises(ValueError):
            SteeringParams(**bad)  # type: ignore[arg-type]
