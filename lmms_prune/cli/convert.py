"""``lmms-prune convert-internvl SRC DST``: an original InternVL2 / InternVL2.5 checkpoint (remote-code layout) ->
a transformers-native ``InternVLForConditionalGeneration`` directory (see :mod:`lmms_prune.convert.internvl`)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="original checkpoint: local directory or hub id (e.g. OpenGVLab/InternVL2_5-8B)")
    parser.add_argument("dst", help="output directory of the native checkpoint: new, empty, or an earlier "
                                    "conversion output")
    parser.add_argument("--overwrite", action="store_true",
                        help="convert into a non-empty DST that is not an earlier conversion output (its config.json "
                             "and model*.safetensors are replaced)")


def run(args: argparse.Namespace) -> int:
    from lmms_prune.convert.internvl import convert_internvl

    try:
        convert_internvl(args.src, args.dst, log=lambda message: print(message, file=sys.stderr),
                         overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        print(f"lmms-prune convert-internvl: error: {err}", file=sys.stderr)
        return 1
    print(f"converted {args.src} -> {args.dst}; load it with --model_args pretrained={args.dst}")
    return 0
