"""The deployments' health checks against real processes (issue 34, case 16): the API image's HEALTHCHECK speaks
https to an API that serves only TLS (docker-compose.tls.yml) and http to one that does not; the probes of
Kubernetes' workers, webhook dispatchers and batch drivers (`python -m deploy.docker.healthcheck
worker|dispatcher|batches`) pass while the process heartbeats into Redis and fail once it stopped."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import redis

from tests.support import (
    REPO_ROOT,
    ApiProcess,
    BatchDriverProcess,
    ManagedProcess,
    WorkerProcess,
    base_env,
    wait_until,
)

pytestmark = [
    pytest.mark.slow,
    # the test's own wait for the TLS API does not verify it (the probe under test does)
    pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"),
    pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl CLI"),
]
DB_PROBES = 28
HEALTHCHECK = [sys.executable, "-m", "deploy.docker.healthcheck"]


def api_image_healthcheck() -> list[str]:
    """Dockerfile.api's HEALTHCHECK command, with this interpreter for the image's `python`."""
    text = (REPO_ROOT / "Dockerfile.api").read_text().replace("\\\n", " ")
    command = json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M).group(1))
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)


def certificate(directory, name: str) -> tuple[str, str]:
    """A self-signed certificate for a public name only (not 127.0.0.1, where the probe dials)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture()
def probes_redis(redis_server):
    url = redis_server.url(DB_PROBES)
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    yield url, client
    client.flushdb()


def test_the_api_images_healthcheck_speaks_https_to_a_tls_only_api(probes_redis, tmp_path):
    url, _client = probes_redis
    cert, key = certificate(tmp_path, "api.example.com")
    api = ApiProcess(url, name="api-probe-tls", AETHERCORE_TLS_CERT=cert, AETHERCORE_TLS_KEY=key)
    api.verify = False  # the certificate names api.example.com; the test's own wait dials 127.0.0.1
    api.start()
    try:
        assert api.base.startswith("https://")
        healthy = run(api_image_healthcheck(), api.env)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        # What the image ran before: plain http to the TLS-only server, never healthy.
        old = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{api.port}/health/live', timeout=2)"
        assert run([sys.executable, "-c", old], api.env).returncode != 0
        # The certificate is verified: a server that presents another one than the settings name is not healthy.
        other, _ = certificate(tmp_path, "someone-else.example.com")
        impostor = run(api_image_healthcheck(), {**api.env, "AETHERCORE_TLS_CERT": other})
        assert impostor.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in impostor.stdout, impostor.stdout
    finally:
        api.stop()
    stopped = run(api_image_healthcheck(), api.env)
    assert stopped.returncode == 1 and "unhealthy" in stopped.stdout


def test_the_api_images_healthcheck_speaks_http_to_a_plain_api(probes_redis):
    url, _client = probes_redis
    api = ApiProcess(url, name="api-probe-plain").start()
    try:
        healthy = run(api_image_healthcheck(), api.env)
        assert healthy.returncode == 0 and "healthy: api" in healthy.stdout, healthy.stdout + healthy.stderr
    finally:
        api.stop()


def test_the_dispatcher_batch_driver_and_worker_probes_follow_their_heartbeats(probes_redis):
    url, client = probes_redis
    env = base_env(url)
    dispatcher = ManagedProcess("probe-dispatcher", env).spawn("dispatcher")
    assert run([*HEALTHCHECK, "batches"], env).returncode == 1  # no batch driver yet
    driver = BatchDriverProcess(env, "probe-batches").start()
    worker = WorkerProcess(url, name="probe-worker")
    try:
        wait_until(lambda: client.zcard("aethercore:webhook:dispatchers") > 0, 30, 0.1, "the dispatcher's heartbeat")
        for args in (["dispatcher"], ["dispatcher", "--redis-down-ok"], ["batches"], ["batches", "--redis-down-ok"]):
            out = run([*HEALTHCHECK, *args], env)
            assert out.returncode == 0, out.stdout + out.stderr
        assert run([*HEALTHCHECK, "worker"], env).returncode == 1  # no worker yet
        worker.start()
        for args in (["worker"], ["worker", "--redis-down-ok"]):
            out = run([*HEALTHCHECK, *args], env)
            assert out.returncode == 0, out.stdout + out.stderr
    finally:
        dispatcher.stop()
        driver.stop()
        worker.stop()
    # Stopped (a worker's record leaves with it; a dispatcher's and a batch driver's heartbeat with it): Redis
    # answers, no heartbeat of this host, and that fails a liveness probe too.
    named = {"dispatcher": "webhook dispatcher", "batches": "batch driver", "worker": "worker"}
    for role, what in named.items():
        out = run([*HEALTHCHECK, role, "--redis-down-ok"], env)
        assert out.returncode == 1 and f"no live {what}" in out.stdout, (role, out.stdout)
