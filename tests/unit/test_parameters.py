"""The declared request rules (config/parameters.py) the API and the model processes both check against."""

import pytest

from config.parameters import (
    MAX_LENGTH,
    SAMPLING,
    checked,
    messages_error,
    parameter_errors,
    parameters_for,
    text_error,
)


def test_each_task_takes_only_its_declared_parameters():
    assert set(parameters_for("feature-extraction")) == {"max_length"}
    assert set(parameters_for("text-generation")) == {
        "max_length",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "stop",
        "repetition_penalty",
    }
    assert parameters_for("tensor") == {}
    errors = parameter_errors("feature-extraction", {"max_length": 8, "temperature": 0.5}, 512)
    assert list(errors) == ["parameters"] and "temperature" in errors["parameters"][0]


@pytest.mark.parametrize(
    "name, value",
    [
        ("max_length", 0),
        ("max_length", 513),
        ("max_length", 1.5),
        ("max_length", True),
        ("temperature", "hot"),
        ("temperature", float("nan")),
        ("top_p", 2),
        ("top_k", 1.5),
        ("seed", -1),
        ("do_sample", "yes"),
        ("stop", [""]),
        ("stop", ["x"] * 9),
        ("stop", 3),
    ],
)
def test_a_bad_value_is_named_with_its_range(name, value):
    errors = parameter_errors("text-generation", {name: value}, 512)
    assert list(errors) == [f"parameters.{name}"] and errors[f"parameters.{name}"][0].startswith("must be")


def test_good_values_pass_and_come_back_in_their_type():
    good = {"max_length": 16, "temperature": 0, "top_k": 40, "top_p": 0.9, "seed": 7, "do_sample": True, "stop": "\n"}
    assert parameter_errors("text-generation", good, 512) == {}
    by_name = {p.name: p for p in SAMPLING}
    assert checked(by_name["stop"], "\n") == ("\n",) and checked(by_name["top_p"], 1) == 1.0
    assert checked(MAX_LENGTH, 16.0, 512) == 16
    with pytest.raises(ValueError, match=r"parameters.max_length must be a whole number from 1 to 512, got 600"):
        checked(MAX_LENGTH, 600, 512)


def test_text_inputs():
    assert text_error("hello", 10) is None
    assert text_error("   ") == text_error(None) == "must be a non-empty string"
    assert "at most 3 characters" in text_error("hello", 3)


def test_the_documented_not_blank_pattern_agrees_with_the_check_on_every_character():
    import re

    from config.parameters import NOT_BLANK_PATTERN

    pattern = re.compile(NOT_BLANK_PATTERN)
    disagree = [
        hex(code)
        for code in range(0x10000)
        if not 0xD800 <= code <= 0xDFFF and bool(pattern.search(chr(code))) != (text_error(chr(code)) is None)
    ]
    assert disagree == []
    # ECMA's \s (what a JSON Schema tool may read) has \ufeff and lacks \x1c-\x1f and \x85: spelt out in the pattern
    assert pattern.search("\ufeff") and not any(pattern.search(c) for c in "\x1c\x1d\x1e\x1f\x85")


@pytest.mark.parametrize(
    "messages,needle",
    [
        ([{"role": "user", "content": "hi"}], None),
        ([{"role": "tool", "content": "42", "name": "lookup"}], None),
        ([{"role": "user", "content": "hi", "name": -1.5}], "[0].name must be a string"),  # found by schemathesis
        ([{"role": "user", "content": 3}], "[0].content must be a string"),
        ([{"role": "robot", "content": "hi"}], "[0].role must be one of"),
        ([{"role": "user", "content": "hi", "extra": 1}], "[0] must be an object"),
        ([], "must be a list of 1 to"),
    ],
)
def test_chat_messages_are_checked_field_by_field(messages, needle):
    problem = messages_error(messages)
    assert problem is None if needle is None else needle in problem, problem
