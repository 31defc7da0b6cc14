# Shared set-up for scripts/up.sh and scripts/test.sh: a virtualenv with pinned requirements,
# redis-server available, the demo models built. Idempotent: a second run only checks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

log() { printf '\033[1;34m[aethercore]\033[0m %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else return 1; fi
}

# apt_get ARGS...: apt-get as root; while another apt-get or dpkg holds the package manager's locks (a parallel
# set-up, unattended-upgrades on a fresh machine) it waits, up to APT_LOCK_TIMEOUT seconds (default 600), instead
# of failing at once. Quiet when it succeeds; its output when it fails.
apt_get() {
  local deadline=$((SECONDS + ${APT_LOCK_TIMEOUT:-600})) out status
  while :; do
    status=0
    out=$(as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=60 "$@" 2>&1) || status=$?
    if [ "$status" -eq 0 ] || [ "$SECONDS" -ge "$deadline" ] ||
       ! grep -qiE 'could not get lock|unable to acquire|is another process using it' <<<"$out"; then
      [ "$status" -eq 0 ] || printf '%s\n' "$out" >&2
      return "$status"
    fi
    log "apt-get $1: another process holds the package manager's lock; waiting for it"
    sleep 5
  done
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  log "installing Debian packages: $*"
  apt_get update -qq || true
  apt_get install -y -qq "$@"
}

find_python() {
  for candidate in "${PYTHON:-}" python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  log "Python 3.11 or newer is required (set PYTHON=/path/to/python3.11)"; return 1
}

ensure_venv() {
  if [ ! -x "$PY" ]; then
    local python; python="$(find_python)"
    log "creating virtualenv .venv with $python"
    if ! "$python" -m venv "$VENV" 2>/dev/null; then
      apt_install python3-venv && "$python" -m venv "$VENV"
    fi
    "$PY" -m pip install -q --upgrade pip
  fi
}

# ensure_requirements ROLE: pip install requirements/ROLE.txt once per change of the requirement files.
ensure_requirements() {
  local role="$1" stamp="$VENV/.requirements-$1" digest
  digest="$(cat requirements/*.txt | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    log "installing requirements/$role.txt (first run takes a few minutes)"
    "$PY" -m pip install -q -r "requirements/$role.txt"
    echo "$digest" > "$stamp"
  fi
}

ensure_redis_server() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server || {
    log "redis-server is not installed and could not be installed; install it (apt-get install redis-server)"
    return 1
  }
}

ensure_models() {
  HF_HUB_OFFLINE=1 "$PY" manage.py models bootstrap >/dev/null
}

# Headless Chromium for the Flower browser test (Debian's packages; no browser download).
ensure_browser() {
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    apt_install chromium chromium-driver || log "could not install chromium; the Flower browser test will be skipped"
  fi
}

# docker-compose (Debian's, v1) validates docker-compose.yml without a Docker engine.
ensure_compose() {
  command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose ||
    log "could not install docker-compose; the compose validation test will be skipped"
}
