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


def test_every_architecture_names_a_subclass_of_vllms_own_class():
    """ARCHITECTURES maps vLLM's architecture name to ``module:Class``; the class (read from the source, since
    this venv has no vLLM) derives from vLLM's class of that name, so no family is registered under another's."""
    import ast
    import importlib.util

    from lmms_prune.vllm import ARCHITECTURES

    for arch, target in ARCHITECTURES.items():
        module, name = target.split(":")
        tree = ast.parse(open(importlib.util.find_spec(module).origin, encoding="utf-8").read())
        [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
        assert arch in {b.id for b in cls.bases if isinstance(b, ast.Name)}, (arch, target)
        assert "PrunedQwenVL" in {b.id for b in cls.bases if isinstance(b, ast.Name)}, target


def test_lmms_eval_model_args_reach_vllm_as_the_config():
    """The string lmms-eval's ``vllm`` model receives becomes, after lmms-eval's own parsing (split outside
    braces, then ``json.loads`` of values that start with ``{``), the ``hf_overrides`` and engine arguments we
    asked for, and the plug-in resolves the config from it."""
    import json

    from lmms_eval.utils import simple_parse_args_string

    from lmms_prune.vllm import lmms_eval_model_args

    prune = {"method": "vispruner", "keep_ratio": 0.25, "important_ratio": 0.5}
    text = lmms_eval_model_args("/models/qwen2_5_vl", prune, dtype="float32", max_model_len=2048,
                                limit_mm_per_prompt={"image": 1, "video": 0})
    parsed = simple_parse_args_string(text)
    parsed = {k: json.loads(v) if isinstance(v, str) and v.startswith("{") else v for k, v in parsed.items()}
    assert parsed == {"model": "/models/qwen2_5_vl", "hf_overrides": {CONFIG_KEY: prune}, "dtype": "float32",
                      "max_model_len": 2048, "limit_mm_per_prompt": {"image": 1, "video": 0}}
    assert pruning_config(_hf(parsed["hf_overrides"][CONFIG_KEY])) == resolve_config(
        "vispruner", keep_ratio=0.25, important_ratio=0.5, positions="contiguous")


def test_lmms_eval_model_args_refuse_before_anything_starts():
    from lmms_prune.vllm import lmms_eval_model_args

    with pytest.raises(ValueError, match="method='fastv'"):
        lmms_eval_model_args("m", {"method": "fastv"})
    with pytest.raises(ValueError, match="cannot carry"):
        lmms_eval_model_args("a,b", None)


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, message", [
    (["--presets", "none,fastv"], "'none,fastv': give names out of none, vispruner, divprune, fastervlm"),
    (["--families", "llava"], "'llava': give names out of qwen2_5_vl, qwen2_vl, qwen3_vl"),
    (["--lmms-eval", "cdpruner"], "invalid choice: 'cdpruner'"),
    (["--model"], "usage"),
])
def test_vllm_check_refuses_bad_names_before_anything_runs(tmp_path, args, message):
    """scripts/vllm_check.sh names the bad value and creates no OUT folder (nothing built, no vLLM started)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    done = subprocess.run(["bash", str(REPO / "scripts" / "vllm_check.sh"), str(out), *args], capture_output=True,
                          text=True, env={**__import__("os").environ, "LMMS_PRUNE_MAIN_PYTHON": sys.executable})
    assert done.returncode == 2 and message in done.stderr
    assert not out.exists()


def test_vllm_check_names_an_unserved_checkpoint(tmp_path):
    import json
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "vllm_check.py"), "family", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "model_type 'llava' is not served" in done.stderr
