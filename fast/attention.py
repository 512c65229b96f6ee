"""叠加前向的单 token 解码注意力：Triton kernel（只读到本步槽位，打包 GQA）及其适用条件。

只在快速路径用到 attention="triton" 时才导入 triton、定义 kernel（load_triton_attention）。
"""
from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any, Callable, Final

import torch

# ---------------------------------------------------------------------------------------------------------------
# 解码注意力：SDPA（cuDNN）或 Triton kernel
# ---------------------------------------------------------------------------------------------------------------
# 为什么自己写一个：cuDNN 的 SDPA 在 head_dim 64 上远未用满显存带宽，而且每步读满整个静态缓存 L
# （未写的槽位靠 mask 屏蔽，字节照读）。这个 kernel：
# - 只读到本步槽位 slot 为止（循环上界来自设备上的 slot 张量，CUDA graph 不必按长度重录）；
# - 打包 GQA：一个程序处理一个 (行, KV 头)，共享该 KV 头的 G 个查询头一起算（K/V 只读一次，不复制）；
# - 行 × KV 头不够填满 GPU 时把序列切成 n_split 段并行，再用第二个小 kernel 合并（flash-decoding）。
# 单独的 kernel 用 benchmarks/micro_attn.py 测，整步用 bench.py --attention sdpa,triton 比较（docs/HISTORY.md）。
ATTENTION_MODES: Final[tuple[str, ...]] = ("sdpa", "triton")

# 每个 head_dim 的块配置 (BLOCK_N, num_warps, num_stages)：在 GPU 上用 benchmarks/micro_attn.py 选出。
TRITON_ATTENTION_CONFIG: Final[dict[int, tuple[int, int, int]]] = {64: (128, 4, 2), 128: (64, 4, 2)}


def triton_available() -> bool:
    """本环境能否用 Triton kernel（只查能否导入，不导入：CPU 环境通常没有 triton）。"""
    return importlib.util.find_spec("triton") is not None


def head_dim_of(config: Any) -> int:
    """模型配置的每头维度：显式的 head_dim（Llama-3.2-1B 为 64），没有时 hidden_size / 头数（transformers 的规则）。"""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def triton_attention_supports(head_dim: int) -> bool:
    """kernel 能否处理这个 head_dim：tl.arange 要 2 的幂，tl.dot 的内维至少 16（Llama 3 的 64 / 128 都可以）。"""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def triton_attention_problem(head_dim: int) -> str | None:
    """这个 head_dim 的模型能否用 Triton 解码注意力：能则 None，否则一句原因。
    StackedLlama（显式 attention="triton"）与 evaluator.resolve_attention（auto 的选择、提前报错）共用这一处。"""
    if not triton_available():
        return "needs the triton package (bundled with the CUDA build of torch)"
    if not triton_attention_supports(head_dim):
        return f"head_dim={head_dim} is not supported (it must be a power of 2, >= 16)"
    return None


