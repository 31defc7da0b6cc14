"""The webhook contract's pieces on their own: outbound rules, Standard Webhooks signatures (checked with the
`standardwebhooks` package), the retry schedule, the settings; and, on the session's real Redis, what the Lua step
that ends a job writes: a delivery due exactly for a job with a webhook, a dead letter exactly for a poison job or
one expired in its queue (with what replays it), and the delivery store's claim, lease and failure paths, its caps per
endpoint and owner, its circuit breaker and its owners' account; and one deadline over a whole outbound attempt."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import orjson
import pytest
from standardwebhooks import Webhook

from config.settings import Settings
from config.values import ConfigError
from tasks.deadletters import EXPIRED_IN_QUEUE, POISON, DeadLetters
from tasks.errors import DEADLINE_EXCEEDED, POISON_JOB, error_body
from tasks.holdings import DELIVERIES, Holdings
from tasks.jobs import Jobs
from tasks.jobs.inflight import requeue_payload
from tasks.jobs.lifecycle import JobEnd
from tasks.jobs.records import IdempotencyConflict
from tasks.metrics import LocalMetrics
from tasks.names import HOLDINGS_PREFIX, INFER, WEBHOOKS_DUE, idempotency_key, webhook_delivery_key
from tasks.states import EXPIRED, FAILED, SUCCEEDED
from webhooks.deliveries import (
    ANSWERED,
    EXPIRE,
    UNHEALTHY,
    Deliveries,
    SlotLimits,
)
from webhooks.outbound import MAX_ANSWER_HEAD, DeliveryFailed, ForbiddenDestination, OutboundPolicy
from webhooks.owners import WebhookOwners
from webhooks.signing import new_secret, retry_delay, sign, signature_header
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


@pytest.mark.parametrize(
    "behaviour,url_scheme",
    [("trickle", "http"), ("hang", "http"), ("hang", "https")],  # https: a handshake that never ends
)
def test_one_deadline_bounds_the_whole_attempt(behaviour, url_scheme):
    """A receiver that answers a byte every 0.3 s (each socket operation quick, the whole answer 11 s), or accepts
    and never answers, is cut at the attempt's timeout."""
    from tests.webhook_receiver import HostileReceiver

    receiver = HostileReceiver(behaviour, "127.0.0.2", interval=0.3).start()
    try:
        url = receiver.url.replace("http:", f"{url_scheme}:")
        started = time.monotonic()
        with pytest.raises(DeliveryFailed, match="timed out"):
            OutboundPolicy.from_entries(["127.0.0.2"]).post(url, b"{}", {}, 1.0)
        took = time.monotonic() - started
        assert 0.9 < took < 1.5, took
    finally:
        receiver.stop()


@pytest.fixture()
def tls_receiver(tmp_path):
    """An https receiver on 127.0.0.2 (a throw-away certificate) answering 204, and a relay in front of it that
    passes the receiver's bytes on one every 50 ms (a TLS handshake of a few KB takes minutes through it); their
    ports."""
    import shutil
    import socket
    import ssl
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("needs the openssl CLI")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "cert.pem"]
        + ["-days", "1", "-subj", "/CN=hooks.test"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server, relay = socket.create_server(("127.0.0.2", 0)), socket.create_server(("127.0.0.2", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(5)
                    tls.recv(65536)
                    tls.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
            except OSError:
                continue

    def pump(source, sink, pause: float) -> None:
        try:
            while not stop.is_set() and (data := source.recv(1 if pause else 65536)):
                sink.sendall(data)
                time.sleep(pause)
        except OSError:
            pass

    def relay_one() -> None:
        while not stop.is_set():
            try:
                client, _ = relay.accept()
            except OSError:
                return
            upstream = socket.create_connection(server.getsockname())
            threading.Thread(target=pump, args=(client, upstream, 0), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, 0.05), daemon=True).start()

    for target in (serve, relay_one):
        threading.Thread(target=target, daemon=True).start()
    yield server.getsockname()[1], relay.getsockname()[1]
    stop.set()
    server.close()
    relay.close()


def test_a_tls_handshake_that_trickles_is_cut_at_the_deadline(tls_receiver):
    import ssl

    direct, trickled = tls_receiver
    trusting = ssl.create_default_context()
    trusting.check_hostname, trusting.verify_mode = False, ssl.CERT_NONE  # a throw-away certificate for an address
    policy = OutboundPolicy(networks=OutboundPolicy.from_entries(["127.0.0.2"]).networks, tls_context=trusting)
    assert policy.post(f"https://127.0.0.2:{direct}/hook", b"{}", {}, 5.0) == 204
    started = time.monotonic()
    with pytest.raises(DeliveryFailed, match="timed out"):
        policy.post(f"https://127.0.0.2:{trickled}/hook", b"{}", {}, 1.0)
    assert 0.9 < time.monotonic() - started < 1.5


def test_the_answer_head_is_read_into_a_bounded_buffer():
    from tests.webhook_receiver import HostileReceiver

    receiver = HostileReceiver("huge_headers", "127.0.0.2", size=32 * 2**20).start()
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryFailed, match=f"exceeds {MAX_ANSWER_HEAD} bytes"):
            OutboundPolicy.from_entries(["127.0.0.2"]).post(receiver.url, b"{}", {}, 5.0)
        assert time.monotonic() - started < 1.0
    finally:
        receiver.stop()


def test_a_name_that_resolves_to_a_private_address_is_never_connected_to(monkeypatch):
    """The policy's resolver says `hooks.example` is 10.0.0.5 and 169.254.169.254 (private, link-local): the POST
    is refused before any connection. The socket is guarded: a broken check fails here, it never leaves the
    machine."""
    import ipaddress
    import socket

    def resolver(host, port, *args, **kwargs):
        assert host == "hooks.example"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("10.0.0.5", "169.254.169.254")]

    def guarded(address, *args, **kwargs):
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"a connection to {address[0]} was attempted")
        return real_connect(address, *args, **kwargs)

    real_connect = socket.create_connection
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    monkeypatch.setattr(socket, "create_connection", guarded)
    with pytest.raises(ForbiddenDestination, match="resolves only to"):
        OutboundPolicy().post("https://hooks.example/hook", b"{}", {}, 2.0)
    allowed = OutboundPolicy.from_entries(["10.0.0.0/8"])
    with pytest.raises(AssertionError, match="10.0.0.5"):  # the guard itself works: an allowed private address
        allowed.post("https://hooks.example/hook", b"{}", {}, 2.0)


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
    return Jobs(scratch_redis, ttl_s=60, dead_letter_ttl=600, dead_letter_max=3)


