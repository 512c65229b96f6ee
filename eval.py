"""`python eval.py --tasks T1,T2 …`：用 lm-evaluation-harness 在基线（目标单独）与引导模型上跑任意 lm-eval 任务。

与 main.py 同一套配置参数（由 config.build_parser 派生：--target/--expert/--base、--demo、α、调度、β、
系统提示、--batch-size、--fast/--compile、--seed……），另加 lm-eval 的参数（--tasks、--include-path、
--num-fewshot、--bootstrap-iters、--add-bos-token、--builtin-tasks）。--limit / --all-questions 的含义与 main.py 相同：
每个任务只评测前 N 条（lm-eval 的 limit），或全部。

输出（--output-dir，缺省 runs/lmeval-<时间戳>/）：每个臂一个子目录，<臂>/results.json 是 lm-eval 自己的结果 JSON
（simple_evaluate 的返回值去掉逐条样本），<臂>/samples_<任务>.jsonl 是逐条样本；comparison.json 与终端表格
比较两个臂（多选题另有逐题的修好/弄坏数与精确 McNemar p）。

离线：本地 YAML 任务（tasks/ 下，例如 medqa_4options_local）不需要网络；lm-eval 自带的任务大多从 HF hub 下载数据，
需要网络（或已缓存的数据集）。
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from typing import Any, Sequence

# --- 项目内的名字：集中在这一处，代码重组时只改这里 ---------------------------------------------
from config import Config, ConfigError, build_parser, demo_overrides
from data_loader import DataError
from stats import mcnemar_exact_p
from model_loader import ModelLoadError

TASKS_DIR: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
ARMS: tuple[str, ...] = ("baseline", "steered")
# main.py 的这些参数在 lm-eval 里没有对应：数据与提示来自任务，生成参数来自任务的 generation_kwargs。显式给出时报错。
NOT_APPLICABLE: tuple[str, ...] = ("dataset_id", "data_file", "split", "skip_invalid", "scoring", "sweep",
                                   "sweep_alphas", "sweep_schedules", "temperature", "top_p", "votes", "trace_index",
                                   "resume", "system_prompt")


def build_eval_parser() -> argparse.ArgumentParser:
    """main.py 的参数（config.build_parser）加上 lm-eval 专用的几个。"""
    parser = build_parser()
    parser.prog = "eval.py"
    parser.description = ("Run lm-evaluation-harness tasks on the target alone (baseline) and on the domain-steered "
                          "model; writes lm-eval's results JSON per arm. Defaults come from config.py.")
    group = parser.add_argument_group("lm-eval")
    group.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (e.g. medqa_4options_local)")
    group.add_argument("--include-path", action="append", default=None,
                       help=f"extra folder of task YAMLs (repeatable); {TASKS_DIR} is always included")
    group.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's own)")
    group.add_argument("--samples", type=json.loads, default=None,
                       help='JSON {"task": [doc ids]}: evaluate only these documents (lm-eval\'s --samples); '
                            "replaces --limit")
    group.add_argument("--bootstrap-iters", type=int, default=100000, help="lm-eval bootstrap iterations for stderr")
    group.add_argument("--add-bos-token", action=argparse.BooleanOptionalAction, default=None,
                       help="force (or with --no-add-bos-token forbid) the tokenizer's BOS; by default the tokenizer "
                            "decides, as in lm-eval's `hf` model and main.py --scoring letter (Llama-3 adds it)")
    group.add_argument("--max-length", type=int, default=None,
                       help="longest sequence per forward (default: the target's max_position_embeddings); "
                            "sets the rolling-window size for perplexity tasks")
    group.add_argument("--builtin-tasks", action=argparse.BooleanOptionalAction, default=True,
                       help="also index lm-eval's own tasks (slower start; most need network for their data)")
    return parser


def parse_eval_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """命令行 → (Config, lm-eval 选项)。Config 的规则与 main.py 的 parse_args 相同（显式参数 > --demo > config.py）。"""
    ns = build_eval_parser().parse_args(argv)
    lm_keys = {"tasks", "include_path", "num_fewshot", "bootstrap_iters", "add_bos_token", "builtin_tasks", "samples",
               "max_length"}
    explicit = {k: v for k, v in vars(ns).items() if k not in lm_keys}
    bad = [k for k in NOT_APPLICABLE if k in explicit]
    if bad:
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in bad)}: not used by eval.py (the lm-eval "
                          "task defines the data, the prompt and the generation settings)")
    if "limit" in explicit and explicit.get("all_questions"):
        raise ConfigError("--limit and --all-questions are mutually exclusive")
    if ns.samples is not None and ("limit" in explicit or explicit.get("all_questions")):
        raise ConfigError("--samples picks the documents itself: drop --limit / --all-questions")
    if ns.samples is not None and (not isinstance(ns.samples, dict) or not all(
            isinstance(v, list) and all(isinstance(i, int) for i in v) for v in ns.samples.values())):
        raise ConfigError(f"--samples must be a JSON object {{task: [doc ids]}}, got {ns.samples!r}")
    values: dict[str, Any] = demo_overrides() if explicit.get("demo") else {}
    values.update(explicit)
    cfg = Config(**values)
    lm = argparse.Namespace(**{k: getattr(ns, k) for k in lm_keys})
    lm.tasks = [t.strip() for t in lm.tasks.split(",") if t.strip()]
    if not lm.tasks:
        raise ConfigError("--tasks is empty: give at least one lm-eval task name")
    return cfg, lm


def arm_results(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """simple_evaluate 的返回值 → (结果 JSON 的内容, {任务: 逐条样本})。"""
    results = dict(results)
    samples = results.pop("samples", {}) or {}
    return results, samples


def write_arm(out_dir: str, results: dict[str, Any], samples: dict[str, list[dict[str, Any]]]) -> None:
    """<臂>/results.json（lm-eval 的格式与序列化规则：handle_non_serializable）与 samples_<任务>.jsonl。"""
    from lm_eval.utils import handle_non_serializable

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        f.write("\n")
    for task, rows in samples.items():
        with open(os.path.join(out_dir, f"samples_{task}.jsonl"), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")


def _doc_correct(samples: list[dict[str, Any]]) -> dict[int, bool] | None:
    """多选题逐条的对错（lm-eval 写在样本里的 acc）；没有 acc 的任务返回 None。"""
    if not samples or "acc" not in samples[0]:
        return None
    return {int(s["doc_id"]): bool(s["acc"]) for s in samples}


def compare(per_arm: dict[str, tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]]) -> dict[str, Any]:
    """两个臂的比较：每个任务每个指标一行（baseline、steered、Δ）；有逐条 acc 时另有配对的修好/弄坏与 McNemar p。"""
    if set(per_arm) != set(ARMS):
        return {}
    (base, base_samples), (steer, steer_samples) = per_arm["baseline"], per_arm["steered"]
    rows = []
    for task, metrics in base.get("results", {}).items():
        other = steer.get("results", {}).get(task, {})
        for key, value in metrics.items():
            if "stderr" in key or key == "sample_len" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if isinstance(other.get(key), (int, float)):
                rows.append({"task": task, "metric": key, "baseline": value, "steered": other[key],
                             "delta": other[key] - value})
    paired = {}
    for task in base_samples:
        a, b = _doc_correct(base_samples[task]), _doc_correct(steer_samples.get(task, []))
        if a is None or b is None or a.keys() != b.keys():
            continue
        fixed = sorted(d for d in a if b[d] and not a[d])
        broken = sorted(d for d in a if a[d] and not b[d])
        paired[task] = {"n": len(a), "fixed": fixed, "broken": broken,
                        "mcnemar_exact_p": mcnemar_exact_p(len(fixed), len(broken))}
    return {"rows": rows, "paired": paired}


def format_comparison(comparison: dict[str, Any]) -> str:
    """终端表格（英文）。"""
    lines = [f"{'task':<28}{'metric':<18}{'baseline':>10}{'steered':>10}{'delta':>9}"]
    for r in comparison.get("rows", []):
        lines.append(f"{r['task']:<28}{r['metric']:<18}{r['baseline']:>10.4f}{r['steered']:>10.4f}{r['delta']:>+9.4f}")
    for task, p in comparison.get("paired", {}).items():
        lines.append(f"{task}: n = {p['n']} paired docs, fixed {len(p['fixed'])}, broken {len(p['broken'])}, "
                     f"exact McNemar p = {p['mcnemar_exact_p']:.4g}")
    return "\n".join(lines)


def run(cfg: Config, lm_opts: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    """加载一次模型，依次跑 cfg.modes 里的臂，写结果；返回 {"arms": {臂: 结果 JSON}, "comparison": …}。"""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm_eval_adapter import SteeredLM
    from model_loader import load_models, load_tokenizer, resolve_device

    tokenizer = load_tokenizer(cfg.target)
    models, vocab_size = load_models(cfg, tokenizer, resolve_device(cfg))
    tm = TaskManager(include_path=[TASKS_DIR] + list(lm_opts.include_path or []),
                     include_defaults=lm_opts.builtin_tasks)
    unknown = [t for t in lm_opts.tasks if t not in tm.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)}. Local tasks live in {TASKS_DIR}; "
                          "add folders with --include-path" + ("" if lm_opts.builtin_tasks else
                                                               ", or drop --no-builtin-tasks"))
    limit = None if cfg.all_questions or lm_opts.samples is not None else cfg.limit
    per_arm = {}
    for arm in (a for a in ARMS if a in cfg.modes):
        lm = SteeredLM.from_config(cfg, arm, models=models, tokenizer=tokenizer, vocab_size=vocab_size,
                                   add_bos_token=lm_opts.add_bos_token, max_length=lm_opts.max_length)
        results = simple_evaluate(model=lm, tasks=list(lm_opts.tasks), num_fewshot=lm_opts.num_fewshot,
                                  limit=limit, samples=lm_opts.samples, log_samples=True, task_manager=tm,
                                  bootstrap_iters=lm_opts.bootstrap_iters, random_seed=cfg.seed,
                                  numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                                  fewshot_random_seed=cfg.seed)
        if results is None:
            raise RuntimeError("lm-eval returned no results (non-zero rank?)")
        results["config"]["steered_config"] = cfg.to_dict()
        per_arm[arm] = arm_results(results)
        write_arm(os.path.join(out_dir, arm), *per_arm[arm])
    comparison = compare(per_arm)
    if comparison:
        with open(os.path.join(out_dir, "comparison.json"), "w", encoding="utf-8") as f:
            json.dump(comparison, f, indent=2)
    return {"arms": {a: r for a, (r, _) in per_arm.items()}, "samples": {a: s for a, (_, s) in per_arm.items()},
            "comparison": comparison}


def main(argv: Sequence[str] | None = None) -> int:
    """命令行入口：已知的配置错误打印一行消息并返回 2。"""
    try:
        cfg, lm_opts = parse_eval_args(argv)
        out_dir = cfg.output_dir or os.path.join("runs", "lmeval-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            raise ConfigError(f"output folder {out_dir} exists and is not empty; choose another --output-dir")
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ConfigError("lm-eval is not installed: pip install lm-eval==0.4.13 "
                              "(pinned with its dependencies in requirements.txt)")
        out = run(cfg, lm_opts, out_dir)
    except (ConfigError, DataError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table

    for arm, results in out["arms"].items():
        print(f"\n== {arm} ==\n{make_table(results)}")
    if out["comparison"]:
        print(format_comparison(out["comparison"]))
    print(f"\nresults: {out_dir}/<arm>/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
