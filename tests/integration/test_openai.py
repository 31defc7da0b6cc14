"""The OpenAI-compatible /v1 with the stock client: `openai.OpenAI(base_url=.../v1, api_key=<AetherCore key>)`
against a running API (auth on) and a real worker: models, embeddings (equal to /serve's), completions and chat,
both streaming, generation parameters, and errors in OpenAI's shape mapped to the client's exceptions."""

import numpy as np
import openai
import orjson
import pytest
import requests

from tests.conftest import client_for, poll, settings_for, submit_and_wait
from tests.support import USER_KEY, VIEWER_KEY


@pytest.fixture(scope="module")
def oai(auth_api_server):
    return openai.OpenAI(base_url=f"{auth_api_server.base}/v1", api_key=USER_KEY, max_retries=0, timeout=60)


def test_models(oai):
    ids = {m.id for m in oai.models.list()}
    assert {"minilm", "tiny-gpt2", "tiny-mlp"} <= ids
    assert oai.models.retrieve("tiny-gpt2").id == "tiny-gpt2"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_embeddings_equal_serve(oai, client):
    texts = ["hello world", "a second and rather longer sentence"]
    packed = oai.embeddings.create(model="minilm", input=texts)  # the client asks for base64 by default
    plain = oai.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
    assert [d.index for d in packed.data] == [0, 1] and len(packed.data[0].embedding) == 384
    for text, item in zip(texts, packed.data):
        served = submit_and_wait(client, {"model_id": "minilm", "inputs": {"text": text}})
        assert np.allclose(item.embedding, served["result"]["output"]["embedding"], atol=1e-5)
    assert np.allclose(plain.data[0].embedding, packed.data[0].embedding, atol=1e-6)
    assert packed.usage.prompt_tokens > plain.usage.prompt_tokens > 0  # tokens after truncation, summed


def test_completions_seeded_streamed_and_stopped(oai):
    def complete(**extra):
        return oai.completions.create(model="tiny-gpt2", prompt="Once upon a time", max_tokens=8, **extra)

    first = complete(seed=11, temperature=0.9)
    assert first.choices[0].text == complete(seed=11, temperature=0.9).choices[0].text  # same seed, same text
    assert first.choices[0].finish_reason == "length" and first.usage.completion_tokens == 8
    assert first.usage.prompt_tokens > 0 and first.id.startswith("cmpl-")

    greedy = complete(temperature=0).choices[0].text
    chunks = list(complete(temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8  # include_usage: a last chunk with usage, no choices

    several = oai.completions.create(model="tiny-gpt2", prompt=["Once upon a time", "x"], max_tokens=8, temperature=0)
    assert [c.index for c in several.choices] == [0, 1] and several.choices[0].text == greedy  # one batch job

    stop = greedy[3:6]
    assert stop.strip(), f"the greedy text {greedy!r} is too short to cut a stop string from"
    stopped = complete(temperature=0, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == greedy[: greedy.index(stop)]


def test_chat_uses_the_template_and_streams(oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    reply = oai.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and reply.object == "chat.completion"
    # tiny-gpt2's tokenizer has no chat template: the documented default renders the messages
    rendered = "System: Be brief.\nUser: Hello there\nAssistant:"
    same = oai.completions.create(model="tiny-gpt2", prompt=rendered, max_tokens=6, temperature=0)
    assert choice.message.content == same.choices[0].text
    assert reply.usage.prompt_tokens == same.usage.prompt_tokens

    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, messages[1]]
    stream = oai.chat.completions.create(model="tiny-gpt2", messages=parts, max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_errors_in_openai_shape(oai, auth_api_server):
    with pytest.raises(openai.NotFoundError) as unknown:
        oai.completions.create(model="no-such-model", prompt="x")
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=oai.base_url, api_key="not-a-key", max_retries=0).models.list()
    with pytest.raises(openai.PermissionDeniedError):  # a viewer may read models, not run them
        openai.OpenAI(base_url=oai.base_url, api_key=VIEWER_KEY, max_retries=0).embeddings.create(
            model="minilm", input="x"
        )
    with pytest.raises(openai.UnprocessableEntityError) as unknown_field:
        oai.completions.create(model="tiny-gpt2", prompt="x", extra_body={"frobnicate": 1})
    assert unknown_field.value.param == "frobnicate"
    with pytest.raises(openai.UnprocessableEntityError) as out_of_range:
        oai.chat.completions.create(model="tiny-gpt2", messages=[{"role": "user", "content": "x"}], temperature=500)
    assert out_of_range.value.param == "temperature" and "0 to 100" in out_of_range.value.message
    with pytest.raises(openai.UnprocessableEntityError) as too_many:
        oai.completions.create(model="tiny-gpt2", prompt="x", max_tokens=100_000)
    assert too_many.value.param == "max_tokens"
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model="tiny-gpt2", prompt="x", n=2)
    with pytest.raises(openai.BadRequestError) as wrong_task:
        oai.embeddings.create(model="tiny-gpt2", input="x")
    assert wrong_task.value.code == "model_not_supported"
    raw = requests.post(
        f"{auth_api_server.base}/v1/chat/completions",
        json={"model": "tiny-gpt2", "messages": [{"role": "wizard", "content": "x"}]},
        headers={"Authorization": f"Bearer {USER_KEY}"},
        timeout=10,
    )
    error = raw.json()["error"]
    assert raw.status_code == 422 and error["type"] == "invalid_request_error" and error["param"] == "messages"


def test_protocol_requests_share_the_inference_rate_limit(main_redis_url, main_worker):
    limited = client_for(settings_for(main_redis_url, rate_limit="2/minute"), USER_KEY)
    first = limited.post("/v1/embeddings", json={"model": "minilm", "input": "one"})
    oip = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["two"]}]}
    second = limited.post("/v2/models/minilm/infer", json=oip)
    third = limited.post("/v1/embeddings", json={"model": "minilm", "input": "three"})
    fourth = limited.post("/v2/models/minilm/infer", json=oip)
    assert (first.status_code, second.status_code, third.status_code, fourth.status_code) == (200, 200, 429, 429)
    assert third.get_json()["error"]["type"] == "rate_limit_error" and int(third.headers["Retry-After"]) > 0
    assert "rate limit" in fourth.get_json()["error"]  # OIP's shape: one string


def test_closing_a_stream_early_cancels_its_job(client):
    response = client.post(
        "/v1/chat/completions",
        json={"model": "tiny-gpt2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 256, "stream": True},
        buffered=False,
    )
    first = next(iter(response.response))  # the role delta, sent as soon as the job is queued
    job_id = orjson.loads(first.removeprefix(b"data: "))["id"].removeprefix("chatcmpl-")
    response.close()  # the client goes away: the stream's generator is closed
    job = poll(client, job_id)
    assert job["status"] == "cancelled", job
