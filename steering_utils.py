"""领域引导解码（domain-steered decoding）的纯张量工具函数。

每个贪心解码步骤中，三个模型各给出一行下一词 logits（形状均为 (B, V)，B = batch，V = 词表大小）：

    z_final = z_target + α(t) · (z_expert − z_base)
    α(t)    = base_alpha + tanh(d · adaptive_scale) · max_boost

其中 d 是目标分布 p_t 与专家分布 p_e 之间的距离：
    - "js"：Jensen–Shannon 散度（自然对数），范围 [0, ln 2]；
    - "l2"：概率向量差的 L2 范数 ‖p_t − p_e‖₂，范围 [0, √2]。

上式是默认的 "adaptive" 调度；schedule_alpha 另提供 "constant"（α ≡ base_alpha）与
"adaptive_inverse"（α 随距离减小）作对照。plausibility_mask / apply_plausibility 可选地把融合结果
限制在目标模型自己认为足够可能的词上（对比解码的自适应可行性约束）。
SteeringParams 把一步引导的全部设置打包（构造时校验一次），fuse_step 是生成与快速路径共用的融合一步，
fuse_with_alpha 是它与字母打分共用的融合规则。温度 / top-p 采样在 sampling.py。

设计约定（所有函数共同遵守）：
    - 纯函数：不持有任何模型状态，不原地修改输入，总是返回新张量；
      因此可以在 decoding 循环中随意复用输入 logits，也可以在 torch.inference_mode() 下调用。
    - 输入可为任意浮点精度（bf16 / fp16 / fp32），内部一律先转成 float32 再计算：
      bf16 只有 8 位尾数，直接在 bf16 下做 softmax / log / 相减会让 JS 散度（通常只有 0.0x 量级）
      被舍入误差淹没；输出也统一为 float32，便于下游 argmax 与记录。
    - 被屏蔽的词（logit 为 −inf）是合法输入，任何位置都不会产生 NaN（规则见各函数文档）。
      整行全为 −inf 不是合法的概率分布，不在支持范围内；+inf / NaN 输入同样视为调用方错误。
      为避免 GPU 同步，这些取值不做逐元素检查。
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import config

__all__ = [
    "METRICS",
    "SCHEDULES",
    "distance",
    "calculate_adaptive_alpha",
    "schedule_alpha",
    "alpha_from_distance",
    "compute_steered_logits",
    "plausibility_mask",
    "apply_plausibility",
    "guard_nonfinite",
    "nonfinite_rows",
    "stop_nonfinite_target",
    "SteeringParams",
    "fuse_with_alpha",
    "fuse_step",
]

# 支持的距离度量（唯一来源 config.CHOICES）。
METRICS: tuple[str, ...] = config.CHOICES["distance"]

# α 的调度方式（见 schedule_alpha）：
#   "constant"         —— α ≡ base_alpha，不看距离；
#   "adaptive"         —— 设计中的规则，α 随目标–专家距离增大（即 calculate_adaptive_alpha）；
#   "adaptive_inverse" —— 反向规则，α 随距离减小（专家与目标分歧越大，越少依赖专家）。
SCHEDULES: tuple[str, ...] = config.CHOICES["schedule"]

# 两种度量的理论上界：JS（自然对数）≤ ln 2（两分布支撑集不相交时取到）；
# 两个概率向量之差的 L2 范数 ≤ √2（两个不同的 one-hot 时取到）。
_LN2: float = math.log(2.0)
_UPPER: dict[str, float] = {"js": _LN2, "l2": math.sqrt(2.0)}


def _check_pair(a: Tensor, b: Tensor, names: str = "logits") -> None:
    """校验两个 logits 张量都是 2-D 且形状相同；否则抛出 ValueError 并写明实际形状。

    为什么要求严格的 (B, V)：广播会把 (V,) 与 (B, V) 静默地组合在一起，
    得到形状正确但语义错误的结果（每一行都和同一个向量比较），这种错误在解码中很难察觉。
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"{names} must be 2-D tensors (B, V) of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _check_matrix(x: Tensor, name: str) -> None:
    """校验单个 logits 张量是 2-D (B, V)；否则抛出 ValueError 并写明实际形状（理由同 _check_pair）。"""
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (B, V); got {tuple(x.shape)}")


