"""fast/nf4.py 的测试：NF4 的重排 / 参考反量化 / 纯 torch 量化器与 bitsandbytes 逐位一致；Triton kernel
（CPU 上由解释器执行，conftest 设了 TRITON_INTERPRET=1）与“反量化 + float32 矩阵乘”一致；叠加版本 == 逐模型调用；
输入不合规时报错。GPU 上编译出的 kernel 由 benchmarks/micro_nf4.py 检查（每个形状都比较一次）。
形状都很小：解释器逐程序执行，很慢。
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from typing import Any, Callable

import pytest
import torch

from fast.nf4 import (NF4Weight, as_stacked, cat_nf4, dequantize_nf4, dynamic_map, nf4_linear, nf4_linear_stacked,
                      quantize_nf4_reference, repack_nf4, stack_nf4, with_bnb_states)

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="没有 bitsandbytes")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="没有 triton 包（.ci/run 会安装它，用解释器在 CPU 上跑 kernel）")

# 每种激活精度的相对误差上界（‖y − ref‖ / ‖ref‖，ref 为 float32 的“反量化 + 矩阵乘”，x 取同一个舍入后的值）：
# float32 只差求和顺序；bf16/fp16 还有权重转成 x 精度的舍入与输出舍入（bf16 约 2⁻⁹）。
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def interpreted_triton() -> None:
    """Triton kernel 在 CPU 上由解释器执行：conftest 在导入 triton 之前设了 TRITON_INTERPRET=1。"""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET 不是 1：kernel 要编译给 GPU，CPU 测试跑不了")


def _nf4(n: int, k: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16, blocksize: int = 64) -> NF4Weight:
    """随机 (n, k) 权重经纯 torch 量化器量化（双重量化）再重排。"""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(dtype)
    return repack_nf4(*quantize_nf4_reference(w, blocksize=blocksize))


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


# ---------------------------------------------------------------------------------------------------------------
# 纯 torch 部分 vs bitsandbytes
# ---------------------------------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("n, k, blocksize", [(96, 128, 64), (40, 320, 64), (8, 1024, 128), (72, 64, 32)])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_repack_dequantize_equals_bitsandbytes(n: int, k: int, blocksize: int, nested: bool,
                                              dtype: torch.dtype) -> None:
    """bitsandbytes 量化的权重：repack_nf4 + dequantize_nf4 与 bitsandbytes 的 dequantize_4bit 逐位相同。"""
    import bitsandbytes.functional as bnbf

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).to(dtype)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=nested)
    nf4 = repack_nf4(packed, state)
    assert nf4.qweight.shape == (n, k // 2) and nf4.absmax.shape == (n, k // blocksize)
    assert nf4.qweight.data_ptr() == packed.data_ptr()  # 是 bitsandbytes 数据的视图：4 位权重不多一份
    assert (nf4.out_features, nf4.in_features) == (n, k)
    assert nf4.nbytes == n * (k // 2 + k // blocksize * 4)
    ref = bnbf.dequantize_4bit(packed, state)
    out = dequantize_nf4(nf4)
    assert out.dtype == ref.dtype == dtype
    assert torch.equal(out, ref)


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
def test_reference_quantizer_equals_bitsandbytes(dtype: torch.dtype, nested: bool) -> None:
    """quantize_nf4_reference 与 bitsandbytes 的 quantize_4bit 相同：打包字节、(嵌套时) offset 与第二层 absmax
    逐位相同。嵌套的 uint8 absmax 也逐位相同，只有落在两个表项中点附近（相差不到表项间距的 1%）的个别值可以差
    一格：bitsandbytes 在 CPU 上用 C 库的近似二分查找，不总是取最近的表项（GPU 上的 CUDA kernel 又是另一种查找）。"""
    import bitsandbytes.functional as bnbf

    w = torch.randn(192, 320, generator=torch.Generator().manual_seed(1)).to(dtype)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=nested)
    mine, my_state = quantize_nf4_reference(w, blocksize=64, compress_statistics=nested)
    assert torch.equal(mine, packed) and mine.shape == packed.shape == (192 * 320 // 2, 1)
    assert torch.equal(my_state.code, state.code)
    assert my_state.shape == state.shape and my_state.dtype == state.dtype and my_state.nested == nested
    if not nested:
        assert torch.equal(my_state.absmax, state.absmax)
        return
    assert torch.equal(my_state.offset, state.offset)
    assert torch.equal(my_state.state2.code, state.state2.code) and torch.equal(dynamic_map(), state.state2.code)
    assert torch.equal(my_state.state2.absmax, state.state2.absmax)
    diff = my_state.absmax.int() - state.absmax.int()
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 0.02
    # 不同的那几个：缩放后的值离两个表项的中点不到间距的 1%
    code = state.state2.code
    raw = w.float().reshape(-1, 64).abs().amax(-1) - state.offset
    scaled = raw / state.state2.absmax.repeat_interleave(256)[: raw.numel()]
    for i in diff.nonzero().flatten().tolist():
        a, b = code[my_state.absmax[i].long()], code[state.absmax[i].long()]
        assert abs(scaled[i] - (a + b) / 2) < 0.01 * abs(a - b)


def test_repack_refuses_bad_input() -> None:
    """K 不是 blocksize 的倍数（块跨行）、字节数不符、非 NF4 时报错并说明原因。"""
    packed, state = quantize_nf4_reference(torch.randn(4, 96), blocksize=64)  # 384 个元素 = 6 块，但每行 96
    with pytest.raises(ValueError, match="not a multiple of blocksize"):
        repack_nf4(packed, state)
    packed, state = quantize_nf4_reference(torch.randn(8, 128))
    with pytest.raises(ValueError, match="packed bytes"):
        repack_nf4(packed[:-2], state)
    with pytest.raises(ValueError, match="contiguous"):
        repack_nf4(torch.stack([packed, packed], 1)[:, 0], state)
    state.quant_type = "fp4"
    with pytest.raises(ValueError, match="nf4"):
        repack_nf4(packed, state)


def test_cat_and_stack_layouts() -> None:
    """cat_nf4 沿输出维拼接 == 反量化后拼接；
    stack_nf4 多一个前导维，逐个反量化相同。"""
    a, b = _nf4(64, 128, seed=1), _nf4(32, 128, seed=2)
    ab, ba = cat_nf4([a, b]), cat_nf4([b, a])
    assert torch.equal(dequantize_nf4(ab), torch.cat([dequantize_nf4(a), dequantize_nf4(b)]))
    assert torch.equal(dequantize_nf4(ba), torch.cat([dequantize_nf4(b), dequantize_nf4(a)]))
    assert ba.out_features == 96 and ba.qweight.shape == (96, 64) and ba.absmax.shape == (96, 2)
    c = _nf4(64, 128, seed=3)
    stacked = stack_nf4([a, c])
    assert stacked.stacked and stacked.qweight.shape == (2, 64, 64) and stacked.absmax.shape == (2, 64, 2)
    assert torch.equal(dequantize_nf4(stacked), torch.stack([dequantize_nf4(a), dequantize_nf4(c)]))
    with pytest.raises(ValueError, match="out_features differ"):
        stack_nf4([a, b])
    with pytest.raises(ValueError, match="in_features"):
        cat_nf4([a, _nf4(64, 256)])


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel（解释器）
# ---------------------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("m, n, k, split_k", [
    (1, 80, 256, None),   # GEMV，N 不是 2 的幂、不满一块
    (1, 64, 512, 3),      # GEMV + 切 K（最后一段不满）+ 合并
    (3, 96, 128, None),   # tl.dot，M 不满一块
    (16, 48, 192, 2),     # tl.dot + 切 K
    (33, 72, 128, 1),     # 两个 M 块
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_matches_dequantize_matmul(interpreted_triton: None, m: int, n: int, k: int,
                                              split_k: int | None, dtype: torch.dtype) -> None:
    """nf4_linear == x @ dequantize(W)ᵀ（float32，x 先舍入到 dtype）：误差在 TOLERANCE 内，输出为 x 的精度。"""
    w = _nf4(n, k, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    ref = x.float() @ dequantize_nf4(dataclasses.replace(w, dtype=torch.float32)).T
    y = nf4_linear(x, w, split_k=split_k)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _relative_error(y, ref) < TOLERANCE[dtype]


@needs_triton
def test_nf4_linear_fp16_blocksize_128_and_config(interpreted_triton: None) -> None:
    """fp16 激活、blocksize 128；显式 config 走 tl.dot 的多块步（NB = 2）与 GEMV 的多块步。"""
    w = _nf4(40, 512, seed=5, blocksize=128)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(0)).half()
    ref = x.float() @ dequantize_nf4(dataclasses.replace(w, dtype=torch.float32)).T
    assert _relative_error(nf4_linear(x, w), ref) < TOLERANCE[torch.float16]
    y = nf4_linear(x, w, config=("dotT", 16, 128, 2, 4, 1), split_k=1)
    assert _relative_error(y, ref) < TOLERANCE[torch.float16]
    y1 = nf4_linear(x[:1], w, config=("gemvR", 1, 64, 2, 4, 1), split_k=2)
    assert _relative_error(y1, ref[:1]) < TOLERANCE[torch.float16]
    y1 = nf4_linear(x[:1], w, config=("gemvR", 1, 16, 4, 2, 1), split_k=1)  # BLOCK_N 小于 N：三个 n 块，最后一块不满
    assert _relative_error(y1, ref[:1]) < TOLERANCE[torch.float16]


# 结果必须逐位相同的孪生方式：tl.gather 查表的方式 → 经 L1 查表的同一 kernel（GATHER_NOTE：只有查表的做法不同）；
# 按字节成对查表的 dotB → dotA（PAIR_NOTE：同样的码值、同样的点积与乘尺度）
TWIN: dict[str, str] = {"gemvG": "gemvR", "dotG": "dotT", "dotB": "dotA"}


def _check_stacked_product(x: torch.Tensor, ws: list[NF4Weight], y: torch.Tensor,
                           cfg: tuple[str, int, int, int, int, int], split_k: int) -> None:
    """叠加的乘积 y (S, M, N)（x (S, M, K) 乘 stack_nf4(ws)，配置 cfg）逐个模型核对：与“反量化 + float32 矩阵乘”
    的相对误差在 x 精度的容差内，与单个权重的同一配置逐位相同；有孪生方式的（TWIN）还与孪生逐位相同。"""
    for s in range(len(ws)):
        ref = x[s].float() @ dequantize_nf4(dataclasses.replace(ws[s], dtype=torch.float32)).T
        assert _relative_error(y[s], ref) < TOLERANCE[x.dtype]
        assert torch.equal(nf4_linear(x[s], ws[s], config=cfg, split_k=split_k), y[s])
    if cfg[0] in TWIN:
        twin = (TWIN[cfg[0]], *cfg[1:])
        assert torch.equal(nf4_linear_stacked(x, stack_nf4(ws), config=twin, split_k=split_k), y)


@needs_triton
@pytest.mark.parametrize("method, n, k, blocksize, block_n, nb, split_k", [
    ("gemvR", 80, 768, 64, 16, 8, 1),     # 12 块、NB = 8：第二步的后 4 块被 mask 掉；N 不满最后一块
    ("gemvR", 40, 1024, 128, 8, 2, 1),    # blocksize 128，多步
    ("gemvR", 64, 2048, 64, 16, 4, 3),    # 切 K（最后一段不满）+ 合并
    ("gemvR", 48, 320, 64, 16, 1, 4),     # 5 块切 4 段：最后一段为空
    ("gemvR", 32, 1344, 64, 16, 1, 20),   # 20 段：nf4_split_sum 每遍展开 16 段，第二遍带 mask（后几段为空）
    ("gemvG", 80, 768, 64, 16, 8, 1),     # tl.gather 查表（GATHER_NOTE）：mask 掉的块、N 不满
    ("gemvG", 48, 320, 64, 16, 1, 4),     # 空的最后一段
    ("gemvW", 80, 768, 64, 16, 8, 1),     # 按 int32 字读（WORDS_NOTE）：mask 掉的块（x 的下标夹在界内）、N 不满
    ("gemvW", 40, 1024, 128, 8, 2, 1),    # blocksize 128（每块 16 个字），多步
    ("gemvW", 64, 2048, 64, 16, 4, 3),    # 切 K（最后一段不满）+ 合并
    ("gemvW", 48, 320, 64, 16, 1, 4),     # 空的最后一段
    ("gemvW", 24, 96, 32, 8, 4, 1),       # blocksize 32（每块 4 个字）
    ("gemvB", 80, 768, 64, 16, 8, 1),     # 按字节成对查表（PAIR_NOTE）：mask 掉的块、N 不满
    ("gemvB", 40, 1024, 128, 8, 2, 1),    # blocksize 128
    ("gemvB", 64, 2048, 64, 16, 4, 3),    # 切 K + 合并
    ("gemvB", 48, 320, 64, 16, 1, 4),     # 空的最后一段
    ("gemvB", 24, 96, 32, 8, 4, 1),       # blocksize 32
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_r_matches_dequantize_matmul(interpreted_triton: None, method: str, n: int, k: int, blocksize: int,
                                          block_n: int, nb: int, split_k: int, dtype: torch.dtype) -> None:
    """方式 "gemvR"（每步先沿块内字节求和再乘 absmax，累加器 (BLOCK_N, NB)）== x @ dequantize(W)ᵀ，单个与叠加都对；
    "gemvG"（同一 kernel，tl.gather 查表，GATHER_NOTE）、"gemvW"（按字读、按字累加，WORDS_NOTE）与 "gemvB"
    （gemvW 按字节成对查表，PAIR_NOTE）也一样。"""
    ws = [_nf4(n, k, seed=s + n, blocksize=blocksize) for s in range(2)]
    x = torch.randn(2, 1, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    cfg = (method, 1, block_n, nb, 4, 1)
    y = nf4_linear_stacked(x, stack_nf4(ws), config=cfg, split_k=split_k)
    assert y.shape == (2, 1, n) and y.dtype == dtype
    _check_stacked_product(x, ws, y, cfg, split_k)


@needs_triton
@pytest.mark.parametrize("method, m, n, k, blocksize, block_m, block_n, nb, split_k", [
    ("dotT", 3, 80, 256, 64, 16, 64, 1, 1),     # M 不满一块，N 不满最后一块
    ("dotT", 16, 48, 512, 128, 16, 16, 2, 1),   # NB = 2：每步两块的 absmax 按字节取
    ("dotT", 20, 64, 1024, 64, 16, 32, 1, 3),   # 两个 M 块 + 切 K（最后一段不满）+ 合并
    ("dotT", 5, 32, 320, 64, 16, 16, 1, 4),     # 5 块切 4 段：最后一段为空
    ("dotG", 3, 80, 256, 64, 16, 64, 1, 1),     # tl.gather 查表（GATHER_NOTE）
    ("dotG", 5, 32, 320, 64, 16, 16, 1, 4),
    ("dotA", 3, 80, 256, 64, 16, 64, 1, 1),     # 块尺度乘在 tl.dot 之后（SCALE_NOTE）
    ("dotA", 20, 64, 1024, 64, 16, 32, 1, 3),   # 两个 M 块 + 切 K + 合并
    ("dotA", 16, 48, 512, 128, 16, 16, 1, 1),   # blocksize 128：一步一个 128 的块
    ("dotB", 3, 80, 256, 64, 16, 64, 1, 1),     # 按字节成对查表（PAIR_NOTE）：与 dotA 逐位相同
    ("dotB", 20, 64, 1024, 64, 16, 32, 1, 3),   # 两个 M 块 + 切 K + 合并
    ("dotB", 16, 48, 512, 128, 16, 16, 1, 1),   # blocksize 128
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dot_kernels_match_dequantize_matmul(interpreted_triton: None, method: str, m: int, n: int, k: int,
                                             blocksize: int, block_m: int, block_n: int, nb: int, split_k: int,
                                             dtype: torch.dtype) -> None:
    """方式 "dotT"（按行向量读字节、join 交错高/低半字节、outᵀ = W·xᵀ）== x @ dequantize(W)ᵀ，单个与叠加都对；
    dotG / dotA / dotB 也一样。dotB 只接受 16 位的 x：float32 时报错说明（PAIR_NOTE），而不是算错。"""
    ws = [_nf4(n, k, seed=s + m, blocksize=blocksize) for s in range(2)]
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(k + m)).to(dtype)
    cfg = (method, block_m, block_n, nb, 4, 1)
    if method == "dotB" and dtype == torch.float32:
        with pytest.raises(ValueError, match="needs bfloat16 or float16 activations"):
            nf4_linear_stacked(x, stack_nf4(ws), config=cfg, split_k=split_k)
        return
    y = nf4_linear_stacked(x, stack_nf4(ws), config=cfg, split_k=split_k)
    assert y.shape == (2, m, n) and y.dtype == dtype
    _check_stacked_product(x, ws, y, cfg, split_k)


@needs_bnb
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bnb_method_matches_dequantize_matmul(m: int, dtype: torch.dtype) -> None:
    """方式 "bnb"（bitsandbytes 的 matmul_4bit，M = 1 时是它的 gemv）读本模块的打包字节与按行的 float32 absmax：
    单个与叠加的结果都与“反量化 + float32 矩阵乘”一致；QuantState 的 absmax 是视图，不是拷贝。"""
    ws = [_nf4(48, 128, seed=s) for s in range(2)]
    x = torch.randn(2, m, 128, generator=torch.Generator().manual_seed(m)).to(dtype)
    bnb_cfg = ("bnb", 0, 0, 0, 0, 0)
    stacked = with_bnb_states(stack_nf4(ws))
    assert stacked.states[1].absmax.data_ptr() == stacked.absmax[1].data_ptr()
    y = nf4_linear_stacked(x, stacked, config=bnb_cfg)
    assert y.shape == (2, m, 48) and y.dtype == dtype
    for s in range(2):
        ref = x[s].float() @ dequantize_nf4(dataclasses.replace(ws[s], dtype=torch.float32)).T
        assert _relative_error(y[s], ref) < TOLERANCE[dtype]
        assert _relative_error(nf4_linear(x[s], ws[s], config=bnb_cfg), ref) < TOLERANCE[dtype]


@needs_triton
@pytest.mark.parametrize("config, m, split_k", [
    (("gemvR", 1, 16, 8, 4, 1), 1, 1),
    (("gemvR", 1, 16, 4, 4, 1), 1, 3),    # 切 K + 合并
    (("dotT", 16, 32, 1, 4, 1), 5, 1),
    (("dotT", 16, 32, 2, 4, 1), 5, 2),    # 每步两块（absmax 按字节取）+ 切 K
    (("gemvG", 1, 16, 8, 4, 1), 1, 1),    # tl.gather 查表的两种 kernel：ablate 2 的查表也走 tl.gather
    (("dotG", 16, 32, 1, 4, 1), 5, 1),
    (("gemvW", 1, 16, 8, 4, 1), 1, 1),    # 按字读的 kernel：字节值与查表都从 int32 字里移位取出
    (("gemvW", 1, 16, 4, 4, 1), 1, 3),
    (("gemvB", 1, 16, 8, 4, 1), 1, 1),    # 成对查表的 kernel：ablate 2 的查表也是成对的
    (("gemvB", 1, 16, 4, 4, 1), 1, 3),
])
@pytest.mark.parametrize("ablate", [1, 2])
def test_ablated_kernels_compute_their_part(interpreted_triton: None, config: tuple[str, int, int, int, int, int],
                                            m: int, split_k: int, ablate: int) -> None:
    """诊断用的部分计算（ABLATE_NOTE）自身是对的：ablate 1 = Σ_块 absmax · Σ 字节值，ablate 2 = Σ_块 absmax ·
    Σ (code[高半字节] + code[低半字节])；两种 kernel 都对每个 m 输出同一个值（float32，叠加两个模型）。
    这样 micro_nf4 --ablate 的计时确实是“读全部字节与 absmax”“再加查表”这两部分的代价。"""
    ws = [_nf4(48, 512, seed=s + 7) for s in range(2)]
    stacked = stack_nf4(ws)
    x = torch.randn(2, m, 512, generator=torch.Generator().manual_seed(3))
    y = nf4_linear_stacked(x, stacked, config=config, split_k=split_k, ablate=ablate)
    q = stacked.qweight.reshape(2, 48, -1, 32).long()  # (S, N, 块, 字节)
    per_byte = q.double() if ablate == 1 else (stacked.code[q >> 4] + stacked.code[q & 0xF]).double()
    ref = (per_byte.sum(-1) * stacked.absmax.double()).sum(-1)  # (S, N)
    assert y.shape == (2, m, 48)
    for row in range(m):
        assert _relative_error(y[:, row], ref) < 1e-6


@needs_triton
def test_ablate_is_refused_where_it_means_nothing(interpreted_triton: None) -> None:
    """ablate 只有 0 / 1 / 2，且只对本模块的 Triton kernel 有意义：其余取值与方式 "bnb" 在发射前报错。"""
    w = stack_nf4([_nf4(32, 128)])
    x = torch.randn(1, 1, 128)
    with pytest.raises(ValueError, match="ablate must be 0"):
        nf4_linear_stacked(x, w, ablate=3)
    with pytest.raises(ValueError, match="not to method 'bnb'"):
        nf4_linear_stacked(x, w, config=("bnb", 0, 0, 0, 0, 0), ablate=1)


@needs_bnb
def test_prefill_rows_use_bitsandbytes_dequantize_then_matmul() -> None:
    """M > BNB_ROWS（预填充）默认走方式 "bnb"（反量化一次 + 矩阵乘），结果与“反量化 + float32 矩阵乘”一致；
    解码的 M 仍走本模块的 kernel。"""
    from fast.nf4 import BNB_ROWS, config_for

    assert config_for(BNB_ROWS + 1)[0] == "bnb" and config_for(1)[0] == "gemvR" and config_for(64)[0] == "dotT"
    w = _nf4(48, 128, seed=9)
    x = torch.randn(BNB_ROWS + 3, 128, generator=torch.Generator().manual_seed(2))
    ref = x @ dequantize_nf4(dataclasses.replace(w, dtype=torch.float32)).T
    assert _relative_error(nf4_linear(x, w), ref) < TOLERANCE[torch.float32]


@needs_triton
@pytest.mark.parametrize("m", [1, 5])
def test_nf4_linear_stacked_equals_per_model(interpreted_triton: None, m: int) -> None:
    """叠加版本（程序网格第三维是模型）== 逐个模型调用 nf4_linear，逐位相同。"""
    ws = [_nf4(48, 128, seed=s) for s in range(3)]
    x = torch.randn(3, m, 128, generator=torch.Generator().manual_seed(m)).bfloat16()
    y = nf4_linear_stacked(x, stack_nf4(ws))
    assert y.shape == (3, m, 48)
    for s in range(3):
        assert torch.equal(y[s], nf4_linear(x[s], ws[s]))


@needs_triton
def test_nf4_linear_refuses_bad_input(interpreted_triton: None) -> None:
    """不合规的输入在发射前报错，消息说明原因与做法。"""
    w = _nf4(32, 128)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="dtype must be"):
        nf4_linear(x.double(), w)
    with pytest.raises(ValueError, match="in_features = 128"):
        nf4_linear(torch.randn(2, 64), w)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        nf4_linear(torch.randn(128, 2).T, w)
    with pytest.raises(ValueError, match="2-D"):
        nf4_linear(x[None], w)
    with pytest.raises(ValueError, match="contiguous"):
        nf4_linear(x, dataclasses.replace(w, qweight=w.qweight.transpose(-1, -2).contiguous().transpose(-1, -2)))
    with pytest.raises(ValueError, match="multiple of blocksize"):
        nf4_linear(torch.randn(2, 96), dataclasses.replace(w, qweight=torch.zeros(32, 48, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="stacked"):
        nf4_linear(x, stack_nf4([w, w]))
    with pytest.raises(ValueError, match="S = 2"):
        nf4_linear_stacked(x[None], stack_nf4([w, w]))
    with pytest.raises(ValueError, match="'gemvR' kernel handles M = 1 only"):
        nf4_linear(x, w, config=("gemvR", 1, 16, 8, 4, 1))
    with pytest.raises(ValueError, match="unknown method 'dotS'"):
        nf4_linear(x, w, config=("dotS", 16, 64, 1, 4, 1))
    with pytest.raises(ValueError, match="unknown method 'dot'"):
        nf4_linear(x, w, config=("dot", 16, 64, 2, 4, 1))
    with pytest.raises(ValueError, match="layout of repack_nf4"):
        nf4_linear(x, dataclasses.replace(w, absmax=w.absmax.t().contiguous()))


@needs_triton
def test_micro_nf4_ablate_rows(interpreted_triton: None) -> None:
    """benchmarks/micro_nf4.py --ablate 的行（CPU 解释器，不看数值大小）：三部分都有微秒与 TB/s，计时的是本模块的
    kernel（M = 1 的 gemvR、M > 1 的 dotT），结果在 JSON 里。"""
    from benchmarks import micro_nf4

    rows = micro_nf4.run_shape("tiny", "a", 96, 128, 1, (1, 5), "cpu", use_bnb=False, sweep=False, smoke=True,
                               ablate=True)
    assert [r["ablate"]["config"][0] for r in rows] == ["gemvR", "dotT"]
    for r in rows:
        assert all(r["ablate"][part]["us"] > 0 and r["ablate"][part]["tbs"] >= 0  # CPU：TB/s 舍入到 0
                   for part in ("bytes", "lookup", "full"))


def test_affine_int4_for_the_gemlite_column() -> None:
    """micro_nf4 --int4 给 gemlite 造的权重：q ∈ [0, 15]，每组 (q − zero) · scale 还原 w 的误差不超过半格，
    每组的最小、最大值落在格点 0 与 15 上；K 不是组大小的倍数时报错。"""
    from benchmarks.micro_nf4 import affine_int4

    w = torch.randn(6, 256, generator=torch.Generator().manual_seed(4))
    q, scale, zero = affine_int4(w, 64)
    assert q.dtype == torch.uint8 and q.shape == (6, 256) and int(q.max()) <= 15
    assert scale.shape == zero.shape == (6, 4)
    deq = (q.float().reshape(6, 4, 64) - zero[..., None]) * scale[..., None]
    assert ((deq - w.reshape(6, 4, 64)).abs() <= scale[..., None] / 2 + 1e-6).all()
    groups = q.reshape(6, 4, 64)
    assert (groups.amin(-1) == 0).all() and (groups.amax(-1) == 15).all()
    with pytest.raises(ValueError, match="multiple of the group size"):
        affine_int4(w[:, :100], 64)


def test_micro_nf4_int4_columns_record_failures_and_need_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """--int4 的列在 CPU 上测不了：每个库的失败记在它自己的列里（不拖垮其余测量），--smoke --int4 直接说明需要 GPU。"""
    from benchmarks import micro_nf4

    w = torch.randn(64, 128).bfloat16()
    out = micro_nf4.int4_columns([w], [torch.randn(1, 1, 128).bfloat16()], copies=1, io_bytes=0)
    assert set(out) == {"torchao", "gemlite"} and all("error" in v for v in out.values())
    monkeypatch.setattr(sys, "argv", ["micro_nf4.py", "--smoke", "--int4"])
    with pytest.raises(SystemExit, match="needs a GPU"):
        micro_nf4.main()


def test_as_stacked_is_a_view_with_one_leading_model() -> None:
    """as_stacked：单个权重加前导维 S = 1（与原权重共用存储，不拷贝）；已叠好的权重原样返回。"""
    w = _nf4(32, 128)
    one = as_stacked(w)
    assert one.stacked and one.qweight.shape == (1, 32, 64) and one.absmax.shape == (1, 32, 2)
    assert one.qweight.data_ptr() == w.qweight.data_ptr() and one.absmax.data_ptr() == w.absmax.data_ptr()
    both = stack_nf4([w, w])
    assert as_stacked(both) is both


@needs_triton
@pytest.mark.parametrize("config, m, split_k", [
    (("gemvG", 1, 16, 8, 4, 4), 1, 1),
    (("gemvG", 1, 8, 8, 4, 4), 1, 3),
    (("dotG", 16, 64, 1, 4, 3), 5, 2),
    (("gemvW", 1, 16, 8, 4, 3), 1, 3),
    (("gemvB", 1, 16, 8, 4, 3), 1, 3),
    (("dotA", 16, 64, 1, 4, 3), 5, 2),
    (("dotB", 16, 64, 1, 4, 3), 5, 2),
])
def test_pipelined_gather_kernels_match(interpreted_triton: None, config: tuple[str, int, int, int, int, int], m: int,
                                        split_k: int) -> None:
    """gemvG / dotG / gemvW 的流水线候选（配置的 num_stages > 1 → 主循环 tl.range(num_stages=…)，GATHER_NOTE）：结果与
    “反量化 + float32 矩阵乘”一致，且与不流水线的同一配置逐位相同（流水线只改读的时机，不改算术）。"""
    ws = [_nf4(96, 512, seed=s + 7) for s in range(2)]
    x = torch.randn(2, m, 512, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    y = nf4_linear_stacked(x, stack_nf4(ws), config=config, split_k=split_k)
    flat = nf4_linear_stacked(x, stack_nf4(ws), config=(*config[:5], 1), split_k=split_k)
    assert torch.equal(y, flat)
    for s in range(2):
        ref = x[s].float() @ dequantize_nf4(dataclasses.replace(ws[s], dtype=torch.float32)).T
        assert _relative_error(y[s], ref) < TOLERANCE[torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------------
# 算子的注册方式（fast.TRITON_OPS，TRITON_OPS_NOTE）
# ---------------------------------------------------------------------------------------------------------------
# 子进程：按 argv[1] 的方式注册两个算子，eager 跑 NF4 矩阵乘与解码注意力并存下结果；opaque 时再用 aot_eager 编译一次。
# 为什么用子进程：算子名在一个进程里只能注册一次（load_* 有缓存），本进程的测试用的是默认方式。
_OPS_SCRIPT = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
import fast
fast.TRITON_OPS = sys.argv[1]
from fast.attention import load_triton_attention, triton_decode_attention
from fast.nf4 import nf4_linear_stacked, quantize_nf4_reference, repack_nf4, stack_nf4
gen = torch.Generator().manual_seed(0)
w = stack_nf4([repack_nf4(*quantize_nf4_reference(torch.randn(96, 128, generator=gen))) for _ in range(2)])
x = torch.randn(2, 3, 128, generator=gen)
q, k, v = (torch.randn(2, 2, 4, 16, generator=gen), torch.randn(2, 2, 40, 16, generator=gen),
           torch.randn(2, 2, 40, 16, generator=gen))
mask, slot = torch.ones(2, 40, dtype=torch.long), torch.tensor([25])
load_triton_attention()
def both(x, q):
    return nf4_linear_stacked(x, w, split_k=2), triton_decode_attention(q, k, v, mask, slot, 0.25, n_split=3)
out = {"eager": both(x, q)}
if sys.argv[1] == "opaque":
    out["compiled"] = torch.compile(both, backend="aot_eager", fullgraph=True)(x, q)
torch.save(out, sys.argv[2])
"""


