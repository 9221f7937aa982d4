"""``lmms-prune demo``: the whole evaluation on CPU, offline, in a few minutes.

1. writes two held-out synthetic tasks from the distribution the shipped tiny grounding model was trained on:
   a RefCOCO ``val`` split (lmms-lab/RefCOCO's layout) and a POPE-style yes/no object-existence split
   (lmms-lab/POPE's layout, :mod:`lmms_prune.toy.pope`, :data:`POPE_PAIRS` pairs per image);
2. calibrates D2Pruner's bias prior on other synthetic images;
3. runs lmms-eval (``accelerate launch -m lmms_eval``) with the package's tasks ``refcoco_ground_val`` and
   ``pope_local`` (lmms-eval's ``pope`` prompt and scoring on the written split) for ``none``, ``fastv``,
   ``d2pruner``, ``deepprune``, ``vispruner``, ``random``, ``pyramiddrop``, ``visionzip``, ``fastervlm``,
   ``cdpruner``, ``sparsevlm``, ``prumerge_plus``, ``feather``, ``mustdrop`` and ``vscan`` at 10% visual tokens
   (a resumable sweep; for the multi-stage pyramiddrop, sparsevlm and feather, 10% is the average visual tokens
   per decoder layer, see :data:`DEMO_METHOD_ARGS`);
4. prints a leaderboard per task (acc@0.5 or yes/no accuracy, % of unpruned, visual tokens kept, LLM prefill
   speed-up) and the two tasks' rank correlation over the methods (grounding against object existence), and
   writes the full report and PNG overlays of the tokens
   each method kept on a few images. A speed-up is printed only for a cell timed in the same sweep invocation
   as the unpruned cell: a resumed demo that reuses an earlier run's baseline prints "not comparable" (the
   report's notes say why);
5. writes one leaderboard bundle per run (``bundles/``), verifies each against the per-sample logs and builds
   the static leaderboard page (``site/index.html``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

DEMO_METHODS = ("none", "fastv", "d2pruner", "deepprune", "vispruner", "random", "pyramiddrop", "visionzip",
                "fastervlm", "cdpruner", "sparsevlm", "prumerge_plus", "feather", "mustdrop", "vscan")
DEMO_METHOD_ARGS: dict[str, dict[str, str]] = {
    # the tiny grounder has 14 decoder layers: pyramiddrop's auto stages (4, 7, 11) run 4 layers at full length,
    # so an average of 10% per layer is unreachable; stages at 1, 3, 6 (halving) reach it. sparsevlm's auto
    # stages on 14 layers are 1, 3, 7. '/' separates layers inside lmms-eval's --model_args.
    "pyramiddrop": {"prune_layers": "1/3/6"},
    # feather's auto stages (4, 7 of 14) likewise run 4 layers at full length; stages at 1 and 3 reach 10%
    "feather": {"prune_layers": "1/3"},
}
HELD_OUT_SEED = 20261122
CALIBRATION_SEED = 7
TASK = "refcoco_ground_val"
POPE_TASK = "pope_local"
TASKS = (TASK, POPE_TASK)
POPE_PAIRS = 2
"""Yes/no question pairs per image of the POPE task (one pair per distinct object at most; half the negatives
adversarial: a present colour on another shape, or a present shape in another colour). The shipped grounder was
trained on these questions too (``scripts/train_grounding.py --pope-share``), so pruning is ranked on a second
kind of question: does the answer survive when the tokens of the object asked about, or of its near misses, are
dropped?"""
TASK_METRICS: dict[str, tuple[str, float]] = {TASK: ("acc@0.5", 1.0), POPE_TASK: ("yes/no accuracy", 100.0)}
"""Leaderboard column of each task's headline score and its factor to percent (lmms-eval's POPE accuracy is a
fraction)."""
SWEEP_ARGS = ("--log_samples",)
"""Extra lmms-eval arguments of the demo's runs: per-sample logs, for the bundles' ``--verify``."""
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{}</ref>"


def default_launcher() -> str:
    cpu = "" if torch.cuda.is_available() else " --cpu"
    return f"{sys.executable} -m accelerate.commands.launch --num_processes 1 --num_machines 1{cpu}"


def leaderboard(tables: list[Any], task: str = TASK) -> str:
    """The demo's compact table from the report's rows of ``task``."""
    table = next(t for t in tables if t.family == task)
    metric, scale = TASK_METRICS.get(task, ("score", 1.0))
    lines = [f"| method | keep | {metric} | % of unpruned | visual tokens kept | LLM prefill speed-up |",
             "|---|---|---|---|---|---|"]
    for r in table.rows:
        pct = "n/a" if r.get(f"{task} %") is None else f"{r[f'{task} %']:.1f}"
        kept = "n/a" if r["visual kept"] is None else f"{r['visual kept']:.1f}"
        speed = "n/a" if r["prefill speed-up"] is None else f"{r['prefill speed-up']:.2f}x"
        if r.get("speed-up note"):  # e.g. a baseline reused from an earlier demo run: timings not side by side
            speed = "not comparable"
        lines.append(f"| {r['method']} | {r['keep']:g} | {scale * r[task]:.2f} | {pct} | {kept} | {speed} |")
    return "\n".join(lines)


PRIOR_FILE = "d2pruner_prior_layer1.pt"
DEMO_OUTPUTS = ("data", PRIOR_FILE, "runs", "report", "overlays", "bundles", "site")
"""What the demo writes under its output folder (and removes again when its inputs change)."""


def demo_fingerprint(model_dir: Path, n_images: int, scene_kwargs: dict[str, Any]) -> str:
    """A digest of what the demo's resumable outputs depend on: the model's files, the split's size and the
    scene distribution (runs, prior and data from another model or distribution must not be reused)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    from lmms_prune.leaderboard.bundle import SCHEMA_VERSION

    # the bundle schema: runs recorded before it changed lack what its bundles need (`--verify` refuses them)
    digest.update(json.dumps({"n_images": n_images, "scenes": scene_kwargs, "seed": HELD_OUT_SEED,
                              "lmms_eval_args": list(SWEEP_ARGS), "bundle_schema": SCHEMA_VERSION, "tasks": list(TASKS),
                              "pope_pairs": POPE_PAIRS},
                             sort_keys=True, default=str).encode())
    return digest.hexdigest()


