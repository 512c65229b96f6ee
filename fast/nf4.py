"""bitsandbytes NF4 权重直接参与的矩阵乘（Triton）：激活 × 4 位权重，查表反量化只在寄存器里做，float32 累加。

为什么要它（issue 16）：bitsandbytes 在 sm90 上把 M ≥ 8 的大部分投影路由到“反量化成 bf16 权重 + F.linear”，
每步重建一份 bf16 权重，NF4 的一步比 bf16 还慢。这里的 kernel 每个权重字节只读一次。

格式（bitsandbytes 0.50 的 quantize_4bit(quant_type="nf4")，权重 W (N, K) = (out_features, in_features)）：
- 打包数据：W 按行展平，第 2i 个元素放在第 i 个字节的高 4 位、第 2i+1 个放在低 4 位 → 字节 (N·K/2, 1) uint8；
- 每 blocksize（默认 64）个连续元素一个 absmax：w = code[nibble] · absmax（float32 相乘，再转成 dtype）；
- 双重量化（compress_statistics=True）：absmax 本身存成 uint8，按 256 个一组用动态 8 位表 state2.code 与
  state2.absmax 反量化，再加 offset：absmax = state2.code[q] · state2.absmax[i // 256] + offset（float32）。

权重的表示 NF4Weight（repack_nf4，加载时一次，在模型的设备上）：
- qweight：bitsandbytes 自己的打包字节，按行看成 (N, K/2) uint8——第 n 行是第 n 个输出的 K 个 4 位值
  （高 4 位在前），**是 bitsandbytes 参数的视图，不拷贝**。叠加（stack_nf4 / StackedLlama）时分配 (S, ΣN, K/2)，
  把各模型 bitsandbytes 参数的数据拷进去，再让参数指向自己的切片（与 bf16 的叠加一样）：transformers 的前向
  （慢速参考、字母打分）读的是同一份字节，4 位权重在显存里只有一份。
  为什么按行：bitsandbytes 的原始布局就是它（不用第二份权重）；一个线程沿 K 读 16 个连续字节（向量读），
  每行每步至少读一个 32 字节的段，DRAM 的访问是整段的。
- absmax：每块一个 float32，按行存 (N, K/blocksize)（与 bitsandbytes 的块顺序相同：bitsandbytes 自己的 kernel 也能
  直接用它，见方式 "bnb"）。
  双重量化在这里一次还原（与 bitsandbytes 的 dequantize_blockwise 同样的两次 float32 舍入），kernel 里不再查第二张表。
  这是唯一新分配的部分：每个权重 4 / blocksize 字节（blocksize 64 时 0.0625 B）。叠加（StackedLlama）之后
  bitsandbytes 的参数也改用它（非嵌套的 QuantState 指向这份 absmax，bnb_state），它的 uint8 absmax 与第二层随即
  释放——为什么：两份尺度并存时每个权重多占 1/64 字节（8B + 两个 1B 约 0.12 GiB），而 bitsandbytes 的前向用还原好的
  float32 absmax 算出的结果逐位相同。要求 K 是 blocksize 的倍数（块不跨行）。
- code (16,) float32：NF4 表。
kernel 每个权重读 0.5（半字节）+ 4 / blocksize（absmax）= 0.5625 B（blocksize 64）；bf16 是 2 B。

现状（H200，f3031a1 的 benchmarks/micro_nf4.py --tune 与 b967a75 的 bench.py --quant nf4，BENCHMARKS.md）：M = 1 时
调优后的最快者（本模块的 gemvR 或 bitsandbytes 自己的 gemv_4bit，谁快用谁）只到 0.5–1.2 TB/s，用时是同形状 bf16 的
0.86–1.25 倍——4 位少读的字节没有变成时间；两家 kernel 一样慢，按指令构成推断（没有 ncu 剖析）限制在反量化（每个权重
一次 L1 查表 + 取半字节 + 两次乘加）。M = 16 / 64 的 dotT 比 bitsandbytes 的 matmul_4bit 快 1.16–1.81 倍，仍比 bf16 慢
1.5–2.3 倍（0.36–0.62 TB/s）。试过又删掉的方式（数字在 BENCHMARKS.md）：旧 gemv、gemv2、旧 dot、dotS。
29a413f 的 ABLATE 实测（BENCHMARKS.md）证实了推断：M = 1 时 8B 一层里只读字节占 38%，查表占 43%，乘加 19%。
下一步：查表不走 L1——寄存器里的表加 warp shuffle（bitsandbytes 新的 k 位 kernel 设计用 __shfl_sync），或 FLUTE 的
做法（共享内存里成对取值的表，复制几份避开 bank 冲突）；或换一种能用整数位运算反量化的格式（int4：同一次测量里
torchao / gemlite 的 M = 1 kernel 在 8B 一层上比我们的少用约 27% 的时间）。已加的第一步：gemvG / dotG（tl.gather，
sm_90 上降成共享内存的读，GATHER_NOTE），d48920c 起在 H200 上量过（BENCHMARKS.md）。

dequantize_nf4 是纯 torch 的参考路径（与 bitsandbytes 的 dequantize_4bit 逐位相同）；quantize_nf4_reference 是
纯 torch 的量化器（与 bitsandbytes 的 quantize_4bit 逐位相同），供没有 bitsandbytes 的机器（基准）生成同格式的权重。
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import statistics
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Final, Sequence

import torch

import fast  # SPLIT_SUM（SPLIT_SUM_NOTE）；包在导入本模块之前已经初始化到能读它

# bitsandbytes 的 NF4 表（functional.get_4bit_type("nf4")）：N(0, 1) 的等概率分位点，归一化到 [-1, 1]，已排序。
NF4_CODE: Final[tuple[float, ...]] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)

DTYPES: Final[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float16, torch.float32)
NESTED_BLOCKSIZE: Final[int] = 256  # bitsandbytes 双重量化 absmax 时的块大小（quantize_4bit 里写死）

# 按 M（激活行数）选 kernel 配置的默认表：(M 上界, 方式, BLOCK_M, BLOCK_N, NB, num_warps, num_stages)。
# 方式 "gemvR"：M = 1，CUDA core 上乘加（不用 tensor core），每个程序 BLOCK_N 个输出 × 每步 NB 个 absmax 块，
# 每步先沿块内字节求和再乘 absmax（累加器 (BLOCK_N, NB)），见 nf4_gemv；
# 方式 "dotT"：M > 1，按行向量读字节、反量化出 (BLOCK_N, NB·blocksize) 的 bf16/fp16 块，当 tl.dot 的左操作数
# 在 tensor core 上算 outᵀ = W·xᵀ（M 不满 BLOCK_M 时补零列），见 nf4_dot_t；
# 方式 "bnb"：bitsandbytes 自己的 matmul_4bit（M = 1 走它的 gemv_4bit，否则反量化成 x 的精度 + F.linear），读同一份
# 打包字节与本模块的 float32 absmax——调优的候选之一：我们的 kernel 在某个形状上比它慢时就用它（不会比 bitsandbytes 的
# 原路径更慢），数值与 bitsandbytes 的前向相同。其余字段无意义（填 0）。
# 两种 Triton 方式都按 SM 数在 K 上切段（split-K，见 split_k_for），部分和由第二个 kernel 相加（确定性的，不用原子加）。
# 这张表只是没有调优时的起点：CUDA 上 tune_nf4 按实际形状与 M 在候选里实测选最快的（StackedLlama.allocate 调用），
# 结果记在 _TUNED 里，_launch 先查它。默认值取 H200 上的调优赢家（BENCHMARKS.md：M = 1 是 b967a75 的 gemvR
# (16, 8, 4)；M = 16 是 f3031a1 的 BLOCK_N 128 或 64，M = 64 全是 64；M = 32 没有量过，取两者之间）。
# d48920c 的调优在 M = 1 多选了 gemvW / gemvG、在 M = 16 全选了流水线的 dotG（BENCHMARKS.md）；默认表仍是只用 L1 查表的
# 老方式：它们不依赖 tl.gather 的降级方式，也是 CPU 测试（解释器）逐位核对的基准。
NF4_CONFIGS: Final[tuple[tuple[int, str, int, int, int, int, int], ...]] = (
    (1, "gemvR", 1, 16, 8, 4, 1),
    (16, "dotT", 16, 128, 1, 4, 1),
    (32, "dotT", 32, 64, 1, 4, 1),
    (1 << 62, "dotT", 64, 64, 1, 4, 1),
)
# tune_nf4 的候选：gemvR 与 dotT 的 (BLOCK_N, NB, num_warps, num_stages)（BLOCK_M 由 M 定；它们的循环不流水线，
# num_stages 1）；每个候选再配两种 split-K 强度（split_k_for 的 per_sm）。每多一个候选，每个形状的调优多一次 Triton 编译与计时（NF4 解码器的启动
# 因此要一两分钟），所以只留 H200 上的赢家与近邻：
# - gemvR：b967a75 在它赢的三个形状上选的都是 (16, 8, 4)；留它、NB 16 的近邻，和旧 gemv 的赢家块形 (16, 4, 4)
#   （gemvR 用这个块形还没有量过）。NB 32 与 BLOCK_N 32 的候选没赢过，已删；
# - dotT：f3031a1 与 b967a75 的 M = 16 / 64 赢家都是 (128, 1, 4) 或 (64, 1, 4)；NB 2 / 4 的候选在 b967a75 的 8 个
#   M = 16 形状上一次也没赢（M = 64 没有量过），num_stages 2 的候选在 f3031a1 一次也没赢，都已删。
# 试过又删掉的方式（BENCHMARKS.md 记着数字）：旧的 "gemv"（逐元素累加 (BLOCK_N, NB, 32)，最后才归约），b967a75 的
# 8 个 M = 1 形状上 7 个比 gemvR 慢 0.6–5.2 µs、1 个持平；"dotS"（每步一块、absmax 在点积之后乘）在 b967a75 的 16 个
# (形状, M ∈ {1, 16}) 上全输（M = 1 慢 1.5–2.1 倍，M = 16 比 dotT 慢 5–22%）；旧的 "dot"（权重块按 (BK, BLOCK_N) 取，
# 每个权重一条字节 load）在 f3031a1 的 16 个 (形状, M ∈ {16, 64}) 上都比 dotT 慢 1.19–1.54 倍；"gemv2"（x 预拆成
# 偶/奇两段 + 软件预取下一步）在 f3031a1 的 8 个 M = 1 形状上都比旧 gemv 慢 2–7 µs。
TUNE_GEMV_R: Final[tuple[tuple[int, int, int, int], ...]] = ((16, 4, 4, 1), (16, 8, 4, 1), (16, 16, 4, 1))
TUNE_DOT_T: Final[tuple[tuple[int, int, int, int], ...]] = ((128, 1, 4, 1), (64, 1, 4, 1), (32, 1, 4, 1))
# GATHER_NOTE：方式 "gemvG" / "dotG" 是 gemvR / dotT 的同一个 kernel，只有查表换了做法（编译期常量 GATHER）：
# 16 项的 NF4 表先读成一个张量，每个半字节用 tl.gather 取值，而不是每个半字节一条经 L1 的 load（还要算 64 位地址）。
# sm_90 上 Triton 把这里的 tl.gather 降成共享内存的读（LDS，32 位地址；benchmarks/sass_nf4.py 的静态剖析看得到），
# 不是 bitsandbytes 新的 k 位 kernel 那样的 warp shuffle。为什么：29a413f 的 ABLATE 实测（BENCHMARKS.md）里 M = 1 时
# 查表占 8B 一层的 43%，是最大的一块。取到的值与 L1 的表逐位相同（同一张 float32 表），数值不变。
# 这两种方式的 num_stages（配置的第 6 项）> 1 时，主循环是 tl.range(num_stages=…)：Triton 用 cp.async 把后面几步的
# 字节、尺度与 x 预取进共享内存。为什么：benchmarks/sass_nf4.py 的静态剖析（BENCHMARKS.md）里，每个程序只有一步
# 的字节在途（num_stages 对普通 range 的循环不起作用），每个 SM 至多约 36 KB——只读字节的 ABLATE 也只到 1.9 TB/s。
# 经 L1 查表的 gemvR / dotT 不这样做：那会把每个半字节的查表也预取进共享内存（每个程序几十 KB）。
# 只作调优候选（赢了才会被选中；编译不了的配置由调优跳过）。候选元组：(BLOCK_N, NB, num_warps, num_stages)。
# d48920c 的 H200 调优（BENCHMARKS.md）：M = 16 的 8 个形状全选了流水线的 dotG (64, 1, 4, 3)，比 dotT 快 15–31%
# （静态剖析里它每个权重的指令比 dotT 多，但每个 SM 在途的权重 31.5 KB 对 18 KB——M = 16 时在途的字节说了算）；
# M = 1 的 gemvG 赢了 1B 对的 qkv 与 o。据此加了两个在途更多的 dotG 候选（静态：(64, 1, 4, 4) 同样 72 个寄存器、
# 每 SM 7 个程序，在途 47 KB；(128, 1, 4, 3) 每个权重 8.62 条指令、在途 36 KB）。49198b8 的 H200 上 (128, 1, 4, 3)
# 赢了 M = 16 的全部 8 个形状，(64, 1, 4, 4) 一个也没赢。
TUNE_GEMV_G: Final[tuple[tuple[int, int, int, int], ...]] = ((16, 8, 4, 1), (16, 8, 4, 4), (8, 8, 4, 4))
TUNE_DOT_G: Final[tuple[tuple[int, int, int, int], ...]] = ((128, 1, 4, 1), (64, 1, 4, 3), (64, 1, 4, 4),
                                                             (128, 1, 4, 3))
# SCALE_NOTE：方式 "dotA" 是 dotG 的同一个 kernel（编译期常量 SCALE_AFTER，只用于 NB = 1：一步正好一个块，块尺度
# 对这一步的整块相同）。码表先转成 x 的精度，查到的码值直接交错成 tl.dot 的操作数，每一步的 tl.dot 之后再乘这一行
# 的块尺度：outᵀ += (code 块 @ xᵀ) · absmax，而不是 dotG 的 ((code · absmax) 转 x 的精度) @ xᵀ。为什么：每个权重
# 省掉一次 FMUL，float32 → bf16 的转换与打包（F2FP）只对 16 个码值做一次，乘尺度变成每步 BLOCK_N × BLOCK_M 次
# （M = 16 时是每个权重 1/4 次）。benchmarks/sass_nf4.py 的静态剖析（sm_90，4fb66e2 之后）：(16, 128, 1, 4, 3) 每个
# 权重 8.62 → 7.11 条指令，(16, 64, 1, 4, 3) 10.16 → 8.59，(64, 64, 1, 4, 3) 10.84 → 9.94；寄存器与在途字节不变。
# 数值：与“反量化成 bf16 + F.linear”不再逐位相同（bf16 时舍入的是码值而不是码值 × 尺度，同样 2⁻⁹ 的相对误差；
# float32 时只差乘法顺序），tests/test_nf4.py 按同一容差对参照检查。只作 M > 1 的调优候选：ff2a723 的 H200 上 M = 16 的 8 个形状全赢
# （比 dotG 快 0–3%），M = 64 赢 6 个。
# 与删掉的 "dotS"（b967a75，上面）不同：dotS 也把尺度乘在点积之后，但每块两次 tl.dot（高/低半字节各对 x 的偶/奇列）、
# 经 L1 查表、不流水线，输给了 dotT；dotA 保留 dotG 的做法（join 之后一次 tl.dot、tl.gather 查表、tl.range 流水线），
# 只把乘尺度挪到点积之后。
# 候选：49198b8 在 M = 16 赢的 dotG 块形 (128, 1, 4, 3)、它多一级流水线的 (128, 1, 4, 4)（静态同样 7.11 条、在途
# 54 KB/SM 对 36 KB），与 d48920c 的赢家 (64, 1, 4, 3)；(64, 1, 4, 4) 的 dotG 在 49198b8 的 M = 16 / 64 都没赢，不加。
TUNE_DOT_A: Final[tuple[tuple[int, int, int, int], ...]] = ((128, 1, 4, 3), (128, 1, 4, 4), (64, 1, 4, 3))
# PAIR_NOTE：方式 "dotB" 是 dotA 的同一个 kernel（编译期常量 PAIR），只有查表换了做法：程序开头从 16 项的码表（已是 x 的
# 精度）建一张 256 项的 int32 表，字节值 b → (码值[b >> 4] 的 16 位) | (码值[b & 0xF] 的 16 位) << 16；主循环里每个
# 字节只查一次（tl.gather），两半截成 int16 按位转回 bf16/fp16，再与 dotA 一样 join 成 tl.dot 的操作数。
# 为什么：dotA 每个权重一次查表（LDS.U16）外加取半字节的移位与掩码；成对的表把查表减半、取半字节的运算去掉。
# benchmarks/sass_nf4.py 的静态剖析（Triton 3.7、sm_90）：(16, 128, 1, 4, 3) 每个权重 7.11 → 4.06 条指令，
# (16, 64, 1, 4, 3) 8.59 → 5.38，(64, 64, 1, 4, 3) 9.94 → 6.84（145 个寄存器，每 SM 3 个程序，dotA 是 4 个）。
# FLUTE 的成对查表是同一想法。
# 代价：表 1 KB（256 个字），随机字节值落在 32 个 bank 上会有 bank 冲突（16 项的表只占 8 个字，同字是广播、没有冲突），
# 静态剖析看不到；FLUTE 为此把表复制几份，tl.gather 表达不了按线程的副本。所以只作调优候选（与 dotA 同样的块形）。
# 数值与 dotA 逐位相同（同样的码值、同样的 tl.dot 与乘尺度；tests/test_nf4.py 的 TWIN）。只有 16 位的 x：float32 的
# 码值放不进半个字（float32 时 dotA 的表不转精度），_launch 对 float32 报错，调优不列它。还没有在 GPU 上量过。
# M = 1 的 "gemvB" 是 gemvW 的同一个 kernel（同一个 PAIR 常量）：表项是一对 float32 码值（int64，2 KB），每个字节一次
# 64 位的查表，x 的 8 列拆成偶/奇两组（tl.split）各乘一个码值。静态剖析：(16, 8, 4, 1) 每个权重 5.31 → 4.22 条指令、
# 64 → 72 个寄存器；(16, 8, 2, 1) 4.95 → 3.98。求和的结合顺序与 gemvW 不同（先偶奇成对再加），不逐位相同，误差同级。
# 同样有 bank 冲突的风险、同样还没有在 GPU 上量过，只作 M = 1 的调优候选（float32 的 x 也可以：码值本来就是 float32）。
TUNE_PER_SM: Final[tuple[int, ...]] = (4, 8)
# WORDS_NOTE：方式 "gemvW"（nf4_gemv_w，M = 1）按 int32 字读字节，每个字的 8 个半字节在线程内用移位与掩码取出，
# tl.gather 查表，累加器按字 (BLOCK_N, NB, 每块字数)，每步只在线程内求和。为什么：benchmarks/sass_nf4.py 的静态剖析
# （Triton 3.7、sm_90）里 gemvG 每个权重 7.89 条指令，其中整数指令（逐字节的 PRMT 取字节、移位、掩码、算查表地址）
# 每个权重约 4.3 条——H100/H200 的 SM 每拍只能做 64 路整数运算（浮点 128 路），这是 M = 1 时的瓶颈（29a413f 的
# ABLATE：查表与乘加占 62%，只读字节也只到 1.9 TB/s）；跨线程的块内求和又每步要 warp shuffle。gemvW 是 5.30 条
# （整数约 2.5 条：半字节号 × 4 直接并进了移位与掩码，不再单算地址），64 个寄存器，没有 shuffle。
# 与 gemvR 的数值不逐位相同（求和顺序不同：按字累加、最后才归约），误差同级（tests/test_nf4.py 对参照检查）。
# d48920c 的 H200 调优（BENCHMARKS.md）：M = 1 的 8 个形状里 gemvW 赢了 4 个（8B 的 gate/up 与 down、1B 对的
# gate/up 与 down，比之前最快的方式快 1–21%），gemvG 赢 2 个，bitsandbytes 赢 2 个（8B 的 qkv 与 o）。
# 试过又删掉的：同样按字读的 tl.dot 版 "dotW"——静态剖析里 (BLOCK_N, NB, 字, 8) 的布局换成 tl.dot 操作数的布局
# 代价太大（16 × 128 块 219 个寄存器、每个 SM 2 个程序，每个权重 8.59 条指令，与 dotT 的 8.62 持平；其余块形更差），
# 没有上过 GPU。候选元组：(BLOCK_N, NB, num_warps, num_stages)。
TUNE_GEMV_W: Final[tuple[tuple[int, int, int, int], ...]] = ((16, 8, 4, 1), (32, 4, 4, 1), (16, 8, 2, 1), (16, 8, 4, 3))
# PREFETCH_NOTE（试过又删掉的 "gemvP"，d37bb31 加、ff2a723 之后删）：gemvW 的同一 kernel，每次迭代先发下一步的
# 字与 absmax 的 load，再算上一次迭代读进寄存器的那一步（在途的权重字节约 1.5 倍：80 个寄存器、每 SM 6 个程序 × 2 步）。
# 依据是 d48920c 的 gemvW 在 8B gate/up 上只读到 1.33 TB/s，推断时间花在等 load 上。ff2a723 的 H200 调优
# （BENCHMARKS.md）里它 8 个形状一个也没赢（3 个第二，其余第三或更后；8B gate/up 52.19 µs 对 gemvW 的 48.34 µs）：
# 多在途的字节没有变成时间，这一推断不成立，于是删掉（调优每个 M = 1 的形状也少计时 3 个配置）。
# 编号 5 是删掉的 "gemvP"（PREFETCH_NOTE），不再复用
KERNELS: Final[dict[str, int]] = {"gemvR": 0, "dotT": 1, "gemvG": 2, "dotG": 3, "gemvW": 4, "dotA": 6, "dotB": 7,
                                  "gemvB": 8}
GEMV_METHODS: Final[tuple[str, ...]] = ("gemvR", "gemvG", "gemvW", "gemvB")  # 只算 M = 1 的方式（程序网格没有 m 块）
Config = tuple[str, int, int, int, int, int]  # (方式, BLOCK_M, BLOCK_N, NB, num_warps, num_stages)
# 调优结果：(S, N, K, M, dtype) → (配置, split_k)。进程内有效（不同 GPU、不同形状各调一次）。
_TUNED: dict[tuple[int, int, int, int, torch.dtype], tuple[Config, int]] = {}
# 同一键的调优报告（配置、split_k、微秒、每种方式最快的微秒）：后来的解码器复用调优结果时也能报告它
_TUNED_REPORT: dict[tuple[int, int, int, int, torch.dtype], dict[str, Any]] = {}
# load_nf4_kernels 定义的 @triton.jit kernel（名字 → JITFunction），只给静态剖析 benchmarks/sass_nf4.py 用。
JIT_KERNELS: dict[str, Any] = {}
# kernel 共用的 @triton.jit 小函数（load_nf4_kernels 定义时绑定成模块级的名字，见那里的说明）：K 段范围、解释器里的
# 就近舍入、gemv 的输出、gemvW / gemvB 按字读的 x
_k_range: Any = None
_rtne: Any = None
_gemv_out: Any = None
_x_words: Any = None
# 调优结果的磁盘缓存（use_tuning_cache 设置；None = 不用，每个进程重新计时）。见 TUNING_CACHE_NOTE。
_CACHE_PATH: str | None = None
_CACHE: dict[str, Any] | None = None  # 读进来的缓存：{"fingerprint": {...}, "entries": {名字: 报告}}；None = 还没读

# TUNING_CACHE_NOTE：为什么把调优结果存盘。调优按实测时间选 kernel，相近的候选（例如 1B 的 gate/up 在 M = 1 时
# bitsandbytes 38.6 µs 对 gemvR 40.0 µs）每次启动可能选得不同；不同的 kernel（以及不同的 split-K 段数）求和顺序
# 不同、bf16 下舍入不同，同一个配置重跑一次，贪心解码就可能在某个近似平局处走上另一个 token——研究者扫 α 时
# 每一次运行都应当用同一组 kernel。存盘后，同一台 GPU、同样的软件版本、同样的 kernel 源码上，后来的运行直接用
# 记下的选择（也省掉每次启动的计时）；指纹（GPU 名、torch / triton / bitsandbytes 版本、本文件的源码散列）任何一项
# 变了，旧记录作废、重新计时并覆盖。main.py 把本次用到的选择记进运行目录的 events.jsonl。


def tuning_fingerprint(device: torch.device) -> dict[str, Any]:
    """调优缓存的有效范围：GPU 名、torch / triton / bitsandbytes 版本、本文件源码的 sha256（前 16 位，kernel 或候选
    一改就不同）。任何一项与缓存文件里的不同，文件里的记录都不用。"""
    import hashlib
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    with open(__file__, "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()[:16]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"device": name, "torch": torch.__version__, "triton": version("triton"),
            "bitsandbytes": version("bitsandbytes"), "kernels": source}


def use_tuning_cache(path: str | None) -> None:
    """设置调优缓存文件（"~" 会展开；None 或 "off" = 不用缓存，每个进程重新计时）。只记下路径，第一次调优时才读。"""
    global _CACHE_PATH, _CACHE
    _CACHE_PATH = None if path in (None, "", "off") else os.path.expanduser(path)
    _CACHE = None


def _cache_entries(device: torch.device) -> dict[str, Any]:
    """缓存文件里与本机指纹（tuning_fingerprint(device)）相符的记录。只在第一次调用时算指纹、读文件（指纹要散列
    本文件的源码，不必每个形状算一遍）。文件不存在 → 空；读不了、格式不对或指纹不同 → 警告一次（说明是哪种情况、
    会重新计时）并从空开始；_store 之后整份覆盖它。"""
    global _CACHE
    if _CACHE is None:
        fingerprint = tuning_fingerprint(device)
        _CACHE = {"fingerprint": fingerprint, "entries": {}}
        if _CACHE_PATH is not None and os.path.exists(_CACHE_PATH):
            try:
                with open(_CACHE_PATH) as f:
                    stored = json.load(f)
                if not isinstance(stored, dict) or not isinstance(stored.get("entries"), dict):
                    raise ValueError("it does not hold an 'entries' object")
            except (OSError, ValueError) as exc:
                warnings.warn(f"NF4 tuning cache {_CACHE_PATH} could not be read ({type(exc).__name__}: {exc}); "
                              "the kernels are timed again and the file is rewritten")
            else:
                if stored.get("fingerprint") == fingerprint:
                    _CACHE["entries"] = stored["entries"]
                else:
                    changed = sorted(k for k in fingerprint if (stored.get("fingerprint") or {}).get(k) != fingerprint[k])
                    warnings.warn(f"NF4 tuning cache {_CACHE_PATH} was written for another setup ({', '.join(changed)} "
                                  "changed); the kernels are timed again and the file is rewritten")
    return _CACHE["entries"]


def _store(name: str, entry: dict[str, Any]) -> None:
    """把一条调优结果写进缓存文件（先写临时文件再 os.replace：别的进程不会读到半个文件）。写不了时警告、继续运行。
    要先经 _cache_entries 读过（tune_nf4 查缓存时就读了）；没读过时什么也不做。"""
    if _CACHE_PATH is None or _CACHE is None:
        return
    _CACHE["entries"][name] = entry
    try:
        os.makedirs(os.path.dirname(_CACHE_PATH) or ".", exist_ok=True)
        tmp = f"{_CACHE_PATH}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(_CACHE, f, indent=1, sort_keys=True)
        os.replace(tmp, _CACHE_PATH)
    except OSError as exc:
        warnings.warn(f"NF4 tuning cache {_CACHE_PATH} could not be written ({exc}); this run is not affected, "
                      "but the next one times the kernels again")


def _valid_entry(entry: Any) -> bool:
    """缓存里的一条记录能不能用：{"config": [方式, 5 个整数], "split_k": ≥ 1 的整数}，方式是本模块的 kernel 或 "bnb"。
    手改坏的记录不让它在解码时才出错。"""
    cfg = entry.get("config") if isinstance(entry, dict) else None
    return (isinstance(cfg, list) and len(cfg) == 6 and cfg[0] in (*KERNELS, "bnb")
            and all(isinstance(v, int) and not isinstance(v, bool) for v in cfg[1:])
            and isinstance(entry.get("split_k"), int) and not isinstance(entry["split_k"], bool) and entry["split_k"] >= 1)


def tuned_report() -> dict[str, dict[str, Any]]:
    """本进程里用到的全部调优选择 {形状名_精度: 报告}（报告见 tune_nf4；来自缓存的带 "cached": true）。"""
    return {_full_name(key): rep for key, rep in _TUNED_REPORT.items()}


def _name(s: int, n: int, k: int, rows: int) -> str:
    """调优报告里一个 (叠加数 S, 输出 N, 输入 K, 激活行数 M) 的名字，例如 S1_N4096_K4096_M1。"""
    return f"S{s}_N{n}_K{k}_M{rows}"


def _full_name(key: tuple[int, int, int, int, torch.dtype]) -> str:
    """_TUNED 的键 (S, N, K, M, dtype) 在缓存文件与 tuned_report 里的名字：形状名加精度，例如 S1_N4096_K4096_M1_bfloat16。"""
    return f"{_name(*key[:4])}_{str(key[4]).removeprefix('torch.')}"


@dataclass(frozen=True)
class NF4Weight:
    """NF4 权重（布局见模块说明）。单个：qweight (N, K/2) uint8（按行打包，高 4 位在前）、absmax (N, K/bs) float32；
    叠加（stack_nf4）：两者多一个前导维 S。code (16,) float32；dtype 是原权重的精度（dequantize_nf4 的输出精度）；
    out_features = N。states：给方式 "bnb" 的每个模型一份 bitsandbytes QuantState（with_bnb_states 建，
    非嵌套、absmax 就是本对象 absmax 的视图）；空 = 还没建。"""

    qweight: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype
    out_features: int
    states: tuple[Any, ...] = ()

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-1] * 2

    @property
    def stacked(self) -> bool:
        return self.qweight.dim() == 3

    @property
    def nbytes(self) -> int:
        """kernel 每次调用读的权重字节（半字节 + absmax；16 项的表忽略不计）。"""
        return self.qweight.numel() * self.qweight.element_size() + self.absmax.numel() * self.absmax.element_size()


@dataclass
class NF4QuantState:
    """与 bitsandbytes QuantState 同名字段的最小替身（quantize_nf4_reference 的输出，repack_nf4 按字段读取）。
    嵌套时 absmax 是 uint8、state2 是第二层（absmax/code/blocksize），offset 是 float32 标量张量。"""

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    quant_type: str = "nf4"
    offset: torch.Tensor | None = None
    state2: "NF4QuantState | None" = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None


# ---------------------------------------------------------------------------------------------------------------
# 纯 torch：量化器、重排、参考反量化
# ---------------------------------------------------------------------------------------------------------------
def dynamic_map() -> torch.Tensor:
    """bitsandbytes 的动态 8 位表 create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)，(256,) float32。
    逐步照搬它的构造（float32 的 linspace 与乘法），保证双重量化的 absmax 逐位相同。"""
    data: list[float] = []
    non_sign_bits, max_exponent_bits = 7, 7
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _quantize_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat (n,) float32 按 blocksize 分块：absmax (块数,) 与最近的表项下标 (n,) int64（与 bitsandbytes 的默认后端
    相同：乘以 1/absmax 再截到 [-1, 1]，按相邻表项的中点分桶；最后一块可以不满）。"""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().amax(dim=-1)
    scaled = torch.clamp(flat[:full].reshape(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    scaled = scaled.reshape(-1)
    if full < n:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2), absmax


def quantize_nf4_reference(w: torch.Tensor, blocksize: int = 64,
                           compress_statistics: bool = True) -> tuple[torch.Tensor, NF4QuantState]:
    """纯 torch 的 NF4 量化器，输出与 bitsandbytes.functional.quantize_4bit(w, quant_type="nf4",
    blocksize=blocksize, compress_statistics=...) 逐位相同：打包字节 (numel/2, 1) uint8 与 NF4QuantState。
    用在没有 bitsandbytes 的机器上（基准）。w: (N, K) bf16/fp16/fp32，任意设备。"""
    if w.dtype not in DTYPES:
        raise ValueError(f"quantize_nf4_reference: weight dtype must be one of {DTYPES}, got {w.dtype}")
    if w.numel() % 2:
        raise ValueError(f"quantize_nf4_reference: the weight needs an even number of elements, got {w.numel()}")
    with torch.no_grad():
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
        q, absmax = _quantize_blocks(w.reshape(-1).float(), code, blocksize)
        q8 = q.to(torch.uint8)
        packed = ((q8[::2] << 4) | q8[1::2]).unsqueeze(1)
        if not compress_statistics:
            return packed, NF4QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, code=code)
        # 双重量化：absmax 减去均值后按 256 个一组用动态 8 位表量化（bitsandbytes quantize_blockwise 的规则）
        offset = absmax.mean()
        code2 = dynamic_map().to(w.device)
        q2, absmax2 = _quantize_blocks(absmax - offset, code2, NESTED_BLOCKSIZE)
        state2 = NF4QuantState(absmax=absmax2, shape=absmax.shape, dtype=torch.float32, blocksize=NESTED_BLOCKSIZE,
                               code=code2, quant_type="dynamic")
        return packed, NF4QuantState(absmax=q2.to(torch.uint8), shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                                     code=code, offset=offset, state2=state2)


