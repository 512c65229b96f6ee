"""统计：准确率的 Wilson 区间、精确 McNemar、配对自助法（paired_stats）、多数投票、每个臂的指标与两臂的配对比较。

全部从逐题记录（predictions.jsonl）或逐题对错数组算出，不碰模型。
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from config import LETTERS
from scoring import Record

CHANCE: float = 1.0 / len(LETTERS)  # 四选一的随机猜测准确率


def wilson_ci95(correct: int, n: int) -> list[float] | None:
    """准确率的 95% Wilson 区间 [low, high]（scipy.stats.binomtest）；n = 0 时为 None。
    Wilson 而非正态近似：准确率靠近 0 或 1、n 只有几十时正态区间会越出 [0, 1]。"""
    from scipy.stats import binomtest

    if not n:
        return None
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return [ci.low, ci.high]


def mcnemar_exact_p(fixed: int, broken: int) -> float:
    """精确 McNemar 双侧 p 值：只看不一致的题对（fixed = b，broken = c），H0 下 b ~ Binomial(b + c, 1/2)。
    题量几百时不一致对往往只有几十个，卡方近似不可靠，所以用精确二项检验；没有不一致对时 p = 1。"""
    from scipy.stats import binomtest

    return binomtest(int(fixed), int(fixed + broken), 0.5).pvalue if fixed + broken else 1.0


def paired_stats(base_correct: np.ndarray, other_correct: np.ndarray, *, n_boot: int = 10_000,
                 seed: int = 0, ids: Sequence[int] | None = None) -> dict[str, Any]:
    """同一批题上“某设置 vs 基线”的配对比较（两个 (N,) bool 数组）。

    - accuracy 与 95% Wilson 区间（wilson_ci95，与 metrics.json 同一实现）；
    - delta 与配对自助法 95% 区间：对题目重抽样 n_boot 次，保留配对结构（同一题的两个结果一起抽）；
    - 精确 McNemar 双侧 p 值（mcnemar_exact_p）；
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


def majority_vote(preds: Sequence[str | None]) -> str | None:
    """多数投票：出现最多的字母；平局时取平局字母中最早出现在链里的那个（即“第一条链优先”）。
    抽不出答案的链（None）不投票；全部为 None 时结果为 None。"""
    counts: dict[str, int] = {}
    for p in preds:
        if p is not None:
            counts[p] = counts.get(p, 0) + 1
    if not counts:
        return None
    top = max(counts.values())
    return next(p for p in preds if p is not None and counts[p] == top)


def arm_metrics(mode: str, records: Sequence[Record], *, oom_backoffs: int = 0,
                timing: dict[str, Any] | None = None, speculation: dict[str, Any] | None = None) -> dict[str, Any]:
    """一个模式的指标，从逐题记录（predictions.jsonl，持久的唯一来源）算出：n、correct、accuracy、
    95% Wilson 区间、unparsed（抽不出答案的题数，计为错）、generated_tokens（所有记录的 num_tokens 之和）、
    oom_backoffs；引导模式另有 alpha_mean（按题平均的 alpha_mean 再平均）与 nonfinite_steps（守卫触发的总步数）；
    记录里有 nonfinite_target_stops 的臂（CoT 解码的所有臂）另有它的和：因目标 logits 非有限而停止的题数。

    CoT 的记录（带 pred_text / pred_forced）另有两阶段答案抽取的计数与准确率：from_text（第一阶段从文本读出）、
    from_forced（第二阶段由模型选出）、none（都没有，计为错；等于 unparsed），correct_text / accuracy_text
    （只用第一阶段时的对题数与准确率）。accuracy 是两阶段合起来的（最终 pred），即主要的数字。
    投机解码的臂（记录里有 drafted）另有 "speculation"：speculation 参数给出的设置（k、draft）加上 speculation_summary。

    墙钟相关的数字只放在 "timing" 子对象里：续跑与不中断的运行除 timing 之外完全相同（测试就是这样比较的）。
    """
    n = len(records)
    correct = sum(r["correct"] for r in records)
    out: dict[str, Any] = {
        "n": n, "correct": correct, "accuracy": correct / n if n else None, "ci95": wilson_ci95(correct, n),
        "unparsed": sum(r["pred"] is None for r in records),
        "generated_tokens": sum(r["num_tokens"] for r in records),
        "oom_backoffs": oom_backoffs,
    }
    if records and all("pred_text" in r for r in records):  # CoT：两阶段答案抽取
        correct_text = sum(r["pred_text"] is not None and r["pred_text"] == r["gold"] for r in records)
        out.update(from_text=sum(r["pred_text"] is not None for r in records),
                   from_forced=sum(r["pred_text"] is None and r.get("pred_forced") is not None for r in records),
                   none=out["unparsed"], correct_text=correct_text, accuracy_text=correct_text / n)
    if any("alpha_mean" in r for r in records):  # 融合臂（steered 与扫参的每个设置）
        alpha = [r["alpha_mean"] for r in records if r.get("alpha_mean") is not None]
        out["alpha_mean"] = sum(alpha) / len(alpha) if alpha else None
        out["nonfinite_steps"] = sum(r.get("nonfinite_steps", 0) for r in records)
    if any("nonfinite_target_stops" in r for r in records):
        out["nonfinite_target_stops"] = sum(r.get("nonfinite_target_stops", 0) for r in records)
    if any("drafted" in r for r in records):
        out["speculation"] = {**(speculation or {}), **speculation_summary(records)}
    out["timing"] = timing or {}
    return out


