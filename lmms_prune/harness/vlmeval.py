"""The VLMEvalKit layer: the pruned models as VLMEvalKit models, run by VLMEvalKit's own ``run.py``.

Install with ``pip install lmms-prune[vlmeval]`` (the ``ms-vlmeval`` distribution of VLMEvalKit, which ships
the ``vlmeval`` package with its RefCOCO dataset and scorer).

How the models get into VLMEvalKit. VLMEvalKit has no plug-in entry point: its ``run.py`` builds a model named on
``--model NAME`` as ``vlmeval.config.supported_VLM[NAME]()`` (the same dict object is read again by
``vlmeval.inference``), and a ``--config`` JSON's ``class`` must be an attribute of ``vlmeval.vlm`` or
``vlmeval.api``. So the launcher (:func:`register`, ``lmms-prune vlmeval``) adds one entry per requested model to
``supported_VLM`` -- ``functools.partial(PrunedVLM, model=NAME, model_args=...)``, exactly the shape of
VLMEvalKit's own entries -- and then calls VLMEvalKit's own ``vlmeval.run.main()`` in the same process. This
touches one public, documented dict (the README points users at it to add models) and no VLMEvalKit code: no
fork, no patched module attribute, no class injected into ``vlmeval.vlm``. The datasets, their prompts
(``dataset.build_prompt``: :class:`PrunedVLM` has no custom prompts), the inference loop, the result files and
the scoring are VLMEvalKit's.

:class:`PrunedVLM` is a ``vlmeval.vlm.base.BaseModel`` on the harness-neutral :class:`lmms_prune.runner.Runner`:
model names and options are those of the lmms-eval wrappers (``internvl_deepprune`` with ``keep_ratio=0.1``,
``internvl_prune`` with ``method=...``; ``model_args`` is lmms-eval's ``key=value,...`` string, validated by
:func:`lmms_prune.runner.parse_options` before anything loads). VLMEvalKit messages
(``[{"type": "image", "value": path}, {"type": "text", "value": ...}]``) become the runner's neutral chat
messages, one request per ``generate`` call (VLMEvalKit's loop is sequential, so ``batch_size`` must be 1).

Efficiency: every answered sample's record (the runner's) is kept per dataset and written, with
:func:`lmms_prune.runner.summarize`, to ``<efficiency_path>/<model>_<dataset>_efficiency.json`` -- the launcher
sets ``efficiency_path`` to VLMEvalKit's prediction directory ``<work-dir>/<model>``, so the file lies next to
``<model>_<dataset>.xlsx`` and its ``_acc`` scores. A dataset's file is written when the next dataset starts and
at :meth:`PrunedVLM.finish` (the launcher calls it after VLMEvalKit returns; an ``atexit`` hook covers direct use).

Cross-harness RefCOCO: :func:`compare_refcoco` reads VLMEvalKit's RefCOCO score file and an lmms-eval results
JSON of our ``refcoco*_ground_*`` tasks and pairs the splits (``lmms-prune vlmeval --compare-lmms-eval``).
"""

from __future__ import annotations

import atexit
import csv
import json
import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lmms_prune.families import FAMILIES, family_class
from lmms_prune.presets import PRESETS
from lmms_prune.runner import Runner, format_summary, make_runner, parse_options, summarize

_grad_enabled = torch.is_grad_enabled()
try:
    # vlmeval.vlm switches autograd off for the whole process at import (torch.set_grad_enabled(False)); our
    # model calls run under torch.inference_mode anyway, so give the importing process its own setting back.
    from vlmeval.vlm.base import BaseModel
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("lmms_prune.harness.vlmeval needs VLMEvalKit: pip install 'lmms-prune[vlmeval]' "
                      f"(the ms-vlmeval package); import failed with: {err}") from err
finally:
    torch.set_grad_enabled(_grad_enabled)

logger = logging.getLogger("lmms_prune.vlmeval")

__all__ = ["PrunedVLM", "check_outputs", "compare_refcoco", "format_comparison", "model_names", "parse_model_args",
           "register", "split_model_name", "to_runner_messages"]

