"""Process verbs: `api`, `worker`, `flower`, `dispatcher`, `batches`, and `up` (Redis if none answers, the demo
models, a worker, the API, the webhook dispatcher, the batch driver and Flower; Ctrl-C stops all of it)."""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import requests
import typer

from cli.common import checked_models, console, err, fail, settings
from cli.supervise import Child, RedisUnavailable, ensure_redis, stop_all
from config.roles import ADMIN
from config.settings import Settings
from config.values import REPO_ROOT, ConfigError


def api() -> None:
    """Run the HTTP API (gunicorn, threaded workers) on AETHERCORE_HOST:AETHERCORE_PORT."""
    from api.server import run_api

    cfg = settings()
    checked_models(cfg)
    run_api(cfg)


def worker(
    device: str = typer.Option("cpu", help="cpu or cuda:N; the worker consumes only this device's queue"),
) -> None:
    """Run one Celery worker pinned to DEVICE, keeping models resident in its memory."""
    from workers.main import run_worker

    try:
        code = run_worker(device, settings())
    except (ValueError, ConfigError) as exc:
        fail(str(exc), 2)
    if code:  # an unrecoverable error: a supervisor (compose, systemd, manage.py up) must see it and restart us
        raise typer.Exit(code)


def dispatcher() -> None:
    """Run the webhook dispatcher: it sends every due completion webhook, with retries (any number may run)."""
    from batches.objects import webhook_body
    from batches.store import DELIVERY_KIND
    from webhooks.dispatcher import run_dispatcher

    run_dispatcher(settings(), bodies={DELIVERY_KIND: webhook_body})


def batches() -> None:
    """Run the batch driver: it moves every unfinished OpenAI batch forward, at a lowered CPU priority
    (AETHERCORE_BATCH_DRIVER_NICE); any number may run."""
    from batches.driver import run_batch_driver

    cfg = settings()
    checked_models(cfg)
    run_batch_driver(cfg)


def flower(port: int | None = typer.Option(None, help="Port (default AETHERCORE_FLOWER_PORT)")) -> None:
    """Run the Flower dashboard against the same broker as the workers."""
    from config.logging import setup_logging
    from tasks.celery_app import make_celery

    cfg = settings()
    setup_logging("flower", cfg.log_level, cfg.log_format)
    basic_auth = cfg.flower_basic_auth
    if cfg.auth and not basic_auth:
        # Flower shows every task and can control workers: never open when the API requires credentials.
        path = cfg.admin_key_file.parent / "flower.auth"
        basic_auth = ensure_secret_file(path, lambda: f"admin:{secrets.token_urlsafe(12)}")
        err.print(f"Flower login (basic auth) is in {path}")
    make_celery(cfg).start(argv=flower_argv(cfg, port, basic_auth))


def flower_argv(cfg: Settings, port: int | None, basic_auth: str) -> list[str]:
    """Flower's command line: on AETHERCORE_FLOWER_HOST (loopback unless told otherwise), behind `basic_auth`."""
    argv = [
        "flower",
        f"--port={port or cfg.flower_port}",
        f"--address={cfg.flower_host}",
        f"--max_tasks={cfg.flower_max_tasks}",
        # kwargs show the model id and job ids of each task (never the inputs: see submission/dispatch.py).
        "--tasks_columns=name,uuid,state,kwargs,received,runtime,worker",
    ]
    if basic_auth:
        argv.append(f"--basic-auth={basic_auth}")
    return argv


