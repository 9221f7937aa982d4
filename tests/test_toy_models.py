"""The toy VLMs are faithful miniatures: real classes, real token geometry, real Qwen2 token ids, offline."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import skimage.data
import tiktoken
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.image_processing_utils import select_best_resolution

from lmms_prune.families import get_adapter
from lmms_prune.toy import tokenizers as toy_tok
from lmms_prune.toy.models import (
    FAMILIES,
    INTERNVL_TOKENS_PER_TILE,
    LLAVA_IMAGE_TOKENS,
    QWEN_MAX_PIXELS,
    QWEN_MIN_PIXELS,
    build_tiny_model,
    internvl_num_tiles,
    internvl_tile_grid,
    save_tiny_model,
    tiny_config,
    tiny_model_dir,
)

GROUNDING_PROMPT = (
    "Please provide the bounding box coordinate of the region this sentence describes: <ref>the red circle</ref>"
)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def photo_640x480() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut()).resize((640, 480))


@pytest.fixture(scope="session")
def coffee() -> Image.Image:
    return Image.fromarray(skimage.data.coffee())  # 600 x 400


@functools.cache
def _processor(family: str):
    """The processor reloaded from the cached save directory (loaded once per test session)."""
    return AutoProcessor.from_pretrained(tiny_model_dir(family))


@functools.cache
def _model(family: str):
    """The model reloaded from the cached save directory (loaded once per test session; tests do not mutate it)."""
    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir(family)).eval()


@pytest.fixture(scope="session", params=FAMILIES)
def loaded(request):
    """(family, model, processor) reloaded with the Auto classes from ``tiny_model_dir``."""
    return request.param, _model(request.param), _processor(request.param)


def _image_token_id(model) -> int:
    config = model.config
    return config.image_token_index if hasattr(config, "image_token_index") else config.image_token_id


def _chat_inputs(processor, image: Image.Image, text: str = GROUNDING_PROMPT):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[image], text=[prompt], return_tensors="pt")


# ------------------------------------------------------------------------------------------------------------
# Configs and building
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_config_has_the_requested_small_geometry(family):
    config = tiny_config(family, num_layers=14)
    text = config.text_config
    assert text.num_hidden_layers == 14
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (64, 4, 2)
    assert text.intermediate_size == 128
    taps = getattr(config.vision_config, "deepstack_visual_indexes", [])  # Qwen3-VL: 3 tapped layers + the last
    assert config.vision_config.num_hidden_layers <= max(2, len(taps) + 1)
    assert config._attn_implementation == "sdpa"
    assert tiny_config(family, num_layers=3).text_config.num_hidden_layers == 3


def test_qwen_mrope_sections_cover_the_rotary_half_of_a_head():
    text = tiny_config("qwen2_5_vl").text_config
    head_dim = text.hidden_size // text.num_attention_heads
    section = text.rope_parameters["mrope_section"]
    assert len(section) == 3 and sum(section) == head_dim // 2


@pytest.mark.parametrize("bad", ["llava_next_video", "InternVL"])
def test_unknown_family_is_rejected_by_name(bad):
    with pytest.raises(ValueError, match=bad):
        tiny_config(bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic_for_a_seed_and_leaves_global_rng_alone(family):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_tiny_model(family, seed=0, num_layers=2)
    assert torch.equal(torch.rand(1), expected_next)
    second = build_tiny_model(family, seed=0, num_layers=2).state_dict()
    other = build_tiny_model(family, seed=1, num_layers=2).state_dict()
    first = first.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_build_respects_dtype_and_eval_mode():
    model = build_tiny_model("llava", num_layers=2, dtype=torch.bfloat16)
    assert not model.training
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------
# Saved model + processor: reload, generate, visual-token geometry
# ------------------------------------------------------------------------------------------------------------


def test_reloaded_model_generates_from_a_real_photo(loaded, photo_640x480):
    family, model, processor = loaded
    inputs = _chat_inputs(processor, photo_640x480)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape == (1, prompt_len + 3)
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    assert len(model.model.language_model.layers) == 14  # the default depth, so prune layer 12 exists
    if family in ("llava", "llava_next", "internvl_llama"):
        # the toy BPE has exactly as many tokens as embedding rows: every generated id decodes to a token
        assert model.config.text_config.vocab_size == len(processor.tokenizer)
        assert None not in processor.tokenizer.convert_ids_to_tokens(out[0, prompt_len:].tolist())


def test_config_token_ids_agree_with_the_tokenizer(loaded):
    family, model, processor = loaded
    tokenizer = processor.tokenizer
    assert _image_token_id(model) == tokenizer.convert_tokens_to_ids(processor.image_token)
    assert processor.image_token_id == _image_token_id(model)
    assert len(tokenizer) <= model.config.text_config.vocab_size
    eos = model.generation_config.eos_token_id
    eos_tokens = set(tokenizer.convert_ids_to_tokens(eos if isinstance(eos, list) else [eos]))
    end_of_turn = "</s>" if family in ("llava", "llava_next") else "<|im_end|>"
    assert end_of_turn in eos_tokens
    pad = tokenizer.convert_ids_to_tokens(model.generation_config.pad_token_id)
    assert pad == tokenizer.pad_token and pad in tokenizer.all_special_tokens


def test_visual_token_count_matches_the_real_geometry(loaded, photo_640x480, coffee):
    family, model, processor = loaded
    for image in (photo_640x480, coffee):
        inputs = _chat_inputs(processor, image)
        n_image_tokens = int((inputs["input_ids"] == _image_token_id(model)).sum())
        width, height = image.size
        if family.startswith("internvl"):
            tiles = internvl_num_tiles(width, height, max_num=6)
            assert inputs["pixel_values"].shape == (tiles, 3, 448, 448)
            assert n_image_tokens == tiles * INTERNVL_TOKENS_PER_TILE == tiles * 256
        elif family.startswith("qwen"):
            ip = processor.image_processor  # Qwen2/2.5-VL: patch 14 (28 px tokens); Qwen3-VL: patch 16 (32 px)
            patch, side = ip.patch_size, ip.patch_size * ip.merge_size
            assert ip.merge_size == model.config.vision_config.spatial_merge_size
            t, gh, gw = inputs["image_grid_thw"][0].tolist()
            resized_h, resized_w = gh * patch, gw * patch
            assert t == 1 and resized_h % side == 0 and resized_w % side == 0
            low, high = ip.size["shortest_edge"], ip.size["longest_edge"]  # the min/max pixel budget
            assert low <= resized_h * resized_w <= high
            if side == 28:
                assert (low, high) == (QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
            # smart_resize keeps the aspect ratio up to rounding each side to a multiple of the token side
            assert abs(resized_w / resized_h - width / height) < side * (1 / resized_h + 1 / resized_w) * 2
            assert n_image_tokens == (resized_h // side) * (resized_w // side)
        elif family in ("llava_next", "llava_onevision"):
            # anyres: the processor's placeholder count equals the model's own packing of the tiles (base grid,
            # unpadded mosaic, one newline per mosaic row); the pixels are the base image plus the tiles
            tile = model.config.vision_config.image_size
            grid_h, grid_w = select_best_resolution((height, width), model.config.image_grid_pinpoints)
            assert inputs["pixel_values"].shape == (1, 1 + (grid_h // tile) * (grid_w // tile), 3, tile, tile)
            (span,) = get_adapter(model).spans(inputs["input_ids"], inputs)[0]
            (rows, cols), side = span.grids[1], tile // 14
            assert span.grids[0] == (side, side) and len(span.structural) == rows
            assert n_image_tokens == span.length == side * side + rows * (cols + 1)
        else:
            assert inputs["pixel_values"].shape == (1, 3, 336, 336)
            assert n_image_tokens == LLAVA_IMAGE_TOKENS == 576


def test_vision_features_have_one_row_per_placeholder(loaded, photo_640x480):
    family, model, processor = loaded
    inputs = _chat_inputs(processor, photo_640x480)
    kwargs = {k: inputs[k] for k in ("image_grid_thw", "image_sizes") if k in inputs}
    with torch.inference_mode():
        features = model.get_image_features(pixel_values=inputs["pixel_values"], **kwargs)
    features = getattr(features, "pooler_output", features)
    rows = sum(f.reshape(-1, f.shape[-1]).shape[0] for f in features)
    assert rows == int((inputs["input_ids"] == _image_token_id(model)).sum())
    assert all(f.shape[-1] == model.config.text_config.hidden_size for f in features)


def test_qwen_image_tokens_get_3d_mrope_positions(photo_640x480):
    model, processor = _model("qwen2_5_vl"), _processor("qwen2_5_vl")
    inputs = _chat_inputs(processor, photo_640x480)
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    _, gh, gw = (inputs["image_grid_thw"][0] // torch.tensor([1, 2, 2])).tolist()
    image = inputs["input_ids"][0] == model.config.image_token_id
    temporal, rows, cols = (positions[axis, 0, image] for axis in range(3))
    assert temporal.unique().numel() == 1
    assert rows.unique().numel() == gh and cols.unique().numel() == gw


def test_internvl_processor_honours_a_per_call_tile_budget(photo_640x480):
    processor = _processor("internvl_qwen2")
    for max_num in (1, 2, 4, 12):
        out = processor.image_processor(images=[photo_640x480], max_patches=max_num, return_tensors="pt")
        assert int(out["num_patches"][0]) == internvl_num_tiles(640, 480, max_num=max_num)


# ------------------------------------------------------------------------------------------------------------
# InternVL dynamic tiling rule
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "max_num", "grid", "tiles"),
    [
        (448, 448, 6, (1, 1), 1),  # one tile, no thumbnail
        (640, 480, 6, (3, 2), 7),  # 4:3 is closest to 3:2 within 6 tiles
        (896, 896, 6, (2, 2), 5),  # tie 1x1 vs 2x2 -> larger grid, the image covers > half of it
        (500, 500, 6, (1, 1), 1),  # same tie, image too small for 2x2
        (2000, 300, 6, (6, 1), 7),  # wide strip
        (640, 480, 12, (4, 3), 13),  # exact 4:3 grid once 12 tiles are allowed
    ],
)
def test_internvl_tiling_examples(width, height, max_num, grid, tiles):
    assert internvl_tile_grid(width, height, max_num=max_num) == grid
    assert internvl_num_tiles(width, height, max_num=max_num) == tiles


def test_internvl_tiling_rule_matches_the_processor_on_many_shapes():
    processor = _processor("internvl_llama")
    rng = np.random.default_rng(0)
    shapes = [(640, 480), (480, 640), (1000, 200), (200, 1000), (896, 896), (300, 301), (1344, 448), (50, 40)]
    shapes += [tuple(int(v) for v in rng.integers(20, 1500, size=2)) for _ in range(8)]
    for width, height in shapes:
        for max_num in (1, 6, 12):
            expected = internvl_num_tiles(width, height, max_num=max_num)
            got = processor.image_processor.get_number_of_image_patches(height, width, {"max_patches": max_num})
            assert got == expected, (width, height, max_num)


def test_internvl_tiling_rejects_bad_budgets():
    with pytest.raises(ValueError, match="min_num=3, max_num=2"):
        internvl_num_tiles(640, 480, max_num=2, min_num=3)
    with pytest.raises(ValueError, match="0x480"):
        internvl_num_tiles(0, 480)


# ------------------------------------------------------------------------------------------------------------
# Tokenizers and chat templates
# ------------------------------------------------------------------------------------------------------------

QWEN_SAMPLES = [
    "Hello world",
    "Please provide the bounding box coordinate of the region this sentence describes: the red circle",
    "<box>[[12, 345, 678, 901]]</box>",
    "  two leading spaces, trailing tab\t\nnew line\n\n  indented",
    "Don't, can't, WE'LL see. 3.14159 x 10^6",
    "中文分词测试：红色的圆。",
    "émigré café naïve, emoji 🚀🙂",
]


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The Qwen2.5-VL tokenizer as saved and reloaded (built from the shipped ranks by toy.tokenizers)."""
    return _processor("qwen2_5_vl").tokenizer


