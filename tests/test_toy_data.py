"""Properties of the synthetic RefCOCO-style grounding data (lmms_prune.toy.data)."""

from __future__ import annotations

import re

import datasets
import numpy as np
import pytest
from PIL import Image

from lmms_prune.toy import data as toy
from lmms_prune.toy.data import (
    PALETTE,
    REFCOCO_QUESTION,
    SceneObject,
    generate_scenes,
    hub_features,
    is_unique_expression,
    load_internvl_jsonl,
    make_scene,
    parse_expression,
    referring_expressions,
    resolve_expression,
    split_seed,
    write_internvl_jsonl,
    write_refcoco_hub_layout,
)

SMALL = {"size_range": ((120, 260), (100, 220))}


@pytest.fixture(scope="module")
def scenes() -> list[toy.Scene]:
    plain = list(generate_scenes(24, seed=3, **SMALL))
    photo = list(generate_scenes(8, seed=4, background="photo", first_image_id=24, **SMALL))
    return plain + photo


def all_objects(scenes):
    for scene in scenes:
        for obj in scene.objects:
            yield scene, obj


# --------------------------------------------------------------------------------------------------------
# An independent reading of the expressions: words -> attribute filters, written without the module's parser.

_COLOUR_WORDS = {"red", "green", "blue", "yellow", "purple", "orange"}
_SHAPE_WORDS = {"circle", "square", "triangle", "diamond", "star", "hexagon"}
_POSITION_PHRASES = {
    "leftmost": "left", "on the left": "left", "rightmost": "right", "on the right": "right",
    "top": "top", "at the top": "top", "bottom": "bottom", "at the bottom": "bottom",
}


def _strictly(direction: str, a, b) -> bool:
    """Box a lies entirely on the ``direction`` side of box b."""
    return {"left": a[2] <= b[0], "right": a[0] >= b[2], "top": a[3] <= b[1], "bottom": a[1] >= b[3]}[direction]


def _noun_phrase_filter(phrase: str, objects: list[SceneObject], pool: list[int]) -> list[int]:
    words = phrase.split()
    assert words[0] == "the", phrase
    shapes = [w for w in words if w in _SHAPE_WORDS]
    colours = [w for w in words if w in _COLOUR_WORDS]
    assert len(shapes) == 1 and len(colours) <= 1, phrase
    kept = [i for i in pool if objects[i].shape == shapes[0] and (not colours or objects[i].color == colours[0])]
    direction = next((d for p, d in _POSITION_PHRASES.items() if re.search(rf"\b{p}\b", phrase)), None)
    area = {i: (objects[i].box[2] - objects[i].box[0]) * (objects[i].box[3] - objects[i].box[1]) for i in kept}
    if direction is not None:
        kept = [i for i in kept if all(_strictly(direction, objects[i].box, objects[j].box) for j in kept if j != i)]
    elif "large" in words:
        kept = [i for i in kept if all(area[i] >= 1.5 * area[j] for j in kept if j != i)]
    elif "small" in words:
        kept = [i for i in kept if all(1.5 * area[i] <= area[j] for j in kept if j != i)]
    return kept


def independent_matches(text: str, objects: list[SceneObject]) -> list[int]:
    everyone = list(range(len(objects)))
    relation = re.fullmatch(r"(the .+?) (left of|right of|above|below) (the .+)", text)
    if relation is None:
        return _noun_phrase_filter(text, objects, everyone)
    target, word, anchor = relation.groups()
    anchors = _noun_phrase_filter(anchor, objects, everyone)
    if len(anchors) != 1:
        return []
    direction = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}[word]
    beside = [i for i in everyone if _strictly(direction, objects[i].box, objects[anchors[0]].box)]
    return _noun_phrase_filter(target, objects, beside)


# --------------------------------------------------------------------------------------------------------
# Scenes


def test_boxes_lie_inside_their_images_with_positive_area(scenes):
    for scene, obj in all_objects(scenes):
        x1, y1, x2, y2 = obj.box
        assert 0 <= x1 < x2 <= scene.image.width and 0 <= y1 < y2 <= scene.image.height, obj


def test_image_sizes_follow_size_range_and_objects_follow_n_objects(scenes):
    sizes = {scene.image.size for scene in scenes}
    assert len(sizes) > 1, "size_range should vary the image size"
    for scene in scenes:
        assert 120 <= scene.image.width <= 260 and 100 <= scene.image.height <= 220
        assert scene.image.mode == "RGB"
        assert 2 <= len(scene.objects) <= 4


