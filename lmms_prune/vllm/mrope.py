"""M-RoPE positions of a pruned Qwen-VL prompt (pure; no vLLM import, so tested in the main environment).

Qwen2-VL / Qwen2.5-VL number a prompt with three rows (temporal, height, width): text tokens advance all three
together; an image's ``t x h x w`` merged tokens take ``base + (i, j, k)``; the text after it restarts at
``base + max(t, h, w)`` (transformers' ``get_rope_index``, vLLM's ``get_mrope_input_positions``).

``positions="original"`` is GAP's rule (:func:`lmms_prune.selection.gap_positions`): every kept token keeps
its position in the unpruned prompt, so the text after a pruned image and the first generated token keep
theirs too. ``positions="contiguous"`` numbers the shorter prompt ``0..T'-1`` in all three rows, as our
transformers engine does when it hands ``generate`` the shortened prompt without the image grids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def grid_coords(index: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """``[n]`` flat token indices (row-major over the merged grid ``(t, h, w)``) -> ``[n, 3]`` ``(t, h, w)``
    coordinates."""
    _, h, w = grid
    index = index.long()
    return torch.stack([index // (h * w), (index // w) % h, index % w], dim=1)


def pruned_mrope_positions(length: int, images: Sequence[tuple[int, int, torch.Tensor]],
                           positions: str) -> tuple[torch.Tensor, int]:
    """``[3, length]`` M-RoPE positions of a pruned prompt of ``length`` tokens, and vLLM's
    ``mrope_position_delta`` (the first generated token's position minus its index ``length``).

    ``images``: per image in prompt order, ``(offset, extent, coords)``: the index of its first placeholder
    in the pruned prompt, ``max(t, h, w)`` of its merged grid before pruning, and ``coords`` ``[n, 3]`` the grid
    coordinates of its ``n`` kept tokens in prompt order (:func:`grid_coords`). ``positions``: ``"original"``
    or ``"contiguous"`` (module docstring).
    """
    if positions == "contiguous":
        return torch.arange(length).expand(3, length).clone(), 0
    if positions != "original":
        raise ValueError(f"positions={positions!r}: must be 'original' or 'contiguous'")
    rows: list[torch.Tensor] = []
    st = st_idx = 0
    for offset, extent, coords in images:
        if offset < st:
            raise ValueError(f"image at offset {offset} overlaps the previous image (ending at {st})")
        text_len = offset - st
        rows.append(torch.arange(text_len).expand(3, text_len) + st_idx)
        base = st_idx + text_len
        rows.append(coords.long().T + base)
        st_idx = base + int(extent)
        st = offset + coords.shape[0]
    if st > length:
        raise ValueError(f"the images end at {st}, past the prompt's {length} tokens")
    rows.append(torch.arange(length - st).expand(3, length - st) + st_idx)
    pos = torch.cat(rows, dim=1)
    return pos, int(pos.max()) + 1 - length if length else 0
