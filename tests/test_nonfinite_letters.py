"""目标模型 logits 非有限时的“四个字母上取 argmax”（issue 15）：--scoring letter 与答案抽取的第二阶段都用
steering_utils.nonfinite_rows（与解码循环的 stop_nonfinite_target 同一定义）检测该行；该题没有预测（计为错），
记录的 nonfinite_target_stops = 1（与 CoT 循环同一个字段，arm_metrics 同样求和）——而不是对 NaN 取 argmax 悄悄选出一个字母。

故障注入：目标模型上的前向钩子（同 tests/test_nonfinite_target.py 的写法），只对某一行的最后位置写 NaN。
全部是 2 层的微型随机 Llama（fp32、CPU）。
"""
from __future__ import annotations

import json
from typing import Any

import pytest
from transformers import LlamaForCausalLM

from config import ROLES
from data_loader import Question
from evaluator import run_arm, score_letters_shard
from scoring import ArmSpec, ForcedAnswer, RecordRules, letter_records, merge_letter_scores, verify_record
from stats import arm_metrics
from steering_utils import SteeringParams
from shared_runs import tiny_llama

VOCAB = 96
MARK = 77  # 只出现在第 1 行提示里的 token：钩子据此只毒化这一行
CUE = 4
PROMPTS = [[5, 17, 23, 9, 41, 7, 3], [11, MARK, 60], [33, 34, 35, 36, 37]]
LETTER_IDS = [60, 61, 62, 63]
STEER = SteeringParams(base_alpha=1.0, adaptive_scale=10.0, max_boost=1.0, metric="js")
OPTIONS = {"A": "a", "B": "b", "C": "c", "D": "d"}
QUESTIONS = [Question(index=10 + j, question="q?", options=OPTIONS, answer_idx="A", answer="a") for j in range(3)]


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    return tiny_llama(VOCAB, seed, head_scale=1.0, max_positions=256)  # lm_head 不放大（原样的随机初始化）


pytestmark = pytest.mark.usefixtures("one_thread")  # 原因见 tests/conftest.py


@pytest.fixture(scope="module")
def trio() -> dict[str, LlamaForCausalLM]:
    return {role: _tiny_llama(seed) for seed, role in enumerate(ROLES)}


def _poison(model: LlamaForCausalLM, last: int | None) -> Any:
    """前向钩子：输入行含 MARK、且（last 给出时）该行最后一个输入 token 是 last 的行，最后位置的整行 logits 写成 NaN。"""
    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        ids = kwargs["input_ids"]
        hit = (ids == MARK).any(-1) & ((ids[:, -1] == last) if last is not None else True)  # (B,)
        if hit.any():
            logits = output.logits.clone()
            logits[hit, -1] = float("nan")
            output.logits = logits
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


ARMS = [ArmSpec("baseline", ("target",)), ArmSpec("steered", ROLES, STEER), ArmSpec("expert_alone", ("expert",))]


def _letter_records(trio: dict[str, LlamaForCausalLM]) -> list[dict[str, Any]]:
    """--scoring letter 的路径：score_letters_shard（按 batch_plan 分批）→ merge_letter_scores → letter_records。"""
    prompts = {r: [list(p) for p in PROMPTS] for r in ROLES}
    parts = score_letters_shard(trio, prompts, LETTER_IDS, vocab_size=VOCAB, batch_size=2, metric="js")
    scores = merge_letter_scores(parts, len(PROMPTS), list(ROLES), 4)
    return letter_records(ARMS, scores, QUESTIONS)


def test_letter_scoring_nan_target_row_has_no_prediction(trio: dict[str, LlamaForCausalLM]) -> None:
    """目标在第 1 题答案位置的 logits 为 NaN：基线与融合臂的第 1 题 pred 为 None（计为错）、nonfinite_target_stops = 1、
    融合臂的 α 为空（没有 NaN 写进 JSON）；其余题与干净运行逐字相同；不看目标的单模型臂（expert_alone）不受影响。"""
    clean = _letter_records(trio)
    assert all(r["nonfinite_target_stops"] == 0 for r in clean)
    handle = _poison(trio["target"], None)
    try:
        hit = _letter_records(trio)
    finally:
        handle.remove()
    by = {(r["mode"], r["index"]): r for r in hit}
    for mode in ("baseline", "steered"):
        rec = by[(mode, 11)]
        assert rec["pred"] is None and rec["correct"] is False and rec["nonfinite_target_stops"] == 1
        assert rec["output"] == ""
        assert arm_metrics(mode, [r for r in hit if r["mode"] == mode])["nonfinite_target_stops"] == 1
    assert by[("steered", 11)]["alpha"] == [] and by[("steered", 11)]["alpha_mean"] is None
    json.dumps(hit, allow_nan=False)  # 记录里没有 NaN
    same = [(c, h) for c, h in zip(clean, hit) if not (h["index"] == 11 and h["mode"] != "expert_alone")]
    assert all(c == h for c, h in same) and len(same) == len(clean) - 2


@pytest.mark.parametrize("arm", ["baseline", "steered"])
@pytest.mark.parametrize("fast", [False, True])
def test_stage2_nan_target_row_has_no_letter(trio: dict[str, LlamaForCausalLM], arm: str, fast: bool) -> None:
    """第二阶段的前向（提示 + 生成 + cue）里目标在第 1 行的 logits 为 NaN（解码时一切正常）：该行 pred_forced、pred
    为 None，nonfinite_target_stops = 1，记录通过 verify_record；其他行的字母与干净运行相同；arm_metrics 计 1。"""
    class Tok:
        pad_token_id = 0

        def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
            return " ".join(map(str, tokens))  # 只有数字：第一阶段读不出答案，每行都走第二阶段

    forced = ForcedAnswer(cue_ids=(CUE,), letter_ids=tuple(LETTER_IDS))
    roles = ("target",) if arm == "baseline" else ROLES
    steering = STEER if arm == "steered" else None

    def go() -> dict[int, dict[str, Any]]:
        result = run_arm(arm, QUESTIONS, {r: [list(p) for p in PROMPTS] for r in ROLES}, trio, Tok(), vocab_size=VOCAB,
                         batch_size=4, max_new_tokens=5, end_ids=[], steering=steering, fast=fast, progress=False,
                         roles=roles, forced=forced)
        return {r["index"]: r for r in result.records}

    clean = go()
    assert all(r["pred_forced"] is not None and r["nonfinite_target_stops"] == 0 for r in clean.values())
    handle = _poison(trio["target"], CUE)  # 只有第二阶段的输入以 cue 结尾：解码不受影响
    try:
        hit = go()
    finally:
        handle.remove()
    rec = hit[11]
    assert rec["output"] == clean[11]["output"]  # 解码时一切正常
    assert rec["pred_forced"] is None and rec["pred"] is None and rec["correct"] is False
    assert rec["nonfinite_target_stops"] == 1
    assert hit[10] == clean[10] and hit[12] == clean[12]
    assert arm_metrics(arm, list(hit.values()))["nonfinite_target_stops"] == 1
    rules = RecordRules(modes=(arm,), fused=frozenset({"steered"}), questions={q.index: q for q in QUESTIONS},
                        forced=True, max_new_tokens=5)
    assert all(verify_record(r, rules) is None for r in hit.values())
