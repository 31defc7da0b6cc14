"""The one Celery app factory, shared by the API (which only sends tasks) and the workers."""

from __future__ import annotations

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

from config.settings import Settings, get_settings
from tasks.broker import SENTINEL_TRANSPORT, TRANSPORT
from tasks.names import CPU_QUEUE
from tasks.redis_client import sentinel_options

# How often each worker sweeps for messages whose worker died (kombu's Redis transport); a dead
# worker's job is redelivered between visibility_timeout and visibility_timeout + this many seconds.
RESTORE_SWEEP_S = 5


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("aethercore", broker=settings.effective_broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # Job state and results live in our own Redis job records (tasks/jobs/), not Celery's backend.
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=CPU_QUEUE,
        task_create_missing_queues=True,
        # At-least-once: a job is acknowledged only after it finished, and comes back if the worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            # Longer than the longest job: an unacknowledged message is redelivered after this.
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": RESTORE_SWEEP_S,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 2,
        },
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=True,
        # The API checks Redis before publishing; a publish that still fails must fail fast.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        # Events for Flower: the workers' received/started/succeeded events show every task. The
        # API's extra "task-sent" event would cost one more Redis publish per request for nothing.
        worker_send_task_events=True,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_pool_limit=64,
    )
    if settings.effective_broker_url.startswith(("redis://", "rediss://")):
        app.conf.broker_transport = TRANSPORT  # kombu's, without a client built per call (tasks/broker.py)
    ssl = settings.redis_ssl(settings.effective_broker_url)
    if ssl:  # rediss:// broker: kombu takes the same options as redis-py
        import ssl as ssl_module

        app.conf.broker_use_ssl = {**ssl, "ssl_cert_reqs": ssl_module.CERT_REQUIRED}
    if settings.effective_broker_url.startswith("sentinel://"):
        # kombu's Sentinel transport with our channel (tasks/broker.py: a late ack during a failover is a
        # connection error, not the worker's end); every `;`-separated sentinel is asked in turn.
        app.conf.broker_transport = SENTINEL_TRANSPORT
        # kombu treats the `;`-separated sentinels as failover URLs too, and a connection that moves on to the
        # next one takes the transport of its scheme: the alias keeps it ours after a failover.
        TRANSPORT_ALIASES["sentinel"] = SENTINEL_TRANSPORT
        app.conf.broker_transport_options["master_name"] = settings.redis_sentinel_master
        app.conf.broker_transport_options["sentinel_kwargs"] = sentinel_options(settings.redis_sentinel_password, ssl)
    return app
