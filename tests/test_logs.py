import json
import logging

import pytest

from agogosml.errors import SinkError, SourceError
from agogosml.logs import (
    JsonFormatter,
    configure_logging,
    sink_error_fields,
    traceback_without_messages,
)


def make_record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "agogosml.test", logging.INFO, "", 0, message, args, None
    )
    for name, value in extra.items():
        setattr(record, name, value)
    return record


def test_log_line_is_json_with_extra_fields():
    record = make_record("retrying %d message(s)", 3, message_id="m-1", attempt=2)

    document = json.loads(JsonFormatter().format(record))

    assert document["message"] == "retrying 3 message(s)"
    assert document["level"] == "INFO"
    assert document["message_id"] == "m-1"
    assert document["attempt"] == 2


def test_undecodable_text_still_logged():
    record = make_record("rejected", message_id="id-\udcff")

    document = json.loads(JsonFormatter().format(record))

    assert document["message_id"] == "id-\udcff"


def logged_line(level: str, extra: dict[str, object], capsys) -> dict[str, object]:
    """Log one line with `extra` at WARNING, as a service configured at `level`."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(level, "test")
        logging.getLogger("agogosml.test").warning("rejected", extra=extra)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    return json.loads(capsys.readouterr().err.splitlines()[-1])


def test_log_line_names_slot_of_pod(capsys, monkeypatch):
    monkeypatch.setenv("AGOGOSML_SLOT", "green")

    document = logged_line("INFO", {}, capsys)

    assert document["slot"] == "green"
    assert document["service"] == "test"


def test_log_line_without_slot_outside_one(capsys, monkeypatch):
    monkeypatch.delenv("AGOGOSML_SLOT", raising=False)

    assert "slot" not in logged_line("INFO", {}, capsys)


def logged_error(level: str, error: str, capsys) -> str:
    """Log one line with `error` at WARNING, as a service configured at `level`."""
    return str(logged_line(level, {"error": error}, capsys)["error"])


def test_quoted_values_masked_below_debug(capsys):
    error = "Invalid value \"card-4111\" for field 'V1' (a number); the app's fix"

    assert logged_error("INFO", error, capsys) == (
        "Invalid value \"…\" for field '…' (a number); the app's fix"
    )
    assert logged_error("DEBUG", error, capsys) == error


def test_response_body_cut_below_debug(capsys):
    error = 'app responded 400: {"error": "amount 4111 is negative"}'

    assert logged_error("WARNING", error, capsys) == (
        "app responded 400 (body not logged)"
    )
    assert logged_error("DEBUG", error, capsys) == error


def test_sink_error_not_masked(capsys):
    error = SinkError("writing output file '/data/out.jsonl' failed: [Errno 27]")

    line = logged_line("INFO", sink_error_fields(error), capsys)

    assert line["error"] == str(error)
    assert not any(name.startswith("_") for name in line)


@pytest.mark.parametrize("error", [SourceError("value 'x'"), ValueError("value 'x'")])
def test_other_error_still_masked(capsys, error: Exception):
    line = logged_line("INFO", sink_error_fields(error), capsys)

    assert line["error"] == "value '…'"


def logged_exception(level: str, capsys) -> str:
    """Log a chained exception at ERROR, as a service configured at `level`."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(level, "test")
        try:
            try:
                int("card-4111")
            except ValueError as exc:
                message = "cannot score " + "card-4111"
                raise RuntimeError(message) from exc
        except RuntimeError:
            logging.getLogger("agogosml.test").exception("scoring failed")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    return str(json.loads(capsys.readouterr().err.splitlines()[-1])["exception"])


def test_traceback_without_messages_below_debug(capsys):
    masked = logged_exception("INFO", capsys)
    full = logged_exception("DEBUG", capsys)

    assert "cannot score card-4111" not in masked
    assert "invalid literal" not in masked
    assert masked.startswith("Traceback (most recent call last):\n")
    assert "\nValueError: (message not logged)\n" in masked
    assert "direct cause of the following exception" in masked
    assert masked.endswith("\nRuntimeError: (message not logged)")
    assert full.endswith("RuntimeError: cannot score card-4111")


def test_os_error_keeps_its_message_below_debug():
    try:
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9000)")
    except ConnectionRefusedError as exc:
        text = traceback_without_messages(exc)

    assert text.endswith(
        "\nConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 9000)"
    )
