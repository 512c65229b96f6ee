"""研究用评测：字母打分（不生成，每题每模型一次前向）、一次加载上的 α 扫参、配对统计、作图。

为什么字母打分能让扫参几乎免费：在答案位置上，α 只取决于目标与专家整词表分布的距离 d（每题一个数），
融合后的预测只取决于三个模型在 " A" … " D" 四个 token 上的 logits。所以每题只需前向一次、
保存 d 与 3 × 4 个 logits；之后任何 (调度, α) 组合都是对这些小数组的逐元素运算。

提示格式与 lm-evaluation-harness 的 medqa_4options 相同（"Question: …\\nA. …\\n…\\nAnswer:"，
候选续写为 " A" … " D"），便于用户拿目标模型的准确率与 lm-eval 的结果互相核对。
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from evaluator import left_pad, mcnemar_exact_p, wilson_ci95
from steering_utils import alpha_from_distance, distance

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
CHANCE: float = 0.25  # 四选一的随机猜测准确率


def letter_prompt(question: Any) -> str:
    """lm-eval medqa_4options 风格的提示（不经过聊天模板）：题干、四个选项、以 "Answer:" 结尾。"""
    options = "\n".join(f"{k}. {question.options[k]}" for k in LETTERS)
    return f"Question: {question.question.strip()}\n{options}\nAnswer:"


def letter_token_ids(tokenizers: dict[str, Any]) -> list[int]:
    """" A" … " D" 的 token id（答案位置上的四个候选）。每个必须恰好是一个 token，且各角色分词器给出相同 id，
    否则“限制到四个字母上取 argmax”就不等价于比较四个续写的似然，必须在任何前向之前报错。"""
    ids: dict[str, list[int]] = {}
    for role, tok in tokenizers.items():
        row = []
        for letter in LETTERS:
            pieces = tok.encode(" " + letter, add_special_tokens=False)
            if len(pieces) != 1:
                raise ValueError(f"{role} 的分词器把 ' {letter}' 切成了 {len(pieces)} 个 token {pieces}；字母打分要求单个 token")
            row.append(pieces[0])
        ids[role] = row
    if len({tuple(v) for v in ids.values()}) != 1:
        raise ValueError(f"各角色的字母 token id 不一致：{ids}；字母打分要求共享分词器")
    return next(iter(ids.values()))


@dataclass
class LetterScores:
    """每题的打分原料。letters[角色]: (N, 4) float32，四个字母 token 的 logits；
    distance: (N,) float32，答案位置上目标与专家整词表分布的距离（无专家时为 None）。"""

    letters: dict[str, torch.Tensor]
    distance: torch.Tensor | None


@torch.inference_mode()
def score_letters(models: dict[str, PreTrainedModel],
                  prompt_ids: Sequence[Sequence[int]] | dict[str, Sequence[Sequence[int]]], letter_ids: list[int],
                  *, vocab_size: int, batch_size: int, metric: str = "js") -> LetterScores:
    """每个模型对每道题做一次前向（左填充成批，只算最后位置的 logits），收集字母 logits 与距离。

    prompt_ids: 每题的 id 列表——三个角色共用一份，或 {角色: 各自的一份}（角色有自己的系统提示时，
    见 main.letter_role_text）。返回的数组都在 CPU 上，按题目顺序排列。
    """
    per_role = prompt_ids if isinstance(prompt_ids, dict) else {role: prompt_ids for role in models}
    n = len(next(iter(per_role.values())))
    letters: dict[str, list[torch.Tensor]] = {role: [] for role in models}
    dists: list[torch.Tensor] = []
    index = torch.tensor(letter_ids)
    for lo in range(0, n, batch_size):
        z = {}
        for role, model in models.items():
            ids, mask = left_pad(per_role[role][lo:lo + batch_size], 0, model.device)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
            z[role] = out.logits[:, -1, :vocab_size].float()
            letters[role].append(z[role][:, index.to(z[role].device)].cpu())
        if "expert" in z:
            dists.append(distance(z["target"], z["expert"], metric).cpu())
    return LetterScores(letters={r: torch.cat(v) for r, v in letters.items()},
                        distance=torch.cat(dists) if dists else None)


def letter_predictions(scores: LetterScores, schedule: str, base_alpha: float, adaptive_scale: float,
                       max_boost: float, plausibility_beta: float = 0.0
                       ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """一个 (调度, α) 设置下的预测字母下标 (N,)、每题的 α (N,) 与融合后的字母 logits (N, 4) float32。
    融合公式与生成时相同：z = z_t + α·(z_e − z_b)，只是限制在四个字母上；预测就是融合 logits 的 argmax，
    调用者（main.letter_records）把同一份融合 logits 写进记录，记录与预测因此不会不一致。

    plausibility_beta > 0 时的可信度约束也限制在四个字母上：只有目标概率 ≥ β × 四个字母里目标的最大概率的字母可选
    （即 z_t ≥ max z_t + ln β）。候选先被限制成四个字母，约束才有意义——整词表上目标的最大 token 往往不是字母。
    目标最偏好的字母永远可选，所以至少有一个候选；不可选的字母在返回的融合 logits 里为 −inf。
    """
    alpha = alpha_from_distance(scores.distance, schedule, base_alpha, adaptive_scale, max_boost)
    z = scores.letters
    fused = z["target"] + alpha[:, None] * (z["expert"] - z["base"])
    if plausibility_beta > 0:
        zt = z["target"]
        eligible = zt >= zt.max(-1, keepdim=True).values + float(np.log(plausibility_beta))
        fused = fused.masked_fill(~eligible, float("-inf"))
    return fused.argmax(-1).numpy(), alpha.numpy(), fused


# ---------------------------------------------------------------------------
# 统计：Wilson 区间、精确 McNemar、配对自助法（bootstrap）差值区间
# ---------------------------------------------------------------------------

def paired_stats(base_correct: np.ndarray, other_correct: np.ndarray, *, n_boot: int = 10_000,
                 seed: int = 0, ids: Sequence[int] | None = None) -> dict[str, Any]:
    """同一批题上“某设置 vs 基线”的配对比较（两个 (N,) bool 数组）。

    - accuracy 与 95% Wilson 区间（evaluator.wilson_ci95，与 metrics.json 同一实现）；
    - delta 与配对自助法 95% 区间：对题目重抽样 n_boot 次，保留配对结构（同一题的两个结果一起抽）；
    - 精确 McNemar 双侧 p 值（evaluator.mcnemar_exact_p）；
    - fixed / broken：被该设置修好 / 弄坏的题目——ids 给出时为题目 index（ids[k] 是第 k 个位置的题目），否则为位置下标。
    """
    base, other = np.asarray(base_correct, bool), np.asarray(other_correct, bool)
    n = len(base)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(n_boot, n))
    deltas = other[picks].mean(1) - base[picks].mean(1)
    fixed, broken = np.flatnonzero(other & ~base), np.flatnonzero(base & ~other)
    if ids is not None:
        fixed, broken = np.asarray(ids)[fixed], np.asarray(ids)[broken]
    return {"n": n, "accuracy": float(other.mean()), "ci95": wilson_ci95(int(other.sum()), n),
            "delta": float(other.mean() - base.mean()),
            "delta_ci95_bootstrap": [float(np.quantile(deltas, 0.025)), float(np.quantile(deltas, 0.975))],
            "mcnemar_exact_p": mcnemar_exact_p(len(fixed), len(broken)),
            "fixed": fixed.tolist(), "broken": broken.tolist()}


def arm_name(schedule: str, base_alpha: float) -> str:
    """扫参中一个设置的名字（也是 predictions.jsonl 里的 mode）：例如 "adaptive@0.5"。"""
    return f"{schedule}@{base_alpha:g}"


def write_sweep(rows: list[dict[str, Any]], run_dir: str) -> None:
    """sweep.json（完整，含修好/弄坏的题目下标）与 sweep.csv（每设置一行，便于表格软件打开）。"""
    with open(os.path.join(run_dir, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump({"chance": CHANCE, "rows": rows}, f, indent=2, ensure_ascii=False)
    cols = ["setting", "schedule", "base_alpha", "alpha_mean", "n", "accuracy", "ci95_low", "ci95_high", "delta",
            "delta_ci95_low", "delta_ci95_high", "mcnemar_exact_p", "n_fixed", "n_broken"]
    with open(os.path.join(run_dir, "sweep.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r["setting"], r["schedule"], r["base_alpha"], r["alpha_mean"], r["n"], r["accuracy"],
                        r["ci95"][0], r["ci95"][1], r["delta"], *r["delta_ci95_bootstrap"], r["mcnemar_exact_p"],
                        len(r["fixed"]), len(r["broken"])])


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


def _pyplot() -> Any:
    """无显示环境的 matplotlib（Agg 后端）；延迟导入：只有作图时才需要 matplotlib。"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_alpha_histogram(alphas: dict[str, dict[str, np.ndarray]], path: str, unit: str) -> None:
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
    fig.suptitle("Distribution of the steering weight α")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_alpha_trace(traces: dict[str, Sequence[float]], path: str, question_index: int) -> None:
    """一道题的 α 轨迹：横轴为生成的第几个 token，每个融合设置一条线（各设置的生成文本可能不同，长度也不同）。"""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, trace in traces.items():
        ax.plot(range(len(trace)), trace, linewidth=1.1, label=name)
    ax.set_xlabel("generated token")
    ax.set_ylabel("α(t)")
    ax.set_title(f"α over generated tokens, question index {question_index}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(rows: list[dict[str, Any]], path: str) -> None:
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
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=schedule)
    base = rows[0]
    ax.axhline(base["accuracy"], color="black", linestyle="--", label=f"target alone ({base['accuracy']:.3f})")
    ax.axhspan(base["ci95"][0], base["ci95"][1], color="grey", alpha=0.15)
    ax.axhline(CHANCE, color="red", linestyle=":", label="chance (0.25)")
    ax.set_xlabel("BASE_ALPHA")
    ax.set_ylabel(f"accuracy (n = {base['n']}, 95% CI)")
    ax.set_title("MedQA letter scoring: steered accuracy vs α")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
