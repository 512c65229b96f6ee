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
温度 / top-p 采样见文件末尾一节：sampling_keys、counter_uniform、top_p_filter、sample_tokens，
随机数是 (seed, 题目 index, chain, step, token id) 的纯函数，与批的组成和设备无关。

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

import torch
import torch.nn.functional as F
from torch import Tensor

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
    "sampling_keys",
    "counter_uniform",
    "top_p_filter",
    "sample_tokens",
]

# 支持的距离度量；与 config.CHOICES["distance"] 保持一致（此处不 import config，保持本模块无依赖）。
METRICS: tuple[str, ...] = ("js", "l2")

# α 的调度方式（见 schedule_alpha）：
#   "constant"         —— α ≡ base_alpha，不看距离；
#   "adaptive"         —— 设计中的规则，α 随目标–专家距离增大（即 calculate_adaptive_alpha）；
#   "adaptive_inverse" —— 反向规则，α 随距离减小（专家与目标分歧越大，越少依赖专家）。
SCHEDULES: tuple[str, ...] = ("constant", "adaptive", "adaptive_inverse")

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
            f"{names} 必须是形状相同的 2-D 张量 (B, V)；实际得到 {tuple(a.shape)} 与 {tuple(b.shape)}"
        )


def _check_matrix(x: Tensor, name: str) -> None:
    """校验单个 logits 张量是 2-D (B, V)；否则抛出 ValueError 并写明实际形状（理由同 _check_pair）。"""
    if x.dim() != 2:
        raise ValueError(f"{name} 必须是 2-D 张量 (B, V)；实际得到 {tuple(x.shape)}")


def _check_metric(metric: str) -> None:
    """校验距离度量名称；非法时在消息中列出全部可选值。"""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} 非法；可选值：{', '.join(METRICS)}")


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
        raise ValueError(f"{name}={value!r} 必须是有限实数")


def _check_alpha_hyperparameters(base_alpha: float, adaptive_scale: float, max_boost: float, why: str) -> None:
    """校验 α 的三个超参数：都必须是有限实数，且 adaptive_scale、max_boost ≥ 0；why 写进错误消息，说明约束的理由。

    calculate_adaptive_alpha 与 schedule_alpha 共用这一份校验，保证同样的非法配置在两处给出同样的错误。
    """
    for name, value in (("base_alpha", base_alpha), ("adaptive_scale", adaptive_scale), ("max_boost", max_boost)):
        _check_finite_number(name, value)
    if adaptive_scale < 0 or max_boost < 0:
        raise ValueError(f"adaptive_scale={adaptive_scale!r} 与 max_boost={max_boost!r} 必须 ≥ 0（{why}）")


def calculate_adaptive_alpha(
    logits_target: Tensor,
    logits_expert: Tensor,
    base_alpha: float = 1.0,
    adaptive_scale: float = 10.0,
    max_boost: float = 1.0,
    metric: str = "js",
) -> Tensor:
    """逐行计算自适应引导强度 α = base_alpha + tanh(d · adaptive_scale) · max_boost。

    参数：
        logits_target, logits_expert: 形状 (B, V) 的 logits，任意浮点精度。
        base_alpha: 距离为 0 时的 α（目标与专家意见一致时的基础引导强度）。
        adaptive_scale: tanh 内的灵敏度，≥ 0。JS 通常只有 0.0x 量级，需要乘以 ~10 才能让 tanh 走出线性区。
        max_boost: α 的最大增量，≥ 0。
        metric: 距离度量，"js" 或 "l2"（见 distance）。

    返回：
        形状 (B,) 的 float32 张量，取值在 [base_alpha, base_alpha + max_boost] 内。

    为什么用 tanh：d ≥ 0 时 tanh(d · scale) ∈ [0, 1) 且单调不减，α 因此被限制在有界区间、
    并随分歧增大而平滑增大；要求 adaptive_scale、max_boost ≥ 0 正是为了保持这种单调性。
    d = 0（两分布完全相同）时 tanh(0) = 0，α 恰好等于 base_alpha。
    """
    d = distance(logits_target, logits_expert, metric=metric)  # (B,) float32
    return alpha_from_distance(d, "adaptive", base_alpha, adaptive_scale, max_boost)  # 同一公式只写一处


