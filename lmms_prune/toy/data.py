"""Synthetic referring-expression grounding data written in the real RefCOCO schemas.

A scene is a handful of flat-coloured shapes (circle, square, triangle, ...) on a plain or photographic
background. Every object gets RefCOCO-style referring expressions that pick it out uniquely, using the fewest
attributes that disambiguate it ("the circle", "the red circle", "the large red circle", "the leftmost red
circle", "the red circle left of the blue square"). Scenes are written in two layouts so the same task code
reads synthetic and real data:

- lmms-lab's hub copy of RefCOCO (``datasets.load_dataset("lmms-lab/RefCOCO")``): parquet shards
  ``data/{split}-00000-of-00001.parquet``, one row per object, boxes as ``[x, y, w, h]`` pixels and a list of
  expressions per row (`write_refcoco_hub_layout`);
- InternVL's grounding jsonl: one line per expression, boxes as ``[x1, y1, x2, y2]`` pixels, images under
  ``images/`` (`write_internvl_jsonl`).

Expression semantics (shared by generation and `resolve_expression`): the shape noun, the colour word and a
spatial relation filter the objects; a superlative then picks the one object of that filtered set that beats
every other member. "left of X" means the object's box ends at or before X's box starts (``x2 <= X.x1``);
"leftmost" means left of every other candidate; "large" means a box area at least `SIZE_RATIO` times every
other candidate's. Boxes are ``(x1, y1, x2, y2)`` pixels with exclusive maxima, so ``w = x2 - x1``.
"""

from __future__ import annotations

import functools
import io
import json
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    import datasets

Box = tuple[int, int, int, int]

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
"""Named object colours (RGB). Plain backgrounds are light greys, far from all of them."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")

PHOTOS: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket", "camera")
"""scikit-image sample images (bundled with the package, no download) used as photographic backgrounds."""

REFCOCO_QUESTION = (
    "Please carefully observe the area circled in the image and come up with a caption for the area."
)
"""The fixed captioning instruction stored in the ``question`` column of the hub layout."""

SIZE_RATIO = 1.5
""""large"/"small" need a box area at least this many times every other candidate's (or 1/this)."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

SUPERLATIVES: dict[str, tuple[str, str]] = {
    # name -> (prefix form, postfix form); both forms carry the same meaning.
    "large": ("large", ""),
    "small": ("small", ""),
    "leftmost": ("leftmost", "on the left"),
    "rightmost": ("rightmost", "on the right"),
    "top": ("top", "at the top"),
    "bottom": ("bottom", "at the bottom"),
}

