"""main.py 的端到端测试：CPU、无网络。

演示命令 `python main.py --demo`（4 道短题、批 2、每题 4 个新 token，真实子进程）的运行目录是会话级的共享夹具
（conftest 的 `smol_run`，test_reliability 复制同一个目录再续跑、篡改），这里逐项检查它：
config.json（解析后的配置、数据来源、模型、环境、词表、结束记号）、predictions.jsonl（逐题记录的类型、
取值范围与相互一致性）、metrics.json（与逐题记录独立重算的准确率、Wilson 区间、配对比较与精确 McNemar p 值）
以及终端对比表。不给 --data-file 时 --demo 读随包的 MedQA 测试集：数据来源的字符串单独在进程内核对（长题的
三模型 prefill 在 2 核 CPU 上要数秒，运行目录的每一项检查都与题目内容无关）。

其余测试在进程内调用 main.main（快）：输出目录已存在且非空、坏数据文件（在加载任何模型之前、10 秒内、
退出码 2、消息含 文件:行号、无 traceback），以及只跑 baseline 时不写引导记录与对比块。
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import config
import main
from config import parse_config
from run_folder import Dist
from shared_runs import LIMIT, MAX_NEW

BUNDLED_TEST = Path(config.BUNDLED_DATA_DIR) / "test.jsonl"
LETTERS = ("A", "B", "C", "D")


def _demo_argv(output_dir: str) -> list[str]:
    """快速失败的测试用的演示命令行（不给 --data-file：随包的 MedQA 测试集）。"""
    return ["--demo", "--limit", "2", "--max-new-tokens", "8", "--output-dir", output_dir]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _rows(path: Path, n: int) -> list[dict[str, Any]]:
    """数据文件的前 n 行。"""
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson 区间（独立实现，用来核对 metrics.json）。"""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _mcnemar_exact(b: int, c: int) -> float:
    """双侧精确 McNemar：min(1, 2·P[X ≤ min(b, c)])，X ~ Binomial(b + c, 1/2)。"""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)


def _no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """让 main 里任何加载分词器/模型的调用直接让测试失败（证明错误在加载之前就被发现）。"""
    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("不应加载任何分词器或模型")

    monkeypatch.setattr(main, "load_tokenizer", must_not_load)
    monkeypatch.setattr(main, "load_models", must_not_load)


# ---------------------------------------------------------------------------
# 演示：真实子进程，整个会话一次（conftest 的 smol_run）
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(smol_run: SimpleNamespace) -> SimpleNamespace:
    """`python main.py --demo --data-file <4 道短题> --limit 4 --batch-size 2 --max-new-tokens 4 --output-dir <tmp>/run`
    的结果与产物（共享、只读）。"""
    return smol_run


def test_demo_reads_the_bundled_test_split_by_default() -> None:
    """--demo 不给 --data-file：题目来自随包的 MedQA 测试集，数据来源写明文件与 sha256（config.json 的 data_source
    就是这个字符串，见 test_demo_config_json）。"""
    data = main.load_data(parse_config(["--demo", "--limit", "2"]), Dist())
    sha = hashlib.sha256(BUNDLED_TEST.read_bytes()).hexdigest()
    assert data.source == f"file:{BUNDLED_TEST} sha256={sha}"
    assert [(q.index, q.answer_idx) for q in data.questions] == [(i, r["answer_idx"])
                                                                 for i, r in enumerate(_rows(BUNDLED_TEST, 2))]


def test_demo_exit_code_and_files(demo_run: SimpleNamespace) -> None:
    assert demo_run.proc.returncode == 0
    assert sorted(os.listdir(demo_run.run_dir)) == [".lock", "alpha_hist.png", "alpha_trace.png", "config.json",
                                                    "fingerprints.json",
                                                    "metrics.json", "predictions.jsonl", "sweep.csv", "sweep.json",
                                                    "timing.jsonl"]
    assert "Traceback" not in demo_run.proc.stderr
    # 演示的专家与基座是同一模型但系统提示不同：不应出现“z_e − z_b ≡ 0”的警告。
    assert "≡ 0" not in demo_run.proc.stderr


