"""Write tiny local copies of lmms-eval's POPE and MME test splits, in their hub schemas, as parquet.

    python tests/data/make_tiny_eval_data.py        # rewrites tests/data/{pope,mme}_tiny.parquet

The task YAMLs in ``tests/tasks/`` read these files and score them with lmms-eval's own ``utils`` functions.
Images are small deterministic crops of scikit-image's bundled photos (no download).

POPE (``lmms-lab-encoder/POPE``): question_id, question, answer (yes/no), image_source, image, category.
MME (``lmms-lab-encoder/MME``): question_id (image path, shared by the image's two questions), image, question,
answer (Yes/No), category; its aggregation needs both questions of every image.
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


def write(rows: dict[str, list], path: Path) -> Path:
    """Save ``rows`` as a parquet file whose ``image`` column loads back as PIL images."""
    features = datasets.Features({k: datasets.Image() if k == "image" else datasets.Value("string") for k in rows})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def main() -> None:
    write(pope_rows(), HERE / "pope_tiny.parquet")
    write(mme_rows(), HERE / "mme_tiny.parquet")


if __name__ == "__main__":
    main()
