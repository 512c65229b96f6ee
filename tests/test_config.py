"""config 的测试：纯 Python，毫秒级。

覆盖：默认值只来自模块常量（每个默认值只存在一处）；每个字段都有命令行参数（布尔字段有 --x/--no-x）；
显式参数优先；--demo 只覆盖未显式给出的字段；未知/拼错/缩写参数 → argparse 退出码 2；
非法取值 → ConfigError 或 SystemExit（都在加载任何模型之前）；冻结；to_dict 可 JSON 序列化并可还原；
角色系统提示的回落。
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import pytest

import config
from config import Config, ConfigError, build_parser, demo_overrides, parse_config

FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))
BOOL_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config) if isinstance(f.default, bool))

# 字段 → 提供其默认值的模块常量名（demo 的默认值是 False，不是常量）。
DEFAULT_CONSTANTS: dict[str, str] = {
    "target": "TARGET_MODEL_ID", "expert": "EXPERT_MODEL_ID", "base": "BASE_MODEL_ID",
    "base_alpha": "BASE_ALPHA", "adaptive_scale": "ADAPTIVE_SCALE", "max_boost": "MAX_BOOST",
    "distance": "DISTANCE_METRIC", "schedule": "SCHEDULE", "plausibility_beta": "PLAUSIBILITY_BETA",
    "load_in_4bit": "LOAD_IN_4BIT", "dtype": "DTYPE", "device": "DEVICE",
    "dataset_id": "DATASET_ID", "data_file": "DATA_FILE", "split": "SPLIT", "limit": "NUM_SAMPLES",
    "batch_size": "BATCH_SIZE", "max_new_tokens": "MAX_NEW_TOKENS", "seed": "SEED", "threads": "THREADS",
    "fast": "FAST_DECODE", "compile": "COMPILE", "nf4_tuning_cache": "NF4_TUNING_CACHE",
    "system_prompt": "SYSTEM_PROMPT", "expert_system_prompt": "EXPERT_SYSTEM_PROMPT",
    "base_system_prompt": "BASE_SYSTEM_PROMPT", "modes": "MODES", "output_dir": "OUTPUT_DIR",
    "all_questions": "ALL_QUESTIONS", "skip_invalid": "SKIP_INVALID",
    "scoring": "SCORING", "sweep": "SWEEP", "sweep_alphas": "SWEEP_ALPHAS", "sweep_schedules": "SWEEP_SCHEDULES",
    "temperature": "TEMPERATURE", "top_p": "TOP_P", "votes": "VOTES", "trace_index": "TRACE_INDEX",
    "forced_answer": "FORCED_ANSWER", "allow_version_change": "ALLOW_VERSION_CHANGE",
    "speculate": "SPECULATE", "draft": "DRAFT", "speculative_sampling": "SPECULATIVE_SAMPLING",
    "min_acceptance": "MIN_ACCEPTANCE", "quant": "QUANT", "int4_group_size": "INT4_GROUP_SIZE",
}

# 单独给出时不合法、需要另一个参数才有意义的字段：测试时一并给出这些前提参数（文本为空的布尔前提写成 --no-<flag>）。
_SPEC: dict[str, tuple[str, Any]] = {"speculate": ("2", 2), "fast": ("", False)}
PREREQUISITES: dict[str, dict[str, tuple[str, Any]]] = {
    "top_p": {"temperature": ("0.5", 0.5)},
    "votes": {"temperature": ("0.5", 0.5)},
    "speculate": {"fast": ("", False)},
    "draft": {**_SPEC, "modes": ("steered", ("steered",))},
    "speculative_sampling": _SPEC,
    "min_acceptance": _SPEC,
    "int4_group_size": {"quant": ("int4", "int4")},
}

# 每个非布尔字段：(命令行文本, 解析后的期望值)，且期望值与默认值不同。
SAMPLES: dict[str, tuple[str, Any]] = {
    "target": ("org/target-model", "org/target-model"),
    "expert": ("/models/expert", "/models/expert"),
    "base": ("base.gguf", "base.gguf"),
    "base_alpha": ("0.5", 0.5),
    "adaptive_scale": ("3", 3.0),
    "max_boost": ("2.25", 2.25),
    "distance": ("l2", "l2"),
    "schedule": ("adaptive_inverse", "adaptive_inverse"),
    "scoring": ("letter", "letter"),
    "sweep_alphas": ("0,1.5,-1", (0.0, 1.5, -1.0)),
    "sweep_schedules": ("adaptive_inverse,constant", ("adaptive_inverse", "constant")),
    "temperature": ("0.7", 0.7),
    "threads": ("1", 1),
    "top_p": ("0.9", 0.9),
    "votes": ("5", 5),
    "trace_index": ("12", 12),
    "plausibility_beta": ("0.1", 0.1),
    "dtype": ("float16", "float16"),
    "device": ("cpu", "cpu"),
    "dataset_id": ("someone/medqa", "someone/medqa"),
    "data_file": ("questions.jsonl", "questions.jsonl"),
    "split": ("dev", "dev"),
    "limit": ("7", 7),
    "batch_size": ("3", 3),
    "max_new_tokens": ("16", 16),
    "seed": ("123", 123),
    "compile": ("on", "on"),
    "nf4_tuning_cache": ("off", "off"),
    "system_prompt": ("Be brief.", "Be brief."),
    "expert_system_prompt": ("You are a doctor.", "You are a doctor."),
    "base_system_prompt": ("You are an assistant.", "You are an assistant."),
    "modes": ("steered", ("steered",)),
    "output_dir": ("runs/x", "runs/x"),
    "resume": ("runs/old", "runs/old"),
    "speculate": ("4", 4),
    "draft": ("fusion", "fusion"),
    "speculative_sampling": ("coupled", "coupled"),
    "min_acceptance": ("0.25", 0.25),
    "quant": ("int4", "int4"),
    "int4_group_size": ("128", 128),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------------------
# 默认值：唯一来源
# ---------------------------------------------------------------------------


def test_every_field_has_a_default_constant() -> None:
    # demo 与 resume 不是实验配置的默认值（一个是预设开关，一个指向已有的运行目录），没有模块常量。
    assert set(DEFAULT_CONSTANTS) | {"demo", "resume"} == set(FIELDS)


def test_no_arguments_gives_default_config() -> None:
    """没有参数时解析结果与 Config() 完全相同（命令行不持有第二份默认值）。"""
    assert parse_config([]) == Config()
    assert Config().demo is False


def test_defaults_are_valid_and_modes_are_known() -> None:
    cfg = Config()
    assert set(cfg.modes) <= set(config.VALID_MODES)
    for name, allowed in config.CHOICES.items():
        assert getattr(cfg, name) in allowed


# ---------------------------------------------------------------------------
# 命令行：每个字段一个参数
# ---------------------------------------------------------------------------


def test_parser_has_one_flag_per_field() -> None:
    options = {s for a in build_parser()._actions for s in a.option_strings}
    for name in FIELDS:
        assert _flag(name) in options, name
    for name in BOOL_FIELDS:
        assert "--no-" + name.replace("_", "-") in options, name
    assert set(SAMPLES) | set(BOOL_FIELDS) == set(FIELDS)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_explicit_flag_overrides_default(name: str) -> None:
    text, want = SAMPLES[name]
    assert want != getattr(Config(), name)
    extra = PREREQUISITES.get(name, {})
    cfg = parse_config([_flag(name), text] + [a for k, (t, _) in extra.items()
                                              for a in ((_flag(k), t) if t else ("--no-" + _flag(k)[2:],))])
    assert getattr(cfg, name) == want
    assert all(getattr(cfg, k) == v for k, (_, v) in extra.items())
    # 其他字段保持默认值。
    assert dataclasses.replace(cfg, **{k: getattr(Config(), k) for k in (name, *extra)}) == Config()


@pytest.mark.parametrize("name", BOOL_FIELDS)
def test_boolean_flags_have_both_forms(name: str) -> None:
    flag = _flag(name)
    assert getattr(parse_config([flag]), name) is True
    assert getattr(parse_config(["--no-" + flag[2:]]), name) is False
    assert getattr(parse_config([flag, "--no-" + flag[2:]]), name) is False  # 后者优先


def test_equals_syntax_and_modes_list() -> None:
    cfg = parse_config(["--modes=steered, baseline", "--base-alpha=-0.5"])
    assert cfg.modes == ("steered", "baseline")
    assert cfg.base_alpha == -0.5  # base_alpha 本身可以为负（只有 scale/boost 必须 ≥ 0）


def test_help_lists_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--no-load-in-4bit" in out and "--max-new-tokens" in out
    # 每个参数的帮助文本都写明其默认值（即 config.py 的常量；渲染后的 --help 会在连字符处折行，故检查原文）。
    helps = {a.dest: a.help for a in build_parser()._actions if a.dest in FIELDS}
    assert set(helps) == set(FIELDS)
    for f in dataclasses.fields(Config):
        assert repr(f.default) in helps[f.name], f.name


# ---------------------------------------------------------------------------
# --demo：只覆盖未显式给出的字段
# ---------------------------------------------------------------------------


def test_demo_applies_presets() -> None:
    cfg = parse_config(["--demo"])
    presets = demo_overrides()
    assert cfg.demo is True
    for name, value in presets.items():
        assert getattr(cfg, name) == value, name
    for name in set(FIELDS) - set(presets) - {"demo"}:
        assert getattr(cfg, name) == getattr(Config(), name), name
    assert cfg.target == cfg.expert == cfg.base == config.DEMO_MODEL
    assert cfg.load_in_4bit is False and cfg.device == "cpu"
    assert cfg.limit == config.DEMO_NUM_SAMPLES and cfg.max_new_tokens == config.DEMO_MAX_NEW_TOKENS
    assert os.path.isfile(cfg.data_file)  # 捆绑数据真实存在：演示离线可跑
    # 同一模型充当专家与基座：两者的系统提示必须不同，否则 z_e − z_b ≡ 0。
    prompts = cfg.role_system_prompts
    assert prompts["expert"] != prompts["base"]


@pytest.mark.parametrize("argv", [["--demo", "--limit", "3"], ["--limit", "3", "--demo"]])
def test_demo_keeps_explicit_values(argv: list[str]) -> None:
    cfg = parse_config(argv)
    assert cfg.limit == 3
    assert cfg.target == config.DEMO_MODEL
    assert cfg.max_new_tokens == config.DEMO_MAX_NEW_TOKENS


def test_demo_explicit_overrides_for_every_preset_field() -> None:
    cfg = parse_config(["--demo", "--target", "my/model", "--load-in-4bit", "--device", "auto",
                        "--dtype", "bfloat16", "--batch-size", "2", "--base-system-prompt", "plain"])
    assert cfg.target == "my/model" and cfg.expert == cfg.base == config.DEMO_MODEL
    assert cfg.load_in_4bit is True and cfg.device == "auto" and cfg.dtype == "bfloat16"
    assert cfg.batch_size == 2 and cfg.base_system_prompt == "plain"
    assert cfg.expert_system_prompt == config.DEMO_EXPERT_SYSTEM_PROMPT


def test_no_demo_means_no_presets() -> None:
    assert parse_config(["--no-demo"]) == Config()


def test_direct_construction_does_not_apply_demo_presets() -> None:
    """Config(demo=True) 只是记录标志；预设在 parse_config 里应用（优先级：显式 > demo > 常量）。"""
    assert Config(demo=True).target == config.TARGET_MODEL_ID


# ---------------------------------------------------------------------------
# 未知、拼错、缩写的参数：argparse 退出码 2，消息在 stderr
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv,needle", [
    (["--no-such-flag"], "--no-such-flag"),
    (["--base-alph", "1"], "--base-alph"),  # 缩写/拼错（allow_abbrev=False）
    (["--lim", "3"], "--lim"),
    (["--demo", "extra"], "extra"),  # 多余的位置参数
    (["--max_new_tokens", "5"], "--max_new_tokens"),  # 下划线形式不被接受
])
def test_unknown_or_abbreviated_flag_exits_2(argv: list[str], needle: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert needle in captured.err and "usage:" in captured.err
    assert captured.out == ""


# ---------------------------------------------------------------------------
# 非法取值：ConfigError（构造时校验）或 SystemExit 2（argparse 类型/choices）
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--distance", "cosine"],
    ["--dtype", "int8"],
    ["--device", "tpu"],
    ["--split", "training"],
    ["--compile", "maybe"],
    ["--modes", "baseline,foo"],
    ["--modes", ""],
    ["--modes", ","],
    ["--modes", "baseline,baseline"],
    ["--batch-size", "0"],
    ["--max-new-tokens", "0"],
    ["--limit", "-1"],
    ["--limit", "0"],  # 0 不再表示“全部”：全部题目用 --all-questions
    ["--limit", "2.5"],
    ["--limit", "3", "--all-questions"],
    ["--all-questions", "--limit", "3"],
    ["--seed", "-1"],
    ["--seed", str(2**32)],
    ["--base-alpha", "nan"],
    ["--adaptive-scale", "inf"],
    ["--max-boost", "-1"],
    ["--adaptive-scale", "-0.1"],
    ["--max-boost", "abc"],
    ["--target", " "],
    ["--system-prompt", ""],
    ["--demo", "--batch-size", "-4"],
])
def test_bad_values_rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises((ConfigError, SystemExit)) as info:
        parse_config(argv)
    if isinstance(info.value, SystemExit):
        assert info.value.code == 2
        assert capsys.readouterr().err.strip()
    else:
        assert str(info.value).strip()


@pytest.mark.parametrize("changes,flag", [
    ({"distance": "cosine"}, "--distance"),
    ({"dtype": "int8"}, "--dtype"),
    ({"base_alpha": math.nan}, "--base-alpha"),
    ({"max_boost": math.inf}, "--max-boost"),
    ({"limit": -1}, "--limit"),
    ({"limit": 0}, "--all-questions"),
    ({"seed": -1}, "--seed"),
    ({"seed": 2**32}, "--seed"),
    ({"batch_size": 0}, "--batch-size"),
    ({"max_new_tokens": 0}, "--max-new-tokens"),
    ({"modes": ("baseline", "foo")}, "--modes"),
    ({"modes": ()}, "--modes"),
    ({"expert": ""}, "--expert"),
    ({"threads": 0}, "--threads"),
    ({"threads": 1.5}, "--threads"),
])
def test_config_error_names_the_flag(changes: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**changes)
    assert flag in str(info.value)


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------
# 冻结、序列化、角色提示
# ---------------------------------------------------------------------------


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.limit = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, "target", "x")
    assert hash(cfg) == hash(Config())  # 冻结 + 元组字段：可哈希


@pytest.mark.parametrize("argv", [[], ["--demo"], ["--modes", "baseline", "--data-file", "x.jsonl"]])
def test_to_dict_is_json_serializable_and_round_trips(argv: list[str]) -> None:
    cfg = parse_config(argv)
    d = cfg.to_dict()
    assert set(d) == set(FIELDS)
    loaded = json.loads(json.dumps(d))
    assert loaded == d
    assert isinstance(loaded["modes"], list)
    assert Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in loaded.items()}) == cfg
    assert config.config_from_dict(loaded, "config.json") == cfg


def test_role_system_prompts_fall_back_to_system_prompt() -> None:
    cfg = Config(system_prompt="S")
    assert cfg.role_system_prompts == {"target": "S", "expert": "S", "base": "S"}
    cfg = Config(system_prompt="S", expert_system_prompt="E")
    assert cfg.role_system_prompts == {"target": "S", "expert": "E", "base": "S"}
    cfg = Config(system_prompt="S", base_system_prompt="B")
    assert cfg.role_system_prompts == {"target": "S", "expert": "S", "base": "B"}
    # 空字符串是“显式给出的空提示”，不是 None：不回落。
    assert Config(system_prompt="S", expert_system_prompt="").role_system_prompts["expert"] == ""


def test_seed_range_checked_before_any_work() -> None:
    """np.random.seed 只接受 [0, 2**32 − 1]：越界的 --seed 在构造时就报 ConfigError（以前在 set_seed 里带 traceback 崩溃）。"""
    with pytest.raises(ConfigError, match="--seed"):
        parse_config(["--seed", "-1"])
    assert parse_config(["--seed", str(2**32 - 1)]).seed == 2**32 - 1 and parse_config(["--seed", "0"]).seed == 0


def test_all_questions_flag() -> None:
    assert parse_config(["--all-questions"]).all_questions is True
    assert Config().all_questions is False and Config().limit == config.NUM_SAMPLES
    assert parse_config(["--demo", "--all-questions"]).all_questions is True  # --demo 的 limit 预设不冲突


def test_steering_choices_have_one_home() -> None:
    """调度与距离的可选值只在 config.CHOICES 定义一次，steering_utils 用的就是同一个对象。"""
    import steering_utils

    assert steering_utils.SCHEDULES is config.CHOICES["schedule"]
    assert steering_utils.METRICS is config.CHOICES["distance"]


@pytest.mark.parametrize("beta", ["-0.1", "1.5"])
def test_plausibility_beta_out_of_range(beta: str) -> None:
    with pytest.raises(config.ConfigError, match="plausibility-beta"):
        config.parse_config(["--plausibility-beta", beta])