def schedule_alpha(
    logits_target: Tensor,
    logits_expert: Tensor,
    schedule: str = "adaptive",
    base_alpha: float = 1.0,
    adaptive_scale: float = 10.0,
    max_boost: float = 1.0,
    metric: str = "js",
) -> Tensor:
    """按调度方式 schedule 逐行给出引导强度 α，供 compute_steered_logits 使用。

    参数：
        logits_target, logits_expert: 形状 (B, V) 的 logits，任意浮点精度。
        schedule: SCHEDULES 之一：
            - "constant"：α = base_alpha（每行相同）。不计算距离、不读取专家 logits 的取值，
              因此与"固定 α"基线完全等价，也不为它付出 softmax 的开销。
            - "adaptive"：α = base_alpha + tanh(d · adaptive_scale) · max_boost，α 随距离单调不减。
              直接调用 calculate_adaptive_alpha，两者逐位相同（同一份实现，不会漂移）。
            - "adaptive_inverse"：α = base_alpha + (1 − tanh(d · adaptive_scale)) · max_boost，
              α 随距离单调不增：专家与目标分歧越大，越少依赖专家（用于检验"分歧大时专家更可信"
              这一设计假设的反面）。d = 0 时 α = base_alpha + max_boost；d → ∞ 时趋于 base_alpha。
              与 "adaptive" 逐行满足 α_adaptive + α_inverse = 2·base_alpha + max_boost（浮点误差内）。
        base_alpha, adaptive_scale, max_boost, metric: 含义与 calculate_adaptive_alpha 相同。

    返回：
        形状 (B,) 的 float32 张量；三种调度的取值都在 [base_alpha, base_alpha + max_boost] 内
        （"constant" 恰为 base_alpha）。

    校验：schedule、三个超参数（与 calculate_adaptive_alpha 相同的规则）、metric 与两个输入的形状
    对所有调度都做——即使 "constant" 用不到其中一部分，配置错误也应该立刻暴露，而不是换一种调度才出现。
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} 非法；可选值：{', '.join(SCHEDULES)}")
    why = "保证 α 随距离单调" + ("不增" if schedule == "adaptive_inverse" else "不减")
    _check_alpha_hyperparameters(base_alpha, adaptive_scale, max_boost, why=why)
    _check_metric(metric)
    _check_pair(logits_target, logits_expert)

    if schedule == "constant":
        # 不调用 distance：结果与专家 logits 的取值无关（即使其中含 NaN 也不影响）。
        return torch.full((logits_target.shape[0],), float(base_alpha), dtype=torch.float32, device=logits_target.device)
    if schedule == "adaptive":
        return calculate_adaptive_alpha(logits_target, logits_expert, base_alpha, adaptive_scale, max_boost, metric)
    d = distance(logits_target, logits_expert, metric=metric)  # (B,) float32
    return alpha_from_distance(d, schedule, base_alpha, adaptive_scale, max_boost)


def alpha_from_distance(d: Tensor, schedule: str = "adaptive", base_alpha: float = 1.0,
                        adaptive_scale: float = 10.0, max_boost: float = 1.0) -> Tensor:
    """已知距离 d（形状 (N,)，来自 distance()）时按调度算 α，形状 (N,) float32。

    为什么单独拿出来：字母打分的扫参（sweep）对每道题只需算一次距离，之后每个 (调度, α) 组合
    只是对 d 做逐元素运算——1,273 道题 × 几十个设置也只要几毫秒，不必保存整张 128k 词表的 logits。
    与 schedule_alpha 的公式逐位相同（"adaptive" 与 calculate_adaptive_alpha 同一表达式）。
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} 非法；可选值：{', '.join(SCHEDULES)}")
    why = "保证 α 随距离单调" + ("不增" if schedule == "adaptive_inverse" else "不减")
    _check_alpha_hyperparameters(base_alpha, adaptive_scale, max_boost, why=why)
    d = d.float()
    if schedule == "constant":
        return torch.full_like(d, float(base_alpha))
    if schedule == "adaptive":
        return base_alpha + torch.tanh(d * adaptive_scale) * max_boost
    # adaptive_inverse：tanh(·) ∈ [0, 1]（float32 下大参数时可恰为 1），故 1 − tanh ∈ [0, 1]，α 落在同一区间内。
    return base_alpha + (1.0 - torch.tanh(d * adaptive_scale)) * max_boost


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
                f"alpha 张量的形状必须是 ({batch},) 或 ({batch}, 1)；实际得到 {tuple(alpha.shape)}"
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
    bad = torch.isnan(f).any(-1) | torch.isposinf(f).any(-1) | ~torch.isfinite(f).any(-1)  # (B,)
    return torch.where(bad[:, None], fallback.float(), f), bad


