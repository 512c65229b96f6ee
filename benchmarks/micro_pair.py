"""微基准（GPU）：解码一步里 1B 专家+基座叠加单元的两类 kernel，换实现各要多少时间。

- 注意力：打包 GQA 的解码注意力（query (R, H_kv, n_rep, D)，K/V (R, H_kv, L, D)，布尔 mask），
  比较 SDPA 的各个后端（cuDNN / memory-efficient / math）与编译出的“两次 bmm + softmax”；
- 矩阵乘：叠加单元的每个投影（bmm，M = 2）与拆成两个模型各自的 mm、以及 max-autotune 编译的 bmm。

每项用 CUDA events 计 200 次的平均（预热 20 次），输出一行 JSON。只用于决定快速路径的实现，不是测试。
用法：python benchmarks/micro_pair.py --out results.json
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(fn: Callable[[], Any], iters: int = 200, warmup: int = 20) -> float:
    """fn 的平均毫秒（CUDA events，设备同步）。"""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """q (R, H_kv, n, D) · Kᵀ → 屏蔽 → float32 softmax → · V：与 SDPA 数学相同的显式写法（给 inductor 融合）。"""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(s.softmax(-1).to(q.dtype), v)


def attention_rows(rows: int, heads_kv: int, n_rep: int, dim: int, length: int, filled: int) -> list[dict[str, Any]]:
    """一种注意力形状下各实现的耗时。filled：mask 里可见的槽位数（其余屏蔽）。"""
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(rows, heads_kv, n_rep, dim, device=dev, dtype=dt)
    k = torch.randn(rows, heads_kv, length, dim, device=dev, dtype=dt)
    v = torch.randn_like(k)
    mask = torch.zeros(rows, 1, 1, length, dtype=torch.bool, device=dev)
    mask[..., :filled] = True
    scale = dim ** -0.5
    kv_gb = 2 * k.numel() * k.element_size() / 1e9
    out = []
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)):
        try:
            with sdpa_kernel([backend]):
                ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale))
        except RuntimeError as exc:
            out.append({"impl": name, "error": str(exc)[:200]})
            continue
        out.append({"impl": name, "ms": round(ms, 4), "TB_s": round(kv_gb / ms, 3)})
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale))
    out.append({"impl": "sdpa_default", "ms": round(ms, 4), "TB_s": round(kv_gb / ms, 3)})
    compiled = torch.compile(manual_attention, fullgraph=True, dynamic=False)
    ms = bench(lambda: compiled(q, k, v, mask, scale))
    out.append({"impl": "compiled_manual", "ms": round(ms, 4), "TB_s": round(kv_gb / ms, 3)})
    for r in out:
        r.update(kind="attention", rows=rows, heads_kv=heads_kv, n_rep=n_rep, dim=dim, length=length, filled=filled,
                 kv_gb=round(kv_gb, 4))
    return out


def gemm_rows(batch: int) -> list[dict[str, Any]]:
    """1B 叠加单元的投影（M = 2 个模型）：bmm、两个 mm、max-autotune 编译的 bmm。"""
    dev, dt = "cuda", torch.bfloat16
    shapes = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
              "lm_head": (128256, 2048)}
    out = []
    for name, (n_out, n_in) in shapes.items():
        w = torch.randn(2, n_out, n_in, device=dev, dtype=dt)
        x = torch.randn(2, batch, n_in, device=dev, dtype=dt)
        gb = w.numel() * w.element_size() / 1e9
        variants: dict[str, Callable[[], Any]] = {
            "bmm": lambda: torch.bmm(x, w.transpose(1, 2)),
            "two_mm": lambda: (F.linear(x[0], w[0]), F.linear(x[1], w[1])),
        }
        tuned = torch.compile(lambda a, b: torch.bmm(a, b.transpose(1, 2)), mode="max-autotune-no-cudagraphs",
                              dynamic=False)
        variants["bmm_max_autotune"] = lambda: tuned(x, w)
        for impl, fn in variants.items():
            try:
                ms = bench(fn)
            except Exception as exc:  # noqa: BLE001 — 记下失败，继续其余
                out.append({"kind": "gemm", "proj": name, "impl": impl, "error": str(exc)[:200]})
                continue
            out.append({"kind": "gemm", "proj": name, "impl": impl, "batch": batch, "ms": round(ms, 4),
                        "TB_s": round(gb / ms, 3), "weight_gb": round(gb, 4)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    # 1B 叠加单元（批 64 → 128 行，head_dim 64）与 8B（64 行，head_dim 128）；缓存 512，已填 384 或 512
    for r, d, filled in ((128, 64, 384), (128, 64, 512), (64, 128, 384), (2, 64, 384)):
        rows += attention_rows(r, 8, 4, d, 512, filled)
    for batch in (1, 64):
        rows += gemm_rows(batch)
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
