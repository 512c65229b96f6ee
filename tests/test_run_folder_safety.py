"""issue 15：运行目录不会被改坏。CPU、无网络、不加载任何模型（全部在进程内、直接调用函数或 main.main）。

- 续跑先只读地校验，校验通过才截掉被杀时写了一半的最后一行（旧代码先截、后校验）。
- 运行目录里本工具的文件位置上是符号链接、FIFO 或目录：--resume 以退出码 2 拒绝，链接指向的文件不被读写。
- 整文件写入（write_json、rewrite_sorted、sweep.csv、PNG）= 临时文件 + fsync + 改名；失败时旧文件不变、不留临时文件。
- 追加（predictions/events/timing）失败时截回这批之前的长度：文件仍以完整的行结尾，之前的批不受影响。
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import main
import run_folder
from config import ConfigError, parse_args
from data_loader import DataError
from scoring import RecordRules

# 两道题、一个基线臂：read_records 用 scoring.verify_record 核对每条记录（gold 与 pred 从这里的题目与文本重算）
RULES = RecordRules(modes=("baseline",), fused=frozenset(), forced=True, max_new_tokens=8,
                    questions={i: SimpleNamespace(index=i, answer_idx="B", options={k: f"option {k}" for k in "ABCD"})
                               for i in (0, 1)})


def _record(index: int, mode: str = "baseline") -> dict[str, Any]:
    return {"mode": mode, "index": index, "gold": "B", "pred": "B", "pred_text": "B", "pred_forced": None,
            "correct": True, "output": "The answer is B", "num_tokens": 3, "output_ids": [5, 6, 7],
            "nonfinite_target_stops": 0}


def _lines(*recs: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in recs)


def _run_folder(tmp_path: Path) -> Path:
    """一个最小的运行目录：config.json 只有 "config"（续跑的拒绝都发生在读数据之前）。"""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved, _ = parse_args(["--demo", "--output-dir", str(run_dir)])
    (run_dir / "config.json").write_text(json.dumps({"config": saved.to_dict()}), encoding="utf-8")
    return run_dir


def _no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("不应加载任何分词器或模型")

    monkeypatch.setattr(main, "load_tokenizer", must_not_load)
    monkeypatch.setattr(main, "load_models", must_not_load)


# ---------------------------------------------------------------------------
# 先校验、后修改
# ---------------------------------------------------------------------------

def test_damaged_file_with_torn_tail_is_refused_unchanged(tmp_path: Path) -> None:
    """中间有坏行、末尾又有残行：拒绝（DataError），文件一个字节都不改——残行也不截。"""
    path = tmp_path / "predictions.jsonl"
    raw = _lines(_record(0)) + b'{"mode": "baseline", "ind\n' + _lines(_record(1)) + b'{"mode": "base'
    path.write_bytes(raw)
    with pytest.raises(DataError, match=":2: not a valid JSON record"):
        run_folder.read_records(str(path), ["baseline"], {0, 1}, rules=RULES)
    assert path.read_bytes() == raw


def test_torn_tail_is_cut_only_after_every_file_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """多进程的分片：predictions.jsonl 有残行、分片里有重复记录。先校验全部文件 → 拒绝，残行不截；
    去掉重复之后再读：残行被截掉（只截掉残行），并打印一行说明。"""
    preds, shard = tmp_path / "predictions.jsonl", tmp_path / "predictions.rank1.jsonl"
    torn = _lines(_record(0)) + b'{"mode": "baseline", "index": 1, "go'
    preds.write_bytes(torn)
    shard.write_bytes(_lines(_record(0)))
    with pytest.raises(DataError, match="duplicates the record"):
        run_folder.collect_records(str(tmp_path), ["baseline"], {0, 1}, RULES)
    assert preds.read_bytes() == torn
    shard.write_bytes(_lines(_record(1)))
    assert len(run_folder.collect_records(str(tmp_path), ["baseline"], {0, 1}, RULES)) == 2
    assert preds.read_bytes() == _lines(_record(0))
    assert "dropped an incomplete last line" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# 符号链接、FIFO、目录
# ---------------------------------------------------------------------------

def test_symlinked_predictions_never_truncates_its_target(tmp_path: Path) -> None:
    """predictions.jsonl 是指向别处的符号链接（那个文件末尾没有换行）：旧代码跟随链接、截断了它指向的文件。"""
    outside = tmp_path / "elsewhere.jsonl"
    raw = _lines(_record(0)) + b"not a newline-terminated tail"
    outside.write_bytes(raw)
    link = tmp_path / "predictions.jsonl"
    link.symlink_to(outside)
    with pytest.raises(ConfigError, match="is a symbolic link, not a regular file"):
        run_folder.read_records(str(link), ["baseline"], {0}, rules=RULES)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        run_folder.drop_torn_tail(str(link))
    assert outside.read_bytes() == raw


@pytest.mark.parametrize("name,kind", [
    ("predictions.jsonl", "symlink"), ("predictions.jsonl", "fifo"), ("predictions.jsonl", "dir"),
    ("predictions.rank1.jsonl", "symlink"), ("config.json", "symlink"), ("metrics.json", "symlink"),
    ("events.jsonl", "fifo"), ("timing.jsonl", "symlink"), (".lock", "dir"),
])
def test_resume_refuses_non_regular_run_files(name: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--resume：本工具的文件位置上是符号链接 / FIFO / 目录 → 退出码 2、消息指出文件与类型，在读或改任何东西之前。"""
    _no_model_loading(monkeypatch)
    run_dir = _run_folder(tmp_path)
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"config": parse_args(["--demo"])[0].to_dict()}) + "\n{torn")
    before = outside.read_bytes()
    path = run_dir / name
    if path.exists():
        path.unlink()
    {"symlink": lambda: path.symlink_to(outside), "fifo": lambda: os.mkfifo(path), "dir": path.mkdir}[kind]()
    code = main.main(["--resume", str(run_dir)])
    text = capsys.readouterr().err
    what = {"symlink": "a symbolic link", "fifo": "a FIFO", "dir": "a directory"}[kind]
    assert code == 2, text
    assert f"{path} is {what}, not a regular file" in text and "Traceback" not in text
    assert outside.read_bytes() == before


