"""bench.py 的 CI 冒烟测试：tiny 形状、CPU、几秒钟。速度目标只由 GPU 上的 bench.py 检查，这里不计时。"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import bench


def last_json(capsys) -> dict:
    """bench.main 的约定：最后一行是包含全部测量值的 JSON。"""
    lines = [ln for ln in capsys.readouterr().out.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def test_tiny_benchmark_runs_both_paths_and_modes(capsys):
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--batches", "2", "--paths", "fast,eager"]) == 0
    report = last_json(capsys)
    rows = report["rows"]
    assert {(r["path"], r["mode"]) for r in rows} == {("fast", "target"), ("fast", "steered"),
                                                       ("eager", "target"), ("eager", "steered")}
    assert all(r["ms_per_step"] > 0 and r["batch"] == 2 and not r["compiled"] for r in rows)
    assert report["env"]["torch"] and report["full_run_estimate"]


def test_tiny_check_fast_equals_eager_in_float32(capsys, tmp_path):
    """--check：fp32 下快速路径与慢速循环逐 token 相同（真实形状的同一检查在 GPU 上运行，见 BENCHMARKS.md）；
    --out 写出的文件与打印的报告相同（--check 曾经忽略 --out）。"""
    out = tmp_path / "check.json"
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--check", "--out", str(out)]) == 0
    check = last_json(capsys)["check"]
    assert json.loads(out.read_text())["check"] == check
    for key in ("float32:target", "float32:steered"):
        assert check[key]["identical_rows"] == "4/4" and check[key]["agreement"] == 1.0
    assert 0.0 <= check["bfloat16:steered"]["agreement"] <= 1.0


def test_out_file_keeps_rows_while_running_and_marks_completion(capsys, tmp_path, monkeypatch):
    """--out 边测边写：每一行测完就进文件的 rows_so_far（complete = false），命令中途被杀时已测的行还在；
    正常结束时文件是完整报告（complete = true，没有 rows_so_far）。"""
    out = tmp_path / "rows.json"
    real_finish = bench.finish
    seen: dict = {}

    def finish_spy(report, path):  # 收尾之前文件里是中间结果：与打印的行相同
        seen.update(json.loads(out.read_text()))
        return real_finish(report, path)

    monkeypatch.setattr(bench, "finish", finish_spy)
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--batches", "2", "--modes", "target,steered",
                       "--out", str(out)]) == 0
    report = last_json(capsys)
    assert seen["complete"] is False and seen["env"] == report["env"]
    assert seen["read_bandwidth"] == report["read_bandwidth"]  # 份额列需要的带宽也在中间文件里
    assert [(r["mode"], r["ms_per_step"]) for r in seen["rows_so_far"]] == [
        (r["mode"], r["ms_per_step"]) for r in report["rows"]]
    final = json.loads(out.read_text())
    assert final == report and final["complete"] is True and "rows_so_far" not in final


def test_tiny_benchmark_overlap_modes_and_attached_profile(capsys):
    """--overlap 可给多个：每个引导行各测一次（目标行只测一次）；--with-profile 把剖析附在每个快速路径行上。"""
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--batches", "2", "--overlap", "off,streams",
                       "--with-profile"]) == 0
    rows = last_json(capsys)["rows"]
    assert [(r["mode"], r["overlap"]) for r in rows] == [("target", "off"), ("steered", "off"),
                                                         ("steered", "streams")]
    for r in rows:
        assert r["ms_per_step"] > 0
        assert {"kernel_ms_per_step", "ms_per_step", "top_kernels", "steps_profiled"} <= r["profile"].keys()


def test_tiny_benchmark_stack_modes_pair_rows_with_matching_target(capsys):
    """--stack 给多个：引导行逐个测；目标行按目标走哪条前向去重（pair → off，all → target）；
    估算配对的是最快引导行与目标走同一条前向的目标行。"""
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--batches", "2", "--overlap", "streams",
                       "--stack", "off,pair,all"]) == 0
    report = last_json(capsys)
    rows = report["rows"]
    assert [(r["mode"], r["stack"]) for r in rows] == [("target", "off"), ("target", "target"), ("steered", "off"),
                                                       ("steered", "pair"), ("steered", "all")]
    fastest = min((r for r in rows if r["mode"] == "steered"), key=lambda r: r["ms_per_step"])
    target = bench.target_row(rows, fastest)
    assert target is not None and (target["stack"] == "target") == (fastest["stack"] == "all")
    assert f"{target['ms_per_step']:.2f} + {fastest['ms_per_step']:.2f}" in report["full_run_estimate"][0]


def test_tiny_check_overlap_path_in_float32_only(capsys):
    """--check-dtypes 只做所选精度；--overlap streams 时引导行检查的是 overlap 路径。"""
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--check", "--check-dtypes", "float32",
                       "--overlap", "streams"]) == 0
    check = last_json(capsys)["check"]
    assert set(check) == {"float32:target", "float32:steered"}
    assert check["float32:steered"]["overlap"] == "streams"
    assert check["float32:steered"]["identical_rows"] == "4/4"


def test_bad_overlap_value_is_rejected():
    import pytest

    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--device", "cpu", "--overlap", "off,sideways"])


def test_attention_for_leaves_resolution_to_fast_decoder():
    """没有叠加前向的行给 "auto"；其余原样交给 FastDecoder：stack="auto" 在 4-bit 模型上解析成 off，
    若这里先把 auto 定成 triton，NF4 行就会因“triton 只用于叠加前向”而失败。"""
    assert bench.attention_for("triton", "off") == "auto"
    assert bench.attention_for("auto", "auto") == "auto"
    assert bench.attention_for("sdpa", "all") == "sdpa"
    assert bench.attention_for("triton", "target") == "triton"


def test_tiny_benchmark_attention_modes_pair_rows_with_matching_target(capsys):
    """--attention 给多个（CPU 上 Triton kernel 由解释器执行）：目标行与引导行各按注意力实现测一次，
    每个引导行配对的目标行用同一种注意力。批 1：解释器里的 kernel 按程序逐个执行，批越小越快，检查的与批大小无关。"""
    import os

    import pytest

    from fast.attention import triton_available

    if os.environ.get("TRITON_INTERPRET") != "1" or not triton_available():
        pytest.skip("需要 triton 与 TRITON_INTERPRET=1（tests/conftest.py）")
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--batches", "1", "--overlap", "streams",
                       "--stack", "all", "--attention", "sdpa,triton", "--new", "6"]) == 0
    rows = last_json(capsys)["rows"]
    assert [(r["mode"], r["attention"]) for r in rows] == [("target", "sdpa"), ("target", "triton"),
                                                           ("steered", "sdpa"), ("steered", "triton")]
    for r in rows:
        assert r["ms_per_step"] > 0
        if r["mode"] == "steered":
            assert bench.target_row(rows, r)["attention"] == r["attention"]


# ---------------------------------------------------------------------------
# 带宽下限（roofline）：每步最少字节的计数、平均上下文、只读带宽探针、比值汇总
# ---------------------------------------------------------------------------

def _meta_model(kind: str):
    """真实形状的模型建在 meta 设备上（bench.random_model 同一条构造路径）：只有形状没有存储，不占内存，
    字节计数与真实模型相同。"""
    import torch

    return bench.random_model(kind, "real", torch.bfloat16, "meta", 0)


def test_weight_bytes_of_real_shapes_match_hand_count():
    """8B（不共享嵌入）：输入嵌入表只按行查，不计；lm_head 计。1B（共享嵌入）：那张表就是 lm_head，计一次。
    期望值按 Llama 的结构逐项手算（bf16 每个数 2 字节），不是从被测函数抄来的。"""
    def per_layer(h: int, heads: int, kv: int, hd: int, mlp: int) -> int:
        return h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * mlp + 2 * h  # q, k+v, o, gate/up/down, 2 norms

    vocab = 128256
    eight = 32 * per_layer(4096, 32, 8, 128, 14336) + 4096 + vocab * 4096  # 层 + 末层 norm + lm_head
    one = 16 * per_layer(2048, 32, 8, 64, 8192) + 2048 + vocab * 2048  # 共享的嵌入 / lm_head 只一份
    m8, m1 = _meta_model("8b"), _meta_model("1b")
    assert bench.weight_bytes(m8) == 2 * eight == 15_009_849_344
    assert bench.weight_bytes(m1) == 2 * one == 2_471_628_800
    assert bench.kv_bytes_per_token(m8) == 32 * 8 * 128 * 2 * 2 == 128 * 1024
    assert bench.kv_bytes_per_token(m1) == 16 * 8 * 64 * 2 * 2 == 32 * 1024


def test_floor_ratio_of_the_issue_lengths_is_above_1_35():
    """批 64：提示 256 + 新 256（bench 的默认）与提示 256 + 新 128（issue 的探针）下，最少字节之比都高于 1.35。
    这就是 BENCHMARKS.md 里“两条支路串行时 1.35 低于下限”的算术，由 CI 复算。"""
    m8, m1 = _meta_model("8b"), _meta_model("1b")
    for new, expected in ((256, 1.3595), (128, 1.3552)):
        ctx = bench.mean_context(256, new)
        ratio = bench.floor_bytes([m8, m1, m1], 64, ctx) / bench.floor_bytes([m8], 64, ctx)
        assert abs(ratio - expected) < 5e-4, (new, ratio)


def test_weight_bytes_tiny_tied_and_untied():
    """tiny 模型：不共享嵌入 = 全部参数 − 输入嵌入；共享嵌入 = 全部（共享的参数只算一次）。"""
    import torch

    untied = bench.random_model("8b", "tiny", torch.float32, "cpu", 0)
    tied = bench.random_model("1b", "tiny", torch.float32, "cpu", 1)
    assert tied.get_input_embeddings().weight is tied.get_output_embeddings().weight
    all_untied = sum(p.numel() * 4 for p in untied.parameters())
    assert bench.weight_bytes(untied) == all_untied - untied.get_input_embeddings().weight.numel() * 4
    assert bench.weight_bytes(tied) == sum(p.numel() * 4 for p in tied.parameters())


def test_weight_bytes_counts_4bit_packed_weight_and_its_quant_state():
    """4-bit（bitsandbytes NF4，CPU 上量化）：一个投影换成 Linear4bit 后，计数 = 原字节 − bf16 权重 + 半字节打包
    + 量化状态（absmax、码表、offset、双重量化的 state2）。"""
    import bitsandbytes as bnb
    import torch

    model = bench.random_model("8b", "tiny", torch.bfloat16, "cpu", 0)
    before = bench.weight_bytes(model)
    mlp = model.model.layers[0].mlp
    w = mlp.down_proj.weight.detach().float()
    q = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                          compress_statistics=True)
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)._quantize("cpu")
    mlp.down_proj = q
    state = q.weight.quant_state
    state_bytes = sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.offset,
                                                              state.state2.absmax, state.state2.code))
    assert q.weight.numel() == w.numel() // 2 and q.weight.element_size() == 1
    assert bench.weight_bytes(model) == before - w.numel() * 2 + w.numel() // 2 + state_bytes


def test_mean_context_is_the_average_over_the_differenced_steps():
    """(T(new) − T(1)) / (new − 1) 差出的是第 1 … new−1 个解码步；第 k 步注意 prompt + k 个 token。"""
    for prompt, new in ((256, 256), (256, 128), (7, 2), (31, 17)):
        steps = [prompt + k for k in range(1, new)]
        assert bench.mean_context(prompt, new) == sum(steps) / len(steps)


def test_floor_bytes_adds_weights_once_and_kv_per_row():
    import torch

    untied = bench.random_model("8b", "tiny", torch.float32, "cpu", 0)
    tied = bench.random_model("1b", "tiny", torch.float32, "cpu", 1)
    got = bench.floor_bytes([untied, tied, tied], 3, 10.5)
    kv = 3 * 10.5 * (bench.kv_bytes_per_token(untied) + 2 * bench.kv_bytes_per_token(tied))
    assert got == bench.weight_bytes(untied) + 2 * bench.weight_bytes(tied) + kv


def test_bandwidth_summary_arithmetic():
    """最好 = 最短时间，中位数 = 排序后中间那次；速率不因为小而被舍入成 0（不依赖机器速度）。"""
    got = bench.bandwidth_summary(2 * 10**12, [4.0, 1.0, 2.0])
    assert got["tbps_best"] == 2.0 and got["tbps_median"] == 1.0 and got["repeats"] == 3
    slow = bench.bandwidth_summary(2**20, [1.0, 3.0])
    assert slow["tbps_best"] == float(f"{2**20 / 1e12:.4g}") > 0 and slow["tbps_median"] > 0


def test_read_bandwidth_probe_shape():
    got = bench.read_bandwidth("cpu", 2**20, repeats=3)
    assert got["repeats"] == 3 and got["gib"] == round(2**20 / 2**30, 3)
    assert got["tbps_best"] >= got["tbps_median"] >= 0


def test_ratio_summary_pairs_rows_and_divides_bytes_and_times():
    rows = [{"path": "fast", "mode": "target", "batch": 64, "overlap": "off", "stack": "target", "attention": "triton",
             "ms_per_step": 8.0, "floor_bytes": 18e9},
            {"path": "fast", "mode": "steered", "batch": 64, "overlap": "streams", "stack": "all",
             "attention": "triton", "ms_per_step": 11.0, "floor_bytes": 24.5e9}]
    (got,) = bench.ratio_summary(rows, read_tbps=3.0)
    assert got["ratio"] == round(11 / 8, 3) and got["floor_ratio"] == round(24.5 / 18, 4)
    assert got["target_of_floor"] == round(6.0 / 8.0, 3) and got["steered_of_floor"] == round(24.5 / 3 / 11, 3)


def test_tiny_benchmark_reports_floor_bytes_and_ratios(capsys):
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--batches", "2"]) == 0
    report = last_json(capsys)
    assert report["read_bandwidth"]["tbps_best"] >= report["read_bandwidth"]["tbps_median"] >= 0
    target, steered = report["rows"]
    for r in (target, steered):
        assert r["mean_context"] == bench.mean_context(r["prompt"], r["new"]) and r["floor_bytes"] > 0
    (summary,) = report["ratios"]
    assert summary["floor_ratio"] == round(steered["floor_bytes"] / target["floor_bytes"], 4)


def test_busy_us_is_the_length_of_the_union_of_intervals():
    """并集长度：重叠部分只算一次，相接与包含都正确，间隙不算。"""
    assert bench.busy_us([]) == 0.0
    assert bench.busy_us([(0, 10), (5, 15)]) == 15  # 重叠 5
    assert bench.busy_us([(0, 10), (2, 3), (10, 12)]) == 12  # 包含、相接
    assert bench.busy_us([(20, 30), (0, 5)]) == 15  # 乱序、有间隙


def test_tiny_speculative_rows_reference_loop(capsys):
    """--speculate K --paths eager：随机权重的 tiny 模型上跑投机参考循环，与不投机逐 token 相同，并报告接受统计。"""
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--batches", "2", "--paths", "eager",
                       "--speculate", "3"]) == 0
    rows = last_json(capsys)["speculation"]
    assert [(r["mode"], r["batch"], r["speculate"], r["draft"]) for r in rows] == [
        ("target", 2, 3, "expert"), ("steered", 2, 3, "expert")]
    for r in rows:
        assert r["identical"] is True
        assert 0 <= r["accepted"] <= r["drafted"] <= 3 * (r["verify_steps"] - r["batch"])
        assert r["tokens"] == 2 * r["new"] and r["tokens_per_verify"] == r["tokens"] / r["verify_steps"]


def test_tiny_speculative_rows_fast_path(capsys):
    """--speculate K（快速路径）：oracle 草稿的接受率 0 与 1、免费与付费的草稿；每行都与投机路径自己的输出相同，
    接受率 1 时每个草稿都被接受、每次验证 K+1 个 token（除了预算的尾巴），接受率 0 时一个都不；同一次调用里有不投机的行。"""
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--batches", "2", "--modes", "steered",
                       "--speculate", "2", "--agreement", "0,1", "--compile", "off"]) == 0
    rows = last_json(capsys)["speculation"]
    plain = [r for r in rows if r["path"] == "fast"]
    spec = [r for r in rows if r["path"] == "fast-speculative"]
    assert len(plain) == 1 and plain[0]["mode"] == "steered"
    assert [(r["draft_cost"], r["k"], r["agreement"]) for r in spec] == [
        (c, 2, a) for c in ("free", "expert") for a in (0.0, 1.0)]
    for r in spec:
        assert r["identical_rows"] == 2 and r["tokens"] == 2 * r["new"]
        # speedup 由未舍入的时间算出，两个毫秒字段各自舍入到 3 位：只能在舍入误差内比较
        assert r["speedup"] == pytest.approx(r["plain_ms_per_step"] / r["ms_per_token"], rel=2e-3)
        if r["agreement"] == 1.0:
            assert r["accepted"] == r["drafted"] > 0 and r["tokens_per_verify"] > 1
        else:
            assert r["accepted"] == 0 and r["tokens_per_verify"] == 1


def test_tiny_speculative_check(capsys):
    """--check --speculate K：快速路径的投机解码（oracle 草稿）与慢速循环逐 token 相同（CPU、fp32）。"""
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--check", "--check-dtypes", "float32",
                       "--speculate", "2", "--compile", "off"]) == 0
    check = last_json(capsys)["check"]
    for mode in ("target", "steered"):
        got = check[f"float32:{mode}:speculative"]
        assert got["identical_rows"] == "4/4" and got["acceptance"] > 0


def test_speculate_refusals():
    import pytest

    for argv in (["--speculate", "2", "--temperature", "0.5"], ["--speculate", "2,3", "--paths", "eager"],
                 ["--speculate", "2", "--agreement", "1.5"], ["--speculate", "2", "--draft-cost", "cheap"],
                 ["--speculate", "2", "--draft", "fusion"], ["--speculate", "0"]):
        with pytest.raises(SystemExit):
            bench.main(["--preset", "tiny", "--device", "cpu", *argv])


def test_tiny_check_nf4(capsys):
    """--check --quant nf4：同一份 NF4 权重（bitsandbytes 的 Linear4bit），快速路径的叠加前向（fast.nf4 的 kernel，
    CPU 上由 Triton 解释器执行）== bitsandbytes 前向的参考循环，float32 逐 token；int4 不在 --check 的范围里。"""
    import importlib.util
    import os

    if importlib.util.find_spec("bitsandbytes") is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs bitsandbytes and the Triton interpreter (conftest sets TRITON_INTERPRET=1)")
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--check", "--quant", "nf4", "--check-dtypes",
                       "float32", "--stack", "all"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for mode in ("target", "steered"):
        got = report["check"][f"float32:{mode}"]
        assert got["identical_rows"] == "4/4" and got["agreement"] == 1.0
        assert got["quant"] == "nf4" and got["nf4_kernels"] is True
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--device", "cpu", "--check", "--quant", "int4"])


def test_tiny_nf4_row_records_tuning_time(capsys, monkeypatch):
    """NF4 的测速行记下预热里调优用的秒数 tune_s（CPU 上不调优：0.0）；显存的三列只在 CUDA 上有。
    模型见 cpu_nf4_models。"""
    cpu_nf4_models(monkeypatch)
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--quant", "nf4", "--batches", "2", "--modes",
                       "target", "--new", "4", "--stack", "all", "--compile", "off"]) == 0
    row = last_json(capsys)["rows"][0]
    assert row["stack"] == "target" and row["tune_s"] == 0.0
    assert not {"peak_gib", "peak_timed_gib", "resident_gib"} & set(row)


def test_int4_check_on_the_stacked_path(capsys, monkeypatch):
    """--check --quant int4（只比 bf16）：同一份量化权重，快速路径（--stack all：叠加前向里逐模型的 F.linear）对
    transformers 前向的参考循环。torchao 的 tile-packed int4 只能在 CUDA 上构造：CPU 上换成同一类张量子类（int8 只量化
    权重，test_stacked 的 _subclass_weights）。检查报告的结构、确实走了叠加路径，一致率不低。"""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        pytest.skip("needs torchao (.ci/run installs it)")
    from test_stacked import _subclass_weights

    monkeypatch.setattr(bench, "quantized_models", lambda quant, preset, device, group: [
        _subclass_weights(bench.random_model(k, preset, torch.bfloat16, device, s)) for k, s in (("8b", 0), ("1b", 1), ("1b", 2))])
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--check", "--quant", "int4", "--check-dtypes",
                       "bfloat16", "--stack", "all"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for mode in ("target", "steered"):
        got = report["check"][f"bfloat16:{mode}"]
        assert got["quant"] == "int4" and got["stack"] == ("target" if mode == "target" else "all")
        assert got["nf4_kernels"] is False
        assert got["agreement"] >= 0.5, got


def cpu_nf4_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """--quant nf4 的加载要 CUDA（model_loader）：换成 --check 用的同一种 CPU 上的 NF4 模型（bitsandbytes 的
    Linear4bit）。要 bitsandbytes 与 Triton 解释器（conftest 设 TRITON_INTERPRET=1），没有时跳过。"""
    import importlib.util
    import os

    if importlib.util.find_spec("bitsandbytes") is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs bitsandbytes and the Triton interpreter (conftest sets TRITON_INTERPRET=1)")
    monkeypatch.setattr(bench, "quantized_models", lambda quant, preset, device, group: [
        bench.nf4_in_place(bench.random_model(k, preset, torch.float32, device, s), torch.float32)
        for k, s in (("8b", 0), ("1b", 1), ("1b", 2))])


def test_nf4_tuning_cache_flag_reaches_the_tuner(capsys, monkeypatch, tmp_path):
    """--nf4-tuning-cache PATH：bench 的 NF4 解码器经 fast.nf4 的调优缓存选 kernel（同一台 GPU 上的几个基准进程共用
    调优结果）。证据是调优真的读了这个文件：指纹不符的文件给出“another setup”的警告（CPU 上也查缓存）。默认 off 不读。"""
    from fast import nf4

    cpu_nf4_models(monkeypatch)
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"fingerprint": {"device": "another GPU"}, "entries": {}}))
    argv = ["--preset", "tiny", "--device", "cpu", "--quant", "nf4", "--batches", "2", "--modes", "target", "--new",
            "4", "--stack", "all", "--compile", "off"]
    with pytest.warns(UserWarning, match="written for another setup"):
        assert bench.main([*argv, "--nf4-tuning-cache", str(path)]) == 0
    assert nf4._CACHE_PATH == str(path)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # 默认 off：不读任何缓存文件，也就没有这条警告
        assert bench.main(argv) == 0
    assert nf4._CACHE_PATH is None


def test_kernel_kind_buckets_the_nf4_kernels_as_matmul():
    """剖析的分类：NF4 的 Triton kernel（含 split-K 的求和）算矩阵乘，不落进 other（d48920c 的批 16 剖析就记错了）；
    其余几类照旧。"""
    for name in ("nf4_gemv", "nf4_gemv_w", "nf4_dot_t", "nf4_split_sum", "void gemm_4bit_simt<__nv_bfloat16, 1>",
                 "nvjet_sm90_tst_256x8_64x6_2x1_v_bz_TNT"):
        assert bench.kernel_kind(name) == "matmul", name
    assert bench.kernel_kind("decode_attention_split") == "attention"
    assert bench.kernel_kind("triton_poi_fused_mul_silu_split_6") == "triton"
    assert bench.kernel_kind("void at::native::vectorized_elementwise_kernel<4>") == "other"


def test_compare_rows_tables(tmp_path, capsys):
    """benchmarks/compare_rows.py：并排表的比值、占 floor 时间的比例（floor ÷ 该进程的带宽 ÷ 每步）、缺行写 —、
    被截断的文件用 rows_so_far；--kernels 按层数把所选 µs 加成每步（S = 1 乘目标层数，S = 2 乘叠加对的层数）。"""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import compare_rows

    def row(batch, mode, ms, **extra):
        return {"path": "fast", "mode": mode, "batch": batch, "ms_per_step": ms, "tok_per_s": batch * 1000 / ms,
                "peak_gib": 10.0, "floor_bytes": 8e9, "floor_gb": 8.0, "achieved_tbps": 8.0 / ms, "warmup_s": 60.0,
                **extra}

    bf16 = {"env": {"commit": "aaa"}, "args": {"quant": "bf16"}, "read_bandwidth": {"tbps_best": 4.0},
            "rows": [row(16, "steered", 4.0), row(16, "target", 3.0)], "complete": True}
    kernels = {"S1_N64_K128_M16": {"config": ["dotG", 16, 128, 1, 4, 3], "split_k": 2, "us": 10.0,
                                   "us_by_method": {"dotG": 10.0, "bnb": 30.0}},
               "S2_N32_K64_M16": {"config": ["dotT", 16, 64, 1, 4, 1], "split_k": 1, "us": 5.0,
                                  "us_by_method": {"dotT": 5.0}}}
    nf4 = {"env": {"commit": "bbb"}, "args": {"quant": "nf4"}, "read_bandwidth": {"tbps_best": 4.0},
           "rows_so_far": [row(16, "steered", 5.0, tune_s=7.5, nf4_kernels=kernels)], "complete": False}
    paths = []
    for name, report in (("bf16", bf16), ("nf4", nf4)):
        paths.append(str(tmp_path / f"{name}.json"))
        Path(paths[-1]).write_text(json.dumps(report))
    assert compare_rows.main([*paths, "--kernels", "--preset", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert "was cut before it finished" in err
    steered = next(line for line in out.splitlines() if line.startswith("| 16 | steered"))
    # bf16: 8 GB / 4 TB/s = 2 ms of 4 ms → 50%；nf4: 2 ms of 5 ms → 40%，比值 1.25，预热 60 (7.5)
    assert "| 4.000 (4,000) |" in steered and "| 50% |" in steered and "| 1.25 |" in steered
    assert "| 40% |" in steered and "| 60 (7.5) |" in steered
    target = next(line for line in out.splitlines() if line.startswith("| 16 | target"))
    assert target.count("—") == 7  # nf4 没有这一行
    layers = bench.llama_config("8b", "tiny").num_hidden_layers  # tiny：两种模型都是 2 层
    assert f"chosen matmuls per step {10.0 * layers / 1000:.2f} ms target alone, " \
           f"{(10.0 + 5.0) * layers / 1000:.2f} ms steered" in out
    # 调优缓存文件（--nf4-tuning-cache）：只有 kernel 的选择（只取 bf16 的条目），--kernels 照样加成每步
    cache = tmp_path / "tune.json"
    cache.write_text(json.dumps({"fingerprint": {}, "entries": {f"{k}_bfloat16": v for k, v in kernels.items()}
                                 | {"S1_N64_K128_M4_float32": kernels["S1_N64_K128_M16"]}}))
    assert compare_rows.main([str(cache), "--kernels", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "| S1_N64_K128 | 16 |" in out and "| 4 |" not in out and "ms steered" in out
    with pytest.raises(SystemExit):
        compare_rows.main([str(cache)])  # 只有调优缓存却没有 --kernels：说明要加它
    with pytest.raises(SystemExit):
        Path(tmp_path / "check.json").write_text(json.dumps({"args": {}, "check": {}, "complete": True}))
        compare_rows.main([str(tmp_path / "check.json")])
