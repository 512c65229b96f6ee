"""把真实形状的随机权重模型存成三个本地目录（target / expert / base），供 main.py 在没有网络的 GPU 机器上端到端运行。

为什么需要：真实模型要从 hub 下载，而 GPU 机器不能联网；速度与流程（多进程分片、汇总）与权重取值无关。
形状取自 bench.llama_config（8B：hidden 4096、32 层、词表 128256；1B：hidden 2048、16 层、共享嵌入）。
分词器从 --tokenizer 复制（例如 SmolLM2 的分词器，49,152 个 token）：lm_head 的 128,256 行 ≥ 分词器大小，
model_loader.check_vocab 接受，融合只在分词器的词表上做。随机模型的文本没有意义，准确率也没有意义。

    python benchmarks/make_random_models.py --out /tmp/rm --tokenizer .gpu/tokenizer
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import random_model  # noqa: E402


def main() -> int:
    """按角色构造（GPU 上直接以 bf16 构造，8B 不经过 CPU）、存盘、释放；再把分词器文件复制进每个目录。"""
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", required=True, help="含 tokenizer.json / tokenizer_config.json 的目录")
    p.add_argument("--preset", default="real", choices=("real", "tiny"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    files = [f for f in os.listdir(args.tokenizer) if f.startswith(("tokenizer", "special_tokens", "vocab", "merges",
                                                                    "chat_template"))]
    if not any(f == "tokenizer.json" for f in files):
        raise SystemExit(f"{args.tokenizer} 里没有 tokenizer.json")
    for role, kind, seed in (("target", "8b", 0), ("expert", "1b", 1), ("base", "1b", 2)):
        folder = os.path.join(args.out, role)
        model = random_model(kind, args.preset, torch.bfloat16, args.device, seed)
        model.save_pretrained(folder)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for f in files:
            shutil.copy(os.path.join(args.tokenizer, f), folder)
        print(f"{role}: {kind} random weights (seed {seed}) + tokenizer → {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
