"""真实 Llama-3 分词器夹具（tests/llama3.py）的核对，以及项目代码在它上面的行为。

参照物是 Meta 官方的 llama-models 0.3.0：Tokenizer.encode/decode（tiktoken）与 ChatFormat.encode_dialog_prompt。
- 编码：各类文本（医学英文、Unicode、数字、代码、空白串、emoji、中文、全部捆绑的 MedQA 题目）的 id 与 llama-models 相同；
- 解码：逐字往返；与 llama-models 的解码相同；
- 特殊记号：256 个各是一个 id、在官方位置；bos/eos/pad 与 Llama-3.1-Instruct 相同；
- 聊天模板：渲染的 [system, user] 提示与 ChatFormat 的 id 只差 3.1 模板的日期头，且恰好差这一段；
- 项目代码：data_loader.format_prompt + encode_prompts 只有一个 BOS；model_loader.end_token_ids / check_vocab /
  load_tokenizer（没有 pad 时选 <|finetune_right_pad_id|>）。
"""
from __future__ import annotations

import os

import pytest

from llama3 import missing_dependency

if missing_dependency():
    pytest.skip(missing_dependency(), allow_module_level=True)

# 被测的项目函数集中在这里导入（重构后只需改这几行）。
import config  # noqa: E402
from data_loader import encode_prompts, format_prompt, format_user_turn, load_questions  # noqa: E402
from llama3 import (BOS_ID, DATE_HEADER, END_HEADER_ID, END_IDS, END_OF_TEXT_ID, EOM_ID, EOT_ID,  # noqa: E402
                    FINETUNE_PAD_ID, PYTHON_TAG_ID, START_HEADER_ID, VOCAB_SIZE, llama3_tokenizer,
                    llama3_tokenizer_dir, raw_message, reference_chat_format, reference_tokenizer, special_tokens,
                    tiny_llama3)
from model_loader import PREFERRED_PAD_TOKENS, check_vocab, end_token_ids, load_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDQA_FILE = os.path.join(REPO, "data", "medqa", "test.jsonl")

# 各类文本：BPE 的切分正则在这些地方最容易与 tiktoken 不一致（缩写、数字分组、空白串、多字节字符、换行）。
TEXTS: list[str] = [
    "A 45-year-old man presents with crushing substernal chest pain radiating to the left arm; "
    "troponin I is 2.3 ng/mL and the ECG shows ST elevation in leads II, III and aVF. The answer is (C).",
    "Hb 9.8 g/dL, MCV 72 fL, ferritin <12 µg/L → iron-deficiency anaemia; give 325 mg FeSO₄ PO TID.",
    "Naïve café résumé — “quoted” ‘text’ … ±5 °C, ≥ 90 % SpO₂, β-blocker, α₁-agonist, Ω, ß, Æ.",
    "1234567890 3.14159 1,000,000 -42 0.005mg 2023-12-26 12:30:45 1e-9 0x1F 99999999999999",
    "def f(x):\n    return x**2  # square\n\tif x != None: print(f'{x!r}')\n}}]) ;; && || <= >= === !==",
    "a   b\t\t\tc\n\n\n  d    \n \n   ",
    "   leading spaces and trailing spaces   ",
    "\n\nThe answer is B\n\n\n",
    "Heart ❤️ 🫀 pill 💊 doctor 👩🏽‍⚕️ flags 🇺🇸🇨🇳 done 🎉🎉🎉",
    "患者男性，45岁，胸痛3小时，心电图示ST段抬高。答案是C。",
    "I'M sure it's the patient's BP; they'd've known. DON'T You'LL We're",
    "Hello , world . don 't do it ! ( A ) is wrong ?",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "", " ", "\n", "A", " A", "(A)", "**Answer: D**", "$\\boxed{\\text{(B)}}$",
]
# 系统 / 用户两回合：内容首尾无空白（模板会 trim，ChatFormat 不会；两者只在这里可比）。
DIALOGS: list[tuple[str, str]] = [
    ("You are a doctor.", "Which drug?"),
    (config.SYSTEM_PROMPT, "A 30-year-old woman has fatigue.\n\nA. Iron\nB. B12\nC. Folate\nD. Zinc\n\nAnswer?"),
    ("(Be brief.) 简短回答。", "   padded user turn with emoji 💊 and trailing newline\n"),
    ("1. Think.\n2. Answer.", "12345 and 'quotes' \"double\" <tag> {braces}"),
]


@pytest.fixture(scope="module")
def tok():
    return llama3_tokenizer()


@pytest.fixture(scope="module")
def ref():
    return reference_tokenizer()


@pytest.fixture(scope="module")
def questions():
    qs, _, _ = load_questions(data_file=MEDQA_FILE, limit=20)
    return qs


def medqa_texts() -> list[str]:
    """捆绑的 MedQA test 划分的全部题目：题干、四个选项、以及项目渲染的用户回合（含换行与 "A. " 行）。"""
    texts = []
    for q in load_questions(data_file=MEDQA_FILE)[0]:
        texts.append(q.question)
        texts.extend(q.options.values())
        texts.append(format_user_turn(q))
    return texts


