"""MustDrop's vision stage inside the tower (``mustdrop_in_tower=true``): the engine's in-tower merge
(:mod:`lmms_prune.engine.tower`: each merged window's mean in one of its places, its other places masked as keys
in the later tower layers) against a re-creation of the authors' tower that really shortens the sequence.

The re-creation, written here from reading github.com/liuting20/MustDrop @ 909afa538bff
(``llava/model/multimodal_encoder/clip_encoder.py``: ``CLIPVisionModelAcc.custom_forward``;
``local_merge.py``: ``conditional_pooling``, ``merge_wavg``; nothing copied): embeddings and the pre-layer norm,
then each encoder layer in turn; right after layer 0, the 24 x 24 patches (after [CLS]) in non-overlapping 3 x 3
windows (row-major windows, row-major members), a window's score the sum of its members' pairwise cosine
similarities without the diagonal over ``9 * 8``, ``r`` the number of windows scoring ``>= threshold``, the
``topk(r)`` windows each replaced by the mean of its 9 tokens, the sequence ``[CLS, merged windows in topk order,
the other patches ascending]``; the later layers on that shorter sequence; LLaVA's features the penultimate
layer's output without [CLS], through the projector.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import lmms_prune
from lmms_prune import conformance
from lmms_prune import selection as sel
from lmms_prune.families import family_class
from lmms_prune.runner import parse_options
from lmms_prune.toy.models import build_processor, tiny_config

torch.set_num_threads(1)

WINDOW = 3


def authors_pooling(hidden: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[1, 1 + P, D]`` -> ``[1, 1 + P - 8 r, D]``: their conditional pooling and mean merge (batch 1)."""
    cls, feat = hidden[:, :1], hidden[:, 1:]
    side = math.isqrt(feat.shape[1])
    cells = torch.arange(side * side).view(side // WINDOW, WINDOW, side // WINDOW, WINDOW)
    windows = cells.permute(0, 2, 1, 3).reshape(-1, WINDOW * WINDOW)  # [W, 9] token indices
    x = feat[0, windows]  # [W, 9, D]
    sims = F.cosine_similarity(x[:, :, None, :], x[:, None, :, :], dim=-1) * (1 - torch.eye(WINDOW * WINDOW))
    score = sims.sum((-1, -2)) / (WINDOW * WINDOW * (WINDOW * WINDOW - 1))
    r = int((score >= threshold).sum())
    top = score.topk(r).indices
    merged = feat[0, windows[top]].sum(1) / (WINDOW * WINDOW)  # merge_wavg: sums over sizes of 1
    rest = torch.ones(side * side, dtype=torch.bool)
    rest[windows[top].flatten()] = False
    return torch.cat([cls, merged[None], feat[:, torch.nonzero(rest).flatten()]], 1)


def authors_cls_attention(layer, hidden: torch.Tensor) -> torch.Tensor:
    """The layer's soft-maxed attention (``output_attentions``), the [CLS] row over the patches, heads
    averaged: ``[1, S]`` -> ``[1, S - 1]``."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    shape = (*x.shape[:2], -1, attn.head_dim)
    q, k = (proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj))
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    return probs[:, :, 0, 1:].mean(1)


def authors_image_features(model, pixel_values: torch.Tensor, threshold: float, key_rate: float = 0.08):
    """``custom_forward`` + ``feature_select`` + the projector: the image's ``[P - 8 r, D]`` LLM embeddings, and
    the key-token set (at the last layer: ``topk(ceil(key_rate * (N - 1)))`` of the [CLS] row, N counting [CLS]:
    indices into the merged sequence's patches)."""
    tower = model.model.vision_tower
    h = tower.pre_layrnorm(tower.embeddings(pixel_values))
    states, layers = [h], tower.encoder.layers
    for idx, layer in enumerate(layers):
        if idx == len(layers) - 1:
            index = authors_cls_attention(layer, h).topk(math.ceil(key_rate * (h.shape[1] - 1))).indices[0]
        h = layer(h, None)
        if idx == 0:
            h = authors_pooling(h, threshold)
        states.append(h)
    return model.model.multi_modal_projector(states[model.config.vision_feature_layer][:, 1:])[0], index


@pytest.fixture(scope="module")
def deep_llava():
    """The tiny LLaVA with a 4-layer CLIP tower (its feature layer -2 is layer 2: two layers after the merge
    feed the features) and 2 decoder layers."""
    config = tiny_config("llava", 2)
    config.vision_config.num_hidden_layers = 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return model.eval(), build_processor("llava")


def _llm_image_embeds(model, inputs, **params):
    """The image's embeddings as the LLM receives them, and the record, under ``mustdrop`` with ``params``."""
    grab = {}

    def first_input(module, args, kwargs):
        grab.setdefault("embeds", kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(first_input, with_kwargs=True)
    try:
        with torch.no_grad(), lmms_prune.apply(model, "mustdrop", **params) as handle:
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            record = handle.records[0]
    finally:
        hook.remove()
    span = record.spans_after[0]
    return grab["embeds"][0, span.start:span.start + span.length], record


@pytest.mark.parametrize("threshold", [0.8, 0.5])
def test_in_tower_merge_equals_the_authors_shortened_tower(deep_llava, threshold):
    """Masking the merged windows' other places as keys in tower layers 1..3 gives, at the places kept, exactly
    the authors' shortened tower: the same LLM embeddings in the same order, ``576 - 8 r`` of them."""
    model, proc = deep_llava
    inputs = conformance.image_inputs("llava", proc, [[conformance.photo()]], ["What is in the image?"])
    ours, record = _llm_image_embeds(model, inputs, keep_ratio=1.0, mustdrop_in_tower=True,
                                     mustdrop_threshold=threshold)
    with torch.no_grad():
        expected, keys = authors_image_features(model, inputs["pixel_values"], threshold)
    merged = (576 - expected.shape[0]) // 8
    assert merged > 0 and record.merged == [merged] and record.visual_after == 576 - 8 * merged
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(record.protected[0], keys.sort()[0])  # the key set, among the same tokens in the same order


def test_merging_after_the_tower_differs_from_merging_inside_it(deep_llava):
    """The default (LightCompress: the windows of the tower's output) is another reduction: the in-tower merge
    is not the output merge renamed."""
    model, proc = deep_llava
    inputs = conformance.image_inputs("llava", proc, [[conformance.photo()]], ["What is in the image?"])
    inside, rec_in = _llm_image_embeds(model, inputs, keep_ratio=1.0, mustdrop_in_tower=True, mustdrop_threshold=0.5)
    after, rec_out = _llm_image_embeds(model, inputs, keep_ratio=1.0, mustdrop_threshold=0.5)
    assert inside.shape != after.shape or not torch.allclose(inside, after, atol=1e-4)


@pytest.mark.parametrize("keep_ratio", [0.5, 0.25])
def test_in_tower_budget_merges_the_lightcompress_count(deep_llava, keep_ratio):
    """With a budget, the windows merged in the tower are ``(N - n) // 8`` (at most the 64 windows): the count
    of ``mustdrop_merge``, so about ``keep_ratio`` of the tokens remain."""
    model, proc = deep_llava
    inputs = conformance.image_inputs("llava", proc, [[conformance.photo()]], ["What is in the image?"])
    _, record = _llm_image_embeds(model, inputs, keep_ratio=keep_ratio, mustdrop_in_tower=True)
    r = min((576 - int(576 * keep_ratio)) // 8, 64)
    assert record.merged == [r] and record.visual_after == 576 - 8 * r


def test_merge_into_slots_holds_each_group_mean_in_its_first_member():
    """Each group's mean at its first member, its other members removed, every other token untouched."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=gen)
    groups = [torch.tensor([4, 1, 7]), torch.tensor([9, 10])]
    merge = sel.Merge(index=torch.tensor([0, 2, 3, 5, 6, 8, 11]), weights=sel.group_weights(groups, 12))
    out, labels = sel.merge_into_slots(x, merge)
    assert labels.tolist() == [-1, 0, -1, -1, -2, -1, -1, -2, -1, 1, -2, -1]
    torch.testing.assert_close(out[1], x[[1, 4, 7]].mean(0))
    torch.testing.assert_close(out[9], x[[9, 10]].mean(0))
    assert torch.equal(out[labels == -1], x[labels == -1])


REASONS = {"internvl": "pixel shuffle", "qwen2_5_vl": "rotary positions", "qwen2_vl": "rotary positions",
           "llava_next": "AnyRes", "llava_onevision": "AnyRes"}


@pytest.mark.parametrize("family", sorted(REASONS))
def test_the_authors_path_is_refused_before_loading_where_the_tower_cannot_host_it(family):
    """``--model <family>_mustdrop_authors`` names the reason before any weights load; llava runs it."""
    with pytest.raises(ValueError, match=f"inside the vision tower, but {family}: .*{REASONS[family]}"):
        parse_options(family_class(family), f"{family}_mustdrop_authors", "mustdrop_authors", pretrained="unused")
    parse_options(family_class("llava"), "llava_mustdrop_authors", "mustdrop_authors", pretrained="unused")


def test_the_in_tower_merge_is_refused_by_apply_on_a_loaded_model(toys):
    model, _ = toys("internvl_llama")
    with pytest.raises(ValueError, match="inside the vision tower, but internvl: .*pixel shuffle"):
        lmms_prune.apply(model, "mustdrop", mustdrop_in_tower=True)

FILTER = dict(llm_selector="mustdrop_filter", llm_score="none", prune_layers="1", stage_ratio=1.0)
# the tiny random LLM attends almost uniformly (each of the 144 tokens about 1/144 of the sum): this global
# threshold drops about half of them
HALF = 0.00694


@pytest.mark.parametrize(("global_thr", "individual_thr"), [(1.0, 1.0), (0.0, 0.0), (HALF, 1.0)])
def test_the_key_set_survives_the_prefill_filter(deep_llava, global_thr, individual_thr):
    """The LLM stage keeps its filter's survivors and the key set (the authors' ``unique(cat(kept, key_set))``):
    a filter that drops every token keeps exactly the key set, one that drops none every token."""
    model, proc = deep_llava
    inputs = conformance.image_inputs("llava", proc, [[conformance.photo()]], ["What is in the image?"])
    params = dict(keep_ratio=1.0, mustdrop_in_tower=True, mustdrop_threshold=0.5, mustdrop_global_thr=global_thr,
                  mustdrop_individual_thr=individual_thr, **FILTER)
    with torch.no_grad(), lmms_prune.apply(model, "mustdrop", **params) as handle:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        keys = handle.pre.records[0].protected[0]
        entered = handle.pre.records[0].spans_after[0].length
        kept = handle.llm.state.stage_kept[-1][0][0]
    assert keys.numel() == math.ceil(0.08 * entered)
    assert set(keys.tolist()) <= set(kept.tolist())
    if (global_thr, individual_thr) == (1.0, 1.0):
        assert torch.equal(kept, keys)
    elif (global_thr, individual_thr) == (0.0, 0.0):
        assert torch.equal(kept, torch.arange(entered))
    else:
        assert keys.numel() < kept.numel() < entered


def test_check_method_passes_for_the_authors_path_on_llava(deep_llava):
    """prune = mask (the LLM stage on the in-tower merge's output, key set included), batch = samples (each
    image its own windows and key set) and determinism, on the tiny LLaVA."""
    params = dict(keep_ratio=1.0, mustdrop_in_tower=True, mustdrop_threshold=0.5, mustdrop_global_thr=HALF,
                  mustdrop_individual_thr=1.0, **FILTER)
    checks = ("prune = mask", "batch = samples", "deterministic")
    model, proc = deep_llava
    results = conformance.check_family("mustdrop", "llava", params=params, checks=checks, decode=2, model=model,
                                       proc=proc)
    assert [r.status for r in results] == ["pass"] * len(checks), [(r.check, r.reason) for r in results]
