"""用真实的 Llama-3 分词器跑本工具的解码：三个词表 128256 的微型随机 Llama（目标 / 专家 / 基座，三个种子）。

提示由项目自己的 data_loader.format_prompt + encode_prompts 渲染（Llama-3.1 模板、恰好一个 BOS），分词器经
model_loader.load_tokenizer 加载（分词器本身没有 pad，load_tokenizer 选 <|finetune_right_pad_id|>），结束记号来自
model_loader.end_token_ids（128001/128008/128009）。检查：
- 两个臂（baseline：只有目标；steered：SteeringParams）的快速路径 FastDecoder 与参考循环 generate_batch 逐 token 相同（fp32）；
- 生成 <|eot_id|> 的行就停在那里，其余行不受影响、跑满预算；生成 <|python_tag|>（非结束的特殊记号）的行继续；
- run_arm 的快速与参考路径写出相同的记录；记录的文字里没有任何特殊记号，且等于 llama-models 对非特殊 id 的解码；
- " A" … " D" 在 Llama-3 分词器里各是一个 token，字母打分（evaluator.score_letters）给出与直接前向相同的 logits；
- 答案抽取第二阶段（run_arm 的 forced）在 Llama-3 的字母 token 上与整段前向 + fuse_step 的慢速计算一致，
  以 <|eot_id|> 收尾的行去掉结束记号后再接 cue。

怎样让某一行在已知的一步生成 <|eot_id|>：先不带结束记号跑一遍参考循环，取只出现一次的某个 token s，
把每个模型 lm_head 的 <|eot_id|> 行改写成 1.001 × s 行（llama3.alias_token）；logits 与融合对 lm_head 行都是线性的，
原来生成 s 的那一步就改为生成 <|eot_id|>。

CPU 上 (B, 128256) 的逐元素运算很小：本模块运行时把 torch 的线程数设为 1（多线程的调度开销远大于计算，
在繁忙的机器上慢几十倍），结束后恢复。
"""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from llama3 import missing_dependency

if missing_dependency():
    pytest.skip(missing_dependency(), allow_module_level=True)

# 被测的项目函数集中在这里导入（重构后只需改这几行）。
from data_loader import encode_prompts, format_prompt, load_questions  # noqa: E402
from evaluator import generate_batch, run_arm, score_letters  # noqa: E402
from fast.decoder import FastDecoder  # noqa: E402
from llama3 import (BOS_ID, END_IDS, EOT_ID, FINETUNE_PAD_ID, PYTHON_TAG_ID, VOCAB_SIZE, alias_token,  # noqa: E402
                    llama3_tokenizer_dir, reference_tokenizer, special_tokens, tiny_llama3)
from model_loader import end_token_ids, load_tokenizer  # noqa: E402
from steering_utils import SteeringParams, distance  # noqa: E402
from scoring import forced_answer_ids, letter_predictions, letter_prompt, letter_token_ids  # noqa: E402
from steering_utils import fuse_step  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDQA_FILE = os.path.join(REPO, "data", "medqa", "test.jsonl")
SEEDS = {"target": 0, "expert": 1, "base": 2}
ROLES = ("target", "expert", "base")
STEPS = 10
N_QUESTIONS = 3
# adaptive_scale = 1：随机模型之间的 JS 距离接近 ln 2，α = 1 + tanh(d) 不饱和（缺省的 10 会让 α 恒为 2）
STEER = SteeringParams(base_alpha=1.0, adaptive_scale=1.0, max_boost=1.0)
ARMS = {"baseline": (("target",), None), "steered": (ROLES, STEER)}


pytestmark = pytest.mark.usefixtures("one_thread")  # 原因见 tests/conftest.py


@pytest.fixture(scope="module")
def tok() -> Any:
    """流水线里的分词器：model_loader.load_tokenizer 从转换好的目录加载（左填充，pad 由它选）。"""
    return load_tokenizer(llama3_tokenizer_dir())


