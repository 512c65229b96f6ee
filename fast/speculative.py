"""快速路径上的投机解码（贪心）：SpeculativeDecoder，与 speculative.generate_speculative（参考循环）逐 token 相同，
接受统计（drafted / accepted / verify_steps）也逐行相同。

一轮（round）全部在设备上，形状固定，CUDA 上整轮录成一张 CUDA graph、每轮重放一次，轮内不与主机同步：
  1. 起草：含草稿模型的前向单元（引导臂：专家所在的单元；叠加时专家与基座一起）逐个位置前向 K 次，
     草稿规则（专家 argmax，或 z_b + α(z_e − z_b) 的 argmax）给出 d_1..d_K；
  2. 验证：其余单元（目标等）一次喂 K+1 个位置 [last, d_1..d_K]（FastDecoder._verify_unit）；
     草稿单元再单步喂 d_K（它在起草时的 K 个 logits 就是它在前 K 个位置的验证 logits）；
  3. 每个位置用它自己的三路 logits 融合（fuse_step，α 由该位置自己的距离算出），argmax 得验证者的 token v_j；
  4. 每行保留最长一致前缀 + v_m（在设备上：m = 前缀一致的个数，受该行的 K_r 限制），结束记号 / 目标 logits 非有限
     在窗口内时按参考循环的 emit 规则截断；被拒的缓存列在各模型的掩码里置 0（与参考循环相同的“掩列”回滚：
     所有行每轮都追加 K+1 列，位置号只数有效 token，所以没有行要等最慢的行）。
每行的 K_r = min(K, 剩余预算 − 1)，关闭起草的行 K_r = 0（min_acceptance，与参考循环同一规则）；
全部活跃行都关闭起草后改用 K = 0 的轮（就是普通解码步：各单元单步前向），不再为草稿付钱。

oracle（只给基准用）：草稿 token 改由已知的输出给出——第 j 个输出位置以预先抽定的概率 a 与输出相同，
否则换成另一个 token。这是对接受率的*模拟*，用来在随机权重上测 "接受率为 a 时的速度"；
oracle_free=True 时不跑任何草稿前向（免费草稿：所有单元都验证 K+1 个位置），否则草稿单元照常起草 K 步（真实的起草代价）。

只支持贪心：采样的投机解码（residual / coupled）在参考循环里（--no-fast）。
"""
from __future__ import annotations

from contextlib import nullcontext as _nullcontext
from typing import Any, Callable, Final, Sequence

import torch
from transformers import PreTrainedModel

from fast.decoder import FastDecoder, _root_oom
from speculative import DRAFTS, SpecResult
from steering_utils import SteeringParams, fuse_step, stop_nonfinite_target

FAST_DRAFTS: Final[tuple[str, ...]] = ("expert", "fusion")


class _SpecState:
    """一批解码的设备状态（固定地址的缓冲：CUDA graph 录的是这些地址，每批原地重填）。B = 批大小。

    last (B,)：已选出、还没喂给模型的 token；positions[k] (B, 1)：它在第 k 个模型里的位置号；
    masks[k] (B, L)：第 k 个模型的可见列；slot (1,)：它要写入的缓存槽位；finished (B,) bool；
    n_out / drafted / accepted / verify_steps (B,) int64；off (B,) bool：该行已关闭起草；stopped (B,) bool：
    目标 logits 非有限而停止；nonfinite (B,) int64：融合非有限、退回目标 logits 的输出 token 数。
    """

    def __init__(self, start: Any) -> None:
        b = start.finished.shape[0]
        dev = start.finished.device
        self.positions: list[torch.Tensor] = start.positions
        self.masks: list[torch.Tensor] = start.masks
        self.slot: torch.Tensor = start.slot
        self.finished: torch.Tensor = start.finished
        self.last = torch.zeros(b, dtype=torch.long, device=dev)
        zeros = lambda dtype: torch.zeros(b, dtype=dtype, device=dev)  # noqa: E731
        self.n_out, self.drafted, self.accepted, self.verify_steps = (zeros(torch.long) for _ in range(4))
        self.nonfinite = zeros(torch.long)
        self.off, self.stopped = zeros(torch.bool), zeros(torch.bool)
        self.max_new = torch.zeros((), dtype=torch.long, device=dev)  # 本批的 max_new_tokens（图的输入，不是常量）

    def tensors(self) -> list[torch.Tensor]:
        """全部状态张量（按固定顺序）：用于把新一批的状态原地写进录图时的缓冲。"""
        return [*self.positions, *self.masks, self.slot, self.finished, self.last, self.n_out, self.drafted,
                self.accepted, self.verify_steps, self.nonfinite, self.off, self.stopped, self.max_new]


