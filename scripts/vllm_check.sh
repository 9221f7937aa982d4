#!/usr/bin/env bash
# Cross-engine proof of the vLLM plug-in (docs/serving.md): bash scripts/vllm_check.sh OUT [--model PATH]
# writes OUT/vllm_check.json (per preset and positions: kept sets identical, greedy answers identical token for
# token, first-token log-probabilities, prompt tokens before and after) and exits non-zero on any difference.
# Our transformers engine runs in the main environment (LMMS_PRUNE_MAIN_PYTHON, default ./.venv/bin/python:
# scripts/env.sh), vLLM in its own (scripts/vllm_env.sh), one engine per configuration (vLLM fixes the
# pruning config when it starts).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: bash scripts/vllm_check.sh OUT [--model PATH]" >&2
    exit 2
fi
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
shift
MAIN_PY="${LMMS_PRUNE_MAIN_PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$MAIN_PY" ]; then
    echo "[vllm_check] $MAIN_PY not found: run scripts/env.sh first or set LMMS_PRUNE_MAIN_PYTHON" >&2
    exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
echo "[vllm_check] transformers engine ($MAIN_PY)"
"$MAIN_PY" "$ROOT/scripts/vllm_check.py" transformers "$OUT" "$@"
# shellcheck disable=SC1091
source "$ROOT/scripts/vllm_env.sh"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
mkdir -p "$OUT/vllm"
for preset in none vispruner divprune fastervlm; do  # none: the plug-in installed, no pruning key
    for positions in contiguous; do
        echo "[vllm_check] vLLM $preset positions=$positions (log: $OUT/vllm/$preset-$positions.log)"
        python "$ROOT/scripts/vllm_check.py" vllm "$OUT" "$preset" "$positions" >"$OUT/vllm/$preset-$positions.log" 2>&1 ||
            echo "[vllm_check] vLLM $preset/$positions failed: see its log"
    done
done
python "$ROOT/scripts/vllm_check.py" compare "$OUT"
