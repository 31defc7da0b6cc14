"""The contract shared by the API and the workers: Celery app, task names, queues, Redis keys.

Torch-free by rule: the API imports this package.
"""
