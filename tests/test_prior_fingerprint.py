"""A bias prior fits a model by its fingerprint (model types, depth, widths, token geometry, score layer,
prompt), read from the config alone; the folder name is information only (issue 19, case 4)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoConfig

import lmms_prune
from lmms_prune.calibration import DEFAULT_PROMPT, calibrate_prior
from lmms_prune.cli.main import main as cli_main
from lmms_prune.engine.prior import Prior, load_prior, prior_fingerprint_from_config, save_prior
from lmms_prune.loading import load_model
from lmms_prune.toy.data import generate_scenes
from lmms_prune.toy.models import tiny_model_dir

torch.set_num_threads(1)


def _images(n, seed=0):
    return [s.image.resize((300, 220)) for s in generate_scenes(n, seed=seed)]


def _same_named_copies(tmp_path):
    """The tiny Qwen2-based and Llama-based InternVL models, saved in two folders both named ``tiny``."""
    qwen, llama = tmp_path / "a" / "tiny", tmp_path / "b" / "tiny"
    shutil.copytree(tiny_model_dir("internvl_qwen2"), qwen)
    shutil.copytree(tiny_model_dir("internvl_llama"), llama)
    return qwen, llama


def test_prior_made_with_calibrate_tiny_grounder_is_accepted_for_pretrained_tiny_grounder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(_images(2, seed=3)):
        img.save(folder / f"{i:03d}.png")
    out = tmp_path / "prior.pt"
    assert cli_main(["calibrate", "--model", "tiny-grounder", "--images", str(folder), "--num-images", "2",
                     "--layer", "1", "--max-num", "1", "--out", str(out), "--device", "cpu"]) == 0
    prior = load_prior(out)
    assert prior.meta["model"] == "tiny-grounder"  # what the user typed: information only
    model, _ = load_model("tiny-grounder", device="cpu", dtype="float32")  # as the wrappers resolve it
    with lmms_prune.apply(model, "d2pruner", bias_prior=str(out)) as handle:
        assert handle.score.prior is not None


def test_prior_from_a_qwen2_model_is_refused_for_a_llama_model_in_a_folder_of_the_same_name(tmp_path):
    qwen_dir, llama_dir = _same_named_copies(tmp_path)
    qwen, qwen_proc = load_model(str(qwen_dir), device="cpu", dtype="float32")
    prior = calibrate_prior(qwen, qwen_proc, _images(1), layer=1, max_num=1, model_name=str(qwen_dir))
    path = save_prior(tmp_path / "p.pt", prior.means, prior.counts, prior.meta)
    llama, _ = load_model(str(llama_dir), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match=r"calibrated on another model.*text_model_type: 'qwen2' -> 'llama'.*"
                                         r"lmms-prune calibrate"):
        lmms_prune.apply(llama, "d2pruner", bias_prior=str(path))
    with lmms_prune.apply(qwen, "d2pruner", bias_prior=str(path)):  # the model it was made on
        pass


def test_fingerprint_reads_only_the_config_and_equals_the_calibrated_one(tmp_path):
    qwen_dir, llama_dir = _same_named_copies(tmp_path)
    qwen, proc = load_model(str(qwen_dir), device="cpu", dtype="float32")
    prior = calibrate_prior(qwen, proc, _images(1), layer=1, max_num=1)
    config = AutoConfig.from_pretrained(qwen_dir)
    assert prior.meta["fingerprint"] == prior_fingerprint_from_config(config, 1, DEFAULT_PROMPT)
    fp = prior.meta["fingerprint"]
    assert (fp["model_type"], fp["text_model_type"], fp["num_hidden_layers"], fp["score_layer"]) == (
        "internvl", "qwen2", config.text_config.num_hidden_layers, 1)
    assert fp["geometry"]["image_seq_length"] == config.image_seq_length
    assert fp["vision"]["patch_size"] == list(config.vision_config.patch_size)
    llama = prior_fingerprint_from_config(AutoConfig.from_pretrained(llama_dir), 1, DEFAULT_PROMPT)
    assert llama != fp
    assert prior_fingerprint_from_config(config, 2, DEFAULT_PROMPT) != fp
    assert prior_fingerprint_from_config(config, 1, "Describe it.") != fp


def test_check_compares_fingerprints_from_a_config_a_model_or_a_path(tmp_path):
    qwen_dir, llama_dir = _same_named_copies(tmp_path)
    qwen, proc = load_model(str(qwen_dir), device="cpu", dtype="float32")
    prior = calibrate_prior(qwen, proc, _images(1), layer=1, max_num=1)
    prior.check(AutoConfig.from_pretrained(qwen_dir), 1)
    prior.check(qwen, 1)
    prior.check(str(qwen_dir), 1)
    for other in (AutoConfig.from_pretrained(llama_dir), str(llama_dir)):
        with pytest.raises(ValueError, match="text_model_type"):
            prior.check(other, 1)
    with pytest.raises(ValueError, match="prompt: 'Please describe the provided image.' -> 'Describe it.'"):
        prior.check(qwen_dir, 1, prompt="Describe it.")
    with pytest.raises(ValueError, match="calibrated at layer 1 but this run scores at layer 3"):
        prior.check(qwen_dir, 3)
    legacy = Prior(prior.means, prior.counts, {k: v for k, v in prior.meta.items() if k != "fingerprint"})
    with pytest.raises(ValueError, match="carries no model fingerprint.*lmms-prune calibrate"):
        legacy.check(qwen_dir, 1)