# Superlatives that reduce to a relation holding against every other candidate.
_SUPERLATIVE_RELATION = {
    "leftmost": "left of",
    "rightmost": "right of",
    "top": "above",
    "bottom": "below",
}


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene.

    ``box`` is ``(x1, y1, x2, y2)`` in pixels with exclusive maxima: the tight box of the drawn pixels.
    ``expression`` is the minimal unique referring expression; ``paraphrases`` are further unique ones.
    ``polygon`` is the drawn outline as ``((x, y), ...)`` pixel vertices.
    """

    shape: str
    color: str
    box: Box
    expression: str
    paraphrases: tuple[str, ...] = ()
    polygon: tuple[tuple[float, float], ...] = ()

    @property
    def expressions(self) -> tuple[str, ...]:
        """All referring expressions for this object, the minimal one first."""
        return (self.expression, *self.paraphrases)


@dataclass
class Scene:
    """An RGB image with its objects; ``image_id`` is unique within one written dataset."""

    image: Image.Image
    objects: list[SceneObject]
    image_id: int


@dataclass(frozen=True)
class Description:
    """The parsed meaning of a referring expression (see the module docstring for the semantics)."""

    shape: str
    color: str | None = None
    superlative: str | None = None
    relation: tuple[str, Description] | None = None


# ---------------------------------------------------------------------------------------------------------
# Expressions: rendering, parsing, resolving


def render_expression(desc: Description, postfix_superlative: bool = False) -> str:
    """Render a description as English, e.g. ``the leftmost red circle left of the blue square``.

    ``postfix_superlative`` picks the alternative surface form of positional superlatives
    (``the red circle on the left``); the meaning is unchanged.
    """
    words = ["the"]
    postfix = ""
    if desc.superlative is not None:
        prefix_form, postfix_form = SUPERLATIVES[desc.superlative]
        if postfix_superlative and postfix_form:
            postfix = postfix_form
        else:
            words.append(prefix_form)
    if desc.color is not None:
        words.append(desc.color)
    words.append(desc.shape)
    if postfix:
        words.append(postfix)
    if desc.relation is not None:
        relation, anchor = desc.relation
        words += [relation, render_expression(anchor)]
    return " ".join(words)


_RELATION_RE = re.compile(r"^(?P<target>the .+?) (?P<relation>left of|right of|above|below) (?P<anchor>the .+)$")


def _parse_noun_phrase(text: str) -> Description:
    words = text.split()
    if not words or words[0] != "the":
        raise ValueError(f"expression {text!r}: must start with 'the'")
    words = words[1:]
    superlative = None
    tail = " ".join(words)
    for name, (_, postfix_form) in SUPERLATIVES.items():
        if postfix_form and tail.endswith(" " + postfix_form):
            superlative = name
            words = tail[: -len(postfix_form) - 1].split()
            break
    if words and words[0] in SUPERLATIVES and superlative is None:
        superlative = words.pop(0)
    color = words.pop(0) if words and words[0] in PALETTE else None
    if len(words) != 1 or words[0] not in SHAPES:
        raise ValueError(f"expression {text!r}: expected one shape noun from {SHAPES} after the attributes")
    return Description(shape=words[0], color=color, superlative=superlative)


def parse_expression(text: str) -> Description:
    """Parse an expression produced by `render_expression` back into a `Description`.

    Raises ``ValueError`` naming the expression when it is outside the grammar
    ``the [superlative] [colour] shape [postfix superlative] [relation the [colour] shape]``.
    """
    match = _RELATION_RE.match(text)
    if match is None:
        return _parse_noun_phrase(text)
    target = _parse_noun_phrase(match["target"])
    anchor = _parse_noun_phrase(match["anchor"])
    return Description(target.shape, target.color, target.superlative, (match["relation"], anchor))


def box_relation_holds(relation: str, box: Box, anchor: Box) -> bool:
    """Whether ``box`` is entirely ``relation`` (left of / right of / above / below) ``anchor``."""
    x1, y1, x2, y2 = box
    ax1, ay1, ax2, ay2 = anchor
    if relation == "left of":
        return x2 <= ax1
    if relation == "right of":
        return x1 >= ax2
    if relation == "above":
        return y2 <= ay1
    if relation == "below":
        return y1 >= ay2
    raise ValueError(f"relation={relation!r}: must be one of {RELATIONS}")


def box_area(box: Box) -> int:
    """Area in pixels of an ``(x1, y1, x2, y2)`` box with exclusive maxima."""
    return (box[2] - box[0]) * (box[3] - box[1])


def _superlative_holds(superlative: str, box: Box, others: list[Box]) -> bool:
    if superlative == "large":
        return all(box_area(box) >= SIZE_RATIO * box_area(o) for o in others)
    if superlative == "small":
        return all(SIZE_RATIO * box_area(box) <= box_area(o) for o in others)
    if superlative in _SUPERLATIVE_RELATION:
        return all(box_relation_holds(_SUPERLATIVE_RELATION[superlative], box, o) for o in others)
    raise ValueError(f"superlative={superlative!r}: must be one of {tuple(SUPERLATIVES)}")


def resolve_description(desc: Description, objects: Sequence[SceneObject]) -> list[int]:
    """Indices of ``objects`` that ``desc`` refers to (see the module docstring for the semantics).

    A relation's anchor must itself resolve to exactly one object, otherwise nothing matches.
    """
    candidates = [
        i
        for i, obj in enumerate(objects)
        if obj.shape == desc.shape and (desc.color is None or obj.color == desc.color)
    ]
    if desc.relation is not None:
        relation, anchor_desc = desc.relation
        anchors = resolve_description(anchor_desc, objects)
        if len(anchors) != 1:
            return []
        anchor_box = objects[anchors[0]].box
        candidates = [i for i in candidates if box_relation_holds(relation, objects[i].box, anchor_box)]
    if desc.superlative is not None:
        candidates = [
            i
            for i in candidates
            if _superlative_holds(
                desc.superlative, objects[i].box, [objects[j].box for j in candidates if j != i]
            )
        ]
    return candidates


def resolve_expression(text: str, objects: Sequence[SceneObject]) -> list[int]:
    """Indices of ``objects`` that the English expression ``text`` refers to."""
    return resolve_description(parse_expression(text), objects)


def is_unique_expression(text: str, objects: Sequence[SceneObject], target: int | None = None) -> bool:
    """Whether ``text`` matches exactly one object (and, if ``target`` is given, that it is ``objects[target]``)."""
    matches = resolve_expression(text, objects)
    return len(matches) == 1 and (target is None or matches[0] == target)


def _candidate_descriptions(index: int, objects: Sequence[SceneObject]) -> list[Description]:
    """Descriptions of ``objects[index]`` from fewest to most attributes (RefCOCO's minimal-first habit).

    Superlatives are only offered when at least two objects share the target's shape and colour, so that
    a word like "large" is never used about an object that is not larger than a look-alike.
    """
    obj = objects[index]
    descs = [Description(obj.shape), Description(obj.shape, obj.color)]
    look_alikes = sum(o.shape == obj.shape and o.color == obj.color for o in objects)
    same_shape = sum(o.shape == obj.shape for o in objects)
    if same_shape >= 2:
        descs += [Description(obj.shape, None, s) for s in SUPERLATIVES]
    if look_alikes >= 2:
        descs += [Description(obj.shape, obj.color, s) for s in SUPERLATIVES]
    for anchor_index, anchor in enumerate(objects):
        if anchor_index == index:
            continue
        # Anchors are named without relations of their own, as in "the red circle left of the blue square".
        plain = (Description(anchor.shape), Description(anchor.shape, anchor.color))
        anchor_desc = next((d for d in plain if is_unique_description(d, objects, anchor_index)), None)
        if anchor_desc is None:
            continue
        for relation in RELATIONS:
            if box_relation_holds(relation, obj.box, anchor.box):
                descs.append(Description(obj.shape, obj.color, None, (relation, anchor_desc)))
    return descs


def is_unique_description(desc: Description, objects: Sequence[SceneObject], target: int) -> bool:
    """Whether ``desc`` resolves to exactly ``objects[target]``."""
    return resolve_description(desc, objects) == [target]


def referring_expressions(index: int, objects: Sequence[SceneObject], max_expressions: int = 3) -> list[str]:
    """Up to ``max_expressions`` distinct unique expressions for ``objects[index]``, the minimal one first.

    Every returned string is re-parsed and checked with `is_unique_expression`, so rendering and parsing
    agree. Returns an empty list when the object cannot be singled out by the grammar.
    """
    if max_expressions < 1:
        raise ValueError(f"max_expressions={max_expressions}: must be >= 1")
    found: list[str] = []
    for desc in _candidate_descriptions(index, objects):
        forms = [render_expression(desc)]
        if desc.superlative in _SUPERLATIVE_RELATION:
            forms.append(render_expression(desc, postfix_superlative=True))
        for text in forms:
            if text not in found and is_unique_expression(text, objects, index):
                found.append(text)
                if len(found) == max_expressions:
                    return found
    return found


# ---------------------------------------------------------------------------------------------------------
# Drawing


def shape_polygon(shape: str, x: float, y: float, size: float) -> list[tuple[float, float]]:
    """Vertices ``[(x, y), ...]`` of ``shape`` inscribed in the square ``[x, x + size) x [y, y + size)``."""
    cx, cy, r = x + size / 2, y + size / 2, size / 2 - 0.5

    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        angles = phase + 2 * np.pi * np.arange(n) / n
        return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]

    if shape == "circle":
        return ring(48, r, 0.0)
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return ring(4, r, -np.pi / 2)
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "star":
        outer, inner = ring(5, r, -np.pi / 2), ring(5, 0.5 * r, -np.pi / 2 + np.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    raise ValueError(f"shape={shape!r}: must be one of {SHAPES}")


def _mask_box(mask: np.ndarray) -> Box:
    rows, cols = np.nonzero(mask)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


@functools.lru_cache(maxsize=len(PHOTOS))
def _photo(name: str) -> np.ndarray:
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])


def _background(rng: np.random.Generator, width: int, height: int, background: str) -> np.ndarray:
    """``(height, width, 3)`` uint8 background: a light grey, or a random crop of a photo at the scene's aspect."""
    if background == "plain":
        level = rng.integers(205, 246)
        tint = rng.integers(-6, 7, size=3)
        return np.broadcast_to(np.clip(level + tint, 0, 255).astype(np.uint8), (height, width, 3)).copy()
    if background == "photo":
        photo = _photo(PHOTOS[rng.integers(len(PHOTOS))])
        ph, pw = photo.shape[:2]
        scale = min(pw / width, ph / height) * rng.uniform(0.7, 1.0)
        cw, ch = max(1, int(width * scale)), max(1, int(height * scale))
        x0, y0 = rng.integers(0, pw - cw + 1), rng.integers(0, ph - ch + 1)
        crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw])
        return np.asarray(crop.resize((width, height), Image.Resampling.BICUBIC)).copy()
    raise ValueError(f"background={background!r}: must be 'plain' or 'photo'")


