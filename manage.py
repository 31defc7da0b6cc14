#!/usr/bin/env python3
"""AetherCore admin CLI: run the processes, manage models, serve requests, check the system.

Process verbs (up, api, worker, flower) run here; admin verbs talk to the API over HTTP
(AETHERCORE_URL), so they work the same against a local or a remote deployment.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import requests
import typer
from rich.console import Console
from rich.table import Table

from config.settings import REPO_ROOT, ConfigError, Settings
from config.units import format_size

app = typer.Typer(help="AetherCore model serving: processes, models, inference and health.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Configured models: build the demo models, list, load, unload, inspect.",
                         no_args_is_help=True)
system_app = typer.Typer(help="System status, health and services.", no_args_is_help=True)
jobs_app = typer.Typer(help="Submitted jobs: list, show, cancel.", no_args_is_help=True)
auth_app = typer.Typer(help="API keys and tokens (talks to Redis directly: run it where Redis is reachable).",
                       no_args_is_help=True)
app.add_typer(auth_app, name="auth")
app.add_typer(models_app, name="models")
app.add_typer(system_app, name="system")
app.add_typer(jobs_app, name="jobs")

console = Console()
err = Console(stderr=True, soft_wrap=True, highlight=False)


def settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None


def checked_models(cfg: Settings) -> None:
    """Validate models.yaml before starting a process that serves it: a clean one-line error, not a traceback."""
    from config.models import load_models

    try:
        load_models(cfg.models_file)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", 2)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


# --------------------------------------------------------------------------------------------
# HTTP client for admin verbs
# --------------------------------------------------------------------------------------------
def api_key(cfg: Settings) -> str | None:
    """AETHERCORE_API_KEY, else the admin key `manage.py up` keeps on this machine (if readable)."""
    key = os.environ.get("AETHERCORE_API_KEY", "").strip()
    if key:
        return key
    try:
        return cfg.admin_key_file.read_text().strip() or None
    except OSError:
        return None


class ApiClient:
    def __init__(self, base_url: str, key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 202), timeout: float = 75,
                **kwargs: Any) -> tuple[int, Any]:
        url = f"{self.base_url}{path}"
        try:
            response = requests.request(method, url, timeout=timeout, headers=self.headers, **kwargs)
        except requests.ConnectionError:
            fail(f"the API is not reachable at {self.base_url} (tried {method} {url}); start it with "
                 "`python manage.py up` or set AETHERCORE_URL")
        except requests.Timeout:
            fail(f"the API at {self.base_url} did not answer {method} {path} within {timeout:.0f} s")
        try:
            body = response.json()
        except ValueError:
            fail(f"{method} {url} answered {response.status_code} with a non-JSON body")
        if response.status_code == 401:
            fail(f"{method} {path} -> 401: {body.get('error', {}).get('message', '')}; set AETHERCORE_API_KEY "
                 "(`python manage.py up` writes an admin key to AETHERCORE_ADMIN_KEY_FILE)")
        if response.status_code not in ok:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            fail(f"{method} {path} -> {response.status_code} {error.get('code', '')}: "
                 f"{error.get('message', body)}")
        return response.status_code, body


def client() -> ApiClient:
    cfg = settings()
    return ApiClient(cfg.url, api_key(cfg))


def print_json(data: Any) -> None:
    console.print_json(json.dumps(data))


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------
@app.command()
def api() -> None:
    """Run the HTTP API (gunicorn, threaded workers) on AETHERCORE_HOST:AETHERCORE_PORT."""
    from api.server import run_api

    cfg = settings()
    checked_models(cfg)
    run_api(cfg)


@app.command()
def worker(device: str = typer.Option("cpu", help="cpu or cuda:N; the worker consumes only this device's queue")) -> None:
    """Run one Celery worker pinned to DEVICE, keeping models resident in its memory."""
    from workers.main import run_worker

    try:
        run_worker(device, settings())
    except (ValueError, ConfigError) as exc:
        fail(str(exc), 2)


@app.command()
def flower(port: Optional[int] = typer.Option(None, help="Port (default AETHERCORE_FLOWER_PORT)")) -> None:
    """Run the Flower dashboard against the same broker as the workers."""
    from config.logging import setup_logging
    from tasks.celery_app import make_celery

    cfg = settings()
    setup_logging("flower", cfg.log_level, cfg.log_format)
    basic_auth = cfg.flower_basic_auth
    if cfg.auth and not basic_auth:
        # Flower shows every task and can control workers: never open when the API requires credentials.
        path = cfg.admin_key_file.parent / "flower.auth"
        basic_auth = _ensure_secret_file(path, lambda: f"admin:{secrets.token_urlsafe(12)}")
        err.print(f"Flower login (basic auth) is in {path}")
    argv = ["flower", f"--port={port or cfg.flower_port}", "--address=0.0.0.0", f"--max_tasks={cfg.flower_max_tasks}",
            # kwargs show the model id and job ids of each task (never the inputs: see api/dispatch.py).
            "--tasks_columns=name,uuid,state,kwargs,received,runtime,worker"]
    if basic_auth:
        argv.append(f"--basic-auth={basic_auth}")
    make_celery(cfg).start(argv=argv)


@app.command()
def up(
    api_port: Optional[int] = typer.Option(None, help="API port (default AETHERCORE_PORT)"),
    flower_port: Optional[int] = typer.Option(None, help="Flower port (default AETHERCORE_FLOWER_PORT)"),
    device: str = typer.Option("cpu", help="Device of the worker to start"),
    no_flower: bool = typer.Option(False, "--no-flower", help="Do not start Flower"),
) -> None:
    """Bring up everything locally: Redis (if none answers), the demo models, a worker, the API and Flower.

    Ctrl-C stops all of it.
    """
    from config.logging import setup_logging
    from model_store.bootstrap import bootstrap
    from tasks.local_redis import RedisUnavailable, ensure_redis

    cfg = settings()
    setup_logging("up", cfg.log_level, cfg.log_format)
    checked_models(cfg)
    env = dict(os.environ)
    api_port = api_port or cfg.port
    flower_port = flower_port or cfg.flower_port
    env.update(AETHERCORE_PORT=str(api_port), AETHERCORE_FLOWER_PORT=str(flower_port))
    # The recommended shape (docs/ARCHITECTURE.md): one API process per 4 cores, one worker, one model
    # process per model; an explicit AETHERCORE_WORKERS wins.
    env.setdefault("AETHERCORE_WORKERS", str(max(1, (os.cpu_count() or 1) // 4)))
    env.setdefault("AETHERCORE_URL", f"http://127.0.0.1:{api_port}")
    env.setdefault("HF_HUB_OFFLINE", "1")

    children: list[tuple[str, subprocess.Popen]] = []
    try:
        redis_proc = ensure_redis(cfg.redis_url, REPO_ROOT / "var" / "redis", **cfg.redis_ssl())
    except RedisUnavailable as exc:
        fail(str(exc))
    if redis_proc is not None:
        children.append(("redis", redis_proc))
        console.print(f"[green]started[/green] redis-server for {cfg.redis_url}")
    else:
        console.print(f"using the Redis at {cfg.redis_url}")

    with console.status("building the demo models (first run only)..."):
        bootstrap(cfg.model_store)
    if cfg.auth:
        key_file = _ensure_admin_key(cfg)
        env.setdefault("AETHERCORE_API_KEY", key_file.read_text().strip())
        if not cfg.flower_basic_auth:
            env["AETHERCORE_FLOWER_BASIC_AUTH"] = _ensure_secret_file(cfg.admin_key_file.parent / "flower.auth",
                                                                      lambda: f"admin:{secrets.token_urlsafe(12)}")

    def spawn(name: str, *args: str) -> None:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "manage.py"), *args], env=env, cwd=REPO_ROOT,
                                start_new_session=True)
        children.append((name, proc))

    def stop_all(*_: Any) -> None:
        for _name, proc in reversed(children):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for _name, proc in reversed(children):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # A shell that starts `up` in the background without job control leaves SIGINT ignored; Ctrl-C (or a
    # supervisor's SIGINT) must still stop everything.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        spawn("worker", "worker", "--device", device)
        spawn("api", "api")
        if not no_flower:
            spawn("flower", "flower", "--port", str(flower_port))
        base = f"{'https' if cfg.tls else 'http'}://127.0.0.1:{api_port}"
        with console.status("waiting for the API and a worker to report healthy..."):
            healthy = _wait_healthy(base, children, timeout_s=180)
        if healthy:
            console.print(f"[green]AetherCore is up[/green]: API {base} (docs {base}/docs, metrics {base}/metrics)"
                          + ("" if no_flower else f", Flower http://127.0.0.1:{flower_port}")
                          + ". Ctrl-C stops everything.")
            if cfg.auth:
                console.print(f"Auth is on. Admin key: {cfg.admin_key_file} (mode 600). Use it with\n"
                              f"  export AETHERCORE_API_KEY=$(cat {cfg.admin_key_file})\n"
                              f'  curl -H "Authorization: Bearer $AETHERCORE_API_KEY" {base}/models\n'
                              f"Flower login: {cfg.admin_key_file.parent / 'flower.auth'}", highlight=False)
        while True:
            for name, proc in children:
                if proc.poll() is not None:
                    err.print(f"[red]{name} exited with code {proc.returncode}; stopping everything[/red]")
                    raise typer.Exit(1)
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        stop_all()
        console.print("stopped.")


def _ensure_secret_file(path: Path, make: Any) -> str:
    """Read a secret kept in a file only its owner can read, creating it on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value


