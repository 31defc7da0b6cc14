"""Input limits (docs/SECURITY.md, "Input limits: bodies, shapes, nesting"): the one shape rule, the bounded JSON
parser every body goes through, and a tensor packed as its bytes in a job."""

import importlib
import pkgutil
import time

import marshmallow as ma
import numpy as np
import pytest
from flask import Flask
from flask.views import MethodView
from flask_smorest import Api

import api.blueprints
from api.errors import register_error_handlers
from api.json_provider import Blueprint, OrjsonProvider
from config.settings import Settings
from config.signatures import MAX_ELEMENTS, MAX_RANK, ShapeError, TooManyElements, checked_shape
from config.values import ConfigError
from protocols.errors import ApiError
from protocols.json import JsonBodyError, loads_bounded
from protocols.oip import parse_request
from tasks.tensors import pack, unpack

HUGE = 10**3999


def test_a_shape_is_bounded_before_it_is_multiplied():
    assert checked_shape([2, 3, 4]) == [2, 3, 4] and checked_shape([]) == [] and checked_shape((0, 10**7)) == [0, 10**7]
    started = time.perf_counter()
    for bad in ([HUGE] * 300, [1] * (MAX_RANK + 1), [HUGE], [-1], [True], [1.0], "3", None, [[2]]):
        with pytest.raises(ShapeError) as refused:
            checked_shape(bad)
        assert len(str(refused.value)) < 100  # never the values themselves
    assert time.perf_counter() - started < 0.1
    for too_many in ([2**32, 2**32], [4096, 4096], [HUGE]):  # the first: 0 in int64 arithmetic
        with pytest.raises(TooManyElements):
            checked_shape(too_many)
    with pytest.raises(TooManyElements):
        checked_shape([MAX_ELEMENTS, 2])


def test_json_nesting_and_numbers_are_bounded():
    assert loads_bounded(b'{"a": [[1, 2], {"b": []}]}', 4) == {"a": [[1, 2], {"b": []}]}
    assert loads_bounded("[" * 32 + "]" * 32, 32) is not None  # exactly the limit
    for body, why in [
        ("[" * 33 + "]" * 33, "nested deeper than 32"),
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 32"),
        ('{"a":' * 40 + "1" + "}" * 40, "nested deeper than 32"),
        ("1" + "0" * 5000, "not valid JSON"),
        ("[1e400]", "not valid JSON"),
        ("[NaN]", "not valid JSON"),
        (b'["\xff"]', "not valid JSON"),
    ]:
        with pytest.raises(JsonBodyError, match=why):
            loads_bounded(body, 32)
    # brackets inside strings do not count (a body with more brackets than the limit is walked, not refused)
    assert loads_bounded('["' + "[" * 100 + '"]', 32) == ["[" * 100]
    # integers are 64-bit at most: a larger literal is a float, so no huge Python int reaches a check
    assert isinstance(loads_bounded("18446744073709551616", 32), float)


def test_the_depth_setting_is_bounded():
    assert Settings.from_env({}).max_json_depth == 32
    for bad in ("8", "500", "x"):
        with pytest.raises(ConfigError, match="AETHERCORE_MAX_JSON_DEPTH"):
            Settings.from_env({"AETHERCORE_MAX_JSON_DEPTH": bad})


def test_every_blueprint_parses_bodies_with_the_bounded_parser():
    modules = [
        importlib.import_module(f"api.blueprints.{m.name}") for m in pkgutil.iter_modules(api.blueprints.__path__)
    ]
    blueprints = [m.blp for m in modules if hasattr(m, "blp")]
    assert len(blueprints) >= 6
    assert all(isinstance(b, Blueprint) for b in blueprints), [
        b.name for b in blueprints if not isinstance(b, Blueprint)
    ]


def test_a_body_argument_too_deep_or_too_large_a_number_is_400():
    app = Flask("limits")
    app.json = OrjsonProvider(app, max_depth=16)
    app.config.update(API_TITLE="t", API_VERSION="1", OPENAPI_VERSION="3.0.3")
    blp = Blueprint("b", __name__)

    class Body(ma.Schema):
        x = ma.fields.Raw(required=True)

    @blp.route("/echo")
    class Echo(MethodView):
        @blp.arguments(Body)
        def post(self, body):
            return {"x": body["x"]}

    Api(app).register_blueprint(blp)
    register_error_handlers(app)
    client = app.test_client()
    assert client.post("/echo", json={"x": [[1]]}).get_json() == {"x": [[1]]}
    assert client.post("/echo", data="", content_type="application/json").status_code == 422  # missing, not 400
    for body in [
        '{"x":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"x":' + "[" * 17 + "]" * 17 + "}",
        '{"x":1' + "0" * 5000 + "}",
    ]:
        response = client.post("/echo", data=body, content_type="application/json")
        assert response.status_code == 400, response.get_data(as_text=True)
        assert response.get_json()["error"]["code"] == "bad_request"


def oip(header: str, binary: bytes = b"", **limits) -> None:
    body = header.encode() + binary
    parse_request(body, str(len(header)) if binary else None, **limits)


def test_oip_shapes_and_nesting_take_the_same_rule():
    for header, status in [
        ('{"inputs":[{"name":"x","datatype":"FP32","shape":[4294967296,4294967296],"data":[]}]}', 413),
        ('{"inputs":[{"name":"x","datatype":"FP32","shape":[4096,4096],"data":[]}]}', 413),
        ('{"inputs":[{"name":"x","datatype":"FP32","shape":[2,-1],"data":[1,2]}]}', 400),
        ('{"inputs":[{"name":"x","datatype":"FP32","shape":' + str([1] * 9) + ',"data":[1]}]}', 400),
        ('{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":' + "[" * 9 + "1" + "]" * 9 + "}]}", 400),
        ('{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1],"parameters":[1]}]}', 400),
        ('{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":' + "[" * 40 + "1" + "]" * 40 + "}]}", 400),
    ]:
        with pytest.raises(ApiError) as refused:
            oip(header, max_depth=32)
        assert refused.value.status == status, (header[:80], refused.value.message)
    with pytest.raises(ApiError) as refused:
        oip(
            '{"inputs":[{"name":"t","datatype":"BYTES","shape":[300],"parameters":{"binary_data_size":1200}}]}',
            b"\0" * 1200,
            max_strings=256,
        )
    assert refused.value.status == 413 and refused.value.code == "too_many_inputs"
    with pytest.raises(ApiError) as refused:
        parse_request(b'{"inputs":[]}', "1" + "0" * 5000)
    assert refused.value.status == 400 and "Inference-Header-Content-Length" in refused.value.message


def test_a_tensor_travels_packed_as_its_bytes_and_unpacks_checked():
    for array in (np.arange(12, dtype="<f4").reshape(3, 4), np.array([True, False]), np.arange(3, dtype=">i8")):
        packed = pack(array)
        assert set(packed) == {"$nd", "dtype", "shape"}
        back = unpack(packed)
        assert back.shape == array.shape and np.array_equal(back, array) and back.dtype.byteorder in "<|="
    flags = pack(np.frombuffer(b"\x00\x02", dtype=np.bool_))
    assert unpack(flags).view(np.uint8).tolist() == [0, 1]  # normalised to 0/1
    good = pack(np.zeros((2, 2), dtype="<f4"))
    for bad in ({**good, "shape": [HUGE]}, {**good, "shape": [3, 2]}, {**good, "dtype": "<c8"}, {**good, "$nd": "!!"}):
        with pytest.raises(ValueError):
            unpack(bad)
