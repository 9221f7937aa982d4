"""LLM-prefill benchmark of a Qwen-family geometry with its vision tower cut to a few blocks (CPU runs).

``lmms-prune bench`` encodes the visual input twice per cell; for the ``qwen2_5_vl_7b_video`` geometry (32 frames
= 16384 patches through a 32-block tower) that is tens of minutes per encode on one CPU thread, while the LLM
prefill it reports excludes vision. With random weights the LLM's prefill cost does not depend on the tower's
depth, so this script builds the same geometry with ``--vision-depth`` blocks and runs the same ``Bench``
(LLM prefill, selection time, FLOPs, KV cache; no end-to-end timings, whose vision share would be wrong)::

    OMP_NUM_THREADS=1 python scripts/bench_llm_prefill.py --geometry qwen2_5_vl_7b_video --layers 3 \\
        --methods fastv --keep 0.1 --tokens 4096 --repeats 2 --warmup 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmms_prune.bench import Bench, build_geometry, geometries, markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--geometry", default="qwen2_5_vl_7b_video")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vision-depth", type=int, default=1)
    parser.add_argument("--methods", default="fastv")
    parser.add_argument("--keep", default="0.1")
    parser.add_argument("--tokens", default="4096")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--out", default="runs/bench_llm_prefill.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fam, spec = geometries()[args.geometry]
    if not hasattr(fam, "bench_vision"):
        raise SystemExit(f"--geometry {args.geometry}: its family states no bench_vision tower to cut")
    full = fam.bench_vision.__func__
    depth = args.vision_depth
    fam.bench_vision = classmethod(lambda cls, hidden: {**full(cls, hidden), "depth": depth,
                                                        "fullatt_block_indexes": [depth - 1]})
    model = build_geometry(args.geometry, args.layers)
    bench = Bench(model, full_depth=spec["text"][0], repeats=args.repeats, warmup=args.warmup, decode_tokens=1,
                  e2e=False, progress=lambda msg: print(msg, flush=True))
    cells = bench.run([m for m in args.methods.split(",") if m], [float(k) for k in args.keep.split(",")],
                      [int(t) for t in args.tokens.split(",")])
    print(markdown_table(cells, extrapolated=args.layers < spec["text"][0]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([c.__dict__ for c in cells], default=str, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
