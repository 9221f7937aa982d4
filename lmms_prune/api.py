"""The public method API: what a pruning method, built-in or external, may use. Everything else is private.

A method module (``lmms_prune/methods/fastv.py``, or one outside the package registered through the entry-point
group ``lmms_prune.methods``; docs/extending.md, "Write your own method") declares four tuples with the classes
here, and imports nothing heavy at module level (lmms-eval reads the preset names at start-up):

* ``PARAMS``: :class:`Param` rows, every parameter it introduces (default, kind, range, help);
* ``SCORES``: :class:`Score` subclasses, ``score(image) -> [N]`` importance (or None);
* ``SELECTORS``: :class:`Selector` subclasses, ``selector(image, scores, n) -> [n]`` kept indices, ascending,
  unique, in ``[0, N)`` (or a :class:`Merge`);
* ``PRESETS``: :class:`Preset` rows, a name and the config fields it sets (``stage``, ``score``, ``selector``,
  ``prune_layer``, its own parameters).

Stable names (semantic versioning of the package covers them): :class:`Needs`, :class:`ImageSignals`,
:class:`Score`, :class:`Selector`, :class:`Param`, :class:`Preset`, :class:`Merge`, the pure helper namespaces
:data:`sel` (every name in ``lmms_prune.selection.__all__``: ``topk``, ``budget``, ``divprune``, ``pivot_mis``,
...) and :data:`S` (every name in ``lmms_prune.scores.__all__``: ``minmax``, ``cls_attention``, ...), and the
``ImageSpan`` fields read through ``image.span`` (``start``, ``length``, ``grids``, ``structural``, ``video``,
``num_visual``). The engine, the families, the runner and every other module are private: they may change
without notice, and a method that reaches into them is not covered by ``lmms-prune check-method``.

Signals (:class:`Needs` field -> :class:`ImageSignals` attribute). ``N`` is the image's visual tokens still
present (``image.num_tokens``), ``D`` the language model's hidden size, ``D_v`` the vision tower's, ``M`` the
text tokens after the image up to the next image or the prompt's end, ``M'`` those after the sample's last
image. Tensors are on the model's device, float32 or the model's dtype; a score may return any float dtype.

=====================  =============================  ================  ==================================================
Needs field            ImageSignals attribute         shape             what, where
=====================  =============================  ================  ==================================================
``attention=(l,)``     ``attention[l]``               ``[N]``           last prompt token's attention row (heads averaged)
                                                                        computed inside decoder layer ``l`` (stage llm;
                                                                        ``score_layer = prune_layer - 1`` by default)
``text_attention``     ``text_attention[l]``          ``[M', N]``       attention rows of the text after the last image
``key_norms=(l,)``     ``key_norms[l]``               ``[N]``           L1 norm of each token's key at layer ``l``
                       (``text_key_norms[l]``)        (``[M]``)         (with ``text``: the text tokens' ones)
``hidden``             ``hidden`` (``text_hidden``)   ``[N, D]``        hidden states at the input of ``prune_layer``
``final_norm``         ``final_norm``                 ``[N, D]``        the same through the LM's final norm
``prior``              the plug-in's ``self.prior``   ``[N]`` per count a calibrated mean attention (``bias_prior=FILE``)
``vision_attention``   ``vision_attention``           ``[N]``           pre-LLM: the vision tower's [CLS] attention row at
                                                                        the feature layer (or mean received attention)
``vision_attention_``  ``vision_attention_early``     ``[N]``           pre-LLM: the same at an early vision layer
``early``                                                               (``Family.early_vision_attention``: L/4 - 1)
``vision_features``    ``vision_features``            ``[N, D_v]``      pre-LLM: features before the projector
``embeddings``         ``embeddings``                 ``[N, D]``        pre-LLM: projected visual embeddings (LLM input)
``instruction``        ``instruction``                ``[M, D]``        pre-LLM: input embeddings of the text after it
``padding``            ``padding``                    bool ``[N]``      True where the patch is padding (LLaVA-1.5)
=====================  =============================  ================  ==================================================

Always present: ``sample`` (row in the batch), ``span`` (its ``ImageSpan``), ``offset`` (index of the image's
first visual token among the sample's), ``sample_visual`` (the sample's visual tokens), ``task_kind`` (None,
``"grounding"`` or ``"understanding"``), ``device``, ``present`` (multi-stage pruning: the image's token indices
still present, else None).

Images and videos: a video is ONE span (``span.video`` True) whose ``span.grids`` holds one ``(rows, cols)``
grid per (merged) frame in time order; every signal above covers all its frames' tokens, frame after frame, and
the budget ``n`` counts them all (Qwen2-VL / Qwen2.5-VL / Qwen3-VL merge two frames in time; LLaVA-OneVision
pools each frame 2x2). InternVL feeds video frames as separate one-tile images, so a method sees no neighbours
there. An image's ``span.grids`` are its tiles (InternVL: thumbnail last; LLaVA-NeXT: base image, then mosaic).
Structural tokens (row newlines, timestamps) are never shown to a method and always kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmms_prune.methods.base import ImageSignals, Needs, Param, Preset, S, Score, Selector, sel

if TYPE_CHECKING:
    from lmms_prune.selection.merge import Merge

__all__ = ["ImageSignals", "Merge", "Needs", "Param", "Preset", "S", "Score", "Selector", "sel"]


def __getattr__(name: str) -> Any:
    """``Merge`` on first use: it lives with the tensor maths (importing it imports torch)."""
    if name == "Merge":
        from lmms_prune.selection.merge import Merge

        return Merge
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
