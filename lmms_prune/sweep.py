"""Sweeps: every (model, method, keep ratio) cell evaluated through the lmms-eval command line, resumably.

A cell is one lmms-eval process group (``python -m lmms_eval`` or the ``--launcher`` prefix, e.g.
``accelerate launch --num_processes 8``) over all the sweep's tasks, writing into its own folder:

    OUT/<model>/<method>/keep<ratio>/   lmms-eval results (*_results.json), efficiency.json, log.txt, DONE

``DONE`` is written only after the process exited 0 and its results file exists, so a crashed or interrupted
cell is never mistaken for a finished one: on the next run its partial files are cleared and it runs again
(``--retries`` more times within one run). Finished cells are skipped. ``none`` runs once per model (its keep
ratio is 1).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

DEFAULT_PRETRAINED = {
    "internvl": "OpenGVLab/InternVL2_5-8B-MPO-hf",
    "qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct",
    "llava": "llava-hf/llava-1.5-7b-hf",
}
DONE = "DONE"


@dataclass(frozen=True)
class Cell:
    family: str
    pretrained: str
    method: str
    keep_ratio: float
    model_args: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        keep = "1" if self.method == "none" else f"{self.keep_ratio:g}"
        return f"{self.family}/{self.method}/keep{keep}"

    def lmms_eval_model_args(self, efficiency: Path) -> str:
        args = {"pretrained": self.pretrained}
        if self.method != "none":
            args["keep_ratio"] = f"{self.keep_ratio:g}"
        args.update(dict(self.model_args))
        args["efficiency_path"] = str(efficiency)
        return ",".join(f"{k}={v}" for k, v in args.items())


def parse_models(spec: str) -> list[tuple[str, str]]:
    """``internvl,qwen2_5_vl=/path`` -> [(family, pretrained)]; a bare family uses its real default checkpoint."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        family, _, path = item.partition("=")
        if family not in DEFAULT_PRETRAINED:
            raise ValueError(f"--models {family!r}: unknown family; choose from {', '.join(DEFAULT_PRETRAINED)}")
        out.append((family, path or DEFAULT_PRETRAINED[family]))
    return out


def parse_method_args(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["d2pruner:bias_prior=p.pt", "*:max_num=6"]`` -> {method: {key: value}} ('*' applies to every method)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        method, sep, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not sep or not eq or not key:
            raise ValueError(f"--method-args {item!r}: write METHOD:KEY=VALUE (METHOD may be '*')")
        out.setdefault(method, {})[key] = value
    return out


def build_cells(models: Sequence[tuple[str, str]], methods: Sequence[str], keeps: Sequence[float],
                method_args: dict[str, dict[str, str]] | None = None) -> list[Cell]:
    from lmms_prune.presets import PRESETS

    method_args = method_args or {}
    unknown = [m for m in methods if m not in PRESETS]
    if unknown:
        raise ValueError(f"--methods {','.join(unknown)}: unknown; choose from {', '.join(PRESETS)}")
    for k in keeps:
        if not 0 < k <= 1:
            raise ValueError(f"--keep {k}: keep ratios must be in (0, 1]")
    cells = []
    for family, pretrained in models:
        for method in ["none", *[m for m in methods if m != "none"]]:
            extra = {**method_args.get("*", {}), **method_args.get(method, {})}
            for keep in [1.0] if method == "none" else keeps:
                cells.append(Cell(family, pretrained, method, float(keep), tuple(sorted(extra.items()))))
    return cells


@dataclass
class Sweep:
    out: Path
    tasks: Sequence[str]
    launcher: str = f"{sys.executable}"
    limit: int | None = None
    include_path: str | None = None
    extra_args: Sequence[str] = ()
    retries: int = 1
    env: dict[str, str] | None = None
    statuses: dict[str, str] = field(default_factory=dict)

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / cell.name

    def is_done(self, cell: Cell) -> bool:
        d = self.cell_dir(cell)
        return (d / DONE).is_file() and any(d.rglob("*_results.json"))

    def command(self, cell: Cell) -> list[str]:
        d = self.cell_dir(cell)
        cmd = [*shlex.split(self.launcher), "-m", "lmms_eval", "--model", f"{cell.family}_{cell.method}",
               "--model_args", cell.lmms_eval_model_args(d / "efficiency.json"), "--tasks", ",".join(self.tasks),
               "--output_path", str(d / "lmms_eval"), "--batch_size", "1"]
        if self.limit:
            cmd += ["--limit", str(self.limit)]
        if self.include_path:
            cmd += ["--include_path", self.include_path]
        return cmd + list(self.extra_args)

    def run_cell(self, cell: Cell) -> bool:
        d = self.cell_dir(cell)
        for attempt in range(1 + self.retries):
            if d.exists():
                shutil.rmtree(d)  # partial output of an earlier, unfinished attempt
            d.mkdir(parents=True)
            cmd = self.command(cell)
            (d / "command.txt").write_text(shlex.join(cmd) + "\n")
            t0 = time.time()
            with open(d / "log.txt", "w") as log:
                code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
            if code == 0 and any(d.rglob("*_results.json")):
                (d / DONE).write_text(json.dumps({"seconds": time.time() - t0, "attempts": attempt + 1}) + "\n")
                return True
        return False

    def run(self, cells: Sequence[Cell], progress: Callable[[str], None] | None = None) -> dict[str, str]:
        bar = tqdm(cells, desc="sweep", unit="cell")
        for cell in bar:
            bar.set_postfix_str(cell.name)
            if self.is_done(cell):
                self.statuses[cell.name] = "skipped (done)"
                continue
            ok = self.run_cell(cell)
            self.statuses[cell.name] = "done" if ok else f"FAILED (see {self.cell_dir(cell) / 'log.txt'})"
            if progress:
                progress(f"{cell.name}: {self.statuses[cell.name]}")
        return self.statuses
