"""lm_eval_adapter / eval.py：lm-evaluation-harness 里的引导模型。CPU、离线。

- 适配器对照独立的慢速计算：loglikelihood（每个请求、每个角色一次整句前向，逐位置用 steering_utils 融合）、
  is_greedy、loglikelihood_rolling、基线 = 目标单独、generate_until（停止串、max_gen_toks、与 generate_batch 逐 token 相同）。
- 交叉核对：本地任务 medqa_4options_local（lm-eval medqa_4options 的提示）上，lm-eval 的逐题预测与准确率
  与 `main.py --scoring letter` 逐题相同——小随机 Llama 三角色与 SmolLM2 演示三角色，基线与引导两个臂。
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

# --- 项目内的名字：集中在这一处，代码重组时只改这里 ---
import eval as lm_eval_cli  # noqa: E402
import main  # noqa: E402
from data_loader import load_questions  # noqa: E402
from evaluator import generate_batch  # noqa: E402
from lm_eval_adapter import SteeredLM, predictions_from_samples  # noqa: E402
from steering_utils import SteeringParams, apply_plausibility, compute_steered_logits, schedule_alpha  # noqa: E402
from scoring import letter_prompt  # noqa: E402
from shared_runs import tiny_llama as shared_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_JSONL = os.path.join(ROOT, "data", "medqa", "test.jsonl")
N_QUESTIONS = 10
SMOL_QUESTIONS = 5
PREFIXES = {"target": "", "expert": "You are a physician.\n\n", "base": "You are an assistant.\n\n"}
ADAPTIVE = SteeringParams(base_alpha=1.0, adaptive_scale=10.0, max_boost=1.0)
INVERSE_L2_BETA = SteeringParams(base_alpha=0.5, adaptive_scale=4.0, max_boost=1.5, metric="l2",
                                 schedule="adaptive_inverse", plausibility_beta=0.05)
CONTEXTS = ["Question: What is the capital of France?\nAnswer:", "The patient presents with",
            "A 45-year-old man has chest pain. The most likely diagnosis is"]
CONTINUATIONS = [" Paris", " a fever and a cough", " myocardial infarction."]


def tiny_llama(seed: int, vocab: int) -> LlamaForCausalLM:
    """与 SmolLM2 分词器同词表的小随机 Llama（fp32）。lm_head 放大，logits 拉开，argmax 不会近似平局。"""
    return shared_tiny_llama(vocab, seed, head_scale=8.0, hidden=32, layers=1, max_positions=512, pad_id=2)


@pytest.fixture(autouse=True)
def no_env_report(monkeypatch):
    """lm-eval 的 simple_evaluate 每次都收集一份环境报告写进结果（torch.utils.collect_env 会起 pip 等子进程，每次约
    0.7 秒，本文件调用五次）；这里没有测试读它，换成空操作。逐题的预测与 acc 不受影响。"""
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda storage: None)


@pytest.fixture(scope="module")
def trio(smol_tokenizer):
    return {role: tiny_llama(seed, len(smol_tokenizer)) for seed, role in enumerate(("target", "expert", "base"))}


def adapter(trio, tok, steering, **kw) -> SteeredLM:
    return SteeredLM(trio, tok, vocab_size=len(tok), steering=steering, prefixes=PREFIXES, batch_size=2, **kw)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.inference_mode()
def slow_fused_log_probs(models, role_ids: dict[str, list[int]], n: int, steering) -> torch.Tensor:
    """独立的慢速参考：每个角色对自己的完整序列做一次（不填充的）前向，取预测最后 n 个 token 的 n 个位置，
    逐位置用 steering_utils 融合（α 按该位置自己的距离），返回 (n, V) 对数概率。"""
    z = {}
    for role, ids in role_ids.items():
        logits = models[role](input_ids=torch.tensor([ids])).logits[0]  # (L, V)
        z[role] = logits[len(ids) - n - 1: len(ids) - 1].float()
    rows = []
    for j in range(n):
        zt = z["target"][j:j + 1]
        if steering is None:
            rows.append(F.log_softmax(zt, -1))
            continue
        ze, zb = z["expert"][j:j + 1], z["base"][j:j + 1]
        alpha = schedule_alpha(zt, ze, steering)
        fused = compute_steered_logits(zt, ze, zb, alpha)
        if steering.plausibility_beta > 0:
            fused = apply_plausibility(fused, zt, steering.plausibility_beta)
        rows.append(F.log_softmax(fused, -1))
    return torch.cat(rows)


def split_like_lm_eval(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval 对因果模型的切分（TemplateLM._encode_pair）：整串编码，前 len(encode(上下文)) 个是上下文。"""
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, tok.encode(context + continuation, add_special_tokens=False)[len(ctx):]


