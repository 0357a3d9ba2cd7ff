import json
import logging

from agogosml.logs import JsonFormatter


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
