"""Load a transformers-native VLM and its processor the way users do: ``from_pretrained(name_or_path)``."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """'auto' -> bfloat16 on GPU, float32 on CPU; names like 'float16' map to torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    from lmms_prune.runner import DTYPE_ALIASES, torch_dtype

    if dtype not in DTYPE_ALIASES:
        raise ValueError(f"dtype={dtype!r}: must be one of auto, {', '.join(DTYPE_ALIASES)}")
    return torch_dtype(dtype)


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """The checkpoint directory ``final``, written by ``build(staging)`` on first use and reused after.

    ``build`` writes into a private temporary directory beside ``final``, which is then renamed into place,
    so concurrent callers (pytest-xdist workers, ranks) never see a half-written checkpoint; the loser of a
    race discards its copy. A directory holding ``config.json`` counts as complete.
    """
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(staging)
        try:
            staging.rename(final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


# Short names of the checkpoints this package ships -> their folder under lmms_prune/assets and the script that
# trains them (the demo's grounder, the video demo's QA model).
SHIPPED = {"tiny-grounder": "tiny_grounder", "tiny-video-qa": "tiny_video_qa"}
TRAINED_BY = {"tiny-grounder": "scripts/train_grounding.py", "tiny-video-qa": "scripts/train_video_qa.py"}


def shipped_dir(name: str) -> Path:
    """Directory of the shipped checkpoint ``name``; ``FileNotFoundError`` when the package data is missing."""
    path = Path(__file__).resolve().parent / "assets" / SHIPPED[name]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: the shipped model {name!r} is not there; reinstall lmms_prune with its package data or "
            f"retrain it ({TRAINED_BY[name]} --out lmms_prune/assets/{SHIPPED[name]})"
        )
    return path


def resolve_pretrained(name_or_path: str) -> str:
    """Short names of the checkpoints this package ships (``tiny-grounder``) -> their directory; an original
    (remote-code) InternVL2 / InternVL2.5 checkpoint -> its transformers-native copy, converted once into
    ``$LMMS_PRUNE_CACHE/converted`` (:func:`lmms_prune.convert.converted_dir`); anything else (hub name, local
    directory) unchanged. Only ``config.json`` is read to tell (a local one, or the hub cache's)."""
    if name_or_path in SHIPPED:
        return str(shipped_dir(name_or_path))
    from lmms_prune.convert import converted_dir, original_internvl_source

    if original_internvl_source(name_or_path) is not None:
        return str(converted_dir(name_or_path))
    return name_or_path


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name_or_path: str,
    device: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str = "sdpa",
    device_map: Any = None,
) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, processor) for a hub name or a local directory saved with ``save_pretrained``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = device or default_device()
    name_or_path = resolve_pretrained(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype, device), attn_implementation=attn_implementation,
        device_map=device_map,
    )
    if device_map is None:
        model = model.to(device)
    processor = AutoProcessor.from_pretrained(name_or_path)
    return model.eval(), processor