def _running(store: Jobs, webhook: str | None = None, deadline: float | None = None) -> tuple[str, dict]:
    job = store.records.create(
        kind="inference",
        model_id="m",
        device="cpu",
        owner="key:k",
        extra={"webhook": webhook, "role": "user"},
        payload=b"p",
    )
    work = {"job_id": job["job_id"], "inputs": {"text": "x"}, "submitted_at": time.time() - 5, "deadline": deadline}
    payload = requeue_payload(INFER, "cpu", {"model_id": "m", "jobs": [work]})
    assert store.lifecycle.mark_running(job["job_id"], "w1", payload) == 1
    return job["job_id"], work


def test_a_delivery_is_due_only_for_a_job_with_a_webhook(store, scratch_redis):
    plain, _ = _running(store)
    hooked, _ = _running(store, webhook=orjson.dumps({"url": "https://example.com/h", "owner": "key:k"}).decode())
    completion = Completion(store.lifecycle, LocalMetrics(), "w1", "cpu", threading.Event())
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
    assert store.lifecycle.end_jobs([JobEnd(hooked, SUCCEEDED)]) == [False]  # ended once: no second delivery
    assert scratch_redis.zcard(WEBHOOKS_DUE) == 1


def test_poison_and_expired_in_queue_are_dead_letters_with_their_request(store, scratch_redis):
    completion = Completion(store.lifecycle, LocalMetrics(), "w1", "cpu", threading.Event())
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
    assert store.records.get(late)["status"] == EXPIRED and dead.depth() == {"cpu": 2}
    assert dead.counts() == {("cpu", POISON): 1, ("cpu", EXPIRED_IN_QUEUE): 1}
    for _ in range(4):  # bounded: at most dead_letter_max per queue
        job_id, work = _running(store)
        completion.finish(
            "inference", "m", [completion.failed(JobContext(work, 1, time.time()), error_body(POISON_JOB, "again"))]
        )
    assert dead.depth() == {"cpu": 3} and 0 < scratch_redis.ttl("aethercore:dead:cpu") <= 600


def test_an_idempotency_key_is_taken_with_the_job(store, scratch_redis):
    record = idempotency_key("key:k", "abc")
    first = store.records.create(kind="inference", model_id="m", device="cpu", idempotency=(record, "fp1", 60, "key:k"))
    with pytest.raises(IdempotencyConflict) as same:
        store.records.create(kind="inference", model_id="m", device="cpu", idempotency=(record, "fp1", 60, "key:k"))
    assert same.value.job_id == first["job_id"] and not same.value.reused
    with pytest.raises(IdempotencyConflict) as other:
        store.records.create(kind="inference", model_id="m", device="cpu", idempotency=(record, "fp2", 60, "key:k"))
    assert other.value.reused
    store.records.release_key(record, "someone-else", "key:k")  # only the job it names frees it
    assert scratch_redis.exists(record)
    store.records.release_key(record, first["job_id"], "key:k")
    assert store.records.create(kind="inference", model_id="m", device="cpu", idempotency=(record, "fp2", 60, "key:k"))
    assert 0 < scratch_redis.ttl(record) <= 60


