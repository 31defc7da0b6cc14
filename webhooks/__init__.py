"""Completion webhooks below the HTTP layer: the deliveries in Redis and their circuit breaker (deliveries.py, its
Lua in lua/), the owners' signing secrets and endpoints (owners.py), the wire format and signatures (signing.py),
the outbound HTTP call with its address policy (outbound.py), the dispatcher process that sends them (dispatcher.py,
`manage.py dispatcher`), and their Prometheus families (metrics.py). A job's end makes its delivery due in the job
store's own Lua step, with the key names of tasks/names.py: tasks/ never imports webhooks/.

May import config/ and tasks/ only; never api, flask, flask_smorest, workers, or the products above it
(batches/ hands the dispatcher its delivery bodies at start-up).
"""
