"""A bounded fuzzer past schemathesis' schema-valid inputs: random and mutated bodies for /serve, /serve/batch, OIP
infer, /v1/embeddings and /v1/completions (random JSON of random types and nesting, huge numbers, invalid UTF-8,
truncated JSON, wrong content types), multipart uploads to /v1/files (random JSONL lines, blank lines, `$nd`,
invalid UTF-8; missing, misnamed or extra parts, wrong boundaries, cut bodies), random headers (Content-Length
lies, garbage credentials, OIP's header length, Content-Encoding), random query strings, and random Last-Event-ID
values on GET /jobs/{id}/stream.

The server must never answer 5xx (but 503/504: a model or Redis unavailable, a wait that ran out, as documented)
and every error must be JSON; afterwards the attacked process still serves another caller. Deterministic for a seed:
AETHERCORE_FUZZ_SEED (default 19), AETHERCORE_FUZZ_CASES (default 10000, ~1 min here), AETHERCORE_FUZZ_SECONDS
(default 110, a cap on the HTTP cases) and AETHERCORE_FUZZ_WEBSOCKET_CASES (default 200, request messages on
/serve/stream) make it longer or shorter. A failure lists each case with its seed and index.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import requests
import simple_websocket

from tests.hostile.conftest import assert_still_serving, auth, ensure_loaded
from tests.support import ADMIN_KEY, USER_KEY, VIEWER_KEY, close_quietly, ws_connect

SEED = int(os.environ.get("AETHERCORE_FUZZ_SEED", "19"))
CASES = int(os.environ.get("AETHERCORE_FUZZ_CASES", "10000"))
SECONDS = float(os.environ.get("AETHERCORE_FUZZ_SECONDS", "110"))
WEBSOCKET_CASES = int(os.environ.get("AETHERCORE_FUZZ_WEBSOCKET_CASES", "200"))
ALLOWED_5XX = {503, 504}  # model/Redis unavailable, timeouts (documented)
MODELS = ["tiny-mlp", "minilm", "tiny-gpt2", "tiny-classifier", "no-such-model", "", "../etc", "a" * 300]
ODD_STRINGS = ["", " ", "hello", "é漢🙂", "\x00", "\u202e", "\ud800", "\ufeff", "x" * 30_000, "0-0", "null", "[", "\\"]
ODD_NUMBERS = [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 1e308, -0.0, 5e-324, 0.5, 3.7]
RAW_NUMBERS = ["1" + "0" * 5000, "-" + "9" * 4400, "1e999", "1E-999", "NaN", "Infinity", "-0", "1.", ".5", "0x10"]


def random_json(rng: random.Random, depth: int = 0, max_depth: int = 6) -> Any:
    roll = rng.random()
    if depth >= max_depth or roll < 0.55:
        kind = rng.randrange(5)
        if kind == 0:
            return rng.choice([None, True, False])
        if kind == 1:
            return rng.choice(ODD_NUMBERS + [rng.randint(-(10**6), 10**6)])
        if kind == 2:
            return rng.uniform(-1e6, 1e6)
        return rng.choice(ODD_STRINGS + ["".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(12)))])
    if roll < 0.8:
        return [random_json(rng, depth + 1, max_depth) for _ in range(rng.randrange(5))]
    keys = ["text", "inputs", "data", "shape", "datatype", "name", "parameters", "model", "max_length", "stop", "x"]
    return {
        rng.choice(keys + [str(rng.random())]): random_json(rng, depth + 1, max_depth) for _ in range(rng.randrange(5))
    }


def templates(rng: random.Random) -> dict[str, tuple[str, Any]]:
    """A valid body per target, the starting point of mutations: (path, body)."""
    tensor = rng.choice(
        [
            [[1, 2, 3, 4]],
            {"shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"shape": [2, 4], "data": [[0] * 4] * 2},
        ]
    )
    serve = rng.choice(
        [
            {"model_id": "minilm", "inputs": {"text": "hello"}},
            {"model_id": "tiny-mlp", "inputs": {"features": tensor}},
            {"model_id": "tiny-gpt2", "inputs": {"text": "hi"}, "parameters": {"max_length": 2}},
            {
                "model_id": "tiny-gpt2",
                "inputs": {"messages": [{"role": "user", "content": "hi"}]},
                "parameters": {"max_length": 2},
            },
            {"model_id": "tiny-classifier", "inputs": {"text": "good"}, "timeout": 5, "result_ttl": 60},
        ]
    )
    model = rng.choice(["tiny-mlp", "minilm", "tiny-gpt2", "no-such-model"])
    oip_input = (
        {"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
        if model == "tiny-mlp"
        else {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}
    )
    return {
        "serve": ("/serve", serve),
        "batch": ("/serve/batch", {"model_id": serve["model_id"], "inputs": [serve["inputs"]] * rng.randrange(1, 3)}),
        "oip": (
            f"/v2/models/{model}/infer",
            {
                "id": "r",
                "inputs": [oip_input],
                "parameters": rng.choice([{}, {"binary_data_output": True}, {"max_length": 2}]),
            },
        ),
        "embeddings": (
            "/v1/embeddings",
            {"model": "minilm", "input": rng.choice(["hi", ["a", "b"]]), "encoding_format": "float"},
        ),
        "completions": (
            "/v1/completions",
            {"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 2, "stream": rng.random() < 0.3},
        ),
    }


def mutate(rng: random.Random, value: Any, rounds: int) -> Any:
    """Replace, delete or add a random node of `value`, `rounds` times."""
    for _ in range(rounds):
        if not isinstance(value, (dict, list)) or not value or rng.random() < 0.1:
            return random_json(rng, max_depth=rng.choice([3, 6, 12, 40]))
        parent, key = value, None
        while True:
            key = rng.choice(list(parent)) if isinstance(parent, dict) else rng.randrange(len(parent))
            child = parent[key]
            if isinstance(child, (dict, list)) and child and rng.random() < 0.6:
                parent = child
                continue
            break
        action = rng.random()
        if action < 0.6:
            parent[key] = random_json(rng, max_depth=rng.choice([2, 4, 12, 40]))
        elif action < 0.8 and isinstance(parent, dict):
            del parent[key]
        elif isinstance(parent, dict):
            parent[rng.choice(["x", "inputs", "stream", "n", "logprobs", "binary_data_size"])] = random_json(rng)
    return value


def encode(rng: random.Random, value: Any) -> bytes:
    """JSON bytes, sometimes broken: raw huge literals, deep nesting, invalid UTF-8, truncation."""
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
    body = text.encode("utf-8", "surrogatepass")
    roll = rng.random()
    if roll < 0.06 and b"2" in body:
        body = body.replace(b"2", rng.choice(RAW_NUMBERS).encode(), 1)
    elif roll < 0.10:
        depth = rng.choice([33, 200, 1100, 100_000])
        at = body.rfind(b"}")
        if at > 0:
            body = body[:at] + b',"deep":' + b"[" * depth + b"]" * depth + body[at:]
    elif roll < 0.13:
        at = rng.randrange(len(body) + 1)
        body = body[:at] + bytes([rng.choice([0x80, 0xC3, 0xFF, 0xED, 0x00])]) + body[at:]
    elif roll < 0.16:
        body = body[: rng.randrange(len(body) + 1)]
    elif roll < 0.18:
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    return body


@dataclass
class Case:
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: int | None = None  # a lie, when set
    streaming: bool = False


# Failed authentications are limited per client address (AETHERCORE_AUTH_FAILURE_LIMIT, 100 per window by default)
# and every test of the suite calls from 127.0.0.1: the fuzzer spends at most this many wrong credentials.
BAD_CREDENTIALS = 30
_bad_credentials = [0]


def _wrong_credentials(rng: random.Random, chance: float) -> bool:
    if _bad_credentials[0] >= BAD_CREDENTIALS or rng.random() >= chance:
        return False
    _bad_credentials[0] += 1
    return True


def headers_for(rng: random.Random) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {USER_KEY}", "Connection": "close"}
    content_type = rng.choices(
        [
            "application/json",
            "application/json; charset=utf-8",
            "application/json; charset=latin-1",
            "text/plain",
            "application/octet-stream",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/problem+json",
            None,
        ],
        weights=[12, 2, 1, 1, 1, 1, 1, 1, 1],
    )[0]
    if content_type:
        headers["Content-Type"] = content_type
    if _wrong_credentials(rng, 0.08):
        headers["Authorization"] = rng.choice(
            [
                "Bearer",
                "Bearer ",
                "Basic Zm9vOmJhcg==",
                "Bearer " + "x" * 5000,
                f"Bearer {VIEWER_KEY}",
                f"bearer {ADMIN_KEY}",
            ]
        )
    if _wrong_credentials(rng, 0.05):
        headers.pop("Authorization")
        headers["X-API-Key"] = rng.choice([USER_KEY, "nope", ""])
    if rng.random() < 0.1:
        headers["X-Request-ID"] = rng.choice(["", "x" * 500, "a b", "é", "id-1"])
    if rng.random() < 0.05:
        headers["Accept"] = rng.choice(["text/html", "*/*", "application/xml"])
    return headers


def query(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return ""
    pairs = rng.choice(
        [
            "wait=0.1",
            "wait=-1",
            "wait=1e999",
            "wait=NaN",
            "wait=" + "9" * 3000,  # gunicorn itself refuses a request line over 4094 bytes (414, its own HTML)
            "wait=0.1&wait=2",
            "x=%ff%fe",
            "a[b]=c",
            "%00=1",
            "&&&=",
        ]
    )
    return "?" + pairs


UPLOAD_PREFIX = "fuzz-"  # the uploads' filenames: what the test deletes afterwards


def jsonl(rng: random.Random) -> bytes:
    """A batch input file, often broken: mutated requests, blank lines, the stored-result tag, invalid UTF-8."""
    lines = []
    for _ in range(rng.randrange(6)):
        if rng.random() < 0.75:
            path, body = templates(rng)[rng.choice(["embeddings", "completions"])]
            entry = {"custom_id": str(rng.randrange(4)), "method": "POST", "url": path, "body": body}
            lines.append(encode(rng, mutate(rng, entry, rng.choice([0, 0, 1, 2]))))
        else:
            lines.append(rng.choice([b"", b" \t", b"$nd", b'{"$nd": "AAAAAA==", "dtype": "<f4"}', b"\xff\xfe\xc3("]))
    return b"\n".join(lines) + rng.choice([b"", b"\n", b"\n\n \n", b"\r\n"])


def upload_case(rng: random.Random) -> Case:
    """A multipart upload to /v1/files: a random file, and often a broken form around it."""
    boundary = rng.choice(["fuzz-boundary", "b" * 70, "x"])
    purpose = rng.choice([b"batch"] * 6 + [b"", b"fine-tune", b"\xff\xfe", b"batch" * 2000])
    filename = rng.choice([f"{UPLOAD_PREFIX}{rng.randrange(10**6)}.jsonl"] * 4 + ["", "\u00e9\u202e.jsonl", "x" * 500])
    disposition = rng.choice(
        [f'name="file"; filename="{filename}"'] * 6 + ['name="file"', 'name="files"; filename="f"', "name=file"]
    )
    parts = []
    if rng.random() < 0.9:
        parts.append(b'Content-Disposition: form-data; name="purpose"\r\n\r\n' + purpose)
    if rng.random() < 0.9:
        head = f"Content-Disposition: form-data; {disposition}\r\nContent-Type: application/jsonl\r\n\r\n"
        parts.append(head.encode("utf-8", "surrogatepass") + jsonl(rng))
    if rng.random() < 0.1:
        name, value = rng.choice([("expires_after[seconds]", "-1"), ("expires_after[anchor]", "now"), ("x", "1")])
        parts.append(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
    delimiter = b"--" + boundary.encode()
    body = b"".join(delimiter + b"\r\n" + part + b"\r\n" for part in parts)
    body += delimiter + b"--\r\n" if rng.random() < 0.9 else b""
    if rng.random() < 0.08:
        body = body[: rng.randrange(len(body) + 1)]
    headers = headers_for(rng)
    if rng.random() < 0.85:
        headers["Content-Type"] = f"multipart/form-data; boundary={rng.choice([boundary] * 9 + ['other'])}"
    if rng.random() < 0.1:
        headers["Idempotency-Key"] = rng.choice(["fuzz-upload-1", "fuzz-upload-2", "x" * 300])
    content_length = None
    if rng.random() < 0.06:
        content_length = max(0, len(body) + rng.choice([-50, -1, 1, 100]))
    return Case("POST", "/v1/files" + query(rng), body, headers, content_length)


def make_case(rng: random.Random, job_id: str) -> Case:
    target = rng.choices(
        ["serve", "batch", "oip", "embeddings", "completions", "stream", "upload"], weights=[5, 3, 5, 3, 3, 3, 3]
    )[0]
    if target == "upload":
        return upload_case(rng)
    if target == "stream":
        last_id = rng.choice(
            [
                "0-0",
                "0",
                "-1-0",
                "1-" + "9" * 20,
                "9" * 20 + "-0",
                "9" * 4000 + "-0",  # (a header field over 8190 bytes is refused by gunicorn itself)
                "18446744073709551615-18446744073709551615",
                "18446744073709551616-0",
                "1-1-1",
                "$",
                ">",
                "+",
                "",
                " 1-0",
                "１-０",
                str(rng.randrange(2**64)) + "-" + str(rng.randrange(2**64)),
            ]
        )
        headers = {"Authorization": f"Bearer {USER_KEY}", "Connection": "close", "Last-Event-ID": last_id}
        which = rng.choice([job_id, job_id, "0" * 32, "not-a-job", "x" * 300])
        return Case("GET", f"/jobs/{which}/stream{query(rng)}", headers=headers, streaming=True)
    path, body = templates(rng)[target]
    body = mutate(rng, body, rng.choice([0, 1, 1, 2, 3]))
    raw = encode(rng, body)
    headers = headers_for(rng)
    if target == "oip" and rng.random() < 0.35:  # the binary data extension, often wrong
        header_len = len(raw)
        raw += bytes(rng.randrange(256) for _ in range(rng.choice([0, 4, 16, 100])))
        headers["Content-Type"] = "application/octet-stream"
        headers["Inference-Header-Content-Length"] = rng.choice(
            [str(header_len), str(header_len + 1), "0", "-5", "1" + "0" * 30, "abc", "", str(len(raw) + 10)]
        )
    if target == "oip" and rng.random() < 0.08:
        headers["Content-Encoding"] = rng.choice(["gzip", "deflate", "br", "identity", "x-garbage"])
    content_length = None
    if rng.random() < 0.06:
        content_length = max(0, len(raw) + rng.choice([-50, -1, 1, 100]))
    streaming = target == "completions" and isinstance(body, dict) and body.get("stream") is True
    return Case("POST", path + query(rng), raw, headers, content_length, streaming)


def send(base: str, case: Case) -> tuple[int | None, dict[str, str], bytes]:
    """The case over a raw connection (so Content-Length can lie); (status or None if the server closed, headers,
    body; for a 2xx stream, no body)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=75)
    try:
        conn.putrequest(case.method, case.path, skip_accept_encoding=True)
        for name, value in case.headers.items():
            conn.putheader(name, value.encode("utf-8"))  # raw UTF-8 bytes where a value is not ASCII
        if case.method == "POST":
            length = len(case.body) if case.content_length is None else case.content_length
            conn.putheader("Content-Length", str(length))
        conn.endheaders()
        if case.body:
            conn.send(case.body)
        if case.content_length is not None and case.content_length > len(case.body):
            try:
                conn.sock.shutdown(socket.SHUT_WR)  # the promised bytes never come
            except OSError:  # the server already answered and closed: its answer is read below
                pass
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        if response.status < 300 and (case.streaming or "text/event-stream" in headers.get("content-type", "")):
            return response.status, headers, b""
        return response.status, headers, response.read()
    except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
        return None, {}, b""  # the server dropped a lying or broken request: no answer is not a wrong answer
    finally:
        conn.close()


