"""快速解码引擎（与研究代码隔开）：FastDecoder 与它的解码步（decoder.py）、叠加前向 StackedLlama（stacked.py）、
Triton 解码注意力（attention.py）。

只在快速路径被使用时才导入（evaluator.run_arm 在函数内部导入；bench.py 直接导入）；
慢速参考循环、打分与统计都不依赖这里。FastDecoder 对共享模型的改动只在 generate() 之内，返回前恢复。
"""
from __future__ import annotations

from typing import Any, Callable

# TRITON_OPS_NOTE：我们的 Triton kernel（fast/nf4.py 的矩阵乘、fast/attention.py 的解码注意力）以哪种 torch.library
# 算子进入 torch.compile。在第一次加载 kernel（load_nf4_kernels / load_triton_attention）之前设，之后不再读。
# - "opaque"（默认）：custom_op + register_fake。dynamo 与 inductor 只看到一个不透明的算子（形状由 fake 函数给出），
#   不分析 kernel；CUDA graph 照样录下算子里发射的 kernel。
# - "traced"：triton_op + wrap_triton（4fb66e2 及以前的做法）：inductor 看进 kernel。
# 为什么默认 opaque：traced 时 torch 为图里的每一次 kernel 调用把 kernel 编译成 TTIR 再遍历，找出它写哪些参数
# （functionalization 与 inductor 的 lowering 各自重做一遍；pytorch PR #193227 在一个模型上量到每次约 90 ms）。
# NF4 的引导步每步约 400 次 kernel 调用（48 层 × 4 个投影，split-K 时再加求和），d48920c / 49198b8 的 NF4 预热
# 比 bf16 多 75–145 s，与这个量级相符；inductor 看进 kernel 对我们没有用处（它不融合进自定义 kernel 的结果）。
# H200 上（ff2a723，BENCHMARKS.md）NF4 预热比 bf16 多出的时间从 75–145 s 降到 3–26 s，步时不变；那次没有在同样的
# 编译缓存条件下单独对比两种注册（traced 的一行跑在缓存已热之后）。bench.py --triton-ops traced 保留旧路径。
TRITON_OPS_MODES: tuple[str, ...] = ("opaque", "traced")
TRITON_OPS: str = "opaque"
# SPLIT_SUM_NOTE：NF4 矩阵乘切 K（split_k > 1）时，各段的 float32 部分和 (split_k, S, M, N) 由谁相加。
# - "kernel"（默认）：算子里再发一个 nf4_split_sum kernel，按 p = 0, 1, … 的固定顺序相加，转成 x 的精度。
# - "graph"：只在 torch.compile 的区域里生效——算子直接返回部分和，相加（part.sum(0).to(x 的精度)）写在图里，
#   inductor 可以把它并进下一个 kernel（残差加、RMSNorm、SiLU·乘、RoPE；段数 ≤ 8 时求和被展开成逐元素运算）。
#   eager 调用（调优计时、不编译的路径）仍用 kernel。相加的顺序由 inductor 定（确定，但不一定与 kernel 相同）。
# 为什么：ff2a723 的 H200 剖析（BENCHMARKS.md）里批 16 引导一步有 192 次 nf4_split_sum、共 1.26 ms（每次约 6.5 µs，
# 多半是一个小 kernel 的启动与收尾），占 kernel 时间的 12.5%。还没有在 GPU 上量过，所以默认不变；
# bench.py --split-sum graph 给下一次 GPU 会话对比。在第一次编译之前设。
SPLIT_SUM_MODES: tuple[str, ...] = ("kernel", "graph")
SPLIT_SUM: str = "kernel"


def kernel_op(name: str, fake: Callable[..., Any]) -> tuple[Callable[[Callable[..., Any]], Any], Callable[[Any], Any]]:
    """按 TRITON_OPS 返回 (注册算子的装饰器, 发射包装)：算子本体里用 launch(kernel)[grid](...) 发射 kernel。

    opaque：装饰器 = torch.library.custom_op(name, mutates_args=())，再用 fake（与本体同参数，返回同形状、同精度的
    空张量）注册 fake 实现；launch 原样返回 kernel。traced：装饰器 = triton_op，launch = wrap_triton。
    本体不修改任何输入（mutates_args=()），两种方式都成立。"""
    if TRITON_OPS not in TRITON_OPS_MODES:
        raise ValueError(f"fast.TRITON_OPS={TRITON_OPS!r}: must be one of {', '.join(TRITON_OPS_MODES)}")
    if TRITON_OPS == "traced":
        from torch.library import triton_op, wrap_triton

        return triton_op(name, mutates_args=()), wrap_triton
    from torch.library import custom_op

    def register(body: Callable[..., Any]) -> Any:
        op = custom_op(name, mutates_args=())(body)
        op.register_fake(fake)
        return op

    return register, lambda kernel: kernel
