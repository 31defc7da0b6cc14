"""`context`: the deployment this CLI is pointed at — what it is, whether its dependencies answer, and named smoke
tests an operator runs after a deploy. (The seed names a "ContextForge" it never defines; this is its useful
meaning here.)

    manage.py context info              settings in effect (secrets masked), models file, Redis/broker, workers
    manage.py context health            every dependency with its latency; exit 1 if one is down
    manage.py context test NAME|all     embeddings, generation, stream, load-unload, auth; exit 1 on a failure
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import typer
from rich.table import Table

from cli.common import ApiClient, api_key, console, print_json, probe, settings
from config.settings import SECRET_SETTINGS, SETTINGS, Settings
from tasks.states import LOADED, SUCCEEDED

group = typer.Typer(help="The deployment: context info, dependency health, named smoke tests.", no_args_is_help=True)


def masked(name: str, value: Any) -> str:
    """A setting as it may be shown: secrets as `***` (or unset), passwords in URLs replaced."""
    if value in (None, "", [], {}):
        return "" if name not in SECRET_SETTINGS else "(unset)"
    if name in SECRET_SETTINGS:
        return "***"
    text = str(value)
    if "://" in text:
        parts = urlsplit(text)
        if parts.password:
            netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            return urlunsplit(parts._replace(netloc=netloc))
    return text


def _get(cfg: Settings, path: str, timeout: float = 5) -> tuple[int | None, Any, float]:
    """GET an API path with this CLI's key: (status or None if unreachable, JSON body or None, ms)."""
    key = api_key(cfg)
    began = time.perf_counter()
    try:
        response = requests.get(
            f"{cfg.url.rstrip('/')}{path}", timeout=timeout, headers={"Authorization": f"Bearer {key}"} if key else {}
        )
    except requests.RequestException:
        return None, None, (time.perf_counter() - began) * 1000
    elapsed = (time.perf_counter() - began) * 1000
    try:
        return response.status_code, response.json(), elapsed
    except ValueError:
        return response.status_code, None, elapsed


@group.command("info")
def context_info(as_json: bool = typer.Option(False, "--json")) -> None:
    """The deployment context: settings in effect (secrets masked), models file, Redis and broker, workers."""
    cfg = settings()
    values = {spec.env: masked(spec.name, getattr(cfg, spec.name)) for spec in SETTINGS}
    status, body, _ms = _get(cfg, "/workers")
    workers: dict[str, list[str]] = {}
    if status == 200:
        for record in body["workers"]:
            workers.setdefault(record["device"], []).append(record["name"])
    info = {
        "api": cfg.url,
        "api_reachable": status is not None,
        "models_file": str(cfg.models_file),
        "redis": masked("redis_url", cfg.redis_url),
        "broker": masked("broker_url", cfg.effective_broker_url),
        "workers_by_device": workers,
        "settings": values,
    }
    if as_json:
        return print_json(info)
    console.print(
        f"API {cfg.url} ({'reachable' if status is not None else 'not reachable'}), models file "
        f"{cfg.models_file}\nRedis {info['redis']}, broker {info['broker']}",
        highlight=False,
    )
    console.print(
        "workers: "
        + (
            ", ".join(f"{device}: {len(names)}" for device, names in workers.items())
            or ("none live" if status == 200 else "unknown (the API did not answer)")
        )
    )
    table = Table("setting", "value in effect")
    for env, value in values.items():
        table.add_row(env, value)
    console.print(table)


