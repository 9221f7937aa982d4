"""VisPruner on vision towers without [CLS] (methods.md section 4): the mean attention each patch receives over
all query rows, heads averaged, at the last full-attention vision layer, summed over the patches the merger
folds into one token, in the prompt's token order.

The reference is computed here without the engine: the tower's own q/k at that block (hooked input, the block's
own rotary tables), one eager ``[H, P, P]`` map per image (``cu_seqlens``), :func:`cls_attention`
(``has_cls=False``), and the token order read off the merger's own output rows (Qwen2.5-VL permutes the merge
units into attention windows before its blocks and back after the merger).
"""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image
from skimage import data as skdata

import lmms_prune
from lmms_prune.engine import attention as attn
from lmms_prune.engine.pre_llm import VisionCapture
from lmms_prune.families import get_adapter
from lmms_prune.scores import cls_attention, merge_consecutive
from lmms_prune.toy.models import build_processor, build_tiny_model

torch.set_num_threads(1)


def _inputs(family, sizes=((300, 200), (200, 260))):
    processor = build_processor(family)
    images = [Image.fromarray(skdata.coffee()).resize(size) for size in sizes]
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": "What is it?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=images, text=[prompt], return_tensors="pt")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_importance_equals_an_eager_recomputation_from_the_towers_own_qk(family):
    model = build_tiny_model(family)
    inputs = _inputs(family)
    adapter = get_adapter(model)
    tower = model.model.visual
    block = tower.config.fullatt_block_indexes[-1] if family == "qwen2_5_vl" else len(tower.blocks) - 1
    attention = tower.blocks[block].attn
    assert adapter.vision_feature_attention() is attention
    grabbed = {}

    def grab_attention(module, args, kwargs):
        grabbed.update(hidden=args[0], cu=kwargs["cu_seqlens"].tolist(), pe=kwargs["position_embeddings"])

    def grab_merger(module, args, output):
        grabbed["merged"] = output

    hooks = [attention.register_forward_pre_hook(grab_attention, with_kwargs=True),
             tower.merger.register_forward_hook(grab_merger)]
    with torch.no_grad(), lmms_prune.apply(model, "vispruner", keep_ratio=0.25) as handle:
        capture = VisionCapture(handle, need_cls=True)
        try:
            encoded = adapter.encode_images(inputs)
        finally:
            capture.close()
        importance = adapter.vision_importance(capture.cls_rows, inputs)
    for h in hooks:
        h.remove()

    rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
    hidden, cu = grabbed["hidden"], grabbed["cu"]
    q, k, _ = attention.qkv(hidden).reshape(hidden.shape[0], 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary(q, k, *grabbed["pe"])
    patch_scores = []
    for lo, hi in zip(cu[:-1], cu[1:]):
        qi, ki = q[lo:hi].transpose(0, 1).float(), k[lo:hi].transpose(0, 1).float()
        probs = torch.softmax(qi @ ki.transpose(-1, -2) * attention.scaling, dim=-1)  # [H, P, P], one image
        patch_scores.append(cls_attention(probs, has_cls=False))
    unit = tower.config.spatial_merge_size ** 2
    tower_order = torch.cat(patch_scores).reshape(-1, unit).sum(1)  # one score per merger output row
    prompt_rows = torch.cat(list(encoded.pooler_output))
    source = torch.cdist(prompt_rows, grabbed["merged"]).argmin(1)  # merger row of each prompt token
    assert sorted(source.tolist()) == list(range(len(source)))
    if family == "qwen2_5_vl":
        assert not torch.equal(source, torch.arange(len(source)))  # the window permutation is exercised
    assert len(cu) == 3 and importance.shape == (len(source),)
    torch.testing.assert_close(importance, tower_order[source], atol=1e-6, rtol=1e-5)


def test_received_attention_is_cls_attention_without_cls_and_blocks_rows():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 37, 8, generator=g), torch.randn(2, 3, 37, 8, generator=g)
    full = torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1)
    expected = torch.stack([cls_attention(full[b], has_cls=False) for b in range(2)])
    for block in (1, 5, 37, 100):
        torch.testing.assert_close(attn.received_attention(q, k, 0.3, block_rows=block), expected)
    assert torch.allclose(expected.sum(-1), torch.ones(2))  # each query row is a distribution


def test_merge_consecutive_sums_each_group_and_refuses_partial_groups():
    scores = torch.arange(8.0)
    assert merge_consecutive(scores, 4).tolist() == [6.0, 22.0]
    with pytest.raises(ValueError, match="multiple of unit=4"):
        merge_consecutive(torch.ones(6), 4)
    with pytest.raises(ValueError, match="unit=0"):
        merge_consecutive(scores, 0)


def test_vispruner_runs_and_keeps_the_budget_on_towers_without_cls():
    for family in ("qwen2_5_vl", "qwen3_vl"):
        model = build_tiny_model(family)
        inputs = _inputs(family)
        n = int((inputs["input_ids"] == model.config.image_token_id).sum())
        with torch.no_grad(), lmms_prune.apply(model, "vispruner", keep_ratio=0.2) as handle:
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            rec = handle.records[0]
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2
        per_image = [s.length for s in rec.spans]
        assert sum(per_image) == n and [len(k) for k in rec.kept] == [max(1, round(0.2 * m)) for m in per_image]


def test_one_varlen_call_over_several_images_is_split_at_cu_seqlens():
    """Flash attention calls the vision layer once for all images (``cu_seqlens``); the capture must score
    each image on its own, as SDPA's per-image calls do."""
    model = build_tiny_model("qwen3_vl")
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g)
    with lmms_prune.apply(model, "vispruner") as handle:
        capture = VisionCapture(handle, need_cls=True)
        try:
            capture._grab_segments(None, (), {"cu_seqlens": torch.tensor([0, 12, 20])})
            capture._observe(None, q, k, None, 0.5)  # one call spanning both images
            capture._observe(None, q[:, :, :12], k[:, :, :12], None, 0.5)  # SDPA: one call per image
        finally:
            capture.close()
    first, second, alone = capture.cls_rows
    torch.testing.assert_close(first, attn.received_attention(q[:, :, :12], k[:, :, :12], 0.5)[0])
    torch.testing.assert_close(second, attn.received_attention(q[:, :, 12:], k[:, :, 12:], 0.5)[0])
    torch.testing.assert_close(alone, first)
