"""微基准（GPU）：解码注意力——fast/attention.py 的 Triton kernel（各块配置）对 SDPA（cuDNN，StackedLlama 的旧实现）。

形状取真实模型：1B 对（M = 2 个模型叠加，行数 R = 2·批，head_dim 64）与 8B（R = 批，head_dim 128），8 个 KV 头、
每头 4 个查询头，静态缓存 L = 512（或 1,280）。slot = 本步槽位：bench.py 的计时区间里 slot 从 256 走到 511，平均 384。

计时方法（decode 步里真实的情形是“冷 L2”：两层注意力之间要读几百 MB 权重）：准备 N 组互不相同的 q/K/V/输出，
总量 ≥ 256 MB（超过 50 MB 的 L2），把 N 次调用录进一张 CUDA graph，重放 20 次，每次调用的时间 = 总时间 / (20·N)。
正确性：每个配置的输出与 float64 参考比较（最大绝对误差），bf16 下应在 1e-2 以内。
带宽 = 已写槽位（0..slot）的 K/V 字节 / 时间；SDPA 实际读满 L 个槽位，所以它的“有效带宽”偏低正是要省的东西。
用法：python benchmarks/micro_attn.py --out results.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fast.attention import TRITON_ATTENTION_CONFIG, load_triton_attention, split_count  # noqa: E402
from fast.nf4 import graph_time_us  # noqa: E402


def graph_ms(calls: list[Callable[[], Any]], replays: int = 20) -> float:
    """把 calls 依次录进一张 CUDA graph，重放 replays 次，返回每次调用的平均毫秒（CUDA events）：共用
    fast.nf4.graph_time_us 的计时器，取它的平均口径（这里发表过的数字都按平均算）。"""
    return graph_time_us(calls, replays, mean=True) / 1e3


def shape_rows(name: str, rows: int, dim: int, length: int, slot: int, configs: list[tuple[int, int, int, int]]
               ) -> list[dict[str, Any]]:
    """一种形状：SDPA 与各 Triton 配置 (BLOCK_N, warps, stages, n_split；n_split 0 = split_count 的选择)。"""
    dev, dt, kv_heads, groups = "cuda", torch.bfloat16, 8, 4
    per_set = 2 * rows * kv_heads * length * dim * 2
    n_sets = max(2, min(64, -(-256 * 2**20 // per_set)))
    torch.manual_seed(0)
    sets = []
    for _ in range(n_sets):
        q = torch.randn(rows, kv_heads, groups, dim, device=dev, dtype=dt)
        k = torch.randn(rows, kv_heads, length, dim, device=dev, dtype=dt)
        sets.append((q, k, torch.randn_like(k)))
    mask = torch.ones(rows, length, dtype=torch.long, device=dev)
    mask[:, :3] = 0  # 几个左填充位置，走 mask 分支
    slot_t = torch.tensor([slot], device=dev)
    visible = (mask.bool() & (torch.arange(length, device=dev)[None, :] <= slot_t))[:, None, None, :]
    scale = dim ** -0.5
    q0, k0, v0 = sets[0]
    ref = F.scaled_dot_product_attention(q0.double(), k0.double(), v0.double(), attn_mask=visible, scale=scale)
    valid_gb = 2 * rows * kv_heads * (slot + 1) * dim * 2 / 1e9
    base = {"shape": name, "rows": rows, "head_dim": dim, "length": length, "slot": slot, "sets": n_sets}
    out = []
    err = (F.scaled_dot_product_attention(q0, k0, v0, attn_mask=visible, scale=scale).double() - ref).abs().max()
    ms = graph_ms([lambda s=s: F.scaled_dot_product_attention(s[0], s[1], s[2], attn_mask=visible, scale=scale)
                   for s in sets])
    out.append({**base, "impl": "sdpa", "ms": round(ms, 5), "tb_s_valid": round(valid_gb / ms, 3),
                "max_err": float(err)})
    op = load_triton_attention()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for block_n, warps, stages, n_split in configs:
        split = n_split or split_count(rows * kv_heads, -(-length // block_n), sms)
        try:
            err = (op(q0, k0, v0, mask, slot_t, scale, split, block_n, warps, stages).double() - ref).abs().max()
            ms = graph_ms([lambda s=s: op(s[0], s[1], s[2], mask, slot_t, scale, split, block_n, warps, stages)
                           for s in sets])
            out.append({**base, "impl": "triton", "block_n": block_n, "warps": warps, "stages": stages,
                        "n_split": split, "ms": round(ms, 5), "tb_s_valid": round(valid_gb / ms, 3),
                        "max_err": float(err)})
        except Exception as exc:  # noqa: BLE001 — 某个配置编译失败（如共享内存不够）时记下来，继续测其余配置
            out.append({**base, "impl": "triton", "block_n": block_n, "warps": warps, "stages": stages,
                        "n_split": split, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    """全部形状 × 配置，打印每个形状最快的 Triton 配置与 SDPA 的对比，最后一行 JSON。"""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="只测快速路径用的块配置（不扫）")
    args = parser.parse_args()
    sweep = [(bn, w, st, 0) for bn, w, st in itertools.product((32, 64, 128), (2, 4), (1, 2, 3))]
    sweep += [(64, 4, 2, s) for s in (1, 2, 4, 8)]
    shapes = [("pair b64", 128, 64, 512, 383), ("8b b64", 64, 128, 512, 383),
              ("pair b64 full", 128, 64, 512, 511), ("8b b64 full", 64, 128, 512, 511),
              ("pair b16", 32, 64, 512, 383), ("8b b16", 16, 128, 512, 383),
              ("pair b1", 2, 64, 512, 383), ("8b b1", 1, 128, 512, 383),
              ("pair b64 long", 128, 64, 1280, 1023), ("8b b64 long", 64, 128, 1280, 1023)]
    rows = []
    for name, r, d, length, slot in shapes:
        # 块配置只在四个主要形状上扫（每个配置要编译一次），其余形状只测快速路径用的配置（TRITON_ATTENTION_CONFIG）
        swept = not args.quick and name in ("pair b64", "8b b64", "pair b1", "8b b1")
        rows += shape_rows(name, r, d, length, slot, sweep if swept else [(*TRITON_ATTENTION_CONFIG[d], 0)])
    summary = []
    for name, *_ in shapes:
        mine = [x for x in rows if x["shape"] == name and "ms" in x]
        sdpa = next(x for x in mine if x["impl"] == "sdpa")
        best = min((x for x in mine if x["impl"] == "triton"), key=lambda x: x["ms"])
        summary.append({"shape": name, "sdpa_ms": sdpa["ms"], "best_triton_ms": best["ms"],
                        "best": [best["block_n"], best["warps"], best["stages"], best["n_split"]],
                        "speedup": round(sdpa["ms"] / best["ms"], 2), "best_tb_s_valid": best["tb_s_valid"]})
        print(json.dumps(summary[-1]), flush=True)
    env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    report = {"env": env, "rows": rows, "summary": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({"env": env, "summary": summary}))


if __name__ == "__main__":
    main()