# VLMEvalKit RefCOCO split (its RefCOCODataset.SPLIT_DISPLAY_ORDER) -> our lmms-eval task of the same split.
REFCOCO_TASKS: dict[str, str] = {
    "RefCOCO_val": "refcoco_ground_val",
    "RefCOCO_testA": "refcoco_ground_testA",
    "RefCOCO_testB": "refcoco_ground_testB",
    "RefCOCO+_val": "refcoco+_ground_val",
    "RefCOCO+_testA": "refcoco+_ground_testA",
    "RefCOCO+_testB": "refcoco+_ground_testB",
    "RefCOCOg_val": "refcocog_ground_val",
    "RefCOCOg_test": "refcocog_ground_test",
}


# ---------------------------------------------------------------------------------------------------- names, options
def model_names() -> list[str]:
    """Every model name offered to VLMEvalKit: ``<family>_prune`` and ``<family>_<preset>`` (as for lmms-eval)."""
    return [f"{fam}_{suffix}" for fam in FAMILIES for suffix in ("prune", *PRESETS)]


def split_model_name(name: str) -> tuple[str, str | None]:
    """``internvl_deepprune`` -> ``("internvl", "deepprune")``; ``internvl_prune`` -> ``("internvl", None)``.

    The longest family prefix wins (``qwen2_vl_fastv`` is family ``qwen2_vl``, not a ``qwen2`` one).
    """
    for fam in sorted(FAMILIES, key=len, reverse=True):
        suffix = name[len(fam) + 1:] if name.startswith(f"{fam}_") else None
        if suffix == "prune":
            return fam, None
        if suffix in PRESETS:
            return fam, suffix
    raise ValueError(f"--model {name!r}: not a pruned model; use <family>_<preset> or <family>_prune with "
                     f"method=..., families: {', '.join(FAMILIES)}; presets: {', '.join(PRESETS)} "
                     "(lmms-prune methods lists them)")


def parse_model_args(text: str) -> dict[str, str]:
    """lmms-eval's ``--model_args`` syntax: ``key=value,key=value``, split by lmms-eval's own splitter, which keeps
    commas inside braces, brackets and quotes (``vllm_engine_args={"max_model_len":4096,...}``); values stay
    strings (the runner parses them)."""
    from lmms_eval.utils import _smart_comma_split

    args: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in _smart_comma_split(text or ""))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-args item {item!r}: expected key=value (e.g. keep_ratio=0.1,max_num=6)")
        if key.strip() in args:
            raise ValueError(f"--model-args: {key.strip()!r} given twice")
        args[key.strip()] = value.strip()
    return args


def validate(name: str, model_args: str = "") -> None:
    """Check a model name and its options without loading anything (the launcher does this before VLMEvalKit)."""
    family, method = split_model_name(name)
    options, _ = parse_options(family_class(family), name, method, **parse_model_args(model_args))
    _check_batch_size(name, options.batch_size)


def _check_batch_size(name: str, batch_size: int) -> None:
    if batch_size != 1:
        raise ValueError(f"--model {name}: batch_size={batch_size}: VLMEvalKit sends one sample per generate "
                         "call; drop batch_size (or use lmms-eval for batched runs)")


