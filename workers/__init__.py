"""Device-pinned Celery workers: resident model cache, runtimes, task handlers.

Importing `workers.device` first pins the process to its device before torch is imported.
"""
