"""JSON logging for the services. Only entry points call `configure_logging`."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

import orjson

from agogosml.errors import SinkError

# Attributes every LogRecord has; anything else was passed through `extra=`.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Format records as one JSON object a line, with `extra=` fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as JSON."""
        document: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRIBUTES and not name.startswith("_"):
                document[name] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(document, default=str).decode()
        except orjson.JSONEncodeError:
            # Text decoded with "surrogateescape" (undecodable header bytes) is
            # not valid UTF-8 for orjson; the standard encoder escapes it.
            return json.dumps(document, default=str)


#: A response body quoted in an error, as in "app responded 400: {...}".
_RESPONSE_BODY = re.compile(r"(responded \d{3}): .*", re.DOTALL)
#: A quoted value: a quote that follows no letter or digit (so not the
#: apostrophe of "app's"), up to its closing quote.
_QUOTED = re.compile(r"(?<!\w)'(?:[^'\\]|\\.)*'" + r'|(?<!\w)"(?:[^"\\]|\\.)*"')


def mask_content(text: str) -> str:
    """Return an error text without the message content that it may quote.

    Errors about bad input name the value, as the client needs, but logs must
    not carry message content: response bodies are cut off, and quoted values
    become '…'.
    """
    text = _RESPONSE_BODY.sub(r"\1 (body not logged)", text)
    return _QUOTED.sub(lambda match: f"{match.group()[0]}…{match.group()[0]}", text)


def configure_logging(level: str, service: str) -> None:
    """Send JSON logs at `level` to stderr, each tagged with the service name.

    Below DEBUG the ``error`` field of a line is masked with `mask_content`:
    only DEBUG logs the values that an error quotes.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_ServiceFilter(service))
    if logging.getLevelName(level) > logging.DEBUG:
        handler.addFilter(_ContentFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


#: A log record field, left out of the output, that exempts ``error`` from masking.
_NO_CONTENT_FIELD = "_error_without_content"


def sink_error_fields(exc: BaseException) -> dict[str, object]:
    """Return the log fields of an error, unmasked when a sink raised it.

    A sink's error names topics, files, message ids and sizes, never a
    message's content, so masking it would only hide what to fix.
    """
    return {"error": str(exc), _NO_CONTENT_FIELD: isinstance(exc, SinkError)}


class _ContentFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = getattr(record, "error", None)
        if isinstance(error, str) and not getattr(record, _NO_CONTENT_FIELD, False):
            record.error = mask_content(error)
        return True


class _ServiceFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        return True
