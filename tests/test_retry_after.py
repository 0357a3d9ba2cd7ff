"""Tests of reading the Retry-After header of an app response."""

from __future__ import annotations

import datetime
import email.utils

import pytest

from agogosml.reader.client import (
    RETRY_AFTER_MAX_SECONDS,
    backoff_seconds,
    parse_retry_after,
)


def http_date(seconds_from_now: float) -> str:
    moment = datetime.datetime.now(datetime.UTC)
    moment += datetime.timedelta(seconds=seconds_from_now)
    return email.utils.format_datetime(moment, usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("30", 30.0),
        (" 7 ", 7.0),
        ("3600", RETRY_AFTER_MAX_SECONDS),
        ("9" * 400, RETRY_AFTER_MAX_SECONDS),
    ],
)
def test_delay_seconds_read(value, expected):
    assert parse_retry_after(value) == expected


@pytest.mark.parametrize(
    "value", [None, "", "soon", "-5", "1.5", "30s", "0x10", "Sun, 99 Foo 1994"]
)
def test_invalid_value_ignored(value):
    assert parse_retry_after(value) is None


def test_http_date_read():
    delay = parse_retry_after(http_date(20))

    assert delay is not None
    assert 18.0 <= delay <= 20.0


def test_past_http_date_is_zero():
    assert parse_retry_after(http_date(-3600)) == 0.0


def test_far_http_date_capped():
    assert parse_retry_after(http_date(86400)) == RETRY_AFTER_MAX_SECONDS


@pytest.mark.parametrize(
    "value",
    ["Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"],
    ids=["rfc850", "asctime"],
)
def test_obsolete_http_date_forms_read(value):
    assert parse_retry_after(value) == 0.0


@pytest.mark.parametrize("attempt", [1, 1025, 100_000])
def test_backoff_capped_after_many_waits(attempt):
    delay = backoff_seconds(attempt, 0.001, 0.5)

    assert 0.0005 <= delay <= 0.5
