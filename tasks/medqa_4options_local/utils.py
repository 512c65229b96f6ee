"""medqa_4options_local 的数据与提示函数。

doc_to_text / doc_to_target 逐字复制自 lm-eval 0.4.13 的 lm_eval/tasks/medqa/preprocess_medqa.py（MIT 许可），
只加了类型注解与这段说明；提示因此与 lm-eval 的 medqa_4options 完全相同：
    "Question: {sent1}\\nA. {ending0}\\nB. {ending1}\\nC. {ending2}\\nD. {ending3}\\nAnswer:"，候选续写 " A" … " D"。
"""
from __future__ import annotations

import os
from typing import Any

# 捆绑数据：仓库根目录下的 data/medqa（本文件在 tasks/medqa_4options_local/ 里）
DATA_DIR: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "data", "medqa")
SPLIT_FILES: dict[str, str] = {"test": "test.jsonl", "validation": "dev.jsonl"}
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")


def load_bundled(**kwargs: Any) -> Any:
    """custom_dataset：读捆绑的 JSONL，返回 DatasetDict{test, validation}。

    lm-eval 会把任务与 TaskManager 的 metadata 作为关键字参数传进来，这里不需要它们。datasets 的 "json" 读取器
    只接受绝对路径或相对当前目录的路径，所以路径由本文件的位置算出，而不是写在 YAML 里。
    """
    import datasets

    files = {split: os.path.abspath(os.path.join(DATA_DIR, name)) for split, name in SPLIT_FILES.items()}
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"bundled MedQA file not found: {missing[0]} (run from a full checkout of the repo)")
    return datasets.load_dataset("json", data_files=files)


def to_hf_schema(dataset: Any) -> Any:
    """捆绑文件的字段 → lm-eval 原任务读的 GBaker/MedQA-USMLE-4-options-hf 的字段：
    sent1 = question（原样，不去空白）、ending0..3 = options A..D、label = answer_idx 的下标。"""

    def convert(doc: dict[str, Any]) -> dict[str, Any]:
        return {"sent1": doc["question"], **{f"ending{i}": doc["options"][k] for i, k in enumerate(LETTERS)},
                "label": LETTERS.index(doc["answer_idx"])}

    return dataset.map(convert)


def doc_to_text(doc: dict[str, Any]) -> str:
    option_choices = {
        "A": doc["ending0"],
        "B": doc["ending1"],
        "C": doc["ending2"],
        "D": doc["ending3"],
    }
    answers = "".join((f"{k}. {v}\n") for k, v in option_choices.items())
    return f"Question: {doc['sent1']}\n{answers}Answer:"


def doc_to_target(doc: dict[str, Any]) -> int:
    return doc["label"]
