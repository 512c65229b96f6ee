"""CPU 测量（issue 16 第 3 条）：两种 4-bit 格式（--quant nf4 / int4）对一个真实预训练模型做了什么。

模型：SmolLM2-135M-Instruct，经项目自己的 GGUF 加载（model_loader.load_model，与 --demo 相同、转换有缓存）。
注意该 GGUF 的 210 个解码层 Linear 本身是 Q4_1（每 32 个一组的仿射 4-bit），嵌入是 Q8_0：反量化出的“bf16 权重”
已经落在每 32 个一组的 16 级网格上——结果只对这份权重成立，报告里写明。

参照（ref）：全部参数舍入到 bf16（“bf16 检查点”），前向用 float32。每种格式从同一份 bf16 权重出发，只替换解码层的
Linear 权重为“量化再反量化”的值（各库自己的反量化函数，输出 bf16），前向同样用 float32——各行之间只差权重的取值，
不含任何 kernel 的舍入。另有一行 "bf16 compute"：参照的权重、整个前向用 bf16，给出“只是 bf16 计算”的噪声尺度。

  - nf4：bitsandbytes 自己的 quantize_4bit / dequantize_4bit（quant_type="nf4"、blocksize 64、compress_statistics=True
    即 absmax 双重量化）——transformers 用 BitsAndBytesConfig(bnb_4bit_use_double_quant=True) 加载时的设置。
    在 CPU 上 bitsandbytes 走它的 CPU 后端（嵌套 absmax 的 8 位码与 CUDA kernel 在中点附近可以差一格，见 tests/test_nf4.py）。
  - int4 gG：torchao 0.18 的 Int4WeightOnlyConfig(group_size=G, int4_packing_format="tile_packed_to_4d") 在
    Int4TilePackedTo4dTensor.from_hp 里调用的同一组原语：_choose_qparams_affine_tinygemm（非对称、uint4 [0, 15]、
    bf16 的 scale 与浮点域 zero）、_quantize_affine_tinygemm，反量化用 _dequantize_affine_tinygemm（输出 bf16）。
    in_features 不是 G 的倍数的 Linear 保持 bf16（torchao 的 _int4_weight_only_quantize_tensor 的规则）：SmolLM2 的
    q/k/v/o/gate/up 的 in_features 是 576 = 4.5 × 128，所以 g128 只量化 down_proj（30 个）；Llama-3 8B/1B 的所有投影
    都是 128 的倍数，全部量化。为了同条件比较，另有 "down_proj only" 的 nf4 与 g64 行。g32 一行是诊断：它与 GGUF 的
    Q4_1 网格对齐，几乎无损说明的是这份权重的来历，不是 int4 的一般质量。

两种格式都不量化嵌入与 lm_head（SmolLM2 两者共享；transformers 对 bitsandbytes 与 torchao 的默认都跳过 lm_head，嵌入
不是 Linear）。

度量（前 N 道 MedQA dev 题，项目的 CoT 提示：main.cot_prompts、目标角色、--demo 的系统提示）：
  - 参照贪心生成 NEW 个 token（evaluator.generate_batch）得到 y；每种格式在 prompt + y 上教师强制一次前向：
    每个位置 KL(p_ref ‖ p_quant)（全词表、float64），以及 argmax 与参照的 argmax 相同的比例；
  - 每种格式自己贪心生成 NEW 个 token：与 y 在第一个不同 token 之前相同的 token 数，以及整段相同的题数。

用法（CPU，无网络，约 20–40 分钟，视机器负载）：
    python benchmarks/quant_quality.py --n 50 --new 48 --out benchmarks/results/quant_quality.json
    python benchmarks/quant_quality.py --report benchmarks/results/quant_quality.json   # 只由 JSON 重印表与成对比较
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import config  # noqa: E402
import data_loader  # noqa: E402
import model_loader  # noqa: E402
from evaluator import batch_plan, generate_batch, left_pad  # noqa: E402

NF4_BLOCKSIZE = 64  # transformers 的 BitsAndBytesConfig 默认 bnb_4bit_blocksize = 64（model_loader 不改它）


@dataclass(frozen=True)
class Variant:
    """表里的一行：name；roundtrip(bf16 权重 (N, K)) → 反量化后的 bf16 权重，或 None（该库不量化这个形状）；
    only：只量化名字以它结尾的 Linear（None = 全部解码层 Linear）；bits：每个被量化权重的平均比特数（含量化参数）；
    bf16_compute：不量化，整个前向用 bf16。"""

    name: str
    roundtrip: Callable[[torch.Tensor], torch.Tensor | None] | None = None
    only: str | None = None
    bits: float | None = None
    bf16_compute: bool = False


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """bitsandbytes 的 NF4 量化再反量化（blocksize 64、双重量化），w 与返回值都是 bf16 (N, K)。"""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    return bnbf.dequantize_4bit(packed, state)


def int4_roundtrip(w: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """torchao 0.18 的 int4 只量化权重（Int4WeightOnlyConfig 的 tile-packed 路径）量化再反量化，bf16 (N, K) → bf16；
    in_features 不是 group_size 的倍数时返回 None（torchao 跳过它、权重保持 bf16）。
    tile-packed 在量化前把 in_features 补零到 1024 的倍数：补出的是整组的零，不影响真实的组，这里省掉。"""
    from torchao.quantization.quant_primitives import (MappingType, _choose_qparams_affine_tinygemm,
                                                       _dequantize_affine_tinygemm, _quantize_affine_tinygemm)

    if w.shape[-1] % group_size:
        return None
    block = [1, group_size]
    scale, zero = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, tuple(block), torch.int32, 0, 15,
                                                  scale_dtype=w.dtype, zero_point_dtype=w.dtype)
    q = _quantize_affine_tinygemm(w, block, scale, zero, torch.int32, quant_min=0, quant_max=15)
    return _dequantize_affine_tinygemm(q, tuple(block), scale, zero, torch.int32, 0, 15, output_dtype=w.dtype)


def variants() -> list[Variant]:
    """表的各行（顺序即表的顺序）。比特数：nf4 = 4 + 8/64（uint8 absmax）+ 32/(64·256)（第二层 fp32 absmax）；
    int4 gG = 4 + 32/G（每组 bf16 的 scale 与 zero）。"""
    nf4_bits = 4 + 8 / 64 + 32 / (64 * 256)
    int4 = {g: (lambda w, g=g: int4_roundtrip(w, g)) for g in (32, 64, 128)}
    return [
        Variant("nf4", nf4_roundtrip, bits=nf4_bits),
        Variant("int4 g64", int4[64], bits=4 + 32 / 64),
        Variant("int4 g128", int4[128], bits=4 + 32 / 128),
        Variant("nf4, down_proj only", nf4_roundtrip, only="down_proj", bits=nf4_bits),
        Variant("int4 g64, down_proj only", int4[64], only="down_proj", bits=4 + 32 / 64),
        Variant("int4 g32 (diagnostic)", int4[32], bits=4 + 32 / 32),
        Variant("bf16 compute", bf16_compute=True),  # 最后：CPU 上 bf16 的矩阵乘比 float32 慢几倍
    ]


def decoder_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """解码层里的全部 Linear（不含 lm_head——它与嵌入共享或单独，两种格式都不量化它）。"""
    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def bf16_reference(model: torch.nn.Module) -> torch.nn.Module:
    """参照：每个参数舍入到 bf16 再放回 float32（“bf16 检查点、float32 计算”）。就地修改并返回同一个模型。"""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def quantized_copy(ref: torch.nn.Module, v: Variant) -> tuple[torch.nn.Module, dict[str, int]]:
    """参照的深拷贝，v 所选的 Linear 权重换成 bf16 权重经 v.roundtrip 的结果（float32 存放）；bf16_compute 时整个转成
    bf16。返回 (模型, {"linears": 被量化的 Linear 数, "weights": 它们的参数数, "skipped": 库不量化而保持 bf16 的数})。"""
    model = copy.deepcopy(ref)
    counts = {"linears": 0, "weights": 0, "skipped": 0}
    if v.bf16_compute:
        return model.to(torch.bfloat16), counts
    with torch.no_grad():
        for name, lin in decoder_linears(model):
            if v.only is not None and not name.endswith(v.only):
                continue
            new = v.roundtrip(lin.weight.to(torch.bfloat16))
            if new is None:
                counts["skipped"] += 1
                continue
            lin.weight.copy_(new.float())
            counts["linears"] += 1
            counts["weights"] += lin.weight.numel()
    return model, counts


@torch.inference_mode()
def teacher_forced_logprobs(model: torch.nn.Module, prompts: Sequence[Sequence[int]], outs: Sequence[Sequence[int]],
                            pad_id: int, vocab: int) -> list[torch.Tensor]:
    """一批的教师强制 log-softmax：第 b 行 (len(outs[b]), V) float32，第 j 行是模型看着 prompt + out[:j] 时下一个
    token 的对数概率。左填充使每行右对齐，所以第 b 行需要的正是最后 len(outs[b]) 个位置。"""
    seqs = [list(p) + list(o[:-1]) for p, o in zip(prompts, outs)]
    ids, mask = left_pad(seqs, pad_id, torch.device("cpu"))
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    keep = max(len(o) for o in outs)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    return [torch.log_softmax(logits[b, keep - len(o):, :vocab].float(), dim=-1) for b, o in enumerate(outs)]


def kl_per_position(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_other)，每个位置一个值 (T,) float64；输入是两份 (T, V) 的 log-softmax。"""
    r, o = ref.double(), other.double()
    return (r.exp() * (r - o)).sum(-1)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """两段 token 在第一个不同之前相同的个数（一段是另一段的前缀时为较短的长度）。"""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(name: str, v: Variant | None, counts: dict[str, int], kls: list[torch.Tensor], agree: list[torch.Tensor],
              prefixes: list[int], identical: list[bool], seconds: float) -> dict[str, Any]:
    """一行的汇总：KL 按位置（所有题的所有位置）取均值 / 中位数 / p95 / 最大；一致率按位置；自由生成按题。"""
    kl = torch.cat(kls) if kls else torch.zeros(0, dtype=torch.float64)
    hits = torch.cat(agree) if agree else torch.zeros(0, dtype=torch.bool)
    return {"name": name, "bits_per_quantized_weight": v.bits if v else None, "only": v.only if v else None,
            **counts, "positions": int(kl.numel()),
            "kl_mean": float(kl.mean()) if kl.numel() else 0.0,
            "kl_median": float(kl.median()) if kl.numel() else 0.0,
            "kl_p95": float(torch.quantile(kl, 0.95)) if kl.numel() else 0.0,
            "kl_max": float(kl.max()) if kl.numel() else 0.0,
            "top1_agreement": float(hits.float().mean()) if hits.numel() else 1.0,
            "free_prefix_mean": sum(prefixes) / len(prefixes) if prefixes else 0.0,
            "free_identical": sum(identical), "questions": len(prefixes), "seconds": round(seconds, 1)}


