"""SparseVLM's text raters (Zhang et al., 2025, "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference", section 3.2): the text tokens relevant to the image rate the visual tokens.

``relation`` is the text-to-vision attention of one image at a decoder layer: row ``i`` is text token ``i``'s
softmax attention (heads averaged, no renormalisation) restricted to the image's visual columns, so its sum is
the share of that token's attention that goes to the image. Raters are the rows whose share is at least the
mean share (methods.md 5b: "raters chosen by their attention to vision"); a visual token's importance is the
mean of the raters' rows.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_relation(relation: Tensor) -> None:
    if not isinstance(relation, Tensor) or relation.dim() != 2 or not relation.is_floating_point():
        shape = tuple(relation.shape) if isinstance(relation, Tensor) else type(relation).__name__
        raise ValueError(f"relation has shape {shape}: must be a floating [M text tokens, N visual tokens] tensor")
    if relation.shape[0] == 0 or relation.shape[1] == 0:
        raise ValueError(f"relation has shape {tuple(relation.shape)}: need at least one text and one visual token")
    if not bool(torch.isfinite(relation).all()):
        raise ValueError("relation contains NaN or inf: pass the attention probabilities of the text rows")


def select_raters(relation: Tensor) -> Tensor:
    """Bool ``[M]``: text tokens whose attention mass on the image, ``relation.sum(1)``, is >= its mean over
    the ``M`` text tokens (always at least one rater: the maximum is >= the mean). Sums in float64, so the
    choice does not flip with the machine's float32 rounding."""
    _check_relation(relation)
    mass = relation.double().sum(1)
    return mass >= mass.mean() - 1e-12 * mass.abs().max().clamp_min(1.0)


def rater_importance(relation: Tensor, raters: Tensor | None = None) -> Tensor:
    """``[N]`` float32: the mean over the raters' rows of ``relation`` ``[M, N]`` (``raters`` bool ``[M]``;
    default :func:`select_raters`)."""
    _check_relation(relation)
    if raters is None:
        raters = select_raters(relation)
    raters = torch.as_tensor(raters, dtype=torch.bool, device=relation.device)
    if raters.shape != (relation.shape[0],) or not bool(raters.any()):
        raise ValueError(f"raters has shape {tuple(raters.shape)} with {int(raters.sum())} selected: must be a "
                         f"bool [{relation.shape[0]}] mask with at least one True")
    return relation[raters].float().mean(0)
