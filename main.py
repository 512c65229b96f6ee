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
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from config import FORCED_ANSWER_CUE, LETTERS, ROLES, Config, ConfigError, parse_args
from data_loader import DataError, Question, encode_prompts, format_prompt, load_questions
from evaluator import RunError, arm_timing, run_arm, score_letters_shard
from model_loader import (ModelLoadError, context_limit, end_token_ids, load_models, load_tokenizer, local_path,
                          resolve_device, resolve_source)
from reporting import arm_tables, make_plots, print_report, write_sweep
from run_folder import (CONFIG_FILE, METRICS_FILE, PREDICTIONS_FILE, Dist, Interrupted, RunFolderError, RunLock, _fsync_dir,
                        append_jsonl, consolidate, environment, init_dist, lock_run_dir, log_event, log_timing, open_append,
                        open_run_dir, questions_sha256, raise_stop_now, rank_file, read_events, read_records, read_timing,
                        release_lock, resume_command, rewrite_sorted, stop_on_signals, write_json)
from sampling import Sampling
from scoring import (ArmSpec, ForcedAnswer, Record, forced_answer_ids, letter_records, letter_role_text,
                     letter_token_ids, merge_letter_scores)
from speculative import Speculation
from stats import arm_metrics, compare_arms
from steering_utils import SteeringParams, steering_params

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


def resume_records(cfg: Config, run_dir: str, stored: dict[str, Any] | None, data: Data, names: list[str],
                   dist: Dist) -> list[Record]:
    """--resume：先核对题目与上次相同，再读出已记录的记录（CoT 才有可续的进度）；新运行返回 []。"""
    if stored is None:
        return []
    if stored.get("questions_sha256") != data.fingerprint:
        raise DataError(f"{os.path.join(run_dir, CONFIG_FILE)}: the questions read now differ from the last session's (then from "
                        f"{stored.get('data_source')}, now from {data.source}). A resume needs the same data; "
                        "if the data changed, start again with a new --output-dir.")
    if cfg.scoring != "cot":
        return []
    saved_cue = (stored.get("forced_answer") or {}).get("cue", FORCED_ANSWER_CUE)
    if cfg.forced_answer and saved_cue != FORCED_ANSWER_CUE:
        # 第二阶段的字母取决于 cue：换了 cue 的续跑会把两种规则的记录混在一起。
        raise ConfigError(f"{os.path.join(run_dir, CONFIG_FILE)}: this run used the answer cue {saved_cue!r}, but "
                          f"config.FORCED_ANSWER_CUE is now {FORCED_ANSWER_CUE!r}; resume with the same cue, or "
                          "start a new run with a new --output-dir.")
    # rank 0 先把上次各进程的分片合并进 predictions.jsonl（截掉被杀时写了一半的行），其他进程再读同一份。
    existing = consolidate(run_dir, names, data.indices) if dist.main else []
    dist.barrier()
    if not dist.main:
        existing = read_records(os.path.join(run_dir, PREDICTIONS_FILE), names, data.indices)
    if dist.main:
        print(f"[main] resuming {run_dir}: {len(existing)}/{len(data.questions) * len(names)} records already written, skipping finished batches",
              flush=True)
    return existing


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


