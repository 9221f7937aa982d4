#!/usr/bin/env bash
# Throughput under vLLM, pruned against unpruned in one run (docs/serving.md):
#   bash scripts/vllm_bench.sh OUT [--layers L] [--vision-layers V] [--image-size PX] [--keep-ratios R ...]
# writes OUT/vllm_bench.json and OUT/vllm_bench.md: per setting (unpruned, then each keep ratio of divprune) the
# median time to first token, requests per second, and the theoretical FLOPs ratio beside the measured ones. The
# model (random weights, Qwen2.5-VL-3B widths) and the FLOPs plan are built in the main environment
# (LMMS_PRUNE_MAIN_PYTHON, default ./.venv/bin/python), each setting runs in its own vLLM engine
# (scripts/vllm_env.sh). On a GPU, run the same with a CUDA vLLM in LMMS_PRUNE_VLLM_VENV (docs/serving.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: bash scripts/vllm_bench.sh OUT [--layers L] [--vision-layers V] [--image-size PX] [--keep-ratios R ...]" >&2
    exit 2
fi
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
shift
MAIN_PY="${LMMS_PRUNE_MAIN_PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$MAIN_PY" ]; then
    echo "[vllm_bench] $MAIN_PY not found: run scripts/env.sh first or set LMMS_PRUNE_MAIN_PYTHON" >&2
    exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BENCH="$ROOT/scripts/vllm_bench.py"
echo "[vllm_bench] model and FLOPs plan ($MAIN_PY)"
"$MAIN_PY" "$BENCH" build "$OUT" "$@"
# shellcheck disable=SC1091
source "$ROOT/scripts/vllm_env.sh"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
mkdir -p "$OUT/logs"
for setting in $(python "$BENCH" settings "$OUT"); do
    echo "[vllm_bench] vLLM $setting (log: $OUT/logs/$setting.log)"
    python "$BENCH" run "$OUT" "$setting" >"$OUT/logs/$setting.log" 2>&1 ||
        echo "[vllm_bench] $setting failed: see its log"
done
python "$BENCH" report "$OUT"
