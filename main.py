"""`python main.py`：MedQA-USMLE 上“目标单独” vs “领域引导”的对比评测。run() 是一次运行的各阶段，从上到下读即是流程：

    配置（main）→ 运行目录（run_folder.open_run_dir，新建或 --resume）→ 数据（load_data，坏数据在加载模型之前失败）
    → 分词器与模型（load_roles，检查词表）→ 各臂（decode_arms：每批写完即 fsync 到 predictions.jsonl；
    或 score_by_letters）→ 从 predictions.jsonl 算 metrics.json（compute_metrics）→ 打印对比表（reporting）。

`python main.py --demo` 在任何 CPU 上离线运行（SmolLM2-135M-Instruct 充当三个角色）。

研究用评测（issue #5）：每次运行由若干“臂”（arm）组成——baseline、steered，或 --sweep 的 专家单独、基座单独与
调度 × α 网格，--temperature > 0 时再加每个臂的采样链（--votes 条，多数投票）。模型只加载一次、基线只算一次；
--scoring letter 不生成，每题每模型一次前向。每个臂都与基线配对比较（Wilson CI、配对自助法、精确 McNemar），
写出 sweep.csv / sweep.json 与 PNG 图。`accelerate launch --num_processes N main.py …` 把批分给 N 个进程，
rank 0 汇总，运行目录与单进程逐字节相同（timing 除外）。

长时间运行不丢进度（issue #4，见 RELIABILITY.md）：被杀死、Ctrl-C、批大小 1 仍显存不足之后，
`python main.py --resume <运行目录>` 跳过已记录的题，最终的 metrics.json（除 "timing" 外）与不中断的运行相同。
退出码：0 完成；2 配置/数据/模型/运行目录的已知错误（含：目录正被另一个活着的进程使用）；3 显存不足；
4 写运行目录失败（磁盘满等）；130 / 143 / 129 被 SIGINT（Ctrl-C）/ SIGTERM / SIGHUP 停下（128 + 信号编号）。
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from config import FORCED_ANSWER_CUE, LETTERS, ROLES, Config, ConfigError, parse_args
from data_loader import DataError, Question, encode_prompts, format_prompt, load_questions
from evaluator import RunError, arm_timing, cache_length, kv_cache_bytes, recheck_stage2, run_arm, score_letters_shard
from fingerprint import pin_inputs, read_pins, run_fingerprints, write_fingerprints
from model_loader import (ModelLoadError, available_memory, context_limit, end_token_ids, load_models, load_tokenizer,
                          local_path, model_config, resolve_device, resolve_source, torch_dtype, weight_bytes)
from reporting import arm_tables, make_plots, print_report, write_sweep
from run_folder import (CONFIG_FILE, METRICS_FILE, PREDICTIONS_FILE, Dist, Interrupted, RunFolderError, RunLock, _fsync_dir,
                        append_jsonl, collect_records, consolidate, environment, init_dist, lock_run_dir, log_event,
                        log_timing, open_append, open_run_dir, questions_sha256, raise_stop_now, rank_file, read_events,
                        read_records, read_timing, release_lock, resume_command, rewrite_sorted, stop_on_signals, write_json)
from sampling import Sampling
from scoring import (ArmSpec, ForcedAnswer, Record, RecordRules, decode_output, forced_answer_ids, letter_records,
                     letter_role_text, letter_token_ids, merge_letter_scores)
from speculative import Speculation
from stats import arm_metrics, compare_arms
from steering_utils import steering_params

EXIT_ERROR, EXIT_OOM, EXIT_WRITE = 2, 3, 4  # 被信号停下时退出码为 128 + 信号编号：SIGINT 130、SIGTERM 143、SIGHUP 129


# ---------------------------------------------------------------------------
# 臂（arm）：一次运行里要评测的各个设置
# ---------------------------------------------------------------------------

def arm_name(schedule: str, base_alpha: float) -> str:
    """扫参中一个设置的名字（也是 predictions.jsonl 里的 mode）：例如 "adaptive@0.5"。"""
    return f"{schedule}@{base_alpha:g}"



def plan_arms(cfg: Config) -> list[ArmSpec]:
    """按配置列出本次运行的全部臂，顺序即执行与报告的顺序：

    - baseline（目标单独，贪心）；
    - --sweep：expert_alone、base_alone 两行参考，再是 调度 × α 网格（名字如 "adaptive@0.5"）；
      否则 steered（配置里的调度与 α）；
    - --temperature > 0：上面每个贪心臂再加 --votes 条采样链（"<臂>/sample<v>"），多数投票与贪心并列报告。
    """
    greedy: list[ArmSpec] = []
    if "baseline" in cfg.modes:
        greedy.append(ArmSpec("baseline", ("target",)))
    if cfg.sweep:
        greedy += [ArmSpec("expert_alone", ("expert",)), ArmSpec("base_alone", ("base",))]
        greedy += [ArmSpec(arm_name(s, a), ROLES, steering_params(cfg, s, a), schedule=s, base_alpha=float(a))
                   for s in cfg.sweep_schedules for a in cfg.sweep_alphas]
    elif "steered" in cfg.modes:
        greedy.append(ArmSpec("steered", ROLES, steering_params(cfg), schedule=cfg.schedule,
                              base_alpha=cfg.base_alpha))
    if cfg.temperature == 0:
        return greedy
    chains = [dataclasses.replace(g, name=f"{g.name}/sample{v}", group=g.name,
                                  sampling=Sampling(cfg.temperature, cfg.top_p, cfg.seed, v))
              for g in greedy for v in range(cfg.votes)]
    return greedy + chains


def set_seed(seed: int) -> None:
    """固定 random / numpy / torch（含 CUDA）的种子：贪心解码本身确定，但任何带随机性的扩展都应可复现。"""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# ---------------------------------------------------------------------------
# 一次运行的各阶段
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Data:
    """本次评测的题目及其来源：questions 按数据顺序；fingerprint 是题目内容的 sha256（续跑时核对）；
    skipped 是 --skip-invalid 跳过的行（逐行原因）；trace_index 是 α 轨迹图所画的题目 index。"""

    questions: list[Question]
    source: str
    skipped: list[dict[str, str]]
    fingerprint: str
    trace_index: int

    @property
    def indices(self) -> set[int]:
        """本次全部题目的 index。"""
        return {q.index for q in self.questions}


@dataclass(frozen=True)
class Loaded:
    """加载好的分词器与模型：models[角色]，vocab_size 为分词器词表（模型多出的填充行永远不选），
    end_ids 为结束记号，letter_ids 为 " A".." D" 的 token id（只在 --scoring letter 时非空）；
    forced 为答案抽取第二阶段的 cue 与字母 id（只在 CoT 且 --forced-answer 时非 None）。"""

    device: torch.device
    tokenizer: Any
    models: dict[str, Any]
    vocab_size: int
    end_ids: list[int]
    letter_ids: list[int]
    forced: ForcedAnswer | None = None
    fingerprints: dict[str, Any] | None = None  # 模型、分词器、版本的指纹（fingerprint.pin_inputs，加载权重之前算出）


def check_before_loading(cfg: Config, dist: Dist) -> None:
    """不需要网络与权重的检查，排在任何 hub 访问（数据集、分词器、模型）之前：线程数、设备（4-bit 需要 CUDA）、
    模型来源的写法（本地路径是否存在、pypi: 包是否已安装）。否则没有网络的 CPU 机器会先重试 hub 一两分钟才拒绝。"""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    roles_needed = ROLES if "steered" in cfg.modes else ("target",)
    for role in roles_needed:
        resolve_source(getattr(cfg, role))
    pick_device(cfg, dist)


def load_data(cfg: Config, dist: Dist) -> Data:
    """读题目（先校验，坏数据在加载模型之前失败），检查 --trace-index 属于本次的题目。"""
    questions, source, skipped = load_questions(cfg.data_file, cfg.split, None if cfg.all_questions else cfg.limit,
                                                cfg.dataset_id, skip_invalid=cfg.skip_invalid)
    if skipped and dist.main:
        print(f"[main] --skip-invalid: skipped {len(skipped)} invalid data rows (first: {skipped[0]['where']}: "
              f"{skipped[0]['reason']}; all of them are listed in config.json)", file=sys.stderr, flush=True)
    indices = {q.index for q in questions}
    trace_index = cfg.trace_index if cfg.trace_index is not None else questions[0].index
    if trace_index not in indices:
        raise ConfigError(f"--trace-index={trace_index} is not the index of a question in this run ({len(questions)} questions, indices "
                          f"{min(indices)} to {max(indices)}). Pick another index, or include it with --limit/--all-questions.")
    return Data(questions, source, skipped, questions_sha256(questions), trace_index)


def record_rules(cfg: Config, arms: list[ArmSpec], data: Data, tokenizer: Any = None) -> RecordRules:
    """核对 predictions.jsonl 每条记录的规则（scoring.verify_record）：本次的臂、融合臂、题目、第二阶段、token 上界、
    投机解码的臂（与 evaluator.run_arm 相同：--speculate > 0 且臂里有目标）。tokenizer 给出时（它加载之后）另核对
    output_ids 在词表内、output 就是它们的解码（scoring.decode_output，与写记录同一个调用）。"""
    return RecordRules(modes=tuple(a.name for a in arms), fused=frozenset(a.name for a in arms if a.steering is not None),
                       questions={q.index: q for q in data.questions}, forced=cfg.forced_answer,
                       max_new_tokens=cfg.max_new_tokens,
                       speculative=frozenset(a.name for a in arms if cfg.speculate > 0 and "target" in a.roles),
                       decode=(lambda ids: decode_output(tokenizer, ids)) if tokenizer is not None else None,
                       vocab_size=len(tokenizer) if tokenizer is not None else None)


def cot_prompts(cfg: Config, questions: Sequence[Question], tokenizer: Any,
                roles: Iterable[str]) -> dict[str, list[list[int]]]:
    """CoT 每个角色每道题的提示 id（解码、第二阶段重算与上下文/内存检查共用这一条规则）。
    三个角色都用目标分词器渲染与编码（Llama-3.1 与 3.2 的模板会插入不同日期，必须统一）。"""
    prompts = cfg.role_system_prompts
    return {role: encode_prompts([format_prompt(q, tokenizer, prompts[role]) for q in questions], tokenizer)
            for role in roles}


def check_stage2(cfg: Config, run_dir: str, arms: list[ArmSpec], data: Data, loaded: "Loaded",
                 existing: list[Record], dist: Dist) -> None:
    """续跑、模型加载之后、任何新的解码之前：用模型由 output_ids 重算每条已保存记录的第二阶段字母（pred_forced 非 null 的），
    与 run_arm 同一条代码路径（evaluator.recheck_stage2 → stage2_letters）、同样的批。不一致 → DataError（文件:行号，
    退出码 2），什么都不改：伪造的第二阶段字母不进入指标。rank 0 重算，结果广播给其他进程。
    行号：resume_records 的 consolidate 已把 predictions.jsonl 写成 (臂的顺序, index) 升序，所以记录在这个顺序里的位置 + 1。"""
    if loaded.forced is None or not any(r["pred_forced"] is not None for r in existing):
        return
    problem: str | None = None
    if dist.main:
        names = [a.name for a in arms]
        order = sorted(existing, key=lambda r: (names.index(r["mode"]), r["index"]))
        line = {(r["mode"], r["index"]): k + 1 for k, r in enumerate(order)}
        print(f"[main] checking {sum(r['pred_forced'] is not None for r in existing)} stage-2 letters of resumed "
              "records ...", flush=True)
        role_prompts = cot_prompts(cfg, data.questions, loaded.tokenizer, loaded.models)
        path = os.path.abspath(os.path.join(run_dir, PREDICTIONS_FILE))
        for arm in arms:
            bad = recheck_stage2(arm.name, data.questions, role_prompts, loaded.models, existing, roles=arm.roles,
                                 steering=arm.steering, vocab_size=loaded.vocab_size, batch_size=cfg.batch_size,
                                 end_ids=loaded.end_ids, forced=loaded.forced)
            if bad:
                rec, again = min(bad, key=lambda b: line[(b[0]["mode"], b[0]["index"])])
                problem = (f"{path}:{line[(rec['mode'], rec['index'])]}: 'pred_forced' differs from stage 2 recomputed "
                           f"with the models (stored {json.dumps(rec['pred_forced'])}, recomputed {json.dumps(again)}). "
                           "The file was edited or damaged; this record is not counted. Restore the line, or delete it "
                           "to decode that question again, then --resume")
                break
    problem = dist.broadcast(problem)
    if problem is not None:
        raise DataError(problem)


def resume_records(cfg: Config, run_dir: str, stored: dict[str, Any] | None, data: Data, arms: list[ArmSpec],
                   dist: Dist) -> tuple[list[Record], dict[str, Any] | None]:
    """--resume：先核对题目与上次相同、config.json 与开始时的指纹副本相同（fingerprint.read_pins），再读出并逐条核对
    已记录的记录（CoT 才有可续的进度）。返回 (记录, 保存的指纹)；新运行返回 ([], None)。"""
    if stored is None:
        return [], None
    names = [a.name for a in arms]
    if stored.get("questions_sha256") != data.fingerprint:
        raise DataError(f"{os.path.join(run_dir, CONFIG_FILE)}: the questions read now differ from the last session's (then from "
                        f"{stored.get('data_source')}, now from {data.source}). A resume needs the same data; "
                        "if the data changed, start again with a new --output-dir.")
    pins = read_pins(run_dir, stored, data.fingerprint)
    if cfg.scoring != "cot":
        return [], pins
    saved_forced = stored.get("forced_answer") or {}
    if not isinstance(saved_forced, dict):
        raise ConfigError(f"{os.path.join(run_dir, CONFIG_FILE)}: \"forced_answer\" must be an object or null, got "
                          f"{saved_forced!r:.80}; restore the file, or start again with a new --output-dir.")
    saved_cue = saved_forced.get("cue", FORCED_ANSWER_CUE)
    if cfg.forced_answer and saved_cue != FORCED_ANSWER_CUE:
        # 第二阶段的字母取决于 cue：换了 cue 的续跑会把两种规则的记录混在一起。
        raise ConfigError(f"{os.path.join(run_dir, CONFIG_FILE)}: this run used the answer cue {saved_cue!r}, but "
                          f"config.FORCED_ANSWER_CUE is now {FORCED_ANSWER_CUE!r}; resume with the same cue, or "
                          "start a new run with a new --output-dir.")
    # rank 0 先把上次各进程的分片合并进 predictions.jsonl（截掉被杀时写了一半的行），其他进程再读同一份。
    rules = record_rules(cfg, arms, data)
    existing = consolidate(run_dir, names, data.indices, rules) if dist.main else []
    dist.barrier()
    if not dist.main:
        existing = read_records(os.path.join(run_dir, PREDICTIONS_FILE), names, data.indices, rules=rules)
    if dist.main:
        print(f"[main] resuming {run_dir}: {len(existing)}/{len(data.questions) * len(names)} records already written, skipping finished batches",
              flush=True)
    return existing, pins


def pick_device(cfg: Config, dist: Dist) -> torch.device:
    """解析 --device；多进程时每个进程用自己的 GPU（local_rank）。"""
    device = resolve_device(cfg)
    if dist.world > 1 and device.type == "cuda":
        if dist.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process local_rank={dist.local_rank}, but this machine has only {torch.cuda.device_count()} GPU(s): "
                              "--num_processes must not exceed the number of GPUs (each process holds all three models).")
        device = torch.device(f"cuda:{dist.local_rank}")
        torch.cuda.set_device(device)
    return device


def prompt_lengths(cfg: Config, questions: Sequence[Question], tokenizer: Any) -> dict[str, list[int]]:
    """每个要加载的角色下每道题的提示 token 数（CoT：该角色的聊天提示，经 cot_prompts；字母打分：字母提示），
    与解码时的编码相同。"""
    if cfg.scoring == "cot":
        return {role: [len(ids) for ids in encoded]
                for role, encoded in cot_prompts(cfg, questions, tokenizer, cfg.model_roles).items()}
    return {role: [len(tokenizer.encode(letter_role_text(q, cfg, role))) for q in questions] for role in cfg.model_roles}


def check_context(cfg: Config, data: Data, tokenizer: Any, forced: ForcedAnswer | None,
                  lengths: dict[str, list[int]] | None = None) -> Data:
    """上下文上界，在加载任何权重之前：每个角色的提示 + --max-new-tokens（CoT；第二阶段再加 cue 的长度）
    不能超过该角色模型配置里的 max_position_embeddings——否则解码到一半才会出错（或悄悄退化）。只读模型配置，不读权重。

    - --max-new-tokens（加 cue）本身就不小于上下文：整个运行拒绝（与 --skip-invalid 无关：没有一道题放得下）；
    - 某些题的提示 + 新 token 超出：默认拒绝（写明最长那道题与可用的 --max-new-tokens 上限）；--skip-invalid 时
      跳过这些题，原因与坏数据行一样记进 skipped（config.json 的 skipped_invalid_rows、metrics.json 的计数）。
    返回（可能去掉了超长题的）Data；题目指纹不变（它核对的是读入的数据，续跑时同样的过滤得到同样的题）。
    lengths：prompt_lengths 对 data.questions 的结果（check_bounds 算一次、与 check_memory 共用；缺省时在这里算）。
    """
    cue = len(forced.cue_ids) if forced is not None and cfg.scoring == "cot" else 0
    extra = cfg.max_new_tokens + cue if cfg.scoring == "cot" else 1
    what = f"--max-new-tokens{' plus the stage-2 cue' if cue else ''}"
    limits = {role: context_limit(getattr(cfg, role)) for role in cfg.model_roles}
    if all(limit is None for limit in limits.values()):
        return data
    lengths = lengths if lengths is not None else prompt_lengths(cfg, data.questions, tokenizer)
    over: dict[int, str] = {}  # 题目位置 j → 原因（每题只记第一个超出的角色）
    for role, limit in limits.items():
        if limit is None:
            continue
        j = max(range(len(lengths[role])), key=lengths[role].__getitem__)
        if extra >= limit:
            raise ConfigError(
                f"--max-new-tokens={cfg.max_new_tokens} exceeds the {role} model's context of {limit} tokens "
                f"({getattr(cfg, role)}): no prompt fits beside it. Lower --max-new-tokens to at most "
                f"{max(0, limit - lengths[role][j] - cue)} (the longest {role} prompt has {lengths[role][j]} tokens).")
        if lengths[role][j] + extra > limit and not cfg.skip_invalid:
            raise ConfigError(
                f"question {data.questions[j].index}: its {role} prompt has {lengths[role][j]} tokens, and with "
                f"{extra} more ({what}) it exceeds the {role} model's context of {limit} tokens ({getattr(cfg, role)}). "
                f"Lower --max-new-tokens to at most {max(0, limit - lengths[role][j] - cue)}"
                " or leave out the longest questions (--skip-invalid skips them and lists them in config.json).")
        for k, n in enumerate(lengths[role]):
            if n + extra > limit and k not in over:
                over[k] = (f"its {role} prompt has {n} tokens, and with {extra} more ({what}) it exceeds the "
                           f"{role} model's context of {limit} tokens")
    if not over:
        return data
    kept = [q for k, q in enumerate(data.questions) if k not in over]
    if not kept:
        raise DataError(f"every question ({len(data.questions)}) exceeds a model's context with {what} = {extra} "
                        f"(first: question {data.questions[0].index}: {over[0]}). Lower --max-new-tokens.")
    skipped = [{"where": f"question {data.questions[k].index}", "reason": reason} for k, reason in sorted(over.items())]
    print(f"[main] --skip-invalid: skipped {len(skipped)} questions whose prompt plus {what} exceeds the context "
          f"(first: {skipped[0]['where']}: {skipped[0]['reason']}; all of them are listed in config.json)",
          file=sys.stderr, flush=True)
    trace_index = data.trace_index
    if trace_index not in {q.index for q in kept}:
        if cfg.trace_index is not None:
            raise ConfigError(f"--trace-index={trace_index}: that question was skipped because it exceeds the "
                              "context (see above). Pick another index.")
        trace_index = kept[0].index
    return dataclasses.replace(data, questions=kept, skipped=data.skipped + skipped, trace_index=trace_index)


def compiles_step(cfg: Config, device: torch.device) -> bool:
    """快速路径的解码步是否编译：--compile on，或 auto 且在 CUDA 上（decode_arms 与内存估计共用这一条规则）。"""
    from fast.decoder import compiles  # 快速引擎只在需要时导入（与 evaluator 相同）

    return cfg.fast and compiles(cfg.compile, device.type)


def check_memory(cfg: Config, data: Data, longest: int, device: torch.device) -> None:
    """内存估计，在加载任何权重之前（只读模型配置）：权重（各不同模型各一份）+ 最大的那个臂的 KV 缓存
    （批大小 × 每行槽位数，evaluator.cache_length：快速路径按长度桶一次分配、参考循环最多 最长提示 + 新 token、
    投机循环最坏 (K+1) 倍；引导臂三个角色各一份，基线只有目标——投机时再加专家草稿）。
    超过此刻可用的内存（CUDA：mem_get_info 的空闲显存；CPU：MemAvailable）就以退出码 2 拒绝，
    而不是在分配缓存时被内存耗尽杀死、没有任何消息。估计只含权重与缓存（激活与 logits 另需一些），是下界。
    longest：要解码的题里各角色最长的提示 token 数（check_bounds 由 prompt_lengths 算出，与 check_context 共用）。"""
    available = available_memory(device)
    if available is None:
        return
    roles = cfg.model_roles
    specs = {role: getattr(cfg, role) for role in roles}
    configs = {spec: model_config(spec) for spec in set(specs.values())}
    dtype = torch.bfloat16 if cfg.load_in_4bit else torch_dtype(cfg.dtype)
    # NF4 在快速路径上（CUDA、编译时叠加，resolve_stack 的 auto 规则）的块尺度是 float32（每 64 个权重 4 字节，
    # 双重量化的 1 字节随之释放）：估计里按它算，否则少算约 0.37 GB（三个模型）
    fast_scales = compiles_step(cfg, device) and device.type == "cuda"
    weights = sum(weight_bytes(c, dtype, cfg.load_in_4bit, cfg.quant, cfg.int4_group_size, fast_scales)
                  for c in configs.values())
    batch = min(cfg.batch_size, len(data.questions))
    cot = cfg.scoring == "cot"
    new = cfg.max_new_tokens if cot else 1
    length = cache_length(longest, new, fast=cot and cfg.fast, speculate=cfg.speculate if cot else 0)
    caches = sum(kv_cache_bytes(configs[specs[r]], batch, length, dtype) for r in roles)
    need = weights + caches
    if need > available:
        gib = 2 ** 30
        raise ConfigError(
            f"not enough memory on {device}: this run needs at least {need / gib:.2f} GiB (weights of "
            f"{len(configs)} model(s) ≈ {weights / gib:.2f} GiB in {str(dtype).replace('torch.', '')}"
            f"{' ' + cfg.quant.upper() if cfg.load_in_4bit else ''}, KV caches ≈ {caches / gib:.2f} GiB for {len(roles)} role(s) × "
            f"batch {batch} × {length} tokens), but only {available / gib:.2f} GiB is available. "
            "Lower --batch-size or --max-new-tokens"
            f"{'' if cfg.load_in_4bit or device.type != 'cuda' else ', or use --load-in-4bit'}.")


def check_bounds(cfg: Config, data: Data, tokenizer: Any, forced: ForcedAnswer | None, device: torch.device) -> Data:
    """加载权重之前的两个上界：上下文（check_context，可能按 --skip-invalid 去掉超长题）与内存（check_memory）。
    提示长度只算一次（全部题目 × 每个角色的模板渲染与编码，1,273 题时要几秒），两者共用；内存按留下的题里
    最长的提示估计（去掉的超长题不解码）。返回 check_context 的 Data。"""
    lengths = prompt_lengths(cfg, data.questions, tokenizer)
    position = {q.index: k for k, q in enumerate(data.questions)}
    data = check_context(cfg, data, tokenizer, forced, lengths)
    check_memory(cfg, data, max(v[position[q.index]] for v in lengths.values() for q in data.questions), device)
    return data


def load_roles(cfg: Config, dist: Dist, data: Data,
               pin: Callable[[Any], dict[str, Any]] | None = None) -> tuple[Data, Loaded]:
    """分词器与模型。便宜的检查（来源写法、字母 token、上下文上界、内存估计）都排在加载任何模型之前；
    pin（fingerprint.pin_inputs）在这些检查之后、加载权重之前算输入的指纹（续跑时比较），结果放进 Loaded。
    返回的 Data 去掉了 --skip-invalid 跳过的超长题（见 check_context）。"""
    roles_needed = cfg.model_roles
    for role in roles_needed:
        resolve_source(getattr(cfg, role))
    device = pick_device(cfg, dist)
    tokenizer = load_tokenizer(cfg.target)
    letter_ids: list[int] = []
    forced: ForcedAnswer | None = None
    stage2 = cfg.scoring == "cot" and cfg.forced_answer
    if cfg.scoring == "letter" or stage2:
        role_tokenizers = {"target": tokenizer}
        role_tokenizers.update({r: load_tokenizer(getattr(cfg, r)) for r in roles_needed if r != "target"})
    if cfg.scoring == "letter":
        # " A".." D" 必须各是一个 token、且各角色分词器给出同一 id：在加载任何模型之前检查。
        try:
            letter_ids = letter_token_ids(role_tokenizers)
        except ValueError as exc:
            raise ModelLoadError(f"--scoring letter cannot be used: {exc}") from None
    if stage2:
        # 第二阶段：cue 之后 "(" 后的 "A".."D" 必须各是一个 token、各角色 id 相同——同样在加载任何模型之前检查。
        try:
            forced = forced_answer_ids(role_tokenizers)
        except ValueError as exc:
            raise ModelLoadError(f"stage 2 of answer extraction cannot be used: {exc}. "
                                 "Run with --no-forced-answer to read answers from the text only.") from None
    data = check_bounds(cfg, data, tokenizer, forced, device)
    fingerprints = pin(tokenizer) if pin is not None else None
    models, vocab_size = load_models(cfg, tokenizer, device)
    prompts = cfg.role_system_prompts
    if "steered" in cfg.modes and cfg.expert == cfg.base and prompts["expert"] == prompts["base"] and dist.main:
        print("[main] warning: the expert and the base are the same model with the same system prompt, so "
              "z_expert − z_base ≡ 0 and steering equals the baseline.", file=sys.stderr)
    return data, Loaded(device, tokenizer, models, vocab_size, end_token_ids(tokenizer, list(models.values())),
                        letter_ids, forced, fingerprints)


def record_start(cfg: Config, run_dir: str, stored: dict[str, Any] | None, data: Data, loaded: Loaded,
                 names: list[str], existing: list[Record], dist: Dist) -> None:
    """新运行先写 fingerprints.json（配置副本、题目与输入的指纹），再写 config.json（配置、数据指纹、模型、环境）：
    有 config.json 的目录就一定有 fingerprints.json。续跑在 events.jsonl 里记一条 "resumed"。"""
    if not dist.main:
        return
    if stored is not None:
        log_event(run_dir, {"event": "resumed", "already_recorded": len(existing), "processes": dist.world,
                            "git_commit": environment()["git_commit"], "argv": sys.argv})
        return
    write_fingerprints(run_dir, run_fingerprints(cfg, data.fingerprint, loaded.fingerprints or {}))
    write_json(os.path.join(run_dir, CONFIG_FILE), {
        "config": cfg.to_dict(), "data_source": data.source, "num_questions": len(data.questions),
        "questions_sha256": data.fingerprint, "skipped_invalid_rows": data.skipped, "arms": names,
        "models": {role: {"spec": getattr(cfg, role), "resolved": local_path(getattr(cfg, role)),
                          "dtype": str(m.dtype)} for role, m in loaded.models.items()},
        "device": str(loaded.device), "vocab_size": loaded.vocab_size, "end_token_ids": loaded.end_ids,
        "pad_token_id": loaded.tokenizer.pad_token_id, "role_system_prompts": cfg.role_system_prompts,
        "letter_token_ids": loaded.letter_ids or None,
        "forced_answer": {"cue": FORCED_ANSWER_CUE, "cue_ids": list(loaded.forced.cue_ids),
                          "letter_ids": list(loaded.forced.letter_ids)} if loaded.forced else None,
        "environment": environment(),
        "processes": dist.world, "started": _dt.datetime.now().isoformat(timespec="seconds")})


def score_by_letters(cfg: Config, run_dir: str, arms: list[ArmSpec], data: Data, loaded: Loaded,
                     dist: Dist) -> tuple[list[Record] | None, dict[str, dict[str, Any]]]:
    """--scoring letter：每题每模型一次前向（lm-eval medqa_4options 的提示、不加 BOS，与 lm-eval 对因果模型的默认一致），
    按批分给各进程；rank 0 拼回、给每个臂写记录，其他 rank 返回 (None, {})。"""
    tok, questions = loaded.tokenizer, data.questions
    prompt_ids = {role: [tok.encode(letter_role_text(q, cfg, role)) for q in questions]
                  for role in loaded.models}
    start = time.perf_counter()
    mine = score_letters_shard(loaded.models, prompt_ids, loaded.letter_ids, vocab_size=loaded.vocab_size,
                               batch_size=cfg.batch_size, metric=cfg.distance, shard=(dist.rank, dist.world),
                               progress=dist.main)
    parts = dist.gather(mine)
    if parts is None:
        return None, {}
    scores = merge_letter_scores([p for rank_parts in parts for p in rank_parts], len(questions),
                                 list(loaded.models), len(LETTERS))
    records = letter_records(arms, scores, questions)
    names = [a.name for a in arms]
    rewrite_sorted(os.path.join(run_dir, PREDICTIONS_FILE), records, names)
    seconds = round(time.perf_counter() - start, 3)
    return records, {name: {"seconds": seconds, "decoded_tokens": 0, "tokens_per_second": None,
                            "note": "one scoring pass serves every arm; seconds is the time of the whole pass"} for name in names}


def merge_timing(per_rank: list[dict[str, dict[str, Any]]], names: list[str], world: int) -> dict[str, dict[str, Any]]:
    """多进程：墙钟取最慢的进程，token 数相加（tokens/s 因而是整个运行的吞吐）。"""
    timing = {name: {"seconds": max(t[name]["seconds"] for t in per_rank),
                     "decoded_tokens": sum(t[name]["decoded_tokens"] for t in per_rank),
                     **({"decode_path": per_rank[0][name]["decode_path"]}
                        if "decode_path" in per_rank[0][name] else {})} for name in names}
    for t in timing.values():
        t["tokens_per_second"] = t["decoded_tokens"] / t["seconds"] if t["seconds"] > 0 else None
        if world > 1:
            t["processes"] = world
    return timing


def total_timing(logged: list[dict[str, Any]], session: dict[str, dict[str, Any]],
                 names: list[str]) -> dict[str, dict[str, Any]]:
    """各臂在全部会话上的计时之和（timing.jsonl）：秒数取 rank 0 各会话之和，token 数取全部进程、全部会话之和，
    sessions = 有解码的会话数。没有任何记录的臂（旧版本写的运行目录）秒数与吞吐为 None，而不是一个像测量值的 0。"""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        lines = [t for t in logged if t["mode"] == name]
        rank0 = [t for t in lines if t["rank"] == 0]
        seconds = round(sum(t["seconds"] for t in rank0), 3) if rank0 else None
        tokens = sum(t["decoded_tokens"] for t in lines)
        out[name] = {**session[name], "seconds": seconds, "decoded_tokens": tokens,
                     "tokens_per_second": tokens / seconds if seconds else None, "sessions": len(rank0)}
    return out


def log_nf4_kernels(cfg: Config, run_dir: str, mode: str, rank: int) -> None:
    """本进程到这个臂为止用到的 NF4 kernel 选择（形状 → 配置、split-K、µs，来自缓存的带 cached）记进 events.jsonl：
    运行目录自己说明数字是用哪组 kernel 算的（不同的 kernel 舍入不同）。没有 NF4 叠加前向时什么也不记。"""
    from fast.nf4 import tuned_report

    kernels = tuned_report()
    if kernels:
        log_event(run_dir, {"event": "nf4_kernels", "mode": mode, "rank": rank, "cache": cfg.nf4_tuning_cache,
                            "kernels": kernels})


def decode_arms(cfg: Config, run_dir: str, arms: list[ArmSpec], data: Data, loaded: Loaded, existing: list[Record],
                dist: Dist) -> tuple[list[Record] | None, dict[str, dict[str, Any]]]:
    """CoT：每个臂生成全部题目（run_arm），每批的记录一次写入并 fsync；Ctrl-C 在当前批写完后停下（Interrupted）。
    rank 0 合并各进程的记录并返回全部记录（只从持久文件读）与计时，其他 rank 返回 (None, {})。"""
    tok, questions = loaded.tokenizer, data.questions
    role_prompts = cot_prompts(cfg, questions, tok, loaded.models)
    compile_step = compiles_step(cfg, loaded.device)
    sink_path = os.path.join(run_dir, PREDICTIONS_FILE if dist.world == 1 else rank_file(dist.rank))
    timing: dict[str, dict[str, Any]] = {}
    speculation = Speculation(cfg.speculate, cfg.draft, cfg.speculative_sampling, cfg.min_acceptance) \
        if cfg.speculate > 0 else None
    if cfg.fast:  # NF4 kernel 的选择从缓存文件来、新计时的写回去（fast.nf4 的 TUNING_CACHE_NOTE）
        from fast.nf4 import use_tuning_cache  # 快速引擎只在需要时导入（与 evaluator 相同）

        use_tuning_cache(cfg.nf4_tuning_cache)
    # 追加模式：每批的记录一次写入并 fsync（append_jsonl）；被杀死时最多丢掉正在解码的那一批。
    with open_append(sink_path) as sink, stop_on_signals() as stop:
        _fsync_dir(run_dir)  # 记录文件的目录项也要落盘
        for arm in arms:
            done = {r["index"] for r in existing if r["mode"] == arm.name}
            if stop.signum is not None and len(done) < len(questions):
                raise Interrupted(stop.signum)
            result = run_arm(arm.name, questions, role_prompts, loaded.models, tok, vocab_size=loaded.vocab_size,
                             batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, end_ids=loaded.end_ids,
                             steering=arm.steering, fast=cfg.fast, compile=compile_step, done=done,
                             on_batch=lambda recs: append_jsonl(sink, recs),
                             on_event=lambda event: log_event(run_dir, {**event, "rank": dist.rank}),
                             should_stop=stop, roles=arm.roles, sampling=arm.sampling,
                             shard=(dist.rank, dist.world), progress=dist.main, forced=loaded.forced,
                             speculation=speculation)
            timing[arm.name] = arm_timing(result)
            if cfg.fast:
                log_nf4_kernels(cfg, run_dir, arm.name, dist.rank)
            if result.records:  # 本次会话确实解码了这个臂：记下计时（续跑后按会话求和）
                log_timing(run_dir, {"mode": arm.name, "rank": dist.rank, "seconds": timing[arm.name]["seconds"],
                                     "decoded_tokens": timing[arm.name]["decoded_tokens"]})
            if result.interrupted:
                raise Interrupted(stop.signum or signal.SIGINT)
    per_rank = dist.gather(timing)
    if per_rank is None:
        return None, {}
    names = [a.name for a in arms]
    # 指标只从持久的记录算（不从内存）：续跑与不中断的运行因此得到同一份 metrics。
    return consolidate(run_dir, names, data.indices, record_rules(cfg, arms, data, tok)), total_timing(read_timing(run_dir),
                                                                   merge_timing(per_rank, names, dist.world), names)


def compute_metrics(cfg: Config, run_dir: str, arms: list[ArmSpec], data: Data, records: list[Record],
                    timing: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """从全部记录算 metrics：每个臂的指标、steered vs baseline 的配对比较、多数投票、扫参表（写 sweep.json/csv）与图。"""
    names = [a.name for a in arms]
    by_arm = {name: sorted((r for r in records if r["mode"] == name), key=lambda r: r["index"]) for name in names}
    missing = {name: len(data.questions) - len(rs) for name, rs in by_arm.items() if len(rs) != len(data.questions)}
    if missing:  # 按构造不可能发生：每批交出缺的记录、重复会被 read_records 拒绝
        raise RuntimeError(f"internal error: {os.path.join(run_dir, PREDICTIONS_FILE)} is missing records {missing}")
    events = read_events(run_dir)
    metrics: dict[str, Any] = {"scoring": cfg.scoring, "arm_order": names}
    for name, rs in by_arm.items():
        metrics[name] = arm_metrics(name, rs, timing=timing[name],
                                    oom_backoffs=sum(e.get("event") == "oom_backoff" and e.get("mode") == name
                                                     for e in events),
                                    speculation={"k": cfg.speculate, "draft": cfg.draft})
    if "baseline" in by_arm and "steered" in by_arm:
        metrics["comparison"] = compare_arms(by_arm["baseline"], by_arm["steered"])
    majority, rows = arm_tables(arms, by_arm, data.questions, cfg, metrics)
    if majority:
        metrics["majority"] = majority
    if rows:
        metrics["sweep"] = rows
        write_sweep(rows, run_dir)
    metrics["plots"] = make_plots(cfg, arms, by_arm, rows, data.trace_index, run_dir)
    metrics["skipped_invalid_rows"] = len(data.skipped)
    return metrics


def run(cfg: Config, run_dir: str, stored: dict[str, Any] | None = None, dist: Dist = Dist()) -> dict[str, Any] | None:
    """一次运行的全部阶段；rank 0 返回 metrics（也写入运行目录），其他进程返回 None。所有“快失败”的检查都排在耗时工作之前。

    stored 为 None 是新运行；否则是 --resume：stored 为保存的 config.json，先核对数据，再跳过已记录的题。
    """
    set_seed(cfg.seed)
    check_before_loading(cfg, dist)
    data = load_data(cfg, dist)
    arms = plan_arms(cfg)
    names = [a.name for a in arms]
    existing, pins = resume_records(cfg, run_dir, stored, data, arms, dist)

    def pin(tok: Any) -> dict[str, Any]:
        # 分词器加载之后、权重之前：先核对输入的指纹（分词器变了就指名它），再把已保存的记录按 output 与 output_ids
        # 核对一遍（文本就是 id 的解码、id 在词表内；文件:行号）。
        fingerprints = pin_inputs(cfg, run_dir, pins, tok, dist.main)
        if existing:
            collect_records(run_dir, names, data.indices, record_rules(cfg, arms, data, tok))
        return fingerprints

    data, loaded = load_roles(cfg, dist, data, pin)
    check_stage2(cfg, run_dir, arms, data, loaded, existing, dist)
    record_start(cfg, run_dir, stored, data, loaded, names, existing, dist)
    if cfg.scoring == "letter":
        records, timing = score_by_letters(cfg, run_dir, arms, data, loaded, dist)
    else:
        records, timing = decode_arms(cfg, run_dir, arms, data, loaded, existing, dist)
    if records is None:
        return None
    metrics = compute_metrics(cfg, run_dir, arms, data, records, timing)
    write_json(os.path.join(run_dir, METRICS_FILE), metrics)
    print_report(metrics, run_dir)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """命令行入口。已知的错误打印一条可操作的消息、不打印 traceback，返回：
    2 = 配置、数据、模型、运行目录的错误（都在加载模型或解码之前；含目录正被另一个活着的进程使用）；
    3 = 显存不足（批大小 1 仍不够）；4 = 写运行目录失败（磁盘满、I/O 错误）；128 + signum = 被 SIGINT（Ctrl-C，130）、
    SIGTERM（143）或 SIGHUP（129）停下。解码开始之后停下的都打印可直接复制的 --resume 命令：已写入的记录不会丢。

    多进程（accelerate launch）：rank 0 先取运行目录的锁（run_folder.lock_run_dir）、再校验目录，然后广播给其他进程——
    其他 rank 不取锁，只在 rank 0 持有锁之后才得知目录；错误消息只由 rank 0 打印。
    """
    run_dir: str | None = None
    lock: RunLock | None = None
    dist = init_dist()

    def resumable() -> bool:
        return run_dir is not None and os.path.isfile(os.path.join(run_dir, CONFIG_FILE))

    def say(text: str) -> None:
        if dist.main:
            print(text, file=sys.stderr, flush=True)

    # 解码之外，SIGTERM / SIGHUP 与默认的 Ctrl-C 一样立即停下（解码期间由 stop_on_signals 接管：写完当前批再停）。
    previous = {s: signal.signal(s, raise_stop_now) for s in (signal.SIGTERM, signal.SIGHUP)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        cfg, explicit = parse_args(argv)
        opened: tuple[Config, str, dict[str, Any] | None] | None = None
        problem: str | None = None
        if dist.main:
            try:
                cfg, lock = lock_run_dir(cfg)  # 在加载任何东西之前；目录正被使用则在这里拒绝
                opened = open_run_dir(cfg, explicit)  # 在锁下校验
            except ConfigError as exc:
                problem = str(exc)
        opened, problem = dist.broadcast((opened, problem))
        if problem is not None or opened is None:
            raise ConfigError(problem or "internal error: no run folder received from rank 0")
        cfg, run_dir, stored = opened
        run(cfg, run_dir, stored, dist)
    except (ConfigError, DataError, ModelLoadError) as exc:
        say(f"error: {exc}")
        # 运行在写入任何东西之前就被拒绝：删掉本次新建的锁文件与空目录，免得留下一堆空的 runs/<时间戳>/。
        if lock is not None:
            release_lock(lock, undo=True)
        return EXIT_ERROR
    except (RunFolderError, OSError) as exc:
        # 写运行目录失败（RunFolderError 已是一行消息），或别处的磁盘满（ENOSPC / EDQUOT）；其他 OSError 不是已知错误，照常抛出。
        if not isinstance(exc, RunFolderError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        what = str(exc) if isinstance(exc, RunFolderError) else f"{exc.strerror} ({exc.filename or 'no file name given'})"
        hint = (f"Every finished question is saved. Free some space (or fix the cause above), then continue: {resume_command(run_dir)}"
                if resumable() and run_dir else "Nothing had been recorded yet; free some space, then start again.")
        # 前导换行：错误可能发生在进度条画到一半时（进度条还没关闭），消息要独占一行。
        print(f"\nerror: {what}. {hint}", file=sys.stderr, flush=True)
        return EXIT_WRITE
    except RunError as exc:
        print(f"error: {exc}\nEvery finished question is saved. To continue: {resume_command(run_dir or '')}", file=sys.stderr)
        return EXIT_OOM
    except torch.OutOfMemoryError:
        hint = f"\nEvery finished question is saved. To continue: {resume_command(run_dir)}" if resumable() and run_dir else ""
        print("error: out of GPU memory. Lower --batch-size or --max-new-tokens, or use --load-in-4bit." + hint,
              file=sys.stderr)
        return EXIT_OOM
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        how = "Interrupted" if signum == signal.SIGINT else f"Interrupted by {signal.Signals(signum).name}"
        if resumable() and run_dir:
            say(f"{how}. To continue: {resume_command(run_dir)}")
        else:
            say(f"{how} (decoding had not started; there is nothing to resume).")
            if lock is not None:
                release_lock(lock, undo=True)  # 还没写任何东西：删掉本次新建的锁文件与空目录
        return 128 + signum
    finally:
        if lock is not None:
            release_lock(lock)
        for s, old in previous.items():
            signal.signal(s, old)
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
