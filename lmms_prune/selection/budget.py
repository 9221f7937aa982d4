"""Keep budget: how many visual tokens survive (methods.md section 1)."""

from __future__ import annotations

import math
from numbers import Integral, Real


def budget(num_tokens: int, keep_ratio: float | None = None, keep_tokens: int | None = None) -> int:
    """Number of visual tokens to keep out of ``num_tokens``.

    Exactly one of ``keep_ratio`` and ``keep_tokens`` must be given:

    - ``keep_ratio`` in (0, 1]: ``round(keep_ratio * num_tokens)``, at least 1 (methods.md section 1:
      10% of 256 tokens keeps 26). Rounding is Python's ``round`` (half to even), applied to the product.
    - ``keep_tokens`` >= 1: ``min(keep_tokens, num_tokens)``.
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, Integral) or num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens!r}: must be an int >= 1")
    if (keep_ratio is None) == (keep_tokens is None):
        raise ValueError(
            f"keep_ratio={keep_ratio!r}, keep_tokens={keep_tokens!r}: give exactly one of the two"
        )
    if keep_ratio is not None:
        if (
            isinstance(keep_ratio, bool)
            or not isinstance(keep_ratio, Real)
            or not math.isfinite(keep_ratio)
            or not 0.0 < keep_ratio <= 1.0
        ):
            raise ValueError(f"keep_ratio={keep_ratio!r}: must be in (0, 1]")
        return max(1, int(round(keep_ratio * int(num_tokens))))
    if isinstance(keep_tokens, bool) or not isinstance(keep_tokens, Integral) or keep_tokens < 1:
        raise ValueError(f"keep_tokens={keep_tokens!r}: must be an int >= 1")
    return int(min(keep_tokens, num_tokens))


def depth_scaled_layers(depth: int, fractions: tuple[float, ...] = (0.25, 0.5, 0.75)) -> tuple[int, ...]:
    """Pruning layers at fixed fractions of the decoder's depth, rounded half up: ``floor(depth * f + 0.5)``.

    PyramidDrop's LLaVA-1.5-7B layers 8, 16, 24 of 32 are the fractions 1/4, 2/4, 3/4 (24 layers: 6, 12, 18;
    28 layers: 7, 14, 21). Raises when the depth is too small for distinct layers >= 1.
    """
    if isinstance(depth, bool) or not isinstance(depth, Integral) or depth < 1:
        raise ValueError(f"depth={depth!r}: must be an int >= 1")
    layers = tuple(int(math.floor(depth * f + 0.5)) for f in fractions)
    if layers[0] < 1 or any(b <= a for a, b in zip(layers, layers[1:])) or layers[-1] >= depth:
        raise ValueError(f"a decoder of {depth} layers is too shallow for pruning layers at fractions {fractions} "
                         f"(got {layers}); give prune_layers explicitly")
    return layers


def average_kept_fraction(ratio: float, layers: tuple[int, ...], depth: int) -> float:
    """Mean over the ``depth`` decoder layers of the fraction of visual tokens present when stage ``s`` keeps
    ``ratio`` of the tokens still present at layer ``layers[s]`` (continuous, before rounding):
    ``(K_1 + sum_s (K_{s+1} - K_s) ratio^s) / L`` with ``K_{S+1} = L``."""
    bounds = (*layers, depth)
    total = float(layers[0])
    for s in range(len(layers)):
        total += (bounds[s + 1] - bounds[s]) * ratio ** (s + 1)
    return total / depth


def stage_ratio_for_average(target: float, layers: tuple[int, ...], depth: int) -> float:
    """The per-stage ratio ``r`` whose :func:`average_kept_fraction` equals ``target`` (bisection, monotone
    in ``r``). The average is at least ``K_1 / L`` (every token runs through layers ``0..K_1-1``)."""
    low = layers[0] / depth
    if not low < target <= 1.0:
        raise ValueError(
            f"keep_ratio={target:g}: with prune_layers={tuple(layers)} of {depth} decoder layers every visual "
            f"token runs through layers 0..{layers[0] - 1}, so the average kept per layer is above {low:g}; "
            f"raise keep_ratio or lower the first prune layer (e.g. prune_layers=2,...)")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average_kept_fraction(mid, layers, depth) < target else (lo, mid)
    return (lo + hi) / 2


def present_stage_budget(present: int, ratio: float, stage: int, rounding: str = "int") -> int:
    """Visual tokens kept by stage ``stage`` (0-based) counted from the ``present`` tokens it starts with:
    ``max(1, int(present * ratio^(stage + 1)))`` (``rounding="round"``: ``round``), at most ``present``.

    FEATHER's released code (``FastVLlamaModel.forward``): its second stage keeps
    ``int(len(image_indices) * ratio * ratio)`` where ``image_indices`` are the tokens the first stage kept,
    not the original count (:func:`stage_budgets` counts from the original, PyramidDrop's rule).
    """
    if isinstance(present, bool) or not isinstance(present, Integral) or present < 1:
        raise ValueError(f"present={present!r}: must be an int >= 1")
    if not (isinstance(ratio, Real) and 0.0 < ratio <= 1.0):
        raise ValueError(f"stage_ratio={ratio!r}: must be in (0, 1]")
    if isinstance(stage, bool) or not isinstance(stage, Integral) or stage < 0:
        raise ValueError(f"stage={stage!r}: must be an int >= 0")
    if rounding not in ("int", "round"):
        raise ValueError(f"budget_rounding={rounding!r}: must be 'int' (the authors' int(N * ratio^s)) or 'round'")
    to_int = int if rounding == "int" else round
    return min(int(present), max(1, int(to_int(present * ratio ** (stage + 1)))))


def stage_budgets(num_tokens: int, ratio: float, stages: int, rounding: str = "round") -> list[int]:
    """Visual tokens kept after each of ``stages`` stages, computed from the original count ``N`` (no
    compounding of rounding), non-increasing and <= N.

    ``rounding="int"`` (PyramidDrop's released code, ``pdrop_rank_drop``: ``int(N * ratio_list[s])`` of the
    ORIGINAL count, ``ratio_list[s] = ratio^s``): ``max(1, int(N * ratio^s))``; where ``int`` gives 0 (an image
    of fewer than ``1 / ratio^s`` tokens) one token is kept, never none. ``rounding="round"``:
    ``max(1, round(N * ratio^s))`` (the project's rounding rule, :func:`budget`).
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, Integral) or num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens!r}: must be an int >= 1")
    if not (isinstance(ratio, Real) and 0.0 < ratio <= 1.0):
        raise ValueError(f"stage_ratio={ratio!r}: must be in (0, 1]")
    if rounding not in ("int", "round"):
        raise ValueError(f"budget_rounding={rounding!r}: must be 'int' (the authors' int(N * ratio^s)) or 'round'")
    to_int = int if rounding == "int" else round
    out, prev = [], int(num_tokens)
    for s in range(1, stages + 1):
        prev = min(prev, max(1, int(to_int(num_tokens * ratio**s))))
        out.append(prev)
    return out