def _ensure_admin_key(cfg: Settings) -> Path:
    """First run: create an admin key (hashed in Redis, the key itself in a mode-600 file). Later runs:
    make sure the key in the file is still known to Redis (a Redis without persistence forgets it)."""
    from api.auth import KeyStore, split_key
    from tasks.redis_client import make_redis

    store = KeyStore(make_redis(cfg.redis_url, cfg.redis_sentinel_master, **cfg.redis_ssl()))
    created: list[str] = []

    def make() -> str:
        _key_id, key = store.create("admin", "created by manage.py up")
        created.append(key)
        return key

    key = _ensure_secret_file(cfg.admin_key_file, make)
    if not created and store.lookup(key) is None:
        key_id, secret = split_key(key)
        store.register(key_id, secret, "admin", "created by manage.py up")
    return cfg.admin_key_file


def _wait_healthy(base: str, children: list, timeout_s: float) -> bool:
    import urllib3

    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # the loopback probe below
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, proc in children:
            if proc.poll() is not None:
                fail(f"{name} exited with code {proc.returncode} during start-up")
        try:
            # Only "is our own child answering on loopback yet": the certificate may name the public host.
            if requests.get(f"{base}/health", timeout=2, verify=False).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    err.print(f"[yellow]not healthy after {timeout_s:.0f} s; still running, see the logs above[/yellow]")
    return False