def _boxes_apart(a: Box, b: Box, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place_squares(
    rng: np.random.Generator, width: int, height: int, n: int, size_fraction: tuple[float, float]
) -> list[tuple[int, int, int]]:
    """Up to ``n`` non-overlapping squares ``(x, y, size)`` inside the image, separated by a small gap."""
    short = min(width, height)
    gap = max(2, short // 40)
    placed: list[tuple[int, int, int]] = []
    for _ in range(n):
        for _attempt in range(200):
            size = int(round(short * rng.uniform(*size_fraction)))
            size = max(8, min(size, short - 2 * gap))
            x = int(rng.integers(gap, width - size - gap + 1))
            y = int(rng.integers(gap, height - size - gap + 1))
            box = (x, y, x + size, y + size)
            if all(_boxes_apart(box, (px, py, px + ps, py + ps), gap) for px, py, ps in placed):
                placed.append((x, y, size))
                break
    return placed


def make_scene(
    rng: np.random.Generator,
    image_id: int,
    width: int = 640,
    height: int = 480,
    n_objects: tuple[int, int] = (2, 4),
    background: str = "plain",
    size_fraction: tuple[float, float] = (0.12, 0.38),
    max_expressions: int = 3,
    max_attempts: int = 100,
    attribute_pool: tuple[int, int] = (1, 3),
) -> Scene:
    """Draw one scene of coloured shapes and give every object unique referring expressions.

    Args:
        rng: the only source of randomness; the same generator state gives the same scene.
        image_id: stored on the scene; used for file names and question ids.
        width, height: image size in pixels (at least 32 each).
        n_objects: inclusive range of the object count.
        background: ``"plain"`` (light grey) or ``"photo"`` (a crop of a scikit-image sample photo).
        size_fraction: inclusive range of an object's size as a fraction of ``min(width, height)``.
        max_expressions: expressions per object are drawn uniformly from ``1..max_expressions`` (capped by how
            many unique ones exist).
        max_attempts: scenes in which some object has no unique expression, or fewer objects than
            ``n_objects[0]`` fit, are redrawn up to this many times.
        attribute_pool: inclusive range of how many distinct shapes and how many distinct colours a scene
            draws its objects from; small pools make look-alikes (and superlatives, relations) common.

    Shapes and colours are drawn from a small per-scene subset so look-alikes occur and expressions need
    colour, size, position or a relation to disambiguate, as in RefCOCO. Objects never overlap, so each box
    is the tight box of its object's own visible pixels.
    """
    if width < 32 or height < 32:
        raise ValueError(f"width={width}, height={height}: both must be >= 32 pixels")
    lo, hi = n_objects
    if not 1 <= lo <= hi:
        raise ValueError(f"n_objects={n_objects}: must satisfy 1 <= min <= max")
    if not 0 < size_fraction[0] <= size_fraction[1] < 1:
        raise ValueError(f"size_fraction={size_fraction}: must satisfy 0 < min <= max < 1")
    if background not in ("plain", "photo"):
        raise ValueError(f"background={background!r}: must be 'plain' or 'photo'")
    if not 1 <= attribute_pool[0] <= attribute_pool[1] <= min(len(SHAPES), len(PALETTE)):
        raise ValueError(f"attribute_pool={attribute_pool}: must satisfy 1 <= min <= max <= "
                         f"{min(len(SHAPES), len(PALETTE))}")
    for _attempt in range(max_attempts):
        scene = _try_scene(rng, image_id, width, height, int(rng.integers(lo, hi + 1)), background,
                           size_fraction, max_expressions, attribute_pool)
        if scene is not None and len(scene.objects) >= lo:
            return scene
    raise RuntimeError(
        f"make_scene: no valid scene in max_attempts={max_attempts} for width={width}, height={height}, "
        f"n_objects={n_objects}, size_fraction={size_fraction}; use a larger image or smaller objects"
    )


def _try_scene(
    rng: np.random.Generator,
    image_id: int,
    width: int,
    height: int,
    n: int,
    background: str,
    size_fraction: tuple[float, float],
    max_expressions: int,
    attribute_pool: tuple[int, int] = (1, 3),
) -> Scene | None:
    """One draw of a scene with up to ``n`` objects, or None if some object has no unique expression."""
    pixels = _background(rng, width, height, background)
    pool_lo, pool_hi = attribute_pool
    shapes = rng.choice(SHAPES, size=int(rng.integers(pool_lo, pool_hi + 1)), replace=False)
    colors = rng.choice(list(PALETTE), size=int(rng.integers(pool_lo, pool_hi + 1)), replace=False)
    drawn: list[SceneObject] = []
    for x, y, size in _place_squares(rng, width, height, n, size_fraction):
        shape, color = str(rng.choice(shapes)), str(rng.choice(colors))
        polygon = shape_polygon(shape, x, y, size)
        mask_image = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask_image).polygon(polygon, fill=255)
        mask = np.asarray(mask_image) > 0
        pixels[mask] = PALETTE[color]
        vertices = tuple((round(float(px), 2), round(float(py), 2)) for px, py in polygon)
        drawn.append(SceneObject(shape, color, _mask_box(mask), expression="", polygon=vertices))
    objects = []
    for i, obj in enumerate(drawn):
        expressions = referring_expressions(i, drawn, max_expressions)
        if not expressions:
            return None
        keep = int(rng.integers(1, len(expressions) + 1))
        objects.append(
            SceneObject(obj.shape, obj.color, obj.box, expressions[0], tuple(expressions[1:keep]), obj.polygon)
        )
    return Scene(Image.fromarray(pixels), objects, image_id)


# ---------------------------------------------------------------------------------------------------------
# Streams and on-disk layouts


def split_seed(seed: int, split: str) -> int:
    """A seed for ``split`` derived from ``seed``, so splits written with one seed share no scenes."""
    return int(np.random.SeedSequence([seed, zlib.crc32(split.encode())]).generate_state(1)[0])


def generate_scenes(
    n_images: int,
    seed: int,
    first_image_id: int = 0,
    size_range: tuple[tuple[int, int], tuple[int, int]] | None = None,
    **scene_kwargs,
) -> Iterator[Scene]:
    """Yield ``n_images`` scenes, deterministic for ``seed``, with ids ``first_image_id, first_image_id + 1, ...``.

    ``size_range=((min_w, max_w), (min_h, max_h))`` draws each image's width and height (inclusive ranges),
    so aspect ratios (and hence InternVL's tiling) vary; otherwise ``width``/``height`` in ``scene_kwargs``
    (default 640x480) apply to every image. Other keyword arguments go to `make_scene`.
    """
    if n_images < 0:
        raise ValueError(f"n_images={n_images}: must be >= 0")
    rng = np.random.default_rng(seed)
    for k in range(n_images):
        kwargs = dict(scene_kwargs)
        if size_range is not None:
            (w_lo, w_hi), (h_lo, h_hi) = size_range
            kwargs["width"] = int(rng.integers(w_lo, w_hi + 1))
            kwargs["height"] = int(rng.integers(h_lo, h_hi + 1))
        yield make_scene(rng, first_image_id + k, **kwargs)


def encode_image(image: Image.Image, image_format: str = "JPEG") -> bytes:
    """Encode deterministically: JPEG at fixed quality 95, or PNG; no timestamps or metadata."""
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, format="JPEG", quality=95)
    elif image_format == "PNG":
        image.save(buffer, format="PNG")
    else:
        raise ValueError(f"image_format={image_format!r}: must be 'JPEG' or 'PNG'")
    return buffer.getvalue()


