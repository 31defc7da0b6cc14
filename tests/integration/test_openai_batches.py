"""The OpenAI Files and Batch APIs with the stock `openai` client against real API processes (auth on), batch
drivers, workers and models: files create/list/retrieve/content/delete; batches create/retrieve/list/cancel for
each endpoint, their output and error files equal to what the same /v1 requests answer; validation errors with line
numbers; owners isolated; the window's end; backpressure that delays lines and fails none; a worker SIGKILLed and
a batch driver SIGKILLed mid-batch, every line still answered exactly once."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import numpy as np
import openai
import pytest
import redis
import requests

from tasks.names import batch_key
from tests.support import (
    ADMIN_KEY,
    OTHER_USER_KEY,
    USER_KEY,
    ApiProcess,
    RedisServer,
    WorkerProcess,
    wait_until,
)

ENDED = ("completed", "failed", "expired", "cancelled")


def client(api, key: str = USER_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.base}/v1", api_key=key, max_retries=0, timeout=60)


def jsonl(lines: list[Any]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def request_line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def start_batch(oai: openai.OpenAI, endpoint: str, lines: list[Any], **extra: Any):
    source = oai.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    return oai.batches.create(input_file_id=source.id, endpoint=endpoint, completion_window="24h", **extra)


def wait_for(oai: openai.OpenAI, batch_id: str, done=lambda b: b.status in ENDED, timeout: float = 180):
    def ready():
        batch = oai.batches.retrieve(batch_id)
        return batch if done(batch) else None

    return wait_until(ready, timeout, 0.25, f"batch {batch_id}")


def entries(oai: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in oai.files.content(file_id).text.splitlines()]


def answered_once(batch, output: list[dict], errors: list[dict], custom_ids: list[str]) -> None:
    """Every line answered exactly once, in one file or the other, and counted."""
    seen = [e["custom_id"] for e in output + errors]
    assert sorted(seen) == sorted(custom_ids), "a line answered twice or never"
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (len(custom_ids), len(output), len(errors))


@pytest.fixture(scope="module")
def oai(auth_api_server):
    return client(auth_api_server)


@pytest.fixture(scope="module")
def slow_api_server(main_redis_url, main_worker):
    """An API whose batches run two lines at a time, whose callers may submit 10 jobs a second, and whose files and
    requests are small: cancel, the window's end, backpressure and the limits, against the session's worker."""
    server = ApiProcess(
        main_redis_url,
        name="api-batches-slow",
        AETHERCORE_AUTH="true",
        AETHERCORE_BATCH_MAX_IN_FLIGHT="2",
        AETHERCORE_RATE_LIMIT="10/second",
        AETHERCORE_MAX_REQUEST_BYTES="4KB",
        AETHERCORE_FILES_MAX_BYTES="20KB",
        AETHERCORE_FILES_QUOTA="40KB",
        AETHERCORE_BATCH_MAX_LINES="50",
    ).start()
    yield server
    server.stop()


@pytest.fixture()
def slow_api(slow_api_server):
    """The slow API, with its batch driver for the test (the driver reads those settings; the session API's driver
    stands aside meanwhile, tests.support `_DRIVING`)."""
    with slow_api_server.driving():
        yield slow_api_server


# -- files ------------------------------------------------------------------------------------------------------------
def test_files_create_list_retrieve_content_delete(oai, auth_api_server):
    content = jsonl([request_line("a", "/v1/embeddings", {"model": "minilm", "input": "héllo"})]) + b"\n \n"
    created = oai.files.create(file=("mine.jsonl", content), purpose="batch")
    assert (created.object, created.purpose, created.filename, created.bytes) == (
        "file",
        "batch",
        "mine.jsonl",
        len(content),
    )
    assert created.id.startswith("file-") and created.expires_at > created.created_at
    assert oai.files.retrieve(created.id).bytes == len(content)
    assert created.id in [f.id for f in oai.files.list()]
    assert created.id in [f.id for f in oai.files.list(purpose="batch")]
    assert created.id not in [f.id for f in oai.files.list(purpose="batch_output")]
    assert oai.files.content(created.id).content == content  # byte for byte

    # another user sees nothing of it; an admin sees it
    other = client(auth_api_server, OTHER_USER_KEY)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(created.id)
    with pytest.raises(openai.NotFoundError):
        other.files.delete(created.id)
    assert created.id not in [f.id for f in other.files.list()]
    assert client(auth_api_server, ADMIN_KEY).files.retrieve(created.id).id == created.id

    deleted = oai.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(created.id)


def test_bad_uploads_are_refused_in_openai_shape(oai, auth_api_server):
    with pytest.raises(openai.UnprocessableEntityError) as purpose:
        oai.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert purpose.value.param == "purpose"
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    as_json = requests.post(f"{auth_api_server.base}/v1/files", json={"purpose": "batch"}, headers=headers, timeout=10)
    assert as_json.status_code == 415 and as_json.json()["error"]["type"] == "invalid_request_error"
    no_file = requests.post(f"{auth_api_server.base}/v1/files", files={"purpose": (None, "batch")}, headers=headers)
    assert no_file.status_code == 422 and no_file.json()["error"]["param"] == "file"
    with pytest.raises(openai.NotFoundError):
        oai.batches.create(input_file_id="file-" + "0" * 32, endpoint="/v1/embeddings", completion_window="24h")
    source = oai.files.create(file=("x.jsonl", b"{}\n"), purpose="batch")
    with pytest.raises(openai.UnprocessableEntityError) as endpoint:
        oai.batches.create(input_file_id=source.id, endpoint="/v1/moderations", completion_window="24h")
    assert endpoint.value.param == "endpoint"
    with pytest.raises(openai.UnprocessableEntityError) as window:
        oai.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="1h")
    assert window.value.param == "completion_window"


EIGHTEEN_KB = (b"x" * 999 + b"\n") * 18  # 18 lines, each shorter than slow_api's largest request


def test_file_and_line_limits(slow_api_server):  # uploads only: no batch runs
    oai = client(slow_api_server, OTHER_USER_KEY)  # a quota of its own, left as it found it
    with pytest.raises(openai.APIStatusError) as too_large:
        oai.files.create(file=("big.jsonl", b"x" * 21_000), purpose="batch")
    assert too_large.value.status_code == 413 and too_large.value.code == "file_too_large"
    with pytest.raises(openai.BadRequestError) as too_long:
        oai.files.create(file=("long.jsonl", jsonl(["{}"] * 51)), purpose="batch")
    assert "AETHERCORE_BATCH_MAX_LINES" in too_long.value.message
    kept = [oai.files.create(file=(f"{i}.jsonl", EIGHTEEN_KB), purpose="batch") for i in range(2)]
    with pytest.raises(openai.APIStatusError) as quota:
        oai.files.create(file=("third.jsonl", EIGHTEEN_KB), purpose="batch")
    assert quota.value.status_code == 413 and quota.value.code == "quota_exceeded"
    for f in kept:
        oai.files.delete(f.id)
    again = oai.files.create(file=("now.jsonl", EIGHTEEN_KB), purpose="batch")
    assert again.bytes == 18_000 and oai.files.delete(again.id).deleted


# -- batches, one per endpoint ----------------------------------------------------------------------------------------
def test_an_embeddings_batch_answers_what_v1_answers(oai):
    texts = ["hello world", "a second and rather longer sentence", "third"]
    lines = [
        request_line("plain", "/v1/embeddings", {"model": "minilm", "input": texts[0]}),
        request_line("packed", "/v1/embeddings", {"model": "minilm", "input": texts[1], "encoding_format": "base64"}),
        request_line("several", "/v1/embeddings", {"model": "minilm", "input": texts}),
    ]
    created = start_batch(oai, "/v1/embeddings", lines, metadata={"purpose": "test"})
    assert created.status == "validating" and created.endpoint == "/v1/embeddings"
    assert created.expires_at - created.created_at == 86400 and created.metadata == {"purpose": "test"}
    batch = wait_for(oai, created.id)
    assert batch.status == "completed" and batch.model == "minilm" and batch.error_file_id is None
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    output = {e["custom_id"]: e for e in entries(oai, batch.output_file_id)}
    answered_once(batch, list(output.values()), [], ["plain", "packed", "several"])

    for entry in output.values():
        assert entry["error"] is None and entry["response"]["status_code"] == 200
        assert entry["id"].startswith("batch_req_") and entry["response"]["request_id"]
    same = oai.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
    plain = output["plain"]["response"]["body"]
    assert plain["object"] == "list" and plain["model"] == "minilm"
    assert plain["usage"] == same.usage.model_dump(exclude_none=True)
    assert np.allclose(plain["data"][0]["embedding"], same.data[0].embedding, atol=1e-5)
    packed = output["packed"]["response"]["body"]["data"][0]["embedding"]
    assert isinstance(packed, str) and len(np.frombuffer(base64.b64decode(packed), "<f4")) == 384
    several = output["several"]["response"]["body"]
    assert [d["index"] for d in several["data"]] == [0, 1, 2]
    assert np.allclose(several["data"][0]["embedding"], plain["data"][0]["embedding"], atol=1e-5)
    assert batch.usage.input_tokens == sum(e["response"]["body"]["usage"]["prompt_tokens"] for e in output.values())

    out_file = oai.files.retrieve(batch.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.bytes == len(oai.files.content(out_file.id).content)
    assert batch.id in [b.id for b in oai.batches.list()]
    with pytest.raises(openai.ConflictError):  # it ended: nothing to cancel
        oai.batches.cancel(batch.id)
    assert oai.files.delete(batch.input_file_id).deleted  # it has ended: its input file may go


def test_completions_and_chat_batches_answer_what_v1_answers(oai):
    prompts = ["Once upon a time", "The weather today"]
    completion_lines = [
        request_line(f"c{i}", "/v1/completions", {"model": "tiny-gpt2", "prompt": p, "max_tokens": 6, "temperature": 0})
        for i, p in enumerate(prompts)
    ]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat_lines = [
        request_line("chat", "/v1/chat/completions", {"model": "tiny-gpt2", "messages": messages, "max_tokens": 6})
    ]
    completions = start_batch(oai, "/v1/completions", completion_lines)
    chat = start_batch(oai, "/v1/chat/completions", chat_lines)

    done = wait_for(oai, completions.id)
    assert done.status == "completed" and done.request_counts.completed == 2
    for entry in entries(oai, done.output_file_id):
        body = entry["response"]["body"]
        prompt = prompts[int(entry["custom_id"][1:])]
        same = oai.completions.create(model="tiny-gpt2", prompt=prompt, max_tokens=6, temperature=0)
        assert body["object"] == "text_completion" and body["id"] == f"cmpl-{entry['response']['request_id']}"
        assert body["choices"][0]["text"] == same.choices[0].text
        assert body["usage"] == same.usage.model_dump(exclude_none=True)

    done = wait_for(oai, chat.id)
    assert done.status == "completed"
    (entry,) = entries(oai, done.output_file_id)
    same = oai.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=6, temperature=0)
    body = entry["response"]["body"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {
        "role": "assistant",
        "content": same.choices[0].message.content,
    }
    assert done.usage.output_tokens == 6 and done.usage.total_tokens == body["usage"]["total_tokens"]


def test_a_line_refused_at_run_time_is_answered_as_v1_refuses_it(oai):
    """A user may not load minilm-onnx (not `autoload`): the batch's line gets the 409 the /v1 request gets."""
    try:
        oai.embeddings.create(model="minilm-onnx", input="x")
        expected = 200
    except openai.APIStatusError as exc:
        expected = exc.status_code
    batch = wait_for(
        oai,
        start_batch(
            oai, "/v1/embeddings", [request_line("x", "/v1/embeddings", {"model": "minilm-onnx", "input": "x"})]
        ).id,
    )
    assert batch.status == "completed"
    (entry,) = entries(oai, batch.output_file_id) + entries(oai, batch.error_file_id)
    assert entry["response"]["status_code"] == expected
    if expected == 409:
        assert batch.output_file_id is None and batch.request_counts.failed == 1
        error = entry["response"]["body"]["error"]
        assert error["code"] == "model_not_loaded" and error["type"] == "invalid_request_error"


