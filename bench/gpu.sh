#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md (issue 15) on a lent GPU machine, as one prepared command.
#
# The GPU machine has torch, numpy, Pillow and numba but not pydantic, which models/config.py needs; the
# HTTP layer's packages would not fit beside the weights in what travels there, so bench/gpu.py drives the
# edit path in-process (see its docstring).
#
#   here, once per machine (PyPI reachable):  bash bench/gpu.sh wheels
#       pydantic and its three needs, the versions this venv has, as wheels for the GPU machine's
#       Python (3.12) in .wheels-gpu/ (ignored through .git/info/exclude)
#   there (the device tool's `run`, carry [".wheels-gpu"], timeout_s 540):  bash bench/gpu.sh run
#       installs them into /tmp/site (where pydantic is missing), then runs bench/gpu.py: $OUT/cuda.md (the RESULTS.md section,
#       written after each part) and $OUT/gpu.log
# Further arguments after `run` go to bench/gpu.py (e.g. --quick, --device cpu for a dry run here).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.wheels-gpu
PYTHON=${PYTHON:-python3}
case "${1:-}" in
  wheels)
    py=${PYTHON_HERE:-.venv/bin/python}
    grep -qxF "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
    ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" \
      "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" \
      "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)"
    ls -l "$WHEELS"
    ;;
  run)
    if ! "$PYTHON" -c "import pydantic" 2> /dev/null && compgen -G "$WHEELS/*.whl" > /dev/null; then
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    out=${OUT:-bench}
    if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
    PYTHONUNBUFFERED=1 "$PYTHON" bench/gpu.py --out "$out/cuda.md" "${@:2}" 2>&1 | tee "$out/gpu.log"
    ;;
  *)
    echo "usage: bash bench/gpu.sh wheels | run [bench/gpu.py options]" >&2
    exit 2
    ;;
esac