def reset_stale_outputs(out: Path, fingerprint: str) -> None:
    """Remove the demo's outputs under ``out`` when they were made from other inputs; record the inputs."""
    import shutil

    stamp = out / "inputs.sha256"
    if stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return
    stale = [out / name for name in DEMO_OUTPUTS if (out / name).exists()]
    if stale:
        print(f"[demo] the model or the demo settings changed since {out} was written: starting afresh")
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")


def write_overlays(model_dir: Path, out: Path, methods: tuple[str, ...], keep: float, prior: Path,
                   n_images: int, scene_kwargs: dict[str, Any]) -> list[Path]:
    """One figure per image: the tokens each method kept for one referring expression, with its box."""
    from lmms_prune.loading import load_model
    from lmms_prune.presets import resolve_config
    from lmms_prune.toy.data import generate_scenes
    from lmms_prune.viz import overlay_kept_tokens, plot_overlays, select_tokens, token_box_iou

    model, processor = load_model(str(model_dir), device="cpu", dtype="float32")
    configs = {}
    for m in methods:
        params: dict[str, Any] = {} if m == "none" else {"keep_ratio": keep, **DEMO_METHOD_ARGS.get(m, {})}
        if m == "d2pruner":
            params["bias_prior"] = str(prior)
        configs[m] = resolve_config(m, **params)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for scene in generate_scenes(n_images, seed=HELD_OUT_SEED + 1, **scene_kwargs):
        obj = scene.objects[0]
        text = GROUNDING_PROMPT.format(obj.expression)
        sel = select_tokens(model, processor, scene.image, text, configs)
        panels, captions = {}, {}
        for m, kept in sel.kept.items():
            panels[m] = {}
            kept_mask = torch.zeros(sel.boxes.shape[0], dtype=torch.bool)
            kept_mask[kept] = True
            for view, in_view in sel.views.items():  # bool masks over the image's tokens
                panels[m][view] = overlay_kept_tokens(scene.image, sel.boxes[in_view], kept_mask[in_view],
                                                      box=obj.box)
            iou = token_box_iou(sel.boxes, kept, obj.box, scene.image.size)
            captions[m] = f"{kept.numel()} kept, token-box IoU {iou:.2f}"
        paths.append(plot_overlays(scene.image, panels, captions, out / f"overlay_{scene.image_id}.png",
                                   box=obj.box, title=f'"{obj.expression}"'))
    return paths