def test_claims_leases_retries_and_failures(scratch_redis):
    deliveries, owners = Deliveries(scratch_redis), WebhookOwners(scratch_redis)
    deliveries.enqueue("msg_a", kind="batch", ref="a", webhook={"url": "https://x", "owner": "o"}, event="e")
    assert ids(deliveries.claim("t1", lease_s=0.2, limit=10)) == ["msg_a"] and ids(deliveries.claim("t", 0.2, 10)) == []
    assert deliveries.depth()["in_flight"] == 1
    time.sleep(0.3)  # the dispatcher that claimed it died: the lease lapses and it is due again
    assert ids(deliveries.claim("t2", lease_s=30, limit=10)) == ["msg_a"]
    assert not deliveries.retry_at("msg_a", "t1", time.time(), 1, "HTTP 200", ANSWERED)  # t1 lost it: not written
    assert deliveries.retry_at("msg_a", "t2", time.time() + 30, 1, "HTTP 500", UNHEALTHY)
    assert deliveries.depth()["retrying"] == 1 and ids(deliveries.claim("t3", 30, 10)) == []
    assert not deliveries.failed("msg_a", "t2", "retries_exhausted", "HTTP 500", 7, 60, UNHEALTHY)  # not leased now
    scratch_redis.zadd(WEBHOOKS_DUE, {"msg_a": 0})
    assert ids(deliveries.claim("t4", 30, 10)) == ["msg_a"]
    assert deliveries.failed("msg_a", "t4", "retries_exhausted", "HTTP 500", 7, 60, UNHEALTHY)
    assert [d["id"] for d in deliveries.failed_list()] == ["msg_a"] and deliveries.depth()["failed"] == 1
    assert deliveries.retry("msg_a") and not deliveries.retry("msg_a")
    assert ids(deliveries.claim("t5", 30, 10)) == ["msg_a"]
    assert not deliveries.delivered("msg_a", "t4") and deliveries.delivered("msg_a", "t5")
    assert deliveries.get("msg_a") is None and sum(deliveries.depth().values()) == 0
    record = owners.secret("o", create=True)
    rotated = owners.secret("o", rotate=True, overlap_s=60)
    assert owners.signing_secrets("o") == [rotated["current"], record["current"]]
    assert owners.signing_secrets("o", now=time.time() + 61) == [rotated["current"]]


def ids(claimed) -> list[str]:
    return [delivery_id for delivery_id, _mode in claimed.deliveries]


# -- what deliveries hold of the dispatchers: endpoint and owner caps, the circuit breaker, the account ---------------
SLOTS = SlotLimits(endpoint_max=2, owner_max=3, breaker_failures=2, breaker_cooldown_s=0.6, window_s=60, hold_max_s=1)


def enqueue(deliveries: Deliveries, delivery_id: str, url: str, owner: str = "o") -> None:
    deliveries.enqueue(delivery_id, kind="batch", ref=delivery_id, webhook={"url": url, "owner": owner}, event="e")


def test_busy_endpoints_and_owners_hold_deliveries_back_without_a_thread(scratch_redis):
    deliveries = Deliveries(scratch_redis, SLOTS)
    for n in range(1, 6):  # one endpoint (scheme, host, port), whatever the path
        enqueue(deliveries, f"msg_{n}", f"https://slow.example/{n}")
    enqueue(deliveries, "msg_6", "https://elsewhere.example/hook")
    enqueue(deliveries, "msg_7", "https://slow.example:443/1", owner="p")  # another owner's endpoint on that host
    claimed = deliveries.claim("t", 30, limit=10)
    assert ids(claimed) == ["msg_1", "msg_2", "msg_6", "msg_7"] and claimed.held == 3  # 2 per endpoint, 3 per owner
    assert ids(deliveries.claim("t", 30, 10)) == []  # held back: rescheduled, not in the way
    held = scratch_redis.zscore(WEBHOOKS_DUE, "msg_3") - time.time()
    assert 0.1 < held <= SLOTS.hold_max_s
    deliveries.delivered("msg_1", "t")
    time.sleep(held + 0.05)
    claimed = deliveries.claim("t2", 30, 10)
    assert ids(claimed) == ["msg_3"] and claimed.held == 2  # one slot came free
    assert scratch_redis.hget(webhook_delivery_key("msg_4"), "attempts") is None  # holding is not an attempt