# ---------------------------------------------------------------------------
# (a) 编码与 llama-models 相同；(b) 解码往返
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_llama_models(tok, ref, text: str) -> None:
    expected = ref.encode(text, bos=False, eos=False)
    assert tok.encode(text, add_special_tokens=False) == expected
    # 官方 tokenizer.json 的后处理在开头加 BOS（而且只加 BOS，不加 EOS）
    assert tok(text)["input_ids"] == ref.encode(text, bos=True, eos=False)


def test_encode_matches_llama_models_on_all_bundled_medqa(tok, ref) -> None:
    texts = medqa_texts()
    assert len(texts) > 7_000
    ours = tok(texts, add_special_tokens=False)["input_ids"]
    theirs = ref.model.encode_ordinary_batch(texts)
    mismatched = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatched, f"{len(mismatched)} texts differ, first: {mismatched[0]!r}"
    # encode_ordinary_batch 与 Tokenizer.encode 是同一编码（后者只多了超长文本的切块）
    assert theirs[:50] == [ref.encode(t, bos=False, eos=False) for t in texts[:50]]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips_and_matches_llama_models(tok, ref, text: str) -> None:
    ids = ref.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text == ref.decode(ids)
    # transformers 5.24 对 BPE 忽略 clean_up_tokenization_spaces=True（" ," 不会变成 ","）：记录里的输出文字
    # 因此与模型生成的逐字相同；若将来的版本开始执行这一步，这里会失败
    with_specials = [BOS_ID] + ids + [EOT_ID]
    assert tok.decode(with_specials, skip_special_tokens=True) == text
    assert tok.decode(with_specials) == "<|begin_of_text|>" + text + "<|eot_id|>"


# ---------------------------------------------------------------------------
# (c) 特殊记号、bos/eos/pad、词表大小
# ---------------------------------------------------------------------------


def test_special_tokens_at_official_ids(tok, ref) -> None:
    names = special_tokens()
    assert len(names) == 256 and len(tok) == VOCAB_SIZE == ref.n_words
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))  # 没有空洞、没有重复
    for i, name in enumerate(names):
        assert vocab[name] == BOS_ID + i == ref.special_tokens[name]
        assert tok.encode(name, add_special_tokens=False) == [BOS_ID + i]  # 文本里的记号是单个 id
    official = {"<|begin_of_text|>": BOS_ID, "<|end_of_text|>": END_OF_TEXT_ID,
                "<|finetune_right_pad_id|>": FINETUNE_PAD_ID, "<|start_header_id|>": START_HEADER_ID,
                "<|end_header_id|>": END_HEADER_ID, "<|eom_id|>": EOM_ID, "<|eot_id|>": EOT_ID,
                "<|python_tag|>": PYTHON_TAG_ID, "<|reserved_special_token_0|>": 128002,
                "<|reserved_special_token_1|>": 128003}
    assert {name: vocab[name] for name in official} == official
    # 与 llama-models 以 allowed_special="all" 编码含记号文字的文本相同
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, bos=False, eos=False, allowed_special="all")


def test_bos_eos_pad_as_llama31_instruct(tok) -> None:
    assert (tok.bos_token, tok.bos_token_id) == ("<|begin_of_text|>", BOS_ID)
    assert (tok.eos_token, tok.eos_token_id) == ("<|eot_id|>", EOT_ID)
    assert tok.pad_token is None and tok.pad_token_id is None
    assert tok.model_max_length == 131072


def test_skip_special_tokens_drops_all_256(tok) -> None:
    """生成里可能出现任何特殊记号（例如 <|python_tag|>、保留记号）：跳过特殊记号的解码必须把 256 个全部去掉。"""
    text_ids = tok.encode(" The answer is C.", add_special_tokens=False)
    mixed = [t for special in range(BOS_ID, VOCAB_SIZE) for t in (special, text_ids[special % len(text_ids)])]
    expected = tok.decode([t for t in mixed if t < BOS_ID])
    assert tok.decode(mixed, skip_special_tokens=True) == expected
    assert "<|" not in expected


def test_disk_cache_reloads_the_same_tokenizer(tok) -> None:
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(llama3_tokenizer_dir())
    assert again.get_vocab() == tok.get_vocab()
    assert again.chat_template == tok.chat_template
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (BOS_ID, EOT_ID, None)
    assert again("x y")["input_ids"] == tok("x y")["input_ids"]


# ---------------------------------------------------------------------------
# (d) 聊天模板 vs ChatFormat.encode_dialog_prompt：只差日期头
# ---------------------------------------------------------------------------


def chat_format_ids(system: str, user: str) -> list[int]:
    return reference_chat_format().encode_dialog_prompt(
        [raw_message("system", system), raw_message("user", user)]).tokens


def with_date_header(reference_ids: list[int]) -> list[int]:
    """把 3.1 模板的日期头（llama-models 编码）插到参考 id 的系统回合开头：BOS、<|start_header_id|>system<|end_header_id|>、"\\n\\n" 之后。"""
    ref = reference_tokenizer()
    k = reference_ids.index(END_HEADER_ID) + 1
    assert reference_ids[:k + 1] == [BOS_ID, START_HEADER_ID, *ref.encode("system", bos=False, eos=False),
                                     END_HEADER_ID, *ref.encode("\n\n", bos=False, eos=False)]
    return reference_ids[:k + 1] + ref.encode(DATE_HEADER, bos=False, eos=False) + reference_ids[k + 1:]


