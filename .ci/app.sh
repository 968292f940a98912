#!/usr/bin/env bash
# Run the editor (REST API + browser UI) with the weights in weights/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
exec .venv/bin/python -m server "$@"
