"""What a request may carry for each task, declared once: its text input's rules and its parameters (type and
range). The API checks every body against these declarations before a job is queued (422 naming the field,
unknown parameters included), and the model processes read their settings through the same checks, so the
two can never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # integer | number | boolean | strings
    low: float | None = None
    high: float | None = None  # None for max_length: the model's own max_length_limit
    doc: str = ""

    def error(self, value: Any, high: float | None = None) -> str | None:
        """Why `value` is refused (a phrase to follow `parameters.<name>`), or None if it is valid."""
        if self.kind == "boolean":
            return None if isinstance(value, bool) else "must be true or false"
        if self.kind == "strings":
            items = [value] if isinstance(value, str) else value
            ok = (
                isinstance(items, (list, tuple))
                and len(items) <= MAX_STOP_STRINGS
                and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items)
            )
            return (
                None
                if ok
                else (
                    f"must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
                    f"of at most {MAX_STOP_CHARS} characters"
                )
            )
        low = self.low if self.low is not None else 0
        high = high if high is not None else self.high
        if high is None:  # max_length: its bound is the model's max_length_limit, which the caller must pass
            raise TypeError(f"parameter {self.name!r} is checked without its model's upper bound")
        whole = self.kind == "integer"
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or (whole and int(value) != value)
            or not low <= value <= high
        ):
            return f"must be {'a whole number' if whole else 'a number'} from {low:g} to {high:g}"
        return None

    def value(self, value: Any) -> Any:
        """A valid value in its Python type."""
        if self.kind == "integer":
            return int(value)
        if self.kind == "number":
            return float(value)
        if self.kind == "strings":
            return (value,) if isinstance(value, str) else tuple(value)
        return value


MAX_LENGTH = Parameter(
    "max_length",
    "integer",
    1,
    None,
    "Tokens: the truncation length of the input (embeddings, classification) or the new tokens to "
    "generate (text-generation), up to the model's max_length_limit.",
)
SAMPLING = (
    Parameter(
        "do_sample",
        "boolean",
        doc="Sample instead of greedy decoding (default: the model's "
        "generation_config; a temperature alone asks for sampling, 0 for greedy).",
    ),
    Parameter("temperature", "number", 0, 100, "Softmax temperature; 0 means greedy."),
    Parameter("top_k", "integer", 0, 1_000_000, "Keep the k most likely tokens (0: all)."),
    Parameter("top_p", "number", 0, 1, "Nucleus sampling: keep the most likely tokens up to this mass."),
    Parameter("seed", "integer", 0, 2**63 - 1, "Seed of this request's sampling: same seed and inputs, same text."),
    Parameter(
        "repetition_penalty",
        "number",
        0.01,
        10,
        "Divide the scores of tokens already in the text by "
        "this (> 1 repeats less; default: the model's generation_config, else 1).",
    ),
    Parameter(
        "stop",
        "strings",
        doc="Stop when one of these strings is generated (it is not returned); finish_reason is then `stop`.",
    ),
)

PARAMETERS_BY_TASK: dict[str, tuple[Parameter, ...]] = {
    "feature-extraction": (MAX_LENGTH,),
    "text-classification": (MAX_LENGTH,),
    "text-generation": (MAX_LENGTH, *SAMPLING),
    "tensor": (),
}


def parameters_for(task: str) -> dict[str, Parameter]:
    return {p.name: p for p in PARAMETERS_BY_TASK.get(task, ())}


def parameter_errors(task: str, parameters: Any, max_length_limit: int) -> dict[str, list[str]]:
    """Every problem with a request's `parameters`, keyed by field (`parameters.<name>`); {} if none."""
    if not isinstance(parameters, dict):
        return {"parameters": ["must be an object"]}
    known = parameters_for(task)
    errors: dict[str, list[str]] = {}
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        errors["parameters"] = [f"unknown parameter(s) {unknown}; a {task} model takes {sorted(known) or 'none'}"]
    for name, value in parameters.items():
        if name in known:
            problem = known[name].error(value, max_length_limit if name == "max_length" else None)
            if problem:
                errors[f"parameters.{name}"] = [problem]
    return errors


def checked(parameter: Parameter, value: Any, high: float | None = None) -> Any:
    """`value` in its Python type, or ValueError naming the parameter (the model process's check)."""
    problem = parameter.error(value, high)
    if problem:
        raise ValueError(f"parameters.{parameter.name} {problem}, got {value!r}")
    return parameter.value(value)


# The OpenAPI pattern of a text that is not blank, as `text_error` decides it (Python's str.strip()). JSON Schema
# patterns are ECMA regexes, whose \s lacks \x1c-\x1f and \x85 (Python whitespace) and has \ufeff (not Python
# whitespace): both are spelt out, so the document and the check agree on every character under either reading.
NOT_BLANK_PATTERN = r"[^\s\x1c-\x1f\x85]|\ufeff"


def text_error(text: Any, max_chars: int | None = None) -> str | None:
    """Why `inputs.text` is refused (a phrase to follow the field's name), or None."""
    if not isinstance(text, str) or not text.strip():
        return "must be a non-empty string"
    if max_chars is not None and len(text) > max_chars:
        return f"must have at most {max_chars} characters (AETHERCORE_MAX_INPUT_CHARS), got {len(text)}"
    return None


# Chat (text-generation models): `inputs.messages` instead of `inputs.text`, rendered into the prompt by the
# tokenizer's chat template in the worker, or by this one when the tokenizer has none (plain "Role: text" lines,
# then "Assistant:" for the model to go on from).
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_MESSAGES = 256
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def messages_error(messages: Any, max_chars: int | None = None) -> str | None:
    """Why `inputs.messages` is refused (a phrase to follow the field's name), or None."""
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
        return f"must be a list of 1 to {MAX_MESSAGES} messages"
    total = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
            return f"[{index}] must be an object with role and content (and optionally name)"
        if message.get("role") not in CHAT_ROLES:
            return f"[{index}].role must be one of {', '.join(CHAT_ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"[{index}].content must be a string"
        if "name" in message and not isinstance(message["name"], str):
            return f"[{index}].name must be a string"
        total += len(message["content"])
    if max_chars is not None and total > max_chars:
        return f"must have at most {max_chars} characters in all (AETHERCORE_MAX_INPUT_CHARS), got {total}"
    return None