def _check_metric(metric: str) -> None:
    """校验距离度量名称；非法时在消息中列出全部可选值。"""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not valid; choose one of: {', '.join(METRICS)}")


def _kl_to_mixture(la: Tensor, lb: Tensor, lm: Tensor) -> Tensor:
    """计算 KL(p_a ‖ m) 的逐行值，形状 (B, V) → (B,)，其中 m = (p_a + p_b) / 2。

    参数均为 float32 的对数概率：la = log p_a，lb = log p_b，lm = log m，形状 (B, V)。

    逐词项 p_a · (log p_a − log m) 按 xlogy 的约定处理（0 · log 0 = 0）：
        - p_a == 0（包括 la = −inf 的屏蔽词，以及 exp 下溢为 0 的极小概率）时该项记 0；
          否则 0 · (−inf) 或 (−inf) − (−inf) 会产生 NaN。极小概率的真实贡献也只有 ~1e-40 量级，
          记 0 不影响精度。
        - la == lb 时 p_a == p_b == m，该项按定义恰为 0；显式置 0 而不是依赖
          la − (logaddexp(la, la) − ln2) 的浮点舍入，这样两个完全相同的分布得到的 JS 恰好是 0，
          从而 α 恰好等于 base_alpha（而不是 base_alpha + 1 ulp）。
    torch.where 只挑选取值，未被选中分支里的 NaN 不会传播到前向结果。
    """
    pa = la.exp()
    keep = (pa > 0) & (la != lb)
    terms = torch.where(keep, pa * (la - lm), torch.zeros_like(la))
    return terms.sum(dim=-1)


def distance(logits_a: Tensor, logits_b: Tensor, metric: str = "js") -> Tensor:
    """逐行计算两个下一词分布之间的距离。

    参数：
        logits_a, logits_b: 形状 (B, V) 的 logits，任意浮点精度；可含 −inf（被屏蔽的词）。
        metric: "js"（Jensen–Shannon 散度，自然对数）或 "l2"（‖p_a − p_b‖₂）。

    返回：
        形状 (B,) 的 float32 张量；JS 落在 [0, ln 2]，L2 落在 [0, √2]。

    实现要点：
        - 先在 float32 下做 log_softmax：它对 −inf 的处理是精确的（exp(−inf) = 0），
          并且比先 softmax 再 log 更稳定（不会出现 log(0) 的下溢）。
        - JS = ½·KL(p_a‖m) + ½·KL(p_b‖m)，m = ½(p_a + p_b)。
          log m 用 logaddexp(la, lb) − ln 2 在对数域中计算，避免 p 很小时 (p_a + p_b)/2 下溢为 0
          再取 log 得到 −inf；两行都为 −inf 的词 logaddexp 给出 −inf，随后由 _kl_to_mixture 置 0。
        - 对称性：交换参数只是交换两个 KL 项的加法顺序，浮点加法可交换，所以结果逐位相同。
        - 最后 clamp 到理论区间，去掉 ~1e-8 的浮点误差（例如微小的负 JS），
          保证下游 tanh(d · scale) 的输入与文档中的区间一致。
    """
    _check_metric(metric)
    _check_pair(logits_a, logits_b)
    # (B, V) float32 对数概率；.float() 对 float32 输入不复制，但后续运算都生成新张量，输入不被修改。
    la = F.log_softmax(logits_a.float(), dim=-1)
    lb = F.log_softmax(logits_b.float(), dim=-1)
    if metric == "js":
        lm = torch.logaddexp(la, lb) - _LN2  # (B, V)，log m
        d = 0.5 * (_kl_to_mixture(la, lb, lm) + _kl_to_mixture(lb, la, lm))
    else:
        # exp(−inf) = 0，屏蔽词对 L2 的贡献天然正确，无需特殊处理。
        d = torch.linalg.vector_norm(la.exp() - lb.exp(), ord=2, dim=-1)
    return d.clamp(0.0, _UPPER[metric])


