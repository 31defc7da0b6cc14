#!/usr/bin/env bash
# Local stand-ins for the public base images, for a Docker engine that reaches no image registry. Each one is a
# Debian root file system made by debootstrap from Debian's own packages (deb.debian.org, or MIRROR) and
# imported with `docker import`:
#
#   aethercore/python:3.11-bookworm   Debian 12 + python3 (3.11) + venv    BASE_IMAGE for Dockerfile.api/.worker
#   aethercore/redis:bookworm         Debian's redis-server (7.0)           REDIS_IMAGE in docker-compose.yml
#   aethercore/prometheus:bookworm    Debian's prometheus (2.42)            PROMETHEUS_IMAGE in docker-compose.yml
#
#   scripts/base-images.sh [python] [redis] [prometheus]     (none named: all three)
#   FORCE=1 rebuilds images that exist; MIRROR=http://... picks the Debian mirror; PREFIX=aethercore/ names them.
#
# The images behave like the official ones where docker-compose.yml relies on it: the Redis image has
# `docker-entrypoint.sh` (owns /data, drops to the `redis` user) and WORKDIR /data; the Prometheus one runs
# as `nobody` with /bin/prometheus and a /prometheus data directory. Grafana has no Debian package: no local
# stand-in. These images carry bookworm's release packages (no security updates): for machines without a
# registry and for tests, not as a hardened production base. Needs root (debootstrap), about a minute each.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PREFIX=${PREFIX:-aethercore/}
CACHE=${AETHERCORE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/aethercore}/debootstrap
WORK=${TMPDIR:-/var/tmp}

log() { printf '\033[1;34m[base-images]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd first)"
if ! command -v debootstrap >/dev/null; then
  # shellcheck source=scripts/lib.sh
  source scripts/lib.sh
  apt_install debootstrap || die "debootstrap is not installed and could not be installed"
fi

ROOTFS=
trap '[ -z "$ROOTFS" ] || rm -rf "$ROOTFS" "$ROOTFS.log"' EXIT

# make_image NAME PACKAGES HOOK IMPORT-CHANGES...: debootstrap minbase with PACKAGES, HOOK DIR edits the tree, import.
make_image() {
  local image="$1" packages="$2" hook="$3"
  shift 3
  if [ -z "${FORCE:-}" ] && docker image inspect "$image" >/dev/null 2>&1; then
    log "$image exists (FORCE=1 rebuilds it)"
    return 0
  fi
  local dir began=$SECONDS
  dir=$(mktemp -d "$WORK/aethercore-rootfs.XXXXXX")
  ROOTFS=$dir
  mkdir -p "$CACHE"
  log "$image: debootstrap --variant=minbase $SUITE with $packages"
  debootstrap --variant=minbase --include="$packages" --cache-dir="$CACHE" "$SUITE" "$dir" "$MIRROR" \
    >"$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; die "debootstrap failed (log: $dir.log)"; }
  rm -f "$dir.log"
  # Lean: no package caches, lists, documentation or translations in the image.
  rm -rf "$dir"/var/cache/apt/* "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* "$dir"/usr/share/man/* \
    "$dir"/usr/share/info/* "$dir"/usr/share/locale/* "$dir"/var/log/*.log "$dir"/tmp/*
  printf 'nameserver 127.0.0.11\n' >"$dir/etc/resolv.conf" # replaced by Docker in every container anyway
  "$hook" "$dir"
  chmod 755 "$dir" # mktemp made it 0700: as the image's /, no other user could enter it
  local changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')
  for change in "$@"; do changes+=(--change "$change"); done
  tar --numeric-owner -C "$dir" -c . | docker import "${changes[@]}" \
    --message "debootstrap --variant=minbase $SUITE: $packages" - "$image" >/dev/null
  rm -rf "$dir"
  ROOTFS=
  log "$image: $(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec) in $((SECONDS - began)) s"
}

python_hook() { :; }

redis_hook() {
  local dir="$1"
  mkdir -p "$dir/data" "$dir/usr/local/bin"
  chroot "$dir" chown redis:redis /data
  # As the official image's entrypoint: started as root, own /data and run redis-server as `redis`.
  cat >"$dir/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
  find . \! -user redis -exec chown redis '{}' +
  exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi
exec "$@"
EOF
  chmod 755 "$dir/usr/local/bin/docker-entrypoint.sh"
}

prometheus_hook() {
  local dir="$1"
  mkdir -p "$dir/prometheus" "$dir/etc/prometheus"
  chown 65534:65534 "$dir/prometheus"
  # The web UI's JavaScript libraries (220 MB of Debian packages) and promtool: scraping, the query API and
  # /api/v1/targets work without them; the browser UI does not (use Grafana, or the official image).
  rm -rf "$dir"/usr/share/javascript/* "$dir"/usr/share/nodejs/* "$dir/usr/bin/promtool"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(python redis prometheus)
for target in "${targets[@]}"; do
  case "$target" in
    python)
      make_image "${PREFIX}python:3.11-$SUITE" python3,python3-venv,ca-certificates python_hook \
        'ENV LANG=C.UTF-8' 'CMD ["python3"]'
      ;;
    redis)
      make_image "${PREFIX}redis:$SUITE" redis-server redis_hook \
        'WORKDIR /data' 'VOLUME /data' 'EXPOSE 6379' \
        'ENTRYPOINT ["docker-entrypoint.sh"]' 'CMD ["redis-server"]'
      ;;
    prometheus)
      make_image "${PREFIX}prometheus:$SUITE" prometheus prometheus_hook \
        'USER nobody' 'WORKDIR /prometheus' 'VOLUME /prometheus' 'EXPOSE 9090' \
        'ENTRYPOINT ["/bin/prometheus"]' \
        'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
      ;;
    *) die "unknown image $target (python, redis, prometheus)" ;;
  esac
done
