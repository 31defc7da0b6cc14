"""Encrypted transport, for real: a throw-away CA (openssl), a TLS-only redis-server that also wants client
certificates, a worker and an API speaking `rediss://` to it, and the API serving HTTPS; a job end to end,
its stream over SSE and WebSocket, and the clients that lack the CA or the client certificate refused."""

import json
import shutil
import ssl
import subprocess
import time

import pytest
import redis
import requests
import simple_websocket

from tests.support import ApiProcess, WorkerProcess, close_quietly, free_port, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not shutil.which("openssl") or not shutil.which("redis-server"), reason="needs the openssl CLI and redis-server"
    ),
]


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """ca.crt signs server.crt (for 127.0.0.1) and client.crt."""
    d = tmp_path_factory.mktemp("tls")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=aethercore test CA",
        cwd=d,
    )
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=aethercore {name}",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            *ext,
            cwd=d,
        )
    return d


@pytest.fixture(scope="module")
def system(certs):
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(certs / "server.crt"),
            "--tls-key-file",
            str(certs / "server.key"),
            "--tls-ca-cert-file",
            str(certs / "ca.crt"),
            "--tls-auth-clients",
            "yes",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"rediss://127.0.0.1:{port}/0"
    tls_env = {
        "AETHERCORE_REDIS_CA": str(certs / "ca.crt"),
        "AETHERCORE_REDIS_CERT": str(certs / "client.crt"),
        "AETHERCORE_REDIS_KEY": str(certs / "client.key"),
    }
    client = redis.Redis.from_url(
        url,
        ssl_ca_certs=str(certs / "ca.crt"),
        ssl_certfile=str(certs / "client.crt"),
        ssl_keyfile=str(certs / "client.key"),
        decode_responses=True,
    )

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    wait_until(answers, 15, 0.1, "the TLS redis-server")
    worker = WorkerProcess(url, name="tls-worker", **tls_env).start()
    api = ApiProcess(
        url,
        name="tls-api",
        ca=str(certs / "ca.crt"),
        AETHERCORE_TLS_CERT=str(certs / "server.crt"),
        AETHERCORE_TLS_KEY=str(certs / "server.key"),
        AETHERCORE_RATE_LIMIT="6000/minute",
        **tls_env,
    ).start()
    yield {"api": api, "worker": worker, "certs": certs, "url": url, "port": port, "redis": client}
    api.stop()
    worker.stop()
    server.terminate()
    server.wait(10)


def test_a_job_runs_end_to_end_over_https_and_tls_redis(system):
    api, ca = system["api"], str(system["certs"] / "ca.crt")
    assert api.base.startswith("https://")
    health = requests.get(f"{api.base}/health", verify=ca, timeout=10).json()
    assert health["checks"]["transport"] == {"status": "ok", "https": True, "redis_tls": True}
    assert health["status"] == "ok", health
    job = requests.post(
        f"{api.base}/serve?wait=120",
        verify=ca,
        timeout=130,
        json={"model_id": "tiny-gpt2", "inputs": {"text": "Over TLS"}, "parameters": {"max_length": 6}},
    ).json()
    assert job["status"] == "succeeded" and job["result"]["output"]["tokens"] == 6, job
    assert "API serving HTTPS" in api.log()
    # The per-caller rate limit (flask-limiter's Redis storage) counts over the same TLS connection options.
    listed = requests.get(f"{api.base}/models", verify=ca, timeout=10)
    assert listed.status_code == 200 and "X-RateLimit-Limit" in listed.headers, listed.headers


def test_streams_work_over_https_and_wss(system):
    api, ca = system["api"], str(system["certs"] / "ca.crt")
    job_id = requests.post(
        f"{api.base}/serve",
        verify=ca,
        timeout=10,
        json={"model_id": "tiny-gpt2", "inputs": {"text": "Stream it"}, "parameters": {"max_length": 8}},
    ).json()["job_id"]
    with requests.get(f"{api.base}/jobs/{job_id}/stream", verify=ca, stream=True, timeout=60) as response:
        text = "".join(line.decode() + "\n" for line in response.iter_lines())
    assert "event: chunk" in text and "event: done" in text

    context = ssl.create_default_context(cafile=ca)
    ws = simple_websocket.Client(api.base.replace("https://", "wss://") + "/serve/stream", ssl_context=context)
    try:
        ws.send(json.dumps({"model_id": "tiny-gpt2", "inputs": {"text": "Over wss"}, "parameters": {"max_length": 5}}))
        kinds = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = json.loads(ws.receive(timeout=60))
            kinds.append(message["type"])
            if message["type"] in ("done", "error"):
                break
        assert kinds[0] == "queued" and "chunk" in kinds and kinds[-1] == "done"
    finally:
        close_quietly(ws)