@needs_triton
def test_both_op_registrations_give_the_same_bits(interpreted_triton: None, tmp_path) -> None:  # noqa: ANN001
    """opaque（custom_op + fake）与 traced（triton_op）发射的是同一个 kernel：eager 结果逐位相同；opaque 的算子
    能被编译追踪（只用 fake 形状），编译后的结果也逐位相同。"""
    import subprocess

    results = {}
    for mode in ("opaque", "traced"):
        path = tmp_path / f"{mode}.pt"
        proc = subprocess.run([sys.executable, "-c", _OPS_SCRIPT, mode, str(path)], capture_output=True, text=True,
                              timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[mode] = torch.load(path)
    for a, b in zip(results["opaque"]["eager"], results["traced"]["eager"]):
        assert torch.equal(a, b)
    for a, b in zip(results["opaque"]["eager"], results["opaque"]["compiled"]):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("config, m, split_k", [(("dotB", 16, 32, 1, 4, 1), 5, 1), (("dotB", 16, 64, 1, 4, 3), 20, 3)])
def test_pair_lookup_float16_matches_dota(interpreted_triton: None, config: tuple[str, int, int, int, int, int], m: int,
                                          split_k: int) -> None:
    """dotB 在 float16 下（解释器里 float16 是真的 16 位，走的是 GPU 上的按位转换：int32 截成 int16 再按位当成
    float16，PAIR_NOTE）== dotA 逐位相同，且与“反量化 + float32 矩阵乘”一致；流水线与切 K 也一样。"""
    ws = [_nf4(96, 512, seed=s + 11) for s in range(2)]
    x = torch.randn(2, m, 512, generator=torch.Generator().manual_seed(m)).to(torch.float16)
    y = nf4_linear_stacked(x, stack_nf4(ws), config=config, split_k=split_k)
    assert torch.equal(y, nf4_linear_stacked(x, stack_nf4(ws), config=("dotA", *config[1:]), split_k=split_k))
    for s in range(2):
        ref = x[s].float() @ dequantize_nf4(dataclasses.replace(ws[s], dtype=torch.float32)).T
        assert _relative_error(y[s], ref) < TOLERANCE[torch.float16]


def test_tune_candidates_per_batch_and_dtype() -> None:
    """调优的候选：M = 1 只有 gemv 方式（float32 也有 gemvB：它的码值本来是 float32）；M > 1 有 dotT / dotG / dotA，bf16 / fp16 时还有 dotB（与 dotA 同样的块形），
    float32 时没有（PAIR_NOTE）；BLOCK_M 夹在 [16, 64]。"""
    from fast.nf4 import GEMV_METHODS, TUNE_DOT_A, tune_candidates

    assert {c[0] for c in tune_candidates(1, torch.bfloat16)} == set(GEMV_METHODS) == {"gemvR", "gemvG", "gemvW", "gemvB"}
    assert {c[0] for c in tune_candidates(1, torch.float32)} == set(GEMV_METHODS)
    assert all(c[1] == 1 for c in tune_candidates(1, torch.bfloat16))
    for dtype in (torch.bfloat16, torch.float16):
        got = tune_candidates(16, dtype)
        assert {c[0] for c in got} == {"dotT", "dotG", "dotA", "dotB"} and all(c[1] == 16 for c in got)
        assert [c[2:] for c in got if c[0] == "dotB"] == [c[2:] for c in got if c[0] == "dotA"] == list(TUNE_DOT_A)
    assert {c[0] for c in tune_candidates(4, torch.float32)} == {"dotT", "dotG", "dotA"}
    assert {c[1] for c in tune_candidates(64, torch.bfloat16)} == {64} == {c[1] for c in tune_candidates(200, torch.bfloat16)}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_sum_in_graph(interpreted_triton: None, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """SPLIT_SUM_NOTE：fast.SPLIT_SUM = "graph" 时，编译区域里的算子返回 float32 部分和 (split_k, S, M, N)，图里
    sum(0) 再转精度（dynamo 的图里看得到：算子的最后一个参数为真，后面跟着求和）；结果与 eager 的求和 kernel 一致
    （相加顺序可以不同：float32 的舍入之内）。split_k = 1 时不走这条路；eager 调用（不在编译区域）仍用 kernel。"""
    import fast

    monkeypatch.setattr(fast, "SPLIT_SUM", "graph")
    w = stack_nf4([_nf4(48, 512, seed=s + 21) for s in range(2)])
    x = torch.randn(2, 5, 512, generator=torch.Generator().manual_seed(5)).to(dtype)
    cfg = ("dotA", 16, 16, 1, 4, 1)
    eager = nf4_linear_stacked(x, w, config=cfg, split_k=3)  # 不在编译区域：求和 kernel
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    def step(v: torch.Tensor) -> torch.Tensor:
        return nf4_linear_stacked(v, w, config=cfg, split_k=3) * 2.0 + 1.0

    torch._dynamo.reset()
    got = torch.compile(step, backend=record, fullgraph=True)(x)
    calls = [n for n in graphs[0].graph.nodes if "nf4_linear" in str(n.target)]
    assert len(calls) == 1 and calls[0].args[-1] is True and calls[0].args[10] == 3
    assert any(n.target in ("sum", torch.sum) or "sum" in str(n.target) for n in calls[0].users)
    torch.testing.assert_close(got, eager * 2.0 + 1.0, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    torch._dynamo.reset()
    fused = torch.compile(step, fullgraph=True)(x)  # inductor（CPU）编译图里的求和
    torch.testing.assert_close(fused, eager * 2.0 + 1.0, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    torch._dynamo.reset()
    one = torch.compile(lambda v: nf4_linear_stacked(v, w, config=cfg, split_k=1), backend=record, fullgraph=True)(x)
    assert [n.args[-1] for n in graphs[-1].graph.nodes if "nf4_linear" in str(n.target)] == [False]
    assert torch.equal(one, nf4_linear_stacked(x, w, config=cfg, split_k=1))
    monkeypatch.setattr(fast, "SPLIT_SUM", "atomic")
    with pytest.raises(ValueError, match="must be one of kernel, graph"):
        nf4_linear_stacked(x, w, config=cfg, split_k=3)


@needs_triton
def test_scale_after_dot_needs_one_block_per_step(interpreted_triton: None) -> None:
    """dotA 每步只乘一个块尺度（SCALE_NOTE）：NB > 1 的配置报错说明，而不是算错。"""
    ws = [_nf4(32, 256, seed=s) for s in range(2)]
    x = torch.randn(2, 4, 256)
    with pytest.raises(ValueError, match="needs NB = 1"):
        nf4_linear_stacked(x, stack_nf4(ws), config=("dotA", 16, 16, 2, 4, 1))
    with pytest.raises(ValueError, match="needs NB = 1"):
        nf4_linear_stacked(x.to(torch.bfloat16), stack_nf4(ws), config=("dotB", 16, 16, 2, 4, 1))


def test_unknown_op_registration_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import fast

    monkeypatch.setattr(fast, "TRITON_OPS", "inlined")
    with pytest.raises(ValueError, match="must be one of opaque, traced"):
        fast.kernel_op("steer::never_registered", lambda: None)