def environment() -> dict[str, Any]:
    """机器与版本（写进 JSON，BENCHMARKS.md 引用）。"""
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), check=False).stdout.strip() or None
    except OSError:
        commit = None
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo", encoding="utf-8")
                if ln.startswith("model name")), platform.processor()) if os.path.exists("/proc/cpuinfo") \
        else platform.processor()
    return {"python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "commit": commit, **{p: version(p) for p in ("torch", "transformers", "bitsandbytes", "torchao", "gguf")}}


def markdown(rows: list[dict[str, Any]]) -> str:
    """结果表（英文，给 BENCHMARKS.md）。"""
    head = ("| format | bits / quantized weight | Linears quantized (weights) | mean KL | p95 KL | top-1 agreement "
            "| free greedy: mean tokens before divergence | identical of N |\n|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        bits = f"{r['bits_per_quantized_weight']:.3f}" if r["bits_per_quantized_weight"] else "16 (bf16)"
        lin = f"{r['linears']} ({r['weights'] / 1e6:.1f} M)" if r["bits_per_quantized_weight"] else "0"
        body += (f"| {r['name']} | {bits} | {lin} | {r['kl_mean']:.4f} | {r['kl_p95']:.4f} | {r['top1_agreement']:.3f} "
                 f"| {r['free_prefix_mean']:.1f} | {r['free_identical']} / {r['questions']} |\n")
    return head + body


# 成对比较（同一批题）：(a, b) 两行，b 是对照。
COMPARISONS: tuple[tuple[str, str], ...] = (("int4 g64", "nf4"), ("int4 g128", "nf4, down_proj only"),
                                            ("int4 g64, down_proj only", "nf4, down_proj only"),
                                            ("int4 g128", "int4 g64, down_proj only"))


def paired_difference(a: Sequence[float], b: Sequence[float], n_boot: int = 10_000, seed: int = 0) -> dict[str, float]:
    """每道题的成对差 a − b：均值与按题重抽样的 95% 自助区间（百分位法，固定种子）。"""
    import numpy as np

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(axis=1)
    return {"mean": float(d.mean()), "ci95_low": float(np.quantile(boots, 0.025)),
            "ci95_high": float(np.quantile(boots, 0.975))}


def report(payload: dict[str, Any]) -> str:
    """JSON → 表与成对比较（英文）；--report 只读一个已有的 JSON，不重算任何前向。"""
    rows = {r["name"]: r for r in payload["rows"]}
    lines = [markdown(payload["rows"]), "Paired over questions (per-question mean KL; per-question free-greedy prefix), "
             "a − b with a 95% bootstrap interval:\n"]
    for a, b in COMPARISONS:
        if a in rows and b in rows:
            kl = paired_difference(rows[a]["per_question_kl_mean"], rows[b]["per_question_kl_mean"])
            pre = paired_difference(rows[a]["per_question_prefix"], rows[b]["per_question_prefix"])
            lines.append(f"- {a} − {b}: mean KL {kl['mean']:+.4f} [{kl['ci95_low']:+.4f}, {kl['ci95_high']:+.4f}]; "
                         f"tokens before divergence {pre['mean']:+.1f} [{pre['ci95_low']:+.1f}, {pre['ci95_high']:+.1f}]")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """加载 SmolLM2 与题目，参照生成一次，再逐行（变体）量化、教师强制、自由生成；每行之后写一次 JSON。"""
    ap = argparse.ArgumentParser(description="Quality of the 4-bit formats on SmolLM2-135M-Instruct (CPU).")
    ap.add_argument("--n", type=int, default=50, help="the first N questions of the bundled MedQA dev split")
    ap.add_argument("--new", type=int, default=48, help="tokens of the reference's greedy continuation")
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--model", default=config.DEMO_MODEL, help="model source (default: the demo's SmolLM2 GGUF)")
    ap.add_argument("--variants", default=None, help="comma-separated names of the rows to run (default: all)")
    ap.add_argument("--out", default="benchmarks/results/quant_quality.json")
    ap.add_argument("--report", metavar="JSON", default=None,
                    help="only print the table and the paired comparisons of an existing result file (no model runs)")
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report, encoding="utf-8") as fh:
            print(report(json.load(fh)))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    chosen = [v for v in variants() if args.variants is None or v.name in args.variants.split(",")]

    cfg = config.parse_config(["--demo", "--target", args.model, "--expert", args.model, "--base", args.model])
    tok = model_loader.load_tokenizer(args.model)
    ref = bf16_reference(model_loader.load_model(args.model, cfg, torch.device("cpu")))
    vocab, pad = len(tok), tok.pad_token_id
    ends = model_loader.end_token_ids(tok, [ref])
    from main import cot_prompts  # 项目唯一的 CoT 提示编码规则（目标角色、--demo 的系统提示）

    questions, source = data_loader.load_medqa(os.path.join(config.BUNDLED_DATA_DIR, "dev.jsonl"), limit=args.n)
    prompts = cot_prompts(cfg, questions, tok, ("target",))["target"]
    batches = batch_plan(prompts, args.batch_size)

    def greedy(model: torch.nn.Module) -> dict[int, list[int]]:
        got: dict[int, list[int]] = {}
        for batch in batches:
            res = generate_batch([model], [[prompts[j] for j in batch]], vocab_size=vocab, max_new_tokens=args.new,
                                 end_ids=ends, pad_id=pad)
            got.update(zip(batch, res.tokens))
        return got

    start = time.time()
    with torch.inference_mode():
        ref_out = greedy(ref)
        ref_lp: dict[int, torch.Tensor] = {}
        for batch in batches:
            ref_lp.update(zip(batch, teacher_forced_logprobs(ref, [prompts[j] for j in batch],
                                                             [ref_out[j] for j in batch], pad, vocab)))
    print(f"[quant_quality] reference: {len(prompts)} questions, {sum(map(len, ref_out.values()))} tokens "
          f"({time.time() - start:.0f} s)", flush=True)
    total = sum(p.numel() for _, m in decoder_linears(ref) for p in (m.weight,))
    payload: dict[str, Any] = {
        "env": environment(), "args": vars(args), "data_source": source,
        "model": {"source": args.model, "resolved": model_loader.local_path(args.model),
                  "decoder_linears": len(decoder_linears(ref)), "decoder_linear_weights": total,
                  "all_parameters": sum(p.numel() for p in ref.parameters())},
        "reference": "all parameters rounded to bf16, forward in float32",
        "rows": [], "per_question": {"index": [q.index for q in questions],
                                     "reference_tokens": [ref_out[j] for j in range(len(prompts))]}}
    for v in chosen:
        t0 = time.time()
        model, counts = quantized_copy(ref, v)
        kls, agree, prefixes, identical = [], [], [], []
        with torch.inference_mode():
            out = greedy(model)
            for batch in batches:
                lps = teacher_forced_logprobs(model, [prompts[j] for j in batch], [ref_out[j] for j in batch], pad,
                                              vocab)
                for j, lp in zip(batch, lps):
                    kls.append(kl_per_position(ref_lp[j], lp))
                    agree.append(lp.argmax(-1) == ref_lp[j].argmax(-1))
        for j in range(len(prompts)):
            prefixes.append(common_prefix(out[j], ref_out[j]))
            identical.append(out[j] == ref_out[j])
        row = summarize(v.name, None if v.bf16_compute else v, counts, kls, agree, prefixes, identical,
                        time.time() - t0)
        row["per_question_kl_mean"] = [round(float(k.mean()), 6) for k in kls]
        row["per_question_prefix"] = prefixes
        payload["rows"].append(row)
        del model
        print(f"[quant_quality] {v.name}: mean KL {row['kl_mean']:.4f}, top-1 {row['top1_agreement']:.3f}, "
              f"free prefix {row['free_prefix_mean']:.1f}, identical {row['free_identical']}/{len(prompts)} "
              f"({row['seconds']:.0f} s)", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1)
    print(report(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