# ---------------------------------------------------------------------------------------------------- messages
def to_runner_messages(message: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """VLMEvalKit message items -> the runner's neutral chat messages, parts in their original order.

    ``[{"type": "image", "value": path}, {"type": "text", "value": text}]`` -> one user message
    ``[{"role": "user", "content": [{"type": "image", "image": PIL RGB}, {"type": "text", "text": text}]}]``.
    Items with ``role: "system"`` (text only) go to a leading system message. Video and other types are refused.
    """
    system, user = [], []
    for item in message:
        kind, value = item.get("type"), item.get("value")
        role = item.get("role", "user")
        if kind == "text":
            part = {"type": "text", "text": str(value)}
        elif kind == "image":
            with Image.open(value) as image:
                part = {"type": "image", "image": image.convert("RGB")}
        else:
            raise ValueError(f"message item of type {kind!r}: only image and text inputs are supported "
                             "(video datasets are not)")
        if role == "system":
            if kind != "text":
                raise ValueError("a system message item must be text")
            system.append(part)
        elif role == "user":
            user.append(part)
        else:
            raise ValueError(f"message item with role {role!r}: single-turn user (and system) items only")
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user", "content": user}]


def task_kind(dataset: str | None, option: str) -> str:
    """The runner's task kind: the ``task_kind`` option, else grounding for VLMEvalKit's grounding datasets."""
    if option != "auto":
        return option
    if dataset is None:
        return "understanding"
    from vlmeval.dataset import DATASET_TYPE

    grounding = "refcoco" in dataset.lower() or DATASET_TYPE(dataset, default="VQA") == "GROUNDING"
    return "grounding" if grounding else "understanding"


# ---------------------------------------------------------------------------------------------------- the model
_LIVE: list[PrunedVLM] = []


class PrunedVLM(BaseModel):
    """A VLMEvalKit model running a transformers VLM pruned by ``lmms_prune`` (one class for every family/preset).

    ``model``: ``<family>_<preset>`` or ``<family>_prune``; ``model_args``: lmms-eval's ``key=value,...`` string
    (``pretrained``, ``keep_ratio``, ``max_num``, ``efficiency_path``, ... as on lmms-eval's ``--model_args``);
    ``max_new_tokens``: generation budget per answer (greedy decoding).
    """

    INTERLEAVE = True
    allowed_types = ["text", "image"]

    def __init__(self, model: str, model_args: str = "", max_new_tokens: int = 128, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"PrunedVLM({model!r}): unexpected argument(s) {', '.join(sorted(kwargs))}; pass model "
                             "options in model_args='key=value,...'")
        super().__init__()
        for previous in list(_LIVE):  # VLMEvalKit runs its models one after another: free the finished one
            previous.finish()
        self.name = model
        family, method = split_model_name(model)
        self.options, self.prune_config = parse_options(family_class(family), model, method,
                                                        **parse_model_args(model_args))
        _check_batch_size(model, self.options.batch_size)
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        self.gen_kwargs = {"max_new_tokens": int(max_new_tokens), "temperature": 0}
        self.runner: Runner | None = make_runner(family_class(family), self.options, self.prune_config, model)
        self.runner.setup_device()
        self.runner.load()
        self.runner.install()
        self.report = self.runner.report()
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.skipped: dict[str, list[dict[str, Any]]] = {}
        self.written: dict[str, Path] = {}
        self._current: str | None = None
        _LIVE.append(self)
        atexit.register(self.finish)

    def use_custom_prompt(self, dataset: str) -> bool:
        """Never: VLMEvalKit's dataset prompts are the protocol under test."""
        return False

    def generate_inner(self, message: list[dict[str, Any]], dataset: str | None = None) -> str:
        """Answer one VLMEvalKit request with the pruned model and keep its efficiency record."""
        if self.runner is None:
            raise RuntimeError(f"{self.name}: finish() was called; build a new model to generate again")
        key = dataset or "unnamed"
        if self._current not in (None, key):
            self.write_efficiency(self._current)
        self._current = key
        records = self.records.setdefault(key, [])
        sample = len(records) + len(self.skipped.get(key, []))
        images = [Path(str(m["value"])).name for m in message if m.get("type") == "image"]
        try:
            conversation = to_runner_messages(message)
            answer = self.runner.generate([conversation], self.gen_kwargs, task_kind(dataset, self.options.task_kind))
        except Exception as err:
            where = f"dataset {key!r}, sample {sample} (images {', '.join(images) or 'none'})"
            if self.options.on_error == "raise":
                raise RuntimeError(f"{self.name}: generation failed on {where}: {type(err).__name__}: {err} "
                                   "(on_error=skip counts such samples and continues)") from err
            logger.warning(f"{self.name}: SKIPPED {where}: {type(err).__name__}: {err}")
            self.skipped.setdefault(key, []).append({"sample": sample, "images": images,
                                                     "error": f"{type(err).__name__}: {err}"})
            return ""
        records.append({"dataset": key, "sample": sample, "images": images, **answer[0].record})
        return answer[0].text

    # ------------------------------------------------------------------ efficiency
    def efficiency_report(self, dataset: str) -> dict[str, Any]:
        """One dataset's efficiency JSON: run identity, summary, skipped samples and per-sample records."""
        records, skipped = self.records.get(dataset, []), self.skipped.get(dataset, [])
        return {"model": self.name, "harness": "vlmeval", "dataset": dataset, **self.report, "world_size": 1,
                "summary": summarize(records, len(skipped)), "skipped": skipped, "samples": records}

    def efficiency_file(self, dataset: str) -> Path | None:
        """``<efficiency_path>/<model>_<dataset>_efficiency.json`` (``x.json`` -> ``x_<dataset>.json``), or None."""
        if not self.options.efficiency_path:
            return None
        path = Path(self.options.efficiency_path)
        if path.suffix == ".json":
            return path.with_name(f"{path.stem}_{dataset}.json")
        return path / f"{self.name}_{dataset}_efficiency.json"

    def write_efficiency(self, dataset: str) -> Path | None:
        """Log the dataset's summary and write its JSON (see :meth:`efficiency_file`); returns the path."""
        report = self.efficiency_report(dataset)
        if report["samples"]:
            logger.info(f"{self.name} x {dataset} efficiency over {format_summary(report['summary'])}")
        path = self.efficiency_file(dataset)
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        self.written[dataset] = path
        return path

    def finish(self) -> dict[str, Path]:
        """Write every dataset's efficiency JSON, undo the patch and free the model. Runs once."""
        if self.runner is None:
            return self.written
        for dataset in sorted(set(self.records) | set(self.skipped)):
            self.write_efficiency(dataset)
        self.runner.close()
        self.runner = None
        if self in _LIVE:
            _LIVE.remove(self)
        return self.written


# ---------------------------------------------------------------------------------------------------- launching
def register(names: Sequence[str], model_args: str = "", work_dir: str | os.PathLike = "./outputs",
             max_new_tokens: int = 128) -> dict[str, partial]:
    """Validate ``names`` and add them to VLMEvalKit's ``supported_VLM`` (module docstring).

    Each entry is ``partial(PrunedVLM, model=name, model_args=..., max_new_tokens=...)``; unless ``model_args``
    sets ``efficiency_path``, the records go to VLMEvalKit's prediction directory ``<work_dir>/<name>``.
    Every name is validated first: VLMEvalKit's own names (``InternVL2-8B``, ...) are refused, never shadowed.
    """
    from vlmeval.config import supported_VLM

    entries = {}
    for name in names:
        validate(name, model_args)
        args = model_args
        if "efficiency_path" not in parse_model_args(model_args):
            args = ",".join(filter(None, [model_args, f"efficiency_path={Path(work_dir) / name}"]))
        entries[name] = partial(PrunedVLM, model=name, model_args=args, max_new_tokens=max_new_tokens)
    supported_VLM.update(entries)
    return entries


def finish_all() -> list[Path]:
    """Finish every live :class:`PrunedVLM` (efficiency files written, models freed); the written paths."""
    paths: list[Path] = []
    for model in list(_LIVE):
        paths.extend(model.finish().values())
    return paths


def check_outputs(work_dir: str | os.PathLike, model: str, datasets: Sequence[str], mode: str = "all",
                  efficiency: bool = True) -> list[str]:
    """What is missing or failed in VLMEvalKit's outputs of ``model`` x ``datasets`` (empty: all good).

    VLMEvalKit's ``run.py`` logs a failed model x dataset combination and carries on with exit status 0, so
    success is read off its files: ``<work_dir>/<model>/status.json`` (each dataset ``done``, no
    ``error_message``, no ``skip_reason`` but ``mode_infer`` in infer mode, metrics when scored), the prediction
    file with one non-empty row per sample, and our efficiency JSON.
    """
    from vlmeval.smp import get_pred_file_path, load

    root = Path(work_dir) / model
    status_file = root / "status.json"
    if not status_file.is_file():
        return [f"{model}: no {status_file} (VLMEvalKit did not run this model)"]
    status = json.loads(status_file.read_text()).get("datasets", {})
    problems = []
    for dataset in datasets:
        entry = status.get(dataset)
        where = f"{model} x {dataset}"
        if entry is None:
            problems.append(f"{where}: not in {status_file}")
            continue
        if entry.get("error_message"):
            problems.append(f"{where}: failed: {entry['error_message']}")
        skip = entry.get("skip_reason")
        if skip and not (mode == "infer" and skip == "mode_infer"):
            problems.append(f"{where}: skipped ({skip})")
        if entry.get("status") != "done":
            problems.append(f"{where}: status {entry.get('status')!r}, not 'done'")
        if mode == "all" and not entry.get("metrics"):
            problems.append(f"{where}: no scores in {status_file}")
        pred = Path(get_pred_file_path(str(root), model, dataset, use_env_format=True))
        if not pred.is_file():
            problems.append(f"{where}: no prediction file {pred}")
        else:
            data = load(str(pred))
            if len(data) == 0 or "prediction" not in data or data["prediction"].isna().any():
                problems.append(f"{where}: {pred} lacks predictions")
        eff = root / f"{model}_{dataset}_efficiency.json"
        if efficiency and mode != "eval" and not eff.is_file():
            problems.append(f"{where}: no efficiency records {eff}")
    return problems


# ---------------------------------------------------------------------------------------------------- cross-harness
def read_vlmeval_refcoco(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """VLMEvalKit's RefCOCO score file (``<model>_RefCOCO_acc.csv``: Split, Precision@1 in %, Average IoU,
    Samples) -> ``{split: {"acc": fraction, "miou": ..., "n": ...}}``."""
    path = Path(path)
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        rows = rows if isinstance(rows, list) else [dict(zip(rows, v)) for v in zip(*rows.values())]
    else:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    out = {}
    for row in rows:
        if not {"Split", "Precision@1", "Average IoU"} <= set(row):
            raise ValueError(f"{path}: not a VLMEvalKit RefCOCO score file (columns Split, Precision@1, Average IoU)")
        out[str(row["Split"])] = {"acc": float(row["Precision@1"]) / 100.0, "miou": float(row["Average IoU"]),
                                  "n": int(float(row.get("Samples") or 0))}
    return out


def read_lmms_eval_refcoco(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """An lmms-eval ``*_results.json`` of our RefCOCO tasks -> ``{task: {"acc": acc@0.5, "miou": ..., "n": ...}}``."""
    path = Path(path)
    doc = json.loads(path.read_text())
    if "results" not in doc:
        raise ValueError(f"{path}: not an lmms-eval results file (no 'results' key)")
    out = {}
    for task, metrics in doc["results"].items():
        if "acc@0.5,none" not in metrics:
            continue
        n = doc.get("n-samples", {}).get(task, {}).get("effective", 0)
        out[task] = {"acc": float(metrics["acc@0.5,none"]), "miou": float(metrics.get("mean_iou,none", "nan")),
                     "n": int(n)}
    return out


def compare_refcoco(vlmeval_scores: str | os.PathLike, lmms_eval_results: str | os.PathLike) -> list[dict[str, Any]]:
    """Both protocols' RefCOCO accuracies side by side, one row per split present in both files.

    Acc@0.5 (VLMEvalKit's Precision@1) as fractions, mean IoU, sample counts; raises when no split pairs up.
    """
    ours = read_vlmeval_refcoco(vlmeval_scores)
    theirs = read_lmms_eval_refcoco(lmms_eval_results)
    rows = []
    for split, task in REFCOCO_TASKS.items():
        if split in ours and task in theirs:
            v, m = ours[split], theirs[task]
            rows.append({"split": split, "lmms_eval_task": task, "vlmeval_acc": v["acc"], "lmms_eval_acc": m["acc"],
                         "delta_acc": v["acc"] - m["acc"], "vlmeval_miou": v["miou"], "lmms_eval_miou": m["miou"],
                         "vlmeval_n": v["n"], "lmms_eval_n": m["n"]})
    if not rows:
        raise ValueError(f"no RefCOCO split is in both {vlmeval_scores} (splits {', '.join(ours) or 'none'}) and "
                         f"{lmms_eval_results} (tasks {', '.join(theirs) or 'none'}); run the same split in both")
    return rows


def format_comparison(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """A markdown table of :func:`compare_refcoco` rows (accuracies in %)."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| split | VLMEvalKit Acc@0.5 | lmms-eval Acc@0.5 | delta | VLMEvalKit mIoU | lmms-eval mIoU | n (VLMEvalKit / lmms-eval) |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['split']} | {100 * r['vlmeval_acc']:.2f} | {100 * r['lmms_eval_acc']:.2f} | "
                     f"{100 * r['delta_acc']:+.2f} | {r['vlmeval_miou']:.4f} | {r['lmms_eval_miou']:.4f} | "
                     f"{r['vlmeval_n']} / {r['lmms_eval_n']} |")
    return "\n".join(lines)
