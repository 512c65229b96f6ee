"""微基准（GPU）：NF4 权重的矩阵乘——fast/nf4.py 的 Triton kernel 对 bitsandbytes 的 matmul_4bit（装了才测）
对 bf16 的 F.linear，形状取真实模型（8B / 1B 的每个投影，另加叠加前向里融合后的 qkv、gate_up 与两模型叠加），
M ∈ {1, 16, 64}（解码批大小）。

计时方法（与 micro_attn.py 相同，decode 步里是“冷 L2”）：准备若干组互不相同的权重副本，总量 ≥ 256 MB（超过 H200
50 MB 的 L2），把依次调用各组的 N 次调用录进一张 CUDA graph（解码步本来就在 CUDA graph 里：不计发射开销），
重放多次取中位数，每次调用的时间 = 一次重放 / N。录制失败（如 bitsandbytes 的某条路径）时退回逐次发射的
triton.testing.do_bench 中位数，并在表里标出。
字节 = NF4 权重（半字节 + absmax）+ 激活 + 输出；bitsandbytes 的列按它自己的字节（uint8 absmax + 第二层）算，
bf16 列按 bf16 权重算。表旁边给出同一次运行里测得的读带宽（大张量求和）。
正确性：每个形状的第一组输出与“反量化 + float32 矩阵乘”比较（相对误差 ‖y − ref‖ / ‖ref‖）。

没有 bitsandbytes 时（GPU 机器上默认如此）用 fast.nf4.quantize_nf4_reference 生成同格式的权重，bnb 列留空。
用法：python benchmarks/micro_nf4.py [--sweep] [--tune] [--ablate] [--smoke]；环境变量 OUT 是目录时把 JSON 写进
$OUT/micro_nf4.json。
--int4（只在 CUDA 上）：同一形状、同一 M，再测两个 int4 库的 kernel——torchao 0.18 的 tile-packed int4（tinygemm，
--quant int4 今天用的）与 gemlite 0.6 的 A16W4（Triton），组大小 64，各自的字节算 TB/s，输出与各自反量化后的
float32 矩阵乘比相对误差。issue 16 要求两者之间“按测量选”：这一列就是那个测量（装不上哪个库，那一列就空着）。
--ablate：时间花在哪（没有 ncu 时的剖析，见 fast/nf4.py 的 ABLATE_NOTE）：同一 kernel、同一配置、同一网格，
依次只读字节与 absmax、再加查表、完整乘积，三者的微秒与 TB/s 记在每行的 ablate 里。
--smoke：CPU 上用 Triton 解释器跑极小的形状（几秒），只检查脚本本身能跑通。
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # 必须早于 triton 的导入

import argparse
import dataclasses
import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fast.nf4 import (as_stacked, config_for, dequantize_nf4, graph_time_us, load_nf4_kernels,  # noqa: E402
                      nf4_linear_stacked, quantize_nf4_reference, repack_nf4, stack_nf4, tune_nf4)

# (模型, 名字, N = out_features, K = in_features, S = 叠加的模型数)
SHAPES: list[tuple[str, str, int, int, int]] = [
    ("8B", "q/o", 4096, 4096, 1), ("8B", "k/v", 1024, 4096, 1), ("8B", "gate/up", 14336, 4096, 1),
    ("8B", "down", 4096, 14336, 1), ("8B", "qkv fused", 6144, 4096, 1), ("8B", "gate_up fused", 28672, 4096, 1),
    ("1B", "q/o", 2048, 2048, 1), ("1B", "k/v", 512, 2048, 1), ("1B", "gate/up", 8192, 2048, 1),
    ("1B", "down", 2048, 8192, 1), ("1B x2", "qkv fused", 3072, 2048, 2), ("1B x2", "o", 2048, 2048, 2),
    ("1B x2", "gate_up fused", 16384, 2048, 2), ("1B x2", "down", 2048, 8192, 2),
]
SMOKE_SHAPES: list[tuple[str, str, int, int, int]] = [("tiny", "a", 96, 128, 1), ("tiny x2", "b", 64, 256, 2)]
BATCHES = (1, 16, 64)
# --sweep 试的配置：(方式, BLOCK_M, BLOCK_N, NB, warps, stages)，每个配置再试 SWEEP_SPLITS 里的 split_k
SWEEP_SPLITS: tuple[int | None, ...] = (None, 1, 2, 4, 8, 16)  # None = split_k_for 的选择
SWEEP_GEMV = [("gemvR", 1, bn, nb, w, 1) for bn in (16, 64) for nb in (4, 8, 16) for w in (2, 4, 8)]
SWEEP_DOT = [("dotT", bm, bn, 1, w, 1) for bm in (16, 64) for bn in (64, 128) for w in (4, 8)]


def time_calls(calls: list[Callable[[], Any]], smoke: bool) -> tuple[float, str]:
    """每次调用的毫秒与方法。GPU：calls 录进一张 CUDA graph，重放 10 次取中位数 / len(calls)；录制失败时
    do_bench 逐次发射（中位数）。CPU（--smoke）：直接计时一轮。"""
    if smoke:
        start = time.perf_counter()
        for fn in calls:
            fn()
        return (time.perf_counter() - start) * 1e3 / len(calls), "cpu"
    try:
        return graph_time_us(calls, reps=10) / 1e3, "graph"
    except Exception:  # noqa: BLE001 —— 录不进 graph 的调用退回逐次发射
        torch.cuda.synchronize()
        import triton.testing

        state = {"i": 0}

        def cycle() -> None:
            calls[state["i"] % len(calls)]()
            state["i"] += 1

        return triton.testing.do_bench(cycle, warmup=25, rep=200, return_mode="median"), "eager"


def read_bandwidth(smoke: bool) -> float:
    """读带宽探针（TB/s）：对 1 GiB 的 bf16 张量求和（GPU）；--smoke 时返回 0。"""
    if smoke:
        return 0.0
    big = torch.randn(2**29, dtype=torch.bfloat16, device="cuda")
    out = torch.empty((), dtype=torch.float32, device="cuda")
    ms, _ = time_calls([lambda: torch.sum(big, dim=0, dtype=torch.float32, out=out)], smoke)
    return big.numel() * 2 / ms / 1e9


def quantize(w: torch.Tensor, use_bnb: bool) -> tuple[torch.Tensor, Any]:
    """w (N, K) bf16 → (打包字节, QuantState)：bitsandbytes（装了）或纯 torch 的同格式量化器。"""
    if use_bnb:
        import bitsandbytes.functional as bnbf

        return bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    return quantize_nf4_reference(w, blocksize=64, compress_statistics=True)


def bnb_bytes(packed: torch.Tensor, state: Any) -> int:
    """bitsandbytes 一次 matmul_4bit 读的权重字节（打包数据 + uint8 absmax + 第二层 absmax）。"""
    total = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "state2", None) is not None:
        total += state.state2.absmax.numel() * 4
    return total


def affine_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) → (q (N, K) uint8 ∈ [0, 15], scale (N, K/group), zero (N, K/group))，float32 计算：每组按 min/max 的
    非对称仿射量化，w ≈ (q − zero) · scale（gemlite 的 A16Wn 约定，zero 可以是小数，HQQ 的写法），不需要校准数据。
    只给 --int4 的 gemlite 列造权重（torchao 用它自己的量化器）；两者的格式都是“每组一对 (scale, zero)”的 int4。"""
    n, k = w.shape
    if k % group:
        raise ValueError(f"affine_int4: K = {k} is not a multiple of the group size {group}")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    zero = -lo / scale
    q = torch.clamp(torch.round(g / scale[..., None] + zero[..., None]), 0, 15)
    return q.reshape(n, k).to(torch.uint8), scale, zero


