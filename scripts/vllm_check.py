"""Cross-engine proof for the vLLM plug-in (docs/serving.md): the same kept tokens and the same greedy answer,
token for token, from vLLM (lmms_prune.vllm) and from our transformers engine (lmms_prune.apply), per preset
and ``positions``. Driven by scripts/vllm_check.sh, which runs each part in its own environment:

    python scripts/vllm_check.py transformers OUT [--model PATH]   # main venv: builds the toy, runs our engine
    python scripts/vllm_check.py vllm OUT PRESET POSITIONS          # vLLM venv: one engine, one configuration
    python scripts/vllm_check.py compare OUT                        # writes OUT/vllm_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PRESETS = ("vispruner", "divprune", "fastervlm")
UNPRUNED = "none"  # without the config key the registered class must serve the model as vLLM's own class does
POSITIONS = ("contiguous",)  # "original" is refused by the plug-in (docs/serving.md)
KEEP_RATIO = 0.25
MAX_NEW_TOKENS = 12
QUESTION = "Describe the picture in one sentence."
IMAGE_SIZE = (448, 336)  # 32 x 24 patches of 14 px: 16 x 12 = 192 merged tokens over 12 attention windows
TOY_LAYERS = 4
INIT_RANGE = 0.25
TOP_LOGPROBS = 5  # compared at the first generated token: a check of the positions beyond the argmax
LOGPROB_TOL = 1e-3


def _params(preset: str, positions: str) -> dict:
    return {"keep_ratio": KEEP_RATIO, "positions": positions}


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


def build_toy(out: Path) -> Path:
    """The toy Qwen2.5-VL (fp32) with text head_dim 64, which vLLM's CPU attention needs (the test toy's 16 is
    refused): one query and one key/value head of width 64, M-RoPE sections in the real 2:3:3 split."""
    import torch
    import transformers

    from lmms_prune.toy import models as toy

    path = out / "model"
    if (path / "config.json").exists():
        return path
    config = toy.tiny_config("qwen2_5_vl", TOY_LAYERS)
    text = config.text_config
    text.num_attention_heads = text.num_key_value_heads = 1
    text.head_dim = text.hidden_size
    text.rope_parameters["mrope_section"] = [8, 12, 12]  # sums to head_dim / 2
    # wider random weights than the test toy's 0.02, so that greedy answers depend on the kept tokens and their
    # positions instead of collapsing onto one token
    config.initializer_range = text.initializer_range = INIT_RANGE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    for key, value in toy.RECIPES["qwen2_5_vl"].generation().items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(path)
    toy.build_processor("qwen2_5_vl").save_pretrained(path)
    return path


def _answer(gen, prompt_length: int) -> dict:
    """The greedy tokens after the prompt and the first step's top log-probabilities of a ``generate`` output."""
    import torch

    top = torch.log_softmax(gen.scores[0][0].float(), -1).topk(TOP_LOGPROBS)
    return {"answer": gen.sequences[0, prompt_length:].tolist(),
            "first_logprobs": dict(zip(map(str, top.indices.tolist()), top.values.tolist()))}


def run_transformers(out: Path, model_path: Path | None) -> None:
    import torch
    import transformers

    import lmms_prune

    path = model_path or build_toy(out)
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
            t0 = time.perf_counter()
            with lmms_prune.apply(model, method=preset, **_params(preset, positions)) as handle:
                gen = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True)
                record = handle.records[-1]
            results[f"{preset}/{positions}"] = _answer(gen, length) | {
                "kept": [k.tolist() for k in record.kept], "visual_before": record.visual_before,
                "prompt_tokens_before": record.seq_len_before, "prompt_tokens_after": record.seq_len_after,
                "seconds": time.perf_counter() - t0}
            print(f"[transformers] {preset}/{positions}: kept {record.visual_after}/{record.visual_before}", flush=True)
    (out / "transformers.json").write_text(json.dumps(results, indent=1))