@pytest.mark.parametrize("steering", [ADAPTIVE, INVERSE_L2_BETA, None], ids=["adaptive", "inverse-l2-beta", "baseline"])
def test_loglikelihood_matches_slow_reference(trio, smol_tokenizer, steering):
    tok = smol_tokenizer
    lm = adapter(trio, tok, steering)
    got = lm.loglikelihood(requests("loglikelihood", list(zip(CONTEXTS, CONTINUATIONS))))
    for (context, continuation), (ll, greedy) in zip(zip(CONTEXTS, CONTINUATIONS), got):
        ctx, cont = split_like_lm_eval(tok, context, continuation)
        role_ids = {r: (tok.encode(PREFIXES[r] + context, add_special_tokens=False) if PREFIXES[r] else ctx) + cont
                    for r in lm.roles}
        lp = slow_fused_log_probs(trio, role_ids, len(cont), steering)
        picked = lp.gather(-1, torch.tensor(cont)[:, None])[:, 0]
        expected = float(picked.sum())
        if expected == float("-inf"):  # 可信度约束排除了某个续写 token
            assert ll == expected
        else:
            assert ll == pytest.approx(expected, rel=1e-4, abs=1e-3)
        assert greedy == bool((lp.argmax(-1) == torch.tensor(cont)).all())


def test_baseline_is_target_alone(trio, smol_tokenizer):
    """基线 = 目标模型单独的 log_softmax，与专家/基座无关（换掉它们结果不变）。"""
    tok = smol_tokenizer
    reqs = requests("loglikelihood", list(zip(CONTEXTS, CONTINUATIONS)))
    base = SteeredLM({"target": trio["target"]}, tok, vocab_size=len(tok), steering=None, batch_size=3)
    got = base.loglikelihood(reqs)
    for (context, continuation), (ll, _) in zip(zip(CONTEXTS, CONTINUATIONS), got):
        ctx, cont = split_like_lm_eval(tok, context, continuation)
        with torch.inference_mode():
            logits = trio["target"](input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1]
        expected = F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(cont)[:, None]).sum()
        assert ll == pytest.approx(float(expected), rel=1e-5, abs=1e-4)


def test_is_greedy_on_the_steered_decoders_own_tokens(trio, smol_tokenizer):
    """generate_batch（参考解码器）在融合分布上贪心选出的 token，在适配器里 is_greedy 为真、对数概率为各步最大值之和；
    把最后一个 token 换掉后为假。"""
    tok = smol_tokenizer
    lm = adapter(trio, tok, ADAPTIVE)
    role_ctx = {r: tok.encode(PREFIXES[r] + CONTEXTS[0], add_special_tokens=False) for r in lm.roles}
    result = generate_batch([trio[r] for r in lm.roles], [[role_ctx[r]] for r in lm.roles], vocab_size=len(tok),
                            max_new_tokens=4, end_ids=[], pad_id=tok.pad_token_id, steering=ADAPTIVE)
    gen = result.tokens[0]
    assert len(gen) == 4
    wrong = gen[:-1] + [(gen[-1] + 1) % len(tok)]
    (lp, greedy), (lp_wrong, greedy_wrong) = lm.score_tokens(
        [{r: role_ctx[r] + gen for r in lm.roles}, {r: role_ctx[r] + wrong for r in lm.roles}], [gen, wrong])
    assert greedy and not greedy_wrong
    assert lp > lp_wrong
    best = slow_fused_log_probs(trio, {r: role_ctx[r] + gen for r in lm.roles}, 4, ADAPTIVE).max(-1).values.sum()
    assert lp == pytest.approx(float(best), rel=1e-4)


