"""A submission's body against its model's declarations, before anything is queued: a text model's rules
(config/parameters.py), a tensor model's signature (config/signatures.py), the batch size. Pure: every answer is
a dict of field errors, or `Refused`.

May import: config/, tasks/."""

from __future__ import annotations

from typing import Any

from config.models import TEXT_TASKS, ModelSpec
from config.parameters import messages_error, text_error
from config.parameters import parameter_errors as declared_parameter_errors
from config.signatures import Signature, tensor_input_errors
from submission.errors import TOO_MANY_INPUTS, Refused, refuse_if

FieldErrors = dict[str, list[str]]


def input_errors(
    spec: ModelSpec, inputs: Any, max_chars: int, signature: Signature | None, prefix: str = "inputs"
) -> FieldErrors:
    """An input against the model's declarations: a text model's rules, a tensor model's signature (names,
    datatypes, shapes) when it is known."""
    if not isinstance(inputs, dict):
        return {prefix: ["must be an object"]}
    errors: FieldErrors = {}
    if spec.task == "text-generation" and "messages" in inputs:
        problem = messages_error(inputs["messages"], max_chars)
        if problem:
            errors[f"{prefix}.messages"] = [problem]
        if set(inputs) != {"messages"}:
            errors[prefix] = ["takes either 'text' or 'messages', nothing else"]
    elif spec.task in TEXT_TASKS:
        problem = text_error(inputs.get("text"), max_chars)
        if problem:
            errors[f"{prefix}.text"] = [problem]
        unknown = sorted(set(inputs) - {"text"})
        if unknown:
            takes = "'text' (or 'messages')" if spec.task == "text-generation" else "only 'text'"
            errors[prefix] = [f"unknown input(s) {unknown}; this model takes {takes}"]
    elif signature is not None:
        errors.update(tensor_input_errors(signature, inputs, prefix))
    return errors


def parameter_errors(spec: ModelSpec, parameters: dict[str, Any], prefix: str = "parameters") -> FieldErrors:
    errors = declared_parameter_errors(spec.task, parameters, spec.max_length_limit)
    if prefix == "parameters":
        return errors
    return {prefix + key[len("parameters") :]: value for key, value in errors.items()}


def check_batch_size(count: int, limit: int) -> None:
    """413 `too_many_inputs` beyond AETHERCORE_MAX_BATCH_INPUTS."""
    if count > limit:
        raise Refused(
            TOO_MANY_INPUTS,
            f"a batch may carry at most {limit} inputs, got {count}; split it into several requests",
            {"limit": limit, "inputs": count},
        )


def check_texts(texts: list[str], field: str, limit: int, max_chars: int) -> None:
    """A protocol's batch of strings: at most `limit`, each by the text rules (422 naming `field[i]`)."""
    check_batch_size(len(texts), limit)
    refuse_if({f"{field}[{i}]": [p] for i, t in enumerate(texts) if (p := text_error(t, max_chars))})


def body_errors(
    spec: ModelSpec, inputs: Any, parameters: dict[str, Any], batch: bool, max_chars: int, signature: Signature | None
) -> FieldErrors:
    """Every field error of a body (one input, or a batch's inputs each), its parameters' last."""
    errors: FieldErrors = {}
    if batch:
        for i, item in enumerate(inputs):
            errors.update(input_errors(spec, item, max_chars, signature, f"inputs.{i}"))
    else:
        errors.update(input_errors(spec, inputs, max_chars, signature))
    return {**errors, **parameter_errors(spec, parameters)}