def run_vllm(out: Path, preset: str, positions: str) -> None:
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from lmms_prune.vllm.qwen2_5_vl import RECORD_ENV

    path = Path((out / "model_path").read_text())
    record = out / "vllm" / f"{preset}-{positions}.kept.jsonl"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)
    os.environ[RECORD_ENV] = str(record)
    t0 = time.perf_counter()
    llm = LLM(model=str(path), dtype="float32", max_model_len=2048, max_num_seqs=1, enforce_eager=True,
              limit_mm_per_prompt={"image": 1, "video": 0}, seed=0,
              hf_overrides={} if preset == UNPRUNED else {"lmms_prune": {"method": preset, **_params(preset, positions)}})
    load = time.perf_counter() - t0
    prompt = _prompt(AutoProcessor.from_pretrained(path))
    t0 = time.perf_counter()
    [result] = llm.generate({"prompt": prompt, "multi_modal_data": {"image": _image()}},
                            SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, logprobs=TOP_LOGPROBS))
    kept = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    kept = kept[-1:]  # the request's image (vLLM's start-up profiling encodes a dummy image first)
    (out / "vllm" / f"{preset}-{positions}.json").write_text(json.dumps({
        "kept": [k["kept"] for k in kept], "visual_before": sum(k["visual_before"] for k in kept),
        "prompt_tokens_after": len(result.prompt_token_ids), "answer": list(result.outputs[0].token_ids),
        "first_logprobs": {str(t): lp.logprob for t, lp in result.outputs[0].logprobs[0].items()},
        "load_seconds": load, "generate_seconds": time.perf_counter() - t0}, indent=1))


def _logprob_diff(ref: dict, got: dict) -> float | None:
    """Largest difference of the first generated token's top log-probabilities (transformers' top tokens looked
    up in vLLM's); None when vLLM's top tokens differ."""
    a, b = ref["first_logprobs"], got["first_logprobs"]
    if set(list(a)[:TOP_LOGPROBS - 1]) - set(b):  # the last of the top-k may tie with the next
        return None
    return max(abs(a[t] - b[t]) for t in a if t in b)


def compare(out: Path) -> bool:
    hf = json.loads((out / "transformers.json").read_text())
    rows, ok = [], True
    for key, ref in hf.items():
        preset, positions = key.split("/")
        part = out / "vllm" / f"{preset}-{positions}.json"
        got = json.loads(part.read_text()) if part.exists() else None
        row = {"family": "qwen2_5_vl", "preset": preset, "positions": positions, "keep_ratio": KEEP_RATIO,
               "prompt_tokens_before": ref["prompt_tokens_before"],
               "prompt_tokens_after": {"transformers": ref["prompt_tokens_after"],
                                       "vllm": None if got is None else got["prompt_tokens_after"]},
               "visual_tokens_before": ref["visual_before"],
               "kept_identical": got is not None and got["kept"] == ref["kept"],
               "answers_identical": got is not None and got["answer"] == ref["answer"],
               "first_token_logprob_max_diff": None if got is None else _logprob_diff(ref, got),
               "answer_tokens": {"transformers": ref["answer"], "vllm": None if got is None else got["answer"]},
               "error": None if got is not None else f"no vLLM result ({part.name}); see its log"}
        diff = row["first_token_logprob_max_diff"]
        ok &= row["kept_identical"] and row["answers_identical"] and diff is not None and diff < LOGPROB_TOL and (
            row["prompt_tokens_after"]["transformers"] == row["prompt_tokens_after"]["vllm"])
        rows.append(row)
    # the toy's answers must depend on which tokens are kept, or equal answers would prove nothing
    answers = [tuple(r["answer"]) for key, r in hf.items() if not key.startswith(UNPRUNED)]
    informative = len(set(answers)) == len(answers)
    (out / "vllm_check.json").write_text(json.dumps({
        "all_identical": ok, "answers_differ_between_presets": informative, "rows": rows}, indent=1))
    ok &= informative
    for r in rows:
        print(f"{r['preset']:>10} {r['positions']:>10}: kept {'==' if r['kept_identical'] else '!='}  answer "
              f"{'==' if r['answers_identical'] else '!='}  prompt {r['prompt_tokens_before']} -> "
              f"{r['prompt_tokens_after']}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("transformers", "vllm", "compare"))
    parser.add_argument("out", type=Path)
    parser.add_argument("preset", nargs="?", choices=(UNPRUNED, *PRESETS))
    parser.add_argument("positions", nargs="?", choices=POSITIONS)
    parser.add_argument("--model", type=Path, default=None, help="a local Qwen2.5-VL checkpoint (default: the toy)")
    args = parser.parse_args(argv)
    if args.model is not None and not (args.model / "config.json").exists():
        parser.error(f"--model {args.model}: no config.json there; give a local Qwen2.5-VL checkpoint folder")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "transformers":
        run_transformers(args.out, args.model)
    elif args.part == "vllm":
        if args.preset is None or args.positions is None:
            parser.error("vllm: give PRESET and POSITIONS")
        run_vllm(args.out, args.preset, args.positions)
    else:
        return 0 if compare(args.out) else 1
    return 0


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    sys.exit(main())