def test_demo_config_json(demo_run: SimpleNamespace, smol_path: str, smol_tokenizer: Any) -> None:
    import torch
    import transformers

    c = demo_run.config
    for key in ("config", "data_source", "models", "environment", "vocab_size", "end_token_ids"):
        assert key in c, key
    # 保存的是完整、已解析的配置：与同一命令行在进程内解析的结果逐键相同。
    expected = parse_config(demo_run.argv).to_dict()
    assert c["config"] == expected
    cfg = c["config"]
    assert cfg["target"] == cfg["expert"] == cfg["base"] == config.DEMO_MODEL
    assert (cfg["base_alpha"], cfg["adaptive_scale"], cfg["max_boost"], cfg["distance"]) == \
        (config.BASE_ALPHA, config.ADAPTIVE_SCALE, config.MAX_BOOST, config.DISTANCE_METRIC)
    assert cfg["limit"] == LIMIT and cfg["max_new_tokens"] == MAX_NEW and cfg["modes"] == ["baseline", "steered"]
    assert cfg["load_in_4bit"] is False and cfg["device"] == "cpu" and cfg["dtype"] == "float32"

    sha = hashlib.sha256(demo_run.data.read_bytes()).hexdigest()
    assert c["data_source"] == f"file:{demo_run.data} sha256={sha}" and cfg["data_file"] == str(demo_run.data)
    assert c["num_questions"] == LIMIT
    assert set(c["models"]) == {"target", "expert", "base"}
    for info in c["models"].values():
        assert info["spec"] == config.DEMO_MODEL and info["resolved"] == smol_path
        assert info["dtype"] == "torch.float32"
    assert c["device"] == "cpu"
    packages = c["environment"]["packages"]
    assert packages["torch"] == torch.__version__ and packages["transformers"] == transformers.__version__
    assert c["environment"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert c["vocab_size"] == len(smol_tokenizer)
    assert {0, 2} <= set(c["end_token_ids"])  # <|endoftext|> 与 <|im_end|>
    # 第二阶段的 cue 与 token id 写进 config.json（SmolLM2：cue 之后 "(" 后的字母各是一个 token）
    forced = c["forced_answer"]
    assert forced["cue"] == config.FORCED_ANSWER_CUE and cfg["forced_answer"] is True
    assert forced["cue_ids"] == smol_tokenizer.encode(config.FORCED_ANSWER_CUE, add_special_tokens=False)
    assert [smol_tokenizer.decode([i]) for i in forced["letter_ids"]] == list(LETTERS)
    assert c["role_system_prompts"] == {"target": config.SYSTEM_PROMPT, "expert": config.DEMO_EXPERT_SYSTEM_PROMPT,
                                        "base": config.DEMO_BASE_SYSTEM_PROMPT}


def test_demo_predictions(demo_run: SimpleNamespace) -> None:
    from scoring import extract_answer

    preds = demo_run.predictions
    cfg = demo_run.config["config"]
    lo, hi = cfg["base_alpha"], cfg["base_alpha"] + cfg["max_boost"]
    assert len(preds) == 2 * LIMIT
    data_rows = _rows(demo_run.data, LIMIT)
    gold = [r["answer_idx"] for r in data_rows]
    options = [r["options"] for r in data_rows]
    for mode in ("baseline", "steered"):
        rows = [r for r in preds if r["mode"] == mode]
        assert [r["index"] for r in rows] == list(range(LIMIT))
        assert [r["gold"] for r in rows] == gold
    assert [r["mode"] for r in preds] == ["baseline"] * LIMIT + ["steered"] * LIMIT
    for r in preds:
        assert {"mode", "index", "gold", "pred", "pred_text", "pred_forced", "correct", "output",
                "num_tokens"} <= set(r)
        assert r["pred"] is None or r["pred"] in LETTERS
        assert isinstance(r["correct"], bool) and r["correct"] == (r["pred"] == r["gold"])
        assert isinstance(r["output"], str)
        # 第一阶段由 output 与该题选项决定；第二阶段（默认开启）只在第一阶段读不出时给出字母，pred 取两者之一
        assert r["pred_text"] == extract_answer(r["output"], options[r["index"]])
        assert (r["pred_forced"] is None) == (r["pred_text"] is not None)
        assert r["pred_forced"] is None or r["pred_forced"] in LETTERS
        assert r["pred"] == (r["pred_text"] if r["pred_text"] is not None else r["pred_forced"])
        assert isinstance(r["num_tokens"], int) and 1 <= r["num_tokens"] <= MAX_NEW
        if r["mode"] == "steered":
            for key in ("alpha_mean", "alpha_min", "alpha_max"):
                assert lo - 1e-6 <= r[key] <= hi + 1e-6, (key, r[key])
            assert r["alpha_min"] - 1e-9 <= r["alpha_mean"] <= r["alpha_max"] + 1e-9
            # 逐 token 的 α：每个被引导的步一个值（本演示没有守卫触发，所以等于生成的 token 数），4 位小数
            assert len(r["alpha"]) == r["num_tokens"] - r["nonfinite_steps"]
            assert r["alpha_mean"] == pytest.approx(sum(r["alpha"]) / len(r["alpha"]), abs=1e-4)
        else:
            assert "alpha_mean" not in r


def test_demo_metrics_consistent_with_predictions(demo_run: SimpleNamespace) -> None:
    m, preds = demo_run.metrics, demo_run.predictions
    assert set(m) == {"baseline", "steered", "comparison", "skipped_invalid_rows", "scoring", "arm_order", "sweep",
                      "plots"}
    assert m["arm_order"] == ["baseline", "steered"] and m["scoring"] == "cot"
    assert m["plots"] == ["alpha_hist.png", "alpha_trace.png"]
    # 扫参表的 steered 行与 comparison 是同一个配对比较的两种写法
    row = m["sweep"][1]
    assert row["setting"] == "steered" and row["fixed"] == m["comparison"]["fixed"]
    assert row["broken"] == m["comparison"]["broken"]
    assert row["mcnemar_exact_p"] == pytest.approx(m["comparison"]["mcnemar_exact_p"])
    assert m["skipped_invalid_rows"] == 0
    correct: dict[str, dict[int, bool]] = {}
    for mode in ("baseline", "steered"):
        rows = [r for r in preds if r["mode"] == mode]
        correct[mode] = {r["index"]: r["correct"] for r in rows}
        k = sum(r["correct"] for r in rows)
        mm = m[mode]
        assert mm["n"] == LIMIT and mm["correct"] == k
        assert mm["accuracy"] == pytest.approx(k / LIMIT)
        assert mm["unparsed"] == sum(r["pred"] is None for r in rows)
        # 两阶段答案抽取的计数与第一阶段单独的准确率，从逐题记录独立重算
        from_text = sum(r["pred_text"] is not None for r in rows)
        from_forced = sum(r["pred_text"] is None and r["pred_forced"] is not None for r in rows)
        assert (mm["from_text"], mm["from_forced"], mm["none"]) == (from_text, from_forced,
                                                                    LIMIT - from_text - from_forced)
        k_text = sum(r["pred_text"] == r["gold"] for r in rows)
        assert mm["correct_text"] == k_text and mm["accuracy_text"] == pytest.approx(k_text / LIMIT)
        assert k == sum((r["pred_text"] or r["pred_forced"]) == r["gold"] for r in rows)
        assert len(mm["ci95"]) == 2
        assert mm["ci95"] == pytest.approx(list(_wilson(k, LIMIT)), abs=1e-9)
        assert 0 <= mm["ci95"][0] <= mm["accuracy"] <= mm["ci95"][1] <= 1
        assert mm["generated_tokens"] == sum(r["num_tokens"] for r in rows)
        assert mm["oom_backoffs"] == 0
        # 墙钟数字只在 timing 里（续跑与不中断的运行比较时除去它）；新运行本次解码的 token 即全部 token。
        assert set(mm["timing"]) == {"seconds", "decoded_tokens", "tokens_per_second", "decode_path", "sessions"}
        assert mm["timing"]["sessions"] == 1
        # 实际走的解码路径写明（CPU 上 auto 解析为不编译、不叠加、不用流）
        assert mm["timing"]["decode_path"] == {"fast": True, "compiled": False, "overlap": "off", "stack": "off",
                                               "attention": "sdpa"}
        assert mm["timing"]["decoded_tokens"] == mm["generated_tokens"] and mm["timing"]["seconds"] > 0
    assert m["steered"]["nonfinite_steps"] == sum(r["nonfinite_steps"] for r in preds if r["mode"] == "steered") == 0
    alphas = [r["alpha_mean"] for r in preds if r["mode"] == "steered"]
    assert m["steered"]["alpha_mean"] == pytest.approx(sum(alphas) / len(alphas))

    c = m["comparison"]
    assert c["n"] == LIMIT
    assert c["delta"] == pytest.approx(m["steered"]["accuracy"] - m["baseline"]["accuracy"])
    b, s = correct["baseline"], correct["steered"]
    assert c["fixed"] == sorted(i for i in b if s[i] and not b[i])
    assert c["broken"] == sorted(i for i in b if b[i] and not s[i])
    assert c["mcnemar_exact_p"] == pytest.approx(_mcnemar_exact(len(c["fixed"]), len(c["broken"])))
    assert 0 <= c["mcnemar_exact_p"] <= 1
    text_ok = {mode: sum(r["pred_text"] == r["gold"] for r in preds if r["mode"] == mode)
               for mode in ("baseline", "steered")}
    assert c["delta_text"] == pytest.approx((text_ok["steered"] - text_ok["baseline"]) / LIMIT)


def test_demo_prints_comparison_table(demo_run: SimpleNamespace) -> None:
    out = demo_run.proc.stdout
    m = demo_run.metrics
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["arm", "n"])
    assert "acc" in header and "95% CI" in header
    for mode in ("baseline", "steered"):
        row = next(line for line in lines if line.startswith(mode))
        fields = row.split()
        assert int(fields[1]) == m[mode]["n"] and float(fields[2]) == pytest.approx(m[mode]["accuracy"], abs=5e-4)
        # 95% CI 占两个字段，其后是第一阶段单独的准确率与第二阶段给出的答案数
        assert float(fields[5]) == pytest.approx(m[mode]["accuracy_text"], abs=5e-4)
        assert int(fields[6]) == m[mode]["from_forced"] and int(fields[7]) == m[mode]["unparsed"]
    c = m["comparison"]
    assert "Δ accuracy (steered − baseline)" in out and "McNemar" in out
    assert f"{c['delta']:+.3f}" in out and f"fixed {len(c['fixed'])}, broken {len(c['broken'])}" in out
    assert f"run folder: {demo_run.run_dir}" in out


