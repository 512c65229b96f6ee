"""字母打分（scoring、evaluator.score_letters）、一次前向上的扫参、配对统计（stats）、CSV/JSON/PNG 输出（reporting）。
CPU、小随机 Llama 与真实 SmolLM2 分词器。"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from test_evaluator import PROMPTS, VOCAB, tiny_llama

import main
import steering_utils
from config import LETTERS, ConfigError, parse_config
from data_loader import Question
from evaluator import score_letters
from reporting import arm_tables, plot_alpha_histogram, plot_alpha_trace, plot_sweep, write_sweep
from scoring import letter_predictions, letter_prompt, letter_records, letter_token_ids
from stats import CHANCE, arm_metrics, paired_stats
from steering_utils import SCHEDULES, SteeringParams, compute_steered_logits, distance, plausibility_mask, schedule_alpha

LETTER_IDS = [40, 41, 42, 43]


@pytest.fixture(scope="module")
def trio_models():
    return {"target": tiny_llama(0), "expert": tiny_llama(1), "base": tiny_llama(2)}


@pytest.fixture(scope="module")
def scores(trio_models):
    prompts = [p * 2 for p in PROMPTS] + PROMPTS + [[9, 8, 7, 6]]
    return prompts, score_letters(trio_models, prompts, LETTER_IDS, vocab_size=VOCAB, batch_size=3)


def test_letter_prompt_matches_lm_eval_style():
    q = Question(index=0, question=" A 30-year-old man has a cough. ", answer_idx="C", answer="Asthma",
                 options={"A": "Flu", "B": "Cold", "C": "Asthma", "D": "TB"})
    # 题干原样保留首尾空白：lm-eval 的 medqa_4options 也不去（全部测试题上的逐字核对见 tests/test_lm_eval.py）
    assert letter_prompt(q) == "Question:  A 30-year-old man has a cough. \nA. Flu\nB. Cold\nC. Asthma\nD. TB\nAnswer:"


def test_letter_token_ids_single_tokens(smol_tokenizer):
    ids = letter_token_ids({"target": smol_tokenizer, "expert": smol_tokenizer})
    assert len(set(ids)) == 4
    assert [smol_tokenizer.decode([i]) for i in ids] == [" " + x for x in LETTERS]


def test_letter_token_ids_refuse_mismatch(smol_tokenizer):
    class Shifted:
        def encode(self, text, add_special_tokens=False):
            return [smol_tokenizer.encode(text, add_special_tokens=False)[0] + 1]

    with pytest.raises(ValueError, match="differ between roles"):
        letter_token_ids({"target": smol_tokenizer, "expert": Shifted()})

    class Split:
        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    with pytest.raises(ValueError, match="single token"):
        letter_token_ids({"target": Split()})


def test_score_letters_equals_unbatched_forward(trio_models, scores):
    """批量左填充的打分 == 每题单独前向的最后位置 logits（字母列）与距离。"""
    prompts, got = scores
    with torch.no_grad():
        for i, p in enumerate(prompts):
            z = {r: m(torch.tensor([p])).logits[:, -1].float() for r, m in trio_models.items()}
            for role in trio_models:
                assert torch.allclose(got.letters[role][i], z[role][0, LETTER_IDS], atol=1e-4)
            assert got.distance[i] == pytest.approx(float(distance(z["target"], z["expert"])[0]), abs=1e-5)
    assert got.letters["target"].shape == (len(prompts), 4)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("base_alpha,beta", [(0.0, 0.0), (1.5, 0.0), (-0.7, 0.0), (4.0, 0.5), (1.0, 0.2)])
def test_letter_predictions_are_argmax_of_steering_utils_fusion(trio_models, scores, schedule, base_alpha, beta):
    """性质：字母预测 == 在同一批前向上独立用 steering_utils 算出的整词表 α、融合与可信度掩码，
    再限制到四个字母 id 上取 argmax（β 的掩码在四个字母之内算）。α = 0 的常数调度退化为目标单独。"""
    prompts, s = scores
    params = SteeringParams(base_alpha=base_alpha, adaptive_scale=10.0, max_boost=1.0, schedule=schedule,
                            plausibility_beta=beta)
    pred, alpha, fused = letter_predictions(s, params)
    ids = torch.tensor(LETTER_IDS)
    with torch.no_grad():
        for k, p in enumerate(prompts):
            z = [trio_models[r](torch.tensor([p])).logits[:, -1, :VOCAB].float() for r in ("target", "expert", "base")]
            a = schedule_alpha(z[0], z[1], params)
            assert float(alpha[k]) == pytest.approx(float(a[0]), abs=1e-5)
            want = compute_steered_logits(z[0][:, ids], z[1][:, ids], z[2][:, ids], a)
            if beta > 0:
                want = want.masked_fill(~plausibility_mask(z[0][:, ids], beta), float("-inf"))
            assert int(pred[k]) == int(want.argmax(-1))
            assert torch.equal(torch.isfinite(fused[k]), torch.isfinite(want[0]))
    assert np.array_equal(pred, fused.argmax(-1).numpy())  # 返回的融合 logits 就是预测所依据的那一份
    if schedule == "constant" and base_alpha == 0.0:
        assert np.array_equal(pred, s.letters["target"].argmax(-1).numpy())


def _letter_rows(s, gold: np.ndarray, argv: list[str]) -> list[dict]:
    """字母打分路径（main.plan_arms → scoring.letter_records → stats.arm_metrics → reporting.arm_tables）在缓存的打分上产出扫参表。"""
    cfg = parse_config(["--sweep", *argv])
    arms = main.plan_arms(cfg)
    questions = [Question(index=i, question="q", options={k: k for k in LETTERS}, answer_idx=LETTERS[g],
                          answer=LETTERS[g]) for i, g in enumerate(gold)]
    records = letter_records(arms, s, questions)
    by_arm = {a.name: [r for r in records if r["mode"] == a.name] for a in arms}
    metrics = {a.name: arm_metrics(a.name, by_arm[a.name]) for a in arms}
    return arm_tables(arms, by_arm, questions, cfg, metrics)[1]


def test_sweep_rows_and_zero_alpha_equals_baseline(scores):
    _, s = scores
    gold = np.array([0, 1, 2, 3, 0, 1, 2])
    rows = _letter_rows(s, gold, ["--sweep-alphas", "0,1,4", "--sweep-schedules", "constant,adaptive_inverse",
                                  "--adaptive-scale", "10", "--max-boost", "0"])
    assert len(rows) == 3 + 2 * 3
    base = rows[0]
    assert base["accuracy"] == np.mean(s.letters["target"].argmax(-1).numpy() == gold) and base["delta"] == 0
    expert = rows[1]
    assert expert["accuracy"] == np.mean(s.letters["expert"].argmax(-1).numpy() == gold)
    zero = next(r for r in rows if r["schedule"] == "constant" and r["base_alpha"] == 0.0)
    assert zero["delta"] == 0 and zero["fixed"] == [] and zero["broken"] == [] and zero["mcnemar_exact_p"] == 1.0
    for r in rows:
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert r["delta_ci95_bootstrap"][0] <= r["delta"] + 1e-9 <= r["delta_ci95_bootstrap"][1] + 2e-9
    with pytest.raises(ConfigError, match="--sweep-schedules"):
        parse_config(["--sweep", "--sweep-schedules", "cosine"])


def test_paired_stats_known_values():
    """b = 8 题被修好、c = 2 题被弄坏：精确 McNemar p = 2·P(X ≤ 2 | n = 10, 1/2) = 2·56/1024。"""
    base = np.array([False] * 8 + [True] * 2 + [True] * 5 + [False] * 5)
    other = np.array([True] * 8 + [False] * 2 + [True] * 5 + [False] * 5)
    st = paired_stats(base, other, n_boot=2000, seed=1)
    assert st["mcnemar_exact_p"] == pytest.approx(2 * 56 / 1024)
    assert st["delta"] == pytest.approx(0.3) and st["fixed"] == list(range(8)) and st["broken"] == [8, 9]
    lo, hi = st["delta_ci95_bootstrap"]
    assert lo < 0.3 < hi and lo > -0.2
    same = paired_stats(base, base, n_boot=500)
    assert same["delta_ci95_bootstrap"] == [0.0, 0.0] and same["mcnemar_exact_p"] == 1.0


def test_write_and_plot(scores, tmp_path):
    _, s = scores
    gold = np.array([0, 1, 2, 3, 0, 1, 2])
    rows = _letter_rows(s, gold, ["--sweep-alphas", "0,0.5,1,2", "--sweep-schedules", "constant,adaptive",
                                  "--adaptive-scale", "10", "--max-boost", "1"])
    write_sweep(rows, str(tmp_path))
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["chance"] == CHANCE and len(data["rows"]) == len(rows)
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and float(table[0]["accuracy"]) == rows[0]["accuracy"]
    png = tmp_path / "sweep.png"
    fig = plot_sweep(rows, str(png), "letter")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
    # 标题与图例说明跑了什么：打分方式、哪些调度，基线的 CI 带有图例项
    ax = fig.axes[0]
    assert "letter scoring" in ax.get_title() and "constant" in ax.get_title() and "adaptive" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "baseline 95% Wilson CI" in legend and any(t.startswith("baseline: target alone") for t in legend)
    assert any("steered, constant" in t for t in legend) and "chance (0.25)" in legend
    cot = plot_sweep(rows, str(tmp_path / "cot.png"), "cot").axes[0].get_title()
    assert "chain of thought" in cot and "letter" not in cot


def test_alpha_plots_say_what_was_run(tmp_path):
    """α 轨迹：每个融合臂一条线，包括采样链（虚线、图例标明 sampled）；直方图的总标题写明打分方式。"""
    traces = {"steered": [1.0, 1.5, 1.2], "steered/sample0": [1.1, 1.4], "steered/sample1": [1.3]}
    fig = plot_alpha_trace(traces, str(tmp_path / "trace.png"), 7)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["steered", "steered/sample0 (sampled)", "steered/sample1 (sampled)"]
    assert [line.get_linestyle() for line in ax.get_lines()] == ["-", "--", "--"]
    assert "question index 7" in ax.get_title() and "sampled" in ax.get_title()
    greedy = plot_alpha_trace({"steered": [1.0, 1.5]}, str(tmp_path / "t2.png"), 3).axes[0].get_title()
    assert "greedy chain of thought" in greedy
    hist = plot_alpha_histogram({"adaptive": {"steered": np.array([1.0, 1.2, 1.9])}}, str(tmp_path / "h.png"),
                                "per question (answer position)", "letter")
    assert "letter scoring" in hist.get_suptitle() and "per question" in hist.get_suptitle()


def test_letter_records_store_the_logits_the_prediction_used(scores):
    """记录里的 letter_logits 就是预测所依据的融合 logits：被可信度约束排除的字母为 null，pred 是其余字母的 argmax。"""
    _, s = scores
    cfg = parse_config(["--base-alpha", "4", "--schedule", "constant", "--plausibility-beta", "0.5"])
    arms = main.plan_arms(cfg)
    questions = [Question(index=i, question="q", options={k: k for k in LETTERS}, answer_idx="A", answer="A")
                 for i in range(len(s.distance))]
    steered = [r for r in letter_records(arms, s, questions) if r["mode"] == "steered"]
    _, _, fused = letter_predictions(s, steering_utils.steering_params(cfg))
    assert any(None in r["letter_logits"] for r in steered)  # 这组打分里确实有被排除的字母
    for r, row in zip(steered, fused):
        assert [v is None for v in r["letter_logits"]] == (~torch.isfinite(row)).tolist()
        finite = {k: v for k, v in enumerate(r["letter_logits"]) if v is not None}
        assert r["pred"] == LETTERS[max(finite, key=finite.get)]
    json.dumps(steered, allow_nan=False)  # 合法 JSON：没有 -Infinity
