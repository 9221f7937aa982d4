"""Converters from remote-code checkpoints to transformers-native ones (no ``trust_remote_code``).

* :func:`lmms_prune.convert.internvl.convert_internvl`: an original InternVL2 / InternVL2.5 checkpoint
  (``InternVLChatModel``: InternViT + InternLM2 / Qwen2 / Llama) -> ``InternVLForConditionalGeneration``.

This module stays light (json and ``huggingface_hub`` only): :func:`original_internvl_source` tells whether a
``pretrained=`` value is an original InternVL checkpoint without importing torch or downloading weights, and
:func:`converted_dir` converts one only when it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

ORIGINAL_ARCHITECTURE = "InternVLChatModel"
ORIGINAL_MODEL_TYPE = "internvl_chat"
# Bump when the converted output changes for the same input; it keys the conversion cache.
CONVERTER_VERSION = "1"
logger = logging.getLogger(__name__)


def is_original_internvl(config: dict[str, Any]) -> bool:
    """Whether a parsed ``config.json`` is an original (remote-code) InternVL chat checkpoint."""
    return config.get("architectures") == [ORIGINAL_ARCHITECTURE] or config.get("model_type") == ORIGINAL_MODEL_TYPE


def _looks_like_repo_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not name.endswith((".", "-"))


def _hub_config_path(repo_id: str) -> Path | None:
    """``config.json`` of a hub repository: from the local hub cache, else downloaded (a few kB) unless the hub
    is offline. None when it cannot be had; the caller then leaves the name to ``from_pretrained``."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return Path(cached)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return None
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception:  # not a repo, gated, no network: from_pretrained reports it in its own words
        return None


def original_internvl_source(name_or_path: str) -> str | None:
    """``name_or_path`` if it names an original InternVL checkpoint (a local directory, or a hub id whose
    ``config.json`` is cached or fetchable), else None. Reads only ``config.json``."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            return None
    elif _looks_like_repo_id(name_or_path):
        config_path = _hub_config_path(name_or_path)
        if config_path is None:
            return None
    else:
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return name_or_path if isinstance(config, dict) and is_original_internvl(config) else None


def fetch_checkpoint(src: str | os.PathLike) -> Path:
    """The local directory of ``src``: a directory as is, a hub id through ``huggingface_hub.snapshot_download``
    (weights, config, tokenizer files; a clear error when it cannot be fetched, e.g. offline and not cached)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    name = str(src)
    if not _looks_like_repo_id(name):
        raise ValueError(f"{name!r}: neither a local directory nor a hub id (owner/name) of an InternVL checkpoint")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model",
                                                            "*.txt", "*.tiktoken"]))
    except Exception as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        hint = (" HF_HUB_OFFLINE is set and the checkpoint is not in the local hub cache: download it once "
                "online (huggingface-cli download " + name + ") or pass a local directory") if offline else (
                " check the name, your network and, for gated repositories, `huggingface-cli login`")
        raise ValueError(f"could not fetch {name!r} from the hugging face hub ({type(err).__name__}: {err});"
                         f"{hint}") from err


def converted_cache_root() -> Path:
    """``$LMMS_PRUNE_CACHE/converted`` if the variable is set, else ``~/.cache/lmms_prune/converted``."""
    root = os.environ.get("LMMS_PRUNE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "lmms_prune"
    return base / "converted"


def checkpoint_fingerprint(src_dir: Path) -> str:
    """Short hash of what a conversion reads: ``config.json``, the tokenizer files, the weight files' names and
    sizes, the converter version and the transformers version."""
    import importlib.metadata

    digest = hashlib.sha256(f"{CONVERTER_VERSION}|{importlib.metadata.version('transformers')}".encode())
    for path in sorted(src_dir.iterdir()):
        if not path.is_file():
            continue
        digest.update(path.name.encode())
        if path.suffix in (".json", ".model", ".txt"):
            digest.update(path.read_bytes())
        else:
            digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:12]


def converted_dir(src: str | os.PathLike) -> Path:
    """The native copy of the original InternVL checkpoint ``src`` under :func:`converted_cache_root`, converted
    once per checkpoint fingerprint and reused.

    Written to a private temporary directory and renamed into place, so concurrent callers never see a
    half-written directory; the loser of a race discards its copy.
    """
    src_dir = fetch_checkpoint(src)
    label = re.sub(r"[^\w.-]+", "_", str(src).rstrip("/").split("/")[-1]) or "internvl"
    root = converted_cache_root()
    final = root / f"{label}-{checkpoint_fingerprint(src_dir)}"
    if (final / "config.json").is_file():
        return final
    logger.warning("lmms-prune: converting the original InternVL checkpoint %s into %s (once; later runs reuse "
                   "it)", src, final)

    def build(staging: Path) -> None:
        from lmms_prune.convert.internvl import convert_internvl

        convert_internvl(src_dir, staging, log=logger.info)

    from lmms_prune.loading import build_once

    return build_once(final, build)


def __getattr__(name: str) -> Any:
    if name == "convert_internvl":
        from lmms_prune.convert.internvl import convert_internvl

        return convert_internvl
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
