"""End to end: start what the first README command starts (`manage.py up`) and run the README's curl examples."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile

import pytest
import requests

from tests.support import ADMIN_KEY, JWT_SECRET, REPO_ROOT, ManagedProcess, base_env, free_port, wait_until

pytestmark = pytest.mark.slow


def readme_try_it_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Try it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").strip().splitlines()
    assert lines[0] == "export AETHERCORE_API_KEY=$(cat var/admin.key)"
    commands = lines[1:]
    assert len(commands) == 3 and all(c.startswith("curl") for c in commands)
    return commands


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def system():
    """`manage.py up` against a Redis URL where nothing listens: `up` must start redis-server itself."""
    redis_port, api_port, flower_port = free_port(), free_port(), free_port()
    key_dir = tempfile.mkdtemp(prefix="aethercore-e2e-")
    env = base_env(
        f"redis://127.0.0.1:{redis_port}/0",
        AETHERCORE_PORT=str(api_port),
        AETHERCORE_FLOWER_PORT=str(flower_port),
        AETHERCORE_URL=f"http://127.0.0.1:{api_port}",
        AETHERCORE_ADMIN_KEY_FILE=f"{key_dir}/admin.key",
    )
    up = ManagedProcess("e2e-up", env)
    up.spawn("up")
    proc = up.proc
    base = f"http://127.0.0.1:{api_port}"

    def healthy():
        assert proc.poll() is None, up.log()
        try:
            return requests.get(f"{base}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_until(healthy, 180, 0.5, "manage.py up to report healthy")
    key_file = os.path.join(key_dir, "admin.key")
    assert oct(os.stat(key_file).st_mode & 0o777) == "0o600"
    key = open(key_file).read().strip()
    yield {
        "proc": proc,
        "base": base,
        "api_port": api_port,
        "flower_port": flower_port,
        "redis_port": redis_port,
        "env": dict(env, AETHERCORE_API_KEY=key),
        "key": key,
        "headers": {"Authorization": f"Bearer {key}"},
        "key_dir": key_dir,
    }
    if proc.poll() is None:
        up.kill(signal.SIGINT)  # Ctrl-C, as a person stops it
    up.stop()


def run_curl(command: str, system: dict) -> tuple[int, dict]:
    command = command.replace("localhost:8001", f"localhost:{system['api_port']}")
    out = subprocess.run(
        f"{command} -sS -w '\\n%{{http_code}}'",
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, AETHERCORE_API_KEY=system["key"]),
    )
    assert out.returncode == 0, out.stderr
    body, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(body)


def test_readme_curl_examples_work_verbatim(system):
    load_cmd, serve_cmd, health_cmd = readme_try_it_commands()

    code, load = run_curl(load_cmd, system)
    assert code == 202 and load["kind"] == "load" and load["status"] in {"queued", "running", "succeeded"}

    code, job = run_curl(serve_cmd, system)
    assert code == 202 and job["status"] == "queued" and job["model_id"] == "minilm"
    finished = requests.get(f"{system['base']}/jobs/{job['job_id']}?wait=60", timeout=70, headers=system["headers"])
    assert finished.status_code == 200
    result = finished.json()["result"]
    assert len(result["output"]["embedding"]) == 384 and result["device"] == "cpu"

    code, health = run_curl(health_cmd, system)
    assert code == 200 and health["status"] == "ok"

    assert (
        requests.get(f"{system['base']}/models/minilm/status", timeout=5, headers=system["headers"]).json()["state"]
        == "loaded"
    )
    # Without the key: 401 in the API's JSON error shape.
    anonymous = requests.get(f"{system['base']}/models", timeout=5)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"


def test_flower_and_cli_see_the_system(system):
    wait_until(lambda: port_open(system["flower_port"]), 60, 0.5, "Flower to listen")
    flower_auth = open(os.path.join(system["key_dir"], "flower.auth")).read().strip().split(":", 1)
    flower_url = f"http://127.0.0.1:{system['flower_port']}"
    assert requests.get(f"{flower_url}/workers", timeout=5).status_code == 401  # behind basic auth
    assert requests.get(f"{flower_url}/workers", auth=tuple(flower_auth), timeout=5).status_code == 200
    # Flower starts after the worker, so its own first look already finds it (no forced refresh).
    workers = wait_until(
        lambda: requests.get(f"{flower_url}/api/workers", auth=tuple(flower_auth), timeout=5).json(),
        30,
        0.5,
        "Flower to list the worker",
    )
    assert any(name.startswith("cpu.") for name in workers), workers
    out = subprocess.run(
        [sys.executable, "manage.py", "system", "services", "--json"],
        cwd=REPO_ROOT,
        env=system["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    services = {row["service"]: row["status"] for row in json.loads(out.stdout)}
    assert services == {"api": "up", "redis": "up", "flower": "up"}
    out = subprocess.run(
        [sys.executable, "manage.py", "serve", "minilm", "--text", "hi", "--json"],
        cwd=REPO_ROOT,
        env=system["env"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "succeeded"


def manage(system: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO_ROOT,
        env=system["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_seeds_verbs_and_the_deployment_context(system):
    # `aethercore ...` is what the seed documents (heimnetz_cli.py): the same commands, the same output.
    seed, ours = manage(system, "aethercore", "models", "--json"), manage(system, "models", "list", "--json")
    assert seed.returncode == ours.returncode == 0, seed.stderr

    # (memory figures refresh with every heartbeat: compare what does not change between the two calls)
    def stable(out: str) -> list:
        return [(m["model_id"], m["state"], m["task"]) for m in json.loads(out)["models"]]

    assert stable(seed.stdout) == stable(ours.stdout)
    assert manage(system, "aethercore", "health").returncode == 0

    out = manage(system, "context", "info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["api_reachable"] and info["workers_by_device"].get("cpu")
    assert info["settings"]["AETHERCORE_JWT_SECRET"] == "***" and info["settings"]["AETHERCORE_API_KEYS"] == "***"
    assert JWT_SECRET not in out.stdout and ADMIN_KEY not in out.stdout  # secrets never printed

    out = manage(system, "context", "health", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {row["dependency"]: row for row in json.loads(out.stdout)}
    assert {"api", "redis", "workers", "flower"} <= set(rows)
    assert all(row["status"] == "up" and row["latency_ms"] is not None for row in rows.values())

    out = manage(system, "context", "test", "all")
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("embeddings", "generation", "stream", "load-unload", "auth"):
        assert re.search(rf"pass {re.escape(name)}\s+\d+ ms", out.stdout), out.stdout
    bad = manage(system, "context", "test", "embeddings", "--embedding-model", "no-such-model")
    assert bad.returncode == 1 and "FAIL embeddings" in bad.stdout


def test_ctrl_c_stops_everything(system):
    proc = system["proc"]
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(60) == 0
    for port in (system["api_port"], system["flower_port"], system["redis_port"]):
        wait_until(lambda port=port: not port_open(port), 20, 0.2, f"port {port} to close")


def test_cli_reports_an_unreachable_api_clearly():
    env = base_env("redis://127.0.0.1:1/0", AETHERCORE_URL=f"http://127.0.0.1:{free_port()}")
    out = subprocess.run(
        [sys.executable, "manage.py", "models", "list"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "not reachable" in out.stderr and "AETHERCORE_URL" in out.stderr
    assert "Traceback" not in out.stderr