def test_append_refuses_a_symlink_planted_mid_run(tmp_path: Path) -> None:
    """运行中途 events.jsonl 被换成符号链接：追加被拒绝（O_NOFOLLOW），链接指向的文件不变。"""
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (tmp_path / "events.jsonl").symlink_to(outside)
    with pytest.raises(ConfigError, match="symbolic link"):
        run_folder.log_event(str(tmp_path), {"event": "x"})
    assert outside.read_text() == "keep"


# ---------------------------------------------------------------------------
# 原子写入、失败时不丢东西
# ---------------------------------------------------------------------------

def _enospc_after(n_bytes: int) -> Any:
    """注入磁盘满：先写 n_bytes 个字节（写了一部分），再抛出 OSError(ENOSPC)。"""
    def write_all(fd: int, data: bytes) -> None:
        os.write(fd, data[:n_bytes])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write_all


def test_whole_file_writes_are_atomic_and_leave_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_json / rewrite_sorted / sweep.csv：磁盘满 → RunFolderError（一行：动作、文件、errno 文字），
    旧内容不变，目录里不留临时文件。"""
    from reporting import write_sweep

    metrics, preds = tmp_path / "metrics.json", tmp_path / "predictions.jsonl"
    run_folder.write_json(str(metrics), {"old": 1})
    run_folder.rewrite_sorted(str(preds), [_record(0)], ["baseline"])
    (tmp_path / "sweep.csv").write_text("old")
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(run_folder, "_write_all", _enospc_after(3))
    for write in (lambda: run_folder.write_json(str(metrics), {"new": 2}),
                  lambda: run_folder.rewrite_sorted(str(preds), [_record(1), _record(0)], ["baseline"]),
                  lambda: write_sweep([], str(tmp_path))):
        with pytest.raises(run_folder.RunFolderError) as info:
            write()
        assert "No space left on device (ENOSPC)" in str(info.value) and "\n" not in str(info.value)
        assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # 旧内容不变，也没有多出的临时文件


def test_failed_append_is_cut_back_to_whole_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """一批写到一半时磁盘满：文件截回这批之前的长度（之前的批完好、没有半行），RunFolderError 指出文件。"""
    path = tmp_path / "predictions.jsonl"
    with run_folder.open_append(str(path)) as sink:
        run_folder.append_jsonl(sink, [_record(0), _record(1)])
        monkeypatch.setattr(run_folder, "_write_all", _enospc_after(10))
        with pytest.raises(run_folder.RunFolderError, match=f"could not append to {path}: No space left"):
            run_folder.append_jsonl(sink, [_record(2), _record(3)])
    assert path.read_bytes() == _lines(_record(0), _record(1))
