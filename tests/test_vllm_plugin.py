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
    budget), with contiguous positions; random and uniform, whose presets run inside the LLM, with the
    stage=pre_llm the user names."""
    stage = {"stage": "pre_llm"} if method in ("random", "uniform") else {}
    cfg = pruning_config(_hf({"method": method, "keep_ratio": 0.25, **stage}))
    assert cfg == resolve_config(method, keep_ratio=0.25, positions="contiguous", **stage)
    assert cfg.stage == "pre_llm"


def test_every_preset_is_served_or_refused_with_a_fix():
    """Each of our presets, asked for with its defaults, either resolves (the served ones) or raises a ValueError
    that names the method or its stage and says what to use instead: nothing falls through to a vague error."""
    from lmms_prune.methods import PRESETS as ALL

    for method in ALL:
        if method in PRESETS and method not in ("random", "uniform"):
            assert pruning_config(_hf({"method": method})).stage == "pre_llm"
            continue
        with pytest.raises(ValueError) as err:
            pruning_config(_hf({"method": method}))
        text = str(err.value)
        assert (f"method={method!r}" in text or f"{method} runs inside the LLM" in text), text
        assert "use " in text or "pass " in text or "serve the model without" in text, text


@pytest.mark.parametrize("value, message", [
    ("divprune", "must be a dict"),
    ({"keep_ratio": 0.25}, "method=None"),
    ({"method": "fastv"}, "per-layer sequence lengths"),
    ({"method": "cdpruner"}, "encoder cache"),
    ({"method": "random"}, "pass stage='pre_llm'"),
    ({"method": "uniform", "stage": "llm"}, "pass stage='pre_llm'"),
    ({"method": "prumerge_plus", "prumerge_budget": "adaptive"}, "placeholder count .* pass prumerge_budget='fixed'"),
    ({"method": "mustdrop"}, "count follows the image's content"),
    ({"method": "vscan"}, "second stage \\(topk\\) prunes inside the LLM"),
    ({"method": "evs"}, "prunes videos only"),
    ({"method": "none"}, "without hf_overrides"),
    ({"method": "nonesuch"}, "unknown; the vLLM plug-in serves"),
    ({"method": "visionzip", "positions": "original"}, "merged tokens have no original position"),
    ({"method": "divprune", "positions": "sideways"}, "must be one of"),
    ({"method": "divprune", "keep_ratio": 1.5}, "keep_ratio=1.5"),
    ({"method": "divprune", "important_ratio": 0.5}, "does not use important_ratio"),
])
def test_bad_configs_name_the_value_and_the_fix(value, message):
    with pytest.raises(ValueError, match=message):
        pruning_config(_hf(value))


@pytest.mark.parametrize("positions", ["original", "gap"])
def test_original_positions_resolve_as_our_engine_does(positions):
    """positions='original' (and its other name 'gap') is the config lmms_prune.apply builds; where it is served
    is the family's question (family_refusal)."""
    cfg = pruning_config(_hf({"method": "divprune", "keep_ratio": 0.25, "positions": positions}))
    assert cfg == resolve_config("divprune", keep_ratio=0.25, positions=positions)


