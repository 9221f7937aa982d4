"""Position IDs of a pruned sequence: pure functions of (original positions, kept indices).

:func:`gap_positions` is the rule of GAP (Chien et al., 2025, "Grounding-Aware Token Pruning: Recovering from
Drastic Performance Drops in Visual Grounding Caused by Pruning", arXiv 2506.21873): after pruning, every token
that stays keeps the position ID it had in the unpruned sequence, so both the ORDER and the VALUES of the IDs
are those the model saw in training (the paper's finding: renumbering the shorter sequence 0..T'-1 shifts the
IDs of the visual tokens and of the text after them, which is what breaks grounding). No code was released; this
follows the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kept_index(keep: Tensor, length: int) -> Tensor:
    """``keep`` (bool ``[T]`` mask, or int indices ``[T']``) as int64 indices ``[T']``, checked strictly
    increasing and in ``[0, length)``: a pruned sequence keeps its tokens in their original order."""
    if not isinstance(keep, Tensor):
        raise ValueError(f"keep must be a torch.Tensor, got {type(keep).__name__}")
    if keep.dtype == torch.bool:
        if keep.shape != (length,):
            raise ValueError(f"keep is a bool mask of shape {tuple(keep.shape)}: must be [{length}] (one per token)")
        return torch.nonzero(keep).flatten()
    if keep.dim() != 1 or keep.is_floating_point() or keep.is_complex():
        raise ValueError(f"keep has shape {tuple(keep.shape)} and dtype {keep.dtype}: must be a bool [T] mask "
                         "or 1-D integer indices")
    index = keep.long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= length):
        raise ValueError(f"keep has indices outside [0, {length - 1}]")
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise ValueError("keep must be strictly increasing: a pruned sequence keeps its tokens in their order "
                         "(sort the kept indices and drop repeats)")
    return index


def gap_positions(position_ids: Tensor, keep: Tensor) -> Tensor:
    """GAP's rule (arXiv 2506.21873): the position IDs of the kept tokens are their ORIGINAL ones.

    ``position_ids``: ``[..., T]`` of the unpruned sequence (``[T]`` or ``[B, T]`` for 1-D RoPE; ``[3, T]`` for
    Qwen's M-RoPE, the temporal/height/width IDs); ``keep``: bool ``[T]`` or strictly increasing indices
    ``[T']``. Returns ``[..., T']``: ``position_ids[..., keep]`` -- strictly order- and value-preserving, so the
    next token of a 1-D sequence continues from the unpruned length. The contrast is contiguous renumbering
    (``arange(T')``), the rule GAP replaces.
    """
    if not isinstance(position_ids, Tensor) or position_ids.dim() == 0:
        raise ValueError("position_ids must be a torch.Tensor [..., T]")
    if position_ids.is_floating_point():
        raise ValueError(f"position_ids has dtype {position_ids.dtype}: must be integer")
    index = kept_index(keep, position_ids.shape[-1]).to(position_ids.device)
    return position_ids.index_select(-1, index)


def restore_runs(tokens: list[int], runs: list[tuple[int, int, int, list[int]]]
                 ) -> tuple[list[int], list[int], Tensor]:
    """The unpruned prompt of a prompt whose visual runs were cut to their kept tokens, for GAP's rule where only
    the pruned prompt exists (the vLLM plug-in's, whose prompt processor cut each run to the budget).

    ``runs``: per run, ascending by offset, ``(offset, n, size, kept)``: the run's first index and length ``n`` in
    ``tokens``, its length ``size`` before pruning and the ``n`` kept indices among those ``size`` (ascending).
    Returns the unpruned tokens (each run filled with its first token, a placeholder; ``n >= 1``), each run's offset in them,
    and the bool ``[T]`` mask of the tokens ``tokens`` keeps, in order: ``gap_positions(positions of the unpruned
    prompt, mask)`` are the pruned prompt's positions.
    """
    out: list[int] = []
    offsets: list[int] = []
    keep: list[bool] = []
    at = 0
    for offset, n, size, kept in runs:
        if offset < at or offset + n > len(tokens):
            raise ValueError(f"run at {offset} of length {n}: runs must ascend and lie inside the {len(tokens)} "
                             "tokens")
        if n < 1:
            raise ValueError(f"run at {offset}: keeps no token; each run keeps at least one (its placeholder fills "
                             "the restored run, and every budget is at least 1)")
        if len(kept) != n or min(kept) < 0 or max(kept) >= size or sorted(set(kept)) != list(kept):
            raise ValueError(f"run at {offset}: kept={list(kept)[:8]}... must be {n} ascending indices in [0, {size})")
        out += tokens[at:offset]
        keep += [True] * (offset - at)
        offsets.append(len(out))
        run = [False] * size
        for i in kept:
            run[i] = True
        out += tokens[offset:offset + 1] * size
        keep += run
        at = offset + n
    out += tokens[at:]
    keep += [True] * (len(tokens) - at)
    return out, offsets, torch.tensor(keep, dtype=torch.bool)