# ---------------------------------------------------------------------------
# 进程内：快速失败的路径
# ---------------------------------------------------------------------------


def test_existing_non_empty_output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    previous = tmp_path / "old-run"
    previous.mkdir()
    (previous / "metrics.json").write_text("{}")
    code = main.main(_demo_argv(str(previous)))
    captured = capsys.readouterr()
    assert code == 2
    assert str(previous) in captured.err and "--output-dir" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert os.listdir(previous) == ["metrics.json"] and (previous / "metrics.json").read_text() == "{}"


def test_output_dir_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    path = tmp_path / "a-file"
    path.write_text("x")
    assert main.main(_demo_argv(str(path))) == 2
    captured = capsys.readouterr()
    assert str(path) in captured.err and "Traceback" not in captured.err


def _good_line(i: int) -> str:
    return json.dumps({"question": f"Question {i}?", "answer": "yes",
                       "options": {"A": "yes", "B": "no", "C": "maybe", "D": "never"},
                       "meta_info": "step1", "answer_idx": "A"})


@pytest.mark.parametrize("bad", [
    '{"question": "truncated',  # 坏 JSON
    json.dumps({"question": "q?", "answer": "a", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}}),  # 缺 answer_idx
    json.dumps({"question": "q?", "answer": "a", "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
                "answer_idx": "E"}),  # 非法字母
    "",  # 中间的空行
])
def test_malformed_data_fails_before_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str], bad: str) -> None:
    _no_model_loading(monkeypatch)
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([_good_line(0), _good_line(1), bad, _good_line(3)]) + "\n", encoding="utf-8")
    start = time.perf_counter()
    code = main.main(_demo_argv(str(tmp_path / "run")) + ["--data-file", str(data)])
    elapsed = time.perf_counter() - start
    captured = capsys.readouterr()
    assert code == 2
    assert elapsed < 10
    assert f"{data}:3" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_missing_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    missing = tmp_path / "nope.jsonl"
    assert main.main(_demo_argv(str(tmp_path / "run")) + ["--data-file", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_unknown_flag_through_main(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main.main(["--demo", "--limt", "3"])
    assert info.value.code == 2
    assert "--limt" in capsys.readouterr().err


def test_limit_larger_than_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    data = tmp_path / "one.jsonl"
    data.write_text(_good_line(0) + "\n", encoding="utf-8")
    assert main.main(_demo_argv(str(tmp_path / "run")) + ["--data-file", str(data)]) == 2  # --limit 2 > 1 题
    assert "Traceback" not in capsys.readouterr().err


def test_baseline_only_run(tmp_path: Path, smol_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--modes baseline：只有基线记录、没有对比块、只加载目标模型。

    用两道很短的题（进程内约 1 秒）：2 核 CPU 上一道 MedQA 长题的 prefill 就要数秒。
    """
    run_dir = tmp_path / "run"
    data = tmp_path / "short.jsonl"
    data.write_text(_good_line(0) + "\n" + _good_line(1) + "\n", encoding="utf-8")
    code = main.main(["--demo", "--modes", "baseline", "--limit", "2", "--max-new-tokens", "3",
                      "--data-file", str(data), "--output-dir", str(run_dir)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    preds = _read_jsonl(run_dir / "predictions.jsonl")
    assert [(r["mode"], r["index"]) for r in preds] == [("baseline", 0), ("baseline", 1)]
    assert all(1 <= r["num_tokens"] <= 3 for r in preds)
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics) == {"baseline", "skipped_invalid_rows", "scoring", "arm_order", "sweep", "plots"}
    assert metrics["baseline"]["n"] == 2 and metrics["plots"] == [] and len(metrics["sweep"]) == 1
    cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert set(cfg["models"]) == {"target"} and cfg["config"]["modes"] == ["baseline"]
    assert "Δ accuracy" not in captured.out and "McNemar" not in captured.out
    assert "baseline" in captured.out and "steered" not in captured.out.replace("steered − baseline", "")


@pytest.mark.parametrize("scoring_args", [(), ("--no-forced-answer",)])
def test_context_bound_is_refused_before_any_weights_load(monkeypatch: pytest.MonkeyPatch, smol_path: str,
                                                          tmp_path: Any, capsys: pytest.CaptureFixture[str],
                                                          scoring_args: tuple[str, ...]) -> None:
    """提示 + --max-new-tokens 超过模型配置的上下文（SmolLM2：8192）：在加载任何权重之前以退出码 2 拒绝，
    消息写明题号、角色、长度与可用的 --max-new-tokens 上限；10 亿这类值也在这里被挡住，不会去分配缓存。"""
    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights must not load when the context bound is exceeded")

    monkeypatch.setattr(main, "load_models", must_not_load)
    for new in ("9000", "1000000000"):
        code = main.main(["--demo", "--limit", "2", "--max-new-tokens", new,
                          "--output-dir", str(tmp_path / f"run{new}"), *scoring_args])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "exceeds the target model's context of 8192 tokens" in err
        assert "Lower --max-new-tokens to at most" in err
        bound = int(err.split("Lower --max-new-tokens to at most ")[1].split()[0])
        assert 7000 < bound < 8192