def test_loglikelihood_rolling_matches_windows(trio, smol_tokenizer):
    """max_length = 16 迫使多个窗口（窗口长度扣掉最长的角色前缀）：总和等于 lm-eval 的每个窗口各自慢速融合打分之和。"""
    tok = smol_tokenizer
    text = ("The mitral valve separates the left atrium from the left ventricle of the heart; the tricuspid valve "
            "separates the right atrium from the right ventricle.")
    lm = adapter(trio, tok, ADAPTIVE, max_length=16)
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    tokens = tok.encode(text, add_special_tokens=False)
    size = 16 - max(len(tok.encode(p, add_special_tokens=False)) for p in PREFIXES.values())
    assert lm.rolling_window() == size
    windows = list(map(make_disjoint_window, get_rolling_token_windows(tokens, lm.prefix_token_id, size, 1)))
    assert len(windows) > 2
    expected = 0.0
    for ctx, pred in windows:
        role_ids = {r: tok.encode(PREFIXES[r], add_special_tokens=False) + ctx + pred for r in lm.roles}
        assert max(len(ids) for ids in role_ids.values()) <= 16 + 1  # 模型输入是去掉最后一个 token 的序列
        lp = slow_fused_log_probs(trio, role_ids, len(pred), ADAPTIVE)
        expected += float(lp.gather(-1, torch.tensor(pred)[:, None]).sum())
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("fast", [True, False], ids=["FastDecoder", "generate_batch"])
def test_generate_until_cuts_at_stop_and_matches_generate_batch(trio, smol_tokenizer, fast):
    tok = smol_tokenizer
    lm = adapter(trio, tok, ADAPTIVE, fast=fast)
    role_ctx = {r: [tok.encode(PREFIXES[r] + c, add_special_tokens=False) for c in CONTEXTS] for r in lm.roles}
    ref = generate_batch([trio[r] for r in lm.roles], [role_ctx[r] for r in lm.roles], vocab_size=len(tok),
                         max_new_tokens=6, end_ids=lm.end_ids, pad_id=tok.pad_token_id, steering=ADAPTIVE)
    full = [tok.decode(t, skip_special_tokens=True) for t in ref.tokens]
    # 停止串取第 0 行第 3 个 token 的文本：第 0 行必须在它之前被截断
    stop = tok.decode(ref.tokens[0][3:4])
    assert stop and stop in full[0]
    out = lm.generate_until(requests("generate_until", [(c, {"until": [stop], "max_gen_toks": 6, "do_sample": False})
                                                        for c in CONTEXTS]))
    assert out == [t.split(stop)[0] for t in full]
    assert len(out[0]) < len(full[0])
    short = lm.generate_until(requests("generate_until", [(CONTEXTS[1], {"until": [], "max_gen_toks": 2})]))
    assert short == [tok.decode(ref.tokens[1][:2], skip_special_tokens=True).split(tok.eos_token)[0]]


# ---------------------------------------------------------------------------
# 交叉核对：lm-eval 的 medqa_4options（本地 YAML）vs main.py --scoring letter
# ---------------------------------------------------------------------------

