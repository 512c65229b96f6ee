"""微基准（GPU）：引导一步的“α、融合、守卫、argmax”——编译后的 fuse_step + argmax（Inductor）对 steering_utils 的分段
Triton kernel（各 (BLOCK, num_warps, 段数) 配置）。

形状取真实的解码步：三路 (B, 128,256) bf16 logits（FastDecoder 传入的是模型精度的 logits），B = 64 / 16 / 1，
SteeringParams 取 bench.py 的 STEER（adaptive、JS、β = 0）。计时方法同 micro_attn.py（"冷 L2"）：准备 N 组互不相同的
输入、总量 ≥ 256 MB，把 N 次调用录进一张 CUDA graph，重放 20 次取平均。每个配置的 token 与 Inductor 的结果比较。
用法：python benchmarks/micro_steer.py --out results.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluator import SteeringParams, fuse_step  # noqa: E402
from micro_attn import graph_ms  # noqa: E402
from steering_utils import STEER_CONFIG, load_triton_steering, steer_chunks, triton_greedy_steer  # noqa: E402

STEER = SteeringParams(base_alpha=1.0, adaptive_scale=10.0, max_boost=1.0, metric="js")


def reference(zt: torch.Tensor, ze: torch.Tensor, zb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """FastDecoder 的 torch 融合（fusion="torch"）：转 float32 → fuse_step → argmax。"""
    fused, alpha, bad = fuse_step(zt.float(), ze.float(), zb.float(), STEER)
    return fused.argmax(-1), alpha, bad


def shape_rows(batch: int, configs: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    """一个批大小：Inductor 与各 Triton 配置 (BLOCK, warps, 段数；段数 0 = steer_chunks 的选择)。"""
    vocab, dev = 128256, "cuda"
    per_set = 3 * batch * vocab * 2
    n_sets = max(2, min(64, -(-256 * 2**20 // per_set)))
    torch.manual_seed(0)
    sets = [tuple((torch.randn(batch, vocab, device=dev) * 3).to(torch.bfloat16) for _ in range(3))
            for _ in range(n_sets)]
    compiled = torch.compile(reference, fullgraph=True, dynamic=False)
    want = compiled(*sets[0])
    out = [{"batch": batch, "impl": "inductor", "ms": round(graph_ms([lambda s=s: compiled(*s) for s in sets]), 5)}]
    print(json.dumps(out[-1]), flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    kw = dict(schedule=STEER.schedule, base_alpha=STEER.base_alpha, adaptive_scale=STEER.adaptive_scale,
              max_boost=STEER.max_boost, metric=STEER.metric, beta=0.0)
    for block, warps, chunks in configs:
        n = chunks or steer_chunks(batch, vocab, sms, block)
        try:
            got = triton_greedy_steer(*sets[0], chunks=n, config=(block, warps), **kw)
            same = bool(torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]))
            err = float((got[1] - want[1]).abs().max())
            ms = graph_ms([lambda s=s: triton_greedy_steer(*s, chunks=n, config=(block, warps), **kw) for s in sets])
            out.append({"batch": batch, "impl": "triton", "block": block, "warps": warps, "chunks": n,
                        "ms": round(ms, 5), "same_tokens": same, "alpha_err": err})
        except Exception as exc:  # noqa: BLE001 — 某个配置失败时记下来，继续测其余配置
            out.append({"batch": batch, "impl": "triton", "block": block, "warps": warps, "chunks": n,
                        "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    """各批大小 × 配置，打印每个批大小最快的配置与 Inductor 的对比，最后一行 JSON。"""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="只测 STEER_CONFIG（不扫）")
    args = parser.parse_args()
    load_triton_steering()
    torch.set_grad_enabled(False)
    sweep = [(b, w, c) for b, w in itertools.product((1024, 2048, 4096), (4, 8)) for c in (0, 8, 16, 32)]
    rows = []
    for batch in (64, 16, 1):
        rows += shape_rows(batch, [(*STEER_CONFIG, 0)] if args.quick or batch != 64 else sweep)
    summary = []
    for batch in (64, 16, 1):
        mine = [x for x in rows if x["batch"] == batch and "ms" in x]
        ind = next(x for x in mine if x["impl"] == "inductor")
        best = min((x for x in mine if x["impl"] == "triton"), key=lambda x: x["ms"])
        summary.append({"batch": batch, "inductor_ms": ind["ms"], "best_triton_ms": best["ms"],
                        "best": [best["block"], best["warps"], best["chunks"]], "same_tokens": best["same_tokens"]})
        print(json.dumps(summary[-1]), flush=True)
    import triton
    env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    report = {"env": env, "rows": rows, "summary": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({"env": env, "summary": summary}))


if __name__ == "__main__":
    main()