@pytest.fixture(scope="session")
def qwen_reference() -> tiktoken.Encoding:
    """The reference Qwen2 encoder: tiktoken on the shipped ranks with Qwen's regex."""
    return tiktoken.Encoding(
        "qwen_reference", pat_str=toy_tok.QWEN_PATTERN, mergeable_ranks=toy_tok.load_qwen_ranks(), special_tokens={}
    )


def test_qwen_tokenizer_has_the_real_qwen2_ids(qwen_tokenizer):
    ids = qwen_tokenizer("Hello world, hello!", add_special_tokens=False).input_ids
    assert ids == [9707, 1879, 11, 23811, 0]
    chat = qwen_tokenizer("<|im_start|>user\n", add_special_tokens=False).input_ids
    assert chat == [151644, 872, 198]
    expected = {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<|vision_start|>": 151652, "<|image_pad|>": 151655}
    assert {tok: qwen_tokenizer.convert_tokens_to_ids(tok) for tok in expected} == expected


@pytest.mark.parametrize("text", QWEN_SAMPLES)
def test_qwen_tokenizer_equals_tiktoken_and_round_trips(qwen_tokenizer, qwen_reference, text):
    ids = qwen_tokenizer(text, add_special_tokens=False).input_ids
    assert ids == qwen_reference.encode(text)
    assert qwen_tokenizer.decode(ids) == text


def test_internvl_qwen2_tokenizer_places_internvl_tokens_after_qwen_specials():
    tokenizer = _processor("internvl_qwen2").tokenizer
    assert tokenizer.context_image_token_id == 151667
    assert (tokenizer.start_image_token_id, tokenizer.end_image_token_id) == (151665, 151666)
    ids = tokenizer("<ref>a</ref><box>[[1, 2, 3, 4]]</box>", add_special_tokens=False).input_ids
    assert ids[0] == 151670 and ids[2] == 151671 and ids[3] == 151672 and ids[-1] == 151673


def test_recover_merge_finds_the_rank_ordered_split():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5, b"cab": 6}
    assert toy_tok.recover_merge(b"abc", ranks) == (b"ab", b"c")  # "ab" ranks before "bc"
    assert toy_tok.recover_merge(b"cab", ranks) == (b"c", b"ab")


