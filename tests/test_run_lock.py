"""issue 15：运行目录只属于一个活着的进程（run_folder.lock_run_dir）。CPU、无网络、不加载任何模型。

- 另一个进程（小的 python 子进程，用同一个函数取锁）持有锁时：lock_run_dir、同一 --output-dir 的新运行、
  对它的 --resume 都被拒绝（退出码 2），消息给出持有者的 pid；SIGKILL 之后锁由操作系统释放，可以再取。
- 缺省的 runs/<时间戳>/ 排他新建：同一秒的两个运行不共用目录，已有的目录（哪怕是空的）不会被悄悄沿用。
- 多进程：只有 rank 0 取锁，其他 rank 不取（否则会被自己的 rank 0 拒绝）。
"""
from __future__ import annotations

import datetime as _dt
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import main
import run_folder
from config import ConfigError, parse_args

REPO = Path(__file__).resolve().parent.parent

HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
import config, run_folder
cfg, _ = config.parse_args(["--demo", "--output-dir", {run_dir!r}])
cfg, lock = run_folder.lock_run_dir(cfg)
print("locked", flush=True)
time.sleep(600)
"""


def _no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """任何加载分词器/模型的调用都让测试失败：证明拒绝发生在加载之前。"""
    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("不应加载任何分词器或模型")

    monkeypatch.setattr(main, "load_tokenizer", must_not_load)
    monkeypatch.setattr(main, "load_models", must_not_load)


def _hold_lock(run_dir: Path) -> subprocess.Popen[str]:
    """子进程用 lock_run_dir 取得 run_dir 的锁后一直睡着；返回时锁已被它持有。"""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO), run_dir=str(run_dir))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        pytest.fail(f"持锁的子进程没有取到锁：{line}{proc.communicate()[1]}")
    return proc


def test_live_holder_refuses_others_and_sigkill_frees_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        # 同一个函数：被拒绝，消息给出持有者的 pid 与主机。
        cfg, _ = parse_args(["--demo", "--output-dir", str(run_dir)])
        with pytest.raises(ConfigError) as info:
            run_folder.lock_run_dir(cfg)
        assert f"pid {holder.pid} on host" in str(info.value) and "in use by another live process" in str(info.value)
        # 通过 main：同一 --output-dir 的第二个运行、以及对它的 --resume，都在加载任何模型之前以退出码 2 被拒绝。
        _no_model_loading(monkeypatch)
        for argv in (["--demo", "--output-dir", str(run_dir)], ["--resume", str(run_dir)]):
            code = main.main(argv)
            text = capsys.readouterr().err
            assert code == 2, text
            assert f"pid {holder.pid}" in text and "Traceback" not in text
        assert os.listdir(run_dir) == [run_folder.LOCK_FILE]  # 被拒绝的运行什么都没写、也没删
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    # kill -9 不留下陈旧的锁：操作系统已释放，可以立即再取；锁文件里换成本进程的信息。
    cfg, lock = run_folder.lock_run_dir(cfg)
    try:
        assert f"pid {os.getpid()} on host" in run_folder.lock_holder(lock.fd)
    finally:
        run_folder.release_lock(lock)


def test_default_folder_names_never_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """同一秒启动的运行：runs/<时间戳>/ 已存在（这里是空的，旧代码会悄悄沿用它）→ 加 -2、-3 后缀，排他新建。"""
    fixed = _dt.datetime(2026, 12, 1, 12, 0, 0)
    monkeypatch.setattr(run_folder, "_dt", SimpleNamespace(datetime=SimpleNamespace(now=lambda: fixed)))
    monkeypatch.chdir(tmp_path)
    taken = tmp_path / "runs" / "20261201-120000"
    taken.mkdir(parents=True)
    cfg, _ = parse_args(["--demo"])
    first_cfg, first = run_folder.lock_run_dir(cfg)
    second_cfg, second = run_folder.lock_run_dir(cfg)  # 第一个仍持有锁
    try:
        assert first.run_dir == os.path.join("runs", "20261201-120000-2") == first_cfg.output_dir
        assert second.run_dir == os.path.join("runs", "20261201-120000-3") == second_cfg.output_dir
        assert os.listdir(taken) == []  # 已有的目录没被用
        assert first.created_dir and second.created_dir
    finally:
        run_folder.release_lock(first)
        run_folder.release_lock(second)


def test_refused_new_run_leaves_no_lock_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """不是本工具的、非空的目录：拒绝，且拒绝之后目录与之前完全相同（取锁时新建的 .lock 被删掉）。"""
    _no_model_loading(monkeypatch)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main.main(["--demo", "--output-dir", str(other)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert os.listdir(other) == ["notes.txt"]


def test_lock_file_must_be_a_regular_file(tmp_path: Path) -> None:
    """.lock 是指向别处的符号链接：拒绝，不跟随、不写它指向的文件。"""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (run_dir / run_folder.LOCK_FILE).symlink_to(outside)
    cfg, _ = parse_args(["--demo", "--output-dir", str(run_dir)])
    with pytest.raises(ConfigError, match="is a symbolic link, not a regular file"):
        run_folder.lock_run_dir(cfg)
    assert outside.read_text() == "keep me"


def test_other_ranks_do_not_take_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """多进程：rank 0（这里是本进程先取的锁）持有锁；rank 1 不取锁、从广播得知目录，照常运行，不被 rank 0 的锁拒绝。"""
    run_dir = tmp_path / "run"
    cfg, rank0 = run_folder.lock_run_dir(parse_args(["--demo", "--output-dir", str(run_dir)])[0])

    class Rank1(run_folder.Dist):
        def broadcast(self, obj: Any) -> Any:
            return (cfg, str(run_dir), None), None  # rank 0 广播的（目录, 没有错误）

    def must_not_lock(*args: Any) -> Any:
        raise AssertionError("rank 1 不应取锁")

    ran: list[str] = []
    monkeypatch.setattr(main, "init_dist", lambda: Rank1(1, 2, 1))
    monkeypatch.setattr(main, "lock_run_dir", must_not_lock)
    monkeypatch.setattr(main, "run", lambda cfg, where, stored, dist: ran.append(where))
    try:
        assert main.main(["--demo", "--output-dir", str(run_dir)]) == 0
    finally:
        run_folder.release_lock(rank0)
    assert ran == [str(run_dir)]
