#!/usr/bin/env bash
# Command 2 of 2: install the test dependencies and run the full test suite (pytest).
# The tests start their own redis-server on a spare port and their own worker processes.
source "$(dirname "$0")/lib.sh"
ensure_venv
ensure_requirements dev
ensure_redis_server
ensure_browser
ensure_compose
ensure_models
export HF_HUB_OFFLINE=1
exec "$PY" -m pytest "$@"
