"""MedQA-USMLE（英文、4 选项）评测数据：读取、逐行校验、渲染提示词、编码。

数据来源有两种：
  * 本地 JSONL（`--data-file`）：与原始 jind11/MedQA `phrases_no_exclude_*.jsonl` 以及
    HF 数据集 `GBaker/MedQA-USMLE-4-options` 同一 schema，每行一个 JSON 对象；
  * HF hub（未给出文件时）：`datasets.load_dataset(dataset_id, split=...)`。hub 不可用
    （未安装 `datasets`、无网络、无该划分……）时**大声**回落到仓库自带的 data/medqa/*.jsonl，
    在 stderr 打印一行警告，并把回落写进返回的来源字符串——绝不静默替换数据。

所有行都在返回之前校验完毕：坏数据在加载任何模型（可能要几分钟）之前就失败，
错误消息采用 `文件:行号: 原因` 的编译器风格，便于定位与点击跳转。
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import config

# 选项字母（config.LETTERS），顺序即渲染顺序；本工具只评测 4 选项版本（5 选项行会被明确拒绝）。
OPTION_KEYS: tuple[str, ...] = config.LETTERS

# 划分名 → 捆绑文件名。"validation" 是 HF 的惯用名，与原始发布的 dev 是同一份数据。
# train（约 16 MB）未随仓库提供，见 data/medqa/SOURCE.md。
BUNDLED_FILES: dict[str, str] = {"test": "test.jsonl", "dev": "dev.jsonl", "validation": "dev.jsonl"}

# 划分名 → hub 上的划分名：HF 惯例把 dev 叫 validation（GBaker 的数据集只有 train/test，
# 因此 dev/validation 会在 hub 上失败并大声回落到捆绑的 dev.jsonl）。
HUB_SPLITS: dict[str, str] = {"dev": "validation"}

# 用户回合末尾的作答指令：要求固定格式的结论行，evaluator 据此抽取答案字母。
ANSWER_INSTRUCTION: str = (
    'Think step by step, then finish with a line of the form "The answer is X", '
    "where X is A, B, C or D."
)


class DataError(ValueError):
    """数据不可用或格式非法。

    消息以 `来源:行号:` 开头（来源为文件绝对路径或 `hub:<id> split=<划分>`，行号从 1 开始），
    并说明如何修复。继承 ValueError，使 main.py 可以与 ConfigError 一样捕获后以非零码退出、
    不打印 traceback。
    """


@dataclass(frozen=True)
class Question:
    """一道已校验的 4 选项题目（冻结：评测过程中不可被意外修改）。

    Attributes:
        index: 该题在数据文件/划分中的 0 基行号（limit 截取前 N 题时即 0..N-1），用于结果对齐与断点续跑。
        question: 题干原文（未做任何改写）。
        options: 恰好 {"A","B","C","D"} 四个键、按 A→D 顺序插入的 dict[str, str]，值为非空选项文本。
        answer_idx: 正确选项字母，保证是 options 的键之一。
        answer: 正确选项文本；行里缺少 `answer` 时取 options[answer_idx]。
    """

    index: int
    question: str
    options: dict[str, str]
    answer_idx: str
    answer: str


# ---------------------------------------------------------------------------
# 单行校验
# ---------------------------------------------------------------------------


def _text(value: Any, what: str, where: str) -> str:
    """要求 `value` 是去掉首尾空白后非空的 str，否则抛出 DataError（where 为 `来源:行号` 前缀）。"""
    if value is None:
        raise DataError(f"{where}: missing {what}")
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {what} is empty")
    return value


def _options(value: Any, where: str) -> dict[str, str]:
    """校验 `options` 并按 A→D 重排：返回 dict[str, str]，键恰为 OPTION_KEYS。

    只比较键集合、不要求文件里的键序，随后按 A→D 重建 dict：下游渲染与 evaluator
    依赖固定顺序，而 JSON 对象的键序并非语义的一部分。
    """
    if value is None:
        raise DataError(f"{where}: missing options (a JSON object with keys A, B, C, D)")
    if not isinstance(value, dict):
        raise DataError(f"{where}: options must be a JSON object (keys A–D), got {type(value).__name__}")
    keys = sorted(map(str, value))
    if len(keys) == 5 and set(OPTION_KEYS) < set(keys):
        # 5 选项版本（A–E）的 schema 完全相同，最容易被误用，单独给出提示。
        raise DataError(f"{where}: this is a 5-option row (keys {', '.join(keys)}); this tool evaluates the 4-option version only"
                        f" ({config.DATASET_ID} / the original release's 4_options/phrases_no_exclude_*.jsonl)")
    if keys != list(OPTION_KEYS):
        raise DataError(f"{where}: the keys of options must be exactly A, B, C, D, got {', '.join(keys) or '(none)'}")
    return {k: _text(value[k], f"the text of option {k}", where) for k in OPTION_KEYS}


def _question(row: Any, index: int, where: str) -> Question:
    """把一行已解析的 JSON（应为 dict）校验并转换为 Question；任何问题都抛出带位置的 DataError。

    `answer` 允许缺失（回落为 options[answer_idx]）；存在时必须是字符串，但不强求与
    options[answer_idx] 一致——评分只看 answer_idx，answer 仅用于展示。
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: every line must be a JSON object, got {type(row).__name__}")
    question = _text(row.get("question"), "question (the question text)", where)
    options = _options(row.get("options"), where)
    gold = row.get("answer_idx")
    if not isinstance(gold, str) or gold not in options:
        raise DataError(f"{where}: answer_idx={gold!r} is not one of the option letters (A, B, C or D)")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise DataError(f"{where}: answer must be a string (the text of the correct option), got {type(answer).__name__}")
    return Question(index=index, question=question, options=options, answer_idx=gold,
                    answer=options[gold] if answer is None else answer)


