"""data_loader 的测试：CPU、无网络、快速。

覆盖：捆绑数据的行数/哈希/内容；limit；hub 路径（用假的 `datasets` 模块注入，不联网）与大声回落；
提示渲染（真实 SmolLM2 聊天模板 + 不依赖 tokenizer 的假对象）；编码无双 BOS；各类坏数据的报错位置。
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import config
from data_loader import DataError, Question, encode_prompts, format_prompt, format_user_turn, load_medqa

BUNDLED = Path(config.BUNDLED_DATA_DIR)
GOOD_ROW: dict[str, Any] = {
    "question": "Which vitamin deficiency causes scurvy?",
    "answer": "Vitamin C",
    "options": {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"},
    "meta_info": "step1",
    "answer_idx": "C",
}


# ---------------------------------------------------------------------------
# 工具与夹具
# ---------------------------------------------------------------------------


def _write(tmp_path: Path, lines: list[str | bytes], name: str = "q.jsonl", trailing_newline: bool = True) -> str:
    """把若干行（str 会被 UTF-8 编码；bytes 原样写入）写成 JSONL，返回路径字符串。"""
    raw = b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8") for x in lines)
    path = tmp_path / name
    path.write_bytes(raw + (b"\n" if trailing_newline and lines else b""))
    return str(path)


def _row(**changes: Any) -> str:
    """GOOD_ROW 的一个变体（值为 ... 表示删除该键），序列化为一行 JSON。"""
    row = {k: v for k, v in {**GOOD_ROW, **changes}.items() if v is not ...}
    return json.dumps(row)


def _bad_file(tmp_path: Path, bad: str | bytes) -> str:
    """两行好数据 + 第 3 行坏数据，用来检查报错里的行号是 3 而不是 1。"""
    return _write(tmp_path, [_row(), _row(), bad])


class FakeTokenizer:
    """不依赖任何模型文件的最小 tokenizer：记录 apply_chat_template 的参数；
    编码时每个字符一个 id，add_special_tokens=True 时像 Llama 一样在前面加 BOS（id 0）。"""

    chat_template = "fake"
    bos_token_id = 0

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, str]], dict[str, Any]]] = []

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        self.calls.append((messages, kwargs))
        return "<s>" + "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        bos = [self.bos_token_id] if add_special_tokens else []
        return {"input_ids": [bos + [ord(c) for c in t] for t in texts]}


@pytest.fixture()
def no_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """让 `import datasets` 失败（sys.modules 中为 None 时 import 抛 ImportError），模拟未安装。"""
    monkeypatch.setitem(sys.modules, "datasets", None)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: Any) -> None:
    """注入一个假的 `datasets` 模块，其 load_dataset 由测试提供（不联网）。"""
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


# ---------------------------------------------------------------------------
# 捆绑数据
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("split,n", [("test", 1273), ("dev", 1272)])
def test_bundled_split_counts_and_schema(split: str, n: int) -> None:
    qs, source = load_medqa(str(BUNDLED / f"{split}.jsonl"))
    assert len(qs) == n
    assert [q.index for q in qs] == list(range(n))
    assert all(list(q.options) == ["A", "B", "C", "D"] for q in qs)
    assert all(q.answer_idx in "ABCD" and len(q.answer_idx) == 1 for q in qs)
    assert all(q.options[q.answer_idx] == q.answer for q in qs)  # SOURCE.md 的检查之一
    assert source.startswith(f"file:{BUNDLED / f'{split}.jsonl'} sha256=")


def test_bundled_sha256_matches_source_md() -> None:
    text = (BUNDLED / "SOURCE.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"`(\w+\.jsonl)`\s*\|[^\n]*?`([0-9a-f]{64})`", text))
    assert set(listed) == {"test.jsonl", "dev.jsonl"}
    for name, digest in listed.items():
        assert hashlib.sha256((BUNDLED / name).read_bytes()).hexdigest() == digest
        _, source = load_medqa(str(BUNDLED / name))
        assert source.endswith(f"sha256={digest}")


def test_first_row_is_carpal_tunnel() -> None:
    q = load_medqa(str(BUNDLED / "test.jsonl"), limit=1)[0][0]
    assert q.index == 0 and "carpal tunnel repair" in q.question
    assert q.answer_idx == "B" and q.answer == "Tell the attending that he cannot fail to disclose this mistake"


def test_limit_takes_first_rows() -> None:
    full, _ = load_medqa(str(BUNDLED / "test.jsonl"))
    part, _ = load_medqa(str(BUNDLED / "test.jsonl"), limit=5)
    assert part == full[:5] and [q.index for q in part] == [0, 1, 2, 3, 4]
    assert len(load_medqa(str(BUNDLED / "test.jsonl"), limit=0)[0]) == 1273  # 0 = 全部


def test_question_is_frozen() -> None:
    q = load_medqa(str(BUNDLED / "test.jsonl"), limit=1)[0][0]
    with pytest.raises(AttributeError):
        q.answer_idx = "A"  # type: ignore[misc]


# ---------------------------------------------------------------------------
# hub 与回落
# ---------------------------------------------------------------------------


def test_hub_unavailable_falls_back_loudly(no_datasets: None, capsys: pytest.CaptureFixture[str]) -> None:
    qs, source = load_medqa(None, split="test", limit=3)
    err = capsys.readouterr().err
    bundled = str(BUNDLED / "test.jsonl")
    assert len(qs) == 3 and "carpal tunnel" in qs[0].question
    assert "WARNING" in err and bundled in err and "datasets" in err and len(err.strip().splitlines()) == 1
    assert source.startswith(f"file:{bundled} sha256=") and "bundled fallback" in source and "datasets" in source


def test_hub_validation_split_falls_back_to_dev(no_datasets: None, capsys: pytest.CaptureFixture[str]) -> None:
    qs, source = load_medqa(None, split="validation")
    assert len(qs) == 1272 and "dev.jsonl" in source and "bundled fallback" in source
    assert "dev.jsonl" in capsys.readouterr().err


def test_hub_error_falls_back(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def offline(*_: Any, **__: Any) -> Any:
        raise ConnectionError("hub unreachable")

    _fake_datasets(monkeypatch, offline)
    qs, source = load_medqa(None, split="test")
    assert len(qs) == 1273 and "ConnectionError: hub unreachable" in source
    assert "hub unreachable" in capsys.readouterr().err


def test_hub_train_without_bundle_asks_for_data_file(no_datasets: None) -> None:
    with pytest.raises(DataError, match="--data-file"):
        load_medqa(None, split="train")


def test_hub_rows_loaded_and_validated(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, Any] = {}

    def fake_load(dataset_id: str, split: str) -> list[dict[str, Any]]:
        seen.update(dataset_id=dataset_id, split=split)
        return [json.loads(_row()), json.loads(_row(answer_idx="B"))]

    _fake_datasets(monkeypatch, fake_load)
    qs, source = load_medqa(None, split="test")
    assert seen == {"dataset_id": config.DATASET_ID, "split": "test"}
    assert source == f"hub:{config.DATASET_ID} split=test"
    assert [q.index for q in qs] == [0, 1] and qs[1].answer_idx == "B"
    assert capsys.readouterr().err == ""  # 正常路径不警告

    # hub 上的坏行与文件同样校验，且**不**回落到捆绑文件（回落会掩盖数据问题）。
    _fake_datasets(monkeypatch, lambda *_, **__: [json.loads(_row()), json.loads(_row(answer_idx="E"))])
    with pytest.raises(DataError, match=r"hub:GBaker/MedQA-USMLE-4-options split=test row 2: answer_idx='E'"):
        load_medqa(None, split="test")


# ---------------------------------------------------------------------------
# 提示渲染与编码
# ---------------------------------------------------------------------------


def test_user_turn_format() -> None:
    q = Question(index=0, question="Q?", options=dict(GOOD_ROW["options"]), answer_idx="C", answer="Vitamin C")
    assert format_user_turn(q) == (
        "Q?\n\nA. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D\n\n"
        'Think step by step, then finish with a line of the form "The answer is X", where X is A, B, C or D.'
    )


def test_format_prompt_with_fake_tokenizer() -> None:
    tok = FakeTokenizer()
    q = load_medqa(str(BUNDLED / "test.jsonl"), limit=1)[0][0]
    prompt = format_prompt(q, tok, system_prompt="SYS")
    (messages, kwargs), = tok.calls
    assert messages == [{"role": "system", "content": "SYS"}, {"role": "user", "content": format_user_turn(q)}]
    assert kwargs == {"tokenize": False, "add_generation_prompt": True}
    assert prompt.endswith("[assistant]")


def test_format_prompt_requires_chat_template() -> None:
    tok = FakeTokenizer()
    tok.chat_template = None  # type: ignore[assignment]
    q = load_medqa(str(BUNDLED / "test.jsonl"), limit=1)[0][0]
    with pytest.raises(ValueError, match="chat template"):
        format_prompt(q, tok)


def test_encode_prompts_skips_special_tokens() -> None:
    tok = FakeTokenizer()
    assert encode_prompts(["ab", "c"], tok) == [[97, 98], [99]]  # 假 tokenizer 默认会加 BOS(0)，这里没有
    assert encode_prompts([], tok) == []


def test_format_prompt_real_template(smol_tokenizer: Any) -> None:
    q = load_medqa(str(BUNDLED / "test.jsonl"), limit=1)[0][0]
    prompt = format_prompt(q, smol_tokenizer)
    assert config.SYSTEM_PROMPT in prompt and q.question in prompt
    for k in "ABCD":
        assert f"\n{k}. {q.options[k]}" in prompt
    assert 'where X is A, B, C or D.' in prompt
    # assistant 生成头 = 带/不带 add_generation_prompt 两次渲染之差。
    msgs = [{"role": "user", "content": "x"}]
    with_header = smol_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    header = with_header[len(smol_tokenizer.apply_chat_template(msgs, tokenize=False)):]
    assert header and prompt.endswith(header)


def test_encode_no_double_bos(smol_tokenizer: Any) -> None:
    qs = load_medqa(str(BUNDLED / "test.jsonl"), limit=2)[0]
    prompts = [format_prompt(q, smol_tokenizer) for q in qs]
    ids = encode_prompts(prompts, smol_tokenizer)
    bos = smol_tokenizer.bos_token_id
    assert len(ids) == 2 and all(isinstance(t, int) for seq in ids for t in seq)
    for seq, prompt in zip(ids, prompts):
        assert seq[0] == bos and seq[1] != bos  # 模板自带一个 BOS，不多不少
        assert smol_tokenizer.decode(seq) == prompt  # 无损往返：没有额外插入任何特殊 token


# ---------------------------------------------------------------------------
# 坏数据：DataError 必须给出文件与行号
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad,needle", [
    ('{"question": "x", ', "JSON"),
    ("[1, 2, 3]", "JSON object"),
    (_row(question=...), "missing question"),
    (_row(question="   "), "question (the question text) is empty"),
    (_row(question=7), "must be a string"),
    (_row(options=...), "missing options"),
    (_row(options=["a", "b", "c", "d"]), "options must be a JSON object"),
    (_row(options={"A": "a", "B": "b", "C": "c"}), "exactly A, B, C, D"),
    (_row(options={"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}), "4-option"),
    (_row(options={"A": "a", "B": "", "C": "c", "D": "d"}), "the text of option B is empty"),
    (_row(answer_idx="E"), "answer_idx='E'"),
    (_row(answer_idx=...), "answer_idx=None"),
    (_row(answer=3), "answer must be a string"),
    (b'{"question": "caf\xe9"}', "UTF-8"),
    ("", "empty line"),
])
def test_bad_row_names_file_and_line(tmp_path: Path, bad: str | bytes, needle: str) -> None:
    path = _bad_file(tmp_path, bad)
    with pytest.raises(DataError) as info:
        load_medqa(path)
    assert f"{path}:3:" in str(info.value) and needle in str(info.value)


def test_bad_row_fails_even_with_limit(tmp_path: Path) -> None:
    # limit 在校验之后截取：坏行即使在前 N 行之外也要在加载模型之前暴露。
    with pytest.raises(DataError, match=":3:"):
        load_medqa(_bad_file(tmp_path, _row(answer_idx="E")), limit=1)


def test_blank_line_in_middle(tmp_path: Path) -> None:
    path = _write(tmp_path, [_row(), "", _row()])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: empty line")):
        load_medqa(path)


def test_trailing_newline_rules(tmp_path: Path) -> None:
    assert len(load_medqa(_write(tmp_path, [_row(), _row()], "a.jsonl"))[0]) == 2
    assert len(load_medqa(_write(tmp_path, [_row(), _row()], "b.jsonl", trailing_newline=False))[0]) == 2
    path = str(tmp_path / "c.jsonl")
    Path(path).write_text(_row() + "\n\n", encoding="utf-8")  # 末尾两个换行 = 一个空行
    with pytest.raises(DataError, match=re.escape(f"{path}:2: empty line")):
        load_medqa(path)


def test_missing_answer_is_filled(tmp_path: Path) -> None:
    q = load_medqa(_write(tmp_path, [_row(answer=...)]))[0][0]
    assert q.answer == "Vitamin C"


def test_option_key_order_normalised(tmp_path: Path) -> None:
    q = load_medqa(_write(tmp_path, [_row(options={"D": "d", "C": "c", "B": "b", "A": "a"})]))[0][0]
    assert list(q.options.items()) == [("A", "a"), ("B", "b"), ("C", "c"), ("D", "d")]


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{path}:1: the file is empty")):
        load_medqa(str(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        load_medqa(str(tmp_path / "nope.jsonl"))


def test_limit_beyond_rows(tmp_path: Path) -> None:
    path = _write(tmp_path, [_row(), _row()])
    with pytest.raises(DataError, match=re.escape(f"{path}: limit=3 exceeds the number of questions, 2")):
        load_medqa(path, limit=3)


@pytest.mark.parametrize("limit", [-1, 1.5, True])
def test_limit_invalid(tmp_path: Path, limit: Any) -> None:
    path = _write(tmp_path, [_row()])
    with pytest.raises(DataError, match=re.escape(f"{path}: limit={limit!r} is not valid")):
        load_medqa(path, limit=limit)


def test_unknown_split() -> None:
    with pytest.raises(DataError, match="unknown split"):
        load_medqa(None, split="training")