def xyxy_to_xywh(box: Box) -> list[float]:
    """``(x1, y1, x2, y2)`` with exclusive maxima -> COCO ``[x, y, w, h]``."""
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


def hub_features() -> datasets.Features:
    """The `datasets.Features` of lmms-lab/RefCOCO (question_id, image, question, answer, segmentation, ...)."""
    from datasets import Features, Value
    from datasets import Image as HFImage
    from datasets import Sequence as HFSequence

    return Features(
        {
            "question_id": Value("string"),
            "image": HFImage(),
            "question": Value("string"),
            "answer": HFSequence(Value("string")),
            "segmentation": HFSequence(Value("float32")),
            "bbox": HFSequence(Value("float32")),
            "iscrowd": Value("int8"),
            "file_name": Value("string"),
        }
    )


def _hub_readme(splits: Sequence[str],
                description: str = "Synthetic referring-expression grounding data in lmms-lab/RefCOCO's layout.",
                ) -> str:
    """A hub dataset card mapping each split to ``data/<split>-*`` (what ``datasets.load_dataset`` reads)."""
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in splits:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    lines += ["---", "", description, ""]
    return "\n".join(lines)


def write_hub_split(out_dir: Path, split: str, columns: dict[str, list], features: datasets.Features,
                    description: str) -> Path:
    """One split of an lmms-lab hub layout: ``out_dir/data/{split}-00000-of-00001.parquet`` from ``columns`` and
    the dataset card naming it (:func:`_hub_readme` with ``description``). Returns ``out_dir``."""
    from datasets import Dataset

    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(columns, features=features).to_parquet(str(out_dir / "data" / f"{split}-00000-of-00001.parquet"))
    (out_dir / "README.md").write_text(_hub_readme([split], description))
    return out_dir


