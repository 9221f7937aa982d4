"""Pure helpers of the vLLM plug-in's ``positions='original'`` path (no vLLM import, so tests run them in the main
environment): one image's slice of an encoder call's inputs, what identifies it, and where its embedding tokens sit
in the prompt. :class:`lmms_prune.vllm.base.PrunedModel` uses them."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def embed_run(position: Any) -> tuple[int, int]:
    """Where an image's embedding tokens start in the prompt and how many there are, from vLLM's
    ``PlaceholderRange`` (all of it, or the ``is_embed`` run inside it: InternVL's ``<img>`` ... ``</img>``)."""
    if position.is_embed is None:
        return position.offset, position.length
    where = torch.nonzero(torch.as_tensor(position.is_embed)).flatten().tolist()
    if not where or where[-1] - where[0] + 1 != len(where):
        raise ValueError("lmms_prune: an image's embedding tokens are not one run")
    return position.offset + where[0], len(where)


def split_kwargs(kwargs: dict[str, Any], n: int, flat: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
    """An encoder call's ``kwargs`` for ``n`` images as ``n`` calls of one: a value named in ``flat`` (concatenated
    rows, ``key -> rows per image``) split by those counts; a tensor or list of length ``n`` indexed (kept a
    batch of one); anything else shared."""
    flat = flat or {}
    out = []
    for b in range(n):
        item = {}
        for key, value in kwargs.items():
            if key in flat:
                lo = sum(flat[key][:b])
                item[key] = value[lo:lo + flat[key][b]]
            elif isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
                item[key] = value[b:b + 1]
            elif isinstance(value, list | tuple) and len(value) == n:
                item[key] = type(value)([value[b]])
            else:
                item[key] = value
        out.append(item)
    return out


def content_key(item: dict[str, Any]) -> str:
    """What identifies one image's selection: the exact bytes (and dtypes) of its encoder inputs."""
    digest = hashlib.blake2b(digest_size=16)

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().contiguous().cpu()
            digest.update(str(t.dtype).encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, list | tuple):
            for v in value:
                add(v)
        else:
            digest.update(repr(value).encode())

    for key in sorted(item):
        digest.update(key.encode())
        add(item[key])
    return digest.hexdigest()