def test_original_positions_are_served_on_every_family_with_the_m_rope_declaration_where_rope_is_1d():
    """GAP's rule needs the positions set after selection, which vLLM asks M-RoPE models for: the Qwen families
    are served as they are; a 1-D RoPE family gets its text config's rope parameters plus an mrope_section that
    puts every rotary frequency in the first row (all three rows then hold the 1-D position: the same rotation);
    contiguous positions and unpruned runs need nothing."""
    from lmms_prune.families import FAMILIES
    from lmms_prune.toy.models import tiny_config
    from lmms_prune.vllm import MROPE_FAMILIES, family_refusal, mrope_override, served_overrides

    original = resolve_config("vispruner", keep_ratio=0.25, positions="original")
    prune = {"method": "vispruner", "keep_ratio": 0.25, "positions": "original"}
    assert set(MROPE_FAMILIES) < set(FAMILIES)
    for family in FAMILIES:
        assert family_refusal(family, original) is None
        config = tiny_config("internvl_qwen2" if family == "internvl" else family, num_layers=2)
        assert served_overrides(family, None, config) == {}
        assert served_overrides(family, {**prune, "positions": "contiguous"}, config) == {
            CONFIG_KEY: {**prune, "positions": "contiguous"}}
        overrides = served_overrides(family, prune, config)
        if family in MROPE_FAMILIES:
            assert overrides == {CONFIG_KEY: prune}, family
            continue
        assert overrides == {CONFIG_KEY: prune, **mrope_override(config)}, family
        text = config.get_text_config()
        params = overrides["text_config"]["rope_parameters"]
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        assert params["mrope_section"] == [head_dim // 2, 0, 0], family
        assert {k: v for k, v in params.items() if k != "mrope_section"} == dict(text.rope_parameters), family


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
        # vLLM 0.32's registry serves transformers-format InternVL with its InternS1 class
        vllm_class = {"InternVLForConditionalGeneration": "InternS1ForConditionalGeneration"}.get(arch, arch)
        assert vllm_class in {b.id for b in cls.bases if isinstance(b, ast.Name)}, (arch, target)
        # the shared part first (its methods override vLLM's): the Qwen mixin, or the base mixin itself
        assert cls.bases[0].id in {"PrunedQwenVL", "PrunedModel"}, target


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


def test_lmms_eval_model_args_declare_m_rope_for_original_positions_on_a_1d_model(tmp_path):
    """With positions='original' the checkpoint's config is read: a 1-D RoPE model (LLaVA) gets the M-RoPE
    declaration in hf_overrides, as the plug-in's error asks, and it survives lmms-eval's parsing; a Qwen model
    needs none."""
    import json

    from lmms_eval.utils import simple_parse_args_string

    from lmms_prune.toy.models import tiny_config
    from lmms_prune.vllm import lmms_eval_model_args, mrope_override

    prune = {"method": "divprune", "keep_ratio": 0.25, "positions": "original"}
    for family in ("llava", "qwen2_5_vl"):
        config = tiny_config(family, num_layers=2)
        config.save_pretrained(tmp_path / family)
        parsed = simple_parse_args_string(lmms_eval_model_args(str(tmp_path / family), prune))
        overrides = json.loads(parsed["hf_overrides"])
        expected = {CONFIG_KEY: prune} | ({} if family == "qwen2_5_vl" else mrope_override(config))
        assert overrides == json.loads(json.dumps(expected)), family


def test_lmms_eval_model_args_refuse_before_anything_starts():
    from lmms_prune.vllm import lmms_eval_model_args

    with pytest.raises(ValueError, match="method='fastv'"):
        lmms_eval_model_args("m", {"method": "fastv"})
    with pytest.raises(ValueError, match="cannot carry"):
        lmms_eval_model_args("a,b", None)


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, message", [
    (["--presets", "none,fastv"], "'none,fastv': give names out of none, vispruner, divprune, fastervlm, visionzip"),
    (["--families", "paligemma"], "'paligemma': give names out of qwen2_5_vl, qwen2_vl, qwen3_vl, llava"),
    (["--lmms-eval", "cdpruner"], "invalid choice: 'cdpruner'"),
    (["--vlmeval", "fastv"], "invalid choice: 'fastv'"),
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

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "vllm_check.py"), "family", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "model_type 'paligemma' is not served" in done.stderr


# ---------------------------------------------------------------- backend=vllm of our own runner (lmms-eval models)
def _parse(tmp_path, family="qwen2_5_vl", method="divprune", **args):
    from lmms_prune.families import family_class
    from lmms_prune.runner import parse_options

    return parse_options(family_class(family), f"{family}_{method}", method, pretrained=str(tmp_path), **args)


