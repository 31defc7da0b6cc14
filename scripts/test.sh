#!/usr/bin/env bash
# Command 2 of 2: install the test dependencies, check the tree with ruff, run the full test suite (pytest).
# The tests start their own redis-server on a spare port and their own worker processes.
source "$(dirname "$0")/lib.sh"
ensure_venv
ensure_requirements dev
ensure_redis_server
ensure_browser
ensure_compose
ensure_models
export HF_HUB_OFFLINE=1
# Lint, import order and format first (pyproject.toml): seconds, and a red tree never reaches the slow tests.
log "ruff: lint, import order, format"
"$VENV/bin/ruff" check --quiet . && "$VENV/bin/ruff" format --check --quiet . || {
  log "ruff found problems (fix: .venv/bin/ruff check --fix . && .venv/bin/ruff format .)"; exit 1; }
exec "$PY" -m pytest "$@"