def test_clients_without_the_ca_or_the_client_certificate_are_refused(system):
    api, certs = system["api"], system["certs"]
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{api.base}/heartbeat", timeout=5)  # the system's CAs do not know ours
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(api.base.replace("https://", "http://") + "/heartbeat", timeout=5)  # no plain HTTP
    no_client_cert = redis.Redis.from_url(system["url"], ssl_ca_certs=str(certs / "ca.crt"), socket_timeout=5)
    with pytest.raises(redis.RedisError):
        no_client_cert.ping()  # the server wants a client certificate (mutual TLS)
    no_ca = redis.Redis.from_url(
        system["url"], ssl_certfile=str(certs / "client.crt"), ssl_keyfile=str(certs / "client.key"), socket_timeout=5
    )
    with pytest.raises(redis.RedisError):
        no_ca.ping()  # our CA is not trusted by default


def test_through_sentinel_over_tls_a_job_runs_and_a_plain_client_is_refused(certs):
    """AETHERCORE_REDIS_SENTINEL_TLS: a TLS-only sentinel (client certificates wanted) naming a data node whose TLS
    port it monitors; the worker (Celery's Sentinel transport included) and the API reach both over TLS."""
    tls = {
        "ssl_ca_certs": str(certs / "ca.crt"),
        "ssl_certfile": str(certs / "client.crt"),
        "ssl_keyfile": str(certs / "client.key"),
    }
    server_tls = ["--tls-cert-file", str(certs / "server.crt"), "--tls-key-file", str(certs / "server.key")]
    server_tls += ["--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "yes"]
    node_port, sentinel_port = free_port(), free_port()
    node = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(node_port), "--bind", "127.0.0.1", "--save", ""] + server_tls,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    conf = certs / "sentinel-tls.conf"
    conf.write_text(
        f"port 0\ntls-port {sentinel_port}\nbind 127.0.0.1\ndir {certs}\ntls-replication yes\n"
        + "".join(f"{server_tls[i][2:]} {server_tls[i + 1]}\n" for i in range(0, len(server_tls), 2))
        + f"sentinel monitor aether 127.0.0.1 {node_port} 1\n"
    )
    sentinel = subprocess.Popen(
        ["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    worker = None
    try:
        asker = redis.Redis(port=sentinel_port, ssl=True, socket_connect_timeout=1, **tls)

        def named() -> bool:
            try:
                return asker.sentinel_get_master_addr_by_name("aether") is not None
            except redis.RedisError:
                return False

        wait_until(named, 20, 0.2, "the TLS sentinel to name the TLS node")
        with pytest.raises(redis.ConnectionError):  # no TLS: the sentinel does not speak to it
            redis.Redis(port=sentinel_port, socket_connect_timeout=1, socket_timeout=1).ping()
        url = f"sentinel://127.0.0.1:{sentinel_port}/0"
        env = {
            "AETHERCORE_REDIS_SENTINEL_MASTER": "aether",
            "AETHERCORE_REDIS_SENTINEL_TLS": "true",
            "AETHERCORE_REDIS_CA": str(certs / "ca.crt"),
            "AETHERCORE_REDIS_CERT": str(certs / "client.crt"),
            "AETHERCORE_REDIS_KEY": str(certs / "client.key"),
            "AETHERCORE_RATE_LIMIT": "100/minute",  # the limiter goes through the sentinel too
        }
        worker = WorkerProcess(url, name="sentinel-tls-worker", **env).start()
        api = ApiProcess(url, name="sentinel-tls-api", **env).start()
        try:
            answer = requests.post(
                f"{api.base}/serve",
                params={"wait": 60},
                json={"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}},
                timeout=90,
            )
            assert answer.status_code == 200 and answer.json()["status"] == "succeeded", answer.text
            assert requests.get(f"{api.base}/health", timeout=10).json()["checks"]["redis"]["status"] == "ok"
        finally:
            api.stop()
    finally:
        if worker is not None:
            worker.stop()
        sentinel.terminate()
        node.terminate()
        sentinel.wait(10)
        node.wait(10)
