"""Start one Celery worker process pinned to one device and consuming that device's queue.

Uses Celery's threads pool: every task thread shares the one resident copy of each model
(a prefork pool would hold one copy per child, and forking after CUDA init is unsafe).
"""

from __future__ import annotations

import os
import socket

from config.settings import Settings
from config.values import parse_worker_device
from workers.device import pin_device


def run_worker(device: str, settings: Settings | None = None) -> int:
    """Run the worker until it stops; its exit code (non-zero after Celery's "Unrecoverable error", so a
    supervisor restarts it: Celery's `worker_main` drops the code and the process would exit 0)."""
    device = parse_worker_device(device)
    settings = settings or Settings.from_env()
    pin_device(device, settings.gpu_index)  # before anything imports torch

    from celery import signals

    from config.logging import setup_logging
    from tasks.celery_app import make_celery
    from tasks.names import DEFAULT_LANE, LANE_PRIORITY, queue_for_device
    from tracing.setup import configure as configure_tracing
    from workers import handlers
    from workers.service import WorkerService

    settings = settings.with_overrides(device=device)
    setup_logging("worker", settings.log_level, settings.log_format)
    configure_tracing("worker")  # on when OTEL_EXPORTER_OTLP_*ENDPOINT is set (tracing/setup.py)

    @signals.setup_logging.connect(weak=False)
    def _keep_our_logging(**_: object) -> None:  # stops Celery from reconfiguring the root logger
        setup_logging("worker", settings.log_level, settings.log_format)

    nodename = f"{device.replace(':', '')}.{os.getpid()}@{socket.gethostname()}"
    service = WorkerService(settings, nodename)
    handlers.bind_service(service)

    app = make_celery(settings)
    handlers.register(app, settings.task_events)

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        service.publish()

    controllers: list = []

    @signals.worker_init.connect(weak=False)
    def _keep_controller(sender: object, **_: object) -> None:
        controllers.append(sender)

    @signals.worker_shutdown.connect(weak=False)
    def _shutdown(**_: object) -> None:
        service.stop()

    def send(task: str, queue: str, kwargs: dict, job_id: str) -> None:
        lane = ((kwargs.get("jobs") or [{}])[0]).get("priority") or DEFAULT_LANE
        app.send_task(
            task,
            kwargs=kwargs,
            queue=queue,
            task_id=job_id,
            priority=LANE_PRIORITY[lane],  # queued again in its own lane
            kwargsrepr=repr({k: v for k, v in kwargs.items() if k != "jobs"} | {"job_ids": [job_id]}),
        )

    service.start(send)
    service.publish()
    # JSON logs: no ASCII banner on stdout, so every output line parses.
    quiet = ["--quiet"] if settings.log_format == "json" else []
    app.worker_main(
        [
            *quiet,
            "worker",
            "--queues",
            queue_for_device(device),
            "--pool",
            "threads",
            "--concurrency",
            str(service.task_threads),
            "--hostname",
            nodename,
            "--loglevel",
            settings.log_level if settings.log_level != "TRACE" else "DEBUG",
            "--without-gossip",
            "--without-mingle",
            "--task-events",
        ]
    )
    return int(getattr(controllers[0], "exitcode", 0) or 0) if controllers else 1
