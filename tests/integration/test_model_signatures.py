"""Signatures without loading, end to end: the worker publishes what it reads from the artifacts, the API shows it
(GET /models/{id}/info, the OpenAPI document) and checks /serve's tensors against it before anything is queued;
and chat messages as a text-generation input on /serve."""

from tests.conftest import submit_and_wait


def jobs_of(client, model_id: str) -> int:
    return len(client.get(f"/jobs?model_id={model_id}&limit=1000").get_json()["jobs"])


def test_info_lists_inputs_and_outputs_loaded_or_not(client):
    client.post("/models/minilm-onnx/unload?wait=30")
    info = client.get("/models/minilm-onnx/info").get_json()
    assert info["state"] == "unloaded" and info["loaded"] is None
    assert info["signature"] == {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}],
        "source": "artifact",
    }
    mlp = client.get("/models/tiny-mlp/info").get_json()["signature"]
    assert mlp["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]


def test_mismatched_tensors_get_422_before_they_are_queued(client):
    before = jobs_of(client, "tiny-mlp")
    for inputs, field in (
        ({"features": [[1.0, 2.0, 3.0]]}, "inputs.features"),
        ({"feature": [[1.0, 2.0, 3.0, 4.0]]}, "inputs"),
        ({"features": {"datatype": "INT64", "data": [[1, 2, 3, 4]]}}, "inputs.features.datatype"),
        ({"features": [[1.0, 2.0, 3.0, "x"]]}, "inputs.features"),
    ):
        response = client.post("/serve", json={"model_id": "tiny-mlp", "inputs": inputs})
        assert response.status_code == 422, response.get_json()
        assert field in response.get_json()["error"]["details"]
    batch = client.post("/serve/batch", json={"model_id": "tiny-mlp", "inputs": [{"features": [[1, 2, 3, 4]]}, {}]})
    assert batch.status_code == 422 and "inputs.1" in batch.get_json()["error"]["details"]
    assert jobs_of(client, "tiny-mlp") == before
    ok = submit_and_wait(client, {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}})
    assert ok["status"] == "succeeded"


def test_openapi_documents_each_models_inputs_and_parameters(client):
    document = client.get("/openapi.json").get_json()
    body = document["paths"]["/serve"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["propertyName"] == "model_id"
    schemas = document["components"]["schemas"]
    generation = schemas["ServeRequest.tiny-gpt2"]["properties"]
    assert generation["parameters"]["properties"]["max_length"]["maximum"] == 256  # its max_length_limit
    assert generation["parameters"]["additionalProperties"] is False
    mlp = schemas["ServeRequest.tiny-mlp"]["properties"]["inputs"]
    assert mlp["required"] == ["features"]  # the signature the worker read from the artifact
    row = mlp["properties"]["features"]["items"]
    assert (row["minItems"], row["maxItems"], row["items"]["type"]) == (4, 4, "number")
    assert schemas["BatchRequest.minilm"]["properties"]["inputs"]["items"]["required"] == ["text"]


def test_chat_messages_on_serve(client):
    messages = [{"role": "user", "content": "Hello"}]
    chat = submit_and_wait(
        client,
        {"model_id": "tiny-gpt2", "inputs": {"messages": messages}, "parameters": {"max_length": 4, "temperature": 0}},
    )
    plain = submit_and_wait(
        client,
        {
            "model_id": "tiny-gpt2",
            "inputs": {"text": "User: Hello\nAssistant:"},
            "parameters": {"max_length": 4, "temperature": 0},
        },
    )
    assert chat["result"]["output"]["text"] == plain["result"]["output"]["text"]  # the default template, greedy
    assert chat["result"]["output"]["prompt_tokens"] == plain["result"]["output"]["prompt_tokens"]
    bad = client.post("/serve", json={"model_id": "tiny-gpt2", "inputs": {"messages": [{"role": "x", "content": ""}]}})
    assert bad.status_code == 422 and "inputs.messages" in bad.get_json()["error"]["details"]
    wrong_model = client.post("/serve", json={"model_id": "minilm", "inputs": {"messages": messages}})
    assert wrong_model.status_code == 422