def _check_finite_number(name: str, value: float) -> None:
    """校验标量超参数是有限实数（拒绝 bool、NaN、±inf、字符串等），否则抛出 ValueError。

    在 torch.compile 追踪时跳过：同一段解码步代码以不同的 α 再次编译时，dynamo 会把这些浮点数
    变成符号量（SymFloat），math.isfinite 无法追踪、fullgraph 编译会失败（CPU 上实测）。
    FastDecoder 的第一步（prefill 之后）总是先在 eager 下调用同一函数，所以校验不会被绕过。
    """
    if torch.compiler.is_compiling():
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")


def _check_alpha_hyperparameters(base_alpha: float, adaptive_scale: float, max_boost: float, why: str) -> None:
    """校验 α 的三个超参数：都必须是有限实数，且 adaptive_scale、max_boost ≥ 0；why 写进错误消息，说明约束的理由。"""
    for name, value in (("base_alpha", base_alpha), ("adaptive_scale", adaptive_scale), ("max_boost", max_boost)):
        _check_finite_number(name, value)
    if adaptive_scale < 0 or max_boost < 0:
        raise ValueError(f"adaptive_scale={adaptive_scale!r} and max_boost={max_boost!r} must be >= 0 ({why})")


@dataclass(frozen=True)
class SteeringParams:
    """一步引导的全部参数，整体传递（解码循环、FastDecoder、字母打分都只收这一个对象）。

    schedule='adaptive' 时 α = base_alpha + tanh(d · adaptive_scale) · max_boost（见 alpha_from_distance）；
    metric 为 'js' 或 'l2'；plausibility_beta > 0 时只允许目标认为可信的 token（见 plausibility_mask）。
    缺省值只来自 config.py。构造时校验一次（__post_init__）：之后的每一步不再重复校验。
    """

    base_alpha: float = config.BASE_ALPHA
    adaptive_scale: float = config.ADAPTIVE_SCALE
    max_boost: float = config.MAX_BOOST
    metric: str = config.DISTANCE_METRIC
    schedule: str = config.SCHEDULE
    plausibility_beta: float = config.PLAUSIBILITY_BETA

    def __post_init__(self) -> None:
        """非法的调度、度量、超参数或 β 在构造时报错（ValueError），消息写明字段与取值。"""
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not valid; choose one of: {', '.join(SCHEDULES)}")
        _check_metric(self.metric)
        why = "so that α " + ("does not increase" if self.schedule == "adaptive_inverse" else "does not decrease") + " as the distance grows"
        _check_alpha_hyperparameters(self.base_alpha, self.adaptive_scale, self.max_boost, why=why)
        _check_beta(self.plausibility_beta)


def steering_params(cfg: "config.Config", schedule: str | None = None,
                    base_alpha: float | None = None) -> SteeringParams:
    """配置 → 融合参数（唯一的映射，main.py、lm_eval_adapter.py 共用）；扫参时替换调度与 BASE_ALPHA，
    其余（ADAPTIVE_SCALE、MAX_BOOST、距离、β）沿用配置。"""
    return SteeringParams(cfg.base_alpha if base_alpha is None else base_alpha, cfg.adaptive_scale, cfg.max_boost,
                          cfg.distance, schedule=schedule or cfg.schedule, plausibility_beta=cfg.plausibility_beta)

