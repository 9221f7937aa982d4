"""Input checks shared by the score functions; every error names the bad value and the fix."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np
from torch import Tensor


def is_int(value: object) -> bool:
    """True for Python and NumPy integers, False for bools and everything else."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_vector(values: Tensor, name: str) -> int:
    """Check that ``values`` is a non-empty 1-D floating tensor; return its length."""
    if not isinstance(values, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 1 or values.numel() == 0 or not values.is_floating_point():
        raise ValueError(
            f"{name} has shape {tuple(values.shape)} and dtype {values.dtype}: must be a non-empty floating [N] tensor"
        )
    return values.numel()


def check_same_length(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Check that two score vectors describe the same tokens."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has {tuple(b.shape)}: they must score the same tokens"
        )


def check_eps(eps: float) -> None:
    """Check the division guard: a finite number > 0."""
    if isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps={eps!r}: must be a finite number > 0 (default 1e-7)")


def check_positional_weights(values: Any, where: str, noun: str = "weight", positive: bool = False) -> np.ndarray:
    """Check one vector of per-position weights read from a file: a released trend weight vector
    (``load_trend_weights``) or a calibrated prior's mean attention (``engine.prior.load_prior``).

    ``values``: a NumPy array or torch tensor; it must be a non-empty 1-D floating vector ``[M]`` whose
    entries are finite and ``>= 0`` with at least one ``> 0`` (``positive=True``: every entry ``> 0``, as a
    divisor must be: D2Pruner's ``A / (A_bias + eps)`` turns a zero into a token that always wins).
    ``where`` starts every message (the file and the entry); ``noun`` names one entry.

    Returns:
        the values as a float64 NumPy array ``[M]``.
    """
    if isinstance(values, Tensor):
        if not values.is_floating_point():
            raise ValueError(f"{where}: dtype {values.dtype}: the {noun}s must be floating point (e.g. float64)")
        values = values.detach().to("cpu").double().numpy()
    if not isinstance(values, np.ndarray):
        raise ValueError(f"{where}: a {type(values).__name__}, not an array: must be a 1-D floating vector [M]")
    if not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"{where}: dtype {values.dtype}: the {noun}s must be floating point (e.g. float64)")
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{where}: shape {values.shape}: must be a non-empty 1-D vector [M], one {noun} per token")
    finite = np.isfinite(values)
    if not finite.all():
        raise ValueError(f"{where}: {int((~finite).sum())} of {values.size} {noun}s are NaN or infinite")
    if not values.any():
        consequence = "the debiased scores would equal raw attention" if positive else "the scores would all be 0"
        raise ValueError(f"{where}: every {noun} is 0: {consequence}")
    smallest = float(values.min())
    if smallest < 0 or (positive and smallest <= 0):
        raise ValueError(f"{where}: the smallest {noun} is {smallest!r}: {noun}s must be "
                         f"{'> 0' if positive else '>= 0'}")
    return values.astype(np.float64)
