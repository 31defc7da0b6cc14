#!/usr/bin/env bash
# The project under ../shared/peer-bench/project.sh, one tracing configuration per start, in turn: the cost of tracing
# measured side by side in ONE peer-bench run (docs/OPERATIONS.md "Tracing", bench/RESULTS.md).
#
#   python -m bench.otlp_receiver --port 4318 &            # the collector the traced runs export to (not measured)
#   TRACING_MODES="before off 0.01 1.0 1.0 0.01 off before off before 1.0 0.01" TRACING_FLUSH=1 \
#   TRACING_BEFORE_DIR=/path/to/checkout-before SYSTEMS="ray_serve_tput $(printf 'aethercore %.0s' {1..12})" \
#   BENCH_MODEL=sim-h100 LOADGEN_ENGINE=wrk CONCS="32 64" CUSTOM_CMD='exec bench/tracing_modes.sh' \
#   ../shared/peer-bench/project.sh
#   python -m bench.tracing_e2e $TMPDIR/peer-bench/<run>                   # the table, per mode
#
# Each start takes the next of TRACING_MODES (its count kept in var/tracing-modes.state, each start logged in
# var/tracing-modes.log): `before` runs `manage.py up` in TRACING_BEFORE_DIR (a checkout without tracing, this
# checkout's .venv, models and admin key), `off` this checkout without an endpoint, a number this checkout exporting to
# TRACING_ENDPOINT (default http://127.0.0.1:4318) with parentbased_traceidratio at that ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
state=var/tracing-modes.state
read -r -a modes <<<"${TRACING_MODES:-off 1.0 0.01}"
n=$(cat "$state" 2>/dev/null || echo 0)
echo $((n + 1)) >"$state"
mode=${modes[$((n % ${#modes[@]}))]}
echo "$(date -Is) start $n mode $mode" >>var/tracing-modes.log
# TRACING_FLUSH=1: every start on an empty jobs database (manage.py up registers the admin key again), so a later start
# does not run against the jobs of the earlier ones (a Redis that grew by a million keys was 5-10 % slower).
if [ "${TRACING_FLUSH:-0}" = 1 ]; then
  redis-cli -u "${AETHERCORE_REDIS_URL:-redis://127.0.0.1:6379/0}" flushdb >/dev/null
fi
unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_TRACES_ENDPOINT OTEL_TRACES_SAMPLER OTEL_TRACES_SAMPLER_ARG
export HF_HUB_OFFLINE=1
case $mode in
  before)
    here=$(pwd)
    cd "${TRACING_BEFORE_DIR:?set TRACING_BEFORE_DIR to a checkout without tracing}"
    exec env AETHERCORE_ADMIN_KEY_FILE="$here/var/admin.key" "$here/.venv/bin/python" manage.py up ;;
  off)
    exec .venv/bin/python manage.py up ;;
  *)
    exec env OTEL_EXPORTER_OTLP_ENDPOINT="${TRACING_ENDPOINT:-http://127.0.0.1:4318}" \
      OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG="$mode" .venv/bin/python manage.py up ;;
esac