def check_context(cfg: Config, data: Data, tokenizer: Any, forced: ForcedAnswer | None) -> None:
    """上下文上界，在加载任何权重之前：每个角色最长的提示 + --max-new-tokens（CoT；第二阶段再加 cue 的长度）
    不能超过该角色模型配置里的 max_position_embeddings——否则解码到一半才会出错（或悄悄退化），
    --max-new-tokens 1000000000 这类值则会在分配缓存时耗尽内存。只读模型配置，不读权重。"""
    prompts = cfg.role_system_prompts
    extra = cfg.max_new_tokens + (len(forced.cue_ids) if forced is not None else 0) if cfg.scoring == "cot" else 1
    for role in cfg.model_roles:
        limit = context_limit(getattr(cfg, role))
        if limit is None:
            continue
        if cfg.scoring == "cot":
            texts = [format_prompt(q, tokenizer, prompts[role]) for q in data.questions]
            lengths = [len(ids) for ids in encode_prompts(texts, tokenizer)]
        else:
            lengths = [len(tokenizer.encode(letter_role_text(q, cfg, role))) for q in data.questions]
        j = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[j] + extra > limit:
            raise ConfigError(
                f"question {data.questions[j].index}: its {role} prompt has {lengths[j]} tokens, and with "
                f"{extra} more (--max-new-tokens{' plus the stage-2 cue' if forced is not None and cfg.scoring == 'cot' else ''})"
                f" it exceeds the {role} model's context of {limit} tokens ({getattr(cfg, role)}). "
                f"Lower --max-new-tokens to at most {max(0, limit - lengths[j] - (extra - cfg.max_new_tokens))}"
                " or leave out the longest questions.")


def load_roles(cfg: Config, dist: Dist, data: Data) -> Loaded:
    """分词器与模型。便宜的检查（来源写法、字母 token、上下文上界）都排在加载任何模型之前。"""
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
    check_context(cfg, data, tokenizer, forced)
    models, vocab_size = load_models(cfg, tokenizer, device)
    prompts = cfg.role_system_prompts
    if "steered" in cfg.modes and cfg.expert == cfg.base and prompts["expert"] == prompts["base"] and dist.main:
        print("[main] warning: the expert and the base are the same model with the same system prompt, so "
              "z_expert − z_base ≡ 0 and steering equals the baseline.", file=sys.stderr)
    return Loaded(device, tokenizer, models, vocab_size, end_token_ids(tokenizer, list(models.values())), letter_ids,
                  forced)


def record_start(cfg: Config, run_dir: str, stored: dict[str, Any] | None, data: Data, loaded: Loaded,
                 names: list[str], existing: list[Record], dist: Dist) -> None:
    """新运行写 config.json（配置、数据指纹、模型、环境）；续跑在 events.jsonl 里记一条 "resumed"。"""
    if not dist.main:
        return
    if stored is not None:
        log_event(run_dir, {"event": "resumed", "already_recorded": len(existing), "processes": dist.world,
                            "git_commit": environment()["git_commit"], "argv": sys.argv})
        return
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


def decode_arms(cfg: Config, run_dir: str, arms: list[ArmSpec], data: Data, loaded: Loaded, existing: list[Record],
                dist: Dist) -> tuple[list[Record] | None, dict[str, dict[str, Any]]]:
    """CoT：每个臂生成全部题目（run_arm），每批的记录一次写入并 fsync；Ctrl-C 在当前批写完后停下（Interrupted）。
    rank 0 合并各进程的记录并返回全部记录（只从持久文件读）与计时，其他 rank 返回 (None, {})。"""
    tok, questions = loaded.tokenizer, data.questions
    # 三个角色都用目标分词器渲染与编码（Llama-3.1 与 3.2 的模板会插入不同日期，必须统一）。
    prompts = cfg.role_system_prompts
    role_prompts = {role: encode_prompts([format_prompt(q, tok, prompts[role]) for q in questions], tok)
                    for role in loaded.models}
    compile_step = cfg.fast and (cfg.compile == "on" or (cfg.compile == "auto" and loaded.device.type == "cuda"))
    sink_path = os.path.join(run_dir, PREDICTIONS_FILE if dist.world == 1 else rank_file(dist.rank))
    timing: dict[str, dict[str, Any]] = {}
    speculation = Speculation(cfg.speculate, cfg.draft, cfg.speculative_sampling, cfg.min_acceptance) \
        if cfg.speculate > 0 else None
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
    return consolidate(run_dir, names, data.indices), total_timing(read_timing(run_dir),
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
    existing = resume_records(cfg, run_dir, stored, data, names, dist)
    loaded = load_roles(cfg, dist, data)
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
