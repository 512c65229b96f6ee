"""benchmarks/micro_verify.py 的 CPU 冒烟测试：tiny 形状、几秒钟。速度只在 GPU 上有意义，这里不看数值大小，
只查 JSON 的结构、验证前向算的是对的（K+1 个位置的 logits 与无缓存的整段前向相同），以及投影的算术。"""
from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import StaticCache

from bench import random_model
from benchmarks import micro_verify as mv
from speculative import simulate_acceptance


pytestmark = pytest.mark.usefixtures("one_thread")  # 原因见 tests/conftest.py


def last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    """main 的约定（与 bench.py 相同）：最后一行是整份 JSON 报告。"""
    lines = [ln for ln in capsys.readouterr().out.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def test_tiny_run_writes_the_report(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    """每个 (组, 批, q) 一行且都有毫秒；比值、投影、最优 K 的行数齐全；--out 的文件与打印的报告相同。"""
    out = tmp_path / "verify.json"
    argv = ["--preset", "tiny", "--device", "cpu", "--batches", "1,2", "--ks", "1,3", "--iters", "1",
            "--repeats", "1", "--warmup", "0", "--out", str(out)]
    assert mv.main(argv) == 0
    report = last_json(capsys)
    assert json.loads(out.read_text()) == report
    assert report["env"]["torch"] and report["args"]["ks"] == [1, 3]
    rows = report["rows"]
    want = {(g, b, q) for g in mv.GROUPS for b in (1, 2) for q in (1, 2, 4)} | {("draft", b, 1) for b in (1, 2)}
    assert {(r["group"], r["batch"], r["q"]) for r in rows} == want and len(rows) == len(want)
    assert all(r["ms"] > 0 and r["K"] == r["q"] - 1 and not r["cuda_graph"] and "error" not in r for r in rows)
    assert len(report["ratios"]) == 3 * 2 * 2
    ms = {(r["group"], r["batch"], r["q"]): r["ms"] for r in rows}
    for r in report["ratios"]:
        assert r["ratio"] == round(ms[(r["group"], r["batch"], r["K"] + 1)] / ms[(r["group"], r["batch"], 1)], 4)
    proj = report["projection"]
    assert "ARITHMETIC PROJECTION" in proj["note"]
    assert len(proj["rows"]) == 2 * 2 * 4 * 2  # 批 × 草稿（expert、free）× a × K
    assert len(proj["best"]) == 2 * 2 * 4
    for r in proj["rows"]:
        if r["a"] == 0.0:
            assert r["tokens_per_round"] == 1.0  # a = 0：每轮恰好只有验证给出的一个 token
        assert r["draft_ms"] == (0.0 if r["draft"] == "free" else round(ms[("draft", r["batch"], 1)], 4))
        assert r["verify_ms"] == round(ms[("steered", r["batch"], r["K"] + 1)], 4)


def test_verify_forward_matches_a_full_forward() -> None:
    """q = K+1 的验证前向（打包 GQA、4 维掩码、写入指针设回 prompt）给出的每个位置的 logits，与 transformers 自带
    sdpa 在“提示 + 新 token”整段上不带缓存的前向相同；同一个验证重做一次结果不变（重放做的是同一件事）。"""
    torch.manual_seed(0)
    model = random_model("8b", "tiny", torch.float32, "cpu", 0)  # tiny：4 个头、2 个 KV 头（n_rep = 2）
    batch, prompt_len, q, length = 2, 12, 4, 32
    prompt = torch.randint(10, 990, (batch, prompt_len))
    new = torch.randint(10, 990, (batch, q))
    with torch.inference_mode():
        reference = model(input_ids=torch.cat([prompt, new], 1)).logits[:, prompt_len:]  # (B, q, V)
        mv.use_verify_attention([model])
        cache = StaticCache(config=model.config, max_cache_len=length)
        mv.prefill(model, cache, prompt)
        positions = (prompt_len + torch.arange(q)).expand(batch, q)
        mask = mv.visible_mask(batch, prompt_len, q, length, "cpu")
        kwarg = mv.cache_kwarg(model)
        first = mv.forward_logits(model, kwarg, cache, new, positions, mask, prompt_len)
        again = mv.forward_logits(model, kwarg, cache, new, positions, mask, prompt_len)
    assert first.shape == (batch, q, model.config.vocab_size)
    torch.testing.assert_close(first, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, first, atol=0, rtol=0)


def test_expected_tokens_formula_and_simulation() -> None:
    """E = (1 − a^(K+1)) / (1 − a)：端点（a = 0 → 1，a = 1 → K+1）与手算值；再与 speculative.simulate_acceptance
    （generate_speculative 的精确计数）在 Bernoulli(a) 的“猜中”序列上比较：每次验证产出的 token 数相符到 1%。"""
    assert mv.expected_tokens(0.0, 4) == 1.0 and mv.expected_tokens(1.0, 4) == 5.0
    assert mv.expected_tokens(0.5, 2) == pytest.approx(1.75)
    rng = random.Random(0)
    n, k, a = 60_000, 4, 0.7
    matches = [rng.random() < a for _ in range(n)]
    stats = simulate_acceptance(matches, k, n)
    per_round = (stats["tokens"] - 1) / (stats["verify_steps"] - 1)  # 去掉预填充给出的第 0 个 token 与那次验证
    assert per_round == pytest.approx(mv.expected_tokens(a, k), rel=0.01)


def test_projection_arithmetic_on_given_costs() -> None:
    """给定的毫秒数上手算：plain 10、草稿 2、验证 12（K = 2）：a = 0.5 时 E = 1.75，一轮 2·2 + 12 = 16 ms，
    加速 1.75·10/16；免费草稿一轮 12 ms；K = 4 的验证 60 ms 超过 5 个 token 的 50 ms，没有保本的 a。最优 K 取加速最大者；保本的 a* 满足 E(a*)·10 = 一轮毫秒。"""
    costs = {("steered", 4, 1): 10.0, ("draft", 4, 1): 2.0, ("steered", 4, 3): 12.0, ("steered", 4, 5): 60.0}
    rows, best = mv.projection(costs, [4], [2, 4], [0.0, 0.5])
    got = {(r["draft"], r["a"], r["K"]): r for r in rows}
    r = got[("expert", 0.5, 2)]
    assert r["round_ms"] == 16.0 and r["speedup"] == round(1.75 * 10 / 16, 4)
    assert r["tok_per_s"] == round(4 * 1.75 * 1000 / 16, 1) and r["plain_tok_per_s"] == 400.0
    assert got[("free", 0.5, 2)]["speedup"] == round(1.75 * 10 / 12, 4)
    assert got[("expert", 0.0, 2)]["speedup"] == round(10 / 16, 4)
    assert mv.expected_tokens(r["breakeven_a"], 2) * 10 == pytest.approx(16.0, rel=1e-3)
    assert got[("free", 0.0, 4)]["breakeven_a"] is None  # 一轮 60 ms > (K+1)·plain = 50 ms：a = 1 也不够
    top = {(b["draft"], b["a"]): b for b in best}
    assert top[("expert", 0.5)]["best_K"] == 2 and top[("expert", 0.5)]["worth_it"]
    assert not top[("expert", 0.0)]["worth_it"]