def split_count(programs: int, blocks: int, sms: int) -> int:
    """序列切几段：让 程序数 × 段数 ≥ 2 × SM 数（每个 SM 至少两个程序，隐藏访存延迟），但不超过块数。

    programs = 行数 × KV 头数；blocks = ⌈L / BLOCK_N⌉。批 64 时 1B 对有 1024 个程序，不切（省掉合并 kernel）；
    批 1 时 8B 只有 8 个程序，切成最多 L / BLOCK_N 段。"""
    return max(1, min(blocks, -(-2 * sms // programs)))


@functools.cache
def load_triton_attention() -> Callable[..., torch.Tensor]:
    """导入 triton、定义 kernel、注册 torch.library 算子 steer::decode_attention 并返回它（只做一次）。

    延迟到这里是因为 CPU 环境可以没有 triton（CI 为了测试装了它：tests/conftest.py 在导入 triton 之前设
    TRITON_INTERPRET=1，kernel 由解释器在 CPU 张量上执行）。必须在编译区域之外调用（StackedLlama 构造时）：
    dynamo 追踪不了 kernel 的定义。
    按 fast.TRITON_OPS 注册成不透明的 custom_op（默认）或 triton_op（TRITON_OPS_NOTE）：torch.compile 都不断图，
    CUDA graph 都能录制它。
    """
    import triton
    import triton.language as tl
    from fast import kernel_op

    @triton.jit
    def decode_attention_split(Q, K, V, MASK, SLOT, PART, STATS, OUT,
                               q_r, q_h, q_g, k_r, k_h, k_s, v_r, v_h, v_s, m_r, o_r, o_h, o_g,
                               H_KV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                               BLOCK_N: tl.constexpr, N_SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                               QK_SCALE: tl.constexpr, T: tl.constexpr):
        # 程序 (rh, split)：行 r = rh // H_KV 的第 h 个 KV 头，序列的第 split 段。查询块 (BLOCK_G, D)：G 个查询
        # （解码：G = 共享 KV 头的查询头数；验证：G = 查询头数 × T，第 g 个查询是位置 g % T）补零到 BLOCK_G ≥ 16 行
        # （tl.dot 的最小尺寸；多出的行不写回）。位置 i 的查询只看槽位 ≤ slot + i 的键（块内因果；T = 1 即解码）。
        # 分数在 log2 域（QK_SCALE 含 log2 e）。
        # QK_SCALE 是编译期常量：作为普通浮点参数时 Inductor 按 float64 传入，分数会被提升成 float64。
        rh = tl.program_id(0)
        split = tl.program_id(1)
        r = rh // H_KV
        h = rh % H_KV
        first = tl.load(SLOT).to(tl.int32)
        end = first + T  # 只看槽位 < end 的键：本轮的 T 个 token 写在 slot..slot+T−1，之后的槽位还没写
        chunk = tl.cdiv(tl.cdiv(end, N_SPLIT), BLOCK_N) * BLOCK_N  # 按已写长度均分，各段整块对齐
        lo = split * chunk
        hi = tl.minimum(lo + chunk, end)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        n = tl.arange(0, BLOCK_N)
        last = first + g % T  # (BLOCK_G,)：每个查询能看到的最后一个槽位
        q = tl.load(Q + r * q_r + h * q_h + g[:, None] * q_g + d[None, :], mask=g[:, None] < G, other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            pos = start + n
            inside = pos < hi
            keep = inside & (tl.load(MASK + r * m_r + pos, mask=inside, other=0) != 0)  # 左填充位置 mask = 0
            k = tl.load(K + r * k_r + h * k_h + pos[:, None] * k_s + d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(V + r * v_r + h * v_h + pos[:, None] * v_s + d[None, :], mask=inside[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * QK_SCALE  # (BLOCK_G, BLOCK_N)
            if T == 1:
                s = tl.where(keep[None, :], s, float("-inf"))
            else:
                s = tl.where(keep[None, :] & (pos[None, :] <= last[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # 到目前为止全被屏蔽的行 m_new = −inf：用 0 代替做减数，exp2(−inf) = 0，避免 (−inf) − (−inf) = NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            corr = tl.exp2(m_i - m_safe)
            l_i = l_i * corr + tl.sum(p, 1)
            acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        if N_SPLIT == 1:
            out = acc / l_i[:, None]
            tl.store(OUT + r * o_r + h * o_h + g[:, None] * o_g + d[None, :], out.to(OUT.dtype.element_ty),
                     mask=g[:, None] < G)
        else:
            # 未归一化的部分和与 (m, l) 留给 decode_attention_combine：
            # PART (RH, N_SPLIT, BLOCK_G, D)，STATS (RH, N_SPLIT, 2, BLOCK_G)
            part = rh * N_SPLIT + split
            tl.store(PART + part * BLOCK_G * D + g[:, None] * D + d[None, :], acc)
            tl.store(STATS + part * 2 * BLOCK_G + g, m_i)
            tl.store(STATS + part * 2 * BLOCK_G + BLOCK_G + g, l_i)

    @triton.jit
    def decode_attention_combine(PART, STATS, OUT, o_r, o_h, o_g, H_KV: tl.constexpr, G: tl.constexpr,
                                 D: tl.constexpr, BLOCK_G: tl.constexpr, N_SPLIT: tl.constexpr):
        # 合并各段：out = Σ_s 2^(m_s − M) · acc_s / Σ_s 2^(m_s − M) · l_s，M = max_s m_s（空段 m = −inf，权重 0）
        rh = tl.program_id(0)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        m_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
        for s in tl.static_range(N_SPLIT):
            m_max = tl.maximum(m_max, tl.load(STATS + (rh * N_SPLIT + s) * 2 * BLOCK_G + g))
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for s in tl.static_range(N_SPLIT):
            part = rh * N_SPLIT + s
            w = tl.exp2(tl.load(STATS + part * 2 * BLOCK_G + g) - m_safe)
            total += w * tl.load(STATS + part * 2 * BLOCK_G + BLOCK_G + g)
            acc += w[:, None] * tl.load(PART + part * BLOCK_G * D + g[:, None] * D + d[None, :])
        r = rh // H_KV
        h = rh % H_KV
        tl.store(OUT + r * o_r + h * o_h + g[:, None] * o_g + d[None, :], (acc / total[:, None]).to(
            OUT.dtype.element_ty), mask=g[:, None] < G)

    def decode_attention_fake(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                              slot: torch.Tensor, scale: float, n_split: int, block_n: int, num_warps: int,
                              num_stages: int, t: int) -> torch.Tensor:
        """编译追踪时的形状：与 q 同形状、同精度的连续张量（本体的输出）。"""
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    register, launch = kernel_op("steer::decode_attention", decode_attention_fake)

    @register
    def decode_attention_op(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                            slot: torch.Tensor, scale: float, n_split: int, block_n: int, num_warps: int,
                            num_stages: int, t: int) -> torch.Tensor:
        """算子本体（参数见 triton_decode_attention，它先核对形状）：分配输出 (R, H_kv, G, D)，
        切段时另分配部分和 (R·H_kv, n_split, BLOCK_G, D) 与 (m, l) (R·H_kv, n_split, 2, BLOCK_G)，均为 float32。"""
        rows, kv_heads, groups, dim = q.shape
        block_g = max(16, triton.next_power_of_2(groups))
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if n_split > 1:
            part = torch.empty((rows * kv_heads, n_split, block_g, dim), dtype=torch.float32, device=q.device)
            stats = torch.empty((rows * kv_heads, n_split, 2, block_g), dtype=torch.float32, device=q.device)
        else:
            part = stats = out  # 不切段时不用：kernel 直接写 out
        precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 时精确相乘（不用 TF32），逐 token 测试要它
        launch(decode_attention_split)[(rows * kv_heads, n_split)](
            q, keys, values, mask, slot, part, stats, out,
            q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2), mask.stride(0),
            out.stride(0), out.stride(1), out.stride(2),
            H_KV=kv_heads, G=groups, D=dim, BLOCK_G=block_g, BLOCK_N=block_n, N_SPLIT=n_split, PRECISION=precision,
            QK_SCALE=scale * math.log2(math.e), T=t,
            num_warps=num_warps, num_stages=num_stages)
        if n_split > 1:
            launch(decode_attention_combine)[(rows * kv_heads,)](
                part, stats, out, out.stride(0), out.stride(1), out.stride(2),
                H_KV=kv_heads, G=groups, D=dim, BLOCK_G=block_g, N_SPLIT=n_split, num_warps=4)
        return out

    return decode_attention_op


def triton_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                            slot: torch.Tensor, scale: float, n_split: int | None = None, t: int = 1) -> torch.Tensor:
    """单 token 解码的打包 GQA 注意力（Triton，只读到 slot 为止）。q (R, H_kv, G, D)：第 h 个 KV 头下的 G 个查询头；
    keys/values (R, H_kv, L, D) 静态缓存；mask (R, L) 1 = 非左填充；slot (1,) 本 token 的槽位（已写入缓存）。
    可见 = mask ∧ 槽位 ≤ slot，与 StackedLlama 的 SDPA 路径相同。返回 (R, H_kv, G, D)，q 的精度。

    t > 1：投机解码的验证（StackedLlama.verify），一次 t 个位置写在 slot..slot+t−1；q 的第 g 个查询是位置 g % t
    （打包顺序：查询头 r、位置 i → r·t + i），它只看 mask ∧ 槽位 ≤ slot + i。只读到 slot + t − 1 为止：
    cuDNN 的 SDPA 要读满整个静态缓存（验证时它是每轮注意力时间的大头）。

    n_split None = split_count 按 GPU 的 SM 数选；测试用它强制走“切段 + 合并”。先调用 load_triton_attention()。
    kernel 按步长寻址，只要求每个张量的最后一维连续；形状不符时报错（在编译追踪时就会报出，不会算出错的数）。
    """
    rows, kv_heads, groups, dim = q.shape
    if keys.shape != values.shape or keys.shape[:2] != (rows, kv_heads) or keys.shape[3] != dim:
        raise ValueError(f"K/V shapes {tuple(keys.shape)} / {tuple(values.shape)} do not match q {tuple(q.shape)}: "
                         "they must be (R, H_kv, L, D)")
    if mask.shape != (rows, keys.shape[2]) or slot.shape != (1,):
        raise ValueError(f"mask must be (R, L) = ({rows}, {keys.shape[2]}) and slot (1,); "
                         f"got {tuple(mask.shape)} and {tuple(slot.shape)}")
    if t < 1 or groups % t:
        raise ValueError(f"t = {t} positions must divide the {groups} packed queries per KV head")
    if not triton_attention_supports(dim) or any(x.stride(-1) != 1 for x in (q, keys, values)):
        raise ValueError(f"Triton decode attention needs head_dim a power of 2 >= 16 and a contiguous last dimension (head_dim={dim}); "
                         "use attention='sdpa'")
    block_n, warps, stages = TRITON_ATTENTION_CONFIG.get(q.shape[-1], (64, 4, 2))
    if n_split is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        n_split = split_count(q.shape[0] * q.shape[1], -(-keys.shape[2] // block_n), sms)
    # 经 torch.ops 调用（而不是调用 load_triton_attention()）：编译区域里 dynamo 只看到一个已注册的算子
    return torch.ops.steer.decode_attention(q, keys, values, mask, slot, scale, n_split, block_n, warps, stages, t)
