"""微基准（GPU）：解码步的投影（批 64 行）在两种权重布局下的 cuBLAS 时间。

StackedLlama 把叠加的权重存成 (M, out, in)（nn.Linear 的布局），投影是 bmm(x, Wᵀ 的视图)（cuBLAS 的 "NT"）。
这里比较把权重预先转置、连续存成 (M, in, out) 后的 bmm(x, W)（"NN"）：cuBLASLt 按布局选不同的 kernel，
小矩阵（1B 对的 q/k/v、o_proj）在剖析里只跑到 1.5 TB/s 左右。计时同 micro_attn.py（冷 L2，CUDA graph 重放）。
用法：python benchmarks/micro_layout.py --out results.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from micro_attn import graph_ms  # noqa: E402

# (名字, 模型数 M, out, in)：1B 对与 8B 的每个投影（q/k/v 与 gate/up 已拼接）
SHAPES = [("pair qkv", 2, 3072, 2048), ("pair o", 2, 2048, 2048), ("pair gate_up", 2, 16384, 2048),
          ("pair down", 2, 2048, 8192), ("8b qkv", 1, 6144, 4096), ("8b o", 1, 4096, 4096),
          ("8b gate_up", 1, 28672, 4096), ("8b down", 1, 4096, 14336)]


def main() -> None:
    """每个形状：NT（现在的布局）与 NN（转置后连续存放）的每次调用微秒与带宽，最后一行 JSON。"""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, m, n_out, n_in in SHAPES:
        per_set = m * n_out * n_in * 2
        n_sets = max(2, min(64, -(-256 * 2**20 // per_set)))
        ws = [torch.randn(m, n_out, n_in, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
        wts = [w.transpose(1, 2).contiguous() for w in ws]
        x = torch.randn(m, args.rows, n_in, device="cuda", dtype=torch.bfloat16)
        nt = graph_ms([lambda w=w: torch.bmm(x, w.transpose(1, 2)) for w in ws])
        nn = graph_ms([lambda w=w: torch.bmm(x, w) for w in wts])
        same = torch.equal(torch.bmm(x, ws[0].transpose(1, 2)), torch.bmm(x, wts[0]))
        gb = per_set / 1e9
        rows.append({"shape": name, "M": m, "out": n_out, "in": n_in, "rows": args.rows, "nt_us": round(1000 * nt, 2),
                     "nn_us": round(1000 * nn, 2), "nt_tb_s": round(gb / nt, 2), "nn_tb_s": round(gb / nn, 2),
                     "bitwise_equal": bool(same)})
        print(json.dumps(rows[-1]), flush=True)
        del ws, wts
        torch.cuda.empty_cache()
    report = {"env": {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
