"""Write tiny local copies of lmms-eval's POPE and MME test splits, in their hub schemas, as parquet.

    python tests/data/make_tiny_eval_data.py        # rewrites tests/data/{pope,mme,seedbench,seedbench_text}_tiny.parquet

The task YAMLs in ``tests/tasks/`` read these files and score them with lmms-eval's own ``utils`` functions.
Images are small deterministic crops of scikit-image's bundled photos (no download).

POPE (``lmms-lab-encoder/POPE``): question_id, question, answer (yes/no), image_source, image, category.
MME (``lmms-lab-encoder/MME``): question_id (image path, shared by the image's two questions), image, question,
answer (Yes/No), category; its aggregation needs both questions of every image.
SEED-Bench (``lmms-lab-encoder/SEED-Bench``, its multiple-choice ``seedbench_ppl`` task): question_id, question,
choice_a..choice_d, answer (A-D), data_type, question_type_id, image (a list of images); the text-only copy
has empty image lists (lmms-eval's ``llava_hf`` scores loglikelihoods of image prompts only with the
transformers 4 processors, which left ``<image>`` unexpanded).
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import skimage.data
from PIL import Image

HERE = Path(__file__).resolve().parent
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _photo(name: str, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").resize(size)


def pope_rows(n: int = 8) -> dict[str, list]:
    """``n`` POPE questions, alternating yes/no answers, over the bundled photos."""
    objects = ("person", "cup", "cat", "rocket", "dog", "car", "chair", "tree")
    rows: dict[str, list] = {k: [] for k in ("question_id", "question", "answer", "image_source", "image",
                                             "category")}
    for i in range(n):
        photo = PHOTOS[i % len(PHOTOS)]
        rows["question_id"].append(str(i + 1))
        rows["question"].append(f"Is there a {objects[i % len(objects)]} in the image?")
        rows["answer"].append("yes" if i % 2 == 0 else "no")
        rows["image_source"].append(f"skimage_{photo}")
        rows["image"].append(_photo(photo, (96 + 16 * (i % 3), 64 + 16 * (i % 2))))
        rows["category"].append(("adversarial", "popular", "random")[i % 3])
    return rows


def mme_rows(n_images: int = 4) -> dict[str, list]:
    """Two questions (a Yes and a No) for each of ``n_images`` images, as in MME."""
    categories = ("existence", "color", "count", "commonsense_reasoning")
    rows: dict[str, list] = {k: [] for k in ("question_id", "image", "question", "answer", "category")}
    for i in range(n_images):
        photo, category = PHOTOS[i % len(PHOTOS)], categories[i % len(categories)]
        image = _photo(photo, (80 + 16 * i, 64))
        for answer, thing in (("Yes", photo), ("No", "zebra")):
            rows["question_id"].append(f"{category}/{i:04d}.png")
            rows["image"].append(image)
            rows["question"].append(f"Is there a {thing} in this image? Please answer yes or no.")
            rows["answer"].append(answer)
            rows["category"].append(category)
    return rows


def seedbench_rows(n: int = 4, images: bool = True) -> dict[str, list]:
    """``n`` four-choice SEED-Bench questions (one image each, or none), answers cycling A-D."""
    keys = ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_type",
            "question_type_id", "image")
    rows: dict[str, list] = {k: [] for k in keys}
    for i in range(n):
        photo = PHOTOS[i % len(PHOTOS)]
        choices = [PHOTOS[(i + k) % len(PHOTOS)] for k in range(4)]  # the true one is choice (i % 4)
        choices = choices[-(i % 4):] + choices[:-(i % 4)] if i % 4 else choices
        rows["question_id"].append(f"seed_{i}")
        rows["question"].append("What is the main subject of the image?")
        for letter, choice in zip("abcd", choices):
            rows[f"choice_{letter}"].append(f"a {choice}")
        rows["answer"].append("ABCD"[choices.index(photo)])
        rows["data_type"].append("image")
        rows["question_type_id"].append(str(1 + i % 9))
        rows["image"].append([_photo(photo, (80 + 16 * (i % 3), 64))] if images else [])
    return rows


def write(rows: dict[str, list], path: Path) -> Path:
    """Save ``rows`` as a parquet file whose ``image`` column (one image, or a list) loads back as PIL images."""
    image = datasets.Sequence(datasets.Image()) if rows["image"] and isinstance(rows["image"][0], list) \
        else datasets.Image()
    features = datasets.Features({k: image if k == "image" else datasets.Value("string") for k in rows})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def main() -> None:
    write(pope_rows(), HERE / "pope_tiny.parquet")
    write(mme_rows(), HERE / "mme_tiny.parquet")
    write(seedbench_rows(), HERE / "seedbench_tiny.parquet")
    write(seedbench_rows(images=False), HERE / "seedbench_text_tiny.parquet")


if __name__ == "__main__":
    main()
