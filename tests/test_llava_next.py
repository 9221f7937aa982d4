"""LLaVA-NeXT and LLaVA-OneVision: the anyres layout (base grid + unpadded mosaic + one structural newline token
per mosaic row), newline tokens never pruned nor counted, the papers' "of 2880" count, token geometry, box
convention, benchmark geometries, and one lmms-eval CLI run per family with efficiency records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import run_lmms_eval
from PIL import Image
from skimage import data as skdata
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.image_processing_utils import select_best_resolution

import lmms_prune
from lmms_prune.bench import Bench, geometries, synthetic_inputs
from lmms_prune.families import family_for_config, get_adapter
from lmms_prune.families.llava_next import LlavaNext, padded_square_box_to_original
from lmms_prune.families.llava_onevision import LlavaOnevision
from lmms_prune.toy.models import tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("llava_next", "llava_onevision")
SIZES = [(300, 200), (200, 420), (240, 240), (640, 200), (90, 500), (600, 400)]

torch.set_num_threads(1)


def _image(size, which="coffee"):
    return Image.fromarray(getattr(skdata, which)()).convert("RGB").resize(size)


def _inputs(proc, images, text="Where is the cup?"):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return proc(images=images, text=[prompt], return_tensors="pt")


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_model_reloads_and_is_found_by_model_type(family):
    path = tiny_model_dir(family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    fam = family_for_config(model.config)
    assert fam.name == family and type(model).__name__ == fam.model_class
    assert type(processor).__name__ == fam.processor_class
    inputs = _inputs(processor, [_image((300, 200))])
    with torch.no_grad(), lmms_prune.apply(model, "fastv", keep_ratio=0.1) as handle:
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert handle.records[0].visual_after == max(1, round(0.1 * handle.records[0].visual_before))


@pytest.mark.parametrize("family", FAMILIES)
def test_spans_are_base_grid_then_mosaic_rows_each_ending_in_a_newline(toys, family):
    model, proc = toys(family)
    adapter = get_adapter(model)
    newline = model.model.image_newline
    for size in SIZES:
        inputs = _inputs(proc, [_image(size)])
        (span,) = adapter.spans(inputs["input_ids"], inputs)[0]
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                   image_sizes=inputs["image_sizes"]).pooler_output[0]
        # the structural positions are exactly the rows the model fills with its image_newline parameter
        is_newline = (feats == newline).all(-1)
        assert torch.nonzero(is_newline).flatten().tolist() == list(span.structural)
        assert feats.shape[0] == span.length == int((inputs["input_ids"] == model.config.image_token_id).sum())
        (base_r, base_c), (rows, cols) = span.grids
        assert span.num_visual == base_r * base_c + rows * cols == len(span.visual_index)
        assert len(span.structural) == rows
        # generate() hands the forward only the encoder output: the layout read from it is the same
        from_features = adapter.spans(inputs["input_ids"], {"mm_encoder_outputs": {"image": SimpleOutput(feats)}})
        assert from_features[0][0].grids == span.grids and from_features[0][0].structural == span.structural


@pytest.mark.parametrize("family", FAMILIES)
def test_image_structure_from_the_processor_alone_matches_the_spans(toys, family):
    """The model-free count (runners that see no model: backend=vllm) gives each image's newlines and papers'
    count exactly as the engine's spans read them from the model's packing (OneVision's anyres_max_9 shrink
    included: SIZES has mosaics over 9 tiles), two images of a prompt included."""
    model, proc = toys(family)
    adapter = get_adapter(model)
    for images in [[_image(size)] for size in SIZES] + [[_image((300, 200)), _image((90, 500))]]:
        inputs = _inputs(proc, images)
        spans = adapter.spans(inputs["input_ids"], inputs)[0]
        assert type(adapter).image_structure(proc, inputs) == [(len(s.structural), s.papers_length) for s in spans]
    if family == "llava_onevision":  # images nested per prompt: base grids with one newline each
        content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Where is the cup?"}]
        prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = proc(images=[[_image((300, 200)), _image((90, 500))]], text=[prompt], return_tensors="pt")
        spans = adapter.spans(inputs["input_ids"], inputs)[0]
        assert [len(s.structural) for s in spans] == [1, 1]
        assert type(adapter).image_structure(proc, inputs) == [(1, None), (1, None)]


class SimpleOutput:
    def __init__(self, feats):
        self.pooler_output = [feats]


def test_onevision_anyres_max_9_shrinks_a_large_mosaic(toys):
    model, proc = toys("llava_onevision")
    inputs = _inputs(proc, [_image((600, 400))])
    (span,) = get_adapter(model).spans(inputs["input_ids"], inputs)[0]
    base = model.config.vision_config.image_size // model.config.vision_config.patch_size
    rows, cols = span.grids[1]
    # without anyres_max_9 the mosaic would hold more than 9 tiles' tokens; with it, at most 1.1 x 9
    grid_h, grid_w = select_best_resolution((400, 600), model.config.image_grid_pinpoints)
    assert (grid_h // 98) * (grid_w // 98) * base * base > 1.1 * 9 * base * base
    assert rows * cols <= 1.1 * 9 * base * base


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["fastv", "divprune", "dart", "random"])
def test_newlines_are_always_kept_and_outside_the_budget(toys, family, method):
    model, proc = toys(family)
    inputs = _inputs(proc, [_image((300, 200))])
    params = {} if method == "divprune" else {"prune_layer": 2}  # divprune selects before the LLM
    with torch.no_grad(), lmms_prune.apply(model, method, keep_ratio=0.1, **params) as handle:
        model(**inputs)
        rec = handle.records[0]
        (span,) = rec.spans
        kept_positions = set(torch.nonzero(handle.state.keep_mask[0]).flatten().tolist()) if (
            handle.state.keep_mask is not None) else None
    assert rec.visual_before == span.num_visual
    assert rec.visual_after == max(1, round(0.1 * span.num_visual))
    assert rec.seq_len_after == rec.seq_len_before - span.num_visual + rec.visual_after
    assert int(rec.kept[0].max()) < span.num_visual
    if kept_positions is not None:  # intra-LLM: every newline position survives; kept visual tokens map back
        assert set(span.structural_positions.tolist()) <= kept_positions
        assert set(span.visual_positions[rec.kept[0]].tolist()) <= kept_positions
        visual_kept = kept_positions & set(span.visual_positions.tolist())
        assert len(visual_kept) == rec.visual_after


def test_records_state_the_papers_count_of_2880_style(toys):
    model, proc = toys("llava_next")
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    for size in SIZES:
        inputs = _inputs(proc, [_image(size)])
        with torch.no_grad(), lmms_prune.apply(model, "fastv", keep_ratio=0.5) as handle:
            model(**inputs)
        rec = handle.records[0]
        grid_h, grid_w = select_best_resolution((size[1], size[0]), model.config.image_grid_pinpoints)
        tile = model.config.vision_config.image_size
        assert rec.visual_before_papers == side * side * (1 + (grid_h // tile) * (grid_w // tile))
        assert rec.visual_before <= rec.visual_before_papers


def test_onevision_records_one_count(toys):
    """OneVision's papers quote ratios only: the papers' count is the count present."""
    model, proc = toys("llava_onevision")
    with torch.no_grad(), lmms_prune.apply(model, "fastv", keep_ratio=0.5) as handle:
        model(**_inputs(proc, [_image((300, 200))]))
    assert handle.records[0].visual_before_papers == handle.records[0].visual_before


def test_generate_records_the_exact_papers_count_of_a_padded_tile(toys):
    """generate() drops image_sizes once the images are encoded; the records still count the tiles exactly, even
    for a small square image whose 1x2 best resolution leaves a whole tile of padding (unpadded away)."""
    model, proc = toys("llava_next")
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    inputs = _inputs(proc, [_image((20, 20))])
    assert inputs["pixel_values"].shape[1] == 3  # base + 2 tiles
    with torch.no_grad(), lmms_prune.apply(model, "fastv", keep_ratio=0.1) as handle:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        rec = handle.records[0]
    (span,) = rec.spans
    assert span.grids[1][0] <= side and span.grids[1][1] <= side  # the mosaic is one tile's worth or less
    assert rec.visual_before_papers == side * side * 3
    assert not hasattr(model.model, "get_image_features") or "get_image_features" not in vars(model.model)


def test_two_images_in_onevision_are_base_grids_with_one_newline_each(toys):
    model, proc = toys("llava_onevision")
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [[_image((300, 200)), _image((240, 240), "astronaut")]]  # nested: two images of one sample
    inputs = proc(images=images, text=[prompt], return_tensors="pt")
    assert inputs["batch_num_images"].tolist() == [2]
    spans = get_adapter(model).spans(inputs["input_ids"], inputs)[0]
    with torch.no_grad():  # the model agrees (it checks placeholders against features) and so does generate
        logits = model(**inputs).logits
        with lmms_prune.apply(model, "fastv", keep_ratio=0.2) as handle:
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert logits.shape[1] == inputs["input_ids"].shape[1]
    assert [len(k) for k in handle.records[0].kept] == [round(0.2 * s.num_visual) for s in spans]
    base = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert [(s.grids, s.structural) for s in spans] == [([(base, base)], (base * base,))] * 2


def _siglip_received_attention(model, run):
    """Reference without the engine: each tile's (frame's) mean received attention ``[tiles, P]`` at the SigLIP
    feature layer, from that layer's own q/k projections of its hooked input (eager softmax, heads averaged)."""
    layers = model.model.vision_tower.encoder.layers
    attention = layers[len(layers) + 1 + model.config.vision_feature_layer - 1].self_attn
    grabbed = []
    hook = attention.register_forward_pre_hook(lambda m, args, kwargs: grabbed.append(
        kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        hook.remove()
    (hidden,) = grabbed
    tiles, length, _ = hidden.shape
    heads = attention.num_heads
    q = attention.q_proj(hidden).reshape(tiles, length, heads, -1).transpose(1, 2).double()
    k = attention.k_proj(hidden).reshape(tiles, length, heads, -1).transpose(1, 2).double()
    probs = torch.softmax(q @ k.transpose(-1, -2) * attention.scale, dim=-1)  # [tiles, H, P, P]
    return probs.mean(dim=(1, 2)).float()  # received: mean over heads and query rows


def test_onevision_vispruner_importance_is_siglips_mean_received_attention_repacked(toys):
    """SigLIP has no [CLS]: VisPruner ranks by each patch's mean received attention (methods.md section 4),
    laid out like the projected tokens (anyres packing with its anyres_max_9 resize; newline rows zero)."""
    from lmms_prune.engine.pre_llm import VisionCapture

    model, proc = toys("llava_onevision")
    adapter = get_adapter(model)
    inputs = _inputs(proc, [_image((900, 300))])
    with torch.no_grad(), lmms_prune.apply(model, "vispruner", keep_ratio=0.25) as handle:
        capture = VisionCapture(handle, need_cls=True)
        try:
            received = _siglip_received_attention(model, lambda: adapter.encode_images(inputs))
        finally:
            capture.close()
        importance = adapter.vision_importance(capture.cls_rows, inputs)
    assert received.shape[0] == inputs["pixel_values"].shape[1] > 1  # base tile + mosaic tiles
    torch.testing.assert_close(torch.stack(capture.cls_rows), received, atol=1e-6, rtol=1e-5)
    (packed,), _ = model.model.pack_image_features([received[..., None]], inputs["image_sizes"],
                                                   image_newline=torch.zeros(1),
                                                   vision_aspect_ratio=model.config.vision_aspect_ratio)
    torch.testing.assert_close(importance, packed[:, 0], atol=1e-6, rtol=1e-5)
    (span,) = adapter.spans(inputs["input_ids"], inputs)[0]
    assert importance.shape == (span.length,) and bool((importance[list(span.structural)] == 0).all())


def test_onevision_vispruner_keeps_each_images_budget(toys):
    model, proc = toys("llava_onevision")
    inputs = _inputs(proc, [_image((500, 300))])
    with torch.no_grad(), lmms_prune.apply(model, "vispruner", keep_ratio=0.2) as handle:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        (rec,) = handle.records
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert [len(k) for k in rec.kept] == [max(1, round(0.2 * s.num_visual)) for s in rec.spans]


def test_vispruner_signals_are_repacked_into_the_span_order(toys):
    """[CLS] scores and pre-projector features of the tiles follow the model's own packing: one row per
    placeholder, zero on the newline rows, and the base tile's rows first."""
    model, proc = toys("llava_next")
    adapter = get_adapter(model)
    inputs = _inputs(proc, [_image((300, 200))])
    (span,) = adapter.spans(inputs["input_ids"], inputs)[0]
    with torch.no_grad():
        adapter.encode_images(inputs)
        tiles = inputs["pixel_values"].shape[1]
        per_tile = torch.rand(tiles, span.grids[0][0] ** 2, 3) + 1
        packed = adapter.flatten_pre_projector(per_tile)
    assert packed.shape == (span.length, 3)
    assert bool((packed[list(span.structural)] == 0).all()) and bool((packed[span.visual_index] > 0).all())
    torch.testing.assert_close(packed[: span.grids[0][0] ** 2], per_tile[0])


@pytest.mark.parametrize("family", [LlavaNext, LlavaOnevision])
def test_token_boxes_cover_the_image_once_per_view(family):
    grids = [(8, 8), (10, 16)]
    boxes = family.token_boxes((300, 200), grids)
    assert boxes.shape == (64 + 160, 4)
    for name, mask in family.token_views(grids).items():
        area = ((boxes[mask, 2] - boxes[mask, 0]) * (boxes[mask, 3] - boxes[mask, 1])).sum()
        assert torch.isclose(area, torch.tensor(300.0 * 200.0)), name
    assert family.grid_labels((300, 200), grids) == ["base", "mosaic"]


@pytest.mark.parametrize(("width", "height"), [(640, 480), (641, 480), (300, 501), (256, 256)])
def test_padded_square_boxes_map_back_to_the_original_image(width, height):
    """A box drawn on the image, found again on LLaVA's padded square (odd padding included, where the paste
    offset is rounded down), maps back to where it was drawn."""
    from lmms_prune.families.llava import expand2square

    box = (10, 20, width - 5, height - 40)
    image = Image.new("RGB", (width, height), (0, 0, 0))
    image.paste((255, 255, 255), box)
    square = np.asarray(expand2square(image, (0, 0, 0)))[..., 0] == 255
    rows, cols = np.nonzero(square)
    side = square.shape[0]
    unit = (cols.min() / side, rows.min() / side, (cols.max() + 1) / side, (rows.max() + 1) / side)
    assert all(0 <= v <= 1 for v in unit)
    assert padded_square_box_to_original(unit, width, height) == pytest.approx(box, abs=1e-9)
    assert LlavaNext.box_convention == LlavaOnevision.box_convention == "unit_padded_square"


@pytest.mark.parametrize(("name", "tokens", "placeholders", "tiles"),
                         [("llava-next-7b", 2880, 2928, 5), ("llava-onevision-7b", 3645, 3645 + 54, 5)])
def test_bench_geometry_gives_the_papers_token_count(name, tokens, placeholders, tiles):
    fam, spec = geometries()[name]
    cls, config = fam.build_geometry(spec, layers=1)
    with torch.device("meta"):
        model = cls(config)
    pixels, extra = fam.synthetic_inputs(model, tokens, torch.zeros(4), torch.Generator())
    assert pixels.shape[:2] == (1, tiles)
    assert fam.placeholder_count(model, tokens) == placeholders
    with pytest.raises(ValueError, match=f"--tokens 100: {fam.name}"):
        fam.synthetic_inputs(model, 100, torch.zeros(4), torch.Generator())


def test_bench_runs_on_the_anyres_layout(toys):
    model, _ = toys("llava_next")
    bench = Bench(model, repeats=1, warmup=0, e2e=False, progress=lambda _: None)
    cells = bench.run(["fastv", "vispruner"], [0.111], [320])
    assert [c.method for c in cells] == ["none", "fastv", "vispruner"]
    assert all(c.visual_tokens == 320 for c in cells)
    assert [c.kept_tokens for c in cells] == [320, round(0.111 * 320), round(0.111 * 320)]
    assert all(c.theoretical_speedup > 1 for c in cells[1:])
    inputs = synthetic_inputs(model, 320)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 320 + 16  # 16 mosaic rows


# ---------------------------------------------------------------------------------------------------------
# lmms-eval command line: one run per family, with efficiency records
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.cli
@pytest.mark.parametrize(("family", "method"), [("llava_next", "fastv"), ("llava_onevision", "divprune")])
def test_cli_run_writes_efficiency_records(tmp_path, family, method):
    run = run_lmms_eval(tmp_path, f"{family}_{method}", f"pretrained={tiny_model_dir(family)},keep_ratio=0.1",
                        limit=4, log_samples=True)
    assert "pope_accuracy,none" in run.metrics["pope_tiny"]
    report = run.efficiency
    assert report["method"] == method and len(report["samples"]) == 4
    for s in report["samples"]:
        assert s["visual_after"] == max(1, round(0.1 * s["visual_before"]))
        assert s["visual_before"] <= s["visual_before_papers"]
        # the newline tokens stay in the sequence: only visual tokens leave it
        assert s["seq_len_after"] == s["seq_len_before"] - s["visual_before"] + s["visual_after"]
    assert 0 < report["summary"]["prefill_flops_ratio"] < 1
