"""NF4 kernel 的静态剖析（不用 GPU）：把 fast/nf4.py 每种方式的 kernel 按真实启动的特化编译成 sm_90（H100/H200）的
机器码——Triton 的 pip 包自带 ptxas 与 nvdisasm，CPU 机器上就能编——再数主循环（K 方向的循环体）里的指令。

为什么：GPU 时间很少（每个会话 30 分钟，NF4 解码器光启动就要两三分钟），kernel 的改动不能每次都上 GPU 量。
29a413f 的 ABLATE 实测说 M = 1 时时间主要花在查表上（不在读字节上），这种时候每个权重要执行多少条指令、哪些指令
（每个字节一条 1 字节的 load，还是 8 字节一条；查表是经 L1 的 LDG 还是共享内存的 LDS；有没有 warp shuffle 的归约）
就是有用的代理：它说明改动把工作减少了多少，但不说明快了多少——速度仍只由 GPU 上的 micro_nf4.py / bench.py 决定。
它也是一道检查：kernel 在解释器里对（CI 的测试），不等于能编译给 GPU；这里真的走一遍 GPU 的编译。

特化与真实启动相同：指针按 16 字节对齐，值为 16 的倍数的整数参数（N、K、各步长；M 为 16 的倍数时也是）标成
tt.divisibility = 16（Triton 的启动器对这些参数就是这样特化的；不标时编译器以为地址不对齐，字节只能一个一个读）。
每个权重的指令数 = 循环体的指令数 ÷ 每个线程每次迭代处理的权重数（BLOCK_N · NB · blocksize · ⌈M⌉块 / 线程数）。

用法：python benchmarks/sass_nf4.py [--methods gemvR,gemvG,gemvW,gemvB,dotT,dotG,dotA,dotB] [--m 16] [--no-extra] [--json FILE]
（不能在 TRITON_INTERPRET=1 下运行：解释器不编译；脚本自己把它从环境里去掉，必须在导入 triton 之前。）
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # 必须早于 triton 的导入：这里要真的编译

import argparse
import collections
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fast.nf4 import GEMV_METHODS, JIT_KERNELS, KERNELS, NF4_CONFIGS, load_nf4_kernels  # noqa: E402

# 每种方式默认剖析的配置：(BLOCK_M, BLOCK_N, NB, num_warps, num_stages)，取 NF4_CONFIGS 里 M = 1 与 M = 16 的默认值
DEFAULTS: dict[str, tuple[int, int, int, int, int]] = {
    "gemv": tuple(NF4_CONFIGS[0][2:7]),  # type: ignore[dict-item]
    "dot": tuple(NF4_CONFIGS[1][2:7]),  # type: ignore[dict-item]
}
# 默认之外也剖析的调优候选（gemvG / dotG / gemvW 的流水线配置，GATHER_NOTE）：(方式, M, 配置)
EXTRA: tuple[tuple[str, int, tuple[int, int, int, int, int]], ...] = (
    ("gemvG", 1, (1, 16, 8, 4, 4)), ("gemvG", 1, (1, 8, 8, 4, 4)), ("dotG", 16, (16, 64, 1, 4, 3)),
    ("gemvW", 1, (1, 16, 8, 4, 3)), ("gemvB", 1, (1, 16, 8, 4, 3)), ("dotG", 16, (16, 128, 1, 4, 3)), ("dotA", 16, (16, 128, 1, 4, 3)),
    ("dotA", 16, (16, 64, 1, 4, 3)), ("dotB", 16, (16, 128, 1, 4, 3)), ("dotB", 16, (16, 64, 1, 4, 3)))
SM90 = ("cuda", 90, 32)


def compile_method(method: str, m: int, blocksize: int = 64, config: tuple[int, int, int, int, int] | None = None,
                   dtype: str = "bf16") -> Any:
    """按真实启动的特化把方式 method 的 kernel 编译成 sm_90 机器码（CompiledKernel，asm 里有 ttgir / ptx / cubin）。
    m：激活行数（gemv 方式必须是 1）；config：(BLOCK_M, BLOCK_N, NB, num_warps, num_stages)，默认见 DEFAULTS；
    split-K 取 1。常量与 nf4_linear_op 的启动相同：gemvR / dotT 的循环不流水线（STAGES 1），其余方式用 num_stages。"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if method not in KERNELS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(KERNELS)}")
    gemv = method in GEMV_METHODS
    if gemv and m != 1:
        raise ValueError(f"method {method!r} handles M = 1 only, got M = {m}")
    load_nf4_kernels()
    block_m, block_n, nb, warps, stages = config or DEFAULTS["gemv" if gemv else "dot"]
    # SPLIT_K 是运行时参数（SPLIT_K_NOTE）；段数为 1 时启动器把它特化成常量 1，这里照样给 1
    constexprs: dict[str, Any] = {"BLOCKSIZE": blocksize, "BLOCK_N": block_n, "NB": nb, "SPLIT_K": 1, "FIX": False,
                                  "ABLATE": 0, "STAGES": 1 if method in ("gemvR", "dotT") else stages}
    if method in ("gemvW", "gemvB"):  # nf4_gemv_w（总是 tl.gather 查表，WORDS_NOTE；gemvB 按字节成对查表，PAIR_NOTE）
        fn = JIT_KERNELS["nf4_gemv_w"]
        constexprs["PAIR"] = method == "gemvB"
    else:  # nf4_gemv / nf4_dot_t：GATHER 区分 L1 查表与 tl.gather（GATHER_NOTE）
        fn = JIT_KERNELS["nf4_gemv" if gemv else "nf4_dot_t"]
        constexprs["GATHER"] = KERNELS[method] in (2, 3, 6, 7)
        if not gemv:  # dotA / dotB：码值作操作数、块尺度乘在 tl.dot 之后（SCALE_NOTE）；dotB 按字节成对查表（PAIR_NOTE）
            constexprs["SCALE_AFTER"] = method in ("dotA", "dotB")
            constexprs["PAIR"] = method == "dotB"
    if gemv:
        ints = ["N", "K", "x_s", "q_s", "a_s", "o_s"]
    else:
        ints = ["M", "N", "K", "x_s", "x_m", "q_s", "a_s", "o_s", "o_m"]
        constexprs.update(BLOCK_M=block_m, IEEE=dtype == "fp32")
    pointers = {"X": f"*{dtype}", "Q": "*u8", "A": "*fp32", "CODE": "*fp32", "OUT": f"*{dtype}", "PART": "*fp32"}
    signature = {**pointers, **{name: "i32" for name in ints}}
    signature.update({name: "constexpr" for name in constexprs})
    signature = {name: signature[name] for name in fn.arg_names}  # 参数顺序与 kernel 的定义相同
    aligned = [*pointers, *(name for name in ints if name != "M" or m % 16 == 0)]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget(*SM90), options={"num_warps": warps, "num_stages": stages})


