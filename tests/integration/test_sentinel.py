"""AETHERCORE_REDIS_URL=sentinel://...: the API, the worker and the broker find Redis through Sentinel."""

import shutil
import subprocess
import tempfile

import pytest

from tests.conftest import client_for, settings_for
from tests.support import RedisServer, WorkerProcess, free_port, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sentinel():
    master = RedisServer().start()
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="aethercore-sentinel-")
    conf = f"{workdir}/sentinel.conf"
    with open(conf, "w") as handle:
        handle.write(f"port {port}\nbind 127.0.0.1\ndir {workdir}\nsentinel monitor aether 127.0.0.1 {master.port} 1\n")
    proc = subprocess.Popen([shutil.which("redis-server"), conf, "--sentinel"], stdout=subprocess.DEVNULL)
    import redis

    wait_until(lambda: _master_known(redis.Redis(port=port, socket_connect_timeout=0.5)), 20, 0.2, "sentinel")
    yield f"sentinel://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
    master.cleanup()
    shutil.rmtree(workdir, ignore_errors=True)


def _master_known(client) -> bool:
    try:
        return client.sentinel_get_master_addr_by_name("aether") is not None
    except Exception:
        return False


def test_everything_works_through_sentinel(sentinel):
    worker = WorkerProcess(sentinel, name="sentinel-worker", AETHERCORE_REDIS_SENTINEL_MASTER="aether").start()
    try:
        client = client_for(settings_for(sentinel, redis_sentinel_master="aether", rate_limit="100/minute"))
        assert client.get("/health").status_code == 200
        job = client.post("/serve?wait=60", json={"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}})
        assert job.get_json()["status"] == "succeeded"
    finally:
        worker.stop()
