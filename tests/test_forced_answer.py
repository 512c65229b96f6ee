"""答案抽取第二阶段（issue 13 第 2 条）：第一阶段读不出答案时，接上 FORCED_ANSWER_CUE，由该臂自己的模型在
"(" 之后的四个字母 token 上取 argmax。

- 字母 token 的检查（scoring.forced_answer_ids）：SmolLM2 与 Llama-3 的分词器上每个字母是 cue 之后的单个 token；
  把 "(A" 合成一个 token 的分词器、各角色 id 不一致的分词器被拒绝，且 main 在加载任何权重之前就退出（码 2）；
- run_arm 的第二阶段字母 == 独立的慢速计算（每行每模型对 提示 + 生成（去掉结束记号）+ cue 整段前向，
  用 steering_utils 融合，在字母 id 上取 argmax），覆盖基线、adaptive、adaptive_inverse + β、采样臂、单模型臂；
- 第一阶段读出答案的行没有 pred_forced；forced=None（--no-forced-answer）时 pred_forced 全为 null；
- 续跑读取记录时的检查（scoring.verify_record）接受新字段、拒绝旧格式与不一致的记录。

全部是 CPU 上的微型随机 Llama（词表 96），与 tests/test_evaluator.py 同样的构造。
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

import main
import scoring
from config import FORCED_ANSWER_CUE, LETTERS
from evaluator import run_arm
from run_folder import read_records
from sampling import Sampling
from scoring import ForcedAnswer, RecordRules, forced_answer_ids, verify_record
from steering_utils import SteeringParams, compute_steered_logits, schedule_alpha
from test_evaluator import tiny_llama

VOCAB = 96
PAD = 0
PROMPTS = [[5, 17, 23, 9, 41, 7, 3], [11, 2, 60], [33, 34, 35, 36, 37], [70, 71, 9]]
FORCED = ForcedAnswer(cue_ids=(12, 13, 14), letter_ids=(40, 41, 42, 43))
ROLES = ("target", "expert", "base")
STEPS = 6




@pytest.fixture(scope="module")
def trio() -> dict[str, LlamaForCausalLM]:
    return {role: tiny_llama(seed) for seed, role in enumerate(ROLES)}


class IdTokenizer:
    """run_arm 只需要 pad_token_id 与 decode；decode 把 id 原样写成文字，测试从 output 读回生成的 id（含结束记号）。"""

    pad_token_id = PAD

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, tokens))


def questions() -> list[Any]:
    """index 为奇数的题，第一阶段“读出”C（见 stage1）；其余读不出，需要第二阶段。"""
    return [SimpleNamespace(index=j, answer_idx="ABCD"[j % 4],
                            options={"A": "answered" if j % 2 else "open", "B": "b", "C": "c", "D": "d"})
            for j in range(len(PROMPTS))]


def stage1(text: str, options: Any = None) -> str | None:
    """替身的第一阶段：只看选项（随机模型的文字里不会有答案），使“有/无第一阶段答案”的行是确定的。"""
    return "C" if options and options.get("A") == "answered" else None


@torch.no_grad()
def slow_letter(models: dict[str, LlamaForCausalLM], roles: tuple[str, ...], steering: SteeringParams | None,
                prompt: list[int], generated: list[int], ends: set[int]) -> str:
    """独立的慢速计算：每个模型对 [提示 + 生成（去掉末尾结束记号）+ cue] 整段前向（单行、无填充、无缓存），
    取最后位置的 logits；融合臂用 steering_utils 的 schedule_alpha + compute_steered_logits，β > 0 时在四个字母里按
    目标的 softmax 概率排除 p < β·max p 的字母；在字母 id 上取 argmax。"""
    body = generated[:-1] if generated and generated[-1] in ends else generated
    ids = torch.tensor([prompt + body + list(FORCED.cue_ids)])
    z = {r: models[r](ids).logits[:, -1, :VOCAB].float() for r in roles}
    letters = list(FORCED.letter_ids)
    if steering is None:
        scores = z[roles[0]][0, letters]
    else:
        alpha = schedule_alpha(z["target"], z["expert"], steering)
        scores = compute_steered_logits(z["target"], z["expert"], z["base"], alpha)[0, letters]
        if steering.plausibility_beta > 0:
            p = torch.softmax(z["target"][0, letters], -1)
            scores = torch.where(p >= steering.plausibility_beta * p.max(), scores, torch.tensor(float("-inf")))
    return LETTERS[int(scores.argmax())]


ARMS = {
    "baseline": (("target",), None, None),
    "expert_alone": (("expert",), None, None),
    "adaptive": (ROLES, SteeringParams(1.0, 1.0, 1.0, "js"), None),
    "inverse_beta": (ROLES, SteeringParams(0.5, 1.0, 1.0, "l2", schedule="adaptive_inverse",
                                           plausibility_beta=0.3), None),
    "steered/sample0": (ROLES, SteeringParams(1.0, 1.0, 1.0, "js"), Sampling(0.8, 0.95, 7, 0)),
}


def _run(trio: dict[str, LlamaForCausalLM], name: str, ends: list[int], forced: ForcedAnswer | None,
         fast: bool = False) -> Any:
    roles, steering, sampling = ARMS[name]
    role_prompts = {r: [list(p) for p in PROMPTS] for r in ROLES}
    return run_arm(name, questions(), role_prompts, trio, IdTokenizer(), vocab_size=VOCAB, batch_size=3,
                   max_new_tokens=STEPS, end_ids=ends, steering=steering, fast=fast, progress=False, roles=roles,
                   sampling=sampling, forced=forced)


@pytest.mark.parametrize("name", list(ARMS))
def test_stage2_letter_equals_slow_computation(trio, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scoring, "extract_answer", stage1)
    roles, steering, _ = ARMS[name]
    # 结束记号取第 0 行自由生成的第 3 个 token：该行在第 3 步停下（生成的 id 以结束记号收尾，第二阶段要去掉它）
    end = int(_run(trio, name, [], None).records[0]["output"].split()[2])
    result = _run(trio, name, [end], FORCED)
    assert [r["index"] for r in result.records] == list(range(len(PROMPTS)))
    rules = RecordRules(modes=(name,), fused=frozenset({name} if steering is not None else ()),
                        questions={q.index: q for q in questions()}, forced=True, max_new_tokens=STEPS)
    ended = 0
    for r, q in zip(result.records, questions()):
        generated = [int(t) for t in r["output"].split()]
        ended += generated[-1] == end
        if q.index % 2:  # 第一阶段有答案：没有第二阶段
            assert r["pred_text"] == "C" and r["pred_forced"] is None and r["pred"] == "C"
        else:
            assert r["pred_text"] is None
            assert r["pred_forced"] == slow_letter(trio, roles, steering, PROMPTS[q.index], generated, {end})
            assert r["pred"] == r["pred_forced"]
        assert r["correct"] == (r["pred"] == q.answer_idx)
        assert verify_record(r, rules) is None  # 续跑的核对接受 run_arm 写出的记录
    assert ended >= 1  # 至少一行以结束记号收尾（去掉结束记号的那条路被走到）


def test_stage2_is_the_same_on_the_fast_path(trio, monkeypatch: pytest.MonkeyPatch) -> None:
    """第二阶段与解码路径无关：快速路径（FastDecoder）的记录与参考循环逐字相同（α 统计除外）。"""
    monkeypatch.setattr(scoring, "extract_answer", stage1)
    drop = ("alpha", "alpha_mean", "alpha_min", "alpha_max")
    fast, slow = (_run(trio, "adaptive", [], FORCED, fast=f).records for f in (True, False))
    assert [{k: v for k, v in r.items() if k not in drop} for r in fast] == \
        [{k: v for k, v in r.items() if k not in drop} for r in slow]
    assert any(r["pred_forced"] is not None for r in fast)


def test_flag_off_gives_null_pred_forced(trio, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scoring, "extract_answer", stage1)
    for name in ("baseline", "adaptive"):
        for r in _run(trio, name, [], None).records:
            assert r["pred_forced"] is None and r["pred"] == r["pred_text"]
            assert r["pred_text"] == ("C" if r["index"] % 2 else None)


# ---------------------------------------------------------------------------
# 字母 token 的检查：真实分词器上通过；"(A" 合成一个 token 或各角色不一致时拒绝（在加载权重之前）
# ---------------------------------------------------------------------------


def _check_real_tokenizer(tok: Any) -> None:
    got = forced_answer_ids({"target": tok, "expert": tok, "base": tok})
    head = tok.encode(FORCED_ANSWER_CUE, add_special_tokens=False)
    assert list(got.cue_ids) == head
    for letter, lid in zip(LETTERS, got.letter_ids):
        assert tok.encode(FORCED_ANSWER_CUE + letter, add_special_tokens=False) == head + [lid]
        assert tok.decode([lid]) == letter
    assert tok.decode(list(got.cue_ids)) == FORCED_ANSWER_CUE


def test_letter_ids_on_smollm2(smol_tokenizer: Any) -> None:
    _check_real_tokenizer(smol_tokenizer)


def test_letter_ids_on_llama3() -> None:
    from llama3 import llama3_tokenizer, missing_dependency, reference_tokenizer

    if missing_dependency():
        pytest.skip(missing_dependency())
    tok = llama3_tokenizer()
    _check_real_tokenizer(tok)
    # 与 llama-models 自己的编码器一致（它不是 Hugging Face 的实现）
    ref = reference_tokenizer()
    got = forced_answer_ids({"target": tok})
    assert list(got.cue_ids) == ref.encode(FORCED_ANSWER_CUE, bos=False, eos=False)
    for letter, lid in zip(LETTERS, got.letter_ids):
        assert ref.encode(FORCED_ANSWER_CUE + letter, bos=False, eos=False)[-1] == lid


class CharTokenizer:
    """逐字符的分词器（id = 码点）；merged 里的字符串（例如 "(A"）整体是一个 token（id ≥ 1000）。"""

    pad_token_id = 0

    def __init__(self, merged: tuple[str, ...] = (), shift: int = 0) -> None:
        self.merged, self.shift = merged, shift

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out, i = [], 0
        while i < len(text):
            hit = next((m for m in self.merged if text.startswith(m, i)), None)
            if hit:
                out.append(1000 + self.merged.index(hit))
                i += len(hit)
            else:
                out.append(ord(text[i]) + self.shift)
                i += 1
        return out


def test_check_refuses_merged_or_disagreeing_tokenizers() -> None:
    ok = forced_answer_ids({"target": CharTokenizer()})
    assert list(ok.letter_ids) == [ord(c) for c in LETTERS]
    with pytest.raises(ValueError, match="single token"):
        forced_answer_ids({"target": CharTokenizer(), "expert": CharTokenizer(("(C",))})
    with pytest.raises(ValueError, match="disagree"):
        forced_answer_ids({"target": CharTokenizer(), "base": CharTokenizer(shift=1)})


def test_main_refuses_before_any_weights_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """"(" 之后的字母不是单个 token：main 退出码 2、消息指向 --no-forced-answer，load_models 从未被调用；
    --no-forced-answer 时不做这个检查（走到加载权重）。"""
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "q?", "answer": "a", "answer_idx": "A",
                                "options": {"A": "a", "B": "b", "C": "c", "D": "d"}}) + "\n", encoding="utf-8")
    loads: list[str] = []

    class Stop(Exception):
        pass

    def load_models(*args: Any, **kwargs: Any) -> Any:
        loads.append("models")
        raise Stop

    monkeypatch.setattr(main, "load_tokenizer", lambda spec: CharTokenizer(("(B",)))
    monkeypatch.setattr(main, "load_models", load_models)
    # 上下文上界与内存估计排在第二阶段检查之后、加载权重之前；这里的字符分词器渲染不了聊天模板，跳过它们（另有测试）
    monkeypatch.setattr(main, "check_bounds", lambda cfg, data, *args, **kwargs: data)
    argv = ["--demo", "--limit", "1", "--data-file", str(data)]
    assert main.main(argv + ["--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--no-forced-answer" in err and "single token" in err and "Traceback" not in err
    assert loads == []
    with pytest.raises(Stop):
        main.main(argv + ["--output-dir", str(tmp_path / "run2"), "--no-forced-answer"])
    assert loads == ["models"]


# ---------------------------------------------------------------------------
# 续跑读取记录：接受新字段，拒绝旧格式与不一致的记录
# ---------------------------------------------------------------------------


RULES = RecordRules(modes=("baseline",), fused=frozenset(), forced=True, max_new_tokens=3,
                    questions={0: SimpleNamespace(index=0, answer_idx="B", options={k: f"option {k}" for k in LETTERS})})


def _record(**changes: Any) -> dict[str, Any]:
    rec = {"mode": "baseline", "index": 0, "gold": "B", "pred": "B", "pred_text": None, "pred_forced": "B",
           "correct": True, "output": "...", "num_tokens": 3, "nonfinite_target_stops": 0, "output_ids": [13, 13, 13]}
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not ...}


@pytest.mark.parametrize("changes, problem", [
    ({}, None),
    ({"pred_text": "B", "pred_forced": None, "output": "The answer is B."}, None),
    ({"pred": "A", "correct": False, "gold": "A"}, "'gold' differs"),
    ({"pred_text": ..., "pred_forced": ...}, "missing keys"),  # 旧版本写的记录
    ({"pred": "A", "correct": False}, "'pred' differs"),
    ({"pred_text": "B"}, "'pred_text' differs"),
    ({"pred_forced": None, "pred": None, "correct": False}, "'pred_forced' is null"),
    ({"pred_forced": "E", "pred": "E", "correct": False}, "one of A, B, C, D"),
    ({"correct": False}, "'correct' differs"),
])
def test_record_validation(tmp_path: Path, changes: dict[str, Any], problem: str | None) -> None:
    """续跑读记录的唯一规则 scoring.verify_record（经 run_folder.read_records）：两阶段字段齐全且与重算一致。"""
    rec = _record(**changes)
    got = verify_record(rec, RULES)
    assert (got is None) if problem is None else (problem in got), got
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    if problem is None:
        assert read_records(str(path), ["baseline"], {0}, rules=RULES) == [rec]
    else:
        with pytest.raises(main.DataError, match=":1: "):
            read_records(str(path), ["baseline"], {0}, rules=RULES)


def test_progress_bar_says_the_first_batch_compiles(trio, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """编译的快速路径：第一批之前进度条的后缀说明正在编译（GPU 上一到三分钟进度条不动，免得以为卡住）；
    不编译时没有这句。这里只把解码器的 compile 标志设为真（CPU 上真的编译太慢），看的是 run_arm 的说明。"""
    import fast.decoder as fd

    class Flagged(fd.FastDecoder):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.compile = True

    def run(progress: bool) -> str:
        run_arm("steered", questions(), {r: [list(p) for p in PROMPTS] for r in ROLES}, trio, IdTokenizer(),
                vocab_size=VOCAB, batch_size=3, max_new_tokens=STEPS, end_ids=[], fast=True, progress=progress,
                steering=SteeringParams(1.0, 1.0, 1.0, "js"))
        return capsys.readouterr().err

    assert "compiling the decode step" not in run(True)
    monkeypatch.setattr(fd, "FastDecoder", Flagged)
    assert "first batch: compiling the decode step" in run(True)
    assert "compiling" not in run(False)  # progress=False：没有进度条，也没有这句
