"""JSON logging for the services. Only entry points call `configure_logging`."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback

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
            # A content filter leaves a traceback without exception messages.
            document["exception"] = record.exc_text or self.formatException(
                record.exc_info
            )
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


#: Set by the Helm chart in each model app pod to its blue/green slot.
SLOT_VARIABLE = "AGOGOSML_SLOT"


def configure_logging(level: str, service: str) -> None:
    """Send JSON logs at `level` to stderr, each tagged with the service name.

    In a pod of a blue/green slot, each line also has the ``slot`` that
    `SLOT_VARIABLE` names.

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


def sink_error_fields(exc: BaseException, text: str | None = None) -> dict[str, object]:
    """Return the log fields of an error, unmasked when a sink raised it.

    A sink's error names topics, files, message ids and sizes, never a
    message's content, so masking it would only hide what to fix. `text`
    replaces the error's own, such as a response that quotes it.
    """
    error = str(exc) if text is None else text
    return {"error": error, _NO_CONTENT_FIELD: isinstance(exc, SinkError)}


def traceback_without_messages(exc: BaseException) -> str:
    """Format the traceback of `exc` and its causes without their messages.

    An exception's message may quote the message that failed, such as a value
    that a scoring function could not parse, so only the exception types and
    the frames are kept, in the layout of Python's own tracebacks. An
    `OSError`, such as a refused connection, keeps its message: it names an
    address or a file, which is what to fix.
    """
    chunks: list[str] = []
    _append_traceback(exc, chunks, set())
    return "".join(chunks).rstrip("\n")


def _append_traceback(exc: BaseException, chunks: list[str], seen: set[int]) -> None:
    seen.add(id(exc))
    cause, context = exc.__cause__, exc.__context__
    if cause is not None and id(cause) not in seen:
        _append_traceback(cause, chunks, seen)
        chunks.append(
            "\nThe above exception was the direct cause of the following exception:\n\n"
        )
    elif (
        context is not None and not exc.__suppress_context__ and id(context) not in seen
    ):
        _append_traceback(context, chunks, seen)
        chunks.append(
            "\nDuring handling of the above exception, another exception occurred:\n\n"
        )
    if exc.__traceback__ is not None:
        chunks.append("Traceback (most recent call last):\n")
        chunks.extend(traceback.format_tb(exc.__traceback__))
    try:
        has_message = bool(str(exc))
    except Exception:  # noqa: BLE001 - a broken __str__ still gets its type logged
        has_message = True
    module = type(exc).__module__
    name = type(exc).__qualname__
    if module not in ("builtins", "__main__"):
        name = f"{module}.{name}"
    if isinstance(exc, OSError):
        chunks.extend(traceback.format_exception_only(exc))
    elif has_message:
        chunks.append(f"{name}: (message not logged)\n")
    else:
        chunks.append(f"{name}\n")


class _ContentFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = getattr(record, "error", None)
        if isinstance(error, str) and not getattr(record, _NO_CONTENT_FIELD, False):
            record.error = mask_content(error)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = traceback_without_messages(record.exc_info[1])
        return True


class _ServiceFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self.slot = os.environ.get(SLOT_VARIABLE, "")

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        if self.slot:
            record.slot = self.slot
        return True
