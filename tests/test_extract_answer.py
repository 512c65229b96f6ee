"""extract_answer 的测试：语料（tests/extraction_cases.py）逐条参数化，另加针对各条规则的聚焦测试。"""
from __future__ import annotations

import os
import sys
from typing import Mapping

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest

from scoring import extract_answer
from extraction_cases import CASES

DM: dict[str, str] = {"A": "Metformin", "B": "Insulin glargine", "C": "Glipizide", "D": "Sitagliptin"}


def _id(i: int) -> str:
    """参数化用例的编号：只用序号，文本太长不适合作 id。"""
    return f"case{i:03d}"


@pytest.mark.parametrize(("text", "options", "expected"), CASES, ids=[_id(i) for i in range(len(CASES))])
def test_corpus(text: str, options: Mapping[str, str] | None, expected: str | None) -> None:
    assert extract_answer(text, options) == expected


@pytest.mark.parametrize(("text", "options", "expected"), CASES, ids=[_id(i) for i in range(len(CASES))])
def test_corpus_invariant_to_chat_residue(text: str, options: Mapping[str, str] | None, expected: str | None) -> None:
    """Llama-3 聊天模板残留（助手角色头、结束 token 及其后的下一轮）与结尾空白不改变结果。"""
    wrapped = ("<|start_header_id|>assistant<|end_header_id|>\n\n" + text + "  \n\n<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nThe answer is A.")
    assert extract_answer(wrapped, options) == expected


def test_corpus_size() -> None:
    """语料不能悄悄缩水：≥ 100 条，其中 ≥ 25 条应返回 None、≥ 10 条带 options（选项文本映射）。"""
    assert len(CASES) >= 100
    assert sum(expected is None for _, _, expected in CASES) >= 25
    assert sum(options is not None for _, options, _ in CASES) >= 10
    assert len({(text, str(options)) for text, options, _ in CASES}) == len(CASES)  # 没有重复用例
    assert {expected for _, _, expected in CASES} == {"A", "B", "C", "D", None}


def test_options_is_optional() -> None:
    """一个参数的旧调用方式仍然可用；options 可按位置或关键字传入。"""
    assert extract_answer("The answer is C.") == "C"
    assert extract_answer("The answer is Glipizide.", DM) == "C"
    assert extract_answer("The answer is Glipizide.", options=DM) == "C"
    assert extract_answer("The answer is Glipizide.") is None


def test_last_conclusion_wins() -> None:
    text = "I initially thought the answer is A. On reflection the murmur fits aortic stenosis.\nFinal answer: C"
    assert extract_answer(text) == "C"
    # 字母与选项文本两种结论混用时同样按位置取最后一个。
    assert extract_answer("The answer is A.\nActually, the answer is Sitagliptin.", DM) == "D"
    assert extract_answer("The answer is Sitagliptin.\nActually, the answer is A.", DM) == "A"


def test_answer_first_then_explanation_mentions_other_letters() -> None:
    text = ("The answer is B. A is wrong because it is teratogenic. C would worsen the hypokalemia, "
            "and D is reserved for refractory cases.")
    assert extract_answer(text) == "B"


@pytest.mark.parametrize("text", [
    "The answer is A or B.", "The answer is either B or C.", "Answer: A, B, C, or D", "Answer: (A/B/C/D)",
    "The answer is [letter]", "The answer is X.", "The answer is (A) or (B).", "The answer: B and D",
])
def test_hedges_and_templates_give_none(text: str) -> None:
    assert extract_answer(text) is None


def test_conditional_or_contrasting_mentions_do_not_override() -> None:
    """答案之后解释其它选项时的条件句 / 转折句不是新的结论。"""
    assert extract_answer("The answer is B.\nThe best choice would be (A) if she were pregnant.") == "B"
    assert extract_answer("The answer is B.\nOption A is the most likely cause of goiter, but not here.") == "B"
    assert extract_answer("The answer is B.\nThe most likely diagnosis is (D) Panic disorder.") == "D"


