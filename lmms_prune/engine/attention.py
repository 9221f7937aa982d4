"""Last-row attention scores through transformers' attention-function interface.

The engine registers ``lmms_prune|<base>`` implementations (``<base>`` = sdpa, eager, flash_attention_2, ...)
that first let the active pruning handle observe the rotary-embedded query/key states of the layers it scores
(and, for a decode-time selection, choose the key/value columns the kernel sees) and then call the base
implementation. Scoring computes only the needed query row(s):
``softmax(q_last . K^T * scale + mask_row)`` with GQA heads grouped (no key copy), heads averaged, in float32,
so no ``seq x seq`` matrix is ever built and SDPA/flash attention stay in use everywhere (methods.md section 3).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

PREFIX = "lmms_prune|"

# id(attention module) -> observer callable(module, query, key, attention_mask, scaling)
_OBSERVERS: dict[int, Callable[..., None]] = {}
# id(attention module) -> filter callable(module, query, key, value, attention_mask) -> (key, value, attention_mask):
# the key/value columns (and mask) the kernel sees (decode-time selection, lmms_prune.engine.decode)
_KEY_FILTERS: dict[int, Callable[..., tuple[Any, Any, Any]]] = {}


def _base_function(base: str, module: torch.nn.Module) -> Callable[..., Any]:
    if base == "eager":
        # transformers defines eager attention per model file; use the one of this module's model.
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_wrapper(base: str) -> Callable[..., Any]:
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        observer = _OBSERVERS.get(id(module))
        if observer is not None:
            observer(module, query, key, attention_mask, kwargs.get("scaling"))
        key_filter = _KEY_FILTERS.get(id(module))
        if key_filter is not None:
            key, value, attention_mask = key_filter(module, query, key, value, attention_mask)
        return _base_function(base, module)(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"lmms_prune_{base}_attention"
    return attention


def wrapped_name(base: str) -> str:
    """Register (once) and return the name of the observing implementation wrapping ``base``."""
    if base.startswith(PREFIX):
        return base
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, _make_wrapper(base))
        mask_base = "sdpa" if base not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping else base
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[mask_base])
    return name


def base_name(name: str | None) -> str:
    name = name or "eager"
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def add_observer(module: torch.nn.Module, fn: Callable[..., None]) -> None:
    _OBSERVERS[id(module)] = fn


def observer_of(module: torch.nn.Module) -> Callable[..., None] | None:
    """The observer ``module``'s attention calls have now, if any (a second capture chains onto it)."""
    return _OBSERVERS.get(id(module))


def remove_observer(module: torch.nn.Module) -> None:
    _OBSERVERS.pop(id(module), None)


def add_key_filter(module: torch.nn.Module, fn: Callable[..., tuple[Any, Any, Any]]) -> None:
    _KEY_FILTERS[id(module)] = fn


def remove_key_filter(module: torch.nn.Module) -> None:
    _KEY_FILTERS.pop(id(module), None)


@contextmanager
def observing(module: torch.nn.Module, fn: Callable[..., None]) -> Iterator[None]:
    """Observe ``module``'s attention calls with ``fn`` inside the block (its own observer, if any, is put back
    after): the engine's extra call of a layer's attention on its input (``Needs.query_key_attention``)."""
    old = _OBSERVERS.get(id(module))
    _OBSERVERS[id(module)] = fn
    try:
        yield
    finally:
        if old is None:
            _OBSERVERS.pop(id(module), None)
        else:
            _OBSERVERS[id(module)] = old


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    num_rows: int = 1,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged attention probabilities of the last ``num_rows`` query rows over all keys.

    query: [B, H, Q, d] (rotary applied); key: [B, KV, S, d] with H = KV * G (GQA); attention_mask: None
    (causal, the last rows see every key), bool [B, 1|H, Q, S] (True = attend) or additive float.
    ``columns``: bool [B, S], the softmax runs over these keys only (a row with none is all zeros).
    Returns float32 [B, num_rows, S]; equals eager attention's rows averaged over heads.
    """
    b, h, q_len, d = query.shape
    kv = key.shape[1]
    groups = h // kv
    scale = d**-0.5 if scaling is None else scaling
    q = query[:, :, q_len - num_rows:, :].float().reshape(b, kv, groups, num_rows, d)
    logits = torch.matmul(q, key.float().unsqueeze(2).transpose(-1, -2)) * scale  # [B, KV, G, R, S]
    logits = logits.reshape(b, h, num_rows, -1)
    if num_rows > 1 and attention_mask is None:
        s = logits.shape[-1]
        rows = torch.arange(s - num_rows, s, device=logits.device)[:, None]
        logits = logits.masked_fill(torch.arange(s, device=logits.device)[None, :] > rows, float("-inf"))
    if attention_mask is not None:
        m = attention_mask[..., q_len - num_rows:, : logits.shape[-1]]
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    if columns is not None:
        logits = logits.masked_fill(~columns[:, None, None, : logits.shape[-1]], float("-inf"))
        return torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0).mean(dim=1)
    return torch.softmax(logits, dim=-1).mean(dim=1)


def key_l1_norms(key: torch.Tensor) -> torch.Tensor:
    """DART's token norm: L1 norm of each token's key, averaged over KV heads. key [B, KV, S, d] -> [B, S]."""
    return key.float().abs().sum(-1).mean(1)


def query_rows(query: torch.Tensor, key: torch.Tensor, scaling: float | None, rows: slice,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head attention probabilities of the query rows ``rows`` over all keys, for vision-encoder attention
    (no mask, or the additive / boolean ``[B, 1, Q, S]`` key mask of an in-tower merge).
    query [B, H, Q, d], key [B, H, S, d] -> float32 [B, H, len(rows), S]."""
    d = query.shape[-1]
    scale = d**-0.5 if scaling is None else scaling
    logits = torch.matmul(query[:, :, rows].float(), key.float().transpose(-1, -2)) * scale
    if mask is not None:
        mask = mask[..., rows, :]
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    return torch.softmax(logits, dim=-1)


def received_attention(query: torch.Tensor, key: torch.Tensor, scaling: float | None,
                       block_rows: int = 1024) -> torch.Tensor:
    """Mean attention each token receives over all query rows, heads averaged, for unmasked (vision encoder)
    attention of one segment: ``mean_{h, i} softmax(q_i . K^T * scale)_j`` (methods.md section 4, VisPruner
    without [CLS]). Rows are processed ``block_rows`` at a time, so at most a ``[B, H, block_rows, S]`` block
    exists. query [B, H, Q, d], key [B, H, S, d] -> float32 [B, S]."""
    d = query.shape[-1]
    scale = d**-0.5 if scaling is None else scaling
    k = key.float().transpose(-1, -2)
    total = query.new_zeros(query.shape[0], key.shape[2], dtype=torch.float32)
    for lo in range(0, query.shape[2], block_rows):
        probs = torch.softmax(torch.matmul(query[:, :, lo:lo + block_rows].float(), k) * scale, dim=-1)
        total += probs.sum(dim=2).mean(dim=1)
    return total / query.shape[2]