def test_llama_bpe_training_is_deterministic():
    first = toy_tok.llama_bpe_backend.__wrapped__().to_str()
    assert first == toy_tok.llama_bpe_backend.__wrapped__().to_str()


def test_llama_bpe_tokenizes_grounding_text_sensibly():
    tokenizer = toy_tok.build_tokenizer("llava")
    ids = tokenizer(GROUNDING_PROMPT).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<s>"
    for word in ("bounding", "coordinate", "describes", "circle"):
        assert "\u0120" + word in tokens  # whole words, with the byte-level space marker
    assert "<ref>" in tokens and "</ref>" in tokens
    box = "<box>[[12, 345, 678, 901]]</box>"
    box_tokens = tokenizer.convert_ids_to_tokens(tokenizer(box, add_special_tokens=False).input_ids)
    assert box_tokens[0] == "<box>" and box_tokens[-1] == "</box>"
    assert [t for t in box_tokens if t.isdigit()] == list("12345678901")  # digits one by one
    for text in (GROUNDING_PROMPT, box, "Count: 0 1 2 ... 1000!"):
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_chat_templates_follow_each_model_format():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompts = {}
    for family in FAMILIES:
        processor = _processor(family)
        prompts[family] = processor.apply_chat_template(messages, add_generation_prompt=True)
    internvl = "<|im_start|>user\n<IMG_CONTEXT>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    assert prompts["internvl_llama"] == prompts["internvl_qwen2"] == internvl
    assert prompts["qwen2_5_vl"] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompts["llava"] == "USER: <image>\nWhat is it? ASSISTANT:"


