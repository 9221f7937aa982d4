"""Input checks shared by the selection algorithms; every error names the bad value and the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import Tensor

Grid = tuple[int, int]


def check_scores(scores: Tensor, name: str = "scores") -> int:
    """Check that ``scores`` is a 1-D floating tensor without NaN; return its length N."""
    if not isinstance(scores, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 1:
        raise ValueError(f"{name} has shape {tuple(scores.shape)}: must be 1-D [N]")
    if not scores.is_floating_point():
        raise ValueError(f"{name} has dtype {scores.dtype}: must be floating point")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty: need at least one token")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN: replace or mask them before selection")
    return scores.numel()


def check_features(features: Tensor, num_tokens: int | None = None, name: str = "features") -> int:
    """Check that ``features`` is a 2-D floating ``[N, D]`` tensor (with ``N == num_tokens`` if given)."""
    if not isinstance(features, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2 or not features.is_floating_point():
        raise ValueError(
            f"{name} has shape {tuple(features.shape)} and dtype {features.dtype}: must be a floating [N, D] tensor"
        )
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{name} has shape {tuple(features.shape)}: N and D must be >= 1")
    if num_tokens is not None and features.shape[0] != num_tokens:
        raise ValueError(
            f"{name} has {features.shape[0]} rows but the scores have N={num_tokens}: one row per token"
        )
    return features.shape[0]


def check_same_device(scores: Tensor, features: Tensor, name: str = "scores") -> None:
    """Check that the per-token scores and the features live on one device."""
    if scores.device != features.device:
        raise ValueError(f"features are on {features.device} but {name} on {scores.device}: use one device")


def is_int(value: object) -> bool:
    """True for Python and NumPy integers, False for bools and everything else."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_budget(n: int, num_tokens: int) -> None:
    """Check that the keep budget ``n`` is an int in ``[1, num_tokens]``."""
    if not is_int(n):
        raise ValueError(f"n={n!r}: must be an int (use selection.budget to turn a keep_ratio into a count)")
    if not 1 <= n <= num_tokens:
        raise ValueError(f"n={n}: must be in [1, N={num_tokens}]")


def check_unit_interval(value: float, name: str) -> None:
    """Check that a hyper-parameter lies in the closed interval [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r}: must be a number in [0, 1]")


def check_grids(grids: Sequence[Grid], num_tokens: int | None = None) -> list[Grid]:
    """Check a list of ``(rows, cols)`` grid blocks (positive ints) whose sizes sum to ``num_tokens``."""
    if isinstance(grids, tuple) and len(grids) == 2 and all(is_int(g) for g in grids):
        raise ValueError(f"grids={grids!r}: must be a list of (rows, cols) blocks, e.g. [{grids!r}]")
    out: list[Grid] = []
    for block in grids:
        if (
            not isinstance(block, Sequence)
            or len(block) != 2
            or not all(is_int(v) and v >= 1 for v in block)
        ):
            raise ValueError(f"grid block {block!r}: must be a (rows, cols) pair of positive ints")
        out.append((int(block[0]), int(block[1])))
    if not out:
        raise ValueError("grids=[]: need at least one (rows, cols) block")
    total = sum(r * c for r, c in out)
    if num_tokens is not None and total != num_tokens:
        raise ValueError(
            f"grids={out} hold {total} tokens but N={num_tokens}: the blocks' rows*cols must sum to N"
        )
    return out


def floor_fraction(n: int, ratio: float) -> int:
    """``floor(n * ratio)``, robust to binary rounding (``100 * 0.29`` is 28.999...; this returns 29)."""
    return math.floor(n * ratio + 1e-9)


def descending_order(scores: Tensor) -> Tensor:
    """Token indices ``[N]`` by descending score; ties keep the lower index first (stable sort)."""
    return torch.sort(scores, descending=True, stable=True).indices


def sorted_indices(indices: Tensor) -> Tensor:
    """Return kept indices as an ascending int64 tensor (the selection functions' output contract)."""
    return torch.sort(indices.to(torch.long)).values


def unit_rows(features: Tensor) -> Tensor:
    """L2-normalised rows of ``[N, D]`` features in float64, for cosine similarities that decide orders.

    Selections that sort or take the arg-max of similarities (VisPruner, DivPrune, DART) flip on near-ties:
    near-duplicate tokens differ in cosine by ~1e-7, which is float32's rounding, and that rounding differs
    between CPU instruction sets, BLAS kernels and GPUs. float64 rounding (~1e-16) stays far below the
    features' own differences, so the selection no longer depends on the machine that multiplies them.
    """
    return F.normalize(features.double(), dim=-1)
