#!/usr/bin/env bash
# The compose deployment, for real, on this machine: build the images, start docker-compose.yml with three CPU
# workers, and prove that it serves and survives. Prints a summary; exits non-zero on any failure.
#
#   scripts/compose-check.sh                   (root, or a user of the docker group; ~10 minutes on 2 cores)
#
#  1. engine      uses the Docker engine that answers, else starts one (dockerd $COMPOSE_CHECK_DOCKERD_ARGS) and
#                 stops it again at the end
#  2. images      base images: the public ones when the registry answers, else Debian stand-ins made by
#                 scripts/base-images.sh; wheels: scripts/wheelhouse.sh api worker-cpu; then `compose build`
#  3. up          `up -d --scale worker=3` redis, api, worker, flower, prometheus; waits for every healthcheck
#  4. keys        `manage.py auth create-key` inside the api container (an admin key, a user key)
#  5. smoke       `manage.py context test all` from the host against the published port
#  6. load        scripts/compose_check.py: jobs spread over the three workers add up on /metrics; a burst of
#                 $COMPOSE_CHECK_JOBS /serve jobs while a worker container is SIGKILLed and the worker service
#                 is scaled 3 -> 2 -> 4 (every job ends exactly once, none lost); the API, the containers and
#                 Flower agree on the 4 live workers; Prometheus has every target up
#  7. down        `down -v` leaves no container, volume or network of the project
#
# Settings (environment): COMPOSE_CHECK_JOBS (600), COMPOSE_CHECK_RATE (jobs/s, 5), COMPOSE_CHECK_BASE
# (auto | public | local), COMPOSE_CHECK_WHEELHOUSE (1; 0 builds from the package index), COMPOSE_CHECK_PROJECT
# (aethercore-check), COMPOSE_CHECK_KEEP=1 (leave the deployment up), COMPOSE (the compose command; default
# `docker compose`, else `docker-compose`), COMPOSE_CHECK_DOCKERD_ARGS (default: the flags a container without
# iptables or a default bridge needs: --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none).
# Published ports are free ones picked at start, on 127.0.0.1; .env is neither read nor written.
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

JOBS=${COMPOSE_CHECK_JOBS:-600}
RATE=${COMPOSE_CHECK_RATE:-5}
PROJECT=${COMPOSE_CHECK_PROJECT:-aethercore-check}
BASE_MODE=${COMPOSE_CHECK_BASE:-auto}
SERVICES=(redis api batches worker flower prometheus)
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/aethercore-compose-check.XXXXXX")
SUMMARY=()
FAILED=""
DOCKERD_PID=""
UP=""
STARTED=$(date +%s)

say() { log "$*"; }
note() { SUMMARY+=("$(printf '%-14s %s' "$1" "$2")"); }
fail() {
  FAILED="$*"
  log "FAILED: $*"
  exit 1
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }'; }
hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.0f MB", b / 1000000 }'; }

compose() { "${COMPOSE_CMD[@]}" -p "$PROJECT" --env-file "$RUN_DIR/env" -f docker-compose.yml "$@"; }
# docker-compose 1.29 gives up on an engine call after 60 s; with vfs, creating a worker container copies its whole
# image (2 GB), and three at once take longer than that.
export COMPOSE_HTTP_TIMEOUT=${COMPOSE_HTTP_TIMEOUT:-600}

finish() {
  local code=$?
  set +e
  if [ -n "$UP" ] && [ -z "${COMPOSE_CHECK_KEEP:-}" ]; then
    [ -z "$FAILED" ] || compose logs --no-color >"$RUN_DIR/compose.log" 2>&1
    compose down -v --remove-orphans >>"$RUN_DIR/down.log" 2>&1
  fi
  if [ -n "$DOCKERD_PID" ] && [ -z "${COMPOSE_CHECK_KEEP:-}" ]; then
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    note "engine" "stopped again (dockerd pid $DOCKERD_PID)"
  fi
  [ "$code" -eq 0 ] || [ -n "$FAILED" ] || FAILED="exit status $code"
  note "total" "$(($(date +%s) - STARTED)) s; logs in $RUN_DIR"
  {
    echo
    if [ -z "$FAILED" ]; then echo "compose check: PASS"; else echo "compose check: FAIL: $FAILED"; fi
    printf '  %s\n' "${SUMMARY[@]}"
  } | tee "$RUN_DIR/summary.txt"
  [ -z "$FAILED" ] || exit 1
}
trap finish EXIT

# -- 1. the engine and the compose client ---------------------------------------------------------------
command -v docker >/dev/null 2>&1 || apt_install docker.io || fail "no docker client (apt-get install docker.io)"
if docker info >/dev/null 2>&1; then
  note "engine" "already running ($(docker version -f '{{.Server.Version}}' 2>/dev/null), $(docker info -f '{{.Driver}}'))"