def test_the_circuit_opens_after_consecutive_failures_and_one_probe_closes_it(scratch_redis):
    deliveries = Deliveries(scratch_redis, SLOTS)
    for n in range(1, 5):
        enqueue(deliveries, f"msg_{n}", "https://down.example/hook")
    assert ids(deliveries.claim("t", 30, 10)) == ["msg_1", "msg_2"]
    for n in (1, 2):
        assert deliveries.retry_at(f"msg_{n}", "t", time.time(), 1, "timed out", UNHEALTHY)
    circuit = deliveries.endpoint("o https://down.example:443")
    assert circuit["failures"] == "2" and float(circuit["open_until"]) > time.time()
    claimed = deliveries.claim("t", 30, 10)  # its due deliveries wait for the cool-down, none sent
    assert ids(claimed) == [] and claimed.held == 2
    assert scratch_redis.zscore(WEBHOOKS_DUE, "msg_1") == pytest.approx(float(circuit["open_until"]), abs=0.01)
    time.sleep(SLOTS.breaker_cooldown_s + 0.05)
    probe = deliveries.claim("t2", 30, 10)
    assert len(probe.deliveries) == 1 and probe.held == 3  # half-open: one probe
    probe_id = probe.deliveries[0][0]
    assert deliveries.endpoint("o https://down.example:443")["probe"] == probe_id
    assert deliveries.retry_at(probe_id, "t2", time.time() + 60, 2, "timed out", UNHEALTHY)  # it failed: open again
    assert float(deliveries.endpoint("o https://down.example:443")["open_until"]) > time.time() + 0.4
    time.sleep(SLOTS.breaker_cooldown_s + 0.05)
    probe = deliveries.claim("t3", 30, 10)
    assert len(probe.deliveries) == 1 and deliveries.delivered(probe.deliveries[0][0], "t3")  # it answered: closed
    assert deliveries.endpoint("o https://down.example:443") == {}
    time.sleep(SLOTS.hold_max_s + 0.05)
    assert len(deliveries.claim("t4", 30, 10).deliveries) == 2  # the cap again, not one at a time


def test_a_delivery_held_back_past_its_window_fails_for_good_unsent(scratch_redis):
    deliveries = Deliveries(scratch_redis, SlotLimits(endpoint_max=1, window_s=0.3, hold_max_s=1))
    for n in (1, 2):
        enqueue(deliveries, f"msg_{n}", "https://busy.example/hook")
    assert ids(deliveries.claim("t", 30, 10)) == ["msg_1"]
    assert deliveries.claim("t", 30, 10).held == 0  # held until its window ends (0.3 s), not longer
    time.sleep(0.35)
    assert deliveries.claim("t", 30, 10).deliveries == [("msg_2", EXPIRE)]


def test_an_ended_delivery_leaves_its_owners_account(scratch_redis):
    """The job-end step charges a delivery to its owner (DELIVERIES, force); delivered, it is dropped; failed for
    good, it stays charged while it is kept (AETHERCORE_WEBHOOK_FAILED_TTL)."""
    deliveries, holdings = Deliveries(scratch_redis), Holdings(scratch_redis, {})
    for n in (1, 2):
        enqueue(deliveries, f"msg_{n}", "https://x.example/hook")
    assert holdings.usage("o")[DELIVERIES].count == 2  # enqueue (a batch's end) charges too
    claimed = ids(deliveries.claim("t", 30, 10))
    assert deliveries.started("msg_1", "t", b"x" * 100, "e", time.time())
    assert holdings.usage("o")[DELIVERIES].bytes == 100  # its body, once built
    assert deliveries.delivered("msg_1", "t") and holdings.usage("o")[DELIVERIES].count == 1
    assert claimed == ["msg_1", "msg_2"]
    assert deliveries.failed("msg_2", "t", "retries_exhausted", "HTTP 500", 3, 120, UNHEALTHY)
    expires = scratch_redis.zscore(f"{HOLDINGS_PREFIX}o:{DELIVERIES}", "msg_2")
    assert holdings.usage("o")[DELIVERIES].count == 1 and expires == pytest.approx(time.time() + 120, abs=2)


def test_retrying_a_failed_delivery_closes_its_endpoints_circuit(scratch_redis):
    deliveries = Deliveries(scratch_redis, SLOTS)
    enqueue(deliveries, "msg_1", "https://back.example/hook")
    assert ids(deliveries.claim("t", 30, 10)) == ["msg_1"]
    scratch_redis.hset("aethercore:webhook:endpoint:o https://back.example:443", "open_until", time.time() + 600)
    assert deliveries.failed("msg_1", "t", "retries_exhausted", "HTTP 500", 3, 60, UNHEALTHY)
    assert deliveries.retry("msg_1")
    assert deliveries.endpoint("o https://back.example:443") == {}
    assert ids(deliveries.claim("t2", 30, 10)) == ["msg_1"]