def test_every_expression_resolves_to_exactly_its_object(scenes):
    for scene in scenes:
        for index, obj in enumerate(scene.objects):
            assert 1 <= len(obj.expressions) <= 3
            assert len(set(obj.expressions)) == len(obj.expressions)
            for text in obj.expressions:
                assert is_unique_expression(text, scene.objects, index), (text, scene.objects)
                assert independent_matches(text, scene.objects) == [index], (text, scene.objects)


def test_generated_expressions_cover_colour_size_position_and_relations(scenes):
    texts = [t for _, obj in all_objects(scenes) for t in obj.expressions]
    assert any(re.fullmatch(r"the \w+", t) for t in texts)
    assert any(any(c in t.split() for c in PALETTE) for t in texts)
    assert any(re.search(r"\b(large|small)\b", t) for t in texts)
    assert any(re.search(r"\b(leftmost|rightmost|top|bottom|on the left|on the right)\b", t) for t in texts)
    assert any(re.search(r" (left of|right of|above|below) the ", t) for t in texts)


def test_first_expression_is_minimal(scenes):
    """The bare shape noun is used whenever it is unique; otherwise no expression is that short."""
    for scene in scenes:
        for index, obj in enumerate(scene.objects):
            bare = f"the {obj.shape}"
            assert (obj.expression == bare) == is_unique_expression(bare, scene.objects, index)


def test_object_colour_dominates_its_box_and_touches_every_edge(scenes):
    for scene, obj in all_objects(scenes):
        pixels = np.asarray(scene.image).astype(np.int32)
        x1, y1, x2, y2 = obj.box
        inside = pixels[y1:y2, x1:x2]
        is_colour = np.all(inside == PALETTE[obj.color], axis=-1)
        assert is_colour.mean() > 0.35, obj
        # The box is tight: the object's pixels reach each of its four edges.
        assert is_colour[0].any() and is_colour[-1].any() and is_colour[:, 0].any() and is_colour[:, -1].any()
        target = np.array(PALETTE[obj.color])
        box_mean, image_mean = inside.reshape(-1, 3).mean(0), pixels.reshape(-1, 3).mean(0)
        assert np.linalg.norm(box_mean - target) < np.linalg.norm(image_mean - target), obj
        counts = {name: np.all(inside == rgb, axis=-1).sum() for name, rgb in PALETTE.items()}
        assert max(counts, key=counts.get) == obj.color


def test_make_scene_is_deterministic_for_a_generator_state():
    a = make_scene(np.random.default_rng(7), 0, 160, 120)
    b = make_scene(np.random.default_rng(7), 0, 160, 120)
    assert a.objects == b.objects and a.image.tobytes() == b.image.tobytes()


def test_attribute_pool_bounds_the_distinct_shapes_and_colours_and_defaults_to_one_to_three():
    """Scenes draw their objects from ``attribute_pool`` shapes and colours; leaving it out equals (1, 3),
    the range the generator always used."""
    kwargs = {"width": 448, "height": 448, "n_objects": (3, 4)}
    narrow = list(generate_scenes(30, 5, attribute_pool=(1, 1), **kwargs))
    assert all(len({o.shape for o in s.objects}) == 1 and len({o.color for o in s.objects}) == 1 for s in narrow)
    # one shape and one colour: every object has a look-alike, so no expression is shape or colour alone
    assert all(parse_expression(o.expression).superlative or parse_expression(o.expression).relation
               for s in narrow for o in s.objects if len(s.objects) > 1)
    wide = list(generate_scenes(60, 5, attribute_pool=(6, 6), **kwargs))
    assert max(len({o.shape for o in s.objects}) for s in wide) >= 3
    default = [(s.objects, s.image.tobytes()) for s in generate_scenes(5, 11, **kwargs)]
    explicit = [(s.objects, s.image.tobytes()) for s in generate_scenes(5, 11, attribute_pool=(1, 3), **kwargs)]
    assert default == explicit


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 10}, "width=10"),
        ({"n_objects": (3, 2)}, r"n_objects=\(3, 2\)"),
        ({"background": "noise"}, "background='noise'"),
        ({"size_fraction": (0.5, 1.2)}, r"size_fraction=\(0.5, 1.2\)"),
        ({"attribute_pool": (0, 3)}, r"attribute_pool=\(0, 3\)"),
        ({"attribute_pool": (4, 7)}, r"attribute_pool=\(4, 7\)"),
    ],
)
def test_make_scene_names_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_scene(np.random.default_rng(0), 0, **kwargs)


