"""Token merging for pre-LLM methods: a selection that keeps some tokens and adds new ones (means of groups).

:class:`Merge` is what a merging selector returns instead of a plain index tensor: the kept original tokens
(``index``, ascending) and the merged tokens as averaging weights over the image's ``N`` tokens (``weights``
``[m, N]``, each row a group's mean). :func:`merged_embeddings` applies it; :func:`visionzip` is VisionZip's
dominant + contextual selection (methods.md section 5b).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmms_prune.selection._validate import (
    check_budget,
    check_features,
    check_scores,
    descending_order,
    sorted_indices,
)

DOMINANT_RATIO = 54 / 64  # VisionZip on LLaVA-1.5 at 64 tokens: 54 dominant + 10 contextual


@dataclass(frozen=True)
class Merge:
    """A selection with merged tokens: ``index`` ``[k]`` (kept original tokens, ascending, int64) and
    ``weights`` ``[m, N]`` (row ``j``: the non-negative weights of merged token ``j``: a group's mean sums to 1;
    VisionZip's ``target + mean(members)`` to 2; PruMerge+'s attention-weighted updates need not).
    The image's tokens become ``[x[index]; weights @ x]``: ``k + m`` tokens, kept ones first, in that order.

    Inside the LLM (SparseVLM's recycling, :func:`lmms_prune.selection.sparsevlm.sparsevlm`) a merged token
    needs a place in the sequence and the KV cache: ``slots`` ``[m]`` names, for each merged token, one of the
    image's removed tokens (not in ``index``) whose position it takes (its original RoPE position, its cache
    slot); the image's tokens become the ascending union of ``index`` and ``slots``, the slots holding the
    means. Pre-LLM merges leave ``slots`` None (merged tokens follow the kept ones, renumbered) or name them
    (FastVID's anchors: each merged token at its slot's place and original position)."""

    index: Tensor
    weights: Tensor
    slots: Tensor | None = None
    # pre-LLM only: ``[p, D]`` new embeddings placed before the kept tokens (VisionZip's projected [CLS] token)
    prefix: Tensor | None = None

    @property
    def added(self) -> int:
        """Tokens that are not among the image's own: the merged ones and the ``prefix``."""
        return int(self.weights.shape[0] + (0 if self.prefix is None else self.prefix.shape[0]))

    @property
    def count(self) -> int:
        return int(self.index.numel()) + self.added


def group_weights(groups: list[Tensor], num_tokens: int, device: torch.device | str | None = None) -> Tensor:
    """``[len(groups), N]`` float32 rows: ``1/|g|`` at each member of group ``g`` (the group's mean)."""
    out = torch.zeros(len(groups), num_tokens, dtype=torch.float32, device=device)
    for j, g in enumerate(groups):
        g = torch.as_tensor(g, dtype=torch.long, device=device).flatten()
        if g.numel() == 0:
            raise ValueError(f"group {j} is empty: every merged token averages at least one token")
        if int(g.min()) < 0 or int(g.max()) >= num_tokens:
            raise ValueError(f"group {j} has indices outside [0, {num_tokens - 1}]")
        out[j, g] = 1.0 / g.numel()
    return out


def merged_embeddings(x: Tensor, merge: Merge) -> Tensor:
    """``[N, D]`` embeddings -> ``[p + k + m, D]``: the ``prefix`` rows (if any), the kept rows ``x[index]``, then
    each merged token ``weights @ x`` (computed in float32, returned in ``x``'s dtype)."""
    check_features(x, merge.weights.shape[1] if merge.weights.shape[0] else None, "x")
    parts = [] if merge.prefix is None else [merge.prefix.to(device=x.device, dtype=x.dtype)]
    parts.append(x[merge.index.to(x.device)])
    if merge.weights.shape[0]:
        parts.append((merge.weights.to(device=x.device, dtype=torch.float32) @ x.float()).to(x.dtype))
    return torch.cat(parts, 0)


