"""Pixel geometry shared by the families' token-to-pixel rules: token rasters as boxes (pure tensor math).

A raster of ``rows x cols`` cells over the pixel rectangle ``[x1, x2) x [y1, y2)`` is :func:`lattice` of the
:func:`edges` along each axis. Cells of one raster share their edges exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

Grid = tuple[int, int]


def edges(lo: float, hi: float, n: int) -> torch.Tensor:
    """``n + 1`` equally spaced cell edges from ``lo`` to ``hi`` (float64)."""
    return lo + (hi - lo) * torch.arange(n + 1, dtype=torch.float64) / n


def lattice(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Boxes ``[(len(ys)-1) * (len(xs)-1), 4]`` (x1, y1, x2, y2) of the cells between consecutive edges,
    row-major."""
    y1, x1 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y2, x2 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x1, y1, x2, y2], -1).reshape(-1, 4)


def raster(box: Sequence[float], grid: Grid) -> torch.Tensor:
    """The cells of a ``(rows, cols)`` raster laid over ``box = (x1, y1, x2, y2)``."""
    x1, y1, x2, y2 = box
    rows, cols = grid
    return lattice(edges(x1, x2, cols), edges(y1, y2, rows))


def check_size(image_size: Sequence[int]) -> tuple[int, int]:
    """``(width, height)`` as ints >= 1, or a clear error."""
    width, height = (int(v) for v in image_size)
    if width < 1 or height < 1:
        raise ValueError(f"image_size={tuple(image_size)}: must be (width, height) in pixels, both >= 1")
    return width, height


def grid_list(grids: Any) -> list[Grid]:
    """Token grids as a list of ``(rows, cols)``; an ``ImageSpan`` (anything with ``.grids``) is accepted."""
    grids = getattr(grids, "grids", grids)
    out = [(int(g[0]), int(g[1])) for g in grids]
    if not out or any(r < 1 or c < 1 for r, c in out):
        raise ValueError(f"grids={grids!r}: need a non-empty list of (rows, cols) with rows, cols >= 1")
    return out


def image_processor(processor: Any) -> Any:
    """The image processor of a processor (or the image processor itself)."""
    return getattr(processor, "image_processor", processor)


def size_value(size: Any, key: str) -> Any:
    """``size[key]`` of a transformers size dict or ``SizeDict`` (None when absent)."""
    if size is None:
        return None
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)