def calculate_adaptive_alpha(
    logits_target: Tensor,
    logits_expert: Tensor,
    base_alpha: float = config.BASE_ALPHA,
    adaptive_scale: float = config.ADAPTIVE_SCALE,
    max_boost: float = config.MAX_BOOST,
    metric: str = config.DISTANCE_METRIC,
) -> Tensor:
    """设计卡片上的公式：逐行 α = base_alpha + tanh(d · adaptive_scale) · max_boost，形状 (B,) float32。

    logits_target / logits_expert: (B, V)，任意浮点精度；取值在 [base_alpha, base_alpha + max_boost] 内。
    为什么用 tanh：d ≥ 0 时 tanh(d · scale) ∈ [0, 1) 且单调不减，α 因此有界并随分歧平滑增大；
    d = 0 时 α 恰为 base_alpha。与 schedule_alpha(…, SteeringParams(schedule="adaptive")) 是同一份实现。
    """
    params = SteeringParams(base_alpha, adaptive_scale, max_boost, metric, schedule="adaptive")
    return schedule_alpha(logits_target, logits_expert, params)


def schedule_alpha(logits_target: Tensor, logits_expert: Tensor, params: SteeringParams) -> Tensor:
    """按 params.schedule 逐行给出引导强度 α (B,) float32，供 compute_steered_logits 使用。

    - "constant"：α = base_alpha。不计算距离、不读取专家 logits 的取值（与“固定 α”基线完全等价）。
    - "adaptive"：α = base_alpha + tanh(d · adaptive_scale) · max_boost，随距离单调不减。
    - "adaptive_inverse"：α = base_alpha + (1 − tanh(d · adaptive_scale)) · max_boost，随距离单调不增；
      与 "adaptive" 逐行满足 α_adaptive + α_inverse = 2·base_alpha + max_boost（浮点误差内）。
    超参数已在 SteeringParams 构造时校验；这里只核对两个输入的形状（对所有调度都做）。
    """
    _check_pair(logits_target, logits_expert)
    if params.schedule == "constant":
        return torch.full((logits_target.shape[0],), float(params.base_alpha), dtype=torch.float32,
                          device=logits_target.device)
    return alpha_from_distance(distance(logits_target, logits_expert, metric=params.metric), params)


def alpha_from_distance(d: Tensor, params: SteeringParams) -> Tensor:
    """已知距离 d（形状 (N,)，来自 distance()）时按 params.schedule 算 α，形状 (N,) float32。α 的公式只写在这里。

    为什么单独拿出来：字母打分对每道题只需算一次距离，之后每个 (调度, α) 设置只是对 d 做逐元素运算。
    """
    d = d.float()
    if params.schedule == "constant":
        return torch.full_like(d, float(params.base_alpha))
    t = torch.tanh(d * params.adaptive_scale)
    if params.schedule == "adaptive":
        return params.base_alpha + t * params.max_boost
    # adaptive_inverse：tanh(·) ∈ [0, 1]（float32 下大参数时可恰为 1），故 1 − tanh ∈ [0, 1]，α 落在同一区间内。
    return params.base_alpha + (1.0 - t) * params.max_boost