def letter_run(tmp_path, name: str, flags: list[str], n: int = N_QUESTIONS) -> dict[str, dict[int, str]]:
    """main.py --scoring letter 的逐题预测 {臂: {题目 index: 字母}}。"""
    out = str(tmp_path / name)
    assert main.main(flags + ["--scoring", "letter", "--limit", str(n), "--output-dir", out]) == 0
    preds: dict[str, dict[int, str]] = {}
    with open(os.path.join(out, "predictions.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            preds.setdefault(rec["mode"], {})[rec["index"]] = rec["pred"]
    return preds


def lm_eval_run(tmp_path, name: str, flags: list[str]) -> dict[str, tuple[dict[int, str], float]]:
    """eval.py 在 medqa_4options_local 上的逐题预测与 acc：{臂: ({doc_id: 字母}, acc)}。flags 里没有 --samples 时取前
    N_QUESTIONS 题。"""
    out = str(tmp_path / name)
    pick = [] if "--samples" in flags else ["--limit", str(N_QUESTIONS)]
    cfg, opts = lm_eval_cli.parse_eval_args(flags + pick + ["--tasks", "medqa_4options_local", "--no-builtin-tasks",
                                                            "--output-dir", out])
    result = lm_eval_cli.run(cfg, opts, out)
    got = {}
    for arm, res in result["arms"].items():
        with open(os.path.join(out, arm, "results.json"), encoding="utf-8") as f:
            assert json.load(f)["results"]["medqa_4options_local"]["acc,none"] == res["results"][
                "medqa_4options_local"]["acc,none"]
        preds = predictions_from_samples(result["samples"][arm]["medqa_4options_local"])
        got[arm] = ({d: "ABCD"[p] for d, p in preds.items()}, res["results"]["medqa_4options_local"]["acc,none"])
    return got


def assert_same_predictions(letter: dict[str, dict[int, str]], harness: dict[str, tuple[dict[int, str], float]],
                            gold: dict[int, str]):
    for arm in ("baseline", "steered"):
        preds, acc = harness[arm]
        assert preds == letter[arm], f"{arm}: lm-eval {preds} vs letter scoring {letter[arm]}"
        assert acc == pytest.approx(sum(letter[arm][i] == gold[i] for i in gold) / len(gold))


def test_cross_check_tiny_llamas(trio, smol_tokenizer, tmp_path):
    """三个不同的小随机 Llama（SmolLM2 分词器），专家/基座各有系统提示前缀：两边逐题相同。"""
    dirs = []
    for role in ("target", "expert", "base"):
        d = str(tmp_path / role)
        trio[role].save_pretrained(d)
        smol_tokenizer.save_pretrained(d)
        dirs.append(d)
    flags = ["--target", dirs[0], "--expert", dirs[1], "--base", dirs[2], "--no-load-in-4bit", "--dtype", "float32",
             "--device", "cpu", "--batch-size", "4", "--expert-system-prompt", PREFIXES["expert"].strip(),
             "--base-system-prompt", PREFIXES["base"].strip()]
    letter = letter_run(tmp_path, "letter", flags + ["--data-file", TEST_JSONL])
    gold = {q.index: q.answer_idx for q in load_questions(TEST_JSONL, "test", N_QUESTIONS)[0]}
    assert_same_predictions(letter, lm_eval_run(tmp_path, "harness", flags), gold)
    # 注册名与 --model_args 字符串（lm-eval 的 create_from_arg_string）：键是 main.py 的参数名
    from lm_eval.api.registry import get_model

    args = (f"target={dirs[0]},expert={dirs[1]},base={dirs[2]},load_in_4bit=False,dtype=float32,device=cpu,"
            f"expert_system_prompt=E,base_system_prompt=B,schedule=constant,base_alpha=0.5,arm=steered")
    lm = get_model("domain-steered").create_from_arg_string(args, {"batch_size": 3, "device": None})
    assert isinstance(lm, SteeredLM) and lm.roles == ("target", "expert", "base") and lm.batch_size == 3
    assert lm.steering == SteeringParams(0.5, 10.0, 1.0, schedule="constant")
    assert lm.prefixes == {"target": "", "expert": "E\n\n", "base": "B\n\n"}
    base = get_model("steered-llama").create_from_arg_string(f"target={dirs[0]},load_in_4bit=False,dtype=float32,"
                                                             "device=cpu,arm=baseline")
    assert base.steering is None and base.roles == ("target",)


def test_cross_check_smollm2_demo(smol_path, tmp_path):
    """--demo：SmolLM2 扮演三个角色，专家/基座各用演示的系统提示（纯文本前缀）：两边逐题相同。
    CPU 上 1.35 亿参数的前向不便宜：取提示最短的 SMOL_QUESTIONS 道测试题（lm-eval 用 --samples 指定文档，
    main.py 读只含这几行的 JSONL），题目 index 换算回测试集的行号再比较。"""
    questions = load_questions(TEST_JSONL, "test", None)[0]
    ids = sorted(q.index for q in sorted(questions, key=lambda q: (len(letter_prompt(q)), q.index))[:SMOL_QUESTIONS])
    with open(TEST_JSONL, encoding="utf-8") as f:
        lines = f.read().splitlines()
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(lines[i] + "\n" for i in ids), encoding="utf-8")
    local = letter_run(tmp_path, "letter", ["--demo", "--data-file", str(subset)], n=len(ids))
    letter = {arm: {ids[j]: p for j, p in preds.items()} for arm, preds in local.items()}
    harness = lm_eval_run(tmp_path, "harness", ["--demo", "--samples", json.dumps({"medqa_4options_local": ids})])
    gold = {q.index: q.answer_idx for q in questions if q.index in ids}
    assert_same_predictions(letter, harness, gold)
    # lm-eval 自己的 `hf` 模型（HFLM，默认参数）在目标单独上给出同样的逐题预测：SmolLM2 的分词器不加 BOS，
    # 提示与切分与适配器的基线相同（Llama-3 的分词器会加 BOS，见 lm_eval_adapter 的说明）。
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf = HFLM(pretrained=smol_path, batch_size=SMOL_QUESTIONS, device="cpu", dtype="float32")
    out = simple_evaluate(model=hf, tasks=["medqa_4options_local"], samples={"medqa_4options_local": ids},
                          task_manager=TaskManager(include_path=lm_eval_cli.TASKS_DIR, include_defaults=False))
    hf_preds = predictions_from_samples(out["samples"]["medqa_4options_local"])
    assert {d: "ABCD"[p] for d, p in hf_preds.items()} == harness["baseline"][0] == letter["baseline"]


def test_letter_prompt_equals_lm_eval_prompt_on_every_test_question():
    """全部 1,273 道测试题：工具的字母打分提示与 lm-eval medqa_4options 的提示逐字相同（包括题干首尾有空白的
    243、448、660、1000、1056 题：以前 letter_prompt 去掉了这些空白，与 lm-eval 不同）。"""
    from tasks.medqa_4options_local import utils as task_utils

    questions, _, _ = load_questions(TEST_JSONL, "test", None)
    assert len(questions) == 1273
    assert sum(q.question != q.question.strip() for q in questions) == 5  # 这些题确实带空白：核对不是空的
    for q in questions:
        doc = {"sent1": q.question, **{f"ending{i}": q.options[k] for i, k in enumerate("ABCD")},
               "label": "ABCD".index(q.answer_idx)}
        assert task_utils.doc_to_text(doc) == letter_prompt(q), q.index
