"""``lmms-prune check-method PRESET``: the engine's proofs on a preset, on the tiny model of every family.

See :mod:`lmms_prune.conformance` for what each check proves; docs/extending.md for what it cannot.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", help="preset name (built-in or external: lmms-prune methods lists them)")
    parser.add_argument("--families", default=None,
                        help="comma-separated tiny-model families (default: all of lmms_prune.toy.models.FAMILIES)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter of the preset for every check (repeatable), e.g. --param prune_layer=3")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to this file")


def _params(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param {item!r}: expected KEY=VALUE (e.g. --param prune_layer=3)")
        out[key.strip()] = value.strip()
    return out


def run(args: argparse.Namespace) -> int:
    from lmms_prune.presets import PARAMS, PRESETS, reads, resolve_config
    from lmms_prune.toy.models import FAMILIES

    if args.preset not in PRESETS:
        raise ValueError(f"preset {args.preset!r}: unknown; choose one of {', '.join(PRESETS)} (external methods: "
                         "install their package or name the module in LMMS_PRUNE_METHODS)")
    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"--families {args.families!r}: unknown {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(FAMILIES)}")
    params = _params(args.param)
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ValueError(f"--param: unknown pruning parameter(s) {', '.join(unknown)}; valid ones: "
                         f"{', '.join(sorted(PARAMS))}")
    if reads(args.preset, "bias_prior") and "bias_prior" not in params:
        for key, value in params.items():  # the prior is calibrated on each tiny model; the values are checked now
            PARAMS[key].parse(value)
    else:
        resolve_config(args.preset, **params)

    from lmms_prune.conformance import check_method, table, write_json

    results = check_method(args.preset, families, params, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"check-method {args.preset}")
    print(table(results))
    failed = [r for r in results if r.status == "fail"]
    if not any(r.status == "pass" for r in results):
        print(f"nothing ran: {args.preset} is refused on every family given (see the reasons above)")
    if args.json:
        print(f"wrote {write_json(results, args.json, args.preset)}")
    print(f"{'FAILED' if failed else 'passed'}: {len(failed)} failure(s), "
          f"{sum(r.status == 'pass' for r in results)} pass, {sum(r.status == 'n/a' for r in results)} n/a")
    return 1 if failed else 0