def compute_steered_logits(
    logits_t: Tensor,
    logits_e: Tensor,
    logits_b: Tensor,
    alpha: float | Tensor,
) -> Tensor:
    """融合三路 logits：z_final = z_t + α · (z_e − z_b)。

    参数：
        logits_t: 目标模型 logits z_t，形状 (B, V)，任意浮点精度。
        logits_e: 领域专家 logits z_e，形状 (B, V)。
        logits_b: 专家的通用基座 logits z_b，形状 (B, V)。
        alpha: Python 实数（整批共用），或形状 (B,) / (B, 1) 的张量（逐行 α，例如
            calculate_adaptive_alpha 的输出）。α 必须为有限值。

    返回：
        形状 (B, V) 的 float32 新张量。

    −inf（被屏蔽词）的处理规则——保证任何位置都不出现 NaN：
        1. 若 (z_e − z_b) 不是有限值（inf − inf，或 z_e、z_b 中恰有一个为 −inf），把差值记为 0：
           该词的引导项被丢弃，保留目标的 logit。理由：一方屏蔽、另一方不屏蔽时，
           差值是 ±inf，会把该词强行推到 ±inf，完全压过目标模型，这不是"领域差异"的合理估计；
           两方都屏蔽时 inf − inf 本身就是 NaN。
        2. 若 z_t 为 −inf，结果保持 −inf（目标模型屏蔽的词永远不会被引导"复活"）。
        3. 若某行 α == 0，该行结果与 z_t（转为 float32 后）逐位相同，包括 −inf 与 −0.0；
           显式用 where 选择，而不依赖 z_t + 0·diff（−0.0 + 0.0 = +0.0，会改变符号位）。
    """
    _check_pair(logits_t, logits_e, names="logits_t/logits_e")
    _check_pair(logits_t, logits_b, names="logits_t/logits_b")
    zt, ze, zb = logits_t.float(), logits_e.float(), logits_b.float()
    batch = zt.shape[0]

    # 把 α 统一成可以与 (B, V) 广播的 float32 张量：标量 → 0-d，逐行 → (B, 1)。
    if isinstance(alpha, Tensor):
        if alpha.shape not in ((batch,), (batch, 1)):
            raise ValueError(
                f"the alpha tensor must have shape ({batch},) or ({batch}, 1); got {tuple(alpha.shape)}"
            )
        a = alpha.to(device=zt.device, dtype=torch.float32).reshape(batch, 1)
    else:
        _check_finite_number("alpha", alpha)
        a = torch.tensor(float(alpha), dtype=torch.float32, device=zt.device)

    diff = ze - zb  # (B, V)
    diff = torch.where(torch.isfinite(diff), diff, torch.zeros_like(diff))  # 规则 1
    keep_target = (a == 0) | torch.isneginf(zt)  # (B, V)：规则 2 与规则 3
    return torch.where(keep_target, zt, zt + a * diff)


def guard_nonfinite(fused: Tensor, fallback: Tensor) -> tuple[Tensor, Tensor]:
    """逐行检查融合后的 logits；坏行整行换成 fallback（目标模型的 logits），返回 (新 logits, 坏行标记)。

    参数：
        fused: 融合后的 logits，形状 (B, V)。
        fallback: 目标模型的 logits，形状 (B, V)（坏行改用它，相当于该步退回基线）。

    返回：
        (B, V) float32 的新张量，以及 (B,) bool 张量（True = 该行本步触发了守卫）。

    “坏行”：含 NaN 或 +inf，或一个有限值都没有（全是 −inf）。单独的 −inf 是正常的（被屏蔽的词），
    不算坏。为什么整行替换而不是只替换坏元素：一个 NaN 说明这一步的某个模型已经数值失常，
    同一行其他位置的值也不可信；退回目标模型的分布是最保守的选择，且被计数、写进 metrics，不会静默发生。
    """
    _check_pair(fused, fallback, names="fused/fallback")
    f = fused.float()
    bad = nonfinite_rows(f)  # (B,)
    return torch.where(bad[:, None], fallback.float(), f), bad


def nonfinite_rows(logits: Tensor) -> Tensor:
    """(B, V) logits → (B,) bool：该行含 NaN 或 +inf，或一个有限值都没有（全是 −inf）。

    单独的 −inf 是正常的（被屏蔽的词），不算。guard_nonfinite（融合结果）与 stop_nonfinite_target（目标 logits）
    共用这一个定义。在 float32 下判断（bf16/fp16 的 NaN/inf 转换后不变），不修改输入。
    """
    _check_matrix(logits, "logits")
    f = logits.float()
    return torch.isnan(f).any(-1) | torch.isposinf(f).any(-1) | ~torch.isfinite(f).any(-1)


