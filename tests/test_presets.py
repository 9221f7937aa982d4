"""Every preset runs end to end through the engine on every tiny architecture; bias-prior calibration writes a
prior that d2pruner loads (also at another token count); parameters parse and fail clearly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lmms_prune
from lmms_prune.calibration import calibrate_prior
from lmms_prune.cli.main import main as cli_main
from lmms_prune.engine.prior import load_prior, save_prior
from lmms_prune.families import get_adapter
from lmms_prune.presets import PRESETS, PruneConfig, describe_presets, resolve_config
from lmms_prune.toy.data import generate_scenes
from lmms_prune.toy.models import FAMILIES, build_tiny_model, tiny_model_dir

torch.set_num_threads(1)


def _inputs(family, proc, image, text="Where is the red circle?", max_num=2):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    kw = {"images_kwargs": {"max_patches": max_num}} if family.startswith("internvl") else {}
    return proc(images=[image], text=[prompt], return_tensors="pt", **kw)


def _scene_images(n, seed=0, size=(300, 220)):
    return [s.image.resize(size) for s in generate_scenes(n, seed=seed)]


@pytest.fixture(scope="module")
def priors(toys, tmp_path_factory):
    out = {}
    folder = tmp_path_factory.mktemp("priors")
    for family in FAMILIES:
        model, proc = toys(family)
        prior = calibrate_prior(model, proc, _scene_images(2), layer=1, max_num=2, model_name=family)
        out[family] = save_prior(folder / f"{family}.pt", prior.means, prior.counts, prior.meta)
    return out


def _params(method, family, priors, n_visual):
    if method in ("d2pruner", "trend"):
        return {"bias_prior": str(priors[family])}
    if method == "fixed":
        return {"keep_indices": [0, n_visual // 2, n_visual - 1]}
    return {}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(PRESETS))
def test_every_preset_generates(toys, priors, family, method):
    model, proc = toys(family)
    inputs = _inputs(family, proc, _scene_images(1, seed=5)[0])
    # visual tokens: the placeholders minus structural ones (LLaVA-NeXT's row newlines, never pruned or counted)
    n_visual = sum(s.num_visual for s in get_adapter(model).spans(inputs["input_ids"], inputs)[0])
    params = _params(method, family, priors, n_visual)
    if method == "mustdrop_authors" and family != "llava":  # only CLIP's tower hosts the in-tower merge
        with pytest.raises(ValueError, match="merges tokens inside the vision tower, but"):
            lmms_prune.apply(model, method, **params)
        return
    if (method in ("visionzip", "prumerge_plus", "mustdrop", "vscan", "fastvid", "holitom", "holitom_full")
            and family == "qwen3_vl"):
        # merged tokens have no DeepStack features
        with pytest.raises(ValueError, match="merges tokens.*qwen3_vl.*DeepStack"):
            lmms_prune.apply(model, method, **params)
        return
    if method in ("visionzip", "prumerge_plus", "mustdrop") and family in ("llava_next", "llava_onevision"):  # merges cannot sit between newlines
        with pytest.raises(ValueError, match="structural tokens"), torch.no_grad():
            with lmms_prune.apply(model, method, **params):
                model.generate(**inputs, max_new_tokens=3, do_sample=False)
        return
    if method == "sparsevlm" and family == "qwen3_vl":  # merged tokens before the last DeepStack layer
        with pytest.raises(ValueError, match="'sparsevlm' merges tokens inside the LLM.*qwen3_vl.*DeepStack"):
            lmms_prune.apply(model, method, **params)
        return
    with torch.no_grad(), lmms_prune.apply(model, method, **params) as handle:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        record = handle.records[0]
        counts = handle._stage_counts(n_visual) if method == "sparsevlm" else None
        first = [len(k) for k in handle.state.stage_kept[0][0]] if method == "feather" else None
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert record.visual_before == n_visual
    if method == "sparsevlm":  # rank-adaptive: at least the schedule's count, plus its recycled tokens
        assert counts[-1] <= record.visual_after < n_visual and record.merged[0] <= record.visual_after
        assert record.seq_len_after == record.seq_len_before - n_visual + record.visual_after
        return
    if method == "mustdrop":  # whole 3x3 windows merged: at least the budget, fewer where windows run short
        budget = sum(max(1, round(0.1 * s.num_visual)) for s in record.spans)
        assert budget <= record.visual_after < n_visual and sum(record.merged) > 0
        return
    if method == "mustdrop_authors":  # adaptive: windows of similarity >= 0.8, then the filter and the key set
        assert 0 < record.visual_after <= n_visual
        assert record.seq_len_after == record.seq_len_before - n_visual + record.visual_after
        return
    if method == "feather":  # stage 2 keeps int(0.09 M) of stage 1's M = int(0.3 N) + uniform grid survivors
        assert sum(first) >= max(1, int(0.3 * n_visual))
        assert record.visual_after == sum(max(1, int(m * 0.3**2)) for m in first)
        assert record.seq_len_after == record.seq_len_before - n_visual + record.visual_after
        return
    if method == "vscan":  # int(0.333 M) at the middle layer of the M = round(0.167 N) its vision stage kept
        assert record.visual_after == sum(max(1, int(0.333 * max(1, round(0.167 * s.num_visual))))
                                          for s in record.spans)
        assert record.seq_len_after == record.seq_len_before - n_visual + record.visual_after
        return
    # pyramiddrop: stage_ratio 0.5 at 3 stages keeps int(0.125 N) of the tokens after its last stage (authors' int)
    # downsample shrinks images in the runner, before the processor: apply() alone prunes nothing; evs (vLLM's)
    # prunes videos only, an image keeps every token (vidcom2, fastvid, dycoke, holitom, holitom_full too)
    expected = {"none": n_visual, "downsample": n_visual, "evs": n_visual, "vidcom2": n_visual, "fastvid": n_visual,
                "dycoke": n_visual, "holitom": n_visual, "holitom_full": n_visual,
                "fixed": 3,
                "pyramiddrop": max(1, int(0.125 * n_visual))}.get(
        method, max(1, round(0.1 * n_visual)))
    assert record.visual_after == expected
    assert record.seq_len_after == record.seq_len_before - n_visual + expected


def test_calibrated_prior_has_metadata_and_is_the_mean_attention(toys):
    model, proc = toys("internvl_qwen2")
    images = _scene_images(3, seed=1)
    prior = calibrate_prior(model, proc, images, layer=1, max_num=2, model_name="tiny")
    assert prior.meta["score_layer"] == 1 and prior.meta["num_images"] == 3
    assert prior.meta["prompt"] == "Please describe the provided image."
    (n,) = prior.means
    rows = []
    with torch.no_grad(), lmms_prune.apply(model, "fastv", keep_ratio=1.0, prune_layer=2, score_layer=1) as h:
        for img in images:
            model(**_inputs("internvl_qwen2", proc, img, "Please describe the provided image."))
            rows.append(h.records[0].scores[0])
    torch.testing.assert_close(prior.means[n], torch.stack(rows).mean(0))


def test_d2pruner_uses_the_prior_and_resizes_it(toys, tmp_path):
    model, proc = toys("internvl_llama")
    one_tile = calibrate_prior(model, proc, _scene_images(2, size=(300, 220)), layer=1, max_num=1)
    path = save_prior(tmp_path / "p.pt", one_tile.means, one_tile.counts, one_tile.meta)
    wide = _inputs("internvl_llama", proc, _scene_images(1, seed=9, size=(600, 220))[0], max_num=2)
    with torch.no_grad(), lmms_prune.apply(model, "d2pruner", bias_prior=str(path)) as handle:
        model(**wide)
        rec = handle.records[0]
        attention = handle.state.attention[1][0, handle.state.spans[0][0].positions]
    assert rec.visual_before == 3 * 256 and 256 in one_tile.means
    resized = torch.nn.functional.interpolate(one_tile.means[256][None, None], size=768, mode="linear",
                                              align_corners=False)[0, 0]
    torch.testing.assert_close(rec.scores[0], attention / (resized + 1e-7), rtol=1e-5, atol=0)


def test_prior_errors_name_the_calibrate_command(toys, tmp_path):
    model, proc = toys("internvl_qwen2")
    prior = calibrate_prior(model, proc, _scene_images(1), layer=1, max_num=1)
    path = save_prior(tmp_path / "p.pt", prior.means, prior.counts, prior.meta)
    with pytest.raises(ValueError, match="calibrated at layer 1 but this run scores at layer 3.*lmms-prune calibrate"):
        lmms_prune.apply(model, "d2pruner", bias_prior=str(path), prune_layer=4)
    with pytest.raises(FileNotFoundError, match="lmms-prune calibrate"):
        lmms_prune.apply(model, "d2pruner", bias_prior=str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a prior")
    with pytest.raises(ValueError, match="lmms-prune calibrate"):
        lmms_prune.apply(model, "d2pruner", bias_prior=str(tmp_path / "junk.pt"))


def test_calibrate_cli_writes_a_prior_that_d2pruner_loads(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(_scene_images(2, seed=3)):
        img.save(folder / f"{i:03d}.png")
    out = tmp_path / "prior.pt"
    model_dir = tiny_model_dir("internvl_qwen2")
    code = cli_main(["calibrate", "--model", str(model_dir), "--images", str(folder), "--num-images", "2",
                     "--layer", "1", "--max-num", "1", "--out", str(out), "--device", "cpu"])
    assert code == 0 and out.is_file()
    prior = load_prior(out)
    assert prior.meta["num_images"] == 2 and prior.meta["model"] == str(model_dir)
    model = build_tiny_model("internvl_qwen2")
    model.config._name_or_path = str(model_dir)
    lmms_prune.apply(model, "d2pruner", bias_prior=str(out)).remove()


def test_unreadable_image_is_a_clear_error(tmp_path):
    from lmms_prune.calibration import open_image

    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="bad.jpg.*unreadable"):
        open_image(bad)


def test_preset_table_and_parameter_parsing():
    text = describe_presets()
    for name in PRESETS:
        assert f"  {name} " in text
    for f in dataclasses.fields(PruneConfig):
        assert f.name in text
    cfg = resolve_config("deepprune", keep_ratio="0.25", r_pivot="0.5", alpha="auto")
    assert (cfg.prune_layer, cfg.effective_score_layer, cfg.keep_ratio, cfg.r_pivot) == (12, 11, 0.25, 0.5)
    assert cfg.resolved_alpha("grounding") == 0.5 and cfg.resolved_alpha("understanding") == 1.0
    assert resolve_config("ratio").score_layers() == (2, 11)
    assert resolve_config("fastv", keep_tokens="26").keep_ratio is None
    assert resolve_config("fixed", keep_indices="1,2;3").keep_indices == [[1, 2], [3]]
    with pytest.raises(ValueError, match="prune_layer='x': must be an integer"):
        resolve_config("fastv", prune_layer="x")
    with pytest.raises(ValueError, match="alpha=1.5"):
        resolve_config("d2pruner", alpha="1.5", bias_prior="p.pt")


def test_dart_uses_the_authors_pivots_and_final_norm_features(toys):
    """DART in the engine: 4 visual + 4 text pivots by layer K-1's key norms, similarity on the final RMSNorm of
    layer K's input (docs/fidelity.md); equal to the pure function called on those signals, and different from
    the raw-hidden-state, visual-pivots-only variant."""
    from lmms_prune import selection as sel

    model, proc = toys("internvl_qwen2")
    inputs = _inputs("internvl_qwen2", proc, _scene_images(1, seed=4)[0])
    captured = {}
    layer2 = model.model.language_model.layers[2]
    def grab(module, args, kwargs):
        captured.setdefault("hidden", (args or (kwargs["hidden_states"],))[0])

    hook = layer2.register_forward_pre_hook(grab, with_kwargs=True)  # runs before the engine's gather
    with torch.no_grad(), lmms_prune.apply(model, "dart", keep_ratio=0.1) as handle:
        model(**inputs)
        hook.remove()
        rec = handle.records[0]
        span = handle.state.spans[0][0]
        norms = handle.state.key_norms[1][0]
        normed = model.model.language_model.norm(captured["hidden"])[0]
    assert handle.config.num_pivots == 4 and handle.config.num_text_pivots == 4
    text = torch.arange(span.start + span.length, inputs["input_ids"].shape[1])
    n = max(1, round(0.1 * span.length))
    visual = slice(span.start, span.start + span.length)
    expected = sel.dart(norms[visual], normed[visual], n, num_pivots=4, text_key_norms=norms[text],
                        text_features=normed[text], num_text_pivots=4)
    assert rec.kept[0].tolist() == expected.tolist()
    raw = sel.dart(norms[visual], captured["hidden"][0][visual], n, num_pivots=8, num_text_pivots=0)
    assert raw.tolist() != expected.tolist()
