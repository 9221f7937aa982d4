"""The shipped tiny InternVL grounding model (trained by ``scripts/train_grounding.py``) and its data distribution.

The model is a transformers-native ``InternVLForConditionalGeneration`` with real InternVL geometry (448 px tiles,
patch 14, pixel shuffle 0.5, 256 visual tokens per tile, dynamic tiling through the saved processor) and a
Qwen2 text model with 14 decoder layers, trained from scratch on synthetic scenes of :mod:`lmms_prune.toy.data`
to answer InternVL's grounding prompt with ``<box>[[x1, y1, x2, y2]]</box>`` on the 0-1000 grid, then further
trained with lmms-eval's POPE yes/no questions mixed in (``Is there a red circle in the image?`` answered ``Yes`` or
``No``; :mod:`lmms_prune.toy.pope`), so ``lmms-prune demo`` ranks pruning on a second task. Its weights,
tokenizer (:func:`grounder_tokenizer`), processor and chat template live in
:func:`grounder_dir`; load them with ``from_pretrained(grounder_dir())``.

Held-out data of the distribution it was trained on: ``write_refcoco_hub_layout(out, n, seed, **SCENE_KWARGS)``
or ``generate_scenes(n, seed, **SCENE_KWARGS)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

SHORT_NAME = "tiny-grounder"
"""Proposed short name for ``--model_args pretrained=tiny-grounder`` (resolved to :func:`grounder_dir`)."""

SCENE_KWARGS: dict[str, Any] = {
    "width": 448,
    "height": 448,
    "n_objects": (1, 3),
    "background": "plain",
    "size_fraction": (0.2, 0.4),
    "attribute_pool": (4, 6),
}
"""Scene options of the training and held-out distribution (keyword arguments of ``generate_scenes`` /
``write_refcoco_hub_layout``): square 448 px images (one InternVL tile, no thumbnail, 256 visual tokens),
1-3 shapes on a plain light background, each 20-40% of the image side, drawn from 4-6 shapes and 4-6
colours per scene. Look-alikes are rarer than in the generator's default (1-3 of each), so most referring
expressions name shape and colour, and about a fifth need a superlative or a relation; a tiny model trained
for an hour on CPU can learn this distribution, not the default one."""


def grounder_dir() -> Path:
    """Directory of the shipped model (``config.json``, ``model.safetensors``, tokenizer and processor files).

    Raises ``FileNotFoundError`` when the package data is missing (e.g. an install without package data).
    """
    from lmms_prune.loading import shipped_dir

    return shipped_dir(SHORT_NAME)


def grounding_corpus() -> tuple[str, ...]:
    """Extra BPE training text of the grounding model's tokenizer: every word of the referring-expression grammar
    (colours, shapes, superlatives in both forms, relations), twice, so each becomes one token (as in real
    vocabularies, where " purple" or " hexagon" are single tokens)."""
    from lmms_prune.toy.data import PALETTE, RELATIONS, SHAPES, SUPERLATIVES

    phrases = [*PALETTE, *SHAPES, *(form for forms in SUPERLATIVES.values() for form in forms if form), *RELATIONS]
    line = "the " + ", the ".join(phrases) + "."
    return (line, line)


def grounder_tokenizer() -> PreTrainedTokenizerFast:
    """The grounding model's tokenizer: the toy Llama-family byte-level BPE (InternVL special tokens, one digit
    per token) trained on its corpus plus :func:`grounding_corpus`. The shipped model's ``tokenizer.json`` is
    this tokenizer; training builds it with this function."""
    from lmms_prune.toy.tokenizers import llama_tokenizer

    return llama_tokenizer("internvl_llama", grounding_corpus())