class _GraphedRound:
    """把一个无参数的轮函数录成 CUDA graph（状态都在固定地址的缓冲里，由轮函数原地更新）。

    与 fast.decoder._GraphedStep 相同的状态机：前 2 次直接执行（在录图用的流上：编译、cuBLAS 工作区等惰性初始化），
    第 3 次录图并重放，之后只重放。返回图的输出缓冲（下一次重放会覆盖：调用方 clone）。CPU 上直接执行。
    """

    WARMUP_CALLS: Final[int] = 2

    def __init__(self, fn: Callable[[], tuple[torch.Tensor, ...]], device: torch.device) -> None:
        self.fn = fn
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple[torch.Tensor, ...] | None = None

    def __call__(self) -> tuple[torch.Tensor, ...]:
        """执行（或重放）一轮。"""
        if not self.cuda:
            return self.fn()
        self.calls += 1
        current = torch.cuda.current_stream()
        assert self.stream is not None
        if self.calls <= self.WARMUP_CALLS:
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                out = self.fn()
            current.wait_stream(self.stream)
            return out
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            self.stream.wait_stream(current)
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    self.out = self.fn()
            except Exception as exc:
                root = _root_oom(exc)
                if root is exc:
                    raise
                raise root from None
            current.wait_stream(self.stream)
            self.graph = graph
        self.graph.replay()
        assert self.out is not None
        return self.out