def stop_nonfinite_target(logits_target: Tensor, fused: Tensor) -> tuple[Tensor, Tensor]:
    """目标模型 logits 的非有限守卫（所有解码路径共用：参考循环、FastDecoder 的编译步、投机循环；基线与引导都用）。

    参数：
        logits_target: 目标模型本步的 logits z_t，(B, V)，任意浮点精度。
        fused: 本步要从中选词的 logits，(B, V)（基线就是 z_t；引导是 fuse_step 的输出）。

    返回：
        (B, V) float32 新张量：stop 行整行为 0（有限值），其余行等于 fused.float()；以及 stop (B,) bool。

    规则：z_t 的某行非有限（nonfinite_rows 的定义）时，该行在这一步 *干净地停止*：调用方不输出这一步的 token
    （就像在这一步之前生成了结束记号，但输出里没有任何伪造的记号），并给该题计数、写进记录与 metrics。
    为什么不退回别的 logits：融合的守卫（guard_nonfinite）退回的正是 z_t；z_t 自己坏了就没有可信的分布可用——
    NaN 的 argmax 会悄悄选出 token 0（或某个任意 id），之后的文本全是垃圾。停止是唯一诚实的做法。
    stop 行换成 0 只是为了让下游的 argmax / 采样只见有限值（选出的 token 被调用方丢弃），编译图里也没有数据相关的分支。
    """
    _check_pair(logits_target, fused, names="logits_target/fused")
    stop = nonfinite_rows(logits_target)  # (B,)
    f = fused.float()
    return torch.where(stop[:, None], torch.zeros_like(f), f), stop


def _check_beta(beta: float) -> None:
    """校验可行性阈值 beta：有限实数且在 [0, 1] 内（拒绝 bool / NaN / ±inf），否则抛出 ValueError。"""
    _check_finite_number("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must be in [0, 1] (0 turns the plausibility constraint off, 1 keeps only the target's most probable token)")


def plausibility_mask(logits_target: Tensor, beta: float) -> Tensor:
    """目标模型的自适应可行性约束（adaptive plausibility constraint，Li et al. 2023 对比解码）。

    参数：
        logits_target: 目标模型 logits z_t，形状 (B, V)，任意浮点精度；可含 −inf（被屏蔽的词）。
        beta: 阈值，[0, 1]。

    返回：
        形状 (B, V) 的 bool 新张量：True 表示该词"可行"，即 p_t(v) ≥ beta · max_w p_t(w)。

    为什么需要它：融合项 α·(z_e − z_b) 只反映专家与其基座的差异，可能把目标模型认为几乎不可能的词
    推到第一位（对比解码中已知的"假阳性"问题）。只在目标模型自己认为足够可能的词里挑选，
    就保证了引导只在目标的合理候选之间重新排序。

    实现（float32、对数域）：
        条件 p_i ≥ beta · max p 等价于 log p_i ≥ log beta + max log p。由于 log p_i = z_i − logsumexp(z)，
        logsumexp 在两边相消，于是直接比较 z_i − max z ≥ log beta。这与在 log_softmax 上比较数学上相同，
        但省去了 logsumexp 及其舍入：两个不同的 logit 不会因减去同一个 logsumexp 被舍入成"并列"，
        而 z_i − max z == 0 当且仅当 z_i == max z，所以 beta = 1 时恰好保留所有并列最大的词。
        对数域也避免了 softmax 下溢：概率 < 1e-38 的词在概率域里都变成 0，无法与 beta · max p 正确比较。

    约定：
        - beta == 0：约束关闭，返回全 True（包括 −inf 的词——掩码不做任何限制，屏蔽词本身仍是 −inf，
          见 apply_plausibility）。
        - beta > 0：log beta 有限，−inf 的词（z_i − max z = −inf）永远不可行。
        - 目标模型的 argmax 词永远可行：它满足 z_i − max z = 0 ≥ log beta（beta ≤ 1 ⇒ log beta ≤ 0）。
        - 整行全为 −inf 不在支持范围内（见模块文档）；此时 beta > 0 会得到全 False。
    """
    _check_beta(beta)
    _check_matrix(logits_target, "logits_target")
    if beta == 0:
        return torch.ones(logits_target.shape, dtype=torch.bool, device=logits_target.device)
    z = logits_target.float()
    shifted = z - z.amax(dim=-1, keepdim=True)  # (B, V)，= log p_i − max log p，argmax 处恰为 0
    return shifted >= math.log(beta)


