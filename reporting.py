"""报告：终端对比表、扫参表（sweep.json / sweep.csv）、多数投票的派生臂、运行目录里的 PNG 图。

只读逐题记录与 metrics；matplotlib 延迟到作图时才导入。
"""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Sequence

import numpy as np

from config import Config
from data_loader import Question
from run_folder import atomic_write, write_json
from scoring import ArmSpec, Record
from stats import CHANCE, majority_vote, paired_stats

SWEEP_PLOT, ALPHA_HIST_PLOT, ALPHA_TRACE_PLOT = "sweep_accuracy.png", "alpha_hist.png", "alpha_trace.png"
# 图标题里的打分方式（用户读的文字：英文）。
SCORING_LABELS: dict[str, str] = {"cot": "greedy chain of thought", "letter": "letter scoring"}


def print_report(metrics: dict[str, Any], run_dir: str) -> None:
    """终端对比表：每个臂的准确率与 95% CI、未解析数、α 均值、本次会话的吞吐（投机解码的臂另起一行报告接受率）；
    有多个设置时再打印与基线的配对比较表（Δ、自助法区间、精确 McNemar、修好/弄坏数，以及 25% 随机线）。"""
    arms = metrics["arm_order"]
    width = max(10, *(len(a) + 2 for a in arms))
    print(f"\n{'arm':<{width}}{'n':>6}{'acc':>8}{'95% CI':>18}{'acc text':>10}{'forced':>8}{'unparsed':>10}"
          f"{'mean α':>9}{'tok/s':>9}{'wall s':>9}")
    for arm in arms:
        m = metrics[arm]
        ci = f"[{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" if m["ci95"] else "-"
        # 第一阶段单独的准确率与第二阶段给出的答案数（只有 CoT 有；字母打分显示 "-"）
        acc_text = f"{m['accuracy_text']:.3f}" if m.get("accuracy_text") is not None else "-"
        from_forced = str(m["from_forced"]) if "from_forced" in m else "-"
        alpha = f"{m['alpha_mean']:.3f}" if m.get("alpha_mean") is not None else "-"
        t = m.get("timing") or {}
        tps = f"{t['tokens_per_second']:.1f}" if t.get("tokens_per_second") else "-"
        wall = f"{t['seconds']:.1f}" if t.get("seconds") is not None else "-"
        print(f"{arm:<{width}}{m['n']:>6}{m['accuracy']:>8.3f}{ci:>18}{acc_text:>10}{from_forced:>8}{m['unparsed']:>10}"
              f"{alpha:>9}{tps:>9}{wall:>9}")
    if any("accuracy_text" in metrics[a] for a in arms):
        print("acc = final answers (text, else the model's own letter after the answer cue); "
              "acc text = answers read from the text only; forced = answers from the cue")
    for arm in arms:
        m = metrics[arm]
        if m.get("nonfinite_steps") or m.get("oom_backoffs"):
            print(f"{arm}: {m.get('nonfinite_steps', 0)} steps with non-finite logits used the target's logits; "
                  f"{m.get('oom_backoffs', 0)} out-of-memory back-offs")
        if m.get("nonfinite_target_stops"):
            print(f"{arm}: {m['nonfinite_target_stops']} questions stopped early because the target's own logits "
                  "were non-finite (NaN/inf; the output ends before that step, flagged in predictions.jsonl)")
    sessions = {arm: (metrics[arm].get("timing") or {}).get("sessions") for arm in arms}
    if any(n is not None and n != 1 for n in sessions.values()):
        print("tok/s and wall s are summed over every session of this run (resumed): "
              + ", ".join(f"{arm} {n} session{'s' if n != 1 else ''}" for arm, n in sessions.items() if n is not None))
    for arm in arms:
        sp = metrics[arm].get("speculation")
        if sp:  # 投机解码的臂：接受率与每次验证产出的 token 数
            acc = f"{sp['acceptance']:.3f}" if sp.get("acceptance") is not None else "-"
            tpv = f"{sp['tokens_per_verify']:.2f}" if sp.get("tokens_per_verify") is not None else "-"
            print(f"{arm}: speculative K={sp.get('k')} ({sp.get('draft')} draft): acceptance {acc} "
                  f"({sp['accepted']}/{sp['drafted']} drafted tokens accepted), {tpv} tokens per verify step")
    if metrics.get("skipped_invalid_rows"):
        print(f"invalid data rows skipped: {metrics['skipped_invalid_rows']} (the reason for each is in config.json)")
    c = metrics.get("comparison")
    if c:
        print(f"\nΔ accuracy (steered − baseline) = {c['delta']:+.3f} on n = {c['n']} paired questions; "
              f"fixed {len(c['fixed'])}, broken {len(c['broken'])}; exact McNemar p = {c['mcnemar_exact_p']:.4g}")
    if len(metrics.get("sweep", [])) > 2:
        print("\nEvery setting vs baseline (paired, same questions):")
        print(format_sweep(metrics["sweep"]))
    print(f"\nrun folder: {run_dir}")