# -- validation -------------------------------------------------------------------------------------------------------
def test_an_invalid_input_file_fails_the_batch_with_line_numbers(oai):
    good = request_line(
        "ok", "/v1/chat/completions", {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "Hi"}]}
    )
    lines = [
        good,  # 1
        '{"custom_id": "broken", "method": "POST"',  # 2: not JSON
        {**good},  # 3: custom_id "ok" again
        {**good, "custom_id": "url", "url": "/v1/completions"},  # 4: another endpoint
        {**good, "custom_id": "model", "body": {**good["body"], "model": "no-such-model"}},  # 5
        {**good, "custom_id": "range", "body": {**good["body"], "temperature": 500}},  # 6
        {**good, "custom_id": "method", "method": "GET"},  # 7
        "",  # 8: empty
        {**good, "custom_id": "stream", "body": {**good["body"], "stream": True}},  # 9
    ]
    content = jsonl(lines) + b'{"custom_id": "\xff", "method": "POST"}\n'  # 10: not UTF-8
    source = oai.files.create(file=("requests.jsonl", content), purpose="batch")
    assert oai.files.content(source.id).content == content  # kept as sent
    created = oai.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = wait_for(oai, created.id)
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert batch.request_counts.total == 0 and batch.in_progress_at is None
    found = {(e.line, e.code) for e in batch.errors.data}
    assert {
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "mismatched_url"),
        (5, "model_not_found"),
        (6, "validation_error"),
        (7, "invalid_request"),
        (8, "invalid_json_line"),
        (9, "validation_error"),
        (10, "invalid_json_line"),
    } <= found, found
    assert not any(e.line == 1 for e in batch.errors.data)
    by_line = {e.line: e for e in batch.errors.data}
    assert by_line[6].param == "temperature" and by_line[3].param == "custom_id"
    assert oai.files.delete(batch.input_file_id).deleted  # a failed batch no longer holds its file

    empty = wait_for(oai, start_batch(oai, "/v1/embeddings", ["", ""]).id)
    assert empty.status == "failed" and [e.code for e in empty.errors.data] == ["empty_file"]


