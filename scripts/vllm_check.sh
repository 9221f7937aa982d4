#!/usr/bin/env bash
# Cross-engine proof of the vLLM plug-in (docs/serving.md):
#   bash scripts/vllm_check.sh OUT [--model PATH] [--families F,...] [--presets P,...] [--positions P,...]
#                                  [--lmms-eval PRESET|none] [--runner PRESET|none] [--vlmeval PRESET|none]
# writes OUT/vllm_check.json (per family, preset and positions: kept sets identical, greedy answers identical token
# for token, first-token log-probabilities, prompt tokens before and after) and exits non-zero on any difference.
# --model PATH: a local checkpoint of a served family (default: one toy per family, fp32, text head_dim 64).
# --families / --presets: a subset (default: qwen2_5_vl,qwen2_vl,qwen3_vl,llava,llava_next,llava_onevision,internvl and
# none,vispruner,divprune,fastervlm,visionzip,prumerge_plus,random,uniform; random and uniform run with stage=pre_llm;
# "none" runs vLLM with the plug-in installed and no pruning key).
# --positions: contiguous,original (default both); "original" runs with the presets that keep a subset (a 1-D RoPE
# family with the M-RoPE declaration lmms_prune.vllm.served_overrides adds), and merges are skipped with the reason
# in their log.
# --lmms-eval PRESET (default divprune; none: skip): lmms-eval's own `--model vllm` with that preset (and the first
# of --positions) in hf_overrides
# runs the tiny MME task (tests/tasks) on the first family; its log must show the pruned prompt lengths.
# --runner PRESET (default divprune; none: skip): our own lmms-eval model FAMILY_PRESET (with the first of
# --positions) on the same task, with
# backend=transformers (main environment) and backend=vllm (vLLM environment), on the first family: the same
# answers and the same efficiency token counts per sample. Our transformers engine runs in the main
# environment (LMMS_PRUNE_MAIN_PYTHON, default ./.venv/bin/python: scripts/env.sh), vLLM in its own
# (scripts/vllm_env.sh), one engine per configuration (vLLM fixes the pruning config when it starts).
# --vlmeval PRESET (default none): the same comparison for our model FAMILY_PRESET in VLMEvalKit (lmms-prune
# vlmeval on a two-row MCQ set); the vLLM venv then needs VLMEvalKit: LMMS_PRUNE_VLLM_VLMEVAL=1 bash scripts/vllm_env.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() {
    echo "usage: bash scripts/vllm_check.sh OUT [--model PATH] [--families F,...] [--presets P,...] [--positions P,...] [--lmms-eval PRESET|none] [--runner PRESET|none] [--vlmeval PRESET|none]" >&2
    exit 2
}
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then usage; fi
OUT_ARG="$1"
shift
MODEL=() FAMILIES="qwen2_5_vl,qwen2_vl,qwen3_vl,llava,llava_next,llava_onevision,internvl" PRESETS="none,vispruner,divprune,fastervlm,visionzip,prumerge_plus,random,uniform" POSITIONS=contiguous,original HARNESS=divprune RUNNER=divprune VLMEVAL=none
while [ $# -gt 0 ]; do
    case "$1" in
        --model) [ $# -ge 2 ] || usage; MODEL=(--model "$2"); shift 2 ;;
        --families) [ $# -ge 2 ] || usage; FAMILIES="$2"; shift 2 ;;
        --presets) [ $# -ge 2 ] || usage; PRESETS="$2"; shift 2 ;;
        --positions) [ $# -ge 2 ] || usage; POSITIONS="$2"; shift 2 ;;
        --lmms-eval) [ $# -ge 2 ] || usage; HARNESS="$2"; shift 2 ;;
        --runner) [ $# -ge 2 ] || usage; RUNNER="$2"; shift 2 ;;
        --vlmeval) [ $# -ge 2 ] || usage; VLMEVAL="$2"; shift 2 ;;
        *) echo "[vllm_check] unknown argument $1" >&2; usage ;;
    esac
done
MAIN_PY="${LMMS_PRUNE_MAIN_PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$MAIN_PY" ]; then
    echo "[vllm_check] $MAIN_PY not found: run scripts/env.sh first or set LMMS_PRUNE_MAIN_PYTHON" >&2
    exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