def up(
    api_port: int | None = typer.Option(None, help="API port (default AETHERCORE_PORT)"),
    flower_port: int | None = typer.Option(None, help="Flower port (default AETHERCORE_FLOWER_PORT)"),
    device: str = typer.Option("cpu", help="Device of the worker to start"),
    no_flower: bool = typer.Option(False, "--no-flower", help="Do not start Flower"),
) -> None:
    """Bring up everything locally: Redis (if none answers), the demo models, a worker, the API, the webhook
    dispatcher, the batch driver and Flower.

    Ctrl-C stops all of it.
    """
    from config.logging import setup_logging
    from model_store.bootstrap import bootstrap

    cfg = settings()
    setup_logging("up", cfg.log_level, cfg.log_format)
    checked_models(cfg)
    env = dict(os.environ)
    api_port = api_port or cfg.port
    flower_port = flower_port or cfg.flower_port
    env.update(AETHERCORE_PORT=str(api_port), AETHERCORE_FLOWER_PORT=str(flower_port))
    # The recommended shape (docs/ARCHITECTURE.md, docs/CAPACITY.md): one API process per 2 cores and at least
    # two (one process's GIL capped /serve at GPU speed: 1 -> 2 gave 1.6x on 2 cores), one worker, one model
    # process per model; an explicit AETHERCORE_WORKERS wins.
    env.setdefault("AETHERCORE_WORKERS", str(max(2, (os.cpu_count() or 1) // 2)))
    env.setdefault("AETHERCORE_URL", f"http://127.0.0.1:{api_port}")
    env.setdefault("HF_HUB_OFFLINE", "1")

    children: list[Child] = []
    try:
        redis_server = ensure_redis(cfg.redis_url, REPO_ROOT / "var" / "redis", **cfg.redis_ssl())
    except RedisUnavailable as exc:
        fail(str(exc))
    if redis_server is not None:
        console.print(f"[green]started[/green] redis-server for {cfg.redis_url}")
    else:
        console.print(f"using the Redis at {cfg.redis_url}")

    with console.status("building the demo models (first run only)..."):
        bootstrap(cfg.model_store)
    if cfg.auth:
        key_file = ensure_admin_key(cfg)
        env.setdefault("AETHERCORE_API_KEY", key_file.read_text().strip())
        if not cfg.flower_basic_auth:
            env["AETHERCORE_FLOWER_BASIC_AUTH"] = ensure_secret_file(
                cfg.admin_key_file.parent / "flower.auth", lambda: f"admin:{secrets.token_urlsafe(12)}"
            )

    def spawn(name: str, *args: str) -> None:
        children.append(Child(name, env).spawn(*args))  # output on this terminal

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # A shell that starts `up` in the background without job control leaves SIGINT ignored; Ctrl-C (or a
    # supervisor's SIGINT) must still stop everything.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        spawn("worker", "worker", "--device", device)
        spawn("api", "api")
        spawn("dispatcher", "dispatcher")  # completion webhooks (webhooks/dispatcher.py)
        spawn("batches", "batches")  # the OpenAI batches, beside the API, never in it (batches/driver.py)
        base = f"{'https' if cfg.tls else 'http'}://127.0.0.1:{api_port}"
        with console.status("waiting for the API and a worker to report healthy..."):
            healthy = wait_healthy(base, children, timeout_s=180)
        if not no_flower:
            # After the worker is up: Flower's first inspect then finds it (started earlier, its /api/workers
            # stayed {} until someone forced a refresh).
            spawn("flower", "flower", "--port", str(flower_port))
        if healthy:
            console.print(
                f"[green]AetherCore is up[/green]: API {base} (docs {base}/docs, metrics {base}/metrics)"
                + ("" if no_flower else f", Flower http://127.0.0.1:{flower_port}")
                + ". Ctrl-C stops everything."
            )
            if cfg.auth:
                console.print(
                    f"Auth is on. Admin key: {cfg.admin_key_file} (mode 600). Use it with\n"
                    f"  export AETHERCORE_API_KEY=$(cat {cfg.admin_key_file})\n"
                    f'  curl -H "Authorization: Bearer $AETHERCORE_API_KEY" {base}/models\n'
                    f"Flower login: {cfg.admin_key_file.parent / 'flower.auth'}",
                    highlight=False,
                )
        while True:
            for child in children:
                if child.died():
                    err.print(f"[red]{child.label} exited with code {child.proc.returncode}; stopping everything[/red]")
                    raise typer.Exit(1)
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        stop_all(children)
        if redis_server is not None:
            redis_server.stop()
        console.print("stopped.")


def ensure_secret_file(path: Path, make: Any) -> str:
    """Read a secret kept in a file only its owner can read, creating it on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value


def ensure_admin_key(cfg: Settings) -> Path:
    """First run: create an admin key (hashed in Redis, the key itself in a mode-600 file). Later runs:
    make sure the key in the file is still known to Redis (a Redis without persistence forgets it)."""
    from access.keys import KeyStore, split_key
    from tasks.redis_client import make_redis

    store = KeyStore(make_redis(cfg.redis_url, cfg.redis_sentinel_master, **cfg.redis_options()))
    created: list[str] = []

    def make() -> str:
        _key_id, key = store.create(ADMIN, "created by manage.py up")
        created.append(key)
        return key

    key = ensure_secret_file(cfg.admin_key_file, make)
    if not created and store.lookup(key) is None:
        key_id, secret = split_key(key)
        store.register(key_id, secret, ADMIN, "created by manage.py up")
    return cfg.admin_key_file


def wait_healthy(base: str, children: list[Child], timeout_s: float) -> bool:
    import urllib3

    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # the loopback probe below
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in children:
            if child.died():
                fail(f"{child.label} exited with code {child.proc.returncode} during start-up")
        try:
            # Only "is our own child answering on loopback yet": the certificate may name the public host.
            if requests.get(f"{base}/health", timeout=2, verify=False).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    err.print(f"[yellow]not healthy after {timeout_s:.0f} s; still running, see the logs above[/yellow]")
    return False