@pytest.fixture(scope="module")
def questions() -> list[Any]:
    return load_questions(data_file=MEDQA_FILE, limit=N_QUESTIONS)[0]


@pytest.fixture(scope="module")
def prompts(tok, questions) -> list[list[int]]:
    ids = encode_prompts([format_prompt(q, tok) for q in questions], tok)
    assert all(row[0] == BOS_ID and row.count(BOS_ID) == 1 for row in ids)
    return ids


def make_models() -> dict[str, torch.nn.Module]:
    return {role: tiny_llama3(seed, attn_scale=4.0) for role, seed in SEEDS.items()}


def reference(models: list[Any], prompts: list[list[int]], steering: SteeringParams | None, ends: list[int],
              pad_id: int) -> Any:
    """参考循环 generate_batch（三个角色看同一份提示）。"""
    return generate_batch(models, [prompts] * len(models), vocab_size=VOCAB_SIZE, max_new_tokens=STEPS,
                          end_ids=ends, pad_id=pad_id, steering=steering)


def pick_unique(table: list[list[int]], steps: range, skip_rows: tuple[int, ...] = ()) -> tuple[int, int, int]:
    """在 table（每行的生成 id）里找 (行, 步, token)：该 token 在整张表里只出现一次、不是特殊记号，步在 steps 内。"""
    flat = [t for row in table for t in row]
    for step in steps:
        for row, ids in enumerate(table):
            if row not in skip_rows and ids[step] < BOS_ID and flat.count(ids[step]) == 1:
                return row, step, ids[step]
    raise AssertionError(f"no token occurs once in {table}: the tiny models generate the same text in every row")


@pytest.fixture(scope="module", params=list(ARMS))
def arm(request, tok, prompts) -> dict[str, Any]:
    """一个臂的模型（各臂各一份，互不影响）与改写计划：一行在已知的一步生成 <|eot_id|>，另一行生成 <|python_tag|>。"""
    roles, steering = ARMS[request.param]
    models = make_models()
    group = [models[r] for r in roles]
    free = reference(group, prompts, steering, [], tok.pad_token_id).tokens  # 不设结束记号：每行 STEPS 个
    assert all(len(row) == STEPS for row in free)
    eot_row, eot_step, s_eot = pick_unique(free, range(2, STEPS - 2))
    tag_row, tag_step, s_tag = pick_unique(free, range(1, STEPS - 2), skip_rows=(eot_row,))
    alias_token(group, s_eot, EOT_ID)
    alias_token(group, s_tag, PYTHON_TAG_ID)
    return {"name": request.param, "roles": roles, "steering": steering, "models": models, "group": group,
            "free": free, "eot": (eot_row, eot_step), "tag": (tag_row, tag_step)}


# ---------------------------------------------------------------------------
# 解码：快速路径 == 参考循环；逐行停止；特殊记号
# ---------------------------------------------------------------------------


def test_end_ids_and_pad_from_the_pipeline(tok, arm) -> None:
    assert end_token_ids(tok, list(arm["models"].values())) == sorted(END_IDS)
    assert tok.pad_token_id == FINETUNE_PAD_ID and FINETUNE_PAD_ID not in END_IDS


def test_eot_row_stops_there_and_other_rows_run_on(tok, prompts, arm) -> None:
    result = reference(arm["group"], prompts, arm["steering"], list(END_IDS), tok.pad_token_id)
    free, (eot_row, eot_step), (tag_row, tag_step) = arm["free"], arm["eot"], arm["tag"]
    assert result.tokens[eot_row] == free[eot_row][:eot_step] + [EOT_ID]  # 停在 <|eot_id|>，之后什么都没有
    assert result.tokens[tag_row][:tag_step + 1] == free[tag_row][:tag_step] + [PYTHON_TAG_ID]
    for row, ids in enumerate(result.tokens):
        if row != eot_row:
            assert len(ids) == STEPS and not set(ids) & set(END_IDS)  # <|python_tag|> 不是结束记号：继续生成
        if row not in (eot_row, tag_row):
            assert ids == free[row]  # 别的行不受影响
    assert result.steps == STEPS


