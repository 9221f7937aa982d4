"""``lmms-prune bench``: LLM prefill / TTFT / decode time, where the TTFT goes, FLOPs (LLM prefill and end to end),
KV cache and memory per method and budget (docs/efficiency.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _numbers(flag: str, text: str, kind: type) -> list:
    """``"0.1,0.25"`` -> numbers of ``kind``; a ``ValueError`` naming the flag and the value otherwise."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: write comma-separated {'integers' if kind is int else 'numbers'}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub name or local directory of a real model")
    src.add_argument("--geometry", help="random weights of a real checkpoint's geometry, e.g. internvl2_5-8b "
                     "(each family module's bench_geometries; an unknown name lists them all)")
    parser.add_argument("--layers", "--llm-layers", dest="layers", type=int, default=None,
                        help="run a truncated stack of N decoder layers and extrapolate (--geometry only)")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help="build the vision tower with its first N blocks and extrapolate the vision time to the "
                             "full tower (--geometry only; the vision FLOPs count the full tower)")
    parser.add_argument("--methods", default="fastv,deepprune", help="comma-separated presets (default fastv,deepprune)")
    parser.add_argument("--keep", default="0.1", help="comma-separated keep ratios (default 0.1)")
    parser.add_argument("--tokens", default="1280", help="comma-separated visual-token counts (default 1280 = 5 tiles)")
    parser.add_argument("--method-args", default="{}",
                        help='JSON of per-method parameters, e.g. \'{"d2pruner": {"bias_prior": "p.pt"}}\'')
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end generate timings")
    parser.add_argument("--eager-reference", action="store_true",
                        help="also time the reference scoring path (eager attention, output_attentions=True)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default="runs/bench", help="output folder (bench.json, bench.md, bench.png)")


def run(args: argparse.Namespace) -> int:
    import torch

    from lmms_prune.bench import Bench, build_geometry, check_plan, geometries, write_results
    from lmms_prune.loading import default_device, load_model, resolve_dtype

    if not args.geometry and (args.layers or args.vision_layers):
        raise SystemExit("--layers / --vision-layers work with --geometry only (a checkpoint runs as it is)")
    for name in ("layers", "vision_layers", "repeats", "decode_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {value}: must be >= 1")
    if args.warmup < 0:
        raise SystemExit(f"--warmup {args.warmup}: must be >= 0")
    methods = [m for m in args.methods.split(",") if m]
    keeps, tokens = _numbers("--keep", args.keep, float), _numbers("--tokens", args.tokens, int)
    try:
        method_args = json.loads(args.method_args)
    except ValueError as err:
        raise ValueError(f"--method-args {args.method_args!r}: not JSON ({err})") from None
    stray = sorted(set(method_args) - set(methods)) if isinstance(method_args, dict) else []
    if stray:
        raise ValueError(f"--method-args {','.join(stray)}: not among --methods {','.join(methods)}")
    check_plan(methods, keeps, tokens, method_args)  # before the model loads and the baseline is timed
    device = args.device or default_device()
    if args.threads or device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.geometry:
        try:
            model = build_geometry(args.geometry, args.layers, args.vision_layers,
                                   dtype=resolve_dtype(args.dtype, device))
        except ValueError as err:
            raise SystemExit(str(err)) from None
        model = model.to(device=device)
        full_depth = geometries()[args.geometry][1]["text"][0]
        source = f"random weights, geometry {args.geometry}"
    else:
        model, _ = load_model(args.model, device=device, dtype=args.dtype)
        full_depth = None
        source = args.model
    bench = Bench(model, full_depth=full_depth, repeats=args.repeats, warmup=args.warmup,
                  decode_tokens=args.decode_tokens, e2e=not args.no_e2e, eager_reference=args.eager_reference)
    extrapolated = bench.depth < bench.full_depth or bench.vision_depth < bench.full_vision_depth
    cells = bench.run(methods, keeps, tokens, method_args)
    meta = {"source": source, "device": device, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup,
            "layers_run": bench.depth, "full_depth": bench.full_depth, "vision_layers_run": bench.vision_depth,
            "full_vision_depth": bench.full_vision_depth, "extrapolated": extrapolated}
    paths = write_results(cells, Path(args.out), meta, extrapolated)
    print(f"# lmms-prune bench: {source} on {device}, {meta['dtype']}, {torch.get_num_threads()} thread(s), "
          f"{bench.depth} of {bench.full_depth} decoder layers and {bench.vision_depth} of "
          f"{bench.full_vision_depth} vision blocks run" + (", extrapolated" if extrapolated else ""))
    print(paths["markdown"].read_text())
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return 0
