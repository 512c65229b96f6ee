"""issue 15“运行目录不会被悄悄弄坏”：续跑重算它能重算的（记录的 gold / pred / correct / 第二阶段字段、类型与范围），
并钉住它的输入（配置副本、题目、模型、分词器、torch/transformers 版本，见 fingerprint.py）。RELIABILITY.md 的
“Forged records and changed inputs”一节逐行对应这里的测试。

手段：一次进程内的 main.main 运行（--demo 的真实 SmolLM2 分词器 + 三个微型随机 Llama，monkeypatch main.load_models，
约 2 秒）造出一个完成的运行目录（模块级夹具）；每个测试把它复制到 tmp_path、篡改、再 --resume。
拒绝的测试都把 load_models 换成让测试失败的函数：拒绝发生在加载任何权重之前。其余是直接的函数调用。
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fingerprint
import main
from config import Config
from data_loader import Question
from scoring import RecordRules, text_record, verify_record

N, BATCH, MAX_NEW = 4, 2, 4


def _row(i: int) -> dict[str, Any]:
    """一道很短的 4 选项题。"""
    return {"question": f"A {20 + i}-year-old has a fever. Which drug is first line ({i})?", "answer": "paracetamol",
            "options": {"A": "aspirin", "B": "ibuprofen", "C": "paracetamol", "D": "none"}, "answer_idx": "ABCD"[i % 4]}


def _tiny_llama(vocab: int, seed: int) -> LlamaForCausalLM:
    """2 层、hidden 32 的随机 Llama（词表与 SmolLM2 分词器相同）。"""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _use_tiny(mp: pytest.MonkeyPatch, trio: dict[str, LlamaForCausalLM]) -> None:
    """main 加载微型模型（分词器仍是真实的 SmolLM2）。"""
    def fake_load_models(cfg: Config, tokenizer: Any, device: torch.device) -> tuple[dict[str, Any], int]:
        return {r: trio[r] for r in cfg.model_roles}, len(tokenizer)

    mp.setattr(main, "load_models", fake_load_models)


def _no_weights(mp: pytest.MonkeyPatch) -> None:
    """加载权重就让测试失败：证明拒绝发生在任何权重加载之前（分词器可以加载：它先于权重）。"""
    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no weights may be loaded before the refusal")

    mp.setattr(main, "load_models", must_not_load)


@pytest.fixture(scope="module")
def trio(smol_tokenizer: Any) -> dict[str, LlamaForCausalLM]:
    return {role: _tiny_llama(len(smol_tokenizer), seed) for seed, role in enumerate(("target", "expert", "base"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, trio: dict[str, LlamaForCausalLM]) -> Path:
    """一个完成的运行目录（基线 + 引导，各 N 条记录）。"""
    root = tmp_path_factory.mktemp("finished")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(_row(i)) + "\n" for i in range(N)), encoding="utf-8")
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        _use_tiny(mp, trio)
        code = main.main(["--demo", "--data-file", str(data), "--limit", str(N), "--batch-size", str(BATCH),
                          "--max-new-tokens", str(MAX_NEW), "--no-fast", "--output-dir", str(run_dir)])
    assert code == 0
    return run_dir


@pytest.fixture()
def run_dir(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smol_tokenizer: Any) -> Iterator[Path]:
    """完成的运行目录的一份副本（测试随意篡改）。续跑时 main 直接拿会话共享的 SmolLM2 分词器（省掉每次约 1 秒的加载；
    它的指纹因而必须与夹具运行时新加载的那个相同——分词器指纹是确定的）。"""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    monkeypatch.setattr(main, "load_tokenizer", lambda spec: smol_tokenizer)
    yield copy


def _resume(run_dir: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main.main(["--resume", str(run_dir), *extra])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    return code, text


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def _write_records(run_dir: Path, records: list[dict[str, Any]]) -> None:
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _edit_json(path: Path, change: Any) -> None:
    obj = json.loads(path.read_text(encoding="utf-8"))
    change(obj)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


# ---------------------------------------------------------------------------
# 1. 续跑重算记录：伪造的记录被拒绝，绝不计入指标
# ---------------------------------------------------------------------------


def test_untouched_finished_run_resumes(run_dir: Path, trio: dict[str, LlamaForCausalLM],
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """对照：没动过的完成目录续跑成功（核对不会误拒真实的记录，包括第二阶段的字母与 α 统计）。"""
    _use_tiny(monkeypatch, trio)
    before = _records(run_dir)
    code, text = _resume(run_dir, capsys)
    assert code == 0, text
    assert _records(run_dir) == before
    assert any(r["pred_forced"] is not None for r in before) and any("alpha" in r for r in before)
    # 第二阶段的字母由模型重算（fp32、CPU、与写记录时同样的批）：逐个相同，未被误拒
    assert f"[main] checking {sum(r['pred_forced'] is not None for r in before)} stage-2 letters of resumed records" in text
    assert all(len(r["output_ids"]) == r["num_tokens"] for r in before)


def _forge_gold(recs: list[dict[str, Any]]) -> int:
    """把一条答错的记录的 gold 改成它的 pred（correct 跟着改）：旧的检查（pred/correct 自洽）看不出来。"""
    k = next(i for i, r in enumerate(recs) if not r["correct"] and r["pred"] is not None)
    recs[k].update(gold=recs[k]["pred"], correct=True)
    return k


def _forge_output(recs: list[dict[str, Any]]) -> int:
    """文本不动，把 pred_text、pred、correct 一起改成“答对”、pred_forced 清空：各字段彼此自洽，旧的检查看不出来。"""
    k = next(i for i, r in enumerate(recs) if not r["correct"])
    gold = recs[k]["gold"]
    recs[k].update(pred_text=gold, pred=gold, pred_forced=None, correct=True)
    return k


@pytest.mark.parametrize("forge,needle", [
    (_forge_gold, "'gold' differs from the data's answer_idx (stored"),
    (_forge_output, "'pred_text' differs from the answer read from 'output' (stored"),
])
def test_forged_record_refused_before_weights(forge: Any, needle: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """伪造的准确率：改 predictions.jsonl 里自洽的几项再 --resume 一个完成的运行。拒绝（退出码 2，文件:行号），
    predictions.jsonl 与 metrics.json 都不改写：伪造的记录从不进入指标。"""
    _no_weights(monkeypatch)
    recs = _records(run_dir)
    k = forge(recs)
    _write_records(run_dir, recs)
    before = {f: (run_dir / f).read_bytes() for f in ("predictions.jsonl", "metrics.json")}
    code, text = _resume(run_dir, capsys)
    assert code == 2
    assert f"{run_dir / 'predictions.jsonl'}:{k + 1}: {needle}" in text and "recomputed" in text
    assert {f: (run_dir / f).read_bytes() for f in before} == before


def test_forged_stage2_letter_refused_with_the_models(run_dir: Path, trio: dict[str, LlamaForCausalLM],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """伪造的第二阶段字母：文本里没有答案的一条记录，pred_forced、pred、correct 一起改成“答对”（各字段自洽，
    文本与 output_ids 不动）。以前：退出码 0、伪造的准确率进入 metrics.json。现在：加载模型之后、任何新的解码之前
    由 output_ids 重算第二阶段的字母，不一致 → 退出码 2、文件:行号，predictions.jsonl 与 metrics.json 不变。"""
    _use_tiny(monkeypatch, trio)
    recs = _records(run_dir)
    k = next(i for i, r in enumerate(recs) if r["pred_forced"] is not None and not r["correct"])
    stored = recs[k]["pred_forced"]
    recs[k].update(pred_forced=recs[k]["gold"], pred=recs[k]["gold"], correct=True)
    # 按工具自己的格式写（ensure_ascii=False）：续跑在重算之前把文件合并、排序成这个格式（consolidate），字节因此不变
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs),
                                               encoding="utf-8")
    before = {f: (run_dir / f).read_bytes() for f in ("predictions.jsonl", "metrics.json")}
    code, text = _resume(run_dir, capsys)
    assert code == 2, text
    assert (f"{run_dir / 'predictions.jsonl'}:{k + 1}: 'pred_forced' differs from stage 2 recomputed with the models "
            f"(stored \"{recs[k]['gold']}\", recomputed \"{stored}\")") in text
    assert "[main] checking" in text and "stage-2 letters of resumed records" in text
    assert {f: (run_dir / f).read_bytes() for f in before} == before


@pytest.mark.parametrize("change,needle", [
    (lambda r: r["output_ids"].__setitem__(0, r["output_ids"][0] + 1), "'output' differs from the decoded 'output_ids'"),
    (lambda r: r["output_ids"].append(5), "'output_ids' must be a list of num_tokens"),
    (lambda r: r["output_ids"].__setitem__(0, 10 ** 9), "'output_ids' must be a list of num_tokens"),
    (lambda r: r.update(output_ids="1 2"), "'output_ids' must be a list of num_tokens"),
    (lambda r: r.pop("output_ids"), "missing keys output_ids"),
], ids=["id_edited", "longer", "beyond_vocab", "string", "missing"])
def test_output_ids_edited_apart_from_output_refused_before_weights(change: Any, needle: str, run_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """output_ids 与 output 必须一起：改一个 id（文本不动）、多一个 id、超出词表、类型不对、缺失——退出码 2、文件:行号，
    在加载任何权重之前（分词器加载之后：解码要它）。"""
    _no_weights(monkeypatch)
    recs = _records(run_dir)
    k = next(i for i, r in enumerate(recs) if r["num_tokens"] > 0)
    change(recs[k])
    _write_records(run_dir, recs)
    code, text = _resume(run_dir, capsys)
    assert code == 2 and f"{run_dir / 'predictions.jsonl'}:{k + 1}: {needle}" in text, text[-800:]


@pytest.mark.parametrize("field,value,needle", [
    ("index", [1], "not a record of this run: 'index'"),  # 以前：TypeError unhashable（traceback）
    ("index", "1", "not a record of this run: 'index'"),
    ("num_tokens", MAX_NEW + 1, "'num_tokens' must be an integer from 0 to --max-new-tokens"),
    ("correct", 1, "'correct' must be true or false"),
    ("output", None, "'output' must be a string"),
    ("extra", 1, "never has: extra"),
    ("alpha_mean", 123.0, "'alpha_mean' differs from the saved alpha list (stored 123.0"),
])
def test_mistyped_record_field_refused(field: str, value: Any, needle: str, run_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _no_weights(monkeypatch)
    recs = _records(run_dir)
    k = next(i for i, r in enumerate(recs) if field != "alpha_mean" or r.get("alpha"))
    recs[k][field] = value
    _write_records(run_dir, recs)
    code, text = _resume(run_dir, capsys)
    assert code == 2 and f"{run_dir / 'predictions.jsonl'}:{k + 1}: " in text and needle in text


@pytest.mark.parametrize("line,needle", [
    ('{"mode": "baseline", "mode": "steered"}', "duplicate key 'mode'"),
    ('{"mode": "\\ud800"}', "holds a lone surrogate \\ud800"),
    ('{"index": 1' + "0" * 5000 + "}", "holds an integer with more than 4300 digits"),
    ("[" * 100000 + "]" * 100000, "JSON nested too deeply"),
    ('{"alpha_mean": NaN}', "NaN is not a JSON value"),
], ids=["duplicate_key", "lone_surrogate", "huge_int", "deep_nesting", "nan"])
def test_odd_json_in_predictions_refused(line: str, needle: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """predictions.jsonl 里的怪值：退出码 2、文件:行号、无 traceback（以前超长整数与过深嵌套都是 traceback）。"""
    _no_weights(monkeypatch)
    path = run_dir / "predictions.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:2] + [line] + lines[2:]) + "\n", encoding="utf-8")
    code, text = _resume(run_dir, capsys)
    assert code == 2 and f"{path}:3: not a valid JSON record ({needle}" in text, text[:600]


QUESTION = Question(index=0, question="q?", options={"A": "aspirin", "B": "ibuprofen", "C": "paracetamol", "D": "none"},
                    answer_idx="C", answer="paracetamol")
RULES = RecordRules(modes=("baseline", "steered"), fused=frozenset({"steered"}), questions={0: QUESTION},
                    forced=True, max_new_tokens=8)


def _rec(text: str = "The answer is B.", **changes: Any) -> dict[str, Any]:
    rec = {**text_record("baseline", QUESTION, text, 5), "nonfinite_target_stops": 0, "output_ids": [7, 8, 9, 10, 11],
           **changes}
    return rec


def test_verify_record_direct() -> None:
    """scoring.verify_record 直接调用：写记录的同一个函数（text_record）重算，第二阶段规则，类型。"""
    assert verify_record(_rec(), RULES) is None
    assert verify_record(_rec("no idea", pred_forced="C", pred="C", correct=True), RULES) is None
    # 因目标 logits 非有限而停止的题不走第二阶段：没有字母也合法；计数只能是 0 或 1
    assert verify_record(_rec("no idea", nonfinite_target_stops=1), RULES) is None
    assert "'nonfinite_target_stops' must be 0 or 1" in verify_record(_rec(nonfinite_target_stops=2), RULES)
    # 第二阶段开启、文本里没有答案：pred_forced 不能为 null；关闭时必须为 null。
    assert "'pred_forced' is null, but stage 2 is on" in verify_record(_rec("no idea"), RULES)
    off = RecordRules(**{**RULES.__dict__, "forced": False})
    assert "'pred_forced' differs from stage 2's rule (stored \"C\", recomputed null)" in verify_record(
        _rec("no idea", pred_forced="C", pred="C", correct=True), off)
    assert verify_record(_rec(pred="C"), RULES) == "'pred' differs from pred_text, or pred_forced when pred_text is null (stored \"C\", recomputed \"B\")"
    assert "'correct' differs from (pred == gold) (stored true, recomputed false)" in verify_record(_rec(correct=True), RULES)
    assert "'gold' must be null or one of A, B, C, D" in verify_record(_rec(gold=["C"]), RULES)
    assert "must be a JSON object" in verify_record([1], RULES)
    steered = {**_rec(mode="steered"), "alpha": [1.0, 1.5], "alpha_mean": 1.25, "alpha_min": 1.0, "alpha_max": 1.5,
               "nonfinite_steps": 0}
    assert verify_record(steered, RULES) is None
    assert "'alpha' must be a list" in verify_record({**steered, "alpha": [1.0, "x"]}, RULES)
    assert "'nonfinite_steps' must be an integer from 0 to num_tokens" in verify_record({**steered, "nonfinite_steps": -1}, RULES)
    assert "missing keys alpha" in verify_record({k: v for k, v in steered.items() if k != "alpha"}, RULES)
    spec = RecordRules(**{**RULES.__dict__, "speculative": frozenset({"baseline"})})
    counts = {"drafted": 4, "accepted": 3, "verify_steps": 2}
    assert verify_record({**_rec(), **counts}, spec) is None
    assert "accepted <= drafted" in verify_record({**_rec(), **counts, "accepted": 5}, spec)
    assert "never has: accepted, drafted, verify_steps" in verify_record({**_rec(), **counts}, RULES)
    # output_ids：num_tokens 个词表内的整数；decode 给出时 output 必须是它们的解码（与 make_record 同一个调用）
    decoded = RecordRules(**{**RULES.__dict__, "decode": lambda ids: "The answer is B.", "vocab_size": 12})
    assert verify_record(_rec(), decoded) is None
    assert "'output' differs from the decoded 'output_ids' (stored \"The answer is C.\", recomputed \"The answer is B.\")" \
        in verify_record(_rec("The answer is C.", pred="C", pred_text="C", correct=True), decoded)
    assert "integers from 0 to 11" in verify_record(_rec(output_ids=[7, 8, 9, 10, 12]), decoded)
    assert "'output_ids' must be a list of num_tokens (5) integers >= 0" in verify_record(_rec(output_ids=[1, 2]), RULES)
    assert "'output_ids' must be a list" in verify_record(_rec(output_ids=[1, 2, 3, 4, True]), RULES)


# ---------------------------------------------------------------------------
# 2. 续跑钉住输入：配置副本、模型、分词器、版本
# ---------------------------------------------------------------------------


def test_fresh_run_writes_fingerprints(finished: Path) -> None:
    fp = json.loads((finished / "fingerprints.json").read_text(encoding="utf-8"))
    stored = json.loads((finished / "config.json").read_text(encoding="utf-8"))
    assert fp["questions_sha256"] == stored["questions_sha256"]
    assert fp["config"]["base_alpha"] == stored["config"]["base_alpha"]
    assert set(fp["models"]) == {"target", "expert", "base"} and fp["models"]["target"]["kind"] == "gguf"
    assert len(fp["models"]["target"]["head_sha256"]) == 64 and fp["tokenizer"]["size"] > 0
    assert set(fp["versions"]) == {"torch", "transformers"}


def test_edited_config_json_refused_naming_the_field(run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """config.json 的 base_alpha 在两次之间被改：续跑拒绝、指名字段，在读记录与加载任何东西之前。"""
    _no_weights(monkeypatch)
    monkeypatch.setattr(main, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded"))
    _edit_json(run_dir / "config.json", lambda c: c["config"].update(base_alpha=0.5))
    code, text = _resume(run_dir, capsys)
    assert code == 2 and "base_alpha: 1.0 → 0.5" in text and "changed after the run started" in text


@pytest.mark.parametrize("key,value,needle", [
    ("batch_size", "8", "config key 'batch_size' holds '8', but it must be an integer"),
    ("modes", 5, "config key 'modes' holds 5, but it must be a list"),
    ("load_in_4bit", "no", "config key 'load_in_4bit' holds 'no', but it must be true or false"),
    ("sweep_alphas", [0, "x"], "must be a list whose every item is a number"),
])
def test_mistyped_config_json_refused(key: str, value: Any, needle: str, run_dir: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """以前："batch_size": "8" 在 Config 的校验里变成 TypeError 的 traceback。"""
    _no_weights(monkeypatch)
    _edit_json(run_dir / "config.json", lambda c: c["config"].update({key: value}))
    code, text = _resume(run_dir, capsys)
    assert code == 2 and needle in text and str(run_dir / "config.json") in text


def test_config_json_with_duplicate_key_refused(run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _no_weights(monkeypatch)
    path = run_dir / "config.json"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('"base_alpha": 1.0,', '"base_alpha": 1.0, "base_alpha": 0.5,', 1), encoding="utf-8")
    code, out = _resume(run_dir, capsys)
    assert code == 2 and "duplicate key 'base_alpha'" in out and str(path) in out


@pytest.mark.parametrize("section,change,needle", [
    ("models", lambda fp: fp["models"]["expert"].update(head_sha256="0" * 64), "models.expert.head_sha256: stored '000"),
    ("models", lambda fp: fp["models"]["target"].update(size=1), "models.target.size: stored 1, now "),
    ("tokenizer", lambda fp: fp["tokenizer"].update(sha256="0" * 64), "tokenizer.sha256: stored '000"),
    ("missing", None, "fingerprints.json: missing"),
])
def test_changed_inputs_refused_before_weights(section: str, change: Any, needle: str, run_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """模型文件或分词器与开始时不同（通过改保存的指纹来模拟：比较是对称的）：拒绝、指名那一项，在加载权重之前。"""
    _no_weights(monkeypatch)
    if change is None:
        (run_dir / "fingerprints.json").unlink()
    else:
        _edit_json(run_dir / "fingerprints.json", change)
    code, text = _resume(run_dir, capsys)
    assert code == 2 and needle in text


def test_version_change_needs_the_flag(run_dir: Path, trio: dict[str, LlamaForCausalLM],
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """torch 版本与开始时不同：默认拒绝并提示 --allow-version-change；给了它则大声警告、记进 events.jsonl、完成。"""
    _no_weights(monkeypatch)
    _edit_json(run_dir / "fingerprints.json", lambda fp: fp["versions"].update(torch="1.0.0"))
    code, text = _resume(run_dir, capsys)
    assert code == 2 and "versions.torch: stored '1.0.0', now " in text and "--allow-version-change" in text
    _use_tiny(monkeypatch, trio)
    code, text = _resume(run_dir, capsys, "--allow-version-change")
    assert code == 0, text
    assert "WARNING: --allow-version-change" in text and "versions.torch: stored '1.0.0'" in text
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any(e["event"] == "version_change_allowed" and "versions.torch" in e["changes"][0] for e in events)
    # 模型变化不能用这个参数放行。
    _no_weights(monkeypatch)
    _edit_json(run_dir / "fingerprints.json", lambda fp: fp["models"]["target"].update(size=1))
    code, text = _resume(run_dir, capsys, "--allow-version-change")
    assert code == 2 and "models.target.size" in text


def test_model_fingerprint_of_local_folder_and_gguf(tmp_path: Path) -> None:
    """本地目录：每个文件的名字、大小、前 1 MiB 的 sha256；改前 1 MiB 内的一个字节、改大小、加文件都会变；
    1 MiB 之后的改动（同大小）按设计看不见。GGUF：文件大小 + 文件头。"""
    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\0" * (fingerprint.HEAD_BYTES + 10))
    (folder / "config.json").write_text('{"a": 1}', encoding="utf-8")
    first = fingerprint.model_fingerprint(str(folder))
    assert first["kind"] == "local folder" and set(first["files"]) == {"model.safetensors", "config.json"}
    data = bytearray(weights.read_bytes())
    data[5] = 1
    weights.write_bytes(bytes(data))
    assert fingerprint.model_fingerprint(str(folder)) != first
    data[5] = 0
    data[-1] = 1  # 1 MiB 之后
    weights.write_bytes(bytes(data))
    assert fingerprint.model_fingerprint(str(folder)) == first
    (folder / "model.safetensors.index.json").write_text("{}", encoding="utf-8")
    assert "model.safetensors.index.json" in fingerprint.model_fingerprint(str(folder))["files"]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    got = fingerprint.model_fingerprint(str(gguf))
    assert got["kind"] == "gguf" and got["size"] == 104


def test_hub_commit_from_cache(tmp_path: Path) -> None:
    """hub id：本地缓存里 refs/main 指向的快照的提交哈希（不访问网络）；没有缓存时为 None。"""
    commit = "a" * 40
    repo = tmp_path / "models--org--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}", encoding="utf-8")
    assert fingerprint.hub_commit("org/model", cache_dir=str(tmp_path)) == commit
    assert fingerprint.hub_commit("org/other", cache_dir=str(tmp_path)) is None


def test_diff_items_names_leaves() -> None:
    old = {"target": {"files": {"a.bin": {"size": 1}}}}
    assert fingerprint.diff_items(old, {"target": {"files": {"a.bin": {"size": 2}}}}, "models") == \
        ["models.target.files.a.bin.size: stored 1, now 2"]
    assert fingerprint.diff_items(old, old, "models") == []
    assert os.path.basename(fingerprint.FINGERPRINTS_FILE) == "fingerprints.json"
