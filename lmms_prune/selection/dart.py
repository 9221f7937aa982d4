"""DART: duplication-aware selection around a few pivot tokens (methods.md section 5 "DART").

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(arXiv 2502.11494), and the authors' ``get_retained_image_token`` (see docs/fidelity.md for the commit).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmms_prune.selection._validate import (
    check_budget,
    check_features,
    check_same_device,
    check_scores,
    descending_order,
    is_int,
    sorted_indices,
    unit_rows,
)


def dart(
    visual_key_norms: Tensor,
    visual_features: Tensor,
    n: int,
    num_pivots: int = 4,
    text_key_norms: Tensor | None = None,
    text_features: Tensor | None = None,
    num_text_pivots: int = 4,
) -> Tensor:
    """DART selection of ``n`` visual tokens: pivots plus the tokens least similar to each pivot.

    What the engine passes (the authors' defaults, prune layer ``K``):

    - ``visual_key_norms`` / ``text_key_norms``: the L1 norm of each token's key at layer ``K-1``, after
      RoPE, heads concatenated (the authors' ``torch.norm(k, p=1, dim=-1)`` on ``[L, heads * head_dim]``;
      GQA head repetition scales every norm alike, so it does not change the ranking). Text tokens are
      those after the image, to the end of the prompt.
    - ``visual_features`` / ``text_features``: layer ``K``'s input hidden states passed through the final
      RMSNorm (``model.norm``), as the authors' ``self.norm(layer_outputs[0])``.

    Selection:

    1. Visual pivots: the ``min(num_pivots, n)`` visual tokens with the largest key norm; always kept.
    2. Text pivots: the ``min(num_text_pivots, M)`` text tokens with the largest key norm. They claim a
       share of the budget but are never kept (only visual tokens are selected).
    3. The rest of the budget, ``n - visual pivots``, is split evenly over all pivots; the first
       ``remainder`` pivots get one more token each. The authors give every pivot the same
       ``budget // pivots`` and keep ``visual pivots + pivots * (budget // pivots)`` tokens, which is not
       the budget (132 for their 128); we keep exactly ``n``, and agree with them whenever
       ``n - visual pivots`` is a multiple of the pivot count.
    4. Pivots take turns in a fixed order: visual pivots by descending key norm, then text pivots by
       descending key norm. (The authors iterate a Python ``set`` of sequence positions, whose order
       follows CPython's hash table, i.e. neither key norm nor position.) Each adds its share of the
       not-yet-kept visual tokens with the lowest cosine similarity to it.

    Ties (equal key norms, equal similarities) go to the lower index. Cosine similarities are computed in
    float64 (``unit_rows``).

    Args:
        visual_key_norms: ``[N]`` key L1 norm per visual token.
        visual_features: ``[N, D]`` final-normed hidden states of the visual tokens.
        n: visual tokens to keep, ``1 <= n <= N``.
        num_pivots: visual pivots, >= 1 (authors: 4).
        text_key_norms: optional ``[M]`` key L1 norm per text token; without it there are no text pivots.
        text_features: ``[M, D]`` final-normed hidden states of the text tokens (with ``text_key_norms``).
        num_text_pivots: text pivots, >= 0 (authors: 4); used only with ``text_key_norms``.

    Returns:
        ``[n]`` int64 kept visual indices, ascending, on ``visual_key_norms.device``.
    """
    num_tokens = check_scores(visual_key_norms, "visual_key_norms")
    check_features(visual_features, num_tokens, "visual_features")
    check_same_device(visual_key_norms, visual_features, "visual_key_norms")
    check_budget(n, num_tokens)
    if not is_int(num_pivots) or num_pivots < 1:
        raise ValueError(f"num_pivots={num_pivots!r}: must be an int >= 1 (the authors use 4)")
    if not is_int(num_text_pivots) or num_text_pivots < 0:
        raise ValueError(f"num_text_pivots={num_text_pivots!r}: must be an int >= 0 (the authors use 4)")
    pivots = descending_order(visual_key_norms)[: min(num_pivots, n)]
    unit = unit_rows(visual_features)
    pivot_units = unit[pivots]
    text_units = _text_pivot_units(text_key_norms, text_features, num_text_pivots, visual_features)
    if text_units is not None:
        pivot_units = torch.cat([pivot_units, text_units])

    similarity = unit @ pivot_units.T
    total_pivots = pivot_units.shape[0]
    share, remainder = divmod(n - pivots.numel(), total_pivots)
    kept = torch.zeros(num_tokens, dtype=torch.bool, device=visual_features.device)
    kept[pivots] = True
    for k in range(total_pivots):
        quota = share + (1 if k < remainder else 0)
        if quota == 0:
            break
        candidates = similarity[:, k].masked_fill(kept, float("inf"))
        kept[torch.sort(candidates, stable=True).indices[:quota]] = True
    return sorted_indices(kept.nonzero().squeeze(1))


def _text_pivot_units(
    text_key_norms: Tensor | None, text_features: Tensor | None, num_text_pivots: int, visual_features: Tensor
) -> Tensor | None:
    """Unit-norm float64 features ``[P_t, D]`` of the text pivots, by descending key norm; None without any."""
    if text_key_norms is None and text_features is None:
        return None
    if text_key_norms is None or text_features is None:
        raise ValueError(
            "text_key_norms and text_features go together: pass both (text pivots) or neither (no text pivots)"
        )
    num_text = check_scores(text_key_norms, "text_key_norms")
    check_features(text_features, num_text, "text_features")
    check_same_device(text_key_norms, text_features, "text_key_norms")
    if text_features.shape[1] != visual_features.shape[1]:
        raise ValueError(
            f"text_features have D={text_features.shape[1]} but visual_features D={visual_features.shape[1]}: "
            "use the same (final-normed) hidden states for both"
        )
    if num_text_pivots == 0:
        return None
    chosen = descending_order(text_key_norms)[: min(num_text_pivots, num_text)]
    return unit_rows(text_features[chosen].to(visual_features.device))
