"""Reference baselines: seeded random selection and evenly spaced selection per grid block."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lmms_prune.selection._validate import Grid, check_budget, check_grids, is_int, sorted_indices


def random_select(num_tokens: int, n: int, seed: int, device: torch.device | str | None = None) -> Tensor:
    """``n`` tokens drawn uniformly without replacement, reproducibly.

    The draw uses a CPU ``torch.Generator`` seeded with ``seed``, so one seed gives the same indices on
    every device and machine with the same torch version.

    Returns:
        ``[n]`` int64 indices, ascending, on ``device``.
    """
    if not is_int(num_tokens) or num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens!r}: must be an int >= 1")
    check_budget(n, num_tokens)
    if not is_int(seed):
        raise ValueError(f"seed={seed!r}: must be an int")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    draw = torch.randperm(int(num_tokens), generator=generator)[:n]
    return sorted_indices(draw).to(device)


def uniform_select(grids: Sequence[Grid], n: int, device: torch.device | str | None = None) -> Tensor:
    """``n`` tokens evenly spaced inside each grid block.

    - Budget per block: proportional to the block's size, rounded by largest remainder (ties to the
      earlier block) so that the total is exactly ``n``; ``block_quotas`` gives the split.
    - Inside a ``rows x cols`` block, ``k`` tokens come from a lattice of ``q_r x q_c >= k`` cell centres
      (``q_c ~ sqrt(k * cols / rows)``, so the lattice has the block's aspect ratio); when the lattice has
      more points than ``k``, ``k`` of them are taken evenly spaced in its raster order. ``k = m * m`` in a
      square block whose side ``m`` divides gives exactly the ``m x m`` centred lattice.

    Returns:
        ``[n]`` int64 indices, ascending, on ``device``.
    """
    blocks = check_grids(grids)
    check_budget(n, sum(r * c for r, c in blocks))
    picks, start = [], 0
    for (rows, cols), quota in zip(blocks, block_quotas(blocks, n)):
        if quota:
            picks.append(start + _evenly_spaced(rows, cols, quota))
        start += rows * cols
    return sorted_indices(torch.cat(picks)).to(device)


def block_quotas(grids: Sequence[Grid], n: int) -> list[int]:
    """Split ``n`` over grid blocks in proportion to their sizes, by largest remainder (exact integers)."""
    sizes = [r * c for r, c in check_grids(grids)]
    total = sum(sizes)
    check_budget(n, total)
    quotas = [n * size // total for size in sizes]
    remainders = [n * size % total for size in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda b: (-remainders[b], b))
    for b in by_remainder[: n - sum(quotas)]:
        quotas[b] += 1
    return quotas


def _evenly_spaced(rows: int, cols: int, k: int) -> Tensor:
    """Raster indices of ``k`` (1 <= k <= rows*cols) tokens spread over a ``rows x cols`` block."""
    lattice_cols = min(cols, math.ceil(math.sqrt(k * cols / rows)))
    lattice_rows = min(rows, math.ceil(k / lattice_cols))
    lattice_cols = max(lattice_cols, math.ceil(k / lattice_rows))
    row = _centres(rows, lattice_rows)
    col = _centres(cols, lattice_cols)
    lattice = (row[:, None] * cols + col[None, :]).flatten()
    return lattice[_centres(lattice.numel(), k)]


def _centres(length: int, count: int) -> Tensor:
    """Indices of the centres of ``count`` equal segments of ``range(length)``; distinct if count <= length."""
    return (2 * torch.arange(count) + 1) * length // (2 * count)


def strided_grid(grids: Sequence[Grid], stride: int, device: torch.device | str | None = None) -> Tensor:
    """Every ``stride``-th row and column of each grid block: ``grid[::stride, ::stride]`` starting at (0, 0).

    FEATHER's uniform tokens (arXiv 2412.13180; its code keeps ``grid[::s, ::s]`` of the square image grid,
    ``s = 3``), applied per block in order (InternVL's tiles, a video's frames). Returns int64 indices into the
    concatenated blocks, ascending; ``ceil(r/s) * ceil(c/s)`` per ``(r, c)`` block.
    """
    blocks = check_grids(grids)
    if not is_int(stride) or stride < 1:
        raise ValueError(f"uniform_stride={stride!r}: must be an int >= 1 (FEATHER's code: 3)")
    out, base = [], 0
    for rows, cols in blocks:
        r = torch.arange(0, rows, stride, device=device)
        c = torch.arange(0, cols, stride, device=device)
        out.append(base + (r[:, None] * cols + c[None, :]).flatten())
        base += rows * cols
    return torch.cat(out)
