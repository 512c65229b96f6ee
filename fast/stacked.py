"""把 M 个形状相同的 Llama（引导时的专家 + 基座）叠成一次解码前向：每个投影只发一次批量矩阵乘。

为什么要它：两个 1B 模型 hidden 只有 2048，它们的矩阵乘每个只读几 MB 权重，单独发出时喂不满显存带宽，
小 kernel 的启动也占不少时间。两个同形状模型叠起来：
- 每层的 q/k/v 拼成一个权重、gate/up 拼成一个权重，再在模型维 M 上 bmm：每层 4 次矩阵乘（原来 2 × 7 次），
  每次读的字节翻倍，kernel 数约减半；
- 两个模型的 KV 缓存放在同一个张量里 (M·B, H_kv, L, D)，注意力一次 SDPA 算完 M·B 行；
- RMSNorm、RoPE、SiLU·mul、残差也都在 M 维上一起算。

不多占显存：叠好的权重是新分配的连续张量，原模型的每个参数改为指向其中的切片（`param.data = 视图`），
旧存储随即释放。transformers 的前向（预填充之外的慢速参考、其他路径）照常工作，读到的是同一份数据。

数值规则逐项照搬 transformers 的 Llama（RMSNorm 先转 float32、RoPE 用模型自己的 rotary_emb、
残差在模型精度下相加），float32 下与 transformers 的前向一致到舍入误差，测试逐 token 对比慢速循环。
只支持结构完全相同、无偏置、SiLU 的 Llama：不满足时 check_stackable 说明原因。

4 位（bitsandbytes NF4，issue 16）：解码层的 7 个投影都是 NF4 的 Linear4bit 时，q/k/v、gate/up 照样拼接、模型照样叠加，
只是叠的是 bitsandbytes 的打包字节（每个 Params4bit 改为指向叠好的 (S, ΣN, K/2) uint8 张量的切片，4 位权重不多一份），
矩阵乘走 fast.nf4 的 Triton kernel（查表反量化在寄存器里做），而不是 bitsandbytes 每步重建一份 bf16 权重。
嵌入、lm_head、RMSNorm 的权重在 bitsandbytes 模型里本来就是 bf16，照常叠。

张量子类的量化权重（torchao int4 等，weight_kind "module"）：打包布局属于库，不能拼接也不能叠，投影逐模型、逐个走
库自己的 F.linear（ModuleWeights）；其余部分（嵌入、注意力与 Triton 解码注意力、RMSNorm、RoPE、KV 缓存、侧流）照常
叠加。resolve_stack 的 auto 在 CUDA 编译时也叠它（ff2a723 的 H200：引导批 1 叠加 4.28 ms/步，不叠 15.20 ms/步）。
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fast.attention import (ATTENTION_MODES, head_dim_of, load_triton_attention, triton_attention_problem,
                            triton_decode_attention)
from fast.nf4 import (NF4Weight, bnb_state, load_nf4_kernels, nf4_linear_stacked, repack_nf4, tune_nf4,
                      with_bnb_states)

# 预填充每块每个模型的 token 数上限（StackedLlama.prefill 按行分块，见那里的说明）。1024：块内的矩阵乘仍然够大
# （M = 1024 行的 GEMM 在 tensor core 上仍受算力限制），中间张量从 B·T 行降到至多 1024 行。为什么不是原来的 4096
# （issue 16 的显存目标）：d48920c 在批 16、1,280 个 token 时量到的峰值 12.42 GiB 里有 0.81 GiB 是预填充的临时张量；
# 块为 4096 时 8B 的 gate/up 输出 (3 行 × 1,152) × 28,672 × 2 B ≈ 0.2 GB，SiLU·mul 与 float32 的 RMSNorm 再各一份量级
# 相同，块为 1024 时都是它们的三分之一。代价：NF4 的预填充（bitsandbytes 反量化 + cuBLAS）每块都把整份权重反量化
# 一次，块数变多（批 16、1,152 个 token 时 6 块 → 16 块，每块约 6 ms 的反量化），预填充一次多约 0.1 s。
PREFILL_TOKENS: int = 1024

# 必须在所有模型之间相同的配置项：它们决定权重形状与数值规则。
SHAPE_KEYS: tuple[str, ...] = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                               "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "hidden_act",
                               "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings")


def check_stackable(models: Sequence[PreTrainedModel]) -> str | None:
    """能否叠成一次前向；能则返回 None，否则返回一句说明原因的话（调用方决定报错还是不叠）。"""
    if not models:
        return "no models"
    if len({id(m) for m in models}) != len(models):
        return "the same model object appears twice (stacking needs separate weights)"
    first = models[0]
    for m in models:
        cfg = m.config
        if cfg.model_type != "llama":
            return f"only the Llama architecture is supported, got model_type={cfg.model_type!r}"
        kind = weight_kind(m)
        if kind not in WEIGHT_KINDS:
            return kind
        if kind != weight_kind(first):
            return f"the models' projection weights are of different kinds ({weight_kind(first)} and {kind})"
        if len(set((getattr(m, "hf_device_map", None) or {"": 0}).values())) > 1:
            return "the model is spread over several devices by device_map"
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            return "Llama variants with biases are not supported"
        if cfg.hidden_act != "silu":
            return f"only hidden_act='silu' is supported, got {cfg.hidden_act!r}"
        if m.dtype != first.dtype or m.device != first.device:
            return f"the models differ in dtype/device: {m.dtype}@{m.device} and {first.dtype}@{first.device}"
        for key in SHAPE_KEYS:
            if getattr(cfg, key, None) != getattr(first.config, key, None):
                return f"config key {key} differs: {getattr(cfg, key, None)!r} and {getattr(first.config, key, None)!r}"
        if m.model.rotary_emb.attention_scaling != first.model.rotary_emb.attention_scaling or not torch.equal(
                m.model.rotary_emb.inv_freq, first.model.rotary_emb.inv_freq):
            return "the RoPE frequencies differ"
    return None


PROJECTIONS: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# weight_kind 能叠加的三种（其余返回的是原因）
WEIGHT_KINDS: tuple[str, ...] = ("plain", "nf4", "module")


def weight_kind(model: PreTrainedModel) -> str:
    """解码层投影的权重种类："plain"（普通张量）、"nf4"（全部是 bitsandbytes NF4 的 Linear4bit，块不跨行）、
    "module"（全部是无偏置 nn.Linear 上的张量子类权重，例如 torchao 的 int4：不能拼接，ModuleWeights 逐个调用），
    否则返回一句不能叠加的原因。按模块本身判断（不只看 hf_quantizer）：测试里手工换成 Linear4bit 的模型也一样。"""
    mods = [layer.get_submodule(name) for layer in model.model.layers for name in PROJECTIONS]
    four_bit = [getattr(getattr(mod, "weight", None), "quant_state", None) for mod in mods]
    if all(state is None for state in four_bit):
        linear = all(type(mod) is torch.nn.Linear and mod.bias is None for mod in mods)
        if linear and all(type(mod.weight) not in (torch.Tensor, torch.nn.Parameter) for mod in mods):
            return "module"
        if getattr(model, "hf_quantizer", None) is not None or any(type(mod) is not torch.nn.Linear for mod in mods):
            return ("quantized weights other than bitsandbytes NF4 or tensor-subclass weights on bias-free "
                    "nn.Linear layers (e.g. torchao int4) cannot be stacked")
        return "plain"
    if any(state is None for state in four_bit):
        return "only some projections are 4-bit"
    for mod, state in zip(mods, four_bit):
        if getattr(state, "quant_type", None) != "nf4":
            return f"4-bit weights must be NF4, got quant_type={getattr(state, 'quant_type', None)!r}"
        if mod.in_features % state.blocksize:
            return (f"in_features={mod.in_features} is not a multiple of the NF4 blocksize {state.blocksize} "
                    "(blocks would straddle rows)")
        if getattr(mod, "bias", None) is not None:
            return "4-bit projections with biases are not supported"
        if mod.weight.dtype != torch.uint8:  # quant_storage ≠ uint8（FSDP 用）：打包字节的张量形状不同
            return f"4-bit weights stored as {mod.weight.dtype} (bnb_4bit_quant_storage) are not supported; use uint8"
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes 在 AVX512-BF16 的 CPU 上前向时会改排字节
            return "bitsandbytes repacked these 4-bit weights into its CPU layout; stacking needs its standard layout"
    return "nf4"


@dataclass
class ModuleWeights:
    """不能拼接、也不能叠加的量化权重（weight_kind "module"，例如 torchao int4 的张量子类）：weights[m] 是模型 m
    按拼接顺序的投影权重（q、k、v 或 gate、up，或一个），前向时逐模型、逐投影用 F.linear（库自己的 kernel），
    输出在最后一维上按同样的顺序拼起来——与叠加好的权重算出的 (M, N, ΣN) 布局相同，其余前向（注意力、RMSNorm、
    RoPE、KV 缓存、侧流）照常叠加。权重不拷贝：就是模型自己的参数对象。"""

    weights: list[list[torch.Tensor]]


@dataclass
class StackedWeights:
    """叠好的权重（第 0 维是模型 m）。qkv: [层] (M, (H_q + 2·H_kv)·D, hidden)；o: [层] (M, hidden, H_q·D)；
    gate_up: [层] (M, 2·I, hidden)；down: [层] (M, hidden, I)；ln1/ln2: [层] (M, hidden)；
    norm: (M, hidden)；embed: (M, V, hidden)；lm_head: (M, V, hidden)（权重绑定时与 embed 是同一个张量）。
    4 位模型的 qkv/o/gate_up/down 是叠好的 NF4Weight（qweight (M, out, in/2) uint8、absmax (M, out, in/64)）。"""

    qkv: list[torch.Tensor | NF4Weight | ModuleWeights]
    o: list[torch.Tensor | NF4Weight | ModuleWeights]
    gate_up: list[torch.Tensor | NF4Weight | ModuleWeights]
    down: list[torch.Tensor | NF4Weight | ModuleWeights]
    ln1: list[torch.Tensor]
    ln2: list[torch.Tensor]
    norm: torch.Tensor
    embed: torch.Tensor
    lm_head: torch.Tensor
    anchors: list[int]  # 每个模型第 0 层 q_proj 权重叠好后的地址：地址变了（模型被 .to() 过）就要重新叠


def _stack_into(groups: list[list[torch.nn.Parameter]]) -> torch.Tensor:
    """groups[m] 为模型 m 要沿第 0 维拼接的参数。分配 (M, Σ行, ...) 的连续张量，拷入后让每个参数指向自己的切片。

    逐组拷贝、逐个改指向：旧存储在改指向后即可释放，峰值显存只多一组（一层）的权重。
    """
    head = groups[0]
    rows = sum(p.shape[0] for p in head)
    out = torch.empty((len(groups), rows, *head[0].shape[1:]), dtype=head[0].dtype, device=head[0].device)
    for m, group in enumerate(groups):
        row = 0
        for p in group:
            n = p.shape[0]
            out[m, row:row + n].copy_(p.data)
            p.data = out[m, row:row + n]
            row += n
    return out


def _stack_nf4_into(groups: list[list[torch.nn.Module]]) -> NF4Weight:
    """NF4 版的 _stack_into：groups[m] 为模型 m 要沿输出维拼接的 Linear4bit。分配 (M, ΣN, K/2) uint8 的打包字节与
    (M, ΣN, K/bs) float32 的还原 absmax，拷入后让每个 Params4bit 指向自己的切片（形状保持 bitsandbytes 的
    (N·K/2, 1)），它的 QuantState 换成指向 absmax 切片的非嵌套状态（bnb_state）：transformers/bitsandbytes 的前向
    照常工作、结果逐位不变，读的是同一份字节与尺度；双重量化的 uint8 absmax 随旧状态释放（见 fast/nf4.py 的说明）。"""
    head = [mod.weight for mod in groups[0]]
    k, blocksize = head[0].quant_state.shape[1], head[0].quant_state.blocksize
    rows = sum(p.quant_state.shape[0] for p in head)
    device = head[0].device
    q = torch.empty((len(groups), rows, k // 2), dtype=torch.uint8, device=device)
    a = torch.empty((len(groups), rows, k // blocksize), dtype=torch.float32, device=device)
    one = None
    for m, group in enumerate(groups):
        row = 0
        for mod in group:
            p = mod.weight
            one = repack_nf4(p.data, p.quant_state)  # qweight 是视图，absmax 新算的 (N, K/bs)
            n = one.out_features
            q[m, row:row + n].copy_(one.qweight)
            a[m, row:row + n].copy_(one.absmax)
            p.data = q[m, row:row + n].reshape(p.data.shape)
            _share_scales(mod, bnb_state(a[m, row:row + n], one))
            row += n
    assert one is not None
    # 带上 bitsandbytes 的 QuantState（absmax 的视图）：调优若为某个形状选了 bitsandbytes 自己的 kernel，编译前就已备好
    return with_bnb_states(NF4Weight(qweight=q, absmax=a, code=one.code, blocksize=blocksize, dtype=one.dtype,
                                     out_features=rows))


def _share_scales(mod: torch.nn.Module, state: Any) -> None:
    """Linear4bit 的量化状态换成 state。bitsandbytes 把同一个 QuantState 存在两处（Params4bit.quant_state 与
    Linear4bit.quant_state，后者在参数丢了状态时用来恢复）：两处都换，旧状态（双重量化的 uint8 absmax）才真正释放。"""
    old = mod.weight.quant_state
    for holder in (mod.weight, mod, getattr(mod.weight, "module", None)):
        if holder is not None and getattr(holder, "quant_state", None) is old:
            holder.quant_state = state


# 已叠好的权重：键是模型组里的第一个模型（弱引用，模型被释放时条目自动消失）。
_STACKS: "weakref.WeakKeyDictionary[PreTrainedModel, tuple[tuple[int, ...], StackedWeights]]" = (
    weakref.WeakKeyDictionary())


def _anchor(model: PreTrainedModel) -> int:
    """模型第 0 层 q_proj 权重的地址：用来判断叠好的视图是否仍然有效。"""
    return model.model.layers[0].self_attn.q_proj.weight.data_ptr()


def stack_weights(models: Sequence[PreTrainedModel]) -> StackedWeights:
    """把模型组的权重叠起来（同一组只叠一次，之后复用）。见模块说明；不能叠时抛 ValueError 说明原因。"""
    reason = check_stackable(models)
    if reason is not None:
        raise ValueError(f"these models cannot be stacked into one forward: {reason}")
    ids = tuple(id(m) for m in models)
    cached = _STACKS.get(models[0])
    if cached is not None and cached[0] == ids and cached[1].anchors == [_anchor(m) for m in models]:
        return cached[1]
    kind = weight_kind(models[0])

    def proj(ls: list[torch.nn.Module], *names: str) -> torch.Tensor | NF4Weight | ModuleWeights:
        """一层的若干投影（各模型）拼接叠加：NF4 叠打包字节，张量子类权重原样收进 ModuleWeights，否则叠 bf16/fp32 参数。"""
        if kind == "nf4":
            return _stack_nf4_into([[l.get_submodule(n) for n in names] for l in ls])
        if kind == "module":
            return ModuleWeights([[l.get_submodule(n).weight for n in names] for l in ls])
        return _stack_into([[l.get_submodule(n).weight for n in names] for l in ls])

    with torch.no_grad():
        layers = [[m.model.layers[i] for m in models] for i in range(models[0].config.num_hidden_layers)]
        qkv = [proj(ls, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") for ls in layers]
        o = [proj(ls, "self_attn.o_proj") for ls in layers]
        gate_up = [proj(ls, "mlp.gate_proj", "mlp.up_proj") for ls in layers]
        down = [proj(ls, "mlp.down_proj") for ls in layers]
        ln1 = [_stack_into([[l.input_layernorm.weight] for l in ls]) for ls in layers]
        ln2 = [_stack_into([[l.post_attention_layernorm.weight] for l in ls]) for ls in layers]
        norm = _stack_into([[m.model.norm.weight] for m in models])
        tied = [m.lm_head.weight is m.model.embed_tokens.weight for m in models]
        embed = _stack_into([[m.model.embed_tokens.weight] for m in models])
        # 绑定的 lm_head 与 embed 是同一个 Parameter，已经指向 embed 的切片；全部绑定时直接共用 embed。
        lm_head = embed if all(tied) else _stack_into([[m.lm_head.weight] for m in models])
    weights = StackedWeights(qkv=qkv, o=o, gate_up=gate_up, down=down, ln1=ln1, ln2=ln2, norm=norm, embed=embed,
                             lm_head=lm_head, anchors=[_anchor(m) for m in models])
    # 标成静态地址：这些张量不是 nn.Parameter，torch.compile(mode="reduce-overhead") 的 cudagraph 会把它们当作
    # 普通输入、每次重放前整份拷进自己的静态缓冲（那样每步都要多拷一份全部权重，解码慢一倍以上、峰值显存多一份权重）。
    for t in [*ln1, *ln2, norm, embed, lm_head]:
        torch._dynamo.mark_static_address(t)
    for w in [*qkv, *o, *gate_up, *down]:
        if isinstance(w, ModuleWeights):  # 张量子类：标它里面的普通张量（可追踪子类的 __tensor_flatten__ 协议）
            parts = [getattr(p, n) for ps in w.weights for p in ps
                     for n in (p.__tensor_flatten__()[0] if hasattr(p, "__tensor_flatten__") else ())]
        else:
            parts = [w.qweight, w.absmax, w.code] if isinstance(w, NF4Weight) else [w]
        for t in parts:
            torch._dynamo.mark_static_address(t)
    _STACKS[models[0]] = (ids, weights)
    return weights


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """与 transformers 的 LlamaRMSNorm 相同的规则：float32 求均方，转回模型精度后乘权重。
    x: (M, N, hidden)；weight: (M, hidden)。"""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight[:, None, :] * h.to(x.dtype)


def _linear(x: torch.Tensor, w: torch.Tensor | NF4Weight) -> torch.Tensor:
    """逐模型的 x @ wᵀ：x (M, N, in)，w (M, out, in) → (M, N, out)，一次 bmm（w 转置只是视图）；
    NF4 权重走 fast.nf4 的 Triton kernel（一次发射算 M 个模型，float32 累加，输出 x 的精度）；
    ModuleWeights（张量子类，例如 torchao int4）逐模型、逐投影走库自己的 F.linear。"""
    if isinstance(w, NF4Weight):
        return nf4_linear_stacked(x.contiguous(), w)
    if isinstance(w, ModuleWeights):  # 逐模型、逐投影调用库的 kernel，按拼接顺序拼回 (M, N, ΣN)
        outs = [torch.cat([F.linear(x[m], p) for p in ps], dim=-1) if len(ps) > 1 else F.linear(x[m], ps[0])
                for m, ps in enumerate(w.weights)]
        return outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)
    return torch.bmm(x, w.transpose(1, 2))


class StackedLlama:
    """M 个同形状 Llama 的一次前向：预填充 prefill() 与单 token 解码 decode()，自带 KV 缓存。

    行的排列：第 m 个模型的第 b 行是“扁平行” m·B + b（B 为批大小），输入 id、mask、位置都按这个顺序，
    KV 缓存 keys[层] / values[层] 为 (M·B, H_kv, L, D)。缓存的第 s 个槽位对所有行是同一个 s
    （与 transformers 的 StaticCache 相同）：预填充占 0..T−1（左填充的位置由 mask 屏蔽），第 n 个解码 token 写 T+n−1。
    """

    def __init__(self, models: Sequence[PreTrainedModel], attention: str = "sdpa") -> None:
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention={attention!r}: must be {' / '.join(ATTENTION_MODES)}")
        cfg = models[0].config
        reason = triton_attention_problem(head_dim_of(cfg)) if attention == "triton" else None
        if reason is not None:
            raise ValueError(f"attention='triton' is not possible: {reason}; use attention='sdpa'")
        self.attention = attention  # 解码注意力："sdpa"（cuDNN，读满缓存）或 "triton"（只读到 slot）
        if attention == "triton":
            load_triton_attention()  # 在编译区域之外注册算子
        self.weights = stack_weights(models)
        self.nf4 = isinstance(self.weights.qkv[0], NF4Weight)
        if self.nf4:
            load_nf4_kernels()  # 在编译区域之外注册算子
        self.tuned: dict[str, object] = {}  # tune_nf4 的结果（基准记录它）
        self.tune_s = 0.0  # tune_nf4 累计用的秒数：启动时间里调优占多少（基准记录它，与编译、录图分开）
        self.n_models = len(models)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = head_dim_of(cfg)
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.inter = cfg.intermediate_size
        self.rotary = models[0].model.rotary_emb  # 所有模型的 RoPE 相同（check_stackable 已核对）
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.shape: tuple[int, int] | None = None

    def allocate(self, batch: int, length: int) -> None:
        """为 (批大小, 缓存长度) 分配 KV 缓存（形状不变时复用，内容不必清零：未写的槽位被 mask 屏蔽）。

        标成静态地址：整步被 torch.compile(mode="reduce-overhead") 录成 CUDA graph 时，缓存的原地写入
        不会让 cudagraph 因“输入被修改”而退回 eager（transformers 的 StaticCache 也这样做）。
        """
        if self.shape == (batch, length):
            return
        if self.nf4:
            # 4 位：按本批的解码形状（M = batch 行）给每种权重形状实测选 kernel 配置（编译追踪之前：那时配置成了常量）；
            # 只在 CUDA 上实测，CPU 上 tune_nf4 什么也不做（解释器的速度没有意义）
            w = self.weights
            start = time.perf_counter()
            self.tuned.update(tune_nf4([w.qkv[0], w.o[0], w.gate_up[0], w.down[0]], batch, w.embed.dtype))
            self.tune_s += time.perf_counter() - start
        self.keys, self.values = [], []
        w = self.weights.embed
        shape = (self.n_models * batch, self.kv_heads, length, self.head_dim)
        for _ in self.weights.qkv:
            for store in (self.keys, self.values):
                t = torch.zeros(shape, dtype=w.dtype, device=w.device)
                torch._dynamo.mark_static_address(t)
                store.append(t)
        self.shape = (batch, length)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (M·B, T) → (M, B·T, hidden)：第 m 个模型的行查第 m 张嵌入表（一次索引，不分模型循环）。"""
        m, vocab = self.n_models, self.weights.embed.shape[1]
        offset = torch.arange(m, device=ids.device).repeat_interleave(ids.shape[0] // m)[:, None] * vocab
        return self.weights.embed.flatten(0, 1)[ids + offset].reshape(m, -1, self.weights.embed.shape[-1])

    def _layers(self, x: torch.Tensor, positions: torch.Tensor,
                attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """所有层。x: (M, N, hidden)，N = B·T；positions: (M·B, T)；attend(l, q, k, v) 写缓存并做注意力，
        输入 q (M·B, H, T, D)、k/v (M·B, H_kv, T, D)，返回 (M·B, T, H·D)。"""
        w, m = self.weights, self.n_models
        rows, t = positions.shape
        cos, sin = self.rotary(x, positions)  # (M·B, T, D)，模型精度（与 transformers 相同）
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for l in range(len(w.qkv)):
            h = _rms_norm(x, w.ln1[l], self.eps)
            qkv = _linear(h, w.qkv[l]).reshape(rows, t, -1)
            q = qkv[..., :q_size].reshape(rows, t, self.heads, self.head_dim).transpose(1, 2)
            k = qkv[..., q_size:q_size + kv_size].reshape(rows, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = qkv[..., q_size + kv_size:].reshape(rows, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            a = attend(l, q, k, v).reshape(m, -1, q_size)
            x = x + _linear(a, w.o[l])
            h = _rms_norm(x, w.ln2[l], self.eps)
            gate, up = _linear(h, w.gate_up[l]).split(self.inter, dim=-1)
            x = x + _linear(F.silu(gate) * up, w.down[l])
        return x

    def _logits(self, x_last: torch.Tensor) -> torch.Tensor:
        """最后位置的隐状态 (M, B, hidden) → logits (M, B, V)，模型精度。"""
        return _linear(_rms_norm(x_last, self.weights.norm, self.eps), self.weights.lm_head)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """预填充（左填充的提示）：ids/mask/positions (M·B, T)，mask 1 = 真实 token。
        把 K/V 写进缓存槽位 0..T−1，返回最后位置的 logits (M, B, V)。先 allocate()。

        按行分块：每块每个模型至多 PREFILL_TOKENS 个 token（至少一行）。为什么：预填充的中间张量随 B·T 线性增长
        （MLP 的 gate/up 输出是 B·T × 2·I：批 16、768 个 token 时 8B 约 0.7 GB、两个 1B 叠起来约 0.8 GB，再加 SiLU·mul 的
        两份），是整次运行的显存峰值；分块后它只剩一块的大小，KV 缓存与权重不变。各行的预填充互不相关（注意力只在行内），
        分块不改变数学（块大小不同时矩阵乘的 kernel 可能不同，bf16 下舍入可以不同，与批大小不同时一样）。
        """
        rows, t = ids.shape
        batch = rows // self.n_models
        chunk = max(1, PREFILL_TOKENS // max(1, t))
        if chunk >= batch:
            return self._prefill_rows(ids, mask, positions, None)
        parts = []
        for b0 in range(0, batch, chunk):
            b = torch.arange(b0, min(b0 + chunk, batch), device=ids.device)
            sel = (torch.arange(self.n_models, device=ids.device)[:, None] * batch + b[None, :]).reshape(-1)
            parts.append(self._prefill_rows(ids[sel], mask[sel], positions[sel], sel))
        return torch.cat(parts, dim=1)

    def _prefill_rows(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                      sel: torch.Tensor | None) -> torch.Tensor:
        """一块行的预填充：ids/mask/positions (M·b, T)，按模型主序（第 m 个模型的第 j 行是 m·b + j）；
        sel (M·b,) 这些行在缓存里的行号（None = 全部行，顺序相同）。返回 (M, b, V)。

        注意力掩码 = 因果 ∧ (键是真实 token ∨ 键就是查询自己)：左填充位置的查询只看见自己，
        不会出现整行被屏蔽（那会得到 NaN，NaN 的 V 再被后面的查询乘 0 仍是 NaN）；真实行的掩码与
        transformers 完全相同。GQA 在这里显式复制 K/V（与 transformers 的 sdpa 预填充相同），
        让带掩码的 SDPA 走省显存的 kernel——预填充每批只做一次。
        """
        assert self.shape is not None, "call allocate() first"
        rows, t = ids.shape
        n_rep = self.heads // self.kv_heads
        idx = torch.arange(t, device=ids.device)
        causal = idx[None, :] <= idx[:, None]  # (T, T)：查询 i 看键 j ≤ i
        visible = causal[None] & (mask.bool()[:, None, :] | torch.eye(t, dtype=torch.bool, device=ids.device)[None])

        def attend(l: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if sel is None:
                self.keys[l][:, :, :t] = k
                self.values[l][:, :, :t] = v
            else:
                self.keys[l][sel, :, :t] = k
                self.values[l][sel, :, :t] = v
            k = k[:, :, None].expand(rows, self.kv_heads, n_rep, t, self.head_dim).reshape(rows, self.heads, t, -1)
            v = v[:, :, None].expand(rows, self.kv_heads, n_rep, t, self.head_dim).reshape(rows, self.heads, t, -1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], scale=self.scale)
            return out.transpose(1, 2)

        x = self._layers(self._embed(ids), positions, attend)
        last = x.reshape(self.n_models, rows // self.n_models, t, -1)[:, :, -1]
        return self._logits(last)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               slot: torch.Tensor) -> torch.Tensor:
        """一个解码步：tokens (B, 1) 喂给全部 M 个模型（引导时三个模型吃同一个 token）；
        positions (M·B, 1) 每行的位置编号；mask (M·B, L) 1 = 非左填充；slot (1,) 本 token 写入的缓存槽位。
        返回 logits (M, B, V)。全部是设备张量、形状固定，可以被编译并录进 CUDA graph。

        注意力用“打包 GQA”：共享一个 KV 头的 n_rep 个查询头当作查询长度维（同 evaluator.packed_gqa_attention），
        不复制 K/V；可见 = 非左填充 ∧ 槽位 ≤ slot。self.attention 选实现："sdpa" 每层一次 SDPA（可见掩码每步建一次，
        各层共用），"triton" 用 triton_decode_attention（直接读 mask 与 slot，只读已写的槽位）。
        """
        rows = positions.shape[0]
        n_rep = self.heads // self.kv_heads
        length = mask.shape[1]
        visible = (None if self.attention == "triton" else
                   (mask.bool() & (torch.arange(length, device=mask.device)[None, :] <= slot))[:, None, None, :])

        def attend(l: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.keys[l].index_copy_(2, slot, k)
            self.values[l].index_copy_(2, slot, v)
            packed = q.reshape(rows, self.kv_heads, n_rep, self.head_dim)
            if self.attention == "triton":
                out = triton_decode_attention(packed, self.keys[l], self.values[l], mask, slot, self.scale)
            else:
                out = F.scaled_dot_product_attention(packed, self.keys[l], self.values[l], attn_mask=visible,
                                                     scale=self.scale)
            return out.reshape(rows, 1, self.heads * self.head_dim)

        ids = tokens.repeat(self.n_models, 1)
        return self._logits(self._layers(self._embed(ids), positions, attend))

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               slot: torch.Tensor) -> torch.Tensor:
        """投机解码的验证前向：一次喂 T 个位置。tokens (B, T) 喂给全部 M 个模型；positions (M·B, T)；
        mask (M·B, L) 1 = 可见（左填充与被拒的槽位为 0）；slot (1,) 第一个新 token 的槽位，第 i 个写 slot + i。
        返回 logits (M, B, T, V)，模型精度。T = 1 时与 decode 的数学相同。

        可见 = mask ∧ 槽位 ≤ slot + i（第 i 个查询只看到自己与之前写入的槽位，块内因果）。注意力仍是“打包 GQA”：
        共享一个 KV 头的 n_rep 个查询头与 T 个位置一起当作查询长度维 (n_rep·T)，不复制 K/V。
        self.attention == "triton"：triton_decode_attention(t=T) 只读到 slot + T − 1；"sdpa"：掩码按查询位置 i 复制
        n_rep 份，SDPA 读满整个静态缓存（投机解码的缓存按 (K+1)·新 token 数分配，比解码的长得多）。
        """
        rows, t = positions.shape
        n_rep = self.heads // self.kv_heads
        length = mask.shape[1]
        cols = slot + torch.arange(t, device=mask.device)  # (T,)：本次写入的槽位
        visible = None
        if self.attention != "triton":
            visible = mask.bool()[:, None, :] & (torch.arange(length, device=mask.device)[None, :] <= cols[:, None])[None]
            visible = visible[:, None, None].expand(rows, 1, n_rep, t, length).reshape(rows, 1, n_rep * t, length)

        def attend(l: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.keys[l].index_copy_(2, cols, k)
            self.values[l].index_copy_(2, cols, v)
            packed = q.reshape(rows, self.kv_heads, n_rep * t, self.head_dim)  # 头 h = k·n_rep + r，查询 (r, i)
            if self.attention == "triton":  # 只读到 slot + T − 1，块内因果在 kernel 里
                out = triton_decode_attention(packed, self.keys[l], self.values[l], mask, slot, self.scale, t=t)
            else:
                out = F.scaled_dot_product_attention(packed, self.keys[l], self.values[l], attn_mask=visible,
                                                     scale=self.scale)
            return out.reshape(rows, self.heads, t, self.head_dim).transpose(1, 2)

        ids = tokens.repeat(self.n_models, 1)
        x = self._layers(self._embed(ids), positions, attend)  # (M, B·T, hidden)，行内按 (b, i) 排列
        logits = self._logits(x)  # (M, B·T, V)
        return logits.reshape(self.n_models, -1, t, logits.shape[-1])
