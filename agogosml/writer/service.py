"""The output writer: an HTTP endpoint that responds only after records are durable."""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from aiohttp import web

from agogosml import exact_json
from agogosml.config import WriterSettings
from agogosml.envelope import (
    MESSAGE_ID_HEADER,
    TRACEPARENT_HEADER,
    Envelope,
    RecordHeaders,
    bounded_id,
    child_traceparent,
    header_safe_id,
    id_problem,
)
from agogosml.errors import SinkError
from agogosml.exact_json import json_type
from agogosml.hooks import load_hook
from agogosml.http import (
    BASE64_RECORD_HEADERS,
    CASED_RECORD_HEADERS,
    MAX_BODY_BYTES,
    NULL_RECORD_HEADERS,
    LogRateLimit,
    add_health_routes,
    bearer_auth_middleware,
    bound_port,
    content_type_problem,
    error_response,
    header_for_log,
    header_spellings,
    http_error_middleware,
    is_repeated,
    is_utf8,
    json_response,
    listed_header_names,
    null_header_names,
    read_body,
    start_site,
    unknown_field_problem,
)
from agogosml.logs import sink_error_fields
from agogosml.metrics import (
    IN_FLIGHT,
    MESSAGES_IN,
    MESSAGES_OUT,
    REJECTED_REQUESTS,
    SINK_ERRORS,
    SINK_SECONDS,
    start_at_zero,
)
from agogosml.transports.base import Sink, stop_within
from agogosml.transports.factory import build_sink

logger = logging.getLogger(__name__)

SERVICE = "output_writer"
DATA_PATHS = frozenset({"/", "/batch"})
#: Request headers with this prefix become record headers (prefix removed).
RECORD_HEADER_PREFIX = "X-Record-Header-"
#: Record headers that the writer sets from the message id and trace context.
#: Extra headers of these names are not written, so they cannot override them.
RESERVED_HEADERS = frozenset({MESSAGE_ID_HEADER, TRACEPARENT_HEADER})
#: Key encodings the writer decodes; without one, the key is UTF-8 text.
KEY_ENCODINGS = ("base64",)
#: Time that shutdown steps after the drain get even when the drain used all of
#: WRITER_SHUTDOWN_TIMEOUT_MS, so that finished requests can still respond.
SHUTDOWN_GRACE_SECONDS = 0.5

Tap = Callable[[Sequence[Envelope]], Any]

#: How to fix a tap that does not fit.
_TAP_FIX = (
    "name a plain function (def, not async def) that takes one argument, the "
    "list of written Envelopes"
)


def load_tap(spec: str) -> Tap:
    """Import the tap that WRITER_TAP names and check that it fits.

    A tap is called synchronously once the records of a request are durable,
    before the writer responds, so it is checked like a transform.

    Raises:
        ConfigurationError: as `agogosml.hooks.load_hook`.
    """
    return load_hook(  # type: ignore[no-any-return]
        spec,
        "WRITER_TAP",
        _TAP_FIX,
        "the tap is called synchronously after each write. Hand the envelopes "
        "to a queue or thread of your own for I/O",
    )


#: Retry-After of a 503 for a sink failure, in seconds.
#: The reader waits that long without using up an attempt, so a broker outage or a
#: missing topic does not move valid messages to the dead letters.
SINK_RETRY_AFTER_SECONDS = 5
#: Maximum ERROR lines about failed sink writes per interval. Each further
#: failure is still counted in agogosml_sink_errors_total, and the next line
#: gives the number of lines not logged.
SINK_ERROR_LOG_LIMIT = 10
SINK_ERROR_LOG_INTERVAL_SECONDS = 60.0

#: Retry-After of a 503 while the writer shuts down, in seconds: a restarted or
#: other replica takes requests soon.
DRAINING_RETRY_AFTER_SECONDS = 1