def write_refcoco_hub_layout(
    out_dir: str | Path,
    n_images: int,
    seed: int,
    splits: Sequence[str] = ("val", "testA", "testB"),
    image_format: str = "JPEG",
    split_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    **scene_kwargs,
) -> Path:
    """Write splits in lmms-lab/RefCOCO's hub layout; ``datasets.load_dataset(str(out_dir))`` reads them back.

    Writes ``out_dir/data/{split}-00000-of-00001.parquet`` (one row per object, `hub_features` columns,
    ``bbox`` as ``[x, y, w, h]`` pixels, ``answer`` the object's expressions) and a README whose ``configs``
    map file names to splits, as on the hub. Each split draws ``n_images`` scenes from
    ``split_seed(seed, split)`` with its own block of image ids, so splits share no images.
    ``split_overrides``: per split, ``n_images`` and scene options that replace the shared ones (e.g. a split
    of more crowded scenes). Returns ``out_dir``.
    """
    from datasets import Dataset

    if len(set(splits)) != len(splits) or not splits:
        raise ValueError(f"splits={splits}: must be a non-empty sequence of distinct names")
    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    overrides = {split: dict(v) for split, v in (split_overrides or {}).items()}
    unknown = sorted(set(overrides) - set(splits))
    if unknown:
        raise ValueError(f"split_overrides names split(s) {', '.join(unknown)} not in splits={list(splits)}")
    first_id = 0
    for split in splits:
        columns: dict[str, list] = {name: [] for name in hub_features()}
        split_kwargs = {**scene_kwargs, **overrides.get(split, {})}
        count = int(split_kwargs.pop("n_images", n_images))
        scenes = generate_scenes(count, split_seed(seed, split), first_id, **split_kwargs)
        first_id += count
        for scene in scenes:
            suffix = "jpg" if image_format == "JPEG" else "png"
            file_name = f"toy_{split}_{scene.image_id:012d}.{suffix}"
            image_bytes = encode_image(scene.image, image_format)
            for k, obj in enumerate(scene.objects):
                columns["question_id"].append(f"{split}_{scene.image_id}_{k}")
                columns["image"].append({"bytes": image_bytes, "path": file_name})
                columns["question"].append(REFCOCO_QUESTION)
                columns["answer"].append(list(obj.expressions))
                columns["segmentation"].append([c for vertex in obj.polygon for c in vertex])
                columns["bbox"].append(xyxy_to_xywh(obj.box))
                columns["iscrowd"].append(0)
                columns["file_name"].append(file_name)
        dataset = Dataset.from_dict(columns, features=hub_features())
        dataset.to_parquet(str(out_dir / "data" / f"{split}-00000-of-00001.parquet"))
    (out_dir / "README.md").write_text(_hub_readme(splits))
    return out_dir


