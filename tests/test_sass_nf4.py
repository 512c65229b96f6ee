"""benchmarks/sass_nf4.py：NF4 kernel 真的按 GPU 的路子编译一遍（sm_90，Triton 自带的 ptxas，不用 GPU）。

为什么要这个测试：其余 NF4 测试在 Triton 解释器里跑 kernel（数值对），但解释器不编译——kernel 能否编译给 GPU、
编出来的主循环是不是预期的样子，原来只有上 GPU 才知道。这里在子进程里编译（TRITON_INTERPRET 必须在导入 triton
之前去掉；本测试进程里 conftest 已经设成 1），检查：
- 每种方式都编译得出来，有主循环；
- 字节是向量读的（主循环里没有 1 字节的 LDG.E.U8：地址对齐的特化丢了时就会变成那样，指令多一倍）；
- gemvG / dotG 的查表走共享内存（LDS），不再是每个半字节一条经 L1 的 LDG，每个权重的指令比 gemvR / dotT 少；
- gemvW（按 int32 字读、线程内取半字节、按字累加）每个权重的指令比 gemvG 少两条以上，主循环没有 warp shuffle；
- 它们的流水线候选（num_stages > 1）真的用 cp.async 预取，在途的字节比不流水线时多。
速度不在这里看（GPU 上的 micro_nf4.py 才算数）。
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _toolchain() -> bool:
    """有 triton、且它自带 ptxas / nvdisasm / cuobjdump（pip 的 triton 包带着）。"""
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    bin_dir = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    return all((bin_dir / tool).exists() for tool in ("ptxas", "nvdisasm", "cuobjdump"))


@pytest.mark.skipif(not _toolchain(), reason="needs triton with its bundled ptxas / nvdisasm / cuobjdump")
def test_nf4_kernels_compile_for_sm90_and_look_as_intended(tmp_path: Path) -> None:
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_nf4.py"), "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    every = json.loads(out.read_text())
    rows = {r["method"]: r for r in every if r["config"][4] == 1}  # 各方式的默认配置（不流水线）
    assert set(rows) == {"gemvR", "dotT", "gemvG", "dotG", "gemvW", "gemvB", "dotA", "dotB"}
    for r in every:
        assert r["loop_instructions"] > 0 and r["registers"] > 0 and r["programs_per_sm"] >= 1
        assert "LDG.E.U8" not in r["loads"], r  # 字节要向量读
    pipelined = [r for r in every if r["config"][4] > 1]
    assert pipelined and all(r["method"] in ("gemvG", "dotG", "gemvW", "gemvB", "dotA", "dotB") for r in pipelined)
    for r in pipelined:  # tl.range(num_stages > 1)：字节经 cp.async（LDGSTS）预取进共享内存，在途的字节多几步
        assert any(op.startswith("LDGSTS") for op in r["loads"]), r
        assert r["weight_bytes_in_flight_per_sm"] > rows[r["method"]]["weight_bytes_in_flight_per_sm"]
    for fast, slow in (("gemvG", "gemvR"), ("dotG", "dotT")):
        weights = rows[fast]["config"][1] * rows[fast]["config"][2] * 64 / (32 * rows[fast]["config"][3])
        assert rows[fast]["loads"].get("LDS", 0) >= weights  # 每个半字节一次共享内存查表
        assert rows[slow]["loads"].get("LDG.E", 0) >= weights  # 旧方式：每个半字节一条 L1 的 LDG
        assert rows[fast]["instructions_per_weight"] < rows[slow]["instructions_per_weight"]
    # gemvW（WORDS_NOTE）：每个半字节仍是一次共享内存查表，但没有逐字节的 PRMT、主循环里没有 warp shuffle，
    # 每个权重的指令比 gemvG 少两条以上
    w_row = rows["gemvW"]
    weights = w_row["config"][1] * w_row["config"][2] * 64 / (32 * w_row["config"][3])
    assert w_row["loads"].get("LDS", 0) >= weights and w_row["by_family"].get("warp shuffle", 0) == 0
    assert w_row["instructions_per_weight"] < rows["gemvG"]["instructions_per_weight"] - 2
    # dotA（SCALE_NOTE）：同一配置下每个权重少一次乘法与大部分的转换，指令少 5% 以上（4fb66e2 之后：不流水线
    # 6.72 → 6.03，流水线 (16, 128) 8.62 → 7.11）；查表仍是每个半字节一次共享内存读（bf16 的表：LDS.U16）
    for r in every:
        if r["method"] == "dotA":
            twin = next(g for g in every if g["method"] == "dotG" and g["config"] == r["config"])
            assert r["instructions_per_weight"] < 0.95 * twin["instructions_per_weight"], (r, twin)
            weights = r["config"][1] * r["config"][2] * 64 / (32 * r["config"][3])
            assert r["loads"].get("LDS.U16", 0) >= weights and r["by_family"].get("fp32 math", 0) < weights / 2
    # dotB（PAIR_NOTE）：每个字节一次 32 位的共享内存查表（没有 LDS.U16，查表次数是 dotA 的一半），同一配置下指令
    # 比 dotA 少 25% 以上（Triton 3.7：不流水线 6.03 → 3.44，(16, 128, 1, 4, 3) 7.11 → 4.06，(16, 64, 1, 4, 3) 8.59 → 5.38）
    # gemvB：每个字节一次 64 位的查表（LDS.64，没有 32 位的 LDS 查表），指令比 gemvW 少 15% 以上（5.31 → 4.22）
    for r in (r for r in every if r["method"] == "gemvB"):
        twin = next(a for a in every if a["method"] == "gemvW" and a["config"] == r["config"])
        assert r["instructions_per_weight"] < 0.85 * twin["instructions_per_weight"], (r, twin)
        weights = r["config"][1] * r["config"][2] * 64 / (32 * r["config"][3])  # 每个线程每次迭代的权重（半字节）
        assert r["loads"].get("LDS.64", 0) >= weights / 2 > 0 and twin["loads"].get("LDS", 0) >= weights, (r, twin)
    pairs = [r for r in every if r["method"] == "dotB"]
    assert len(pairs) == 3
    for r in pairs:
        twin = next(a for a in every if a["method"] == "dotA" and a["config"] == r["config"])
        assert r["instructions_per_weight"] < 0.75 * twin["instructions_per_weight"], (r, twin)
        assert "LDS.U16" not in r["loads"] and r["loads"].get("LDS", 0) >= twin["loads"]["LDS.U16"] // 2, (r, twin)
