#!/usr/bin/env bash
# Before a run of ../shared/gpu-check on a GPU machine (Python 3.12, no network): add to .gpu-check/wheels the
# Python 3.12 wheels of this project's pins that the shared folder does not carry yet (its README explains).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.gpu-check/wheels}
[ -d "$DEST" ] || { echo "copy ../shared/gpu-check to .gpu-check first (see its README)" >&2; exit 2; }
pins=()
for name in orjson hiredis nvidia-ml-py; do
  pins+=("$(grep -h -i "^${name}==" requirements/*.txt | head -1)")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${pins[@]}"
