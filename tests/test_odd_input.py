"""issue 15：数据文件里再怪的值也是 `文件:行号: 原因`、退出码 2，绝不是 traceback——单独的代理项、超过 4300 位的整数、
过深的嵌套、同一对象里重复的键；--skip-invalid 时这些行被跳过并记下原因。--data-file 给的是目录、命名管道或设备时
如实说出它是什么（而不是“不存在”）。直接调用 data_loader，外加经过 main.main 的退出码检查（不加载任何模型）。
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import main
from data_loader import DataError, load_questions, loads_strict


def _row(i: int) -> str:
    return json.dumps({"question": f"Which drug ({i})?", "answer": "paracetamol",
                       "options": {"A": "aspirin", "B": "ibuprofen", "C": "paracetamol", "D": "none"},
                       "answer_idx": "C"})


GOOD = _row(0)
# 第 2 行的各种怪值；值是 (原始行文本, 消息里应有的原因)。
ODD_ROWS: dict[str, tuple[str, str]] = {
    "lone_surrogate": (GOOD.replace('"Which drug', '"\\ud800Which drug'), "holds a lone surrogate \\ud800"),
    "huge_int": (GOOD.replace('"answer_idx": "C"', '"answer_idx": 1' + "0" * 5000), "more than 4300 digits"),
    "deep_nesting": ('{"question": ' + "[" * 100000 + "]" * 100000 + "}", "JSON nested too deeply"),
    "duplicate_key": (GOOD.replace('"answer_idx": "C"', '"answer_idx": "C", "answer_idx": "A"'),
                      "duplicate key 'answer_idx'"),
    "nan": (GOOD.replace('"answer_idx": "C"', '"answer_idx": NaN'), "NaN is not a JSON value"),
}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(ODD_ROWS))
def test_odd_row_is_file_line_reason(name: str, tmp_path: Path) -> None:
    line, reason = ODD_ROWS[name]
    path = _write(tmp_path / "data.jsonl", [GOOD, line, _row(2)])
    with pytest.raises(DataError) as info:
        load_questions(str(path))
    assert str(info.value).startswith(f"{path}:2: ") and reason in str(info.value)
    questions, _, skipped = load_questions(str(path), skip_invalid=True)
    assert [q.index for q in questions] == [0, 2]
    assert skipped[0]["where"] == f"{path}:2" and reason in skipped[0]["reason"]


@pytest.mark.parametrize("name", sorted(ODD_ROWS))
def test_odd_row_through_main_exit_2(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """经过 main：退出码 2、消息含 文件:行号、无 traceback、不加载任何模型。"""
    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no model may be loaded")

    monkeypatch.setattr(main, "load_tokenizer", must_not_load)
    monkeypatch.setattr(main, "load_models", must_not_load)
    line, reason = ODD_ROWS[name]
    path = _write(tmp_path / "data.jsonl", [GOOD, line])
    code = main.main(["--demo", "--data-file", str(path), "--limit", "1", "--output-dir", str(tmp_path / "run")])
    text = "".join(capsys.readouterr())
    assert code == 2 and "Traceback" not in text
    assert f"{path}:2: " in text and reason in text


def test_valid_surrogate_pair_is_accepted(tmp_path: Path) -> None:
    """成对的 \\ud83d\\ude00 是合法的字符（😀），照常读入。"""
    path = _write(tmp_path / "data.jsonl", [GOOD.replace('"Which drug', '"\\ud83d\\ude00 Which drug')])
    questions, _, _ = load_questions(str(path))
    assert questions[0].question.startswith("\U0001F600")


@pytest.mark.parametrize("kind", ["directory", "fifo", "device", "missing"])
def test_data_file_that_is_not_a_file(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """目录、命名管道（读它会一直阻塞）、字符设备：如实报出是什么；真的不存在时才说不存在。"""
    path = tmp_path / "data"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = Path(os.devnull)
    needle = {"directory": "is a directory, not a data file", "fifo": "is a named pipe (FIFO), not a data file",
              "device": "is a character device, not a data file", "missing": "no such data file"}[kind]
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_questions(str(path))
    monkeypatch.setattr(main, "load_models", lambda *a, **k: pytest.fail("no model may be loaded"))
    code = main.main(["--demo", "--data-file", str(path), "--output-dir", str(tmp_path / "run")])
    text = "".join(capsys.readouterr())
    assert code == 2 and needle in text and "Traceback" not in text


def test_loads_strict_never_leaks_other_exceptions() -> None:
    """loads_strict 只抛 ValueError（消息是一句原因）：调用者据此统一加上 文件:行号。"""
    for text in ["{", '{"a": 1, "a": 1}', "[1" + "0" * 5000 + "]", "[" * 5000, '"\\udfff"', "Infinity", "-Infinity"]:
        with pytest.raises(ValueError):
            loads_strict(text)
    assert loads_strict('{"a": [1, 2.5, null, "x"]}') == {"a": [1, 2.5, None, "x"]}
