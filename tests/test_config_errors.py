"""Issue 19, case 2: every configuration error is raised by the one validation place before any weights load,
with a message naming the value; checks that need the model's shape read its config only."""

from __future__ import annotations

import pytest

from lmms_prune.models.wrappers import InternVLPrune_d2pruner, InternVLPrune_deepprune, InternVLPrune_fastv
from lmms_prune.runner import Runner
from lmms_prune.toy.models import tiny_model_dir


@pytest.mark.parametrize(("cls", "args", "message"), [
    (InternVLPrune_fastv, {"keep_tokens": "10.7"}, r"keep_tokens='10.7': must be an integer"),
    (InternVLPrune_fastv, {"keep_tokens": 10.7}, r"keep_tokens=10.7: must be an integer"),
    (InternVLPrune_fastv, {"keep_ratio": 0.2, "keep_tokens": 10}, r"give exactly one of them"),
    (InternVLPrune_deepprune, {"theta_sim": -1}, r"theta_sim=-1: must be in \[0, 1\]"),
    (InternVLPrune_d2pruner, {"eps": -5, "bias_prior": "p.pt"}, r"eps=-5: must be > 0"),
    (InternVLPrune_fastv, {"prune_layer": 2.5}, r"prune_layer=2.5: must be an integer"),
    (InternVLPrune_fastv, {"bias_prior": "p.pt"}, r"does not use bias_prior; drop it \(it is read by: d2pruner"),
])
def test_value_errors_come_from_parsing_alone(cls, args, message):
    with pytest.raises(ValueError, match=message):
        cls.parse_model_args(**args)


def _no_weights(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights must not load when the configuration is invalid")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)


def test_prune_layer_beyond_the_model_is_refused_from_its_config(monkeypatch):
    _no_weights(monkeypatch)
    with pytest.raises(ValueError, match=r"prune_layer=99: this model has 14 decoder layers"):
        InternVLPrune_fastv(pretrained=str(tiny_model_dir("internvl_llama")), device="cpu", prune_layer=99,
                            on_error="skip")


def test_a_missing_prior_is_refused_before_the_weights_load(monkeypatch, tmp_path):
    _no_weights(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"bias_prior=.*nonexistent.*no such file.*lmms-prune calibrate"):
        InternVLPrune_d2pruner(pretrained=str(tiny_model_dir("internvl_llama")), device="cpu",
                               bias_prior=str(tmp_path / "nonexistent.pt"), on_error="skip")


def test_configuration_checks_run_inside_load_before_from_pretrained(monkeypatch):
    """The runner's own order: config checks, then from_pretrained (on_error=skip never sees them: they raise
    while the model is being built, before any sample)."""
    _no_weights(monkeypatch)
    options, config = InternVLPrune_fastv.parse_model_args(pretrained=str(tiny_model_dir("internvl_llama")),
                                                           prune_layer=14)
    runner = Runner(InternVLPrune_fastv.family_class(), options, config, "internvl_fastv")
    runner.setup_device()
    with pytest.raises(ValueError, match="prune_layer=14"):
        runner.load()
