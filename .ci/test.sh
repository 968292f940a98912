#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up (venv, packages, Chromium), lint, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh --with-browser
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports  # the house rules: pyproject.toml [tool.importlinter]
# pytest exits 5 when it collects no test: that is a failure here, as is any other non-zero code.
.venv/bin/python -m pytest -q "$@"