def problem(status: int | None, headers: dict[str, str], body: bytes) -> str | None:
    if status is None:
        return None
    if status >= 500 and status not in ALLOWED_5XX:
        return f"{status}: {body[:300]!r}"
    if status >= 400:
        if not headers.get("content-type", "").startswith("application/json"):
            return f"{status} with a non-JSON error ({headers.get('content-type')}): {body[:200]!r}"
        try:
            document = json.loads(body)
        except ValueError:
            return f"{status} with an error body that is not JSON: {body[:200]!r}"
        if not isinstance(document, dict) or "error" not in document:
            return f"{status} without an error member: {body[:200]!r}"
    return None


def websocket_case(base: str, message: bytes | str) -> str | None:
    """One request message on /serve/stream: the first answer must be a JSON `queued` or `error` message (or the
    server may close the socket); the socket is closed at once (a queued job is cancelled)."""
    url = base.replace("http://", "ws://") + "/serve/stream"
    ws = ws_connect(url, headers={"Authorization": f"Bearer {USER_KEY}"})
    try:
        ws.send(message)
        answer = ws.receive(timeout=30)
    except simple_websocket.ConnectionClosed:
        return None
    finally:
        close_quietly(ws)
    if answer is None:
        return "no answer within 30 s"
    try:
        document = json.loads(answer)
    except ValueError:
        return f"an answer that is not JSON: {answer[:200]!r}"
    if not isinstance(document, dict) or document.get("type") not in ("queued", "error"):
        return f"an unexpected first answer: {answer[:200]!r}"
    if document["type"] == "error" and document["error"].get("code") == "internal_error":
        return f"internal error: {answer[:300]!r}"
    return None


