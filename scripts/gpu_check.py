"""GPU evidence in one run: the engine's equivalence proofs in fp32 and bf16, the efficiency bench at the papers'
budgets, and the SDPA kernel the pruned layers use. Run it through ``scripts/gpu_check.sh OUT``.

It uses the machine's own torch and installs nothing. It writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``.

1. Equivalence: ``tests/test_engine.py``'s proofs (keep-all equals unpruned; prune equals mask mode at prefill
   and every cached decode step; cache equals recomputation; a left-padded batch equals its samples) on the
   device in fp32 and bf16 (tolerances per dtype are stated in tests/test_engine.py), plus the argmax agreement
   of pruned and mask-mode logits at every position in bf16.
2. Bench (random weights, bf16 on CUDA, every geometry at full depth: all decoder layers, the whole vision
   tower): InternVL2.5-8B geometry with 7 tiles (1792 visual tokens) and LLaVA-NeXT-7B (2880 visual tokens,
   where that family exists); fastv, d2pruner, deepprune, vispruner and pyramiddrop (where present) at 10% and
   11.1% (= 320 of 2880); then the README's CPU rows at full depth: InternVL2.5-1B (1280 tokens; fastv,
   deepprune at 10%) and the Qwen2.5-VL-7B video (4096 tokens; fastv, temporal at 10%). Per cell: measured
   prefill speed-up against the theoretical FLOPs speed-up, the TTFT speed-up against the end-to-end FLOPs
   ratio (vision tower included), where the TTFT goes (vision, hand-over), decode ms/token, KV bytes, selection
   time as a share of the unpruned prefill, and the eager reference path, side by side. Layer times come from
   CUDA events after warm-ups.
3. SDPA kernels: for batch 1 no attention mask reaches the pruned layers, so SDPA may pick flash; the
   profiler names the SDPA kernels that ran in one pruned prefill.

``--small`` runs the same code on the tiny toy models (any device), so the whole script is proven on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
EQUIVALENCE = "keep_all_equals_unpruned or prune_equals_mask_mode or kv_cache_decoding or left_padded_batch"
METHODS = ("fastv", "d2pruner", "deepprune", "vispruner", "pyramiddrop")


def run_equivalence(device: str, dtype: str, small: bool, out: Path) -> dict[str, Any]:
    """tests/test_engine.py's equivalence proofs on ``device`` in ``dtype``: counts of passed/failed tests."""
    junit = out / f"equivalence_{dtype}.xml"
    select = f"({EQUIVALENCE})" + (" and internvl_qwen2" if small else "")
    env = dict(os.environ, LMMS_PRUNE_TEST_DEVICE=device, LMMS_PRUNE_TEST_DTYPE=dtype)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_engine.py"),
           "-k", select, f"--junitxml={junit}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None
              or case.find("error") is not None]
    return {"dtype": dtype, **counts, "passed": counts["tests"] - counts["failures"] - counts["errors"]
            - counts["skipped"], "failed_tests": failed, "seconds": time.perf_counter() - t0,
            "returncode": done.returncode, "tail": done.stdout[-1500:] if done.returncode else ""}


