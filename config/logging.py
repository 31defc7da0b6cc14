"""One loguru setup for API, workers and CLI; stdlib logging (Celery, Flask, gunicorn) routed into it."""

from __future__ import annotations

import inspect
import json
import logging
import sys
import traceback
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record  # declared in loguru's stubs only

_TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[component]}</cyan> {message}{extra[_context]}"
)


class InterceptHandler(logging.Handler):
    """Send stdlib records to loguru, keeping the caller's location."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = inspect.currentframe(), 0
        while frame and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame = frame.f_back
            depth += 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


def _context_patcher(record: Record) -> None:
    extra = record["extra"]
    extra.setdefault("component", "aethercore")
    context = {k: v for k, v in extra.items() if k not in {"component", "_context", "_json"} and v is not None}
    extra["_context"] = "".join(f" {k}={v}" for k, v in context.items())


def _json_format(record: Record) -> str:
    """One compact JSON object per line: time, level, component, message, then the bound context."""
    payload = {
        "time": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "component": record["extra"].get("component"),
        "message": record["message"],
    }
    payload.update({k: v for k, v in record["extra"].items() if k not in {"component", "_context", "_json"}})
    if record["exception"] is not None:
        exc = record["exception"]
        payload["exception"] = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
    record["extra"]["_json"] = json.dumps(payload, default=str)
    return "{extra[_json]}\n"


def setup_logging(component: str, level: str = "INFO", fmt: str = "text") -> None:
    """Idempotent; call once per process before anything logs."""
    logger.remove()
    logger.configure(extra={"component": component}, patcher=_context_patcher)
    if fmt == "json":
        logger.add(sys.stderr, level=level, format=_json_format, backtrace=False, diagnose=False)
    else:
        logger.add(sys.stderr, level=level, format=_TEXT_FORMAT, backtrace=False, diagnose=False, colorize=None)
    # Filter in stdlib too: a record below the level is then never built (Celery and kombu log at DEBUG on
    # every message; building and routing those records cost the worker measurable CPU per job).
    std_level = logging.getLevelName(level) if level not in {"TRACE"} else logging.DEBUG
    logging.basicConfig(handlers=[InterceptHandler()], level=std_level if isinstance(std_level, int) else 0, force=True)
    logging.captureWarnings(True)  # Python warnings become log lines too (JSON when JSON is on)
    for name in (
        "celery",
        "kombu",
        "werkzeug",
        "gunicorn",
        "gunicorn.error",
        "gunicorn.access",
        "flask",
        "tornado",
        "py.warnings",
    ):
        lib_logger = logging.getLogger(name)
        lib_logger.handlers = [InterceptHandler()]
        lib_logger.propagate = False
    # Chatty libraries stay at WARNING unless the whole process is at DEBUG. Celery's own per-task lines
    # ("Task ... received", "... succeeded in") repeat what the job's own line says with its job id, model
    # and request id, and cost the worker CPU on every message.
    if level not in {"DEBUG", "TRACE"}:
        for name in (
            "urllib3",
            "filelock",
            "httpx",
            "huggingface_hub",
            "transformers",
            "torch",
            "celery.app.trace",
            "celery.worker.strategy",
        ):
            logging.getLogger(name).setLevel(logging.WARNING)
