"""``lmms-prune calibrate``: compute a bias prior (D2Pruner's A_bias) for one model and scoring layer."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub name or local directory of the VLM")
    parser.add_argument("--images", required=True, help="folder of calibration images (the paper: 1000 COCO images)")
    parser.add_argument("--num-images", type=int, default=1000, help="use the first N images (default 1000)")
    parser.add_argument("--layer", type=int, required=True,
                        help="scoring layer = prune_layer - 1 of the method that will use the prior (d2pruner: 1)")
    parser.add_argument("--prompt", default="Please describe the provided image.", help="generic prompt")
    parser.add_argument("--max-num", type=int, default=6, help="InternVL: max tiles per image (default 6)")
    parser.add_argument("--out", required=True, help="output file (.pt)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float16, float32")


def run(args: argparse.Namespace) -> int:
    from lmms_prune.calibration import calibrate_to_file, list_images
    from lmms_prune.loading import load_model

    images = list_images(args.images, args.num_images)
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    path = calibrate_to_file(model, processor, images, args.layer, args.out, prompt=args.prompt,
                             max_num=args.max_num, model_name=args.model)
    print(f"wrote {path} ({len(images)} images, layer {args.layer})")
    return 0