def test_a_line_larger_than_any_request_is_refused_at_upload(slow_api_server):  # an upload refused
    oai = client(slow_api_server)
    big = request_line("big", "/v1/embeddings", {"model": "sim-h100", "input": "word " * 1000})
    small = request_line("a", "/v1/embeddings", {"model": "sim-h100", "input": "x"})
    with pytest.raises(openai.BadRequestError) as refused:
        oai.files.create(file=("big.jsonl", jsonl([small, big])), purpose="batch")
    assert refused.value.code == "invalid_file" and "line 2 " in refused.value.message
    assert "AETHERCORE_MAX_REQUEST_BYTES" in refused.value.message


# -- owners -----------------------------------------------------------------------------------------------------------
def test_owners_see_only_their_own_batches(oai, auth_api_server):
    line = request_line("a", "/v1/embeddings", {"model": "minilm", "input": "mine"})
    mine = start_batch(oai, "/v1/embeddings", [line])
    other = client(auth_api_server, OTHER_USER_KEY)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(mine.id)
    with pytest.raises(openai.NotFoundError):  # nor may it run a batch over someone else's file
        other.batches.create(input_file_id=mine.input_file_id, endpoint="/v1/embeddings", completion_window="24h")
    assert mine.id not in [b.id for b in other.batches.list()]
    done = wait_for(oai, mine.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.output_file_id)
    admin = client(auth_api_server, ADMIN_KEY)
    assert admin.batches.retrieve(mine.id).status == "completed"
    assert entries(admin, done.output_file_id)[0]["custom_id"] == "a"
    # the batch's lines ran as the owner's jobs
    jobs = requests.get(
        f"{auth_api_server.base}/jobs?limit=200", headers={"Authorization": f"Bearer {USER_KEY}"}
    ).json()
    assert any(j["request_id"] == f"{mine.id}.0" for j in jobs["jobs"])