def test_fast_decoder_matches_reference_token_for_token(tok, prompts, arm) -> None:
    steering, group = arm["steering"], arm["group"]
    ref = reference(group, prompts, steering, list(END_IDS), tok.pad_token_id)
    decoder = FastDecoder(group, vocab_size=VOCAB_SIZE, end_ids=list(END_IDS), pad_id=tok.pad_token_id,
                          batch_size=len(prompts), steering=steering, compile=False)
    fast = decoder.generate([prompts] * len(group), STEPS)
    assert fast.tokens == ref.tokens
    assert fast.nonfinite == ref.nonfinite
    if steering is None:
        assert fast.alpha is None and ref.alpha is None
    else:
        assert [len(a) for a in fast.alpha] == [len(t) for t in ref.tokens]  # 每个活跃步一个 α，停下之后没有
        for a, b in zip(fast.alpha, ref.alpha):
            assert a == pytest.approx(b, abs=1e-5)
        assert all(1.0 < a < 2.0 for row in ref.alpha for a in row)  # α = 1 + tanh(d) 没有饱和


def test_run_arm_fast_and_reference_write_the_same_clean_records(tok, questions, prompts, arm) -> None:
    role_prompts = {role: prompts for role in ROLES}
    kwargs = dict(vocab_size=VOCAB_SIZE, batch_size=N_QUESTIONS, max_new_tokens=STEPS,
                  end_ids=end_token_ids(tok, list(arm["models"].values())), steering=arm["steering"],
                  progress=False, roles=arm["roles"])
    fast = run_arm(arm["name"], questions, role_prompts, arm["models"], tok, fast=True, **kwargs)
    slow = run_arm(arm["name"], questions, role_prompts, arm["models"], tok, fast=False, **kwargs)
    # α 的统计量由两条路径各自的浮点运算得出（差在 1e-6 以内），其余字段逐字相同
    inexact = ("alpha_mean", "alpha_min", "alpha_max", "alpha")
    assert [{k: v for k, v in r.items() if k not in inexact} for r in fast.records] == \
        [{k: v for k, v in r.items() if k not in inexact} for r in slow.records]
    for a, b in zip(fast.records, slow.records):
        assert a.keys() == b.keys()
        for key in set(inexact) & a.keys():
            assert a[key] == pytest.approx(b[key], abs=1e-4)
    tokens = reference(arm["group"], prompts, arm["steering"], list(END_IDS), tok.pad_token_id).tokens
    names = special_tokens()
    for j, record in enumerate(fast.records):
        assert record["index"] == questions[j].index and record["num_tokens"] == len(tokens[j])
        # 记录的文字 = llama-models 对非特殊 id 的解码：特殊记号（<|eot_id|>、<|python_tag|>、保留记号）都不在里面
        assert record["output"] == reference_tokenizer().decode([t for t in tokens[j] if t < BOS_ID])
        assert not [n for n in names if n in record["output"]]
    eot_row, eot_step = arm["eot"]
    assert fast.records[eot_row]["num_tokens"] == eot_step + 1
    assert tokens[arm["tag"][0]].count(PYTHON_TAG_ID) >= 1


# ---------------------------------------------------------------------------
# 字母：单个 token；字母打分
# ---------------------------------------------------------------------------


