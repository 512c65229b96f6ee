"""续跑钉住它的输入（issue 15）：运行开始时把配置、题目、每个模型、分词器与 torch/transformers 版本的指纹写进
fingerprints.json（原子写入，先于 config.json）；--resume 时重算并逐项比较，任何一项不同都拒绝（退出码 2），
消息指出是哪一项。只有“仅版本不同”可以用 --allow-version-change 放行（大声警告，并记进 events.jsonl）。

为什么要单独一份文件：config.json 就是续跑使用的配置，被人改了（例如 base_alpha）续跑会悄悄换一个实验；
fingerprints.json 里的配置副本让这种改动被发现并指名。这防的是误改与文件损坏，不是蓄意把两份文件一起伪造。

全部指纹都不加载权重：模型按来源取——hub id 取本地缓存里 config.json 所在快照的提交哈希；本地目录取每个文件的
名字、大小与前 1 MiB 的 sha256（小文件如 config.json、索引 json、分词器文件因而是整份的哈希）；GGUF 取文件大小与
前 1 MiB（文件头与元数据）的 sha256。分词器取已加载对象的完整序列化（词表、合并规则、规范化等）、特殊记号、
填充设置与聊天模板的 sha256——分词器加载很快，且在任何权重之前。
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib import metadata
from typing import Any

from config import RUN_LOCATION_FIELDS, Config, ConfigError, config_diff
from data_loader import loads_strict
from model_loader import resolve_source
from run_folder import log_event, write_json

FINGERPRINTS_FILE: str = "fingerprints.json"
HEAD_BYTES: int = 1 << 20  # 每个文件只哈希开头 1 MiB：8B 模型的权重分片每个几 GB，全量哈希要几十秒
VERSION_PACKAGES: tuple[str, ...] = ("torch", "transformers")  # 只有这些的变化可以用 --allow-version-change 放行
PINNED: tuple[str, ...] = ("models", "tokenizer")  # 变化永远拒绝的输入（配置与题目另行比较）


def file_fingerprint(path: str) -> dict[str, Any]:
    """一个文件的指纹：大小与前 HEAD_BYTES 字节的 sha256（不超过 1 MiB 的文件即整份的哈希）。"""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    return {"size": os.path.getsize(path), "head_sha256": hashlib.sha256(head).hexdigest()}


def hub_commit(repo_id: str, cache_dir: str | None = None) -> str | None:
    """hub 模型在本地缓存里解析到的提交哈希：缓存里 config.json 所在的快照目录名（snapshots/<提交>/config.json）。
    不访问网络；没有缓存时为 None（此前 check_context 已经读过配置，正常情况下总有缓存）。"""
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415  延迟导入：只在 hub 模型时需要

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    return os.path.basename(os.path.dirname(found)) if isinstance(found, str) else None


def model_fingerprint(spec: str) -> dict[str, Any]:
    """一个模型来源的指纹（不加载权重）：GGUF / pypi: → GGUF 文件；本地目录 → 顶层每个文件（隐藏文件除外）；
    其余按 hub id → 缓存快照的提交哈希。"""
    folder, gguf = resolve_source(spec)
    if gguf:
        return {"kind": "gguf", "file": gguf, **file_fingerprint(os.path.join(folder, gguf))}
    if os.path.isdir(folder):
        names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
        return {"kind": "local folder", "files": {n: file_fingerprint(os.path.join(folder, n)) for n in names}}
    return {"kind": "hub", "id": spec, "commit": hub_commit(spec)}


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """已加载的（目标）分词器的指纹：完整序列化（快速分词器的 tokenizer.json 文本，否则排序后的词表）、
    已加的记号、特殊记号、填充记号与方向、聊天模板，合起来的 sha256；另记词表大小便于人读。"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    payload = {
        "class": type(tokenizer).__name__,
        "tokenizer": backend.to_str() if backend is not None else sorted(vocab.items()),
        "added": sorted((int(i), str(t)) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()),
        "special": getattr(tokenizer, "special_tokens_map", {}), "pad_token_id": getattr(tokenizer, "pad_token_id", None),
        "padding_side": getattr(tokenizer, "padding_side", None), "chat_template": getattr(tokenizer, "chat_template", None),
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return {"size": len(vocab), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def versions() -> dict[str, str | None]:
    """VERSION_PACKAGES 的已安装版本（未安装为 None）。"""
    found: dict[str, str | None] = {}
    for name in VERSION_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def input_fingerprints(cfg: Config, tokenizer: Any) -> dict[str, Any]:
    """本次运行的模型（按角色，Config.model_roles）、分词器与版本的指纹；同一来源只算一次。"""
    per_spec: dict[str, dict[str, Any]] = {}
    for role in cfg.model_roles:
        spec = getattr(cfg, role)
        if spec not in per_spec:
            per_spec[spec] = model_fingerprint(spec)
    return {"models": {role: {"spec": getattr(cfg, role), **per_spec[getattr(cfg, role)]} for role in cfg.model_roles},
            "tokenizer": tokenizer_fingerprint(tokenizer), "versions": versions()}


def run_fingerprints(cfg: Config, questions_sha256: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """写进 fingerprints.json 的全部内容：配置副本（去掉 RUN_LOCATION_FIELDS）、题目的 sha256、输入的指纹。"""
    config = {k: v for k, v in cfg.to_dict().items() if k not in RUN_LOCATION_FIELDS}
    return {"config": config, "questions_sha256": questions_sha256, **inputs}


def write_fingerprints(run_dir: str, fingerprints: dict[str, Any]) -> None:
    """原子写入 fingerprints.json（新运行，在 config.json 之前：有 config.json 的目录就一定有它）。"""
    write_json(os.path.join(run_dir, FINGERPRINTS_FILE), fingerprints)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """嵌套字典 → {"models.target.files.model.safetensors.size": 值}：差异逐项指名到叶子。"""
    if not isinstance(obj, dict) or not obj:
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def diff_items(old: Any, new: Any, prefix: str) -> list[str]:
    """两份指纹（某一节）之间不同的叶子，每项一行 "名字: stored X, now Y"（缺失的一侧为 None）。"""
    a, b = _flatten(old, prefix), _flatten(new, prefix)
    return [f"{k}: stored {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read_pins(run_dir: str, stored: dict[str, Any], questions_sha256: str) -> dict[str, Any]:
    """--resume：读 fingerprints.json，在读任何记录、加载任何模型之前比较两样不需要模型的东西——
    config.json 里的配置与运行开始时的副本逐字段相同（被改过就指名字段），题目与开始时相同。返回读到的指纹。"""
    path = os.path.join(run_dir, FINGERPRINTS_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: missing. This run folder was started by an older version of this tool (or the file was "
                          "deleted), so its inputs cannot be checked; start again with a new --output-dir")
    try:
        with open(path, "rb") as f:
            saved = loads_strict(f.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc}). Cannot resume; start again with a new --output-dir") from None
    sections = ("config", "models", "tokenizer", "versions")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in sections) \
            or not isinstance(saved.get("questions_sha256"), str):
        raise ConfigError(f"{path}: is not a fingerprints file written by this tool (it needs the objects "
                          f"{', '.join(sections)} and questions_sha256). Cannot resume; start again with a new --output-dir")
    changed = config_diff(saved["config"], stored["config"])
    if changed:
        raise ConfigError(f"{os.path.join(run_dir, 'config.json')}: the saved config was changed after the run started "
                          f"(at the start, from {FINGERPRINTS_FILE} → config.json now):\n  " + "\n  ".join(changed)
                          + "\nRestore config.json, or start again with a new --output-dir")
    if saved["questions_sha256"] != questions_sha256:
        raise ConfigError(f"{path}: questions_sha256: stored {saved['questions_sha256']!r}, now {questions_sha256!r}: the "
                          "questions differ from the run's start. A resume needs the same data; start again with a new --output-dir")
    return saved


def pin_inputs(cfg: Config, run_dir: str, saved: dict[str, Any] | None, tokenizer: Any, main: bool) -> dict[str, Any]:
    """算本次的模型、分词器与版本指纹（分词器已加载、权重还没有）；续跑时与 saved 比较：
    模型或分词器不同 → ConfigError（指名每一项）；只有版本不同 → 没有 --allow-version-change 时 ConfigError，
    有则在 stderr 大声警告、在 events.jsonl 记一条 "version_change_allowed"（main 为 True 的进程）。返回本次的指纹。"""
    current = input_fingerprints(cfg, tokenizer)
    if saved is None:
        return current
    path = os.path.join(run_dir, FINGERPRINTS_FILE)
    hard = [line for key in PINNED for line in diff_items(saved.get(key), current[key], key)]
    if hard:
        raise ConfigError(f"{path}: the run's inputs changed since it started (stored → now):\n  " + "\n  ".join(hard)
                          + "\nA resume needs the same models and tokenizer: restore them, or start again with a new --output-dir")
    soft = diff_items(saved.get("versions"), current["versions"], "versions")
    if soft and not cfg.allow_version_change:
        raise ConfigError(f"{path}: package versions changed since the run started:\n  " + "\n  ".join(soft)
                          + "\nThe remaining questions may then be decoded slightly differently. To resume anyway, add "
                          "--allow-version-change (the change is logged to events.jsonl); or start again with a new --output-dir")
    if soft and main:
        print("[main] WARNING: --allow-version-change: resuming with other package versions than the run started with:\n  "
              + "\n  ".join(soft) + "\n[main] records decoded from now on may differ from those an uninterrupted run "
              "would have written; the change is logged to events.jsonl", file=sys.stderr, flush=True)
        log_event(run_dir, {"event": "version_change_allowed", "changes": soft})
    return current