def test_listing_pages_with_after_and_limit(oai):
    ids = [
        start_batch(oai, "/v1/embeddings", [request_line("a", "/v1/embeddings", {"model": "minilm", "input": "p"})]).id
        for _ in range(3)
    ]
    first = oai.batches.list(limit=2)
    assert len(first.data) == 2 and first.has_more and first.data[0].id == ids[-1]
    second = oai.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == ids[0]
    listed = [b.id for b in oai.batches.list(limit=1)]  # the client follows the cursor across pages
    assert listed[:3] == ids[::-1]
    for batch_id in ids:
        wait_for(oai, batch_id)


# -- cancel, the window, backpressure ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "endpoint,body",
    [
        ("/v1/embeddings", {"model": "minilm", "input": "some text to embed"}),
        ("/v1/completions", {"model": "tiny-gpt2", "prompt": "Once upon a time", "max_tokens": 4}),
        (
            "/v1/chat/completions",
            {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        ),
    ],
)
def test_cancel_keeps_what_finished_and_never_runs_the_rest(slow_api, endpoint, body):
    oai = client(slow_api)
    custom_ids = [f"r{i}" for i in range(40)]
    created = start_batch(oai, endpoint, [request_line(c, endpoint, body) for c in custom_ids])
    wait_for(oai, created.id, lambda b: b.request_counts.completed >= 3, timeout=120)
    with pytest.raises(openai.ConflictError):  # an unfinished batch reads it
        oai.files.delete(created.input_file_id)
    cancelling = oai.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait_for(oai, created.id)
    assert batch.status == "cancelled" and batch.cancelled_at >= batch.cancelling_at
    output, errors = entries(oai, batch.output_file_id), entries(oai, batch.error_file_id)
    answered_once(batch, output, errors, custom_ids)
    assert len(output) >= 3 and len(errors) >= 20  # two at a time: most never started
    assert all(e["response"]["status_code"] == 200 for e in output)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"} and all(e["response"] is None for e in errors)
    assert oai.batches.cancel(created.id).status == "cancelled"  # cancelling again changes nothing
    assert oai.files.delete(created.input_file_id).deleted  # it has ended: its input may go


