"""快速解码器 FastDecoder：静态 KV 缓存 + 一个（可编译的）解码步，仿照 gpt-fast；与 evaluator.generate_batch 逐 token 等价。

包括：packed GQA 注意力的注册、overlap / stack / attention 三个选项的解析规则（resolve_*）、
手动录制 CUDA graph 的 _GraphedStep。对共享模型的改动都限定在 generate() 之内（见 _fast_context）：
注意力实现在每批结束后恢复，dynamo 的重编译上限只在本解码器编译、运行时放宽。
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Final, Iterator, Sequence

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.masking_utils import sdpa_mask

from evaluator import BatchResult, _alpha_rows, _trim, cache_kwarg, left_pad
from fast.attention import ATTENTION_MODES, head_dim_of, triton_attention_problem
from fast.stacked import StackedLlama, check_stackable
from sampling import Sampling, pick_tokens
from steering_utils import SteeringParams, fuse_step, stop_nonfinite_target

PACKED_GQA: str = "steer_packed_gqa"  # 注册到 transformers 的注意力实现名
# transformers 自带的 sdpa 注意力（预填充用）。在模块加载时取一次：在被编译的函数里 import 或构造
# AttentionInterface 会在 torch 2.11 上造成 graph break，使整个解码步退回 eager。
_STOCK_SDPA = AttentionInterface()["sdpa"]


def packed_gqa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """解码步（q_len = 1）的分组查询注意力，不复制 K/V。

    query (B, H, 1, D)，key/value (B, H_kv, L, D)，mask (B, 1, 1, L) 布尔（True = 可见）。
    transformers 的 sdpa 路径在 torch.compile 下会用 repeat_kv 把 K/V 复制 H/H_kv 倍：批 64、
    上下文 1k 时 8B 模型每步多搬 20+ GB。这里把同一 KV 头下的 n_rep 个查询头当作“查询长度”维：
    query → (B, H_kv, n_rep, D)（repeat_kv 的头顺序正是 h = k·n_rep + r），mask 在 n_rep 维上广播，
    一次 SDPA 就算完，数学上与复制 K/V 完全相同。预填充（q_len > 1）交回 transformers 自带的 sdpa。
    """
    n_rep = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    if q_len != 1 or n_rep == 1:
        return _STOCK_SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    packed = query.reshape(batch, heads // n_rep, n_rep, dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def register_packed_gqa() -> None:
    """在 transformers 里注册 packed_gqa_attention（注意力函数与掩码函数都要注册，否则 transformers 不建掩码）。
    注册只是新增一个名字，不改变任何已有实现。"""
    AttentionInterface.register(PACKED_GQA, packed_gqa_attention)
    AttentionMaskInterface.register(PACKED_GQA, sdpa_mask)


@contextlib.contextmanager
def packed_gqa(models: Sequence[PreTrainedModel]) -> Iterator[None]:
    """在 with 块内把各模型的注意力实现切换为 packed_gqa_attention，退出时（含异常）恢复原来的实现。

    FastDecoder.generate 只在这个块里运行：块外的共享模型（慢速参考循环、字母打分）看到的始终是加载时的实现。
    """
    register_packed_gqa()
    unique = list({id(m): m for m in models}.values())
    before = [m.config._attn_implementation for m in unique]
    try:
        for m in unique:
            if m.config._attn_implementation != PACKED_GQA:
                m.set_attn_implementation(PACKED_GQA)
        yield
    finally:
        for m, impl in zip(unique, before):
            if m.config._attn_implementation != impl:
                m.set_attn_implementation(impl)


# 每个 (模型组, 批形状) 会让同一段代码各编译一次；dynamo 默认上限 8 次后会静默退回 eager，
# 一次评测（两个模式）或一次基准（多个批大小）很容易超过。只在 FastDecoder 编译、运行时放宽（见 generate）。
RECOMPILE_LIMIT: Final[int] = 64


def compiles(compile: str, device_type: str) -> bool:
    """--compile 的规则（main.py 与 bench.py 共用这一处）：on 总是编译，auto 只在 CUDA 上编译（CPU 上编译慢、
    没有 CUDA graph，测试与冒烟运行用 eager），off 不编译。"""
    if compile not in ("auto", "on", "off"):
        raise ValueError(f"compile={compile!r}: must be auto / on / off")
    return compile == "on" or (compile == "auto" and device_type == "cuda")


def length_bucket(n: int, granularity: int = 128) -> int:
    """静态缓存长度向上取整到 granularity 的倍数：不同批复用同一缓存与同一编译图，避免每批重新编译。"""
    return -(-n // granularity) * granularity


def resolve_overlap(overlap: str, models: Sequence[PreTrainedModel], *, steering: SteeringParams | None,
                    compile: bool, device_type: str, stacked: Sequence[PreTrainedModel] = ()) -> str:
    """FastDecoder 的 overlap 参数 → 实际模式（"off" / "graph" / "streams"）。

    "auto" 只在 CUDA 上编译的 bf16/fp16 引导解码时取 "streams"（侧流上的专家与基座与 8B 并行，
    比 "graph" 快，fp32 下与慢速循环逐 token 相同，见 BENCHMARKS.md），其余情况取 "off"：
    CPU 没有流与图；不编译时 eager 前向里可能有主机同步，录图期间不允许；只有目标模型时没有可重叠的前向；
    不走叠加前向的 4 位模型（stack off 时 bitsandbytes 自己的前向、torchao int4）在这条路径上没有测过，留在原来的
    整步编译上；叠加的 4 位模型（stacked 里的 NF4 与 int4）与 bf16 一样可以放到侧流上。
    """
    if overlap not in ("auto", "off", "graph", "streams"):
        raise ValueError(f"overlap={overlap!r}: must be auto / off / graph / streams")
    if overlap != "auto":
        return overlap
    own = {id(m) for m in stacked}
    quantized = any(getattr(m, "hf_quantizer", None) is not None and id(m) not in own for m in models)
    return "streams" if compile and device_type == "cuda" and steering is not None and not quantized else "off"


STACK_MODES: Final[tuple[str, ...]] = ("auto", "off", "pair", "target", "all")


def resolve_stack(stack: str, models: Sequence[PreTrainedModel], *, steering: SteeringParams | None,
                  compile: bool, device_type: str) -> str:
    """FastDecoder 的 stack 参数 → 实际模式（"off" / "pair" / "target" / "all"）。

    哪些模型走 stacked_llama.StackedLlama 的前向（q/k/v、gate/up 各拼成一次矩阵乘，自带 KV 缓存）：
    "pair" = 专家与基座叠成一次前向（每个投影一次 bmm）；"target" = 目标模型单独走它（M = 1）；
    "all" = 两者都是；"off" = 都走 transformers 的前向。只有目标模型（基线）时 "all" 与 "target" 相同。
    "auto"：只在 CUDA 上编译时叠加，且按模型各自判断（check_stackable）——目标模型走哪条前向只取决于它自己，
    所以基线与引导两个臂里目标模型的数值规则相同（bf16 下两条前向的舍入不同，这一点不能因臂而异）。
    能叠的都叠：bf16、NF4 与张量子类的量化权重（torchao int4；H200，ff2a723，同一次机器会话：引导批 1 叠加
    4.28 ms/步、不叠 15.20 ms/步，BENCHMARKS.md）。CPU / 不编译时取 "off"（没有可省的 kernel 启动）。
    显式给出而做不到时报错说明原因。
    """
    if stack not in STACK_MODES:
        raise ValueError(f"stack={stack!r}: must be {' / '.join(STACK_MODES)}")
    steered = steering is not None and len(models) == 3
    if stack == "auto":
        if not (compile and device_type == "cuda"):
            return "off"
        target = check_stackable(models[:1]) is None
        pair = steered and check_stackable(models[1:]) is None
        return {(True, True): "all", (True, False): "target", (False, True): "pair"}.get((target, pair), "off")
    if stack == "off":
        return stack
    if stack == "pair" and not steered:
        raise ValueError("stack='pair' is only for steered decoding (target, expert and base models)")
    groups = ([models[:1]] if stack in ("target", "all") else []) + (
        [models[1:]] if stack in ("pair", "all") and steered else [])
    for group in groups:
        reason = check_stackable(group)
        if reason is not None:
            raise ValueError(f"stack={stack!r} is not possible: {reason}. Use stack='off'")
    return stack


def resolve_attention(attention: str, *, head_dims: Sequence[int], device_type: str) -> str:
    """FastDecoder 的 attention 参数 → 叠加单元解码注意力的实际实现（"sdpa" / "triton"）。

    head_dims：各叠加单元模型的 head_dim；为空 = 没有叠加单元，此时为 "sdpa"（transformers 单元始终用
    packed_gqa_attention）。"auto"：CUDA 上且 stacked_llama.triton_attention_problem 对每个 head_dim 都没有异议时取
    "triton"（triton_decode_attention：只读已写的槽位，
    fp32 下与慢速循环逐 token 相同），否则 "sdpa"。
    显式给 "triton" 而做不到时报错（在叠加权重之前），而不是悄悄换成 sdpa。
    """
    if attention not in ("auto", *ATTENTION_MODES):
        raise ValueError(f"attention={attention!r}: must be auto / {' / '.join(ATTENTION_MODES)}")
    if not head_dims:
        if attention == "triton":
            raise ValueError("attention='triton' is only for stacked forwards (stack not off); transformers units use packed GQA SDPA")
        return "sdpa"
    reasons = [r for h in sorted(set(head_dims)) if (r := triton_attention_problem(h)) is not None]
    if attention == "auto":
        return "triton" if device_type == "cuda" and not reasons else "sdpa"
    if attention == "triton" and reasons:
        raise ValueError(f"attention='triton' is not possible: {reasons[0]}; use attention='sdpa'")
    return attention


@dataclass
class _Start:
    """FastDecoder._prefill 的结果（一批预填充之后的设备状态），字段见 _prefill 的说明。"""

    real: int
    qids: torch.Tensor
    masks: list[torch.Tensor]
    positions: list[torch.Tensor]
    z: list[torch.Tensor]
    slot: torch.Tensor
    finished: torch.Tensor


class FastDecoder:
    """快速解码器：与 generate_batch 逐 token 等价（fp32 测试保证），但每步的开销小得多。

    - 每个模型一个 StaticCache，按 (批大小, 长度桶) 分配一次、之后每批 reset() 复用（仿 gpt-fast：缓存只分配一次）；
      批不足 batch_size 时用“已结束”的占位行补齐，让所有批形状相同、只编译一张图。
    - 一个解码步包含三个模型的前向、α、融合、argmax 与结束判定，CUDA 上整步是一张 CUDA graph，
      几百次小 kernel 启动合成一次重放：只有目标模型时用 torch.compile(mode="reduce-overhead")；
      引导时默认（overlap="auto"）用 _GraphedStep 手动录图，专家与基座在侧流上与 8B 并行。
    - 不再每步同步主机：每 check_every 步才看一次“是否全部结束”；多走的几步只会给已结束的行写 pad。
    - 解码用 packed_gqa_attention，避免编译路径里 GQA 的 K/V 复制；注意力实现只在 generate() 之内切换（packed_gqa），
      dynamo 的重编译上限也只在其中放宽，返回前都恢复：共享的模型对象在快速路径之外行为不变。
    - overlap（见 _GraphedStep）："off" = 上面那个整步编译（reduce-overhead / cudagraph trees）；
      "graph" = 每个模型的前向与融合分别编译（不带 cudagraphs），整步手动录成一张 CUDA graph；
      "streams" = 同上，但目标之外的每个前向单元（专家、基座，或叠加后的专家+基座）各在一条侧流上，与 8B 前向在图内并行；
      "auto"（默认）见 resolve_overlap。
    - stack（见 resolve_stack）：解码前向改用 StackedLlama——专家与基座叠成一次前向（每个投影一次 bmm、两个缓存
      一次注意力），目标模型也可单独走它（M = 1，q/k/v、gate/up 拼接）。模型按“前向单元”分组：units[u] 是一起前向的模型下标，
      如 [(0,), (1, 2)]；每个单元一次前向、（streams 时）一条流。together=False（投机解码的专家草稿用）时专家与基座
      不叠在一起、各自单独叠加：[(0,), (1,), (2,)]。
    - attention（见 resolve_attention）：叠加单元的解码注意力用 SDPA（cuDNN，每步读满整个静态缓存）还是
      stacked_llama 的 Triton kernel（只读到本步槽位，打包 GQA）；"auto" 在 CUDA 上取 Triton。
    - 三个角色的提示左填充到同一宽度 T：所有模型的缓存槽位因此相同（第 n 个解码 token 写在槽位 T+n−1），
      叠加单元按这个槽位写缓存。真实 token 的位置编号由各自的 mask 决定，多出的左填充被屏蔽，结果不变。
    """

    def __init__(self, models: Sequence[PreTrainedModel], *, vocab_size: int, end_ids: Sequence[int], pad_id: int,
                 batch_size: int, steering: SteeringParams | None, compile: bool, check_every: int = 16,
                 cache_len: int | None = None, overlap: str = "auto", sampling: Sampling | None = None,
                 stack: str = "auto", attention: str = "auto", together: bool = True) -> None:
        if steering is not None and len(models) != 3:
            raise ValueError("steering needs three models: [target, expert, base]")
        self.models = list(models)
        self.compile = compile
        self.kwargs = [cache_kwarg(m) for m in self.models]
        self.device = self.models[0].device
        self.vocab_size, self.pad_id, self.batch_size = vocab_size, pad_id, batch_size
        self.end_ids = sorted(set(end_ids))
        self.ends = torch.tensor(self.end_ids, dtype=torch.long, device=self.device)
        self.steering = steering
        self.sampling = sampling
        self.check_every = check_every
        # 固定的缓存长度：给出时所有批共用一个形状（一次编译）；None 时每批按长度桶取（桶变了就重新编译）。
        self.cache_len = cache_len
        self.caches: list[Any] = []
        self.cache_key: tuple[int, int] | None = None
        mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self.stack = resolve_stack(stack, self.models, steering=steering, compile=compile,
                                   device_type=self.device.type)
        n = len(self.models)
        pair, target = self.stack in ("pair", "all") and n == 3, self.stack in ("target", "all")
        # together=False（投机解码的专家草稿）：专家与基座各自单独叠加（M = 1），起草时只前向专家
        self.units: list[tuple[int, ...]] = [(0,), (1, 2)] if pair and together else [(k,) for k in range(n)]
        stacked_models = ([self.models[0]] if target else []) + (self.models[1:] if pair else [])
        self.overlap = resolve_overlap(overlap, self.models, steering=steering, compile=compile,
                                       device_type=self.device.type, stacked=stacked_models)
        self.attention = resolve_attention(attention, head_dims=[head_dim_of(m.config) for m in stacked_models],
                                           device_type=self.device.type)
        # stacked[u]：第 u 个单元的叠加前向（None = 该单元是一个 transformers 模型）
        self.stacked: list[StackedLlama | None] = [
            StackedLlama([self.models[k] for k in unit], attention=self.attention)
            if len(unit) > 1 or (unit == (0,) and target) or (unit != (0,) and pair) else None for unit in self.units]
        # fullgraph=True：任何 graph break 都直接报错，而不是悄悄退回 eager、让“快速路径”名不副实。
        self.step: Callable[..., tuple[torch.Tensor, ...]] = (
            _GraphedStep(self, compile=compile, side_streams=self.overlap == "streams") if self.overlap != "off"
            else torch.compile(self._step, mode=mode, fullgraph=True) if compile else self._step)

    def _caches_for(self, length: int) -> list[Any]:
        """取 (batch_size, length) 的静态缓存；长度桶变化时释放旧缓存再分配（批按长度降序，桶只会变小）。"""
        from transformers import StaticCache

        if self.cache_key != (self.batch_size, length):
            if isinstance(self.step, _GraphedStep):
                self.step.invalidate()  # 旧图引用着旧缓存的地址：先丢掉，新缓存上重新预热、录制
            self.caches = []
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            own = {k for unit, s in zip(self.units, self.stacked) if s is not None for k in unit}
            # 叠加单元自带缓存（StackedLlama.allocate）；其余模型各一个 StaticCache。
            self.caches = [None if k in own else StaticCache(config=m.config, max_cache_len=length)
                           for k, m in enumerate(self.models)]
            for s in self.stacked:
                if s is not None:
                    s.allocate(self.batch_size, length)
            self.cache_key = (self.batch_size, length)
        for c in self.caches:
            if c is not None:
                c.reset()
        return self.caches

    def _logits(self, k: int, out: Any) -> torch.Tensor:
        """第 k 个模型输出 → 最后位置、切到分词器词表的 logits (B, V)，模型精度。

        不在这里转 float32：转换交给 _choose，让它与融合的归约编进同一批 kernel。_GraphedStep 把前向与融合分开编译，
        在前向末尾转换就要多写、多读一份 float32 的 (B, V)（批 64 时三路共约 100 MB）。bf16 → float32 是精确的，数值不变。
        """
        return out.logits[:, -1, : self.vocab_size]

    def _forward_one(self, k: int, tokens: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """第 k 个模型（未叠加、走 transformers 前向的单元）的一步解码前向，由 _forward_unit 调用。

        tokens/position: (B, 1)；mask: (B, L)。返回 (B, V) logits（模型精度，见 _logits）；StaticCache 原地更新。
        _step（整步编译）与 _GraphedStep（分开编译）都经 _forward_unit 走到这里，所以两种模式的数值规则一致。
        """
        out = self.models[k](input_ids=tokens, position_ids=position, attention_mask=mask, use_cache=True,
                             **{self.kwargs[k]: self.caches[k]})
        return self._logits(k, out)

    def _forward_unit(self, u: int, tokens: torch.Tensor, positions: Sequence[torch.Tensor],
                      masks: Sequence[torch.Tensor], slot: torch.Tensor) -> list[torch.Tensor]:
        """第 u 个前向单元的一步：返回单元内每个模型的 (B, V) logits（模型精度，按模型下标顺序；_choose 转 float32）。

        positions[k] (B, 1)、masks[k] (B, L) 按模型下标给出；slot (1,) 是本 token 写入的缓存槽位（所有模型相同）。
        transformers 单元的槽位由它自己的 StaticCache 决定（与 slot 相同，因为提示左填充到同一宽度）。
        """
        unit, stacked = self.units[u], self.stacked[u]
        if stacked is None:
            return [self._forward_one(unit[0], tokens, positions[unit[0]], masks[unit[0]])]
        out = stacked.decode(tokens, torch.cat([positions[k] for k in unit]), torch.cat([masks[k] for k in unit]),
                             slot)  # (M, B, V_model)
        return [out[i, :, : self.vocab_size] for i in range(len(unit))]

    def _verify_unit(self, u: int, tokens: torch.Tensor, positions: Sequence[torch.Tensor],
                     masks: Sequence[torch.Tensor], slot: torch.Tensor) -> list[torch.Tensor]:
        """第 u 个前向单元一次喂 T 个位置（投机解码的验证）：返回单元内每个模型的 (B, T, V) logits（模型精度）。

        tokens (B, T)；positions[k] (B, T)；masks[k] (B, L)（被拒的槽位为 0）；slot (1,) 第一个位置的槽位。
        transformers 单元：StaticCache 按它自己累计的长度写入（每个单元每轮都写同样多的列，所以等于 slot），
        2D 掩码 + 缓存位置给出块内因果；叠加单元走 StackedLlama.verify。
        """
        unit, stacked = self.units[u], self.stacked[u]
        if stacked is None:
            k = unit[0]
            out = self.models[k](input_ids=tokens, position_ids=positions[k], attention_mask=masks[k],
                                 use_cache=True, **{self.kwargs[k]: self.caches[k]})
            return [out.logits[..., : self.vocab_size]]
        out = stacked.verify(tokens, torch.cat([positions[k] for k in unit]), torch.cat([masks[k] for k in unit]),
                             slot)  # (M, B, T, V_model)
        return [out[i, ..., : self.vocab_size] for i in range(len(unit))]

    def _step(self, tokens: torch.Tensor, positions: list[torch.Tensor], masks: list[torch.Tensor],
              slot: torch.Tensor, finished: torch.Tensor, qids: torch.Tensor, step: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """一个解码步（被编译的部分）。tokens: (B, 1)；positions[k]: (B, 1)；masks[k]: (B, L)；slot: (1,) 缓存槽位；
        finished: (B,) bool；qids: (B,) 题目 index（只在采样时用）；step: 0 维 int64 张量（设备上的步数，不随主机同步）。

        返回 (next (B,), alpha (B,) float32, finished (B,), bad (B,) bool, stop (B,) bool)。形状全部固定，缓存原地更新。
        """
        z = [logits for u in range(len(self.units))
             for logits in self._forward_unit(u, tokens, positions, masks, slot)]
        return self._choose(z, finished, qids, step)

    def _choose(self, z: list[torch.Tensor], finished: torch.Tensor, qids: torch.Tensor, step: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """融合并选 token：与 generate_batch 的规则完全相同（已结束的行写 pad，不再改变）。

        第 4 个输出 bad (B,) bool：本步融合 logits 非有限、已改用目标 logits 的行（基线恒为 False）；
        第 5 个输出 stop (B,) bool：本步目标 logits 非有限、干净停止的活跃行（steering_utils.stop_nonfinite_target；
        这一步写 pad，不属于输出）。都留在设备上由 generate() 累加，不在每步同步主机。
        z[k] 可以是模型精度：这里先精确转成 float32。
        """
        z = [t.float() for t in z]
        if self.steering is None:
            fused, alpha = z[0], torch.zeros(z[0].shape[0], device=z[0].device)
            bad = torch.zeros(z[0].shape[0], dtype=torch.bool, device=z[0].device)
        else:
            fused, alpha, bad = fuse_step(z[0], z[1], z[2], self.steering)
        fused, stop = stop_nonfinite_target(z[0], fused)
        stop = stop & ~finished
        nxt = pick_tokens(fused, self.sampling, qids, step).masked_fill(finished | stop, self.pad_id)
        return nxt, alpha, finished | stop | torch.isin(nxt, self.ends), bad & ~stop, stop

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[Sequence[int]]], max_new_tokens: int,
                 question_ids: Sequence[int] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> BatchResult:
        """与 generate_batch 相同的输入输出约定；prompts[k][i] 为第 k 个模型第 i 行的提示 id；
        question_ids[i] 为第 i 行的题目 index（采样时必需：随机数由它决定）。
        on_step(已走的步数, 自上次调用以来真实行新生成的 token 数)：进度回调。为了不增加主机同步，只在每
        check_every 步本来就要同步的地方与结束时调用；各次 token 数之和等于本批输出的 token 总数（含结束记号）。

        共享状态只在本调用内改变、返回前恢复：模型的注意力实现（packed_gqa）与 dynamo 的重编译上限
        （torch._dynamo.config.patch，编译与重放都发生在这里）。
        """
        limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT) if self.compile else \
            torch._dynamo.config.recompile_limit
        with packed_gqa(self.models), torch._dynamo.config.patch(recompile_limit=limit):
            return self._generate(prompts, max_new_tokens, question_ids, on_step)

    def _prefill(self, prompts: Sequence[Sequence[Sequence[int]]], columns: int,
                 question_ids: Sequence[int] | None) -> "_Start":
        """一批的开始（普通解码与投机解码共用）：检查输入、补齐占位行、左填充、取缓存、各单元预填充。

        columns：提示之后缓存还要容纳的列数（普通解码 = max_new_tokens；投机解码每轮追加 K+1 列，见 fast/speculative.py）。
        返回 _Start：masks[k] (B, L) 左填充位为 0、其余为 1；positions[k] (B, 1) 第一个生成 token 的位置号；
        z[k] (B, V) 预填充最后位置的 logits（模型精度）；slot (1,) 第一个生成 token 的槽位；finished (B,) 占位行为 True。
        """
        real = len(prompts[0])
        if real > self.batch_size or len(prompts) != len(self.models):
            raise ValueError(f"batch size {real} exceeds the FastDecoder's batch_size={self.batch_size}, or the number of roles does not match")
        if self.sampling is not None and (question_ids is None or len(question_ids) != real):
            raise ValueError("sampling needs each row's question index (question_ids): the random numbers depend on it, not on the batch")
        # 占位行的题目 index 记为 −1（它们从一开始就已结束，抽到什么都不会被记录）。
        qids = torch.tensor((list(question_ids) if question_ids is not None else [-1] * real)
                            + [-1] * (self.batch_size - real), dtype=torch.long, device=self.device)
        # 补齐占位行（复制第 0 行的提示）：它们从一开始就标记为已结束，不影响真实行。
        padded = [list(p) + [p[0]] * (self.batch_size - real) for p in prompts]
        # 所有角色一起左填充到同一宽度 T（见类说明：缓存槽位因此对所有模型相同），再按角色切开。
        ids_all, mask_all = left_pad([row for p in padded for row in p], self.pad_id, self.device)
        pads = list(zip(ids_all.split(self.batch_size), mask_all.split(self.batch_size)))
        needed = ids_all.shape[1] + columns
        if self.cache_len is not None and needed > self.cache_len:
            raise ValueError(f"prompt + new cache columns = {needed}, more than the fixed cache length cache_len={self.cache_len}")
        length = self.cache_len or length_bucket(needed)
        caches = self._caches_for(length)
        masks, positions, z = [], [], [torch.empty(0)] * len(self.models)
        prompt_pos = []
        for ids, mask in pads:
            full = torch.ones(self.batch_size, length, dtype=torch.long, device=self.device)
            full[:, : mask.shape[1]] = mask  # 左填充位为 0，其余（提示与未来生成位）为 1，因果性由缓存位置保证
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            masks.append(full)
            prompt_pos.append(pos)
            positions.append(pos[:, -1:] + 1)
        for unit, stacked in zip(self.units, self.stacked):
            if stacked is None:
                k = unit[0]
                out = self.models[k](input_ids=pads[k][0], attention_mask=masks[k], position_ids=prompt_pos[k],
                                     use_cache=True, logits_to_keep=1, **{self.kwargs[k]: caches[k]})
                z[k] = self._logits(k, out)
                continue
            logits = stacked.prefill(torch.cat([pads[k][0] for k in unit]), torch.cat([pads[k][1] for k in unit]),
                                     torch.cat([prompt_pos[k] for k in unit]))  # (M, B, V_model)
            for i, k in enumerate(unit):
                z[k] = logits[i, :, : self.vocab_size]
        slot = torch.full((1,), ids_all.shape[1], dtype=torch.long, device=self.device)  # 第一个解码 token 的槽位
        finished = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        finished[real:] = True
        return _Start(real, qids, masks, positions, z, slot, finished)

    def _generate(self, prompts: Sequence[Sequence[Sequence[int]]], max_new_tokens: int,
                  question_ids: Sequence[int] | None,
                  on_step: Callable[[int, int], None] | None = None) -> BatchResult:
        """generate 的主体（在 packed_gqa 与 dynamo 设置的作用域之内）。"""
        start = self._prefill(prompts, max_new_tokens, question_ids)
        real, qids, masks, positions, z, slot, finished = (start.real, start.qids, start.masks, start.positions,
                                                           start.z, start.slot, start.finished)
        step_t = torch.zeros((), dtype=torch.long, device=self.device)  # 设备上的步数：每步 +1，不经主机
        out_tokens: list[torch.Tensor] = []
        alphas: list[torch.Tensor] = []
        nonfinite = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)  # 设备上累加，整批只同步一次
        stopped = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)  # 目标 logits 非有限而停止的行
        emitted = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)  # 每行真正输出的 token 数
        nxt, alpha, new_finished, bad, stop = self._choose(z, finished, qids, step_t)
        # 进度：设备上累加每步仍活跃的真实行数（占位行一开始就已结束），只在本来就同步的检查点读出。
        produced = torch.zeros((), dtype=torch.long, device=self.device) if on_step is not None else None
        for step in range(max_new_tokens):
            if step > 0:
                if step % self.check_every == 0:
                    if on_step is not None and produced is not None:
                        on_step(step, int(produced))
                        produced.zero_()
                    if bool(finished.all()):
                        break
                step_t = step_t + 1
                # CUDA graphs 的输出缓冲会被下一次重放覆盖：.clone() 保留本步结果。
                nxt, alpha, new_finished, bad, stop = (t.clone() for t in self.step(
                    nxt[:, None], positions, masks, slot, finished, qids, step_t))
                positions = [p + 1 for p in positions]
                slot = slot + 1
            nonfinite += bad & ~finished
            # nan = 该行在本步之前已结束、本步停止，或本步退回了目标 logits（没有被引导）：都不计入 α 统计
            alphas.append(alpha.masked_fill(finished | bad | stop, float("nan")))
            out_tokens.append(nxt)
            live = ~(finished | stop)
            emitted += live
            stopped |= stop
            if produced is not None:
                produced += live.sum()
            finished = new_finished
        if on_step is not None and produced is not None:
            on_step(len(out_tokens), int(produced))
        trimmed = _trim(torch.stack(out_tokens, 1)[:real].tolist(), set(self.end_ids), emitted[:real].tolist())
        steered = self.steering is not None
        alpha_rows = _alpha_rows([a[:real] for a in alphas]) if steered else None
        steps = len(out_tokens)
        return BatchResult(tokens=trimmed, alpha=alpha_rows, steps=steps,
                           nonfinite=nonfinite[:real].tolist() if steered else None,
                           target_stops=stopped[:real].long().tolist())


def _clone_tree(x: Any) -> Any:
    """把一步的输入（张量，或张量的 list/tuple）复制成新的静态缓冲，结构不变；非张量原样保留。

    CUDA graph 只认录制时的地址，所以 _GraphedStep 录图前先把输入复制到自己持有的缓冲里。
    """
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone_tree(v) for v in x)
    return x


def _copy_tree(dst: Any, src: Any) -> None:
    """把本步的输入原地写进录图时的静态缓冲（dst 与 src 结构、形状相同）。

    形状不同就报错，而不是让 copy_ 悄悄广播；非张量输入在图里是常量，必须与录制时相等。
    """
    if isinstance(dst, torch.Tensor):
        if not isinstance(src, torch.Tensor) or src.shape != dst.shape:
            raise ValueError(f"static input shape {tuple(dst.shape)} does not match this step's input: {getattr(src, 'shape', src)!r}")
        dst.copy_(src)
    elif isinstance(dst, (list, tuple)):
        if not isinstance(src, (list, tuple)) or len(src) != len(dst):
            raise ValueError("the structure of the static inputs does not match this step's inputs")
        for d, s in zip(dst, src):
            _copy_tree(d, s)
    elif dst != src:
        raise ValueError(f"non-tensor input {src!r} differs from {dst!r} at capture: it is a constant in the graph")


def _root_oom(exc: BaseException) -> BaseException:
    """录图途中显存不足时，torch.cuda.graph 退出时的 capture_end 会抛出另一个 RuntimeError，把 OOM 藏进 __context__。

    返回异常链里的 torch.OutOfMemoryError（没有就返回 exc 本身）：run_arm 的“显存不足就把批减半”只认 OOM。
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, torch.OutOfMemoryError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


