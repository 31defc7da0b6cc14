"""Every job state, job kind and model state, defined once (the anchor: celery/states.py). Python code imports these;
the Lua scripts are rendered from them (tasks/jobs/scripts.py `render`)."""

from __future__ import annotations

# -- jobs --------------------------------------------------------------------------------------------
QUEUED = "queued"  # created, its message on a device queue (or about to be)
RUNNING = "running"  # a worker took it
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"  # by DELETE /jobs/{id} (or a closed WebSocket)
EXPIRED = "expired"  # its deadline (`timeout`) passed
TERMINAL = (SUCCEEDED, FAILED, CANCELLED, EXPIRED)
STATUSES = (QUEUED, RUNNING) + TERMINAL

# -- job kinds ---------------------------------------------------------------------------------------
INFERENCE = "inference"
LOAD = "load"
UNLOAD = "unload"
JOB_KINDS = (INFERENCE, LOAD, UNLOAD)

# -- a model on a worker (and the cluster's view of it) ----------------------------------------------
LOADED = "loaded"
LOADING = "loading"
UNLOADING = "unloading"
UNLOADED = "unloaded"
MODEL_FAILED = FAILED  # its last load failed
MODEL_STATES = (LOADED, LOADING, UNLOADING, UNLOADED, MODEL_FAILED)
