"""VisPruner importance from vision-encoder attention (methods.md section 4 "VisPruner")."""

from __future__ import annotations

from torch import Tensor

from lmms_prune.scores._validate import is_int


def cls_attention(attn: Tensor, has_cls: bool) -> Tensor:
    """Per-patch importance from one image's vision-encoder attention at the feature layer, heads averaged.

    - ``has_cls=True``: the [CLS] query row (token 0) over the patch keys ``1..T-1`` (VisPruner eq. 3),
      without renormalising after the [CLS] column is dropped.
    - ``has_cls=False``: the mean attention each patch receives over all query rows.

    Args:
        attn: ``[H, T, T]`` attention probabilities (query x key), or ``[H, T]`` = the [CLS] query row
            only (``has_cls=True`` only: a single row cannot give the mean over query rows).
        has_cls: whether token 0 is a [CLS] token.

    Returns:
        ``[P]`` patch scores, ``P = T - 1`` with [CLS], else ``P = T``.
    """
    if attn.dim() == 3 and attn.shape[1] == attn.shape[2]:
        if has_cls:
            return attn[:, 0, 1:].mean(dim=0)
        return attn.mean(dim=(0, 1))
    if attn.dim() == 2:
        if not has_cls:
            raise ValueError(
                f"attn has shape {tuple(attn.shape)} (one query row) but has_cls=False: without [CLS] the "
                "score is the mean over all query rows, so pass the full [H, T, T] map"
            )
        return attn[:, 1:].mean(dim=0)
    raise ValueError(f"attn has shape {tuple(attn.shape)}: must be [H, T, T] or the [CLS] row [H, T]")


def merge_pixel_shuffle(scores: Tensor, side: int, factor: int = 2) -> Tensor:
    """Sum patch scores over the ``factor x factor`` groups that InternVL's pixel shuffle merges.

    InternVL (``InternVLModel.pixel_shuffle`` with ``scale_factor = 1 / factor``) turns a ``side x side``
    patch raster into a ``side/factor x side/factor`` token raster; output token ``(i, j)`` (row-major)
    holds the patches in rows ``factor*i .. factor*i+factor-1`` and columns ``factor*j .. factor*j+factor-1``.
    The test suite checks this against the transformers function itself.

    Args:
        scores: ``[..., P]`` patch scores in row-major order, ``P = side * side`` (leading dims, e.g. tiles,
            are kept).
        side: patches per side (InternVL 448 px tiles with 14 px patches: 32).
        factor: merge factor per side (InternVL: 2, i.e. ``downsample_ratio = 0.5``).

    Returns:
        ``[..., (side // factor) ** 2]`` token scores in the LLM's token order.
    """
    for name, value in (("side", side), ("factor", factor)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an int >= 1")
    if side % factor:
        raise ValueError(f"side={side} is not divisible by factor={factor}: pixel shuffle needs whole groups")
    if scores.dim() < 1 or scores.shape[-1] != side * side:
        raise ValueError(
            f"scores have shape {tuple(scores.shape)}: the last dim must be side*side={side * side} patches"
        )
    groups = side // factor
    grouped = scores.reshape(*scores.shape[:-1], groups, factor, groups, factor)
    return grouped.sum(dim=(-3, -1)).reshape(*scores.shape[:-1], groups * groups)


def merge_consecutive(scores: Tensor, unit: int) -> Tensor:
    """Sum patch scores over runs of ``unit`` consecutive patches: the groups Qwen2-VL/2.5-VL/3-VL's patch
    merger folds into one LLM token (``unit = spatial_merge_size ** 2``; their processors emit each 2x2
    group's patches consecutively, so the merger's ``view(-1, unit * D)`` takes them together).

    Args:
        scores: ``[P]`` patch scores in the vision tower's patch order, ``P`` a multiple of ``unit``.
        unit: patches per token.

    Returns:
        ``[P // unit]`` token scores, in the same (merged) order.
    """
    if not is_int(unit) or unit < 1:
        raise ValueError(f"unit={unit!r}: must be an int >= 1")
    if scores.dim() != 1 or scores.shape[0] % unit:
        raise ValueError(f"scores have shape {tuple(scores.shape)}: must be [P] with P a multiple of unit={unit}")
    return scores.reshape(-1, unit).sum(dim=1)
