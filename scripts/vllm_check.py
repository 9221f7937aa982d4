"""Cross-engine proof for the vLLM plug-in (docs/serving.md): the same kept tokens and the same greedy answer,
token for token, from vLLM (lmms_prune.vllm) and from our transformers engine (lmms_prune.apply), per family,
preset and ``positions``. Driven by scripts/vllm_check.sh, which runs each part in its own environment:

    python scripts/vllm_check.py transformers OUT FAMILY [--model PATH]  # main venv: builds the toy, our engine
    python scripts/vllm_check.py vllm OUT FAMILY PRESET POSITIONS        # vLLM venv: one engine, one configuration
    python scripts/vllm_check.py compare OUT                             # writes OUT/vllm_check.json

Each family's files live under ``OUT/FAMILY/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision", "internvl")  # the families the plug-in serves (lmms_prune.vllm)
TOYS = {"internvl": "internvl_qwen2"}  # the toy of a family where its name differs (InternVL2.5's Qwen2 LLM)
MROPE = {"qwen2_5_vl": [8, 12, 12], "qwen2_vl": [8, 12, 12], "qwen3_vl": [12, 10, 10]}
PRESETS = ("vispruner", "divprune", "fastervlm", "visionzip", "prumerge_plus", "random", "uniform")  # lmms_prune.vllm
# presets whose own default stage is inside the LLM: served with stage=pre_llm, which both engines are told
PRE_LLM_STAGE = ("random", "uniform")
UNPRUNED = "none"  # without the config key the registered class must serve the model as vLLM's own class does
POSITIONS = ("contiguous", "original")  # "original": presets that keep a subset (docs/serving.md)
KEEP_RATIO = 0.25
MAX_NEW_TOKENS = 12
QUESTION = "Describe the picture in one sentence."
# Qwen2(.5)-VL: 32 x 24 patches of 14 px, 16 x 12 = 192 merged tokens (Qwen2.5-VL: over 12 attention windows);
# Qwen3-VL (patch 16) resizes it to 448 x 320: 14 x 10 = 140 merged tokens
IMAGE_SIZE = (448, 336)
# LLaVA's toy tower sees 112 px (8 x 8 = 64 tokens) instead of LLaVA-1.5's 336 (576): the [CLS] attention of a
# random tower is flat, and among 576 values some differ by less than the two engines' fp32 rounding (~1e-7 of
# the largest: vLLM's fused q/k/v projection), which reorders VisPruner's candidate list and so its pairing
# (seen at 336 px: 29 of 144 kept tokens differed while every score agreed to 2.6e-7); the method runs the same
# code on either grid
LLAVA_SIDE = 112
# InternVL's likewise: one 224 px tile (16 x 16 patches, 64 tokens after pixel shuffle) instead of up to 6 tiles of
# 448 px plus a thumbnail (1792 tokens at this image, where 62 of 448 kept tokens differed with every score
# agreeing to 2.1e-6)
INTERNVL_SIDE = 224
TOY_LAYERS = 4
INIT_RANGE = 0.25
TOP_LOGPROBS = 5  # compared at the first generated token: a check of the positions beyond the argmax
LOGPROB_TOL = 1e-3
ROOT = Path(__file__).resolve().parents[1]
LMMS_EVAL_TASK = "mme_tiny"  # tests/tasks: lmms-eval's MME task on two tiny parquet rows
VLMEVAL_DATA = "TinyMCQ"  # a VLMEvalKit custom-MCQ TSV of two rows (the test image and its mirror), as tests/test_vlmeval.py
LMMS_EVAL_LIMIT = 2
# logged by lmms_prune.vllm.base per prompt ("?": an image served from vLLM's processor cache)
# the efficiency records' token counts both backends must agree on (runner and vlmeval parts)
RECORD_KEYS = ("visual_before", "visual_before_papers", "visual_after", "seq_len_before", "seq_len_after",
               "output_tokens")
PRUNED_PROMPT = re.compile(r"lmms_prune: prompt (\d+|\?) -> (\d+) tokens")


def _params(preset: str, positions: str) -> dict:
    stage = {"stage": "pre_llm"} if preset in PRE_LLM_STAGE else {}
    return {"keep_ratio": KEEP_RATIO, "positions": positions, **stage}


def _not_served(family: str, preset: str, positions: str = "contiguous") -> str | None:
    """Why ``preset`` with ``positions`` is not run on ``family``, or None: refused by our engine too (merged
    tokens have no original position) or by the plug-in's own rule (:func:`lmms_prune.vllm.family_refusal`: merges
    where DeepStack adds per-token features inside the LLM, Qwen3-VL, and where row newlines sit inside the image's
    run, LLaVA-NeXT and LLaVA-OneVision)."""
    from lmms_prune.presets import resolve_config
    from lmms_prune.vllm import family_refusal

    if preset == UNPRUNED:
        return None if positions == POSITIONS[0] else "unpruned: one run, whatever the positions setting"
    try:
        cfg = resolve_config(preset, **_params(preset, positions))
    except ValueError as err:
        return str(err)
    return family_refusal(family, cfg)


def _image():
    """A deterministic RGB test image (smooth gradients plus seeded noise, so vision attention is not flat)."""
    import numpy as np
    from PIL import Image

    w, h = IMAGE_SIZE
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) % 97 * 2.5], -1) + rng.normal(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype("uint8"))


def _prompt(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _toy_text(config, family: str) -> None:
    """Text head_dim 64, which vLLM's CPU attention needs (the test toys' 16 is refused): one query and one
    key/value head as wide as the model; the Qwen families' M-RoPE sections of the real models' split over its 32
    frequencies (Qwen2(.5)-VL: the real 16:24:24 of 64, summing to head_dim / 2; Qwen3-VL: the real interleaved
    24:20:20). LLaVA's text model (Llama) has 1-D RoPE."""
    text = config.text_config
    text.num_attention_heads = text.num_key_value_heads = 1
    text.head_dim = text.hidden_size
    if family in MROPE:
        text.rope_parameters["mrope_section"] = MROPE[family]