def _check_beta(beta: float) -> None:
    """校验可行性阈值 beta：有限实数且在 [0, 1] 内（拒绝 bool / NaN / ±inf），否则抛出 ValueError。"""
    _check_finite_number("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} 必须在 [0, 1] 内（0 表示关闭可行性约束，1 表示只保留目标模型的最大概率词）")


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


# ---------------------------------------------------------------------------
# 可复现的采样：计数器式哈希（counter-based）随机数 + Gumbel-max + top-p
# ---------------------------------------------------------------------------
#
# 为什么不用 torch.Generator：它的随机流取决于"这一行是全批第几个元素、之前抽过多少次、在哪种设备上"，
# 于是同一道题换一个批、换一行、续跑或改批大小就会抽到不同的样本，CPU 与 CUDA 的流也不同。
# 这里的随机数是 (seed, 题目 index, chain, step, token id) 的纯函数：
#     key(b)  = murmur3_32([seed, chain, step, question_id]，各拆成低/高两个 32 位字)      —— sampling_keys
#     u(b, v) = murmur3_32([key(b), v]) 的高 23 位 → (0, 1) 内的均匀数                    —— counter_uniform
# 哈希只用整数的 & ^ | << >> 与乘法，因此 CPU、CUDA、eager 与 torch.compile 给出逐位相同的 u。
#
# 溢出约定：torch 的 int64 运算溢出时行为未定义（C++ 有符号溢出），所以所有中间值都保持在 2^63 以下：
# 32 位状态始终先 & 0xFFFFFFFF；乘以 32 位常数时把常数拆成高、低两个 16 位半（_mul32），
# 每个部分积 < 2^48。同一组函数也接受 Python int（无界整数，不会溢出），测试用它核对张量实现。

_M32: int = 0xFFFFFFFF
_MURMUR_C1: int = 0xCC9E2D51
_MURMUR_C2: int = 0x1B873593
_MURMUR_N: int = 0xE6546B64
_FMIX_C1: int = 0x85EBCA6B
_FMIX_C2: int = 0xC2B2AE35
_UNIFORM_BITS: int = 23  # 见 counter_uniform：23 位是 float32 能把 (m + ½)/2^bits 精确表示、且严格 < 1 的最大位数


def _mul32(x: Tensor | int, c: int) -> Tensor | int:
    """(x · c) mod 2^32，x ∈ [0, 2^32) 的 int64 张量或 Python int，c 为 32 位常数。

    为什么拆成 16 位半：x · c 可达 2^64，超出 int64；c = c_hi·2^16 + c_lo 时
    x·c ≡ x·c_lo + ((x·c_hi) mod 2^16)·2^16 (mod 2^32)，两个部分积都 < 2^48，和 < 2^49。
    """
    c_lo, c_hi = c & 0xFFFF, c >> 16
    return (x * c_lo + (((x * c_hi) & 0xFFFF) << 16)) & _M32


def _rotl32(x: Tensor | int, r: int) -> Tensor | int:
    """32 位循环左移，x ∈ [0, 2^32)，0 < r < 32；x << r < 2^63，不会溢出。"""
    return ((x << r) & _M32) | (x >> (32 - r))


