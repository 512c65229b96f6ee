"""测试用的真实 Llama-3 分词器与微型随机 Llama-3 模型（词表 128256）。

为什么需要它：其余测试只用 SmolLM2 的分词器，Llama-3 的特有之处从未被执行过——128256 个 token 的词表
（与模型 lm_head 行数相同）、三个结束记号 128001/128008/128009（<|eot_id|> 最常见）、没有 pad、
BOS 写在聊天模板里、3.1 模板的日期头。这里从 Meta 官方 PyPI 包 llama-models 0.3.0 自带的
tiktoken 文件（llama_models/llama3/tokenizer.model）构造 Hugging Face 快速分词器，尽量与
meta-llama/Llama-3.1-8B-Instruct 仓库里的 tokenizer.json / tokenizer_config.json 一致：

- BPE 词表与切分正则取自 llama-models（transformers 的 TikTokenConverter 转换），256 个特殊记号按
  llama-models 的 Tokenizer 给出的顺序放在 128000–128255（官方 id）；
- 后处理与官方 tokenizer.json 相同：add_special_tokens=True 时在开头加 <|begin_of_text|>
  （所以“模板里已有 BOS、编码时不能再加”这件事在测试里是真实的风险）；
- bos = <|begin_of_text|>，eos = <|eot_id|>（Instruct 版的设置），没有 pad，clean_up_tokenization_spaces=True，
  model_max_length = 131072；聊天模板为 tests/assets/llama31_chat_template.jinja（来源见 tests/assets/SOURCE.md）。

转换结果缓存在 $DOMAIN_STEERING_CACHE（缺省 ~/.cache/domain-steering）/llama3-tokenizer/<键> 下：
键由 tokenizer.model 与模板文件的内容、transformers/tokenizers 版本决定；先写临时目录再原子改名（同 model_loader 的 GGUF 缓存）。
缺少 llama_models 或 tiktoken 时，依赖它们的测试被跳过（与 conftest 对演示模型包的处理相同）。
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from model_loader import GGUF_CACHE_DIR, publish_dir

ASSETS = Path(__file__).resolve().parent / "assets"
TEMPLATE_PATH = ASSETS / "llama31_chat_template.jinja"
CACHE_ROOT = GGUF_CACHE_DIR  # 项目的缓存根目录（$DOMAIN_STEERING_CACHE 或 ~/.cache/domain-steering），只在 model_loader 定义
CACHE_FORMAT = "1"  # 改变构造方式时递增：旧缓存自动作废

VOCAB_SIZE = 128256
BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
BOS_ID = 128000
END_OF_TEXT_ID = 128001
FINETUNE_PAD_ID = 128004
START_HEADER_ID = 128006
END_HEADER_ID = 128007
EOM_ID = 128008
EOT_ID = 128009
PYTHON_TAG_ID = 128010
# Llama-3.1-Instruct 的 generation_config.eos_token_id（config.json 里也是这三个）
END_IDS: tuple[int, ...] = (END_OF_TEXT_ID, EOM_ID, EOT_ID)
# 3.1 模板在系统回合开头插入、而 llama-models 的 ChatFormat 没有的那一段（date_string 缺省为 26 Jul 2024）
DATE_HEADER = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
# 与 meta-llama/Llama-3.1-8B-Instruct 的 config.json 相同的 RoPE 参数（transformers 5 的 rope_parameters 写法）
LLAMA31_ROPE: dict[str, Any] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def missing_dependency() -> str | None:
    """llama-models 与 tiktoken 都可导入时返回 None，否则返回一句说明缺什么、怎么装（测试据此 skip）。"""
    for module, install in (("llama_models", "pip install --no-deps llama-models==0.3.0"),
                            ("tiktoken", "pip install tiktoken==0.14.0")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install}); see .ci/run"
    return None


def _llama_models_tokenizer_module() -> Any:
    """llama_models.llama3.tokenizer 模块（只依赖 tiktoken；不导入 llama_models 里需要 torch/fairscale 的部分）。"""
    return importlib.import_module("llama_models.llama3.tokenizer")


def tiktoken_model_path() -> Path:
    """llama-models 自带的 Llama-3 tiktoken BPE 文件（base64 记号 + 秩，每行一个，共 128000 行）。"""
    return Path(_llama_models_tokenizer_module().__file__).resolve().parent / "tokenizer.model"


@functools.lru_cache(maxsize=None)
def reference_tokenizer() -> Any:
    """llama-models 的参考编码器 llama_models.llama3.tokenizer.Tokenizer（tiktoken），进程内只建一次。"""
    return _llama_models_tokenizer_module().Tokenizer(tiktoken_model_path())


@functools.lru_cache(maxsize=None)
def reference_chat_format() -> Any:
    """llama-models 的 ChatFormat（encode_dialog_prompt 给出 Meta 参考实现的对话 id）。需要 pydantic 与 Pillow。"""
    return importlib.import_module("llama_models.llama3.chat_format").ChatFormat(reference_tokenizer())


def raw_message(role: str, content: str) -> Any:
    """llama-models 的 RawMessage（ChatFormat 的输入类型，pydantic 模型）。"""
    return importlib.import_module("llama_models.datatypes").RawMessage(role=role, content=content)


def special_tokens() -> list[str]:
    """256 个特殊记号，按官方 id 升序（下标 i ↔ id 128000 + i），直接取自 llama-models 的 Tokenizer。"""
    ref = reference_tokenizer()
    return sorted(ref.special_tokens, key=ref.special_tokens.__getitem__)


def _cache_dir() -> str:
    """本机转换缓存目录：键 = tokenizer.model 与模板的内容哈希 + transformers/tokenizers 版本 + CACHE_FORMAT。"""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    for part in (tiktoken_model_path().read_bytes(), TEMPLATE_PATH.read_bytes(),
                 f"{transformers.__version__}|{tokenizers.__version__}|{CACHE_FORMAT}".encode()):
        h.update(hashlib.sha256(part).digest())
    return os.path.join(CACHE_ROOT, "llama3-tokenizer", h.hexdigest()[:16])


def _build(folder: str) -> None:
    """把 llama-models 的 tiktoken 文件转换成快速分词器并 save_pretrained 到 folder。

    - TikTokenConverter：tiktoken 的秩 → BPE 词表与合并规则（ignore_merges，与 tiktoken 的整词优先一致），
      切分正则用 llama-models 的 pat_str，特殊记号按 special_tokens() 的顺序追加，得到 id 128000–128255；
    - 后处理换成官方 tokenizer.json 的那个：ByteLevel + TemplateProcessing（单句前加 BOS）；
    - tokenizer_class 写成官方文件里的 "PreTrainedTokenizerFast"。
    """
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ref = reference_tokenizer()
    backend = TikTokenConverter(vocab_file=str(tiktoken_model_path()), pattern=ref.pat_str,
                                extra_special_tokens=special_tokens()).converted()
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, BOS_ID)])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOT,
                                  clean_up_tokenization_spaces=True, model_max_length=131072,
                                  chat_template=TEMPLATE_PATH.read_text(encoding="utf-8"))
    tok.save_pretrained(folder)
    config_path = os.path.join(folder, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def llama3_tokenizer_dir() -> str:
    """转换后的分词器目录（可交给 from_pretrained / model_loader.load_tokenizer）；首次调用时转换并原子写入缓存。"""
    target = _cache_dir()
    if os.path.isfile(os.path.join(target, "tokenizer.json")):
        return target
    return publish_dir(target, _build)  # 与 GGUF 转换缓存同一个原子发布（model_loader.publish_dir）


@functools.lru_cache(maxsize=None)
def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-3.1-Instruct 的快速分词器（见模块说明），进程内共享同一个对象：调用者只能读，不得修改其属性。

    需要修改（例如 model_loader.load_tokenizer 设置 pad 与左填充）时，从 llama3_tokenizer_dir() 另行加载。
    """
    return PreTrainedTokenizerFast.from_pretrained(llama3_tokenizer_dir())


