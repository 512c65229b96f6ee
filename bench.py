"""解码速度基准：目标单独 vs 三模型引导，走与 evaluator.py 完全相同的代码路径（FastDecoder / generate_batch）。

速度与权重取值无关，所以用真实配置（Llama-3.1-8B / Llama-3.2-1B 的形状）构造随机权重模型，无需下载。
计时：先预热（编译与 CUDA graph 录制不计入），再在设备同步后计时；每步毫秒数 =
(T(生成 N 个 token) − T(生成 1 个 token)) / (N − 1)，即扣除两者共有的 prefill。忽略结束记号（固定长度）。

    python bench.py                                   # GPU：bf16，批 1/16/64/最大，目标 vs 引导，快速路径
    python bench.py --quant nf4 --batches 16,64       # 4-bit NF4（需要 bitsandbytes）
    python bench.py --quant int4 --batches 16,64      # 4-bit int4（torchao tile-packed，需要 torchao==0.18.0）
    python bench.py --check                           # 真实形状上 fp32：快速路径 == 慢速循环逐 token；bf16 的一致率
    python bench.py --check --quant nf4               # 同上，NF4 权重：fast.nf4 的 kernel 对 bitsandbytes 的参考循环
    python bench.py --batches 1,64 --overlap off,streams --with-profile   # 比较 overlap 模式，并附每步 kernel 剖析
    python bench.py --preset tiny --device cpu        # CI 冒烟测试，几秒钟
    python bench.py --speculate 2,4,6 --batches 1      # 快速路径的投机解码：oracle 草稿接受率 0/0.5/0.7/0.9 时的速度
    python bench.py --speculate 3 --check             # 另核对快速路径的投机解码与慢速循环逐 token 相同（fp32）
    python bench.py --speculate 4 --paths eager       # 参考循环的投机解码：接受统计 + 与不投机逐 token 比较

最后一行是一个 JSON 对象，包含全部测量值。
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import weakref
from importlib import metadata
from typing import Any, Callable, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from config import INT4_GROUP_SIZE, INT4_GROUP_SIZES, MIN_ACCEPTANCE
from evaluator import BatchResult, generate_batch
import fast
from fast.attention import ATTENTION_MODES, head_dim_of
from fast.decoder import STACK_MODES, FastDecoder, compiles, length_bucket
from fast.nf4 import use_tuning_cache
from sampling import Sampling
from speculative import acceptance_summary, generate_speculative
from steering_utils import SteeringParams

STEER = SteeringParams()  # config.py 的缺省引导设置
MEDQA_QUESTIONS = 1273  # MedQA-USMLE 4 选项测试集题数（全量估算用）


def llama_config(kind: str, preset: str) -> LlamaConfig:
    """真实形状（8B：hidden 4096、32 层、32 头、8 个 KV 头、MLP 14336、词表 128256；
    1B：hidden 2048、16 层、head_dim 64、MLP 8192、共享嵌入）或 CI 用的 tiny 形状。"""
    if preset == "tiny":
        return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=(kind == "1b"),
                           max_position_embeddings=4096)
    if kind == "8b":
        return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                           max_position_embeddings=8192, tie_word_embeddings=False, rope_theta=500000.0)
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=500000.0)


def random_model(kind: str, preset: str, dtype: torch.dtype, device: str, seed: int,
                 head_scale: float = 1.0) -> PreTrainedModel:
    """随机权重模型，直接在目标设备上以目标精度构造（8B 不必先在 CPU 上占 32 GB）。

    head_scale > 1 放大 lm_head，让 argmax 远离近似平局（--check 逐 token 比较时用）。
    """
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(kind, preset))
    finally:
        torch.set_default_dtype(previous)
    if head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model.eval()


def nf4_in_place(model: PreTrainedModel, compute_dtype: torch.dtype) -> PreTrainedModel:
    """把解码层的 7 个投影换成 bitsandbytes 的 NF4 Linear4bit（块 64、absmax 双重量化、compute_dtype 计算），在模型所在
    设备上量化；与 BitsAndBytesConfig 加载出的模块相同（transformers 的那条路固定 bf16 计算、要 CUDA）。lm_head 与嵌入
    不动（bitsandbytes 默认也不量化它们）。--check --quant nf4 用它：float32 计算时快速路径与参考循环可以逐 token 比较，
    CPU 上（tiny，Triton 解释器）也能跑。"""
    import bitsandbytes as bnb

    from fast.stacked import PROJECTIONS

    device = model.device
    for layer in model.model.layers:
        for name in PROJECTIONS:
            parent, attr = name.split(".")
            old = getattr(getattr(layer, parent), attr)
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=compute_dtype,
                                    quant_type="nf4", compress_statistics=True, device="meta")
            new.weight = bnb.nn.Params4bit(old.weight.data.to("cpu" if device.type == "cpu" else device),
                                           requires_grad=False, quant_type="nf4", compress_statistics=True,
                                           blocksize=64)
            new.support_avx512bf16_for_cpu = False  # CPU 上不让 bitsandbytes 在前向时改排字节（叠加要标准布局）
            setattr(getattr(layer, parent), attr, new.to(device))  # 搬到设备时量化
            del old
    return model


def quantized_models(quant: str, preset: str, device: str, int4_group_size: int) -> list[PreTrainedModel]:
    """4-bit（nf4 / int4）：随机 bf16 模型先存盘，再经 model_loader.load_model（与 main.py 相同的 4-bit 加载路径、
    同一个 quantization_config）读回。"""
    from config import Config
    from model_loader import load_model, resolve_device

    cfg = Config(load_in_4bit=True, quant=quant, int4_group_size=int4_group_size, device="cuda")
    resolve_device(cfg)  # 与 main.py 相同的前置检查：CUDA、所选格式的库、int4 的计算能力
    models = []
    for kind, seed in (("8b", 0), ("1b", 1), ("1b", 2)):
        # 同一台机器上的几次 bench 共用存好的随机模型（不放在 $OUT 下：8B 有 16 GB）：存盘一次约 20 s
        folder = os.path.join(tempfile.gettempdir(), "steer-bench-models", f"{kind}-{preset}-{seed}")
        if not os.path.isdir(folder):
            m = random_model(kind, preset, torch.bfloat16, device, seed)
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            partial = tempfile.mkdtemp(prefix=f"{kind}-", dir=os.path.dirname(folder))
            m.save_pretrained(partial)
            os.replace(partial, folder)  # 整个文件夹一次换上：被中断的存盘不会留下半份模型
            del m
            gc.collect()
            torch.cuda.empty_cache()
        models.append(load_model(folder, cfg, torch.device(device), role=kind))
    return models


def _quant_state_bytes(state: Any, seen: set[int]) -> int:
    """bitsandbytes 4-bit 权重的量化状态（QuantState）里的张量字节：absmax、码表、offset，双重量化时递归进 state2。

    Params4bit 本身只是打包的 uint8（每个权重半字节）；反量化每步还要读这些。state 为 None（非量化参数）时为 0。
    seen 按 data_ptr 去重：各层可能共用同一张码表，只读一次。
    """
    if state is None:
        return 0
    total = 0
    for key, value in vars(state).items():
        if key == "state2":
            total += _quant_state_bytes(value, seen)
        elif torch.is_tensor(value) and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            total += value.numel() * value.element_size()
    return total


def weight_bytes(model: PreTrainedModel) -> int:
    """一步解码至少要读的权重字节：所有参数（含 4-bit 的量化状态）各读一次，但不含独立的输入嵌入表。

    为什么去掉输入嵌入：一步只按 B 个 token id 取 B 行（8B 的 1.05 GB 表里每步只读 B × 8 KiB）。共享嵌入
    （1B：tie_word_embeddings，嵌入与 lm_head 是同一个参数对象）时这张表又是 lm_head，每步整张都要读，所以保留。
    parameters() 本身按对象去重，共享的参数只算一次。只是字节的计数，与权重取值无关（meta 设备上也能算）：
    真实形状的 8B 约 15.01 GB、每个 1B 约 2.47 GB（bf16）。
    """
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    seen: set[int] = set()
    return sum(_param_bytes(p) + _quant_state_bytes(getattr(p, "quant_state", None), seen)
               for p in model.parameters() if p is not embed or embed is head)


def _param_bytes(p: torch.Tensor) -> int:
    """一个参数的存储字节。torchao 的量化张量（tensor_data_names，例如 int4 的 qdata 与 scale_and_zero）是张量子类：
    numel × element_size 是逻辑形状 × bf16，不是存储，所以按它的内部张量数。"""
    names = getattr(p, "tensor_data_names", None)
    if names is None:
        return p.numel() * p.element_size()
    names = [*names, *getattr(p, "optional_tensor_data_names", [])]
    return sum(t.numel() * t.element_size() for t in (getattr(p, n, None) for n in names) if t is not None)


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """每个 token 每步要读的 K/V 缓存字节：层数 × KV 头数 × head_dim × 2（K 与 V）× 缓存精度的字节数。

    缓存精度 = 嵌入表的精度（4-bit 模型的计算精度 bf16；权重量化不影响缓存）。真实 8B：128 KiB；1B：32 KiB。
    """
    c = model.config
    itemsize = model.get_input_embeddings().weight.element_size()
    return c.num_hidden_layers * c.num_key_value_heads * head_dim_of(c) * 2 * itemsize


def mean_context(prompt: int, new: int) -> float:
    """计时窗口里每个解码步平均要注意的 token 数（含本步的 token）。

    每步毫秒数 = (T(new) − T(1)) / (new − 1)：差出来的是第 k = 1 … new−1 个解码步，第 k 步把第 k 个新 token
    写进槽位 prompt + k − 1、注意 prompt + k 个 token，平均 prompt + new / 2（提示 256、新 256 时为 384）。
    """
    return prompt + new / 2


# 每个模型加载时（快速路径改动它之前）的 weight_bytes：floor 按格式数字节。为什么要记下来：NF4 叠加时
# （fast/stacked.py 的 _share_scales）bitsandbytes 的双重量化状态换成 float32 absmax 的视图，之后再数 quant_state
# 得到的是每块 4 字节而不是格式的约 1 字节，floor 会随实现变大、各提交的“share of floor time”就不能比了。
_LOADED_BYTES: "weakref.WeakKeyDictionary[PreTrainedModel, int]" = weakref.WeakKeyDictionary()


def remember_weight_bytes(models: Sequence[PreTrainedModel]) -> None:
    """加载之后、第一次解码之前调用：记下每个模型按格式的权重字节（floor_bytes 之后用它）。"""
    for m in models:
        _LOADED_BYTES[m] = weight_bytes(m)


def floor_bytes(models: Sequence[PreTrainedModel], batch: int, context: float) -> float:
    """一步解码的最少读取字节（带宽下限的分子）：每个模型的权重各读一次 + 每行 context 个 token 的 K/V。

    不计 logits 的写回与融合的读取（批 64 时三路 bf16 logits 约 50 MB，< 总量的 0.3%：融合进 lm_head 的实现可以不读写它），
    也不计激活（每层 B × hidden，可以忽略）。所以它是下限：任何实现都至少要读这么多。
    """
    weights = [_LOADED_BYTES[m] if m in _LOADED_BYTES else weight_bytes(m) for m in models]
    return float(sum(w + batch * context * kv_bytes_per_token(m) for w, m in zip(weights, models)))


def read_bandwidth(device: str, nbytes: int, repeats: int = 10) -> dict[str, Any]:
    """实测这块设备“只读”的带宽：对 nbytes 的 bf16 张量求和（读一遍、几乎不写），取最好与中位数。

    为什么要测而不是抄规格：带宽下限 = 最少字节 / 可达带宽，H100 的标称 3.35 TB/s 实际读不到；
    同一次调用里测出的数才能和同一次的每步时间相比。张量远大于 L2（H100 为 50 MB），所以读的是显存。
    """
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    x.sum(dtype=torch.float32)  # 预热：kernel 选择与分配
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            # CUDA 事件量设备上的时间：一次求和很短，主机侧的启动与同步开销会占到几个百分点
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            x.sum(dtype=torch.float32)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1000)
        else:
            start = time.perf_counter()
            x.sum(dtype=torch.float32)
            times.append(time.perf_counter() - start)
    del x
    return bandwidth_summary(nbytes, times)


def bandwidth_summary(nbytes: int, seconds: Sequence[float]) -> dict[str, Any]:
    """read_bandwidth 的算术：每次读 nbytes、各用 seconds[i] 秒 → 最好与中位数的 TB/s（保留 4 位有效数字，
    慢设备上的小速率不会被舍入成 0）。"""
    times = sorted(seconds)
    return {"op": "sum of a bf16 tensor (float32 accumulate)", "gib": round(nbytes / 2**30, 3),
            "tbps_best": float(f"{nbytes / times[0] / 1e12:.4g}"),
            "tbps_median": float(f"{nbytes / times[len(times) // 2] / 1e12:.4g}"), "repeats": len(times)}


def sync(device: str) -> None:
    """CUDA 上等设备做完已排队的工作：计时必须在同步之后读主机时钟，否则只量到了 kernel 的提交。"""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prompts_for(batch: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    """固定长度的随机提示 (batch 行 × length 个 id)；三个角色用同一份。"""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (batch, length), generator=g).tolist()


def timed(fn: Callable[[], BatchResult], device: str) -> float:
    """设备同步后的墙钟秒数。"""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def stack_for(stack: str, steered: bool) -> str:
    """--stack 的一项 → 这一行 FastDecoder 的 stack 参数。只有目标模型时只看目标走哪条前向：
    "pair" → "off"（基线的目标走 transformers），"all" → "target"（目标走叠加前向）。"""
    return stack if steered else {"pair": "off", "all": "target"}.get(stack, stack)


def attention_for(attention: str, stack: str) -> str:
    """--attention 的一项 → 这一行 FastDecoder 的 attention 参数。没有叠加前向（stack 为 off）的行只能用 SDPA：
    给 "auto"（FastDecoder 解析成 sdpa），而不是让 "triton" 报错。其余原样交给 FastDecoder 解析——stack="auto"
    在 4-bit 模型或 CPU 上会解析成 off，这里不能预先把 auto 定成 triton。"""
    return "auto" if stack == "off" else attention


def bench_decoder(models: list[PreTrainedModel], steered: bool, batch: int, compile_step: bool, overlap: str,
                  stack: str, attention: str, cache_len: int | None, sampling: Sampling | None) -> FastDecoder:
    """计时（measure）、--check 与 --profile 共用的 FastDecoder：steered 时三个模型（STEER 融合），否则只有目标；
    --overlap / --stack / --attention 的一项经 stack_for / attention_for 映射（只有目标时 overlap 为 off）。

    编译时先 torch.compiler.reset()：每个解码器从干净的 dynamo 状态编译，否则同一进程里先建的解码器会让后面的
    被编成动态形状的图（automatic dynamic），各行的结果就取决于测量顺序。
    """
    use = models if steered else models[:1]
    if compile_step:
        torch.compiler.reset()
    stack = stack_for(stack, steered)
    return FastDecoder(use, vocab_size=use[0].config.vocab_size, end_ids=[], pad_id=0, batch_size=batch,
                       steering=STEER if steered else None, compile=compile_step, cache_len=cache_len,
                       overlap=overlap if steered else "off", sampling=sampling, stack=stack,
                       attention=attention_for(attention, stack))


def measure(path: str, models: list[PreTrainedModel], steered: bool, batch: int, args: argparse.Namespace,
            compile_step: bool, overlap: str = "off", stack: str = "off", attention: str = "auto") -> dict[str, Any]:
    """测一个 (路径, 模式, 批大小, overlap, stack, attention)：预热后测 T(new) 与 T(1)，返回每步毫秒、tokens/s、峰值显存。

    overlap 只对引导模式的快速路径有意义（fast/decoder.py 的 _GraphedStep）；stack 见 fast/decoder.py 的 resolve_stack；
    attention 见 fast/decoder.py 的 resolve_attention（只作用于叠加前向：这一行没有叠加单元时按 auto 解析成 sdpa）；
    --with-profile 时再附上同一解码器的剖析。
    """
    use = models if steered else models[:1]
    vocab = use[0].config.vocab_size
    prompts = prompts_for(batch, args.prompt, vocab)
    steering = STEER if steered else None
    new = args.new if path == "fast" else args.eager_new
    decoder: FastDecoder | None = None
    if path == "fast":
        # 固定缓存长度：预热、T(1)、T(new) 用同一形状，计时区间里不会有重新编译（H100 上踩过：
        # 预热用了另一个长度桶，计时里混进了 40 秒编译）。
        decoder = bench_decoder(models, steered, batch, compile_step, overlap, stack, attention,
                                cache_len=length_bucket(args.prompt + new), sampling=sampling_of(args))
        gen = lambda n: decoder.generate([prompts] * len(use), n, question_ids=list(range(batch)))  # noqa: E731
    else:
        gen = lambda n: generate_batch(use, [prompts] * len(use), vocab_size=vocab, max_new_tokens=n,  # noqa: E731
                                       end_ids=[], pad_id=0, steering=steering, sampling=sampling_of(args),
                                       question_ids=list(range(batch)))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    gen(min(new, 24))  # 预热：编译、CUDA graph 录制、cuBLAS 句柄
    gen(min(new, 24))
    warmup = time.perf_counter() - start
    cuda = args.device.startswith("cuda")
    if cuda:  # 峰值分两段：预热（调优、编译、录图）与计时段（只剩预填充与解码），看超出常驻部分的显存是谁用的
        warm_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t_one = min(timed(lambda: gen(1), args.device) for _ in range(2))
    t_full = timed(lambda: gen(new), args.device)
    ms = 1000 * (t_full - t_one) / (new - 1)
    row = {"path": path, "mode": "steered" if steered else "target", "batch": batch, "prompt": args.prompt,
           "new": new, "ms_per_step": round(ms, 3), "tok_per_s": round(batch * 1000 / ms, 1),
           "prefill_s": round(t_one, 4), "warmup_s": round(warmup, 1), "compiled": compile_step and path == "fast",
           "overlap": decoder.overlap if decoder is not None else "off",  # auto 解析后的实际模式
           "stack": decoder.stack if decoder is not None else "off",
           "attention": decoder.attention if decoder is not None else "sdpa",
           "temperature": args.temperature, "top_p": args.top_p}
    if cuda:
        timed_peak = torch.cuda.max_memory_allocated()
        row["peak_gib"] = round(max(warm_peak, timed_peak) / 2**30, 2)  # 整行的峰值（预热 + 计时）
        row["peak_timed_gib"] = round(timed_peak / 2**30, 2)  # 计时段的峰值：预填充 + 解码
        # 常驻：计时后解码器仍在时已分配的显存（权重、KV 缓存、CUDA graph 的静态缓冲）；峰值减它是临时的
        row["resident_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    # 带宽下限：这一行每步至少要读的字节（权重 + 计时窗口里平均上下文的 K/V），以及按它折算的实际读取速率
    row["mean_context"] = mean_context(args.prompt, new)
    row["floor_bytes"] = round(floor_bytes(use, batch, row["mean_context"]))
    row["floor_gb"] = round(row["floor_bytes"] / 1e9, 3)
    row["achieved_tbps"] = round(row["floor_bytes"] / 1e9 / ms, 4)  # GB / ms = TB/s
    tuned = {k: v for s in (decoder.stacked if decoder is not None else []) if s is not None for k, v in s.tuned.items()}
    if tuned:  # NF4 叠加前向：tune_nf4 为每种权重形状选出的 kernel 配置（方式, BLOCK_M, BLOCK_N, NB, warps, stages）、split-K、µs
        row["nf4_kernels"] = tuned
    if decoder is not None and any(s is not None and s.nf4 for s in decoder.stacked):
        # 预热里调优占的秒数（其余是编译与录图）：NF4 解码器的启动比 bf16 多 1–2 分钟，先分清是哪一段
        row["tune_s"] = round(sum(s.tune_s for s in decoder.stacked if s is not None), 1)
    if args.with_profile and decoder is not None:
        row["profile"] = profile_decoder(decoder, prompts, len(use), args.profile_steps, args.device)
    return row


def sampling_of(args: argparse.Namespace) -> Sampling | None:
    """--temperature > 0 时按温度 / top-p 采样（随机数由行号充当的题目 index 决定，与 main.py 相同的选词路径），否则贪心。"""
    return Sampling(args.temperature, args.top_p, seed=0, chain=0) if args.temperature > 0 else None


def first_choices(args: argparse.Namespace) -> tuple[str, str, str]:
    """--check 与 --profile 只建一个解码器：--overlap / --stack / --attention 各取逗号列表的第一项。"""
    return args.overlap.split(",")[0], args.stack.split(",")[0], args.attention.split(",")[0]


def check(args: argparse.Namespace, compile_step: bool) -> dict[str, Any]:
    """正确性：真实形状上 fp32 快速路径（可编译）== 慢速循环逐 token；bf16 报告一致率。

    左填充的变长批（长度 [P, P−37, P−5, P−101]），引导与基线两种模式；--check-dtypes 选精度
    （两种都做在 H100 上超过单次命令的 10 分钟，可以分开跑），--overlap 选引导时的快速路径。返回每种精度的统计。
    """
    results: dict[str, Any] = {}
    overlap, stack, attention = first_choices(args)
    lengths = [args.prompt, args.prompt - 37, args.prompt - 5, max(4, args.prompt - 101)]
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    for dtype_name in args.check_dtypes.split(","):
        dtype = dtypes[dtype_name]
        if args.quant == "int4":
            # 同一份 int4 权重（model_loader 的加载路径，与测速行相同）：快速路径（stack auto 或 all 时是叠加前向里逐模型的
            # torchao F.linear）对 transformers 前向的参考循环；只有 bf16，报告一致率。lm_head 放大 8 倍同 head_scale
            models = quantized_models("int4", args.preset, args.device, args.int4_group_size)
            for m in models:
                m.lm_head.weight.mul_(8.0)
        else:
            models = [random_model(k, args.preset, dtype, args.device, s, head_scale=8.0)
                      for k, s in (("8b", 0), ("1b", 1), ("1b", 2))]
        if args.quant == "nf4":  # 同一份 NF4 权重：快速路径（fast.nf4 kernel）对 bitsandbytes 前向的参考循环
            models = [nf4_in_place(m, dtype) for m in models]
        vocab = models[0].config.vocab_size
        prompts = [p[:n] for p, n in zip(prompts_for(len(lengths), args.prompt, vocab, seed=3), lengths)]
        for steered in [m == "steered" for m in args.check_modes.split(",")]:
            use, steering = (models, STEER) if steered else (models[:1], None)
            qids = list(range(len(prompts)))
            slow = generate_batch(use, [prompts] * len(use), vocab_size=vocab, max_new_tokens=args.check_new,
                                  end_ids=[], pad_id=0, steering=steering, sampling=sampling_of(args),
                                  question_ids=qids).tokens
            decoder = bench_decoder(models, steered, len(prompts), compile_step, overlap, stack, attention,
                                    cache_len=None, sampling=sampling_of(args))
            quick = decoder.generate([prompts] * len(use), args.check_new, question_ids=qids).tokens
            same_rows = sum(a == b for a, b in zip(slow, quick))
            prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(slow, quick))
            total = sum(len(a) for a in slow)
            key = f"{dtype_name}:{'steered' if steered else 'target'}"
            results[key] = {"identical_rows": f"{same_rows}/{len(slow)}", "tokens_before_first_divergence":
                            f"{prefix}/{total}", "agreement": round(prefix / total, 4), "compiled": compile_step,
                            "overlap": decoder.overlap, "stack": decoder.stack, "attention": decoder.attention,
                            "temperature": args.temperature,
                            "top_p": args.top_p, "quant": args.quant,
                            # 是否真的走了 fast.nf4 的 kernel（叠加的 NF4 单元），而不是 bitsandbytes 的前向
                            "nf4_kernels": any(s is not None and s.nf4 for s in decoder.stacked)}
            emit({"check": key, **results[key]}, args.out)
            if args.speculate and args.temperature == 0:
                results[key + ":speculative"] = check_speculative(models, prompts, slow, steered, args, compile_step)
                emit({"check": key + ":speculative", **results[key + ":speculative"]}, args.out)
        del models
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


# 剖析结果里不是 GPU kernel 的条目：主机侧的算子/运行时调用，以及 torch.compile 区域与 CUPTI 自身的记录
# （cudagraph trees 路径下 "Torch-Compiled Region" 等条目带着子 kernel 的累计时间，会把分类撑大上百倍）。
NOT_KERNELS: tuple[str, ...] = ("cudaGraph", "ProfilerStep", "aten::", "cuda", "Torch-Compiled Region",
                                "## Call CompiledFxGraph", "Command Buffer Full", "Buffer Flush",
                                "Activity Buffer Request")


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """区间 [start, end) 并集的总长度（微秒）：设备上至少有一个 kernel 在跑的时间。

    kernel 时长之和减去它就是多条流真正重叠掉的时间；墙钟减去它就是设备空闲（kernel 之间的间隙）。
    """
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _kernel_times(decoder: FastDecoder, prompts: list[list[int]], n_models: int, new: int,
                  device: str) -> tuple[dict[str, tuple[float, int]], float]:
    """在 torch.profiler 下跑一次 generate(new)，返回 ({kernel 名: (设备上的总微秒, 调用次数)}, 忙碌微秒)。

    只统计 GPU kernel（去掉 aten:: / cuda* 运行时等主机侧事件）。CUDA graph 重放里的 kernel 也逐个出现。
    忙碌微秒 = 这些 kernel 时间区间的并集（busy_us）；CPU 上没有设备事件，为 0。
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        decoder.generate([prompts] * n_models, new)
        sync(device)
    times: dict[str, tuple[float, int]] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", 0.0) or getattr(evt, "cuda_time_total", 0.0)
        if us <= 0 or evt.key.startswith(NOT_KERNELS):
            continue
        times[evt.key] = (us, evt.count)
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == DeviceType.CUDA and e.name in times]
    return times, busy_us(spans)


