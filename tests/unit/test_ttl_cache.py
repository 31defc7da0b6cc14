"""tasks/ttl_cache.py: one reader per expired value, the others served the value it replaces; a clear wins over a
read begun before it."""

from __future__ import annotations

import threading

from tasks.ttl_cache import TTLCache


def test_a_value_is_read_once_within_its_ttl_and_again_after_it():
    cache, reads = TTLCache(60.0), []
    assert cache.get("k", lambda: reads.append(1) or "v1") == "v1"
    assert cache.get("k", lambda: reads.append(2) or "v2") == "v1"
    assert reads == [1]
    cache.ttl_s = 0.0
    assert cache.get("k", lambda: reads.append(3) or "v3") == "v3"


def test_while_one_caller_reads_an_expired_value_the_others_get_the_old_one_without_reading():
    cache = TTLCache(0.0)  # every value expired at once
    assert cache.get("k", lambda: "old") == "old"
    started, release, reads = threading.Event(), threading.Event(), []

    def slow_read():
        reads.append("slow")
        started.set()
        release.wait(5)
        return "new"

    got = {}
    reader = threading.Thread(target=lambda: got.setdefault("reader", cache.get("k", slow_read)))
    reader.start()
    assert started.wait(5)
    # The herd: none of them reads Redis again while the first read is out.
    others = [cache.get("k", lambda: reads.append("herd") or "herd") for _ in range(50)]
    release.set()
    reader.join(5)
    assert others == ["old"] * 50 and reads == ["slow"] and got["reader"] == "new"
    assert cache.get("k", lambda: "after") == "after"  # expired again (ttl 0): read afresh


def test_a_first_read_has_nothing_older_to_serve_so_every_caller_reads():
    cache, reads = TTLCache(60.0), []
    assert cache.get("k", lambda: reads.append(1) or "v") == "v"
    assert cache.get("other", lambda: reads.append(2) or "w") == "w"
    assert reads == [1, 2]


def test_a_failed_read_leaves_the_old_value_and_the_next_caller_reads_again():
    cache = TTLCache(0.0)
    cache.get("k", lambda: "old")

    def broken():
        raise ConnectionError("redis down")

    try:
        cache.get("k", broken)
    except ConnectionError:
        pass
    else:
        raise AssertionError("the read's error must reach its caller")
    assert cache.get("k", lambda: "fresh") == "fresh"  # no read left marked as in progress


def test_a_read_begun_before_a_clear_is_not_kept():
    cache = TTLCache(60.0)
    started, release = threading.Event(), threading.Event()

    def read_before_the_change():
        started.set()
        release.wait(5)
        return "before"

    reader = threading.Thread(target=lambda: cache.get("k", read_before_the_change))
    reader.start()
    assert started.wait(5)
    cache.clear("k")  # the change is announced while the old value is on its way
    release.set()
    reader.join(5)
    assert cache.get("k", lambda: "after") == "after"


def test_bumps_count_local_changes_until_the_value_is_read_again():
    cache = TTLCache(0.0)
    cache.get("q", lambda: 3)
    assert [cache.bump("q") for _ in range(3)] == [0, 1, 2]
    cache.get("q", lambda: 5)
    assert cache.bump("q") == 0