def _cubin_tool(tool: str, cubin: bytes, *args: str) -> str:
    """把 cubin 写进临时文件，用 Triton 自带的 CUDA 工具（nvdisasm / cuobjdump）读它，返回标准输出。"""
    import triton

    path_tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(path_tool), *args, str(path)], capture_output=True, text=True, check=True).stdout


def disassemble(cubin: bytes) -> str:
    """cubin 反汇编成 SASS 文本（nvdisasm -c：只要代码段）。"""
    return _cubin_tool("nvdisasm", cubin, "-c")


def registers(cubin: bytes) -> int:
    """每个线程的寄存器数（cuobjdump --dump-resource-usage 的 REG）。"""
    usage = _cubin_tool("cuobjdump", cubin, "--dump-resource-usage")
    found = re.search(r"REG:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no register count: {usage[:200]!r}")
    return int(found.group(1))


def resident_programs(regs: int, threads: int, shared: int) -> int:
    """一个 SM 上同时驻留的程序数（H100/H200：65,536 个寄存器、2,048 个线程、32 个块、228 KB 共享内存，每块另占
    1 KB）。寄存器按 warp 以 256 个为单位分配。为什么要它：M = 1 的 kernel 每个程序每次迭代只有几 KB 在途，驻留的
    程序越少，全 GPU 在途的字节越少，读带宽就越低（Little 定律）。"""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // (per_warp * (threads // 32))
    by_shared = (228 * 1024) // (shared + 1024)
    return max(0, min(by_regs, 2048 // threads, 32, by_shared))


def main_loop(sass: str) -> collections.Counter[str]:
    """最大的循环体（从一个标签到跳回它的 BRA，含两端）里各操作码的条数（操作码去掉修饰后缀前的完整名保留，
    例如 LDG.E.64 与 LDG.E.U8 分开数：一眼看出字节是不是向量读的）。没有循环时返回空计数。"""
    instructions: list[tuple[str, str]] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        ins = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*)", line)
        if ins:
            instructions.append((ins.group(1), ins.group(2)))
    best: collections.Counter[str] = collections.Counter()
    for i, (op, rest) in enumerate(instructions):
        target = re.search(r"(\.L_x_\d+)", rest) if op.startswith("BRA") else None
        if target and labels.get(target.group(1), i + 1) <= i:
            body = collections.Counter(o for o, _ in instructions[labels[target.group(1)]:i + 1])
            if sum(body.values()) > sum(best.values()):
                best = body
    return best


def family(op: str) -> str:
    """操作码的类：load（全局 LDG / 共享 LDS）、shuffle、算术等——表里按类汇总。"""
    head = op.split(".")[0]
    return {"LDG": "global load", "LDS": "shared load", "SHFL": "warp shuffle", "FFMA": "fp32 math",
            "FADD": "fp32 math", "FMUL": "fp32 math", "HMMA": "tensor core", "HGMMA": "tensor core"}.get(head, "other")


def profile(method: str, m: int, blocksize: int = 64,
            config: tuple[int, int, int, int, int] | None = None) -> dict[str, Any]:
    """一种方式的静态剖析：主循环每次迭代的指令（按操作码）、每个线程每个权重的指令数、寄存器、驻留程序数、
    在途的权重字节（流水线的 num_stages − 1 步预取加上正在算的一步，按 max(1, num_stages − 1) 步计）。"""
    gemv = method in GEMV_METHODS
    block_m, block_n, nb, warps, stages = config or DEFAULTS["gemv" if gemv else "dot"]
    kernel = compile_method(method, m, blocksize, config)
    body = main_loop(disassemble(kernel.asm["cubin"]))
    if not body:
        raise RuntimeError(f"{method}: no loop found in the SASS; the kernel's structure changed")
    weights = block_n * nb * blocksize / (32 * warps)  # 每个线程每次迭代的权重数（M 块只算一次：权重读一次）
    total = sum(body.values())
    regs = registers(kernel.asm["cubin"])
    programs = resident_programs(regs, 32 * warps, kernel.metadata.shared)
    # 每个程序每次迭代读的权重字节：半字节 + float32 块尺度
    step_bytes = block_n * nb * (blocksize // 2 + 4)
    by_family: dict[str, int] = collections.Counter()
    for op, count in body.items():
        by_family[family(op)] += count
    in_flight = programs * step_bytes * max(1, stages - 1)
    return {"method": method, "m": m, "config": [block_m, block_n, nb, warps, stages], "blocksize": blocksize,
            "loop_instructions": total, "instructions_per_weight": round(total / weights, 2),
            "by_family": dict(by_family), "loads": {op: c for op, c in body.items() if op.startswith(("LDG", "LDS"))},
            "shared_bytes": kernel.metadata.shared, "registers": regs, "programs_per_sm": programs,
            "weight_bytes_per_step": step_bytes, "weight_bytes_in_flight_per_sm": in_flight}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Static profile of the NF4 kernels: compile each method for sm_90 "
                                                 "on this machine (no GPU needed) and count the main loop's instructions.")
    parser.add_argument("--methods", default=",".join(KERNELS), help="comma-separated methods (default: all)")
    parser.add_argument("--m", type=int, default=16, help="activation rows for the tl.dot methods (gemv ones use 1)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--no-extra", action="store_true",
                        help="only each method's default config, not the pipelined gemvG / dotG tuning candidates")
    args = parser.parse_args(argv)
    methods = [x for x in args.methods.split(",") if x]
    unknown = [x for x in methods if x not in KERNELS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(KERNELS)}")
    rows = [profile(method, 1 if method in GEMV_METHODS else args.m) for method in methods]
    if not args.no_extra:
        rows += [profile(method, m, config=cfg) for method, m, cfg in EXTRA if method in methods]
    print(f"{'method':<8}{'M':>4} {'config (BM, BN, NB, warps, stages)':<36}{'instr/iter':>11}{'instr/weight':>13}"
          f"{'regs':>6}{'progs/SM':>9}{'KB in flight/SM':>16}  loads")
    for r in rows:
        print(f"{r['method']:<8}{r['m']:>4} {str(r['config']):<36}{r['loop_instructions']:>11}"
              f"{r['instructions_per_weight']:>13.2f}{r['registers']:>6}{r['programs_per_sm']:>9}"
              f"{r['weight_bytes_in_flight_per_sm'] / 1024:>16.1f}  {r['loads']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
