"""Ratio debiasing of the deep-layer paper (section 3.2): mid-layer over shallow-layer attention."""

from __future__ import annotations

from numbers import Real

from torch import Tensor

from lmms_prune.scores._validate import check_eps, check_same_length, check_vector


def minmax(values: Tensor) -> Tensor:
    """``(x - min) / (max - min)`` over a ``[N]`` vector; a constant vector maps to all zeros."""
    check_vector(values, "values")
    low, high = values.min(), values.max()
    span = high - low
    if span == 0:
        return values.new_zeros(values.shape)
    return (values - low) / span


def ratio(a_mid: Tensor, a_shallow: Tensor, eps: float = 1e-7) -> Tensor:
    """Deep-layer paper eq. 1: ``A_mid / (A_shallow + eps)``, both ``[N]`` from the same forward pass."""
    check_vector(a_mid, "a_mid")
    check_vector(a_shallow, "a_shallow")
    check_same_length(a_mid, a_shallow, "a_mid", "a_shallow")
    check_eps(eps)
    return a_mid / (a_shallow + eps)


def ratio_combo(a_mid: Tensor, a_shallow: Tensor, weight: float = 0.5, eps: float = 1e-7) -> Tensor:
    """Deep-layer paper's "weighted combo": ``w * minmax(A_mid) + (1 - w) * minmax(ratio)``, ``[N]``."""
    if isinstance(weight, bool) or not isinstance(weight, Real) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight={weight!r}: must be a number in [0, 1] (paper: 0.5)")
    return weight * minmax(a_mid) + (1.0 - weight) * minmax(ratio(a_mid, a_shallow, eps))