def kernel_kind(name: str) -> str:
    """按 kernel 名归类：matmul（cuBLAS/cutlass/nvjet/gemv，以及 fast/nf4.py 的 NF4 kernel 与它的 split-K 求和）、attention（SDPA 的 flash/efficient 等）、
    triton（inductor 生成的融合 kernel：RMSNorm、RoPE、SiLU·乘、softmax/JS 等）、other（index_copy、拷贝等）。"""
    low = name.lower()
    # "attention" 也匹配 fast/attention.py 的 Triton kernel（decode_attention_split / _combine）
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa", "efficient")):
        return "attention"
    # "nf4_"：NF4 的 Triton kernel（nf4_gemv / nf4_gemv_w / nf4_dot_t / nf4_split_sum）。d48920c 之前 nf4_dot_t 与
    # nf4_split_sum 落进了 other，批 16 的剖析因此把矩阵乘记成 0.5 ms、other 记成 8.7 ms
    if any(k in low for k in ("gemm", "nvjet", "sm90_", "cutlass", "matmul", "gemv", "splitk", "nf4_")):
        return "matmul"
    if low.startswith("triton"):
        return "triton"
    return "other"


def profile_decoder(decoder: FastDecoder, prompts: list[list[int]], n_models: int, steps: int,
                    device: str) -> dict[str, Any]:
    """一个已预热的 FastDecoder 每个解码步的 kernel 时间分布（去掉 prefill）。

    与计时相同的差分：剖析 generate(steps + 1) 与 generate(1)，逐个 kernel 名相减，再除以 steps，
    得到纯解码步的每步设备时间（prefill 的大矩阵乘不混进来）。kernel_ms_per_step 是各 kernel 时长之和：
    多条流并行时它会大于墙钟的每步时间。busy_ms_per_step 是 kernel 时间区间的并集（设备忙碌的时间），
    overlap_ms_per_step = 时长之和 − 并集，是真正并行掉的时间；墙钟 − 并集是 kernel 之间的空闲。
    """
    full, busy_full = _kernel_times(decoder, prompts, n_models, steps + 1, device)
    one, busy_one = _kernel_times(decoder, prompts, n_models, 1, device)
    buckets = {"matmul": 0.0, "attention": 0.0, "triton": 0.0, "other": 0.0}
    counts = dict.fromkeys(buckets, 0.0)
    kernels = []
    for name, (us, calls) in full.items():
        base_us, base_calls = one.get(name, (0.0, 0))
        d_us, d_calls = us - base_us, calls - base_calls
        if d_calls <= 0 or d_us <= 0:
            continue
        kind = kernel_kind(name)
        buckets[kind] += d_us
        counts[kind] += d_calls
        kernels.append((d_us, name, d_calls, kind))
    total = sum(buckets.values())
    kernels.sort(reverse=True)
    busy = (busy_full - busy_one) / 1000 / steps
    return {"steps_profiled": steps, "kernel_ms_per_step": round(total / 1000 / steps, 3),
            # 并集：设备上至少一个 kernel 在跑的每步毫秒；kernel_ms_per_step − busy = 流之间重叠掉的部分
            "busy_ms_per_step": round(busy, 3), "overlap_ms_per_step": round(total / 1000 / steps - busy, 3),
            "kernels_per_step": round(sum(counts.values()) / steps, 1),
            "ms_per_step": {k: round(v / 1000 / steps, 3) for k, v in buckets.items()},
            "kernels_per_step_by_kind": {k: round(v / steps, 1) for k, v in counts.items()},
            "top_kernels": [{"kernel": n[:140], "kind": kind, "ms_per_step": round(us / 1000 / steps, 4),
                             "calls_per_step": round(c / steps, 2)} for us, n, c, kind in kernels[:30]]}


