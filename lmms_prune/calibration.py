"""Bias-prior calibration (D2Pruner's A_bias): the mean last-token attention over many images.

The paper averages the text-to-vision attention of 1000 COCO images under a generic prompt ("Please describe
the provided image."). We run the model through the engine with nothing pruned and the scoring layer set,
read each image's attention row from the prefill records, and average per visual-token count (a layout: an
InternVL tile count, a Qwen2.5-VL grid size), keeping the metadata the prior is only valid for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from lmms_prune.engine import apply
from lmms_prune.engine.prior import Prior, prior_fingerprint_from_config, save_prior
from lmms_prune.families import family_for_processor, family_of, get_adapter

DEFAULT_PROMPT = "Please describe the provided image."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Image files of ``folder`` in name order (the first ``limit``, an int >= 1; None: all); a clear error if
    there are none."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--num-images {limit!r}: must be an integer >= 1 (the paper uses 1000 COCO images)")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {str(folder)!r}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--images {str(folder)!r}: no {'/'.join(IMAGE_SUFFIXES)} files in it")
    return files if limit is None else files[:limit]


def open_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises several types for unreadable files
        raise ValueError(f"image {str(path)!r} is unreadable ({exc}); remove it or convert it to JPEG/PNG") from exc


def single_image_inputs(processor: Any, image: Image.Image, prompt: str, max_num: int | None = None,
                        family: Any = None) -> dict:
    """Processor inputs for one image and one user prompt, through the model's own chat template.

    ``max_num``: the tile budget of families that tile (InternVL); ``family``: the model, its family name or
    class (default: the family whose processor class this is)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    fam = family_of(family) if family is not None else family_for_processor(processor)
    kwargs = fam.image_kwargs(max_num) if fam is not None else {}
    images = fam.standalone_images([image], processor) if fam is not None else [image]  # LLaVA-1.5: pad-to-square
    return processor(images=images, text=[text], return_tensors="pt", **kwargs)


@torch.no_grad()
def calibrate_prior(
    model: torch.nn.Module,
    processor: Any,
    images: Iterable[Image.Image | str | Path],
    layer: int,
    prompt: str = DEFAULT_PROMPT,
    max_num: int | None = 6,
    model_name: str | None = None,
    total: int | None = None,
) -> Prior:
    """Average the last prompt token's attention at decoder ``layer`` over ``images``, per token layout."""
    depth = get_adapter(model).num_layers
    if not 0 <= layer < depth - 1:
        raise ValueError(f"--layer {layer}: must be in [0, {depth - 2}] for this {depth}-layer model")
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    layouts: dict[int, list[list[int]]] = {}
    device = next(model.parameters()).device
    with apply(model, "fastv", keep_ratio=1.0, prune_layer=layer + 1, score_layer=layer) as handle:
        for item in tqdm(images, total=total, desc=f"calibrating layer {layer}", unit="img"):
            image = item if isinstance(item, Image.Image) else open_image(item)
            inputs = single_image_inputs(processor, image, prompt, max_num, family=model).to(device)
            model(**inputs)
            record = handle.records[0]
            for span, scores in zip(record.spans, record.scores):
                n = span.num_visual
                sums[n] = sums.get(n, torch.zeros(n)) + scores.float()
                counts[n] = counts.get(n, 0) + 1
                layouts[n] = [list(g) for g in span.grids]
    if not counts:
        raise ValueError("no image produced visual tokens: nothing to calibrate")
    means = {n: sums[n] / counts[n] for n in sums}
    meta = {
        "model": model_name or getattr(model.config, "_name_or_path", ""),
        "score_layer": layer,
        "prompt": prompt,
        "num_images": sum(counts.values()),
        "layouts": {str(n): layouts[n] for n in layouts},
        "max_num": max_num,
        "fingerprint": prior_fingerprint_from_config(model.config, layer, prompt),
    }
    return Prior(means, counts, meta)


def calibrate_to_file(model, processor, image_paths: Sequence[Path], layer: int, out: str | Path, **kw) -> Path:
    prior = calibrate_prior(model, processor, image_paths, layer, total=len(image_paths), **kw)
    return save_prior(out, prior.means, prior.counts, prior.meta)
