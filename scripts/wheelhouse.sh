#!/usr/bin/env bash
# Build the wheelhouse of an image: every pinned requirement of the target, and their dependencies, as wheels
# in wheelhouse/TARGET/, which Dockerfile.api and Dockerfile.worker install from with `pip install --no-index
# --find-links` (no index, no network in the build). Run it on the build host, where pip reaches an index
# (its own configuration: index, proxies, CA bundle, local wheel directories).
#
#   scripts/wheelhouse.sh [api] [worker-cpu] [worker-gpu]     (none named: api worker-cpu)
#
# api         requirements/api.txt (the API and Flower image; no torch)
# worker-cpu  requirements/worker-cpu.txt with the CPU build of torch (torch==PIN+cpu: never PyPI's CUDA wheel)
# worker-gpu  requirements/worker-gpu.txt with a CUDA build of torch (any torch==PIN but the +cpu one; a few GB)
#
# TORCH_INDEX_URL  the PyTorch index to add (default: https://download.pytorch.org/whl/cpu for worker-cpu,
#                  .../cu128 for worker-gpu), used only if it answers; set it empty to use pip's own sources only
#                  (this machine: its pip configuration names a local directory that holds torch 2.13.0+cpu).
# PYTHON           the interpreter whose pip builds the wheels: the images' Python, 3.11 (default: Debian's
#                  /usr/bin/python3.11 where there is one, the very Python of scripts/base-images.sh's base).
#                  pip evaluates dependency markers against it: redis needs async-timeout only below Python
#                  3.11.3, so a wheelhouse built by a newer 3.11 lacks it for Debian's 3.11.2. An older 3.11
#                  than the image's is safe (it can only add such wheels), a newer one may not be.
# FORCE=1          rebuild a wheelhouse whose requirements did not change.
#
# A wheelhouse is built in a temporary directory and renamed into place, with a stamp of the target's requirement
# files (ROLE.txt and what it includes): a second run with unchanged requirements does nothing (and leaves the
# images' build cache valid); a changed pin rebuilds it.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=wheelhouse
if [ -z "${PYTHON:-}" ]; then
  for PYTHON in /usr/bin/python3.11 python3.11 python3; do command -v "$PYTHON" >/dev/null 2>&1 && break; done
fi

log() { printf '\033[1;34m[wheelhouse]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null ||
  die "$PYTHON is not Python 3.11, the images' Python: its wheels would not install there (set PYTHON=python3.11)"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip"

# requirement_files FILE: FILE and the files it includes (-r), recursively: what the target's wheels depend on.
requirement_files() {
  echo "$1"
  sed -n 's/^-r[[:space:]]*\([^ #]*\).*/\1/p' "$1" | while read -r include; do
    requirement_files "$(dirname "$1")/$include"
  done
}

torch_pin() { sed -n 's/^torch==\([^ #]*\).*/\1/p' "requirements/$1.txt"; }

build() {
  local target="$1" requirements="requirements/$1.txt" out="$DEST/$1" default_index="" constraint=""
  [ -f "$requirements" ] || die "unknown target $target (api, worker-cpu, worker-gpu)"
  local stamp
  stamp="$(requirement_files "$requirements" | xargs cat | sha256sum | cut -d' ' -f1) $target $("$PYTHON" -c 'import platform; print(platform.python_version())')"
  if [ -z "${FORCE:-}" ] && [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ]; then
    log "$out is up to date ($(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1))"
    return 0
  fi
  local tmp
  tmp=$(mktemp -d "$DEST/.$target.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  local args=(wheel --wheel-dir "$tmp" -r "$requirements")
  case "$target" in
    worker-cpu)
      default_index=https://download.pytorch.org/whl/cpu
      constraint="torch==$(torch_pin worker-cpu)+cpu"
      ;;
    worker-gpu)
      default_index=https://download.pytorch.org/whl/cu128
      constraint="torch!=$(torch_pin worker-gpu)+cpu"
      ;;
  esac
  if [ -n "$constraint" ]; then
    printf '%s\n' "$constraint" >"$tmp/.constraints.txt"
    args+=(--constraint "$tmp/.constraints.txt")
    local index=${TORCH_INDEX_URL-$default_index}
    if [ -n "$index" ]; then
      if curl -fs --max-time 15 -o /dev/null "${index%/}/torch/"; then
        args+=(--extra-index-url "$index")
      else
        log "$index does not answer: torch comes from pip's own sources (they must offer $constraint)"
      fi
    fi
  fi
  log "building $out from $requirements${constraint:+ ($constraint)} with $PYTHON ($("$PYTHON" --version))"
  local began=$SECONDS
  "$PYTHON" -m pip "${args[@]}" >&2 || die "pip wheel failed for $target"
  rm -f "$tmp/.constraints.txt"
  local torch
  torch=$(find "$tmp" -maxdepth 1 -name 'torch-*.whl' -printf '%f\n')
  case "$target" in
    worker-cpu)
      [[ "$torch" == *+cpu-* ]] || die "$target: expected the CPU build of torch, got '$torch'"
      if find "$tmp" -maxdepth 1 -name 'nvidia_*.whl' | grep -q .; then die "$target: CUDA wheels in a CPU wheelhouse"; fi
      ;;
    worker-gpu)
      [[ -n "$torch" && "$torch" != *+cpu-* ]] || die "$target: expected a CUDA build of torch, got '$torch'"
      if [[ "$torch" != *+cu* ]]; then
        local runtime
        runtime=$(find "$tmp" -maxdepth 1 -name 'nvidia_cuda_runtime*.whl' -printf '%f\n' | head -1)
        log "note: $torch is PyPI's CUDA build, with its own CUDA libraries (${runtime:-?}); the GPU host's" \
          "driver must support that CUDA. The PyTorch index (TORCH_INDEX_URL, default cu128) has the build that" \
          "matches Dockerfile.worker's CUDA_BASE."
      fi
      ;;
    api)
      [ -z "$torch" ] || die "api: torch in the API's wheelhouse (requirements/api.txt must stay torch-free)"
      ;;
  esac
  echo "$stamp" >"$tmp/.stamp"
  rm -rf "$out.old"
  [ ! -d "$out" ] || mv "$out" "$out.old"
  mv "$tmp" "$out"
  rm -rf "$out.old"
  trap - EXIT
  # The tracked placeholder that keeps the directory in a fresh clone (Dockerfiles COPY it).
  touch "$out/.gitkeep"
  log "$out: $(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1), $((SECONDS - began)) s${torch:+ ($torch)}"
}

mkdir -p "$DEST"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(api worker-cpu)
for target in "${targets[@]}"; do build "$target"; done