class BadRequest(Exception):
    """A request that cannot become records; `status` is the HTTP response status.

    `retry_after` is the value of a Retry-After header in seconds, or None.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
        cause: SinkError | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        #: The sink's error that the message quotes, if any.
        self.cause = cause


class OutputWriter:
    """Turn ``POST /`` and ``POST /batch`` requests into records on a sink.

    ``POST /`` takes one JSON document as the record value, with the key in
    ``X-Message-Key``, the id in ``X-Message-Id`` and trace context in
    ``traceparent``. ``POST /batch`` takes a JSON array of objects with the
    `agogosml.http.BATCH_FIELDS`, where only ``value`` is required. Either
    responds with 200 only after the sink acknowledged every record of the
    request.
    """

    def __init__(self, settings: WriterSettings, sink: Sink, tap: Tap | None = None):
        self._settings = settings
        self._sink = sink
        self._tap = tap
        self._in_flight = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        for counter in (MESSAGES_IN, MESSAGES_OUT, SINK_ERRORS):
            start_at_zero(counter, (SERVICE,))
        # Every open request fails while the sink does, each with a line.
        self._sink_error_log = LogRateLimit(
            SINK_ERROR_LOG_LIMIT, SINK_ERROR_LOG_INTERVAL_SECONDS
        )

    @property
    def ready(self) -> bool:
        """Whether the sink is connected and the writer is not shutting down."""
        return self._sink.connected and not self._draining

    def _not_ready_reason(self) -> str:
        if self._draining:
            return "the output writer is shutting down"
        return self._sink.unavailable_reason

    def build_app(self) -> web.Application:
        """Return the aiohttp application with data, health and metrics routes."""
        middlewares = [http_error_middleware(SERVICE), _error_middleware]
        token = self._settings.token.get_secret_value()
        if token:
            middlewares.append(bearer_auth_middleware(token, DATA_PATHS))
        app = web.Application(
            client_max_size=self._settings.max_body_bytes, middlewares=middlewares
        )
        app[MAX_BODY_BYTES] = self._settings.max_body_bytes
        app.router.add_post("/", self.post_one)
        app.router.add_post("/batch", self.post_batch)
        add_health_routes(
            app,
            SERVICE,
            lambda: self.ready,
            lambda: self._sink.failure,
            self._not_ready_reason,
        )
        return app

    async def post_one(self, request: web.Request) -> web.Response:
        """Write the request body as one record."""
        body = await self._read_json_body(request)
        _decode_json(body)
        envelope = _envelope_from_headers(body, request.headers)
        await self._write([envelope])
        return json_response({"written": 1, "ids": [envelope.id]})

    async def post_batch(self, request: web.Request) -> web.Response:
        """Write every element of a JSON array as a record."""
        body = await self._read_json_body(request)
        envelopes = _envelopes_from_batch(_decode_json(body))
        # orjson decodes an integer outside the 64-bit range to a float, which it
        # encodes with an exponent of at least 18, so only values with "e+" may
        # have been changed. Those batches are decoded again, exactly.
        if any(b"e+" in envelope.value for envelope in envelopes):
            envelopes = _envelopes_from_batch(_decode_json_exactly(body))
        if envelopes:
            await self._write(envelopes)
        return json_response(
            {"written": len(envelopes), "ids": [envelope.id for envelope in envelopes]}
        )

    async def _read_json_body(self, request: web.Request) -> bytes:
        """Return the body of a JSON request, or raise `BadRequest`."""
        # Both 503s carry Retry-After, so a reader waits them out without using
        # up the attempts of valid messages, as for a failed write.
        if self._draining:
            raise BadRequest(
                503,
                "the writer is shutting down; retry on another replica",
                retry_after=DRAINING_RETRY_AFTER_SECONDS,
            )
        if not self._sink.connected:
            raise BadRequest(
                503,
                self._sink.unavailable_reason,
                retry_after=SINK_RETRY_AFTER_SECONDS,
            )
        problem = content_type_problem(request)
        if problem:
            raise BadRequest(415, problem)
        return await read_body(request)

    async def _write(self, envelopes: list[Envelope]) -> None:
        count = len(envelopes)
        MESSAGES_IN.labels(SERVICE).inc(count)
        self._in_flight += count
        IN_FLIGHT.labels(SERVICE).set(self._in_flight)
        self._idle.clear()
        started = time.perf_counter()
        try:
            await self._sink.send(envelopes)
        except SinkError as exc:
            SINK_ERRORS.labels(SERVICE).inc(count)
            fields: dict[str, object] = {
                "message_ids": [e.id for e in envelopes[:20]],
                **sink_error_fields(exc),
                "retriable": exc.retriable,
            }
            if exc.failures:
                fields["failed_ids"] = list(exc.failures)[:20]
            dropped = self._sink_error_log.take()
            if dropped is not None:
                fields["not_logged_before"] = dropped
                logger.error("sink did not acknowledge records", extra=fields)
            raise _sink_error_response(exc, len(envelopes)) from None
        finally:
            self._in_flight -= count
            IN_FLIGHT.labels(SERVICE).set(self._in_flight)
            if self._in_flight == 0:
                self._idle.set()
        SINK_SECONDS.labels(SERVICE).observe(time.perf_counter() - started)
        MESSAGES_OUT.labels(SERVICE).inc(count)
        if self._tap is not None:
            self._call_tap(envelopes)

    def _call_tap(self, envelopes: list[Envelope]) -> None:
        # A tap must not fail a durable write. SIGINT and SIGTERM stop the
        # writer through signal handlers, so a SystemExit or KeyboardInterrupt
        # here comes from the tap, such as a library that calls sys.exit.
        try:
            self._tap(envelopes)  # type: ignore[misc]
        except (Exception, KeyboardInterrupt, SystemExit):  # noqa: BLE001
            logger.exception(
                "WRITER_TAP raised; the records were written anyway",
                extra={"message_ids": [envelope.id for envelope in envelopes[:20]]},
            )

    async def drain(self, timeout_seconds: float) -> None:
        """Reject new requests with 503 and wait for in-flight writes to finish."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_seconds)
        except TimeoutError:
            logger.warning(
                "%d records still in flight after %.1f s",
                self._in_flight,
                timeout_seconds,
            )


