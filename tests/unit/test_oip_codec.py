"""The Open Inference Protocol's JSON and binary tensor encodings (protocols/oip.py), byte for byte as
tritonclient writes and reads them."""

import numpy as np
import orjson
import pytest
import tritonclient.http as triton_http
from tritonclient.http._utils import _get_inference_request

from protocols.errors import ApiError
from protocols.oip import encode_response, parse_request, serialize_bytes


def client_body(inputs, outputs=None, **parameters):
    """What tritonclient sends for these tensors: (body, Inference-Header-Content-Length or None)."""
    return _get_inference_request(inputs, "r1", outputs, 0, False, False, 0, None, parameters or None)


def test_binary_inputs_as_tritonclient_sends_them():
    text = triton_http.InferInput("text", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"caf\xc3\xa9"], [b""]], dtype=object))
    numbers = triton_http.InferInput("x", [2, 3], "FP16")
    numbers.set_data_from_numpy(np.arange(6, dtype=np.float16).reshape(2, 3))
    flags = triton_http.InferInput("m", [3], "BOOL")
    flags.set_data_from_numpy(np.array([True, False, True]), binary_data=False)
    body, size = client_body([text, numbers, flags])
    parsed = parse_request(body, str(size))
    assert parsed.id == "r1" and parsed.outputs is None and parsed.binary_output  # no outputs named: all binary
    by_name = {t.name: t for t in parsed.inputs}
    assert by_name["text"].array.reshape(-1).tolist() == ["café".encode(), b""]
    assert by_name["x"].array.dtype == np.float16 and by_name["x"].array.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert by_name["m"].array.tolist() == [True, False, True]


def test_response_encoding_is_what_tritonclient_reads():
    outputs = [("embedding", np.ones((2, 3), dtype="<f4")), ("label", np.array([b"a", b"bc"], dtype=object))]
    body, headers = encode_response("m", "1", "r1", outputs, {"embedding": True, "label": False})
    result = triton_http.InferResult.from_response_body(
        body, header_length=int(headers["Inference-Header-Content-Length"])
    )
    assert result.as_numpy("embedding").tolist() == [[1, 1, 1], [1, 1, 1]]
    assert result.as_numpy("label").tolist() == ["a", "bc"]  # sent as JSON: the client gives str
    assert result.get_response()["id"] == "r1"
    plain, plain_headers = encode_response("m", "1", None, outputs[1:], {})
    assert "Inference-Header-Content-Length" not in plain_headers
    assert orjson.loads(plain)["outputs"][0] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [2],
        "data": ["a", "bc"],
    }
    assert serialize_bytes(np.array([b"xy"], dtype=object)) == b"\x02\x00\x00\x00xy"


@pytest.mark.parametrize(
    "body,size,needle",
    [
        (
            b'{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":6}}]}'
            + b"\x09\x00\x00\x00ab",
            None,
            "runs past the end",
        ),
        (
            b'{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":6}}]}'
            + b"\x02\x00\x00\x00abcd",
            None,
            "belong to no input",
        ),
        (b'{"inputs":[{"name":"t","shape":[2],"datatype":"FP32","data":[1]}]}', None, "holds 2 elements"),
        (b'{"inputs":[{"name":"t","shape":[1],"datatype":"FP32","data":["x"]}]}', None, "must be numbers"),
        (b'{"inputs":[{"name":"t","shape":[1],"datatype":"FP8","data":[1]}]}', None, "FP8"),
        (b'{"inputs":[]}', None, "non-empty list"),
        (b'{"inputs":[{"name":"t","shape":[1],"datatype":"FP32"}]}', None, "neither data"),
        (
            b'{"inputs":[{"name":"t","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}'
            + b"\x00\x00",
            "999",
            "Inference-Header-Content-Length is 999",
        ),
    ],
)
def test_malformed_requests_say_what_is_wrong(body, size, needle):
    if size is None and b"binary_data_size" in body:
        size = str(body.index(b"}]}") + 3)
    with pytest.raises(ApiError) as error:
        parse_request(body, size)
    assert error.value.status == 400 and needle in error.value.message
