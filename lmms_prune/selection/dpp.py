"""Determinantal point process selection: CDPruner's conditional DPP (methods.md section 5b).

CDPruner (Zhang et al., 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs"): kernel ``L = diag(q) S diag(q)`` with ``S`` the cosine similarity of the visual tokens and
``q`` each token's relevance to the instruction; the kept set is the greedy MAP of the DPP, computed with the
fast incremental-Cholesky greedy of Chen, Zhang and Zhou (NeurIPS 2018, "Fast Greedy MAP Inference for
Determinantal Point Process to Improve Recommendation Diversity", Algorithm 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmms_prune.selection._validate import check_budget, check_features, check_scores, sorted_indices

EPS = 1e-10


def dpp_greedy(kernel: Tensor, n: int) -> Tensor:
    """Greedy MAP inference of a DPP with PSD ``kernel`` ``[N, N]``: ``n`` indices, ascending.

    Chen et al. 2018, Algorithm 1: ``d_i^2 = L_ii``; each step picks ``j = argmax d_i^2`` (the largest
    ``log det`` gain; ties within 1e-9 relative: lower index), then ``e_i = (L_ji - <c_j, c_i>) / d_j``, appends ``e`` to every
    ``c_i`` and sets ``d_i^2 -= e_i^2`` -- ``O(N n^2)`` instead of a determinant per candidate. Computed in
    float64. When every remaining gain is ``<= 1e-10`` (``n`` above the kernel's numerical rank) the remaining
    picks take the largest ``L_ii`` among the unpicked tokens (ties: lower index).
    """
    if not isinstance(kernel, Tensor) or kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
        shape = tuple(kernel.shape) if isinstance(kernel, Tensor) else type(kernel).__name__
        raise ValueError(f"kernel has shape {shape}: must be a square [N, N] tensor")
    num = kernel.shape[0]
    check_budget(n, num)
    if torch.isnan(kernel).any():
        raise ValueError("kernel contains NaN: check the features and relevance scores")
    k = kernel.to(torch.float64)
    d2 = torch.diagonal(k).clone()
    picked = torch.zeros(num, dtype=torch.bool, device=k.device)
    c = torch.zeros(n, num, dtype=torch.float64, device=k.device)
    order: list[int] = []
    for i in range(n):
        gains = d2.masked_fill(picked, -float("inf"))
        best = float(gains.max())
        # ties (to rounding: 1e-9 relative) go to the lower index, so equal-relevance kernels are deterministic
        j = int(torch.nonzero(gains >= best - 1e-9 * abs(best))[0])
        if best <= EPS:
            rest = torch.diagonal(k).masked_fill(picked, -float("inf"))
            extra = torch.sort(rest, descending=True, stable=True).indices[: n - i]
            order.extend(int(x) for x in extra)
            break
        e = (k[j] - c[:i, j] @ c[:i]) / torch.sqrt(d2[j])
        c[i] = e
        d2 = d2 - e * e
        picked[j] = True
        order.append(j)
    return sorted_indices(torch.tensor(order, device=kernel.device))


def instruction_relevance(embeddings: Tensor, text: Tensor, negate: bool = True) -> Tensor:
    """``q_i``: visual token ``i``'s relevance to the instruction, min-max normalised as CDPruner's code
    (``(r - min + 1e-6) / (max - min)``: in ``(0, 1]`` up to the ``1e-6``; all equal -> all 1).

    ``negate=True`` (CDPruner's released code, ``llava_arch.py: encode_images``: ``relevance =
    (-relevance).mean(dim=-1)``): ``r_i = mean_j -cos(v_i, t_j)``, so the tokens LEAST similar to the text get the
    highest relevance; ``negate=False``: ``r_i = mean_j cos(v_i, t_j)``.

    embeddings: ``[N, D]`` visual tokens; text: ``[M, D]`` instruction embeddings in the same space (the authors:
    CLIP's pooled, projected text embedding of each 77-token segment of the instruction). Returns float32 ``[N]``.
    """
    num = check_features(embeddings, None, "embeddings")
    check_features(text, None, "text")
    if text.shape[1] != embeddings.shape[1]:
        raise ValueError(f"text has width {text.shape[1]} but embeddings {embeddings.shape[1]}: same space needed")
    cos = F.normalize(embeddings.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    r = (-cos if negate else cos).mean(-1)
    span = r.max() - r.min()
    if float(span) <= 0:
        return torch.ones(num, dtype=torch.float32, device=embeddings.device)
    return (r - r.min() + 1e-6) / span


def cdpruner(features: Tensor, relevance: Tensor, n: int) -> Tensor:
    """CDPruner: greedy MAP of the conditional DPP ``L = diag(q) S diag(q)``, ``S_ij = cos(f_i, f_j)``.

    Args:
        features: ``[N, D]`` visual features (similarity); relevance: ``[N]`` ``q >= 0``; ``1 <= n <= N``.

    Returns:
        ``[n]`` int64 indices, ascending (see :func:`dpp_greedy`). With ``q`` constant this is the greedy
        diversity (max ``log det S``) selection.
    """
    num = check_scores(relevance, "relevance")
    check_features(features, num)
    if bool((relevance < 0).any()):
        raise ValueError("relevance has negative entries: the kernel diag(q) S diag(q) needs q >= 0")
    unit = F.normalize(features.double(), dim=-1)
    q = relevance.double()
    return dpp_greedy(q[:, None] * (unit @ unit.T) * q[None, :], n)
