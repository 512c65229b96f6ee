"""投机解码参考循环（speculative.generate_speculative）的正确性。

贪心：每个 token 与 evaluator.generate_batch 相同（K = 1, 2, 4 × 每种草稿规则 × 基线/各种引导臂，变长左填充的批，
结束记号落在被接受的草稿里，max_new_tokens 不是 K+1 的倍数）；oracle 草稿（接受率 100%）与无关草稿（接受率低）；
自适应关闭；接受统计的不变量。采样：纯函数 accept_reject 的卡方检验、端到端的边缘分布与精确融合分布的卡方检验、
批无关性、coupled 规则与 generate_batch 逐 token 相同。最后用 SmolLM2 + 层截断草稿做一次真实模型的核对。

小模型都是 fp32 的随机 Llama；lm_head 放大使 argmax 没有近似平局（采样测试另用较“软”的模型）。
所有随机数都由固定的 key 决定，统计检验每次结果相同、不会偶发失败。
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from scipy import stats
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

# ---- 集中导入：重构后 SteeringParams → steering_utils、Sampling → sampling.py，只改这里 ----
from evaluator import generate_batch
from sampling import Sampling, counter_uniform, sample_tokens, sampling_keys
from steering_utils import SteeringParams, fuse_step
from speculative import (SpecResult, acceptance_record, acceptance_summary, accept_reject, fused_probs,
                         generate_speculative, simulate_acceptance, stream_keys, truncated_copy)

VOCAB = 96
PAD = 0
PROMPTS = [[5, 17, 23, 9, 41, 7, 3], [11, 2, 60], [33, 34, 35, 36, 37], [8, 9]]
PER_ROLE = [PROMPTS, [[8, 8] + p for p in PROMPTS], [p[1:] or p for p in PROMPTS]]  # 三个角色的提示长度各不相同
NEW = 13  # 不是 2、3、5 的倍数

STEERINGS = {
    "adaptive_js": SteeringParams(base_alpha=1.0, adaptive_scale=10.0, max_boost=1.0, metric="js"),
    "constant": SteeringParams(base_alpha=1.5, adaptive_scale=10.0, max_boost=1.0, schedule="constant"),
    "l2_plausible": SteeringParams(base_alpha=1.0, adaptive_scale=5.0, max_boost=1.0, metric="l2",
                                   plausibility_beta=0.1),
}


def tiny_llama(seed: int, vocab: int = VOCAB, head_scale: float = 40.0, layers: int = 2) -> LlamaForCausalLM:
    """hidden 64 的随机 Llama（GQA：4 头 / 2 KV 头）；lm_head × head_scale（40：argmax 无近似平局）。"""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


@pytest.fixture(scope="module")
def trio() -> list[LlamaForCausalLM]:
    return [tiny_llama(0), tiny_llama(1), tiny_llama(2)]


def reference(models: list, steering: SteeringParams | None, new: int = NEW, ends: tuple[int, ...] = (),
              sampling: Sampling | None = None, qids: list[int] | None = None) -> Any:
    """非投机的 generate_batch（基线看目标的提示，引导看三份不同的提示）。"""
    return generate_batch(models, PER_ROLE[:len(models)], vocab_size=VOCAB, max_new_tokens=new, end_ids=list(ends),
                          pad_id=PAD, steering=steering, sampling=sampling, question_ids=qids)


def speculate(models: list, steering: SteeringParams | None, k: int, draft: str, draft_model: Any = None,
              new: int = NEW, ends: tuple[int, ...] = (), **kw: Any) -> SpecResult:
    """generate_speculative 的简写；基线臂的 "expert" 草稿把专家（trio[1]）和它的提示作为 draft_model 传入。"""
    return generate_speculative(models, PER_ROLE[:len(models)], vocab_size=VOCAB, max_new_tokens=new,
                                end_ids=list(ends), pad_id=PAD, steering=steering, k=k, draft=draft,
                                draft_model=draft_model, **kw)


def check_accounting(r: SpecResult) -> None:
    """接受统计的不变量：accepted ≤ drafted；verify_steps ≤ tokens ≤ accepted + verify_steps；汇总 = 逐行之和。"""
    assert r.drafted is not None and r.accepted is not None and r.verify_steps is not None
    for i, toks in enumerate(r.tokens):
        assert 0 <= r.accepted[i] <= r.drafted[i]
        assert r.verify_steps[i] <= len(toks) <= r.accepted[i] + r.verify_steps[i]
        assert r.verify_steps[i] <= r.rounds
        rec = acceptance_record(r, i)
        assert rec["tokens_per_verify"] == len(toks) / r.verify_steps[i]
    s = acceptance_summary([r, r])
    assert s["tokens"] == 2 * sum(len(t) for t in r.tokens) and s["rows"] == 2 * len(r.tokens)
    assert s["accepted"] == 2 * sum(r.accepted) and s["drafted"] == 2 * sum(r.drafted)
    assert s["tokens_per_verify"] == sum(len(t) for t in r.tokens) / sum(r.verify_steps)


# ---------------------------------------------------------------------------
# 贪心：与 generate_batch 逐 token 相同
# ---------------------------------------------------------------------------

CASES = [(None, d, k) for d in ("expert", "model") for k in (1, 2, 4)] + \
        [("adaptive_js", d, k) for d in ("expert", "fusion", "model") for k in (1, 2, 4)] + \
        [(s, d, k) for s in ("constant", "l2_plausible") for d in ("expert", "fusion", "model") for k in (1, 4)]


@pytest.mark.parametrize("arm,draft,k", CASES)
def test_greedy_identical_to_generate_batch(trio, arm, draft, k):
    """每个 token（以及 α、守卫计数）与非投机的参考循环相同；4 行、提示长度不同、三角色提示不同。"""
    steering = STEERINGS[arm] if arm else None
    models = list(trio) if steering else [trio[0]]
    # 基线的 "expert" 草稿 = 专家模型；"model" 草稿 = 一个 3 层的无关随机模型
    draft_model = tiny_llama(5, layers=3) if draft == "model" else (trio[1] if steering is None else None)
    ref = reference(models, steering)
    got = speculate(models, steering, k, draft, draft_model)
    assert got.tokens == ref.tokens
    assert got.steps == ref.steps
    if steering is not None:
        assert got.nonfinite == ref.nonfinite
        for a, b in zip(got.alpha, ref.alpha):
            assert a == pytest.approx(b, abs=1e-5)
    check_accounting(got)


def test_steering_arms_differ_from_baseline(trio):
    """健全性：各引导臂的输出与基线不同（否则上面的逐 token 相同可能什么都没测）。"""
    base = reference([trio[0]], None).tokens
    for s in STEERINGS.values():
        assert reference(list(trio), s).tokens != base


@pytest.mark.parametrize("k", [2, 4])
def test_end_id_inside_accepted_draft(trio, k):
    """oracle 草稿（草稿 = 目标）下，结束记号落在被接受的草稿中间：该行恰在参考循环停的地方停，之后的 token 不输出。"""
    target = trio[0]
    free = reference([target], None).tokens[0]
    # 第 0 行第一轮（第 1..k 个 token 是草稿）里、之前没出现过的 token 作为结束记号
    pos = next(j for j in range(1, k + 1) if free[j] not in free[:j])
    end = free[pos]
    ref = reference([target], None, ends=(end,))
    got = speculate([target], None, k, "model", target, ends=(end,))
    assert got.tokens == ref.tokens
    assert got.tokens[0] == free[:pos + 1]
    assert got.accepted is not None and got.verify_steps is not None
    assert len(got.tokens[0]) < got.accepted[0] + got.verify_steps[0]  # 那一轮验证者自己的 token 没有输出
    check_accounting(got)


def test_end_id_steered_with_expert_draft(trio):
    """引导臂、专家草稿：任选的结束记号让各行在不同位置停下，结果仍与参考相同。"""
    steering = STEERINGS["adaptive_js"]
    free = reference(list(trio), steering).tokens
    ends = (free[0][4], free[2][7])
    ref = reference(list(trio), steering, ends=ends)
    assert len({len(t) for t in ref.tokens}) > 1  # 各行停在不同的长度
    for draft in ("expert", "fusion"):
        got = speculate(list(trio), steering, 2, draft, ends=ends)
        assert got.tokens == ref.tokens
        check_accounting(got)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_oracle_draft_accepts_everything(trio, k):
    """草稿 = 目标：接受率 100%，每轮（prefill 之后）产出 K+1 个 token，验证次数 = 1 + ⌈(N−1)/(K+1)⌉。"""
    target = trio[0]
    got = speculate([target], None, k, "model", target)
    assert got.tokens == reference([target], None).tokens
    assert got.accepted == got.drafted and sum(got.drafted or []) > 0
    rounds = 1 + -(-(NEW - 1) // (k + 1))
    assert got.rounds == rounds and got.verify_steps == [rounds] * len(PROMPTS)
    assert acceptance_summary([got])["acceptance"] == 1.0


def test_oracle_draft_steered(trio):
    """引导臂的 oracle：专家 = 基座且提示相同（z_e − z_b ≡ 0，融合 = 目标），草稿 = 目标 → 全部接受，输出 = 参考。"""
    target, expert = trio[0], trio[1]
    steering = STEERINGS["adaptive_js"]
    prompts = [PROMPTS, PER_ROLE[1], PER_ROLE[1]]
    ref = generate_batch([target, expert, expert], prompts, vocab_size=VOCAB, max_new_tokens=NEW, end_ids=[],
                         pad_id=PAD, steering=steering)
    got = generate_speculative([target, expert, expert], prompts, vocab_size=VOCAB, max_new_tokens=NEW, end_ids=[],
                               pad_id=PAD, steering=steering, k=4, draft="model", draft_model=target)
    assert got.tokens == ref.tokens
    assert got.accepted == got.drafted


def test_unrelated_draft_low_acceptance_and_switch_off(trio):
    """无关的随机草稿：接受率低，输出仍相同；min_acceptance 让各行关掉起草（K_r = 0），输出还是相同、起草更少。"""
    target = trio[0]
    other = tiny_llama(7)
    ref = reference([target], None, new=24)
    plain = speculate([target], None, 4, "model", other, new=24)
    assert plain.tokens == ref.tokens
    assert acceptance_summary([plain])["acceptance"] < 0.3
    adaptive = speculate([target], None, 4, "model", other, new=24, min_acceptance=0.5, warmup=4)
    assert adaptive.tokens == ref.tokens
    assert all(adaptive.switched_off or [])
    assert sum(adaptive.drafted or []) < sum(plain.drafted or [])
    check_accounting(adaptive)
    # 引导臂也一样（专家草稿在随机专家下接受率低）
    steering = STEERINGS["adaptive_js"]
    steered = speculate(list(trio), steering, 4, "expert", new=24, min_acceptance=0.9, warmup=4)
    assert steered.tokens == reference(list(trio), steering, new=24).tokens
    assert any(steered.switched_off or [])


def test_k_zero_is_plain_decoding(trio):
    """K = 0：每轮一个普通步，走同一条验证路径；没有起草。"""
    got = speculate(list(trio), STEERINGS["adaptive_js"], 0, "expert")
    assert got.tokens == reference(list(trio), STEERINGS["adaptive_js"]).tokens
    assert got.drafted == [0] * len(PROMPTS) and got.rounds == NEW


def test_argument_errors(trio):
    """不合法的组合尽早、清楚地报错。"""
    with pytest.raises(ValueError, match="fusion"):
        speculate([trio[0]], None, 2, "fusion", trio[1])
    with pytest.raises(ValueError, match="draft_model"):
        speculate([trio[0]], None, 2, "expert")
    with pytest.raises(ValueError, match="k="):
        speculate([trio[0]], None, -1, "model", trio[1])
    with pytest.raises(ValueError, match="draft="):
        speculate([trio[0]], None, 2, "nope", trio[1])


@torch.no_grad()
def teacher_forced(model: Any, prompt: list[int], out: list[int]) -> torch.Tensor:
    """无缓存、无填充：模型看着 prompt + out[:j] 给出的第 j 个位置的 logits，(len(out), V)。"""
    logits = model(torch.tensor([prompt + out[:-1]])).logits[0, -len(out):, :VOCAB].float()
    return logits


@pytest.mark.parametrize("arm,draft,k", [(None, "model", 2), ("adaptive_js", "expert", 4),
                                         ("adaptive_js", "fusion", 2), ("l2_plausible", "fusion", 4)])
def test_simulate_acceptance_matches_the_loop(trio, arm, draft, k):
    """simulate_acceptance（由教师强制的猜中序列推出统计）与真实循环的 drafted / accepted / verify_steps 逐行相同，
    包括结束记号落在草稿里的行。"""
    steering = STEERINGS[arm] if arm else None
    models = list(trio) if steering else [trio[0]]
    draft_model = trio[0] if draft == "model" else None  # oracle 草稿：多数位置猜中，长的接受串也被检验到
    free = reference(models, steering).tokens
    ends = (free[1][6],)
    got = speculate(models, steering, k, draft, draft_model, ends=ends)
    for b, y in enumerate(got.tokens):
        if draft == "model":
            guess = teacher_forced(draft_model, PER_ROLE[0][b], y).argmax(-1)
        else:
            assert steering is not None
            ze, zb = (teacher_forced(trio[r], PER_ROLE[r][b], y) for r in (1, 2))
            guess = (ze if draft == "expert" else fuse_step(zb, ze, zb, steering)[0]).argmax(-1)
        sim = simulate_acceptance((guess == torch.tensor(y)).tolist(), k, NEW)
        assert (sim["drafted"], sim["accepted"], sim["verify_steps"], sim["tokens"]) == \
            (got.drafted[b], got.accepted[b], got.verify_steps[b], len(y))


# ---------------------------------------------------------------------------
# 采样：纯函数的卡方检验、端到端分布、批无关性、coupled 与参考逐 token 相同
# ---------------------------------------------------------------------------

def _keys(n: int, chain: int) -> torch.Tensor:
    """n 个确定的 key（题目 index 0..n−1，chain 区分流）。"""
    return sampling_keys(123, torch.arange(n), chain, 0)


def _chisquare(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """样本 (N,) 对理论分布 probs (V,) 的卡方检验 p 值；期望数 < 5 的格子并成一格（概率为 0 的格子要求计数为 0）。"""
    n = samples.numel()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "a token with probability 0 was produced"
    exp = probs.double() * n
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    ex = torch.cat([exp[big], exp[~big].sum(0, keepdim=True)])
    obs, ex = obs[ex > 0], ex[ex > 0]
    return float(stats.chisquare(obs.numpy(), ex.numpy() * obs.sum().item() / ex.sum().item()).pvalue)


@pytest.mark.parametrize("case", range(3))
def test_accept_reject_preserves_p(case):
    """纯函数：x ~ q（Gumbel-max），以 min(1, p/q) 接受、否则从残差重抽 → 输出 ~ p（卡方 p 值不小）。"""
    gen = torch.Generator().manual_seed(case)
    v, n = 7, 40000
    p = torch.softmax(torch.randn(v, generator=gen) * 1.5, -1)
    q = torch.softmax(torch.randn(v, generator=gen) * 1.5, -1)
    if case == 1:
        p[0] = 0.0  # p 的支撑更小（如 top-p 截掉的词）：这样的草稿必被拒
        p = p / p.sum()
    if case == 2:
        q[1] = 0.0  # q 的支撑更小：p 在那里的质量只能由残差补上
        q = q / q.sum()
    P, Q = p.expand(n, v).clone(), q.expand(n, v).clone()
    draft = sample_tokens(Q.log(), _keys(n, 1), 1.0)
    u = counter_uniform(_keys(n, 2), 1)[:, 0]
    before = (P.clone(), Q.clone(), draft.clone(), u.clone())
    ok, tok = accept_reject(P, Q, draft, u, _keys(n, 3))
    assert all(torch.equal(a, b) for a, b in zip(before, (P, Q, draft, u)))  # 不修改输入
    assert _chisquare(draft, q) > 1e-3  # 草稿确实 ~ q
    assert _chisquare(tok, p) > 1e-3
    # 接受率 = Σ min(p, q)（二项分布的 5σ 以内）
    rate, expect = ok.double().mean().item(), torch.minimum(p, q).sum().item()
    assert abs(rate - expect) < 5 * (expect * (1 - expect) / n) ** 0.5
    # 逐行独立：单独一行的结果与在整批里相同
    for i in (0, 17, n - 1):
        ok1, tok1 = accept_reject(P[i:i + 1], Q[i:i + 1], draft[i:i + 1], u[i:i + 1], _keys(n, 3)[i:i + 1])
        assert bool(ok1) == bool(ok[i]) and int(tok1) == int(tok[i])


def test_accept_reject_edge_cases():
    """p = q 时总是接受；草稿落在 p = 0 的词上总是被拒、重抽的词在 p 的支撑内。"""
    p = torch.tensor([[0.5, 0.5, 0.0]] * 4)
    ok, tok = accept_reject(p, p.clone(), torch.tensor([0, 1, 0, 1]), torch.full((4,), 0.999), _keys(4, 3))
    assert ok.all() and tok.tolist() == [0, 1, 0, 1]
    q = torch.tensor([[0.0, 0.0, 1.0]] * 4)
    ok, tok = accept_reject(p, q, torch.full((4,), 2), torch.full((4,), 1e-6), _keys(4, 3))
    assert not ok.any() and set(tok.tolist()) <= {0, 1}


def test_fused_probs_is_what_sample_tokens_draws():
    """fused_probs（温度 + top-p）正是 sample_tokens 抽样的分布：卡方核对。"""
    n = 30000
    logits = torch.tensor([2.0, 1.5, 0.3, -0.5, 0.9, -2.0, 1.1])
    probs = fused_probs(logits[None], 0.7, 0.8)[0]
    assert (probs == 0).any()  # top-p 确实截掉了一些词
    draws = sample_tokens(logits.expand(n, -1), _keys(n, 0), 0.7, 0.8)
    assert _chisquare(draws, probs) > 1e-3


SOFT_VOCAB = 16


@torch.no_grad()
def exact_marginals(models: list, prompt: list[int], steering: SteeringParams, s: Sampling,
                    depth: int) -> list[torch.Tensor]:
    """枚举全部前缀（无缓存、整段重算），算融合采样分布下第 0..depth−1 个生成 token 的精确边缘分布。"""
    prefixes, weights = [[]], torch.ones(1, dtype=torch.float64)
    out = []
    for _ in range(depth):
        ids = torch.tensor([prompt + pre for pre in prefixes])
        z = [m(ids).logits[:, -1, :SOFT_VOCAB].float() for m in models]
        probs = fused_probs(fuse_step(z[0], z[1], z[2], steering)[0], s.temperature, s.top_p).double()
        joint = weights[:, None] * probs  # (前缀数, V)
        out.append(joint.sum(0))
        prefixes = [pre + [t] for pre in prefixes for t in range(SOFT_VOCAB)]
        weights = joint.reshape(-1)
    return out


def test_speculative_sampling_distribution():
    """端到端：residual 规则下（引导臂、专家草稿、K = 2），第 1..3 个 token（经草稿接受/拒绝/额外 token 产生）
    的边缘分布与精确的融合采样分布一致（卡方）；N = 1500 道“题”（不同的 question id，同一提示）。"""
    models = [tiny_llama(10 + i, vocab=SOFT_VOCAB, head_scale=6.0) for i in range(3)]
    steering = STEERINGS["adaptive_js"]
    s = Sampling(temperature=1.0, top_p=0.95, seed=7)
    prompt, n, depth = [5, 9, 3], 1500, 4
    exact = exact_marginals(models, prompt, steering, s, depth)
    got = generate_speculative(models, [[prompt] * n] * 3, vocab_size=SOFT_VOCAB, max_new_tokens=depth, end_ids=[],
                               pad_id=PAD, steering=steering, sampling=s, question_ids=list(range(n)), k=2,
                               draft="expert")
    toks = torch.tensor(got.tokens)
    summary = acceptance_summary([got])
    assert 0.2 < summary["acceptance"] < 0.95  # 既有接受也有拒绝：两条路径都被检验到
    for j in range(depth):
        assert _chisquare(toks[:, j], exact[j].float()) > 1e-3, f"token {j}"


def test_speculative_sampling_is_batch_independent(trio):
    """一道题的样本只取决于 (seed, 题目 index, chain)：单独解码与在批里解码相同（residual 与 coupled）。"""
    soft = [tiny_llama(20 + i, head_scale=4.0) for i in range(3)]
    s = Sampling(temperature=0.9, top_p=1.0, seed=3)
    qids = [40, 7, 12, 99]
    for rule in ("residual", "coupled"):
        batch = generate_speculative(soft, PER_ROLE, vocab_size=VOCAB, max_new_tokens=NEW, end_ids=[], pad_id=PAD,
                                     steering=STEERINGS["adaptive_js"], sampling=s, question_ids=qids, k=2,
                                     draft="fusion", sampling_rule=rule)
        for i in (1, 3):
            alone = generate_speculative(soft, [[p[i]] for p in PER_ROLE], vocab_size=VOCAB, max_new_tokens=NEW,
                                         end_ids=[], pad_id=PAD, steering=STEERINGS["adaptive_js"], sampling=s,
                                         question_ids=[qids[i]], k=2, draft="fusion", sampling_rule=rule)
            assert alone.tokens[0] == batch.tokens[i]


@pytest.mark.parametrize("draft", ["expert", "model"])
def test_coupled_sampling_identical_to_generate_batch(draft):
    """coupled 规则：验证者用与 generate_batch 相同的 key 抽样 → 逐 token 相同；草稿共享噪声 → 有接受。"""
    soft = [tiny_llama(30 + i, head_scale=4.0) for i in range(3)]
    s = Sampling(temperature=0.8, top_p=0.9, seed=11, chain=2)
    qids = [3, 1, 4, 15]
    steering = STEERINGS["adaptive_js"]
    ref = generate_batch(soft, PER_ROLE, vocab_size=VOCAB, max_new_tokens=NEW, end_ids=[], pad_id=PAD,
                         steering=steering, sampling=s, question_ids=qids)
    got = generate_speculative(soft, PER_ROLE, vocab_size=VOCAB, max_new_tokens=NEW, end_ids=[], pad_id=PAD,
                               steering=steering, sampling=s, question_ids=qids, k=3, draft=draft,
                               draft_model=soft[0] if draft == "model" else None, sampling_rule="coupled")
    assert got.tokens == ref.tokens
    assert sum(got.accepted or []) > 0
    check_accounting(got)


def test_stream_keys_are_distinct():
    """四个随机数流（普通 / 草稿 / 接受 / 残差）在同一 (题目, 步) 上给出不同的 key；普通流就是 generate_batch 的 key。"""
    s = Sampling(temperature=1.0, top_p=1.0, seed=5, chain=1)
    keys = [int(stream_keys(s, 9, tag, [4])[0]) for tag in range(4)]
    assert len(set(keys)) == 4
    assert keys[0] == int(sampling_keys(5, torch.tensor([9]), 1, 4)[0])


# ---------------------------------------------------------------------------
# 真实模型：SmolLM2（fp32）+ 层截断草稿，2 道 MedQA 题
# ---------------------------------------------------------------------------

def test_smollm2_truncated_draft_identical(smol_path: str, smol_tokenizer: Any) -> None:
    """SmolLM2-135M（fp32）做目标，草稿是只留前 10 层（共 30 层）的拷贝：2 道 MedQA dev 题、16 个新 token 与参考相同；
    再用 --demo 的三角色（同一模型、三种系统提示）跑引导臂 + 专家草稿（1 道题、12 个 token）。
    用 dev 集里提示最短的两道题（779、298，约 130 token）：CPU 上的时间几乎全花在 prefill 上。"""
    import config
    import data_loader
    from model_loader import end_token_ids

    model = AutoModelForCausalLM.from_pretrained(smol_path, dtype=torch.float32).eval()
    draft = truncated_copy(model, 10)
    assert len(draft.model.layers) == 10 and len(model.model.layers) == 30
    questions, _ = data_loader.load_medqa(data_file=f"{config.BUNDLED_DATA_DIR}/dev.jsonl")
    questions = [next(q for q in questions if q.index == i) for i in (779, 298)]
    systems = [config.SYSTEM_PROMPT, config.DEMO_EXPERT_SYSTEM_PROMPT, config.DEMO_BASE_SYSTEM_PROMPT]
    prompts = [data_loader.encode_prompts([data_loader.format_prompt(q, smol_tokenizer, sp) for q in questions],
                                          smol_tokenizer) for sp in systems]
    common: dict[str, Any] = dict(vocab_size=len(smol_tokenizer), end_ids=end_token_ids(smol_tokenizer, [model]),
                                  pad_id=smol_tokenizer.pad_token_id)
    ref = generate_batch([model], prompts[:1], max_new_tokens=16, **common)
    got = generate_speculative([model], prompts[:1], max_new_tokens=16, k=4, draft="model", draft_model=draft,
                               **common)
    assert got.tokens == ref.tokens
    check_accounting(got)
    steering = SteeringParams(base_alpha=1.0, adaptive_scale=10.0, max_boost=1.0)
    one = [p[:1] for p in prompts]
    ref_s = generate_batch([model] * 3, one, steering=steering, max_new_tokens=12, **common)
    got_s = generate_speculative([model] * 3, one, steering=steering, max_new_tokens=12, k=3, draft="expert",
                                 **common)
    assert got_s.tokens == ref_s.tokens
    check_accounting(got_s)