def _murmur3_mix(h: Tensor | int, word: Tensor | int) -> Tensor | int:
    """MurmurHash3_x86_32 对一个 32 位块（小端字 word）的处理：先打散 word，再并入状态 h。"""
    k = _rotl32(_mul32(word & _M32, _MURMUR_C1), 15)
    k = _mul32(k, _MURMUR_C2)
    h = _rotl32(h ^ k, 13)
    return (h * 5 + _MURMUR_N) & _M32


def _murmur3_finish(h: Tensor | int, n_words: int) -> Tensor | int:
    """MurmurHash3_x86_32 的收尾：并入字节长度（4·n_words），再做 fmix32 雪崩。"""
    h = h ^ (4 * n_words)
    h = h ^ (h >> 16)
    h = _mul32(h, _FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _FMIX_C2)
    return h ^ (h >> 16)


def _murmur3_words(words: list[Tensor | int], seed: int = 0) -> Tensor | int:
    """对一串 32 位字（按小端字节拼接）计算 MurmurHash3_x86_32，与标准实现逐位相同（测试用已知向量核对）。

    words 可混合 Python int 与可相互广播的 int64 张量；全为 int 时返回 int。
    """
    h: Tensor | int = seed & _M32
    for w in words:
        h = _murmur3_mix(h, w)
    return _murmur3_finish(h, len(words))


def _split64(x: Tensor | int) -> tuple[Tensor | int, Tensor | int]:
    """把一个 64 位整数（int64 张量按补码，或 Python int）拆成 (低 32 位, 高 32 位)，都在 [0, 2^32)。

    对 int64 张量，>> 是算术右移，& 之后两半都非负；负数（例如填充行的 −1）因此也是合法、互不相同的输入。
    """
    return x & _M32, (x >> 32) & _M32


def _check_index(name: str, value: int) -> None:
    """校验 seed / chain / step 这类整数：非 bool 的 Python 整数，0 ≤ value < 2^63（能放进 int64）；编译追踪时跳过。"""
    if torch.compiler.is_compiling():
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**63:
        raise ValueError(f"{name}={value!r} 必须是 [0, 2^63) 内的整数")


def sampling_keys(seed: int, question_ids: Tensor, chain: int, step: Tensor | int) -> Tensor:
    """每行一个随机数种子（key），只由 (seed, 题目 index, chain, step) 决定。

    参数：
        seed: 全局种子，[0, 2^63) 内的 Python 整数。
        question_ids: 形状 (B,) 的整数张量，第 b 行所答题目在数据集中的 index（不是它在批中的行号）；
            取值 ≥ −1，−1 可用于填充行。实际上任意 int64 值都合法：按补码拆成两个 32 位字参与哈希，互不混淆。
        chain: 同一道题的第几条采样链（多数投票的多条链各用一个 chain），[0, 2^63) 内的整数。
        step: 解码步数，Python 整数或 0-d 整数张量（编译/CUDA graph 的解码步里 step 是张量：
            这里不调用 .item()，整个计算留在设备上、不产生同步）。

    返回：
        形状 (B,) 的 int64 张量，取值在 [0, 2^32)，位于 question_ids.device。
        key = MurmurHash3_x86_32([seed_lo, seed_hi, chain_lo, chain_hi, step_lo, step_hi, q_lo, q_hi], 0)。

    为什么用题目 index 而不是批内行号：这样一道题的样本与它落在哪个批、哪一行、批有多大都无关，
    续跑、改批大小或多进程分片都抽到同一条链。4 个字段各占两个完整的 32 位字，
    不同的 (seed, chain, step, question_id) 组合因此是哈希的不同输入（只有 2^-32 量级的哈希碰撞）。
    step 为 Python int 与为同值的 0-d 张量时结果逐位相同。
    """
    _check_index("seed", seed)
    _check_index("chain", chain)
    if question_ids.dim() != 1 or question_ids.dtype.is_floating_point or question_ids.dtype.is_complex \
            or question_ids.dtype == torch.bool:
        raise ValueError(
            f"question_ids 必须是 1-D 整数张量 (B,)；实际得到形状 {tuple(question_ids.shape)}、dtype {question_ids.dtype}"
        )
    if isinstance(step, Tensor):
        if step.dim() != 0 or step.dtype.is_floating_point or step.dtype.is_complex or step.dtype == torch.bool:
            raise ValueError(f"step 张量必须是 0-d 整数张量；实际得到形状 {tuple(step.shape)}、dtype {step.dtype}")
        step = step.to(device=question_ids.device, dtype=torch.int64)
    else:
        _check_index("step", step)
    q = question_ids.to(torch.int64)
    words: list[Tensor | int] = [*_split64(seed), *_split64(chain), *_split64(step), *_split64(q)]
    h = _murmur3_words(words)
    # 各字段的哈希状态在 q 之前可能仍是 Python int 或 0-d 张量；q 总是张量，所以 h 已是 (B,) 张量。
    return h  # type: ignore[return-value]


