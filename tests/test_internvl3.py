"""InternVL3 (Qwen2.5 text model) and InternVL3.5 (Qwen3 text model): the ``internvl`` family, one native class.

The engine's equivalence proofs run on both tiny models through the parametrised tests (tests/test_engine.py,
tests/test_presets.py iterate over every toy family); here: the ``save_pretrained`` round trip keeps each
release's text model, the engine's attention row on the Qwen3 text model (q/k RMSNorm before RoPE) equals eager
attention's, the bench geometries, and one lmms-eval command-line run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runs import run_lmms_eval
from PIL import Image
from skimage import data as skdata
from transformers import AutoModelForImageTextToText, AutoProcessor

import lmms_prune
from lmms_prune.bench import geometries
from lmms_prune.families import family_of, get_adapter
from lmms_prune.families.internvl import InternVL

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TEXT_MODELS = {"internvl3": ("Qwen2Config", "Qwen2Model"), "internvl3_5": ("Qwen3Config", "Qwen3Model")}


@pytest.fixture(scope="module", params=list(TEXT_MODELS))
def saved(request):
    from lmms_prune.toy.models import tiny_model_dir

    path = tiny_model_dir(request.param)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return request.param, model, processor


def _inputs(processor, text="Where is the cup?"):
    image = Image.fromarray(skdata.coffee()).resize((600, 300))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[image], text=[prompt], return_tensors="pt", images_kwargs={"max_patches": 2})


def test_reloaded_checkpoint_keeps_its_text_model_and_is_internvl(saved):
    name, model, processor = saved
    config_class, text_class = TEXT_MODELS[name]
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert type(processor).__name__ == "InternVLProcessor"
    assert type(model.config.text_config).__name__ == config_class
    assert type(model.model.language_model).__name__ == text_class
    assert get_adapter(model).name == "internvl" and family_of(name) is InternVL
    if name == "internvl3_5":
        assert hasattr(model.model.language_model.layers[0].self_attn, "q_norm")


def test_attention_row_equals_eager_attention(saved):
    """The observer sees the layer's own normed, rotary-embedded q/k: the score row equals the eager
    attention map's last row (heads averaged), also with Qwen3's q/k RMSNorm."""
    _, model, processor = saved
    inputs = _inputs(processor)
    span = None
    with torch.no_grad(), lmms_prune.apply(model, "fastv", keep_ratio=1.0, prune_layer=3) as handle:
        model(**inputs)
        row = handle.state.attention[2][0]
        span = handle.state.spans[0][0]
    assert span.grids == [(16, 16)] * 3  # 2 tiles + thumbnail
    text_cfg = model.config.text_config
    old = text_cfg._attn_implementation
    text_cfg._attn_implementation = "eager"
    try:
        with torch.no_grad():
            eager = model(**inputs, output_attentions=True).attentions[2][0].mean(0)[-1]
    finally:
        text_cfg._attn_implementation = old
    torch.testing.assert_close(row, eager.float(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("geometry", "config_class", "dims"), [
    ("internvl3-8b", "Qwen2Config", (28, 3584, 28, 4, 128, 18944)),
    ("internvl3_5-8b", "Qwen3Config", (36, 4096, 32, 8, 128, 12288)),
])
def test_bench_geometries(geometry, config_class, dims):
    fam, spec = geometries()[geometry]
    assert fam is InternVL
    cls, config = fam.build_geometry(spec)
    text = config.text_config
    assert cls.__name__ == "InternVLForConditionalGeneration" and type(text).__name__ == config_class
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            head_dim, text.intermediate_size) == dims
    assert config.vision_config.hidden_size == 1024 and config.vision_config.num_hidden_layers == 24


@pytest.mark.cli
def test_cli_internvl_fastv_on_internvl3_runs_with_efficiency_records(tmp_path):
    from lmms_prune.toy.models import tiny_model_dir

    run = run_lmms_eval(tmp_path, "internvl_fastv", f"pretrained={tiny_model_dir('internvl3')},keep_ratio=0.1,max_num=2")
    assert "pope_accuracy,none" in run.metrics["pope_tiny"]
    report = run.efficiency
    assert report["model"] == "internvl_fastv" and report["summary"]["samples"] == 3
    for sample in report["samples"]:
        assert sample["visual_after"] == max(1, round(0.1 * sample["visual_before"]))
        assert sample["visual_before"] % 256 == 0
        assert sample["prefill_flops"] < sample["prefill_flops_unpruned"]