class SpeculativeDecoder(FastDecoder):
    """FastDecoder 加上贪心投机解码（见模块说明）。models：引导臂 [目标, 专家, 基座]；基线臂 [目标, 专家]——
    专家只作草稿（steering=None 时只有目标的 logits 参与选词）。其余参数与 FastDecoder 相同（不支持 sampling）。

    k：每轮最多起草的 token 数（≥ 1）；draft："expert" 或 "fusion"（只在引导臂）；min_acceptance / warmup：
    与参考循环相同的关闭规则。generate() 返回 speculative.SpecResult（与参考循环相同的字段与不变量）。
    """

    def __init__(self, models: Sequence[PreTrainedModel], *, k: int, draft: str = "expert",
                 min_acceptance: float = 0.0, warmup: int = 16, steering: SteeringParams | None, **kwargs: Any) -> None:
        if kwargs.get("sampling") is not None:
            raise ValueError("speculative sampling runs in the reference loop only: use fast=False (--no-fast), "
                             "or greedy decoding")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be an integer >= 1")
        if draft not in FAST_DRAFTS:
            known = ", ".join(FAST_DRAFTS)
            raise ValueError(f"draft={draft!r} is not available on the fast path (it has {known}; "
                             f"the reference loop has {', '.join(DRAFTS)}): use --no-fast or another draft")
        if draft == "fusion" and steering is None:
            raise ValueError("draft='fusion' needs the expert and the base (steered arms only)")
        if steering is None and len(models) != 2:
            raise ValueError("a speculative baseline arm takes two models: [target, draft (the expert)]")
        if not 0.0 <= min_acceptance <= 1.0:
            raise ValueError(f"min_acceptance={min_acceptance!r} must be in [0, 1]")
        # 专家单独起草时，专家与基座不叠成一次前向（叠加会让每个起草步也读一遍基座的权重）：各自单独叠加，
        # 基座与目标一起验证 K+1 个位置（侧流上并行）。fusion 草稿要两者的 logits，仍叠在一起。
        super().__init__(models, steering=steering, together=draft == "fusion", **kwargs)
        self.k, self.draft, self.min_acceptance, self.warmup = k, draft, min_acceptance, warmup
        # 草稿模型：引导臂的专家（fusion 时加基座）；基线臂的第 2 个模型
        self.draft_models = (1, 2) if draft == "fusion" else (1,)
        self.oracle: tuple[torch.Tensor, torch.Tensor, bool] | None = None  # (参考输出, 是否一致, 是否免费)
        self.state: _SpecState | None = None
        self.rounds: dict[int, Callable[[], tuple[torch.Tensor, ...]]] = {}
        self.round_key: tuple[Any, ...] | None = None
        # 验证阶段的侧流：单元 u ≥ 1 在自己的流上与目标（单元 0）并行；只在 CUDA 上 overlap = "streams" 时
        self.side: list[torch.cuda.Stream | None] = [None] * len(self.units)
        if self.device.type == "cuda" and self.overlap == "streams":
            self.side = [None] + [torch.cuda.Stream(self.device) for _ in self.units[1:]]
        compiled = self.compile
        self.fwd = torch.compile(self._forward_unit, fullgraph=True, dynamic=False) if compiled else self._forward_unit
        self.ver = torch.compile(self._verify_unit, fullgraph=True, dynamic=False) if compiled else self._verify_unit
        self.acc = torch.compile(self._accept, fullgraph=True, dynamic=False) if compiled else self._accept

    # ---- 一轮的各部分 ----

    def _draft_units(self, free: bool) -> list[int]:
        """起草时要前向的单元下标（含任一草稿模型的单元）；免费的 oracle 草稿时为空。"""
        if free:
            return []
        return [u for u, unit in enumerate(self.units) if any(k in self.draft_models for k in unit)]

    def _accept(self, z: list[torch.Tensor], proposals: torch.Tensor, k_row: torch.Tensor, finished: torch.Tensor,
                forced: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """验证与接受（纯张量函数，逐行独立）。z[k] (B, T, V) 第 k 个模型在 T = K+1 个位置的 logits；
        proposals (B, K) 草稿 d_1..d_K；k_row (B,) 每行真正起草的个数 K_r；finished (B,) 本轮前已结束的行；
        forced (B, K) bool（只给 oracle 的速度模拟用）：第 j 个草稿是否算作一致，代替 “d_{j+1} == v_j” 的比较。

        返回 (verdict (B, T) 验证者的 token，m (B,) 被接受的草稿数，n_emit (B,) 本轮输出的 token 数，
        alpha (B, T) float32（不输出或退回目标的位置为 nan），end (B,) 本轮因结束记号结束，stop (B,) 本轮因目标
        logits 非有限而停止，bad_emitted (B,) 输出的 token 里融合非有限、退回目标的个数)。规则与参考循环的 emit 相同。
        """
        b, t = z[0].shape[:2]
        flat = [x.float().reshape(b * t, -1) for x in z]
        if self.steering is None:
            fused, alpha = flat[0], torch.zeros(b * t, device=flat[0].device)
            bad = torch.zeros(b * t, dtype=torch.bool, device=flat[0].device)
        else:
            fused, alpha, bad = fuse_step(flat[0], flat[1], flat[2], self.steering)
        fused, stop = stop_nonfinite_target(flat[0], fused)
        verdict = fused.argmax(-1).reshape(b, t)
        stop, bad, alpha = stop.reshape(b, t), bad.reshape(b, t), alpha.reshape(b, t)
        j = torch.arange(t, device=verdict.device)
        agree = (proposals == verdict[:, : t - 1]) if forced is None else forced
        ok = agree & (j[None, : t - 1] < k_row[:, None])
        m = ok.long().cumprod(-1).sum(-1)  # (B,)：最长一致前缀
        window = j[None, :] <= m[:, None]
        is_end = torch.isin(verdict, self.ends) & window
        is_stop = stop & window
        big = torch.full_like(m, t + 1)
        first_end = torch.where(is_end.any(-1), is_end.long().argmax(-1), big)
        first_stop = torch.where(is_stop.any(-1), is_stop.long().argmax(-1), big)
        ended = (first_end < first_stop) & ~finished
        stopped = (first_stop <= first_end) & (first_stop <= m) & ~finished
        n_emit = torch.minimum(torch.minimum(m + 1, first_end + 1), first_stop).masked_fill(finished, 0)
        emitted = j[None, :] < n_emit[:, None]
        alpha = alpha.float().masked_fill(~emitted | bad, float("nan"))
        bad_emitted = (bad & emitted).long().sum(-1)
        return verdict, m, n_emit, alpha, ended, stopped, bad_emitted

    def _round(self, k: int) -> tuple[torch.Tensor, ...]:
        """一轮（k = 0 时就是普通的一步）：起草、验证、接受、更新状态（全部原地写进 self.state 的缓冲）。
        返回本轮的输出 (verdict (B, k+1)、n_emit (B,)、alpha (B, k+1))，由 generate 在结束时拼成每行的输出。"""
        st = self.state
        assert st is not None
        t = k + 1
        free = self.oracle is not None and self.oracle[2]
        # k = 0：普通的一步（基线臂只前向目标：关闭是永久的，草稿模型不再需要喂入）
        draft_units = self._draft_units(free) if k > 0 else [0] if self.steering is None else list(range(len(self.units)))
        live = ~st.finished
        if self.min_acceptance > 0:  # 参考循环同一规则：起草满 warmup 个之后接受率过低的行关闭起草
            st.off.logical_or_(live & (st.drafted >= self.warmup)
                               & (st.accepted < self.min_acceptance * st.drafted))
        budget = (st.max_new - st.n_out - 1).clamp(0, k)
        k_row = torch.where(st.finished | st.off, torch.zeros_like(budget), budget)
        nm = len(self.models)
        z_draft: list[list[torch.Tensor]] = [[] for _ in range(nm)]
        tokens = [st.last[:, None]]  # (B, 1) × (k+1)
        proposals: list[torch.Tensor] = []
        # ---- 起草：草稿单元逐个位置前向 k 次（前后相依，只能串行） ----
        for i in range(k):
            pos = [p + i for p in st.positions]
            zs: dict[int, torch.Tensor] = {}
            for u in draft_units:
                for kk, z in zip(self.units[u], self.fwd(u, tokens[i], pos, st.masks, st.slot + i)):
                    zs[kk] = z
                    z_draft[kk].append(z)
            proposals.append(self._propose(zs, st.n_out + i))
            tokens.append(proposals[-1][:, None])
        cols = torch.cat(tokens, 1)  # (B, t)
        steps = torch.arange(t, device=cols.device)
        # ---- 验证：每个单元一次（草稿单元单步喂 d_k，其余单元喂全部 t 个位置）；目标所在的单元 0 在主流上，
        #      其余单元在侧流上与它并行（与 _GraphedStep 相同的分叉 / 汇合，录进图里就是两条互不依赖的支路） ----
        main = torch.cuda.current_stream(self.device) if any(x is not None for x in self.side) else None
        for stream in self.side:
            if stream is not None:
                stream.wait_stream(main)
        z_last: dict[int, torch.Tensor] = {}
        for u, stream in enumerate(self.side):
            if u not in draft_units and k == 0:
                continue  # k = 0 的基线轮：草稿单元不再喂入
            with torch.cuda.stream(stream) if stream is not None else _nullcontext():
                if u in draft_units:
                    pos = [p + k for p in st.positions]
                    for kk, z in zip(self.units[u], self.fwd(u, tokens[k], pos, st.masks, st.slot + k)):
                        z_last[kk] = z
                else:
                    pos = [p + steps[None, :] for p in st.positions]
                    for kk, z in zip(self.units[u], self.ver(u, cols, pos, st.masks, st.slot)):
                        z_last[kk] = z
        for stream in self.side:
            if stream is not None:
                main.wait_stream(stream)
        z_all: list[torch.Tensor] = []
        for kk in range(nm):
            if kk not in z_last:
                continue
            z_all.append(torch.stack(z_draft[kk] + [z_last[kk]], 1) if z_last[kk].dim() == 2 else z_last[kk])
        props = torch.stack(proposals, 1) if proposals else cols[:, :0]
        forced = self._forced(st.n_out, k) if self.oracle is not None and k > 0 else None
        verdict, m, n_emit, alpha, ended, stopped, bad_emitted = self.acc(z_all, props, k_row, st.finished, forced)
        # ---- 更新状态（原地） ----
        keep = (steps[None, :] <= m[:, None]) & live[:, None]  # 本轮写入的列：last 与被接受的草稿
        cols_idx = st.slot + steps
        for mask in st.masks:
            mask.index_copy_(1, cols_idx, keep.long())
        st.drafted.add_(torch.where(live, k_row, torch.zeros_like(k_row)))
        st.accepted.add_(torch.minimum(m, n_emit))
        self._advance(live, torch.where(live, m + 1, torch.zeros_like(m)), t, verdict.gather(1, m[:, None])[:, 0],
                      n_emit, bad_emitted, stopped, ended | stopped)
        return verdict, n_emit, alpha

    def _advance(self, live: torch.Tensor, adv: torch.Tensor, width: int, last: torch.Tensor, n_emit: torch.Tensor,
                 bad_emitted: torch.Tensor, stopped: torch.Tensor, done: torch.Tensor) -> None:
        """_round、_plain_round 与预填充后的第 0 个 token 共用的状态推进（原地写进 self.state 的缓冲；放在一处，
        几条路径不会各改各的）。

        live (B,) bool 本轮前未结束的行；adv (B,) int64 各行位置号前进的个数（本轮写入缓存的有效 token 数）；
        width 本轮追加的缓存列数（k+1：所有行都追加，槽位号与行无关）；last (B,) 下一轮要喂的 token；
        n_emit (B,) 本轮输出的 token 数；bad_emitted (B,) 其中融合非有限、退回目标的个数；stopped (B,) bool
        本轮因目标 logits 非有限而停止；done (B,) bool 本轮因结束记号或停止而结束（预算用完在这里另算：
        要用加上 n_emit 之后的 n_out）。全是设备上的原地运算：不同步、形状固定，可录进 CUDA graph。
        """
        st = self.state
        assert st is not None
        for p in st.positions:
            p.add_(adv[:, None])
        st.slot.add_(width)
        st.last.copy_(last)
        st.n_out.add_(n_emit)
        st.verify_steps.add_(live.long())
        st.nonfinite.add_(bad_emitted)
        st.stopped.logical_or_(stopped)
        st.finished.logical_or_(done | (st.n_out >= st.max_new))

    def _plain_round(self, qids: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """引导臂关闭起草后的一步：直接用 FastDecoder 的解码步（CUDA 上是带侧流并行的 CUDA graph，与不投机的
        快速路径同一个步），再把它的输出记进投机的状态。与 _round(0) 的结果相同，只是更快（专家与基座与目标并行）。"""
        st = self.state
        assert st is not None
        live = ~st.finished
        nxt, alpha, finished, bad, stop = (x.clone() for x in self.step(
            st.last[:, None], st.positions, st.masks, st.slot, st.finished, qids, step))
        emit = live & ~stop
        n_emit = emit.long()
        # 没有草稿：drafted / accepted 不变；finished 是解码步算出的“结束记号或停止”
        self._advance(live, live.long(), 1, nxt, n_emit, (bad & emit).long(), stop, finished)
        return nxt[:, None], n_emit, alpha.float().masked_fill(~emit | bad, float("nan"))[:, None]

    def _forced(self, n_out: torch.Tensor, k: int) -> torch.Tensor:
        """oracle 模拟：本轮 k 个草稿各自是否“一致” (B, k) bool，取自预先抽定的表（第 n_out + i 个输出位置）。

        为什么不直接比较 token：bf16 下验证一次算 K+1 个位置，与逐个解码的舍入不同，随机权重的近似平局会让输出
        偏离参考输出，之后 oracle 的 token 就再也对不上，测到的接受率远低于 a。按表接受使接受的模式恰为 a，
        付出的计算（起草、验证、接受、掩列）与真实草稿相同；代价是被“接受”的位置输出的是验证者的 token，
        所以 bf16 的计时运行不再逐 token 等于贪心输出（正确性由 fp32 的 --check 核对，那里按表与按 token 相同）。
        """
        assert self.oracle is not None
        _, agree, _ = self.oracle
        idx = (n_out[:, None] + torch.arange(k, device=n_out.device)[None, :]).clamp(max=agree.shape[1] - 1)
        return agree.gather(1, idx)

    def _propose(self, zs: dict[int, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """一个起草位置的草稿 token (B,)：oracle 时由参考输出给出（index (B,) 为该位置在输出里的下标），
        否则按草稿规则（专家 argmax，或 fusion：基座站在目标位置上的融合 argmax）。"""
        if self.oracle is not None:
            ref, agree, _ = self.oracle  # (B, N) 参考输出、(B, N) bool 是否一致
            idx = index.clamp(0, ref.shape[1] - 1)[:, None]
            true = ref.gather(1, idx)[:, 0]
            return torch.where(agree.gather(1, idx)[:, 0], true, (true + 1) % self.vocab_size)
        if self.draft == "fusion":
            assert self.steering is not None
            return fuse_step(zs[2].float(), zs[1].float(), zs[2].float(), self.steering)[0].argmax(-1)
        return zs[1].float().argmax(-1)

    # ---- 一批 ----

    def set_oracle(self, reference: Sequence[Sequence[int]] | None, agreement: float = 0.0, *, free: bool = False,
                   seed: int = 0) -> None:
        """基准用的模拟草稿：reference[i] 为第 i 行（非投机解码的）输出；每个输出位置以概率 agreement 与它一致
        （用 seed 预先抽定，同一位置再次起草时结果相同，像一个确定的草稿模型）。None 关闭。free：不跑草稿前向。"""
        if reference is None:
            self.oracle = None
            self.round_key = None
            return
        if not 0.0 <= agreement <= 1.0:
            raise ValueError(f"agreement={agreement!r} must be in [0, 1]")
        n = max(1, max(len(r) for r in reference))
        rows = list(reference) + [[]] * (self.batch_size - len(reference))
        ref = torch.tensor([list(r) + [self.pad_id] * (n - len(r)) for r in rows], dtype=torch.long)
        gen = torch.Generator().manual_seed(seed)
        agree = torch.rand(ref.shape, generator=gen) < agreement
        self.oracle = (ref.to(self.device), agree.to(self.device), free)
        self.round_key = None

    def _generate(self, prompts: Sequence[Sequence[Sequence[int]]], max_new_tokens: int,
                  question_ids: Sequence[int] | None,
                  on_step: Callable[[int, int], None] | None = None) -> SpecResult:
        """一批投机解码（在 packed_gqa 与 dynamo 设置的作用域之内，见 FastDecoder.generate）。"""
        real = len(prompts[0])
        if max_new_tokens < 1:
            return SpecResult(tokens=[[] for _ in range(real)], alpha=[[] for _ in range(real)] if self.steering else None,
                              steps=0, nonfinite=[0] * real if self.steering else None, target_stops=[0] * real,
                              drafted=[0] * real, accepted=[0] * real, verify_steps=[0] * real, rounds=0,
                              switched_off=[False] * real)
        start = self._prefill(prompts, (self.k + 1) * max_new_tokens, question_ids)
        fresh = _SpecState(start)
        fresh.max_new.fill_(max_new_tokens)
        # 状态缓冲的地址要跨批不变（图录的是地址）：同一缓存、同一 oracle 时原地重填，否则重新录图
        key = (self.cache_key, id(self.oracle))
        if self.state is None or self.round_key != key:
            self.state = fresh
            self.rounds = {}
            self.round_key = key
        else:
            for dst, src in zip(self.state.tensors(), fresh.tensors()):
                dst.copy_(src)
        st = self.state
        # 第 0 个 token：预填充的 logits（与参考循环相同，算一次验证，不起草）
        z0 = [z[:, None] for z in start.z]
        none = torch.zeros(self.batch_size, 0, dtype=torch.long, device=self.device)
        zero = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        verdict, m, n_emit, alpha, ended, stopped, bad_emitted = self._accept(z0, none, zero, st.finished)
        # 预填充已写好缓存、位置已就绪：位置与槽位都不前进（adv = 0、width = 0），其余记账与每轮相同
        self._advance(~st.finished, zero, 0, verdict[:, 0], n_emit, bad_emitted, stopped, ended | stopped)
        outputs = [(verdict, n_emit, alpha)]
        k = self.k
        qids = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)  # 贪心：选词不用随机数
        step_t = torch.zeros((), dtype=torch.long, device=self.device)
        next_check = 0
        for r in range(max_new_tokens):  # 每轮每个活跃行至少输出 1 个 token：轮数不超过 max_new_tokens
            # 关闭起草可能随时发生：还在起草时每轮都看一次（一次同步），免得全部关闭后还为草稿付几轮钱
            watch = k > 0 and self.min_acceptance > 0
            if r == next_check or watch:
                done_rows, n_out, off = torch.stack([st.finished.long(), st.n_out, st.off.long()]).tolist()
                if r == next_check and on_step is not None:
                    on_step(r, sum(n_out[:real]))
                if all(done_rows):
                    break
                if k > 0 and all(o or f for o, f in zip(off, done_rows)):
                    k = 0  # 全部活跃行都关闭了起草：此后每轮就是普通的一步
                # 下次同步前可以放心连跑几轮：未结束的行里离预算最远的那一行，每轮至多输出 k+1 个 token，
                # 至少还要 ceil(剩余 / (k+1)) 轮（结束记号只会让它更早结束，多跑的轮对已结束的行不写任何东西）。
                # 固定每 check_every 轮同步一次时，最后一段平均空转半段（批 1、K = 6 时约两成的轮是空转）。
                need = max(-(-(max_new_tokens - n) // (k + 1)) for n, f in zip(n_out, done_rows) if not f)
                next_check = r + max(1, min(self.check_every, need))
            if k == 0 and self.steering is not None:
                outputs.append(self._plain_round(qids, step_t))
                continue
            if k not in self.rounds:
                kk = k
                self.rounds[k] = _GraphedRound(lambda: self._round(kk), self.device)
            outputs.append(tuple(o.clone() for o in self.rounds[k]()))
        return self._result(outputs, real)

    def _result(self, outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], real: int) -> SpecResult:
        """把每轮的 (verdict (B, t), n_emit (B,), alpha (B, t)) 拼成每行的输出：先在设备上拼接，整批只拷回主机三次。"""
        st = self.state
        assert st is not None
        widths = [v.shape[1] for v, _, _ in outputs]
        verdicts = torch.cat([v[:real] for v, _, _ in outputs], 1).tolist()  # (B, Σt)
        counts = torch.stack([n[:real] for _, n, _ in outputs], 1).tolist()  # (B, 轮数)
        alphas_all = torch.cat([a[:real] for _, _, a in outputs], 1).tolist()
        tokens: list[list[int]] = [[] for _ in range(real)]
        alphas: list[list[float]] = [[] for _ in range(real)]
        for b in range(real):
            col = 0
            for w, n in zip(widths, counts[b]):
                tokens[b].extend(verdicts[b][col:col + n])
                alphas[b].extend(x for x in alphas_all[b][col:col + n] if x == x)  # 去掉 nan（退回目标的位置）
                col += w
        steered = self.steering is not None
        return SpecResult(tokens=tokens, alpha=alphas if steered else None, steps=max((len(t) for t in tokens), default=0),
                          nonfinite=st.nonfinite[:real].tolist() if steered else None,
                          target_stops=st.stopped[:real].long().tolist(),
                          drafted=st.drafted[:real].tolist(), accepted=st.accepted[:real].tolist(),
                          verify_steps=st.verify_steps[:real].tolist(), rounds=len(outputs),
                          switched_off=st.off[:real].tolist())