else
  command -v dockerd >/dev/null 2>&1 || apt_install docker.io || fail "no Docker engine (apt-get install docker.io)"
  read -r -a DOCKERD_ARGS <<<"${COMPOSE_CHECK_DOCKERD_ARGS:---storage-driver=vfs --iptables=false --ip6tables=false --bridge=none}"
  say "no engine answers: starting dockerd ${DOCKERD_ARGS[*]}"
  dockerd "${DOCKERD_ARGS[@]}" >"$RUN_DIR/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || fail "dockerd did not answer within 60 s ($RUN_DIR/dockerd.log)"
  note "engine" "started here: dockerd ${DOCKERD_ARGS[*]} ($(docker version -f '{{.Server.Version}}'))"
fi
if [ -n "${COMPOSE:-}" ]; then
  read -r -a COMPOSE_CMD <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
  COMPOSE_CMD=(docker compose)
else
  command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose || fail "no compose client"
  COMPOSE_CMD=(docker-compose)
fi
note "compose" "${COMPOSE_CMD[*]} ($("${COMPOSE_CMD[@]}" version --short 2>/dev/null || echo '?'))"

# The host side: manage.py (context test) needs the project's packages (the API's are enough).
if ! { [ -x "$PY" ] && "$PY" -c 'import requests, typer, rich, redis, yaml, loguru, orjson' 2>/dev/null; }; then
  ensure_venv
  ensure_requirements api
fi

# -- 2. images --------------------------------------------------------------------------------------------
if [ "$BASE_MODE" = auto ]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 120 docker pull -q python:3.11-slim >/dev/null 2>&1
  then BASE_MODE=public; else BASE_MODE=local; fi
fi
IMAGES=()
case "$BASE_MODE" in
  public) ;;
  local)
    began=$(date +%s.%N)
    scripts/base-images.sh python redis prometheus 2>&1 | tee "$RUN_DIR/base-images.log" >&2 ||
      fail "scripts/base-images.sh failed"
    IMAGES=(BASE_IMAGE=aethercore/python:3.11-bookworm REDIS_IMAGE=aethercore/redis:bookworm
      PROMETHEUS_IMAGE=aethercore/prometheus:bookworm)
    note "base images" "local, from Debian's packages ($(elapsed "$began") s): ${IMAGES[*]}"
    ;;
  *) fail "COMPOSE_CHECK_BASE=$BASE_MODE: auto, public or local" ;;
esac
[ "$BASE_MODE" = local ] || note "base images" "public (python:3.11-slim, redis:7.2-alpine, prom/prometheus)"

if [ "${COMPOSE_CHECK_WHEELHOUSE:-1}" != 0 ]; then
  began=$(date +%s.%N)
  scripts/wheelhouse.sh api worker-cpu 2>&1 | tee "$RUN_DIR/wheelhouse.log" >&2 || fail "scripts/wheelhouse.sh failed"
  note "wheelhouse" "api $(find wheelhouse/api -name '*.whl' | wc -l) wheels ($(du -sh wheelhouse/api | cut -f1)), worker-cpu $(find wheelhouse/worker-cpu -name '*.whl' | wc -l) wheels ($(du -sh wheelhouse/worker-cpu | cut -f1)), $(elapsed "$began") s"
else
  note "wheelhouse" "none: the images install from the package index"
fi

# Settings of this deployment: fresh secrets, free ports; nothing from the caller's environment or .env.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))
EOF
}
read -r API_PORT FLOWER_PORT PROMETHEUS_PORT GRAFANA_PORT <<<"$(free_ports 4)"
FLOWER_AUTH="ops:$(hex 16)"
cat >"$RUN_DIR/env" <<EOF
REDIS_PASSWORD=$(hex 32)
AETHERCORE_FLOWER_BASIC_AUTH=$FLOWER_AUTH
PROMETHEUS_FLOWER_PASSWORD=$(hex 16)
PROMETHEUS_API_KEY=$(hex 32)
GRAFANA_ADMIN_PASSWORD=$(hex 16)
API_PUBLISH_PORT=$API_PORT
FLOWER_PUBLISH_PORT=$FLOWER_PORT
PROMETHEUS_PUBLISH_PORT=$PROMETHEUS_PORT
GRAFANA_PUBLISH_PORT=$GRAFANA_PORT
$(printf '%s\n' "${IMAGES[@]}")
EOF
chmod 600 "$RUN_DIR/env"
while read -r name; do unset "$name"; done < <(compgen -e | grep -E '^(AETHERCORE_|REDIS_|GRAFANA_|PROMETHEUS_|FLOWER_|API_|DASHBOARD_|BASE_IMAGE|CUDA_BASE)' || true)
set -a
# shellcheck disable=SC1091
source "$RUN_DIR/env"
set +a

compose down -v --remove-orphans >/dev/null 2>&1 || true # what an interrupted run left
began=$(date +%s.%N)
say "building the images (log: $RUN_DIR/build.log)"
compose build api worker >"$RUN_DIR/build.log" 2>&1 || { tail -30 "$RUN_DIR/build.log" >&2; fail "compose build failed"; }
sizes=""
for image in aethercore/api:latest aethercore/worker-cpu:latest; do
  sizes+="$image $(mib "$(docker image inspect -f '{{.Size}}' "$image")"), "
done
note "build" "$(elapsed "$began") s (api and worker-cpu; Flower runs the API's image)"
note "image sizes" "${sizes%, }"

