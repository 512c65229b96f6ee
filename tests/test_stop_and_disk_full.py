"""issue 15：SIGTERM / SIGHUP 与第一次 Ctrl-C 一样停下；写运行目录失败（磁盘满）时一行消息、退出码 4、不丢已写的记录。

进程内的 main.main + 微型随机 Llama（词表与 SmolLM2 分词器相同，monkeypatch main.load_models，每次约 1 秒），
另有一个真实子进程（同样的微型模型，tests/shared_runs.py）在第二批解码时收到外部的 SIGTERM。
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

import evaluator
import main
import run_folder
from config import Config
from shared_runs import release, short_row as _row, spawn_tiny, tiny_llama, wait_blocked
from test_reliability import _main

LIMIT, BATCH = 6, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "short.jsonl"
    path.write_text("".join(json.dumps(_row(i)) + "\n" for i in range(LIMIT)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_trio(smol_tokenizer: Any) -> dict[str, LlamaForCausalLM]:
    return {role: tiny_llama(len(smol_tokenizer), seed) for seed, role in enumerate(("target", "expert", "base"))}


@pytest.fixture()
def tiny_models(monkeypatch: pytest.MonkeyPatch, tiny_trio: dict[str, LlamaForCausalLM]) -> None:
    def fake_load_models(cfg: Config, tokenizer: Any, device: torch.device) -> tuple[dict[str, Any], int]:
        roles = ("target", "expert", "base") if "steered" in cfg.modes else ("target",)
        return {r: tiny_trio[r] for r in roles}, len(tokenizer)

    monkeypatch.setattr(main, "load_models", fake_load_models)


def _argv(data: Path, run_dir: Path) -> list[str]:
    return ["--demo", "--data-file", str(data), "--limit", str(LIMIT), "--batch-size", str(BATCH),
            "--max-new-tokens", "6", "--output-dir", str(run_dir)]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def clean_records(tmp_path_factory: pytest.TempPathFactory, data: Path, tiny_trio: Any) -> list[dict[str, Any]]:
    """不中断的参照运行（进程内、微型模型）的全部记录。"""
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(main, "load_models", lambda cfg, tok, device: (dict(tiny_trio), len(tok)))
        assert main.main(_argv(data, run_dir)) == 0
    return _records(run_dir)


# ---------------------------------------------------------------------------
# 信号
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_finish_the_batch_then_resume(signum: int, data: Path, tmp_path: Path, tiny_models: None,
                                                         clean_records: list[dict[str, Any]],
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """第一批解码时收到信号（真实的 os.kill 发给本进程）：写完这一批、退出码 128 + signum（143 / 129）、
    打印精确的续跑命令；（SIGTERM）执行续跑后记录与不中断的运行相同。"""
    run_dir = tmp_path / "run"
    calls = [0]

    def hook(n: int) -> None:
        calls[0] += 1
        if calls[0] == 1:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(evaluator, "_FAULT_HOOK", hook)
    code, text = _main(_argv(data, run_dir), capsys)
    name = signal.Signals(signum).name
    assert code == 128 + signum and code == {signal.SIGTERM: 143, signal.SIGHUP: 129}[signum]
    assert f"[main] {name}: finishing the current batch" in text
    assert f"Interrupted by {name}. To continue: python main.py --resume {shlex.quote(str(run_dir))}" in text
    assert len(_records(run_dir)) == BATCH and (run_dir / "predictions.jsonl").read_bytes().endswith(b"\n")
    if signum != signal.SIGTERM:
        return  # 续跑走同一条路径，只对 SIGTERM 做一次（测试时间）
    monkeypatch.setattr(evaluator, "_FAULT_HOOK", None)
    code, text = _main(["--resume", str(run_dir)], capsys)
    assert code == 0, text
    assert _records(run_dir) == clean_records


def test_sigterm_while_loading_stops_at_once(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """解码之外（加载时）的 SIGTERM：像默认的 Ctrl-C 一样立即停下，退出码 143，没有可续的东西；本次新建的目录被删掉。"""
    def load_tokenizer(*args: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # 处理器在这里抛出 StopNow，不会真的睡满
        raise AssertionError("SIGTERM 没有停下运行")

    monkeypatch.setattr(main, "load_tokenizer", load_tokenizer)
    code, text = _main(_argv(data, tmp_path / "run"), capsys)
    assert code == 143 and "Interrupted by SIGTERM (decoding had not started; there is nothing to resume)." in text
    assert not (tmp_path / "run").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main 恢复了原来的处理器


def test_sigterm_in_a_real_process(data: Path, tmp_path: Path, smol_path: str) -> None:
    """真实子进程（微型模型）：第一批写入后、第二批解码时从外部发 SIGTERM → 写完这一批、退出码 143、精确的续跑命令、
    没有 traceback。子进程在第二批之前停住等信号（tests/shared_runs.py 的握手），与机器快慢无关。"""
    run_dir = tmp_path / "run"
    preds = run_dir / "predictions.jsonl"
    proc = spawn_tiny(_argv(data, run_dir), tmp_path / "sync", block_at=2)
    wait_blocked(proc, tmp_path / "sync")
    assert preds.read_bytes().count(b"\n") == BATCH
    proc.send_signal(signal.SIGTERM)
    release(tmp_path / "sync")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"Interrupted by SIGTERM. To continue: python main.py --resume {shlex.quote(str(run_dir))}" in err
    assert "Traceback" not in err
    raw = preds.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 2 * BATCH


# ---------------------------------------------------------------------------
# 磁盘满
# ---------------------------------------------------------------------------

def test_disk_full_mid_run_exit_4_then_resume(data: Path, tmp_path: Path, tiny_models: None,
                                              clean_records: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """第二批写到一半时 ENOSPC（注入在 run_folder._write_all）：退出码 4、一行消息（动作、文件、errno 文字）加续跑命令，
    没有 traceback；第一批完好、没有半行；续跑之后记录与不中断的运行相同。"""
    run_dir = tmp_path / "run"
    preds = run_dir / "predictions.jsonl"
    real = run_folder._write_all
    appends = [0]

    def write_all(fd: int, data_: bytes) -> None:
        if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(preds):
            appends[0] += 1
            if appends[0] == 2:
                os.write(fd, data_[:25])  # 写了一部分
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data_)

    monkeypatch.setattr(run_folder, "_write_all", write_all)
    code, text = _main(_argv(data, run_dir), capsys)
    assert code == 4, text
    error = [line for line in text.splitlines() if line.startswith("error:")]
    assert error == [f"error: could not append to {preds}: No space left on device (ENOSPC). Every finished question is "
                     f"saved. Free some space (or fix the cause above), then continue: python main.py --resume "
                     f"{shlex.quote(str(run_dir))}"]
    assert preds.read_bytes().count(b"\n") == BATCH and preds.read_bytes().endswith(b"\n")
    monkeypatch.setattr(run_folder, "_write_all", real)
    code, text = _main(["--resume", str(run_dir)], capsys)
    assert code == 0, text
    assert _records(run_dir) == clean_records
