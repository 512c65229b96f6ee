"""issue #5 的研究用评测：臂的规划、采样链（可复现、与批的组成无关、快慢路径一致）、多数投票、
字母打分与 CoT 扫参的端到端运行目录（统计与逐题记录一致、α = 0 等于基线、图是真实的 PNG），
以及 `accelerate launch` 两进程与单进程写出同一个运行目录。

解码路径的测试用 LlamaConfig 构造的小随机模型（fp32、CPU）。端到端测试在进程内调用 main.main，题量与 token 数
压到最小：字母打分扫参用 --demo 的 SmolLM2-135M（三个角色同一模型、专家/基座各有系统提示）；CoT 扫参、两进程运行
与分片合并的续跑用词表与 SmolLM2 分词器相同的微型随机 Llama（检查的是运行目录、分片与随机数，与模型无关）。
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import config
import main
import stats
from config import ConfigError, parse_config
from evaluator import generate_batch
from fast.decoder import FastDecoder
from sampling import Sampling
from steering_utils import SteeringParams
from shared_runs import runs_command, save_tiny_trio, tiny_llama as tiny_llama_for
from test_evaluator import PAD, PROMPTS, VOCAB, tiny_llama

REPO = Path(__file__).resolve().parent.parent
STEER = SteeringParams(base_alpha=1.0, adaptive_scale=10.0, max_boost=1.0, metric="js")
SAMPLE = Sampling(temperature=1.5, top_p=0.9, seed=7, chain=0)


@pytest.fixture(scope="module")
def trio() -> list[Any]:
    # lm_head ×40 让贪心没有近似平局；采样用温度 1.5 × 40 倍的 logits 仍然非常尖——所以这里把头缩回来，
    # 让采样真正有随机性（否则“不同链给出不同输出”无从检验）。
    models = [tiny_llama(s) for s in (0, 1, 2)]
    with torch.no_grad():
        for m in models:
            m.lm_head.weight.mul_(1 / 40 * 3)
    return models


# ---------------------------------------------------------------------------
# 臂的规划与多数投票
# ---------------------------------------------------------------------------

def test_plan_default_is_baseline_and_steered() -> None:
    arms = main.plan_arms(parse_config([]))
    assert [a.name for a in arms] == ["baseline", "steered"]
    assert arms[0].roles == ("target",) and arms[0].steering is None and arms[0].sampling is None
    s = arms[1].steering
    assert arms[1].roles == config.ROLES and s is not None
    assert (s.base_alpha, s.schedule, s.metric) == (config.BASE_ALPHA, config.SCHEDULE, config.DISTANCE_METRIC)


def test_plan_sweep_has_references_and_grid() -> None:
    cfg = parse_config(["--sweep", "--sweep-alphas", "0,2", "--sweep-schedules", "constant,adaptive_inverse",
                        "--plausibility-beta", "0.1", "--max-boost", "0.5"])
    arms = main.plan_arms(cfg)
    assert [a.name for a in arms] == ["baseline", "expert_alone", "base_alone", "constant@0", "constant@2",
                                      "adaptive_inverse@0", "adaptive_inverse@2"]
    assert [a.roles for a in arms[:3]] == [("target",), ("expert",), ("base",)]
    grid = arms[3:]
    assert [(a.schedule, a.base_alpha) for a in grid] == [("constant", 0.0), ("constant", 2.0),
                                                          ("adaptive_inverse", 0.0), ("adaptive_inverse", 2.0)]
    for a in grid:  # 其余融合参数沿用配置
        assert a.steering is not None and a.steering.schedule == a.schedule
        assert a.steering.base_alpha == a.base_alpha and a.steering.plausibility_beta == 0.1
        assert a.steering.max_boost == 0.5


def test_plan_sampling_adds_chains_after_greedy() -> None:
    arms = main.plan_arms(parse_config(["--temperature", "0.7", "--top-p", "0.9", "--votes", "3"]))
    assert [a.name for a in arms] == ["baseline", "steered", "baseline/sample0", "baseline/sample1",
                                      "baseline/sample2", "steered/sample0", "steered/sample1", "steered/sample2"]
    chains = arms[2:]
    assert all(a.sampling == Sampling(0.7, 0.9, config.SEED, int(a.name[-1])) for a in chains)
    assert [a.group for a in chains] == ["baseline"] * 3 + ["steered"] * 3
    assert chains[3].steering == arms[1].steering


@pytest.mark.parametrize("preds, want", [
    (["A", "B", "B"], "B"),
    (["A", "B", "C"], "A"),            # 三方平局：第一条链
    (["C", "A", "A", "C"], "C"),       # 二对二平局：第一条链的字母
    ([None, "D", None], "D"),          # 抽不出答案的链不投票
    ([None, None], None),
    (["B", None, "A", "A"], "A"),
])
def test_majority_vote(preds: list[str | None], want: str | None) -> None:
    assert stats.majority_vote(preds) == want


@pytest.mark.parametrize("argv, needle", [
    (["--votes", "3"], "--temperature"),
    (["--top-p", "0.9"], "--temperature"),
    (["--scoring", "letter", "--temperature", "0.5"], "letter"),
    (["--sweep", "--modes", "steered"], "--sweep"),
    (["--sweep-schedules", "adaptive,linear"], "--sweep-schedules"),
    (["--sweep-alphas", "1,1"], "repeated"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "1.5", "--temperature", "1"], "--top-p"),
    (["--votes", "0", "--temperature", "1"], "--votes"),
    (["--trace-index", "-2"], "--trace-index"),
])
def test_contradictory_research_options_fail_early(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-")):
        parse_config(argv)


def test_sweep_alphas_rejects_non_numbers() -> None:
    with pytest.raises(SystemExit):
        parse_config(["--sweep-alphas", "0,abc"])


# ---------------------------------------------------------------------------
# 采样：快慢路径一致、与批的组成无关、可复现
# ---------------------------------------------------------------------------

def _sample(models: list[Any], prompts: list[list[int]], qids: list[int], sampling: Sampling | None,
            steering: SteeringParams | None = STEER, fast: bool = False, steps: int = 10) -> list[list[int]]:
    role_prompts = [prompts] * len(models)
    if fast:
        dec = FastDecoder(models, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=steering,
                          compile=False, sampling=sampling)
        return dec.generate(role_prompts, steps, question_ids=qids).tokens
    return generate_batch(models, role_prompts, vocab_size=VOCAB, max_new_tokens=steps, end_ids=[], pad_id=PAD,
                          steering=steering, sampling=sampling, question_ids=qids).tokens


@pytest.mark.parametrize("steered", [False, True])
def test_sampling_fast_path_equals_reference_loop(trio: list[Any], steered: bool) -> None:
    models = trio if steered else trio[:1]
    steering = STEER if steered else None
    slow = _sample(models, PROMPTS, [10, 11, 12], SAMPLE, steering)
    fast = _sample(models, PROMPTS, [10, 11, 12], SAMPLE, steering, fast=True)
    assert slow == fast
    greedy = _sample(models, PROMPTS, [10, 11, 12], None, steering)
    assert slow != greedy  # 采样真的改变了输出（否则上面的相等检验不了什么）


@pytest.mark.parametrize("overlap", ["graph", "streams"])
def test_sampling_through_graphed_step_equals_reference_loop(trio: list[Any], overlap: str) -> None:
    """手动录图的解码步（overlap 模式；CPU 上走同一套静态缓冲搬运）也把题目 index 与设备上的步数正确地带进选词。"""
    dec = FastDecoder(trio, vocab_size=VOCAB, end_ids=[], pad_id=PAD, batch_size=4, steering=STEER, compile=False,
                      sampling=SAMPLE, overlap=overlap)
    fast = dec.generate([PROMPTS] * 3, 10, question_ids=[10, 11, 12]).tokens
    assert fast == _sample(trio, PROMPTS, [10, 11, 12], SAMPLE)


def test_sample_depends_on_question_not_on_batch(trio: list[Any]) -> None:
    together = _sample(trio, PROMPTS, [10, 11, 12], SAMPLE)
    alone = [_sample(trio, [p], [q], SAMPLE)[0] for p, q in zip(PROMPTS, [10, 11, 12])]
    reordered = _sample(trio, PROMPTS[::-1], [12, 11, 10], SAMPLE)[::-1]
    assert together == alone == reordered
    # 同一提示、不同的题目 index → 不同的随机数流；同一题的不同链也不同。
    other_q = _sample(trio, PROMPTS, [20, 21, 22], SAMPLE)
    other_chain = _sample(trio, PROMPTS, [10, 11, 12], Sampling(1.5, 0.9, 7, chain=1))
    assert other_q != together and other_chain != together
    assert _sample(trio, PROMPTS, [10, 11, 12], SAMPLE) == together  # 重复运行：逐 token 相同


def test_sampling_requires_question_ids(trio: list[Any]) -> None:
    with pytest.raises(ValueError, match="question_ids"):
        generate_batch(trio, [PROMPTS] * 3, vocab_size=VOCAB, max_new_tokens=2, end_ids=[], pad_id=PAD,
                       steering=STEER, sampling=SAMPLE)


# ---------------------------------------------------------------------------
# 端到端：字母打分扫参、CoT 扫参、两进程
# ---------------------------------------------------------------------------

def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _check_png(path: Path) -> None:
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert float(np.std(img[..., :3])) > 0.01  # 不是一张空白图


def _check_rows_against_records(run_dir: Path, arms: list[str]) -> dict[str, Any]:
    """sweep.json / sweep.csv / metrics.json 与 predictions.jsonl 独立重算的一致性。"""
    recs = _jsonl(run_dir / "predictions.jsonl")
    by = {a: {r["index"]: r for r in recs if r["mode"] == a} for a in arms}
    assert [r["mode"] for r in recs] == [a for a in arms for _ in by[a]]  # 按臂、按 index 排好序
    metrics = json.loads((run_dir / "metrics.json").read_text())
    table = json.loads((run_dir / "sweep.json").read_text())
    assert table["chance"] == 0.25
    rows = {r["setting"]: r for r in table["rows"]}
    assert set(arms) <= set(rows)
    base = by["baseline"]
    for a in arms:
        ok = {i: r["correct"] for i, r in by[a].items()}
        n = len(ok)
        assert rows[a]["n"] == n and metrics[a]["n"] == n
        assert math.isclose(rows[a]["accuracy"], sum(ok.values()) / n)
        assert math.isclose(rows[a]["delta"], (sum(ok.values()) - sum(r["correct"] for r in base.values())) / n)
        assert rows[a]["fixed"] == sorted(i for i in ok if ok[i] and not base[i]["correct"])
        assert rows[a]["broken"] == sorted(i for i in ok if base[i]["correct"] and not ok[i])
        lo, hi = rows[a]["delta_ci95_bootstrap"]
        assert lo <= rows[a]["delta"] + 1e-12 and rows[a]["delta"] <= hi + 1e-12
        assert 0 <= rows[a]["mcnemar_exact_p"] <= 1
    with open(run_dir / "sweep.csv", newline="", encoding="utf-8") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["setting"] for r in csv_rows] == [r["setting"] for r in table["rows"]]
    return metrics


def test_letter_sweep_run_folder(tmp_path: Path, smol_path: str) -> None:
    out = tmp_path / "letter"
    data = _short_data(tmp_path / "short.jsonl", 5)  # 短题：2 核 CPU 上 MedQA 长题的三模型前向太慢，检查的性质与题目内容无关
    argv = ["--demo", "--data-file", str(data), "--limit", "5", "--scoring", "letter", "--sweep", "--sweep-alphas", "0,1,3",
            "--sweep-schedules", "constant,adaptive", "--output-dir", str(out)]
    assert main.main(argv) == 0
    arms = ["baseline", "expert_alone", "base_alone", "constant@0", "constant@1", "constant@3", "adaptive@0",
            "adaptive@1", "adaptive@3"]
    metrics = _check_rows_against_records(out, arms)
    assert metrics["scoring"] == "letter" and metrics["arm_order"] == arms
    recs = _jsonl(out / "predictions.jsonl")
    by = {a: [r for r in recs if r["mode"] == a] for a in arms}
    for a in arms:
        for r in by[a]:
            # 预测就是（融合后）四个字母 logits 的 argmax，记录里存着这四个数
            assert r["pred"] == "ABCD"[int(np.argmax(r["letter_logits"]))] and r["num_tokens"] == 0
    # constant α = 0：融合项为 0，逐题与基线相同；α 就是 BASE_ALPHA
    assert [r["pred"] for r in by["constant@0"]] == [r["pred"] for r in by["baseline"]]
    assert all(r["alpha"] == [1.0] for r in by["constant@1"])
    # adaptive：α = BASE_ALPHA + tanh(d·scale)·boost ∈ [BASE_ALPHA, BASE_ALPHA + boost]
    assert all(1.0 <= r["alpha"][0] <= 2.0 for r in by["adaptive@1"])
    cfg = json.loads((out / "config.json").read_text())
    assert len(cfg["letter_token_ids"]) == 4 and cfg["arms"] == arms
    assert metrics["plots"] == ["sweep_accuracy.png", "alpha_hist.png"]  # 字母打分没有逐 token 的 α 轨迹
    for name in metrics["plots"]:
        _check_png(out / name)




def test_cot_sweep_with_votes_run_folder(tmp_path: Path, smol_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """CoT 扫参 + 采样链 + 多数投票的运行目录。三个角色是微型随机 Llama（SmolLM2 分词器，lm_head 不放大：采样真的随机；
    monkeypatch main.load_models）：检查的性质（α = 0 与基线逐 token 相同、α 轨迹、多数投票按链重算、扫参表与图）
    与模型无关，15 个臂在 SmolLM2 上要十几秒。"""
    trio = {role: tiny_llama_for(len(smol_tokenizer), seed, head_scale=1.0)
            for seed, role in enumerate(("target", "expert", "base"))}
    monkeypatch.setattr(main, "load_models", lambda cfg, tok, device: ({r: trio[r] for r in cfg.model_roles}, len(tok)))
    out = tmp_path / "cot"
    # 一道短题、4 个新 token：15 个臂各 prefill 一次，检查的性质与题目数量和内容无关
    data = _short_data(tmp_path / "short.jsonl", 1)
    argv = ["--demo", "--data-file", str(data), "--limit", "1", "--max-new-tokens", "4", "--batch-size", "1", "--sweep", "--sweep-alphas",
            "0,2", "--sweep-schedules", "constant", "--temperature", "0.8", "--votes", "2", "--trace-index", "0",
            "--output-dir", str(out)]
    assert main.main(argv) == 0
    greedy = ["baseline", "expert_alone", "base_alone", "constant@0", "constant@2"]
    chains = [f"{g}/sample{v}" for g in greedy for v in range(2)]
    metrics = _check_rows_against_records(out, greedy + chains)
    recs = _jsonl(out / "predictions.jsonl")
    by = {a: {r["index"]: r for r in recs if r["mode"] == a} for a in greedy + chains}
    # α = 0 的常数调度：与基线逐 token 相同
    assert [r["output"] for r in by["constant@0"].values()] == [r["output"] for r in by["baseline"].values()]
    # 逐 token 的 α 记录：常数调度下每一步都是 BASE_ALPHA，步数等于生成的 token 数
    for r in by["constant@2"].values():
        assert r["alpha"] == [2.0] * r["num_tokens"]
    # 多数投票：按两条链重算（两条链确实不同：否则“按链重算”检验不了取哪条链）
    assert any(by[f"{g}/sample0"][0]["output"] != by[f"{g}/sample1"][0]["output"] for g in greedy)
    for g in greedy:
        maj = metrics["majority"][f"{g}/maj@2"]
        for i, pred in maj["predictions"].items():
            assert pred == stats.majority_vote([by[f"{g}/sample{v}"][int(i)]["pred"] for v in range(2)])
        assert f"{g}/maj@2" in {r["setting"] for r in metrics["sweep"]}
    assert metrics["plots"] == ["sweep_accuracy.png", "alpha_hist.png", "alpha_trace.png"]
    for name in metrics["plots"]:
        _check_png(out / name)


def test_trace_index_must_be_in_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--demo", "--limit", "2", "--trace-index", "999", "--output-dir", str(tmp_path / "x")]
    assert main.main(argv) == main.EXIT_ERROR
    assert "--trace-index=999" in capsys.readouterr().err


def test_two_processes_write_the_same_run_folder(tmp_path: Path, smol_tokenizer: Any) -> None:
    """`accelerate launch --multi_gpu --num_processes 2`（CPU 上它用 torchrun 起两个进程，main.py 用 gloo）
    与单进程：predictions.jsonl 逐字节相同，metrics.json 除 timing 外相同，分片文件已合并删除。两种打分各一次：
    cot（贪心与一条采样链：采样的随机数与进程、批无关）与 letter（字母打分的扫参：分片的打分结果汇总到 rank 0）。
    一次 launch 里每个进程先后以 __main__ 运行 main.py 两次（tests/shared_runs.py 的 runs）：进程启动与 import
    只付一次。三个角色是存成本地目录的微型随机 Llama（SmolLM2 分词器；lm_head 不放大，采样真的随机）：
    检查的是分片、汇总与随机数，不是模型。"""
    # 两道短题、批 1：两个批，rank 0 做第 0 批，rank 1 做第 1 批。
    data = _short_data(tmp_path / "short.jsonl", 2)
    common = [*save_tiny_trio(tmp_path / "models", smol_tokenizer, head_scale=1.0), "--data-file", str(data),
              "--limit", "2", "--max-new-tokens", "4", "--batch-size", "1"]
    variants = {"cot": [*common, "--temperature", "0.7"],
                "letter": [*common, "--scoring", "letter", "--sweep", "--sweep-alphas", "0,2"]}
    two = {name: tmp_path / f"{name}-two" for name in variants}
    one = {name: tmp_path / f"{name}-one" for name in variants}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # 与 `accelerate launch` 相同的入口，经当前解释器调用：不依赖 PATH 上有没有 accelerate 命令（缺了就失败，而不是跳过）。
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    runs = runs_command([[*args, "--output-dir", str(two[name])] for name, args in variants.items()])
    proc = subprocess.run(launch + runs, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # torchrun 给每个进程 OMP_NUM_THREADS=1；单进程也用 1 个线程，CPU 矩阵乘的归约顺序才相同（α 逐位相同）。
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, args in variants.items():
            assert main.main([*args, "--output-dir", str(one[name])]) == 0
    finally:
        torch.set_num_threads(threads)

    def strip(m: dict[str, Any]) -> dict[str, Any]:
        return {k: ({kk: vv for kk, vv in v.items() if kk != "timing"} if isinstance(v, dict) and "timing" in v
                    else v) for k, v in m.items()}

    for name in variants:
        assert (one[name] / "predictions.jsonl").read_bytes() == (two[name] / "predictions.jsonl").read_bytes(), name
        assert not list(two[name].glob("predictions.rank*"))
        m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one[name], two[name]))
        assert strip(m1) == strip(m2)
        assert m2["arm_order"] == m1["arm_order"] and len(m1["arm_order"]) == (4 if name == "cot" else 9)
        if name == "cot":
            assert m2["baseline"]["timing"]["processes"] == 2
            outputs = [r["output"] for r in _jsonl(one[name] / "predictions.jsonl") if r["mode"] == "baseline"]
            samples = [r["output"] for r in _jsonl(one[name] / "predictions.jsonl") if r["mode"] == "baseline/sample0"]
            assert outputs != samples  # 采样真的改变了输出（否则逐字节相同检验不了随机数流）
        assert json.loads((two[name] / "config.json").read_text())["processes"] == 2
        assert (one[name] / "sweep.csv").read_bytes() == (two[name] / "sweep.csv").read_bytes()
        assert proc.stdout.count(f"run folder: {two[name]}") == 1  # 只有 rank 0 打印报告
    assert proc.stdout.count("run folder:") == 2


def _free_port() -> int:
    """一个此刻空闲的本机端口（固定端口会与同一台机器上同时运行的另一份测试撞上）。"""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _short_data(path: Path, n: int) -> Path:
    """n 道很短的题（2 核 CPU 上的端到端测试：MedQA 长题的三模型 prefill 太慢）。"""
    path.write_text("".join(json.dumps({"question": f"Which option is number {i}?", "answer": "x",
                                        "answer_idx": "ABCD"[i % 4], "options": {k: f"option {k}" for k in "ABCD"}})
                            + "\n" for i in range(n)))
    return path


def test_resume_merges_shards_left_by_a_multiprocess_run(tmp_path: Path, smol_tokenizer: Any,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """多进程运行被杀后留下 predictions.rank*.jsonl：单进程 --resume 先把它们合并（末尾残行被截掉、该批重跑），
    补完缺的记录，结果与不中断的运行逐字节相同；两个分片里有同一条记录 → 拒绝并指出文件。
    三个角色是微型随机 Llama（SmolLM2 分词器，monkeypatch main.load_models）：合并与续跑与模型无关
    （SmolLM2 上整批重跑的续跑见 test_reliability 的 test_torn_last_line_is_dropped_and_redone）。"""
    trio = {role: tiny_llama_for(len(smol_tokenizer), seed) for seed, role in enumerate(("target", "expert", "base"))}
    monkeypatch.setattr(main, "load_models", lambda cfg, tok, device: ({r: trio[r] for r in cfg.model_roles}, len(tok)))
    data = _short_data(tmp_path / "short.jsonl", 4)
    args = ["--demo", "--data-file", str(data), "--limit", "4", "--max-new-tokens", "4", "--batch-size", "1"]
    full = tmp_path / "full"
    assert main.main([*args, "--output-dir", str(full)]) == 0
    records = (full / "predictions.jsonl").read_text().splitlines(keepends=True)  # 8 条：baseline ×4、steered ×4
    assert [json.loads(r)["mode"] for r in records] == ["baseline"] * 4 + ["steered"] * 4
    cut = tmp_path / "cut"
    cut.mkdir()
    stored = {name: (full / name).read_bytes() for name in ("config.json", "fingerprints.json")}
    for name, raw in stored.items():
        (cut / name).write_bytes(raw)
    # rank 0 写了 baseline 的两条和 steered 的一条加半行；rank 1 写了 baseline 的一条
    (cut / "predictions.rank0.jsonl").write_text(records[0] + records[2] + records[4] + records[6][:15])
    (cut / "predictions.rank1.jsonl").write_text(records[1])
    assert main.main(["--resume", str(cut)]) == 0
    assert (cut / "predictions.jsonl").read_bytes() == (full / "predictions.jsonl").read_bytes()
    assert not list(cut.glob("predictions.rank*"))

    dup = tmp_path / "dup"
    dup.mkdir()
    for name, raw in stored.items():
        (dup / name).write_bytes(raw)
    (dup / "predictions.rank0.jsonl").write_text(records[0])
    (dup / "predictions.rank1.jsonl").write_text(records[0])
    assert main.main(["--resume", str(dup)]) == main.EXIT_ERROR
    err = capsys.readouterr().err
    assert "predictions.rank1.jsonl" in err and "duplicates" in err
