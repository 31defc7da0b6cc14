"""The webhook contract's pieces on their own: outbound rules, Standard Webhooks signatures (checked with the
`standardwebhooks` package), the retry schedule, the settings; and, on the session's real Redis, what the Lua step
that ends a job writes: a delivery due exactly for a job with a webhook, a dead letter exactly for a poison job or
one expired in its queue (with what replays it), and the delivery store's claim, lease and failure paths."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import orjson
import pytest
from standardwebhooks import Webhook

from config.settings import ConfigError, Settings
from tasks.deadletters import EXPIRED_IN_QUEUE, POISON, DeadLetters
from tasks.errors import DEADLINE_EXCEEDED, POISON_JOB, error_body
from tasks.jobs import IdempotencyConflict, JobStore, requeue_payload
from tasks.metrics import LocalMetrics
from tasks.names import INFER, WEBHOOKS_DUE, idempotency_key, webhook_delivery_key
from tasks.outbound import DeliveryFailed, ForbiddenDestination, OutboundPolicy
from tasks.states import EXPIRED, FAILED, SUCCEEDED
from tasks.webhooks import Deliveries, WebhookOwners, new_secret, retry_delay, sign, signature_header
from workers.completion import Completion, JobContext


# -- outbound rules -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/x",  # http to a host nobody allowed
        "https://127.0.0.1/x",
        "https://10.0.0.8/x",
        "https://172.16.3.4/x",
        "https://192.168.1.1/x",
        "https://169.254.169.254/latest/meta-data",
        "https://100.64.0.1/x",  # shared address space
        "https://[::1]/x",
        "https://[::ffff:127.0.0.1]/x",  # loopback written as IPv6
        "https://[fe80::1]/x",
        "https://0.0.0.0/x",
        "https://224.0.0.1/x",
        "https://u:p@example.com/x",
        "file:///etc/passwd",
        "https:///nohost",
        "https://example.com:0/x",
        "https://example.com/a b",
        "https://example.com/" + "a" * 2100,
    ],
)
def test_forbidden_urls(url):
    with pytest.raises(ForbiddenDestination):
        OutboundPolicy().check_url(url)


def test_allowed_urls_and_the_allow_list():
    OutboundPolicy().check_url("https://example.com/hooks?x=1")
    OutboundPolicy().check_url("https://93.184.215.14:8443/hook")
    policy = OutboundPolicy.from_entries(["127.0.0.1", "10.0.0.0/8", "hooks.internal"])
    policy.check_url("http://127.0.0.1:9000/hook")  # an allowed address: http too
    policy.check_url("http://10.2.3.4/hook")
    policy.check_url("http://hooks.internal/hook")  # an allowed host name: http to it
    with pytest.raises(ForbiddenDestination):
        policy.check_url("http://127.0.0.2/hook")


def test_a_name_is_resolved_once_and_must_lead_to_an_allowed_address():
    with pytest.raises(ForbiddenDestination, match="resolves only to"):
        OutboundPolicy().resolve("localhost", 443)  # loopback: refused unless allowed
    assert OutboundPolicy.from_entries(["127.0.0.0/8"]).resolve("localhost", 443).startswith("127.")
    with pytest.raises(DeliveryFailed):
        OutboundPolicy().resolve("no-such-host.invalid", 443)


def test_no_redirect_is_followed_and_a_closed_port_is_a_retryable_failure():
    from tests.webhook_receiver import Receiver

    receiver = Receiver().start()
    receiver.default = 302
    try:
        policy = OutboundPolicy.from_entries(["127.0.0.1"])
        assert policy.post(receiver.url, b"{}", {"Content-Type": "application/json"}, 5) == 302
        assert len(receiver.received) == 1
    finally:
        receiver.stop()
    with pytest.raises(DeliveryFailed):
        policy.post(receiver.url, b"{}", {}, 2)  # nothing listens now


# -- signatures and the schedule ----------------------------------------------------------------------------------
def test_signatures_verify_with_the_standardwebhooks_package():
    secret, old = new_secret(), new_secret()
    body = orjson.dumps({"type": "job.succeeded", "data": {"job_id": "x"}})
    now = int(time.time())
    headers = {"webhook-id": "msg_x", "webhook-timestamp": str(now)}
    assert Webhook(secret).verify(body, {**headers, "webhook-signature": sign(secret, "msg_x", now, body)})
    both = signature_header([secret, old], "msg_x", now, body)
    for each in (secret, old):  # during a rotation's overlap either secret verifies
        assert Webhook(each).verify(body, {**headers, "webhook-signature": both})["data"]["job_id"] == "x"
    with pytest.raises(Exception, match="signature"):
        Webhook(new_secret()).verify(body, {**headers, "webhook-signature": both})
    ours = Webhook(secret).sign("msg_x", datetime.fromtimestamp(now, tz=UTC), body.decode())
    assert ours == sign(secret, "msg_x", now, body)


def test_retry_delays_double_with_jitter_and_are_capped():
    assert retry_delay(1, 5, 3600, rng=lambda: 1.0) == 5 and retry_delay(1, 5, 3600, rng=lambda: 0.0) == 2.5
    assert [retry_delay(n, 5, 3600, rng=lambda: 1.0) for n in range(1, 5)] == [5, 10, 20, 40]
    assert retry_delay(30, 5, 3600, rng=lambda: 1.0) == 3600
    assert retry_delay(10_000, 5, 3600, rng=lambda: 1.0) == 3600


def test_settings_are_validated_at_start():
    with pytest.raises(ConfigError, match="AETHERCORE_WEBHOOK_ALLOW"):
        Settings.from_env({"AETHERCORE_WEBHOOK_ALLOW": "127.0.0.1,not a host!"})
    with pytest.raises(ConfigError, match="AETHERCORE_WEBHOOK_RETRY_WINDOW"):
        Settings.from_env({"AETHERCORE_WEBHOOK_RETRY_WINDOW": str(8 * 86400)})
    with pytest.raises(ConfigError, match="AETHERCORE_WEBHOOK_RETRY_MAX_DELAY"):
        Settings.from_env({"AETHERCORE_WEBHOOK_RETRY_BASE": "10", "AETHERCORE_WEBHOOK_RETRY_MAX_DELAY": "5"})
    with pytest.raises(ConfigError, match="AETHERCORE_IDEMPOTENCY_TTL"):
        Settings.from_env({"AETHERCORE_IDEMPOTENCY_TTL": "0"})
    settings = Settings.from_env({"AETHERCORE_WEBHOOK_ALLOW": "127.0.0.1, Hooks.Internal., 10.0.0.0/8"})
    assert settings.webhook_allow == ("127.0.0.1/32", "hooks.internal", "10.0.0.0/8")


# -- what a job's end writes (real Redis) -------------------------------------------------------------------------
@pytest.fixture()
def store(scratch_redis):
    return JobStore(scratch_redis, ttl_s=60, dead_letter_ttl=600, dead_letter_max=3)


def _running(store: JobStore, webhook: str | None = None, deadline: float | None = None) -> tuple[str, dict]:
    job = store.create(
        kind="inference",
        model_id="m",
        device="cpu",
        owner="key:k",
        extra={"webhook": webhook, "role": "user"},
        payload=b"p",
    )
    work = {"job_id": job["job_id"], "inputs": {"text": "x"}, "submitted_at": time.time() - 5, "deadline": deadline}
    payload = requeue_payload(INFER, "cpu", {"model_id": "m", "jobs": [work]})
    assert store.mark_running(job["job_id"], "w1", payload) == 1
    return job["job_id"], work


def test_a_delivery_is_due_only_for_a_job_with_a_webhook(store, scratch_redis):
    plain, _ = _running(store)
    hooked, _ = _running(store, webhook=orjson.dumps({"url": "https://example.com/h", "owner": "key:k"}).decode())
    completion = Completion(store, LocalMetrics(), "w1", "cpu", threading.Event())
    completion.finish(
        "inference",
        "m",
        [
            completion.failed(JobContext({"job_id": j}, 1, time.time()), error_body("internal_error", "x"))
            for j in (plain, hooked)
        ],
    )
    assert scratch_redis.zrange(WEBHOOKS_DUE, 0, -1, withscores=True) == [(f"msg_{hooked}", 0.0)]
    record = scratch_redis.hgetall(webhook_delivery_key(f"msg_{hooked}"))
    assert record["ref"] == hooked and record["event"] == FAILED and record["queue"] == "cpu"
    assert not scratch_redis.exists(webhook_delivery_key(f"msg_{plain}"))
    assert 0 < scratch_redis.ttl(webhook_delivery_key(f"msg_{hooked}")) <= 8 * 86400
    assert store.finish(hooked, SUCCEEDED) is False  # ended once: no second delivery
    assert scratch_redis.zcard(WEBHOOKS_DUE) == 1


def test_poison_and_expired_in_queue_are_dead_letters_with_their_request(store, scratch_redis):
    completion = Completion(store, LocalMetrics(), "w1", "cpu", threading.Event())
    poison, poison_work = _running(store)
    late, late_work = _running(store, deadline=time.time() - 1)  # taken after its deadline
    midway, midway_work = _running(store, deadline=time.time() + 60)  # expired while it ran: not a dead letter
    completion.finish(
        "inference",
        "m",
        [
            completion.failed(JobContext(poison_work, 1, time.time()), error_body(POISON_JOB, "killed its worker")),
            completion.expired(JobContext(late_work, 1, time.time()), error_body(DEADLINE_EXCEEDED, "waited")),
            completion.expired(
                JobContext(midway_work, 1, late_work["submitted_at"]), error_body(DEADLINE_EXCEEDED, "ran out")
            ),
        ],
    )
    dead = DeadLetters(scratch_redis, 600, 3)
    entries = {e["job_id"]: e for e in dead.list()}
    assert set(entries) == {poison, late}
    assert entries[poison]["reason"] == POISON and entries[poison]["error"]["code"] == POISON_JOB
    assert entries[late]["reason"] == EXPIRED_IN_QUEUE and entries[late]["replayable"]
    assert orjson.loads(dead.get(late)["_request"]) == late_work  # what a replay submits again
    assert store.get(late)["status"] == EXPIRED and dead.depth() == {"cpu": 2}
    assert dead.counts() == {("cpu", POISON): 1, ("cpu", EXPIRED_IN_QUEUE): 1}
    for _ in range(4):  # bounded: at most dead_letter_max per queue
        job_id, work = _running(store)
        completion.finish(
            "inference", "m", [completion.failed(JobContext(work, 1, time.time()), error_body(POISON_JOB, "again"))]
        )
    assert dead.depth() == {"cpu": 3} and 0 < scratch_redis.ttl("aethercore:dead:cpu") <= 600


def test_an_idempotency_key_is_taken_with_the_job(store, scratch_redis):
    record = idempotency_key("key:k", "abc")
    first = store.create(kind="inference", model_id="m", device="cpu", idempotency=(record, "fp1", 60, "key:k"))
    with pytest.raises(IdempotencyConflict) as same:
        store.create(kind="inference", model_id="m", device="cpu", idempotency=(record, "fp1", 60, "key:k"))
    assert same.value.job_id == first["job_id"] and not same.value.reused
    with pytest.raises(IdempotencyConflict) as other:
        store.create(kind="inference", model_id="m", device="cpu", idempotency=(record, "fp2", 60, "key:k"))
    assert other.value.reused
    store.release_key(record, "someone-else", "key:k")  # only the job it names frees it
    assert scratch_redis.exists(record)
    store.release_key(record, first["job_id"], "key:k")
    assert store.create(kind="inference", model_id="m", device="cpu", idempotency=(record, "fp2", 60, "key:k"))
    assert 0 < scratch_redis.ttl(record) <= 60


def test_claims_leases_retries_and_failures(scratch_redis):
    deliveries, owners = Deliveries(scratch_redis), WebhookOwners(scratch_redis)
    deliveries.enqueue("msg_a", kind="batch", ref="a", webhook={"url": "https://x", "owner": "o"}, event="e")
    assert deliveries.claim(lease_s=0.2, limit=10) == ["msg_a"] and deliveries.claim(0.2, 10) == []
    assert deliveries.depth()["in_flight"] == 1
    time.sleep(0.3)  # the dispatcher that claimed it died: the lease lapses and it is due again
    assert deliveries.claim(lease_s=30, limit=10) == ["msg_a"]
    deliveries.retry_at("msg_a", time.time() + 30, 1, "HTTP 500")
    assert deliveries.depth()["retrying"] == 1 and deliveries.claim(30, 10) == []
    deliveries.failed("msg_a", "retries_exhausted", "HTTP 500", 7, keep_s=60)
    assert [d["id"] for d in deliveries.failed_list()] == ["msg_a"] and deliveries.depth()["failed"] == 1
    assert deliveries.retry("msg_a") and not deliveries.retry("msg_a")
    assert deliveries.claim(30, 10) == ["msg_a"]
    deliveries.delivered("msg_a")
    assert deliveries.get("msg_a") is None and sum(deliveries.depth().values()) == 0
    record = owners.secret("o", create=True)
    rotated = owners.secret("o", rotate=True, overlap_s=60)
    assert owners.signing_secrets("o") == [rotated["current"], record["current"]]
    assert owners.signing_secrets("o", now=time.time() + 61) == [rotated["current"]]
