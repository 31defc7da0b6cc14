#!/usr/bin/env bash
# Command 1 of 2: install everything and bring the whole system up locally.
# Redis (the one at AETHERCORE_REDIS_URL, or a local redis-server started here), one CPU worker,
# the API on :8001, the batch driver, the webhook dispatcher and Flower on :5555, with the demo models built offline.
# Ctrl-C stops it all.
source "$(dirname "$0")/lib.sh"
ensure_venv
ensure_requirements local
ensure_models
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec "$PY" manage.py up "$@"
