"""把几份 bench.py 的结果（--out 写的 JSON，完整的或被时限截断的 rows_so_far）并排成 Markdown 表。

为什么要它：一次 GPU 会话里 bf16、NF4、int4 各跑一个进程（各自一份 JSON），BENCHMARKS.md 要的是同一 (批, 模式)
的并排比较、比值与“占 floor 时间的比例”，以前靠手算，容易抄错。这里只读文件、只做算术，不碰 GPU。

  python benchmarks/compare_rows.py bf16.json nf4.json int4.json      # 第一份是比值的基准
  python benchmarks/compare_rows.py nf4.json --kernels                 # 另列 NF4 调优的选择与每步矩阵乘的和
  python benchmarks/compare_rows.py tune.json --kernels                # 调优缓存文件（--nf4-tuning-cache）里的选择

每一列的数：ms/step（tok/s）、与第一份的比值、峰值 GiB、floor GB/step、floor 折算的 TB/s、占 floor 时间的比例
（= floor 字节 ÷ 该进程自己测的只读带宽 ÷ 每步时间）、预热秒数（其中调优秒数）。缺的行写 "—"。
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import llama_config  # noqa: E402

MISSING = "—"


def load_run(path: str) -> dict[str, Any]:
    """一份 bench JSON → {label, commit, read_tbps, complete, rows}。label = 权重格式（bf16 / nf4 / int4）；
    被截断的文件（complete 为 false）用 rows_so_far。没有测速行（--check / --profile 的文件）时报错说明。
    NF4 的调优缓存文件（--nf4-tuning-cache，{fingerprint, entries}）也收：没有测速行，只有 kernel 的选择——
    被时限截断的进程可能已经调好了某个批大小却没留下那一行（49198b8 的 M = 16 就是这样）。"""
    with open(path, encoding="utf-8") as fh:
        report = json.load(fh)
    if "entries" in report and "fingerprint" in report:
        kernels = {name.rsplit("_", 1)[0]: e for name, e in report["entries"].items() if name.endswith("_bfloat16")}
        return {"label": "tuning cache", "commit": "?", "read_tbps": None, "complete": True, "rows": [],
                "kernels": kernels}
    rows = report.get("rows") if report.get("complete") else report.get("rows_so_far")
    if rows is None or "args" not in report:
        raise ValueError(f"{path}: not a timing report of bench.py (no rows; --check and --profile files have none)")
    return {"label": report["args"].get("quant", "bf16"), "commit": report.get("env", {}).get("commit", "?"),
            "read_tbps": (report.get("read_bandwidth") or {}).get("tbps_best"),
            "complete": bool(report.get("complete")), "rows": [r for r in rows if r.get("path", "fast") == "fast"]}


def floor_share(row: dict[str, Any], read_tbps: float | None) -> float | None:
    """占 floor 时间的比例：floor 字节按该进程的只读带宽要用的时间 ÷ 实测每步时间（没有带宽或 floor 时为 None）。"""
    if not read_tbps or "floor_bytes" not in row:
        return None
    return row["floor_bytes"] / 1e9 / read_tbps / row["ms_per_step"]


def _key(row: dict[str, Any]) -> tuple[int, str]:
    """并排的键：(批大小, 模式)。不同文件的同一键放在同一行。"""
    return row["batch"], row["mode"]


def compare_table(runs: Sequence[dict[str, Any]]) -> str:
    """并排表：每个 (批, 模式) 一行（按第一次出现的顺序），每份结果一组列；比值对第一份。"""
    keys: list[tuple[int, str]] = []
    for run in runs:
        for row in run["rows"]:
            if _key(row) not in keys:
                keys.append(_key(row))
    head = ["batch", "mode"]
    for k, run in enumerate(runs):
        name = f"{run['label']} `{run['commit']}`"
        head += [f"{name} ms (tok/s)"] + ([f"{name} / {runs[0]['label']}"] if k else []) + [
            f"{name} peak GiB", f"{name} floor GB", f"{name} TB/s", f"{name} share of floor time",
            f"{name} warm-up s (tuning)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for batch, mode in keys:
        cells = [str(batch), mode]
        base = next((r for r in runs[0]["rows"] if _key(r) == (batch, mode)), None)
        for k, run in enumerate(runs):
            row = next((r for r in run["rows"] if _key(r) == (batch, mode)), None)
            if row is None:
                cells += [MISSING] * (7 if k else 6)
                continue
            share = floor_share(row, run["read_tbps"])
            tune = row.get("tune_s")
            cells.append(f"{row['ms_per_step']:.3f} ({row['tok_per_s']:,.0f})")
            if k:
                cells.append(f"{row['ms_per_step'] / base['ms_per_step']:.2f}" if base else MISSING)
            cells += [f"{row['peak_gib']:.2f}" if "peak_gib" in row else MISSING,
                      f"{row['floor_gb']:.2f}" if "floor_gb" in row else MISSING,
                      f"{row['achieved_tbps']:.2f}" if "achieved_tbps" in row else MISSING,
                      f"{share:.0%}" if share is not None else MISSING,
                      f"{row['warmup_s']:.0f}" + (f" ({tune:.1f})" if tune else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kernel_table(run: dict[str, Any], preset: str = "real") -> str:
    """NF4 调优的选择（每行的 nf4_kernels）：每个 (形状, M) 一行，方式与块配置、split-K、µs 与各方式的最好 µs；
    再按层数把所选的 µs 加成每步的矩阵乘时间（S = 1 是目标模型的层数，S = 2 是叠起来的专家与基座的层数）。"""
    layers = {1: llama_config("8b", preset).num_hidden_layers, 2: llama_config("1b", preset).num_hidden_layers}
    entries: dict[str, dict[str, Any]] = dict(run.get("kernels", {}))
    for row in run["rows"]:
        entries.update(row.get("nf4_kernels") or {})
    if not entries:
        return "(no NF4 kernel choices in these rows)"
    lines = ["| shape | M | chosen (method, BLOCK_M, BLOCK_N, NB, warps, stages) | split-K | µs | best µs by method |",
             "|---|---|---|---|---|---|"]
    per_step: dict[int, dict[int, float]] = {}
    for name, e in sorted(entries.items(), key=lambda kv: (int(kv[0].rsplit("_M", 1)[1]), kv[0])):
        shape, m = name.rsplit("_M", 1)
        s = int(shape.split("_")[0][1:])
        by_method = ", ".join(f"{k} {v:.2f}" for k, v in sorted(e.get("us_by_method", {}).items(), key=lambda kv: kv[1]))
        lines.append(f"| {shape} | {m} | {tuple(e['config'])} | {e['split_k']} | {e['us']:.2f} | {by_method} |")
        per_step.setdefault(int(m), {}).setdefault(s, 0.0)
        per_step[int(m)][s] += e["us"] * layers.get(s, 0)
    for m, sums in sorted(per_step.items()):
        target = sums.get(1, 0.0) / 1000
        lines.append(f"\nM = {m}: chosen matmuls per step {target:.2f} ms target alone, "
                     f"{(target + sums.get(2, 0.0) / 1000):.2f} ms steered (the pair's shapes added)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """命令行入口：读文件（读不了或不是测速报告时 argparse 报错退出），打印并排表，--kernels 时再打印调优的选择。"""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("files", nargs="+", help="bench.py --out files; the first is the baseline of the ratios")
    parser.add_argument("--kernels", action="store_true", help="also list the NF4 tuner's choices of each file")
    parser.add_argument("--preset", choices=("real", "tiny"), default="real", help="layer counts for the sums")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(f) for f in args.files]
    except (OSError, ValueError, KeyError) as exc:
        parser.error(str(exc))
    for run, path in zip(runs, args.files):
        if not run["complete"]:
            print(f"note: {path} was cut before it finished; only its finished rows are shown", file=sys.stderr)
    timed = [run for run in runs if "kernels" not in run]
    if timed:
        print(compare_table(timed))
    elif not args.kernels:
        parser.error("only tuning caches were given: add --kernels to list their choices")
    if args.kernels:
        for run, path in zip(runs, args.files):
            print(f"\n{path}:\n{kernel_table(run, args.preset)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
