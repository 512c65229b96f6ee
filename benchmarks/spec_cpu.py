"""CPU 测量（issue 17 第 4 条）：SmolLM2 的 --demo 三角色上，投机解码的接受率与每次验证产出的 token 数。

对每个臂（引导；可选基线）先用 evaluator.generate_batch 贪心生成输出 y（投机解码无损：任何草稿、任何 K 的输出都是 y），
再让每个草稿在 y 上做一次教师强制的前向，得到“草稿看着 y[:j] 时是否猜中 y[j]”的序列；
speculative.simulate_acceptance 由它精确推出每个 K 下 generate_speculative 的 drafted / accepted / verify_steps
（推导见其文档；--check-n 道题上再真的跑 generate_speculative 逐行核对）。这样 3 个 K × 每种草稿只需一次生成，
而不是每个组合各跑一遍。草稿：expert（专家单独）、fusion（z_b + α(z_e − z_b)，α 按本臂调度由 基座–专家 距离算出）、
model:L<n>（只留前 n 层的 SmolLM2 拷贝，看目标的提示）。基线臂没有基座，只有 expert 与 model 草稿。

CPU 与其他任务共用：这里不报告任何速度，只有接受统计。用法：
    python benchmarks/spec_cpu.py --n 50 --new 48 --out benchmarks/results/spec_cpu_n50.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import config  # noqa: E402
import data_loader  # noqa: E402
import model_loader  # noqa: E402
# ---- 集中导入：SteeringParams 将移到 steering_utils，只改这里 ----
from evaluator import batch_plan, generate_batch, left_pad  # noqa: E402
from steering_utils import SteeringParams, fuse_step  # noqa: E402
from speculative import generate_speculative, simulate_acceptance, truncated_copy  # noqa: E402


@torch.inference_mode()
def teacher_forced(model: Any, prompts: Sequence[Sequence[int]], outs: Sequence[Sequence[int]], pad_id: int,
                   vocab: int) -> list[torch.Tensor]:
    """一批的教师强制 logits：第 b 行得到 (len(outs[b]), V)，第 j 行是模型看着 prompt + out[:j] 时的 logits。
    左填充使每行右对齐，所以第 b 行需要的正是最后 len(outs[b]) 个位置。"""
    seqs = [list(p) + list(o[:-1]) for p, o in zip(prompts, outs)]
    ids, mask = left_pad(seqs, pad_id, model.device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    keep = max(len(o) for o in outs)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    return [logits[b, keep - len(o):, :vocab].float() for b, o in enumerate(outs)]


def markdown(rows: list[dict[str, Any]], n: int, new: int) -> str:
    """结果表（英文，给 README / 报告用）。"""
    head = ("| arm | draft | K | acceptance | tokens / verify | per-token agreement |\n"
            "|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['arm']} | {r['draft']} | {r['k']} | {r['acceptance']:.3f} | {r['tokens_per_verify']:.2f} "
                   f"| {r['agreement']:.3f} |\n" for r in rows)
    return f"N = {n} MedQA dev questions, {new} new tokens, SmolLM2-135M-Instruct fp32 (demo triad)\n\n" + head + body


def main(argv: Sequence[str] | None = None) -> None:
    """解析参数、加载模型与题目、逐批生成 + 教师强制 + 模拟，每批之后写一次 JSON（中途停下也有部分结果）。"""
    ap = argparse.ArgumentParser(description="Speculative decoding acceptance on CPU (SmolLM2 demo triad).")
    ap.add_argument("--n", type=int, default=10, help="number of MedQA dev questions (the first N)")
    ap.add_argument("--new", type=int, default=48, help="new tokens per question")
    ap.add_argument("--ks", default="2,4,6", help="draft lengths K, comma-separated")
    ap.add_argument("--draft-layers", default="10", help="layers kept in the truncated SmolLM2 draft(s)")
    ap.add_argument("--arms", default="steered", help="steered and/or baseline, comma-separated")
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--check-n", type=int, default=0,
                    help="also run generate_speculative (K = 4) on the first N questions of each arm and require "
                         "its statistics to equal the simulation's")
    ap.add_argument("--out", default="benchmarks/spec_cpu.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    cfg = config.parse_config(["--demo"])  # 与 main.py --demo 相同的角色系统提示与引导参数
    steering = SteeringParams(cfg.base_alpha, cfg.adaptive_scale, cfg.max_boost, metric=cfg.distance,
                              schedule=cfg.schedule, plausibility_beta=cfg.plausibility_beta)
    tok = model_loader.load_tokenizer(config.DEMO_MODEL)
    model = model_loader.load_model(config.DEMO_MODEL, cfg, torch.device("cpu"))
    vocab, pad = len(tok), tok.pad_token_id
    ends = model_loader.end_token_ids(tok, [model])
    layers = [int(x) for x in args.draft_layers.split(",") if x]
    drafts = {f"model:L{n}": truncated_copy(model, n) for n in layers}
    ks = [int(x) for x in args.ks.split(",")]
    questions, source = data_loader.load_medqa(os.path.join(config.BUNDLED_DATA_DIR, "dev.jsonl"), limit=args.n)
    roles = cfg.role_system_prompts
    prompts = {r: data_loader.encode_prompts([data_loader.format_prompt(q, tok, roles[r]) for q in questions], tok)
               for r in ("target", "expert", "base")}
    arms = [a for a in args.arms.split(",") if a]

    per_q: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    start = time.time()
    for arm in arms:
        names = ["expert"] + (["fusion"] if arm == "steered" else []) + list(drafts)
        roles_used = ["target", "expert", "base"] if arm == "steered" else ["target"]
        for batch in batch_plan(prompts["target"], args.batch_size):
            role_p = [[prompts[r][j] for j in batch] for r in roles_used]
            models = [model] * len(roles_used)
            out = generate_batch(models, role_p, vocab_size=vocab, max_new_tokens=args.new, end_ids=ends,
                                 pad_id=pad, steering=steering if arm == "steered" else None).tokens
            ze = teacher_forced(model, [prompts["expert"][j] for j in batch], out, pad, vocab)
            zb = teacher_forced(model, [prompts["base"][j] for j in batch], out, pad, vocab) \
                if arm == "steered" else None
            zd = {name: teacher_forced(d, [prompts["target"][j] for j in batch], out, pad, vocab)
                  for name, d in drafts.items()}
            for row, j in enumerate(batch):
                y = torch.tensor(out[row])
                guesses = {"expert": ze[row].argmax(-1)}
                if zb is not None:
                    guesses["fusion"] = fuse_step(zb[row], ze[row], zb[row], steering)[0].argmax(-1)
                guesses.update({name: z[row].argmax(-1) for name, z in zd.items()})
                matches = {name: (g == y).tolist() for name, g in guesses.items()}
                per_q.append({"arm": arm, "index": questions[j].index, "tokens": len(out[row]),
                              "matches": {name: "".join("1" if m else "0" for m in ms)
                                          for name, ms in matches.items()},
                              "sim": {name: {str(k): simulate_acceptance(ms, k, args.new) for k in ks}
                                      for name, ms in matches.items()}})
            print(f"[spec_cpu] {arm}: {sum(r['arm'] == arm for r in per_q)}/{len(questions)} questions "
                  f"({time.time() - start:.0f} s)", flush=True)
            write(args, source, steering, per_q, checks, ks, arms)
        if args.check_n:
            sub = list(range(min(args.check_n, len(questions))))
            role_p = [[prompts[r][j] for j in sub] for r in roles_used]
            for name in names:
                draft_model = drafts.get(name, model if name == "expert" and arm == "baseline" else None)
                spec_kw: dict[str, Any] = {}
                if name.startswith("model:") or arm == "baseline":
                    spec_kw = {"draft_model": draft_model,
                               "draft_prompts": [prompts["expert" if name == "expert" else "target"][j] for j in sub]}
                got = generate_speculative([model] * len(roles_used), role_p, vocab_size=vocab,
                                           max_new_tokens=args.new, end_ids=ends, pad_id=pad,
                                           steering=steering if arm == "steered" else None, k=4,
                                           draft="model" if name.startswith("model:") else name, **spec_kw)
                for row, j in enumerate(sub):
                    rec = next(r for r in per_q if r["arm"] == arm and r["index"] == questions[j].index)
                    sim = rec["sim"][name]["4"]
                    real = {"drafted": got.drafted[row], "accepted": got.accepted[row],
                            "verify_steps": got.verify_steps[row], "tokens": len(got.tokens[row])}
                    checks.append({"arm": arm, "draft": name, "index": questions[j].index, "sim": sim, "real": real,
                                   "equal": sim == real})
                    if sim != real:
                        print(f"[spec_cpu] warning: simulation {sim} != loop {real} "
                              f"({arm}, {name}, question {questions[j].index})", flush=True)
            write(args, source, steering, per_q, checks, ks, arms)
    rows = write(args, source, steering, per_q, checks, ks, arms)
    print(markdown(rows, len(questions), args.new))


def write(args: argparse.Namespace, source: str, steering: SteeringParams, per_q: list[dict[str, Any]],
          checks: list[dict[str, Any]], ks: list[int], arms: list[str]) -> list[dict[str, Any]]:
    """汇总（每个臂 × 草稿 × K 一行）并写出 JSON；返回汇总行。agreement = 草稿逐位置猜中的比例（与 K 无关）。"""
    rows = []
    for arm in arms:
        recs = [r for r in per_q if r["arm"] == arm]
        if not recs:
            continue
        for name in recs[0]["sim"]:
            hits = sum(r["matches"][name][1:].count("1") for r in recs)  # 第 0 个位置由 prefill 给出，不起草
            positions = sum(max(len(r["matches"][name]) - 1, 0) for r in recs)
            for k in ks:
                tot = {f: sum(r["sim"][name][str(k)][f] for r in recs)
                       for f in ("drafted", "accepted", "verify_steps", "tokens")}
                rows.append({"arm": arm, "draft": name, "k": k, "n": len(recs), **tot,
                             "acceptance": tot["accepted"] / tot["drafted"] if tot["drafted"] else 0.0,
                             "tokens_per_verify": tot["tokens"] / tot["verify_steps"],
                             "agreement": hits / positions if positions else 0.0})
    payload = {"args": vars(args), "data_source": source, "steering": dataclasses.asdict(steering), "torch": torch.__version__, "rows": rows, "checks": checks,
               "checks_all_equal": all(c["equal"] for c in checks) if checks else None, "per_question": per_q}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
