"""打分：预测记录的类型（Record）、一道题的 CoT 记录（make_record）、字母打分的预测与记录、从文本抽取答案。

一道题在哪里被判对错：CoT 时 make_record（生成文本 → extract_answer → 与 gold 比较）；字母打分时 letter_records
（四个字母 token 上融合后的 logits 取 argmax，融合规则调用 steering_utils.fuse_with_alpha，与生成时同一份）。
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Collection, Final, Mapping, Sequence, TypedDict

import numpy as np
import torch

from config import FORCED_ANSWER_CUE, LETTERS, ROLES, Config
from data_loader import Question
from sampling import Sampling
from steering_utils import SteeringParams, alpha_from_distance, distance, fuse_with_alpha, nonfinite_rows

ALPHA_DECIMALS: int = 4  # 逐 token α 的保存精度：α 量级为 1，万分之一足够作图，又让每题 512 步的记录保持小巧


class RecordCore(TypedDict):
    """predictions.jsonl 每行必有的键（续跑时逐行检查：缺键说明文件不是本工具写的或已损坏）。"""

    mode: str  # 臂的名字（baseline、steered、adaptive@0.5、steered/sample0 …）
    index: int  # 题目 index
    gold: str  # 正确字母
    pred: str | None  # 预测字母；抽不出答案时为 None（计为错）
    correct: bool
    output: str  # 生成的文本（字母打分时为 " X"）
    num_tokens: int  # 生成的 token 数（含结束记号；字母打分为 0）


class Record(RecordCore, total=False):
    """predictions.jsonl 的一行。融合臂另有 α 统计与逐步 α；CoT 融合臂有 nonfinite_steps；字母打分有 letter_logits。

    CoT 记录总有两阶段的字段（字母打分的记录没有：不生成文本、也没有第二阶段，pred 就是四个字母上的 argmax）：
    pred_text 是第一阶段（extract_answer 从文本读出）的字母或 None；pred_forced 是第二阶段（接上
    FORCED_ANSWER_CUE 后该臂模型在四个字母上的 argmax）的字母，只在 pred_text 为 None 且第二阶段开启时非 None；
    pred = pred_text if pred_text is not None else pred_forced，correct 跟随 pred。
    投机解码的臂另有 drafted / accepted / verify_steps（可选键：续跑时只检查 RECORD_KEYS）。
    """

    alpha_mean: float | None
    alpha_min: float | None
    alpha_max: float | None
    alpha: list[float]  # 每个被引导的步（字母打分：答案位置）一个 α，保留 ALPHA_DECIMALS 位小数
    nonfinite_steps: int  # 融合 logits 非有限、改用目标 logits 的步数
    nonfinite_target_stops: int  # CoT（所有臂）：1 = 目标 logits 非有限，该题在那一步停止（不再生成、不走第二阶段）
    letter_logits: list[float | None]  # 四个字母上（融合后）的 logits；被可信度约束排除的为 None
    pred_text: str | None  # CoT：第一阶段（从文本）读出的字母
    pred_forced: str | None  # CoT：第二阶段（强制答案提示）的字母；不需要或关闭时为 None
    output_ids: list[int]  # CoT：生成的 token id（正是解码成 output 的那些，含结束记号）；续跑据此重算第二阶段的字母
    drafted: int  # 投机解码的臂（--speculate K）：这道题被提出的草稿 token 数
    accepted: int  # 输出里来自草稿的 token 数
    verify_steps: int  # 验证前向次数（含产出第一个 token 的 prefill）


RECORD_KEYS: frozenset[str] = frozenset(RecordCore.__required_keys__)
# CoT 记录（predictions.jsonl 里续跑读取的就是它们）另外必有的键：两阶段答案抽取的结果。
# output_ids 是生成的 token id：output 是它的解码（续跑核对两者一致），第二阶段的字母由它重算（main.check_stage2）。
COT_RECORD_KEYS: frozenset[str] = RECORD_KEYS | {"pred_text", "pred_forced", "nonfinite_target_stops", "output_ids"}


@dataclass(frozen=True)
class ArmSpec:
    """一个臂。name 写进每条记录的 "mode"；roles 是参与的模型角色（单模型臂不融合）；
    steering 为融合参数（单模型臂为 None）；sampling 为 None 时贪心；group 是采样链所属的贪心臂的名字
    （多数投票按它分组）；schedule / base_alpha 是扫参表与 α 图的坐标。"""

    name: str
    roles: tuple[str, ...]
    steering: SteeringParams | None = None
    sampling: Sampling | None = None
    group: str | None = None
    schedule: str | None = None
    base_alpha: float | None = None


def make_record(mode: str, question: Any, tokens: list[int], tokenizer: Any,
                alpha: list[float] | None, nonfinite: int | None = None, target_stops: int | None = None) -> Record:
    """predictions.jsonl 的一行：mode、index、gold、pred（字母或 None）、pred_text、pred_forced、correct、output、num_tokens；
    引导模式另有 alpha（该题被引导的每一步的 α，保留 ALPHA_DECIMALS 位小数：α 直方图与轨迹图的原料）、
    alpha_mean / alpha_min / alpha_max（由未取整的 α 算出）与 nonfinite_steps（融合 logits 非有限、改用目标 logits 的步数）；
    target_stops 给出时（解码循环总给出）另有 nonfinite_target_stops：1 = 目标 logits 非有限、该题在那一步干净地停止。

    output 用 decode_output（skip_special_tokens=True）解码，output_ids 是被解码的 id 本身；num_tokens 含结束记号（若生成了）。
    这里只做第一阶段（pred_text = extract_answer，pred_forced = None）；第二阶段由调用者（evaluator.run_arm）
    对 pred_text 为 None 的行算出字母后经 with_forced 填入。
    记录里没有任何计时或会话信息：续跑与不中断的运行写出的记录逐字节相同。
    """
    text = decode_output(tokenizer, tokens)
    rec: Record = text_record(mode, question, text, len(tokens))
    rec["output_ids"] = [int(t) for t in tokens]
    if alpha is not None:
        rec.update(alpha_mean=sum(alpha) / len(alpha) if alpha else None,
                   alpha_min=min(alpha) if alpha else None, alpha_max=max(alpha) if alpha else None,
                   alpha=[round(a, ALPHA_DECIMALS) for a in alpha])
    if nonfinite is not None:
        rec["nonfinite_steps"] = int(nonfinite)
    if target_stops is not None:
        rec["nonfinite_target_stops"] = int(target_stops)
    return rec


def decode_output(tokenizer: Any, tokens: Sequence[int]) -> str:
    """记录里的 output：生成的 id 用 skip_special_tokens=True 解码。make_record 写记录与 verify_record 核对记录
    （RecordRules.decode）共用这一个调用，所以同一组 id 总得到同一段文本。"""
    return tokenizer.decode(list(tokens), skip_special_tokens=True)


def text_record(mode: str, question: Any, text: str, num_tokens: int) -> Record:
    """一道题 CoT 记录的第一阶段部分（make_record 调用它；续跑核对记录时 verify_record 用同一个函数重算）：
    gold 取自题目，pred_text = pred = extract_answer(文本, 选项)，pred_forced = None，correct = (pred == gold)。"""
    pred = extract_answer(text, question.options)
    return {"mode": mode, "index": question.index, "gold": question.answer_idx, "pred": pred,
            "pred_text": pred, "pred_forced": None,
            "correct": pred == question.answer_idx, "output": text, "num_tokens": num_tokens}


@dataclass(frozen=True)
class RecordRules:
    """续跑（以及每次算指标之前）核对 predictions.jsonl 的一条 CoT 记录所需的一切：本次的臂（modes）、其中的融合臂
    （fused：有 α 字段与 nonfinite_steps）、题目（index → Question：gold 与选项从数据重算）、第二阶段是否开启
    （forced）、--max-new-tokens（num_tokens 的上界）、投机解码的臂（speculative：有 drafted/accepted/verify_steps）。
    decode（分词器加载之后才有：main 在加载权重之前再核对一遍）：id 列表 → 文本，与 make_record 同一个解码
    （decode_output）；给出时 output 必须等于 decode(output_ids)。vocab_size（同样来自分词器）：output_ids 的上界。"""

    modes: tuple[str, ...]
    fused: frozenset[str]
    questions: Mapping[int, Question]
    forced: bool
    max_new_tokens: int
    speculative: frozenset[str] = frozenset()
    decode: Callable[[list[int]], str] | None = None
    vocab_size: int | None = None


ALPHA_KEYS: tuple[str, ...] = ("alpha", "alpha_mean", "alpha_min", "alpha_max", "nonfinite_steps")
SPEC_KEYS: tuple[str, ...] = ("drafted", "accepted", "verify_steps")


def _count(value: Any, low: int, high: int | None) -> bool:
    """value 是 [low, high] 内的整数（不是 bool；high 为 None 时无上界）。"""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


def _real(value: Any) -> bool:
    """value 是有限实数（int 或 float，不是 bool）。"""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _alpha_problem(rec: dict[str, Any]) -> str | None:
    """融合臂的 α 字段：alpha 为有限实数的列表、不多于 num_tokens；nonfinite_steps 在 [0, num_tokens]；
    alpha_mean/min/max 在 alpha 为空时为 null，否则与保存的（取整到 ALPHA_DECIMALS 位的）alpha 重算的值相差不超过取整误差。"""
    alpha, n = rec["alpha"], rec["num_tokens"]
    if not isinstance(alpha, list) or not all(_real(a) for a in alpha) or len(alpha) > n:
        return f"'alpha' must be a list of at most num_tokens ({n}) finite numbers"
    if not _count(rec["nonfinite_steps"], 0, n):
        return f"'nonfinite_steps' must be an integer from 0 to num_tokens ({n}), got {rec['nonfinite_steps']!r}"
    tolerance = 0.5 * 10 ** -ALPHA_DECIMALS + 1e-9
    for key, recompute in (("alpha_mean", lambda a: sum(a) / len(a)), ("alpha_min", min), ("alpha_max", max)):
        stored = rec[key]
        if not alpha:
            if stored is not None:
                return f"'{key}' differs from the saved alpha list (stored {stored!r}, recomputed None: the list is empty)"
            continue
        again = recompute(alpha)
        if not _real(stored) or abs(stored - again) > tolerance:
            return f"'{key}' differs from the saved alpha list (stored {stored!r}, recomputed {round(again, ALPHA_DECIMALS)!r})"
    return None


def _spec_problem(rec: dict[str, Any]) -> str | None:
    """投机解码的计数：非负整数，accepted ≤ drafted，verify_steps ≤ num_tokens ≤ accepted + verify_steps
    （speculative.SpecResult 的不变量）。"""
    drafted, accepted, steps, n = (rec[k] for k in (*SPEC_KEYS, "num_tokens"))
    if not all(_count(v, 0, None) for v in (drafted, accepted, steps)):
        return "'drafted', 'accepted' and 'verify_steps' must be integers >= 0"
    if not accepted <= drafted or not steps <= n <= accepted + steps:
        return (f"the speculation counts break accepted <= drafted and verify_steps <= num_tokens <= accepted + "
                f"verify_steps (drafted {drafted}, accepted {accepted}, verify_steps {steps}, num_tokens {n})")
    return None


def _ids_problem(rec: dict[str, Any], rules: RecordRules) -> str | None:
    """output_ids：num_tokens 个整数、都在词表内（rules.vocab_size 已知时）；rules.decode 给出时 output 必须就是它们的
    解码——文本与 id 因此不能分开改，第二阶段的字母（由 id 重算）与第一阶段的字母（由文本重算）看的是同一段输出。"""
    ids, n = rec["output_ids"], rec["num_tokens"]
    high = rules.vocab_size - 1 if rules.vocab_size is not None else None
    if not isinstance(ids, list) or len(ids) != n or not all(_count(t, 0, high) for t in ids):
        bound = f" from 0 to {high}" if high is not None else " >= 0"
        return f"'output_ids' must be a list of num_tokens ({n}) integers{bound}, got {json.dumps(ids)[:80]}"
    if rules.decode is not None:
        again = rules.decode(ids)
        if rec["output"] != again:
            return (f"'output' differs from the decoded 'output_ids' (stored {json.dumps(rec['output'])[:80]}, "
                    f"recomputed {json.dumps(again)[:80]})")
    return None


def verify_record(rec: Any, rules: RecordRules) -> str | None:
    """核对 predictions.jsonl 的一条 CoT 记录：先查每个字段的类型与范围，再从数据与保存的文本重算能重算的一切——
    gold（题目的 answer_idx）、pred_text（text_record，即写记录时的同一条代码路径）、output 与 output_ids 一致
    （rules.decode 给出时）、第二阶段该不该有字母（pred_forced 的字母本身需要模型前向：这里只核对它的有无与取值，
    字母由 main.check_stage2 在加载模型之后重算）、pred 与 correct，以及 α 统计。
    没有问题返回 None；否则返回一句英文，形如 "'pred' differs from … (stored X, recomputed Y)"。"""
    if not isinstance(rec, dict):
        return f"a record must be a JSON object, got {type(rec).__name__}"
    missing = sorted(COT_RECORD_KEYS - set(rec))
    if missing:
        return f"missing keys {', '.join(missing)} (a file written by an older version of this tool?)"
    mode, index = rec["mode"], rec["index"]
    if not isinstance(mode, str) or mode not in rules.modes:
        return f"not a record of this run: 'mode' must be an arm of this run ({', '.join(rules.modes)}), got {mode!r:.80}"
    if not _count(index, 0, None) or index not in rules.questions:
        return f"not a record of this run: 'index' must be the index of a question of this run, got {index!r:.80}"
    optional = (ALPHA_KEYS if mode in rules.fused else ()) + (SPEC_KEYS if mode in rules.speculative else ())
    unknown = sorted(set(rec) - COT_RECORD_KEYS - set(optional))
    if unknown:
        return f"holds keys a record of the {mode} arm of this run never has: {', '.join(unknown)}"
    absent = [k for k in optional if k not in rec]
    if absent:
        return f"missing keys {', '.join(absent)} (every record of the {mode} arm has them)"
    if not isinstance(rec["output"], str):
        return f"'output' must be a string, got {type(rec['output']).__name__}"
    if not _count(rec["num_tokens"], 0, rules.max_new_tokens):
        return f"'num_tokens' must be an integer from 0 to --max-new-tokens ({rules.max_new_tokens}), got {rec['num_tokens']!r:.80}"
    problem = _ids_problem(rec, rules)
    if problem is not None:
        return problem
    for key in ("gold", "pred", "pred_text", "pred_forced"):
        if rec[key] is not None and rec[key] not in LETTERS:
            return f"'{key}' must be null or one of {', '.join(LETTERS)}, got {rec[key]!r:.80}"
    if not isinstance(rec["correct"], bool):
        return f"'correct' must be true or false, got {rec['correct']!r:.80}"
    stopped = rec["nonfinite_target_stops"]
    if not _count(stopped, 0, 1):
        return f"'nonfinite_target_stops' must be 0 or 1, got {stopped!r:.80}"
    again = dict(text_record(mode, rules.questions[index], rec["output"], rec["num_tokens"]))
    sources = {"gold": "the data's answer_idx", "pred_text": "the answer read from 'output'",
               "pred_forced": "stage 2's rule", "pred": "pred_text, or pred_forced when pred_text is null",
               "correct": "(pred == gold)"}
    for key, source in sources.items():
        if key == "pred_forced" and rules.forced and again["pred_text"] is None and not stopped:
            # 第二阶段开启、文本里读不出答案、该题没有因目标 logits 非有限而停止（停止的题不走第二阶段）：必须有第二阶段的字母。
            # 字母本身这里取保存的值（重算要模型前向：main.check_stage2 在加载模型之后由 output_ids 重算），pred 与 correct 再按规则重算。
            if rec["pred_forced"] is None:
                return ("'pred_forced' is null, but stage 2 is on and no answer can be read from 'output' "
                        "(stored null, recomputed: a letter from stage 2)")
            again = dict(with_forced(again, rec["pred_forced"]))
        if rec[key] != again[key]:
            return f"'{key}' differs from {source} (stored {json.dumps(rec[key])}, recomputed {json.dumps(again[key])})"
    if mode in rules.fused:
        problem = _alpha_problem(rec)
        if problem is not None:
            return problem
    return _spec_problem(rec) if mode in rules.speculative else None


def with_forced(rec: Record, letter: str) -> Record:
    """第二阶段的结果写进一条第一阶段没读出答案的记录（返回新字典，不修改 rec）：pred_forced = pred = letter，
    correct 随之更新。只对 pred_text 为 None 的记录调用。"""
    if rec["pred_text"] is not None:
        raise ValueError(f"record {rec['mode']}/{rec['index']} already has an answer from the text; "
                         "stage 2 only applies when stage 1 found none")
    return {**rec, "pred": letter, "pred_forced": letter, "correct": letter == rec["gold"]}


# ---------------------------------------------------------------------------
# 答案抽取，第二阶段：接上固定提示，由该臂自己的模型在四个字母 token 上取 argmax
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ForcedAnswer:
    """第二阶段的 token：cue_ids 是 FORCED_ANSWER_CUE 的 id（不加 BOS），letter_ids 是紧跟在 "(" 之后的
    "A".."D" 各自的单个 token id（与 LETTERS 同序）。由 forced_answer_ids 在加载任何模型之前算出并校验。"""

    cue_ids: tuple[int, ...]
    letter_ids: tuple[int, ...]


def forced_answer_ids(tokenizers: dict[str, Any], cue: str = FORCED_ANSWER_CUE) -> ForcedAnswer:
    """每个角色的分词器上：cue 的 id，以及 cue + 字母 的编码恰好是 cue 的 id 再加一个 token（即 "(" 之后的字母是
    单个 token，且不与 "(" 合并）；各角色给出的 cue id 与字母 id 必须完全相同（CoT 时三个模型都读目标分词器的 id）。
    否则“在四个字母 token 上取 argmax”就不是在比较四个答案，必须在任何前向之前报错（ValueError，英文消息）。"""
    found: dict[str, ForcedAnswer] = {}
    for role, tok in tokenizers.items():
        cue_ids = list(tok.encode(cue, add_special_tokens=False))
        letters = []
        for letter in LETTERS:
            both = list(tok.encode(cue + letter, add_special_tokens=False))
            if both[:len(cue_ids)] != cue_ids or len(both) != len(cue_ids) + 1:
                raise ValueError(f"the {role} tokenizer does not encode the answer cue {cue!r} followed by "
                                 f"{letter!r} as the cue's tokens plus one letter token ({both[len(cue_ids) - 1:]} "
                                 f"after the cue's first {len(cue_ids) - 1} tokens); stage 2 needs each letter after "
                                 "'(' to be a single token")
            letters.append(both[-1])
        if len(set(letters)) != len(LETTERS):
            raise ValueError(f"the {role} tokenizer gives the letters after '(' the ids {letters}, which are not distinct")
        found[role] = ForcedAnswer(tuple(cue_ids), tuple(letters))
    if len(set(found.values())) != 1:
        raise ValueError(f"the roles' tokenizers disagree on the answer cue / letter token ids: "
                         f"{ {r: (list(f.cue_ids), list(f.letter_ids)) for r, f in found.items()} }; "
                         "stage 2 needs one shared vocabulary")
    return next(iter(found.values()))


def forced_row_ids(prompt: Sequence[int], tokens: Sequence[int], end_ids: Collection[int],
                   forced: ForcedAnswer) -> list[int]:
    """第二阶段一行的输入：该角色的提示 id + 生成的 id（去掉末尾的结束记号：提示要接在同一个 assistant 回合里）
    + cue 的 id。生成的 id 已在第一个结束记号处截断（evaluator._trim），所以结束记号只可能在最后。"""
    body = list(tokens[:-1]) if tokens and tokens[-1] in end_ids else list(tokens)
    return list(prompt) + body + list(forced.cue_ids)


def forced_predictions(z: dict[str, torch.Tensor], roles: Sequence[str], steering: SteeringParams | None,
                       letter_ids: Sequence[int]) -> list[str | None]:
    """第二阶段的字母：z[角色] 是 cue 之后的下一词 logits (B, V)（已切到分词器词表）。单模型臂取该模型在四个字母上的
    argmax；融合臂与字母打分同一规则（letter_predictions）：α 由该位置整词表的目标–专家距离按该臂的调度算出，
    融合、可信度约束（β，相对四个字母里目标的最大概率）与非有限守卫都只在四个字母上做，再取 argmax。

    臂的第一个模型（融合臂与基线是目标；单模型臂是它自己，与解码循环的 stop_nonfinite_target 同一个角色）
    在该行的整行 logits 非有限（steering_utils.nonfinite_rows）时该行给 None：对 NaN 取 argmax 会悄悄选出一个字母。"""
    index = torch.tensor(list(letter_ids), device=next(iter(z.values())).device)
    stop = nonfinite_rows(z[roles[0]]).tolist()  # (B,)
    if steering is None:
        picked = z[roles[0]][:, index].float().argmax(-1).tolist()
    else:
        scores = LetterScores(letters={r: z[r][:, index].float().cpu() for r in ROLES},
                              distance=distance(z["target"], z["expert"], steering.metric).cpu())
        picked = letter_predictions(scores, steering)[0].tolist()
    return [None if bad else LETTERS[int(k)] for k, bad in zip(picked, stop)]


# ---------------------------------------------------------------------------
# 字母打分（--scoring letter）：不生成，答案位置上四个字母 token 的 logits 取 argmax
# ---------------------------------------------------------------------------

def letter_prompt(question: Any) -> str:
    """lm-eval medqa_4options 的提示（不经过聊天模板），逐字相同：题干原样（不去首尾空白——lm-eval 也不去，
    tests/test_lm_eval.py 在全部 1,273 道测试题上核对）、四个选项、以 "Answer:" 结尾。"""
    options = "\n".join(f"{k}. {question.options[k]}" for k in LETTERS)
    return f"Question: {question.question}\n{options}\nAnswer:"


def letter_token_ids(tokenizers: dict[str, Any]) -> list[int]:
    """" A" … " D" 的 token id（答案位置上的四个候选）。每个必须恰好是一个 token，且各角色分词器给出相同 id，
    否则“限制到四个字母上取 argmax”就不等价于比较四个续写的似然，必须在任何前向之前报错。"""
    ids: dict[str, list[int]] = {}
    for role, tok in tokenizers.items():
        row = []
        for letter in LETTERS:
            pieces = tok.encode(" " + letter, add_special_tokens=False)
            if len(pieces) != 1:
                raise ValueError(f"the {role} tokenizer splits ' {letter}' into {len(pieces)} tokens {pieces}; letter scoring needs a single token")
            row.append(pieces[0])
        ids[role] = row
    if len({tuple(v) for v in ids.values()}) != 1:
        raise ValueError(f"the letter token ids differ between roles: {ids}; letter scoring needs a shared tokenizer")
    return next(iter(ids.values()))


@dataclass
class LetterScores:
    """每题的打分原料。letters[角色]: (N, 4) float32，四个字母 token 的 logits；
    distance: (N,) float32，答案位置上目标与专家整词表分布的距离（无专家时为 None）；
    nonfinite[角色]: (N,) bool，该角色在答案位置的整行 logits 非有限（steering_utils.nonfinite_rows，与解码循环的
    stop_nonfinite_target 同一定义）；None 表示没有检查（旧的调用者），按全为 False 处理。"""

    letters: dict[str, torch.Tensor]
    distance: torch.Tensor | None
    nonfinite: dict[str, torch.Tensor] | None = None


def letter_predictions(scores: LetterScores, params: SteeringParams) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """一个融合设置下的预测字母下标 (N,)、每题的 α (N,) 与融合后的字母 logits (N, 4) float32。

    α 由答案位置上整词表的距离算出（alpha_from_distance），融合与可信度约束调用 steering_utils.fuse_with_alpha——
    与生成时同一份规则，只是 V = 四个字母：可信度约束因此是“目标概率 ≥ β × 四个字母里目标的最大概率”
    （整词表上目标的最大 token 往往不是字母）。目标最偏好的字母永远可选；不可选的字母在返回的 logits 里为 −inf。
    预测就是融合 logits 的 argmax；调用者把同一份 logits 写进记录，记录与预测因此不会不一致。
    """
    if scores.distance is None:
        raise ValueError("letter scoring of a fused arm needs the target-expert distance (score_letters needs the expert model)")
    alpha = alpha_from_distance(scores.distance, params)  # (N,)
    z = scores.letters
    fused, _ = fuse_with_alpha(z["target"], z["expert"], z["base"], alpha, params.plausibility_beta)
    return fused.argmax(-1).numpy(), alpha.numpy(), fused


def merge_letter_scores(parts: Sequence[tuple[list[int], LetterScores]], n: int, roles: Sequence[str],
                        n_letters: int) -> LetterScores:
    """把各批（各进程）的 (题目位置列表, 该批的 LetterScores) 按题目顺序拼回 (n, 4) 的字母 logits 与 (n,) 的距离。"""
    letters = {role: torch.zeros(n, n_letters) for role in roles}
    bad = {role: torch.zeros(n, dtype=torch.bool) for role in roles}
    dist_all = torch.zeros(n) if "expert" in roles else None
    for chunk, part in parts:
        pos = torch.tensor(chunk)
        for role in roles:
            letters[role][pos] = part.letters[role]
            if part.nonfinite is not None:
                bad[role][pos] = part.nonfinite[role]
        if dist_all is not None and part.distance is not None:
            dist_all[pos] = part.distance
    return LetterScores(letters=letters, distance=dist_all, nonfinite=bad)


def role_prefix(cfg: Config, role: str) -> str:
    """直接打分（字母打分、lm-eval 的 loglikelihood）时某个角色放在提示前的纯文本前缀——这条规则只在这里写一次。
    目标为空；专家/基座只在另设了系统提示（EXPERT_SYSTEM_PROMPT / BASE_SYSTEM_PROMPT，例如 --demo）时为
    "提示.strip()\n\n"。回落到目标的系统提示（CoT 指令）时不加：它要求写出 "The answer is X"，不适用于直接打分。"""
    custom = {"expert": cfg.expert_system_prompt, "base": cfg.base_system_prompt}.get(role)
    return custom.strip() + "\n\n" if custom else ""


def letter_role_text(question: Question, cfg: Config, role: str) -> str:
    """字母打分时某个角色看到的文本：lm-eval medqa_4options 的提示；专家/基座若另设了系统提示
    （EXPERT_SYSTEM_PROMPT / BASE_SYSTEM_PROMPT，例如 --demo 用同一个小模型扮演两者时），把它作为纯文本前缀。
    目标的系统提示是 CoT 指令（“最后写 The answer is X”），不适用于直接打分，所以目标只看 lm-eval 的提示，
    其准确率因此能与 lm-eval 的结果直接对照。"""
    return role_prefix(cfg, role) + letter_prompt(question)


def letter_records(arms: Sequence[ArmSpec], scores: LetterScores, questions: Sequence[Any]) -> list[Record]:
    """字母打分：每个臂、每道题一条记录（与 CoT 的记录同一 schema，output 为预测的字母续写、num_tokens = 0）。

    letter_logits 是该臂在 " A".." D" 上的（融合后）logits，保留 4 位小数，pred 就是它的 argmax；被可信度约束
    排除的字母（以及非有限的值）记为 null（JSON 没有 −inf / NaN）。融合臂另有 alpha
    （答案位置上的 α，一题一个值，也存成长度 1 的列表，与 CoT 的逐 token α 同一格式）与 alpha_mean。
    每条记录有 nonfinite_target_stops：1 = 该臂的第一个模型（目标；单模型臂是它自己）在答案位置的 logits 非有限
    （scores.nonfinite），这时 pred 为 None（计为错）、output 为空、融合臂的 α 为空列表与 None——对 NaN 取 argmax
    会悄悄给出一个字母。
    """
    records: list[Record] = []
    for arm in arms:
        if arm.steering is None:
            fused = scores.letters[arm.roles[0]]
            pred, alpha = fused.argmax(-1).numpy(), None
        else:
            pred, alpha, fused = letter_predictions(scores, arm.steering)
        stops = scores.nonfinite[arm.roles[0]].tolist() if scores.nonfinite is not None else [False] * len(questions)
        for k, q in enumerate(questions):
            letter = None if stops[k] else LETTERS[int(pred[k])]
            rec: Record = {"mode": arm.name, "index": q.index, "gold": q.answer_idx, "pred": letter,
                           "correct": letter == q.answer_idx, "output": " " + letter if letter else "", "num_tokens": 0,
                           "letter_logits": [round(float(v), 4) if math.isfinite(v) else None
                                             for v in fused[k].tolist()],
                           "nonfinite_target_stops": int(stops[k])}
            if alpha is not None:
                a = None if stops[k] else float(alpha[k])
                rec.update(alpha_mean=a, alpha_min=a, alpha_max=a,
                           alpha=[round(a, ALPHA_DECIMALS)] if a is not None else [])
            records.append(rec)
    return records


# ---------------------------------------------------------------------------
# 答案抽取，第一阶段：从文本读出模型的结论（优先级见 extract_answer 的文档字符串）
# ---------------------------------------------------------------------------
# 合法的选项字母集合（MedQA-USMLE 四选项版本；字母只在 config.LETTERS 定义一次）。
_VALID: Final[frozenset[str]] = frozenset(LETTERS)


# ---- 清洗 ----
# Llama-3 的结束 token：它们之后的文字不属于本轮回答（正常解码会在此停止），整段截掉。
_END_TOKEN: Final[re.Pattern[str]] = re.compile(r"<\|(?:eot_id|end_of_text|eom_id|im_end|endoftext)\|>|</s>")
# 其余聊天模板残留直接删除（角色头 "<|start_header_id|>assistant<|end_header_id|>" 连同角色名），
# 避免干扰“最后一行”的判断。
_SPECIAL_TOKEN: Final[re.Pattern[str]] = re.compile(
    r"<\|start_header_id\|>[^<\n]{0,20}<\|end_header_id\|>|<\|[^|>\s]*\|>|</?s>"
)
# LaTeX 文本包装：\text{(C)} → (C)，使 \boxed{\text{(C)}} 与 \boxed{(C)} 同样处理。
_LATEX_WRAP: Final[re.Pattern[str]] = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mathit)\s*\{([^{}]*)\}")
# 行首的 markdown 标题 / 引用 / 列表符号（"## Step 1"、"> "、"- "、"• "）。
_LINE_MARK: Final[re.Pattern[str]] = re.compile(r"^[ \t]*(?:#{1,6}|>+|[-•·+])[ \t]+", re.MULTILINE)
_QUOTES: Final[dict[int, str]] = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "\u00a0": " "})

# ---- 第 1 层：显式结论标记（标记之后紧跟答案） ----
# (a) 名词短语 + 连接词："The (final/correct/best) answer is"、"Answer:"、"Correct answer — "、
#     "the correct option is"、"The answer to this question is most likely"。
#     option/choice 单独出现时必须带 correct/best/final 等修饰，否则 "Option A is wrong" 会被当成结论；
#     复数 "Answer choices:" 不算（那是回显的选项列表）；"Incorrect answer: A"、"wrong answer" 不算。
_STRONG: Final[re.Pattern[str]] = re.compile(
    r"""(?ix)
    (?<!incorrect\s)(?<!wrong\s)(?<!not\sthe\s)
    (?:
        \b(?:(?:final|correct|best|right|true|most\s+(?:likely|appropriate|accurate)|my)\s+)?(?:answer|response)
        (?:\s+(?:choice|option))?
      | \b(?:final|correct|best|right|most\s+(?:likely|appropriate))\s+(?:option|choice)
    )\b
    (?:\s+(?:here|to\s+(?:this|the)\s+question))?
    (?:\s*[:=\-—–]|\s+(?:is|would\s+be|will\s+be|should\s+be|must\s+be|seems\s+to\s+be|appears\s+to\s+be)\b)
    (?:\s*[:\-—–])?
    (?:\s+(?:most\s+likely|likely|probably|clearly|definitely|therefore|thus|indeed|actually|still))?
    """
)
# (b) 第一人称选择："I would choose C"、"I'd go with option B"、"I'll select D"。
_FIRST_PERSON: Final[re.Pattern[str]] = re.compile(
    r"(?i:\b(?:I|we)(?:\s+would|\s+will|'d|'ll)?\s+(?:choose|select|pick|go\s+with|opt\s+for))\b"
)
# (c) LaTeX 盒子本身就是显式答案："$\boxed{C}$"。
_BOXED: Final[re.Pattern[str]] = re.compile(r"\\boxed\s*\{")
# (d) 反向："D is the correct answer"、"Option B is the best choice"、"Option C is the most likely diagnosis"、
#     "(C) is correct."。泛指名词（cause / treatment …）的反向陈述在句中有转折、否定或条件时不算。
#     字母前只能是行首、标点、so/thus/therefore 或 option/choice，"Hepatitis B is the answer" 因此不算。
_REVERSE: Final[re.Pattern[str]] = re.compile(
    r"""(?mx)
    (?:^[ \t]*|[.:;,!?][ \t]*|(?i:\b(?:so|thus|therefore|hence|then|option|choice))\s+)
    [(\[]?([A-D])[)\]]?
    \s+(?i:is\s+(?:the\s+)?(?:
        (?:correct|right|best|most\s+(?:likely|appropriate))\s+(?:answer|option|choice|response)\b
      | (?:correct|right|answer)(?=[ \t]*(?:[.!,;]|$)|\s+(?:because|since|as)\b)
      | (?P<generic>(?:correct|right|best|most\s+(?:likely|appropriate))\s+[a-z]+)
    ))
    """
)
# 条件句（"... would be (A) if the patient were stable"）不是结论；对 "A is the most likely cause …" 这类
# 非 answer/option 名词的反向陈述，句中再有转折或否定（"…, not hypothyroidism"、"but"）也不算。
# "If I had to choose, …" 是表态而不是条件，排除在外。
_CONDITIONAL: Final[re.Pattern[str]] = re.compile(
    r"(?i)\b(?:if(?!\s+(?:I|we)\s+(?:had|have|must|were)\s+to\b)|unless|(?<!I\s)(?<!we\s)were|had\s+been|would\s+have)\b"
)
# 句子的剩余部分：到 . ! ? （其后是空白或文本结尾）或行尾为止。
_SENTENCE_REST: Final[re.Pattern[str]] = re.compile(r"[^\n]*?(?:[.!?](?=\s|$)|$)", re.MULTILINE)
_CONTRAST: Final[re.Pattern[str]] = re.compile(
    r"(?i)\b(?:if|unless|were|not|but|however|rather|instead|except|although|though)\b"
)
# (e) 结论连接词 + 孤立字母："Therefore, B."、"So, (C)."、"Thus, option D)"、"Hence answer B."。
_SO_LETTER: Final[re.Pattern[str]] = re.compile(
    r"(?m)(?:^|[.!?:][ \t]+)(?i:therefore|thus|hence|so|in\s+conclusion|in\s+summary|overall)[,:]?[ \t]+(?i:(?:the[ \t]+)?(?:answer|option|choice)[ \t]+)?"
    r"\(?([A-D])(?!\.[ \t]*[a-z])(?=\)|[ \t]*(?:[.!:][ \t]|[.!:]?[ \t]*$))"
)
# (f) 弱标记："the most likely diagnosis is"、"the most appropriate next step in management is"、
#     "the best initial treatment would be"。其后若紧跟字母（"(C) …"、"C."）算第 1 层；
#     若只是文本，仅在与某个选项文本唯一匹配时算第 2 层。
_WEAK: Final[re.Pattern[str]] = re.compile(
    r"""(?ix)
    \b(?:most\s+(?:likely|appropriate|probable|accurate|effective|common|important)|best|single\s+best|
        preferred|next\s+best|correct)
    \s+(?:[a-z'\-]+\s+){0,6}?(?:is|would\s+be|will\s+be|are)\b[ \t]*:?
    """
)

# ---- 标记之后的答案解析 ----
# 标记与字母之间可跳过的东西：空白（可跨行）、冒号、引号、括号、$、\boxed{、"option"/"choice"/"letter" 前缀。
_SKIP: Final[re.Pattern[str]] = re.compile(
    r"""[\s:=\"'(\[{<\-—–]*(?:\\boxed\s*\{)?[\s\"'(\[{]*(?:(?i:option|choice|letter)\b[ \t]*[:#]?[ \t]*[(\[]?)?"""
)
# 候选字母：单个字母，后面不能紧跟字母、数字、撇号、连字符（排除 "B12"、"HbA1c"、"C-peptide"、"A-a"、"A's"）。
_LETTER: Final[re.Pattern[str]] = re.compile(r"([A-Za-z])(?![A-Za-z0-9\-]|'[A-Za-z])")
# 对冲 / 模板：字母后紧跟 ", B"、"/B"、" or B"、" and B"，且第二个字母本身也像列表项（后接 , / or . ) 或行尾），
# 即 "A or B"、"either B or C"、"A, B, C, or D"、"(A/B/C/D)"。"B, C is wrong" 不算（C 后面接的是句子）。
_HEDGE: Final[re.Pattern[str]] = re.compile(
    r"[)\]]?[ \t]*(?:,[ \t]*(?:or[ \t]+|and[ \t]+)?|/|[ \t]+or[ \t]+|[ \t]+and[ \t]+|&)[ \t]*(?:either[ \t]+)?"
    r"\(?[A-Da-d]\)?(?=[ \t]*(?:[,/&.?!)\]\"'\n]|or\b|and\b|$))"
)
# 大写字母之后允许的内容：右括号（其后任意，"(B)Tuberculosis"）、收尾标点/引号/行尾、" - 文本"、" (文本"、" 大写开头的选项文本"，
# 或 because/since 等连接词。" cells"、" patient"、" 45-year-old" 这类都不允许。
_UPPER_FOLLOW: Final[re.Pattern[str]] = re.compile(
    r"""[)\]}]|["']*(?:[ \t]*(?:$|[.,;:!?)\]}\n])|[ \t]+[-—–][ \t]|[ \t]+\(|[ \t]+[A-Z]
       |[ \t]+(?:because|since|as|given|due|which|here|this|based|from|for)\b)""",
    re.VERBOSE,
)
# 弱标记使用的严格版本：只接受右括号、收尾标点或行尾。
_STRICT_FOLLOW: Final[re.Pattern[str]] = re.compile(r"[)\]}]|[\"']*[ \t]*(?:$|[.,;:!?\n]|[-—–][ \t])")
# 小写字母只在其后是收尾标点/括号/行尾时才算（"answer is (b)."），冠词 "a deficiency" 不算。
_LOWER_FOLLOW: Final[re.Pattern[str]] = re.compile(r"[)\]}]|[\"']*[ \t]*(?:$|[.,;:!?\n])")
# 大写字母 + 句点 + 小写单词是菌名缩写（"C. difficile"、"E. coli"、"A. fumigatus"、"B. anthracis"），不是选项；
# MedQA 的选项文本以大写开头，"B. Tuberculosis" 不受影响。
_GENUS: Final[re.Pattern[str]] = re.compile(r"\.[ \t]*[a-z]")
# 同一行内联回显的选项："Answer: A) Aspirin B) Heparin C) Warfarin D) Clopidogrel"。
_INLINE_OPTION: Final[re.Pattern[str]] = re.compile(r"(?:^|\s)\(?([A-D])[).][ \t]+\S")
# 截断的结论：文本以结论标记结束而后面什么都没有（"...so the most likely answer is"）。
# 写成“单个字符或整词”的交替而不是几段相邻的 * 类，避免长空白串上的回溯爆炸。
_DANGLING_REST: Final[re.Pattern[str]] = re.compile(r"""(?:[\s:=\"'(\[{<\-—–\\#]|(?i:boxed|option|choice|letter))*""")

# ---- 第 2 层：结论句以括号字母收束 ----
# "The most likely diagnosis is pheochromocytoma (B)." 或句中 "(option D)"；要求同一句（不跨句号、换行）先出现
# 结论词，括号字母后即是句末或行尾，且两者之间没有否定词（"... is not (B)" 不算）。
_TRAILING_PAREN: Final[re.Pattern[str]] = re.compile(
    r"""(?mx)
    (?i:\b(?:most\s+likely|most\s+appropriate|best|correct|answer|diagnosis|therefore|thus|hence)\b)
    (?P<mid>[^\n.!?]{0,200}?)
    (?:\((?i:option|choice|answer)[ \t]*([A-D])\)
      |\(([A-D])\)(?=[ \t]*(?:[.!](?:\s|$)|$)))
    """
)
# 括号字母前面是 "or"、"and"、","、"/" 时是在列举或对冲（"(A) or (B)"），不是结论。
_LISTED: Final[re.Pattern[str]] = re.compile(r"(?i:\bor|\band|[,/&])[ \t]*$")
_NEGATION: Final[re.Pattern[str]] = re.compile(
    r"(?i)\b(?:not|no|unlikely|incorrect|wrong|rule[ds]?\s+out|ruled|excluded?|less|rather\s+than|instead)\b"
)

# ---- 第 3 层：最后一行只有字母（或字母 + 选项文本） ----
# "C"、"(C)"、"C."、"[C]"、"Option C: Metformin"、"Choice C"、"B) Metformin"。字母后若有文本必须先有分隔符，
# 所以 "A 45-year-old …"、"B cells"、"C-peptide" 不匹配。
_FINAL_LINE: Final[re.Pattern[str]] = re.compile(
    r"(?i:(?:option|choice|answer)[ \t]*)?[(\[]?([A-D])(?P<sep>[)\]][.:]?|[.:]|[ \t]*[-—–])?(?:[ \t]+(?P<rest>\S.*))?"
)
_FINAL_LOWER: Final[re.Pattern[str]] = re.compile(r"[(\[]?([a-d])[)\]]?\.?")
# 选项文本中出现这些词，说明这一行是在“分析”选项（常是被截断的逐项分析），而不是“给出”答案；
# 以 The/This/It/He 等开头的是句子（问答格式 "A: The patient most likely has …" 里的 A 是 Answer 的缩写）。
_REASONING: Final[re.Pattern[str]] = re.compile(
    r"(?i)\b(?:is|are|was|were|be|can|could|may|might|would|should|because|since|"
    r"not|no|unlikely|incorrect|wrong|ruled?|excluded?|less|but|tempting|has|have|had|likely|suggests?|indicates?)\b"
    r"|^(?i:the|this|that|it|he|she|they|we|i|there|these|those)\b"
)
# 回显的选项列表中的一行："A. Aspirin"、"(B) Heparin"、"C) ..."、"Option D: ..."。
_OPTION_LINE: Final[re.Pattern[str]] = re.compile(r"(?i:option[ \t]+)?\(?([A-D])[.):][ \t]*\S")


def _clean(text: str) -> str:
    """清洗模型输出：截掉结束 token 之后的内容、删除其余特殊 token、展开 LaTeX 文本包装、去掉 markdown 修饰。

    之后所有位置都以清洗后的文本为准。
    """
    text = _END_TOKEN.split(text, maxsplit=1)[0]
    text = _SPECIAL_TOKEN.sub("", text).translate(_QUOTES)
    for _ in range(3):  # \text{\textbf{C}} 这类嵌套最多展开三层
        text = _LATEX_WRAP.sub(r"\1", text)
    text = re.sub(r"[$*`_]|\\[()\[\]]", "", text)
    return _LINE_MARK.sub("", text)


def _line_from(text: str, pos: int) -> str:
    """text 从 pos 到该行行尾的部分（不复制整段余文）。"""
    end = text.find("\n", pos)
    return text[pos:end if end >= 0 else len(text)]


def _sentence(text: str, pos: int) -> str:
    """text 从 pos 到句末（. ! ? 后接空白，或换行）的部分，最多 200 个字符。"""
    m = _SENTENCE_REST.match(text, pos, min(len(text), pos + 200))
    return m.group(0) if m else ""


def _sentence_before(text: str, pos: int) -> str:
    """text 中 pos 所在句子从句首到 pos 的部分（句首 = 上一个 . ! ? 或换行之后）。"""
    start = max(text.rfind(c, 0, pos) for c in ".!?\n") + 1
    return text[start:pos]


def _norm(s: str) -> str:
    """选项文本比较用的规范化：小写、标点与空白统一为单个空格、去掉开头的冠词/"to"。"""
    s = re.sub(r"[\W_]+", " ", s.lower()).strip()
    return re.sub(r"^(?:(?:the|a|an|to)\s+)+", "", s)


def _match_option(span: str, options: Mapping[str, str] | None, prefix: bool = True) -> str | None:
    """把结论处的文本映射成选项字母：先找规范化后完全相等的选项，再（prefix=True 时）找“以某选项文本开头”的
    （"Metformin, because …"）；每一步都要恰好一个选项命中才返回，多个命中视为有歧义，返回 None。

    前缀匹配时，若一个命中选项的文本只是另一个命中选项文本的开头（"Insulin" 与 "Insulin plus metformin"，
    结论写的是后者），较短者并没有被完整说出，不计入命中。
    """
    if not options:
        return None
    s = _norm(span)
    if not s:
        return None
    opts = {k.strip().upper(): _norm(v) for k, v in options.items() if k.strip().upper() in _VALID and _norm(v)}
    tests = [lambda o: s == o] + ([lambda o: s.startswith(o + " ")] if prefix else [])
    for ok in tests:
        hits = {k for k, o in opts.items() if ok(o)}
        hits = {k for k in hits if not any(opts[j].startswith(opts[k] + " ") for j in hits)}
        if hits:
            return hits.pop() if len(hits) == 1 else None
    return None


def _letter_at(text: str, pos: int, strict: bool) -> tuple[int, str, str] | None:
    """解析结论标记（结束于 pos）之后的字母。

    返回 (字母位置, 种类, 字母)；种类：letter = A–D；invalid = 其它字母（如 "The answer is E"）；
    skip = 对冲或模板（"A or B"、"(A/B/C/D)"、"X"），不算候选。没有可信字母时返回 None。
    strict=True（弱标记）：只接受大写 A–D，且字母后只能是收尾标点/括号/行尾。
    """
    p = _SKIP.match(text, pos).end()
    m = _LETTER.match(text, p)
    if m is None:
        return None
    letter, q = m.group(1), m.end()
    if letter in "Ii":  # 代词 I / 罗马数字 I
        return None
    if _HEDGE.match(text, q):
        return p, "skip", letter.upper()
    if letter in "Xx":  # "The answer is X" 是模板占位符
        return p, "skip", "X"
    if letter.isupper() and _GENUS.match(text, q):
        return None
    if strict:
        if letter not in _VALID or not _STRICT_FOLLOW.match(text, q):
            return None
    elif letter.isupper():
        if not _UPPER_FOLLOW.match(text, q):
            return None
    else:
        # 小写：后面必须是标点/行尾；文本末尾孤零零的 "a" 更可能是被截断的冠词。
        if not _LOWER_FOLLOW.match(text, q) or (letter == "a" and not text[q:].strip()):
            return None
    up = letter.upper()
    # 字母之后同一行还有 ≥ 2 个其它 "X) 文本" 选项：这是内联回显的选项列表，不是结论。
    rest_of_line = _line_from(text, q)
    if len({x for x in _INLINE_OPTION.findall(rest_of_line) if x != up}) >= 2:
        return p, "skip", up
    return p, ("letter" if up in _VALID else "invalid"), up


def _option_list_lines(lines: list[str]) -> set[int]:
    """找出回显的选项列表所在的行号：连续（允许空行）以选项字母开头的行，含 ≥ 3 个不同字母；字母重复即开始新的一段。"""
    found: set[int] = set()
    run: list[tuple[int, str]] = []

    def flush() -> None:
        if len({c for _, c in run}) >= 3:
            found.update(i for i, _ in run)

    for i, line in enumerate(lines):
        s = line.strip()
        if not s:
            continue
        m = _OPTION_LINE.match(s)
        if m is None:
            flush()
            run = []
        elif m.group(1) in {c for _, c in run}:
            flush()
            run = [(i, m.group(1))]
        else:
            run.append((i, m.group(1)))
    flush()
    return found


def extract_answer(text: str, options: Mapping[str, str] | None = None) -> str | None:
    """从 CoT 输出中读出模型的“最终结论”，返回 ``'A'``–``'D'`` 或 ``None``。

    参数:
        text: 模型生成的完整文本（可能含 markdown、LaTeX、Llama-3 特殊 token、被截断）。
        options: 可选的 {字母: 选项文本}；给出时，只写了选项文本而没写字母的结论（"The answer is Metformin."）
            在规范化（大小写、空白、标点、开头冠词）后与 **恰好一个** 选项文本匹配时映射为该字母。

    原则：读模型“得出的结论”，而不是文中出现的字母。推理中提到的其它字母（"A is wrong because…"）、
    医学伪字母（vitamin A、hepatitis B、type A、Group B strep、Class I、HbA1c、C-peptide、B cells、
    A-a gradient、C. difficile）都不会被当成答案。

    预处理：截掉第一个结束 token（<|eot_id|> 等）之后的内容，删除其它特殊 token，展开 \\text{}，
    去掉 **、`、$、行首的 #/>/- 标记。

    优先级（从高到低；每层内部取位置 **最后** 的候选，因为模型常先给初步结论再自我修正）：

    0. 文本以一个没有下文的结论标记结束（"...so the most likely answer is"，多为 token 上限截断）→ None：
       最终结论没有说出来，更早的结论可能正被推翻。唯一例外是复读：之前 ≥ 2 个显式结论都是同一个字母
       （"The answer is B. The answer is B. The answer is"），返回该字母。
    1. 显式结论：
       "The (final/correct/best) answer is X" / "Answer: X" / "Correct answer — X" / "the correct option is X"、
       "I would choose X"、``\\boxed{X}``、"X is the correct answer"、"Therefore, X."、
       "the most likely diagnosis is (X) …"。X 可为大小写字母、带括号/引号、"option X"、"X) 文本"、"X. 文本"。
       显式标记后若是选项文本（无字母），与选项唯一匹配时也属于这一层。
       对冲与模板（"A or B"、"either B or C"、"A, B, C, or D"、"(A/B/C/D)"、"The answer is X/[letter]"）
       不是候选，直接跳过。最后一个候选若是 A–D 以外的字母（"The answer is E"）→ None，不回退到更早的结论。
       字母位于回显的选项列表行首（"Answer:\\nA. Aspirin\\nB. …"）的候选无效；条件句里的结论
       （"If she were pregnant, the answer would be A"）与带转折/否定的泛指反向陈述
       （"A is the most likely cause of X, not Y"）不算候选（"If I had to choose, …" 不是条件）。
    2. 较弱的结论：结论句以 "(X)" 收束或含 "(option X)"（"... is pheochromocytoma (B)."，
       中间不能有否定词）；"the most likely diagnosis is <文本>" 中的文本与选项唯一匹配。
    3. 最后一个非空行只是字母（"C"、"(C)"、"C."、"Option C"）或字母 + 简短选项文本
       （"B) Metformin"，文本中不能有 is/not/because 等推理词）；该行属于回显的选项列表
       （≥ 3 行以不同字母 A–D 加 "." 或 ")" 开头）时不算。
    4. 最后一个非空行整行就是某个选项的文本（需 options，唯一匹配）。
    5. 以上都没有 → None（拒答、回显题目、截断、只有对冲）。宁可判为“无答案”，也不猜字母。
    """
    if not text or not text.strip():
        return None
    text = _clean(text)
    if not text.strip():
        return None

    # 第 0 条：文本是否以没有下文的结论标记收尾（在收集完第 1 层候选之后处理）。
    dangling = False
    for pat in (_STRONG, _WEAK, _FIRST_PERSON, _BOXED):
        last = None
        for last in pat.finditer(text):
            pass
        dangling = dangling or (last is not None and _DANGLING_REST.fullmatch(text, last.end()) is not None)

    lines = text.split("\n")
    echo = _option_list_lines(lines)

    tier1: dict[int, tuple[str, str]] = {}
    tier2: dict[int, tuple[str, str]] = {}

    def add(tier: dict[int, tuple[str, str]], got: tuple[int, str, str] | None) -> None:
        # 字母落在回显选项列表的某一行上（"Answer:\nA. Aspirin\nB. …"）时不算结论。
        if got is not None and not (echo and text.count("\n", 0, got[0]) in echo):
            tier.setdefault(got[0], (got[1], got[2]))

    # 第 1 层：各类显式标记。标记之后解析不出字母时，尝试把后面的文本匹配成选项。
    for pat in (_STRONG, _FIRST_PERSON, _BOXED):
        for m in pat.finditer(text):
            # 条件句中的结论（"If she were pregnant, the answer would be A"、"The best choice would be (A) if …"）不算。
            if _CONDITIONAL.search(_sentence_before(text, m.start())) or (
                    "would" in m.group(0).lower() and _CONDITIONAL.search(_sentence(text, m.end()))):
                continue
            got = _letter_at(text, m.end(), strict=False)
            if got is None:
                p = _SKIP.match(text, m.end()).end()
                hit = _match_option(_line_from(text, p), options)
                got = (p, "letter", hit) if hit else None
            add(tier1, got)
    for m in _REVERSE.finditer(text):
        after = _sentence(text, m.end())
        if not (_CONTRAST if m.group("generic") else _CONDITIONAL).search(after):
            add(tier1, (m.start(1), "letter", m.group(1)))
    for m in _SO_LETTER.finditer(text):
        add(tier1, (m.start(1), "letter", m.group(1)))
    for m in _WEAK.finditer(text):
        got = _letter_at(text, m.end(), strict=True)
        if got is not None:
            # 条件句里的弱结论（"If she had exophthalmos, the most likely diagnosis would be (A)"）不算。
            if not _CONDITIONAL.search(_sentence_before(text, m.start()) + " " + _sentence(text, got[0] + 1)):
                add(tier1, got)
            continue
        p = _SKIP.match(text, m.end()).end()
        hit = _match_option(_line_from(text, p), options)
        if hit:
            add(tier2, (p, "letter", hit))
    # 第 2 层：括号字母收束的结论句。
    for m in _TRAILING_PAREN.finditer(text):
        mid = m.group("mid")
        if not _NEGATION.search(mid) and not _LISTED.search(mid):
            g = 2 if m.group(2) else 3
            add(tier2, (m.start(g), "letter", m.group(g)))

    if dangling:
        # 只有“复读”才例外：之前 ≥ 2 个显式结论全是同一个 A–D 字母（小模型循环到 token 上限），取该字母。
        said = [v for v in tier1.values() if v[0] != "skip"]
        agreed = set(said)
        if len(said) >= 2 and len(agreed) == 1 and said[0][0] == "letter":
            return said[0][1]
        return None
    for tier in (tier1, tier2):
        cands = sorted((p, kind, letter) for p, (kind, letter) in tier.items() if kind != "skip")
        if cands:
            _, kind, letter = cands[-1]
            return letter if kind == "letter" else None

    # 第 3、4 层：只看最后一个非空行。
    idx = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].strip()), None)
    if idx is None:
        return None
    last_line = lines[idx].strip(" \t.:")
    last_line_raw = lines[idx].strip()
    if idx not in echo:
        m = _FINAL_LINE.fullmatch(last_line_raw) or _FINAL_LINE.fullmatch(last_line)
        if m is not None:
            rest = m.group("rest")
            # 字母后有文本时必须先有分隔符（"B) …"、"B. …"），文本要短且不含推理词。
            # "C. difficile" 这种大写字母 + 句点 + 小写单词是菌名缩写（同 _GENUS）。
            genus = m.group("sep") == "." and rest is not None and rest[0].islower()
            if not rest or (m.group("sep") and not genus and len(rest) <= 80 and not _REASONING.search(rest)):
                return m.group(1)
        m = _FINAL_LOWER.fullmatch(last_line_raw)
        if m is not None:
            return m.group(1).upper()
    return _match_option(last_line, options, prefix=False)