def write_internvl_jsonl(
    out_dir: str | Path,
    n_images: int,
    seed: int,
    name: str = "refcoco_val",
    image_format: str = "JPEG",
    **scene_kwargs,
) -> Path:
    """Write ``out_dir/{name}.jsonl`` in InternVL's grounding format plus images under ``out_dir/images/``.

    One line per expression: ``{"image": "images/<file>", "sent": str, "bbox": [x1, y1, x2, y2],
    "height": h, "width": w}`` with pixel boxes. Scenes come from ``split_seed(seed, name)``, so
    ``name="val"`` gives the same scenes as the hub layout's ``val`` split for the same seed.
    Returns the jsonl path.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    suffix = "jpg" if image_format == "JPEG" else "png"
    lines = []
    for scene in generate_scenes(n_images, split_seed(seed, name), **scene_kwargs):
        relative = f"images/{name}_{scene.image_id:06d}.{suffix}"
        (out_dir / relative).write_bytes(encode_image(scene.image, image_format))
        for obj in scene.objects:
            for sentence in obj.expressions:
                record = {
                    "image": relative,
                    "sent": sentence,
                    "bbox": list(obj.box),
                    "height": scene.image.height,
                    "width": scene.image.width,
                }
                lines.append(json.dumps(record))
    path = out_dir / f"{name}.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def load_internvl_jsonl(path: str | Path) -> list[dict]:
    """Read an InternVL grounding jsonl into a list of dicts (blank lines are skipped)."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
