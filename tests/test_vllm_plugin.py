"""The vLLM plug-in's configuration (lmms_prune.vllm), in the main environment, which has no vLLM: importing it
here is itself the check that lmms_prune never needs vLLM. The served path is proven against our transformers
engine by scripts/vllm_check.sh (docs/serving.md), which needs the vLLM environment."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lmms_prune.presets import resolve_config
from lmms_prune.vllm import CONFIG_KEY, PRESETS, REFUSED, pruning_config


def _hf(value) -> SimpleNamespace:
    return SimpleNamespace(**({} if value is None else {CONFIG_KEY: value}))


def test_no_key_means_unpruned():
    assert pruning_config(_hf(None)) is None


@pytest.mark.parametrize("method", PRESETS)
def test_served_presets_resolve_as_our_engine_does(method):
    """The plug-in's config is the one lmms_prune.apply builds from the same arguments (same selector, score,
    budget), with contiguous positions."""
    cfg = pruning_config(_hf({"method": method, "keep_ratio": 0.25}))
    assert cfg == resolve_config(method, keep_ratio=0.25, positions="contiguous")
    assert cfg.stage == "pre_llm"


@pytest.mark.parametrize("value, message", [
    ("divprune", "must be a dict"),
    ({"keep_ratio": 0.25}, "method=None"),
    ({"method": "fastv"}, "per-layer sequence lengths"),
    ({"method": "cdpruner"}, "encoder cache"),
    ({"method": "divprune", "positions": "original"}, "recompute_mrope_positions"),
    ({"method": "divprune", "positions": "sideways"}, "must be one of"),
    ({"method": "divprune", "keep_ratio": 1.5}, "keep_ratio=1.5"),
    ({"method": "divprune", "important_ratio": 0.5}, "does not use important_ratio"),
])
def test_bad_configs_name_the_value_and_the_fix(value, message):
    with pytest.raises(ValueError, match=message):
        pruning_config(_hf(value))


def test_every_refused_preset_is_a_known_preset_with_a_reason():
    from lmms_prune.methods import PRESETS as ALL

    assert set(REFUSED) <= set(ALL) and set(REFUSED).isdisjoint(PRESETS)
    assert all(len(reason) > 40 for reason in REFUSED.values())
