"""领域引导的 *投机* 解码（speculative decoding）：参考循环（慢、显然正确），与 evaluator.generate_batch 逐 token 相同。

每一轮（verify step）：
  1. 草稿（draft）为每个活跃行提出 K_r ≤ K 个 token d_1..d_K（规则见 DRAFTS）；
  2. 每个验证模型（基线：目标；引导：目标、专家、基座）对 K+1 个位置 [last, d_1..d_K] 各做一次前向
     （作为草稿者的模型在起草时已逐个喂过前 K 个位置，验证时只再喂 d_K：起草的 logits 直接复用为验证 logits）；
  3. 每个位置 j 用 *它自己的* 三路 logits 经 evaluator.fuse_step 融合（α 由该位置自己的距离算出），
     选出验证者的 token v_j（贪心 argmax；采样见下）；
  4. 保留最长的一致前缀 d_1..d_m 再加验证者自己的下一个 token v_m（共 m+1 个）；被拒的位置“回滚”。

回滚的设计（每行各自的接受长度，没有行要等最慢的行）：KV 缓存（HF DynamicCache，全批共用一条序列维）
每轮总是追加 K+1 列；每行被拒的列（以及超出该行 K_r 的填充列、已结束行的列）在注意力掩码里置 0，
此后任何查询都看不见它们；位置编号显式给出 = 该行真实 token 的个数（提示长度 + 已接受的生成数），
所以被掩掉的列不占位置号，RoPE 与非投机解码完全相同。不裁剪缓存：DynamicCache.crop 在 transformers 5.17 与
5.24 之间改了语义（绝对长度 → 负的删除数），而且只能整批裁剪；代价是缓存每轮多 K−m 列被掩掉的槽位，
最坏 (K+1)·max_new_tokens 列（自适应关闭后每轮只加 1 列）。

采样（sampling 给出时）两种规则，都精确保持融合分布：
  - "residual"（Leviathan et al. 2023 / Chen et al. 2023）：草稿从 q（草稿 logits 经同样的温度/top-p 处理）
    抽 x，以 min(1, p(x)/q(x)) 接受，p 为融合分布（fused_probs）；拒绝时从 normalize(max(0, p − q)) 重抽；
    全部接受时的额外 token 从 p 抽。输出与非投机采样 *同分布*，但不是同一个样本。
  - "coupled"（Gumbel 耦合）：验证者在每个位置用与 generate_batch 完全相同的 pick_tokens（同一 key 的
    Gumbel-max），草稿也用同一 key 的 Gumbel 噪声在它自己的 logits 上取 argmax；接受 ⇔ 两者相同。
    输出与 generate_batch 的采样 *逐 token 相同*（与 K、草稿无关），接受率低于 residual 的最优耦合。

随机数流（都由 steering_utils.sampling_keys(seed, 题目 index, chain', step) 决定，与批的组成无关）：
  chain' = chain + tag · 2^48，tag 0 = 普通链（额外 token / 普通步，与 generate_batch 同一次抽取；coupled 的全部），
  tag 1 = residual 的草稿抽样，tag 2 = 接受检验的均匀数，tag 3 = 残差重抽。step = 该位置在该行输出中的下标。
  同一步的 tag 1/2/3 可能在被丢弃的位置上算过、下一轮再用：被丢弃的值从未影响任何已输出的决定，所以仍是“新的”。

本模块只新增文件；SteeringParams / Sampling / 采样原语的导入集中在下面一处，重构后只需改这里。
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Final, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

# ---- 集中导入：SteeringParams 将移到 steering_utils，Sampling/pick_tokens 等将移到 sampling.py，只改这里 ----
from evaluator import BatchResult, cache_kwarg, left_pad
from sampling import Sampling, counter_uniform, pick_tokens, sample_tokens, sampling_keys, top_p_filter
from steering_utils import SteeringParams, fuse_step, stop_nonfinite_target

DRAFTS: Final[tuple[str, ...]] = ("expert", "fusion", "model")
SAMPLING_RULES: Final[tuple[str, ...]] = ("residual", "coupled")
STREAM_SHIFT: Final[int] = 48  # chain' = chain + tag << 48：chain 必须 < 2^48
TAG_PLAIN, TAG_DRAFT, TAG_ACCEPT, TAG_RESIDUAL = 0, 1, 2, 3


# ---------------------------------------------------------------------------
# 纯函数：融合分布、接受/拒绝
# ---------------------------------------------------------------------------

def fused_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) logits → (B, V) float32 概率：sample_tokens 实际抽样的分布 softmax(top_p_filter((z − max)/T))。

    与 steering_utils.sample_tokens 的处理顺序逐步相同（先减最大值、除温度，再 top-p），
    所以 residual 规则保持的 p 正是非投机采样抽样的分布（测试用卡方核对）。不修改输入。
    """
    z = logits.float()
    z = (z - z.amax(dim=-1, keepdim=True)) / temperature
    if top_p < 1.0:
        z = top_p_filter(z, top_p)
    return torch.softmax(z, dim=-1)


