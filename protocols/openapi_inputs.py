"""/serve's and /serve/batch's request bodies in the OpenAPI document, per configured model, from the same
declarations the validation uses: the task's input rules and parameters (config/parameters.py: types, ranges,
the model's max_length_limit) and the model's signature (config/signatures.py) for tensor models.

The body is a `oneOf` with a `model_id` discriminator: one schema per model, so Swagger UI shows what each model
takes and a generated client (or schemathesis) sends bodies the API accepts. Built when the document is served,
so tensor signatures the workers read from artifacts after the API started are in it too.

Below HTTP (api/app.py adds it to the document it serves): may import config/ only; never api or flask.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from config.models import TEXT_TASKS, ModelSpec
from config.parameters import (
    CHAT_ROLES,
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    NOT_BLANK_PATTERN,
    Parameter,
    parameters_for,
)
from config.signatures import INTEGER_DATATYPES, Signature, TensorSpec


def parameter_schema(parameter: Parameter, high: float | None) -> dict[str, Any]:
    if parameter.kind == "boolean":
        schema: dict[str, Any] = {"type": "boolean"}
    elif parameter.kind == "strings":
        text = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
        schema = {"oneOf": [text, {"type": "array", "items": text, "maxItems": MAX_STOP_STRINGS}]}
    else:
        top = high if high is not None else parameter.high
        schema = {"type": parameter.kind, "minimum": parameter.low or 0, "maximum": top}
    return {**schema, "description": parameter.doc}


def parameters_schema(spec: ModelSpec) -> dict[str, Any]:
    declared = parameters_for(spec.task)
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            name: parameter_schema(p, spec.max_length_limit if name == "max_length" else None)
            for name, p in declared.items()
        },
    }


def text_inputs_schema(max_chars: int) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["text"],
        "additionalProperties": False,
        "properties": {
            "text": {"type": "string", "minLength": 1, "maxLength": max_chars, "pattern": NOT_BLANK_PATTERN}
        },
    }


def chat_inputs_schema(max_chars: int) -> dict[str, Any]:
    message = {
        "type": "object",
        "required": ["role", "content"],
        "additionalProperties": False,
        "properties": {
            "role": {"type": "string", "enum": list(CHAT_ROLES)},
            "content": {"type": "string", "maxLength": max_chars},
            "name": {"type": "string"},
        },
    }
    return {
        "type": "object",
        "required": ["messages"],
        "additionalProperties": False,
        "properties": {"messages": {"type": "array", "items": message, "minItems": 1, "maxItems": MAX_MESSAGES}},
        "description": "Rendered by the tokenizer's chat template (or the default one) into the prompt",
    }


def _nested(tensor: TensorSpec) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "integer" if tensor.datatype in INTEGER_DATATYPES else "number"}
    if tensor.datatype == "BOOL":
        item = {"type": "boolean"}
    for size in reversed(tensor.shape):
        item = {"type": "array", "items": item, "minItems": 1}
        if size >= 0:
            item.update(minItems=size, maxItems=size)
    return item


def tensor_inputs_schema(signature: Signature) -> dict[str, Any]:
    properties = {}
    for tensor in signature.inputs:
        properties[tensor.name] = {
            **_nested(tensor),
            "description": f"{tensor.datatype} {list(tensor.shape)} (-1: any size) as nested lists; "
            f'{{"shape", "datatype": "{tensor.datatype}", "data"}} (data flat or nested) is accepted too',
        }
    return {
        "type": "object",
        "required": [t.name for t in signature.inputs],
        "additionalProperties": False,
        "properties": properties,
    }


def inputs_schema(spec: ModelSpec, signature: Signature | None, max_chars: int) -> dict[str, Any]:
    if spec.task == "text-generation":
        return {"oneOf": [text_inputs_schema(max_chars), chat_inputs_schema(max_chars)]}
    if spec.task in TEXT_TASKS:
        return text_inputs_schema(max_chars)
    if signature is not None:
        return tensor_inputs_schema(signature)
    return {"type": "object", "description": "Named tensors (the model's signature is not known yet)"}


def document_inputs(
    document: dict[str, Any], models: dict[str, ModelSpec], signature_for: Any, max_chars: int
) -> dict[str, Any]:
    """`document` (the generated OpenAPI dict) with /serve's and /serve/batch's bodies per model."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for path, base_name, batch in (("/serve", "ServeRequest", False), ("/serve/batch", "BatchRequest", True)):
        base = schemas.get(base_name)
        body = document.get("paths", {}).get(path, {}).get("post", {}).get("requestBody")
        if base is None or body is None:
            continue
        refs = {}
        for spec in models.values():
            schema = deepcopy(base)
            inputs = inputs_schema(spec, signature_for(spec), max_chars)
            schema["properties"].update(
                model_id={"type": "string", "enum": [spec.id]},
                inputs={"type": "array", "items": inputs, "minItems": 1} if batch else inputs,
                parameters=parameters_schema(spec),
            )
            schema["description"] = f"{spec.name} ({spec.task})"
            name = f"{base_name}.{spec.id}"
            schemas[name] = schema
            refs[spec.id] = f"#/components/schemas/{name}"
        if refs:
            body["content"]["application/json"]["schema"] = {
                "oneOf": [{"$ref": ref} for ref in refs.values()],
                "discriminator": {"propertyName": "model_id", "mapping": refs},
            }
    return document
