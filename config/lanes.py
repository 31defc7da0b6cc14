"""The priority lanes of a device queue, defined once (settings validate AETHERCORE_PRIORITY_LANES with them,
tasks/names.py maps each to its broker priority, the API grants them per role and per key). Imports nothing."""

LANES = ("high", "normal", "low")  # highest first: a worker always takes the highest waiting lane's message first
