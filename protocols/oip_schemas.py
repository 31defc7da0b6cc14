"""The OpenAPI schemas of the Open Inference Protocol's bodies (declarative: api/blueprints/oip.py documents its
routes with them). Imports protocols/oip.py's datatypes only."""

from __future__ import annotations

from protocols.oip import NUMERIC

ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": [*NUMERIC, "BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
    },
}
METADATA_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": TENSOR_SCHEMA},
        "outputs": {"type": "array", "items": TENSOR_SCHEMA},
    },
}
INFER_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "description": "The model's parameters (e.g. max_length, temperature); `timeout` (µs); `webhook_url`: "
            "POST the job's end there (README: Completion webhooks)",
        },
        "inputs": {
            "type": "array",
            "minItems": 1,
            "items": {
                **TENSOR_SCHEMA,
                "properties": {
                    **TENSOR_SCHEMA["properties"],
                    "data": {"type": "array", "description": "Row-major elements (nested lists allowed)"},
                    "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
                },
            },
        },
    },
}