# -- 3. up ------------------------------------------------------------------------------------------------
began=$(date +%s.%N)
UP=1
say "starting ${SERVICES[*]} with --scale worker=3"
compose up -d --scale worker=3 "${SERVICES[@]}" >"$RUN_DIR/up.log" 2>&1 || { cat "$RUN_DIR/up.log" >&2; fail "compose up failed"; }
states=""
for _ in $(seq 150); do
  mapfile -t ids < <(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
  states=$(docker inspect -f '{{index .Config.Labels "com.docker.compose.service"}}={{.State.Status}}{{if .State.Health}}/{{.State.Health.Status}}{{end}}' "${ids[@]}" | sort)
  if grep -qE '=(exited|dead)' <<<"$states"; then fail "a container stopped while starting: $(tr '\n' ' ' <<<"$states")"; fi
  if [ "$(grep -c . <<<"$states")" -eq $((${#SERVICES[@]} + 2)) ] && ! grep -vqE '=running(/healthy)?$' <<<"$states"; then
    break
  fi
  sleep 2
done
grep -vqE '=running(/healthy)?$' <<<"$states" && fail "not healthy after 300 s: $(tr '\n' ' ' <<<"$states")"
note "start" "$(elapsed "$began") s until every container ran and every healthcheck passed ($(grep -c . <<<"$states") containers: $(sed 's/=.*//' <<<"$states" | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}'))"

# -- 4. keys, made where Redis is: inside the api container -----------------------------------------------
ADMIN_KEY=$(compose exec -T api python manage.py auth create-key --role admin --name compose-check 2>>"$RUN_DIR/keys.log" | tr -d '\r\n')
USER_KEY=$(compose exec -T api python manage.py auth create-key --role user --name compose-check-load 2>>"$RUN_DIR/keys.log" | tr -d '\r\n')
[ -n "$ADMIN_KEY" ] && [ -n "$USER_KEY" ] || fail "manage.py auth create-key in the api container: $(cat "$RUN_DIR/keys.log")"
note "keys" "admin and user keys made by \`manage.py auth create-key\` in the api container"

# -- 5. the smoke tests, from the host, against the published port ----------------------------------------
began=$(date +%s.%N)
if ! AETHERCORE_URL="http://127.0.0.1:$API_PORT" AETHERCORE_API_KEY="$ADMIN_KEY" HF_HUB_OFFLINE=1 COLUMNS=200 \
  "$PY" manage.py context test all 2>&1 | tee "$RUN_DIR/context-test.log" >&2; then
  fail "manage.py context test all: $(grep -c '^FAIL' "$RUN_DIR/context-test.log") failed"
fi
note "context test" "$(grep -c '^pass' "$RUN_DIR/context-test.log") passed: $(awk '$1 == "pass" {printf "%s%s", sep, $2; sep=", "}' "$RUN_DIR/context-test.log") ($(elapsed "$began") s, from the host on :$API_PORT)"

# -- 6. load, failure and scaling -------------------------------------------------------------------------
say "spread, burst of $JOBS jobs with a kill and 3 -> 2 -> 4, observe"
"$PY" scripts/compose_check.py --api "http://127.0.0.1:$API_PORT" --key "$USER_KEY" --project "$PROJECT" \
  --compose "$(printf '%q ' "${COMPOSE_CMD[@]}" -p "$PROJECT" --env-file "$RUN_DIR/env" -f docker-compose.yml)" \
  --flower "http://127.0.0.1:$FLOWER_PORT" --flower-auth "$FLOWER_AUTH" --prometheus "http://127.0.0.1:$PROMETHEUS_PORT" \
  --jobs "$JOBS" --rate "$RATE" --out "$RUN_DIR/results.json" | tee "$RUN_DIR/load.log" >&2
load_status=${PIPESTATUS[0]}
while read -r line; do
  case "$line" in
    FAIL:*) ;;
    *) note "${line%%:*}" "${line#*: }" ;;
  esac
done <"$RUN_DIR/load.log"
[ "$load_status" -eq 0 ] || fail "$(grep -c 'FAIL:' "$RUN_DIR/load.log") load checks failed: $(grep 'FAIL:' "$RUN_DIR/load.log" | sed 's/^ *FAIL: //' | paste -sd ';' -)"

# -- 7. down ----------------------------------------------------------------------------------------------
if [ -n "${COMPOSE_CHECK_KEEP:-}" ]; then
  note "down" "skipped (COMPOSE_CHECK_KEEP): \`${COMPOSE_CMD[*]} -p $PROJECT --env-file $RUN_DIR/env down -v\` ends it"
  exit 0
fi
began=$(date +%s.%N)
compose down -v --remove-orphans >"$RUN_DIR/down.log" 2>&1 || fail "compose down -v failed"
UP=""
left_c=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
left_v=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
left_n=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
note "down -v" "$(elapsed "$began") s; left: $left_c containers, $left_v volumes, $left_n networks"
[ "$((left_c + left_v + left_n))" -eq 0 ] || fail "down -v left $left_c containers, $left_v volumes, $left_n networks"