@pytest.mark.parametrize("system,user", DIALOGS)
def test_template_equals_chat_format_except_date_header(tok, system: str, user: str) -> None:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours = tok.encode(rendered, add_special_tokens=False)
    # ChatFormat 不 trim 内容，模板会：参考侧喂 trim 过的文字
    reference = chat_format_ids(system.strip(), user.strip())
    assert ours != reference
    assert ours == with_date_header(reference)  # 唯一的差别：系统回合开头的那一段日期头
    # 文字层面同样如此：去掉唯一一处日期头后与 llama-models 解码的参考提示逐字相同
    assert rendered.count(DATE_HEADER) == 1
    assert rendered.replace(DATE_HEADER, "") == reference_tokenizer().decode(reference)
    # apply_chat_template 自己分词（tokenize=True）也不会多加 BOS
    direct = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert list(direct["input_ids"] if hasattr(direct, "keys") else direct) == ours


def test_project_prompt_equals_chat_format_except_date_header(tok, questions) -> None:
    """项目自己的渲染（data_loader.format_prompt + encode_prompts）对 20 道 MedQA 题同样只差日期头。"""
    ids = encode_prompts([format_prompt(q, tok) for q in questions], tok)
    for q, ours in zip(questions, ids):
        assert ours == with_date_header(chat_format_ids(config.SYSTEM_PROMPT, format_user_turn(q)))


def test_date_header_is_fixed_unless_date_string_given(tok) -> None:
    """3.1 模板的日期缺省固定为 26 Jul 2024（3.2 的模板改用当天日期）：项目不传 date_string，提示因此可复现。"""
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert "Today Date: 26 Jul 2024\n\n" in tok.apply_chat_template(messages, tokenize=False)
    other = tok.apply_chat_template(messages, tokenize=False, date_string="01 Dec 2026")
    assert "Today Date: 01 Dec 2026\n\n" in other and "26 Jul 2024" not in other


# ---------------------------------------------------------------------------
# (e) 恰好一个 BOS
# ---------------------------------------------------------------------------


def test_project_prompts_have_exactly_one_bos(tok, questions) -> None:
    prompts = [format_prompt(q, tok) for q in questions]
    assert all(p.startswith("<|begin_of_text|>") for p in prompts)  # BOS 在模板里
    ids = encode_prompts(prompts, tok)
    assert all(row[0] == BOS_ID and row.count(BOS_ID) == 1 for row in ids)
    # 对照：按分词器的默认方式编码（add_special_tokens=True）会得到两个 BOS——这个风险对 Llama-3 是真实的
    doubled = tok(prompts)["input_ids"]
    assert all(row[:2] == [BOS_ID, BOS_ID] and row[1:] == ours for row, ours in zip(doubled, ids))


# ---------------------------------------------------------------------------
# (f) model_loader：结束记号、词表检查、没有 pad 时的选择
# ---------------------------------------------------------------------------


def test_end_token_ids_are_the_three_llama3_ends(tok) -> None:
    model = tiny_llama3(0)
    assert model.generation_config.eos_token_id == [END_OF_TEXT_ID, EOM_ID, EOT_ID]
    assert end_token_ids(tok, [model]) == sorted(END_IDS)
    assert end_token_ids(tok) == sorted(END_IDS)  # 只有分词器时也不漏（词表里的已知结束记号）


def test_check_vocab_accepts_128256(tok) -> None:
    models = {"target": tiny_llama3(0), "expert": tiny_llama3(1), "base": tiny_llama3(2, tie=True)}
    assert check_vocab(tok, models, {"expert": tok, "base": tok}) == VOCAB_SIZE


def test_load_tokenizer_picks_finetune_pad_when_there_is_none(tok) -> None:
    assert tok.pad_token is None and PREFERRED_PAD_TOKENS[0] == "<|finetune_right_pad_id|>"
    loaded = load_tokenizer(llama3_tokenizer_dir())
    assert (loaded.pad_token, loaded.pad_token_id) == ("<|finetune_right_pad_id|>", FINETUNE_PAD_ID)
    assert loaded.pad_token_id not in end_token_ids(loaded)
    assert loaded.padding_side == "left"
    assert (loaded.bos_token_id, loaded.eos_token_id, len(loaded)) == (BOS_ID, EOT_ID, VOCAB_SIZE)
    assert tok.pad_token is None  # 共享的夹具没有被改动
    # 左填充的批：填充位是 128004，真实 id 与单独编码相同
    short, long = tok.encode("short", add_special_tokens=False), tok.encode("a longer prompt", add_special_tokens=False)
    batch = loaded(["short", "a longer prompt"], add_special_tokens=False, padding=True)["input_ids"]
    gap = len(long) - len(short)
    assert gap > 0 and batch == [[FINETUNE_PAD_ID] * gap + short, long]
