"""Theoretical cost of a request: the (pruned) decoder's prefill FLOPs and KV-cache bytes (methods.md section 8)
and the vision encoder's FLOPs, so that a theoretical ratio can cover what the user waits for.

Pure arithmetic on a few model dimensions; nothing here imports torch or transformers.

Per decoder layer, the prefill of ``n`` tokens costs (FastV's accounting, one multiply-add counted once)

    f(n) = n * d * (2 * H * hd + 2 * KV * hd)     Q, K, V and output projections
         + 2 * n^2 * H * hd                        attention scores Q K^T and the weighted sum A V
         + ffn_matrices * n * d * m                feed-forward network

with hidden size ``d``, ``H`` query heads and ``KV`` key/value heads of size ``hd`` and FFN width ``m``.
Without GQA (``H * hd = KV * hd = d``) and with ``ffn_matrices = 2`` this is the papers'
``4 n d^2 + 2 n^2 d + 2 n d m``. A decoder that prunes at layer ``K`` costs ``K f(N) + (L - K) f(N')``;
in general it costs ``sum_l f(n_l)`` over the per-layer token counts ``n_l``.

The KV cache of a layer holding ``n_l`` tokens takes ``2 * KV * hd * bytes_per_element * n_l`` bytes (keys and
values), summed over layers.

The vision encoder (a ViT: patch embedding, ``L_v`` pre-norm blocks, a projector MLP) costs, per block over
``n`` patch tokens split into independent attention sequences of lengths ``s_j`` (tiles, frames, windows),

    g(n) = 4 * n * e^2 + 2 * e * sum_j s_j^2 + ffn_matrices * n * e * m_v

with width ``e`` and FFN width ``m_v`` (the decoder's formula without GQA, attention restricted to each
sequence), plus ``n * patch_dim * e`` for the patch embedding and ``sum_i n_i * a_i * b_i`` for the projector's
linear layers. The end-to-end ratio ``(V + P) / (V + P')`` (vision ``V``, unpruned and pruned prefill ``P``,
``P'``) is what pruning inside the LLM can buy at most; it is never above ``P / P'`` while ``V`` is unpruned.

Measured times are another matter: a process's first batch pays its cold start (kernel compilation,
allocator growth, lazy imports), so timing means leave it out (`warm_samples`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DecoderDims:
    """The dimensions of a decoder-only language model that its prefill cost depends on."""

    hidden_size: int  # d
    intermediate_size: int  # m, FFN width
    num_layers: int  # L
    num_heads: int  # H, query heads
    num_kv_heads: int  # KV, key/value heads (GQA: KV < H)
    head_dim: int  # hd
    ffn_matrices: int = 2  # weight matrices of width m in the FFN: 2 as in the papers' formula, 3 for SwiGLU

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "ffn_matrices"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}: the query heads "
                             "must be a multiple of the key/value heads")

    @classmethod
    def from_config(cls, text_config: Any, ffn_matrices: int = 2) -> DecoderDims:
        """Read the dimensions from a transformers text config (``hidden_size``, ``intermediate_size``,
        ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, optional ``head_dim``)."""
        heads = int(text_config.num_attention_heads)
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or int(text_config.hidden_size) // heads
        return cls(
            hidden_size=int(text_config.hidden_size),
            intermediate_size=int(text_config.intermediate_size),
            num_layers=int(text_config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            ffn_matrices=ffn_matrices,
        )


def layer_prefill_flops(dims: DecoderDims, n: int) -> int:
    """``f(n)``: FLOPs of one decoder layer processing ``n`` tokens at prefill (module docstring)."""
    if n < 0:
        raise ValueError(f"n={n}: a token count must be >= 0")
    d, hd = dims.hidden_size, dims.head_dim
    projections = n * d * (2 * dims.num_heads * hd + 2 * dims.num_kv_heads * hd)
    attention = 2 * n * n * dims.num_heads * hd
    ffn = dims.ffn_matrices * n * d * dims.intermediate_size
    return projections + attention + ffn


def _check_layers(dims: DecoderDims, tokens_per_layer: Sequence[int]) -> None:
    if len(tokens_per_layer) != dims.num_layers:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries; the model has "
                         f"{dims.num_layers} decoder layers, give one count per layer")


def prefill_flops(dims: DecoderDims, tokens_per_layer: Sequence[int]) -> int:
    """``sum_l f(n_l)``: prefill FLOPs of the whole decoder, layer ``l`` processing ``tokens_per_layer[l]``."""
    _check_layers(dims, tokens_per_layer)
    return sum(layer_prefill_flops(dims, int(n)) for n in tokens_per_layer)


def pruned_prefill_flops(dims: DecoderDims, n_before: int, n_after: int, prune_layer: int) -> int:
    """``K f(N) + (L - K) f(N')``: layers ``0..K-1`` see ``n_before`` tokens, the rest ``n_after``."""
    if not 0 <= prune_layer <= dims.num_layers:
        raise ValueError(f"prune_layer={prune_layer}: must be in [0, {dims.num_layers}]")
    return (prune_layer * layer_prefill_flops(dims, n_before)
            + (dims.num_layers - prune_layer) * layer_prefill_flops(dims, n_after))


def kv_cache_bytes(dims: DecoderDims, tokens_per_layer: Sequence[int], bytes_per_element: int) -> int:
    """``sum_l 2 * KV * hd * bytes * n_l``: bytes of the keys and values cached for ``tokens_per_layer``."""
    _check_layers(dims, tokens_per_layer)
    if bytes_per_element < 1:
        raise ValueError(f"bytes_per_element={bytes_per_element}: must be >= 1 (2 for bfloat16, 4 for float32)")
    per_token = 2 * dims.num_kv_heads * dims.head_dim * bytes_per_element
    return per_token * sum(int(n) for n in tokens_per_layer)


@dataclass(frozen=True)
class EncoderDims:
    """The dimensions of a ViT vision encoder that its cost depends on (every block full width)."""

    hidden_size: int  # e
    intermediate_size: int  # m_v
    num_layers: int  # L_v, blocks that run
    patch_dim: int  # input values per patch: channels * patch^2 (* temporal patch)
    ffn_matrices: int = 2  # 2 for a GELU MLP, 3 for SwiGLU (Qwen2.5-VL)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "patch_dim", "ffn_matrices"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")


def encoder_layer_flops(dims: EncoderDims, sequences: Sequence[int]) -> int:
    """``g``: one encoder block over independent attention sequences of ``sequences`` tokens each."""
    if any(int(s) < 0 for s in sequences):
        raise ValueError(f"sequences={list(sequences)}: token counts must be >= 0")
    n, e = sum(int(s) for s in sequences), dims.hidden_size
    return 4 * n * e * e + 2 * e * sum(int(s) ** 2 for s in sequences) + dims.ffn_matrices * n * e * dims.intermediate_size


def mlp_flops(tokens: int, widths: Sequence[int]) -> int:
    """Linear layers ``widths[0] -> widths[1] -> ...`` applied to ``tokens`` rows (a projector or merger)."""
    return int(tokens) * sum(int(a) * int(b) for a, b in zip(widths, widths[1:]))


def encoder_flops(dims: EncoderDims, patches: int, sequences: Sequence[int],
                  window_sequences: Sequence[int] | None = None, full_layers: Sequence[int] = ()) -> int:
    """Patch embedding of ``patches`` patches and ``num_layers`` blocks. Blocks attend within ``sequences``;
    with ``window_sequences`` (Qwen2.5-VL's windowed blocks), only the blocks in ``full_layers`` do, the others
    within the windows. Extra tokens (a [CLS] per sequence) are in ``sequences``, not in ``patches``."""
    if window_sequences is None:
        blocks = dims.num_layers * encoder_layer_flops(dims, sequences)
    else:
        full = sum(1 for i in set(full_layers) if 0 <= i < dims.num_layers)
        blocks = (full * encoder_layer_flops(dims, sequences)
                  + (dims.num_layers - full) * encoder_layer_flops(dims, window_sequences))
    return int(patches) * dims.patch_dim * dims.hidden_size + blocks


def end_to_end_ratio(vision: float, prefill_unpruned: float, prefill: float) -> float:
    """``(V + P) / (V + P')``: the theoretical speed-up of the whole prefill request (vision + LLM prefill)."""
    if prefill <= 0 or vision < 0:
        raise ValueError(f"vision={vision}, prefill={prefill}: need vision >= 0 and prefill > 0")
    return (vision + prefill_unpruned) / (vision + prefill)


def warm_samples(records: Sequence[dict[str, Any]], world_size: int = 1) -> list[dict[str, Any]]:
    """``records`` (per-sample efficiency records of a run) without each process's warm-up batch.

    Rule: with ``rank`` and ``position`` (0-based order within the process) on every record, drop the first
    ``batch_size`` positions of each rank. Otherwise (records hold ``task``, ``doc_id``, ``batch_size``) use
    lmms-eval's split: rank ``r`` of ``world_size`` answers the ``doc_id`` equal to ``r`` modulo
    ``world_size``, a task's samples in ``doc_id`` order, so drop the first ``batch_size`` ``doc_id`` of each
    (task, rank); the records do not say which task ran first, so one batch per task goes.
    """
    if not records:
        return []
    world_size = max(1, int(world_size or 1))
    if all("rank" in r and "position" in r for r in records):
        first: dict[Any, int] = {}
        for r in records:
            first[r["rank"]] = min(first.get(r["rank"], r["position"]), r["position"])
        return [r for r in records if r["position"] - first[r["rank"]] >= int(r.get("batch_size", 1) or 1)]
    by_stream: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        by_stream.setdefault((str(r.get("task")), int(r["doc_id"]) % world_size), []).append(r)
    out = []
    for stream in by_stream.values():
        stream.sort(key=lambda r: int(r["doc_id"]))
        out += stream[int(stream[0].get("batch_size", 1) or 1):]
    return out


# ---------------------------------------------------------------- where and with what a run was measured
INVOCATION_ENV = "LMMS_PRUNE_INVOCATION"
"""Environment variable a sweep sets for its runs: the id of that sweep invocation (one per `Sweep`)."""
IDENTITY_KEYS = ("model", "pretrained", "revision", "method", "config", "dtype", "model_type", "world_size",
                 "hardware", "versions", "measured_with")
"""Keys of an efficiency report that identify its run; :func:`identity_digest` covers exactly these."""


def host_id(hostname: str | None = None) -> str:
    """16 hex digits naming the machine (sha256 of its host name: bundles are public, host names need not be)."""
    import hashlib
    import socket

    return hashlib.sha256((hostname or socket.gethostname()).encode("utf-8")).hexdigest()[:16]


def measurement_context() -> dict[str, str | None]:
    """``{"invocation", "host"}`` of the running process: the sweep invocation that started it (None outside a
    sweep) and :func:`host_id`. Two runs' timings are comparable only when both are equal (:func:`side_by_side`)."""
    import os

    return {"invocation": os.environ.get(INVOCATION_ENV) or None, "host": host_id()}


def side_by_side(run: Any, baseline: Any) -> str | None:
    """None when the timings of ``run`` and ``baseline`` (their ``measured_with`` records) may be divided:
    measured in the same sweep invocation on the same host; else why not, in words."""
    run, baseline = run or {}, baseline or {}
    if not run.get("invocation") or not baseline.get("invocation"):
        return "not comparable: " + ("neither run" if not run.get("invocation") and not baseline.get("invocation")
                                     else "the baseline" if not baseline.get("invocation") else "this run") + \
            " records a sweep invocation, so they were not measured side by side"
    if run["invocation"] != baseline["invocation"]:
        return (f"not comparable: the baseline was measured in another sweep invocation "
                f"({baseline['invocation']}, this run {run['invocation']})")
    if run.get("host") != baseline.get("host"):
        return "not comparable: the baseline was measured on another host"
    return None


def identity_digest(report: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``report``'s :data:`IDENTITY_KEYS` (missing keys as null)."""
    import hashlib

    from lmms_prune.fingerprint import canonical_json

    return hashlib.sha256(canonical_json({k: report.get(k) for k in IDENTITY_KEYS}).encode("utf-8")).hexdigest()