def run_demo(out: str | Path = "runs/demo", n_images: int = 16, keep: float = 0.1,
             methods: tuple[str, ...] = DEMO_METHODS, launcher: str | None = None, overlays: int = 3,
             pretrained: str | None = None) -> dict[str, Any]:
    from lmms_prune.calibration import calibrate_prior
    from lmms_prune.engine.prior import load_prior, save_prior
    from lmms_prune.loading import load_model, resolve_pretrained
    from lmms_prune.report import write_report
    from lmms_prune.sweep import Sweep, build_cells
    from lmms_prune.toy.data import generate_scenes
    from lmms_prune.toy.grounder import SCENE_KWARGS, SHORT_NAME

    out = Path(out)
    model_dir = Path(resolve_pretrained(pretrained or SHORT_NAME))
    reset_stale_outputs(out, demo_fingerprint(model_dir, n_images, SCENE_KWARGS))
    data = out / "data"
    if not ((data / "RefCOCO" / "data").is_dir() and (data / "POPE" / "data").is_dir()):
        write_demo_data(data, n_images)
    prior = out / PRIOR_FILE
    if prior.is_file() and "fingerprint" not in load_prior(prior).meta:
        prior.unlink()  # made before priors carried a model fingerprint: it would be refused
    if "d2pruner" in methods and not prior.is_file():
        model, processor = load_model(str(model_dir), device="cpu", dtype="float32")
        images = [s.image for s in generate_scenes(32, seed=CALIBRATION_SEED, **SCENE_KWARGS)]
        p = calibrate_prior(model, processor, images, layer=1, model_name=str(model_dir), total=len(images))
        save_prior(prior, p.means, p.counts, p.meta)
        del model
    cells = build_cells([("internvl", str(model_dir))], [m for m in methods if m != "none"], [keep],
                        {**DEMO_METHOD_ARGS, "d2pruner": {"bias_prior": str(prior)}})
    env = dict(os.environ, LMMS_PRUNE_REFCOCO_DIR=str(data), LMMS_PRUNE_POPE_DIR=str(data / "POPE"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    sweep = Sweep(out / "runs", list(TASKS), launcher=launcher or default_launcher(), env=env, extra_args=SWEEP_ARGS)
    statuses = sweep.run(cells, progress=lambda s: print(f"[demo] {s}"))
    failed = {k: v for k, v in statuses.items() if not v.startswith(("done", "skipped"))}
    if failed:
        raise RuntimeError("demo runs failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    report = write_report(out / "runs", out / "report")
    table = "\n\n".join(f"{task}\n\n{leaderboard(report['tables'], task)}" for task in TASKS)
    overlay_paths = write_overlays(model_dir, out / "overlays", tuple(methods), keep, prior, overlays,
                                   SCENE_KWARGS) if overlays else []
    page = write_leaderboard(out)
    return {"leaderboard": table, "report": report, "overlays": overlay_paths, "model": model_dir, "page": page,
            "rank_correlation": rank_correlation(report["tables"], TASKS)}


def write_demo_data(data: Path, n_images: int) -> Path:
    """The demo's two held-out tasks under ``data``: ``RefCOCO/`` (lmms-lab/RefCOCO's layout, split ``val``,
    ``n_images`` scenes) and ``POPE/`` (lmms-lab/POPE's layout, split ``test``, ``n_images`` other scenes with
    :data:`POPE_PAIRS` yes/no pairs each), both of the grounder's training distribution."""
    from lmms_prune.toy.data import write_refcoco_hub_layout
    from lmms_prune.toy.grounder import SCENE_KWARGS
    from lmms_prune.toy.pope import write_pope_hub_layout

    print(f"[demo] writing {n_images} + {n_images} held-out synthetic images (RefCOCO and POPE layouts) to {data}")
    write_refcoco_hub_layout(data / "RefCOCO", n_images, seed=HELD_OUT_SEED, splits=("val",), **SCENE_KWARGS)
    write_pope_hub_layout(data / "POPE", n_images, seed=HELD_OUT_SEED, pairs_per_image=POPE_PAIRS, **SCENE_KWARGS)
    return data


def rank_correlation(tables: list[Any], tasks: tuple[str, str] = TASKS) -> dict[str, Any]:
    """Spearman's rank correlation (``scipy.stats.spearmanr``, ties averaged) between two tasks' scores of the
    pruning methods (not ``none``) at the same keep ratio: does the ranking on one task carry over to the
    other? ``{"rho": float | None, "methods": n}``; None with fewer than 3 methods or a constant column."""
    from scipy.stats import spearmanr

    scores = [{(r["method"], r["keep"]): r[task] for t in tables if t.family == task for r in t.rows
               if r["method"] != "none" and r.get(task) is not None} for task in tasks]
    common = sorted(set(scores[0]) & set(scores[1]))
    a, b = [scores[0][k] for k in common], [scores[1][k] for k in common]
    if len(common) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return {"rho": None, "methods": len(common)}
    return {"rho": float(spearmanr(a, b).statistic), "methods": len(common)}


def write_leaderboard(out: Path) -> Path:
    """Bundles of the demo's runs (``out/bundles``), each verified against its per-sample logs, and the
    static leaderboard page built from them (``out/site/index.html``); prints and returns the page's path."""
    import shutil

    from lmms_prune.leaderboard.bundle import write_bundles
    from lmms_prune.leaderboard.page import write_page
    from lmms_prune.leaderboard.verify import TaskConfigs, verify_bundle

    if (out / "bundles").exists():
        shutil.rmtree(out / "bundles")  # bundles of runs that were since redone
    paths = write_bundles(out / "runs", out / "bundles")
    configs = TaskConfigs()
    for path in paths:
        result = verify_bundle(json.loads(path.read_text()), out / "runs", name=str(path), configs=configs)
        if not result.ok:
            raise RuntimeError(f"{path}: the bundle does not match its logs: " + "; ".join(result.mismatches))
    print(f"[demo] {len(paths)} leaderboard bundles in {out / 'bundles'}, each verified against its logs")
    page = write_page(paths, out / "site")
    print(f"[demo] leaderboard page: {page}")
    return page