def _sink_error_response(exc: SinkError, count: int) -> BadRequest:
    """Return 503 for a failure a retry may fix, else 422 so callers stop retrying.

    Records that the destination rejected as too large or invalid, without the
    sink knowing which (`SinkError.size_rejected`, `SinkError.batch_rejected`),
    get 422 when the request had several, so that `ModelApp` sends them again
    one at a time and only the record at fault fails. A single record gets 503
    without Retry-After, so each retry uses up an attempt and a record that the
    topic never takes ends in the dead letters instead of being retried forever.
    """
    rejected = exc.size_rejected or exc.batch_rejected
    if rejected and count > 1:
        return BadRequest(
            422,
            f"records were not written: {exc}. Send the {count} records one at a "
            "time to find the one that the topic rejects",
            cause=exc,
        )
    if exc.retriable:
        return BadRequest(
            503,
            f"records were not written: {exc}",
            retry_after=None if rejected else SINK_RETRY_AFTER_SECONDS,
            cause=exc,
        )
    return BadRequest(
        422,
        f"records were not written, and a retry would fail the same way: {exc}",
        cause=exc,
    )


@web.middleware
async def _error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as exc:
        headers = None
        if exc.retry_after is not None:
            headers = {"Retry-After": str(exc.retry_after)}
        return _reject(request, exc.status, str(exc), headers, cause=exc.cause)
    except web.HTTPRequestEntityTooLarge:
        return _reject(
            request,
            413,
            f"request body exceeds the limit of {request.app[MAX_BODY_BYTES]} bytes;"
            " send smaller batches or raise WRITER_MAX_BODY_BYTES",
        )


