"""Throughput of pruned against unpruned serving under vLLM (docs/serving.md): requests per second and time to
first token (TTFT) at several ``keep_ratio`` settings in one run, beside the theoretical FLOPs ratio. Driven by
scripts/vllm_bench.sh, which runs each part in its own environment:

    python scripts/vllm_bench.py build OUT [--layers L] [--vision-layers V] [--image-size PX] [--keep-ratios ...]
        # main venv: a random-weight Qwen2.5-VL of real 3B geometry, its prompt, and the FLOPs plan
    python scripts/vllm_bench.py run OUT SETTING     # vLLM venv: one engine, one setting ("none" or a keep ratio)
    python scripts/vllm_bench.py report OUT          # OUT/vllm_bench.json and OUT/vllm_bench.md

The model has Qwen2.5-VL-3B-Instruct's widths (text: width 2048, 16 query / 2 key-value heads, FFN 11008, vocabulary
151936, tied embeddings; vision: the 32-block tower of width 1280) with random bfloat16 weights, cut to ``--layers``
decoder layers and ``--vision-layers`` vision blocks (default 9 of 36 and 8 of 32: a quarter of each, so that the
vision tower's share of the work, which pruning before the LLM does not reduce, is the real model's; and small
enough for a shared CPU machine). Each request sends its own random image (no encoder-cache or prefix-cache hits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

GEOMETRY = {"text": (36, 2048, 16, 2, 11008, "qwen2")}  # Qwen2.5-VL-3B-Instruct: layers, width, heads, kv, FFN
VOCAB = 151936
METHOD = "divprune"
KEEP_RATIOS = (0.10, 0.25)
IMAGE_SIZE = 672  # 24 x 24 = 576 merged tokens (2304 patches)
QUESTION = "Describe the picture in one sentence."
TTFT_REQUESTS = 3  # one at a time, max_tokens=1, after one warm-up request
BATCH_REQUESTS = 4  # submitted together for requests per second
BATCH_NEW_TOKENS = 16


def _setting_name(keep_ratio: float | None) -> str:
    return "none" if keep_ratio is None else f"keep{keep_ratio:g}"


def build(out: Path, layers: int, vision_layers: int, image_size: int, keep_ratios: list[float]) -> None:
    """``out/model`` (random weights, the toy Qwen tokenizer and processor with the real pixel settings) and
    ``out/plan.json``: per setting the prompt and visual token counts and the theoretical FLOPs."""
    import torch
    import transformers

    from lmms_prune import selection as sel
    from lmms_prune.efficiency import DecoderDims, prefill_flops
    from lmms_prune.families.qwen2_5_vl import Qwen25VL
    from lmms_prune.toy import models as toy
    from lmms_prune.toy import tokenizers as toy_tok

    model_cls, config = Qwen25VL.build_geometry(GEOMETRY, layers)
    full_config = Qwen25VL.build_geometry(GEOMETRY)[1]
    Qwen25VL.cut_vision(config, vision_layers)
    ids = toy_tok.QWEN_SPECIAL_IDS
    for cfg in (config, full_config):  # the toy tokenizer's special tokens, Qwen's real vocabulary size
        cfg.text_config.vocab_size = VOCAB
        cfg.text_config.tie_word_embeddings = cfg.tie_word_embeddings = True
        cfg.image_token_id, cfg.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
        cfg.vision_start_token_id, cfg.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    path = out / "model"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        model = model_cls._from_config(config, dtype=torch.bfloat16)
        for key, value in toy.RECIPES["qwen2_5_vl"].generation().items():
            setattr(model.generation_config, key, value)
        model.save_pretrained(path)
        del model
    pixels = {**toy.QWEN_PIXEL_KWARGS, "max_pixels": image_size * image_size}  # the image is not resized
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**pixels), tokenizer=toy.RECIPES["qwen2_5_vl"].tokenizer(),
        video_processor=transformers.Qwen2VLVideoProcessor(**pixels), chat_template=toy.QWEN2_5_VL_CHAT_TEMPLATE)
    processor.save_pretrained(path)
    inputs = processor(text=[_prompt(processor)], images=[_image(0, image_size)], return_tensors="pt")
    prompt = int(inputs["input_ids"].shape[1])
    visual = int((inputs["input_ids"] == config.image_token_id).sum())
    plan = {"geometry": "Qwen2.5-VL-3B-Instruct widths", "layers": layers, "vision_layers": vision_layers,
            "full_layers": GEOMETRY["text"][0], "full_vision_layers": int(full_config.vision_config.depth),
            "image_size": image_size, "method": METHOD, "settings": {}}
    for keep_ratio in [None, *keep_ratios]:
        kept = visual if keep_ratio is None else sel.budget(visual, keep_ratio=keep_ratio)
        tokens = prompt - visual + kept
        row = {"keep_ratio": keep_ratio, "visual_tokens": kept, "prompt_tokens": tokens}
        for name, cfg in (("built", config), ("full", full_config)):
            dims = DecoderDims.from_config(cfg.text_config, ffn_matrices=3)  # SwiGLU
            row[f"flops_{name}"] = {"vision": Qwen25VL.vision_flops(cfg, inputs),
                                    "llm_prefill": prefill_flops(dims, [tokens] * dims.num_layers)}
        plan["settings"][_setting_name(keep_ratio)] = row
    (out / "plan.json").write_text(json.dumps(plan, indent=1))


def _image(seed: int, size: int):
    """A random RGB image (its own per request, so that no cache serves it)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _prompt(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def run(out: Path, setting: str) -> None:
    """One vLLM engine for ``setting``: the median TTFT of single requests and the requests per second of a batch;
    ``out/runs/SETTING.json``."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    plan = json.loads((out / "plan.json").read_text())
    row = plan["settings"][setting]
    prune = {} if row["keep_ratio"] is None else {
        "lmms_prune": {"method": plan["method"], "keep_ratio": row["keep_ratio"]}}
    path = out / "model"
    t0 = time.perf_counter()
    llm = LLM(model=str(path), dtype="bfloat16", max_model_len=4096, max_num_seqs=BATCH_REQUESTS, seed=0,
              limit_mm_per_prompt={"image": 1, "video": 0}, enable_prefix_caching=False, mm_processor_cache_gb=0,
              hf_overrides=prune)
    load = time.perf_counter() - t0
    prompt = _prompt(AutoProcessor.from_pretrained(path))
    size = plan["image_size"]
    seed = iter(range(1, 10_000))

    def request():
        return {"prompt": prompt, "multi_modal_data": {"image": _image(next(seed), size)}}

    first = SamplingParams(temperature=0.0, max_tokens=1)
    [warm] = llm.generate(request(), first, use_tqdm=False)
    ttft = []
    for _ in range(TTFT_REQUESTS):
        t0 = time.perf_counter()
        llm.generate(request(), first, use_tqdm=False)
        ttft.append(time.perf_counter() - t0)
    batch = [request() for _ in range(BATCH_REQUESTS)]
    t0 = time.perf_counter()
    llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=BATCH_NEW_TOKENS, ignore_eos=True),
                 use_tqdm=False)
    wall = time.perf_counter() - t0
    (out / "runs").mkdir(exist_ok=True)
    (out / "runs" / f"{setting}.json").write_text(json.dumps({
        "prompt_tokens": len(warm.prompt_token_ids), "ttft_seconds": ttft, "ttft_median": statistics.median(ttft),
        "batch_requests": BATCH_REQUESTS, "batch_new_tokens": BATCH_NEW_TOKENS, "batch_seconds": wall,
        "requests_per_second": BATCH_REQUESTS / wall, "load_seconds": load}, indent=1))


def _flops_ratio(base: dict, row: dict, key: str) -> float:
    """Theoretical speed-up of a whole request's prefill (vision + LLM): ``(V + P) / (V + P')``."""
    from lmms_prune.efficiency import end_to_end_ratio

    return end_to_end_ratio(base[key]["vision"], base[key]["llm_prefill"], row[key]["llm_prefill"])


def _num(row: dict, key: str, fmt: str) -> str:
    return "-" if row.get(key) is None else format(row[key], fmt)


def report(out: Path) -> bool:
    """``out/vllm_bench.json`` and a markdown table ``out/vllm_bench.md``; False when a setting has no run or
    vLLM's prompt length differs from the plan's."""
    plan = json.loads((out / "plan.json").read_text())
    base_plan = plan["settings"]["none"]
    runs = {name: json.loads(p.read_text()) for name in plan["settings"]
            if (p := out / "runs" / f"{name}.json").exists()}
    base = runs.get("none")
    rows, ok = [], len(runs) == len(plan["settings"])
    for name, row in plan["settings"].items():
        got = runs.get(name)
        entry = {"setting": name, "keep_ratio": row["keep_ratio"], "visual_tokens": row["visual_tokens"],
                 "prompt_tokens_planned": row["prompt_tokens"],
                 "prompt_tokens_vllm": None if got is None else got["prompt_tokens"],
                 "flops_ratio_built": _flops_ratio(base_plan, row, "flops_built"),
                 "flops_ratio_full_depth": _flops_ratio(base_plan, row, "flops_full")}
        if got is not None:
            ok &= got["prompt_tokens"] == row["prompt_tokens"]
            entry |= {"ttft_median_s": got["ttft_median"], "requests_per_second": got["requests_per_second"]}
            if base is not None:
                entry |= {"ttft_speedup": base["ttft_median"] / got["ttft_median"],
                          "throughput_speedup": got["requests_per_second"] / base["requests_per_second"]}
        rows.append(entry)
    (out / "vllm_bench.json").write_text(json.dumps({"plan": {k: v for k, v in plan.items() if k != "settings"},
                                                     "rows": rows, "complete": ok}, indent=1))
    lines = [f"{plan['method']} on random-weight Qwen2.5-VL-3B widths, {plan['layers']}/{plan['full_layers']} "
             f"decoder layers and {plan['vision_layers']}/{plan['full_vision_layers']} vision blocks, "
             f"{plan['image_size']} px images, bfloat16",
             "",
             "| kept | visual tokens | prompt tokens | TTFT (median, s) | TTFT speed-up | requests/s | "
             "throughput speed-up | FLOPs ratio (this depth) | FLOPs ratio (full depth) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        kept = "100%" if r["keep_ratio"] is None else f"{r['keep_ratio']:.0%}"
        lines.append(f"| {kept} | {r['visual_tokens']} | {r['prompt_tokens_vllm'] or '-'} | "
                     f"{_num(r, 'ttft_median_s', '.2f')} | {_num(r, 'ttft_speedup', '.2f')}x | "
                     f"{_num(r, 'requests_per_second', '.3f')} | {_num(r, 'throughput_speedup', '.2f')}x | "
                     f"{r['flops_ratio_built']:.2f}x | {r['flops_ratio_full_depth']:.2f}x |")
    (out / "vllm_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return ok


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text}: a keep ratio must be in (0, 1)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    b = sub.add_parser("build", help="the model and the FLOPs plan (main venv)")
    b.add_argument("out", type=Path)
    b.add_argument("--layers", type=int, default=9, help="decoder layers of the 36 (default 9)")
    b.add_argument("--vision-layers", type=int, default=8, help="vision blocks of the 32 (default 8)")
    b.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="square image side in pixels (default 672)")
    b.add_argument("--keep-ratios", type=_ratio, nargs="+", default=list(KEEP_RATIOS))
    r = sub.add_parser("run", help="one vLLM engine, one setting (vLLM venv)")
    r.add_argument("out", type=Path)
    r.add_argument("setting")
    s = sub.add_parser("settings", help="print the plan's settings")
    s.add_argument("out", type=Path)
    rep = sub.add_parser("report", help="write OUT/vllm_bench.json and OUT/vllm_bench.md")
    rep.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.part == "build":
        if not 1 <= args.layers <= GEOMETRY["text"][0]:
            parser.error(f"--layers {args.layers}: give 1..{GEOMETRY['text'][0]}")
        if not 1 <= args.vision_layers <= 32:
            parser.error(f"--vision-layers {args.vision_layers}: give 1..32")
        if args.image_size < 56 or args.image_size % 28:
            parser.error(f"--image-size {args.image_size}: give a multiple of 28 px, at least 56")
        args.out.mkdir(parents=True, exist_ok=True)
        build(args.out, args.layers, args.vision_layers, args.image_size, args.keep_ratios)
    elif args.part == "settings":
        print(" ".join(json.loads((args.out / "plan.json").read_text())["settings"]))
    elif args.part == "run":
        run(args.out, args.setting)
    else:
        return 0 if report(args.out) else 1
    return 0


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    sys.exit(main())