def build_toy(out: Path, family: str) -> Path:
    """The toy of ``family`` (fp32, :data:`TOY_LAYERS` decoder layers) with text head_dim 64 (:func:`_toy_text`),
    under ``out/model``."""
    import torch
    import transformers

    from lmms_prune.toy import models as toy

    path = out / "model"
    if (path / "config.json").exists():
        return path
    config = toy.tiny_config(TOYS.get(family, family), TOY_LAYERS)
    _toy_text(config, family)
    if family == "llava":
        config.vision_config.image_size = LLAVA_SIDE
        config.image_seq_length = (LLAVA_SIDE // config.vision_config.patch_size) ** 2
    if family == "internvl":
        config.vision_config.image_size = (INTERNVL_SIDE, INTERNVL_SIDE)
        config.image_seq_length = (INTERNVL_SIDE // config.vision_config.patch_size[0] // 2) ** 2
    # wider random weights than the test toy's 0.02, so that greedy answers depend on the kept tokens and their
    # positions instead of collapsing onto one token, and the vision attention is far from uniform (at 0.02 the
    # received attention of Qwen3-VL's tower ties within 1e-6, where the two engines' rounding picks different
    # tokens)
    for part in (config, config.text_config, config.vision_config):
        if hasattr(part, "initializer_range"):
            part.initializer_range = INIT_RANGE
    recipe = toy.RECIPES[TOYS.get(family, family)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, recipe.model_class)._from_config(config, dtype=torch.float32)
    for key, value in recipe.generation().items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(path)
    processor = toy.build_processor(TOYS.get(family, family))
    if family in ("llava", "llava_next", "llava_onevision"):
        hub_layout(path)
    if family == "llava":
        processor.image_processor.size = {"shortest_edge": LLAVA_SIDE}
        processor.image_processor.crop_size = {"height": LLAVA_SIDE, "width": LLAVA_SIDE}
    if family == "internvl":
        processor.image_processor.size = {"height": INTERNVL_SIDE, "width": INTERNVL_SIDE}
        processor.image_processor.max_patches = 1  # one tile (InternVLProcessor forces crop_to_patches on)
        processor.image_seq_length = (INTERNVL_SIDE // config.vision_config.patch_size[0] // 2) ** 2
    processor.save_pretrained(path)
    return path


def hub_layout(path: Path) -> None:
    """Rename a LLaVA checkpoint's tower weights to the layout of the hub's llava-hf checkpoints
    (``vision_tower.vision_model.*``). transformers 5.2x saves them as ``vision_tower.*``, which vLLM 0.32's LLaVA
    loader does not map (it expects the hub's names); transformers loads both layouts into the same model."""
    from safetensors.torch import load_file, save_file

    for file in path.glob("*.safetensors"):
        weights = load_file(file)
        prefix = "vision_tower."
        renamed = {(f"{prefix}vision_model.{k[len(prefix):]}"
                    if k.startswith(prefix) and not k.startswith(f"{prefix}vision_model.") else k): v
                   for k, v in weights.items()}
        save_file(renamed, file, metadata={"format": "pt"})


def model_family(path: Path) -> str:
    """The plug-in family of a checkpoint folder (its config's ``model_type``), or a ValueError naming it."""
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"--model {path}: model_type {model_type!r} is not served by the vLLM plug-in; "
                         f"give a checkpoint of {', '.join(FAMILIES)}")
    return model_type


def _answer(gen, prompt_length: int) -> dict:
    """The greedy tokens after the prompt and the first step's top log-probabilities of a ``generate`` output."""
    import torch

    top = torch.log_softmax(gen.scores[0][0].float(), -1).topk(TOP_LOGPROBS)
    return {"answer": gen.sequences[0, prompt_length:].tolist(),
            "first_logprobs": dict(zip(map(str, top.indices.tolist()), top.values.tolist()))}


def _observe_scores(handle) -> list:
    """A list that fills with the preset's score per image (``[N]`` floats, or None) as the handle selects."""
    seen: list = []
    score = handle.score

    def observed(image):
        out = score(image)
        seen.append(None if out is None else out.float().tolist())
        return out

    handle.score = observed
    return seen


def run_transformers(out: Path, family: str, model_path: Path | None) -> None:
    """Our engine on ``family``'s toy (or ``model_path``): unpruned, then every preset with each ``positions``
    setting served on the family; ``out/transformers.json``."""
    import torch
    import transformers

    import lmms_prune

    path = model_path or build_toy(out, family)
    (out / "model_path").write_text(str(path))
    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor(text=[_prompt(processor)], images=[_image()], return_tensors="pt")
    results = {}
    t0 = time.perf_counter()
    gen = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    length = int(inputs["input_ids"].shape[1])
    results[f"{UNPRUNED}/{POSITIONS[0]}"] = _answer(gen, length) | {
        "kept": [], "visual_before": None, "prompt_tokens_before": length, "prompt_tokens_after": length,
        "seconds": time.perf_counter() - t0}
    for preset in PRESETS:
        for positions in POSITIONS:
            if _not_served(family, preset, positions):
                continue
            t0 = time.perf_counter()
            with lmms_prune.apply(model, method=preset, **_params(preset, positions)) as handle:
                scores = _observe_scores(handle)
                gen = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True)
                record = handle.records[-1]
            results[f"{preset}/{positions}"] = _answer(gen, length) | {
                "kept": [k.tolist() for k in record.kept], "visual_before": record.visual_before, "scores": scores,
                "prompt_tokens_before": record.seq_len_before, "prompt_tokens_after": record.seq_len_after,
                "seconds": time.perf_counter() - t0}
            print(f"[transformers] {family} {preset}/{positions}: kept {record.visual_after}/{record.visual_before}",
                  flush=True)
    (out / "transformers.json").write_text(json.dumps(results, indent=1))


def run_vllm(out: Path, family: str, preset: str, positions: str) -> None:
    """One vLLM engine with ``preset`` (or none) on the model ``run_transformers`` used; ``out/vllm/*.json``
    (nothing for a preset the family is not served with, :func:`_not_served`)."""
    why = _not_served(family, preset, positions)
    if why:
        print(f"[vllm_check] {family} is not served with {preset}/{positions} (refused by the plug-in and our "
              f"engine: {why})")
        return
    from transformers import AutoConfig, AutoProcessor
    from vllm import LLM, SamplingParams

    from lmms_prune.vllm import served_overrides
    from lmms_prune.vllm.base import RECORD_ENV

    path = Path((out / "model_path").read_text())
    record = out / "vllm" / f"{preset}-{positions}.kept.jsonl"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)
    os.environ[RECORD_ENV] = str(record)
    t0 = time.perf_counter()
    prune = None if preset == UNPRUNED else {"method": preset, **_params(preset, positions)}
    llm = LLM(model=str(path), dtype="float32", max_model_len=2048, max_num_seqs=2, enforce_eager=True,
              limit_mm_per_prompt={"image": 1, "video": 0}, seed=0,
              hf_overrides=served_overrides(family, prune, AutoConfig.from_pretrained(path)))
    load = time.perf_counter() - t0
    prompt = _prompt(AutoProcessor.from_pretrained(path))
    request = {"prompt": prompt, "multi_modal_data": {"image": _image()}}
    t0 = time.perf_counter()
    [result] = llm.generate(request, SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, logprobs=TOP_LOGPROBS))
    seconds = time.perf_counter() - t0
    kept = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    kept = kept[-1:]  # the request's image (vLLM's start-up profiling encodes a dummy image first)
    # a batch equals its samples: the request beside one with another image (another grid: the transposed image)
    # in one engine step, against each alone; the second run of the first image also meets vLLM's caches
    from PIL import Image

    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
    other = {"prompt": prompt, "multi_modal_data": {"image": _image().transpose(Image.Transpose.TRANSPOSE)}}
    [alone] = llm.generate(other, greedy)
    batch = llm.generate([request, other], greedy)
    answer = list(result.outputs[0].token_ids)
    (out / "vllm" / f"{preset}-{positions}.json").write_text(json.dumps({
        "kept": [k["kept"] for k in kept], "visual_before": sum(k["visual_before"] for k in kept),
        "scores": [k.get("scores") for k in kept],
        "prompt_tokens_after": len(result.prompt_token_ids), "answer": answer,
        "batch_answers": [list(b.outputs[0].token_ids) for b in batch],
        "batch_equals_samples": [list(b.outputs[0].token_ids) for b in batch] == [answer,
                                                                                  list(alone.outputs[0].token_ids)],
        "first_logprobs": {str(t): lp.logprob for t, lp in result.outputs[0].logprobs[0].items()},
        "load_seconds": load, "generate_seconds": seconds}, indent=1))