def _reject(
    request: web.Request,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    cause: SinkError | None = None,
) -> web.Response:
    """Respond with an error, logging it masked unless the sink's error is its cause."""
    REJECTED_REQUESTS.labels(SERVICE, str(status)).inc()
    error = {"error": message} if cause is None else sink_error_fields(cause, message)
    logger.info(
        "request rejected",
        extra={
            "status": status,
            "path": request.path,
            **error,
            "message_id": header_for_log(request.headers, "X-Message-Id"),
        },
    )
    return error_response(status, message, headers=headers)


def _envelope_from_headers(body: bytes, headers: Any) -> Envelope:
    encoding = _utf8_header(headers, "X-Message-Key-Encoding") or ""
    _check_key_encoding(encoding, "header X-Message-Key-Encoding")
    # aiohttp rejects every control character in a header value except the tab.
    message_id = _utf8_header(headers, "X-Message-Id") or ""
    _check_id(message_id, "header X-Message-Id")
    return Envelope(
        value=body,
        key=_decode_key(
            _utf8_header(headers, "X-Message-Key"), encoding, "header X-Message-Key"
        ),
        headers=_record_headers(
            headers,
            _base64_header_names(headers),
            header_spellings(_utf8_header(headers, CASED_RECORD_HEADERS) or ""),
            _null_header_names(headers),
        ),
        id=bounded_id(message_id),
        traceparent=child_traceparent(headers.get("traceparent", "")),
    )


def _utf8_header(headers: Any, name: str) -> str | None:
    """Return a request header that must be UTF-8 text, or None when it is absent.

    aiohttp decodes header bytes that are not UTF-8 to lone surrogates, which
    cannot be encoded again, so such a value is rejected here with a 400.
    """
    if is_repeated(headers, name):
        raise BadRequest(400, f"header {name} is sent more than once; send it once")
    value = headers.get(name)
    if value is not None and not is_utf8(value):
        hint = (
            "; base64-encode the key and send X-Message-Key-Encoding: base64"
            if name == "X-Message-Key"
            else "; send it as UTF-8 text"
        )
        raise BadRequest(400, f"header {name} is not valid UTF-8{hint}")
    return value


def _base64_header_names(headers: Any) -> set[str]:
    """Return the lower-case record header names that `BASE64_RECORD_HEADERS` lists."""
    return set(listed_header_names(_utf8_header(headers, BASE64_RECORD_HEADERS) or ""))


def _null_header_names(headers: Any) -> list[str]:
    """Return the record header names that `NULL_RECORD_HEADERS` lists, as spelled."""
    try:
        return null_header_names(_utf8_header(headers, NULL_RECORD_HEADERS) or "")
    except ValueError as exc:
        raise BadRequest(400, str(exc)) from None


def _record_headers(
    headers: Any,
    base64_names: set[str],
    spellings: dict[str, str],
    null_names: list[str],
) -> RecordHeaders:
    """Return the ``X-Record-Header-<name>`` request headers as record headers.

    The values of the headers in `base64_names` are decoded from base64. A
    name is written as `spellings` spells it, else in lower case. Each name
    of `null_names` becomes a header with a null value.
    """
    unmatched = set(base64_names)
    record_headers: RecordHeaders = []
    seen: set[str] = set()
    for name, value in headers.items():
        if not name.lower().startswith(RECORD_HEADER_PREFIX.lower()):
            continue
        if not (is_utf8(name) and is_utf8(value)):
            raise BadRequest(
                400,
                f"header {name.encode(errors='replace').decode()} is not valid "
                "UTF-8; send record header names and values as UTF-8 text",
            )
        record_name = name[len(RECORD_HEADER_PREFIX) :].lower()
        if not record_name:
            raise BadRequest(
                400,
                f"header {name} has no record header name; send "
                f"{RECORD_HEADER_PREFIX}<name>",
            )
        if record_name in seen:
            # A file sink stores headers as a JSON object, which has one value
            # per name, so a repeated header is rejected for every sink alike.
            raise BadRequest(
                400,
                f"header {RECORD_HEADER_PREFIX}{record_name} is sent more than "
                "once; a record has one value per header name, so send it once",
            )
        seen.add(record_name)
        raw = value.encode()
        if record_name in base64_names:
            unmatched.discard(record_name)
            raw = _decode_header_value(raw, f"header {name}")
        if record_name not in RESERVED_HEADERS:
            record_headers.append((spellings.get(record_name, record_name), raw))
    if unmatched:
        missing = ", ".join(sorted(unmatched))
        raise BadRequest(
            400,
            f"header {BASE64_RECORD_HEADERS} lists {missing}, but no "
            f"{RECORD_HEADER_PREFIX}<name> header has that name; list only the "
            "record headers sent base64-encoded",
        )
    for name in null_names:
        lowered = name.lower()
        if lowered in seen:
            raise BadRequest(
                400,
                f"header {NULL_RECORD_HEADERS} lists {name}, which the request "
                f"also sends as {RECORD_HEADER_PREFIX}{lowered}; a record header "
                "has one value, so send it in one of the two",
            )
        if lowered not in RESERVED_HEADERS:
            record_headers.append((name, None))
    return record_headers


