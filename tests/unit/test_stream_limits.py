"""The checks and caps in front of every stream: resume positions (tasks/jobs/stream_hub.py), long-held request slots
(api/limits.py), per-process threads started again when they die (tasks/per_process.py)."""

from __future__ import annotations

import threading

import pytest
from flask import Flask, g

from access.principal import ANONYMOUS_ADMIN, Principal
from api.limits import LongRequests
from api.relay import resume_from
from config.roles import ADMIN, OPERATOR, USER, VIEWER
from config.settings import Settings
from config.values import ConfigError
from protocols.errors import ApiError
from tasks.jobs.stream_hub import InvalidPosition, canonical, position
from tasks.per_process import PerProcessThread

TOP = 2**64 - 1


@pytest.mark.parametrize(
    "text, expected",
    [("0-0", (0, 0)), ("1712-3", (1712, 3)), (f"{TOP}-{TOP}", (TOP, TOP)), ("007-01", (7, 1))],
)
def test_positions_redis_can_read_are_accepted(text, expected):
    assert position(text) == expected
    assert canonical(text) == f"{expected[0]}-{expected[1]}"


@pytest.mark.parametrize(
    "text",
    [
        "1" * 5000 + "-0",  # int() of it raises (and would be slow); refused before any int()
        f"{TOP + 1}-0",
        f"0-{TOP + 1}",
        "\u0661-0",  # a digit to int(), not to Redis
        "1712",
        "1712-",
        "-1",
        "1-2-3",
        "+1-0",
        " 1-0",
        "",
        "latest",
        "$",
    ],
)
def test_anything_else_is_refused(text):
    with pytest.raises(InvalidPosition):
        position(text)


def test_a_bad_last_event_id_is_a_400_that_does_not_echo_it():
    with Flask(__name__).test_request_context():
        assert resume_from(None) == "0-0"
        assert resume_from("0012-3") == "12-3"
        with pytest.raises(ApiError) as refused:
            resume_from("9" * 5000 + "-0")
    assert refused.value.status == 400 and refused.value.code == "bad_request"
    assert "9999" not in refused.value.message


def test_slots_are_capped_per_caller_and_in_all_and_given_back_once():
    slots = LongRequests(per_caller=2, total=3)
    a1, a2 = slots.take("a"), slots.take("a")
    with pytest.raises(ApiError) as mine:
        slots.take("a")
    assert mine.value.status == 429 and mine.value.code == "too_many_streams" and mine.value.headers["Retry-After"]
    b1 = slots.take("b")
    with pytest.raises(ApiError) as full:
        slots.take("c")
    assert full.value.status == 503 and full.value.code == "server_busy" and full.value.headers["Retry-After"]
    a1.release()
    a1.release()  # twice changes nothing
    assert slots.held("a") == 1 and slots.held() == 2
    with slots.take("c"):
        assert slots.held() == 3
    for slot in (a2, b1):
        slot.release()
    assert slots.held() == 0 and slots.held("a") == 0


def test_reserved_threads_must_leave_some_for_long_held_requests():
    with pytest.raises(ConfigError, match="AETHERCORE_RESERVED_THREADS"):
        Settings.from_env({"AETHERCORE_API_THREADS": "8", "AETHERCORE_RESERVED_THREADS": "8"})
    settings = Settings.from_env({"AETHERCORE_API_THREADS": "8", "AETHERCORE_RESERVED_THREADS": "2"})
    assert settings.api_threads - settings.reserved_threads == 6


class Dies(BaseException):
    pass


def test_a_dead_per_process_thread_is_started_again_with_its_state_kept():
    runs, resets, go_on = [], [], threading.Event()

    def target() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise Dies()  # the first thread dies
        go_on.wait(5)

    thread = PerProcessThread("test-per-process", target, lambda: resets.append(1))
    try:
        assert thread.ensure() is True
        thread._thread.join(5)
        assert thread.ensure() is True  # it died: started again...
        assert resets == [1]  # ...without resetting the owner's state
        assert thread.ensure() is False  # alive: left alone
        assert runs == [1, 1]
    finally:
        go_on.set()


@pytest.mark.parametrize(
    "who, capped",
    [
        (Principal("key-user", USER), True),
        (Principal("key-viewer", VIEWER), True),
        (Principal("key-admin", ADMIN), False),
        (Principal("key-operator", OPERATOR), False),
        (ANONYMOUS_ADMIN, True),  # auth off: capped by the client's address
    ],
)
def test_authenticated_admins_and_operators_are_capped_only_by_the_process_total(who, capped):
    slots = LongRequests(per_caller=1, total=3)
    with Flask(__name__).test_request_context(environ_base={"REMOTE_ADDR": "10.1.2.3"}):
        g.principal = who
        held = [slots.take()]
        if capped:
            with pytest.raises(ApiError) as refused:
                slots.take()
            assert refused.value.status == 429
        else:
            held += [slots.take(), slots.take()]
            with pytest.raises(ApiError) as full:
                slots.take()
            assert full.value.status == 503
        for slot in held:
            slot.release()
    assert slots.held() == 0