def profile(models: list[PreTrainedModel], batch: int, args: argparse.Namespace,
            compile_step: bool) -> dict[str, Any]:
    """--profile BATCH：只剖析引导解码（与 measure() 相同的 FastDecoder：预热后、固定缓存长度），见 profile_decoder。"""
    vocab = models[0].config.vocab_size
    prompts = prompts_for(batch, args.prompt, vocab)
    overlap, stack, attention = first_choices(args)
    # 剖析一直是贪心解码（不随 --temperature），保持原样
    if args.speculate:  # 投机解码的一轮：第一个 K、第一个 --agreement、第一个 --draft-cost 的 oracle 草稿
        k = int(args.speculate.split(",")[0])
        decoder = spec_decoder(models, True, batch, k, args, compile_step,
                               cache_len=length_bucket(args.prompt + (k + 1) * args.new))
        decoder.set_oracle([[0] * args.new] * batch, float(args.agreement.split(",")[0]),
                           free=args.draft_cost.split(",")[0] == "free")
    else:
        decoder = bench_decoder(models, True, batch, compile_step, overlap, stack, attention,
                                cache_len=length_bucket(args.prompt + args.new), sampling=None)
    decoder.generate([prompts] * 3, 24)
    decoder.generate([prompts] * 3, 24)
    result = {"batch": batch, "overlap": decoder.overlap, "stack": decoder.stack, "attention": decoder.attention,
              "speculate": args.speculate or None,
              **profile_decoder(decoder, prompts, 3, args.profile_steps, args.device)}
    print(json.dumps({"profile": result}), flush=True)
    return result