def apply_plausibility(fused: Tensor, logits_target: Tensor, beta: float) -> Tensor:
    """把目标模型认为不可行的词从融合后的 logits 中剔除（置为 −inf）。

    参数：
        fused: 融合后的 logits，形状 (B, V)，例如 compute_steered_logits 的输出。
        logits_target: 目标模型 logits z_t，形状 (B, V)，用来计算可行性掩码（见 plausibility_mask）。
        beta: 阈值，[0, 1]；0 表示关闭约束。

    返回：
        形状 (B, V) 的 float32 新张量：可行处等于 fused（转为 float32），其余位置为 −inf。
        beta == 0 时与 fused.float() 逐位相同（仍是新张量，不与输入共享存储）。

    为什么 argmax 一定是目标可行的词：目标的 argmax 词总是可行；若 fused 在该处是有限值，
    该行就至少有一个有限值，而所有不可行位置都是 −inf，所以该行的 argmax 必落在可行词中。
    对 compute_steered_logits 的输出这一前提总成立（目标 argmax 处 z_t 有限，融合值只在上溢时才会非有限，
    那种行会被 guard_nonfinite 捕获）。

    不会引入 NaN：只做 where 选择，不做算术；fused 或 logits_target 中的 −inf 原样保留或替换为 −inf。
    """
    _check_pair(fused, logits_target, names="fused/logits_target")
    _check_beta(beta)  # 先校验再走 beta == 0 的捷径，保证 beta 非法时总是报错
    if beta == 0:
        # 显式复制而不是 fused.float()：float32 输入时 .float() 返回输入本身，会违反"总是返回新张量"。
        return fused.to(torch.float32, copy=True)
    mask = plausibility_mask(logits_target, beta)  # (B, V) bool
    return torch.where(mask, fused.float(), float("-inf"))


def fuse_with_alpha(zt: Tensor, ze: Tensor, zb: Tensor, alpha: Tensor,
                    plausibility_beta: float) -> tuple[Tensor, Tensor]:
    """已知逐行 α (B,) 时的融合规则（唯一的一处）：z_t + α·(z_e − z_b) → 可信度约束（β > 0 时）→ 非有限守卫。

    zt / ze / zb: (B, V)，任意精度；返回 (fused (B, V) float32, bad (B,) bool)，bad 行已退回 z_t。
    生成时 V 是整词表（fuse_step）；字母打分时 V = 4 个字母 token（scoring.letter_predictions）。
    """
    fused = compute_steered_logits(zt, ze, zb, alpha)
    if plausibility_beta > 0:
        fused = apply_plausibility(fused, zt, plausibility_beta)
    return guard_nonfinite(fused, zt)


def fuse_step(zt: Tensor, ze: Tensor, zb: Tensor, params: SteeringParams) -> tuple[Tensor, Tensor, Tensor]:
    """一步的融合，慢速循环与 FastDecoder（含编译图）共用这一处，保证两条路径规则相同。

    输入 (B, V) 的三路 logits；返回 (fused (B, V) float32, alpha (B,), bad (B,) bool)：
    α 按调度算出（schedule_alpha）→ fuse_with_alpha。默认参数（adaptive、β = 0）时与设计公式逐位相同。
    """
    alpha = schedule_alpha(zt, ze, params)
    fused, bad = fuse_with_alpha(zt, ze, zb, alpha, params.plausibility_beta)
    return fused, alpha, bad
