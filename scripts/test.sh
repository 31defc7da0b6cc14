#!/usr/bin/env bash
# Command 2 of 2: install the test dependencies, check the tree (ruff, import contracts, mypy), run the full test
# suite (pytest).
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
# The layers between our packages (pyproject.toml [tool.importlinter], docs/ARCHITECTURE.md "Layers"): a second.
log "import-linter: the layers and independence contracts"
contracts="$("$VENV/bin/lint-imports" --no-logo 2>&1)" || {
  echo "$contracts"
  log "an import breaks a contract of pyproject.toml [tool.importlinter] (above; rerun: .venv/bin/lint-imports)"; exit 1; }
# Types (pyproject.toml [tool.mypy]: the packages it covers); under a minute, incremental after the first run.
log "mypy: types"
"$VENV/bin/mypy" || { log "mypy found type errors (run: .venv/bin/mypy)"; exit 1; }
exec "$PY" -m pytest "$@"