@group.command("health")
def context_health(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every dependency with its latency: API, Redis, broker, workers, Flower. Exits 1 if one is down."""
    from tasks.redis_client import make_redis

    cfg = settings()
    rows: list[dict[str, Any]] = []

    def add(name: str, address: str, ok: bool, latency_ms: float | None, detail: str) -> None:
        rows.append(
            {
                "dependency": name,
                "address": address,
                "status": "up" if ok else "down",
                "latency_ms": None if latency_ms is None else round(latency_ms, 1),
                "detail": detail,
            }
        )

    state, ms = probe(f"{cfg.url.rstrip('/')}/heartbeat")
    add("api", cfg.url, state == "up", ms, state)
    for name, url in (("redis", cfg.redis_url), ("broker", cfg.effective_broker_url)):
        if name == "broker" and url == cfg.redis_url:
            continue
        began = time.perf_counter()
        try:
            make_redis(url, cfg.redis_sentinel_master, **cfg.redis_ssl(url)).ping()
            add(name, masked("redis_url", url), True, (time.perf_counter() - began) * 1000, "PONG")
        except Exception as exc:
            add(name, masked("redis_url", url), False, None, type(exc).__name__)
    status, body, ms = _get(cfg, "/health")
    if body and "checks" in body:
        check = body["checks"].get("workers", {})
        add(
            "workers",
            "via the API",
            check.get("status") == "ok" and check.get("live", 0) > 0,
            ms,
            f"{check.get('live', 0)} live, " + ", ".join(f"{d}={n}" for d, n in check.get("by_device", {}).items()),
        )
    else:
        add("workers", "via the API", False, None, "the API did not report them")
    state, ms = probe(f"http://127.0.0.1:{cfg.flower_port}/healthcheck")
    add("flower", f"http://127.0.0.1:{cfg.flower_port}", state == "up", ms, state)
    if as_json:
        print_json(rows)
    else:
        table = Table("dependency", "address", "status", "latency", "detail")
        for row in rows:
            latency = "-" if row["latency_ms"] is None else f"{row['latency_ms']} ms"
            table.add_row(row["dependency"], row["address"], row["status"], latency, row["detail"])
        console.print(table)
    if any(row["status"] != "up" for row in rows):
        raise typer.Exit(1)


# -- smoke tests ---------------------------------------------------------------------------------
class SmokeFailure(Exception):
    pass


@dataclass
class Smoke:
    api: ApiClient
    cfg: Settings
    embedding_model: str
    generation_model: str

    def post(self, path: str, body: dict[str, Any] | None = None, **params: Any) -> tuple[int, Any]:
        response = requests.post(
            f"{self.api.base_url}{path}", json=body, params=params, headers=self.api.headers, timeout=120
        )
        return response.status_code, response.json()

    def embeddings(self) -> str:
        status, job = self.post("/serve", {"model_id": self.embedding_model, "inputs": {"text": "smoke test"}}, wait=60)
        _expect(status == 200 and job["status"] == SUCCEEDED, f"POST /serve -> {status} {job.get('status')}")
        vector = job["result"]["output"].get("embedding")
        _expect(
            isinstance(vector, list) and len(vector) > 0 and all(isinstance(v, float) for v in vector),
            "the result holds no embedding",
        )
        return f"{len(vector)} floats from {job['result']['worker']}"

    def generation(self) -> str:
        status, job = self.post(
            "/serve",
            {
                "model_id": self.generation_model,
                "inputs": {"text": "Once upon a time"},
                "parameters": {"max_length": 8},
            },
            wait=60,
        )
        _expect(status == 200 and job["status"] == SUCCEEDED, f"POST /serve -> {status} {job.get('status')}")
        output = job["result"]["output"]
        _expect(output.get("tokens", 0) > 0 and isinstance(output.get("text"), str), "no generated text")
        return f"{output['tokens']} tokens"

    def stream(self) -> str:
        status, job = self.post(
            "/serve",
            {
                "model_id": self.generation_model,
                "inputs": {"text": "Once upon a time"},
                "parameters": {"max_length": 8},
            },
        )
        _expect(status == 202, f"POST /serve -> {status}")
        chunks, event, finished = 0, None, None
        with requests.get(
            f"{self.api.base_url}/jobs/{job['job_id']}/stream", stream=True, timeout=(5, 120), headers=self.api.headers
        ) as response:
            _expect(response.status_code == 200, f"GET /jobs/{{id}}/stream -> {response.status_code}")
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "chunk":
                    chunks += 1
                elif line.startswith("data: ") and event == "done":
                    finished = json.loads(line[6:])["job"]
                    break
        _expect(finished is not None and finished["status"] == SUCCEEDED, "the stream did not end with `done`")
        _expect(chunks > 0, "no chunk was streamed")
        return f"{chunks} chunks, then done"

    def load_unload(self) -> str:
        model = self.embedding_model
        response = requests.get(f"{self.api.base_url}/models/{model}/status", headers=self.api.headers, timeout=30)
        was_loaded = response.ok and response.json().get("state") == LOADED
        status, job = self.post(f"/models/{model}/unload", wait=60)
        _expect(status == 200 and job["status"] == SUCCEEDED, f"unload -> {status} {job.get('status')}")
        status, job = self.post(f"/models/{model}/load", wait=120)
        _expect(status == 200 and job["status"] == SUCCEEDED, f"load -> {status} {job.get('status')}")
        _expect(job["result"]["state"] == LOADED, f"state after load: {job['result']['state']}")
        self.embeddings()
        if not was_loaded:  # leave the deployment as we found it
            self.post(f"/models/{model}/unload", wait=60)
        return f"{model} unloaded, loaded ({job['result']['load_ms']:.0f} ms) and served"

    def auth(self) -> str:
        anonymous = requests.get(f"{self.api.base_url}/models", timeout=10)
        if not self.cfg.auth:
            return "skipped checks: auth is off in this CLI's settings (AETHERCORE_AUTH=false)"
        _expect(anonymous.status_code == 401, f"an anonymous GET /models -> {anonymous.status_code}, not 401")
        wrong = requests.get(
            f"{self.api.base_url}/models", timeout=10, headers={"Authorization": "Bearer not-a-key.0123456789abcdef"}
        )
        _expect(wrong.status_code == 401, f"a wrong key -> {wrong.status_code}, not 401")
        right = requests.get(f"{self.api.base_url}/models", timeout=10, headers=self.api.headers)
        _expect(right.status_code == 200, f"this CLI's key -> {right.status_code}, not 200")
        return "anonymous and wrong key refused (401), this CLI's key accepted"


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


TESTS: dict[str, Callable[[Smoke], str]] = {
    "embeddings": Smoke.embeddings,
    "generation": Smoke.generation,
    "stream": Smoke.stream,
    "load-unload": Smoke.load_unload,
    "auth": Smoke.auth,
}


@group.command("test")
def context_test(
    name: str = typer.Argument(..., help=f"{', '.join(TESTS)} or all"),
    embedding_model: str = typer.Option("minilm", help="Model for embeddings and load-unload"),
    generation_model: str = typer.Option("tiny-gpt2", help="Model for generation and stream"),
) -> None:
    """Run named smoke tests against the live deployment; pass/fail with timings, exit 1 on a failure."""
    if name != "all" and name not in TESTS:
        console.print(f"[red]unknown test {name!r}[/red]; known: {', '.join(TESTS)}, all")
        raise typer.Exit(2)
    cfg = settings()
    smoke = Smoke(ApiClient(cfg.url, api_key(cfg)), cfg, embedding_model, generation_model)
    failed = 0
    for test_name, test in TESTS.items():
        if name not in ("all", test_name):
            continue
        began = time.perf_counter()
        try:
            detail, ok = test(smoke), True
        except (SmokeFailure, requests.RequestException, KeyError, ValueError) as exc:
            detail, ok = f"{type(exc).__name__}: {exc}" if not isinstance(exc, SmokeFailure) else str(exc), False
        elapsed = (time.perf_counter() - began) * 1000
        failed += not ok
        mark = "[green]pass[/green]" if ok else "[red]FAIL[/red]"
        console.print(f"{mark} {test_name:<12} {elapsed:8.0f} ms  {detail}", highlight=False)
    if failed:
        raise typer.Exit(1)
