"""What each owner makes the service keep, where operators see it (issue 34's class): `/metrics` per owner and kind
and added up, `GET /holdings` (every owner for whole-service readers, one's own for anyone else), and `manage.py
system holdings`, against a real Redis and a real API process; and the cluster metrics read from Redis once per
second per process however many scrapes ask."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import pytest
import redis

from tasks.holdings import DEAD_LETTERS, FILES, OUTPUTS, Holdings
from tasks.metrics_view import (
    HOLDINGS_BYTES,
    HOLDINGS_LIMIT,
    HOLDINGS_OBJECTS,
    HOLDINGS_TOTAL_BYTES,
    HOLDINGS_TOTAL_OBJECTS,
    QUEUE_DEPTH,
)
from tests.conftest import client_for, settings_for
from tests.support import ADMIN_KEY, OTHER_USER_KEY, REPO_ROOT, USER_KEY, VIEWER_KEY, ApiProcess, base_env, metric

DB_HOLDINGS = 27


def owner_of(static_key: str) -> str:
    """The owner a static API key's requests are charged to (access/keys.py: env:<digest>)."""
    return "env:" + hashlib.sha256(static_key.encode()).hexdigest()[:12]


USER, OTHER = owner_of(USER_KEY), owner_of(OTHER_USER_KEY)


@pytest.fixture()
def charged(redis_server):
    """Two users' objects, charged as the features charge them."""
    url = redis_server.url(DB_HOLDINGS)
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    holdings, later = Holdings(client, {}), time.time() + 600
    holdings.put(USER, FILES, "file-a", 4000, later)
    holdings.put(USER, FILES, "file-b", 1000, later)
    holdings.put(USER, OUTPUTS, "file-out", 300, later)
    holdings.put(OTHER, DEAD_LETTERS, "job-1", 70, later, force=True)
    yield url, client
    client.flushdb()


def test_metrics_show_what_each_owner_holds_to_whole_service_readers_only(charged):
    url, _client = charged
    settings = settings_for(url)
    scraped = client_for(settings, VIEWER_KEY).get("/metrics").get_data(as_text=True)
    assert metric(scraped, HOLDINGS_BYTES, owner=USER, kind=FILES) == 5000
    assert metric(scraped, HOLDINGS_OBJECTS, owner=USER, kind=FILES) == 2
    assert metric(scraped, HOLDINGS_BYTES, owner=USER, kind=OUTPUTS) == 300
    assert metric(scraped, HOLDINGS_OBJECTS, owner=OTHER, kind=DEAD_LETTERS) == 1
    assert metric(scraped, HOLDINGS_TOTAL_BYTES, kind=FILES) == 5000
    assert metric(scraped, HOLDINGS_TOTAL_OBJECTS, kind=DEAD_LETTERS) == 1
    assert f"{HOLDINGS_LIMIT} " in scraped
    for key in (None, USER_KEY):  # anonymous and a tenant: the API's request metrics only
        text = client_for(settings, key).get("/metrics").get_data(as_text=True)
        assert "aethercore_requests_total" in text and HOLDINGS_BYTES not in text and USER not in text, key


def test_get_holdings_lists_every_owner_or_ones_own(charged):
    url, _client = charged
    settings = settings_for(url)
    body = client_for(settings, ADMIN_KEY).get("/holdings").get_json()
    owners = {entry["owner"]: entry for entry in body["owners"]}
    assert set(owners) == {USER, OTHER}
    assert owners[USER]["kinds"][FILES] == {"bytes": 5000, "objects": 2}
    assert owners[USER]["bytes"] == 5300 and owners[USER]["objects"] == 3
    assert body["totals"]["bytes"] == 5370 and body["quotas"][FILES]["max_bytes"] == settings.files_quota
    mine = client_for(settings, USER_KEY).get("/holdings").get_json()
    assert [entry["owner"] for entry in mine["owners"]] == [USER] and "totals" not in mine
    assert mine["owners"][0]["kinds"][OUTPUTS] == {"bytes": 300, "objects": 1}
    assert client_for(settings, None).get("/holdings").status_code == 401


def test_manage_py_system_holdings_lists_them_per_owner(charged):
    url, _client = charged
    api = ApiProcess(url, name="api-holdings", AETHERCORE_AUTH="true").start()
    try:

        def cli(key: str, *args: str) -> subprocess.CompletedProcess:
            env = base_env(url, AETHERCORE_URL=api.base, AETHERCORE_API_KEY=key, COLUMNS="250")
            return subprocess.run(
                [sys.executable, "manage.py", "system", "holdings", *args],
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )

        out = cli(ADMIN_KEY, "--json")
        assert out.returncode == 0, out.stderr
        listed = {entry["owner"]: entry for entry in json.loads(out.stdout)["owners"]}
        assert listed[OTHER]["kinds"][DEAD_LETTERS] == {"bytes": 70, "objects": 1}
        out = cli(ADMIN_KEY)
        assert out.returncode == 0, out.stderr
        row = next(line for line in out.stdout.splitlines() if USER in line)
        assert "5.0 KB / 2" in row and "300 B / 1" in row, out.stdout
        assert "every owner" in out.stdout and "quota per owner" in out.stdout
        out = cli(OTHER_USER_KEY)
        assert out.returncode == 0 and OTHER in out.stdout and USER not in out.stdout, out.stdout
    finally:
        api.stop()


def redis_commands(client: redis.Redis) -> int:
    return sum(int(v["calls"]) for name, v in client.info("commandstats").items() if name != "cmdstat_info")


def test_the_cluster_metrics_are_read_once_a_second_however_many_scrape(charged):
    url, client = charged
    scraper = client_for(settings_for(url), VIEWER_KEY)
    costs = []
    for _ in range(3):  # one fresh read's commands: the least of three (other processes' commands only add)
        time.sleep(1.2)
        before = redis_commands(client)
        assert QUEUE_DEPTH in scraper.get("/metrics").get_data(as_text=True)
        costs.append(redis_commands(client) - before)
    per_read = min(costs)
    before = redis_commands(client)
    time.sleep(3)
    quiet = redis_commands(client) - before  # the other processes of the session's Redis
    before, started, scrapes = redis_commands(client), time.monotonic(), 0
    while time.monotonic() - started < 3:
        assert scraper.get("/metrics").status_code == 200
        scrapes += 1
    elapsed = time.monotonic() - started
    spent = redis_commands(client) - before - quiet * elapsed / 3
    print(f"\n{scrapes} scrapes in {elapsed:.2f} s: {spent:.0f} Redis commands beyond the background ({quiet} in 3 s)")
    allowed = (elapsed + 2) * per_read + 0.5 * quiet + 20
    assert scrapes >= 30 and spent <= allowed, (scrapes, spent, quiet, per_read, elapsed)
