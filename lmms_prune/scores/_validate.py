"""Input checks shared by the score functions; every error names the bad value and the fix."""

from __future__ import annotations

import math
from numbers import Integral, Real

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