@app.command("config")
def config_show(fmt: str = typer.Option("table", "--format", help="table (effective values), env "
                                        "(.env.example) or markdown (README's table)")) -> None:
    """Every AETHERCORE_* setting: its effective value, or the documentation formats."""
    from config.settings import SETTINGS

    if fmt == "env":
        print("# Every AetherCore setting with its default. Copy to .env and edit; docker compose reads .env.")
        for spec in SETTINGS:
            print(f"# {spec.doc}\n{spec.env}={spec.default}")
    elif fmt == "markdown":
        print("| variable | default | meaning |\n| --- | --- | --- |")
        for spec in SETTINGS:
            print(f"| `{spec.env}` | `{spec.default}` | {spec.doc} |")
    else:
        cfg = settings()
        table = Table("variable", "value", "default")
        for spec in SETTINGS:
            value = getattr(cfg, spec.name)
            table.add_row(spec.env, str(value), spec.default)
        console.print(table)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
@models_app.command("bootstrap")
def models_bootstrap(
    force: bool = typer.Option(False, help="Rebuild even if present"),
    only: Optional[list[str]] = typer.Argument(None, help="Build only these demo models"),
) -> None:
    """Build the demo models into the model store, offline and idempotently."""
    from model_store.bootstrap import BUILDERS, bootstrap

    cfg = settings()
    unknown = set(only or []) - set(BUILDERS)
    if unknown:
        fail(f"unknown demo model(s) {sorted(unknown)}; known: {', '.join(BUILDERS)}", 2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with console.status("building demo models...") as status:
        outcome = bootstrap(cfg.model_store, only, force,
                            progress=lambda name, state: status.update(f"{name}: {state}..."))
    table = Table("model", "state", "path")
    for name, state in outcome.items():
        table.add_row(name, state, str(cfg.model_store / name))
    console.print(table)


@models_app.command("manifest")
def models_manifest(directory: Path = typer.Argument(..., help="A model's directory")) -> None:
    """Write the directory's aethercore-manifest.json (sha256 of every file); declare `manifest: true`."""
    from model_store.verify import write_manifest

    if not directory.is_dir():
        fail(f"{directory} is not a directory", 2)
    path = write_manifest(directory)
    console.print(f"wrote {path}; declare `manifest: true` for the model in models.yaml")


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="Print JSON")) -> None:
    """Every configured model with its state."""
    _, body = client().request("GET", "/models")
    if as_json:
        return print_json(body)
    table = Table("model", "type", "task", "state", "device", "replicas")
    for m in body["models"]:
        table.add_row(m["model_id"], m["model_type"], m["task"], m["state"], m["device"] or m["configured_device"],
                      str(len(m["replicas"])))
    console.print(table)