def counter_uniform(keys: Tensor, vocab: int) -> Tensor:
    """由每行的 key 生成整行词表的均匀随机数：u[b, v] 只取决于 (keys[b], v)。

    参数：
        keys: 形状 (B,) 的整数张量（sampling_keys 的输出）；只用低 32 位。
        vocab: 词表大小 V ≥ 1。

    返回：
        形状 (B, V) 的 float32 张量，位于 keys.device，取值严格在 (0, 1) 内：
        u = (m + ½) / 2^23，m = murmur3_32([key, v], 0) >> 9 ∈ [0, 2^23)。

    为什么是 23 位而不是 24 位：float32 有 24 位有效数字；m + ½ 需要 (m 的位数 + 1) 位，
    m < 2^23 时它与除以 2^23 都是精确的，最大值 1 − 2^-24 < 1，最小值 2^-24 > 0。
    若取 24 位，m = 2^24 − 1 时 (m + ½)/2^24 = 1 − 2^-25 会被舍入成 1.0，Gumbel 变换 −log(−log u) 得到 +inf。
    因为每个值都是精确计算出的二进制小数，CPU 与 CUDA（以及 torch.compile）上的 u 逐位相同。

    为什么 token 部分单独算：murmur3 对第二个字 v 的打散只依赖 v，先在 (V,) 上算好再与 (B, 1) 的状态合并，
    (B, V) 上只剩合并与收尾的十几次逐元素整数运算。
    """
    if keys.dim() != 1 or keys.dtype.is_floating_point or keys.dtype.is_complex or keys.dtype == torch.bool:
        raise ValueError(f"keys 必须是 1-D 整数张量 (B,)；实际得到形状 {tuple(keys.shape)}、dtype {keys.dtype}")
    if not torch.compiler.is_compiling():
        if isinstance(vocab, bool) or not isinstance(vocab, numbers.Integral) or vocab < 1:
            raise ValueError(f"vocab={vocab!r} 必须是 ≥ 1 的整数")
    h = _murmur3_mix(0, keys.to(torch.int64) & _M32)  # (B,)：第一个字（key）并入种子 0 的状态
    tok = torch.arange(vocab, dtype=torch.int64, device=keys.device)  # (V,)
    k = _mul32(_rotl32(_mul32(tok, _MURMUR_C1), 15), _MURMUR_C2)  # (V,)：第二个字（token id）的打散
    h = _rotl32(h[:, None] ^ k[None, :], 13)  # (B, V)
    h = (h * 5 + _MURMUR_N) & _M32
    h = _murmur3_finish(h, 2)  # 与 _murmur3_words([key, v]) 逐位相同（测试核对）
    m = (h >> (32 - _UNIFORM_BITS)).to(torch.float32)  # type: ignore[operator]
    return (m + 0.5) * (2.0 ** -_UNIFORM_BITS)


def _check_top_p(top_p: float) -> None:
    """校验 top_p：有限实数且在 (0, 1] 内（拒绝 bool / NaN / ±inf），否则抛出 ValueError。"""
    _check_finite_number("top_p", top_p)
    if not torch.compiler.is_compiling() and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} 必须在 (0, 1] 内（1 表示不做 nucleus 截断）")


