"""A 20-second smoke run of the soak benchmark (bench/soak.py) against a real API, worker and Redis: the
whole machinery (calibration, open-loop mix, load/unload cycle, sampling, CSV, chart, verdict) works."""

import csv

import pytest
import requests

from bench import soak
from tests.support import ApiProcess, RedisServer, WorkerProcess

pytestmark = pytest.mark.slow


def test_a_short_soak_runs_the_mix_without_errors_and_writes_its_csv_and_chart(tmp_path):
    server = RedisServer().start()
    worker = api = None
    try:
        url = server.url(0)
        worker = WorkerProcess(url, name="soak-worker").start()
        # The soak is one load generator at one address holding up to 64 waits when a load/unload cycle stalls the
        # mix; without auth it is an anonymous caller, capped per address like any other (api/limits.py), so the cap
        # is lifted here as bench/processes.py lifts it for every benchmark.
        api = ApiProcess(url, name="soak-api", AETHERCORE_MAX_STREAMS_PER_CALLER="100000").start()
        for model in ("minilm", "tiny-gpt2"):
            assert requests.post(f"{api.base}/models/{model}/load?wait=120", timeout=130).status_code == 200
        verdict = soak.run(
            api.base,
            None,
            url,
            minutes=20 / 60,
            fraction=0.5,
            sample_s=2,
            result_ttl=30,
            cycle_every_s=8,
            calibrate_s=4,
            out=tmp_path,
            progress=False,
        )
        print("\n" + verdict["line"])
        assert verdict["errors"] == {} and verdict["requests"] > 20
        rows = list(csv.DictReader(open(tmp_path / "soak.csv")))
        assert len(rows) >= 8 and all(float(r["requests_per_s"]) > 0 for r in rows)
        assert all(int(r["rss_api"]) > 0 and int(r["rss_worker"]) > 0 and int(r["rss_model"]) > 0 for r in rows)
        assert (tmp_path / "soak.png").stat().st_size > 10_000
        assert "verdict:" in (tmp_path / "verdict.txt").read_text()
        assert set(verdict["rss_growth"]) >= {"api", "worker", "model", "redis"}
    finally:
        for process in (api, worker):
            if process is not None:
                process.stop()
        server.cleanup()
