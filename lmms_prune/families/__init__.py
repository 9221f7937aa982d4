"""The registry of model families: the only list of them (one row each).

Each row maps a family name (the prefix of its lmms-eval model names, ``<family>_<preset>``) to its module
under ``lmms_prune.families`` (whose ``FAMILY`` is the :class:`~lmms_prune.families.base.Family` subclass) and
to the class-name stem of its lmms-eval wrappers. Reading the rows imports nothing: lmms-eval reads them at
start-up through our entry point. A model is matched to its family by ``config.model_type``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmms_prune.families.base import Family

# family name -> (module, wrapper class-name stem)
FAMILIES: dict[str, tuple[str, str]] = {
    "internvl": ("lmms_prune.families.internvl", "InternVLPrune"),
    "qwen2_5_vl": ("lmms_prune.families.qwen2_5_vl", "Qwen25VLPrune"),
    "llava": ("lmms_prune.families.llava", "LlavaPrune"),
    "qwen2_vl": ("lmms_prune.families.qwen2_vl", "Qwen2VLPrune"),
    "qwen3_vl": ("lmms_prune.families.qwen3_vl", "Qwen3VLPrune"),
    "llava_next": ("lmms_prune.families.llava_next", "LlavaNextPrune"),
    "llava_onevision": ("lmms_prune.families.llava_onevision", "LlavaOnevisionPrune"),
}
# Toy-model names (``lmms_prune.toy.models.RECIPES``) that are variants of a family: the text model
# (``internvl_llama``) or the release (``internvl3``, ``internvl3_5``).
_VARIANT_SUFFIXES = ("_llama", "_qwen2", "3", "3_5")


def family_class(name: str) -> type[Family]:
    """The family class registered as ``name``, or a clear error listing the families."""
    if name not in FAMILIES:
        raise ValueError(f"family={name!r}: unknown; choose one of {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name][0]).FAMILY


def all_families() -> list[type[Family]]:
    return [family_class(name) for name in FAMILIES]


def family_for_config(config: Any) -> type[Family]:
    """The family of a transformers config (``AutoConfig``), by ``config.model_type``."""
    model_type = getattr(config, "model_type", None)
    for fam in all_families():
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(f"{f.model_class} ({', '.join(f.model_types)})" for f in all_families())
    raise TypeError(f"model_type {model_type!r} ({type(config).__name__}) is not supported; supported: {supported}")


def family_for_processor(processor: Any) -> type[Family] | None:
    """The family whose processor class ``processor`` is (``InternVLProcessor`` -> internvl), or None."""
    name = type(processor).__name__
    return next((fam for fam in all_families() if name == fam.processor_class), None)


def get_adapter(model: Any) -> Family:
    """The engine's adapter for a loaded model: its family bound to it."""
    try:
        return family_for_config(model.config)(model)
    except TypeError:
        supported = ", ".join(f.model_class for f in all_families())
        raise TypeError(f"model class {type(model).__name__} is not supported; supported: {supported}") from None


def family_of(family_or_model: Any) -> type[Family]:
    """The family of a family name, a toy-model name (``internvl_qwen2``), a model or a config."""
    if isinstance(family_or_model, str):
        name = family_or_model.lower().replace(".", "_").replace("-", "_")
        if name in FAMILIES:
            return family_class(name)
        for fam in sorted(FAMILIES, key=len, reverse=True):  # toy variants: internvl_llama, internvl3, ...
            if name.startswith(fam) and name[len(fam):] in _VARIANT_SUFFIXES:
                return family_class(fam)
        raise ValueError(f"family={family_or_model!r}: must be one of {tuple(FAMILIES)} (or a supported model)")
    config = getattr(family_or_model, "config", family_or_model)
    return family_for_config(config)
