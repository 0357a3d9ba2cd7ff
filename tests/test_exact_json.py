"""Tests of the scan for integers beyond 64 bits, and of JSON error messages."""

from __future__ import annotations

import orjson
import pytest

from agogosml.exact_json import json_error, may_contain_big_int


@pytest.mark.parametrize(
    "body",
    [
        b'{"n": 18446744073709551616}',
        b"[1,-9223372036854775809]",
        b'{"n":123456789012345678901234567890}',
        b"99999999999999999999",
    ],
)
def test_integers_beyond_64_bits_flagged(body):
    assert may_contain_big_int(body)


@pytest.mark.parametrize(
    "body",
    [
        orjson.dumps({"low": -(10**18) + 1, "high": 10**19 - 1}),
        orjson.dumps([-1.3598071336738, 0.1234567890123456, 1.7976931348623157e308]),
        b'{"id": "4f2a9c0e", "amount": 149.62}',
        b'{"digits": "123456789012345678"}',
    ],
)
def test_in_range_numbers_not_flagged(body):
    assert not may_contain_big_int(body)


def test_digit_runs_in_strings():
    # Digits after a space inside a string look like a number to the scan:
    # the body is then decoded exactly, which is slower but right.
    assert may_contain_big_int(b'{"note": "call 12345678901234567890"}')
    # A run that follows a letter is not a number, so it does not.
    assert not may_contain_big_int(b'{"ref": "x12345678901234567890"}')


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        (
            b"this is text",
            'text must be a JSON string in double quotes, such as "text"',
        ),
        (b'{"caf\xc3\xa9": nope}', "text must be a JSON string in double quotes"),
        (b"[1, NaN]", "NaN and Infinity are not JSON numbers"),
        (b"-Infinity", "NaN and Infinity are not JSON numbers"),
        (b"{'a': 1}", "JSON strings and keys take double quotes, not single quotes"),
    ],
)
def test_json_error_gives_fix_for_unquoted_word(value, hint):
    error = json_error(value)

    assert hint in error
    assert "line 1 column" in error


@pytest.mark.parametrize("value", [b"tru", b"[1, 2,]", b'{"a": 1'])
def test_json_error_without_word_has_no_hint(value):
    error = json_error(value)

    assert error
    assert "double quotes" not in error
    assert "NaN" not in error


@pytest.mark.parametrize(
    "value", [b'{"flag": True}', b'{"flag": False}', b'{"a": None}', b"[NULL]"]
)
def test_json_error_names_lower_case_literals(value):
    error = json_error(value)

    assert "JSON writes true, false and null in lower case" in error
    assert "double quotes" not in error


@pytest.mark.parametrize("value", [b"nan", b"[1, inf]", b"-infinity"])
def test_json_error_any_case_nan_hint(value):
    assert "NaN and Infinity are not JSON numbers" in json_error(value)


@pytest.mark.parametrize("value", [b"[tru]", b'{"a": fals}', b"[nul, 1]"])
def test_json_error_misspelt_literal_no_text_hint(value):
    error = json_error(value)

    assert "invalid literal" in error
    assert "double quotes" not in error