CHECK=("$ROOT/scripts/vllm_check.py")
if [ ${#MODEL[@]} -gt 0 ]; then  # the checkpoint's family, or a clear error before anything runs
    FAMILIES="$("$MAIN_PY" "${CHECK[@]}" family "${MODEL[1]}")"
fi
# the names are checked before anything runs (the parsers of compare and lmms_eval)
"$MAIN_PY" "${CHECK[@]}" compare /dev/null --families "$FAMILIES" --presets "$PRESETS" --positions "$POSITIONS" \
    --help >/dev/null
if [ "$HARNESS" != none ]; then
    "$MAIN_PY" "${CHECK[@]}" lmms_eval /dev/null qwen2_5_vl "$HARNESS" --help >/dev/null
fi
if [ "$RUNNER" != none ]; then
    "$MAIN_PY" "${CHECK[@]}" runner /dev/null qwen2_5_vl "$RUNNER" vllm --help >/dev/null
fi
if [ "$VLMEVAL" != none ]; then
    "$MAIN_PY" "${CHECK[@]}" vlmeval /dev/null qwen2_5_vl "$VLMEVAL" vllm --help >/dev/null
fi
OUT="$(mkdir -p "$OUT_ARG" && cd "$OUT_ARG" && pwd)"
for family in ${FAMILIES//,/ }; do
    echo "[vllm_check] transformers engine, $family ($MAIN_PY)"
    "$MAIN_PY" "${CHECK[@]}" transformers "$OUT" "$family" "${MODEL[@]}"
done
if [ "$RUNNER" != none ]; then
    family="${FAMILIES%%,*}"
    echo "[vllm_check] our lmms-eval model ${family}_$RUNNER, backend=transformers (log: $OUT/$family/runner/transformers/lmms_eval.log)"
    "$MAIN_PY" "${CHECK[@]}" runner "$OUT" "$family" "$RUNNER" transformers --positions "${POSITIONS%%,*}" ||
        echo "[vllm_check] backend=transformers run failed: see its log"
fi
if [ "$VLMEVAL" != none ]; then
    family="${FAMILIES%%,*}"
    echo "[vllm_check] our model ${family}_$VLMEVAL in VLMEvalKit, backend=transformers (log: $OUT/$family/vlmeval/transformers/vlmeval.log)"
    "$MAIN_PY" "${CHECK[@]}" vlmeval "$OUT" "$family" "$VLMEVAL" transformers ||
        echo "[vllm_check] VLMEvalKit backend=transformers run failed: see its log"
fi
# shellcheck disable=SC1091
source "$ROOT/scripts/vllm_env.sh"
if [ "$VLMEVAL" != none ] && ! python -c "import vlmeval" 2>/dev/null; then
    echo "[vllm_check] --vlmeval needs VLMEvalKit in the vLLM venv: LMMS_PRUNE_VLLM_VLMEVAL=1 bash scripts/vllm_env.sh" >&2
    exit 2
fi
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
for family in ${FAMILIES//,/ }; do
    mkdir -p "$OUT/$family/vllm"
    for preset in ${PRESETS//,/ }; do
        for positions in ${POSITIONS//,/ }; do
            log="$OUT/$family/vllm/$preset-$positions.log"
            echo "[vllm_check] vLLM $family $preset positions=$positions (log: $log)"
            python "${CHECK[@]}" vllm "$OUT" "$family" "$preset" "$positions" >"$log" 2>&1 ||
                echo "[vllm_check] vLLM $family $preset/$positions failed: see its log"
        done
    done
done
if [ "$HARNESS" != none ]; then
    family="${FAMILIES%%,*}"
    echo "[vllm_check] lmms-eval --model vllm, $family $HARNESS (log: $OUT/$family/lmms_eval.log)"
    python "${CHECK[@]}" lmms_eval "$OUT" "$family" "$HARNESS" --positions "${POSITIONS%%,*}" ||
        echo "[vllm_check] lmms-eval check failed: see $OUT/$family/lmms_eval.log"
fi
if [ "$RUNNER" != none ]; then
    family="${FAMILIES%%,*}"
    echo "[vllm_check] our lmms-eval model ${family}_$RUNNER, backend=vllm (log: $OUT/$family/runner/vllm/lmms_eval.log)"
    python "${CHECK[@]}" runner "$OUT" "$family" "$RUNNER" vllm --positions "${POSITIONS%%,*}" ||
        echo "[vllm_check] backend=vllm run failed: see its log"
fi
if [ "$VLMEVAL" != none ]; then
    family="${FAMILIES%%,*}"
    echo "[vllm_check] our model ${family}_$VLMEVAL in VLMEvalKit, backend=vllm (log: $OUT/$family/vlmeval/vllm/vlmeval.log)"
    python "${CHECK[@]}" vlmeval "$OUT" "$family" "$VLMEVAL" vllm || echo "[vllm_check] VLMEvalKit backend=vllm run failed: see its log"
fi
python "${CHECK[@]}" compare "$OUT" --families "$FAMILIES" --presets "$PRESETS" --positions "$POSITIONS"