def speculate_rows(args: argparse.Namespace, sizes: list[int]) -> list[dict[str, Any]]:
    """--speculate K --paths eager：在随机权重模型上跑 speculative.generate_speculative（参考循环），
    与同一批的 generate_batch 比较，报告 drafted / accepted / acceptance / tokens_per_verify 与两者的墙钟秒数。

    模型与 --check 相同（lm_head ×8，argmax 远离近似平局）；目标行的草稿是专家（独立草稿模型），引导行按 --draft。
    随机权重的专家与目标几乎从不一致，所以这里的接受率接近 0：它检查的是无损与记账，不是草稿的好坏
    （真实模型的接受率见 benchmarks/spec_cpu.py）。identical 只在贪心时有意义（采样用 residual 规则：同分布、不同样本）。
    """
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    models = [random_model(k, args.preset, dtype, args.device, s, head_scale=8.0)
              for k, s in (("8b", 0), ("1b", 1), ("1b", 2))]
    vocab = models[0].config.vocab_size
    rows = []
    for batch in sizes:
        for mode in args.modes.split(","):
            steered = mode == "steered"
            use = models if steered else models[:1]
            if args.draft == "fusion" and not steered:
                rows.append({"mode": mode, "batch": batch, "error": "--draft fusion needs the steered mode"})
                continue
            prompts = prompts_for(batch, args.prompt, vocab)
            common = dict(vocab_size=vocab, max_new_tokens=args.eager_new, end_ids=[], pad_id=0,
                          steering=STEER if steered else None, sampling=sampling_of(args),
                          question_ids=list(range(batch)))
            plain: list[BatchResult] = []
            spec: list[Any] = []
            t_plain = timed(lambda: plain.append(generate_batch(use, [prompts] * len(use), **common)), args.device)
            t_spec = timed(lambda: spec.append(generate_speculative(
                use, [prompts] * len(use), k=int(args.speculate), draft=args.draft, min_acceptance=args.min_acceptance,
                draft_model=None if steered else models[1], draft_prompts=None if steered else prompts, **common)),
                args.device)
            summary = acceptance_summary(spec)
            rows.append({"path": "eager", "mode": mode, "batch": batch, "prompt": args.prompt, "new": args.eager_new,
                         "speculate": int(args.speculate), "draft": args.draft,
                         "identical": spec[0].tokens == plain[0].tokens if args.temperature == 0 else None,
                         **{k: summary[k] for k in ("drafted", "accepted", "verify_steps", "tokens", "rounds")},
                         "acceptance": summary["acceptance"], "tokens_per_verify": summary["tokens_per_verify"],
                         "plain_s": round(t_plain, 4), "speculative_s": round(t_spec, 4)})
            emit(rows[-1], args.out)
    return rows


