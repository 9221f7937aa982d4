"""POPE-style yes/no object-existence questions about synthetic scenes, written in lmms-lab/POPE's layout.

POPE (Li et al., 2023, "Evaluating Object Hallucination in Large Vision-Language Models") asks "Is there a
<object> in the image?" about objects that are in the image (answer yes) and, as many times, about objects
that are not (answer no). The absent objects are drawn by one of three samplings; each gives a category
(``random``, ``popular``, ``adversarial``) with its own half of yes questions. Here an object is a colour and
shape of :mod:`lmms_prune.toy.data` ("red circle") and two samplings exist:

- ``random``: any colour/shape combination absent from the scene, uniformly (POPE's random sampling);
- ``adversarial``: an absent combination that shares its shape or its colour with an object in the scene
  (POPE samples absent objects that co-occur with present ones; here the near misses are a present shape in
  another colour, or a present colour on another shape, so the answer needs the binding of colour to shape).

The question text is POPE's; lmms-eval's ``pope`` task appends :data:`POST_PROMPT` (its default
``post_prompt``), so a model trained on :func:`pope_prompt` sees exactly what lmms-eval asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmms_prune.toy.data import (
    PALETTE,
    SHAPES,
    Scene,
    encode_image,
    generate_scenes,
    split_seed,
    write_hub_split,
)

if TYPE_CHECKING:
    import datasets

POST_PROMPT = "\nAnswer the question using a single word or phrase."
"""lmms-eval's ``pope`` task: the default ``post_prompt`` appended to every question."""
CATEGORIES = ("random", "adversarial")
Combination = tuple[str, str]  # (colour, shape)


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question: the object asked about (``"red circle"``), the answer (``"yes"``/``"no"``) and the
    category of the negative sampling its pair belongs to."""

    object: str
    answer: str
    category: str

    @property
    def question(self) -> str:
        """POPE's question, with the article English wants (``"Is there an orange star in the image?"``)."""
        article = "an" if self.object[0] in "aeiou" else "a"
        return f"Is there {article} {self.object} in the image?"


def pope_prompt(question: str) -> str:
    """The text lmms-eval's ``pope`` task gives the model for ``question`` (``pope_doc_to_text``, default
    kwargs): the stripped question, then :data:`POST_PROMPT`."""
    return f"{question.strip()}{POST_PROMPT}"


def present_combinations(scene: Scene) -> list[Combination]:
    """The distinct ``(colour, shape)`` of the scene's objects, sorted."""
    return sorted({(obj.color, obj.shape) for obj in scene.objects})


def absent_combinations(scene: Scene, category: str) -> list[Combination]:
    """Colour/shape combinations not in ``scene`` that ``category``'s sampling draws from, sorted: every absent
    one (``random``), or the absent ones sharing a shape or a colour with a present object (``adversarial``)."""
    if category not in CATEGORIES:
        raise ValueError(f"category={category!r}: must be one of {', '.join(CATEGORIES)}")
    present = set(present_combinations(scene))
    absent = [(c, s) for c in PALETTE for s in SHAPES if (c, s) not in present]
    if category == "adversarial":
        colours, shapes = {c for c, _ in present}, {s for _, s in present}
        absent = [(c, s) for c, s in absent if c in colours or s in shapes]
    return sorted(absent)


def pope_pairs(scene: Scene, rng: np.random.Generator, n_pairs: int, adversarial_share: float = 0.5,
               ) -> list[PopeQuestion]:
    """``n_pairs`` (at most one per present combination) of one yes and one no question about ``scene``.

    The yes questions name distinct present combinations; each is paired with a distinct absent one, drawn
    by the adversarial sampling with probability ``adversarial_share`` (when the scene has an absent near
    miss left) and by the random one otherwise. Both questions of a pair carry the negative's category, as
    POPE's category splits each hold their own yes questions. Order: yes, no, yes, no, ...
    """
    if not 0.0 <= adversarial_share <= 1.0:
        raise ValueError(f"adversarial_share={adversarial_share}: must be in [0, 1]")
    present = present_combinations(scene)
    used: set[Combination] = set()
    out: list[PopeQuestion] = []
    for k in rng.permutation(len(present))[: max(0, n_pairs)]:
        category = "adversarial" if rng.random() < adversarial_share else "random"
        pool = [c for c in absent_combinations(scene, category) if c not in used]
        if not pool:
            category, pool = "random", [c for c in absent_combinations(scene, "random") if c not in used]
        negative = pool[int(rng.integers(len(pool)))]
        used.add(negative)
        out.append(PopeQuestion(" ".join(present[int(k)]), "yes", category))
        out.append(PopeQuestion(" ".join(negative), "no", category))
    return out


def hub_features() -> datasets.Features:
    """The `datasets.Features` of lmms-lab/POPE (question_id, question, answer, image_source, image, category)."""
    from datasets import Features, Value
    from datasets import Image as HFImage

    return Features({"question_id": Value("string"), "question": Value("string"), "answer": Value("string"),
                     "image_source": Value("string"), "image": HFImage(), "category": Value("string")})


def write_pope_hub_layout(out_dir: str | Path, n_images: int, seed: int, pairs_per_image: int = 2,
                          adversarial_share: float = 0.5, split: str = "test", first_image_id: int = 0,
                          **scene_kwargs) -> Path:
    """Write one split in lmms-lab/POPE's hub layout (``out_dir/data/{split}-00000-of-00001.parquet``, one row per
    question, `hub_features` columns, a README mapping files to splits); ``datasets.load_dataset`` reads it back.

    Scenes come from ``split_seed(seed, "pope-" + split)`` (``scene_kwargs`` go to ``generate_scenes``), questions
    from :func:`pope_pairs` with ``split_seed(seed, "pope-questions")``. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(split_seed(seed, "pope-questions"))
    columns: dict[str, list] = {name: [] for name in hub_features()}
    for scene in generate_scenes(n_images, split_seed(seed, f"pope-{split}"), first_image_id, **scene_kwargs):
        source = f"toy_pope_{scene.image_id:012d}"
        image = {"bytes": encode_image(scene.image, "JPEG"), "path": source + ".jpg"}
        for k, question in enumerate(pope_pairs(scene, rng, pairs_per_image, adversarial_share)):
            columns["question_id"].append(f"{split}_{scene.image_id}_{k}")
            columns["question"].append(question.question)
            columns["answer"].append(question.answer)
            columns["image_source"].append(source)
            columns["image"].append(image)
            columns["category"].append(question.category)
    return write_hub_split(out_dir, split, columns, hub_features(),
                           "Synthetic POPE-style object-existence questions in lmms-lab/POPE's layout.")
