#!/usr/bin/env bash
# The main job: the whole pruning evaluation on CPU (tiny grounding model, two synthetic RefCOCO splits, lmms-eval).
# Creates ./.venv on first use. Extra arguments go to `lmms-prune demo` (see `lmms-prune demo --help`).
source "$(dirname "$0")/env.sh"
lmms-prune demo "$@"