def spec_decoder(models: list[PreTrainedModel], steered: bool, batch: int, k: int, args: argparse.Namespace,
                 compile_step: bool, cache_len: int | None) -> Any:
    """快速路径的投机解码器（fast.speculative.SpeculativeDecoder）：引导 [目标, 专家, 基座]，目标行 [目标, 专家（只作草稿）]。
    stack / attention 取 --stack / --attention 的第一项（与 --check 相同）；编译前 torch.compiler.reset()（同 bench_decoder）。"""
    from fast.speculative import SpeculativeDecoder

    _, stack, attention = first_choices(args)
    if compile_step:
        torch.compiler.reset()
    stack = stack_for(stack, True)
    return SpeculativeDecoder(models if steered else models[:2], k=k, draft=args.draft,
                              min_acceptance=args.min_acceptance, steering=STEER if steered else None,
                              vocab_size=models[0].config.vocab_size, end_ids=[], pad_id=0, batch_size=batch,
                              compile=compile_step, cache_len=cache_len, stack=stack,
                              attention=attention_for(attention, stack))


def speculate_fast_rows(args: argparse.Namespace, sizes: list[int], compile_step: bool) -> list[dict[str, Any]]:
    """--speculate K[,K...]（快速路径）：接受率为 a 时投机解码的端到端速度，与同一次调用里不投机的快速路径比较。

    草稿是 oracle（fast.speculative 的 set_oracle）：第 j 个输出位置以预先抽定的概率 a 与验证者的输出相同——
    这是对接受率的*模拟*（随机权重的专家与目标从不一致），速度却是真实的：验证前向、接受、缓存掩列都照常执行。
    --draft-cost：free = 不跑任何草稿前向（草稿免费，所有模型都验证 K+1 个位置）；expert = 草稿单元照常逐个位置前向
    K 次（专家起草的真实代价；叠加时专家与基座一起，它们起草时的 logits 就是验证 logits）。
    参考输出先由 a = 0 的一次运行给出（投机路径自己的贪心输出），之后各 a 的 oracle 都以它为准。
    每行：ms_per_token = (T(new) − T(1)) / (new − 1)（与 measure 相同的差分），speedup = 不投机的 ms_per_step / 它。
    """
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    models = [random_model(k, args.preset, dtype, args.device, s, head_scale=8.0)
              for k, s in (("8b", 0), ("1b", 1), ("1b", 2))]
    vocab = models[0].config.vocab_size
    ks = [int(k) for k in args.speculate.split(",")]
    agreements = [float(a) for a in args.agreement.split(",")]
    overlap, stack, attention = first_choices(args)
    rows: list[dict[str, Any]] = []
    for batch in sizes:
        for mode in args.modes.split(","):
            steered = mode == "steered"
            prompts = prompts_for(batch, args.prompt, vocab)
            plain = measure("fast", models, steered, batch, args, compile_step, overlap, stack, attention)
            plain["path"] = "fast"
            rows.append(plain)
            emit(plain, args.out)
            n_models = 3 if steered else 2
            gen_prompts = [prompts] * n_models
            # 一个解码器给所有草稿代价与 K：编译的是每个单元的前向 / 验证（按 K 各一份），免费与付费草稿共用它们；
            # 每种代价重建解码器（torch.compiler.reset）会把目标与基座的验证图再编译一遍（冷缓存时每个要几十秒）
            dec = spec_decoder(models, steered, batch, max(ks), args, compile_step,
                               cache_len=length_bucket(args.prompt + (max(ks) + 1) * args.new))
            for cost in args.draft_cost.split(","):
                dec.k = max(ks)
                dec.set_oracle([[0] * args.new] * batch, 0.0, free=cost == "free")
                own = dec.generate(gen_prompts, args.new).tokens  # 投机路径自己的贪心输出（a = 0：每轮只取验证者的第一个）
                for k in ks:
                    dec.k = k
                    for a in agreements:
                        dec.set_oracle(own, a, free=cost == "free", seed=1)
                        gen = functools.partial(dec.generate, gen_prompts)
                        if args.device.startswith("cuda"):
                            torch.cuda.reset_peak_memory_stats()
                        gen(min(args.new, 24))  # 预热：编译、录图
                        gen(min(args.new, 24))
                        t_one = min(timed(lambda: gen(1), args.device) for _ in range(2))
                        result: list[Any] = []
                        t_full = timed(lambda: result.append(gen(args.new)), args.device)
                        ms = 1000 * (t_full - t_one) / (args.new - 1)
                        summary = acceptance_summary(result)
                        row = {"path": "fast-speculative", "mode": mode, "batch": batch, "prompt": args.prompt,
                               "new": args.new, "k": k, "draft": args.draft, "draft_cost": cost, "agreement": a,
                               "min_acceptance": args.min_acceptance, "compiled": compile_step, "stack": dec.stack,
                               "attention": dec.attention,
                               "ms_per_token": round(ms, 3), "tok_per_s": round(batch * 1000 / ms, 1),
                               "plain_ms_per_step": plain["ms_per_step"],
                               "speedup": round(plain["ms_per_step"] / ms, 3),
                               "identical_rows": sum(x == y for x, y in zip(result[0].tokens, own)),
                               **{key: summary[key] for key in ("drafted", "accepted", "verify_steps", "tokens",
                                                                "rounds", "switched_off")},
                               "acceptance": summary["acceptance"], "tokens_per_verify": summary["tokens_per_verify"]}
                        if args.device.startswith("cuda"):
                            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                        rows.append(row)
                        emit(row, args.out)
            del dec
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def check_speculative(models: list[PreTrainedModel], prompts: list[list[int]], slow: list[list[int]], steered: bool,
                      args: argparse.Namespace, compile_step: bool) -> dict[str, Any]:
    """--check 加 --speculate K：快速路径的投机解码（oracle 草稿，接受率 0.7，付费的专家起草）与慢速循环逐 token 比较。"""
    k = int(args.speculate.split(",")[0])
    dec = spec_decoder(models, steered, len(prompts), k, args, compile_step, cache_len=None)
    dec.set_oracle(slow, 0.7, free=False, seed=1)
    got = dec.generate([prompts] * (3 if steered else 2), args.check_new)
    same = sum(a == b for a, b in zip(slow, got.tokens))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(slow, got.tokens))
    summary = acceptance_summary([got])
    return {"identical_rows": f"{same}/{len(slow)}", "tokens_before_first_divergence":
            f"{prefix}/{sum(len(a) for a in slow)}", "k": k, "agreement": 0.7, "acceptance": summary["acceptance"],
            "tokens_per_verify": summary["tokens_per_verify"], "stack": dec.stack, "attention": dec.attention,
            "compiled": compile_step}


