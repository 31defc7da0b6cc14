"""Hostile inputs (issue 19, cases 2 and 8): tensor shapes, JSON nesting and number literals that once cost an API
process seconds of CPU under the GIL or answered 500, in every protocol that takes a body; and an OIP binary tensor
kept as its bytes (not a JSON list five times its size) in the job Redis holds.

Each attack runs as an ordinary `user`; while it is processed, /health/live of the same (single) API process must
answer within a second, the attack must get a 4xx in its protocol's error shape, and afterwards the process still
serves another caller (`assert_still_serving`). Limits: docs/SECURITY.md, "Input limits: bodies, shapes, nesting".
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import requests
import simple_websocket
import tritonclient.http as triton_http

from tests.hostile.conftest import assert_still_serving, auth, ensure_loaded
from tests.support import USER_KEY, close_quietly, wait_until, ws_connect

HUGE = "1" + "0" * 3999  # 10^3999: 4,000 digits, under Python's 4,300-digit int parsing limit
HUGER = "1" + "0" * 5000  # over it: the standard library's json.loads raises ValueError
HUGE_SHAPE = "[" + ",".join([HUGE] * 400) + "]"  # 1.6 MB: ~13 s of big-int multiplication on the old /serve
WIDE_SHAPE = json.dumps([2**62] * 300)  # valid 64-bit integers, far too many of them
OVERFLOWING_SHAPE = json.dumps([2**32, 2**32])  # 2^64 elements: 0 in int64 arithmetic
DEEP = 100_000  # nested lists: past every parser's recursion
DEEPISH = 900  # under orjson's own limit (1024), past Python's recursion once walked by recursive code
SERVE_MODEL, TEXT_MODEL, GENERATION_MODEL = "tiny-mlp", "minilm", "tiny-gpt2"


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def post(api, path: str, body: str | bytes, **headers: str) -> requests.Response:
    headers = {**auth(), "Content-Type": "application/json", **headers}
    return requests.post(f"{api.base}{path}", data=body, headers=headers, timeout=120)


def websocket(api, message: str | bytes) -> dict[str, Any]:
    """Send one request message on /serve/stream and return the first message the server answers with."""
    url = api.base.replace("http://", "ws://") + "/serve/stream"
    ws = ws_connect(url, headers={"Authorization": f"Bearer {USER_KEY}"})
    try:
        ws.send(message)
        answer = ws.receive(timeout=60)
        assert answer is not None, "the server sent nothing within 60 s"
        return json.loads(answer)
    except simple_websocket.ConnectionClosed as closed:
        raise AssertionError(f"the server closed the WebSocket without an answer ({closed.reason})") from None
    finally:
        close_quietly(ws)


def while_attacking(api, attacks: list[Callable[[], Any]]) -> list[Any]:
    """Run `attacks` in parallel threads; while any is in flight, /health/live of the attacked process must answer
    within a second every time. Returns each attack's result (or raises its exception)."""
    results: list[Any] = [None] * len(attacks)

    def run(index: int) -> None:
        try:
            results[index] = attacks[index]()
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the test's thread below
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(attacks))]
    for thread in threads:
        thread.start()
    slowest, probes = 0.0, 0
    while any(t.is_alive() for t in threads):
        started = time.monotonic()
        try:
            live = requests.get(f"{api.base}/health/live", timeout=30)
            assert live.status_code == 200, live.text
        except requests.RequestException as exc:
            raise AssertionError(f"/health/live failed while the attack was processed: {exc!r}") from None
        slowest, probes = max(slowest, time.monotonic() - started), probes + 1
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    assert slowest < 1.0, f"/health/live took {slowest:.2f} s ({probes} probes) while the attack was processed"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


# -- each protocol's error shape ------------------------------------------------------------------------------
def our_error(response: requests.Response) -> dict[str, Any]:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str), error
    return error


def oip_error(response: requests.Response) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert isinstance(error, str) and error, error
    return error


def openai_error(response: requests.Response) -> dict[str, Any]:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and isinstance(error["message"], str), error
    return error


def ws_error(message: dict[str, Any]) -> dict[str, Any]:
    assert message.get("type") == "error", message
    assert isinstance(message["error"]["code"], str) and isinstance(message["error"]["message"], str), message
    return message["error"]


def serve_tensor(shape: str, data: str = "[[1,2,3,4]]") -> str:
    return f'{{"model_id":"{SERVE_MODEL}","inputs":{{"features":{{"shape":{shape},"datatype":"FP32","data":{data}}}}}}}'


def batch_tensor(shape: str, data: str = "[[1,2,3,4]]") -> str:
    one = f'{{"features":{{"shape":{shape},"datatype":"FP32","data":{data}}}}}'
    return f'{{"model_id":"{SERVE_MODEL}","inputs":[{one}]}}'