def arm_tables(arms: Sequence[ArmSpec], by_arm: dict[str, list[Record]], questions: Sequence[Question],
               cfg: Config, metrics: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """多数投票的派生臂（"<臂>/maj@k"）与扫参表的行（每个臂 vs 基线：Wilson CI、配对自助法 Δ 区间、精确 McNemar、
    修好/弄坏的题目 index）。行里的 alpha_mean 取自各臂的 metrics（arm_metrics 已算过，不再重算）。
    返回 (majority, rows)；没有基线时 rows 为空。"""
    order = [q.index for q in questions]
    majority: dict[str, Any] = {}
    groups = list(dict.fromkeys(a.group for a in arms if a.group is not None))
    correct: dict[str, np.ndarray] = {}
    meta: dict[str, dict[str, Any]] = {}
    for arm in arms:
        recs = {r["index"]: r for r in by_arm[arm.name]}
        correct[arm.name] = np.array([recs[i]["correct"] for i in order], bool)
        meta[arm.name] = {"schedule": arm.schedule, "base_alpha": arm.base_alpha,
                          "alpha_mean": metrics[arm.name].get("alpha_mean")}
    gold = {q.index: q.answer_idx for q in questions}
    for g in groups:
        chains = [a.name for a in arms if a.group == g]
        recs = [{r["index"]: r["pred"] for r in by_arm[c]} for c in chains]
        preds = {i: majority_vote([r[i] for r in recs]) for i in order}
        name = f"{g}/maj@{len(chains)}"
        n_ok = sum(preds[i] == gold[i] for i in order)
        majority[name] = {"k": len(chains), "chains": chains, "n": len(order), "correct": n_ok,
                          "accuracy": n_ok / len(order) if order else None,
                          "predictions": {str(i): preds[i] for i in order}}
        correct[name] = np.array([preds[i] == gold[i] for i in order], bool)
        meta[name] = dict(meta[g], alpha_mean=None)
    if "baseline" not in correct:
        return majority, []
    return majority, setting_rows(correct, meta, order, seed=cfg.seed)


def setting_rows(correct: dict[str, np.ndarray], meta: dict[str, dict[str, Any]], ids: Sequence[int],
                 seed: int = 0) -> list[dict[str, Any]]:
    """把每个“臂”的逐题对错变成扫参表的行（第一行是基线自身，Δ = 0）。

    correct[名字]: (N,) bool，题目顺序与 ids 相同，必须含 "baseline"；meta[名字]: setting 的附加列
    （schedule、base_alpha、alpha_mean，没有的填 None）。CoT 与字母打分共用这一个函数，表的列因此相同。
    """
    base = np.asarray(correct["baseline"], bool)
    names = ["baseline"] + [k for k in correct if k != "baseline"]
    rows = []
    for name in names:
        m = meta.get(name, {})
        rows.append({"setting": name, "schedule": m.get("schedule"), "base_alpha": m.get("base_alpha"),
                     "alpha_mean": m.get("alpha_mean"), **paired_stats(base, correct[name], seed=seed, ids=ids)})
    return rows


def write_sweep(rows: list[dict[str, Any]], run_dir: str) -> None:
    """sweep.json（完整，含修好/弄坏的题目下标）与 sweep.csv（每设置一行，便于表格软件打开）。"""
    write_json(os.path.join(run_dir, "sweep.json"), {"chance": CHANCE, "rows": rows})
    cols = ["setting", "schedule", "base_alpha", "alpha_mean", "n", "accuracy", "ci95_low", "ci95_high", "delta",
            "delta_ci95_low", "delta_ci95_high", "mcnemar_exact_p", "n_fixed", "n_broken"]
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(cols)
    for r in rows:
        w.writerow([r["setting"], r["schedule"], r["base_alpha"], r["alpha_mean"], r["n"], r["accuracy"],
                    r["ci95"][0], r["ci95"][1], r["delta"], *r["delta_ci95_bootstrap"], r["mcnemar_exact_p"],
                    len(r["fixed"]), len(r["broken"])])
    atomic_write(os.path.join(run_dir, "sweep.csv"), text.getvalue().encode("utf-8"))


def format_sweep(rows: list[dict[str, Any]]) -> str:
    """终端表格：每设置一行，最后注明 25% 随机猜测线。"""
    lines = [f"{'setting':<28}{'acc':>7}{'95% CI':>17}{'Δ vs base':>11}{'Δ 95% CI (bootstrap)':>23}"
             f"{'McNemar p':>11}{'fixed':>7}{'broken':>8}"]
    for r in rows:
        ci = "[{:.3f}, {:.3f}]".format(*r["ci95"])
        dci = "[{:+.3f}, {:+.3f}]".format(*r["delta_ci95_bootstrap"])
        lines.append(f"{r['setting']:<28}{r['accuracy']:>7.3f}{ci:>17}{r['delta']:>+11.3f}{dci:>23}"
                     f"{r['mcnemar_exact_p']:>11.3g}{len(r['fixed']):>7}{len(r['broken']):>8}")
    lines.append(f"chance (4 options): {CHANCE:.3f}")
    return "\n".join(lines)


def save_png(fig: Any, path: str) -> None:
    """把图存成 PNG：先在内存里渲染，再经 run_folder.atomic_write 原子替换（磁盘满时旧图不变、不留临时文件）。"""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write(path, buf.getvalue())


def _pyplot() -> Any:
    """无显示环境的 matplotlib（Agg 后端）；延迟导入：只有作图时才需要 matplotlib。"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_alpha_histogram(alphas: dict[str, dict[str, np.ndarray]], path: str, unit: str,
                         scoring: str = "cot") -> Any:
    """α 的直方图。alphas[调度][设置名] = 该设置下全部 α 值（CoT：每个被引导的 token 一个；字母打分：每题一个）。

    每个调度一个子图、同一调度的各设置叠加为阶梯直方图：不同 base_alpha 的分布只是平移，放在同一张子图里
    才看得出 tanh 项把 α 推开了多少。unit 写进横轴标题（"per generated token" / "per question"）。
    """
    plt = _pyplot()
    groups = list(alphas)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        # 同一子图共用一组等宽的箱：各设置的柱高才可以直接比较。
        every = np.concatenate([np.asarray(v, float) for v in alphas[group].values()] or [np.zeros(0)])
        lo, hi = (float(every.min()), float(every.max())) if every.size else (0.0, 1.0)
        bins = np.linspace(lo - 0.05, hi + 0.05, 61)
        for name, values in alphas[group].items():
            v = np.asarray(values, float)
            if v.size:
                ax.hist(v, bins=bins, histtype="step", linewidth=1.4, label=f"{name} (n={v.size})")
        ax.set_title(group)
        ax.set_xlabel(f"α {unit}")
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
    fig.suptitle(f"MedQA, {SCORING_LABELS.get(scoring, scoring)}: distribution of the steering weight α {unit}")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return fig


def plot_alpha_trace(traces: dict[str, Sequence[float]], path: str, question_index: int) -> Any:
    """一道题的 α 轨迹：横轴为生成的第几个 token，每个融合臂一条线（各臂的生成文本可能不同，长度也不同）。
    采样链（名字里带 "/sample"）用细虚线，贪心臂用实线。返回 Figure（已关闭，供测试检查标题与图例）。"""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, trace in traces.items():
        sampled = "/sample" in name
        ax.plot(range(len(trace)), trace, linewidth=0.8 if sampled else 1.3, linestyle="--" if sampled else "-",
                label=f"{name} (sampled)" if sampled else name)
    ax.set_xlabel("generated token")
    ax.set_ylabel("α(t)")
    ax.set_title(f"MedQA, greedy chain of thought: α over the generated tokens of question index {question_index}"
                 if not any("/sample" in n for n in traces) else
                 f"MedQA, chain of thought (greedy and sampled): α over the generated tokens of question index "
                 f"{question_index}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return fig


def plot_sweep(rows: list[dict[str, Any]], path: str, scoring: str = "cot") -> Any:
    """准确率 vs base_alpha，每个调度一条线，带 95% CI 误差棒；基线（目标单独）与 25% 随机线为水平线。"""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    schedules = list(dict.fromkeys(r["schedule"] for r in rows if r["schedule"]))
    xs = [r["base_alpha"] for r in rows if r["schedule"]]
    dodge = 0.012 * ((max(xs) - min(xs)) or 1.0)  # 各调度在 x 方向错开一点，误差棒不互相遮挡
    for i, schedule in enumerate(schedules):
        pts = sorted((r["base_alpha"], r["accuracy"], r["ci95"]) for r in rows if r["schedule"] == schedule)
        x = [p[0] + (i - (len(schedules) - 1) / 2) * dodge for p in pts]
        y = [p[1] for p in pts]
        err = [[p[1] - p[2][0] for p in pts], [p[2][1] - p[1] for p in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"steered, {schedule} (95% Wilson CI)")
    base = rows[0]
    ax.axhline(base["accuracy"], color="black", linestyle="--", label=f"baseline: target alone ({base['accuracy']:.3f})")
    ax.axhspan(base["ci95"][0], base["ci95"][1], color="grey", alpha=0.15, label="baseline 95% Wilson CI")
    ax.axhline(CHANCE, color="red", linestyle=":", label="chance (0.25)")
    ax.set_xlabel("BASE_ALPHA")
    ax.set_ylabel(f"accuracy (n = {base['n']}, 95% CI)")
    ax.set_title(f"MedQA, {SCORING_LABELS.get(scoring, scoring)}: accuracy vs BASE_ALPHA "
                 f"({', '.join(schedules)} vs baseline)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return fig


def make_plots(cfg: Config, arms: Sequence[ArmSpec], by_arm: dict[str, list[Record]],
               rows: list[dict[str, Any]], trace_index: int, run_dir: str) -> list[str]:
    """运行目录里的 PNG：扫参时准确率 vs α（每调度一条线，95% CI 误差棒、基线与 25% 线）；有融合臂时 α 直方图
    （CoT 每个被引导的 token 一个值，字母打分每题一个）；CoT 时 trace_index 那道题的 α 轨迹。返回写出的文件名。"""
    written = []
    fused = [a for a in arms if a.steering is not None and a.sampling is None]
    if cfg.sweep and rows:
        # 只画贪心的网格：采样链与多数投票（名字里带 "/"）不是 α 轴上的点
        plot_sweep([r for r in rows if "/" not in r["setting"]], os.path.join(run_dir, SWEEP_PLOT), cfg.scoring)
        written.append(SWEEP_PLOT)
    if fused:
        groups: dict[str, dict[str, np.ndarray]] = {}
        for a in fused:
            values = [v for r in by_arm[a.name] for v in r.get("alpha", [])]
            groups.setdefault(a.schedule or "steered", {})[a.name] = np.array(values, float)
        unit = "per question (answer position)" if cfg.scoring == "letter" else "per generated token"
        plot_alpha_histogram(groups, os.path.join(run_dir, ALPHA_HIST_PLOT), unit, cfg.scoring)
        written.append(ALPHA_HIST_PLOT)
        if cfg.scoring == "cot":
            # 每个融合臂一条线，包括采样链（README：one line per fused arm）
            traces = {a.name: next(r.get("alpha", []) for r in by_arm[a.name] if r["index"] == trace_index)
                      for a in arms if a.steering is not None}
            plot_alpha_trace(traces, os.path.join(run_dir, ALPHA_TRACE_PLOT), trace_index)
            written.append(ALPHA_TRACE_PLOT)
    return written
