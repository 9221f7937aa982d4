"""``lmms-prune demo --video``: the video methods side by side on the tiny video task, through lmms-eval.

Writes the clips of the package's task ``tinyvideo`` (VideoMME's schema on eight 8-frame clips,
:mod:`lmms_prune.tasks.tinyvideo`: four plain and four cluttered, :mod:`lmms_prune.toy.videos`) into its output
folder and runs it with ``python -m lmms_eval --model <family>_<method>``
for ``none``, ``fastv``, ``temporal``, ``evs``, ``vidcom2`` and ``fastvid`` at one keep ratio (a resumable
:class:`lmms_prune.sweep.Sweep`), and prints one row per method: the task's score, its % of the unpruned run, the
visual tokens kept and the prefill FLOPs as % of the unpruned prefill.

The model (:func:`demo_pretrained`): the ``pretrained`` checkpoint if given; for LLaVA-OneVision the shipped
``tiny-video-qa`` (``scripts/train_video_qa.py``, 100% on held-out clips), on which the methods' scores separate;
for Qwen2.5-VL the family's random-weight toy (:func:`lmms_prune.toy.models.tiny_model_dir`), whose answers say
nothing about the methods: it shows the pipeline (each method's kept tokens and FLOPs on a real video geometry,
through the real harness), not a ranking.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

VIDEO_METHODS = ("none", "fastv", "temporal", "evs", "vidcom2", "fastvid")
TASK = "tinyvideo"
FAMILY_ARGS: dict[str, dict[str, str]] = {
    # the tests' settings (tests/test_video_cli.py): every frame 112x112, 4 merged frames of 4x4 tokens
    "qwen2_5_vl": {"min_pixels": "12544", "max_pixels": "12544"},
    # all 8 frames of a clip, 4x4 pooled tokens each, one newline after the video
    "llava_onevision": {"max_frames_num": "8"},
}


def check_video_demo(family: str, keep: float, methods: tuple[str, ...]) -> None:
    """Refuse bad settings before any model loads, naming the value and the fix."""
    from lmms_prune.presets import PRESETS

    if family not in FAMILY_ARGS:
        raise ValueError(f"--family {family!r}: the video demo runs {', '.join(FAMILY_ARGS)}")
    if not 0 < keep <= 1:
        raise ValueError(f"--keep {keep}: must be in (0, 1]")
    unknown = [m for m in methods if m not in PRESETS]
    if unknown:
        raise ValueError(f"--methods {','.join(unknown)}: unknown; see `lmms-prune methods`")


def video_table(tables: list[Any], task: str = TASK) -> str:
    """The demo's table from the report's rows of ``task``."""
    table = next(t for t in tables if t.family == task)
    lines = [f"| method | keep | {task} score | % of unpruned | visual tokens kept | prefill FLOPs % |",
             "|---|---|---|---|---|---|"]
    for r in table.rows:
        cells = [r.get(f"{task} %"), r["visual kept"], r.get("FLOPs %")]
        pct, kept, flops = ("n/a" if v is None else f"{v:.1f}" for v in cells)
        lines.append(f"| {r['method']} | {r['keep']:g} | {r[task]:.1f} | {pct} | {kept} | {flops} |")
    return "\n".join(lines)


# The checkpoint the demo runs without --pretrained: the shipped model trained on the task where there is one (so
# that the methods' scores separate), else the family's random-weight toy (tokens and FLOPs only)
DEFAULT_PRETRAINED = {"llava_onevision": "tiny-video-qa"}


def demo_pretrained(family: str, pretrained: str | None = None) -> str:
    """The checkpoint the demo runs: ``pretrained`` if given (a checkpoint of ``family``, e.g. one saved by
    ``scripts/train_video_qa.py``; resolved by :func:`lmms_prune.loading.resolve_pretrained` in every run), else
    the family's shipped trained model (:data:`DEFAULT_PRETRAINED`: ``tiny-video-qa`` for LLaVA-OneVision), else its
    tiny random-weight model (:func:`lmms_prune.toy.models.tiny_model_dir`, built once)."""
    if pretrained:
        return pretrained
    if family in DEFAULT_PRETRAINED:
        return DEFAULT_PRETRAINED[family]
    from lmms_prune.toy.models import tiny_model_dir

    return str(tiny_model_dir(family))


def run_video_demo(out: str | Path = "runs/video_demo", family: str = "llava_onevision", keep: float = 0.25,
                   methods: tuple[str, ...] = VIDEO_METHODS, launcher: str | None = None,
                   limit: int | None = None, pretrained: str | None = None) -> dict[str, Any]:
    """Run the sweep into ``out`` (``data/tinyvideo/``: the task's clips, ``runs/``, ``report/`` and the datasets
    cache ``hf_datasets/``) and return
    ``{"table", "report", "model"}``. ``limit``: samples per run (default all clips); ``pretrained``: another
    checkpoint of ``family`` (default :func:`demo_pretrained`)."""
    check_video_demo(family, keep, methods)
    from lmms_prune.loading import resolve_pretrained
    from lmms_prune.report import write_report
    from lmms_prune.sweep import Sweep, build_cells

    out = Path(out)
    model = demo_pretrained(family, pretrained)
    model_dir = Path(resolve_pretrained(model))
    cells = build_cells([(family, model)], [m for m in methods if m != "none"], [keep],
                        {"*": FAMILY_ARGS[family]})
    clips = out / "data" / "tinyvideo"
    if not (clips / "tinyvideo.jsonl").is_file():
        from lmms_prune.toy.videos import write_tinyvideo

        write_tinyvideo(clips)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(out / "hf_datasets"),
               LMMS_PRUNE_TINYVIDEO_DIR=str(clips.resolve()))
    sweep = Sweep(out / "runs", [TASK], launcher=launcher or sys.executable, limit=limit, env=env)
    statuses = sweep.run(cells, progress=lambda s: print(f"[video demo] {s}"))
    failed = {k: v for k, v in statuses.items() if not v.startswith(("done", "skipped"))}
    if failed:
        raise RuntimeError("video demo runs failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    report = write_report(out / "runs", out / "report")
    return {"table": video_table(report["tables"]), "report": report, "model": model_dir}