def test_hedge_does_not_override_an_earlier_conclusion() -> None:
    """对冲不是候选：跳过它，更早的明确结论仍然有效。"""
    assert extract_answer("The answer is C.\nSome would argue it is either B or C.") == "C"


@pytest.mark.parametrize("text", [
    "vitamin A", "hepatitis B", "type A", "group B strep", "Class I", "phase 2", "stage C", "HbA1c",
    "C-peptide", "B cells", "A-a gradient", "C. difficile", "E. coli",
])
def test_medical_pseudo_letters_are_not_answers(text: str) -> None:
    """伪字母无论出现在结论标记之后、反向陈述里还是最后一行，都不是答案。"""
    for wrapped in (f"The answer is {text}.", f"The most likely diagnosis is {text}.", f"Answer: {text}",
                    f"Findings suggest {text}.\n{text}", f"So {text} is the correct answer."):
        assert extract_answer(wrapped) is None, wrapped


def test_option_text_needs_exactly_one_match() -> None:
    opts = {"A": "Insulin", "B": "Insulin plus metformin", "C": "Lifestyle modification", "D": "Lifestyle modification."}
    assert extract_answer("The answer is insulin.", opts) == "A"
    assert extract_answer("The answer is Insulin plus metformin, given the HbA1c.", opts) == "B"
    assert extract_answer("The answer is lifestyle modification.", opts) is None  # C 与 D 规范化后相同
    assert extract_answer("The answer is dapagliflozin.", DM) is None


def test_option_text_normalisation() -> None:
    """大小写、多余空白、标点、开头冠词都不影响选项文本的匹配。"""
    for text in ("The answer is METFORMIN.", "The answer is  metformin !", "Answer: the Metformin",
                 "The answer is 'Metformin'.", "**Answer:** *metformin*"):
        assert extract_answer(text, DM) == "A", text


def test_letter_beats_text_at_the_same_conclusion() -> None:
    """同一处结论既有字母又有文本时以字母为准（即使文本对应另一个选项）。"""
    assert extract_answer("The answer is B) Metformin", DM) == "B"


def test_echoed_option_list() -> None:
    echo = "A. Aspirin\nB. Heparin\nC. Warfarin\nD. Clopidogrel"
    assert extract_answer(echo) is None
    assert extract_answer(echo + "\n\nThe answer is C.") == "C"
    assert extract_answer("Answer:\n" + echo) is None
    # 只有两行不算回显列表：最后一行 "B. Heparin" 仍按字母 + 选项文本读取。
    assert extract_answer("A. Aspirin\nB. Heparin") == "B"


def test_truncated_conclusion() -> None:
    """以没说完的结论收尾 → None；只有复读（≥ 2 个相同的显式结论）例外。"""
    assert extract_answer("This is aortic dissection, so the most likely answer is") is None
    assert extract_answer("The answer is B.\nWait, the troponin is normal, so the correct answer is") is None
    assert extract_answer("The answer is B. The answer is B. The answer is") == "B"
    assert extract_answer("The answer is B. The answer is C. The answer is") is None


def test_invalid_final_letter_gives_none() -> None:
    """最后一个显式结论是 A–D 以外的字母时返回 None，不回退到更早的结论。"""
    assert extract_answer("Answer: (B)\nOn reflection the answer is E.") is None


def test_special_tokens() -> None:
    assert extract_answer("The answer is D.<|eot_id|>") == "D"
    assert extract_answer("The answer is D.<|eot_id|>The answer is A.") == "D"
    assert extract_answer("<|begin_of_text|>The answer is<|eom_id|> C") is None
    assert extract_answer("<|eot_id|>The answer is A.") is None


def test_long_whitespace_runs() -> None:
    """长空白串（退化输出）上结果正确且不会因正则回溯卡住：旧写法在这种输入上是立方级回溯。"""
    assert extract_answer("The answer is:" + " " * 3000 + "B") == "B"
    assert extract_answer("The answer is:" + "\n" * 3000 + "Metformin", DM) == "A"
    assert extract_answer("The answer is:" + " " * 3000) is None