def speculation_summary(records: Sequence[Record]) -> dict[str, Any]:
    """一个投机解码臂的接受统计（从逐题记录算，续跑与不中断的运行相同）：drafted、accepted、verify_steps 之和，
    acceptance = accepted / drafted，tokens_per_verify = 生成 token 总数 / verify_steps 总数——
    与 speculative.acceptance_summary 对同一批 SpecResult 的定义相同（测试核对）。"""
    drafted = sum(r.get("drafted", 0) for r in records)
    accepted = sum(r.get("accepted", 0) for r in records)
    steps = sum(r.get("verify_steps", 0) for r in records)
    tokens = sum(r["num_tokens"] for r in records if "verify_steps" in r)
    return {"drafted": drafted, "accepted": accepted, "verify_steps": steps,
            "acceptance": accepted / drafted if drafted else None,
            "tokens_per_verify": tokens / steps if steps else None}


def compare_arms(baseline: Sequence[Record], steered: Sequence[Record]) -> dict[str, Any]:
    """同一批题上的配对比较（参数为两个模式的逐题记录）：Δ 准确率、被引导“修好”/“弄坏”的题目 index、
    精确 McNemar 双侧 p 值（mcnemar_exact_p）。全部按最终的 pred（correct 字段）算；CoT 记录另给 delta_text，
    即只用第一阶段（pred_text）时的 Δ，便于看第二阶段是否改变了比较。
    """
    base = {r["index"]: r["correct"] for r in baseline}
    steer = {r["index"]: r["correct"] for r in steered}
    if base.keys() != steer.keys():
        raise ValueError("the two arms cover different questions, so they cannot be compared pairwise")
    fixed = sorted(i for i in base if steer[i] and not base[i])
    broken = sorted(i for i in base if base[i] and not steer[i])
    p = mcnemar_exact_p(len(fixed), len(broken))
    n = len(base)
    out = {"n": n, "delta": (sum(steer.values()) - sum(base.values())) / n if n else None,
           "fixed": fixed, "broken": broken, "both_correct": sum(base[i] and steer[i] for i in base),
           "both_wrong": sum(not base[i] and not steer[i] for i in base), "mcnemar_exact_p": p}
    both = list(baseline) + list(steered)
    if n and all("pred_text" in r for r in both):
        def text_correct(rs: Sequence[Record]) -> int:
            return sum(r["pred_text"] is not None and r["pred_text"] == r["gold"] for r in rs)

        out["delta_text"] = (text_correct(steered) - text_correct(baseline)) / n
    return out