def int4_columns(dense: list[torch.Tensor], xs: list[torch.Tensor], copies: int, io_bytes: int,
                 group: int = 64) -> dict[str, Any]:
    """--int4 的列（CUDA）：torchao tile-packed int4 与 gemlite A16W4 的每次调用毫秒、TB/s、相对误差。
    dense：S 个 (N, K) bf16 权重；xs：每组一个 (S, M, K) 激活；copies 组权重副本（不同地址，不在 L2 里命中）。
    每个库一列；没装或出错时那一列记下原因（不让一个库的问题拖垮整个微基准）。"""
    n, k = dense[0].shape
    weight_bytes = len(dense) * (n * k // 2 + n * (k // group) * 4)  # 半字节 + 每组 bf16 的 (scale, zero)
    out: dict[str, Any] = {}

    def measure(label: str, build: Callable[[torch.Tensor], tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                  torch.Tensor]]) -> None:
        try:
            built = [[build(w) for w in dense] for _ in range(copies)]  # [副本][模型] → (前向, 反量化后的权重)
            y = torch.stack([built[0][s][0](xs[0][s]) for s in range(len(dense))])
            ref = torch.stack([xs[0][s].float() @ built[0][s][1].float().T for s in range(len(dense))])
            ms, how = time_calls([lambda i=i: [built[i][s][0](xs[i % len(xs)][s]) for s in range(len(dense))]
                                  for i in range(copies)], smoke=False)
            out[label] = {"ms": ms, "timing": how, "tbs": (weight_bytes + io_bytes) / ms / 1e9,
                          "rel_err": ((y.float() - ref).norm() / ref.norm()).item()}
        except Exception as exc:  # noqa: BLE001 —— 记下原因，其余列照测
            out[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}

    def torchao_linear(w: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        from benchmarks.quant_quality import int4_roundtrip  # torchao 的 from_hp 用的同一组 tinygemm 原语

        lin = torch.nn.Linear(k, n, bias=False, dtype=w.dtype, device=w.device)
        lin.weight.data.copy_(w)
        quantize_(lin, Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d",
                                            set_inductor_config=False))
        return lin, int4_roundtrip(w, group)

    def gemlite_linear(w: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        from gemlite.helper import A16Wn

        q, scale, zero = affine_int4(w, group)
        scale, zero = scale.to(w.dtype), zero.to(w.dtype)  # gemlite 存 bf16 的 scale 与 zero
        lin = A16Wn(device=str(w.device), dtype=w.dtype).from_weights(q, scale, zero, 4, group)
        deq = (q.float().reshape(n, k // group, group) - zero.float()[..., None]) * scale.float()[..., None]
        return lin, deq.reshape(n, k)

    measure("torchao", torchao_linear)
    measure("gemlite", gemlite_linear)
    return out


def run_shape(model: str, name: str, n: int, k: int, stacks: int, batches: tuple[int, ...], device: str,
              use_bnb: bool, sweep: bool, smoke: bool, tune: bool = False, ablate: bool = False,
              int4: bool = False) -> list[dict[str, Any]]:
    """一个形状的所有 M：各方法的每次调用毫秒、TB/s 与正确性。tune：先用 tune_nf4 为 (形状, M) 选配置（与解码器
    启动时相同），"NF4 Triton" 列就是调优后的选择，行里另记每种方式最快的微秒数（us_by_method）。"""
    torch.manual_seed(0)
    dtype = torch.bfloat16
    dense = [torch.randn(n, k, dtype=dtype, device=device) * 0.02 for _ in range(stacks)]
    quantized = [quantize(w, use_bnb) for w in dense]
    single = [repack_nf4(p, s) for p, s in quantized]
    weight = stack_nf4(single) if stacks > 1 else single[0]
    per_set = weight.nbytes
    n_sets = 2 if smoke else max(2, min(64, -(-256 * 2**20 // per_set)))
    # 各组是同一份数据的不同副本：地址不同，L2 里不会命中上一组
    sets = [weight] + [dataclasses.replace(weight, qweight=weight.qweight.clone(), absmax=weight.absmax.clone())
                       for _ in range(n_sets - 1)]
    reference_w = dequantize_nf4(dataclasses.replace(weight, dtype=torch.float32))  # (S, N, K) 或 (N, K)
    dense_sets = [torch.stack(dense)]  # (S, N, K)
    dense_sets += [dense_sets[0].clone() for _ in range(min(n_sets, max(2, -(-256 * 2**20 // (n * k * 2 * stacks))))
                                                        - 1)]
    rows: list[dict[str, Any]] = []
    for m in batches:
        xs = [torch.randn(stacks, m, k, dtype=dtype, device=device) for _ in range(len(sets))]
        io_bytes = stacks * m * (k + n) * 2

        def ours(i: int, config: tuple[str, int, int, int, int, int] | None = None,
                 split_k: int | None = None, part: int = 0) -> torch.Tensor:
            # 第 i 组权重的乘积 (S, M, N)；单个权重经 as_stacked 走同一条叠加路径（视图），part 见 --ablate
            return nf4_linear_stacked(xs[i], as_stacked(sets[i]), split_k=split_k, config=config, ablate=part)

        tuned = tune_nf4([weight], m, dtype)[f"S{stacks}_N{n}_K{k}_M{m}"] if tune and not smoke else None
        y = ours(0)
        ref = torch.matmul(xs[0].float(), reference_w.reshape(stacks, n, k).transpose(1, 2))
        rel_err = ((y.float() - ref).norm() / ref.norm()).item()
        ms, how = time_calls([lambda i=i: ours(i) for i in range(len(sets))], smoke)
        cfg = tuned["config"] if tuned else list(config_for(m))
        row: dict[str, Any] = {"model": model, "proj": name, "N": n, "K": k, "S": stacks, "M": m,
                               "config": list(cfg), "nf4_ms": ms, "nf4_timing": how,
                               "nf4_tbs": (per_set + io_bytes) / ms / 1e9, "rel_err": rel_err}
        if tuned:
            row.update(split_k=tuned["split_k"], us_by_method=tuned["us_by_method"])
        def dense_call(i: int) -> torch.Tensor:
            # 单个权重用 F.linear（与 transformers 的 bf16 路径相同），叠加时用 bmm（StackedLlama._linear）
            if stacks == 1:
                return F.linear(xs[i % len(xs)][0], dense_sets[i][0])
            return torch.bmm(xs[i % len(xs)], dense_sets[i].transpose(1, 2))

        dense_calls = [lambda i=i: dense_call(i) for i in range(len(dense_sets))]
        ms_bf16, _ = time_calls(dense_calls, smoke)
        row.update(bf16_ms=ms_bf16, bf16_tbs=(n * k * 2 * stacks + io_bytes) / ms_bf16 / 1e9)
        if use_bnb:
            import bitsandbytes as bnb

            def bnb_call(i: int) -> torch.Tensor:
                return torch.stack([bnb.matmul_4bit(xs[i][s], quantized[s][0].t(), quant_state=quantized[s][1])
                                    for s in range(stacks)])

            ms_bnb, how_bnb = time_calls([lambda i=i: bnb_call(i) for i in range(len(sets))], smoke)
            weight_bytes = sum(bnb_bytes(p, s) for p, s in quantized)
            row.update(bnb_ms=ms_bnb, bnb_timing=how_bnb, bnb_tbs=(weight_bytes + io_bytes) / ms_bnb / 1e9)
        if int4:
            row["int4"] = int4_columns(dense, xs, min(len(sets), 8), io_bytes)
        if ablate:
            # 本模块的 kernel（调优选中 bitsandbytes 时取默认表的配置）：只读 / 加查表 / 完整，三次同配置计时
            own = tuned is not None and tuned["config"][0] != "bnb"
            cfg_a = tuple(tuned["config"]) if own else config_for(m)
            if cfg_a[0] != "bnb":
                split_a = tuned["split_k"] if own else None
                parts = {}
                for part, label in ((1, "bytes"), (2, "lookup"), (0, "full")):
                    t, _ = time_calls([lambda i=i: ours(i, cfg_a, split_a, part) for i in range(len(sets))], smoke)
                    parts[label] = {"us": round(t * 1e3, 2), "tbs": round((per_set + io_bytes) / t / 1e9, 3)}
                row["ablate"] = {"config": list(cfg_a), "split_k": split_a, **parts}
        if sweep:
            candidates = SWEEP_GEMV if m == 1 else [c for c in SWEEP_DOT if c[1] <= max(16, m)]
            results = []
            for c in candidates:
                for split in SWEEP_SPLITS:
                    try:
                        t, _ = time_calls([lambda i=i: ours(i, c, split) for i in range(len(sets))], smoke)
                    except Exception as exc:  # noqa: BLE001 —— 某些配置编译不了（共享内存超限等）
                        print(f"  config {c} split {split}: {type(exc).__name__}", file=sys.stderr)
                        continue
                    results.append((t, list(c), split))
            results.sort(key=lambda r: r[0])
            row["sweep_top5"] = results[:5]
        rows.append(row)
        print(f"  {model} {name} N={n} K={k} S={stacks} M={m}: nf4 {ms * 1e3:.1f} us ({how}), "
              f"bf16 {ms_bf16 * 1e3:.1f} us" + (f", bnb {row['bnb_ms'] * 1e3:.1f} us" if use_bnb else "")
              + f", rel err {rel_err:.2e}" + (f", best {row['sweep_top5'][:2]}" if sweep else "")
              + (f", tuned {tuned['config']} split {tuned['split_k']}, by method {tuned['us_by_method']}"
                 if tuned else "")
              + (", ablate " + ", ".join(f"{key} {row['ablate'][key]['us']} us" for key in ("bytes", "lookup", "full"))
                 if "ablate" in row else "")
              + ("".join(f", {lib} " + (f"{v['ms'] * 1e3:.1f} us (rel err {v['rel_err']:.1e})" if "ms" in v
                                        else v["error"]) for lib, v in row.get("int4", {}).items())), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], bandwidth: float, use_bnb: bool) -> str:
    """结果表（markdown）：每行一个 (形状, M)。"""
    head = ("| model | proj | N x K | S | M | NF4 Triton us | TB/s | bnb matmul_4bit us | TB/s | bf16 us | TB/s "
            "| rel err | config |")
    lines = [f"Read-bandwidth probe (sum of 1 GiB bf16): {bandwidth:.2f} TB/s", "", head,
             "|" + "---|" * 13]
    for r in rows:
        bnb = f"{r['bnb_ms'] * 1e3:.1f} | {r['bnb_tbs']:.2f}" if use_bnb else "— | —"
        lines.append(f"| {r['model']} | {r['proj']} | {r['N']}x{r['K']} | {r['S']} | {r['M']} | "
                     f"{r['nf4_ms'] * 1e3:.1f} | {r['nf4_tbs']:.2f} | {bnb} | {r['bf16_ms'] * 1e3:.1f} | "
                     f"{r['bf16_tbs']:.2f} | {r['rel_err']:.1e} | {r['config']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Microbenchmark: NF4 Triton matmul vs bitsandbytes vs bf16.")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    parser.add_argument("--sweep", action="store_true", help="also time every kernel config and report the best")
    parser.add_argument("--only", default="", help="comma-separated model names to keep (e.g. 8B,1B x2)")
    parser.add_argument("--proj", default="", help="comma-separated projection names to keep (e.g. gate/up,down)")
    parser.add_argument("--tune", action="store_true",
                        help="choose each shape's kernel with fast.nf4.tune_nf4 first (as the decoder does) and "
                             "report the best time of every method")
    parser.add_argument("--ablate", action="store_true",
                        help="where the time goes: time the same kernel reading only the bytes and scales, then "
                             "adding the table lookups, then the full product")
    parser.add_argument("--int4", action="store_true",
                        help="also time torchao's tile-packed int4 and gemlite's A16W4 (group size 64) on the same "
                             "shapes (CUDA only)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated M values")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("No CUDA device: run on a GPU, or pass --smoke for the CPU interpreter check.")
    if args.int4 and args.smoke:
        sys.exit("--int4 times torchao's and gemlite's CUDA kernels: it needs a GPU and cannot run with --smoke.")
    device = "cpu" if args.smoke else "cuda"
    use_bnb = importlib.util.find_spec("bitsandbytes") is not None and not args.smoke
    load_nf4_kernels()
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.only:
        keep = set(args.only.split(","))
        shapes = [s for s in shapes if s[0] in keep]
    if args.proj:
        keep = set(args.proj.split(","))
        shapes = [s for s in shapes if s[1] in keep]
    batches = tuple(int(b) for b in args.batches.split(","))
    bandwidth = read_bandwidth(args.smoke)
    print(f"device: {torch.cuda.get_device_name() if not args.smoke else 'cpu (interpreter)'}, torch "
          f"{torch.__version__}, bitsandbytes: {'yes' if use_bnb else 'no'}", flush=True)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for model, name, n, k, stacks in shapes:
            rows += run_shape(model, name, n, k, stacks, batches, device, use_bnb, args.sweep, args.smoke,
                              args.tune, args.ablate, args.int4)
    table = markdown(rows, bandwidth, use_bnb)
    print(table)
    worst = max(r["rel_err"] for r in rows)
    print(f"worst relative error vs dequantize + float32 matmul: {worst:.2e}")
    out = os.environ.get("OUT")
    if out:
        meta = {"device": torch.cuda.get_device_name() if not args.smoke else "cpu",
                "torch": torch.__version__, "bitsandbytes": use_bnb, "read_tbs": bandwidth}
        Path(out, "micro_nf4.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if worst > 2e-2:
        sys.exit(f"relative error {worst:.2e} exceeds 2e-2: the kernel is wrong for some shape")


if __name__ == "__main__":
    main()
