"""Time the selection algorithms against the LLM prefill they are meant to shorten.

Prints a markdown table: each selector at N visual tokens (default 13 InternVL tiles of 16x16 = 3328,
keep 10% = 333) next to the unpruned prefill of a random-weight Qwen2 language model with the
InternVL2.5-1B geometry (24 layers, hidden 896, 14 heads, 2 KV heads, FFN 4864) at the same token count.
Target: pivot_mis below 1% of the prefill.

    python scripts/bench_selection.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import Qwen2Config, Qwen2Model

from lmms_prune.selection import budget, dart, divprune, pivot_mis, topk, vispruner

PREFILL = "unpruned prefill, 24-layer 896-d LM"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=13, help="number of 16x16 token grids (InternVL tiles)")
    parser.add_argument("--tile-side", type=int, default=16, help="tokens per tile side after pixel shuffle")
    parser.add_argument("--keep-ratio", type=float, default=0.1, help="fraction of visual tokens kept")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per step (min and median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of all steps before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-prefill", action="store_true", help="time the selectors only")
    return parser.parse_args()


def time_interleaved(steps: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Wall-clock seconds per step. Each repeat runs every step once, so that all steps see the same
    machine load (the ratios stay fair on a shared machine); ``warmup`` untimed rounds come first."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def internvl_1b_language_model(num_tokens: int) -> Qwen2Model:
    """Random-weight Qwen2 decoder with InternVL2.5-1B's language-model shape (small vocabulary)."""
    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        max_position_embeddings=max(32768, num_tokens + 1),
    )
    return Qwen2Model(config).eval()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    grids = [(args.tile_side, args.tile_side)] * args.tiles
    num_tokens = sum(r * c for r, c in grids)
    n = budget(num_tokens, keep_ratio=args.keep_ratio)
    hidden = 896
    scores = torch.softmax(torch.randn(num_tokens), dim=0)
    features = torch.randn(num_tokens, hidden)

    steps: dict[str, Callable[[], object]] = {
        "pivot_mis (alpha=0.5)": lambda: pivot_mis(scores, features, grids, n, alpha=0.5),
        "pivot_mis (alpha=1.0)": lambda: pivot_mis(scores, features, grids, n, alpha=1.0),
        "topk": lambda: topk(scores, n),
        "vispruner": lambda: vispruner(scores, features, n),
        "divprune": lambda: divprune(features, n),
        "dart": lambda: dart(scores, features, n),
    }
    if not args.skip_prefill:
        model = internvl_1b_language_model(num_tokens)
        input_ids = torch.randint(0, 1000, (1, num_tokens))

        def run_prefill() -> None:
            with torch.inference_mode():
                model(input_ids=input_ids, use_cache=True)

        steps = {PREFILL: run_prefill, **steps}
    results = time_interleaved(steps, args.warmup, args.repeats)
    prefill = results.pop(PREFILL, None)

    print(
        f"N={num_tokens} visual tokens ({args.tiles} tiles of {args.tile_side}x{args.tile_side}), keep n={n}, "
        f"features D={hidden}, threads={args.threads}, repeats={args.repeats}, torch {torch.__version__}\n"
    )
    print("| step | min (ms) | median (ms) | median / prefill median |")
    print("|---|---:|---:|---:|")
    prefill_median = statistics.median(prefill) if prefill else None
    if prefill:
        print(f"| {PREFILL} | {1e3 * min(prefill):.1f} | {1e3 * prefill_median:.1f} | 100% |")
    for name, times in results.items():
        median = statistics.median(times)
        share = f"{100 * median / prefill_median:.2f}%" if prefill_median else "-"
        print(f"| {name} | {1e3 * min(times):.1f} | {1e3 * median:.1f} | {share} |")
    if prefill_median:
        share = statistics.median(results["pivot_mis (alpha=0.5)"]) / prefill_median
        verdict = "meets" if share < 0.01 else "misses"
        print(f"\npivot_mis (alpha=0.5) takes {100 * share:.2f}% of the prefill: {verdict} the < 1% target.")


if __name__ == "__main__":
    main()
