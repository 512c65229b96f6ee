"""可复现的采样：计数器式哈希随机数（murmur3）、top-p 过滤、Gumbel-max 抽样，以及解码循环的选词 pick_tokens。

随机数是 (seed, 题目 index, chain, step, token id) 的纯函数，与批的组成和设备无关；
贪心（sampling=None）时 pick_tokens 就是 argmax。慢速循环与 FastDecoder 共用 pick_tokens。
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from steering_utils import _check_finite_number, _check_matrix

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
        raise ValueError(f"{name}={value!r} must be an integer in [0, 2^63)")


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
            f"question_ids must be a 1-D integer tensor (B,); got shape {tuple(question_ids.shape)}, dtype {question_ids.dtype}"
        )
    if isinstance(step, Tensor):
        if step.dim() != 0 or step.dtype.is_floating_point or step.dtype.is_complex or step.dtype == torch.bool:
            raise ValueError(f"the step tensor must be a 0-d integer tensor; got shape {tuple(step.shape)}, dtype {step.dtype}")
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
        raise ValueError(f"keys must be a 1-D integer tensor (B,); got shape {tuple(keys.shape)}, dtype {keys.dtype}")
    if not torch.compiler.is_compiling():
        if isinstance(vocab, bool) or not isinstance(vocab, numbers.Integral) or vocab < 1:
            raise ValueError(f"vocab={vocab!r} must be an integer >= 1")
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
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 = no nucleus truncation)")


def _check_temperature(temperature: float) -> None:
    """校验采样温度：有限实数且 > 0；0 / 负数 / NaN 的错误消息说明贪心应由调用方用 argmax 处理。"""
    if torch.compiler.is_compiling():
        return
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(
            f"temperature={temperature!r} must be a finite number > 0; greedy decoding (temperature = 0) "
            "does not go through sample_tokens: the caller takes the argmax of the logits"
        )


_SCAN_BLOCK: int = 1024


def _blocked_cumsum(x: Tensor, block: int = _SCAN_BLOCK) -> Tensor:
    """沿最后一维的累加和，形状 (B, V) → (B, V)；V > block 时分两级计算：块内累加 + 块间偏移。

    为什么不直接 x.cumsum(-1)：torch.compile（inductor，GPU）在扫描维很长（V ≈ 6 万以上，例如 128k 的词表）
    时会把 cumsum 拆成 SplitScan，torch 2.11 的 Triton 代码生成在这里崩溃（InductorError:
    "list indices must be integers or slices, not NoneType"）。两级扫描的每一级都不超过
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
          （V 很大、近均匀的随机 logits 上可见；抽到的 token 相同）。
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
        raise ValueError(f"keys must have shape ({logits.shape[0]},) (the number of rows of logits); got {tuple(keys.shape)}")
    _check_temperature(temperature)
    _check_top_p(top_p)
    z = logits.float()
    z = (z - z.amax(dim=-1, keepdim=True)) / temperature  # (B, V)，≤ 0，新张量（输入不被修改）
    if top_p < 1.0:
        z = top_p_filter(z, top_p)
    u = counter_uniform(keys, z.shape[-1])  # (B, V)
    gumbel = -torch.log(-torch.log(u))
    return (z + gumbel).argmax(dim=-1)


@dataclass(frozen=True)
class Sampling:
    """一条采样链的参数（None 表示贪心）。随机数只由 (seed, 题目 index, chain, 步数, token id) 决定
    （sampling_keys / counter_uniform）：同一道题不论落在哪个批、哪一行，抽到的样本都相同，
    续跑、改批大小、多进程分片都不改变结果。temperature > 0；top_p ∈ (0, 1]；chain 区分同一题的多条投票链。"""

    temperature: float
    top_p: float
    seed: int
    chain: int = 0


def pick_tokens(fused: Tensor, sampling: Sampling | None, question_ids: Tensor, step: Tensor | int) -> Tensor:
    """从 (B, V) 的融合 logits 选出下一个 token (B,)：贪心取 argmax；采样时按温度与 top-p 抽样
    （Gumbel-max，噪声由题目 index 与步数决定，见 Sampling）。question_ids: (B,) int64；step: 标量或 0 维张量。
    慢速循环与 FastDecoder 的编译步共用这一处，两条路径的选词规则因此相同。"""
    if sampling is None:
        return fused.argmax(-1)
    keys = sampling_keys(sampling.seed, question_ids, sampling.chain, step)
    return sample_tokens(fused, keys, sampling.temperature, sampling.top_p)
