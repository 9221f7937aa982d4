"""Which visual tokens are padding when LLaVA pads an image to a square (methods.md sections 1 and 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from lmms_prune.scores._validate import is_int


def pad_to_square_token_mask(width: int, height: int, grid_side: int) -> Tensor:
    """Padding tokens of a ``width x height`` image after LLaVA's ``expand2square``, on a square token grid.

    ``expand2square`` pastes the image on a square of side ``S = max(width, height)`` filled with the mean
    colour, at offset ``(S - height) // 2`` from the top (wide image) or ``(S - width) // 2`` from the left
    (tall image); the square is then resized to the encoder's input, whose ``grid_side x grid_side`` patches
    (LLaVA-1.5: 24 x 24) each cover ``S / grid_side`` original pixels per side. A token is padding when at
    least half of its patch's area lies outside the pasted image (methods.md; the attention-debiasing
    authors' ``generate_pad_mask(threshold=0.5)`` calls a patch padding only above half, and centres the
    image at the real-valued offset ``(S - height) / 2``). Computed exactly in integers.

    Args:
        width, height: the original image size in pixels (PIL's ``image.size``).
        grid_side: tokens per side of the square grid.

    Returns:
        bool ``[grid_side ** 2]``, row-major (token ``row * grid_side + col``), True = padding.
    """
    for name, value in (("width", width), ("height", height), ("grid_side", grid_side)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an int >= 1")
    side = max(width, height)
    rows = _covered_length(side, (side - height) // 2, height, grid_side)
    cols = _covered_length(side, (side - width) // 2, width, grid_side)
    # Patch (i, j) spans side / grid_side pixels per axis; in units of 1 / grid_side pixel its area is side ** 2.
    image_area = rows[:, None] * cols[None, :]
    return (2 * image_area <= side * side).flatten()


def _covered_length(side: int, offset: int, length: int, grid_side: int) -> Tensor:
    """Per grid cell along one axis, how much of ``[offset, offset + length)`` it covers, times ``grid_side``."""
    start = torch.arange(grid_side, dtype=torch.int64) * side
    end = start + side
    low, high = grid_side * offset, grid_side * (offset + length)
    return (torch.minimum(end, torch.tensor(high)) - torch.maximum(start, torch.tensor(low))).clamp(min=0)
