"""Phase-0 attention diagnostics (deep-layer paper, section 4.4 and Table 3).

For each image, each prompt template and each layer, the last prompt token's head-averaged attention over the
image's visual tokens (methods.md section 4, the FastV/D2Pruner/deep-layer score ``A^(l)``, not renormalised)
is one *attention map* ``a`` of ``N`` values. Three statistics describe a layer:

* **prompt stability**: the mean pairwise cosine similarity of one image's maps across the ``P`` templates,
  ``2 / (P (P - 1)) * sum_{i<j} cos(a_i, a_j)``, averaged over images (1 = the prompt does not matter);
* **position correlation**: Spearman's rho between ``a`` and the token position ``0..N-1`` (the order of the
  image's visual tokens in the prompt: InternVL tiles row-major, then the thumbnail), averaged over maps; the
  paper calls ``|rho| >= 0.3`` a meaningful positional bias. The table also gives the mean ``|rho|``;
* **entropy**: ``H = -sum_i p_i ln p_i`` (natural log, ``0 ln 0 = 0``) of ``p = a / sum(a)``, the map
  normalised over the image's visual tokens, averaged over maps; ``ln N`` (uniform attention) is its maximum.

Layer numbers follow the paper: "layer L" is the attention that decides what prune layer ``K = L`` receives,
i.e. decoder layer index ``L - 1`` (methods.md section 2: the paper's L12 is ``score_layer=11``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import stats
from torch import nn

from lmms_prune.engine import attention as attn
from lmms_prune.families import family_of, get_adapter

COLUMNS = (
    "layer", "score_layer", "prompt_stability", "position_correlation", "position_correlation_abs", "entropy",
    "max_entropy", "num_images", "num_prompts",
)


# ---------------------------------------------------------------------------------------------- math
def _as_map(attention: torch.Tensor | Sequence[float], name: str = "attention") -> np.ndarray:
    a = np.asarray(torch.as_tensor(attention, dtype=torch.float64).flatten())
    if a.size < 2:
        raise ValueError(f"{name} has {a.size} values: a map needs at least 2 visual tokens")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has NaN or infinite values: check the model's attention (dtype overflow?)")
    return a


def prompt_stability(maps: torch.Tensor) -> float:
    """Mean pairwise cosine similarity of one image's attention maps across prompt templates.

    maps: ``[P, N]`` (P >= 2 templates, N visual tokens). Returns ``mean_{i<j} cos(maps[i], maps[j])``;
    1.0 for identical (or proportional) maps. A map with zero norm has no direction: ValueError.
    """
    m = torch.as_tensor(maps, dtype=torch.float64)
    if m.dim() != 2 or m.shape[0] < 2:
        raise ValueError(f"maps of shape {tuple(m.shape)}: need [P, N] with P >= 2 prompt templates")
    norms = m.norm(dim=1)
    if bool((norms == 0).any()):
        raise ValueError("an attention map is all zeros: its cosine similarity is undefined")
    unit = m / norms[:, None]
    gram = unit @ unit.T
    i, j = torch.triu_indices(m.shape[0], m.shape[0], offset=1)
    return float(gram[i, j].mean())


def position_correlation(attention: torch.Tensor | Sequence[float]) -> float:
    """Spearman's rho between an attention map ``[N]`` and the token position ``0..N-1``
    (``scipy.stats.spearmanr``; tied attention values get average ranks). NaN for a constant map, whose rank
    correlation is undefined."""
    a = _as_map(attention)
    if np.all(a == a[0]):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(np.arange(a.size), a).statistic)


def attention_entropy(attention: torch.Tensor | Sequence[float]) -> float:
    """Entropy (natural log) of an attention map ``[N]`` normalised over the visual tokens:
    ``H = -sum p_i ln p_i`` with ``p = a / sum(a)`` and ``0 ln 0 = 0``. ``ln N`` for uniform attention, 0 for
    attention on one token. Values must be >= 0 with a positive sum."""
    a = _as_map(attention)
    if (a < 0).any() or a.sum() <= 0:
        raise ValueError("attention values must be >= 0 with a positive sum (softmax probabilities)")
    p = a / a.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def layer_summary(maps_per_image: Sequence[torch.Tensor]) -> dict[str, float]:
    """The Phase-0 statistics of one layer from its maps, one ``[P, N_i]`` tensor per image (the same P
    templates for every image; N_i may differ between images).

    Returns ``prompt_stability`` (mean over images), ``position_correlation`` and ``position_correlation_abs``
    (mean rho and mean |rho| over all maps, constant maps skipped), ``entropy`` (mean over all maps),
    ``max_entropy`` (mean ``ln N_i`` over images), ``num_images``, ``num_prompts``.
    """
    if not maps_per_image:
        raise ValueError("no attention maps: need at least one image")
    stabilities, rhos, entropies, max_h = [], [], [], []
    prompts = {int(m.shape[0]) for m in maps_per_image}
    if len(prompts) != 1:
        raise ValueError(f"images have different numbers of prompt maps {sorted(prompts)}: run every image "
                         "with the same templates")
    for maps in maps_per_image:
        stabilities.append(prompt_stability(maps))
        for row in maps:
            rhos.append(position_correlation(row))
            entropies.append(attention_entropy(row))
        max_h.append(math.log(maps.shape[1]))
    rho = np.asarray(rhos)
    valid = rho[~np.isnan(rho)]
    return {
        "prompt_stability": float(np.mean(stabilities)),
        "position_correlation": float(valid.mean()) if valid.size else math.nan,
        "position_correlation_abs": float(np.abs(valid).mean()) if valid.size else math.nan,
        "entropy": float(np.mean(entropies)),
        "max_entropy": float(np.mean(max_h)),
        "num_images": len(maps_per_image),
        "num_prompts": prompts.pop(),
    }


# ---------------------------------------------------------------------------------------------- capture
class AttentionRecorder:
    """Records, in one prefill, the last prompt token's head-averaged attention row at several decoder layers.

    Installs the engine's observing attention implementation (``lmms_prune.engine.attention``) on the given
    layers without pruning anything; ``rows[layer]`` is float32 ``[B, seq]`` after a forward. Use as a context
    manager (``close()`` restores the model's attention implementation).
    """

    def __init__(self, model: nn.Module, layers: Iterable[int]):
        self.adapter = get_adapter(model)
        self.layers = sorted(set(int(x) for x in layers))
        depth = self.adapter.num_layers
        bad = [x for x in self.layers if not 0 <= x < depth]
        if bad:
            raise ValueError(f"decoder layer index {bad[0]}: must be in [0, {depth - 1}] for this "
                             f"{depth}-layer model")
        self.rows: dict[int, torch.Tensor] = {}
        text_cfg = self.adapter.text_config
        self._old = text_cfg._attn_implementation
        text_cfg._attn_implementation = attn.wrapped_name(attn.base_name(self._old))
        self._modules = [self.adapter.layers[x].self_attn for x in self.layers]
        for layer, module in zip(self.layers, self._modules, strict=True):
            attn.add_observer(module, self._observer(layer))

    def _observer(self, layer: int) -> Callable[..., None]:
        def observe(module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
                    scaling: float | None) -> None:
            if query.shape[2] < 2:  # a decode step, not the prompt
                return
            self.rows[layer] = attn.attention_rows(query, key, attention_mask, scaling, 1)[:, 0].cpu()

        return observe

    def close(self) -> None:
        for module in self._modules:
            attn.remove_observer(module)
        self._modules = []
        if self._old is not None:
            self.adapter.text_config._attn_implementation = self._old
            self._old = None

    def __enter__(self) -> AttentionRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ImageAttention:
    """The attention maps of one image: ``maps[layer]`` is ``[P, N]`` (one row per prompt template) over its
    ``N`` visual tokens; ``grids`` their layout (``ImageSpan.grids``); ``image_size`` the original
    ``(width, height)``."""

    name: str
    image_size: tuple[int, int]
    grids: list[tuple[int, int]]
    maps: dict[int, torch.Tensor] = field(default_factory=dict)


def parse_layers(text: str | Sequence[int], depth: int | None = None) -> list[int]:
    """``"1,2,3,4,8,12"`` -> ``[1, 2, 3, 4, 8, 12]`` (paper layer numbers, each the prune layer K whose score
    is decoder layer K-1); checks ``1 <= L <= depth``."""
    try:
        layers = [int(x) for x in (text.split(",") if isinstance(text, str) else text) if str(x).strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: must be comma-separated integers, e.g. 1,2,3,4,8,12") from None
    if not layers:
        raise ValueError(f"--layers {text!r}: give at least one layer, e.g. 1,2,3,4,8,12")
    for layer in layers:
        if layer < 1 or (depth is not None and layer > depth):
            top = depth if depth is not None else "the model depth"
            raise ValueError(f"--layers: layer {layer} must be in [1, {top}] (paper numbering: layer L is "
                             "the attention of decoder layer index L-1)")
    return sorted(set(layers))


def read_prompts(path: str | Path) -> list[str]:
    """Prompt templates, one per non-empty line; at least 2 (prompt stability compares templates)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {str(path)!r}: not a file (one prompt template per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(prompts) < 2:
        raise ValueError(f"--prompts {str(path)!r} has {len(prompts)} template(s): prompt stability needs at "
                         "least 2 (the paper uses 5)")
    return prompts


@torch.no_grad()
def collect_attention(
    model: nn.Module,
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    layers: Sequence[int],
    max_num: int | None = 6,
    progress: bool = True,
) -> list[ImageAttention]:
    """Run every (image, prompt) once; keep each paper layer's attention map over the image's visual tokens.

    images: paths or PIL images, each run with every prompt; layers: paper numbers (decoder index + 1).
    Returns one :class:`ImageAttention` per image with ``maps[L]`` of shape ``[len(prompts), N]``.
    """
    from tqdm.auto import tqdm

    from lmms_prune.calibration import open_image, single_image_inputs

    adapter = get_adapter(model)
    layers = parse_layers(layers, adapter.num_layers)
    device = next(model.parameters()).device
    results: list[ImageAttention] = []
    bar = tqdm(total=len(images) * len(prompts), desc="diagnose", unit="pass", disable=not progress)
    with bar, AttentionRecorder(model, [x - 1 for x in layers]) as recorder:
        for index, item in enumerate(images):
            if isinstance(item, Image.Image):
                image, name = item.convert("RGB"), f"image{index}"
            else:
                image, name = open_image(item), Path(item).name
            rows: dict[int, list[torch.Tensor]] = {x: [] for x in layers}
            grids = None
            for prompt in prompts:
                inputs = single_image_inputs(processor, image, prompt, max_num).to(device)
                recorder.rows.clear()
                model(**inputs, logits_to_keep=1)  # only attention matters: skip the full-vocabulary logits
                spans = adapter.spans(inputs["input_ids"], inputs)[0]
                if len(spans) != 1:
                    raise ValueError(f"{name}: expected one image in the prompt, found {len(spans)} image "
                                     "spans")
                span = spans[0]
                if grids is not None and grids != list(span.grids):
                    raise ValueError(f"{name}: the token layout changed between prompts ({grids} vs "
                                     f"{span.grids})")
                grids = list(span.grids)
                missing = [x for x in layers if x - 1 not in recorder.rows]
                if missing:
                    raise RuntimeError(f"layer {missing[0]} recorded no attention: the model's attention "
                                       "implementation bypasses transformers' attention interface")
                for x in layers:
                    rows[x].append(recorder.rows[x - 1][0, span.visual_positions].float())
                bar.update(1)
            results.append(ImageAttention(name, tuple(image.size), grids,
                                          {x: torch.stack(rows[x]) for x in layers}))
    return results


def phase0_table(per_image: Sequence[ImageAttention]) -> list[dict[str, float]]:
    """One row per layer (paper numbering, ascending) with :func:`layer_summary`'s statistics
    (``COLUMNS``)."""
    if not per_image:
        raise ValueError("no images: nothing to diagnose")
    layers = sorted(per_image[0].maps)
    return [{"layer": x, "score_layer": x - 1, **layer_summary([im.maps[x] for im in per_image])}
            for x in layers]


def layout_key(image: ImageAttention, family: str, processor: Any = None, max_num: int | None = None) -> str:
    """A name of the visual-token layout, so maps of the same layout can be averaged: InternVL ``tiles3x2``
    (cols x rows, + thumbnail) or ``tiles1x1``; otherwise the grid, e.g. ``grid24x24``."""
    return family_of(family).layout_key(image.image_size, image.grids, processor, max_num)


def mean_maps_by_layout(
    per_image: Sequence[ImageAttention], family: str, processor: Any = None, max_num: int | None = None
) -> dict[str, tuple[ImageAttention, dict[int, torch.Tensor], int]]:
    """Per layout key: (an example image, ``{layer: mean map [N]}`` over its images and prompts, #images)."""
    groups: dict[str, list[ImageAttention]] = {}
    for im in per_image:
        groups.setdefault(layout_key(im, family, processor, max_num), []).append(im)
    out = {}
    for key, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        means = {x: torch.cat([m.maps[x] for m in members]).mean(0) for x in members[0].maps}
        out[key] = (members[0], means, len(members))
    return out


# ---------------------------------------------------------------------------------------------- output
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path, columns: Sequence[str] = COLUMNS) -> Path:
    import csv

    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: (repr(r[c]) if isinstance(r[c], float) else r[c]) for c in columns})
    return path