def environment() -> dict[str, Any]:
    """记录设备、版本与提交：BENCHMARKS.md 里的每个数字都要能追溯到这里。"""
    versions = {}
    for name in ("torch", "transformers", "accelerate", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    # BENCH_COMMIT 优先：设备机上的副本带着一个 .git，但它的 HEAD 不是被复制的工作树的提交
    # （设备上的 .git 可能不是所复制工作树的提交），所以由环境变量 BENCH_COMMIT 传入真实的提交号。
    commit = os.environ.get("BENCH_COMMIT") or None
    tree = "given by BENCH_COMMIT" if commit else None
    if commit is None:
        here = os.path.dirname(os.path.abspath(__file__))
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=here, timeout=5).stdout.strip() or None
            # 工作树与该提交不同（有改动或未跟踪的文件）时如实记下：那时 commit 不是跑的那份代码
            # （设备机上的副本就是这样：它的 .git 可能停在更早的提交上，见 BENCHMARKS.md 的 note）
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, cwd=here, timeout=10).stdout.strip()
            tree = "differs from the commit" if dirty else "clean"
        except (OSError, subprocess.SubprocessError):
            commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": gpu, "python": platform.python_version(), **versions, "commit": commit, "tree": tree}


def target_row(rows: list[dict[str, Any]], r: dict[str, Any]) -> dict[str, Any] | None:
    """引导行 r 的比较对象：同一路径、同一批大小、目标走同一条前向（stack 为 target/all 时是叠加前向，且注意力实现相同；
    否则是 transformers 前向）。"""
    stacked = ("target", "all")
    want = r.get("stack") in stacked
    return next((x for x in rows if x["path"] == r["path"] and x["batch"] == r["batch"] and x["mode"] == "target"
                 and (x.get("stack") in stacked) == want and (not want or x.get("attention") == r.get("attention"))
                 and "ms_per_step" in x), None)


def ratio_summary(rows: list[dict[str, Any]], read_tbps: float) -> list[dict[str, Any]]:
    """每个引导行对它的目标行（target_row）：实测的 steered / target，以及同样字节计数下的下限比值。

    floor_ratio = 引导行的最少字节 / 目标行的最少字节：两行读字节的效率（占下限时间的比例）相同时的比值。
    实测比值低于它，说明引导步读字节比目标单独时更有效率——专家+基座的支路与 8B 并行，用的是 8B 没用满
    显存带宽的时间（见 BENCHMARKS.md）。
    of_floor = 下限毫秒（最少字节 / 本次实测的只读带宽）/ 实测毫秒。
    """
    out = []
    for r in rows:
        base = target_row(rows, r) if r["mode"] == "steered" and "ms_per_step" in r else None
        if base is None:
            continue
        out.append({k: r[k] for k in ("path", "batch", "overlap", "stack", "attention")}
                   | {"target_ms": base["ms_per_step"], "steered_ms": r["ms_per_step"],
                      "ratio": round(r["ms_per_step"] / base["ms_per_step"], 3),
                      "floor_ratio": round(r["floor_bytes"] / base["floor_bytes"], 4),
                      "target_of_floor": round(base["floor_bytes"] / 1e9 / read_tbps / base["ms_per_step"], 3),
                      "steered_of_floor": round(r["floor_bytes"] / 1e9 / read_tbps / r["ms_per_step"], 3)})
    return out


