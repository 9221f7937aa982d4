"""Where each visual token sits in the original image, and pictures of what a pruning method kept.

Token geometry (:func:`token_boxes`) maps every visual token of one image to the pixel box it covers in the
ORIGINAL image (``x1, y1, x2, y2``, floats, exclusive maxima), following each processor's own resize/crop rule
(methods.md section 1). Each family module (:mod:`lmms_prune.families`) owns its rule and documents it
(InternVL: tiles plus a thumbnail; Qwen2.5-VL: one grid over the whole image; LLaVA-1.5: the 336 px centre
crop).

Pixel masks (:func:`box_mask`) use one rule everywhere: pixel ``(x, y)`` (the unit square ``[x, x+1) x [y,
y+1)``) belongs to a box iff its centre ``(x + 0.5, y + 0.5)`` lies in ``[x1, x2) x [y1, y2)``. Cells of one
raster share their edges exactly, so every pixel centre of a raster's area falls in exactly one cell.

Token-box IoU (:func:`token_box_iou`, the deep-layer paper's Figure 3 metric): ``|K & B| / |K | B|`` over
pixels, where ``K`` is the union of the kept tokens' cells and ``B`` the referred object's box, both
rasterised by that rule. For InternVL the kept tokens of the tiles and of the thumbnail both count (their
cells overlap; the union is taken), unless the caller passes only one view's tokens (:func:`token_views`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from lmms_prune import geometry as geo
from lmms_prune.families import family_of

KEPT_COLOR = (255, 196, 0)
BOX_COLOR = (0, 220, 255)

Grid = tuple[int, int]


def model_family(family_or_model: Any) -> str:
    """The family name of a family name (toy names such as ``internvl_qwen2`` are accepted) or a
    transformers-native model."""
    return family_of(family_or_model).name


def token_boxes(
    family_or_model: Any,
    image_size: Sequence[int],
    grids: Sequence[Sequence[int]],
    processor: Any = None,
    *,
    max_num: int | None = None,
) -> torch.Tensor:
    """Pixel boxes of every visual token of one image, in the ORIGINAL image's coordinates.

    family_or_model: a family name or model (:func:`model_family`); image_size: ``(width, height)`` of the
    original image; grids: the image's token grids in sequence order (``ImageSpan.grids``: ``(rows, cols)``
    each; an ``ImageSpan`` itself is accepted); processor: the model's processor or image processor (LLaVA
    resize/crop sizes, InternVL tile budget); max_num: InternVL's tile budget for this image (overrides the
    processor's ``max_patches``).

    Returns float32 ``[N, 4]`` boxes ``(x1, y1, x2, y2)``, ``N = sum(rows * cols)``, row i = visual token i
    of the image (raster order within each grid, grids in order). The family module gives its rule.
    """
    return family_of(family_or_model).token_boxes(image_size, grids, processor, max_num)


def token_views(family_or_model: Any, grids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Named subsets of one image's visual tokens that each tile the image once, as bool masks ``[N]``.

    InternVL with tiles: ``{"tiles": ..., "thumbnail": ...}`` (the thumbnail's cells overlap the tiles');
    otherwise ``{"image": all tokens}``.
    """
    return family_of(family_or_model).token_views(grids)


def grid_labels(
    family_or_model: Any,
    image_size: Sequence[int],
    grids: Sequence[Sequence[int]],
    processor: Any = None,
    *,
    max_num: int | None = None,
) -> list[str]:
    """A short name per grid: ``"tile r1 c2"`` (1-based) and ``"thumbnail"`` for InternVL, ``"image"`` (or
    ``"frame t"``) otherwise."""
    return family_of(family_or_model).grid_labels(image_size, grids, processor, max_num)


def _as_mask(kept: torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
    kept = torch.as_tensor(kept)
    if kept.dtype == torch.bool:
        if kept.shape != (n,):
            raise ValueError(f"kept mask has shape {tuple(kept.shape)}: must be [{n}] (one flag per box)")
        return kept
    kept = kept.long().flatten()
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= n):
        raise ValueError(f"kept indices must be in [0, {n - 1}] (there are {n} boxes), got min "
                         f"{int(kept.min())}, max {int(kept.max())}")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[kept] = True
    return mask


