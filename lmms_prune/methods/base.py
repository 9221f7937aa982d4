"""The plug-in interface of pruning methods: parameters, the signals a method needs, scores and selectors.

Methods import these through :mod:`lmms_prune.api`, the stable public API (it documents every signal); the
rest of this module (``MethodModule``, ``parse_layers``, ...) is private.

A method module under ``lmms_prune.methods`` declares, with the classes here:

* :class:`Param` rows: every parameter it introduces (default, type, range, help text);
* :class:`Score` plug-ins: an importance score per visual token, computed from declared signals;
* :class:`Selector` plug-ins: the kept indices of one image, from its scores and declared signals;
* :class:`Preset` rows: named settings (``fastv`` = score ``attention`` + selector ``topk`` at ``K=2``).

The engine (``lmms_prune.engine``) collects the union of the :class:`Needs` of the chosen score and selector,
hands each image's :class:`ImageSignals` to the score, then to the selector. It names no method and no score.
Method modules stay light to import (lmms-eval reads the preset names at start-up): the tensor maths is
reached through :data:`sel` and :data:`S`, imported on first use.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from lmms_prune.families.base import ImageSpan


class _Lazy:
    """A module imported on first attribute access."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


sel = _Lazy("lmms_prune.selection")  # pure selection algorithms
S = _Lazy("lmms_prune.scores")  # pure importance scores

STAGES = ("none", "llm", "pre_llm")


# ---------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Param:
    """One pruning parameter: its default, type, allowed values and help text.

    ``kind``: ``int``, ``float``, ``bool`` (``true``/``false``), ``str`` (with ``choices``), ``path`` (a file
    path or None), ``alpha`` (a
    float or ``"auto"``), ``indices`` (``"3,5;1,2"``) or ``layers`` (``"8,16,24"`` or ``"auto"``: a strictly
    increasing tuple of decoder layers >= 1). ``low``/``high`` bound numbers (inclusive unless
    ``open_low``); ``optional`` allows None.
    """

    name: str
    default: Any
    help: str
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False

    def parse(self, value: Any) -> Any:
        """Parse a command-line string (or check a Python value) into this parameter's type."""
        text = value.strip() if isinstance(value, str) else None
        if text is not None and text.lower() in ("", "none", "null") and self.kind not in ("str",):
            if not self.optional:
                raise ValueError(f"{self.name}={value!r}: a value is required ({self._expect()})")
            return None
        if value is None:
            if not self.optional:
                raise ValueError(f"{self.name}=None: a value is required ({self._expect()})")
            return None
        if self.kind == "int":
            number = self._as_int(value, text)
            return self._number(number, number if text is not None else value)
        if self.kind == "float":
            number = self._as_float(value, text)
            return self._number(number, number if text is not None else value)
        if self.kind == "alpha":
            if value == "auto":
                return "auto"
            try:
                number = self._as_float(value, text)
            except ValueError:
                raise ValueError(f"{self.name}={value!r}: must be in [0, 1] or 'auto'") from None
            shown = number if text is not None else value
            if not 0.0 <= number <= 1.0:
                raise ValueError(f"{self.name}={shown!r}: must be in [0, 1] or 'auto'")
            return number
        if self.kind == "bool":
            return self._as_bool(value, text)
        if self.kind == "indices":
            return parse_indices(text) if text is not None else value
        if self.kind == "layers":
            return parse_layers(self.name, value)
        if self.kind == "path":
            return text if text is not None else str(value)
        out = text if text is not None else value
        if self.choices and out not in self.choices:
            raise ValueError(f"{self.name}={value!r}: must be one of {self.choices}")
        return out

    def _expect(self) -> str:
        return {"int": "an integer", "float": "a number", "alpha": "a number or 'auto'"}.get(self.kind, "a value")

    def _as_bool(self, value: Any, text: str | None) -> bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in ("true", "1", "yes", "on"):
            return True
        if text is not None and text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{self.name}={value!r}: must be true or false")

    def _as_int(self, value: Any, text: str | None) -> int:
        try:
            if text is not None:
                return int(text)
            if isinstance(value, bool) or not float(value).is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name}={value!r}: must be an integer") from None

    def _as_float(self, value: Any, text: str | None) -> float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(text if text is not None else value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name}={value!r}: must be a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{self.name}={value!r}: must be a finite number")
        return number

    def _number(self, number: float, shown: Any) -> Any:
        low_ok = self.low is None or (number > self.low if self.open_low else number >= self.low)
        high_ok = self.high is None or number <= self.high
        if not (low_ok and high_ok):
            raise ValueError(f"{self.name}={shown}: must be {self.range_text()}")
        return number

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"<= {self.high:g}"


