"""D2Pruner's debiased importance: attention divided by a calibrated positional prior (methods.md 4)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lmms_prune.scores._validate import check_eps, check_vector, is_int


def resize_prior(prior: Tensor, n: int) -> Tensor:
    """Resize a calibrated prior ``[M]`` to ``n`` tokens by 1-D linear interpolation (D2Pruner's rule).

    ``torch.nn.functional.interpolate(mode="linear", align_corners=False)``: output ``i`` samples the
    prior at position ``(i + 0.5) * M / n - 0.5``, clamped to ``[0, M - 1]``, so both ends map to the
    prior's end values. The prior is treated as one flattened sequence (as stored), not as a 2-D grid.
    Identity (the same tensor) when ``M == n``.

    Returns:
        ``[n]`` tensor with the prior's dtype and device.
    """
    length = check_vector(prior, "prior")
    if not is_int(n) or n < 1:
        raise ValueError(f"n={n!r}: must be an int >= 1 (the number of visual tokens)")
    if length == n:
        return prior
    return F.interpolate(prior[None, None, :], size=int(n), mode="linear", align_corners=False)[0, 0]


def prior_debias(attn: Tensor, prior: Tensor, eps: float = 1e-7) -> Tensor:
    """D2Pruner relative attention ``A_rel = A_ori / (A_bias + eps)`` (paper's eq. for A_rel, eps=1e-7).

    Args:
        attn: ``[N]`` text-to-vision attention of one sample (``A_ori``).
        prior: ``[M]`` calibrated prior ``A_bias`` (resized to N by ``resize_prior`` when ``M != N``).
        eps: division guard.

    Returns:
        ``[N]`` debiased importance.
    """
    num_tokens = check_vector(attn, "attn")
    check_eps(eps)
    return attn / (resize_prior(prior.to(attn.device), num_tokens) + eps)
