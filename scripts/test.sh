#!/usr/bin/env bash
# The whole test suite: lint, the documentation site, then pytest. Creates ./.venv on first use.
source "$(dirname "$0")/env.sh"
ruff check .
# The documentation site in strict mode (mkdocs.yml): a page missing from the nav, a broken link or anchor, or an
# API reference that does not resolve fails the run. Built into a temporary folder, never into the repository.
SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
# Not --quiet: mkdocs 1.6 counts strict mode's warnings only at the log level it prints, so --quiet let them pass.
if ! BUILD="$(mkdocs build --strict --site-dir "$SITE" 2>&1)"; then
    printf '%s\n' "$BUILD" | grep -v '^INFO'
    echo "mkdocs build --strict failed: the warnings above"
    exit 1
fi
python -m pytest -q "$@"
