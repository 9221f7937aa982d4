#!/usr/bin/env bash
# The whole test suite: lint, then pytest. Creates ./.venv on first use.
source "$(dirname "$0")/env.sh"
ruff check .
python -m pytest -q "$@"
