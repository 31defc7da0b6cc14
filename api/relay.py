"""The stream relay, written once: follow one job's event stream (tasks/jobs/follow.py, through the process's
stream hub, tasks/jobs/stream_hub.py) and hand each event to the client in its protocol's frames.

Every streaming route uses it: `GET /jobs/{id}/stream` (SSE), `WS /serve/stream` and the OpenAI `/v1` streams
(SSE). A protocol only says how its frames look (a `Frames`: opening frames, one frame per chunk or status note,
the closing frames for the ended job, keepalives, an error frame) and whether a client that goes away before the
end cancels the job (the WebSocket and /v1 do; `/jobs/{id}/stream` only watches a job someone submitted). The
relay does the rest, the same way for each: the streams gauge, keepalives in silence, the cancel on an early
end, and an error frame (never a broken connection) when the job's stream cannot be read.

Each relay holds one of the process's threads while it lasts, so it runs on a slot taken from the process's
caps before anything else happens (api/limits.py; `admitted()` here, the WebSocket route in api/websocket.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from typing import Any

import redis
from flask import Response, current_app, stream_with_context
from loguru import logger

from api.idempotency import keyed
from api.json_provider import json_text
from api.limits import Slot
from api.services import services
from protocols.errors import ApiError
from tasks.jobs.follow import follow_job
from tasks.jobs.records import JobNotFound
from tasks.jobs.stream_hub import InvalidPosition, SubscriptionFailed, canonical

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_KEEPALIVE = ": keepalive\n\n"


def resume_from(last_event_id: str | None) -> str:
    """The stream position a client asks to resume after (SSE's Last-Event-ID), checked: 400 unless it is a
    position of a Redis Stream (`<ms>-<seq>`, each part at most 2^64-1). The text is never echoed back."""
    if last_event_id is None:
        return "0-0"
    try:
        return canonical(last_event_id.strip())
    except InvalidPosition as exc:
        raise ApiError(
            400,
            "bad_request",
            f"Last-Event-ID must be an id this stream sent (like 1712-0): {exc}; leave it out to read from the start",
        ) from None


def sse_event(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    """A named Server-Sent Event (with its id, the stream position a client resumes after)."""
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json_text(data)}\n\n"


def sse_data(data: Any) -> str:
    """An unnamed Server-Sent Event (OpenAI's streams)."""
    return f"data: {json_text(data)}\n\n"


class Frames:
    """How one protocol writes a job's events. A method that returns None sends nothing for that event."""

    transport = "sse"  # the label of the open-streams gauge
    keepalive_s: float | None = None  # send `keepalive` after this much silence
    keepalive: Any = None
    cancel_on_disconnect = False  # a client gone before the end cancels the job

    def opening(self) -> Iterable[Any]:
        return ()

    def chunk(self, data: dict[str, Any], event_id: str) -> Any:
        return None

    def status(self, data: dict[str, Any], event_id: str) -> Any:
        return None

    def done(self, job: dict[str, Any], event_id: str) -> Iterable[Any]:
        raise NotImplementedError

    def error(self, error: ApiError) -> Any:
        raise NotImplementedError


class Relay:
    """One job followed for one client. Built in the request (it reads the app's services there); `frames()`
    may then run after the view returned, as a streamed response's body does."""

    def __init__(self, job: dict[str, Any], protocol: Frames, last_id: str = "0-0") -> None:
        svc = services()
        self.jobs, self.hub = svc.jobs, svc.streams
        self.job_id, self.model_id = job["job_id"], job.get("model_id")
        self.protocol = protocol
        # a client gone cancels the job only if nobody else may be reading it (an Idempotency-Key's duplicates may)
        self.cancels = protocol.cancel_on_disconnect and not keyed()
        self.last_id = last_id  # checked already (resume_from)
        self.gauge = current_app.extensions["aethercore_metrics"].streams.labels(protocol.transport)

    def frames(self, alive: Callable[[], bool] = lambda: True) -> Iterator[Any]:
        protocol, ended = self.protocol, False
        self.gauge.inc()
        try:
            yield from protocol.opening()
            for event in follow_job(
                self.jobs, self.job_id, self.last_id, alive, keepalive_s=protocol.keepalive_s, hub=self.hub
            ):
                if event.kind == "keepalive":
                    frame = protocol.keepalive
                elif event.kind == "chunk":
                    frame = protocol.chunk(event.data, event.id)
                elif event.kind == "status":
                    frame = protocol.status(event.data, event.id)
                else:  # done
                    ended = True
                    yield from protocol.done(event.data, event.id)
                    return
                if frame is not None:
                    yield frame
        except (SubscriptionFailed, redis.RedisError) as exc:
            logger.bind(job_id=self.job_id, model_id=self.model_id).warning("a stream of the job broke: {}", exc)
            yield protocol.error(
                ApiError(
                    503,
                    "stream_unavailable",
                    f"the job's event stream could not be read; GET /jobs/{self.job_id} has its state and result",
                    {"job_id": self.job_id},
                )
            )
        finally:
            self.gauge.dec()
            if not ended and self.cancels:
                self._cancel()

    def _cancel(self) -> None:
        """The client went away before the end: stop the work it asked for."""
        try:
            if self.jobs.lifecycle.request_cancel(self.job_id, "the streaming client disconnected"):
                logger.bind(job_id=self.job_id, model_id=self.model_id).info("stream closed by the client; cancelling")
        except (JobNotFound, redis.RedisError) as exc:  # expired meanwhile, or Redis away: nothing left to stop
            logger.bind(job_id=self.job_id).debug("cancel after disconnect: {}", exc)


@contextmanager
def admitted() -> Iterator[Slot]:
    """This request's slot among the process's long-held requests (429/503 when the caps are reached), taken
    before the view creates anything; given back here if the view fails before a stream takes it over."""
    slot = services().long_requests.take()
    try:
        yield slot
    except BaseException:
        slot.release()
        raise


def sse_response(relay: Relay, slot: Slot) -> Response:
    """The relay as a Server-Sent Events response; the slot is given back when the response is closed (the
    stream ended, or the client went away)."""
    response = Response(stream_with_context(relay.frames()), mimetype="text/event-stream", headers=SSE_HEADERS)
    response.call_on_close(slot.release)
    return response


def relay_to_socket(ws: Any, relay: Relay) -> None:
    """Send every frame of the relay over a WebSocket until the end; a closed socket ends the relay (which
    cancels the job) and raises simple_websocket's ConnectionClosed to the caller."""
    with closing(relay.frames(alive=lambda: ws.connected)) as frames:
        for frame in frames:
            ws.send(frame)