# --------------------------------------------------------------------------------------------------------
# The verifier on hand-built scenes


def obj(shape: str, color: str, box) -> SceneObject:
    return SceneObject(shape, color, tuple(box), expression="")


def test_verifier_rejects_ambiguous_and_accepts_disambiguated_expressions():
    objects = [
        obj("circle", "red", (0, 0, 10, 10)),
        obj("circle", "red", (50, 0, 80, 30)),
        obj("square", "blue", (20, 40, 40, 60)),
    ]
    assert resolve_expression("the red circle", objects) == [0, 1]
    assert not is_unique_expression("the circle", objects)
    assert resolve_expression("the leftmost red circle", objects) == [0]
    assert resolve_expression("the red circle on the right", objects) == [1]
    assert resolve_expression("the large circle", objects) == [1]
    assert resolve_expression("the small circle", objects) == [0]
    assert resolve_expression("the circle left of the square", objects) == [0]  # box ends at x=10 <= 20
    assert resolve_expression("the circle right of the square", objects) == [1]  # box starts at x=50 >= 40
    assert resolve_expression("the circle below the square", objects) == []
    assert resolve_expression("the square below the large circle", objects) == [2]
    assert resolve_expression("the blue circle", objects) == []
    # "top" is ambiguous when the two boxes overlap vertically.
    assert resolve_expression("the top circle", objects) == []


def test_referring_expressions_are_unique_and_minimal_first_on_a_hand_built_scene():
    objects = [
        obj("circle", "red", (0, 0, 10, 10)),
        obj("circle", "red", (50, 0, 80, 30)),
        obj("square", "blue", (20, 40, 40, 60)),
    ]
    assert referring_expressions(2, objects)[0] == "the square"
    first = referring_expressions(0, objects, max_expressions=3)
    assert first[0] in {"the small circle", "the leftmost circle"}
    assert all(is_unique_expression(t, objects, 0) for t in first)


def test_parser_names_expressions_outside_the_grammar():
    with pytest.raises(ValueError, match="'a red circle'"):
        parse_expression("a red circle")
    with pytest.raises(ValueError, match="'the red blob'"):
        parse_expression("the red blob")


# --------------------------------------------------------------------------------------------------------
# On-disk layouts

N_IMAGES = 3
SPLITS = ("val", "testA", "testB")
SCENE_KWARGS = {"width": 160, "height": 128}


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    return write_refcoco_hub_layout(tmp_path_factory.mktemp("hub"), N_IMAGES, seed=11, **SCENE_KWARGS)