def _job(kind: str, model_id: str, wait: float, as_json: bool) -> None:
    with console.status(f"{kind} {model_id}..."):
        _, job = client().request("POST", f"/models/{model_id}/{kind}", params={"wait": wait})
    if as_json:
        return print_json(job)
    if job["status"] == "failed":
        fail(f"{kind} {model_id} failed: {job['error']['message']}")
    state = job["status"] if job["status"] != "succeeded" else job["result"]["state"]
    console.print(f"{model_id}: [green]{state}[/green] (job {job['job_id']})")


@models_app.command("load")
def models_load(model_id: str, wait: float = typer.Option(60, help="Seconds to wait for the job"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Load a model on every worker of its device."""
    _job("load", model_id, wait, as_json)


@models_app.command("unload")
def models_unload(model_id: str, wait: float = typer.Option(60, help="Seconds to wait for the job"),
                  as_json: bool = typer.Option(False, "--json")) -> None:
    """Unload a model from every worker and free its memory."""
    _job("unload", model_id, wait, as_json)


@models_app.command("status")
def models_status(model_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """State of a model and its replicas."""
    _, body = client().request("GET", f"/models/{model_id}/status")
    if as_json:
        return print_json(body)
    console.print(f"{model_id}: [bold]{body['state']}[/bold]" + (f" on {body['device']}" if body["device"] else ""))
    if body.get("error"):
        console.print(f"last error: {body['error']['message']}")
    table = Table("worker", "device", "state", "memory", "loaded at")
    for r in body["replicas"]:
        loaded = time.strftime("%H:%M:%S", time.localtime(r["loaded_at"])) if r.get("loaded_at") else "-"
        table.add_row(r["worker"], r["device"], r["state"], format_size(r.get("memory_bytes", 0)), loaded)
    console.print(table)


@models_app.command("info")
def models_info(model_id: str) -> None:
    """Configuration of a model plus what the loaded model reports."""
    _, body = client().request("GET", f"/models/{model_id}/info")
    print_json(body)


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------
@app.command()
def serve(model_id: str, text: Optional[str] = typer.Option(None, help="Input text"),
          inputs: Optional[str] = typer.Option(None, help="Inputs as JSON (for tensor models)"),
          max_length: Optional[int] = typer.Option(None, help="Truncation length or new-token budget"),
          wait: float = typer.Option(60, help="Seconds to wait for the result"),
          stream: bool = typer.Option(False, "--stream", help="Print chunks as they are generated"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Run one inference request and print its result."""
    if (text is None) == (inputs is None):
        fail("give exactly one of --text or --inputs", 2)
    try:
        parsed_inputs = {"text": text} if text is not None else json.loads(inputs or "{}")
    except ValueError:
        fail("--inputs is not valid JSON", 2)
    payload: dict[str, Any] = {"model_id": model_id, "inputs": parsed_inputs, "parameters": {}}
    if max_length is not None:
        payload["parameters"]["max_length"] = max_length
    if stream:
        return _serve_stream(payload)
    with console.status(f"serving {model_id}..."):
        status, job = client().request("POST", "/serve", params={"wait": wait}, json=payload)
    if as_json:
        return print_json(job)
    if job["status"] == "failed":
        fail(f"{job['error']['code']}: {job['error']['message']}")
    if status == 202:
        console.print(f"job {job['job_id']} is still {job['status']}; poll GET /jobs/{job['job_id']}")
        return
    result = job["result"]
    output = dict(result["output"])
    if "embedding" in output:
        vector = output["embedding"]
        output["embedding"] = f"[{', '.join(f'{v:.4f}' for v in vector[:6])}, ...] ({len(vector)} floats)"
    console.print(f"[bold]{model_id}[/bold] on {result['worker']} ({result['device']}), "
                  f"queue {result['timings']['queue_ms']} ms, inference {result['timings']['inference_ms']} ms")
    print_json(output)


def _serve_stream(payload: dict[str, Any]) -> None:
    """Submit, then follow the job's Server-Sent Events, printing each chunk as it arrives."""
    api = client()
    _, job = api.request("POST", "/serve", json=payload)
    url = f"{api.base_url}/jobs/{job['job_id']}/stream"
    event = None
    try:
        with requests.get(url, stream=True, timeout=(5, 120), headers=api.headers) as response:
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "chunk":
                        piece = data.get("text")
                        console.print(piece if piece is not None else json.dumps(data.get("output", data)),
                                      end="", soft_wrap=True, highlight=False, markup=False)
                    elif event == "error":
                        console.print()
                        fail(f"{data['error']['code']}: {data['error']['message']}")
                    elif event == "done":
                        console.print()
                        finished = data["job"]
                        if finished["status"] != "succeeded":
                            fail(f"job ended {finished['status']}")
                        return
    except requests.RequestException as exc:
        fail(f"the stream {url} broke off: {type(exc).__name__}")


# --------------------------------------------------------------------------------------------
# System
# --------------------------------------------------------------------------------------------
@system_app.command("health")
def system_health(as_json: bool = typer.Option(False, "--json")) -> None:
    """The API's health checks; exits 1 when degraded."""
    status, body = client().request("GET", "/health", ok=(200, 503))
    if as_json:
        print_json(body)
    else:
        table = Table("check", "status", "detail")
        for name, check in body["checks"].items():
            detail = ", ".join(f"{k}={v}" for k, v in check.items() if k != "status")
            table.add_row(name, check["status"], detail)
        console.print(f"overall: [bold]{body['status']}[/bold]")
        console.print(table)
    if status != 200:
        raise typer.Exit(1)


@system_app.command("status")
def system_status(as_json: bool = typer.Option(False, "--json")) -> None:
    """API health, workers per device (heartbeat age, resident models, memory), queues, models, Flower."""
    api = client()
    _, health = api.request("GET", "/health", ok=(200, 503))
    _, workers = api.request("GET", "/workers")
    _, models = api.request("GET", "/models")
    flower_url = f"http://127.0.0.1:{settings().flower_port}"
    flower = _probe(f"{flower_url}/healthcheck")
    if as_json:
        return print_json({"api": api.base_url, "health": health, "workers": workers["workers"],
                           "models": models["models"], "flower": {"url": flower_url, "status": flower}})
    checks = health["checks"]
    console.print(f"API {api.base_url}: [bold]{health['status']}[/bold]   Redis: {checks['redis']['status']}   "
                  f"Flower {flower_url}: {flower}")
    depth = checks.get("queues", {}).get("depth", {})
    console.print("queues: " + (", ".join(f"{q}={n}" for q, n in depth.items()) or "-"))
    table = Table("worker", "device", "heartbeat age", "resident models", "model memory", "process memory")
    for w in workers["workers"]:
        resident = [f"{mid} ({format_size(info.get('memory_bytes', 0))})" for mid, info in w["models"].items()
                    if info.get("state") == "loaded"]
        table.add_row(w["name"], w["device"], f"{w['heartbeat_age_s']:.1f} s", ", ".join(resident) or "-",
                      format_size(w["memory"].get("cache_used_bytes", 0)),
                      format_size(w["memory"].get("rss_bytes", 0)))
    console.print(table)
    table = Table("model", "state", "device", "replicas")
    for m in models["models"]:
        table.add_row(m["model_id"], m["state"], m["device"] or "-", str(len(m["replicas"])))
    console.print(table)


def _probe(url: str) -> str:
    try:
        code = requests.get(url, timeout=2).status_code
    except requests.RequestException as exc:
        return f"down ({type(exc).__name__})"
    return "up" if code < 500 or code == 503 else f"down (HTTP {code})"


@system_app.command("services")
def system_services(as_json: bool = typer.Option(False, "--json")) -> None:
    """Each service with its address and whether it answers."""
    from tasks.redis_client import make_redis

    cfg = settings()
    rows = []

    def probe_http(name: str, url: str) -> None:
        state = _probe(url)
        rows.append({"service": name, "address": url, "status": state.split(" ")[0], "detail": state})

    probe_http("api", f"{cfg.url.rstrip('/')}/heartbeat")
    try:
        make_redis(cfg.redis_url, cfg.redis_sentinel_master, **cfg.redis_ssl()).ping()
        rows.append({"service": "redis", "address": cfg.redis_url, "status": "up", "detail": "PONG"})
    except Exception as exc:
        rows.append({"service": "redis", "address": cfg.redis_url, "status": "down", "detail": type(exc).__name__})
    probe_http("flower", f"http://127.0.0.1:{cfg.flower_port}/healthcheck")
    if as_json:
        return print_json(rows)
    table = Table("service", "address", "status", "detail")
    for row in rows:
        table.add_row(row["service"], row["address"], row["status"], row["detail"])
    console.print(table)


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------
@jobs_app.command("list")
def jobs_list(limit: int = typer.Option(20, help="How many (newest first)"),
              status: Optional[str] = typer.Option(None, help="Only this status"),
              model_id: Optional[str] = typer.Option(None, "--model", help="Only this model"),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Recent jobs, newest first."""
    params = {k: v for k, v in {"limit": limit, "status": status, "model_id": model_id}.items() if v is not None}
    _, body = client().request("GET", "/jobs", params=params)
    if as_json:
        return print_json(body)
    table = Table("job", "kind", "model", "status", "created", "worker", "error")
    for job in body["jobs"]:
        table.add_row(job["job_id"], job["kind"], job["model_id"], job["status"], job["created_at"] or "-",
                      job["worker"] or "-", (job.get("error") or {}).get("code", ""))
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One job with its result or error."""
    _, job = client().request("GET", f"/jobs/{job_id}")
    print_json(job)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Cancel a queued job (it never runs) or stop a running stream."""
    status, job = client().request("DELETE", f"/jobs/{job_id}")
    if as_json:
        return print_json(job)
    console.print(f"{job_id}: {'cancelled' if status == 200 else 'asked to stop'} (status {job['status']})")


# --------------------------------------------------------------------------------------------
# Auth
# --------------------------------------------------------------------------------------------
def _key_store():
    from api.auth import KeyStore
    from tasks.redis_client import make_redis

    cfg = settings()
    try:
        client_ = make_redis(cfg.redis_url, cfg.redis_sentinel_master, **cfg.redis_ssl())
        client_.ping()
    except Exception:
        fail(f"Redis is not reachable at {cfg.redis_url} (AETHERCORE_REDIS_URL)")
    return KeyStore(client_)


@auth_app.command("create-key")
def auth_create_key(role: str = typer.Option(..., help="admin, operator, user or viewer"),
                    name: str = typer.Option("", help="A note on who or what uses it")) -> None:
    """Create an API key; it is printed once and stored only hashed."""
    try:
        key_id, key = _key_store().create(role, name)
    except ValueError as exc:
        fail(str(exc), 2)
    err.print(f"created key {key_id} with role {role}; it is shown once, keep it safe:")
    print(key)


@auth_app.command("revoke")
def auth_revoke(key_id: str) -> None:
    """Revoke a key by its id (API processes stop accepting it within 5 s)."""
    if not _key_store().revoke(key_id):
        fail(f"no key with id {key_id!r}")
    console.print(f"revoked {key_id}")


@auth_app.command("list")
def auth_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Keys stored in Redis (ids and roles, never the keys)."""
    keys = _key_store().list()
    if as_json:
        return print_json(keys)
    table = Table("key id", "role", "name", "created")
    for k in keys:
        table.add_row(k["key_id"], k["role"], k["name"], time.strftime("%Y-%m-%d %H:%M", time.localtime(k["created_at"])))
    console.print(table)


@auth_app.command("token")
def auth_token(role: str = typer.Option(..., help="admin, operator, user or viewer"),
               ttl: int = typer.Option(3600, help="Seconds until it expires"),
               sub: str = typer.Option("cli", help="The subject (who the token is for)")) -> None:
    """Issue a JWT signed with AETHERCORE_JWT_SECRET."""
    from api.auth import issue_token

    try:
        print(issue_token(settings().jwt_secret, sub, role, ttl))
    except ValueError as exc:
        fail(str(exc), 2)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    app()
