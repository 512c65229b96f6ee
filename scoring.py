"""打分：预测记录的类型（Record）、一道题的 CoT 记录（make_record）、字母打分的预测与记录、从文本抽取答案。

一道题在哪里被判对错：CoT 时 make_record（生成文本 → extract_answer → 与 gold 比较）；字母打分时 letter_records
（四个字母 token 上融合后的 logits 取 argmax，融合规则调用 steering_utils.fuse_with_alpha，与生成时同一份）。
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final, Sequence, TypedDict

import numpy as np
import torch

from config import LETTERS, Config
from data_loader import Question
from sampling import Sampling
from steering_utils import SteeringParams, alpha_from_distance, fuse_with_alpha

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
    """predictions.jsonl 的一行。融合臂另有 α 统计与逐步 α；CoT 融合臂有 nonfinite_steps；字母打分有 letter_logits。"""

    alpha_mean: float | None
    alpha_min: float | None
    alpha_max: float | None
    alpha: list[float]  # 每个被引导的步（字母打分：答案位置）一个 α，保留 ALPHA_DECIMALS 位小数
    nonfinite_steps: int  # 融合 logits 非有限、改用目标 logits 的步数
    letter_logits: list[float | None]  # 四个字母上（融合后）的 logits；被可信度约束排除的为 None


RECORD_KEYS: frozenset[str] = frozenset(RecordCore.__required_keys__)


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
                alpha: list[float] | None, nonfinite: int | None = None) -> Record:
    """predictions.jsonl 的一行：mode、index、gold、pred（字母或 None）、correct、output、num_tokens；
    引导模式另有 alpha（该题被引导的每一步的 α，保留 ALPHA_DECIMALS 位小数：α 直方图与轨迹图的原料）、
    alpha_mean / alpha_min / alpha_max（由未取整的 α 算出）与 nonfinite_steps（融合 logits 非有限、改用目标 logits 的步数）。

    output 用 skip_special_tokens=True 解码；num_tokens 含结束记号（若生成了）。
    记录里没有任何计时或会话信息：续跑与不中断的运行写出的记录逐字节相同。
    """
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    pred = extract_answer(text)
    rec: Record = {"mode": mode, "index": question.index, "gold": question.answer_idx, "pred": pred,
                           "correct": pred == question.answer_idx, "output": text, "num_tokens": len(tokens)}
    if alpha is not None:
        rec.update(alpha_mean=sum(alpha) / len(alpha) if alpha else None,
                   alpha_min=min(alpha) if alpha else None, alpha_max=max(alpha) if alpha else None,
                   alpha=[round(a, ALPHA_DECIMALS) for a in alpha])
    if nonfinite is not None:
        rec["nonfinite_steps"] = int(nonfinite)
    return rec


# ---------------------------------------------------------------------------
# 字母打分（--scoring letter）：不生成，答案位置上四个字母 token 的 logits 取 argmax
# ---------------------------------------------------------------------------

def letter_prompt(question: Any) -> str:
    """lm-eval medqa_4options 风格的提示（不经过聊天模板）：题干、四个选项、以 "Answer:" 结尾。"""
    options = "\n".join(f"{k}. {question.options[k]}" for k in LETTERS)
    return f"Question: {question.question.strip()}\n{options}\nAnswer:"


def letter_token_ids(tokenizers: dict[str, Any]) -> list[int]:
    """" A" … " D" 的 token id（答案位置上的四个候选）。每个必须恰好是一个 token，且各角色分词器给出相同 id，
    否则“限制到四个字母上取 argmax”就不等价于比较四个续写的似然，必须在任何前向之前报错。"""
    ids: dict[str, list[int]] = {}
    for role, tok in tokenizers.items():
        row = []
        for letter in LETTERS:
            pieces = tok.encode(" " + letter, add_special_tokens=False)
            if len(pieces) != 1:
                raise ValueError(f"{role} 的分词器把 ' {letter}' 切成了 {len(pieces)} 个 token {pieces}；字母打分要求单个 token")
            row.append(pieces[0])
        ids[role] = row
    if len({tuple(v) for v in ids.values()}) != 1:
        raise ValueError(f"各角色的字母 token id 不一致：{ids}；字母打分要求共享分词器")
    return next(iter(ids.values()))


@dataclass
class LetterScores:
    """每题的打分原料。letters[角色]: (N, 4) float32，四个字母 token 的 logits；
    distance: (N,) float32，答案位置上目标与专家整词表分布的距离（无专家时为 None）。"""

    letters: dict[str, torch.Tensor]
    distance: torch.Tensor | None


def letter_predictions(scores: LetterScores, params: SteeringParams) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """一个融合设置下的预测字母下标 (N,)、每题的 α (N,) 与融合后的字母 logits (N, 4) float32。

    α 由答案位置上整词表的距离算出（alpha_from_distance），融合与可信度约束调用 steering_utils.fuse_with_alpha——
    与生成时同一份规则，只是 V = 四个字母：可信度约束因此是“目标概率 ≥ β × 四个字母里目标的最大概率”
    （整词表上目标的最大 token 往往不是字母）。目标最偏好的字母永远可选；不可选的字母在返回的 logits 里为 −inf。
    预测就是融合 logits 的 argmax；调用者把同一份 logits 写进记录，记录与预测因此不会不一致。
    """
    if scores.distance is None:
        raise ValueError("融合臂的字母打分需要目标与专家的距离（score_letters 时要有专家模型）")
    alpha = alpha_from_distance(scores.distance, params)  # (N,)
    z = scores.letters
    fused, _ = fuse_with_alpha(z["target"], z["expert"], z["base"], alpha, params.plausibility_beta)
    return fused.argmax(-1).numpy(), alpha.numpy(), fused


def merge_letter_scores(parts: Sequence[tuple[list[int], LetterScores]], n: int, roles: Sequence[str],
                        n_letters: int) -> LetterScores:
    """把各批（各进程）的 (题目位置列表, 该批的 LetterScores) 按题目顺序拼回 (n, 4) 的字母 logits 与 (n,) 的距离。"""
    letters = {role: torch.zeros(n, n_letters) for role in roles}
    dist_all = torch.zeros(n) if "expert" in roles else None
    for chunk, part in parts:
        pos = torch.tensor(chunk)
        for role in roles:
            letters[role][pos] = part.letters[role]
        if dist_all is not None and part.distance is not None:
            dist_all[pos] = part.distance
    return LetterScores(letters=letters, distance=dist_all)


def letter_role_text(question: Question, cfg: Config, role: str) -> str:
    """字母打分时某个角色看到的文本：lm-eval medqa_4options 的提示；专家/基座若另设了系统提示
    （EXPERT_SYSTEM_PROMPT / BASE_SYSTEM_PROMPT，例如 --demo 用同一个小模型扮演两者时），把它作为纯文本前缀。
    目标的系统提示是 CoT 指令（“最后写 The answer is X”），不适用于直接打分，所以目标只看 lm-eval 的提示，
    其准确率因此能与 lm-eval 的结果直接对照。"""
    custom = {"expert": cfg.expert_system_prompt, "base": cfg.base_system_prompt}.get(role)
    return (custom.strip() + "\n\n" if custom else "") + letter_prompt(question)


def letter_records(arms: Sequence[ArmSpec], scores: LetterScores, questions: Sequence[Any]) -> list[Record]:
    """字母打分：每个臂、每道题一条记录（与 CoT 的记录同一 schema，output 为预测的字母续写、num_tokens = 0）。

    letter_logits 是该臂在 " A".." D" 上的（融合后）logits，保留 4 位小数，pred 就是它的 argmax；被可信度约束
    排除的字母记为 null（JSON 没有 −inf）。融合臂另有 alpha
    （答案位置上的 α，一题一个值，也存成长度 1 的列表，与 CoT 的逐 token α 同一格式）与 alpha_mean。
    """
    records: list[Record] = []
    for arm in arms:
        if arm.steering is None:
            fused = scores.letters[arm.roles[0]]
            pred, alpha = fused.argmax(-1).numpy(), None
        else:
            pred, alpha, fused = letter_predictions(scores, arm.steering)
        for k, q in enumerate(questions):
            letter = LETTERS[int(pred[k])]
            rec: Record = {"mode": arm.name, "index": q.index, "gold": q.answer_idx, "pred": letter,
                           "correct": letter == q.answer_idx, "output": " " + letter, "num_tokens": 0,
                           "letter_logits": [round(float(v), 4) if math.isfinite(v) else None
                                             for v in fused[k].tolist()]}
            if alpha is not None:
                rec.update(alpha_mean=float(alpha[k]), alpha_min=float(alpha[k]), alpha_max=float(alpha[k]),
                           alpha=[round(float(alpha[k]), ALPHA_DECIMALS)])
            records.append(rec)
    return records


# ---------------------------------------------------------------------------
# 答案抽取
# ---------------------------------------------------------------------------
# 设计说明（三层优先级）：
#
# 背景
# ----
# 模型收到的指令是：
#
#     Think step by step, then finish with a line of the form "The answer is X",
#     where X is A, B, C or D.
#
# 但实际输出来自 Llama-3.1-8B-Instruct、一个 1B 医学模型和一个 135M 小模型，文本往往很“脏”：
# markdown 加粗/标题、LaTeX ``\\boxed{}``、大小写混乱、因 token 上限而被截断，
# 并且推理过程中会大量提到其它选项字母（"Option A is wrong because…"、"(C) is tempting"）。
# 同时医学文本本身充满会“伪装成选项”的大写字母：病例开头的冠词 "A 45-year-old man"、
# "vitamin B12"、"hepatitis B"、"type A"、"Group B strep"、"HbA1c" 等。
#
# 因此抽取采用 **三层优先级**，每层内部都“取最后一个”：
#
# 1. 显式答案陈述（"The answer is C" / "Answer: (B)" / "correct option is A" /
#    "I would choose C" / ``\\boxed{B}`` / "D is the correct answer" 等）。
#    这是指令要求的格式，可信度最高；若出现多次，以 **最后一次** 为准，
#    因为模型常常先给出初步结论、再自我修正，最后一句才是最终决定。
#    若最后一条显式陈述给出的是 A–D 以外的字母（如 "The answer is E"），直接返回 ``None``——
#    模型的最终表态就是一个无效答案，退回到更早的陈述反而是在替模型“改答案”。
# 2. 带括号字母的结论句（"The most likely diagnosis is pheochromocytoma (B)."）。
#    语气是结论性的，但没有 "answer" 这类标记词，可靠性低于第 1 层，所以仅在第 1 层完全缺失时使用，
#    并且要求括号字母位于行尾，避免把句中对选项的讨论当成结论。
# 3. 最后一个非空行只是一个孤立字母（"B" / "(B)" / "B." / "**B**"）或
#    “字母 + 简短选项文本”（"B. Hypertension"）。这是最弱的证据：只看文本的最末一行，
#    且选项文本不能含有推理性词汇（is / not / because / ruled out …），
#    否则它更可能是被截断的逐项分析（"B. Hypertension can be ruled out…"）。
#
# 三层都没有命中时返回 ``None``：宁可判为“无答案”，也不从普通单词或选项讨论中猜一个字母。


# ---- 第一阶段：从文本抽取答案 ----
# 合法的选项字母集合（MedQA-USMLE 四选项版本）。
_VALID: Final[frozenset[str]] = frozenset("ABCD")

# 聊天模板残留的特殊 token（如 "<|eot_id|>"、"</s>"），会干扰“最后一行”的判断，先删除。
_SPECIAL_TOKEN: Final[re.Pattern[str]] = re.compile(r"<\|[^|>]*\|>|</?s>")

# “宽松”字母：大写且独立成词。
#   - 排除 I：它几乎总是代词（"The answer is I think B"）。
#   - (?![\w'\-])：排除 "B12"、"A1c"、"B-cell"、"A's" 这类粘连写法。
#   - (?![ \t]+\d)：排除冠词 "A 45-year-old …"（"Answer: A 45-year-old man …"）。
#   捕获范围是 A–Z（而非 A–D），目的是识别出 "The answer is E" 这种无效最终答案。
_LOOSE: Final[str] = r"[A-HJ-Z](?![\w'\-])(?![ \t]+\d)"
# “严格”字母：允许小写，但字母后必须紧跟收尾标点或行尾（"ANSWER: c"、"answer is (b)."）。
#   这样 "the answer is a deficiency of …" 里的冠词 a 永远不会被当成选项。
_STRICT: Final[str] = r"[A-HJ-Za-hj-z](?=[ \t]*(?:[.):\]}*]|$))"

# 第 1 层（正向）：标记词 + 连接词 + 可选修饰 + 字母。
_EXPLICIT: Final[re.Pattern[str]] = re.compile(
    rf"""
    (?:
        # (a) "answer" / "correct option" / "best choice" 等标记词，后面必须跟连接词：
        #     要么是 ":" "=" "-"（可夹 markdown 星号，如 "**Answer**: B"），
        #     要么是 is / would be / should be …。强制连接词是为了排除
        #     "Answer choice A is incorrect" 这种在讨论选项的句子。
        (?i:\b(?:answer|(?:correct|best|right|final)\s+(?:option|choice)))
        (?:[ \t]*\**[ \t]*[:=\-—]|(?i:\s+(?:is|would\s+be|will\s+be|should\s+be|must\s+be)))
        # 可选的语气副词："the answer is most likely C"、"the answer is therefore B"。
        (?i:\s+(?:most\s+likely|likely|probably|clearly|definitely|therefore|thus))?
      | # (b) 第一人称选择："I would choose C" / "I'd select B" / "I will go with option D"。
        \bI(?i:(?:\s+would|\s+will|'d|'ll)?\s+(?:choose|select|pick|go\s+with))
      | # (c) LaTeX 盒子本身就是显式答案标记："$\boxed{{B}}$"。
        \\boxed\{{
    )
    (?:
        # 同一行：跳过冒号、markdown 星号/下划线、括号、$、\boxed{{、\text{{ 以及
        # "option"/"choice"/"letter" 前缀（"answer is option D"），再取宽松或严格字母。
        [ \t:*_=(\[{{$\-]*(?:\\(?:boxed|text|textbf|mathrm)\{{)*[ \t*_(\[{{]*
        (?i:(?:option|choice|letter)[ \t]*\(?)?
        ({_LOOSE}|{_STRICT})
      | # 换行：标记在行尾、字母在下一行（"The answer is:\n\nB. Hypertension"）。
        # 跨行时只接受严格字母，防止 "Answer:\nA patient with …" 的冠词 A 被误抓。
        [ \t:*_]*\n[\s*_#>(\[]*({_STRICT})
    )
    """,
    re.VERBOSE | re.MULTILINE,
)

# 第 1 层（反向）："D is the correct answer" / "Option B is the best choice"。
# 字母前必须是 option/choice、行首/标点，或 so/thus/therefore/hence 这类连接词；
# 这样 "Hepatitis B is the most likely answer" 中的 B 不会被当成选项。
_REVERSE: Final[re.Pattern[str]] = re.compile(
    r"""
    (?:(?i:\b(?:option|choice))\s+|^[ \t*_]*|[.:;,!?*][ \t]*|(?i:\b(?:so|thus|therefore|hence|then))\s+)
    \(?([A-HJ-Z])\)?[ \t*_]*
    (?i:\s+is\s+(?:the\s+)?(?:correct|right|best|most\s+likely|most\s+appropriate)\s+(?:answer|option|choice))
    """,
    re.VERBOSE | re.MULTILINE,
)

# 第 2 层：结论句（most likely / most appropriate / best）在行尾以 "(X)" 收束。
# 只接受括号形式且必须在行尾，因为句中的 "(B)" 常常只是在引用某个选项进行比较。
_HEDGED: Final[re.Pattern[str]] = re.compile(
    r"(?i:\b(?:most\s+likely|most\s+appropriate|best)\b)[^\n]{0,200}?\(([A-D])\)[ \t*_]*[.!]?[ \t*_]*$",
    re.MULTILINE,
)

# 第 3 层：最后一行是 "(B)" / "B" / "B." / "B)"，或 "B. 选项文本"。
# 字母后若还有文本，必须先有 ")"、"."、":" 分隔——因此 "A 45-year-old …" 不会匹配。
_FINAL_LINE: Final[re.Pattern[str]] = re.compile(
    r"^(?:\(([A-D])\)|([A-D])(?:[.:)]|(?=$)))[.:]?(?:\s+(?P<rest>.+))?$"
)
# 选项文本中出现这些词，说明这一行是在“分析”选项而不是“给出”答案。
_REASONING: Final[re.Pattern[str]] = re.compile(
    r"(?i)\b(?:is|are|was|were|be|can|could|may|might|would|should|because|since|"
    r"not|no|unlikely|incorrect|wrong|ruled?|excluded?|less|but|tempting)\b"
)


def extract_answer(text: str) -> str | None:
    """从 CoT 输出中抽取最终选项字母。

    参数:
        text: 模型生成的完整文本（可能含 markdown、LaTeX、被截断）。

    返回:
        ``'A'``–``'D'`` 之一；若没有可信的结论（空文本、截断、只讨论选项、
        最终显式答案不在 A–D 内）则返回 ``None``。

    优先级（详见模块文档）：显式陈述（取最后一个）> 行尾括号结论句 > 最后一行孤立字母。
    """
    if not text or not text.strip():
        return None
    text = _SPECIAL_TOKEN.sub("", text)

    # 第 1 层：正向与反向的显式陈述统一按字母在文本中的位置排序，取最靠后者。
    # 每个模式的捕获组互斥（要么宽松分支、要么跨行分支），lastindex 即命中的那一组。
    explicit: list[tuple[int, str]] = [
        (m.start(m.lastindex or 0), m.group(m.lastindex or 0))
        for pattern in (_EXPLICIT, _REVERSE)
        for m in pattern.finditer(text)
    ]
    if explicit:
        letter = max(explicit)[1].upper()
        # 最终表态是无效字母（如 E）时直接放弃，而不是回退到更早的陈述。
        return letter if letter in _VALID else None

    # 第 2 层：结论句的行尾括号字母，同样取最后一个。
    hedged: list[str] = _HEDGED.findall(text)
    if hedged:
        return hedged[-1]

    # 第 3 层：只看最后一个非空行，去掉 markdown 修饰（**、#、>、反引号、列表短横线）。
    lines = [ln.strip(" \t*_#>`-") for ln in text.splitlines()]
    last = next((ln for ln in reversed(lines) if ln), "")
    m = _FINAL_LINE.match(last)
    if m is None:
        return None
    rest = m.group("rest")
    if rest and (len(rest) > 80 or _REASONING.search(rest)):
        return None
    return m.group(1) or m.group(2)