def parse_layers(name: str, value: Any) -> tuple[int, ...] | str:
    """``"8,16,24"`` (or ``"8/16/24"``, the form for lmms-eval's ``--model_args`` where commas separate
    arguments; or a sequence of ints) into a strictly increasing tuple of layers >= 1; ``"auto"`` kept."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    fix = (f"{name}: give strictly increasing decoder layers >= 1, e.g. {name}=8,16,24 (8/16/24 inside "
           "lmms-eval --model_args), or 'auto'")
    try:
        items = value.replace(" ", "").replace("/", ",").split(",") if isinstance(value, str) else list(value)
        layers = tuple(int(x) for x in items if x != "")
        if any(isinstance(x, bool) or float(x) != int(x) for x in items if x != ""):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: not a list of integers; {fix}") from None
    if not layers or layers[0] < 1 or any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"{name}={value!r}: {fix}")
    return layers


def parse_indices(text: str) -> list[int] | list[list[int]]:
    """``"3,5,9"`` or ``"3,5;1,2"`` (one list per sample, ';'-separated) into lists of ints."""
    try:
        groups = [[int(x) for x in g.replace(" ", "").split(",") if x] for g in text.split(";")]
    except ValueError:
        raise ValueError(f"keep_indices={text!r}: must be comma-separated integers, ';' between samples") from None
    return groups[0] if len(groups) == 1 else groups


# ---------------------------------------------------------------------------------------------- signals
@dataclass(frozen=True)
class Needs:
    """The signals a score or selector reads; the engine collects the union of both.

    Inside the LLM: ``attention`` (decoder layers whose last-prompt-token attention row is recorded),
    ``text_attention`` (layers whose attention rows of every text token after the sample's last image are
    recorded: SparseVLM's raters), ``query_key_attention`` (layers whose last-prompt-token attention row is
    computed, before the layer runs, from that layer's OWN query/key projections and RoPE applied to its input:
    a stage pruning at layer K can then be ranked by layer K itself, or by layer K-1 before it runs;
    ``query_key_unrotated``: without RoPE, the unrotated projections (with Qwen3's q/k norms); and
    ``query_key_visual_softmax``: soft-maxed over the sample's visual keys only, not the whole row), ``key_norms`` (layers whose key L1 norms
    are recorded), ``hidden`` (visual hidden states at layer K's
    input), ``final_norm`` (the same through the LM's final norm), ``text`` (the same signals for the text
    tokens after the image), ``prior`` (a calibrated prior file). Before the LLM: ``vision_attention`` (the
    vision encoder's [CLS] row at the feature layer, or its mean received attention without [CLS]),
    ``vision_attention_early`` (the same signal at an early vision layer,
    :meth:`lmms_prune.families.base.Family.early_vision_attention`: VScan's local scan),
    ``vision_attention_last`` (the same signal at the tower's last layer, the keys an in-tower merge masked
    left out of its softmax: MustDrop's key set),
    ``vision_frame_attention`` (per frame of a video, or per image: the softmax of the frame's mean query
    over its LLM tokens' mean keys at the family's chosen vision block, heads averaged, one value per LLM token:
    :meth:`lmms_prune.families.base.Family.frame_query_block`; FastVID's Qwen2.5-VL signal),
    ``vision_features`` (pre-projector features), ``vision_keys`` (the vision encoder's keys at the feature layer,
    heads averaged, where its patches map one-to-one onto the LLM's visual tokens; else absent), ``vision_cls``
    (each image's [CLS] token at the feature layer through the family's projector, under the same condition and
    where the tower has a [CLS]; else absent), ``embeddings`` (projected visual embeddings), ``instruction``
    (the LLM's input embeddings of the prompt's text tokens after the image, up to the next image or the
    prompt's end). ``padding``: each image's padding-token mask, where the caller gave one
    (``PruneHandle.image_padding``: LLaVA-1.5's pad-to-square).
    """

    attention: tuple[int, ...] = ()
    text_attention: tuple[int, ...] = ()
    query_key_attention: tuple[int, ...] = ()
    query_key_unrotated: bool = False
    query_key_visual_softmax: bool = False
    key_norms: tuple[int, ...] = ()
    hidden: bool = False
    final_norm: bool = False
    text: bool = False
    prior: bool = False
    vision_attention: bool = False
    vision_attention_early: bool = False
    vision_attention_last: bool = False
    vision_frame_attention: bool = False
    vision_features: bool = False
    vision_keys: bool = False
    vision_cls: bool = False
    embeddings: bool = False
    instruction: bool = False
    padding: bool = False

    def __or__(self, other: Needs) -> Needs:
        values = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            values[f.name] = tuple(sorted(set(a) | set(b))) if isinstance(a, tuple) else (a or b)
        return Needs(**values)


@dataclass
class ImageSignals:
    """What the engine hands a score and a selector for one image of one sample.

    Tensors over the image's ``N`` visual tokens: ``attention[layer]`` ``[N]`` (also for the layers of
    ``Needs.query_key_attention``), ``key_norms[layer]`` ``[N]``,
    ``hidden`` / ``final_norm`` ``[N, D]``, ``vision_attention`` ``[N]``, ``vision_features`` ``[N, D_v]``,
    ``embeddings`` ``[N, D]``, ``text_attention[layer]`` ``[M', N]`` (the attention rows of the ``M'`` text
    tokens after the sample's last image, over the image's visual columns); the text tokens after the image: ``text_key_norms[layer]`` ``[M]``,
    ``text_hidden`` / ``text_final_norm`` ``[M, D]``. ``offset``: index of the image's first token among the
    sample's visual tokens (``sample_visual`` in all).

    Multi-stage pruning (``prune_layers``): at a later stage ``present`` holds the image's token indices still
    present (ascending, within the image's original ``span.length`` tokens); every tensor above then covers
    those ``num_tokens = len(present)`` tokens only, and the selector's indices count within them.

    ``padding`` (when the score or selector needs it and the caller gave one): bool ``[N]``, True where the
    token's patch is at least half padding the family's image pipeline added (LLaVA-1.5's pad-to-square).
    """

    sample: int
    span: ImageSpan
    offset: int
    sample_visual: int
    task_kind: str | None = None
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    text_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    key_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    final_norm: torch.Tensor | None = None
    text_key_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    text_hidden: torch.Tensor | None = None
    text_final_norm: torch.Tensor | None = None
    vision_attention: torch.Tensor | None = None
    vision_attention_early: torch.Tensor | None = None  # [N] (Needs.vision_attention_early)
    vision_attention_last: torch.Tensor | None = None  # [N] (Needs.vision_attention_last)
    vision_frame_attention: torch.Tensor | None = None  # [N], each frame's summing to 1 (Needs.vision_frame_attention)
    vision_features: torch.Tensor | None = None
    vision_keys: torch.Tensor | None = None  # [N, d] (Needs.vision_keys), None where the family has no such map
    vision_cls: torch.Tensor | None = None  # [D] projected [CLS] (Needs.vision_cls), None where not defined
    embeddings: torch.Tensor | None = None
    instruction: torch.Tensor | None = None  # [M, D] pre-LLM: input embeddings of the text after the image
    device: Any = None
    present: torch.Tensor | None = None
    padding: torch.Tensor | None = None
    # [N] int64 with an in-tower merge (Selector.tower_merge, lmms_prune.selection.merge_into_slots): the group
    # whose mean the token's place holds (0, 1, ... in the merge's order), -1 for a token of no group, -2 where
    # the token was masked (a member of a group held elsewhere); None without one
    tower_groups: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """The image's visual tokens ``N`` still present (its span's structural tokens, e.g. newlines, are not
        among them)."""
        return self.span.num_visual if self.present is None else int(self.present.numel())


# ---------------------------------------------------------------------------------------------- plug-ins
class Plugin:
    """Common part of scores and selectors: a name, the parameters read, the stages where it runs."""

    name: ClassVar[str] = ""
    params: ClassVar[tuple[str, ...]] = ()  # config fields this plug-in reads
    stages: ClassVar[tuple[str, ...]] = ("llm",)
    description: ClassVar[str] = ""
    # True when it works on any subset of an image's tokens (no grid layout, no sample-wide indices), as the
    # later stages of multi-stage pruning (``prune_layers``) need
    subsets: ClassVar[bool] = False

    def __init__(self, config: Any, prior: Any = None):
        self.config = config
        self.prior = prior

    @classmethod
    def needs(cls, config: Any) -> Needs:
        return Needs()

    @classmethod
    def used_params(cls, config: Any) -> tuple[str, ...]:
        """The config fields this plug-in reads under ``config`` (may depend on other fields)."""
        return cls.params

    @classmethod
    def check(cls, config: Any) -> None:
        """Cross-field checks that do not need a model (raise ``ValueError`` naming the value and the fix)."""

    @classmethod
    def for_family(cls, config: Any, family: str) -> Any:
        """``config`` with the values this plug-in leaves to the model's family resolved for ``family`` (a
        :attr:`lmms_prune.families.base.Family.name`; FastVID's ``fastvid_variant='auto'``: the authors' code for
        that family); the engine calls it once when the method is applied. Default: ``config`` unchanged."""
        return config


class Score(Plugin):
    """An importance score: ``score(image) -> [N] tensor`` (or None for selectors that need none)."""

    def __call__(self, image: ImageSignals) -> torch.Tensor | None:
        return None


class Selector(Plugin):
    """A selection: ``selector(image, scores, n) -> [n]`` kept indices within the image, ascending (or, where
    ``merges`` is set, a :class:`lmms_prune.selection.Merge` of new embeddings; inside the LLM a merge names
    the ``slots`` its merged tokens take, and may keep a count other than ``n``: SparseVLM's adaptive count)."""

    merges: ClassVar[bool] = False
    # True where a pre-LLM merge names Merge.slots: each merged token takes a removed token's place and original
    # position (VScan, FastVID), so every positions rule works; else merged tokens follow the kept ones, renumbered
    merges_in_place: ClassVar[bool] = False
    # True for a method that prunes videos only and leaves every image token (vLLM's EVS): check-method then
    # checks its budget on no image
    videos_only: ClassVar[bool] = False
    # False for a method whose own parameters alone set the count and which never reads the budget (DyCoke's
    # K and frame count): bench then reports the kept share as the cell's keep, not the keep_ratio given
    reads_budget: ClassVar[bool] = True
    # prune_layers='auto': the method's pruning layers as fractions of the decoder's depth (PyramidDrop's
    # quarters unless a method says otherwise)
    layer_fractions: ClassVar[tuple[float, ...]] = (0.25, 0.5, 0.75)

    @classmethod
    def adaptive_count(cls, config: Any) -> bool:
        """True where the method's own rule, not the budget ``n``, sets how many tokens an image keeps under
        ``config`` (SparseVLM's rank rule, MustDrop's window merges, PruMerge+'s adaptive budget): check-method
        then reports the counts instead of requiring exactly ``n``."""
        return cls.merges and config.stage == "llm"

    @classmethod
    def decode_layer(cls, config: Any) -> int | None:
        """A decode-time selection (``lmms_prune.engine.decode``; DyCoke's stage 2): the decoder layer ``L`` from
        which, at each decode step, the current token attends only to the visual KV entries :meth:`decode_keep`
        picks from layer ``L - 1``'s attention row. None (default): every entry, always."""
        return None

    def decode_keep(self, span: ImageSpan, row: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor | None:
        """At a decode step, for one visual span of the prompt the LLM saw: ``row`` ``[n]`` the current token's
        attention (layer ``L - 1``, heads averaged) over the span's ``n`` visual tokens there, ``previous`` the
        previous step's row of the span (None at the call's first step); the kept indices into ``row``, or None
        for all of them."""
        return None

    def __call__(self, image: ImageSignals, scores: torch.Tensor | None, n: int) -> torch.Tensor:
        raise TypeError(f"selector {self.name!r} does not select")

    def tower_layer(self) -> int | None:
        """The vision-tower layer after which :meth:`tower_merge` runs (:mod:`lmms_prune.engine.tower`); None
        (the default): the selector merges nothing inside the tower."""
        return None

    def tower_merge(self, features: torch.Tensor, grid: tuple[int, int]) -> Any:
        """One image's groups merged inside the tower: features ``[P, D]`` (the tower's patches after
        :meth:`tower_layer`), grid ``(rows, cols)`` -> a :class:`lmms_prune.selection.Merge` of whole groups
        (each row a mean over its members)."""
        raise TypeError(f"selector {self.name!r} merges nothing inside the vision tower")


@dataclass(frozen=True)
class Preset:
    """A named method: its description and the config fields it sets."""

    name: str
    description: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class MethodModule:
    """What one method module contributes (its module-level ``PARAMS``, ``SCORES``, ``SELECTORS``, ``PRESETS``)."""

    params: Sequence[Param] = ()
    scores: Sequence[type[Score]] = ()
    selectors: Sequence[type[Selector]] = ()
    presets: Sequence[Preset] = ()