def tiny_llama3(seed: int, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                tie: bool = False, head_scale: float = 40.0, attn_scale: float = 1.0) -> LlamaForCausalLM:
    """词表 128256 的微型随机 Llama（fp32、eval），配置项取 Llama-3.1-8B-Instruct 的写法：

    bos_token_id = 128000，eos_token_id = [128001, 128008, 128009]（config 与 generation_config 都是），
    pad_token_id = None，RoPE 为 llama3 类型（LLAMA31_ROPE）。lm_head ×head_scale，使 logits 拉开距离、
    argmax 没有近似平局（fp32 下快速路径与参考循环才能逐 token 比较）；tie=True 时 lm_head 与嵌入共享权重（同 3.2-1B）。
    attn_scale：各层 o_proj ×attn_scale。随机初始化的微型模型几乎只看当前 token，而聊天提示都以同一个 assistant 头结尾，
    各行会生成相同的文字；放大注意力输出让各行依赖各自的题目，逐行停止等行为才可检验。
    """
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=131072, rope_parameters=dict(LLAMA31_ROPE), tie_word_embeddings=tie,
                      bos_token_id=BOS_ID, eos_token_id=list(END_IDS), pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(attn_scale)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = list(END_IDS)
    model.generation_config.pad_token_id = None
    return model


@torch.no_grad()
def alias_token(models: Sequence[LlamaForCausalLM], source: int, token: int, factor: float = 1.001) -> None:
    """原地改写每个模型 lm_head 的第 token 行 = factor × 第 source 行（未绑定嵌入的模型才可用）。

    logits 对 lm_head 行是线性的，融合 z_t + α(z_e − z_b) 也是：三个模型都改写后，每一步 token 的（融合）logit
    都恰为 source 的 factor 倍。于是原本选 source 的那一步（其 logit 为正的最大值）改选 token，其余步骤
    只有在 source 的 logit 距最大值不到 (factor − 1) 时才受影响。用来让某一行在已知的一步生成指定的记号
    （例如 <|eot_id|>），而不必修改解码代码。
    """
    for m in models:
        if m.config.tie_word_embeddings:
            raise ValueError("alias_token needs an untied lm_head (tie=False)")
        w = m.lm_head.weight
        w[token] = factor * w[source]
