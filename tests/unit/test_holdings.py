"""The account of what each caller makes the service keep (tasks/holdings.py), against a real Redis."""

from __future__ import annotations

import threading
import time

import pytest

from tasks.holdings import (
    DEAD_LETTERS,
    FILES,
    OUTPUTS,
    OWNER_BYTES,
    OWNER_COUNT,
    TOTAL_BYTES,
    Held,
    Holdings,
    Quota,
    QuotaExceeded,
    quotas_from,
)

QUOTAS = {FILES: Quota(1000, 3, "AETHERCORE_FILES_QUOTA", "AETHERCORE_FILES_MAX_COUNT"), OUTPUTS: Quota(500, 0)}


def test_an_object_is_charged_to_its_owner_and_released_when_deleted(scratch_redis):
    holdings = Holdings(scratch_redis, QUOTAS)
    later = time.time() + 60
    holdings.put("key:a", FILES, "file-1", 400, later)
    holdings.put("key:a", FILES, "file-2", 100, later)
    holdings.put("key:b", FILES, "file-3", 50, later)
    assert holdings.usage("key:a")[FILES] == Held(500, 2)
    assert holdings.usage("key:b")[FILES] == Held(50, 1)
    assert holdings.totals()[FILES] == Held(550, 3)
    assert holdings.drop("key:a", FILES, "file-1") == 400
    assert holdings.drop("key:a", FILES, "file-1") == 0  # dropped once only
    assert holdings.usage("key:a")[FILES] == Held(100, 1)
    assert holdings.totals()[FILES] == Held(150, 2)


def test_a_quota_refuses_what_would_pass_it_and_writes_nothing(scratch_redis):
    holdings = Holdings(scratch_redis, QUOTAS)
    later = time.time() + 60
    holdings.put("key:a", FILES, "file-1", 900, later)
    with pytest.raises(QuotaExceeded) as refused:
        holdings.put("key:a", FILES, "file-2", 101, later)
    assert refused.value.reason == OWNER_BYTES
    assert "AETHERCORE_FILES_QUOTA=1000" in str(refused.value)
    assert holdings.usage("key:a")[FILES] == Held(900, 1)
    holdings.put("key:a", FILES, "file-2", 50, later)
    holdings.put("key:a", FILES, "file-3", 50, later)
    with pytest.raises(QuotaExceeded) as refused:
        holdings.put("key:a", FILES, "file-4", 0, later)
    assert refused.value.reason == OWNER_COUNT
    # resizing what is held is not a new object
    holdings.put("key:a", FILES, "file-3", 40, later)
    assert holdings.usage("key:a")[FILES] == Held(990, 3)
    # another owner is not affected
    holdings.put("key:b", FILES, "file-5", 1000, later)


def test_forced_charges_pass_the_quota(scratch_redis):
    holdings = Holdings(scratch_redis, QUOTAS)
    later = time.time() + 60
    holdings.put("key:a", OUTPUTS, "out-1", 500, later)
    with pytest.raises(QuotaExceeded):
        holdings.grow("key:a", OUTPUTS, "out-1", 1)
    assert holdings.grow("key:a", OUTPUTS, "out-1", 10, force=True)
    assert holdings.usage("key:a")[OUTPUTS] == Held(510, 1)
    assert not holdings.grow("key:a", OUTPUTS, "not-charged", 10)


def test_the_share_of_redis_bounds_every_owner_together(scratch_redis):
    holdings = Holdings(scratch_redis, {FILES: Quota(10_000, 0)}, total_limit=lambda: 1500)
    later = time.time() + 60
    holdings.put("key:a", FILES, "file-1", 1000, later)
    with pytest.raises(QuotaExceeded) as refused:
        holdings.put("key:b", FILES, "file-2", 600, later)
    assert refused.value.reason == TOTAL_BYTES and refused.value.global_limit
    holdings.put("key:b", FILES, "file-2", 500, later)


def test_expired_objects_leave_the_account(scratch_redis):
    holdings = Holdings(scratch_redis, QUOTAS)
    holdings.put("key:a", FILES, "file-1", 900, time.time() + 0.5)
    holdings.put("key:c", FILES, "file-9", 10, time.time() + 0.5)
    holdings.put("key:c", FILES, "file-10", 10, time.time() + 60)
    time.sleep(0.6)
    # the next charge of the owner takes its expired objects out first
    holdings.put("key:a", FILES, "file-2", 900, time.time() + 60)
    assert holdings.usage("key:a")[FILES] == Held(900, 1)
    # the sweep takes out everyone's and adds the accounts up again
    assert holdings.sweep() == 1
    assert holdings.usage("key:c")[FILES] == Held(10, 1)
    assert holdings.totals()[FILES] == Held(910, 2)
    assert set(holdings.owners()) == {"key:a", "key:c"}


def test_the_sweep_corrects_a_total_whose_account_expired(scratch_redis):
    holdings = Holdings(scratch_redis, QUOTAS)
    holdings.put("key:a", FILES, "file-1", 300, time.time() + 60)
    for key in scratch_redis.scan_iter("aethercore:holdings:key:a*"):
        scratch_redis.delete(key)  # as if its keys expired while nobody swept
    assert holdings.totals()[FILES] == Held(300, 1)
    holdings.sweep()
    assert holdings.totals()[FILES] == Held(0, 0)


def test_the_account_keys_expire_after_their_furthest_object(scratch_redis):
    holdings = Holdings(scratch_redis, QUOTAS)
    holdings.put("key:a", FILES, "file-1", 1, time.time() + 100)
    holdings.put("key:a", FILES, "file-2", 1, time.time() + 1000)
    for key in scratch_redis.scan_iter("aethercore:holdings:key:a*"):
        ttl = scratch_redis.ttl(key)
        assert 1000 < ttl <= 1000 + 3600 + 2, (key, ttl)
    assert holdings.renew("key:a", FILES, "file-1", time.time() + 5000)
    assert scratch_redis.ttl("aethercore:holdings:key:a") > 5000


def test_concurrent_charges_never_pass_the_quota_together(scratch_redis):
    holdings = Holdings(scratch_redis, {FILES: Quota(1000, 0)})
    later = time.time() + 60
    accepted, barrier = [], threading.Barrier(20)

    def upload(i: int) -> None:
        barrier.wait()
        try:
            holdings.put("key:a", FILES, f"file-{i}", 100, later)
            accepted.append(i)
        except QuotaExceeded:
            pass

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 10
    assert holdings.usage("key:a")[FILES] == Held(1000, 10)


def test_every_kind_has_its_limits_from_the_settings(settings):
    quotas = quotas_from(settings)
    assert quotas[FILES].max_bytes == settings.files_quota
    assert quotas[DEAD_LETTERS].max_count == settings.dead_letter_owner_max


def test_every_owners_usage_is_read_at_once(scratch_redis):
    holdings = Holdings(scratch_redis, QUOTAS)
    assert holdings.usage_by_owner() == {}
    later = time.time() + 60
    holdings.put("key:a", FILES, "file-1", 400, later)
    holdings.put("key:a", OUTPUTS, "out-1", 30, later)
    holdings.put("jwt:b", DEAD_LETTERS, "dead-1", 7, later, force=True)
    by_owner = holdings.usage_by_owner()
    assert set(by_owner) == {"key:a", "jwt:b"}
    assert by_owner["key:a"] == holdings.usage("key:a") and by_owner["key:a"][OUTPUTS] == Held(30, 1)
    assert by_owner["jwt:b"][DEAD_LETTERS] == Held(7, 1) and by_owner["jwt:b"][FILES] == Held(0, 0)