def test_backend_vllm_carries_the_config_the_transformers_backend_would_run(tmp_path):
    """The run's ``hf_overrides['lmms_prune']`` value has the typed parameters, and the plug-in resolves it to the
    very config the transformers backend runs; engine arguments arrive as a dict."""
    options, config = _parse(tmp_path, method="vispruner", backend="vllm", keep_ratio="0.25", important_ratio="0.5",
                             vllm_engine_args='{"max_model_len":2048,"enforce_eager":true}')
    assert options.backend == "vllm"
    assert options.vllm_prune == {"method": "vispruner", "keep_ratio": 0.25, "important_ratio": 0.5}
    assert options.vllm_engine_args == {"max_model_len": 2048, "enforce_eager": True}
    assert pruning_config(_hf(options.vllm_prune)) == config
    options, config = _parse(tmp_path, family="llava", method="uniform", backend="vllm", keep_ratio="0.25",
                             stage="pre_llm")
    assert options.vllm_prune["stage"] == "pre_llm" and pruning_config(_hf(options.vllm_prune)) == config
    options, config = _parse(tmp_path, family="qwen3_vl", method="divprune", backend="vllm", keep_ratio="0.25",
                             positions="original")
    assert options.vllm_prune["positions"] == "original" and pruning_config(_hf(options.vllm_prune)) == config
    options, config = _parse(tmp_path, family="llava", method="vispruner", backend="vllm", keep_ratio="0.25",
                             positions="original")
    assert options.vllm_prune["positions"] == "original" and pruning_config(_hf(options.vllm_prune)) == config
    options, _ = _parse(tmp_path, family="llava", method="none", backend="vllm")
    assert options.vllm_prune is None  # unpruned: served without the key
    options, _ = _parse(tmp_path, keep_ratio="0.25")
    assert options.backend == "transformers" and options.vllm_prune is None


@pytest.mark.parametrize("family, method, args, message", [
    ("qwen2_5_vl", "fastv", {}, "per-layer sequence lengths"),
    ("qwen3_vl", "visionzip", {}, "qwen3_vl is not served with visionzip"),
    ("qwen3_vl", "prumerge_plus", {}, "qwen3_vl is not served with prumerge_plus"),
    ("llava_next", "visionzip", {}, "llava_next is not served with visionzip: it merges tokens, but LLaVA-NeXT's"),
    ("llava_onevision", "prumerge_plus", {}, "llava_onevision is not served with prumerge_plus: it merges tokens"),
    ("llava", "uniform", {}, "pass stage='pre_llm'"),
    ("qwen2_5_vl", "visionzip", {"positions": "original"}, "merged tokens have no original position"),
    ("llava", "divprune", {"use_cache": "false"}, "use_cache=false with backend=vllm"),
    ("llava", "divprune", {"device_map": "auto"}, "device_map='auto' with backend=vllm"),
    ("llava", "divprune", {"vllm_engine_args": '{"dtype":"half"}'}, "sets dtype, which backend=vllm sets from dtype"),
    ("llava", "divprune", {"vllm_engine_args": "{max_model_len: 4}"}, "not JSON"),
    ("llava", "divprune", {"vllm_engine_args": "[1]"}, "must be a JSON object"),
    ("llava", "divprune", {"backend": "sglang"}, "backend='sglang'"),
])
def test_backend_vllm_refusals_name_the_value_before_anything_loads(tmp_path, family, method, args, message):
    args = {"backend": "vllm", **args}
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        _parse(tmp_path, family=family, method=method, keep_ratio="0.25", **args)


def test_every_family_is_served_and_another_name_is_refused():
    """All our families have a vLLM architecture (backend=vllm); a name that is none of them is refused with the
    list, before anything loads."""
    from lmms_prune.families import FAMILIES
    from lmms_prune.vllm import FAMILY_ARCHITECTURES, backend_options

    assert set(FAMILY_ARCHITECTURES) == set(FAMILIES)
    with pytest.raises(ValueError, match="serves the families qwen2_vl, .*llava_onevision, internvl, not gemma3"):
        backend_options("gemma3", "divprune", {}, None, SimpleNamespace(device_map=None, use_cache=True))


def test_vllm_engine_args_need_backend_vllm(tmp_path):
    with pytest.raises(ValueError, match="vllm_engine_args is for backend=vllm"):
        _parse(tmp_path, keep_ratio="0.25", vllm_engine_args="{}")


def test_the_transformers_backend_never_imports_vllm(tmp_path):
    """make_runner picks the transformers runner without touching vLLM (this venv has none)."""
    from lmms_prune.families import family_class
    from lmms_prune.runner import Runner, make_runner

    options, config = _parse(tmp_path, keep_ratio="0.25")
    runner = make_runner(family_class("qwen2_5_vl"), options, config, "qwen2_5_vl_divprune")
    assert type(runner) is Runner
    assert __import__("importlib").util.find_spec("vllm") is None