RUNNER_ENGINE = {"max_model_len": 2048, "enforce_eager": True, "limit_mm_per_prompt": {"image": 1, "video": 0}}
# family options of the runner check: InternVL's lmms-eval default of 12 tiles (plus a thumbnail) would give 832
# near-tied tokens on the toy; one tile, as the toy's own processor
RUNNER_ARGS = {"internvl": ["max_patches=1"]}


def _model_args(path: Path, family: str, preset: str, backend: str, positions: str = "contiguous") -> list[str]:
    """Our model's ``--model_args`` items for the toy at ``path`` with ``backend`` (lmms-eval's and VLMEvalKit's)."""
    args = [f"pretrained={path}", f"backend={backend}", f"keep_ratio={KEEP_RATIO}", f"positions={positions}",
            "dtype=float32", *RUNNER_ARGS.get(family, []), *(["stage=pre_llm"] if preset in PRE_LLM_STAGE else [])]
    if backend == "vllm":
        args.append("vllm_engine_args=" + json.dumps(RUNNER_ENGINE, separators=(",", ":")))
    return args


def _mcq_tsv(folder: Path) -> None:
    """``folder/TinyMCQ.tsv``: VLMEvalKit's custom image-MCQ format (index, base64 PNG, question, options, answer,
    category) with the test image and its mirror."""
    import base64
    import csv
    import io

    from PIL import ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, image in enumerate((_image(), ImageOps.mirror(_image()))):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        rows.append({"index": index, "image": base64.b64encode(buf.getvalue()).decode(), "question": QUESTION,
                     "A": "a gradient", "B": "a cat", "C": "a table", "answer": "A", "category": "toy"})
    with (folder / f"{VLMEVAL_DATA}.tsv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def run_vlmeval(out: Path, family: str, preset: str, backend: str) -> None:
    """Our model ``FAMILY_PRESET`` in VLMEvalKit (``lmms-prune vlmeval``, its run.py and exact-matching scorer) with
    ``backend=BACKEND`` on :data:`VLMEVAL_DATA`; ``out/vlmeval/BACKEND.json``: the predictions and the efficiency
    records' token counts per sample (needs VLMEvalKit in the environment: ``LMMS_PRUNE_VLLM_VLMEVAL=1`` for the
    vLLM venv)."""
    path = Path((out / "model_path").read_text())
    where = out / "vlmeval" / backend
    shutil.rmtree(where, ignore_errors=True)
    _mcq_tsv(where / "LMUData")
    model, work = f"{family}_{preset}", where / "work"
    cmd = [sys.executable, "-m", "lmms_prune.cli.main", "vlmeval", "--model", model, "--model-args",
           ",".join(_model_args(path, family, preset, backend)), "--data", VLMEVAL_DATA, "--work-dir", str(work),
           "--judge", "exact_matching", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    t0 = time.perf_counter()
    env = {**os.environ, "LMUData": str(where / "LMUData")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=where, env=env)
    (where / "vlmeval.log").write_text(proc.stdout + proc.stderr)
    answers, records = [], []
    table = work / model / f"{model}_{VLMEVAL_DATA}.xlsx"
    if table.exists():
        from vlmeval.smp import load

        answers = [str(p) for p in load(str(table)).sort_values("index")["prediction"]]
    eff = work / model / f"{model}_{VLMEVAL_DATA}_efficiency.json"
    if eff.exists():
        records = [{k: r.get(k) for k in RECORD_KEYS} for r in json.loads(eff.read_text())["samples"]]
    (out / "vlmeval" / f"{backend}.json").write_text(json.dumps({
        "command": cmd, "returncode": proc.returncode, "seconds": time.perf_counter() - t0, "answers": answers,
        "records": records}, indent=1))


def run_runner(out: Path, family: str, preset: str, backend: str, positions: str = "contiguous") -> None:
    """Our own lmms-eval model (``--model FAMILY_PRESET``) with ``backend=BACKEND`` on the tiny MME task, from
    lmms-eval's command line (the transformers backend in the main venv, vllm in the vLLM venv);
    ``out/runner/BACKEND.json``: the answers and the efficiency records' token counts per sample."""
    path = Path((out / "model_path").read_text())
    where = out / "runner" / backend
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    args = [*_model_args(path, family, preset, backend, positions), f"efficiency_path={where / 'efficiency.json'}"]
    cmd = [sys.executable, "-m", "lmms_eval", "--model", f"{family}_{preset}", "--model_args", ",".join(args),
           "--tasks", LMMS_EVAL_TASK, "--include_path", str(ROOT / "tests" / "tasks"), "--limit",
           str(LMMS_EVAL_LIMIT), "--batch_size", "1", "--output_path", str(where / "results"), "--log_samples"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    (where / "lmms_eval.log").write_text(proc.stdout + proc.stderr)
    samples = sorted((json.loads(line) for p in (where / "results").rglob("*_samples_*.jsonl")
                      for line in p.read_text().splitlines()), key=lambda r: r["doc_id"])
    eff = where / "efficiency.json"
    records = json.loads(eff.read_text())["samples"] if eff.exists() else []
    (out / "runner" / f"{backend}.json").write_text(json.dumps({
        "command": cmd, "returncode": proc.returncode, "seconds": time.perf_counter() - t0,
        "answers": [s["filtered_resps"] for s in samples],
        "records": [{k: r.get(k) for k in RECORD_KEYS} for r in sorted(records, key=lambda r: r["doc_id"])]},
        indent=1))


def compare_runner(out: Path, family: str, part: str = "runner") -> dict | None:
    """Both backends' runs of :func:`run_runner` (``part="runner"``, lmms-eval) or :func:`run_vlmeval`
    (``"vlmeval"``): same answers, same token counts, every sample."""
    parts = {b: out / family / part / f"{b}.json" for b in ("transformers", "vllm")}
    if not all(p.exists() for p in parts.values()):
        return None
    got = {b: json.loads(p.read_text()) for b, p in parts.items()}
    hf, vl = got["transformers"], got["vllm"]
    n = LMMS_EVAL_LIMIT
    return {"samples": [len(hf["answers"]), len(vl["answers"])],
            "answers_identical": len(hf["answers"]) == n and hf["answers"] == vl["answers"],
            "records_identical": len(hf["records"]) == n and hf["records"] == vl["records"],
            "records": {"transformers": hf["records"], "vllm": vl["records"]}}


def run_lmms_eval(out: Path, preset: str, positions: str = "contiguous") -> None:
    """lmms-eval's own ``vllm`` model (``--model vllm``) with ``preset`` in ``hf_overrides`` on the tiny MME task,
    from lmms-eval's command line; ``out/lmms_eval.json`` says whether it wrote its results and which pruned
    prompt lengths its log shows (the plug-in logs ``lmms_prune: prompt T -> T' tokens`` per request)."""
    from lmms_prune.vllm import lmms_eval_model_args

    path = Path((out / "model_path").read_text())
    model_args = lmms_eval_model_args(
        str(path), {"method": preset, **_params(preset, positions)}, dtype="float32", max_model_len=2048,
        max_num_seqs=1, enforce_eager=True, limit_mm_per_prompt={"image": 1, "video": 0})
    results = out / "lmms_eval"
    shutil.rmtree(results, ignore_errors=True)  # an earlier run's results would count as this run's
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vllm", "--model_args", model_args, "--tasks", LMMS_EVAL_TASK,
           "--include_path", str(ROOT / "tests" / "tasks"), "--limit", str(LMMS_EVAL_LIMIT), "--batch_size", "1",
           "--output_path", str(results), "--log_samples"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    log = proc.stdout + proc.stderr
    (out / "lmms_eval.log").write_text(log)
    prompts = [(None if a == "?" else int(a), int(b)) for a, b in PRUNED_PROMPT.findall(log)]
    written = sorted(str(p.relative_to(out)) for p in results.rglob("*_results.json"))
    samples = sum(len(p.read_text().splitlines()) for p in results.rglob("*_samples_*.jsonl"))
    # one line per request (and one for vLLM's start-up warm-up), each shorter than before where that is known
    ok = (bool(written) and samples == LMMS_EVAL_LIMIT and len(prompts) >= LMMS_EVAL_LIMIT
          and all(a is None or a > b for a, b in prompts))
    (out / "lmms_eval.json").write_text(json.dumps({
        "command": cmd, "returncode": proc.returncode, "results_written": written, "samples": samples,
        "pruned_prompts_in_log": prompts, "ok": ok, "seconds": time.perf_counter() - t0}, indent=1))


def _logprob_diff(ref: dict, got: dict) -> float | None:
    """Largest difference of the first generated token's top log-probabilities (transformers' top tokens looked
    up in vLLM's); None when vLLM's top tokens differ."""
    a, b = ref["first_logprobs"], got["first_logprobs"]
    if set(list(a)[:TOP_LOGPROBS - 1]) - set(b):  # the last of the top-k may tie with the next
        return None
    return max(abs(a[t] - b[t]) for t in a if t in b)


def _score_diff(ref: list | None, got: list | None) -> float | None:
    """Largest difference of the per-image scores the selection used, relative to the largest score (None
    where the preset has no score or a side did not record one)."""
    import numpy as np

    if not ref or not got or len(ref) != len(got) or any(r is None or g is None for r, g in zip(ref, got)):
        return None
    return max(float(np.abs(np.subtract(r, g)).max() / max(np.abs(r).max(), 1e-30)) for r, g in zip(ref, got))


def compare_family(out: Path, family: str, presets: list[str], positions_asked: tuple[str, ...] = POSITIONS
                   ) -> tuple[list[dict], bool]:
    """Rows of ``presets`` x ``positions_asked`` (vLLM's side asked for) of one family, and whether the toy is
    informative: within each positions setting the pruned answers differ from each other and from the unpruned one
    (else equal answers would prove nothing), and each preset's ``original`` run differs from its ``contiguous``
    run at the first token's log-probabilities (so the positions were exercised)."""
    hf = json.loads((out / "transformers.json").read_text())
    rows = []
    for key, ref in hf.items():
        preset, positions = key.split("/")
        if preset not in presets or (preset != UNPRUNED and positions not in positions_asked):
            continue
        part = out / "vllm" / f"{preset}-{positions}.json"
        got = json.loads(part.read_text()) if part.exists() else None
        row = {"family": family, "preset": preset, "positions": positions, "keep_ratio": KEEP_RATIO,
               "prompt_tokens_before": ref["prompt_tokens_before"],
               "prompt_tokens_after": {"transformers": ref["prompt_tokens_after"],
                                       "vllm": None if got is None else got["prompt_tokens_after"]},
               "visual_tokens_before": ref["visual_before"],
               "kept_identical": got is not None and got["kept"] == ref["kept"],
               "answers_identical": got is not None and got["answer"] == ref["answer"],
               "vllm_batch_equals_samples": got is not None and got.get("batch_equals_samples") is True,
               "first_token_logprob_max_diff": None if got is None else _logprob_diff(ref, got),
               "score_max_rel_diff": None if got is None else _score_diff(ref.get("scores"), got.get("scores")),
               "answer_tokens": {"transformers": ref["answer"], "vllm": None if got is None else got["answer"]},
               "error": None if got is not None else f"no vLLM result ({family}/vllm/{part.name}); see its log"}
        diff = row["first_token_logprob_max_diff"]
        row["identical"] = bool(row["kept_identical"] and row["answers_identical"] and diff is not None
                                and row["vllm_batch_equals_samples"]
                                and diff < LOGPROB_TOL
                                and row["prompt_tokens_after"]["transformers"] == row["prompt_tokens_after"]["vllm"])
        rows.append(row)
    informative = True
    for positions in POSITIONS:
        answers = [tuple(r["answer"]) for k, r in hf.items() if k.endswith(f"/{positions}") or k.startswith(UNPRUNED)]
        informative &= len(set(answers)) == len(answers)
    for key, ref in hf.items():
        other = hf.get(key.replace("/original", "/contiguous"))
        if key.endswith("/original") and other is not None:
            diff = max(abs(v - other["first_logprobs"].get(t, float("inf"))) for t, v in ref["first_logprobs"].items())
            informative &= diff > LOGPROB_TOL
    return rows, informative


def compare(out: Path, families: list[str], presets: list[str], positions: tuple[str, ...] = POSITIONS) -> bool:
    """``out/vllm_check.json`` over ``families`` x ``presets`` x ``positions``; True when every row is identical
    and every family's toy informative."""
    rows, informative = [], {}
    for family in families:
        family_rows, informative[family] = compare_family(out / family, family, presets, positions)
        rows += family_rows
    ok = bool(rows) and all(r["identical"] for r in rows)
    harness = {family: json.loads((out / family / "lmms_eval.json").read_text()) for family in families
               if (out / family / "lmms_eval.json").exists()}
    (out / "vllm_check.json").write_text(json.dumps({
        "all_identical": ok, "answers_differ_between_presets": informative,
        "lmms_eval_vllm": {f: {k: h[k] for k in ("ok", "pruned_prompts_in_log", "samples", "results_written")}
                           for f, h in harness.items()},
        "rows": rows}, indent=1))
    for family, h in harness.items():
        print(f"{family:>10} lmms-eval --model vllm: {'ok' if h['ok'] else 'FAILED'}, pruned prompts in its log "
              f"{h['pruned_prompts_in_log']}")
    ok &= all(h["ok"] for h in harness.values())
    for part, key, harness_name in (("runner", "runner_backends", "lmms-eval"),
                                    ("vlmeval", "vlmeval_backends", "VLMEvalKit")):
        both = {family: r for family in families if (r := compare_runner(out, family, part)) is not None}
        if both:
            data = json.loads((out / "vllm_check.json").read_text())
            data[key] = both
            (out / "vllm_check.json").write_text(json.dumps(data, indent=1))
        for family, r in both.items():
            print(f"{family:>10} our model in {harness_name}, backend=transformers vs vllm: answers "
                  f"{'==' if r['answers_identical'] else '!='}, records {'==' if r['records_identical'] else '!='} "
                  f"{r['records']['vllm']}")
            ok &= r["answers_identical"] and r["records_identical"]
    for r in rows:
        print(f"{r['family']:>10} {r['preset']:>10} {r['positions']:>10}: kept "
              f"{'==' if r['kept_identical'] else '!='}  answer {'==' if r['answers_identical'] else '!='}  "
              f"prompt {r['prompt_tokens_before']} -> {r['prompt_tokens_after']}")
    return ok and all(informative.values())


def _names(text: str, known: tuple[str, ...]) -> list[str]:
    names = [n for n in text.replace(",", " ").split() if n]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give names out of {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    family = sub.add_parser("family", help="print the plug-in family of a checkpoint folder")
    family.add_argument("model", type=Path)
    hf = sub.add_parser("transformers", help="our engine, every preset (main venv)")
    hf.add_argument("out", type=Path)
    hf.add_argument("family", choices=FAMILIES)
    hf.add_argument("--model", type=Path, default=None, help="a local checkpoint of FAMILY (default: the toy)")
    vl = sub.add_parser("vllm", help="one vLLM engine, one configuration (vLLM venv)")
    vl.add_argument("out", type=Path)
    vl.add_argument("family", choices=FAMILIES)
    vl.add_argument("preset", choices=(UNPRUNED, *PRESETS))
    vl.add_argument("positions", choices=POSITIONS)
    le = sub.add_parser("lmms_eval", help="lmms-eval's --model vllm with PRESET on a tiny task (vLLM venv)")
    le.add_argument("out", type=Path)
    le.add_argument("family", choices=FAMILIES)
    le.add_argument("preset", choices=PRESETS)
    le.add_argument("--positions", choices=POSITIONS, default="contiguous")
    rn = sub.add_parser("runner", help="our lmms-eval model with backend=BACKEND on a tiny task")
    rn.add_argument("out", type=Path)
    rn.add_argument("family", choices=FAMILIES)
    rn.add_argument("preset", choices=PRESETS)
    rn.add_argument("backend", choices=("transformers", "vllm"))
    rn.add_argument("--positions", choices=POSITIONS, default="contiguous")
    vk = sub.add_parser("vlmeval", help="our model in VLMEvalKit with backend=BACKEND on a tiny MCQ set")
    vk.add_argument("out", type=Path)
    vk.add_argument("family", choices=FAMILIES)
    vk.add_argument("preset", choices=PRESETS)
    vk.add_argument("backend", choices=("transformers", "vllm"))
    cmp = sub.add_parser("compare", help="write OUT/vllm_check.json")
    cmp.add_argument("out", type=Path)
    cmp.add_argument("--families", type=lambda t: _names(t, FAMILIES), default=list(FAMILIES))
    cmp.add_argument("--presets", type=lambda t: _names(t, (UNPRUNED, *PRESETS)), default=[UNPRUNED, *PRESETS])
    cmp.add_argument("--positions", type=lambda t: _names(t, POSITIONS), default=list(POSITIONS))
    args = parser.parse_args(argv)
    if args.part == "family":
        if not (args.model / "config.json").exists():
            parser.error(f"--model {args.model}: no config.json there; give a local checkpoint folder of one of "
                         f"{', '.join(FAMILIES)}")
        try:
            print(model_family(args.model))
        except ValueError as e:
            parser.error(str(e))
        return 0
    if args.part == "compare":
        return 0 if compare(args.out, args.families, args.presets, args.positions) else 1
    out = args.out / args.family
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "transformers":
        run_transformers(out, args.family, args.model)
    elif args.part == "lmms_eval":
        run_lmms_eval(out, args.preset, args.positions)
    elif args.part == "runner":
        run_runner(out, args.family, args.preset, args.backend, args.positions)
    elif args.part == "vlmeval":
        run_vlmeval(out, args.family, args.preset, args.backend)
    else:
        run_vllm(out, args.family, args.preset, args.positions)
    return 0


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    sys.exit(main())