def argmax_agreement(device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Pruned vs mask-mode prefill logits of a tiny model at K=2: max |diff| and top-1 agreement per position."""
    import lmms_prune
    from lmms_prune.toy.models import build_processor, build_tiny_model

    out = {}
    for family in ("internvl_qwen2", "qwen2_5_vl", "llava"):
        model = build_tiny_model(family, dtype=dtype).to(device)
        proc = build_processor(family)
        from PIL import Image
        from skimage import data as skdata

        image = Image.fromarray(skdata.coffee()).resize((300, 200))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the cup?"}]}]
        prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
        kwargs = {"images_kwargs": {"max_patches": 2}} if family.startswith("internvl") else {}
        inputs = proc(images=[image], text=[prompt], return_tensors="pt", **kwargs).to(device)
        for key, value in inputs.items():
            if value.is_floating_point():
                inputs[key] = value.to(dtype)
        n = int((inputs["input_ids"] == model.config.image_token_id).sum())
        keep = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 7].tolist())
        with torch.no_grad():
            with lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=2, mode="mask"):
                masked = model(**inputs).logits
            with lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=2) as handle:
                pruned = model(**inputs).logits
                index = handle.state.keep_index[0]
        ref = masked[0, index].float()
        out[family] = {"max_abs_diff": float((pruned[0].float() - ref).abs().max()),
                       "argmax_agreement": float((pruned[0].argmax(-1) == ref.argmax(-1)).float().mean()),
                       "positions": int(index.numel())}
    return out


def sdpa_kernels(model: torch.nn.Module, inputs: dict[str, Any], method: str, params: dict[str, Any]) -> dict:
    """Which SDPA kernels one pruned prefill ran, and whether the pruned layers got an attention mask."""
    import lmms_prune
    from lmms_prune.families import get_adapter

    adapter = get_adapter(model)
    masks: list[bool] = []
    with torch.no_grad(), lmms_prune.apply(model, method, **params) as handle:
        k = handle.config.prune_layer or 0
        hooks = [layer.register_forward_pre_hook(
            lambda m, a, kw: masks.append(kw.get("attention_mask") is not None), with_kwargs=True)
            for layer in adapter.layers[k:]]
        with torch.profiler.profile() as prof:
            model(**inputs, use_cache=True)
        for h in hooks:
            h.remove()
    names: dict[str, int] = {}
    for event in prof.key_averages():
        if "scaled_dot_product" in event.key or "flash" in event.key.lower() or "efficient_attention" in event.key:
            names[event.key] = names.get(event.key, 0) + int(event.count)
    return {"method": method, "pruned_layers": len(masks), "pruned_layers_with_mask": sum(masks),
            "sdpa_ops": names}


def bench_cells(spec: dict[str, Any], device: str, dtype: torch.dtype, repeats: int, out: Path) -> dict[str, Any]:
    """One geometry's bench: every method at every keep ratio beside the unpruned model."""
    from lmms_prune.bench import Bench, build_geometry, synthetic_inputs
    from lmms_prune.engine.prior import prior_fingerprint_from_config, save_prior
    from lmms_prune.presets import PRESETS
    from lmms_prune.toy.models import tiny_model_dir

    if spec["kind"] == "toy":
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(spec["toy"])).eval()
    else:
        model = build_geometry(spec["geometry"], spec.get("layers"), dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    inputs = synthetic_inputs(model, spec["tokens"])
    methods = [m for m in spec.get("methods", METHODS) if m in PRESETS]
    extra: dict[str, dict[str, Any]] = {}
    if "d2pruner" in methods:  # a prior from this model's own attention on the synthetic input
        import lmms_prune

        prior_path = out / f"prior_{spec['name']}.pt"
        with torch.no_grad(), lmms_prune.apply(model, "fastv", keep_ratio=1.0, prune_layer=2, score_layer=1) as h:
            model(**{k: v.to(device) for k, v in inputs.items()})
            scores = h.records[0].scores[0].float()
        save_prior(prior_path, {scores.numel(): scores}, {scores.numel(): 1},
                   {"model": getattr(model.config, "_name_or_path", ""), "score_layer": 1, "prompt": "synthetic",
                    "fingerprint": prior_fingerprint_from_config(model.config, 1, "synthetic")})
        extra["d2pruner"] = {"bias_prior": str(prior_path)}
    depth = len(model.model.language_model.layers)
    if "pyramiddrop" in methods:
        # keep_ratio is PyramidDrop's average kept per layer (its FLOPs-equivalent budget): at 10% its first stage
        # must come early for that average to be reachable, so stages at 1, L/4 and L/2
        extra["pyramiddrop"] = {"prune_layers": f"1,{max(2, depth // 4)},{max(3, depth // 2)}"}
    if depth <= 12:  # deepprune's K=12 needs 13 layers
        methods = [m for m in methods if m != "deepprune"]
    bench = Bench(model, full_depth=spec.get("full_depth"), repeats=repeats, warmup=1, decode_tokens=8,
                  e2e=True, eager_reference=spec.get("eager_reference", True), progress=lambda msg: print(f"[{spec['name']}] {msg}", flush=True))
    cells = bench.run(methods, spec["keeps"], [spec["tokens"]], extra)
    params = {"keep_ratio": spec["keeps"][0], **extra.get("fastv", {})}
    kernels = sdpa_kernels(model, {k: v.to(device) for k, v in inputs.items()}, "fastv", params)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    from dataclasses import asdict

    return {"spec": spec, "cells": [asdict(c) for c in cells], "sdpa": kernels}


def geometries(small: bool) -> list[dict[str, Any]]:
    from lmms_prune.bench import geometries as table

    if small:
        return [{"name": "toy-internvl", "kind": "toy", "toy": "internvl_llama", "tokens": 512, "keeps": [0.1, 0.111]},
                {"name": "toy-llava", "kind": "toy", "toy": "llava", "tokens": 576, "keeps": [0.1, 0.111]}]
    specs = [{"name": "internvl2_5-8b", "kind": "geometry", "geometry": "internvl2_5-8b", "tokens": 1792,
              "keeps": [0.1, 0.111]}]
    names = table()
    if "llava-next-7b" in names:
        specs.append({"name": "llava-next-7b", "kind": "geometry", "geometry": "llava-next-7b", "tokens": 2880,
                      "keeps": [0.1, 0.111]})
    # the README's CPU rows (truncated there), at full depth in bf16
    specs.append({"name": "internvl2_5-1b", "kind": "geometry", "geometry": "internvl2_5-1b", "tokens": 1280,
                  "keeps": [0.1], "methods": ("fastv", "deepprune")})
    if "qwen2_5_vl_7b_video" in names:
        specs.append({"name": "qwen2_5_vl_7b_video", "kind": "geometry", "geometry": "qwen2_5_vl_7b_video",
                      "tokens": 4096, "keeps": [0.1], "methods": ("fastv", "temporal"), "eager_reference": False})
    return specs


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# lmms-prune GPU check: {report['machine']['device_name']}", "",
             f"torch {report['machine']['torch']}, transformers {report['machine']['transformers']}, "
             f"{report['seconds']:.0f} s in all.", "", "## Equivalence proofs", "",
             "| dtype | tests | passed | failed |", "|---|---|---|---|"]
    for eq in report["equivalence"]:
        lines.append(f"| {eq['dtype']} | {eq['tests']} | {eq['passed']} | {eq['failures'] + eq['errors']} |")
    lines += ["", "bf16 pruned vs mask-mode prefill logits (K=2):", "", "| family | max abs diff | argmax agreement |",
              "|---|---|---|"]
    for family, row in report["argmax_bf16"].items():
        lines.append(f"| {family} | {row['max_abs_diff']:.3g} | {100 * row['argmax_agreement']:.1f}% |")
    for geo in report["bench"]:
        lines += ["", f"## Bench: {geo['spec']['name']} ({geo['spec']['tokens']} visual tokens)", "",
                  "| method | keep | kept | prefill speed-up | theory | measured/theory | TTFT s | TTFT speed-up | "
                  "e2e theory | vision s | hand-over ms | decode ms/tok | KV MiB | select/prefill | eager prefill s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in geo["cells"]:
            lines.append(
                f"| {c['method']} | {c['keep_ratio']:g} | {c['kept_tokens']} | {c['speedup']:.2f} | "
                f"{c['theoretical_speedup']:.2f} | {c['measured_over_theoretical']:.2f} | {c['ttft_s']['min']:.4f} | "
                f"{c['ttft_speedup']:.2f} | {c['e2e_theoretical_speedup']:.2f} | {c['vision_s']:.4f} | "
                f"{1000 * c['ttft_parts']['handover']:.2f} | "
                f"{1000 * c['decode_per_token_s']:.2f} | {c['kv_bytes'] / 2**20:.1f} | "
                f"{100 * c['select_over_unpruned_prefill']:.2f}% | "
                f"{c['eager_reference'].get('llm_prefill_s', float('nan')):.4f} |")
        s = geo["sdpa"]
        lines += ["", f"SDPA in the pruned layers ({s['method']}): {s['pruned_layers_with_mask']} of "
                  f"{s['pruned_layers']} pruned layer calls got an attention mask; kernels: "
                  + (", ".join(f"{k} x{v}" for k, v in s["sdpa_ops"].items()) or "none recorded")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory (gpu_check.json, gpu_check.md)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--small", action="store_true", help="tiny toy models instead of the real geometries")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (default 5, small 1)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; use --device cpu --small", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    import transformers

    machine = {"device": args.device, "torch": torch.__version__, "transformers": transformers.__version__,
               "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
               or platform.machine(), "small": args.small}
    equivalence = [run_equivalence(args.device, dtype, args.small, out) for dtype in ("float32", "bfloat16")]
    agreement = argmax_agreement(args.device, torch.bfloat16)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    repeats = args.repeats or (1 if args.small else 5)
    bench = [bench_cells(spec, args.device, dtype, repeats, out) for spec in geometries(args.small)]
    report = {"machine": machine, "equivalence": equivalence, "argmax_bf16": agreement, "bench": bench,
              "seconds": time.perf_counter() - t0}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print((out / "gpu_check.md").read_text())
    ok = all(eq["returncode"] == 0 and eq["passed"] == eq["tests"] > 0 for eq in equivalence)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
