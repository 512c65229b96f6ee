"""用户读到的一切都是英文（issue 19）：--help、错误与警告消息、进度与续跑提示；中文只留在注释与文档字符串里。

两层检查：
1. 静态（AST）：非测试的 .py 里，传给 `raise XxxError(...)`、`print(...)`、`warnings.warn(...)`、`parser.error(...)`、
   argparse `help=`/`description=` 与 dataclass 字段 `metadata={"help": ...}` 的字符串字面量（含 f-string 的常量片段）
   都不含 CJK 字符；再严一点：除文档字符串外，任何字符串字面量都不含 CJK。
2. 动态：真正打印出来的东西——`main.py --help`、未知参数、坏数据文件、CPU 上的 4-bit——不含 CJK（都在进程内经
   main.main：帮助文本由 argparse 在进程内生成，子进程只多出约 5 秒的启动；`python main.py` 作为真实进程的运行见
   test_main 的演示与 test_reliability 的 test_unknown_flag_value_in_real_process）。
   CPU 上 4-bit 的拒绝排在任何数据读取、hub 访问或权重加载之前（加载函数被替换成让测试失败的桩）。
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

import main

REPO = Path(__file__).resolve().parent.parent
CJK = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")
# 项目里所有非测试的 Python 文件（顶层与 fast/）。
SOURCES = sorted([*REPO.glob("*.py"), *REPO.glob("fast/*.py")])


def _docstring_ids(tree: ast.AST) -> set[int]:
    """模块、类、函数的文档字符串节点（它们按项目约定用中文，不算用户界面）。"""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def _strings(node: ast.AST) -> list[ast.Constant]:
    """node 之下所有字符串常量（含 f-string 的字面片段）。"""
    return [n for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _user_facing(tree: ast.AST) -> list[ast.Constant]:
    """会被用户读到的字符串：异常消息、print、warnings.warn、parser.error、help=/description=、metadata 的 help。"""
    found: list[ast.Constant] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            found += _strings(node.exc)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in {"print", "warn", "error", "skip", "fail"}:
                found += [s for a in node.args for s in _strings(a)]
            found += [s for k in node.keywords if k.arg in {"help", "description", "desc", "reason"}
                      for s in _strings(k.value)]
        elif isinstance(node, ast.Dict):
            found += [s for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and k.value == "help" for s in _strings(v)]
    return found


def test_sources_are_found() -> None:
    names = {p.name for p in SOURCES}
    assert {"main.py", "config.py", "model_loader.py", "decoder.py", "bench.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_user_facing_literals_are_english(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = [f"{path.name}:{s.lineno}: {s.value[:60]!r}" for s in _user_facing(tree) if CJK.search(s.value)]
    assert not bad, "\n".join(bad)
    # 文档字符串以外的任何字符串字面量（例如先赋给变量、再拼进消息的片段）也不含 CJK。
    docs = _docstring_ids(tree)
    other = [f"{path.name}:{s.lineno}: {s.value[:60]!r}" for s in _strings(tree)
             if id(s) not in docs and CJK.search(s.value)]
    assert not other, "\n".join(other)


def test_scanner_catches_a_chinese_message() -> None:
    """扫描器自身的检查：中文消息会被认出，中文文档字符串不会。"""
    tree = ast.parse('def f():\n    """中文文档。"""\n    raise ValueError(f"{1} 非法")\n')
    flagged = [s.value for s in _user_facing(tree) if CJK.search(s.value)]
    assert flagged == [" 非法"]
    assert [s.value for s in _strings(tree) if id(s) not in _docstring_ids(tree) and CJK.search(s.value)] == [" 非法"]


def test_help_is_english_and_names_the_model_specs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main.main(["--help"])
    captured = capsys.readouterr()
    assert info.value.code == 0, captured.err
    out = captured.out + captured.err
    assert not CJK.search(out), CJK.findall(out)
    flat = " ".join(out.split())
    assert "pypi:<package>" in flat and "HF_HUB_OFFLINE=1" in flat and "--threads" in flat


def _fail_if_called(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("nothing may be read from the hub or loaded before the cheap checks")


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main.main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_unknown_flag_message_is_english(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main.main(["--no-such-flag"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--no-such-flag" in err and not CJK.search(err)


def test_bad_data_file_message_is_english(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(main, "load_tokenizer", _fail_if_called)
    monkeypatch.setattr(main, "load_models", _fail_if_called)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "options": {"A": "a"}}\n', encoding="utf-8")
    code, text = _main(["--demo", "--data-file", str(bad), "--output-dir", str(tmp_path / "run")], capsys)
    assert code == main.EXIT_ERROR and f"{bad}:1" in text and "--skip-invalid" in text
    assert not CJK.search(text), text


def test_4bit_on_cpu_is_refused_before_data_hub_or_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`python main.py` on a CPU box: refused at once, before the dataset (hub) is read or anything loads."""
    import model_loader
    monkeypatch.setattr(model_loader.torch.cuda, "is_available", lambda: False)
    for name in ("load_questions", "load_tokenizer", "load_models"):
        monkeypatch.setattr(main, name, _fail_if_called)
    run_dir = tmp_path / "run"
    code, text = _main(["--output-dir", str(run_dir)], capsys)
    assert code == main.EXIT_ERROR, text
    assert "4-bit" in text and "--no-load-in-4bit" in text and "CUDA" in text
    assert not CJK.search(text), text
    assert not run_dir.exists()  # the empty folder made for this run is removed again


def test_missing_local_model_is_refused_before_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("load_questions", "load_tokenizer", "load_models"):
        monkeypatch.setattr(main, name, _fail_if_called)
    code, text = _main(["--demo", "--expert", "./no/such/model", "--output-dir", str(tmp_path / "run")], capsys)
    assert code == main.EXIT_ERROR and "./no/such/model" in text and not CJK.search(text)


def test_threads_flag_sets_torch_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--threads N 在任何加载之前调用 torch.set_num_threads(N)。"""
    seen: list[int] = []
    monkeypatch.setattr(main.torch, "set_num_threads", seen.append)
    monkeypatch.setattr(main, "load_questions", _fail_if_called)
    with pytest.raises(AssertionError, match="cheap checks"):
        main.main(["--demo", "--threads", "1", "--output-dir", str(tmp_path / "run")])
    assert seen == [1]
