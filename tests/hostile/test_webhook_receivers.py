"""Issue 34, case 12 and the webhook slots: a caller's webhook receiver that misbehaves (trickles its answer, hangs
after accepting, redirects, answers a huge header block, or is a name that leads to a private address) holds a
bounded share of the dispatcher for a bounded time, and another caller's webhook still arrives promptly.

Each test attacks as an ordinary `user` through an API process of this module's own (the suite's has no webhook
destination allowed: here loopback 127.0.0.2, where the receivers listen) and a real dispatcher process
(`manage.py dispatcher`, defaults but for a short timeout and retry window), on the hostile suite's Redis database
and worker; each ends with `assert_still_serving` and another user's webhook arriving within PROMPT_S.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests

from tasks.holdings import DELIVERIES, Holdings
from tasks.names import webhook_delivery_key
from tests.hostile.conftest import assert_still_serving, auth
from tests.support import OTHER_USER_KEY, USER_KEY, ApiProcess, ManagedProcess, base_env, wait_until
from tests.webhook_receiver import HostileReceiver, Receiver
from webhooks.owners import WebhookOwners

pytestmark = pytest.mark.slow

HOST = "127.0.0.2"  # where every receiver listens: the only address webhooks may reach here
TIMEOUT_S = 5.0  # AETHERCORE_WEBHOOK_TIMEOUT: one attempt, whole
ENDPOINT_CONCURRENCY = 4  # the default AETHERCORE_WEBHOOK_ENDPOINT_CONCURRENCY
MAX_PENDING = 100
PROMPT_S = 5.0  # another caller's webhook arrives within this (alone: about 0.1 s)
MLP = {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}}
DISPATCH = {
    "AETHERCORE_WEBHOOK_ALLOW": HOST,
    "AETHERCORE_WEBHOOK_TIMEOUT": str(TIMEOUT_S),
    "AETHERCORE_WEBHOOK_RETRY_BASE": "1",
    "AETHERCORE_WEBHOOK_RETRY_MAX_DELAY": "2",
    "AETHERCORE_WEBHOOK_RETRY_WINDOW": "20",
    "AETHERCORE_WEBHOOK_FAILED_TTL": "5",
    "AETHERCORE_WEBHOOK_MAX_PENDING": str(MAX_PENDING),
}


def owner_of(key: str) -> str:
    return f"env:{hashlib.sha256(key.encode()).hexdigest()[:12]}"  # how jobs name an env key's caller


@pytest.fixture(scope="module")
def hooks(hostile_redis_url: str, hostile_redis: redis.Redis, hostile_worker) -> Iterator[dict[str, Any]]:
    api = ApiProcess(hostile_redis_url, name="hooks-api", AETHERCORE_AUTH="true", AETHERCORE_WORKERS="1", **DISPATCH)
    api.start()
    owners = WebhookOwners(hostile_redis)
    for key in (USER_KEY, OTHER_USER_KEY):
        owners.secret(owner_of(key), create=True)
    dispatcher = ManagedProcess("hooks-dispatcher", base_env(hostile_redis_url, **DISPATCH)).spawn("dispatcher")
    wait_until(
        lambda: hostile_redis.zcard("aethercore:webhook:dispatchers") > 0 or dispatcher.died(), 30, 0.1, "dispatcher"
    )
    assert not dispatcher.died(), dispatcher.log()
    healthy = Receiver(host=HOST).start()
    yield {"api": api, "redis": hostile_redis, "healthy": healthy, "dispatcher": dispatcher}
    healthy.stop()
    dispatcher.stop()
    api.stop()


def submit(hooks: dict[str, Any], key: str, webhook: str | None, wait: float = 0) -> requests.Response:
    body = {**MLP, **({"webhook": {"url": webhook}} if webhook else {})}
    return requests.post(f"{hooks['api'].base}/serve", params={"wait": wait}, json=body, headers=auth(key), timeout=60)


def attack(hooks: dict[str, Any], receiver: HostileReceiver, jobs: int) -> list[str]:
    """`jobs` jobs of the user, each with a webhook to `receiver`; their ids."""
    ids = []
    for _ in range(jobs):
        response = submit(hooks, USER_KEY, receiver.url)
        assert response.status_code == 202, response.text
        ids.append(response.json()["job_id"])
    return ids


def another_users_webhook_s(hooks: dict[str, Any], within_s: float = PROMPT_S) -> float:
    """Another user's job with a webhook to a healthy receiver: seconds from its end to its delivery, asserted
    under `within_s` (waiting up to 30 s to measure how late it is)."""
    receiver = hooks["healthy"]
    done = submit(hooks, OTHER_USER_KEY, receiver.url, wait=30)
    ended = time.time()
    assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
    job_id = done.json()["job_id"]
    try:
        arrived = wait_until(lambda: receiver.for_job(job_id), 30, 0.02, "another user's webhook")[0]["at"]
    except AssertionError:
        raise AssertionError("another user's webhook had not arrived 30 s after its job ended") from None
    took = max(0.0, arrived - ended)
    print(f"another user's webhook arrived {took:.3f} s after its job ended")
    assert took < within_s, f"another user's webhook took {took:.1f} s"
    return took


def most_at_once(receiver: HostileReceiver) -> int:
    """The most connections the receiver held open at one moment."""
    now = time.time()
    edges = sorted(
        [(c["at"], 1) for c in receiver.connections] + [(c.get("cut_at") or now, -1) for c in receiver.connections]
    )
    most = held = 0
    for _at, step in edges:
        held += step
        most = max(most, held)
    return most


def delivery(hooks: dict[str, Any], job_id: str) -> dict[str, str]:
    return hooks["redis"].hgetall(webhook_delivery_key(f"msg_{job_id}"))


def dispatcher_rss_kb(hooks: dict[str, Any]) -> int:
    status = open(f"/proc/{hooks['dispatcher'].proc.pid}/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def pending_charged(hooks: dict[str, Any], owner: str) -> int:
    """The owner's deliveries in its account, once expired ones have left it (the batch drivers' periodic sweep)."""
    holdings = Holdings(hooks["redis"], {})
    holdings.sweep()
    return holdings.usage(owner)[DELIVERIES].count


# -- case 12 ----------------------------------------------------------------------------------------------------------
def test_a_trickling_receiver_does_not_stall_another_users_webhooks(hooks):
    """The issue's reproduction: 40 jobs whose receiver answers one byte every 2 s, then another user's webhook to
    a healthy receiver. Before: every dispatcher thread stayed on the trickle (the timeout was per socket
    operation) and the other webhook had not arrived 30 s later. Now: each attempt is cut at the timeout, at most
    ENDPOINT_CONCURRENCY attempts of that endpoint run at once, its circuit opens after consecutive failures."""
    r = hooks["redis"]
    alone = another_users_webhook_s(hooks)
    charged_before = pending_charged(hooks, owner_of(USER_KEY))
    memory_before = r.info("memory")["used_memory"]
    trickle = HostileReceiver("trickle", HOST, interval=2.0).start()
    try:
        ids = attack(hooks, trickle, 40)
        wait_until(lambda: len(trickle.connections) >= ENDPOINT_CONCURRENCY, 60, 0.05, "the trickle's attempts")
        time.sleep(1.0)
        under_attack = another_users_webhook_s(hooks)
        print(f"healthy receiver: {alone:.3f} s alone, {under_attack:.3f} s under 40 trickling deliveries")

        # Each attempt is cut at the timeout, whatever the trickle; never more than the cap at once.
        cut = wait_until(lambda: [c for c in trickle.connections if c.get("cut_at")], 3 * TIMEOUT_S, 0.1, "a cut")
        held = [c["cut_at"] - c["at"] for c in cut]
        print(f"trickle attempts cut after {min(held):.2f}-{max(held):.2f} s (timeout {TIMEOUT_S} s)")
        assert max(held) < TIMEOUT_S + 1.5, held
        assert most_at_once(trickle) <= ENDPOINT_CONCURRENCY

        # The window (20 s) ends for every delivery, most without an attempt: the circuit opened and held them off.
        wait_until(
            lambda: all(delivery(hooks, j).get("state") == "failed" or not delivery(hooks, j) for j in ids),
            90,
            0.5,
            "every trickle delivery to fail for good",
        )
        attempts = len(trickle.connections)
        print(f"{attempts} attempts reached the trickle for 40 deliveries")
        assert attempts <= 3 * ENDPOINT_CONCURRENCY
        another_users_webhook_s(hooks)
        assert_still_serving(hooks["api"], r)

        # Failed deliveries are kept AETHERCORE_WEBHOOK_FAILED_TTL (5 s), then nothing of them is left.
        wait_until(lambda: not any(delivery(hooks, j) for j in ids), 30, 0.5, "the failed deliveries to expire")
        assert pending_charged(hooks, owner_of(USER_KEY)) <= charged_before
        memory_after = r.info("memory")["used_memory"]
        print(f"Redis used_memory {memory_before} -> {memory_after} bytes")
        assert memory_after - memory_before < 2 * 2**20  # job records and dead letters of 40 small jobs remain
    finally:
        trickle.stop()


def test_a_receiver_that_hangs_after_accepting(hooks):
    hang = HostileReceiver("hang", HOST).start()
    try:
        attack(hooks, hang, 8)
        wait_until(lambda: len(hang.connections) >= ENDPOINT_CONCURRENCY, 60, 0.05, "the hang's attempts")
        another_users_webhook_s(hooks)
        cut = wait_until(
            lambda: [c for c in hang.connections if c.get("cut_at")], 3 * TIMEOUT_S, 0.1, "an attempt to be cut"
        )
        assert max(c["cut_at"] - c["at"] for c in cut) < TIMEOUT_S + 1.5
        assert most_at_once(hang) <= ENDPOINT_CONCURRENCY
        assert_still_serving(hooks["api"], hooks["redis"])
        another_users_webhook_s(hooks)
    finally:
        hang.stop()


def test_a_redirect_is_a_failure_and_never_followed(hooks):
    target = Receiver(host=HOST).start()
    redirect = HostileReceiver("redirect", HOST, location=target.url).start()
    try:
        job_id = attack(hooks, redirect, 1)[0]
        wait_until(lambda: delivery(hooks, job_id).get("last_error"), 30, 0.05, "the redirect's answer")
        assert delivery(hooks, job_id)["last_error"] == "HTTP 302"  # retried later, as any failure
        another_users_webhook_s(hooks)
        assert target.received == []  # the Location was never called
        assert_still_serving(hooks["api"], hooks["redis"])
    finally:
        redirect.stop()
        target.stop()


def test_a_huge_header_block_is_cut_and_never_held_in_memory(hooks):
    huge = HostileReceiver("huge_headers", HOST, size=64 * 2**20).start()
    rss_before = dispatcher_rss_kb(hooks)
    try:
        job_id = attack(hooks, huge, 2)[0]
        wait_until(lambda: delivery(hooks, job_id).get("last_error"), 30, 0.05, "the answer's verdict")
        error = delivery(hooks, job_id)["last_error"]
        assert "head" in error and "bytes" in error, error
        grew = dispatcher_rss_kb(hooks) - rss_before
        print(f"dispatcher RSS grew {grew} KB while reading a 64 MB header block")
        assert grew < 16 * 1024
        another_users_webhook_s(hooks)
        assert_still_serving(hooks["api"], hooks["redis"])
    finally:
        huge.stop()


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/hook",  # private
        "https://192.168.0.1/hook",
        "https://169.254.169.254/latest/meta-data",  # link-local: cloud metadata
        "https://[fe80::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",  # private, written as IPv6
        "https://127.0.0.1/hook",  # loopback not allowed (only 127.0.0.2 is)
    ],
)
def test_a_private_or_link_local_address_is_refused_at_submission(hooks, url):
    refused = submit(hooks, USER_KEY, url)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "webhook_forbidden", refused.text
    another_users_webhook_s(hooks)
    assert_still_serving(hooks["api"], hooks["redis"])


def test_a_name_that_resolves_to_a_forbidden_address_is_never_called(hooks):
    """`localhost` passes the API (a name: no DNS on the request path); the dispatcher resolves it to 127.0.0.1 and
    ::1, neither allowed, and fails the delivery for good without connecting (a guard listens on 127.0.0.1)."""
    guard = HostileReceiver("hang", "127.0.0.1").start()
    try:
        port = guard.url.rsplit(":", 1)[1].split("/")[0]
        response = submit(hooks, USER_KEY, f"https://localhost:{port}/hook")
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        wait_until(lambda: delivery(hooks, job_id).get("state") == "failed", 30, 0.05, "the delivery to be refused")
        assert delivery(hooks, job_id)["reason"] == "forbidden_address"
        assert guard.connections == []
        another_users_webhook_s(hooks)
        assert_still_serving(hooks["api"], hooks["redis"])
    finally:
        guard.stop()


# -- the class: pending deliveries are bounded at admission -----------------------------------------------------------
def test_too_many_pending_deliveries_are_refused_at_admission(hooks):
    r, owner = hooks["redis"], owner_of(USER_KEY)
    holdings = Holdings(r, {})
    held = [f"msg_pending-{i}" for i in range(MAX_PENDING)]  # as the job-end step charges each delivery (force)
    for delivery_id in held:
        holdings.put(owner, DELIVERIES, delivery_id, 0, time.time() + 120, force=True)
    try:
        time.sleep(1.2)  # the API reads the count at most once a second
        refused = submit(hooks, USER_KEY, hooks["healthy"].url)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "too_many_webhooks" and int(refused.headers["Retry-After"]) > 0
        assert submit(hooks, USER_KEY, None).status_code == 202  # without a webhook: not this limit's business
        another_users_webhook_s(hooks)
    finally:
        for delivery_id in held:
            holdings.drop(owner, DELIVERIES, delivery_id)
    time.sleep(1.2)
    assert submit(hooks, USER_KEY, hooks["healthy"].url).status_code == 202
    assert_still_serving(hooks["api"], r)