def estimate_full_run(rows: list[dict[str, Any]], max_new: int = 512) -> list[str]:
    """按测得的每步时间估算“两个模式 × 1,273 题 × 512 个新 token（最坏情况）”的解码时间，并写出算式。"""
    lines = []
    for batch in sorted({r["batch"] for r in rows if r["path"] == "fast"}):
        fast = [r for r in rows if r["path"] == "fast" and r["batch"] == batch and "ms_per_step" in r]
        steered = [r for r in fast if r["mode"] == "steered"]
        if not steered:
            continue
        # 多个 overlap / stack 模式时取最快的引导行，配上它的目标行（目标走同一条前向）
        got = {"steered": min(steered, key=lambda r: r["ms_per_step"])}
        target = target_row(fast, got["steered"])
        if target is not None:
            got["target"] = target
            batches = -(-MEDQA_QUESTIONS // batch)
            secs = {m: batches * (max_new * got[m]["ms_per_step"] / 1000 + got[m]["prefill_s"]) for m in got}
            lines.append(f"batch {batch}: {batches} batches × (512 × ({got['target']['ms_per_step']:.2f} + "
                         f"{got['steered']['ms_per_step']:.2f}) ms + prefill {got['target']['prefill_s']:.2f} + "
                         f"{got['steered']['prefill_s']:.2f} s) = {(secs['target'] + secs['steered']) / 60:.1f} min")
    return lines


def main(argv: list[str] | None = None) -> int:
    """命令行入口：--check 只做正确性检查，--profile 只做剖析，否则按批大小 × 路径 × 模式计时并打印表格与 JSON。"""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--preset", choices=("real", "tiny"), default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quant", choices=("bf16", "nf4", "int4"), default="bf16",
                        help="weights: bf16, or 4-bit through model_loader (nf4: bitsandbytes; int4: torchao tile-packed)")
    parser.add_argument("--int4-group-size", type=int, default=INT4_GROUP_SIZE, choices=INT4_GROUP_SIZES,
                        help="group size of --quant int4")
    parser.add_argument("--batches", default="1,16,64,max", help="comma-separated; max = double from 128 until memory runs out")
    parser.add_argument("--modes", default="target,steered")
    parser.add_argument("--paths", default="fast", help="fast (FastDecoder) and/or eager (the slow reference loop)")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--eager-new", type=int, default=64, help="steps timed on the slow loop (it is slow, so fewer)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--triton-ops", choices=fast.TRITON_OPS_MODES, default=fast.TRITON_OPS,
                        help="how the Triton kernels enter torch.compile: opaque custom ops, or traced triton_op "
                             "(the registration used up to commit 4fb66e2; for comparing warm-up times)")
    parser.add_argument("--split-sum", choices=fast.SPLIT_SUM_MODES, default=fast.SPLIT_SUM,
                        help="who adds an NF4 matmul's split-K partial sums in a compiled step: a separate kernel "
                             "(default), or the graph, so that inductor can fuse the sum into the next kernel")
    parser.add_argument("--check", action="store_true", help="correctness check only (fp32 token for token, bf16 agreement rate)")
    parser.add_argument("--check-new", type=int, default=48)
    parser.add_argument("--check-dtypes", default="float32,bfloat16", help="dtypes that --check checks (comma-separated)")
    parser.add_argument("--check-modes", default="target,steered", help="modes that --check checks (comma-separated)")
    parser.add_argument("--profile", type=int, default=0, metavar="BATCH",
                        help="profile the kernel time of one steered decode step at this batch size only")
    parser.add_argument("--with-profile", action="store_true",
                        help="after timing, profile the same (compiled) decoder; the result is attached to every fast-path row")
    parser.add_argument("--profile-steps", type=int, default=64)
    parser.add_argument("--overlap", default="auto",
                        help="FastDecoder overlap mode when steering, auto/off/graph/streams (see _GraphedStep in fast/decoder.py); "
                             "timing takes several (comma-separated, each steered row timed once); --check/--profile use the first")
    parser.add_argument("--stack", default="auto",
                        help="FastDecoder stack mode auto/off/pair/target/all (see resolve_stack in fast/decoder.py); timing takes several"
                             " (comma-separated: steered rows are timed for each, target rows by the forward the target takes); --check/--profile use the first")
    parser.add_argument("--attention", default="auto",
                        help="decode attention of the stacked forward, auto/sdpa/triton (see resolve_attention in fast/decoder.py); timing takes several"
                             " (comma-separated); --check/--profile use the first")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: sample (includes the per-step top-p and Gumbel cost)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--out", default=None, help="also write the JSON results to this file")
    parser.add_argument("--nf4-tuning-cache", default="off", metavar="PATH",
                        help="NF4 kernel choices: reuse the timed choices stored in PATH and store new ones there, as "
                             "main.py does (default off: every process times its kernels afresh)")
    parser.add_argument("--speculate", default="", metavar="K[,K...]",
                        help="speculative decoding with K draft tokens per verify step. With --paths fast (default): "
                             "times the fast path's speculative decoder with a simulated (oracle) draft at each "
                             "--agreement, against the plain fast path in the same call; with --check: also checks it "
                             "token for token. With --paths eager: one K, runs the reference loop generate_speculative "
                             "and prints drafted / accepted / tokens per verify step. --batches must be numbers")
    parser.add_argument("--draft", choices=("expert", "fusion"), default="expert",
                        help="speculative draft: expert, or fusion (steered mode only)")
    parser.add_argument("--agreement", default="0,0.5,0.7,0.9",
                        help="fast-path --speculate: the oracle draft's probability of agreeing with each output token "
                             "(a simulation of acceptance; comma-separated)")
    parser.add_argument("--draft-cost", default="free,expert",
                        help="fast-path --speculate: free (no draft forwards) and/or expert (the draft unit runs its K "
                             "forwards, the real cost of drafting with the expert)")
    parser.add_argument("--min-acceptance", type=float, default=MIN_ACCEPTANCE,
                        help="--speculate: a row stops drafting once its acceptance is below this after 16 drafted "
                             "tokens (0 = never), as main.py's --min-acceptance")
    args = parser.parse_args(argv)
    fast.TRITON_OPS = args.triton_ops  # 在任何 kernel 加载之前（TRITON_OPS_NOTE）
    fast.SPLIT_SUM = args.split_sum  # 在第一次编译之前（SPLIT_SUM_NOTE）
    if args.preset == "tiny":
        args.prompt, args.new, args.eager_new, args.check_new = min(args.prompt, 32), min(args.new, 16), \
            min(args.eager_new, 8), min(args.check_new, 8)
        args.profile_steps = min(args.profile_steps, 4)
    overlaps = [o for o in args.overlap.split(",") if o]
    if not overlaps or any(o not in ("auto", "off", "graph", "streams") for o in overlaps):
        parser.error(f"--overlap {args.overlap!r}: each item must be auto / off / graph / streams")
    stacks = [o for o in args.stack.split(",") if o]
    if not stacks or any(o not in STACK_MODES for o in stacks):
        parser.error(f"--stack {args.stack!r}: each item must be {' / '.join(STACK_MODES)}")
    attentions = [o for o in args.attention.split(",") if o]
    if not attentions or any(o not in ("auto", *ATTENTION_MODES) for o in attentions):
        parser.error(f"--attention {args.attention!r}: each item must be auto / {' / '.join(ATTENTION_MODES)}")
    if args.speculate:
        try:
            ks = [int(k) for k in args.speculate.split(",")]
            agreements = [float(a) for a in args.agreement.split(",")]
        except ValueError:
            parser.error(f"--speculate {args.speculate!r} / --agreement {args.agreement!r}: comma-separated numbers")
        if any(not 1 <= k <= 16 for k in ks):
            parser.error(f"--speculate {args.speculate}: each K must be from 1 to 16")
        if any(not 0.0 <= a <= 1.0 for a in agreements):
            parser.error(f"--agreement {args.agreement}: each value must be in [0, 1]")
        if any(c not in ("free", "expert") for c in args.draft_cost.split(",")):
            parser.error(f"--draft-cost {args.draft_cost!r}: each item must be free / expert")
        if not 0.0 <= args.min_acceptance <= 1.0:
            parser.error(f"--min-acceptance {args.min_acceptance}: must be in [0, 1]")
        if args.paths not in ("eager", "fast") or (args.profile and args.paths == "eager"):
            parser.error("--speculate takes --paths fast (the fast path, timed with an oracle draft) or --paths eager "
                         "(the reference loop, without --profile)")
        if args.paths == "eager" and (len(ks) > 1 or args.check):
            parser.error("--speculate with --paths eager takes one K and no --check")
        if args.paths == "fast" and args.temperature > 0:
            parser.error("the fast path's speculative decoding is greedy: drop --temperature, or use --paths eager")
        if args.draft == "fusion" and "target" in args.modes.split(",") and args.paths == "fast":
            parser.error("--draft fusion needs the steered mode: add --modes steered")
        if not (args.check or args.profile) and any(not b.isdigit() for b in args.batches.split(",") if b):
            parser.error("--speculate needs numeric --batches (no max)")
    if args.check and args.quant == "int4" and args.check_dtypes != "bfloat16":
        parser.error("--check --quant int4 compares in bf16 only (torchao's tile-packed int4 kernel computes in bf16): "
                     "add --check-dtypes bfloat16")
    compile_step = compiles(args.compile, torch.device(args.device).type)
    torch.set_grad_enabled(False)
    # NF4 调优缓存：给了路径时，同一台 GPU 上的几个基准进程共用调优结果（后面的进程不再花一两分钟计时）；默认 off
    use_tuning_cache(args.nf4_tuning_cache)
    env = environment()
    print(json.dumps({"env": env, "args": vars(args)}), flush=True)

    report: dict[str, Any] = {"env": env, "args": vars(args)}
    if args.out:  # 边测边写（见 emit）：先写下环境与参数，complete = false 直到 finish
        with open(args.out, "w") as f:
            json.dump({**report, "complete": False, "rows_so_far": []}, f, indent=1)
    if args.speculate and args.paths == "fast" and not args.check and not args.profile:
        report["speculation"] = speculate_fast_rows(args, [int(b) for b in args.batches.split(",") if b], compile_step)
        print(f"\n{'mode':<9}{'batch':>6}{'K':>3} {'draft':<7}{'agree':>6}{'accept':>8}{'tok/verify':>11}"
              f"{'ms/token':>10}{'tok/s':>9}{'speedup':>8}{'same':>6}")
        for r in report["speculation"]:
            if r["path"] == "fast":
                print(f"{r['mode']:<9}{r['batch']:>6}{'-':>3} {'none':<7}{'':>6}{'':>8}{'1.00':>11}"
                      f"{r['ms_per_step']:>10.2f}{r['tok_per_s']:>9.1f}{'1.00':>8}")
                continue
            acc = f"{r['acceptance']:.3f}" if r["acceptance"] is not None else "-"
            print(f"{r['mode']:<9}{r['batch']:>6}{r['k']:>3} {r['draft_cost']:<7}{r['agreement']:>6.2f}{acc:>8}"
                  f"{r['tokens_per_verify']:>11.2f}{r['ms_per_token']:>10.2f}{r['tok_per_s']:>9.1f}"
                  f"{r['speedup']:>8.2f}{r['identical_rows']:>6}")
        return finish(report, args.out)
    if args.speculate and args.paths == "eager":
        report["speculation"] = speculate_rows(args, [int(b) for b in args.batches.split(",") if b])
        print(f"\n{'mode':<9}{'batch':>6}{'K':>3} {'draft':<7}{'drafted':>9}{'accepted':>9}{'accept':>8}"
              f"{'tok/verify':>11}{'identical':>10}{'plain s':>9}{'spec s':>9}")
        for r in report["speculation"]:
            if "error" in r:
                print(f"{r['mode']:<9}{r['batch']:>6}  {r['error']}")
                continue
            acc = f"{r['acceptance']:.3f}" if r["acceptance"] is not None else "-"
            print(f"{r['mode']:<9}{r['batch']:>6}{r['speculate']:>3} {r['draft']:<7}{r['drafted']:>9}{r['accepted']:>9}"
                  f"{acc:>8}{r['tokens_per_verify']:>11.2f}{str(r['identical']):>10}{r['plain_s']:>9.2f}"
                  f"{r['speculative_s']:>9.2f}")
        return finish(report, args.out)
    if args.check:
        report["check"] = check(args, compile_step)
        return finish(report, args.out)

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if not args.check and not args.profile:
        # 模型加载之前、设备空闲时测只读带宽；CPU（CI 冒烟测试）用小得多的张量
        bandwidth = read_bandwidth(args.device, 2 * 2**30 if args.device.startswith("cuda") else 64 * 2**20)
        report["read_bandwidth"] = bandwidth
        emit_key("read_bandwidth", bandwidth, args.out)
    if args.quant != "bf16":
        models = quantized_models(args.quant, args.preset, args.device, args.int4_group_size)
    else:
        models = [random_model(k, args.preset, dtype, args.device, s) for k, s in (("8b", 0), ("1b", 1), ("1b", 2))]
    remember_weight_bytes(models)
    if args.profile:
        report["profile"] = profile(models, args.profile, args, compile_step)
        return finish(report, args.out)
    rows: list[dict[str, Any]] = []
    requested = [b for b in args.batches.split(",") if b]
    sizes = [int(b) for b in requested if b != "max"]
    if "max" in requested:
        sizes += [128 * 2 ** i for i in range(4)]
    for batch in sizes:
        oom = False
        for path in args.paths.split(","):
            # 引导行：overlap × stack × attention 逐个测。目标行：各 (stack, attention) 按 stack_for / attention_for
            # 映射、去重后各测一次（"pair" 与 "off" 对目标是同一条路径；没有叠加前向时注意力都是 sdpa）。
            if path == "fast":
                steered_runs = [(o, st, at) for o in overlaps for st in stacks for at in attentions]
                steered_runs = list(dict.fromkeys((o, st, attention_for(at, st)) for o, st, at in steered_runs))
                target_runs = list(dict.fromkeys(("off", stack_for(st, False), attention_for(at, stack_for(st, False)))
                                                 for st in stacks for at in attentions))
            else:
                steered_runs = target_runs = [("off", "off", "auto")]
            runs = [(mode, *r) for mode in args.modes.split(",")
                    for r in (steered_runs if mode == "steered" else target_runs)]
            for mode, overlap, stack, attention in runs:
                key = {"path": path, "mode": mode, "batch": batch, "overlap": overlap, "stack": stack,
                       "attention": attention}
                try:
                    row = measure(path, models, mode == "steered", batch, args, compile_step, overlap, stack,
                                  attention)
                except torch.OutOfMemoryError:
                    row = {**key, "error": "OOM"}
                    oom = True
                except Exception as exc:  # noqa: BLE001 — 记录失败（如 4-bit 下编译失败）并继续测其余配置
                    row = {**key, "error": f"{type(exc).__name__}: {exc}"[:500]}
                rows.append(row)
                emit(row, args.out)
                gc.collect()
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        if oom and batch > 64:
            break
    report["rows"] = rows
    report["ratios"] = ratio_summary(rows, report["read_bandwidth"]["tbps_best"])
    report["full_run_estimate"] = estimate_full_run(rows)

    print(f"\n{'path':<6}{'mode':<9}{'overlap':<9}{'stack':<7}{'attn':<7}{'batch':>6}{'ms/step':>10}{'tok/s':>10}{'ratio':>7}"
          f"{'peak GiB':>10}{'GB/step':>9}{'TB/s':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:<6}{r['mode']:<9}{r.get('overlap', ''):<9}{r.get('stack', ''):<7}"
                  f"{r.get('attention', ''):<7}{r['batch']:>6}  "
                  f"{r['error']}")
            continue
        base = target_row(rows, r)
        ratio = f"{r['ms_per_step'] / base['ms_per_step']:.2f}" if base and r["mode"] == "steered" else ""
        print(f"{r['path']:<6}{r['mode']:<9}{r['overlap']:<9}{r['stack']:<7}{r['attention']:<7}{r['batch']:>6}{r['ms_per_step']:>10.2f}"
              f"{r['tok_per_s']:>10.1f}{ratio:>7}{r.get('peak_gib', '-'):>10}{r['floor_gb']:>9.2f}{r['achieved_tbps']:>7.2f}")
        if "profile" in r:
            p = r["profile"]
            print(f"      profile: kernels {p['kernel_ms_per_step']} ms/step in {p['kernels_per_step']} kernels "
                  f"(busy {p['busy_ms_per_step']}, overlapped {p['overlap_ms_per_step']}); "
                  + ", ".join(f"{k} {v}" for k, v in p["ms_per_step"].items()))
    bw = report["read_bandwidth"]
    print(f"\nread bandwidth (sum over {bw['gib']} GiB bf16): best {bw['tbps_best']} TB/s, median {bw['tbps_median']} TB/s")
    for q in report["ratios"]:
        print(f"batch {q['batch']} ({q['path']}, {q['stack']}, {q['overlap']}, {q['attention']}): steered / target "
              f"{q['ratio']:.3f}, floor ratio {q['floor_ratio']:.3f} (least bytes steered / target); "
              f"at {q['target_of_floor']:.0%} / {q['steered_of_floor']:.0%} of the floor time")
    for line in report["full_run_estimate"]:
        print("full MedQA, both arms, 512 new tokens:", line)
    return finish(report, args.out)