def _decode_header_value(value: bytes, where: str) -> bytes:
    """Return a base64-encoded record header value as bytes."""
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise BadRequest(
            400,
            f"{where} is listed as base64-encoded, but {value.decode()!r:.60} is "
            "not valid base64; send the value base64-encoded, or do not list the "
            "header",
        ) from None


def _decode_json(body: bytes) -> Any:
    """Return the decoded body, or raise `BadRequest` if it is not valid JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson rejects an integer beyond the range of a double, which is
        # valid JSON, so the exact decoder gets a second look.
        if "infinity" not in str(exc):
            error = exact_json.decode_error(body, exc)
            raise BadRequest(400, f"request body is not valid JSON: {error}") from None
    try:
        return exact_json.loads_exact(body, exact_json.int_or_fragment)
    except ValueError as exc:
        # The exact decoder names the first problem in the document, where
        # orjson's error may be about a long integer that is valid JSON.
        raise BadRequest(400, f"request body is not valid JSON: {exc}") from None


def _decode_json_exactly(body: bytes) -> Any:
    """Decode `body` (which orjson accepted) with integers beyond 64 bits exact."""
    try:
        return exact_json.loads_exact(body, exact_json.int_or_fragment)
    except ValueError as exc:
        raise BadRequest(
            400, f"request body cannot be decoded exactly: {exc}"
        ) from None


def _envelopes_from_batch(items: Any) -> list[Envelope]:
    if not isinstance(items, list):
        raise BadRequest(
            400,
            f"POST /batch expects a JSON array, got {json_type(items)}; "
            'send [{"value": ...}, ...] or POST a single document to /',
        )
    return [_envelope_from_item(index, item) for index, item in enumerate(items)]


def _envelope_from_item(index: int, item: object) -> Envelope:
    if not isinstance(item, dict) or "value" not in item:
        raise BadRequest(
            400,
            f"batch element {index} must be an object with a 'value' field, got "
            f"{_preview(item)}",
        )
    problem = unknown_field_problem(item)
    if problem:
        raise BadRequest(400, f"batch element {index}: {problem}")
    message_id = _optional_text(index, item, "id")
    # An id without unprintable characters has no control character either,
    # and most ids are such, so they skip the check and its message.
    if message_id and not message_id.isprintable():
        _check_id(message_id, f"batch element {index}: id")
    parent = _optional_text(index, item, "traceparent")
    record_headers: RecordHeaders = []
    item_headers = _item_headers(index, item.get("headers"))
    base64_names = _item_header_encodings(index, item, item_headers)
    for name, value in item_headers.items():
        lowered = name.lower()
        if value is None:
            # A null id or trace context counts as absent, as in a record.
            if lowered not in (MESSAGE_ID_HEADER, TRACEPARENT_HEADER):
                record_headers.append((name, None))
            continue
        raw = value.encode()
        if name in base64_names:
            where = f"batch element {index}: header {name!r}"
            raw = _decode_header_value(raw, where)
        if lowered == MESSAGE_ID_HEADER:
            # Decoded like a message-id record header that the reader reads.
            message_id = message_id or header_safe_id(raw)
        elif lowered == TRACEPARENT_HEADER:
            parent = parent or raw.decode("ascii", "replace")
        else:
            record_headers.append((name, raw))
    encoding = (
        _item_key_encoding(index, item) if item.get("key_encoding") is not None else ""
    )
    return Envelope(
        value=_encode_value(index, item["value"]),
        key=_decode_key(
            _optional_text(index, item, "key"), encoding, f"batch element {index}: key"
        ),
        headers=record_headers,
        id=bounded_id(message_id or ""),
        traceparent=child_traceparent(parent or ""),
    )


def _check_id(message_id: str, where: str) -> None:
    """Raise `BadRequest` when `message_id` contains a control character."""
    problem = id_problem(message_id)
    if problem:
        raise BadRequest(400, f"{where} {problem}")


def _item_key_encoding(index: int, item: dict[str, Any]) -> str:
    """Return the ``key_encoding`` of a batch element, "" when absent or null."""
    encoding = item.get("key_encoding")
    if encoding is None:
        return ""
    if not isinstance(encoding, str):
        raise BadRequest(
            400,
            f"batch element {index}: 'key_encoding' must be a string or null, got "
            f"{json_type(encoding)}; send 'base64' for a base64-encoded key, or "
            "null for a UTF-8 key",
        )
    _check_key_encoding(encoding, f"batch element {index}: 'key_encoding'")
    return encoding


def _check_key_encoding(encoding: str, where: str) -> None:
    """Raise `BadRequest` unless `encoding` is empty or in `KEY_ENCODINGS`."""
    if encoding and encoding.lower() not in KEY_ENCODINGS:
        raise BadRequest(
            400,
            f"{where} {encoding!r:.60} is not supported; use 'base64' for a "
            "base64-encoded key, or leave it out for a UTF-8 key",
        )


def _item_header_encodings(
    index: int, item: dict[str, Any], headers: dict[str, str | None]
) -> set[str]:
    """Return the names of the headers that a batch element sends base64-encoded.

    ``header_encodings`` maps a name of ``headers`` to ``base64`` (any case).
    """
    encodings = item.get("header_encodings")
    if encodings is None:
        return set()
    if not isinstance(encodings, dict):
        raise BadRequest(
            400,
            f"batch element {index}: 'header_encodings' must be an object, got "
            f"{json_type(encodings)}; map each base64-encoded header's name to "
            "'base64'",
        )
    for name, encoding in encodings.items():
        if name not in headers:
            raise BadRequest(
                400,
                f"batch element {index}: 'header_encodings' names {name!r}, which "
                "is not in 'headers'; list only headers that the element sends",
            )
        if headers[name] is None:
            raise BadRequest(
                400,
                f"batch element {index}: 'header_encodings' names {name!r}, whose "
                "value is null; list only headers sent base64-encoded",
            )
        if not isinstance(encoding, str) or encoding.lower() != "base64":
            raise BadRequest(
                400,
                f"batch element {index}: the encoding of header {name!r} is "
                f"{_preview(encoding)}; use 'base64', or leave the header out of "
                "'header_encodings' for UTF-8 text",
            )
    return set(encodings)


def _item_headers(index: int, headers: object) -> dict[str, str | None]:
    """Return the ``headers`` object of a batch element, checking every value.

    A value is a string, or null for a record header with a null value.
    """
    if headers is None:
        return {}
    if not isinstance(headers, dict):
        raise BadRequest(400, f"batch element {index}: 'headers' must be an object")
    for name, value in headers.items():
        if not name:
            raise BadRequest(
                400,
                f"batch element {index}: a header has an empty name; give every "
                "header a name, or leave it out",
            )
        if value is not None and not isinstance(value, str):
            raise BadRequest(
                400,
                f"batch element {index}: header {name!r} must be a string or "
                f"null, got {json_type(value)}; send the value as a JSON string, "
                "or leave the header out",
            )
    return headers


def _optional_text(index: int, item: dict[str, Any], field: str) -> str | None:
    value = item.get(field)
    if value is not None and not isinstance(value, str):
        raise BadRequest(
            400,
            f"batch element {index}: {field!r} must be a string or null, got "
            f"{json_type(value)}",
        )
    return value


def _encode_value(index: int, value: object) -> bytes:
    try:
        return exact_json.compact(orjson.dumps(value))
    except orjson.JSONEncodeError as exc:
        # orjson decodes deeper nesting than it encodes.
        raise BadRequest(
            400,
            f"batch element {index}: 'value' cannot be encoded as JSON again "
            f"({exc}); nest it less deeply, or POST it alone to /, which writes "
            "the body as it was sent",
        ) from None


def _preview(item: object) -> str:
    """Return the start of `item` as JSON for an error message."""
    try:
        text = orjson.dumps(item).decode()
    except orjson.JSONEncodeError:
        return f"a {type(item).__name__} nested too deeply to show"
    return repr(text[:100])


def _decode_key(key: str | None, encoding: str, where: str) -> bytes | None:
    """Return the key's bytes; `where` names the key in the error for bad base64."""
    if key is None:
        return None
    if encoding.lower() == "base64":
        try:
            return base64.b64decode(key, validate=True)
        except ValueError:
            raise BadRequest(
                400,
                f"{where} {key!r:.60} is not valid base64; send the key "
                "base64-encoded, or leave out the base64 key encoding",
            ) from None
    return key.encode()