def oip_tensor(shape: str, data: str = "[1,2,3,4]") -> str:
    return f'{{"inputs":[{{"name":"features","datatype":"FP32","shape":{shape},"data":{data}}}]}}'


OIP_INFER = f"/v2/models/{SERVE_MODEL}/infer"


# -- case 2: shapes -------------------------------------------------------------------------------------------
def test_huge_shapes_answer_4xx_while_the_process_stays_live(hostile_api, hostile_redis):
    api = hostile_api
    ensure_loaded(api, SERVE_MODEL)
    serve = [lambda: post(api, "/serve", serve_tensor(HUGE_SHAPE)) for _ in range(3)]
    batch = [lambda: post(api, "/serve/batch", batch_tensor(HUGE_SHAPE)) for _ in range(2)]
    oip = [lambda: post(api, OIP_INFER, oip_tensor(HUGE_SHAPE))]
    results = while_attacking(api, serve + batch + oip)
    for response in results[:5]:
        our_error(response)
    oip_error(results[5])
    assert_still_serving(api, hostile_redis)


@pytest.mark.parametrize("shape", [WIDE_SHAPE, OVERFLOWING_SHAPE, json.dumps([4, -1]), json.dumps([1, 4.0])])
def test_out_of_bounds_shapes_answer_4xx_in_each_protocol(hostile_api, hostile_redis, shape):
    api = hostile_api
    ensure_loaded(api, SERVE_MODEL)
    data = "[]" if shape == OVERFLOWING_SHAPE else None
    serve_data = data or "[[1,2,3,4]]"
    oip_data = data or "[1,2,3,4]"
    our_error(post(api, "/serve", serve_tensor(shape, serve_data)))
    our_error(post(api, "/serve/batch", batch_tensor(shape, serve_data)))
    ws_error(websocket(api, serve_tensor(shape, serve_data)))
    oip_error(post(api, OIP_INFER, oip_tensor(shape, oip_data)))
    # OIP binary: the JSON header declares the shape, the bytes follow
    header = (
        f'{{"inputs":[{{"name":"features","datatype":"FP32","shape":{shape},"parameters":{{"binary_data_size":16}}}}]}}'
    ).encode()
    binary = post(
        api,
        OIP_INFER,
        header + np.arange(4, dtype="<f4").tobytes(),
        **{"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    )
    oip_error(binary)
    assert_still_serving(api, hostile_redis)


def test_a_websocket_huge_shape_answers_an_error_message(hostile_api, hostile_redis):
    api = hostile_api
    ensure_loaded(api, SERVE_MODEL)
    shape = "[" + ",".join([HUGE] * 60) + "]"  # 240 KB: one message
    [message] = while_attacking(api, [lambda: websocket(api, serve_tensor(shape))])
    ws_error(message)
    assert_still_serving(api, hostile_redis)


# -- case 2: nesting and number literals ----------------------------------------------------------------------
@pytest.mark.parametrize("depth", [DEEP, DEEPISH])
def test_deep_nesting_answers_4xx_in_each_protocol(hostile_api, hostile_redis, depth):
    api = hostile_api
    ensure_loaded(api, SERVE_MODEL)
    deep = nested(depth)
    our_error(post(api, "/serve", serve_tensor("[1,4]", deep)))
    our_error(
        post(api, "/serve", f'{{"model_id":"{TEXT_MODEL}","inputs":{{"text":"hi"}},"parameters":{{"x":{deep}}}}}')
    )
    our_error(post(api, "/serve/batch", batch_tensor("[1,4]", deep)))
    ws_error(websocket(api, serve_tensor("[1,4]", deep)))
    oip_error(post(api, OIP_INFER, oip_tensor("[1,4]", deep)))
    header = f'{{"inputs":[{{"name":"features","datatype":"FP32","shape":[1,4],"data":{deep}}}]}}'.encode()
    oip_error(
        post(
            api,
            OIP_INFER,
            header + b"\0" * 16,
            **{"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
        )
    )
    openai_error(post(api, "/v1/embeddings", f'{{"model":"{TEXT_MODEL}","input":{deep}}}'))
    openai_error(post(api, "/v1/completions", f'{{"model":"{GENERATION_MODEL}","prompt":"hi","stop":{deep}}}'))
    openai_error(
        post(
            api,
            "/v1/chat/completions",
            f'{{"model":"{GENERATION_MODEL}","messages":[{{"role":"user","content":{deep}}}]}}',
        )
    )
    our_error(post(api, f"/models/{SERVE_MODEL}/load", f'{{"x":{deep}}}'))
    assert_still_serving(api, hostile_redis)


@pytest.mark.parametrize("literal", [HUGER, "-" + HUGER, HUGER + ".5", "1e999999"])
def test_huge_number_literals_answer_4xx_in_each_protocol(hostile_api, hostile_redis, literal):
    api = hostile_api
    body = f'{{"model_id":"{TEXT_MODEL}","inputs":{{"text":"hi"}},"parameters":{{"max_length":{literal}}}}}'
    our_error(post(api, "/serve", body))
    batch = f'{{"model_id":"{TEXT_MODEL}","inputs":[{{"text":"hi"}}],"timeout":{literal}}}'
    our_error(post(api, "/serve/batch", batch))
    ws_error(websocket(api, body))
    oip_error(post(api, OIP_INFER, oip_tensor(f"[1,{literal}]")))
    openai_error(post(api, "/v1/embeddings", f'{{"model":"{TEXT_MODEL}","input":"hi","dimensions":{literal}}}'))
    openai_error(post(api, "/v1/completions", f'{{"model":"{GENERATION_MODEL}","prompt":"hi","max_tokens":{literal}}}'))
    assert_still_serving(api, hostile_redis)


# -- case 8: an OIP binary tensor stays bytes in the job ------------------------------------------------------
def _queued_payload_size(client, model_id: str) -> int:
    """Bytes of the `payload` field (the job's message, kept until it starts) of the model's queued job."""
    from tasks.names import job_key
    from tasks.states import QUEUED

    for key in client.scan_iter(job_key("*"), count=1000):
        if key.endswith(":events") or client.type(key) != "hash":
            continue
        status, model, size = client.hget(key, "status"), client.hget(key, "model_id"), client.hstrlen(key, "payload")
        if status == QUEUED and model == model_id and size:
            return size
    return 0


def test_an_oip_binary_tensor_is_kept_as_bytes_in_the_job(hostile_api, hostile_worker, hostile_redis):
    api = hostile_api
    ensure_loaded(api, SERVE_MODEL)
    rows = 2**16  # 65,536 x 4 float32: 1 MiB of tensor (the most rows tiny-mlp's export takes)
    features = np.random.default_rng(8).standard_normal((rows, 4)).astype("<f4")
    raw = features.tobytes()
    header = binary_header(rows, len(raw))
    response: dict[str, Any] = {}

    def infer() -> None:
        response["r"] = post(
            api,
            OIP_INFER,
            header + raw,
            **{"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
        )

    # The worker (and its model processes) paused, the job stays queued with its message, which can be measured.
    os.killpg(hostile_worker.proc.pid, signal.SIGSTOP)
    try:
        sender = threading.Thread(target=infer, daemon=True)
        sender.start()
        try:
            size = wait_until(lambda: _queued_payload_size(hostile_redis, SERVE_MODEL), 4.0, 0.05, "the queued job")
        except Exception:
            size = None
    finally:
        os.killpg(hostile_worker.proc.pid, signal.SIGCONT)
    sender.join(120)
    assert size is not None, "the job never showed up queued with its payload within 4 s"
    assert size < 1.5 * len(raw) + 4096, f"the job's payload holds {size} bytes for a {len(raw)}-byte tensor"

    answer = response["r"]
    assert answer.status_code == 200, answer.text[:500]
    result = triton_http.InferResult.from_response_body(
        answer.content, header_length=int(answer.headers["Inference-Header-Content-Length"])
    )
    logits = result.as_numpy("logits")
    assert logits.shape == (rows, 3) and logits.dtype == np.float32
    # the same numbers as the JSON path gives for the same rows
    picked = features[[0, 1, rows // 2, rows - 1]]
    served = post(api, "/serve?wait=60", json.dumps({"model_id": SERVE_MODEL, "inputs": {"features": picked.tolist()}}))
    assert served.status_code == 200, served.text
    expected = np.array(served.json()["result"]["output"]["logits"]["data"], dtype=np.float32).reshape(4, 3)
    assert np.allclose(logits[[0, 1, rows // 2, rows - 1]], expected, atol=1e-5)
    assert_still_serving(api, hostile_redis)


def test_a_tensor_past_the_models_traced_range_is_invalid_input(hostile_api, hostile_redis):
    """tiny-mlp was exported for at most 65,536 rows: one more is the request's fault (400), not a 500."""
    api = hostile_api
    ensure_loaded(api, SERVE_MODEL)
    rows = 2**16 + 1
    raw = np.zeros((rows, 4), dtype="<f4").tobytes()
    header = binary_header(rows, len(raw))
    answer = post(
        api,
        OIP_INFER,
        header + raw,
        **{"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    )
    assert answer.status_code == 400 and "65536" in oip_error(answer), answer.text[:500]
    assert_still_serving(api, hostile_redis)


def binary_header(rows: int, size: int) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "features", "datatype": "FP32", "shape": [rows, 4], "parameters": {"binary_data_size": size}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