class _GraphedStep:
    """FastDecoder 的 overlap 模式（"graph" / "streams"）：手动录制的 CUDA graph 解码步。

    解码步拆成“每个前向单元一次前向（FastDecoder._forward_unit）+ 融合选词（FastDecoder._choose）”，各自用
    torch.compile 编译（fullgraph、不带 cudagraphs），再把整步手动录成一张 CUDA graph。
    side_streams=True 时目标之外的每个单元在一条侧流上：侧流先等主流（fork，在排入任何前向之前），融合前主流等侧流
    （join），录进图里就是依赖边，1B 前向与 8B 前向在图内是两条互不依赖的支路，可以并行（见 run）。

    为什么手动：reduce-overhead 的整步编译把三个模型串在一条流上；1B 模型 hidden 只有 2048，它们的小 kernel
    单独跑时喂不满显存带宽（BENCHMARKS.md 的剖析）。torch 2.11 的 dynamo 不能把多条流编进一张图，
    所以流的分叉/汇合与图的录制都放在编译区之外，由这里管理。

    调用约定与 FastDecoder._step 相同：(tokens (B, 1), positions [(B, 1)] × 模型数, masks [(B, L)] × 模型数, slot (1,), *rest)
    → _choose(z, *rest) 的输出元组（next (B,), alpha (B,), finished (B,), bad (B,), stop (B,)）。状态机（每组新缓存重新开始）：
      第 1、2 次调用：直接执行（触发编译与 cuBLAS 等的惰性初始化），它们就是真实的解码步，不需要事后撤销；
      第 3 次：把输入复制成静态缓冲并录图（录制不执行 kernel），然后重放——同样是真实的一步；
      之后：输入原地写进静态缓冲，再重放。返回的是图的输出缓冲，下一次重放会覆盖它（调用方 .clone()）。
    CPU 上没有 CUDA graph：同样走静态缓冲，只是“重放”= 在静态缓冲上直接执行，CPU 测试因此覆盖这套搬运逻辑。
    """

    WARMUP_CALLS: Final[int] = 2

    def __init__(self, decoder: "FastDecoder", *, compile: bool, side_streams: bool) -> None:
        self.decoder = decoder
        self.cuda = decoder.device.type == "cuda"
        # dynamic=False：一个解码器的批形状固定；不让 dynamo 在第二个形状出现时改编成动态形状的图。
        self.forward: Callable[..., list[torch.Tensor]] = (
            torch.compile(decoder._forward_unit, fullgraph=True, dynamic=False) if compile
            else decoder._forward_unit)
        self.choose: Callable[..., tuple[torch.Tensor, ...]] = (
            torch.compile(decoder._choose, fullgraph=True, dynamic=False) if compile else decoder._choose)
        n = len(decoder.units)
        # streams[u]：第 u 个前向单元所在的侧流；None = 主流（目标模型所在的单元 0 总在主流上）。
        self.streams: list[torch.cuda.Stream | None] = [None] * n
        if self.cuda and side_streams:
            self.streams = [None] + [torch.cuda.Stream(decoder.device) for _ in range(n - 1)]
        # 预热与录制用同一条流：cuBLAS 按流惰性分配的工作区等在预热时就建好，录制期间不再分配。
        self.capture_stream: torch.cuda.Stream | None = torch.cuda.Stream(decoder.device) if self.cuda else None
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: tuple[Any, ...] | None = None
        self.static_out: tuple[torch.Tensor, ...] | None = None

    def invalidate(self) -> None:
        """缓存重新分配时调用：图里录的是旧缓存的地址，丢掉它（连同它的显存池），下次调用重新预热、录制。"""
        self.calls = 0
        self.graph = None
        self.static_in = None
        self.static_out = None

    def run(self, tokens: torch.Tensor, positions: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
            slot: torch.Tensor, *rest: Any) -> tuple[torch.Tensor, ...]:
        """执行（或在录制中记录）一步：每个前向单元一次前向（侧流上的与主流并行），汇合后融合选词。形状见类说明。

        内存安全：侧流上分配的 logits 在主流等待侧流之后才被读；下一次侧流再分配之前它又先等主流，
        所以缓存分配器回收的块不会在仍被读取时被改写（不需要 record_stream）。
        """
        main = torch.cuda.current_stream(self.decoder.device) if self.cuda else None
        # fork：每条侧流先等主流，而且都在主流排入任何前向之前。wait_stream 等的是主流上“此刻之前”排入的全部工作；
        # 若先排目标的前向、再 fork，侧流就要等整个 8B 前向做完，两个单元在图里首尾相接，
        # 根本没有并行（那几轮 streams 与 graph 一样快，原因在此，而不是当时推断的“kernel 已占满 GPU”）。
        for stream in self.streams:
            if stream is not None:
                stream.wait_stream(main)  # 侧流看到本步的输入（在主流上写好的 tokens / positions / masks / slot）
        z: list[torch.Tensor] = []
        for u, stream in enumerate(self.streams):
            if stream is None:
                z.extend(self.forward(u, tokens, positions, masks, slot))
                continue
            with torch.cuda.stream(stream):
                z.extend(self.forward(u, tokens, positions, masks, slot))
        for stream in self.streams:
            if stream is not None:
                main.wait_stream(stream)  # join：融合之前三路 logits 都已算完
        return self.choose(z, *rest)

    def _on_capture_stream(self, inputs: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        """预热调用：在录制用的流上执行一步，前后与调用方的当前流互相等待（结果对调用方立即可用）。"""
        if self.capture_stream is None:
            return self.run(*inputs)
        current = torch.cuda.current_stream(self.decoder.device)
        self.capture_stream.wait_stream(current)
        with torch.cuda.stream(self.capture_stream):
            out = self.run(*inputs)
        current.wait_stream(self.capture_stream)
        return out

    def __call__(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        """一步解码，见类说明的状态机。inputs 与 FastDecoder._step 的参数相同。"""
        self.calls += 1
        if self.calls <= self.WARMUP_CALLS:
            return self._on_capture_stream(inputs)
        if self.static_in is None:
            self.static_in = _clone_tree(inputs)
            if self.capture_stream is not None:
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, stream=self.capture_stream):
                        self.static_out = self.run(*self.static_in)
                except Exception as exc:
                    self.invalidate()
                    root = _root_oom(exc)
                    if root is exc:
                        raise
                    raise root from None  # 上游只认 OOM；capture_end 的后续错误只是它的结果
                self.graph = graph
        else:
            _copy_tree(self.static_in, inputs)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.static_out = self.run(*self.static_in)
        assert self.static_out is not None
        return self.static_out
