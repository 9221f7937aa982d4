"""Grounding answers in each family's own box convention, read with the run's real input geometry (box frames).

Pure parse functions per convention (round trips, swapped corners, clamping, malformed answers), the families'
frames from real processor outputs (Qwen2.5-VL under a non-default ``max_pixels``, LLaVA pad/crop), the task's
per-family prompt and fallback, and one lmms-eval CLI run of a tiny Qwen2.5-VL on ``refcoco_ground_val``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lmms_prune.families import family_class
from lmms_prune.families.llava import crop_region
from lmms_prune.tasks import takeover
from lmms_prune.tasks.refcoco import data, parsing, utils
from lmms_prune.tasks.refcoco.parsing import box_iou, parse_box, parse_box_in_frame, smart_resize

TEMPLATE = Path(parsing.__file__).with_name("_refcoco_ground_template.yaml")


@pytest.fixture(autouse=True)
def _clean_registries(monkeypatch):
    """Each test starts with no recorded frames and no run model (process-level state of the task module)."""
    monkeypatch.setattr(utils, "_BOX_FRAMES", {})
    monkeypatch.setattr(utils, "_RUN", {"model": None})


def _fmt(values) -> str:
    return ", ".join(repr(float(v)) for v in values)


# a box strictly inside the image: (fx1, fy1) top-left and (fx2, fy2) bottom-right as fractions of the image
sizes = st.tuples(st.integers(64, 2000), st.integers(64, 2000))
fractions = st.tuples(st.floats(0.0, 0.45), st.floats(0.0, 0.45), st.floats(0.55, 1.0), st.floats(0.55, 1.0))


def _truth(size, frac):
    (w, h), (a, b, c, d) = size, frac
    return (a * w, b * h, c * w, d * h)


# ---------------------------------------------------------------------------------------------------------
# pure parse functions, one per convention


@settings(max_examples=60, deadline=None)
@given(size=sizes, frac=fractions, qwen3=st.booleans())
def test_grid1000_round_trip(size, frac, qwen3):
    w, h = size
    box = _truth(size, frac)
    values = [box[0] / w * 1000, box[1] / h * 1000, box[2] / w * 1000, box[3] / h * 1000]
    text = (f'```json\n[{{"bbox_2d": [{_fmt(values)}], "label": "x"}}]\n```' if qwen3
            else f"<ref>x</ref><box>[[{_fmt(values)}]]</box>")
    frame = {"convention": "grid1000", "width": w, "height": h}
    assert parse_box_in_frame(text, frame) == pytest.approx(box, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(size=sizes, frac=fractions, max_tokens=st.integers(4, 400))
def test_resized_pixels_round_trip_under_any_max_pixels(size, frac, max_tokens):
    w, h = size
    max_pixels = max_tokens * 28 * 28
    try:
        rh, rw = smart_resize(h, w, min_pixels=min(3136, max_pixels), max_pixels=max_pixels)
    except ValueError:  # an aspect ratio Qwen refuses
        return
    box = _truth(size, frac)
    values = [box[0] * rw / w, box[1] * rh / h, box[2] * rw / w, box[3] * rh / h]
    frame = {"convention": "resized_pixels", "width": w, "height": h, "resized_width": rw, "resized_height": rh}
    assert parse_box_in_frame(f'[{{"bbox_2d": [{_fmt(values)}]}}]', frame) == pytest.approx(box, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(size=sizes, frac=fractions)
def test_unit_padded_square_round_trip(size, frac):
    w, h = size
    box = _truth(size, frac)
    side = max(w, h)
    dx, dy = (side - w) // 2, (side - h) // 2  # expand2square's paste offsets
    values = [(box[0] + dx) / side, (box[1] + dy) / side, (box[2] + dx) / side, (box[3] + dy) / side]
    frame = {"convention": "unit_padded_square", "width": w, "height": h}
    assert parse_box_in_frame(f"[{_fmt(values)}]", frame) == pytest.approx(box, abs=1e-6)
    # the padded square is a region like any other: the two conventions agree
    region = {"convention": "unit_region", "width": w, "height": h, "region": [-dx, -dy, side - dx, side - dy]}
    assert parse_box_in_frame(f"[{_fmt(values)}]", region) == pytest.approx(box, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(size=sizes, frac=st.tuples(st.floats(0.05, 0.45), st.floats(0.05, 0.45), st.floats(0.55, 0.95),
                                  st.floats(0.55, 0.95)))
def test_unit_region_round_trip_through_llavas_centre_crop(size, frac):
    w, h = size
    x1, y1, x2, y2 = crop_region((w, h), None)  # LLaVA-1.5's processor defaults: 336 px shortest edge, crop
    a, b, c, d = frac
    box = (x1 + a * (x2 - x1), y1 + b * (y2 - y1), x1 + c * (x2 - x1), y1 + d * (y2 - y1))
    frame = {"convention": "unit_region", "width": w, "height": h, "region": [x1, y1, x2, y2]}
    expected = parsing.clamp_box(box, w, h)
    assert parse_box_in_frame(f"[{_fmt(frac)}]", frame) == pytest.approx(expected, abs=1e-6)


FRAMES = {
    "grid1000": ({"convention": "grid1000", "width": 640, "height": 480}, 1000.0),
    "resized": ({"convention": "resized_pixels", "width": 640, "height": 480, "resized_width": 320,
                 "resized_height": 240}, 320.0),
    "padded": ({"convention": "unit_padded_square", "width": 640, "height": 480}, 1.0),
}


@pytest.mark.parametrize("name", list(FRAMES))
def test_swapped_corners_and_clamping_in_every_convention(name):
    frame, scale = FRAMES[name]
    good = parse_box_in_frame(f"[[{_fmt([0.1 * scale, 0.2 * scale, 0.6 * scale, 0.7 * scale])}]]", frame)
    swapped = parse_box_in_frame(f"[[{_fmt([0.6 * scale, 0.7 * scale, 0.1 * scale, 0.2 * scale])}]]", frame)
    assert swapped == pytest.approx(good)
    wild = parse_box_in_frame(f"[[{_fmt([-0.5 * scale, -0.5 * scale, 2 * scale, 2 * scale])}]]", frame)
    assert wild == (0.0, 0.0, 640.0, 480.0)


@pytest.mark.parametrize("answer", ["", "no box", None, 3, "[[1, 2, 3]]", '{"bbox_2d": [1, 2, 3]}',
                                    '{"bbox_2d": [1, 2, x, 4]} [[1, 2, 3, 4]]', "[[1e999, 0, 1, 1]]"])
@pytest.mark.parametrize("name", list(FRAMES))
def test_malformed_answers_are_none_and_counted_unparseable(name, answer):
    frame, _ = FRAMES[name]
    assert parse_box_in_frame(answer, frame) is None
    doc = {"sample_id": "q/0", "box": [0.0, 0.0, 10.0, 10.0], "width": 640, "height": 480}
    utils.record_box_frame(doc, frame)
    record = utils.process_results(doc, [answer])["unparseable"]
    assert record["iou"] == 0.0 and not record["parsed"] and record["box_frame"] == frame
    assert utils.unparseable_count([record]) == 1


def test_qwen2_vl_point_pair_answers_are_read():
    frame = {"convention": "grid1000", "width": 640, "height": 480}
    assert parse_box_in_frame("(100,200),(500,800)", frame) == pytest.approx((64.0, 96.0, 320.0, 384.0))


@pytest.mark.parametrize("frame, message", [
    ({"width": 1, "height": 1}, "needs a convention"),
    ({"convention": "resized_pixels", "width": 10, "height": 10}, "needs resized_height, resized_width"),
    ({"convention": "unit_region", "width": 10, "height": 10}, "needs region"),
    ({"convention": "grid1000", "width": 0, "height": 10}, "must be positive"),
])
def test_bad_frames_are_refused_with_what_is_missing(frame, message):
    with pytest.raises(ValueError, match=message):
        parse_box_in_frame("[[1, 2, 3, 4]]", frame)


# ---------------------------------------------------------------------------------------------------------
# scoring with a recorded frame (the fix of issue 17's "Qwen box mapping")

W, H, MAX_PIXELS = 640, 480, 64 * 28 * 28  # below the image's 307200 pixels
TRUTH = (64.0, 96.0, 320.0, 384.0)


def test_process_results_scores_a_bbox_2d_answer_in_the_recorded_resize():
    rh, rw = smart_resize(H, W, min_pixels=3136, max_pixels=MAX_PIXELS)
    assert (rw, rh) != smart_resize(H, W)[::-1]  # the run's resize is not the default one
    frame = {"convention": "resized_pixels", "width": W, "height": H, "resized_width": rw, "resized_height": rh}
    encoded = [TRUTH[0] * rw / W, TRUTH[1] * rh / H, TRUTH[2] * rw / W, TRUTH[3] * rh / H]
    answer = f'```json\n[{{"bbox_2d": [{_fmt(encoded)}], "label": "the dog"}}]\n```'
    doc = {"sample_id": "q/0", "box": list(TRUTH), "width": W, "height": H}
    # without the frame the default resize mis-maps the box (today's behaviour before frames)
    assert box_iou(parse_box(answer, W, H), TRUTH) < 0.5
    utils.record_box_frame(doc, frame)
    record = utils.process_results(doc, [answer])["acc@0.5"]
    assert record["iou"] == pytest.approx(1.0) and record["parsed"] and record["box_frame"] == frame
    # another sample (id or size) is not read with it
    other = utils.process_results({**doc, "sample_id": "q/1"}, [answer])["acc@0.5"]
    assert other["iou"] < 0.5 and "box_frame" not in other


def test_fallback_frame_from_the_run_model_family():
    doc = {"sample_id": "q/0", "box": list(TRUTH), "width": W, "height": H}
    qwen3 = '[{"bbox_2d": [100, 200, 500, 800], "label": "the dog"}]'  # 0-1000 of the image
    utils._RUN["model"] = None  # unknown model: text detection reads bbox_2d as Qwen2.5-VL pixels
    assert utils.process_results(doc, [qwen3])["acc@0.5"]["iou"] < 0.5
    for model in ("qwen3_vl", "qwen3_vl_fastv", "qwen2_vl_prune"):
        utils._RUN["model"] = model
        assert utils.process_results(doc, [qwen3])["acc@0.5"]["iou"] == pytest.approx(1.0)
    utils._RUN["model"] = "llava_hf"  # transformers' processor: 0-1 of the centre crop
    x1, y1, x2, y2 = crop_region((W, H), None)
    frac = [(TRUTH[0] - x1) / (x2 - x1), (TRUTH[1] - y1) / (y2 - y1), (TRUTH[2] - x1) / (x2 - x1),
            (TRUTH[3] - y1) / (y2 - y1)]
    assert utils.process_results(doc, [f"[{_fmt(frac)}]"])["acc@0.5"]["iou"] == pytest.approx(1.0)
    utils._RUN["model"] = "qwen2_5_vl"  # lmms-eval's own wrapper: its default pixel limits
    rh, rw = smart_resize(H, W, min_pixels=parsing.FALLBACK_MIN_PIXELS, max_pixels=parsing.FALLBACK_MAX_PIXELS)
    pixels = f'{{"bbox_2d": [{_fmt([TRUTH[0] * rw / W, TRUTH[1] * rh / H, TRUTH[2] * rw / W, TRUTH[3] * rh / H])}]}}'
    assert utils.process_results(doc, [pixels])["acc@0.5"]["iou"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# the families' frames, from real processor outputs


def _toy_processor(family):
    from lmms_prune.toy.models import build_processor

    return build_processor(family)


def _process(family, options, size):
    fam = family_class(family)
    processor = _toy_processor(family)
    image = Image.new("RGB", size, (90, 120, 30))
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                             "text": "x"}]}], tokenize=False, add_generation_prompt=True)
    images = fam.prepare_images([image], options)
    inputs = processor(text=[prompt], images=images, return_tensors="pt", **fam.processor_kwargs(options))
    return fam.box_frame(size, inputs, 0, options, processor)


def test_qwen2_5_vl_frame_is_the_processors_real_resize_under_a_small_max_pixels():
    fam = family_class("qwen2_5_vl")
    options = fam.parse_model_args({"max_pixels": MAX_PIXELS})
    frame = _process("qwen2_5_vl", options, (W, H))
    rh, rw = smart_resize(H, W, min_pixels=options["min_pixels"], max_pixels=MAX_PIXELS)
    assert frame == {"convention": "resized_pixels", "width": W, "height": H, "resized_width": rw,
                     "resized_height": rh}
    assert rw * rh <= MAX_PIXELS < W * H


def test_qwen3_vl_frame_is_the_relative_grid():
    fam = family_class("qwen3_vl")
    frame = _process("qwen3_vl", fam.parse_model_args({}), (W, H))
    assert frame["convention"] == "grid1000" and (frame["width"], frame["height"]) == (W, H)
    assert frame["resized_width"] % 32 == 0 and frame["resized_height"] % 32 == 0  # patch 16, for information
    assert fam.box_frame((W, H), None, 0, {}) == {"convention": "grid1000", "width": W, "height": H}


def test_llava_frames_follow_image_aspect_ratio():
    fam = family_class("llava")
    processor = _toy_processor("llava")
    assert fam.box_frame((W, H), None, 0, {}, processor) == {"convention": "unit_padded_square", "width": W,
                                                             "height": H}  # pad when the option is absent
    crop = fam.box_frame((W, H), None, 0, {"image_aspect_ratio": "crop"}, processor)
    assert crop == {"convention": "unit_region", "width": W, "height": H,
                    "region": pytest.approx(list(crop_region((W, H), processor)))}
    assert crop["region"][0] > 0 and crop["region"][2] < W  # the crop cuts the sides of a landscape image
    with pytest.raises(ValueError, match="image_aspect_ratio='squash': must be pad or crop"):
        fam.box_frame((W, H), None, 0, {"image_aspect_ratio": "squash"}, processor)
    for name in ("llava_next", "llava_onevision"):
        assert family_class(name).box_frame((W, H), None, 0, {"image_aspect_ratio": "crop"})["convention"] \
            == "unit_padded_square"
    assert family_class("internvl").box_frame((W, H), None, 0, {}) == {"convention": "grid1000", "width": W,
                                                                       "height": H}


def test_qwen2_5_vl_resized_frame_needs_the_grid():
    with pytest.raises(ValueError, match="needs the processor's image_grid_thw"):
        family_class("qwen2_5_vl").box_frame((W, H), None, 0, {})


# ---------------------------------------------------------------------------------------------------------
# the family's prompt


def _entries():
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return yaml.load(TEMPLATE.read_text(), Loader=Loader)["lmms_eval_specific_kwargs"]


@pytest.mark.parametrize("model, starts", [
    ("internvl_deepprune", "Please provide the bounding box coordinate of the region this sentence describes: "
                           "<ref>the dog</ref>"),
    ("internvl_hf", "Please provide the bounding box coordinate of the region this sentence describes: <ref>"),
    ("grounding_oracle", "Please provide the bounding box coordinate of the region this sentence describes: <ref>"),
    ("qwen2_5_vl_fastv", "Locate the dog, output its bbox coordinates using JSON format."),
    ("qwen2_5_vl", "Locate the dog, output its bbox coordinates using JSON format."),
    ("qwen3_vl_prune", "Locate the dog, output its bbox coordinates using JSON format."),
    ("qwen2_vl_prune", "Find <|object_ref_start|>the dog<|object_ref_end|>"),
    ("llava_fastv", "Please provide the bounding box coordinate of the region this sentence describes: the dog"),
    ("llava_hf", "Please provide the bounding box coordinate of the region this sentence describes: the dog"),
    ("llava_next_vispruner", "Please provide the bounding box coordinate of the region this sentence describes: the"),
    ("llava_onevision_prune", "Please provide the bounding box coordinate of the region this sentence describes: t"),
])
def test_each_family_gets_its_own_prompt(model, starts):
    kwargs = utils.specific_kwargs(_entries(), model)
    assert utils.doc_to_text({"expression": "the dog"}, kwargs).startswith(starts)


def test_internvl_prompt_is_the_protocols():
    assert utils.specific_kwargs(_entries(), "internvl_prune")["prompt"].format(expression="e") == \
        utils.PROMPT.format(expression="e")
    assert utils.doc_to_text({"expression": "e"}, None) == utils.PROMPT.format(expression="e")


@pytest.mark.parametrize("model, prompt, source", [
    ("qwen2_5_vl_fastv", "Locate {expression}, output its bbox coordinates using JSON format.", "wrapper"),
    ("qwen3_vl", "Locate {expression}, output its bbox coordinates using JSON format.", "command line"),
    ("internvl_deepprune", utils.PROMPT, "wrapper"),
])
def test_the_task_built_for_a_model_asks_in_its_familys_prompt(tmp_path, monkeypatch, model, prompt, source):
    import lmms_eval.tasks  # noqa: F401  (lmms-eval's task package first, as its CLI does)
    from lmms_eval.tasks import TaskManager

    from lmms_prune.toy.data import write_refcoco_hub_layout

    root = tmp_path / "hub"
    write_refcoco_hub_layout(root / data.FAMILIES["refcoco"].local_name, 1, 0, splits=("val",), width=320,
                             height=240)
    monkeypatch.setenv(data.LOCAL_DIR_ENV, str(root))
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    for name in (data.JSONL_DIR_ENV, takeover.TAKEOVER_ENV):
        monkeypatch.delenv(name, raising=False)
    # lmms-eval builds tasks that name a class without the model name: our wrappers register theirs, and
    # lmms-eval's own wrappers are found on the command line
    if source == "wrapper":
        utils.register_run_model(model)
    else:
        monkeypatch.setattr(sys, "argv", ["lmms_eval", "--model", model, "--tasks", "refcoco_ground_val"])
    manager = TaskManager("WARNING", include_path=[str(takeover.TASKS_DIR)], include_defaults=False,
                          model_name=model)
    task = manager.load_task_or_group(["refcoco_ground_val"], task_type="chat")["refcoco_ground_val"]
    doc = task.test_docs()[0]
    [turn] = task.doc_to_messages(doc)
    assert turn["content"][1] == {"type": "text", "text": prompt.format(expression=doc["expression"])}
    assert utils._RUN["model"] == model  # the frameless fallback knows the run's family


def test_the_command_lines_model_name(tmp_path):
    assert utils.cli_model_name(["--model", "llava_hf", "--tasks", "refcoco"]) == "llava_hf"
    config = tmp_path / "run.yaml"
    config.write_text("model: qwen3_vl\ntasks: refcoco\n")
    assert utils.cli_model_name(["--config", str(config)]) == "qwen3_vl"
    assert utils.cli_model_name(["--config", str(config), "--model", "internvl_hf"]) == "internvl_hf"
    assert utils.cli_model_name(["--tasks", "refcoco"]) is None


# ---------------------------------------------------------------------------------------------------------
# end to end: a tiny Qwen2.5-VL through lmms-eval with max_pixels below the image size


@pytest.mark.cli
def test_cli_qwen2_5_vl_refcoco_records_the_real_resize(tmp_path):
    from lmms_prune.toy.data import write_refcoco_hub_layout
    from lmms_prune.toy.models import tiny_model_dir

    root = tmp_path / "hub"
    write_refcoco_hub_layout(root / data.FAMILIES["refcoco"].local_name, 1, 0, splits=("val",), width=320,
                             height=240)
    max_pixels = 16 * 28 * 28  # 12544 < 320 * 240
    env = {k: v for k, v in os.environ.items() if k not in (takeover.TAKEOVER_ENV, data.JSONL_DIR_ENV)}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                data.LOCAL_DIR_ENV: str(root), "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "cache")})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "qwen2_5_vl_prune", "--model_args",
           f"pretrained={tiny_model_dir('qwen2_5_vl')},method=fastv,keep_ratio=0.5,max_pixels={max_pixels}",
           "--tasks", "refcoco_ground_val", "--limit", "2", "--gen_kwargs", "max_new_tokens=4",
           "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    [samples] = list(out.rglob("*_samples_refcoco_ground_val.jsonl"))
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == 2
    fam = family_class("qwen2_5_vl")
    expected = _process("qwen2_5_vl", fam.parse_model_args({"max_pixels": max_pixels}), (320, 240))
    for line in lines:
        frame = line["acc@0.5"]["box_frame"]
        assert frame == expected
        assert frame["resized_width"] * frame["resized_height"] <= max_pixels < 320 * 240
        assert (frame["resized_width"], frame["resized_height"]) != smart_resize(240, 320)[::-1]
        # the request's context (lmms-eval logs it as "input"): Qwen's own grounding prompt
        assert line["input"].startswith("Locate "), line["input"]
        assert line["input"].endswith(", output its bbox coordinates using JSON format."), line["input"]