def _block_scales(quant_state: Any) -> torch.Tensor:
    """每块的 absmax，float32 (块数,)：嵌套时还原双重量化（与 bitsandbytes dequantize_blockwise 相同的两次舍入：
    先 code2[q] · absmax2，再 + offset）。"""
    if getattr(quant_state, "state2", None) is None:
        return quant_state.absmax.float()
    s2 = quant_state.state2
    q = quant_state.absmax.reshape(-1).long()
    index = torch.arange(q.numel(), device=q.device) // s2.blocksize
    scales = s2.code.to(q.device)[q] * s2.absmax.to(q.device).float()[index]
    return scales + quant_state.offset.to(q.device).float()


def repack_nf4(weight_packed: torch.Tensor, quant_state: Any) -> NF4Weight:
    """bitsandbytes 的打包字节 + QuantState → NF4Weight（加载时一次，在权重所在设备上）。

    weight_packed: Params4bit 的数据 (N·K/2, 1)（或任意形状，按字节重解释）；quant_state: bitsandbytes 的
    QuantState 或 NF4QuantState（读 absmax/state2/offset/shape/dtype/blocksize/quant_type）。
    qweight 是 weight_packed 的视图（不拷贝，见模块说明）；只有还原后的 float32 absmax 是新分配的。
    """
    quant_type = getattr(quant_state, "quant_type", "nf4")
    if quant_type != "nf4":
        raise ValueError(f"repack_nf4: only quant_type='nf4' is supported, got {quant_type!r}")
    shape = tuple(quant_state.shape)
    if len(shape) != 2:
        raise ValueError(f"repack_nf4: expected a 2-D (out_features, in_features) weight, got shape {shape}")
    n, k = shape
    blocksize = int(quant_state.blocksize)
    if k % blocksize:
        raise ValueError(f"repack_nf4: in_features={k} is not a multiple of blocksize={blocksize}, so quantization "
                         "blocks straddle rows; the kernel needs whole blocks per row (quantize with a blocksize "
                         "that divides in_features)")
    if k % 2 or blocksize % 32:
        raise ValueError(f"repack_nf4: need even in_features and blocksize a multiple of 32, got K={k}, "
                         f"blocksize={blocksize}")
    if not weight_packed.is_contiguous():
        raise ValueError("repack_nf4: the packed weight must be contiguous (it is reinterpreted byte by byte)")
    data = weight_packed if weight_packed.dtype == torch.uint8 else weight_packed.view(torch.uint8)
    if data.numel() != n * k // 2:
        raise ValueError(f"repack_nf4: {data.numel()} packed bytes do not match shape {shape} "
                         f"(expected {n * k // 2}: two 4-bit values per byte)")
    with torch.no_grad():
        absmax = _block_scales(quant_state).to(data.device)
        if absmax.numel() != n * k // blocksize:
            raise ValueError(f"repack_nf4: {absmax.numel()} absmax values, expected {n * k // blocksize} "
                             f"for shape {shape} and blocksize {blocksize}")
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=data.device)
        scales = absmax.reshape(n, k // blocksize)  # (N, K/bs)
    return NF4Weight(qweight=data.reshape(n, k // 2), absmax=scales, code=code, blocksize=blocksize,
                     dtype=quant_state.dtype, out_features=n)


def dequantize_nf4(w: NF4Weight) -> torch.Tensor:
    """参考反量化（纯 torch）：(N, K)（叠加时 (S, N, K)），w.dtype。与 bitsandbytes.functional.dequantize_4bit 逐位
    相同：code[半字节] · absmax 在 float32 里相乘，最后一次转成 dtype。"""
    q = w.qweight  # (..., N, K/2)
    nibbles = torch.stack([q >> 4, q & 0xF], dim=-1).flatten(-2).long()  # (..., N, K)：高半字节在前
    values = w.code[nibbles] * w.absmax.repeat_interleave(w.blocksize, dim=-1)
    return values.to(w.dtype)


def cat_nf4(weights: Sequence[NF4Weight]) -> NF4Weight:
    """沿输出维拼接（q/k/v → qkv，gate/up → gate_up，与 StackedLlama 的融合相同）：各行独立，直接按行拼（拷贝）。"""
    _check_same(weights, "cat_nf4", same_n=False)
    return NF4Weight(qweight=torch.cat([w.qweight for w in weights]), absmax=torch.cat([w.absmax for w in weights]),
                     code=weights[0].code, blocksize=weights[0].blocksize, dtype=weights[0].dtype,
                     out_features=sum(w.out_features for w in weights))


def stack_nf4(weights: Sequence[NF4Weight]) -> NF4Weight:
    """S 个同形状权重在前面叠一维（S, ...），给 nf4_linear_stacked（一次发射算 S 个模型）。"""
    _check_same(weights, "stack_nf4", same_n=True)
    return NF4Weight(qweight=torch.stack([w.qweight for w in weights]),
                     absmax=torch.stack([w.absmax for w in weights]),
                     code=weights[0].code, blocksize=weights[0].blocksize, dtype=weights[0].dtype,
                     out_features=weights[0].out_features)


def as_stacked(w: NF4Weight) -> NF4Weight:
    """单个权重 → 前导维 S = 1 的叠加权重（qweight (1, N, K/2)、absmax (1, N, K/bs)，视图、不拷贝）；已叠好的原样返回。
    为什么：算子与调优只认叠加布局，单个权重经它进入同一条路径（计时的图里也不会混进 stack_nf4 的拷贝）。"""
    if w.stacked:
        return w
    return dataclasses.replace(w, qweight=w.qweight[None], absmax=w.absmax[None])


def _check_same(weights: Sequence[NF4Weight], who: str, same_n: bool) -> None:
    """拼接/叠加前核对：非空、都是单个权重、K/blocksize/dtype/设备相同（叠加还要 N 相同）。"""
    if not weights:
        raise ValueError(f"{who}: got no weights")
    first = weights[0]
    for w in weights:
        if w.stacked:
            raise ValueError(f"{who}: expects single (unstacked) weights, got a stacked one")
        if (w.in_features, w.blocksize, w.dtype, w.qweight.device) != (
                first.in_features, first.blocksize, first.dtype, first.qweight.device):
            raise ValueError(f"{who}: weights differ in in_features/blocksize/dtype/device: "
                             f"{(w.in_features, w.blocksize, w.dtype, w.qweight.device)} vs "
                             f"{(first.in_features, first.blocksize, first.dtype, first.qweight.device)}")
        if same_n and w.out_features != first.out_features:
            raise ValueError(f"{who}: out_features differ ({w.out_features} vs {first.out_features})")


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------------------
BNB_ROWS: Final[int] = 256  # 行数超过它（预填充）时默认用 bitsandbytes 的反量化 + cuBLAS，见 config_for


# 装没装 bitsandbytes（导入时查一次，是常量：编译区域里的 config_for 也读它；NF4 模型本来就是它加载的，
# 纯 torch 量化器造的权重可以没有它）
HAS_BNB: Final[bool] = importlib.util.find_spec("bitsandbytes") is not None


_BNB: Any = None  # bitsandbytes 模块（with_bnb_states 在编译区域之外导入；编译区域里只读这个全局）


def with_bnb_states(w: NF4Weight) -> NF4Weight:
    """给方式 "bnb" 建每个模型的 bitsandbytes QuantState：非嵌套，absmax 是 w.absmax 的视图（按行存的块顺序与
    bitsandbytes 相同），不多占显存。返回带 states 的新 NF4Weight（其余字段不变）。要求装了 bitsandbytes。"""
    absmax = w.absmax if w.stacked else w.absmax[None]
    states = tuple(bnb_state(absmax[s], w) for s in range(absmax.shape[0]))
    return dataclasses.replace(w, states=states)


def bnb_state(absmax: torch.Tensor, w: NF4Weight) -> Any:
    """一个 (n, K) 权重的 bitsandbytes QuantState，非嵌套：absmax (n, K/bs) float32 的视图（不拷贝），码表、块大小、
    精度取自 w。为什么非嵌套就够：这份 float32 absmax 正是 bitsandbytes 自己还原双重量化得到的值（_block_scales，
    逐位相同），它的前向用它算出的结果与用嵌套状态时逐位相同。要求装了 bitsandbytes。"""
    global _BNB
    import bitsandbytes
    from bitsandbytes.functional import QuantState

    _BNB = bitsandbytes
    return QuantState(absmax=absmax.reshape(-1), shape=torch.Size([absmax.shape[0], w.in_features]), code=w.code,
                      blocksize=w.blocksize, quant_type="nf4", dtype=w.dtype)


def _bnb_matmul(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """方式 "bnb"：逐模型调用 bitsandbytes 的 matmul_4bit。x (S, M, K)，w 叠好的、带 states → (S, M, N)，x 的精度。"""
    if not w.states:
        if torch.compiler.is_compiling():
            raise ValueError("nf4 linear: method 'bnb' needs with_bnb_states(weight) before compilation")
        w = with_bnb_states(w)
    outs = [_BNB.matmul_4bit(x[s], w.qweight[s].reshape(-1, 1).t(), quant_state=w.states[s])
            for s in range(x.shape[0])]
    # S = 1（8B 的每个投影）用视图而不是 torch.stack：eager 时 stack 一个张量也是一次拷贝。编译后 inductor 本来就把它
    # 省成别名（CPU 上生成的代码里看过：前后的 kernel 数相同），所以编译的快速路径不因此变快
    return outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)


def config_for(m: int) -> Config:
    """按 M 查默认表 NF4_CONFIGS：(方式, BLOCK_M, BLOCK_N, NB, num_warps, num_stages)。
    M > BNB_ROWS（预填充）且装了 bitsandbytes 时取方式 "bnb"：那时矩阵乘受算力限制，反量化一次成 bf16 再交给 cuBLAS
    远比 tl.dot kernel 划算（后者每个 BLOCK_M 行的块都要把整份权重重新查表反量化一遍：4096 行就是 64 遍）。"""
    if m > BNB_ROWS and HAS_BNB:
        return ("bnb", 0, 0, 0, 0, 0)
    for bound, *cfg in NF4_CONFIGS:
        if m <= bound:
            return tuple(cfg)  # type: ignore[return-value]
    raise AssertionError("NF4_CONFIGS must end with an unbounded row")


def split_k_for(programs: int, k_steps: int, sms: int, per_sm: int = 4) -> int:
    """K 切几段：输出块的程序数不到 SM 数的 per_sm 倍时按比例切（让每个 SM 都有几个程序在读权重），
    每段至少 4 个 K 步（一个 K 步 = NB 个 absmax 块），最多 16 段。GEMV 用 per_sm = 8（H200 的 --sweep：
    8B gate/up 在 8 段时最快，比 3 段快约一成），tl.dot 用 4（切多少段几乎不影响）。"""
    if programs >= per_sm * sms:
        return 1
    return max(1, min(16, -(-per_sm * sms // programs), k_steps // 4))


@functools.cache
def load_nf4_kernels() -> Callable[..., torch.Tensor]:
    """导入 triton、定义 kernel、注册 torch.library 算子 steer::nf4_linear 并返回它（只做一次）。

    与 fast.attention.load_triton_attention 相同的做法：延迟导入（CPU 环境可以没有 triton；测试在导入 triton 之前设
    TRITON_INTERPRET=1，由解释器在 CPU 张量上执行），按 fast.TRITON_OPS 注册成不透明的 custom_op（默认）或
    triton_op（TRITON_OPS_NOTE）；两种 torch.compile 都不断图，CUDA graph 都能录制。
    必须在编译区域之外调用。
    """
    import triton
    import triton.language as tl
    from fast import kernel_op

    # RTNE_NOTE：FIX 只在解释器里且输出为 bf16 时为真。Triton 3.7 的解释器把 float32 → bf16 的 .to() 做成截断，
    # GPU 上是就近舍入到偶数；在位模式上先加 0x7FFF + 保留位的最低位，之后的截断就等于就近舍入（GPU 上不走这段）。
    INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
    # SPLIT_K_NOTE：split-K 的段数是运行时参数，不是编译期常量。为什么：调优按形状与 SM 数算出的段数各不相同
    # （29a413f 的候选里 1–16 都有），作常量时每个 (配置, 段数) 都要单独编译一次——静态数出来每个 M 有 26–31 个
    # kernel 变体，NF4 解码器启动要一两分钟，其中就有这些编译；作运行时参数后只剩 6–12 个（段数为 1 时 Triton
    # 照样按常量 1 特化，写输出的分支被折叠掉）。段内的步数本来就是运行时算的，求和顺序不变，结果逐位相同。
    # ABLATE_NOTE：两个 kernel 的 ABLATE 常量（编译期常量，生产路径 ABLATE = 0 时多出的分支被编译器删掉）只为回答
    # “时间花在哪”（issue 16 要求的剖析；GPU 上没有 ncu）：同一网格、同样读全部字节与 absmax，依次加上查表、再加
    # 与 x 的乘加 / tl.dot。三者用时之差就是各部分的代价：若只读字节已经和完整乘积一样慢，限制在访存的方式（在途字节、
    # 访问模式），不在反量化；若查表一加就慢，限制在查表。输出只供 tests/test_nf4.py 核对部分计算本身是对的。

    # 几个 kernel 共用的 JIT 小函数绑定成模块级的名字（global）：Triton 的解释器只在 kernel 的模块全局里找被调用的
    # JIT 函数，找不到闭包里的（编译器两者都找）。
    global _k_range, _rtne, _gemv_out, _x_words

    @triton.jit
    def _k_range(K, BLOCKSIZE: tl.constexpr, NB: tl.constexpr, SPLIT_K, pid_k):
        # 第 pid_k 个 K 段的块范围 [lo, hi) 与总块数：每段 ⌈⌈blocks / NB⌉ / SPLIT_K⌉ 步，一步 NB 块（最后一段可以不满
        # 或为空）。三个乘积 kernel 共用它：split-K 的部分和要按同一种切法才能由 nf4_split_sum 相加。
        blocks = K // BLOCKSIZE
        steps = tl.cdiv(tl.cdiv(blocks, NB), SPLIT_K)
        lo = pid_k * steps * NB
        return blocks, lo, tl.minimum(lo + steps * NB, blocks)

    @triton.jit
    def _rtne(v, FIX: tl.constexpr):
        # float32 张量 v 在转成 bf16 之前的修正（RTNE_NOTE）：FIX 时在位模式上加 0x7FFF + 保留位的最低位，解释器之后
        # 的截断就等于 GPU 上的就近舍入到偶数；FIX 为假（GPU、或输出不是 bf16）时原样返回。
        if FIX:
            v = (v.to(tl.uint32, bitcast=True) + 0x7FFF + ((v.to(tl.uint32, bitcast=True) >> 16) & 1)
                 ).to(tl.float32, bitcast=True)
        return v

    @triton.jit
    def _gemv_out(total, OUT, PART, N, n, n_ok, s, o_s, pid_k, SPLIT_K, FIX: tl.constexpr):
        # M = 1 的两个 kernel 的输出：total (BLOCK_N,) float32。不切 K 时直接转成输出精度写进 OUT (S, 1, N)；
        # 切 K 时写 float32 部分和 PART (SPLIT_K, S, 1, N)，由 nf4_split_sum 按固定顺序相加。
        if SPLIT_K == 1:
            tl.store(OUT + s * o_s + n, _rtne(total, FIX).to(OUT.dtype.element_ty), mask=n_ok)
        else:
            tl.store(PART + (pid_k * tl.num_programs(2) + s) * N + n, total, mask=n_ok)

    @triton.jit
    def _x_words(X, s, x_s, blk, blocks, w, t, n, WPB: tl.constexpr):
        # nf4_gemv_w（gemvW 与 gemvB）一步的 x：(BLOCK_N, NB, WPB, 8) float32，[.., 块 b, 字 j, t] = x 的第
        # 8·(块号 · WPB + j) + t 列（blk (NB,) 块号，w (WPB,) 字号，t (8,)，n (BLOCK_N,) 只为形状）。
        # x 的指针按 (BLOCK_N, NB, WPB, 8) 形状给（沿 n 的 0 · n 只为形状）：Triton 让每个线程直接读与自己的
        # 字对应的 8 个 x（一条 16 字节的 load，L1 命中），而不是读一份 (NB, WPB, 8) 再经共享内存换布局。
        # 块号夹在 [0, blocks − 1]：mask 掉的块读到的是有限的 x，乘 absmax = 0 仍是 0
        word_in = tl.minimum(tl.maximum(blk, 0), blocks - 1)[:, None] * WPB + w[None, :]
        return tl.load(X + s * x_s + word_in[None, :, :, None] * 8 + t[None, None, None, :]
                       + 0 * n[:, None, None, None]).to(tl.float32)

    @triton.jit
    def nf4_gemv(X, Q, A, CODE, OUT, PART, N, K, x_s, q_s, a_s, o_s,
                 BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, SPLIT_K,
                 FIX: tl.constexpr, ABLATE: tl.constexpr, GATHER: tl.constexpr, STAGES: tl.constexpr):
        # 方式 "gemvR"，M = 1。程序 (n 块, K 段, 模型 s)：BLOCK_N 个输出（Q 的 BLOCK_N 行）；每步读每行 NB 个块的字节
        # (BLOCK_N, NB, HALF)——每行是一段连续的 NB·HALF 字节。高半字节乘 x 的偶数列、低半字节乘奇数列。
        # 每步先沿块内字节求和、再乘 absmax，累加器只有 (BLOCK_N, NB)。为什么：旧的 gemv 逐元素累加到
        # (BLOCK_N, NB, HALF) 的 float32 寄存器里、最后才归约；小累加器省下寄存器（每个 SM 能放更多程序、每步能读更多
        # 字节——按 Little 定律估算 M = 1 的 kernel 在途字节不够），absmax 的乘法也从每个字节一次变成每块一次。
        # b967a75 的 H200 调优里它在 8 个形状上 7 个比旧 gemv 快（0.6–5.2 µs）、1 个持平，旧 gemv 因此删掉。
        # ABLATE（只给诊断用，见 ABLATE_NOTE）：0 = 正常的乘积；1 = 只读字节与 absmax（out = Σ absmax · Σ 字节值）；
        # 2 = 再加查表（out = Σ absmax · Σ (code[高] + code[低])，不乘 x）。
        HALF: tl.constexpr = BLOCKSIZE // 2
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        s = tl.program_id(2)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        b = tl.arange(0, NB)
        j = tl.arange(0, HALF)
        n_ok = n < N
        blocks, lo, hi = _k_range(K, BLOCKSIZE, NB, SPLIT_K, pid_k)
        q_rows = Q + s * q_s + n.to(tl.int64)[:, None, None] * (K // 2)  # (BLOCK_N, 1, 1)：各行的起点
        table = tl.load(CODE + tl.arange(0, 16))  # (16,)：GATHER 时查的表（见 GATHER_NOTE；不用时编译器删掉）
        acc_blocks = tl.zeros([BLOCK_N, NB], tl.float32)
        for kb in tl.range(lo, hi, NB, num_stages=STAGES):  # STAGES > 1：流水线预取后面几步的字节（GATHER_NOTE）
            blk = kb + b
            b_ok = blk < hi
            byte = blk[:, None] * HALF + j[None, :]  # (NB, HALF)：行内字节号（也是 x 的偶数列 / 2）
            q = tl.load(q_rows + byte[None, :, :], mask=n_ok[:, None, None] & b_ok[None, :, None], other=0)
            scale = tl.load(A + s * a_s + n[:, None] * blocks + blk[None, :], mask=n_ok[:, None] & b_ok[None, :],
                            other=0.0)  # (BLOCK_N, NB)
            xe = tl.load(X + s * x_s + 2 * byte, mask=b_ok[:, None], other=0.0).to(tl.float32)
            xo = tl.load(X + s * x_s + 2 * byte + 1, mask=b_ok[:, None], other=0.0).to(tl.float32)
            if ABLATE == 1:
                acc_blocks += tl.sum(q.to(tl.float32), axis=2) * scale
            else:
                if GATHER:  # tl.gather 查表（GATHER_NOTE）：按一维取值再变回 (BLOCK_N, NB, HALF)（要求与表同维数）
                    flat: tl.constexpr = BLOCK_N * NB * HALF
                    we = tl.reshape(tl.gather(table, tl.reshape((q >> 4).to(tl.int32), (flat,)), 0),
                                    (BLOCK_N, NB, HALF))
                    wo = tl.reshape(tl.gather(table, tl.reshape((q & 0xF).to(tl.int32), (flat,)), 0),
                                    (BLOCK_N, NB, HALF))
                else:
                    we = tl.load(CODE + (q >> 4).to(tl.int32))  # 查表：16 项的表常驻 L1
                    wo = tl.load(CODE + (q & 0xF).to(tl.int32))
                if ABLATE == 2:
                    acc_blocks += tl.sum(we + wo, axis=2) * scale
                else:
                    acc_blocks += tl.sum(we * xe[None, :, :] + wo * xo[None, :, :], axis=2) * scale
        total = tl.sum(acc_blocks, axis=1)  # (BLOCK_N,)
        _gemv_out(total, OUT, PART, N, n, n_ok, s, o_s, pid_k, SPLIT_K, FIX)

    @triton.jit
    def nf4_gemv_w(X, Q, A, CODE, OUT, PART, N, K, x_s, q_s, a_s, o_s,
                   BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, SPLIT_K,
                   FIX: tl.constexpr, ABLATE: tl.constexpr, STAGES: tl.constexpr, PAIR: tl.constexpr):
        # 方式 "gemvW"，M = 1（WORDS_NOTE）。与 nf4_gemv 相同的程序网格与 split-K，但字节按 int32 字读：每个字 8 个
        # 半字节，t = 0..7 号半字节 = 字节 t // 2 的高（t 偶）/ 低（t 奇）4 位，乘 x 的第 8·字号 + t 列——一个字的 8 个
        # x 是连续的。半字节号 (字 >> 移位) & 0xF 在线程内算，查表用 tl.gather（共享内存）；累加器按字 (BLOCK_N, NB, WPB)，
        # 每步只沿线程内的 8 个半字节求和再乘 absmax，不做跨线程的归约（那要 warp shuffle），循环结束后才归约。
        # ABLATE（见 ABLATE_NOTE）：1 = 只读字节与 absmax（out = Σ absmax · Σ 字节值）；2 = 再加查表（不乘 x）。
        HALF: tl.constexpr = BLOCKSIZE // 2
        WPB: tl.constexpr = HALF // 4  # 每块的字数
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        s = tl.program_id(2)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        b = tl.arange(0, NB)
        w = tl.arange(0, WPB)
        t = tl.arange(0, 8)
        shifts = (t // 2) * 8 + 4 - 4 * (t % 2)  # (8,)：小端字里字节 t // 2 的高 / 低半字节的位置
        n_ok = n < N
        blocks, lo, hi = _k_range(K, BLOCKSIZE, NB, SPLIT_K, pid_k)
        q_rows = Q.to(tl.pointer_type(tl.int32)) + s * (q_s // 4) + n.to(tl.int64)[:, None, None] * (K // 8)
        table = tl.load(CODE + tl.arange(0, 16))  # (16,)：tl.gather 查的表
        if PAIR:  # PAIR_NOTE（gemvB）：字节值 → 一对 float32 码值的位（低 32 位 = 高半字节的，k = 2i；高 32 位 = 低半字节的）
            i256 = tl.arange(0, 256)
            bits = table.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
            pairs = tl.gather(bits, i256 >> 4, 0) | (tl.gather(bits, i256 & 0xF, 0) << 32)  # (256,) int64
        acc = tl.zeros([BLOCK_N, NB, WPB], tl.float32)
        for kb in tl.range(lo, hi, NB, num_stages=STAGES):
            blk = kb + b
            b_ok = blk < hi
            word = blk[:, None] * WPB + w[None, :]  # (NB, WPB)：行内字号
            q = tl.load(q_rows + word[None, :, :], mask=n_ok[:, None, None] & b_ok[None, :, None], other=0)
            scale = tl.load(A + s * a_s + n[:, None] * blocks + blk[None, :], mask=n_ok[:, None] & b_ok[None, :],
                            other=0.0)  # (BLOCK_N, NB)；mask 掉的块 absmax = 0，它的乘积也就是 0
            if ABLATE == 1:
                byte = (q[:, :, :, None] >> (8 * tl.arange(0, 4))[None, None, None, :]) & 0xFF
                acc += tl.sum(byte.to(tl.float32), axis=3) * scale[:, :, None]
            elif PAIR:  # 每个字节一次查表（一对码值），x 的 8 列拆成偶/奇两组各 4 列
                flat4: tl.constexpr = BLOCK_N * NB * WPB * 4
                byt = (q[:, :, :, None] >> (8 * tl.arange(0, 4))[None, None, None, :]) & 0xFF  # (BLOCK_N, NB, WPB, 4)
                pv = tl.reshape(tl.gather(pairs, tl.reshape(byt, (flat4,)), 0), (BLOCK_N, NB, WPB, 4))
                v_even = pv.to(tl.int32).to(tl.float32, bitcast=True)  # 字节 j 的高半字节：k = 8·字号 + 2j
                v_odd = (pv >> 32).to(tl.int32).to(tl.float32, bitcast=True)  # 低半字节：k = 8·字号 + 2j + 1
                if ABLATE == 2:
                    acc += tl.sum(v_even + v_odd, axis=3) * scale[:, :, None]
                else:
                    xv = _x_words(X, s, x_s, blk, blocks, w, t, n, WPB)
                    x_even, x_odd = tl.split(tl.reshape(xv, (BLOCK_N, NB, WPB, 4, 2)))
                    acc += tl.sum(v_even * x_even + v_odd * x_odd, axis=3) * scale[:, :, None]
            else:
                flat: tl.constexpr = BLOCK_N * NB * WPB * 8
                nib = (q[:, :, :, None] >> shifts[None, None, None, :]) & 0xF  # (BLOCK_N, NB, WPB, 8)
                v = tl.reshape(tl.gather(table, tl.reshape(nib, (flat,)), 0), (BLOCK_N, NB, WPB, 8))
                if ABLATE == 2:
                    acc += tl.sum(v, axis=3) * scale[:, :, None]
                else:
                    xv = _x_words(X, s, x_s, blk, blocks, w, t, n, WPB)
                    acc += tl.sum(v * xv, axis=3) * scale[:, :, None]
        total = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BLOCK_N,)
        _gemv_out(total, OUT, PART, N, n, n_ok, s, o_s, pid_k, SPLIT_K, FIX)

    @triton.jit
    def nf4_dot_t(X, Q, A, CODE, OUT, PART, M, N, K, x_s, x_m, q_s, a_s, o_s, o_m,
                  BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                  SPLIT_K, IEEE: tl.constexpr, FIX: tl.constexpr, ABLATE: tl.constexpr,
                  GATHER: tl.constexpr, STAGES: tl.constexpr, SCALE_AFTER: tl.constexpr, PAIR: tl.constexpr):
        # 方式 "dotT"：算转置 outᵀ (BLOCK_N, BLOCK_M) += W 块 (BLOCK_N, BK) @ xᵀ (BK, BLOCK_M)。
        # 为什么：之前的 nf4_dot（4e84028 在 M = 16 只到约 0.38 TB/s）把权重块按 (BK, BLOCK_N) 取，沿 K 每两个元素读
        # 同一个字节，读不成向量、每个权重一条字节 load。这里按行读 (BLOCK_N, NB·blocksize/2) 个连续字节（每行一段，
        # 向量读），高/低半字节各查一次表。反量化后的权重是 tl.dot 的左操作数：解码时 M 小，把 N 放在 MMA 的大维度上
        # （swap-AB，Marlin/gemlite 的小批量做法），M 只要补到 16。
        # code · absmax 在 float32 里乘、转成 x 的精度（与 bitsandbytes 的“反量化成 bf16 + F.linear”舍入相同），
        # 用 join + reshape 在寄存器里交错成 (BLOCK_N, BK)（k = 2i 是高半字节），一次 tl.dot。
        # ABLATE（只给诊断用，见 ABLATE_NOTE）：0 = 正常的乘积；1 = 只读字节与 absmax（outᵀ[n, m] = Σ absmax · Σ 字节值，
        # 各 m 相同）；2 = 再加查表、乘 absmax、转精度与交错（outᵀ[n, m] = Σ_k w[n, k]，不做 tl.dot）。
        HALF: tl.constexpr = BLOCKSIZE // 2
        BK: tl.constexpr = NB * BLOCKSIZE
        BH: tl.constexpr = NB * HALF  # 每行每步的字节数
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        s = tl.program_id(2)
        m_tiles = tl.cdiv(M, BLOCK_M)
        pid_m = pid % m_tiles
        pid_n = pid // m_tiles
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        hb = tl.arange(0, BH)
        kk = tl.arange(0, BK)
        m_ok = m < M
        n_ok = n < N
        blocks, lo, hi = _k_range(K, BLOCKSIZE, NB, SPLIT_K, pid_k)
        q_rows = Q + s * q_s + n.to(tl.int64)[:, None] * (K // 2)  # (BLOCK_N, 1)
        x_cols = X + s * x_s + m[None, :] * x_m  # (1, BLOCK_M)
        table = tl.load(CODE + tl.arange(0, 16))  # (16,)：GATHER 时查的表（见 GATHER_NOTE）
        # SCALE_NOTE：表先转成 x 的精度，查到的就是 tl.dot 的操作数。条件写成“x 不是 float32”而不是“not IEEE”：GPU 上
        # 两者相同；解释器里 IEEE 总为真，这样解释器里的 dotA / dotB 也按 GPU 的做法先把码值舍入到 x 的精度
        if SCALE_AFTER and X.dtype.element_ty != tl.float32:
            table = _rtne(table, FIX).to(X.dtype.element_ty)
        if PAIR:  # PAIR_NOTE：字节值 → 一对码值的位（低 16 位 = 高半字节的码值，k = 2i；高 16 位 = 低半字节的，k = 2i + 1）
            i256 = tl.arange(0, 256)
            if FIX:  # 解释器里的 bf16 存成 float32（截断的），位模式取它的高 16 位
                bits = (table.to(tl.float32).to(tl.int32, bitcast=True) >> 16) & 0xFFFF
            else:
                bits = table.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            pairs = tl.gather(bits, i256 >> 4, 0) | (tl.gather(bits, i256 & 0xF, 0) << 16)  # (256,) int32
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for kb in tl.range(lo, hi, NB, num_stages=STAGES):  # STAGES > 1：流水线预取后面几步的字节（GATHER_NOTE）
            b_ok = kb + hb // HALF < hi  # (BH,)
            q = tl.load(q_rows + kb * HALF + hb[None, :], mask=n_ok[:, None] & b_ok[None, :],
                        other=0).to(tl.int32)  # (BLOCK_N, BH)
            if NB == 1:
                scale = tl.load(A + s * a_s + n * blocks + kb, mask=n_ok, other=0.0)[:, None]
            else:
                scale = tl.load(A + s * a_s + n[:, None] * blocks + (kb + hb // HALF)[None, :],
                                mask=n_ok[:, None] & b_ok[None, :], other=0.0)
            if ABLATE == 1:
                acc += tl.sum(q.to(tl.float32) * scale, axis=1)[:, None]
            else:
                if PAIR:  # 每个字节一次查表，两半截成 16 位再按位转回 x 的精度（与分两次查的码值逐位相同）
                    pr = tl.reshape(tl.gather(pairs, tl.reshape(q, (BLOCK_N * BH,)), 0), (BLOCK_N, BH))
                    if FIX:  # 解释器的 bf16：16 位放进 float32 的高半（值正好是那个 bf16），再转精度（精确）
                        w_hi = (pr << 16).to(tl.float32, bitcast=True).to(X.dtype.element_ty)
                        w_lo = (pr & -65536).to(tl.float32, bitcast=True).to(X.dtype.element_ty)
                    else:
                        w_hi = pr.to(tl.int16).to(X.dtype.element_ty, bitcast=True)
                        w_lo = (pr >> 16).to(tl.int16).to(X.dtype.element_ty, bitcast=True)
                elif GATHER:  # tl.gather 查表（GATHER_NOTE）：按一维取值再变回 (BLOCK_N, BH)
                    w_hi = tl.reshape(tl.gather(table, tl.reshape(q >> 4, (BLOCK_N * BH,)), 0), (BLOCK_N, BH))
                    w_lo = tl.reshape(tl.gather(table, tl.reshape(q & 0xF, (BLOCK_N * BH,)), 0), (BLOCK_N, BH))
                else:
                    w_hi = tl.load(CODE + (q >> 4))
                    w_lo = tl.load(CODE + (q & 0xF))
                if not SCALE_AFTER:  # 乘块尺度、转成 x 的精度（dotA 的码值已是 x 的精度，尺度乘在点积后：SCALE_NOTE）
                    w_hi = _rtne(w_hi * scale, FIX).to(X.dtype.element_ty)
                    w_lo = _rtne(w_lo * scale, FIX).to(X.dtype.element_ty)
                w = tl.reshape(tl.join(w_hi, w_lo), (BLOCK_N, BK))
                if SCALE_AFTER:  # 这一步的乘积从零开始，乘上块尺度再加进累加器
                    part = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
                else:
                    part = acc
                if ABLATE == 2:
                    part += tl.sum(w.to(tl.float32), axis=1)[:, None]
                else:
                    k_ok = kb + kk // BLOCKSIZE < hi
                    xt = tl.load(x_cols + kb * BLOCKSIZE + kk[:, None], mask=k_ok[:, None] & m_ok[None, :],
                                 other=0.0)  # (BK, BLOCK_M)
                    if IEEE:
                        part = tl.dot(w.to(tl.float32), xt.to(tl.float32), part, input_precision="ieee")
                    else:
                        part = tl.dot(w, xt, part)
                if SCALE_AFTER:
                    acc += part * scale
                else:
                    acc = part
        mask = n_ok[:, None] & m_ok[None, :]
        if SPLIT_K == 1:
            tl.store(OUT + s * o_s + m[None, :] * o_m + n[:, None], _rtne(acc, FIX).to(OUT.dtype.element_ty), mask=mask)
        else:
            tl.store(PART + ((pid_k * tl.num_programs(2) + s) * M + m[None, :]) * N + n[:, None], acc, mask=mask)

    @triton.jit
    def nf4_split_sum(PART, OUT, total, SPLIT_K, BLOCK: tl.constexpr, FIX: tl.constexpr):
        # 把 K 段的部分和 PART (SPLIT_K, S·M·N) float32 按固定顺序相加（确定性），转成输出精度写进 OUT (S·M·N)。
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < total
        acc = tl.zeros([BLOCK], tl.float32)
        # 段数是运行时参数（SPLIT_K_NOTE），但每 16 段展开成 16 条互不依赖的 load（段数之外的 mask 掉，加 0.0）：
        # 逐段的 range 循环里每条 load 要等上一条加完才发出，16 段就是 16 次访存延迟——d48920c 的剖析（H200）里
        # 这个 kernel 在批 16 每步 192 次共 1.07 ms（每次 5.6 µs，占整步 13%）。相加仍按 p = 0, 1, … 的固定顺序。
        for p0 in range(0, SPLIT_K, 16):
            for p in tl.static_range(16):
                acc += tl.load(PART + (p0 + p) * total + i, mask=ok & (p0 + p < SPLIT_K), other=0.0)
        tl.store(OUT + i, _rtne(acc, FIX).to(OUT.dtype.element_ty), mask=ok)

    def nf4_linear_fake(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                        n: int, blocksize: int, kernel: int, block_m: int, block_n: int, nb: int, split_k: int,
                        num_warps: int, num_stages: int, ablate: int, partials: bool) -> torch.Tensor:
        """编译追踪时的形状：(S, M, N)，x 的精度（本体的输出）；partials 时是 float32 部分和 (split_k, S, M, N)。"""
        if partials:
            return x.new_empty((split_k, x.shape[0], x.shape[1], n), dtype=torch.float32)
        return x.new_empty((x.shape[0], x.shape[1], n))

    register, launch = kernel_op("steer::nf4_linear", nf4_linear_fake)

    @register
    def nf4_linear_op(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                      n: int, blocksize: int, kernel: int, block_m: int, block_n: int, nb: int, split_k: int,
                      num_warps: int, num_stages: int, ablate: int, partials: bool) -> torch.Tensor:
        """算子本体（参数已由 _launch 核对）：x (S, M, K)，按行打包的 qweight (S, N, K/2)、absmax (S, N, K/bs)，
        n = N → (S, M, N)，x 的精度。kernel：KERNELS 里方式的编号（0 / 2 = nf4_gemv，1 / 3 / 6 / 7 = nf4_dot_t，
        4 / 8 = nf4_gemv_w（8 按字节成对查表，PAIR_NOTE）；2 / 3 / 6 / 7 用 tl.gather 查表、num_stages > 1 时流水线，GATHER_NOTE；
        6 / 7 把块尺度乘在 tl.dot 之后，SCALE_NOTE；7 按字节成对查表，PAIR_NOTE）；
        ablate：0 = 正常的乘积，1 / 2 = 诊断用的部分计算（ABLATE_NOTE）。
        split_k > 1 时另分配 float32 部分和 (split_k, S, M, N)；partials（只在 split_k > 1 时为真，SPLIT_SUM_NOTE）时
        不发求和的 kernel，直接返回部分和，由调用者在图里相加。"""
        stacks, rows, k = x.shape
        out = torch.empty((stacks, rows, n), dtype=x.dtype, device=x.device)
        part = torch.empty((split_k, stacks, rows, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
        fix = INTERPRETED and x.dtype == torch.bfloat16
        if kernel in (0, 2, 4, 8):  # M = 1：gemvR / gemvG（nf4_gemv，GATHER_NOTE）、gemvW / gemvB（nf4_gemv_w）
            fn, variant = ((nf4_gemv_w, {"PAIR": kernel == 8}) if kernel in (4, 8)
                           else (nf4_gemv, {"GATHER": kernel == 2}))
            launch(fn)[(triton.cdiv(n, block_n), split_k, stacks)](
                x, qweight, absmax, code, out, part, n, k, x.stride(0), qweight.stride(0), absmax.stride(0),
                out.stride(0), BLOCKSIZE=blocksize, BLOCK_N=block_n, NB=nb, SPLIT_K=split_k, FIX=fix,
                ABLATE=ablate, STAGES=1 if kernel == 0 else num_stages, num_warps=num_warps, num_stages=num_stages,
                **variant)
        else:  # dotT / dotG / dotA / dotB
            launch(nf4_dot_t)[(triton.cdiv(rows, block_m) * triton.cdiv(n, block_n), split_k, stacks)](
                x, qweight, absmax, code, out, part, rows, n, k, x.stride(0), x.stride(1), qweight.stride(0),
                absmax.stride(0), out.stride(0), out.stride(1), BLOCKSIZE=blocksize, BLOCK_M=block_m,
                BLOCK_N=block_n, NB=nb, SPLIT_K=split_k, IEEE=x.dtype == torch.float32 or INTERPRETED, FIX=fix,
                ABLATE=ablate, GATHER=kernel in (3, 6, 7), STAGES=num_stages if kernel in (3, 6, 7) else 1,
                SCALE_AFTER=kernel in (6, 7), PAIR=kernel == 7, num_warps=num_warps, num_stages=num_stages)
        if partials:
            return part
        if split_k > 1:
            total = stacks * rows * n
            launch(nf4_split_sum)[(triton.cdiv(total, 1024),)](part, out, total, SPLIT_K=split_k, BLOCK=1024,
                                                                     FIX=fix, num_warps=4)
        return out

    # 给静态剖析（benchmarks/sass_nf4.py：不用 GPU，按真实启动的特化编译成 sm_90 机器码数指令）用的 kernel 本体
    JIT_KERNELS.update(nf4_gemv=nf4_gemv, nf4_gemv_w=nf4_gemv_w, nf4_dot_t=nf4_dot_t, nf4_split_sum=nf4_split_sum)
    return nf4_linear_op


def nf4_linear_stacked(x: torch.Tensor, w: NF4Weight, split_k: int | None = None,
                       config: tuple[str, int, int, int, int, int] | None = None, ablate: int = 0) -> torch.Tensor:
    """S 个模型各自的 x @ Wᵀ 一次发射：x (S, M, K) bf16/fp16/fp32（最后一维连续），w 叠好的（stack_nf4，前导维 S）
    → (S, M, N)，x 的精度，float32 累加。程序网格的第三维是 S（StackedLlama._linear 的 bmm 的 4 位版本）。

    split_k None = split_k_for 按 SM 数选；config None = config_for(M)（测试用这两个参数强制走某条路径）。
    ablate ≠ 0 只给诊断（benchmarks/micro_nf4.py --ablate）：kernel 只做一部分计算，结果不是乘积（ABLATE_NOTE）。
    """
    if not w.stacked:
        raise ValueError("nf4_linear_stacked: expects a stacked weight (leading dimension S) from stack_nf4; "
                         "use nf4_linear for a single weight")
    if x.dim() != 3 or x.shape[0] != w.qweight.shape[0]:
        raise ValueError(f"nf4_linear_stacked: x must be (S, M, K) with S = {w.qweight.shape[0]} stacked weights, "
                         f"got shape {tuple(x.shape)}")
    return _launch(x, w, split_k, config, ablate)


def nf4_linear(x: torch.Tensor, w: NF4Weight, split_k: int | None = None,
               config: tuple[str, int, int, int, int, int] | None = None) -> torch.Tensor:
    """x @ Wᵀ：x (M, K) bf16/fp16/fp32（最后一维连续），w 单个 NF4Weight（N 个输出）→ (M, N)，x 的精度。
    参数同 nf4_linear_stacked。在 torch.compile 的区域里用之前，先在区域外调用一次 load_nf4_kernels()
    （或先 eager 调用一次本函数）：算子在那时注册。"""
    if w.stacked:
        raise ValueError("nf4_linear: got a stacked weight; use nf4_linear_stacked with x of shape (S, M, K)")
    if x.dim() != 2:
        raise ValueError(f"nf4_linear: x must be 2-D (M, K), got shape {tuple(x.shape)}; flatten leading dimensions")
    return _launch(x[None], as_stacked(w), split_k,
                   config)[0]


def _launch(x: torch.Tensor, w: NF4Weight, split_k: int | None, config: Config | None,
            ablate: int = 0) -> torch.Tensor:
    """核对输入后经 torch.ops 调用算子。x (S, M, K)；w 叠好的（前导维 S）。ablate 见 ABLATE_NOTE。"""
    stacks, rows, k = x.shape
    if x.dtype not in DTYPES:
        raise ValueError(f"nf4 linear: x dtype must be bfloat16, float16 or float32, got {x.dtype}")
    if k != w.in_features:
        raise ValueError(f"nf4 linear: x has K = {k} columns but the weight has in_features = {w.in_features}")
    n, blocks = w.out_features, k // w.blocksize
    if (k % w.blocksize or w.blocksize % 32 or w.qweight.shape[1:] != (n, k // 2)
            or w.absmax.shape[1:] != (n, blocks)):
        raise ValueError(f"nf4 linear: K = {k} must be a multiple of blocksize = {w.blocksize} (a multiple of 32) and "
                         f"the weight must be in the layout of repack_nf4 (qweight (N, K/2), absmax (N, K/blocksize)); "
                         f"got qweight {tuple(w.qweight.shape)}, absmax {tuple(w.absmax.shape)}, N = {n}")
    if w.qweight.dtype != torch.uint8 or w.absmax.dtype != torch.float32 or w.code.dtype != torch.float32:
        raise ValueError("nf4 linear: weight must hold uint8 qweight, float32 absmax and a float32 code table "
                         f"(got {w.qweight.dtype}, {w.absmax.dtype}, {w.code.dtype}); build it with repack_nf4")
    if not (w.qweight.is_contiguous() and w.absmax.is_contiguous() and w.code.is_contiguous()):
        raise ValueError("nf4 linear: weight tensors must be contiguous; build the weight with repack_nf4/stack_nf4 "
                         "or call .contiguous() on its tensors")
    if x.stride(-1) != 1:
        raise ValueError(f"nf4 linear: x must be contiguous in its last dimension (strides {tuple(x.stride())}); "
                         "call x.contiguous()")
    if not (x.device == w.qweight.device == w.absmax.device == w.code.device):
        raise ValueError(f"nf4 linear: x on {x.device} but weight on {w.qweight.device}; move them to one device")
    tuned = _TUNED.get((stacks, n, k, rows, x.dtype)) if config is None and split_k is None else None
    if tuned is not None:
        config, split_k = tuned
    if ablate not in (0, 1, 2):
        raise ValueError(f"nf4 linear: ablate must be 0 (the product), 1 (bytes and scales only) or 2 (plus the "
                         f"table lookups), got {ablate}")
    if (config or config_for(rows))[0] == "bnb":
        if ablate:
            raise ValueError("nf4 linear: ablate applies to this module's Triton kernels, not to method 'bnb'")
        return _bnb_matmul(x, w)
    method, block_m, block_n, nb, warps, stages = config or config_for(rows)
    if method not in KERNELS:
        raise ValueError(f"nf4 linear: unknown method {method!r}; expected one of {', '.join(KERNELS)} or 'bnb'")
    gemv = method in GEMV_METHODS
    if gemv and rows != 1:
        raise ValueError(f"nf4 linear: the {method!r} kernel handles M = 1 only, got M = {rows}")
    nb = min(nb, triton_next_power_of_2(blocks))
    if method == "dotB" and x.dtype == torch.float32:
        raise ValueError("nf4 linear: method 'dotB' packs two 16-bit code values into one table entry, so it needs "
                         "bfloat16 or float16 activations; use 'dotA' (the same arithmetic) for float32")
    if method in ("dotA", "dotB") and nb != 1:
        raise ValueError(f"nf4 linear: method {method!r} scales each step's product by one block scale, so it needs "
                         f"NB = 1 (one block per step), got NB = {nb}")
    if split_k is None:
        split_k = _split_k(x, w, rows, block_m, block_n, nb, gemv)
    split_k = max(1, min(split_k, -(-blocks // nb)))
    if not torch.compiler.is_compiling():
        load_nf4_kernels()  # 编译区域里 dynamo 追踪不了 kernel 的定义：那里要求算子已经注册过
    if fast.SPLIT_SUM not in fast.SPLIT_SUM_MODES:
        raise ValueError(f"fast.SPLIT_SUM={fast.SPLIT_SUM!r}: must be one of {', '.join(fast.SPLIT_SUM_MODES)}")
    # SPLIT_SUM_NOTE："graph" 且在编译区域里时，部分和在图里相加，让 inductor 并进下一个 kernel
    partials = split_k > 1 and fast.SPLIT_SUM == "graph" and torch.compiler.is_compiling()
    # 经 torch.ops 调用：编译区域里 dynamo 只看到一个已注册的算子
    y = torch.ops.steer.nf4_linear(x, w.qweight, w.absmax, w.code, n, w.blocksize, KERNELS[method], block_m,
                                   block_n, nb, split_k, warps, stages, ablate, partials)
    return y.sum(0).to(x.dtype) if partials else y


def tune_candidates(rows: int, dtype: torch.dtype) -> list[Config]:
    """调优要计时的本模块配置（bitsandbytes 另算）：每种方式的表里每项 (BLOCK_N, NB, num_warps, num_stages) 前面加上
    方式与 BLOCK_M。M = 1 是四种 gemv（gemvB 用 gemvW 的块形）；M > 1 是 dotT / dotG / dotA，x 是 16 位时再加 dotB（float32 放不进成对的表，
    PAIR_NOTE）。BLOCK_M = M 向上取到 2 的幂，夹在 [16, 64]。"""
    if rows == 1:
        tables = (("gemvR", TUNE_GEMV_R), ("gemvG", TUNE_GEMV_G), ("gemvW", TUNE_GEMV_W), ("gemvB", TUNE_GEMV_W))
    else:
        tables = (("dotT", TUNE_DOT_T), ("dotG", TUNE_DOT_G), ("dotA", TUNE_DOT_A)) + (
            (("dotB", TUNE_DOT_A),) if dtype != torch.float32 else ())
    bm = 1 if rows == 1 else max(16, min(64, triton_next_power_of_2(rows)))
    return [(method, bm, *c) for method, table in tables for c in table]


def _split_k(x: torch.Tensor, w: NF4Weight, rows: int, block_m: int, block_n: int, nb: int, gemv: bool,
             per_sm: int | None = None) -> int:
    """split_k_for 的调用：程序数 = S × m 块 × n 块；GEMV 默认 per_sm = 8，tl.dot 默认 4。"""
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    programs = x.shape[0] * (1 if gemv else -(-rows // block_m)) * -(-w.out_features // block_n)
    return split_k_for(programs, -(-(w.in_features // w.blocksize) // nb), sms,
                       per_sm=per_sm or (8 if gemv else 4))


def tune_nf4(weights: Sequence[NF4Weight], rows: int, dtype: torch.dtype, reps: int = 20) -> dict[str, Any]:
    """CUDA 上为每个权重形状 (S, N, K) 与激活行数 rows 实测候选配置，把最快的记进 _TUNED（之后 _launch 自动用）。

    为什么：最快的 (BLOCK_N, NB, num_warps, split-K) 随形状、M 与 GPU 变化，一张手写的表不可能处处最好
    （triton.autotune 的做法，但在编译区域之外、显式地做：torch.compile 追踪时配置已经是常量）。
    候选：本模块的 kernel（M = 1：gemvR、gemvG、gemvW；M > 1：dotT、dotG；各种块大小与 split-K）与 bitsandbytes 自己的 matmul_4bit（装了时；
    选中它的形状就与 bitsandbytes 的原路径一样快）。每个候选先与参照（bitsandbytes 的结果）比一次，偏离的不要。
    每个形状轮流用几份拷贝（合计 ≥ 128 MiB，大于 H200 的 50 MB L2，不让小权重一直命中 L2——解码时每层的权重只读一次），
    CUDA event 计时 reps 次取中位数。同一 (形状, M, dtype) 只调一次。返回 {形状: 报告}（给基准记录；已调过的形状也返回）。
    CPU 上不计时（解释器的速度没有意义）。报告的每项：{config, split_k, us, us_by_method}。
    设了调优缓存（use_tuning_cache）时，先查缓存：与本机指纹相符的记录直接用（报告带 "cached": true，CPU 上也用），
    新计时的结果写回缓存。见 TUNING_CACHE_NOTE。
    """
    report: dict[str, Any] = {}
    for w in weights:
        stacked = as_stacked(w)
        s, n, k = stacked.qweight.shape[0], w.out_features, w.in_features
        key = (s, n, k, rows, dtype)
        name = _name(s, n, k, rows)
        if key in _TUNED_REPORT:
            report[name] = _TUNED_REPORT[key]
        if key in _TUNED:
            continue
        cache_name = _full_name(key)
        if _CACHE_PATH is not None:  # 缓存里有这台 GPU、这套版本上的选择：直接用（见 TUNING_CACHE_NOTE）
            cached = _cache_entries(stacked.qweight.device).get(cache_name)
            if cached is not None and not _valid_entry(cached):
                warnings.warn(f"NF4 tuning cache {_CACHE_PATH}: the entry for {cache_name} is malformed ({cached!r:.120}); "
                              "it is timed again and replaced")
                cached = None
            if cached is not None:
                _TUNED[key] = (tuple(cached["config"]), int(cached["split_k"]))  # type: ignore[assignment]
                _TUNED_REPORT[key] = report[name] = {**cached, "cached": True}
                continue
        if not stacked.qweight.is_cuda:
            continue
        copies = max(1, min(16, -(-128 * 2**20 // max(1, stacked.nbytes))))
        use_bnb = HAS_BNB
        clones = [dataclasses.replace(stacked, qweight=stacked.qweight.clone(), absmax=stacked.absmax.clone(), states=())
                  for _ in range(copies - 1)]
        sets = [with_bnb_states(ws) if use_bnb else ws for ws in [stacked, *clones]]
        x = torch.randn(s, rows, k, dtype=dtype, device=stacked.qweight.device)
        candidates = tune_candidates(rows, dtype)
        bnb_cfg: Config = ("bnb", 0, 0, 0, 0, 0)
        # 正确性的参照：bitsandbytes 的结果（没装或它在这里出错时用本模块默认配置的）；偏离它的候选不参加比较
        results: list[tuple[float, Config, int]] = []
        reference = None
        if use_bnb:
            try:
                reference = _launch(x, sets[0], 1, bnb_cfg).float()
                results.append((graph_time_us([lambda ws=ws: _launch(x, ws, 1, bnb_cfg) for ws in sets], reps), bnb_cfg, 1))
            except Exception as exc:  # noqa: BLE001 —— 不让 bitsandbytes 的问题拖垮启动：只是少一个候选，并说出来
                warnings.warn(f"tune_nf4: bitsandbytes' matmul_4bit failed for S={s}, N={n}, K={k}, M={rows} "
                              f"({type(exc).__name__}: {exc}); timing the Triton kernels only")
        if reference is None:
            fallback: Config = config_for(rows) if rows <= BNB_ROWS else NF4_CONFIGS[-1][1:]  # type: ignore[assignment]
            reference = _launch(x, sets[0], None, fallback).float()
        for cfg in candidates:
            nb = min(cfg[3], triton_next_power_of_2(k // w.blocksize))
            splits = {_split_k(x, stacked, rows, cfg[1], cfg[2], nb, cfg[0] in GEMV_METHODS, p)
                      for p in TUNE_PER_SM}
            for split in sorted(splits):
                try:
                    y = _launch(x, sets[0], split, cfg).float()
                    if ((y - reference).norm() / reference.norm().clamp_min(1e-30)).item() > 1e-2:
                        warnings.warn(f"tune_nf4: config {cfg} split {split} disagrees with the reference for "
                                      f"S={s}, N={n}, K={k}, M={rows}; skipped")
                        continue
                    us = graph_time_us([lambda ws=ws: _launch(x, ws, split, cfg) for ws in sets], reps)
                except Exception:  # noqa: BLE001 —— 个别配置编译不了（寄存器/共享内存超限）：跳过它
                    continue
                results.append((us, cfg, split))
        if not results:
            raise RuntimeError(f"tune_nf4: no candidate configuration ran for S={s}, N={n}, K={k}, M={rows}")
        best = min(results, key=lambda r: r[0])
        _TUNED[key] = (best[1], best[2])
        by_method: dict[str, float] = {}  # 每种方式最快的微秒数（看各 kernel 之间差多少）
        for us, cfg, _ in results:
            by_method[cfg[0]] = round(min(us, by_method.get(cfg[0], math.inf)), 2)
        _TUNED_REPORT[key] = report[name] = {"config": list(best[1]), "split_k": best[2], "us": round(best[0], 2),
                                             "us_by_method": by_method}
        _store(cache_name, report[name])  # 设了缓存时写回（上面查缓存时已读过文件）
    return report


def graph_time_us(calls: Sequence[Callable[[], Any]], reps: int, mean: bool = False) -> float:
    """轮流调用 calls（不同地址的同形状权重）：全部录进一个 CUDA graph，重放 reps 次，CUDA event 计时，
    返回每次调用的中位微秒数（mean=True：一对 event 包住全部重放，取平均——benchmarks/micro_attn.py 与
    micro_layout.py 发表的数字是这个口径）。为什么录图：单次调用只有十几微秒，Python 里的核对与发射比 GPU 上的
    kernel 还慢，逐次计时量到的是主机开销。录图前先在默认流与一条侧流上各跑一遍（Triton 编译、cuBLAS 句柄与工作区等
    懒初始化不能发生在录制里，PyTorch 的 CUDA graph 文档这样建议）。tune_nf4 与各微基准共用这一个计时器。"""
    for c in calls:
        c()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    if mean:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / (reps * len(calls))
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def triton_next_power_of_2(n: int) -> int:
    """不小于 n 的 2 的幂（不导入 triton 的 next_power_of_2）。"""
    return 1 << max(0, math.ceil(math.log2(max(1, n))))
