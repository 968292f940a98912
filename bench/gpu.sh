#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md (issue 15) on a lent GPU machine, as one prepared command.
#
# The GPU machine has torch, numpy, Pillow, numba and OpenCV but not pydantic (models/config.py) or
# facenet-pytorch (the face detector); the HTTP layer's packages would not fit beside the weights in what
# travels there (64 MiB), so bench/gpu.py drives the edit path in-process (see its docstring).
#
#   here, once per machine (PyPI reachable):  bash bench/gpu.sh prepare
#       .gpu-carry/ (ignored through .git/info/exclude): wheels of pydantic and its three needs (the versions
#       this venv has, for the GPU machine's Python 3.12) and facenet-pytorch, and two photos of ../shared;
#       prints what will travel against the limit
#   there (the device tool's `run`, carry [".gpu-carry"], timeout_s 540):  bash bench/gpu.sh run
#       installs the wheels into /tmp/site where pydantic is missing, then runs bench/gpu.py: $OUT/cuda.md
#       (the RESULTS.md section, written after each part) and $OUT/gpu.log
# Further arguments after `run` go to bench/gpu.py (e.g. --quick; --device cpu for a dry run here).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
PYTHON=${PYTHON:-python3}
case "${1:-}" in
  prepare)
    py=${PYTHON_HERE:-.venv/bin/python}
    grep -qxF "/$CARRY/" .git/info/exclude 2> /dev/null || echo "/$CARRY/" >> .git/info/exclude
    mkdir -p "$CARRY/wheels" "$CARRY/photos"
    ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$CARRY/wheels" \
      "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" "annotated-types==$(ver annotated-types)" \
      "typing-inspection==$(ver typing-inspection)" "facenet-pytorch==$(ver facenet-pytorch)"
    # what travels: tracked and untracked-not-ignored files, plus the carried folder (64 MiB at most)
    size() { find "$@" -type f -exec stat -c %s {} + | awk '{s += $1} END {print s + 0}'; }
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2> /dev/null | awk '{s += $1} END {print s + 0}')
    limit=$(((64 << 20) - (256 << 10)))  # a quarter MiB to spare
    # the six-face group (detection, several faces decoded in one batch), then a 2048-px portrait if it fits
    rm -f "$CARRY"/photos/*
    for photo in group-six-faces.jpg portrait-2.jpg; do
      if ((tree + $(size "$CARRY") + $(stat -c %s "../shared/photos/$photo") <= limit)); then
        cp "../shared/photos/$photo" "$CARRY/photos/"
      else
        echo "left out $photo: it would not fit" >&2
      fi
    done
    total=$((tree + $(size "$CARRY")))
    echo "travels: $((total >> 10)) KiB of $((64 << 10)) KiB (tree $((tree >> 10)), $CARRY $(($(size "$CARRY") >> 10)))"
    if ((total > limit)); then
      echo "too large for the device tool even without photos: shrink the tracked tree" >&2
      exit 1
    fi
    ;;
  run)
    if ! "$PYTHON" -c "import pydantic, facenet_pytorch" 2> /dev/null && compgen -G "$CARRY/wheels/*.whl" > /dev/null; then
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$CARRY"/wheels/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    out=${OUT:-bench}
    {
      if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
      # the versions the rows were measured with (alignment needs scikit-image >= 0.26: from_estimate)
      "$PYTHON" -c "import sys, torch, numpy, PIL, skimage, pydantic
print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__,
      'pillow', PIL.__version__, 'scikit-image', skimage.__version__, 'pydantic', pydantic.__version__)" || true
      PYTHONUNBUFFERED=1 "$PYTHON" bench/gpu.py --out "$out/cuda.md" "${@:2}"
    } 2>&1 | tee "$out/gpu.log"
    ;;
  *)
    echo "usage: bash bench/gpu.sh prepare | run [bench/gpu.py options]" >&2
    exit 2
    ;;
esac
