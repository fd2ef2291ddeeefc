"""The KV shape (layers, KV heads, head_dim) of a model on disk: a GGUF file, a Hugging Face
checkpoint folder, or its config.json. Reads metadata only (no weights, no torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .types import KVShape, kv_shape


def _from_gguf(path: Path) -> KVShape:
    from .. import gguf

    with gguf.open(path) as f:
        meta = f.metadata
        arch = str(meta.get("general.architecture", ""))

        def field(key: str, default: object = None) -> object:
            full = f"{arch}.{key}"
            if full not in meta and default is None:
                raise ValueError(f"{path}: GGUF metadata has no {full!r}")
            return meta.get(full, default)

        n_head = int(field("attention.head_count"))
        n_head_kv = int(field("attention.head_count_kv", n_head))
        head_dim = field("attention.key_length", 0) or int(field("embedding_length")) // n_head
        return KVShape(int(field("block_count")), n_head_kv, int(head_dim))


def kv_shape_from_path(path: str | os.PathLike[str]) -> KVShape:
    """KVShape of MODEL_OR_CONFIG: a .gguf file, an HF folder (its config.json), or a JSON
    config file. ValueError / FileNotFoundError naming the path otherwise."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"{path}: a model folder needs a config.json")
    if not p.is_file():
        raise FileNotFoundError(f"no such model or config: {path}")
    if p.suffix.lower() == ".gguf":
        return _from_gguf(p)
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not a GGUF file nor a JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: a JSON config must be an object")
    cfg = cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg
    try:
        return kv_shape(cfg)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