def delete_uploads(api) -> None:
    """The files the fuzzer's uploads left (its caller's quota is everyone's in this suite)."""
    listed = requests.get(f"{api.base}/v1/files?limit=10000", headers=auth(), timeout=60)
    assert listed.status_code == 200, listed.text
    for stored in listed.json()["data"]:
        if stored["filename"].startswith(UPLOAD_PREFIX):
            gone = requests.delete(f"{api.base}/v1/files/{stored['id']}", headers=auth(), timeout=30)
            assert gone.status_code == 200, gone.text


def test_fuzz_bodies_headers_and_resume_ids(hostile_api, hostile_redis):
    api = hostile_api
    for model in ("tiny-mlp", "minilm", "tiny-gpt2"):
        ensure_loaded(api, model)
    first = requests.post(
        f"{api.base}/serve?wait=30",
        headers=auth(),
        json={"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}},
    )
    assert first.status_code == 200, first.text
    job_id = first.json()["job_id"]

    rng = random.Random(SEED)
    _bad_credentials[0] = 0
    failures, statuses = [], {}
    started = time.monotonic()
    ran = 0
    for index in range(CASES):
        if time.monotonic() - started > SECONDS:
            break
        case = make_case(rng, job_id)
        try:
            status, headers, body = send(api.base, case)
        except TimeoutError:
            status, headers, body = 0, {}, b"no answer within 75 s"
        ran += 1
        statuses[status] = statuses.get(status, 0) + 1
        why = "no answer within 75 s" if status == 0 else problem(status, headers, body)
        if why:
            shown = case.body[:160]
            failures.append(
                f"seed {SEED} case {index}: {case.method} {case.path[:120]} {case.headers} CL={case.content_length} "
                f"body={shown!r}... -> {why}"
            )
    print(f"fuzz: {ran} cases in {time.monotonic() - started:.0f} s, statuses {sorted(statuses.items(), key=str)}")
    delete_uploads(api)
    for index in range(WEBSOCKET_CASES):  # the WebSocket's request message, as random as the bodies above
        _path, body = templates(rng)["serve"]
        raw = encode(rng, mutate(rng, body, rng.choice([0, 1, 2, 3])))
        message: bytes | str = raw if rng.random() < 0.2 else raw.decode("utf-8", "replace")
        why = websocket_case(api.base, message)
        if why:
            failures.append(f"seed {SEED} websocket case {index}: {raw[:160]!r}... -> {why}")
    assert not failures, f"{len(failures)} of {ran} cases failed:\n" + "\n".join(failures[:15])
    assert_still_serving(api, hostile_redis)