# ---------------------------------------------------------------------------
# 本地 JSONL
# ---------------------------------------------------------------------------


def _jsonl_lines(data: bytes) -> list[bytes]:
    """文件字节 → 各行字节（行号 = 下标 + 1）。只允许文件末尾一个换行符（正常的 JSONL 结尾）：
    中间或末尾多余的空行会作为“空行”被逐行拒绝——它们通常意味着文件被拼接或截断过。"""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # 末尾唯一的换行符产生的空串
    return lines


def _parse_line(raw: bytes, where: str) -> Any:
    """一行字节 → 已解析的 JSON。逐行严格解码 UTF-8，以便报告出错的行号；行尾的 \\r（CRLF 文件）属于
    JSON 空白，可以接受。非 UTF-8、空行、坏 JSON 都抛出带 `文件:行号` 的 DataError。"""
    try:
        text = raw.decode("utf-8")  # 严格模式：非法字节直接报错，而不是替换成 U+FFFD 混进题目
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line, {raw[e.start:e.end]!r}); "
                        "convert the file to UTF-8") from None
    if not text.strip():
        raise DataError(f"{where}: empty line; every JSONL line must be a JSON object (only one newline is allowed at the end of the file)")
    try:
        return loads_strict(text)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json 的 object_pairs_hook：同一对象里重复的键（例如 answer_idx 写了两次）直接拒绝——
    json.loads 默认静默保留最后一个，读到的就不是人看到的第一个值。"""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in one JSON object (the values {out[key]!r:.40} and {value!r:.40}); "
                             "keep one of them")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    """json 的 parse_constant：NaN / Infinity / -Infinity 不是 JSON（Python 默认接受），拒绝。"""
    raise ValueError(f"{name} is not a JSON value (JSON has no NaN or Infinity)")


def loads_strict(text: str) -> Any:
    """严格解析一段 JSON 文本（数据行、predictions.jsonl 的记录、config.json 都用它）；任何问题都抛出 ValueError，
    消息是一句英文原因（调用者在前面加 `文件:行号:`），绝不让别的异常类型漏出去变成 traceback：

    - 语法错误（带列号）、重复的键、NaN/Infinity；
    - 超过 4300 位的整数（Python 的 int 与字符串互转上限，json 在这里抛出不带位置的 ValueError）；
    - 嵌套过深（json 的 C 解析器抛出 RecursionError）；
    - 单独的代理项（"\\ud800" 转义解析成功，却在之后写回 UTF-8 文件时抛出 UnicodeEncodeError）：
      解析后立即按写出时的同一方式编码一次来发现它。
    """
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON (column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply (Python's parser gives up; a data row or record is never nested "
                         "more than a few levels)") from None
    except UnicodeEncodeError as e:
        bad = e.object[e.start:e.end].encode("unicode_escape").decode("ascii")
        raise ValueError(f"holds a lone surrogate {bad} (half of a UTF-16 pair, from a \\u escape): "
                         "not valid Unicode text") from None
    except ValueError as e:
        if "integer string conversion" in str(e):
            raise ValueError(f"holds an integer with more than {sys.get_int_max_str_digits()} digits, more than "
                             "Python reads from text") from None
        raise ValueError(str(e)) from None
    return obj


def _file_row(raw: bytes, lineno: int, path: str) -> Question:
    """文件第 lineno 行（1 基）→ Question（index = lineno − 1，即原始的 0 基行号）。"""
    where = f"{path}:{lineno}"
    return _question(_parse_line(raw, where), lineno - 1, where)


def _keep_valid(candidates: Iterable[tuple[str, Callable[[], Question]]],
                skip_invalid: bool) -> tuple[list[Question], list[dict[str, str]]]:
    """逐行构造题目。skip_invalid=False：第一个坏行就抛出 DataError（默认：坏数据在加载模型之前失败）；
    True：记下 {"where": 位置, "reason": 原因} 并跳过，有效行保留原始 index（结果仍能对回数据文件的行）。"""
    questions: list[Question] = []
    skipped: list[dict[str, str]] = []
    for where, build in candidates:
        try:
            questions.append(build())
        except DataError as e:
            msg = str(e)
            if not skip_invalid:
                raise DataError(f"{msg}. Fix this line, or add --skip-invalid to skip invalid rows (the count goes into metrics.json)") \
                    from None
            skipped.append({"where": where, "reason": msg[len(where) + 2:] if msg.startswith(f"{where}: ") else msg})
    return questions, skipped


def _file_kind(mode: int) -> str:
    """os.stat 的 st_mode → 英文的文件种类（用于“这不是普通文件”的消息）。"""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _load_file(path: str, skip_invalid: bool = False) -> tuple[list[Question], str, list[dict[str, str]]]:
    """读取并校验整个本地 JSONL → (题目列表, "file:<绝对路径> sha256=<hex>", 跳过的行)。

    一次性读入字节：同一份字节既用于解析也用于 sha256，保证来源字符串里的哈希
    就是实际评测的内容（MedQA 单个划分约 2 MB，无需流式读取）。
    """
    path = os.path.abspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file (check the --data-file path)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); check the --data-file path") from None
    if not stat.S_ISREG(mode):
        # 目录、命名管道、设备都如实报出：说“不存在”会误导；读 FIFO 还会一直阻塞。
        raise DataError(f"{path}: is {_file_kind(mode)}, not a data file; --data-file must name a JSONL file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); check the file's permissions") from None
    if not data.strip():
        raise DataError(f"{path}:1: the file is empty, no questions; check that --data-file names the right file")
    candidates = ((f"{path}:{n}", functools.partial(_file_row, raw, n, path))
                  for n, raw in enumerate(_jsonl_lines(data), start=1))
    questions, skipped = _keep_valid(candidates, skip_invalid)
    if not questions:
        raise DataError(f"{path}: no valid questions (all {len(skipped)} rows are invalid; first: {skipped[0]['where']}: "
                        f"{skipped[0]['reason']})")
    return questions, f"file:{path} sha256={hashlib.sha256(data).hexdigest()}", skipped


# ---------------------------------------------------------------------------
# HF hub（带大声回落）
# ---------------------------------------------------------------------------


def _load_hub(dataset_id: str, split: str,
              skip_invalid: bool = False) -> tuple[list[Question], str, list[dict[str, str]]]:
    """从 HF hub 加载并逐行校验（与本地文件同一套规则，index 为 0 基行号，消息中为 1 基 row）。

    `datasets` 在函数内部延迟导入：它是可选依赖，离线/演示环境可以不装。
    加载阶段的任何异常原样抛出，由调用者决定是否回落；校验失败抛出 DataError（不回落：
    hub 数据本身有问题时换一份数据只会掩盖问题）。
    """
    import datasets  # noqa: PLC0415  延迟导入（见上）

    hub_split = HUB_SPLITS.get(split, split)
    rows = datasets.load_dataset(dataset_id, split=hub_split)
    source = f"hub:{dataset_id} split={hub_split}"
    candidates = ((f"{source} row {i + 1}", functools.partial(_question, row, i, f"{source} row {i + 1}"))
                  for i, row in enumerate(rows))
    questions, skipped = _keep_valid(candidates, skip_invalid)
    if not questions:
        raise DataError(f"{source}: this split has no{' valid' if skipped else ''} questions")
    return questions, source, skipped


def _one_line(exc: BaseException, width: int = 200) -> str:
    """异常 → 单行、截断的描述（`类型: 消息`），用于一行警告与来源字符串。"""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _load_hub_or_bundled(dataset_id: str, split: str,
                         skip_invalid: bool = False) -> tuple[list[Question], str, list[dict[str, str]]]:
    """先试 hub；加载失败时大声回落到捆绑文件（stderr 一行警告 + 来源字符串标注原因）。

    捆绑文件不存在（例如 train 划分）时抛出 DataError，告诉用户用 --data-file 指定本地文件。
    """
    try:
        return _load_hub(dataset_id, split, skip_invalid)
    except DataError:
        raise  # hub 数据已下载但校验失败：不回落（见 _load_hub）
    except Exception as exc:  # noqa: BLE001  未安装、无网络、无此划分……任何加载失败都回落
        reason = _one_line(exc)
    bundled = os.path.join(config.BUNDLED_DATA_DIR, BUNDLED_FILES.get(split, f"{split}.jsonl"))
    if not os.path.isfile(bundled):
        raise DataError(f"hub:{dataset_id} split={split}: cannot be loaded from the hub ({reason}), and the repository bundles no "
                        f"{split} split ({bundled}); give a local MedQA 4-option JSONL with --data-file")
    print(f"[data_loader] WARNING: cannot load {dataset_id} split={split} from the hub ({reason}); "
          f"using the bundled file {bundled} instead (set HF_HUB_OFFLINE=1 to skip the hub at once)", file=sys.stderr, flush=True)
    questions, source, skipped = _load_file(bundled, skip_invalid)
    return questions, f"{source} (bundled fallback: hub {dataset_id} split={split} unavailable: {reason})", skipped


# ---------------------------------------------------------------------------
# 公共接口
# ---------------------------------------------------------------------------


def load_medqa(data_file: str | None = None, split: str = "test", limit: int | None = None,
               dataset_id: str = config.DATASET_ID) -> tuple[list[Question], str]:
    """加载并校验 MedQA 4 选项题目，返回 (题目列表, 实际使用的数据来源描述)；任何坏行都抛出 DataError。

    是 load_questions(..., skip_invalid=False) 去掉“跳过的行”之后的简写，参数与返回值见那里。
    """
    questions, source, _ = load_questions(data_file, split, limit, dataset_id)
    return questions, source


def load_questions(data_file: str | None = None, split: str = "test", limit: int | None = None,
                   dataset_id: str = config.DATASET_ID, *,
                   skip_invalid: bool = False) -> tuple[list[Question], str, list[dict[str, str]]]:
    """加载并校验 MedQA 4 选项题目，返回 (题目列表, 实际使用的数据来源描述, 跳过的行)。

    Args:
        data_file: 本地 JSONL 路径；给出时只读该文件（此时忽略 split 与 dataset_id）。
            None 时走 hub，失败则大声回落到 data/medqa/{split}.jsonl（validation → dev.jsonl）。
        split: "test" | "dev" | "validation" | "train"（hub 上 dev 对应 validation）。
        limit: 只取前 N 题（index 为 0..N-1）；None 或 0 表示全部（命令行的 --limit 必须 ≥ 1，
            --all-questions 传 None）。负数或超过总行数都报错，而不是静默截断——否则结果里的题数会与用户要求的不一致。
        dataset_id: HF 数据集 id。
        skip_invalid: False（默认）时第一个坏行就抛出 DataError；True 时跳过坏行（整个文件的坏行都记下），
            有效行保留原始 index，limit 取前 N 道*有效*题。

    Returns:
        (questions, source, skipped)：questions 为 list[Question]，长度 = limit 或有效题总数；
        skipped 为 [{"where": "文件:行号", "reason": 原因}]（skip_invalid=False 时总是空）；
        source 形如 "file:/abs/path sha256=<hex>"、"hub:<id> split=test"，
        回落时为 "file:... sha256=... (bundled fallback: hub ... unavailable: <原因>)"，写入运行记录以便复现。

    Raises:
        DataError: 文件不存在/为空/非 UTF-8/空行/坏 JSON/字段非法（消息含 `文件:行号`）、
            limit 非法、hub 不可用且无捆绑文件。**所有**行都在返回前校验，limit 只在校验后截取，
            因此坏文件总在加载模型之前暴露。
    """
    where = os.path.abspath(data_file) if data_file else f"hub:{dataset_id} split={split}"
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"{where}: limit={limit!r} is not valid; it must be an integer >= 0 (0 or None = every question)")
    if data_file is None and split not in config.CHOICES["split"]:
        raise DataError(f"{where}: unknown split {split!r}; choose one of: {', '.join(config.CHOICES['split'])}")
    questions, source, skipped = (_load_file(data_file, skip_invalid) if data_file
                                  else _load_hub_or_bundled(dataset_id, split, skip_invalid))
    if limit and limit > len(questions):
        valid = "valid questions" if skipped else "questions"
        raise DataError(f"{where if data_file else source}: limit={limit} exceeds the number of {valid}, {len(questions)}; "
                        f"set --limit to <= {len(questions)}, or use --all-questions to evaluate all of them")
    return (questions[:limit] if limit else questions), source, skipped


def format_user_turn(question: Question) -> str:
    """用户回合正文（不含聊天模板）：题干、空行、四行 "A. …"…"D. …"、空行、作答指令。

    题干与选项只去掉首尾空白，不做其他改写，使三个模型看到的文字与数据完全一致。
    """
    options = "\n".join(f"{k}. {question.options[k].strip()}" for k in OPTION_KEYS)
    return f"{question.question.strip()}\n\n{options}\n\n{ANSWER_INSTRUCTION}"


def format_prompt(question: Question, tokenizer: Any, system_prompt: str = config.SYSTEM_PROMPT) -> str:
    """用 tokenizer 的聊天模板把一道题渲染成完整提示字符串（含 assistant 生成头）。

    渲染 `[{"role": "system", ...}, {"role": "user", format_user_turn(question)}]`，
    `tokenize=False, add_generation_prompt=True`，因此返回值以模板的 assistant 头结尾，模型从那里续写。

    设计上由**同一个**（目标模型的）tokenizer 为三个模型渲染提示，使它们看到完全相同的 token id；
    调用者随后必须用 `add_special_tokens=False` 编码（见 encode_prompts）：模板里已经含 BOS，
    再加一次会出现双 BOS。

    Raises:
        DataError（ValueError 子类）：tokenizer 没有聊天模板——本工具只支持指令/对话模型。
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no chat template"
                        " (chat_template); this tool needs an instruction model with a chat template")
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": format_user_turn(question)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(prompts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """把已渲染的提示编码为 token id：list[str]（长度 B）→ list[list[int]]（B 个不等长列表，未填充）。

    使用 `add_special_tokens=False`：聊天模板已经包含 BOS（如 Llama 3 的 <|begin_of_text|>），
    tokenizer 默认再加一个会得到双 BOS，改变模型行为。返回纯 Python int 列表（不填充、不转张量），
    填充方向与设备留给生成代码决定。
    """
    if not prompts:
        return []  # 部分 tokenizer 对空批次会报错
    return [[int(t) for t in ids] for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
