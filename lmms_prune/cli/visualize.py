"""``lmms-prune visualize``: which visual tokens each method keeps, drawn on the image side by side.

Writes to ``--out``: ``visualize.png`` (the input image, then one column per method: kept tokens' cells at
full brightness and outlined, pruned cells dimmed; InternVL images with several tiles get two rows, the tile
tokens and the thumbnail tokens, each drawn over the whole image) and ``visualize.json`` (kept counts and
indices, and with ``--box`` the token-box IoU of :func:`lmms_prune.viz.token_box_iou`: pixel IoU between the
union of the kept tokens' cells and the box; for InternVL over all kept tokens, and per view).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

DEFAULT_METHODS = "fastv,d2pruner,deepprune"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub name or local directory of the VLM")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--text", required=True, help="the user prompt (e.g. the RefCOCO grounding prompt)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated presets (lmms-prune methods), default {DEFAULT_METHODS}")
    parser.add_argument("--keep", type=float, default=0.1, help="keep ratio per image (default 0.1)")
    parser.add_argument("--box", default=None,
                        help="x1,y1,x2,y2: the referred object's box in original-image pixels; adds the "
                             "token-box IoU")
    parser.add_argument("--method-args", default=None,
                        help='JSON parameters: {"param": value} for every method, '
                             '{"method": {"param": value}} for one, '
                             'e.g. \'{"d2pruner": {"bias_prior": "prior.pt"}}\'')
    parser.add_argument("--max-num", type=int, default=6, help="InternVL: max tiles per image (default 6)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float16, float32")


def method_configs(methods: str, keep: float, method_args: str | None) -> dict[str, Any]:
    """``{method: PruneConfig}`` for the comma-separated ``methods`` at keep ratio ``keep``, with the
    ``--method-args`` JSON applied (a dict value under a method's name applies to that method only; a plain
    value applies to every listed method that reads it)."""
    from lmms_prune.presets import PRESETS, reads, resolve_config

    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise ValueError(f"--methods {methods!r}: name at least one preset, e.g. {DEFAULT_METHODS}")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods {methods!r}: a method is listed twice")
    try:
        extra = json.loads(method_args) if method_args else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--method-args {method_args!r}: not valid JSON ({exc})") from None
    if not isinstance(extra, dict):
        raise ValueError(f"--method-args {method_args!r}: must be a JSON object")
    common = {k: v for k, v in extra.items() if not isinstance(v, dict)}
    per_method = {k: v for k, v in extra.items() if isinstance(v, dict)}
    unknown = sorted(set(per_method) - set(names))
    if unknown:
        raise ValueError(f"--method-args has parameters for {', '.join(unknown)}, which is not in --methods "
                         f"{methods!r}")
    configs = {}
    for name in names:
        if name not in PRESETS:
            raise ValueError(f"--methods: unknown method {name!r}; choose from {', '.join(PRESETS)}")
        if name == "none":
            raise ValueError("--methods: 'none' keeps every token, there is nothing to show; drop it")
    unread = sorted(k for k in common if not any(reads(name, k) for name in names))
    if unread:
        raise ValueError(f"--method-args: {', '.join(unread)} is read by none of --methods {methods!r}")
    for name in names:
        shared = {k: v for k, v in common.items() if reads(name, k)}  # shared values apply where they are read
        params = {"keep_ratio": keep, **shared, **per_method.get(name, {})}
        configs[name] = resolve_config(name, **params)
    return configs


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from lmms_prune.calibration import open_image
    from lmms_prune.loading import load_model
    from lmms_prune.viz import overlay_kept_tokens, parse_box, plot_overlays, select_tokens, token_box_iou

    configs = method_configs(args.methods, args.keep, args.method_args)  # fail on bad methods before loading
    image = open_image(args.image)
    box = parse_box(args.box, image.size) if args.box else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    sel = select_tokens(model, processor, image, args.text, configs, max_num=args.max_num)
    n = sel.boxes.shape[0]
    panels, captions, results = {}, {}, {}
    for method, kept in sel.kept.items():
        mask = torch.zeros(n, dtype=torch.bool)
        mask[kept] = True
        panels[method] = {view: overlay_kept_tokens(image, sel.boxes[tokens], mask[tokens], box=box)
                          for view, tokens in sel.views.items()}
        result: dict[str, Any] = {"kept": int(kept.numel()), "visual_tokens": n,
                                  "kept_indices": kept.tolist(),
                                  "kept_per_view": {v: int(mask[t].sum()) for v, t in sel.views.items()}}
        caption = f"{kept.numel()}/{n} tokens kept"
        if box is not None:
            result["token_box_iou"] = token_box_iou(sel.boxes, mask, box, image.size)
            caption += f"\ntoken-box IoU {result['token_box_iou']:.3f}"
            if len(sel.views) > 1:
                result["token_box_iou_per_view"] = {
                    v: token_box_iou(sel.boxes[t], mask[t], box, image.size) for v, t in sel.views.items()}
                per_view = result["token_box_iou_per_view"].items()
                caption += " (" + ", ".join(f"{v} {x:.3f}" for v, x in per_view) + ")"
        captions[method], results[method] = caption, result
        print(f"{method:<12} kept {kept.numel()}/{n}" +
              (f"  token-box IoU {result['token_box_iou']:.4f}" if box is not None else ""))
    figure = plot_overlays(image, panels, captions, out / "visualize.png", box=box,
                           title=f"keep {args.keep:g} | {args.text[:80]}")
    summary = {"model": args.model, "image": str(args.image), "text": args.text, "keep_ratio": args.keep,
               "box": list(box) if box else None, "grids": [list(g) for g in sel.grids],
               "views": list(sel.views), "methods": results}
    (out / "visualize.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"wrote {figure} and {out / 'visualize.json'}")
    return 0