def _check_temperature(temperature: float) -> None:
    """校验采样温度：有限实数且 > 0；0 / 负数 / NaN 的错误消息说明贪心应由调用方用 argmax 处理。"""
    if torch.compiler.is_compiling():
        return
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(
            f"temperature={temperature!r} 必须是 > 0 的有限实数；贪心解码（temperature = 0）"
            "不经过 sample_tokens，由调用方直接对 logits 取 argmax"
        )


_SCAN_BLOCK: int = 1024


def _blocked_cumsum(x: Tensor, block: int = _SCAN_BLOCK) -> Tensor:
    """沿最后一维的累加和，形状 (B, V) → (B, V)；V > block 时分两级计算：块内累加 + 块间偏移。

    为什么不直接 x.cumsum(-1)：torch.compile（inductor，GPU）在扫描维很长（V ≈ 6 万以上，例如 128k 的词表）
    时会把 cumsum 拆成 SplitScan，torch 2.11 的 Triton 代码生成在这里崩溃（InductorError:
    "list indices must be integers or slices, not NoneType"，H100 上实测）。两级扫描的每一级都不超过
    block（V ≤ block² 时），不会触发拆分；eager 下多两次小的 pad/reshape，开销可以忽略。
    浮点上只是换了加法的结合顺序（块内、块间各自顺序累加），误差与直接 cumsum 同量级。
    """
    batch, vocab = x.shape
    if vocab <= block:
        return x.cumsum(dim=-1)
    n_blocks = -(-vocab // block)
    xb = F.pad(x, (0, n_blocks * block - vocab)).reshape(batch, n_blocks, block)  # 补 0，不改变累加和
    inner = xb.cumsum(dim=-1)  # (B, n_blocks, block)：块内累加
    offsets = F.pad(inner[..., -1].cumsum(dim=-1)[:, :-1], (1, 0))  # (B, n_blocks)：每块之前所有块的总和
    return (inner + offsets[..., None]).reshape(batch, n_blocks * block)[:, :vocab]


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """nucleus（top-p）截断：只保留概率最高、累计概率刚达到 top_p 的那些词，其余置为 −inf。

    参数：
        logits: 形状 (B, V) 的 logits，任意浮点精度；可含 −inf（例如可行性约束屏蔽的词）。
            每行至少要有一个有限值（见模块文档）。
        top_p: (0, 1] 内的概率质量。

    返回：
        形状 (B, V) 的 float32 新张量：nucleus 内等于 logits（转为 float32），其余为 −inf。

    规则（p = softmax(logits)，在 float32 下计算）：
        - 把一行按 logit 降序排列，k 是使前 k 个词的概率和 ≥ top_p 的最小个数
          （即第 i 个词被保留当且仅当排在它前面的词的概率和 < top_p）；阈值 τ = 第 k 大的 logit。
        - 保留所有 logit ≥ τ 的词。边界上的并列：与第 k 个词 logit 相等的词全部保留，
          所以 nucleus 可能比最小集合多出这些并列词。理由：排序对并列值的顺序是任意的（依赖实现与设备），
          按取值而非按位置截断，结果只取决于 logit 的值，与词表顺序、排序稳定性无关。
        - argmax 总被保留（k ≥ 1）；已经是 −inf 的词概率为 0，排在最后，永远不会进入 nucleus，输出仍为 −inf。
        - top_p == 1：直接返回 float32 副本，保留每个有限值的词。不走累加和比较的路径，因为 float32
          累加和可能在最后几个极小概率的词之前就舍入到 1.0，把它们错误地截掉。
        - 累加和因舍入始终 < top_p 时（top_p 极接近 1），k 会延伸到概率为 0 的词；它们的值保持原样
          （有限的极小概率词被保留，−inf 仍是 −inf），不会出错。
        - 边界由 float32 的 softmax 与累加和决定：累计概率与 top_p 相差在舍入误差（~1e-6）以内的词，
          eager 与 torch.compile（融合后的求和顺序不同）可能一边保留、一边截掉。这只影响概率极小的边界词
          （H100 上 V = 6 万、近均匀的随机 logits 可见；抽到的 token 在实测中相同）。
    """
    _check_matrix(logits, "logits")
    _check_top_p(top_p)
    z = logits.to(torch.float32, copy=True)  # 显式复制：float32 输入时 .float() 会返回输入本身
    if top_p >= 1.0:
        return z
    sorted_z = z.sort(dim=-1, descending=True).values  # (B, V)，−inf 排在最后
    cum = _blocked_cumsum(torch.softmax(sorted_z, dim=-1))  # (B, V) 累计概率
    # 第 0 个词总保留；第 i ≥ 1 个词保留当且仅当 cum[i − 1] < top_p。cum 单调不减，保留的是一个前缀，
    # 计数即其长度（即使并行扫描的舍入让 cum 在某处差一个 ulp 不单调，按取值截断的结果仍是合法的阈值集合）。
    k = 1 + (cum[:, :-1] < top_p).sum(dim=-1, keepdim=True)  # (B, 1) int64，1 ≤ k ≤ V
    tau = sorted_z.gather(-1, k - 1)  # (B, 1)，第 k 大的 logit
    return torch.where(z >= tau, z, float("-inf"))


def sample_tokens(logits: Tensor, keys: Tensor, temperature: float, top_p: float = 1.0) -> Tensor:
    """按 softmax(logits / temperature) 在 top-p nucleus 内重新归一化后的分布，为每行抽一个 token。

    参数：
        logits: 形状 (B, V) 的 logits，任意浮点精度；可含 −inf（这些词永远不会被抽到）。
        keys: 形状 (B,) 的整数张量，每行的随机数种子（sampling_keys 的输出）。
        temperature: > 0 的有限实数。贪心（temperature = 0）不在这里处理：调用方直接取 argmax。
        top_p: (0, 1] 内的 nucleus 概率质量；1 表示不截断。

    返回：
        形状 (B,) 的 int64 张量。第 b 行的结果只取决于 (logits[b], keys[b], temperature, top_p)：
        与批中其他行、行的位置、批大小都无关。

    方法（Gumbel-max）：token = argmax_v (z_v + g_v)，z = top_p_filter(logits / T)，g_v = −log(−log u_v)，
    u = counter_uniform(keys, V)。独立的标准 Gumbel 噪声下，argmax 恰好服从 softmax(z)，
    而 nucleus 外的 z 为 −inf，所以恰好是 nucleus 内重新归一化的分布——不需要重新归一化，也不需要逐行抽样的循环。
    先做温度、再在温度缩放后的分布上取 nucleus（与 Hugging Face 的处理顺序相同）。

    实现要点：
        - 先减去每行最大值再除以 T：分布不变，但所有值 ≤ 0，T 很小时也只会下溢成 −inf 而不会上溢成 +inf
          （+inf 会让 softmax 出现 NaN）；最大值处恰为 0，argmax 永远有限。
        - u 严格在 (0, 1) 内，g 有限（约在 [−2.8, 16.7]），−inf + g = −inf，不会产生 NaN。
        - u 在各设备上逐位相同；log 在不同后端可能差 1 ulp，所以只有两词的 z + g 几乎并列时
          CPU 与 CUDA 才可能抽到不同的词。argmax 的精确并列取最小的 token id。
    """
    _check_matrix(logits, "logits")
    if keys.shape != (logits.shape[0],):
        raise ValueError(f"keys 的形状必须是 ({logits.shape[0]},)（与 logits 的行数相同）；实际得到 {tuple(keys.shape)}")
    _check_temperature(temperature)
    _check_top_p(top_p)
    z = logits.float()
    z = (z - z.amax(dim=-1, keepdim=True)) / temperature  # (B, V)，≤ 0，新张量（输入不被修改）
    if top_p < 1.0:
        z = top_p_filter(z, top_p)
    u = counter_uniform(keys, z.shape[-1])  # (B, V)
    gumbel = -torch.log(-torch.log(u))
    return (z + gumbel).argmax(dim=-1)
