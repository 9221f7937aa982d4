# Sourced by the other scripts: makes sure ./.venv exists with torch from the machine's local wheels
# and this package installed (editable, with its dev and vlmeval extras), then activates it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LMMS_PRUNE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[env] creating $VENV"
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
STAMP="$VENV/.lmms_prune_installed"
# The project's own pins (torch, torchvision) live in a pip constraints file, not in the package's requirements.
CONSTRAINTS="$ROOT/scripts/constraints.txt"
WANT="$(cat "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[env] installing (torch from the local wheels first, then the package)"
    python -m pip install -q --upgrade pip
    # torch/torchvision first, at the pinned builds, so that nothing later pulls another one; the same
    # constraints hold for the package install, whose requirements have no upper bound on them.
    python -m pip install -q -c "$CONSTRAINTS" torch torchvision
    # The vlmeval extra (VLMEvalKit, for tests/test_vlmeval.py) adds about two minutes to a fresh install.
    python -m pip install -q -c "$CONSTRAINTS" -e "$ROOT[dev,vlmeval,docs]"
    echo "$WANT" > "$STAMP"
fi
# The leaderboard page test (tests/test_leaderboard.py) drives Debian's Chromium with Playwright; install it once
# (as root, where apt is available) when it is missing. Playwright's own browser download is never used.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[env] installing chromium (Debian package) for the leaderboard page test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } ||
        echo "[env] WARNING: could not install chromium: tests/test_leaderboard.py's browser tests will fail"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
cd "$ROOT"