def emit(row: dict[str, Any], out: str | None) -> None:
    """打印一行结果（一行 JSON）；给了 --out 时也把它追加进文件的 rows_so_far（文件由 main 先写好 env/args，
    complete = false）。为什么：设备机上的命令有时间上限，超时或中途出错时已测的行不能只留在标准输出里
    （f3031a1 的一次投机解码测量就是从日志里捞回来的）。finish 写完整报告时 complete = true、去掉 rows_so_far。"""
    print(json.dumps(row), flush=True)
    _update_partial(out, lambda partial: partial["rows_so_far"].append(row))


def emit_key(key: str, value: Any, out: str | None) -> None:
    """打印一项 {key: value}（一行 JSON），给了 --out 时也写进中间文件。为什么：份额列（share of floor time）要用同一
    进程的只读带宽，29a413f 的一次 NF4 测量超时后文件里只有各行、没有带宽，只能从日志里找回。"""
    print(json.dumps({key: value}), flush=True)
    _update_partial(out, lambda partial: partial.__setitem__(key, value))


def _update_partial(out: str | None, change: Callable[[dict[str, Any]], Any]) -> None:
    """读出 --out 的中间文件、就地改一处、写回（没给 --out 时什么也不做）。emit 与 emit_key 共用。"""
    if not out:
        return
    with open(out) as f:
        partial = json.load(f)
    change(partial)
    with open(out, "w") as f:
        json.dump(partial, f, indent=1)


def finish(report: dict[str, Any], out: str | None) -> int:
    """打印整份 JSON 报告；给了 --out 就也写进文件（complete = true，覆盖 emit 写的中间结果）。每种模式（测速、
    --check、--profile、--speculate）都经这里收尾，以免某种模式悄悄忽略 --out（--check 曾经如此）。"""
    report = {**report, "complete": True}
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
