"""MME-style yes/no position questions about synthetic scenes, written in lmms-lab/MME's layout.

MME (Fu et al., 2023, "MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models") asks
two yes/no questions per image and category, one answered yes and one no, and scores a category as ``acc +
acc+`` (acc+: both questions of an image right), so a model that always says yes scores 50 + 0. Its
``position`` category asks where an object is. Here the object is one whose colour and shape name it alone in
the scene (``the red circle``), and a pair asks about one side and its opposite along one axis::

    Is the red circle on the left side of the image? Please answer yes or no.     -> Yes
    Is the red circle on the right side of the image? Please answer yes or no.    -> No

Only objects whose box centre is at least :data:`MARGIN` of the side away from the image's middle line are
asked about along that axis, so every answer is plain. The pair shares its ``question_id`` (MME's unit of
acc+). lmms-eval's ``mme`` task drops :data:`REPLACE_PROMPT` and appends :data:`POST_PROMPT` (its default
kwargs), so a model trained on :func:`mme_prompt` sees exactly what lmms-eval asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmms_prune.toy.data import Scene, encode_image, generate_scenes, split_seed, write_hub_split

if TYPE_CHECKING:
    import datasets

CATEGORY = "position"
"""MME's perception category of these questions."""
REPLACE_PROMPT = " Please answer yes or no."
"""MME's question suffix, which lmms-eval's ``mme_doc_to_text`` removes before appending its post prompt."""
POST_PROMPT = "\nAnswer the question using a single word or phrase."
"""lmms-eval's ``mme`` task: the default ``post_prompt``."""
MARGIN = 0.1
"""How far (a share of the image's side) an object's box centre must be from the middle line to be asked about."""
SIDES = {"x": ("on the left side", "on the right side"), "y": ("in the top half", "in the bottom half")}
"""Per axis, the phrase of the low side and of the high side."""


@dataclass(frozen=True)
class PositionQuestion:
    """One question: the object (``"red circle"``), the side phrase asked about, and the answer."""

    object: str
    side: str
    answer: str

    @property
    def question(self) -> str:
        """The question in MME's form (its yes/no suffix included, as MME's rows carry it)."""
        return f"Is the {self.object} {self.side} of the image?{REPLACE_PROMPT}"


def mme_prompt(question: str) -> str:
    """The text lmms-eval's ``mme`` task gives the model for ``question`` (``mme_doc_to_text``, default
    kwargs): the stripped question without :data:`REPLACE_PROMPT`, then :data:`POST_PROMPT`."""
    return f"{question.strip().replace(REPLACE_PROMPT, '')}{POST_PROMPT}"


def side_of(scene: Scene, index: int, axis: str) -> int | None:
    """0 (low side: left / top) or 1 (high side) of object ``index``'s box centre along ``axis``, or None when
    it lies within :data:`MARGIN` of the middle line."""
    if axis not in SIDES:
        raise ValueError(f"axis={axis!r}: must be one of {', '.join(SIDES)}")
    x1, y1, x2, y2 = scene.objects[index].box
    extent = scene.image.size[0 if axis == "x" else 1]
    centre = ((x1 + x2) if axis == "x" else (y1 + y2)) / 2.0 / extent
    if abs(centre - 0.5) < MARGIN:
        return None
    return int(centre > 0.5)


def askable(scene: Scene) -> list[tuple[int, str]]:
    """``(object index, axis)`` pairs a question may be about: objects named alone by their colour and shape,
    along each axis where their side is plain (:func:`side_of`)."""
    names = [(o.color, o.shape) for o in scene.objects]
    return [(k, axis) for k, name in enumerate(names) if names.count(name) == 1
            for axis in SIDES if side_of(scene, k, axis) is not None]


def position_pairs(scene: Scene, rng: np.random.Generator, n_pairs: int) -> list[PositionQuestion]:
    """Up to ``n_pairs`` pairs (at most one per object) of a yes and a no question about ``scene``: an object of
    :func:`askable` with one of its plain axes, asked about its side (yes) and the opposite side (no), in a
    random order within the pair."""
    by_object: dict[int, list[str]] = {}
    for k, axis in askable(scene):
        by_object.setdefault(k, []).append(axis)
    out: list[PositionQuestion] = []
    for k in [sorted(by_object)[int(i)] for i in rng.permutation(len(by_object))][: max(0, n_pairs)]:
        axis = by_object[k][int(rng.integers(len(by_object[k])))]
        side = side_of(scene, k, axis)
        obj = scene.objects[k]
        name = f"{obj.color} {obj.shape}"
        pair = [PositionQuestion(name, SIDES[axis][side], "Yes"), PositionQuestion(name, SIDES[axis][1 - side], "No")]
        out.extend(pair if rng.random() < 0.5 else pair[::-1])
    return out


def hub_features() -> datasets.Features:
    """The `datasets.Features` of lmms-lab/MME (question_id, image, question, answer, category)."""
    from datasets import Features, Value
    from datasets import Image as HFImage

    return Features({"question_id": Value("string"), "image": HFImage(), "question": Value("string"),
                     "answer": Value("string"), "category": Value("string")})


def write_mme_hub_layout(out_dir: str | Path, n_images: int, seed: int, pairs_per_image: int = 1,
                         split: str = "test", first_image_id: int = 0, **scene_kwargs) -> Path:
    """Write one split in lmms-lab/MME's hub layout (``out_dir/data/{split}-00000-of-00001.parquet``, one row per
    question, `hub_features` columns, a README mapping files to splits); ``datasets.load_dataset`` reads it back.

    Scenes come from ``split_seed(seed, "mme-" + split)`` (``scene_kwargs`` go to ``generate_scenes``), questions
    from :func:`position_pairs` with ``split_seed(seed, "mme-questions")``; a scene with nothing askable gets no
    row. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(split_seed(seed, "mme-questions"))
    columns: dict[str, list] = {name: [] for name in hub_features()}
    for scene in generate_scenes(n_images, split_seed(seed, f"mme-{split}"), first_image_id, **scene_kwargs):
        image = {"bytes": encode_image(scene.image, "JPEG"), "path": f"toy_mme_{scene.image_id:012d}.jpg"}
        for k, question in enumerate(position_pairs(scene, rng, pairs_per_image)):
            columns["question_id"].append(f"{CATEGORY}/toy_mme_{scene.image_id:012d}_{k // 2}.jpg")
            columns["image"].append(image)
            columns["question"].append(question.question)
            columns["answer"].append(question.answer)
            columns["category"].append(CATEGORY)
    return write_hub_split(out_dir, split, columns, hub_features(),
                           "Synthetic MME-style position questions in lmms-lab/MME's layout.")