def test_the_window_expires_what_is_left(slow_api, main_redis_url):
    oai = client(slow_api)
    custom_ids = [f"r{i}" for i in range(30)]
    body = {"model": "sim-h100", "input": "some text"}
    created = start_batch(oai, "/v1/embeddings", [request_line(c, "/v1/embeddings", body) for c in custom_ids])
    wait_for(oai, created.id, lambda b: b.request_counts.completed >= 2)
    redis.Redis.from_url(main_redis_url).hset(batch_key(created.id), "expires_at", int(time.time()) - 1)  # 24 h later
    batch = wait_for(oai, created.id)
    assert batch.status == "expired" and batch.expired_at
    output, errors = entries(oai, batch.output_file_id), entries(oai, batch.error_file_id)
    answered_once(batch, output, errors, custom_ids)
    assert len(output) >= 2 and errors and {e["error"]["code"] for e in errors} == {"batch_expired"}
    oai.files.delete(batch.input_file_id)


def test_backpressure_delays_lines_and_fails_none(slow_api):
    """10 submissions a second for the caller: a batch of 40 lines takes its time and every line succeeds."""
    oai = client(slow_api)
    custom_ids = [f"r{i}" for i in range(40)]
    body = {"model": "sim-h100", "input": "x"}
    started = time.monotonic()
    batch = wait_for(
        oai, start_batch(oai, "/v1/embeddings", [request_line(c, "/v1/embeddings", body) for c in custom_ids]).id
    )
    assert batch.status == "completed" and batch.request_counts.failed == 0 and batch.request_counts.completed == 40
    assert time.monotonic() - started >= 2.5  # the rate limit held it back
    answered_once(batch, entries(oai, batch.output_file_id), [], custom_ids)
    oai.files.delete(batch.input_file_id)


# -- processes dying mid-batch ----------------------------------------------------------------------------------------
def test_a_worker_sigkilled_mid_batch_leaves_every_line_answered_once():
    server = RedisServer().start()
    url = server.url(0)
    workers = [WorkerProcess(url, name="batch-worker-a").start()]
    api = ApiProcess(
        url, name="api-batches-kill", batches=True, AETHERCORE_AUTH="true", AETHERCORE_BATCH_MAX_IN_FLIGHT="16"
    ).start()
    try:
        oai = client(api)
        custom_ids = [f"r{i}" for i in range(120)]
        body = {"model": "sim-gpt2-h100", "prompt": "the device", "max_tokens": 60}
        created = start_batch(oai, "/v1/completions", [request_line(c, "/v1/completions", body) for c in custom_ids])
        wait_for(oai, created.id, lambda b: b.request_counts.completed >= 20)
        workers[0].kill()  # SIGKILL, its model processes with it, lines running and queued
        workers.append(WorkerProcess(url, name="batch-worker-b").start())
        batch = wait_for(oai, created.id, timeout=240)
        assert batch.status == "completed", batch
        output, errors = entries(oai, batch.output_file_id), entries(oai, batch.error_file_id)
        assert errors == []
        answered_once(batch, output, errors, custom_ids)
        assert all(e["response"]["body"]["usage"]["completion_tokens"] == 60 for e in output)
        # The reaper took the dead worker's work: the jobs it held running, or (killed between two passes, holding
        # none) the messages it had taken and not started (workers/reaper.py).
        log = workers[1].log()
        assert "queueing its" in log or "its message was lost" in log, log[-2000:]
    finally:
        api.stop()
        for worker in workers:
            worker.stop()
        server.cleanup()


def test_a_batch_survives_its_driver_being_sigkilled(main_redis_url, main_worker):
    api = ApiProcess(
        main_redis_url,
        name="api-batches-restart",
        batches=True,
        AETHERCORE_AUTH="true",
        AETHERCORE_BATCH_MAX_IN_FLIGHT="4",
    ).start()
    try:
        custom_ids = [f"r{i}" for i in range(150)]
        body = {"model": "sim-h100", "input": "some text"}
        oai = client(api)
        created = start_batch(oai, "/v1/embeddings", [request_line(c, "/v1/embeddings", body) for c in custom_ids])
        wait_for(oai, created.id, lambda b: b.request_counts.completed >= 20)
        api.driver.kill()  # SIGKILL: no driver is left driving it, and its lease stays until it lapses
        api.start_driver()
        batch = wait_for(oai, created.id)
        assert batch.status == "completed", batch
        output, errors = entries(oai, batch.output_file_id), entries(oai, batch.error_file_id)
        assert errors == []
        answered_once(batch, output, errors, custom_ids)
    finally:
        api.stop()
