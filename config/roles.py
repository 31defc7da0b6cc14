"""The API roles, defined once (settings validate AETHERCORE_API_KEYS with them, access/principal.py groups them)."""

ADMIN = "admin"  # everything
OPERATOR = "operator"  # models (load, unload), every job, no inference
USER = "user"  # inference and its own jobs
VIEWER = "viewer"  # read-only: models, health
ROLES = (ADMIN, OPERATOR, USER, VIEWER)