def accept_reject(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u: torch.Tensor,
                  residual_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """投机采样的一个位置（纯函数，逐行独立）：返回 (accepted (N,) bool, token (N,) int64)。

    p, q: (N, V) 概率（目标/融合分布与草稿分布）；draft: (N,) 从 q 抽出的草稿 token；u: (N,) (0,1) 均匀数；
    residual_keys: (N,) 残差重抽的 key。规则：u·q(x) < p(x) 时接受（⇔ u < min(1, p(x)/q(x))，不做除法，
    q(x) = 0 也不出 NaN）；否则从 normalize(max(0, p − q)) 抽（Gumbel-max，sample_tokens 在 log 残差上、温度 1）。
    若残差数值上全为 0（p 与 q 逐位相同，此时拒绝的概率本为 0），退回 p。x ~ q 时输出 token 的分布恰为 p。
    """
    px = p.float().gather(-1, draft[:, None])[:, 0]
    qx = q.float().gather(-1, draft[:, None])[:, 0]
    accepted = u.float() * qx < px
    resid = (p.float() - q.float()).clamp_min(0.0)  # (N, V)
    empty = resid.sum(-1) <= 0
    resid = torch.where(empty[:, None], p.float(), resid)
    resampled = sample_tokens(resid.log(), residual_keys, 1.0)  # log 0 = −inf：这些词不会被抽到
    return accepted, torch.where(accepted, draft, resampled)


def stream_keys(sampling: Sampling, question_id: int, tag: int, steps: Sequence[int]) -> torch.Tensor:
    """一行在若干步上某个随机数流的 key，(len(steps),) int64。chain' = chain + tag·2^48（见模块文档）。"""
    if not 0 <= sampling.chain < 2 ** STREAM_SHIFT:
        raise ValueError(f"chain={sampling.chain} must be below 2^{STREAM_SHIFT} for speculative sampling streams")
    chain = sampling.chain + (tag << STREAM_SHIFT)
    qid = torch.tensor([question_id], dtype=torch.long)
    return torch.cat([sampling_keys(sampling.seed, qid, chain, s) for s in steps]) if steps else qid[:0]


def _pick_row(logits: torch.Tensor, sampling: Sampling | None, question_id: int, steps: Sequence[int]) -> list[int]:
    """一行在若干位置上的普通选词 (n, V) → n 个 token：贪心 argmax，或与 generate_batch 同一 key 的 pick_tokens。"""
    if sampling is None:
        return logits.argmax(-1).tolist()
    qid = torch.tensor([question_id], dtype=torch.long, device=logits.device)
    return [int(pick_tokens(logits[j:j + 1], sampling, qid, s)[0]) for j, s in enumerate(steps)]


# ---------------------------------------------------------------------------
# 每个模型一条缓存流：支持一次喂多个位置、按列掩掉被拒的槽位
# ---------------------------------------------------------------------------

class _Stream:
    """一个模型（一个角色）的 KV 缓存与掩码。掩码 = [提示掩码 (B, P_k) | 生成列掩码 (B, G)]；
    生成列对所有流一一对应（每轮各流都追加同样的 K+1 列），位置编号 = 该行提示长度 + 之前有效生成列的个数。"""

    def __init__(self, model: PreTrainedModel, prompts: Sequence[Sequence[int]], pad_id: int, vocab_size: int) -> None:
        self.model = model
        self.kwarg = cache_kwarg(model)
        self.vocab_size = vocab_size
        self.cache = DynamicCache(config=model.config)
        ids, self.prompt_mask = left_pad(prompts, pad_id, model.device)  # (B, P)
        self.prompt_len = self.prompt_mask.sum(-1)  # (B,)：下一个生成 token 的位置号
        self.gen_mask = self.prompt_mask.new_zeros(ids.shape[0], 0)  # (B, G)
        positions = (self.prompt_mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=self.prompt_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{self.kwarg: self.cache})
        self.first_logits = out.logits[:, -1, :vocab_size].float()  # (B, V)：第 0 个生成 token 的 logits

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
        """喂入 (B, n) 个新列；valid (B, n) bool 为初始掩码；fed (B,) 为每行此前有效生成列数。返回 (B, n, V) float32。"""
        device = self.model.device
        self.gen_mask = torch.cat([self.gen_mask, valid.long().to(device)], -1)
        n = tokens.shape[1]
        positions = (self.prompt_len + fed.to(device))[:, None] + torch.arange(n, device=device)[None, :]
        out = self.model(input_ids=tokens.to(device), attention_mask=torch.cat([self.prompt_mask, self.gen_mask], -1),
                         position_ids=positions, use_cache=True, **{self.kwarg: self.cache})
        return out.logits[..., :self.vocab_size].float()

    def keep_last(self, keep: torch.Tensor) -> None:
        """本轮结束：最后 n 列的掩码改为 keep (B, n)（被拒的、填充的槽位置 0，以后谁也看不见）。"""
        n = keep.shape[1]
        self.gen_mask[:, -n:] = keep.long().to(self.gen_mask.device)


# ---------------------------------------------------------------------------
# 结果与统计
# ---------------------------------------------------------------------------

@dataclass
class SpecResult(BatchResult):
    """BatchResult 加上每行的接受统计。drafted[i]：第 i 行被提出的草稿 token 数；accepted[i]：输出里来自草稿的
    token 数；verify_steps[i]：该行活跃时的验证前向次数（含 prefill 那一次：它产出第一个 token）；
    rounds：整批的验证前向次数；switched_off[i]：该行是否因接受率过低关闭了起草。
    不变量：accepted ≤ drafted；verify_steps ≤ len(tokens) ≤ accepted + verify_steps
    （只有结束记号落在被接受的草稿里时取 <：那一轮验证者自己的 token 不输出）。"""

    drafted: list[int] | None = None
    accepted: list[int] | None = None
    verify_steps: list[int] | None = None
    rounds: int = 0
    switched_off: list[bool] | None = None


def acceptance_record(result: SpecResult, row: int) -> dict[str, Any]:
    """一道题（一行）的接受记录：drafted、accepted、verify_steps、acceptance、tokens_per_verify。"""
    assert result.drafted is not None and result.accepted is not None and result.verify_steps is not None
    drafted, accepted, steps = result.drafted[row], result.accepted[row], result.verify_steps[row]
    tokens = len(result.tokens[row])
    return {"drafted": drafted, "accepted": accepted, "verify_steps": steps,
            "acceptance": accepted / drafted if drafted else None,
            "tokens_per_verify": tokens / steps if steps else None}


def acceptance_summary(results: Sequence[SpecResult]) -> dict[str, Any]:
    """一个臂（若干批）的接受统计之和：rows、tokens、drafted、accepted、verify_steps、rounds（批级前向数）、
    acceptance = accepted / drafted、tokens_per_verify = tokens / verify_steps（按行计的每次验证产出的 token 数）、
    switched_off（关闭了起草的行数）。"""
    tot = {"rows": 0, "tokens": 0, "drafted": 0, "accepted": 0, "verify_steps": 0, "rounds": 0, "switched_off": 0}
    for r in results:
        assert r.drafted is not None and r.accepted is not None and r.verify_steps is not None
        tot["rows"] += len(r.tokens)
        tot["tokens"] += sum(len(t) for t in r.tokens)
        tot["drafted"] += sum(r.drafted)
        tot["accepted"] += sum(r.accepted)
        tot["verify_steps"] += sum(r.verify_steps)
        tot["rounds"] += r.rounds
        tot["switched_off"] += sum(r.switched_off or [])
    return {**tot, "acceptance": tot["accepted"] / tot["drafted"] if tot["drafted"] else None,
            "tokens_per_verify": tot["tokens"] / tot["verify_steps"] if tot["verify_steps"] else None}


def simulate_acceptance(matches: Sequence[bool], k: int, max_new_tokens: int) -> dict[str, int]:
    """由“草稿在教师强制下是否猜中”的序列，精确复现 generate_speculative 贪心时一行的接受统计。

    matches[j]：草稿看着最终输出的前缀 y[:j] 时，贪心给出的 token 是否等于 y[j]（len(matches) = len(y)）。
    为什么精确：贪心下输出与草稿无关（无损），而一轮里草稿的第 i 个提议只在前 i−1 个都被接受时才有意义，
    那时它的上下文正是 y 的前缀；所以一轮从位置 n 起接受的个数 = min(K_r, 从 n 起连续猜中的个数)。
    规则与循环相同：第 0 个 token 由 prefill 给出（1 次验证、0 个草稿），K_r = min(K, max_new_tokens − n − 1)，
    结束记号之后不输出。返回 {"drafted", "accepted", "verify_steps", "tokens"}。
    """
    length = len(matches)
    if length == 0:
        return {"drafted": 0, "accepted": 0, "verify_steps": 0, "tokens": 0}
    n, drafted, accepted, steps = 1, 0, 0, 1
    while n < length:
        kr = min(k, max_new_tokens - n - 1)
        run = 0
        while run < kr and n + run < length and matches[n + run]:
            run += 1
        emitted = min(run + 1, length - n)
        drafted += kr
        accepted += min(run, emitted)
        steps += 1
        n += emitted
    return {"drafted": drafted, "accepted": accepted, "verify_steps": steps, "tokens": length}


@dataclass(frozen=True)
class Speculation:
    """一个臂的投机解码设置（evaluator.run_arm 的参数；来自 Config 的 speculate / draft / speculative_sampling /
    min_acceptance）。k ≥ 1；draft ∈ ("expert", "fusion")；sampling_rule 只在采样的臂上起作用。"""

    k: int
    draft: str = "expert"
    sampling_rule: str = "residual"
    min_acceptance: float = 0.0


def record_fields(result: SpecResult, row: int) -> dict[str, int]:
    """predictions.jsonl 一行里的接受统计：drafted、accepted、verify_steps（acceptance_record 的计数部分；
    比值由 stats.arm_metrics 按臂汇总，不逐题保存）。"""
    rec = acceptance_record(result, row)
    return {key: int(rec[key]) for key in ("drafted", "accepted", "verify_steps")}


def truncated_copy(model: PreTrainedModel, layers: int) -> PreTrainedModel:
    """层截断的草稿模型：深拷贝后只保留前 `layers` 个解码层（共用同一 norm 与 lm_head 的拷贝），不训练。"""
    total = len(model.model.layers)
    if not 1 <= layers <= total:
        raise ValueError(f"layers={layers} must be between 1 and the model's {total} layers")
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    return draft.eval()


# ---------------------------------------------------------------------------
# 投机解码循环
# ---------------------------------------------------------------------------

@torch.inference_mode()
def generate_speculative(
    models: Sequence[PreTrainedModel],
    prompts: Sequence[Sequence[Sequence[int]]],
    *,
    vocab_size: int,
    max_new_tokens: int,
    end_ids: Sequence[int],
    pad_id: int,
    steering: SteeringParams | None = None,
    sampling: Sampling | None = None,
    question_ids: Sequence[int] | None = None,
    k: int,
    draft: str = "expert",
    draft_model: PreTrainedModel | None = None,
    draft_prompts: Sequence[Sequence[int]] | None = None,
    sampling_rule: str = "residual",
    min_acceptance: float = 0.0,
    warmup: int = 16,
) -> SpecResult:
    """generate_batch 的投机版本（参数含义与它相同），贪心时每个 token 与 generate_batch 相同。

    k：每轮最多起草的 token 数（0 = 不投机，每轮一个普通步，走同一条验证路径）。
    draft（DRAFTS 之一）：
      "expert"：引导臂里专家独自贪心起草，它起草时的 logits 就是验证时专家那一路的 logits；
                基线臂（models = [目标]）没有专家，须把专家作为 draft_model 传入（draft_prompts 为它的提示）。
      "fusion"：只用专家与基座的融合 z_b + α·(z_e − z_b)：即 fuse_step(z_b, z_e, z_b)，基座站在目标的位置上，
                α 用本臂的调度规则、由 基座–专家 的距离算出，可信度约束也相对基座；只在引导臂可用。
      "model"：独立的草稿模型 draft_model（例如 truncated_copy 得到的层截断模型），看 draft_prompts
                （默认目标的提示），贪心起草；它的 logits 不参与验证。
    草稿只影响速度，从不影响贪心输出。
    sampling_rule（采样时）："residual"（Leviathan 接受/拒绝，同分布）或 "coupled"（与 generate_batch 同一样本）。
    min_acceptance > 0：某行起草满 warmup 个 token 后接受率 accepted/drafted 低于它，该行此后不再起草
    （K_r = 0，仍走同一验证路径，结果不变）；全批都不起草时独立草稿模型也不再前向。
    """
    if steering is not None and len(models) != 3:
        raise ValueError("steering needs three models: [target, expert, base]")
    if len(prompts) != len(models) or len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts must give one list per model, all with the same batch size")
    if sampling is not None and (question_ids is None or len(question_ids) != len(prompts[0])):
        raise ValueError("sampling needs question_ids (one per row): the random numbers are keyed by them")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k={k!r} must be an integer >= 0 (0 turns speculation off)")
    if draft not in DRAFTS:
        raise ValueError(f"draft={draft!r} is unknown; choose one of {', '.join(DRAFTS)}")
    if sampling_rule not in SAMPLING_RULES:
        raise ValueError(f"sampling_rule={sampling_rule!r} is unknown; choose one of {', '.join(SAMPLING_RULES)}")
    if draft == "fusion" and steering is None:
        raise ValueError("draft='fusion' needs the expert and the base, which the baseline arm does not load; "
                         "use draft='expert' with the expert as draft_model, or draft='model'")
    separate = draft == "model" or steering is None
    if separate and draft_model is None:
        raise ValueError(f"draft={draft!r} in this arm needs draft_model (the expert for the baseline arm's "
                         "'expert' draft, or a small draft model)")
    if not 0.0 <= min_acceptance <= 1.0:
        raise ValueError(f"min_acceptance={min_acceptance!r} must be in [0, 1] (0 never switches drafting off)")

    batch = len(prompts[0])
    device = models[0].device
    if max_new_tokens < 1:  # 与 generate_batch 相同：不生成任何 token
        return SpecResult(tokens=[[] for _ in range(batch)], alpha=[[] for _ in range(batch)] if steering else None,
                          steps=0, nonfinite=[0] * batch if steering else None, target_stops=[0] * batch,
                          drafted=[0] * batch,
                          accepted=[0] * batch, verify_steps=[0] * batch, rounds=0, switched_off=[False] * batch)
    qids = list(question_ids) if question_ids is not None else [-1] * batch
    ends = set(end_ids)
    residual = sampling is not None and sampling_rule == "residual"

    verifiers = [_Stream(m, p, pad_id, vocab_size) for m, p in zip(models, prompts)]
    if separate:
        assert draft_model is not None
        drafters = [_Stream(draft_model, draft_prompts if draft_prompts is not None else prompts[0], pad_id,
                            vocab_size)]
        draft_rule: Callable[[list[torch.Tensor]], torch.Tensor] = lambda z: z[0]
    elif draft == "expert":
        drafters = [verifiers[1]]
        draft_rule = lambda z: z[0]
    else:
        assert steering is not None
        drafters = [verifiers[1], verifiers[2]]
        draft_rule = lambda z: fuse_step(z[1], z[0], z[1], steering)[0]  # z = [专家, 基座] → z_b + α(z_e − z_b)
    stale = False  # 独立草稿模型是否已停止前向（全批 K = 0 之后不会再起草，见下）

    tokens: list[list[int]] = [[] for _ in range(batch)]
    alphas: list[list[float]] = [[] for _ in range(batch)]
    nonfinite = [0] * batch
    target_stops = [0] * batch  # 第 b 行是否因目标 logits 非有限而停止（与 generate_batch 同一规则）
    drafted, accepted_n, verify_steps = [0] * batch, [0] * batch, [0] * batch
    off = [False] * batch
    finished = [False] * batch

    def fuse(z: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(N, V) × 模型数 → 融合 logits (N, V)、α (N,)、坏行 (N,)、停止 (N,)；基线时就是目标 logits。
        停止 = 该位置目标 logits 非有限（stop_nonfinite_target，与 generate_batch 同一规则；该位置的 logits 换成 0）。"""
        fused, alpha, bad = (z[0], None, None) if steering is None else fuse_step(z[0], z[1], z[2], steering)
        fused, stop = stop_nonfinite_target(z[0], fused)
        return fused, alpha, bad, stop

    def emit(b: int, new: list[int], alpha: list[float], bad: list[bool], stop: list[bool]) -> None:
        """把一轮产出的 token 追加到第 b 行：遇到结束记号即截断并结束（之后的 token 不输出），α/守卫按位置记录。
        某位置 stop（目标 logits 非有限）时该行在这个位置之前结束：这个位置及之后的 token 都不输出，记一次停止。"""
        for j, t in enumerate(new):
            if stop[j]:
                target_stops[b] = 1
                finished[b] = True
                return
            tokens[b].append(t)
            if steering is not None:
                nonfinite[b] += int(bad[j])
                if not bad[j]:
                    alphas[b].append(alpha[j])
            if t in ends:
                finished[b] = True
                return
        if len(tokens[b]) >= max_new_tokens:
            finished[b] = True

    # ---- 第 0 步：prefill 的 logits 直接给出第一个 token（与 generate_batch 的第 0 步相同，算一次验证） ----
    fused0, alpha0, bad0, stop0 = fuse([s.first_logits.to(device) for s in verifiers])
    for b in range(batch):
        t0 = _pick_row(fused0[b:b + 1], sampling, qids[b], [0])  # 普通链：与 generate_batch 第 0 步的抽取相同
        verify_steps[b] += 1
        emit(b, t0, [float(alpha0[b])] if alpha0 is not None else [],
             [bool(bad0[b])] if bad0 is not None else [], [bool(stop0[b])])
    rounds = 1
    fed = torch.zeros(batch, dtype=torch.long)  # 每行已有效喂入缓存的生成 token 数（= 已输出数 − 1）

    while not all(finished):
        active = [not f for f in finished]
        for b in range(batch):
            if active[b] and min_acceptance > 0 and not off[b] and drafted[b] >= warmup \
                    and accepted_n[b] < min_acceptance * drafted[b]:
                off[b] = True
        k_row = [min(0 if off[b] else k, max_new_tokens - len(tokens[b]) - 1) if active[b] else 0
                 for b in range(batch)]
        K = max(k_row)
        if K == 0 and separate:
            stale = True  # K = 0 之后不会再 > 0：关闭是永久的、剩余预算只减不增、结束的行不再活跃
        if K > 0 and stale:
            raise AssertionError("internal error: the draft model stopped being fed but drafting resumed")
        cols = torch.full((batch, K + 1), pad_id, dtype=torch.long)
        valid = torch.zeros((batch, K + 1), dtype=torch.bool)
        for b in range(batch):
            if active[b]:
                cols[b, 0] = tokens[b][-1]
                valid[b, :k_row[b] + 1] = True
        n_out = [len(t) for t in tokens]  # 本轮第 j 个位置的 step = n_out[b] + j

        # ---- 起草：草稿者逐个位置前向，提出 d_1..d_K（超出 K_r 的列是填充、掩码为 0） ----
        draft_logits: list[list[torch.Tensor]] = [[] for _ in drafters]  # 每个草稿者 K 个 (B, V)
        q_logits: list[torch.Tensor] = []  # K 个 (B, V)：草稿规则的 logits
        for i in range(K):
            z = [s.forward(cols[:, i:i + 1], valid[:, i:i + 1], fed + i)[:, 0].to(device) for s in drafters]
            for lst, zi in zip(draft_logits, z):
                lst.append(zi)
            zq = draft_rule(z)
            q_logits.append(zq)
            for b in range(batch):
                if not valid[b, i + 1]:
                    continue
                step = n_out[b] + i
                if residual:
                    assert sampling is not None
                    key = stream_keys(sampling, qids[b], TAG_DRAFT, [step]).to(device)
                    d = int(sample_tokens(zq[b:b + 1], key, sampling.temperature, sampling.top_p)[0])
                else:
                    d = _pick_row(zq[b:b + 1], sampling, qids[b], [step])[0]
                cols[b, i + 1] = d

        # ---- 验证：每个验证模型得到 K+1 个位置的 logits (B, K+1, V) ----
        z_verify = []
        for s in verifiers:
            if any(s is d for d in drafters):
                idx = next(i for i, d in enumerate(drafters) if d is s)
                last = s.forward(cols[:, K:K + 1], valid[:, K:K + 1], fed + K).to(device)
                z_verify.append(torch.cat([torch.stack(draft_logits[idx], 1), last], 1) if K else last)
            else:
                z_verify.append(s.forward(cols, valid, fed).to(device))
        if separate and not stale:
            drafters[0].forward(cols[:, K:K + 1], valid[:, K:K + 1], fed + K)  # 保持草稿缓存与其他流列对齐
        flat = [z.reshape(batch * (K + 1), -1) for z in z_verify]
        fused, alpha, bad, stop = fuse(flat)  # 每个位置用它自己的 α（逐行距离）
        fused = fused.reshape(batch, K + 1, -1)
        alpha_t = alpha.reshape(batch, K + 1) if alpha is not None else None
        bad_t = bad.reshape(batch, K + 1) if bad is not None else None
        stop_t = stop.reshape(batch, K + 1)

        # ---- 逐行接受：最长一致前缀 + 验证者自己的下一个 token ----
        keep = torch.zeros((batch, K + 1), dtype=torch.bool)
        for b in range(batch):
            if not active[b]:
                continue
            kr = k_row[b]
            proposal = cols[b, 1:kr + 1].tolist()
            steps = [n_out[b] + j for j in range(kr + 1)]
            if residual:
                assert sampling is not None
                p = fused_probs(fused[b, :kr + 1], sampling.temperature, sampling.top_p)  # (kr+1, V)
                if kr:
                    q = fused_probs(torch.stack([zq[b] for zq in q_logits[:kr]]), sampling.temperature,
                                    sampling.top_p)
                    u = counter_uniform(stream_keys(sampling, qids[b], TAG_ACCEPT, steps[:kr]), 1)[:, 0]
                    ok, tok = accept_reject(p[:kr], q, torch.tensor(proposal, dtype=torch.long, device=device),
                                            u.to(device),
                                            stream_keys(sampling, qids[b], TAG_RESIDUAL, steps[:kr]).to(device))
                    ok_list = ok.tolist()
                    m = next((j for j, a in enumerate(ok_list) if not a), kr)
                else:
                    m = 0
                if m < kr:
                    final = int(tok[m])
                else:  # 全部接受：额外 token 从 p 抽，用普通链（与 generate_batch 在这一步的抽取相同）
                    final = _pick_row(fused[b, kr:kr + 1], sampling, qids[b], [steps[kr]])[0]
            else:
                verdict = _pick_row(fused[b, :kr + 1], sampling, qids[b], steps)
                m = next((j for j in range(kr) if proposal[j] != verdict[j]), kr)
                final = verdict[m]
            new = proposal[:m] + [final]
            before = len(tokens[b])
            emit(b, new, alpha_t[b, :m + 1].tolist() if alpha_t is not None else [],
                 bad_t[b, :m + 1].tolist() if bad_t is not None else [], stop_t[b, :m + 1].tolist())
            emitted = len(tokens[b]) - before
            drafted[b] += kr
            accepted_n[b] += min(m, emitted)  # 结束记号在草稿里时，只数输出了的草稿 token
            verify_steps[b] += 1
            keep[b, :m + 1] = True  # last 与被接受的 d_1..d_m；new 的最后一个 token 是下一轮的 last
            fed[b] += m + 1
        for s in verifiers + ([] if stale or not separate else drafters):
            s.keep_last(keep)
        rounds += 1

    return SpecResult(tokens=tokens, alpha=alphas if steering is not None else None,
                      steps=max(len(t) for t in tokens), nonfinite=nonfinite if steering is not None else None,
                      target_stops=target_stops,
                      drafted=drafted, accepted=accepted_n, verify_steps=verify_steps, rounds=rounds,
                      switched_off=off)
