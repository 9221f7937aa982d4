"""The vLLM plug-in's pure helpers for ``positions='original'`` (lmms_prune.vllm.items, no vLLM needed): one image's
slice of an encoder call, the key its selection is kept under, and where its embedding tokens sit. The served path
itself is proven against our engine by scripts/vllm_check.sh (docs/serving.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmms_prune.vllm.items import content_key, embed_run, split_kwargs


@pytest.mark.parametrize("seed", range(10))
def test_splitting_a_call_gives_each_image_as_a_call_of_one(seed):
    """Property: batched values (tensors and lists of length n) are indexed as batches of one, flat values split by
    their counts and concatenate back to the call's, shared values stay; and each image's key is the key of the
    same image sent alone."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 5, (1,), generator=g))
    counts = torch.randint(1, 6, (n,), generator=g).tolist()
    flat = torch.randn(sum(counts), 3, generator=g)
    call = {"pixel_values": flat, "grid": torch.tensor(counts)[:, None].repeat(1, 3), "sizes": [(i, i) for i in range(n)],
            "token_id": 7}
    items = split_kwargs(call, n, {"pixel_values": counts})
    assert len(items) == n
    assert torch.equal(torch.cat([i["pixel_values"] for i in items]), flat)
    for b, item in enumerate(items):
        assert item["pixel_values"].shape[0] == counts[b]
        assert torch.equal(item["grid"], call["grid"][b:b + 1]) and item["sizes"] == [(b, b)] and item["token_id"] == 7
        alone = {"pixel_values": flat[sum(counts[:b]):sum(counts[:b + 1])].clone(), "grid": call["grid"][b:b + 1].clone(),
                 "sizes": [(b, b)], "token_id": 7}
        assert content_key(item) == content_key(alone)
    assert len({content_key(i) for i in items}) == len({tuple(map(tuple, i["pixel_values"].tolist())) for i in items})


def test_the_key_follows_every_byte_and_dtype():
    pixels = torch.rand(2, 3, 4, 4)
    key = content_key({"pixel_values": pixels})
    changed = pixels.clone()
    changed[1, 2, 3, 3] = torch.nextafter(changed[1, 2, 3, 3], torch.tensor(2.0))
    assert content_key({"pixel_values": changed}) != key
    assert content_key({"pixel_values": pixels.double()}) != key
    assert content_key({"pixel_values": pixels.clone()}) == key
    assert content_key({"pixel_values": pixels, "image_sizes": torch.tensor([[4, 4]])}) != key


def test_embed_run_is_the_placeholder_run_or_its_embedding_part():
    assert embed_run(SimpleNamespace(offset=5, length=9, is_embed=None)) == (5, 9)
    inner = torch.tensor([False, True, True, True, False])  # InternVL: <img>, three context tokens, </img>
    assert embed_run(SimpleNamespace(offset=10, length=5, is_embed=inner)) == (11, 3)
    with pytest.raises(ValueError, match="not one run"):
        embed_run(SimpleNamespace(offset=0, length=4, is_embed=torch.tensor([True, False, True, False])))
