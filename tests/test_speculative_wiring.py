"""投机解码接入工具（issue 17）：配置校验、run_arm 的投机路径、记录与 metrics 的接受统计、main.main 端到端。

run_arm(speculation=K) 的记录与不投机时逐字段相同（output、pred、num_tokens、α），只多 drafted / accepted /
verify_steps；arm_metrics 的 "speculation" 与 speculative.acceptance_summary 对同一批结果的定义相同。
端到端用微型随机 Llama（词表与 SmolLM2 分词器相同，monkeypatch main.load_models），每次运行约一秒。
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

import main
from config import Config, ConfigError, parse_args
from evaluator import run_arm
from sampling import Sampling
from speculative import SpecResult, Speculation, acceptance_summary, generate_speculative
from stats import arm_metrics, speculation_summary
from steering_utils import SteeringParams
from test_evaluator import tiny_llama as _tiny_llama

VOCAB = 96


def tiny_llama(seed: int, vocab: int = VOCAB) -> LlamaForCausalLM:
    """test_evaluator 的小 Llama，位置上限放宽到 1024：投机解码每轮都追加 K+1 个缓存位置。"""
    return _tiny_llama(seed, vocab, max_positions=1024)
PAD = 0
PROMPTS = [[5, 17, 23, 9, 41, 7, 3], [11, 2, 60], [33, 34, 35, 36, 37], [8, 9], [12, 13, 14]]
STEER = SteeringParams(base_alpha=1.0, adaptive_scale=10.0, max_boost=1.0, metric="js")
SPEC_KEYS = ("drafted", "accepted", "verify_steps")




class FakeTokenizer:
    """run_arm 只用到 pad_token_id 与 decode。"""

    pad_token_id = PAD

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, tokens))


@pytest.fixture(scope="module")
def trio() -> dict[str, LlamaForCausalLM]:
    return {role: tiny_llama(seed) for seed, role in enumerate(("target", "expert", "base"))}


def arm(models: dict[str, Any], mode: str, speculation: Speculation | None, same_prompts: bool = False,
        **kwargs: Any) -> Any:
    """5 道题、批 2（3 批，最后一批只有一行）；专家的提示缺省与目标不同（基线草稿看专家自己的提示）。"""
    questions = [SimpleNamespace(index=10 + j, answer_idx="A", options=None) for j in range(len(PROMPTS))]
    role_prompts = {"target": [list(p) for p in PROMPTS],
                    "expert": [list(p) if same_prompts else [8, 8] + p for p in PROMPTS],
                    "base": [p[1:] or p for p in PROMPTS]}
    kwargs.setdefault("end_ids", [])
    return run_arm(mode, questions, role_prompts, models, FakeTokenizer(), vocab_size=VOCAB, batch_size=2,
                   max_new_tokens=11, steering=STEER, fast=kwargs.pop("fast", False), progress=False,
                   speculation=speculation, **kwargs)


ALPHA_KEYS = ("alpha_mean", "alpha_min", "alpha_max", "alpha")


def strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """去掉接受统计；α 换成 pytest.approx：验证前向一次算 K+1 个位置，fp32 的 α 与逐步解码只差舍入（~1e-7），
    被选中的 token 则逐个相同（output、pred、num_tokens 精确比较）。"""
    out = []
    for r in records:
        rec = {k: v for k, v in r.items() if k not in SPEC_KEYS}
        for key in ALPHA_KEYS:
            if rec.get(key) is not None:
                rec[key] = pytest.approx(rec[key], rel=1e-5, abs=1.5e-4)
        out.append(rec)
    return out


def check_invariants(records: list[dict[str, Any]], k: int) -> None:
    """每题：accepted ≤ drafted ≤ K·(verify_steps − 1)（prefill 那次验证不起草）；
    verify_steps ≤ num_tokens ≤ accepted + verify_steps。"""
    for r in records:
        assert 0 <= r["accepted"] <= r["drafted"] <= k * (r["verify_steps"] - 1)
        assert 1 <= r["verify_steps"] <= r["num_tokens"] <= r["accepted"] + r["verify_steps"]


@pytest.mark.parametrize("mode,draft", [("baseline", "expert"), ("steered", "expert"), ("steered", "fusion")])
@pytest.mark.parametrize("ends", [(), (7, 40)])
def test_run_arm_speculative_records_equal_plain(trio, mode, draft, ends):
    plain = arm(trio, mode, None, end_ids=list(ends))
    spec = arm(trio, mode, Speculation(2, draft), end_ids=list(ends))
    assert strip(spec.records) == plain.records
    assert all(set(SPEC_KEYS) <= r.keys() for r in spec.records)
    assert not any(set(SPEC_KEYS) & r.keys() for r in plain.records)
    check_invariants(spec.records, 2)
    assert spec.decode_path == {"fast": False, "compiled": False, "speculate": 2, "draft": draft}
    assert "speculate" not in plain.decode_path


@pytest.mark.parametrize("mode,draft", [("baseline", "expert"), ("steered", "fusion")])
def test_run_arm_fast_path_speculation_equals_reference_loop(trio, mode, draft):
    """fast=True 的投机解码（SpeculativeDecoder，CPU 不编译）：记录与参考循环的投机解码逐字段相同，接受统计也相同；
    结束记号落在草稿里；最后一批只有一行（补占位行）。"""
    ref = arm(trio, mode, Speculation(2, draft), end_ids=[7, 40])
    fast = arm(trio, mode, Speculation(2, draft), end_ids=[7, 40], fast=True)
    assert strip(fast.records) == [{k: v for k, v in r.items() if k not in SPEC_KEYS} for r in ref.records]
    assert [{k: r[k] for k in SPEC_KEYS} for r in fast.records] == [{k: r[k] for k in SPEC_KEYS} for r in ref.records]
    assert fast.decode_path["speculate"] == 2 and fast.decode_path["fast"] is True


def test_oracle_expert_draft_accepts_everything(trio):
    """专家就是目标（同一模型、同一提示）：基线臂的每个草稿 token 都被接受，每次验证产出 K+1 个 token。"""
    oracle = {"target": trio["target"], "expert": trio["target"]}
    spec = arm(oracle, "baseline", Speculation(3), same_prompts=True)
    assert strip(spec.records) == arm(oracle, "baseline", None, same_prompts=True).records
    check_invariants(spec.records, 3)
    for r in spec.records:
        assert r["accepted"] == r["drafted"] > 0 and r["num_tokens"] == 11
        assert r["verify_steps"] == 1 + -(-(11 - 1) // 4)  # prefill 给出第 1 个，之后每轮 4 个（最后一轮截到预算）


def test_metrics_summary_matches_acceptance_summary(trio):
    """arm_metrics 从记录算出的 speculation 与 acceptance_summary 对同一批 SpecResult 的结果相同。"""
    spec = arm(trio, "steered", Speculation(3, "expert"))
    m = arm_metrics("steered", spec.records, speculation={"k": 3, "draft": "expert"})
    # 同样的题、同样的批（batch_plan：按目标提示长度降序，每 2 题一批）直接调用 generate_speculative
    order = sorted(range(len(PROMPTS)), key=lambda j: (-len(PROMPTS[j]), j))
    per_role = [[list(p) for p in PROMPTS], [[8, 8] + p for p in PROMPTS], [p[1:] or p for p in PROMPTS]]
    results: list[SpecResult] = []
    for lo in range(0, len(order), 2):
        chunk = order[lo:lo + 2]
        results.append(generate_speculative([trio["target"], trio["expert"], trio["base"]],
                                            [[role[j] for j in chunk] for role in per_role], vocab_size=VOCAB,
                                            max_new_tokens=11, end_ids=[], pad_id=PAD, steering=STEER, k=3))
    want = acceptance_summary(results)
    got = m["speculation"]
    assert got["k"] == 3 and got["draft"] == "expert"
    for key in ("drafted", "accepted", "verify_steps", "acceptance", "tokens_per_verify"):
        assert got[key] == want[key], key
    assert speculation_summary(spec.records) == {k: got[k] for k in got if k not in ("k", "draft")}
    assert "speculation" not in arm_metrics("steered", arm(trio, "steered", None).records)


@pytest.mark.parametrize("mode", ["baseline", "steered"])
def test_coupled_sampling_run_arm_identical_sample(trio, mode):
    """采样的臂：coupled 规则与不投机的采样逐 token 相同；residual 只保证同分布，这里只检查统计的不变量。"""
    s = Sampling(1.0, 1.0, seed=3, chain=0)
    plain = arm(trio, mode, None, sampling=s)
    coupled = arm(trio, mode, Speculation(2, "expert", "coupled"), sampling=s)
    assert strip(coupled.records) == plain.records
    residual = arm(trio, mode, Speculation(2, "expert", "residual"), sampling=s)
    check_invariants(residual.records, 2)


def test_single_model_arms_without_target_are_not_speculative(trio):
    """扫参的 expert_alone / base_alone：1B 给 1B 起草省不下前向，照常解码、记录没有接受统计。"""
    result = arm(trio, "expert_alone", Speculation(2), roles=("expert",))
    assert result.records == arm(trio, "expert_alone", None, roles=("expert",)).records
    assert "speculate" not in result.decode_path


def test_run_arm_refusals(trio):
    with pytest.raises(ValueError, match="reference loop only"):
        run_arm("baseline", [SimpleNamespace(index=0, answer_idx="A", options=None)], {"target": [[5, 6]]},
                {"target": trio["target"]}, FakeTokenizer(), vocab_size=VOCAB, batch_size=1, max_new_tokens=4,
                end_ids=[], steering=None, fast=True, progress=False, speculation=Speculation(2),
                sampling=Sampling(1.0, 1.0, seed=0, chain=0))
    with pytest.raises(ValueError, match="no expert model was loaded"):
        run_arm("baseline", [SimpleNamespace(index=0, answer_idx="A", options=None)], {"target": [[5, 6]]},
                {"target": trio["target"]}, FakeTokenizer(), vocab_size=VOCAB, batch_size=1, max_new_tokens=4,
                end_ids=[], steering=None, fast=False, progress=False, speculation=Speculation(2))


# ---------------------------------------------------------------------------
# 配置：CLI 从 Config 派生，非法组合在加载任何模型之前失败
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["--speculate", "2", "--temperature", "0.7"], "add --no-fast"),
    (["--speculate", "17", "--no-fast"], "from 0 (off) to 16"),
    (["--speculate", "-1", "--no-fast"], "from 0 (off) to 16"),
    (["--speculate", "2", "--no-fast", "--draft", "fusion"], "--modes steered"),
    (["--speculate", "2", "--no-fast", "--draft", "fusion", "--sweep"], "--draft fusion"),
    (["--speculate", "2", "--no-fast", "--scoring", "letter"], "--scoring letter"),
    (["--draft", "fusion"], "add --speculate K"),
    (["--speculative-sampling", "coupled"], "add --speculate K"),
    (["--min-acceptance", "0.3"], "add --speculate K"),
    (["--speculate", "2", "--no-fast", "--min-acceptance", "1.5"], "[0, 1]"),
])
def test_config_refusals(argv, needle):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert needle in str(err.value)


@pytest.mark.parametrize("argv", [["--speculate", "2", "--draft", "nonsense"],
                                  ["--speculate", "2", "--speculative-sampling", "exact"],
                                  ["--speculate", "two"]])
def test_bad_flag_values_exit(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_config_accepts_and_roles():
    cfg, _ = parse_args(["--speculate", "4", "--no-fast", "--draft", "fusion", "--modes", "steered",
                         "--speculative-sampling", "coupled", "--min-acceptance", "0.2", "--temperature", "0.7"])
    assert (cfg.speculate, cfg.draft, cfg.speculative_sampling, cfg.min_acceptance) == (4, "fusion", "coupled", 0.2)
    assert cfg.model_roles == ("target", "expert", "base")
    assert Config().speculate == 0 and Config().model_roles == ("target", "expert", "base")
    assert Config(modes=("baseline",)).model_roles == ("target",)
    assert Config(modes=("baseline",), speculate=2, fast=False).model_roles == ("target", "expert")


# ---------------------------------------------------------------------------
# main.main 端到端：微型模型（词表 = SmolLM2 分词器），投机与不投机的运行目录逐条相同（只多接受统计）
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_trio(smol_tokenizer: Any) -> dict[str, LlamaForCausalLM]:
    return {role: tiny_llama(seed, len(smol_tokenizer)) for seed, role in enumerate(("target", "expert", "base"))}


@pytest.fixture()
def tiny_models(monkeypatch: pytest.MonkeyPatch, tiny_trio: dict[str, LlamaForCausalLM]) -> dict[str, Any]:
    """main 加载微型模型：按 Config.model_roles 给角色（只跑基线 + 投机时是目标与专家）。"""
    def fake_load_models(cfg: Config, tokenizer: Any, device: torch.device) -> tuple[dict[str, Any], int]:
        return {r: tiny_trio[r] for r in cfg.model_roles}, len(tokenizer)

    monkeypatch.setattr(main, "load_models", fake_load_models)
    return tiny_trio


def _data(path: Path) -> Path:
    rows = [{"question": f"A {20 + i}-year-old has a fever. Which drug is first line ({i})?", "answer": "x",
             "options": {"A": "aspirin", "B": "ibuprofen", "C": "paracetamol", "D": "none"},
             "answer_idx": "ABCD"[i % 4]} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[list, dict, str]:
    run_dir = tmp_path / name
    argv = ["--demo", "--data-file", str(_data(tmp_path / "q.jsonl")), "--limit", "4", "--batch-size", "2",
            "--max-new-tokens", "8", "--no-fast", "--output-dir", str(run_dir), *extra]
    code = main.main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    return records, json.loads((run_dir / "metrics.json").read_text()), out.out


def test_main_speculative_run_equals_plain_run(tmp_path, tiny_models, capsys):
    plain, m_plain, _ = _run(tmp_path, "plain", capsys)
    spec, m_spec, text = _run(tmp_path, "spec", capsys, "--speculate", "2")
    assert strip(spec) == plain
    check_invariants(spec, 2)
    for name in ("baseline", "steered"):
        sp = m_spec[name]["speculation"]
        mine = [r for r in spec if r["mode"] == name]
        assert sp["k"] == 2 and sp["draft"] == "expert"
        assert sp["drafted"] == sum(r["drafted"] for r in mine) and sp["accepted"] == sum(r["accepted"] for r in mine)
        assert sp["tokens_per_verify"] == sum(r["num_tokens"] for r in mine) / sum(r["verify_steps"] for r in mine)
        assert f"{name}: speculative K=2 (expert draft): acceptance" in text
        assert m_spec[name]["timing"]["decode_path"]["speculate"] == 2
        want = {k: v for k, v in m_plain[name].items() if k != "timing"}
        if want.get("alpha_mean") is not None:
            want["alpha_mean"] = pytest.approx(want["alpha_mean"], rel=1e-5)
        assert {k: v for k, v in m_spec[name].items() if k not in ("timing", "speculation")} == want
    assert "speculation" not in m_plain["baseline"]
    # 续跑一个已完成的运行：带接受统计的记录通过 run_folder 的校验，结果不变
    assert main.main(["--resume", str(tmp_path / "spec")]) == 0
    capsys.readouterr()
    again = [json.loads(line) for line in (tmp_path / "spec" / "predictions.jsonl").read_text().splitlines()]
    assert again == spec


def test_main_baseline_only_loads_expert_as_draft(tmp_path, tiny_models, capsys):
    plain, _, _ = _run(tmp_path, "plain", capsys, "--modes", "baseline")
    spec, metrics, _ = _run(tmp_path, "spec", capsys, "--modes", "baseline", "--speculate", "3")
    assert strip(spec) == plain and metrics["baseline"]["speculation"]["k"] == 3
    config = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert set(config["models"]) == {"target", "expert"}