def test_optional_system_turn_and_multi_turn_formats():
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}
    internvl = _processor("internvl_qwen2")
    assert internvl.apply_chat_template([system, user]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    llava = _processor("llava")
    assert llava.apply_chat_template([system, user, answer, user], add_generation_prompt=True) == (
        "Be brief. USER: Hi ASSISTANT: Hello</s>USER: Hi ASSISTANT:"
    )


# ------------------------------------------------------------------------------------------------------------
# Cache directory
# ------------------------------------------------------------------------------------------------------------


def test_tiny_model_dir_builds_once_and_leaves_no_staging(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_PRUNE_CACHE", str(tmp_path))
    path = tiny_model_dir("llava", seed=3)
    assert path.parent == tmp_path / "toy"
    stamp = (path / "config.json").stat().st_mtime_ns
    assert tiny_model_dir("llava", seed=3) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "toy").iterdir()] == [path.name]
    assert tiny_model_dir("llava", seed=4) != path


def test_save_tiny_model_writes_weights_that_reload_exactly(tmp_path):
    out = save_tiny_model("internvl_llama", tmp_path / "m", seed=5, num_layers=3)
    reloaded = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    built = build_tiny_model("internvl_llama", seed=5, num_layers=3).state_dict()
    assert reloaded.keys() == built.keys()
    assert all(torch.equal(reloaded[k], built[k]) for k in built)
    assert reloaded["model.language_model.layers.2.mlp.up_proj.weight"].shape == (128, 64)
    assert "model.language_model.layers.3.mlp.up_proj.weight" not in reloaded