def test_letter_tokens_are_single_llama3_tokens(tok) -> None:
    ref = reference_tokenizer()
    ids = letter_token_ids({"target": tok, "expert": tok, "base": tok})
    assert ids == [ref.encode(" " + letter, bos=False, eos=False)[0] for letter in "ABCD"]
    assert all(len(ref.encode(" " + letter, bos=False, eos=False)) == 1 for letter in "ABCD")
    bare = [tok.encode(letter, add_special_tokens=False) for letter in "ABCD"]
    assert all(len(b) == 1 for b in bare) and len({b[0] for b in bare} | set(ids)) == 8
    # 作答提示后接字母时，字母仍是一个单独的 token（前面的 id 不变）：" A" 接在词后，"A" 接在 "(" 后
    for cue, sep, letter_ids in (("The answer is", " ", ids), ("Therefore, the answer is (", "", [b[0] for b in bare])):
        head = tok.encode(cue, add_special_tokens=False)
        for letter, lid in zip("ABCD", letter_ids):
            assert tok.encode(cue + sep + letter, add_special_tokens=False) == head + [lid]


@torch.inference_mode()
def test_letter_scoring_runs_on_llama3_letter_tokens(tok, questions) -> None:
    models = make_models()
    ids = letter_token_ids({"target": tok})
    # 与 main.py 相同的编码：lm-eval 风格的纯文本提示，特殊记号按分词器默认（Llama-3 加一个 BOS，与 lm-eval 的 hf 模型相同）
    prompt_ids = [tok.encode(letter_prompt(q)) for q in questions]
    assert all(p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1 for p in prompt_ids)
    scores = score_letters(models, prompt_ids, ids, vocab_size=VOCAB_SIZE, batch_size=2, metric="js")
    full = {role: torch.stack([m(torch.tensor([p])).logits[0, -1] for p in prompt_ids]) for role, m in models.items()}
    for role in ROLES:
        assert scores.letters[role].shape == (N_QUESTIONS, 4)
        torch.testing.assert_close(scores.letters[role], full[role][:, ids], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(scores.distance, distance(full["target"], full["expert"], "js"), atol=1e-5, rtol=1e-5)
    preds, alpha, fused = letter_predictions(scores, STEER)
    expected = full["target"][:, ids] + torch.as_tensor(alpha)[:, None] * (full["expert"][:, ids] - full["base"][:, ids])
    torch.testing.assert_close(fused, expected, atol=1e-3, rtol=1e-5)
    assert preds.tolist() == expected.argmax(-1).tolist()


@torch.inference_mode()
def test_stage2_on_llama3_letter_tokens(tok, questions, prompts, arm) -> None:
    """第二阶段：run_arm 给出的 pred_forced == 每行每模型对 [提示 + 生成（去掉 <|eot_id|>）+ cue] 整段前向、
    fuse_step 融合（β = 0）后在 "(" 之后的字母 id 上取 argmax。"""
    forced = forced_answer_ids({"target": tok, "expert": tok, "base": tok})
    ends = end_token_ids(tok, list(arm["models"].values()))
    result = run_arm(arm["name"], questions, {role: prompts for role in ROLES}, arm["models"], tok, fast=False,
                     vocab_size=VOCAB_SIZE, batch_size=N_QUESTIONS, max_new_tokens=STEPS, end_ids=ends,
                     steering=arm["steering"], progress=False, roles=arm["roles"], forced=forced)
    tokens = reference(arm["group"], prompts, arm["steering"], list(END_IDS), tok.pad_token_id).tokens
    assert tokens[arm["eot"][0]][-1] == EOT_ID
    needed = 0
    for j, record in enumerate(result.records):
        if record["pred_text"] is not None:
            assert record["pred_forced"] is None
            continue
        needed += 1
        body = tokens[j][:-1] if tokens[j][-1] in END_IDS else tokens[j]
        ids = torch.tensor([prompts[j] + body + list(forced.cue_ids)])
        z = [m(ids).logits[:, -1, :VOCAB_SIZE].float() for m in arm["group"]]
        fused = z[0] if arm["steering"] is None else fuse_step(z[0], z[1], z[2], arm["steering"])[0]
        assert record["pred_forced"] == "ABCD"[int(fused[0, list(forced.letter_ids)].argmax())]
        assert record["pred"] == record["pred_forced"]
    assert needed >= 1
