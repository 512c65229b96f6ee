"""bench.py 的 CI 冒烟测试：tiny 形状、CPU、几秒钟。速度目标只由 GPU 上的 bench.py 检查，这里不计时。"""
from __future__ import annotations

import json

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


def test_tiny_check_fast_equals_eager_in_float32(capsys):
    """--check：fp32 下快速路径与慢速循环逐 token 相同（真实形状的同一检查在 GPU 上运行，见 BENCHMARKS.md）。"""
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--check"]) == 0
    check = last_json(capsys)["check"]
    for key in ("float32:target", "float32:steered"):
        assert check[key]["identical_rows"] == "4/4" and check[key]["agreement"] == 1.0
    assert 0.0 <= check["bfloat16:steered"]["agreement"] <= 1.0


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
    每个引导行配对的目标行用同一种注意力。"""
    import os

    import pytest

    from stacked_llama import triton_available

    if os.environ.get("TRITON_INTERPRET") != "1" or not triton_available():
        pytest.skip("需要 triton 与 TRITON_INTERPRET=1（tests/conftest.py）")
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--batches", "2", "--overlap", "streams",
                       "--stack", "all", "--attention", "sdpa,triton", "--new", "6"]) == 0
    rows = last_json(capsys)["rows"]
    assert [(r["mode"], r["attention"]) for r in rows] == [("target", "sdpa"), ("target", "triton"),
                                                           ("steered", "sdpa"), ("steered", "triton")]
    for r in rows:
        assert r["ms_per_step"] > 0
        if r["mode"] == "steered":
            assert bench.target_row(rows, r)["attention"] == r["attention"]
