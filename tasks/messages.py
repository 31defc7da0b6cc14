"""A Celery task message (protocol 2) exactly as kombu's Redis transport stores it in a queue's list, built
and pushed without kombu.

The API publishes every inference message. Through `Celery.send_task` that cost ~15 % of an API process's
CPU per /serve at GPU speed (producer pool, connection checks, retry wrappers, kombu's serialisation
registry) for what is one LPUSH of one JSON document onto the device's list. Where the broker is the jobs'
Redis (the default, one Redis), the API builds that document here and pushes it with its own client; the
workers consume it with Celery as any other message (tests/unit/test_messages.py compares it with what
kombu writes). A broker of its own (RabbitMQ, another Redis) keeps `send_task`.
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
from typing import Any

import orjson

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def trace_headers(traceparent: str | None) -> dict[str, str] | None:
    """The Celery message headers that carry a job's W3C trace context (a message of one job; a message that carries
    several has each job's `traceparent` in its entry, which is what the worker reads)."""
    return {"traceparent": traceparent} if traceparent else None


class TaskMessages:
    def __init__(self) -> None:
        self._pid = -1
        self._origin = ""
        self._reply_to = ""

    def _identity(self) -> tuple[str, str]:
        # Per process (gunicorn forks API processes after the app may have been built).
        pid = os.getpid()
        if pid != self._pid:
            self._pid, self._origin, self._reply_to = pid, f"gen{pid}@{socket.gethostname()}", str(uuid.uuid4())
        return self._origin, self._reply_to

    def build(
        self,
        task: str,
        kwargs: dict[str, Any],
        queue: str,
        task_id: str | None = None,
        kwargsrepr: str | None = None,
        priority: int = 0,
        traceparent: str | None = None,
    ) -> bytes:
        """The message for `queue`; pushed onto the list of its `priority` (tasks/names.py `lane_list`).
        `traceparent`: its one job's trace context, also as a header (`trace_headers`)."""
        origin, reply_to = self._identity()
        task_id = task_id or str(uuid.uuid4())
        kwargsrepr = kwargsrepr if kwargsrepr is not None else repr(kwargs)
        body = base64.b64encode(orjson.dumps([[], kwargs, _EMBED])).decode()
        message = {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": task,
                "id": task_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": task_id,
                "parent_id": None,
                "argsrepr": "()",
                "kwargsrepr": kwargsrepr,
                "origin": origin,
                "ignore_result": None,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": reply_to,
                "kwargsrepr": kwargsrepr,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": priority,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        if traceparent:
            message["headers"]["traceparent"] = traceparent  # type: ignore[index]
        return orjson.dumps(message)
