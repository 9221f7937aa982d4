"""Sweeps: every (model, method, keep ratio) cell evaluated through the lmms-eval command line, resumably.

A cell is one lmms-eval process group (``python -m lmms_eval`` or the ``--launcher`` prefix, e.g.
``accelerate launch --num_processes 8``) over all the sweep's tasks, writing into its own folder:

    OUT/<family>-<checkpoint name>-<hash>/<method>/keep<ratio>/
        cell.json   {"fingerprint": ..., "settings": ...}: what determines the result (`cell_settings`)
        lmms_eval/  lmms-eval's output (one *_results.json), efficiency.json, log.txt, command.txt, DONE
        (DONE: ``{"seconds", "invocation", "host"}``: which sweep invocation ran it, on which host)

One folder per checkpoint: ``<hash>`` digests the resolved checkpoint (absolute local path, or hub id and
the cached revision), so two checkpoints of one family never share cells. The cell's **fingerprint**
(`lmms_prune.fingerprint`) covers the checkpoint, every model argument, the tasks, ``--limit``, the other
lmms-eval options, the data-source environment and the package versions. A cell is done when ``DONE`` is
there and ``cell.json`` holds the fingerprint of the settings asked for now; a cell whose settings changed is
rerun, its old output replaced, and the status says which settings changed.

``DONE`` is written only after a run was verified, without trusting the exit status (lmms-eval's command line
catches every exception and exits 0): exactly one results file that parses and holds scores, and an
efficiency JSON in which not every sample was skipped. A failed, interrupted or all-skipped cell is cleared
and run again on the next sweep (``--retries`` more times within one run). ``none`` runs once per model (its
keep ratio is 1).

Children: each run starts in its own process group (session); stopping the sweep (SIGTERM, SIGINT) kills
that whole group before the sweep exits, so no ``lmms_eval`` process outlives it. A lock per cell
(``fcntl.flock`` on ``<cell>.lock`` next to the cell folder) keeps two sweeps from writing one cell.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmms_prune.efficiency import INVOCATION_ENV, measurement_context
from lmms_prune.fingerprint import fingerprint, run_settings, settings_differences


def default_pretrained() -> dict[str, str]:
    """Family name -> its default checkpoint (the family modules' ``default_pretrained``)."""
    from lmms_prune.families import all_families

    return {fam.name: fam.default_pretrained for fam in all_families()}

DONE = "DONE"
CELL_FILE = "cell.json"
DATA_ENV = ("LMMS_PRUNE_REFCOCO_DIR", "LMMS_PRUNE_REFCOCO_JSONL_DIR", "LMMS_PRUNE_COCO_ROOT", "LMMS_PRUNE_POPE_DIR",
            "LMMS_PRUNE_MME_DIR", "LMMS_PRUNE_TINYVIDEO_DIR")
"""Environment variables that choose the RefCOCO data (`lmms_prune.tasks.refcoco.data`), the POPE and MME data
(`lmms_prune.tasks.pope`, `lmms_prune.tasks.mme`) and the tiny video clips (`lmms_prune.tasks.tinyvideo`): part of a cell's settings."""
KILL_GRACE_SECONDS = 10.0
BUDGET_KEYS = {"keep_ratio", "keep_tokens"}
"""Pruning parameters set by ``--keep`` alone (`build_cells`)."""


class SweepInterrupted(Exception):
    """The sweep received SIGTERM or SIGINT; its running child group has been stopped."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"sweep stopped by {signal.Signals(signum).name}")


def hub_revision(repo_id: str) -> str | None:
    """The commit the local hub cache resolves ``repo_id``'s ``main`` to (what an offline run loads), or None."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


def resolve_checkpoint(pretrained: str) -> tuple[str, str | None]:
    """``(checkpoint, revision)``: a shipped short name or an existing local path as an absolute path
    (revision None); anything else as a hub id with its cached revision (None when not cached)."""
    from lmms_prune.loading import resolve_pretrained

    resolved = resolve_pretrained(pretrained)
    path = Path(resolved).expanduser()
    if path.exists():
        return str(path.resolve()), None
    return resolved, hub_revision(resolved)


@dataclass(frozen=True)
class Cell:
    family: str
    pretrained: str
    method: str
    keep_ratio: float
    model_args: tuple[tuple[str, str], ...] = ()
    revision: str | None = None

    @property
    def model_folder(self) -> str:
        """``<family>-<checkpoint name>-<8 hex digits of checkpoint and revision>``: one folder per checkpoint."""
        base = Path(self.pretrained.rstrip("/")).name or "checkpoint"
        digest = fingerprint({"pretrained": self.pretrained, "revision": self.revision})[:8]
        return f"{self.family}-{base}-{digest}"

    @property
    def name(self) -> str:
        keep = "1" if self.method == "none" else f"{self.keep_ratio:g}"
        return f"{self.model_folder}/{self.method}/keep{keep}"

    @property
    def model(self) -> str:
        """The lmms-eval ``--model`` name."""
        return f"{self.family}_{self.method}"

    def model_arg_dict(self) -> dict[str, str]:
        """``--model_args`` without ``efficiency_path`` (which only says where a record goes)."""
        args = {"pretrained": self.pretrained}
        if self.method != "none":
            args["keep_ratio"] = f"{self.keep_ratio:g}"
        args.update(dict(self.model_args))
        return args

    def lmms_eval_model_args(self, efficiency: Path) -> str:
        args = {**self.model_arg_dict(), "efficiency_path": str(efficiency)}
        return ",".join(f"{k}={v}" for k, v in args.items())


def parse_models(spec: str) -> list[tuple[str, str]]:
    """``internvl,qwen2_5_vl=/path`` -> [(family, pretrained)]; a bare family uses its real default checkpoint."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        family, _, path = item.partition("=")
        defaults = default_pretrained()
        if family not in defaults:
            raise ValueError(f"--models {family!r}: unknown family; choose from {', '.join(defaults)}")
        out.append((family, path or defaults[family]))
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
    """One cell per (checkpoint, method, keep ratio); checkpoints resolved by `resolve_checkpoint`."""
    from lmms_prune.presets import PARAMS, PRESETS, reads

    method_args = method_args or {}
    unknown = [m for m in methods if m not in PRESETS]
    if unknown:
        raise ValueError(f"--methods {','.join(unknown)}: unknown; choose from {', '.join(PRESETS)}")
    for k in keeps:
        if not 0 < k <= 1:
            raise ValueError(f"--keep {k}: keep ratios must be in (0, 1]")
    unknown_args = sorted(set(method_args) - set(PRESETS) - {"*"})
    if unknown_args:
        raise ValueError(f"--method-args {','.join(unknown_args)}: unknown method; choose from *, {', '.join(PRESETS)}")
    for method, args in method_args.items():
        for key in BUDGET_KEYS & set(args):
            # the cell folder keep<ratio> names the budget: a second one would run inside a folder that lies
            raise ValueError(f"--method-args {method}:{key}={args[key]}: the budget of every cell is --keep (each "
                             f"cell's folder is keep<ratio>), so {key} there would contradict it; drop it and give "
                             f"--keep {args[key] if key == 'keep_ratio' else 'RATIO'}")
    cells, seen = [], set()
    for family, pretrained in models:
        checkpoint, revision = resolve_checkpoint(pretrained)
        if (family, checkpoint, revision) in seen:
            raise ValueError(f"--models {family}={pretrained}: given twice")
        seen.add((family, checkpoint, revision))
        for method in ["none", *[m for m in methods if m != "none"]]:
            # '*' values apply to every method; a pruning parameter only where the method reads it
            shared = {k: v for k, v in method_args.get("*", {}).items() if k not in PARAMS or reads(method, k)}
            extra = {**shared, **method_args.get(method, {})}
            for keep in [1.0] if method == "none" else keeps:
                cells.append(Cell(family, checkpoint, method, float(keep), tuple(sorted(extra.items())), revision))
    return cells


def check_cells(cells: Sequence[Cell]) -> None:
    """Validate every cell's ``--model_args`` as its lmms-eval wrapper will (`lmms_prune.runner.parse_options`)
    and read every ``bias_prior`` it names (`lmms_prune.engine.prior.load_prior`), before any cell launches:
    a bad ``--method-args`` value fails here once, naming the cell, instead of in each cell's lmms-eval run."""
    from lmms_prune.engine.prior import load_prior
    from lmms_prune.families import family_class
    from lmms_prune.runner import parse_options

    for cell in cells:
        try:
            _, config = parse_options(family_class(cell.family), cell.model, cell.method, **cell.model_arg_dict())
            if config.stage != "none" and config.needs().prior and config.bias_prior:
                load_prior(config.bias_prior)
        except (ValueError, OSError) as err:
            raise ValueError(f"cell {cell.name}: {err}") from None


def task_names(include_path: Sequence[str], include_defaults: bool) -> set[str]:
    """Task, group and tag names lmms-eval's ``TaskManager`` knows from ``include_path`` (and its own tasks)."""
    from lmms_eval.tasks import TaskManager

    return set(TaskManager("ERROR", include_path=list(include_path) or None,
                           include_defaults=include_defaults).all_tasks)


def check_tasks(tasks: Sequence[str], include_path: str | None = None) -> None:
    """Refuse task names lmms-eval does not know, before any cell launches. The folders named (``include_path``
    and this package's RefCOCO tasks) are indexed first; lmms-eval's whole task index (tens of seconds) only
    when a name is not found there."""
    import difflib

    from lmms_prune.tasks import takeover

    local = [p for p in (include_path, str(takeover.TASKS_DIR)) if p]
    unknown = [t for t in tasks if t not in task_names(local, include_defaults=False)]
    if not unknown:
        return
    known = task_names(local, include_defaults=True)
    unknown = [t for t in unknown if t not in known]
    if unknown:
        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        shown = "; ".join(f"{t} (did you mean {', '.join(h)}?)" if h else t for t, h in hints.items())
        raise ValueError(f"--tasks: not lmms-eval tasks or groups: {shown}; list them with "
                         "`python -m lmms_eval --tasks list`, or add their folder with --include-path")


ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
"""Terminal colour and cursor codes (loguru colours lmms-eval's log lines)."""


def check_run(cell_dir: Path) -> str | None:
    """Why the finished run in ``cell_dir`` is not a usable result, or None when it is.

    Never reads the exit status: one ``*_results.json`` that parses and holds scores, and an efficiency JSON
    (written by this package's wrappers) that has at least one sample not skipped.
    """
    results = sorted((cell_dir / "lmms_eval").rglob("*_results.json"))
    if len(results) != 1:
        return f"{len(results)} results files (expected 1)" + (f"; {_last_error(cell_dir)}" if not results else "")
    try:
        scores = json.loads(results[0].read_text()).get("results")
    except (OSError, ValueError) as err:
        return f"{results[0].name} unreadable: {err}"
    if not scores:
        return f"{results[0].name} holds no scores"
    efficiency = cell_dir / "efficiency.json"
    if not efficiency.is_file():
        return "no efficiency.json (the model wrapper did not finish)"
    try:
        summary = json.loads(efficiency.read_text()).get("summary", {})
    except (OSError, ValueError) as err:
        return f"efficiency.json unreadable: {err}"
    samples, skipped = int(summary.get("samples", 0)), int(summary.get("skipped", 0))
    if samples == 0:
        return f"every sample was skipped ({skipped} skipped, 0 answered; see log.txt)"
    return None


def _last_error(cell_dir: Path) -> str:
    """The last line of the cell's log that names an error, for the status line."""
    log = cell_dir / "log.txt"
    if not log.is_file():
        return "no log"
    lines = [ANSI_ESCAPE.sub("", ln).strip() for ln in log.read_text(errors="replace").splitlines()
             if "Error" in ln or "Traceback" in ln or "error" in ln]
    return lines[-1][-300:] if lines else "no error line in log.txt"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(proc: subprocess.Popen, grace: float = KILL_GRACE_SECONDS) -> None:
    """End the child's whole process group: SIGTERM, then SIGKILL whatever is left after ``grace`` seconds.

    The child leads its own group (``start_new_session=True``), so this reaches every process it started.
    """
    if proc.poll() is not None and not _group_alive(proc.pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(proc.pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While the block runs (main thread only), SIGTERM and SIGINT raise `SweepInterrupted`."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SweepInterrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM / SIGINT off the block (main thread only) and raise `SweepInterrupted` after it if one came.

    Done with a recording handler, not a blocked signal mask: a mask would be inherited by the children the
    block starts (and survive their ``exec``), a handler is not.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if received:
        raise SweepInterrupted(received[0])


@contextlib.contextmanager
def cell_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` for the block; yields False (without waiting) if another
    process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    invocation: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    """This sweep's id, handed to its runs (``LMMS_PRUNE_INVOCATION``) and recorded in their efficiency JSON:
    speed-ups divide only timings of one invocation on one host (`lmms_prune.efficiency.side_by_side`)."""

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / cell.name

    def settings(self, cell: Cell) -> dict[str, Any]:
        """What determines the cell's result (`lmms_prune.fingerprint.run_settings`)."""
        env = self.env if self.env is not None else os.environ
        extra = {"lmms_eval_args": list(self.extra_args), "include_path": self.include_path,
                 "data": {k: env[k] for k in DATA_ENV if env.get(k)}}
        return run_settings(cell.model, cell.pretrained, cell.model_arg_dict(), self.tasks, self.limit,
                            cell.revision, extra)

    def cell_record(self, cell: Cell) -> dict[str, Any]:
        """The ``cell.json`` document: ``{"fingerprint": ..., "settings": ...}``."""
        settings = self.settings(cell)
        return {"fingerprint": fingerprint(settings), "settings": settings}

    def stored_record(self, cell: Cell) -> dict[str, Any] | None:
        path = self.cell_dir(cell) / CELL_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def is_done(self, cell: Cell) -> bool:
        d = self.cell_dir(cell)
        stored = self.stored_record(cell)
        return ((d / DONE).is_file() and stored is not None
                and stored.get("fingerprint") == self.cell_record(cell)["fingerprint"])

    def rerun_reason(self, cell: Cell) -> str | None:
        """Why an existing output of ``cell`` is being replaced (None when there is none, or it is done)."""
        d = self.cell_dir(cell)
        if not d.exists() or self.is_done(cell):
            return None
        stored = self.stored_record(cell)
        if stored is None:
            return "earlier output without cell.json"
        if (d / DONE).is_file():
            diff = settings_differences(stored.get("settings", {}), self.cell_record(cell)["settings"])
            return "settings changed: " + "; ".join(diff or ["fingerprint differs"])
        return "earlier run did not finish"

    def run_env(self) -> dict[str, str]:
        """The runs' environment: ``env`` (default: this process's) and this invocation's id."""
        return {**(self.env if self.env is not None else os.environ), INVOCATION_ENV: self.invocation}

    def command(self, cell: Cell) -> list[str]:
        d = self.cell_dir(cell)
        cmd = [*shlex.split(self.launcher), "-m", "lmms_eval", "--model", cell.model,
               "--model_args", cell.lmms_eval_model_args(d / "efficiency.json"), "--tasks", ",".join(self.tasks),
               "--output_path", str(d / "lmms_eval"), "--batch_size", "1"]
        if self.limit:
            cmd += ["--limit", str(self.limit)]
        if self.include_path:
            cmd += ["--include_path", self.include_path]
        return cmd + list(self.extra_args)

    def _attempt(self, cell: Cell) -> str | None:
        """Run the cell once into a cleared folder; None on a verified result, else why not."""
        d = self.cell_dir(cell)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        (d / CELL_FILE).write_text(json.dumps(self.cell_record(cell), indent=2, sort_keys=True) + "\n")
        cmd = self.command(cell)
        (d / "command.txt").write_text(shlex.join(cmd) + "\n")
        t0 = time.time()
        proc = None
        with open(d / "log.txt", "w") as log:
            try:
                with _signals_deferred():  # a signal between fork and assignment would orphan the child
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.run_env(),
                                            start_new_session=True)
                code = proc.wait()
            finally:  # also after a normal exit: no process of the run may outlive it
                if proc is not None:
                    with _signals_deferred():  # a second Ctrl-C must not abort the stopping
                        _stop_group(proc)
        problem = check_run(d)
        if problem is None and code != 0:
            problem = f"exit status {code}: {_last_error(d)}"
        if problem is None:
            (d / DONE).write_text(json.dumps({"seconds": time.time() - t0, **measurement_context(),
                                              "invocation": self.invocation}) + "\n")
        return problem

    def run_cell(self, cell: Cell) -> bool:
        """Run ``cell`` (up to ``1 + retries`` attempts) under its lock; True when it is done."""
        return self._run_cell(cell).startswith("done")

    def _run_cell(self, cell: Cell) -> str:
        d = self.cell_dir(cell)
        with cell_lock(d.parent / f"{d.name}.lock") as locked:
            if not locked:
                return f"BUSY (another sweep holds {d.parent / (d.name + '.lock')})"
            if self.is_done(cell):
                return "skipped (done)"
            reason = self.rerun_reason(cell)
            problem = "not run"
            for attempt in range(1 + self.retries):
                problem = self._attempt(cell)
                if problem is None:
                    status = "done" if attempt == 0 else f"done (attempt {attempt + 1})"
                    return f"{status}, rerun because {reason}" if reason else status
            return f"FAILED: {problem} (see {d / 'log.txt'})"

    def run(self, cells: Sequence[Cell], progress: Callable[[str], None] | None = None) -> dict[str, str]:
        """Run every cell not done yet; SIGTERM / SIGINT stop the running child group and raise
        `SweepInterrupted`."""
        bar = tqdm(cells, desc="sweep", unit="cell")
        with _signals_raise():
            for cell in bar:
                bar.set_postfix_str(cell.name)
                reason = None if self.is_done(cell) else self.rerun_reason(cell)
                if reason and progress:
                    progress(f"{cell.name}: rerunning ({reason})")
                self.statuses[cell.name] = self._run_cell(cell)
                if progress:
                    progress(f"{cell.name}: {self.statuses[cell.name]}")
        return self.statuses