def contextual_weights(targets: Tensor, groups: list[Tensor], num_tokens: int, rule: str = "target_plus_mean",
                       device: torch.device | str | None = None) -> Tensor:
    """``[c, N]`` float32 rows of VisionZip's contextual tokens, target ``j`` with members ``groups[j]`` (the
    tokens assigned to it, maybe none).

    ``rule="target_plus_mean"`` (VisionZip's released code, ``clip_encoder.py``: ``target_hidden +
    aggregated_hidden``, the members' sum divided by ``counts.clamp(min=1)``): ``x_target + mean(x_members)``, just
    ``x_target`` for a target without members. ``rule="mean"``: the mean of the target and its members.
    """
    if rule not in ("target_plus_mean", "mean"):
        raise ValueError(f"contextual={rule!r}: must be 'target_plus_mean' (the authors') or 'mean'")
    if rule == "mean":
        return group_weights([torch.cat([targets[j:j + 1], g]) for j, g in enumerate(groups)], num_tokens, device)
    out = torch.zeros(len(groups), num_tokens, dtype=torch.float32, device=device)
    for j, g in enumerate(groups):
        if g.numel():
            out[j] = group_weights([g], num_tokens, device)[0]
        out[j, targets[j]] += 1.0
    return out


def visionzip(importance: Tensor, features: Tensor, n: int, dominant_ratio: float = DOMINANT_RATIO,
              contextual: str = "target_plus_mean", cls_slot: bool = False) -> Merge:
    """VisionZip (Yang et al., 2024): ``n`` tokens = dominant tokens kept + contextual tokens merged.

    1. Dominant: the top ``d = min(n, max(1, round(n * dominant_ratio)))`` tokens by ``importance`` (the [CLS]
       attention; ties: lower index first). ``cls_slot``: the tower's [CLS] token is one of the ``d`` (VisionZip's
       code keeps ``dominant - 1`` patches plus [CLS]), so ``d - 1`` tokens are kept and the caller adds the [CLS]
       (``Merge.prefix``); ``count`` is then ``n - 1`` before the prefix.
    2. Contextual (``c = min(n - d, N - d)``): the other tokens in original order; targets are every
       ``step = max(1, R // c)``-th of them (the first ``c``); every other remaining token joins the target of
       highest cosine similarity of ``features`` (ties: the first target); each target becomes
       :func:`contextual_weights` of its group (``contextual``: the authors' ``target + mean(members)`` or the
       group's ``mean``).

    Args:
        importance: ``[N]`` dominance scores; features: ``[N, D]`` similarity features; ``1 <= n <= N``.

    Returns:
        :class:`Merge` with ``d`` kept indices and ``c`` groups that partition the non-dominant tokens;
        ``count == n`` exactly (``n == N`` keeps every token, no merge).
    """
    num_tokens = check_scores(importance, "importance")
    check_features(features, num_tokens)
    check_budget(n, num_tokens)
    if not 0.0 < dominant_ratio <= 1.0:
        raise ValueError(f"dominant_ratio={dominant_ratio!r}: must be in (0, 1]")
    device = importance.device
    d = min(n, max(1, int(round(n * dominant_ratio))))
    c = min(n - d, num_tokens - d)
    if n == num_tokens:
        d, c = n, 0
    dominant = sorted_indices(descending_order(importance)[:d - 1 if cls_slot and n < num_tokens else d])
    if c == 0:
        return Merge(dominant, torch.zeros(0, num_tokens, device=device))
    rest_mask = torch.ones(num_tokens, dtype=torch.bool, device=device)
    rest_mask[dominant] = False
    rest = torch.nonzero(rest_mask).flatten()
    step = max(1, rest.numel() // c)
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
    is_target[torch.arange(0, rest.numel(), step, device=device)[:c]] = True
    targets, others = rest[is_target], rest[~is_target]
    unit = F.normalize(features.float(), dim=-1)
    assign = (unit[others] @ unit[targets].T).argmax(1) if others.numel() else others
    members = [others[assign == j] for j in range(c)]
    return Merge(dominant, contextual_weights(targets, members, num_tokens, contextual, device))
