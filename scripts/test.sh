#!/usr/bin/env bash
# The whole test suite: lint, the documentation site, then pytest. Creates ./.venv on first use.
source "$(dirname "$0")/env.sh"
ruff check .
# The documentation site in strict mode (mkdocs.yml): a page missing from the nav, a broken link or anchor, or an
# API reference that does not resolve fails the run. Built into a temporary folder, never into the repository.
SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
mkdocs build --strict --quiet --site-dir "$SITE"
python -m pytest -q "$@"
