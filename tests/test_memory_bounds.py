"""上界在加载权重之前（issue 15）：--max-new-tokens 对模型上下文的检查、--skip-invalid 跳过超长题并记下原因，
以及 KV 缓存 + 权重的内存估计（与真实缓存对象逐字节相同）与它的拒绝消息。

微型随机 Llama（CPU）与真实的 SmolLM2 分词器（只用它的配置与分词器；权重从不加载——load_models 被换掉）。
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

import fast.decoder
import main
from config import parse_args
from evaluator import ModelAdapter, cache_length, kv_cache_bytes, left_pad, run_arm
from model_loader import available_memory, weight_bytes
from steering_utils import SteeringParams
from shared_runs import tiny_llama

VOCAB = 96
PROMPTS = [[5, 17, 23, 9, 41, 7, 3], [11, 2, 60], [33, 34, 35, 36, 37]]


pytestmark = pytest.mark.usefixtures("one_thread")  # 原因见 tests/conftest.py


def _tiny(seed: int, vocab: int = VOCAB, *, tie: bool = False, dtype: torch.dtype = torch.float32,
          head_dim: int | None = None) -> LlamaForCausalLM:
    return tiny_llama(vocab, seed, head_scale=1.0, max_positions=256, tie=tie, head_dim=head_dim, dtype=dtype)


def _cache_nbytes(cache: Any) -> int:
    """一个 transformers 缓存对象（DynamicCache / StaticCache）里全部 K、V 张量的真实字节数。"""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


# ---------------------------------------------------------------------------
# 估计 == 真实字节
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("dtype", "head_dim"), [(torch.float32, None), (torch.bfloat16, 32)])
def test_kv_estimate_equals_reference_loop_cache(dtype: torch.dtype, head_dim: int | None) -> None:
    """参考循环的 DynamicCache：prefill 宽 P、再喂 n 个 token 之后，真实字节 == kv_cache_bytes(B, P + n)。"""
    model = _tiny(0, dtype=dtype, head_dim=head_dim)
    adapter = ModelAdapter(model)
    ids, mask = left_pad(PROMPTS, 0, torch.device("cpu"))
    with torch.inference_mode():
        adapter.prefill(ids, mask)
        for _ in range(4):
            adapter.decode(torch.full((len(PROMPTS), 1), 9))
    assert adapter.cache is not None
    width = ids.shape[1]
    assert _cache_nbytes(adapter.cache) == kv_cache_bytes(model.config, len(PROMPTS), width + 4, dtype) > 0


def test_kv_estimate_equals_fast_path_caches_allocated_by_run_arm(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_arm 的快速路径（引导臂，三个角色）：FastDecoder 真实分配的 StaticCache 字节之和 ==
    Σ_角色 kv_cache_bytes(批, cache_length(最长提示, 新 token, fast=True))——main.check_memory 用的同一规则。"""
    trio = {role: _tiny(seed) for seed, role in enumerate(("target", "expert", "base"))}
    made: list[Any] = []
    original = fast.decoder.FastDecoder

    class Spy(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(fast.decoder, "FastDecoder", Spy)
    questions = [SimpleNamespace(index=j, answer_idx="A", options={"A": "a", "B": "b", "C": "c", "D": "d"})
                 for j in range(len(PROMPTS))]
    role_prompts = {r: [list(p) for p in PROMPTS] for r in trio}
    role_prompts["expert"][1] = role_prompts["expert"][1] + [4] * 9  # 专家的提示最长：缓存按所有角色的最长提示
    tok = SimpleNamespace(pad_token_id=0, decode=lambda t, skip_special_tokens=True: " ".join(map(str, t)))
    new_tokens, batch_size = 130, 8  # 12 + 130 越过一个 128 的长度桶
    run_arm("steered", questions, role_prompts, trio, tok, vocab_size=VOCAB, batch_size=batch_size,
            max_new_tokens=new_tokens, end_ids=[], steering=SteeringParams(), fast=True, progress=False)
    (decoder,) = made
    real = sum(_cache_nbytes(c) for c in decoder.caches)
    longest = max(len(p) for ps in role_prompts.values() for p in ps)
    batch = min(batch_size, len(questions))
    length = cache_length(longest, new_tokens, fast=True)
    assert length == 256 and decoder.batch_size == batch
    assert real == sum(kv_cache_bytes(m.config, batch, length, torch.float32) for m in trio.values())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_estimate_equals_real_parameters(tie: bool, dtype: torch.dtype) -> None:
    """权重估计（meta 设备上按配置构造、数参数，共享的只数一次）== 真实模型参数的字节数。"""
    model = _tiny(0, tie=tie, dtype=dtype)
    assert weight_bytes(model.config, dtype) == sum(p.nbytes for p in model.parameters())
    assert weight_bytes(model.config, dtype, four_bit=True) < weight_bytes(model.config, dtype)


def test_cache_length_rules() -> None:
    assert cache_length(100, 28, fast=True) == 128 and cache_length(100, 29, fast=True) == 256
    assert cache_length(100, 28, fast=False) == 128
    assert cache_length(100, 28, fast=False, speculate=4) == 100 + 5 * 28  # 投机循环的最坏情形
    assert available_memory(torch.device("cpu")) is None or available_memory(torch.device("cpu")) > 0


# ---------------------------------------------------------------------------
# 经 main：拒绝（加载任何权重之前）与 --skip-invalid
# ---------------------------------------------------------------------------

def _must_not_load(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("weights must not load")


def test_memory_refusal_names_need_available_and_flags(monkeypatch: pytest.MonkeyPatch, smol_path: str,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """可用内存不够权重 + 缓存：退出码 2，消息写明需要多少、可用多少、该降哪个参数；没有任何权重被加载。"""
    monkeypatch.setattr(main, "load_models", _must_not_load)
    monkeypatch.setattr(main, "available_memory", lambda device: 100 * 2 ** 20)  # 100 MiB
    code = main.main(["--demo", "--limit", "2", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "not enough memory on cpu" in err and "only 0.10 GiB is available" in err
    assert "Lower --batch-size or --max-new-tokens" in err and "KV caches" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # 失败时不留下空的运行目录


def test_huge_max_new_tokens_without_context_bound_is_refused_by_the_memory_check(
        monkeypatch: pytest.MonkeyPatch, smol_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """模型配置没有上下文上界时（context_limit = None），--max-new-tokens 1000000000 以前会在分配缓存时被杀死、
    没有消息；现在由内存估计拒绝（真实的可用内存），退出码 2。"""
    monkeypatch.setattr(main, "load_models", _must_not_load)
    monkeypatch.setattr(main, "context_limit", lambda spec: None)
    code = main.main(["--demo", "--limit", "2", "--max-new-tokens", "1000000000", "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "not enough memory" in err and "--max-new-tokens" in err


def test_max_new_tokens_alone_beyond_context(monkeypatch: pytest.MonkeyPatch, smol_path: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--max-new-tokens 本身 ≥ 上下文：整个运行拒绝，--skip-invalid 也一样（没有一道题放得下），消息给出上限。"""
    monkeypatch.setattr(main, "load_models", _must_not_load)
    for extra in ((), ("--skip-invalid",)):
        code = main.main(["--demo", "--limit", "2", "--max-new-tokens", "8192", *extra,
                          "--output-dir", str(tmp_path / f"r{len(extra)}")])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "--max-new-tokens=8192 exceeds the target model's context of 8192 tokens" in err
        assert "no prompt fits beside it. Lower --max-new-tokens to at most" in err


def _cfg(*argv: str) -> Any:
    return parse_args(["--demo", *argv])[0]


def test_skip_invalid_skips_questions_beyond_the_context(monkeypatch: pytest.MonkeyPatch, smol_tokenizer: Any) -> None:
    """提示 + 新 token 超出上下文的题：默认拒绝；--skip-invalid 时跳过并按坏数据行的格式记下原因，其余题保留，
    α 轨迹的默认题目换成第一道留下的题。"""
    cfg = _cfg("--limit", "6", "--max-new-tokens", "16", "--no-forced-answer")
    data = main.load_data(cfg, main.Dist())
    lengths = main.prompt_lengths(cfg, data.questions, smol_tokenizer)
    limit = sorted(lengths["target"])[3] + 16  # 最长的两道（或并列的）题放不下
    monkeypatch.setattr(main, "context_limit", lambda spec: limit)
    with pytest.raises(main.ConfigError, match="--skip-invalid skips them"):
        main.check_context(cfg, data, smol_tokenizer, None)
    cfg = _cfg("--limit", "6", "--max-new-tokens", "16", "--no-forced-answer", "--skip-invalid")
    kept = main.check_context(cfg, data, smol_tokenizer, None)
    over = [q.index for q, n in zip(data.questions, lengths["target"]) if n + 16 > limit]
    assert over and [q.index for q in kept.questions] == [q.index for q in data.questions if q.index not in over]
    assert [s["where"] for s in kept.skipped] == [f"question {i}" for i in over]
    assert all("exceeds the target model's context of" in s["reason"] for s in kept.skipped)
    assert kept.fingerprint == data.fingerprint  # 续跑核对的是读入的数据：同样的过滤得到同样的题
    assert kept.trace_index in {q.index for q in kept.questions}


def test_skip_invalid_beyond_context_through_main(monkeypatch: pytest.MonkeyPatch, smol_tokenizer: Any,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """经 main（微型模型代替权重）：跳过的题写进 config.json 的 skipped_invalid_rows，metrics.json 计数，
    predictions.jsonl 只有留下的题。"""
    cfg = _cfg("--limit", "4")
    data = main.load_data(cfg, main.Dist())
    lengths = main.prompt_lengths(cfg, data.questions, smol_tokenizer)
    limit = max(lengths["target"]) + 4 - 1  # 最长的那道（加 4 个新 token 与 cue）放不下
    monkeypatch.setattr(main, "context_limit", lambda spec: limit)
    model = _tiny(0, vocab=len(smol_tokenizer))
    monkeypatch.setattr(main, "load_models", lambda cfg, tok, device: ({"target": model}, len(tok)))
    run_dir = tmp_path / "run"
    code = main.main(["--demo", "--limit", "4", "--max-new-tokens", "4", "--modes", "baseline", "--skip-invalid",
                      "--threads", "1", "--output-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 0, err
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    preds = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    skipped = config["skipped_invalid_rows"]
    assert skipped and all("context" in s["reason"] for s in skipped)
    assert metrics["skipped_invalid_rows"] == len(skipped) and metrics["baseline"]["n"] == 4 - len(skipped)
    assert {p["index"] for p in preds} == {q.index for q in data.questions} - {int(s["where"].split()[1]) for s in skipped}
    assert "skipped" in err
