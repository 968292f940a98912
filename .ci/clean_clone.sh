#!/usr/bin/env bash
# Run CI (.ci/run) on a fresh clone of HEAD in a temporary folder, as CI does, then delete the folder
# (each clone holds its own 6.5 GB venv: leftover clones once filled the disk CI ran on).
# Usage: bash .ci/clean_clone.sh [pytest args]   (../shared is linked beside the clone)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git clone -q "$repo" "$tmp/p"
commit=$(git -C "$tmp/p" rev-parse --short HEAD)  # HEAD may move while CI runs
if [ -d "$repo/../shared" ]; then ln -s "$(cd "$repo/../shared" && pwd)" "$tmp/shared"; fi
start=$(date +%s)
rc=0
(cd "$tmp/p" && bash .ci/run "$@") || rc=$?
echo "clean-clone CI of $commit: exit $rc after $(($(date +%s) - start)) s"
exit $rc
