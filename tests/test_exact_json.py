"""Tests of the scan for integers that orjson would not decode exactly."""

from __future__ import annotations

import orjson
import pytest

from agogosml.exact_json import may_contain_big_int


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
