"""Tests of checking READER_TRANSFORM and WRITER_TAP when the services start."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agogosml.envelope import Envelope
from agogosml.errors import ConfigurationError
from agogosml.reader.transform import load_transform
from agogosml.writer.service import load_tap

MODULE = __name__
TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent


# Functions that READER_TRANSFORM and WRITER_TAP name in these tests.


def keep(envelope: Envelope) -> Envelope:
    return envelope


def keep_with_option(envelope: Envelope, label: str = "") -> Envelope:
    return envelope


def keep_any(*arguments: Any) -> Any:
    return arguments[0]


async def keep_async(envelope: Envelope) -> Envelope:
    return envelope


async def keep_async_generator(envelope: Envelope) -> Any:
    yield envelope


def keep_generator(envelope: Envelope) -> Any:
    yield envelope


def keep_two(envelope: Envelope, label: str) -> Envelope:
    return envelope


def keep_none() -> None:
    return None


def keep_keyword_only(envelope: Envelope, *, label: str) -> Envelope:
    return envelope


class Keeper:
    def __call__(self, envelope: Envelope) -> Envelope:
        return envelope


class AsyncKeeper:
    async def __call__(self, envelope: Envelope) -> Envelope:
        return envelope


keeper = Keeper()
async_keeper = AsyncKeeper()
keep_labelled = functools.partial(keep_two, label="x")
keep_async_partial = functools.partial(keep_async)
NOT_A_FUNCTION = 42


@pytest.mark.parametrize(
    "name",
    ["keep", "keep_with_option", "keep_any", "keeper", "keep_labelled", "len"],
)
def test_valid_transform_loaded(name):
    module = "builtins" if name == "len" else MODULE

    assert callable(load_transform(f"{module}:{name}"))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("keep_async", "async function"),
        ("keep_async_generator", "async function"),
        ("async_keeper", "async function"),
        ("keep_async_partial", "async function"),
        ("keep_generator", "generator function"),
        ("keep_two", "(envelope: 'Envelope', label: 'str')"),
        ("keep_none", "signature ()"),
        ("keep_keyword_only", "does not take one positional argument"),
        ("NOT_A_FUNCTION", "an object of type int, not a function"),
    ],
)
def test_invalid_transform_rejected(name, reason):
    spec = f"{MODULE}:{name}"

    with pytest.raises(ConfigurationError) as caught:
        load_transform(spec)

    message = str(caught.value)
    assert message.startswith(f"READER_TRANSFORM={spec!r} is invalid: ")
    assert reason in message
    assert "name a plain function (def, not async def)" in message


def test_missing_transform_rejected():
    with pytest.raises(ConfigurationError, match="cannot be imported"):
        load_transform(f"{MODULE}:no_such_function")


def run_service(module: str, settings: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a service with `settings` and none of the caller's own service settings."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("READER_", "WRITER_", "KAFKA_", "EVENTHUB_"))
    }
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)])
    environment.update(settings)
    return subprocess.run(
        [sys.executable, "-m", module],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_async_transform_stops_reader(tmp_path):
    input_file = tmp_path / "in.jsonl"
    input_file.write_text('{"n": 0}\n')
    spec = f"{MODULE}:keep_async"

    result = run_service(
        "agogosml.reader",
        {
            "READER_INPUT": str(input_file),
            "READER_APP_URL": "http://127.0.0.1:1",
            "READER_PORT": "0",
            "READER_TRANSFORM": spec,
        },
    )

    assert result.returncode == 2
    assert f"READER_TRANSFORM={spec!r} is invalid" in result.stderr
    assert "async function" in result.stderr
    assert "Traceback" not in result.stderr
    assert "RuntimeWarning" not in result.stderr
    assert not (tmp_path / "in.jsonl.dlq.jsonl").exists()


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (f"{MODULE}:keep_async", "the tap is called synchronously after each write"),
        ("math:pi", "an object of type float, not a function"),
        ("os:getpid", "does not take one positional argument"),
        (f"{MODULE}:keep_generator", "generator function"),
    ],
)
def test_invalid_tap_rejected(spec, reason):
    with pytest.raises(ConfigurationError) as caught:
        load_tap(spec)

    message = str(caught.value)
    assert message.startswith(f"WRITER_TAP={spec!r} is invalid: ")
    assert reason in message
    assert "the list of written Envelopes" in message


def test_valid_tap_loaded():
    assert callable(load_tap(f"{MODULE}:keep"))


def test_invalid_tap_stops_writer(tmp_path):
    result = run_service(
        "agogosml.writer",
        {
            "WRITER_OUTPUT": str(tmp_path / "out.jsonl"),
            "WRITER_PORT": "0",
            "WRITER_TAP": "math:pi",
        },
    )

    assert result.returncode == 2
    assert "WRITER_TAP='math:pi' is invalid" in result.stderr
    assert "Traceback" not in result.stderr
