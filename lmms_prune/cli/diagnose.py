"""``lmms-prune diagnose``: the deep-layer paper's Phase-0 table (section 4.4, Table 3) for one model.

Writes to ``--out``: ``diagnose.csv`` and ``diagnose.md`` (one row per layer: prompt stability, position
correlation, entropy; definitions in :mod:`lmms_prune.diagnostics`) and ``attention_maps_<layout>.png``
(the mean attention map per layer and tile, one figure per visual-token layout found among the images).
"""

from __future__ import annotations

import argparse

DEFAULT_LAYERS = "1,2,3,4,8,12"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub name or local directory of the VLM")
    parser.add_argument("--images", required=True, help="folder of images (the paper: 30 COCO images)")
    parser.add_argument("--prompts", required=True,
                        help="text file with one prompt template per line, at least 2 (the paper: 5)")
    parser.add_argument("--layers", default=DEFAULT_LAYERS,
                        help="comma-separated paper layer numbers; layer L = attention of decoder layer "
                             f"index L-1, the score of prune layer K=L (default {DEFAULT_LAYERS})")
    parser.add_argument("--num-images", type=int, default=30, help="use the first N images (default 30)")
    parser.add_argument("--max-num", type=int, default=6, help="InternVL: max tiles per image (default 6)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float16, float32")


def _markdown(args: argparse.Namespace, rows: list[dict], n_images: int, prompts: list[str],
              figures: list[tuple[str, str, int]]) -> str:
    from lmms_prune.diagnostics import markdown_table

    lines = [
        "# Phase-0 attention diagnostics",
        "",
        f"Model `{args.model}`, {n_images} images from `{args.images}`, {len(prompts)} prompt templates "
        f"({n_images * len(prompts)} forward passes), InternVL max_num={args.max_num}.",
        "",
        markdown_table(rows),
        "- `layer`: the paper's layer number L (the score of prune layer K=L); `score_layer` = decoder layer "
        "index L-1 whose last-prompt-token attention is measured.",
        "- `prompt_stability`: mean pairwise cosine similarity of one image's maps across templates, "
        "averaged over images.",
        "- `position_correlation`: Spearman rho between attention and token position (mean over maps; "
        "`_abs`: mean |rho|). |rho| >= 0.3 would be a meaningful positional bias (paper, section 4.4).",
        "- `entropy`: natural-log entropy of the map normalised over the visual tokens (mean over maps); "
        "`max_entropy` = mean ln N, the uniform map's entropy.",
        "",
        "Prompt templates:",
        "",
        *[f"{i + 1}. {p}" for i, p in enumerate(prompts)],
        "",
        "Mean attention maps (rows: layers, columns: tiles; one colour scale per row):",
        "",
    ]
    for key, filename, count in figures:
        lines += [f"- layout `{key}` ({count} images): ![{key}]({filename})"]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmms_prune import diagnostics as D
    from lmms_prune.calibration import list_images
    from lmms_prune.loading import load_model
    from lmms_prune.viz import grid_labels, model_family, plot_attention_maps

    if args.num_images is not None and args.num_images < 1:
        raise ValueError(f"--num-images {args.num_images}: must be >= 1")
    layers = D.parse_layers(args.layers)
    prompts = D.read_prompts(args.prompts)
    images = list_images(args.images, args.num_images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    family = model_family(model)
    per_image = D.collect_attention(model, processor, images, prompts, layers, max_num=args.max_num)
    rows = D.phase0_table(per_image)
    D.write_csv(rows, out / "diagnose.csv")
    figures = []
    groups = D.mean_maps_by_layout(per_image, family, processor, args.max_num)
    for key, (example, means, count) in groups.items():
        labels = grid_labels(family, example.image_size, example.grids, processor, max_num=args.max_num)
        filename = f"attention_maps_{key}.png"
        plot_attention_maps({f"layer {x}": means[x] for x in sorted(means)}, example.grids, labels,
                            out / filename, title=f"{Path(args.model).name}: mean attention, layout {key}, "
                                                  f"{count} images x {len(prompts)} prompts")
        figures.append((key, filename, count))
    text = _markdown(args, rows, len(per_image), prompts, figures)
    (out / "diagnose.md").write_text(text, encoding="utf-8")
    print(D.markdown_table(rows), end="")
    print(f"wrote {out / 'diagnose.csv'}, {out / 'diagnose.md'} and {len(figures)} attention-map figure(s)")
    return 0