def _pixel_range(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Pixels whose centre ``p + 0.5`` lies in ``[lo, hi)``, clipped to ``[0, limit)``."""
    start = max(0, math.ceil(lo - 0.5))
    stop = min(limit, math.ceil(hi - 0.5))
    return start, max(start, stop)


def box_mask(boxes: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """Bool ``[H, W]`` pixel mask of the union of ``boxes`` ``[N, 4]`` (the module docstring's pixel-centre
    rule)."""
    width, height = geo.check_size(image_size)
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.tolist():
        xa, xb = _pixel_range(x1, x2, width)
        ya, yb = _pixel_range(y1, y2, height)
        mask[ya:yb, xa:xb] = True
    return mask


def parse_box(box: Sequence[float] | str, image_size: Sequence[int] | None = None) -> tuple[float, ...]:
    """``(x1, y1, x2, y2)`` from a sequence or ``"x1,y1,x2,y2"``; checks ``x1 < x2``, ``y1 < y2`` and that the
    box overlaps the image when ``image_size`` is given."""
    text = box if isinstance(box, str) else None
    try:
        values = tuple(float(v) for v in (box.split(",") if isinstance(box, str) else box))
    except ValueError:
        raise ValueError(f"box={text!r}: must be four numbers x1,y1,x2,y2 in pixels") from None
    if len(values) != 4:
        raise ValueError(f"box={box!r}: must be four numbers x1,y1,x2,y2 in pixels, got {len(values)}")
    x1, y1, x2, y2 = values
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"box={box!r}: need x1 < x2 and y1 < y2 (corners, not x,y,w,h)")
    if image_size is not None:
        width, height = geo.check_size(image_size)
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise ValueError(f"box={box!r}: lies outside the {width}x{height} image (give pixel coordinates "
                             "of the original image)")
    return values


def token_box_iou(
    boxes: torch.Tensor,
    kept: torch.Tensor | Sequence[int],
    box: Sequence[float],
    image_size: Sequence[int],
) -> float:
    """Token-box IoU (deep-layer paper, Figure 3): pixel IoU between the union of the kept tokens' cells and
    ``box``.

    boxes: ``[N, 4]`` token boxes (:func:`token_boxes`); kept: long indices into ``boxes`` or a bool mask
    ``[N]``; box: ``(x1, y1, x2, y2)`` pixels of the original image (exclusive maxima); image_size:
    ``(width, height)``. Both regions are rasterised with the pixel-centre rule; returns ``|K & B| / |K | B|``
    (0.0 when both are empty).
    """
    boxes = torch.as_tensor(boxes).reshape(-1, 4)
    keep = _as_mask(kept, boxes.shape[0])
    kept_mask = box_mask(boxes[keep], image_size)
    target = box_mask(torch.tensor([parse_box(box)]), image_size)
    union = int((kept_mask | target).sum())
    return int((kept_mask & target).sum()) / union if union else 0.0


def overlay_kept_tokens(
    image: Image.Image,
    boxes: torch.Tensor,
    kept: torch.Tensor | Sequence[int],
    *,
    box: Sequence[float] | None = None,
    dim: float = 0.3,
    outline: bool = True,
    kept_color: tuple[int, int, int] = KEPT_COLOR,
    box_color: tuple[int, int, int] = BOX_COLOR,
) -> Image.Image:
    """The image with the kept tokens' cells at full brightness (outlined in ``kept_color``) and every other
    pixel dimmed to ``dim`` of its brightness (greyed); ``box`` (the referred object) drawn in ``box_color``.

    image: the original image; boxes: ``[N, 4]`` cells of the tokens to show (one view, :func:`token_views`);
    kept: long indices into ``boxes`` or a bool mask ``[N]``. Returns a new RGB image of the same size.
    """
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim={dim}: must be in [0, 1] (fraction of brightness left on pruned cells)")
    rgb = image.convert("RGB")
    boxes = torch.as_tensor(boxes).reshape(-1, 4)
    keep = _as_mask(kept, boxes.shape[0])
    mask = box_mask(boxes[keep], rgb.size).numpy()[..., None]
    pixels = np.asarray(rgb, dtype=np.float32)
    grey = pixels.mean(-1, keepdims=True)
    dimmed = (0.5 * pixels + 0.5 * grey) * dim
    out = Image.fromarray(np.where(mask, pixels, dimmed).round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    line = max(1, round(min(rgb.size) / 300))
    if outline:
        for x1, y1, x2, y2 in boxes[keep].tolist():
            if x2 > x1 and y2 > y1:
                draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=kept_color, width=line)
    if box is not None:
        _draw_box(out, box, box_color)
    return out


def _draw_box(image: Image.Image, box: Sequence[float], color: tuple[int, int, int] = BOX_COLOR) -> None:
    x1, y1, x2, y2 = parse_box(box)
    width = 2 * max(1, round(min(image.size) / 300))
    ImageDraw.Draw(image).rectangle([x1, y1, x2 - 1, y2 - 1], outline=color, width=width)


# ---------------------------------------------------------------------------------------------- figures
def plot_attention_maps(
    maps: Mapping[str, torch.Tensor],
    grids: Sequence[Sequence[int]],
    labels: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """A grid of heat maps: one row per entry of ``maps`` (row label -> attention ``[N]`` over one image's
    visual tokens), one column per token grid (``labels``), each grid drawn as its ``rows x cols`` raster.
    Colours share one scale per row (a colour bar per row), so tiles of one layer compare directly."""
    from matplotlib.figure import Figure

    grid_list = geo.grid_list(grids)
    n = sum(r * c for r, c in grid_list)
    if len(labels) != len(grid_list):
        raise ValueError(f"{len(labels)} labels for {len(grid_list)} grids: need one label per grid")
    rows = list(maps.items())
    fig = Figure(figsize=(1.9 * len(grid_list) + 1.0, 1.9 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), len(grid_list), squeeze=False)
    for i, (name, values) in enumerate(rows):
        values = torch.as_tensor(values, dtype=torch.float32).flatten()
        if values.numel() != n:
            raise ValueError(f"map {name!r} has {values.numel()} values; the grids {grid_list} hold {n}")
        vmin, vmax = float(values.min()), float(values.max())
        offset, image = 0, None
        for j, (r, c) in enumerate(grid_list):
            ax = axes[i][j]
            image = ax.imshow(values[offset: offset + r * c].reshape(r, c).numpy(), cmap="viridis",
                              vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-12)
            offset += r * c
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(labels[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
        fig.colorbar(image, ax=list(axes[i]), shrink=0.8, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_overlays(
    image: Image.Image,
    panels: Mapping[str, Mapping[str, Image.Image]],
    captions: Mapping[str, str],
    path: str | Path,
    *,
    box: Sequence[float] | None = None,
    title: str = "",
) -> Path:
    """Side-by-side figure: the input image, then one column per method (``panels``: method -> view name ->
    overlay image), one row per view (InternVL: tiles, thumbnail). ``captions``: method -> text under its
    title (kept count, IoU). ``box`` is drawn on the input image."""
    from matplotlib.figure import Figure

    methods = list(panels)
    views = list(next(iter(panels.values()))) if methods else ["image"]
    shown = image.convert("RGB")
    if box is not None:
        _draw_box(shown, box)
    width, height = image.size
    cell = 3.2
    fig = Figure(figsize=(cell * (1 + len(methods)), cell * height / width * len(views) + 0.9),
                 layout="constrained")
    axes = fig.subplots(len(views), 1 + len(methods), squeeze=False)
    for i, view in enumerate(views):
        axes[i][0].imshow(shown)
        axes[i][0].set_title("input" if i == 0 else "", fontsize=9)
        axes[i][0].set_ylabel(f"{view} tokens" if view != "image" else "", fontsize=9)
        for j, method in enumerate(methods, start=1):
            axes[i][j].imshow(panels[method][view])
            if i == 0:
                axes[i][j].set_title(f"{method}\n{captions.get(method, '')}", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------------------------- running
@dataclass
class TokenSelection:
    """What several methods kept of one image: ``boxes`` ``[N, 4]`` (original-image pixels), ``grids`` (the
    image's token layout), ``kept[method]`` ascending indices into the ``N`` visual tokens."""

    image_size: tuple[int, int]
    grids: list[Grid]
    boxes: torch.Tensor
    views: dict[str, torch.Tensor]
    kept: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def select_tokens(
    model: torch.nn.Module,
    processor: Any,
    image: Image.Image,
    text: str,
    configs: Mapping[str, Any],
    *,
    max_num: int | None = 6,
) -> TokenSelection:
    """Run one prefill per method (``configs``: label -> ``PruneConfig``, see
    :func:`lmms_prune.presets.resolve_config`) on one image and prompt, and collect each method's kept tokens
    together with the tokens' boxes. Every method prunes the same inputs (``single_image_inputs``)."""
    from lmms_prune.calibration import single_image_inputs
    from lmms_prune.engine import apply
    from lmms_prune.families import get_adapter

    device = next(model.parameters()).device
    inputs = single_image_inputs(processor, image, text, max_num).to(device)
    adapter = get_adapter(model)
    spans = adapter.spans(inputs["input_ids"], inputs)[0]
    if len(spans) != 1:
        raise ValueError(f"the prompt holds {len(spans)} images: select_tokens shows exactly one")
    grids = [tuple(g) for g in spans[0].grids]
    boxes = token_boxes(model, image.size, grids, processor, max_num=max_num)
    selection = TokenSelection(tuple(image.size), grids, boxes, token_views(model, grids))
    for label, config in configs.items():
        with apply(model, config=config) as handle:
            # the padding tokens of the family's default pipeline (LLaVA-1.5 pad-to-square), as a run has them
            handle.image_padding = adapter.padding_masks([[image]], type(adapter).parse_model_args({}), processor)
            model(**inputs, logits_to_keep=1)  # a prefill selects; skip the full-vocabulary logits
            records = handle.records
        if not records or not records[0].kept:
            raise RuntimeError(f"method {label!r} recorded no selection for this prompt")
        selection.kept[label] = records[0].kept[0].cpu().long()
    return selection