def test_hub_layout_loads_with_expected_splits_columns_and_features(hub_dir, tmp_path):
    loaded = datasets.load_dataset(str(hub_dir), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == set(SPLITS)
    for split_index, split in enumerate(SPLITS):
        ds = loaded[split]
        assert ds.features == hub_features()
        assert isinstance(ds.features["image"], datasets.Image)
        expected = list(generate_scenes(N_IMAGES, split_seed(11, split), split_index * N_IMAGES, **SCENE_KWARGS))
        objects = [(scene, o) for scene in expected for o in scene.objects]
        assert ds.num_rows == len(objects), "one row per object"
        assert len(set(ds["question_id"])) == ds.num_rows
        for row, (scene, o) in zip(ds, objects):
            x1, y1, x2, y2 = o.box
            assert row["bbox"] == [x1, y1, x2 - x1, y2 - y1]
            assert row["answer"] == list(o.expressions)
            assert row["question"] == REFCOCO_QUESTION
            assert row["iscrowd"] == 0
            assert isinstance(row["image"], Image.Image) and row["image"].size == scene.image.size
            assert row["image"].format == "JPEG" and row["file_name"].endswith(".jpg")
            xs, ys = row["segmentation"][0::2], row["segmentation"][1::2]
            assert len(xs) == len(ys) >= 3
            assert x1 - 1 <= min(xs) and max(xs) <= x2 and y1 - 1 <= min(ys) and max(ys) <= y2
            # After JPEG compression the box is still where the object's colour is.
            pixels = np.asarray(row["image"]).astype(float)
            target = np.array(PALETTE[o.color])
            box_mean = pixels[y1:y2, x1:x2].reshape(-1, 3).mean(0)
            assert np.linalg.norm(box_mean - target) < np.linalg.norm(pixels.reshape(-1, 3).mean(0) - target)


def test_hub_splits_share_no_images(hub_dir):
    image_bytes = {}
    for split in SPLITS:
        table = datasets.Dataset.from_parquet(str(hub_dir / "data" / f"{split}-00000-of-00001.parquet"))
        image_bytes[split] = {r["bytes"] for r in table.cast_column("image", datasets.Image(decode=False))["image"]}
    assert not image_bytes["val"] & image_bytes["testA"]
    assert not image_bytes["val"] & image_bytes["testB"]
    assert not image_bytes["testA"] & image_bytes["testB"]


def test_hub_layout_is_byte_identical_for_a_seed_and_differs_across_seeds(hub_dir, tmp_path):
    again = write_refcoco_hub_layout(tmp_path / "again", N_IMAGES, seed=11, **SCENE_KWARGS)
    other = write_refcoco_hub_layout(tmp_path / "other", N_IMAGES, seed=12, **SCENE_KWARGS)
    for split in SPLITS:
        name = f"data/{split}-00000-of-00001.parquet"
        assert (again / name).read_bytes() == (hub_dir / name).read_bytes()
        assert (other / name).read_bytes() != (hub_dir / name).read_bytes()


def test_internvl_jsonl_has_one_line_per_expression_with_xyxy_boxes(tmp_path):
    path = write_internvl_jsonl(tmp_path, N_IMAGES, seed=5, name="val", **SCENE_KWARGS)
    assert path == tmp_path / "val.jsonl"
    records = load_internvl_jsonl(path)
    expected = [
        (scene, o, text)
        for scene in generate_scenes(N_IMAGES, split_seed(5, "val"), **SCENE_KWARGS)
        for o in scene.objects
        for text in o.expressions
    ]
    assert len(records) == len(expected)
    for record, (scene, o, text) in zip(records, expected):
        assert set(record) == {"image", "sent", "bbox", "height", "width"}
        assert record["sent"] == text
        assert record["bbox"] == list(o.box)
        assert (record["width"], record["height"]) == scene.image.size
        assert record["image"].startswith("images/")
        with Image.open(tmp_path / record["image"]) as image:
            assert image.size == scene.image.size


def test_internvl_jsonl_matches_hub_split_of_the_same_name(hub_dir, tmp_path):
    path = write_internvl_jsonl(tmp_path, N_IMAGES, seed=11, name="val", **SCENE_KWARGS)
    hub = datasets.Dataset.from_parquet(str(hub_dir / "data" / "val-00000-of-00001.parquet"))
    hub_boxes = {tuple(b) for b in hub["bbox"]}
    jsonl_boxes = {(x1, y1, x2 - x1, y2 - y1) for x1, y1, x2, y2 in (r["bbox"] for r in load_internvl_jsonl(path))}
    assert jsonl_boxes == hub_boxes


def test_internvl_jsonl_is_deterministic_for_a_seed_and_differs_across_seeds(tmp_path):
    first = write_internvl_jsonl(tmp_path / "a", N_IMAGES, seed=5, **SCENE_KWARGS)
    second = write_internvl_jsonl(tmp_path / "b", N_IMAGES, seed=5, **SCENE_KWARGS)
    other = write_internvl_jsonl(tmp_path / "c", N_IMAGES, seed=6, **SCENE_KWARGS)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    images = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert len(images) == N_IMAGES
    for name in images:
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()


def test_hub_layout_png_images_round_trip_losslessly(tmp_path):
    out = write_refcoco_hub_layout(tmp_path, 1, seed=2, splits=("val",), image_format="PNG", **SCENE_KWARGS)
    (scene,) = generate_scenes(1, split_seed(2, "val"), **SCENE_KWARGS)
    rows = datasets.Dataset.from_parquet(str(out / "data" / "val-00000-of-00001.parquet"))
    assert rows.num_rows == len(scene.objects)
    for row in rows:
        assert row["file_name"].endswith(".png")
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(scene.image))