async def serve_writer(settings: WriterSettings) -> None:
    """Run the writer until SIGTERM/SIGINT, then drain and flush the sink.

    The shutdown takes at most WRITER_SHUTDOWN_TIMEOUT_MS plus three times
    `SHUTDOWN_GRACE_SECONDS`: aiohttp 3.14 waits up to that grace for requests
    in progress and as long again after it cancels them, and the sink gets
    the time left, or the grace if none is left. Requests cut off get no 2xx
    response.
    """
    tap = load_tap(settings.tap) if settings.tap else None
    sink = build_sink(settings.sink, settings.output, fsync=settings.fsync)
    writer = OutputWriter(settings, sink, tap)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    timeout_seconds = settings.shutdown_timeout_ms / 1000
    deadline = loop.time() + timeout_seconds

    # The port first: a writer that cannot listen exits before its sink
    # creates an output file or connects. Until the sink runs, requests get
    # 503 and /readyz fails.
    runner = await start_site(
        writer.build_app(),
        settings.host,
        settings.port,
        "WRITER_",
        shutdown_timeout_seconds=SHUTDOWN_GRACE_SECONDS,
    )
    sink_started = False
    try:
        await sink.start()
        sink_started = True
        logger.info(
            "output writer started",
            extra={
                "sink": settings.sink.value,
                "output": settings.output,
                "port": bound_port(runner),
            },
        )
        await stop.wait()
        logger.info("stop requested; finishing in-flight writes")
        deadline = loop.time() + timeout_seconds
        await writer.drain(timeout_seconds)
    finally:
        await runner.cleanup()
        if sink_started:
            await _stop_sink(sink, deadline - loop.time())
    logger.info("output writer stopped")


async def _stop_sink(sink: Sink, remaining_seconds: float) -> None:
    """Stop `sink`, giving up after the shutdown time left (or the grace time)."""
    timeout_seconds = max(remaining_seconds, SHUTDOWN_GRACE_SECONDS)
    if not await stop_within(sink, timeout_seconds):
        logger.error(
            "the sink did not stop within %.1f s; records it had not written "
            "were dropped, and their requests got no 2xx response, so their "
            "senders send them again",
            timeout_seconds,
        )
