#!/usr/bin/env bash
# Re-measure every bench table of the README's "Efficiency" section, side by side, one `lmms-prune bench` run per
# table, and print each table with the command that made it (docs/efficiency.md explains the columns).
#
#     bash scripts/bench_readme.sh [--out DIR] [--threads N] [--repeats N] [--only NAME[,NAME]] [--quick]
#
# Settings of every table: random weights of the real geometry, bfloat16, the whole vision tower, min of
# --repeats (default 2) timed runs after one warm-up, --threads (default 2) torch threads, TTFT from pixels.
# Decoder depth: the full model where its bf16 weights fit in the memory this machine has free (a 7B LLM is
# about 14 GB), else 8 layers run and extrapolated, with the reason printed before the table.
# Tables (NAME): internvl-1b (InternVL2.5-1B, 1280 tokens, fastv/deepprune at 10%, eager reference),
# matched-flops (InternVL2.5-1B, 768 tokens, four methods at the same FLOPs), llava-next-7b (2880 tokens,
# fastv/vispruner at 11.1%), qwen-video-7b (Qwen2.5-VL-7B, one video of 4096 tokens: fastv, temporal and the video
# methods evs, vidcom2, fastvid, holitom at 10%; dycoke at its own count, which keep_ratio does not set).
# Run it on a quiet machine: the figures are wall-clock times (another process on the cores, even niced, skews
# them). Measured on this project's 2-core machine (AVX512-BF16, 2026-12-07): internvl-1b 262 s, matched-flops
# 244 s, llava-next-7b ~20 min, qwen-video-7b 69 min with --repeats 1 (eight cells; the full 32-block tower over
# 16384 patches takes 80-90 s of every request, 265 s unpruned), about 100 minutes in all; with the default two
# repeats the video table takes about 100 minutes. `--only` runs a subset.
# --quick: a smoke test of the same commands with a few decoder layers (the methods' pruning layers inside the
# stack), 1 vision block, small inputs, one timed run and no warm-up (the figures mean nothing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=runs/bench_readme
THREADS=2
REPEATS=2
ONLY=internvl-1b,matched-flops,llava-next-7b,qwen-video-7b
QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --repeats) REPEATS="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "bench_readme.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for name in ${ONLY//,/ }; do
    case "$name" in
        internvl-1b|matched-flops|llava-next-7b|qwen-video-7b) ;;
        *) echo "--only $name: unknown table; choose from internvl-1b, matched-flops, llava-next-7b," \
                "qwen-video-7b" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
[ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$ROOT/.venv/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="$THREADS"
mkdir -p "$OUT"

# "LAYERS|REASON": the decoder depth to run for a geometry (empty LAYERS: full depth)
depth_for() {
    "$PY" - "$1" <<'PY'
import sys

import psutil
import torch

from lmms_prune.bench import build_geometry, geometries

name = sys.argv[1]
full = geometries()[name][1]["text"][0]
with torch.device("meta"):
    model = build_geometry(name, dtype=torch.bfloat16)
need = 2 * sum(p.numel() for p in model.parameters()) + 4 * 2**30  # bf16 weights + KV cache, activations
free = psutil.virtual_memory().available
if need <= free:
    print(f"|full depth ({full} layers): {need / 2**30:.1f} GB needed in bf16, {free / 2**30:.1f} GB free")
else:
    print(f"8|8 of {full} layers run, extrapolated to {full}: the full model needs {need / 2**30:.1f} GB in "
          f"bf16, {free / 2**30:.1f} GB are free")
PY
}

run_table() {  # NAME GEOMETRY QUICK_LAYERS ARGS...: one bench run, printed with its command
    local name="$1" geometry="$2" quick_layers="$3"
    shift 3
    case ",$ONLY," in *",$name,"*) ;; *) return 0 ;; esac
    local depth=() timing=(--repeats "$REPEATS" --warmup 1) layers reason
    if [ "$QUICK" = 1 ]; then
        depth=(--layers "$quick_layers" --vision-layers 1)
        timing=(--repeats 1 --warmup 0)
        reason="--quick: $quick_layers decoder layer(s) and 1 vision block (a smoke test; the figures mean nothing)"
    else
        IFS='|' read -r layers reason <<<"$(depth_for "$geometry")"
        [ -n "$layers" ] && depth=(--layers "$layers")
    fi
    local cmd=(lmms-prune bench --geometry "$geometry" --dtype bfloat16 --threads "$THREADS" "${depth[@]}"
               "${timing[@]}" "$@" --out "$OUT/$name")
    echo
    echo "## $name: $reason"
    echo
    printf '    OMP_NUM_THREADS=%s' "$THREADS"
    local arg
    for arg in "${cmd[@]}"; do  # a copyable command: JSON in single quotes
        if [[ "$arg" =~ ^[A-Za-z0-9_./,:=+-]+$ ]]; then printf ' %s' "$arg"; else printf " '%s'" "$arg"; fi
    done
    echo
    echo
    local t0=$SECONDS
    "$PY" -m lmms_prune.cli.main bench "${cmd[@]:2}" > "$OUT/$name.log" 2>&1 || {
        echo "bench_readme.sh: $name failed; the end of $OUT/$name.log:" >&2; tail -20 "$OUT/$name.log" >&2; exit 1; }
    cat "$OUT/$name/bench.md"
    echo
    echo "($((SECONDS - t0)) s)"
}

quick_tokens() { [ "$QUICK" = 1 ] && echo "$1" || echo "$2"; }

echo "# README bench tables, $(date -u +%Y-%m-%dT%H:%MZ), $(getconf _NPROCESSORS_ONLN) cores, $THREADS threads, load $(cut -d' ' -f1-3 /proc/loadavg)"
MATCHED='{"pyramiddrop": {"keep_ratio": 0.3125}, "visionzip": {"keep_ratio": 0.3125}, "sparsevlm": {"keep_ratio": 0.3125}}'
# a truncated stack needs the multi-stage methods' stages inside it (bench.py)
[ "$QUICK" = 1 ] && MATCHED='{"pyramiddrop": {"keep_ratio": 0.3125, "prune_layers": "1,2,3"}, "visionzip": {"keep_ratio": 0.3125}, "sparsevlm": {"keep_ratio": 0.3125, "prune_layers": "1,2,3"}}'
run_table internvl-1b internvl2_5-1b 13 --tokens "$(quick_tokens 256 1280)" --methods fastv,deepprune --keep 0.1 \
    --decode-tokens "$(quick_tokens 1 4)" --eager-reference
run_table matched-flops internvl2_5-1b 4 --tokens "$(quick_tokens 256 768)" \
    --methods fastv,pyramiddrop,visionzip,sparsevlm --keep 0.25 --decode-tokens "$(quick_tokens 1 4)" \
    --method-args "$MATCHED"
run_table llava-next-7b llava-next-7b 3 --tokens 2880 --methods fastv,vispruner --keep 0.111 \
    --decode-tokens "$(quick_tokens 1 2)"
run_table qwen-video-7b qwen2_5_vl_7b_video 4 --tokens "$(quick_tokens 1024 4096)" \
    --methods fastv,temporal,evs,vidcom2,fastvid,holitom,dycoke \
    --keep 0.1 --decode-tokens "$(quick_tokens 1 2)"
