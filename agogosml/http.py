"""HTTP pieces shared by the services: health, metrics, bearer auth, JSON errors."""

from __future__ import annotations

import asyncio
import errno
import hmac
import importlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agogosml.body_codings import BodyCodingError, DecodedBodyTooLarge, decode_body
from agogosml.envelope import HEADER_NAME
from agogosml.metrics import READY, REJECTED_REQUESTS

logger = logging.getLogger(__name__)
#: Logger given to aiohttp's request handlers in place of "aiohttp.server".
server_logger = logging.getLogger(f"{__name__}.server")
#: How many malformed or rejected requests are logged per
#: `MALFORMED_LOG_INTERVAL_SECONDS`; the metrics count every one.
MALFORMED_LOG_LIMIT = 10
MALFORMED_LOG_INTERVAL_SECONDS = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


#: The largest request body of an application, decoded, in bytes.
MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)

#: Header of the health responses that names the agogosml service, so that a
#: reader or an app pointed at the wrong service can tell.
SERVICE_HEADER = "Agogosml-Service"


def add_health_routes(
    app: web.Application,
    service: str,
    is_ready: Callable[[], bool],
    failure: Callable[[], str | None] = lambda: None,
    not_ready_reason: Callable[[], str] = lambda: "",
    *,
    metrics_service: str = "",
) -> None:
    """Add ``/healthz``, ``/readyz`` and ``/metrics`` to `app`.

    ``/healthz`` returns 503 with the reason while `failure` returns one: an
    error that only a restart clears, so that a liveness probe restarts the
    process. ``/readyz`` returns 503 with `not_ready_reason` while the service
    is not ready. Both name the `service` in the `SERVICE_HEADER` header.
    agogosml_ready gives the readiness at each scrape, with the service label
    `metrics_service`, or `service` without one.
    """
    headers = {SERVICE_HEADER: service}
    READY.labels(metrics_service or service).set_function(
        lambda: 1.0 if is_ready() else 0.0
    )

    async def healthz(request: web.Request) -> web.Response:
        reason = failure()
        if reason:
            return web.json_response(
                {"status": "failed", "error": reason}, status=503, headers=headers
            )
        return web.json_response({"status": "ok"}, headers=headers)

    async def readyz(request: web.Request) -> web.Response:
        if is_ready():
            return web.json_response({"status": "ready"}, headers=headers)
        body = {"status": "not ready"}
        reason = not_ready_reason()
        if reason:
            body["reason"] = reason
        return web.json_response(body, status=503, headers=headers)

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


def bearer_auth_middleware(token: str, protected: frozenset[str]) -> Any:
    """Return middleware requiring ``Authorization: Bearer <token>`` on `protected`.

    Paths outside `protected` (health and metrics) stay open for probes. The
    scheme name is case-insensitive, as RFC 9110 section 11.1 requires.
    """
    expected = token.encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in protected:
            # aiohttp decodes bytes that are not UTF-8 to lone surrogates;
            # surrogateescape turns them back into the bytes that were sent.
            header = request.headers.get("Authorization", "")
            scheme, _, credentials = header.partition(" ")
            received = credentials.lstrip(" ").encode("utf-8", "surrogateescape")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                received, expected
            ):
                # Raised, so that `http_error_middleware` counts and logs it.
                raise web.HTTPUnauthorized(
                    text="missing or wrong bearer token; send the configured token "
                    "as 'Authorization: Bearer <token>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return middleware


def header_for_log(headers: Any, name: str) -> str | None:
    r"""Return a request header, with bytes that are not UTF-8 escaped as ``\xNN``.

    aiohttp decodes such bytes to lone surrogates, which a JSON log line
    cannot encode.
    """
    value = headers.get(name)
    if value is None:
        return None
    raw = value.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace")


def is_repeated(headers: Any, name: str) -> bool:
    """Return whether a request has header `name` more than once."""
    return len(headers.getall(name, ())) > 1


def is_utf8(text: str) -> bool:
    """Return whether a decoded header is UTF-8 text.

    aiohttp decodes header bytes that are not UTF-8 to lone surrogates, which
    do not encode.
    """
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


async def read_start(stream: aiohttp.StreamReader, size: int) -> bytes:
    """Return the first `size` bytes of a response body, or all of a shorter one."""
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = await stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class Readiness(NamedTuple):
    """The result of a readiness check of another service."""

    ready: bool
    detail: str  # why it is not ready, naming the URL; "" when ready
    service: str  # the agogosml service named by SERVICE_HEADER, or ""


#: Seconds a readiness check waits for the response.
READINESS_TIMEOUT_SECONDS = 2.0


async def check_readiness(
    session: aiohttp.ClientSession, url: str, shown_url: str
) -> Readiness:
    """GET `url` and return whether it returned 2xx, and if not, why.

    The reason comes from the ``reason`` of a JSON body, as an agogosml
    service gives it, or else the start of the body. `shown_url` is the URL to
    name in the reason, without a password.
    """
    try:
        # A redirect is not followed: requests to the service would not
        # follow it either, so it is not ready at this URL.
        async with session.get(
            url,
            timeout=aiohttp.ClientTimeout(total=READINESS_TIMEOUT_SECONDS),
            allow_redirects=False,
        ) as response:
            service = response.headers.get(SERVICE_HEADER, "")
            if 200 <= response.status < 300:
                return Readiness(True, "", service)
            start = await read_start(response.content, 500)
    except TimeoutError:
        detail = f"GET {shown_url} timed out after {READINESS_TIMEOUT_SECONDS:g} s"
        return Readiness(False, detail, "")
    except aiohttp.ClientError as exc:
        reason = str(exc) or type(exc).__name__
        return Readiness(False, f"GET {shown_url} failed: {reason}", "")
    except ValueError as exc:
        # aiohttp raises it for a request that it cannot make at all, such as
        # one with user information in the URL and an Authorization header.
        logger.error("readiness check of %s cannot be sent: %s", shown_url, exc)
        return Readiness(False, f"GET {shown_url} cannot be sent: {exc}", "")
    detail = f"GET {shown_url} returned {response.status}"
    reason = _reason_in(start)
    return Readiness(False, f"{detail}: {reason}" if reason else detail, service)


def _reason_in(body: bytes) -> str:
    """Return the ``reason`` of a JSON object body, else the body's start as text."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace").strip()
    if isinstance(document, dict) and isinstance(document.get("reason"), str):
        return document["reason"]
    return ""


class ClientDisconnectedError(Exception):
    """The client closed the connection before its whole request body arrived."""


#: Content-Encoding values of a request body that the services accept and
#: decode (`read_body`).
CONTENT_ENCODINGS = frozenset({"identity", "gzip", "deflate", "br", "zstd"})

#: How long a client may take to send a request body, in seconds. aiohttp has
#: no such limit, so a client that stops sending would hold a connection open.
BODY_TIMEOUT_SECONDS = 30.0

#: How long a connection may stay without a whole request head, in seconds:
#: from the moment it opens and from each response. aiohttp's web server
#: allows about an hour, so clients that send their headers a byte at a time
#: could keep connections open that long. 75 s is aiohttp's own default for
#: ``web.run_app`` and nginx's keep-alive timeout.
IDLE_TIMEOUT_SECONDS = 75.0


#: Request header that lists, separated by commas, the record headers whose
#: values travel base64-encoded.
BASE64_RECORD_HEADERS = "X-Base64-Record-Headers"


#: Request header that lists, separated by commas, the record headers whose
#: names are not all lower case, as the record spells them. HTTP does not
#: tell header names apart by case, and HTTP/2 carries them only in lower
#: case, so a proxy on the way may fold them. An
#: ``X-Record-Header-<name>`` that this header does not list is written under
#: its lower-case name.
CASED_RECORD_HEADERS = "X-Cased-Record-Headers"


#: Fields of a ``POST /batch`` item, for the model app and the writer. Only
#: ``value`` is required, and any other field, such as a misspelt one, is
#: rejected rather than dropped.
BATCH_FIELDS = (
    "header_encodings",
    "headers",
    "id",
    "key",
    "key_encoding",
    "traceparent",
    "value",
)
_BATCH_FIELD_SET = frozenset(BATCH_FIELDS)


def unknown_field_problem(item: dict[str, Any]) -> str:
    """Return why a batch item has a field outside `BATCH_FIELDS`, or ''."""
    if _BATCH_FIELD_SET.issuperset(item):
        return ""
    field = next(field for field in item if field not in _BATCH_FIELD_SET)
    allowed = ", ".join(repr(name) for name in BATCH_FIELDS)
    return f"unknown field {field!r}; the allowed fields are {allowed}"


#: Request header that lists, separated by commas and spelled as the record
#: spells them, the record headers whose value is null. Kafka distinguishes a null
#: header value from an empty one, and a request header has no null, so such a
#: header is listed here instead of sent as an ``X-Record-Header-<name>``.
NULL_RECORD_HEADERS = "X-Null-Record-Headers"


def null_header_names(value: str) -> list[str]:
    """Return the record header names of a `NULL_RECORD_HEADERS` value, as spelled.

    Of names listed more than once in different cases, the last one counts.

    Raises:
        ValueError: A name is not an HTTP token, which the value cannot hold.
    """
    names: dict[str, str] = {}
    for entry in value.split(","):
        name = entry.strip()
        if not name:
            continue
        if not HEADER_NAME.fullmatch(name):
            raise ValueError(
                f"header {NULL_RECORD_HEADERS} lists {name!r:.60}, which is not a "
                "valid header name; list names of letters, digits and "
                "!#$%&'*+-.^_`|~ only"
            )
        names[name.lower()] = name
    return list(names.values())


def listed_header_names(value: str) -> list[str]:
    """Return the record header names of a `BASE64_RECORD_HEADERS` value.

    Names are lower-cased, because the names of ``X-Record-Header-<name>``
    headers are compared in lower case, and sorted, without repeats or empty
    entries.
    """
    return sorted({name.strip().lower() for name in value.split(",") if name.strip()})


def header_spellings(value: str) -> dict[str, str]:
    """Return each name that a `CASED_RECORD_HEADERS` value lists, by its lower case.

    Of names listed more than once in different cases, the last one counts.
    Names that are not ASCII are left out: HTTP header names are ASCII, and
    the lower case of some other letters is an ASCII one (that of the Kelvin
    sign is "k").
    """
    names = (name.strip() for name in value.split(","))
    return {name.lower(): name for name in names if name and name.isascii()}


def content_type_problem(request: web.Request) -> str:
    """Return why the request's Content-Type is not JSON, or '' when it is.

    Parameters such as ``charset=utf-8`` are allowed. RFC 8259 defines no
    charset for JSON, so the body is read as UTF-8 whatever a charset names.
    The message quotes the header as sent, not aiohttp's reading of it, which
    is ``application/octet-stream`` for a missing or malformed one.
    """
    if request.content_type == "application/json":
        return ""
    sent = request.headers.get("Content-Type")
    if not sent:
        return "the request has no Content-Type; send 'application/json'"
    return f"Content-Type {sent[:100]!r} is not supported; send 'application/json'"


async def read_body(request: web.Request) -> bytes:
    """Return the request body, decoded, or raise `ClientDisconnectedError`.

    The server reads bodies undecoded (`start_site`), so a compressed body is
    decoded here, up to the application's `MAX_BODY_BYTES`.

    Raises:
        web.HTTPRequestTimeout: when the body takes longer than
            `BODY_TIMEOUT_SECONDS` to arrive (408).
        web.HTTPBadRequest: when the body cannot be decoded, for example
            invalid or truncated gzip data under ``Content-Encoding: gzip``
            (400).
        web.HTTPRequestEntityTooLarge: when the decoded body is over the
            limit (413).
        web.HTTPUnsupportedMediaType: for a Content-Encoding other than one
            of `CONTENT_ENCODINGS` (415).
    """
    coding = _check_content_encoding(request)
    body = await _read_raw_body(request)
    if coding == "identity":
        return body
    limit = request.app[MAX_BODY_BYTES]
    try:
        return decode_body(coding, body, limit)
    except DecodedBodyTooLarge:
        raise web.HTTPRequestEntityTooLarge(
            max_size=limit, actual_size=limit + 1
        ) from None
    except BodyCodingError as exc:
        raise web.HTTPBadRequest(
            reason=f"request body cannot be decoded as its Content-Encoding "
            f"{coding!r} declares: {exc}. Send the whole body compressed that way, "
            "or uncompressed without Content-Encoding"
        ) from None


async def _read_raw_body(request: web.Request) -> bytes:
    try:
        async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout() from None
    except RequestPayloadError as exc:
        raise web.HTTPBadRequest(reason=_payload_problem(request, exc)) from None
    except ConnectionResetError as exc:
        # aiohttp 3.14 raises ConnectionResetError("Connection lost"), or its
        # subclass ClientConnectionResetError, when the peer goes away mid-body.
        raise ClientDisconnectedError(str(exc)) from exc


def _check_content_encoding(request: web.Request) -> str:
    """Return the body's content coding; reject one that is not supported."""
    codings = request.headers.getall("Content-Encoding", [])
    if not codings:
        return "identity"
    coding = codings[0].strip().lower()
    # RFC 9110 says a recipient should read x-gzip as gzip.
    coding = "gzip" if coding == "x-gzip" else coding
    if len(codings) == 1 and coding in CONTENT_ENCODINGS:
        return coding
    supported = ", ".join(sorted(CONTENT_ENCODINGS))
    raise web.HTTPUnsupportedMediaType(
        reason=f"Content-Encoding {', '.join(codings)[:60]!r} is not supported; "
        f"send one of {supported}, or no Content-Encoding header"
    )


def _payload_problem(request: web.Request, exc: RequestPayloadError) -> str:
    encoding = request.headers.get("Content-Encoding")
    if encoding:
        return (
            f"request body is not valid {encoding[:40]!r} data, which its "
            "Content-Encoding header declares; send it compressed that way, or "
            "uncompressed without Content-Encoding"
        )
    return f"request body is malformed: {_payload_error(exc).message}"


def _payload_error(exc: RequestPayloadError) -> HttpProcessingError:
    """Return the parser error behind a payload error, which carries the message."""
    cause = exc.__cause__
    if isinstance(cause, HttpProcessingError):
        return cause
    return HttpProcessingError(code=400, message=str(exc))


def http_error_middleware(service: str) -> Any:
    """Return middleware for JSON error bodies and quiet client disconnects.

    aiohttp responds to an unknown path (404), a wrong method (405) and other
    `web.HTTPException` errors with plain text, but clients of the services
    expect ``{"error": ...}`` with every error status. A client that
    disconnects while `read_body` waits is logged in one DEBUG line, in place
    of aiohttp's ERROR traceback. Any other exception gets a JSON 500 and an
    ERROR line with the traceback. `service` labels the metric. At most
    `MALFORMED_LOG_LIMIT` rejected requests a minute are logged.
    """
    rate = LogRateLimit(MALFORMED_LOG_LIMIT, MALFORMED_LOG_INTERVAL_SECONDS)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = _describe_http_error(request, exc)
            REJECTED_REQUESTS.labels(service, str(exc.status)).inc()
            dropped = rate.take()
            if dropped is not None:
                logger.info(
                    "request rejected",
                    extra={
                        "status": exc.status,
                        "method": request.method,
                        "path": request.path,
                        "error": message,
                        "not_logged_before": dropped,
                    },
                )
            kept_headers = {
                name: value
                for name, value in exc.headers.items()
                if name.lower() not in ("content-type", "content-length")
            }
            return error_response(exc.status, message, headers=kept_headers)
        except ClientDisconnectedError as exc:
            # Clients that time out or crash cause this routinely, so it gets one
            # DEBUG line in place of aiohttp's ERROR traceback.
            logger.debug(
                "client disconnected before sending the whole request body",
                extra={
                    "method": request.method,
                    "path": request.path,
                    "remote": request.remote,
                    "error": str(exc),
                },
            )
            # The client is gone, so aiohttp drops this response without logging.
            return web.Response(status=400)
        except Exception as exc:
            # aiohttp would respond with a plain-text 500 that names nothing.
            logger.exception(
                "request failed with an unexpected error",
                extra={"method": request.method, "path": request.path},
            )
            REJECTED_REQUESTS.labels(service, "500").inc()
            return error_response(
                500,
                f"the {service} failed with an unexpected error ({exc!r}); its log "
                "has the traceback. This is a bug: please report it",
            )

    return middleware


def _describe_http_error(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPNotFound):
        return (
            f"path {request.path!r} not found; this service serves "
            f"{', '.join(_served_routes(request.app))}"
        )
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = " or ".join(sorted(exc.allowed_methods))
        return (
            f"method {request.method} is not allowed on {request.path!r}; use {allowed}"
        )
    if isinstance(exc, web.HTTPUnauthorized) and exc.text:
        return exc.text
    if isinstance(exc, web.HTTPRequestTimeout):
        return (
            f"the request body did not arrive within {BODY_TIMEOUT_SECONDS:g} s "
            f"({request.method} {request.path!r}); send the whole body without pauses"
        )
    return f"{exc.reason} ({request.method} {request.path!r})"


def _served_routes(app: web.Application) -> list[str]:
    routes = {
        f"{route.method} {route.resource.canonical}"
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    return sorted(routes, key=lambda route: route.split(" ")[::-1])


def json_response(document: Any, status: int = 200) -> web.Response:
    """Return `document` as a JSON response, encoded with orjson.

    aiohttp's own `json_response` encodes with the standard library's `json`,
    which is several times slower.
    """
    return web.Response(
        body=orjson.dumps(document), status=status, content_type="application/json"
    )


def error_response(
    status: int, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    """Return a JSON error body ``{"error": message}`` with `status`."""
    return web.json_response({"error": message}, status=status, headers=headers)


def import_object(spec: str, setting: str) -> Any:
    """Import ``module:attribute`` named by `setting`, with a clear error if missing."""
    from agogosml.errors import ConfigurationError

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(
            f"{setting}={spec!r} is invalid: use the form 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(
            f"{setting}={spec!r} cannot be imported: {exc}; check that the module "
            "is installed and the function name is right"
        ) from exc


class LogRateLimit:
    """A limit of `limit` log lines per `interval_seconds`.

    Any client can make a server reject requests as fast as it sends them, so
    the lines about rejected requests are limited, and the next line that
    passes gives the number dropped.
    """

    def __init__(self, limit: int, interval_seconds: float) -> None:
        self._limit = limit
        self._interval = interval_seconds
        self._window_start = float("-inf")
        self._logged = 0
        self._dropped = 0

    def take(self) -> int | None:
        """Return None to drop a line, or the number dropped since the last one."""
        now = time.monotonic()
        if now - self._window_start >= self._interval:
            self._window_start = now
            self._logged = 0
        if self._logged >= self._limit:
            self._dropped += 1
            return None
        self._logged += 1
        dropped, self._dropped = self._dropped, 0
        return dropped


class MalformedRequestFilter(logging.Filter):
    """Turn aiohttp's ERROR traceback for a malformed request into one WARNING.

    aiohttp 3.14 responds to a request it cannot parse (an invalid
    Content-Length, a header line over 8190 bytes, more than 128 headers) with
    a plain-text 400 and logs it with ``logger.exception``, so any client could
    fill the log with tracebacks. This filter rewrites those records to one
    line. It passes at most `limit` of them per `interval_seconds`, and the
    next line it passes counts the ones dropped. Other records, such as
    exceptions raised by handlers, pass unchanged.
    """

    def __init__(
        self,
        limit: int = MALFORMED_LOG_LIMIT,
        interval_seconds: float = MALFORMED_LOG_INTERVAL_SECONDS,
    ) -> None:
        super().__init__()
        self._rate = LogRateLimit(limit, interval_seconds)

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a malformed-request record; return False to drop it."""
        error = record.exc_info[1] if record.exc_info else None
        counted = False
        if isinstance(error, RequestPayloadError):
            # A body that cannot be decoded, which aiohttp logs again when it
            # reads the rest of the body after the handler's 400.
            error = _payload_error(error)
            counted = True
        if isinstance(error, ConnectionResetError):
            return self._client_gone(record, error)
        if not isinstance(error, HttpProcessingError):
            return True
        service = getattr(record, _SERVICE_FIELD, None)
        if service and not counted:
            REJECTED_REQUESTS.labels(service, str(error.code)).inc()
        dropped = self._rate.take()
        if dropped is None:
            return False
        remote = (
            record.args[0] if isinstance(record.args, tuple) and record.args else None
        )
        problem = _parse_problem(str(error.message))
        if remote is None:
            record.msg = "malformed HTTP request rejected with %d: %s"
            record.args = (error.code, problem)
        else:
            record.msg = "malformed HTTP request from %s rejected with %d: %s"
            record.args = (remote, error.code, problem)
        if dropped:
            record.msg += " (%d more were not logged)"
            record.args += (dropped,)
        record.levelno = logging.WARNING
        record.levelname = logging.getLevelName(logging.WARNING)
        record.exc_info = None
        record.exc_text = None
        return True

    def _client_gone(self, record: logging.LogRecord, error: Exception) -> bool:
        """Turn a client's disconnect before the response into one DEBUG line.

        A client that closes its connection, for example after sending
        ``Expect: 100-continue``, makes aiohttp log a traceback at ERROR,
        though nothing of the request was accepted.
        """
        if not server_logger.isEnabledFor(logging.DEBUG):
            return False
        record.msg = "client closed the connection before the response: %s"
        record.args = (str(error),)
        record.levelno = logging.DEBUG
        record.levelname = logging.getLevelName(logging.DEBUG)
        record.exc_info = None
        record.exc_text = None
        return True


_PARSE_PROBLEM = re.compile(r"[A-Za-z][A-Za-z0-9 ,.()-]*")


def _parse_problem(message: str) -> str:
    """Return aiohttp's parse error without the bytes of the request it quotes.

    Those bytes can hold a header line whole, such as an Authorization header
    with its token.
    """
    # Only the leading words: the request line, header bytes or path that
    # aiohttp's parsers quote after them may hold a token.
    words = _PARSE_PROBLEM.match(message.strip())
    return words.group().rstrip(" :,.") if words else "unparsable request"


server_logger.addFilter(MalformedRequestFilter())

#: Record attribute that names the service whose server logged the record.
#: The leading underscore keeps it out of the JSON log lines.
_SERVICE_FIELD = "_agogosml_server_of"

#: Service label of the metrics, by the prefix of its settings.
_SERVICE_BY_PREFIX = {
    "READER_": "input_reader",
    "WRITER_": "output_writer",
    "APP_": "app",
}


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    prefix: str,
    *,
    shutdown_timeout_seconds: float,
) -> web.AppRunner:
    """Start serving `app` on host:port and return its runner (for cleanup).

    `prefix` names the settings (``READER_``...) in the error raised when the
    address cannot be bound, and the service in the metrics.
    ``runner.cleanup()`` waits at most `shutdown_timeout_seconds` for requests
    in progress, then cancels them; aiohttp's own default is 60 s. A
    connection is closed when it has been without a whole request head for
    `IDLE_TIMEOUT_SECONDS`.
    """
    from agogosml.errors import ConfigurationError

    service = _SERVICE_BY_PREFIX.get(prefix, prefix.rstrip("_").lower())
    runner = web.AppRunner(
        app,
        # Bodies are decoded by `read_body`, which checks that a compressed
        # body is complete.
        auto_decompress=False,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout_seconds,
        keepalive_timeout=IDLE_TIMEOUT_SECONDS,
        # The service name lets the filter count the requests that aiohttp
        # rejects before any handler runs.
        logger=logging.LoggerAdapter(  # type: ignore[arg-type]
            server_logger, {_SERVICE_FIELD: service}
        ),
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            fix = f"set {prefix}PORT to a free port, or stop what listens on it"
        else:
            fix = f"set {prefix}HOST to an address of this machine, such as 0.0.0.0"
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror}; {fix}"
        ) from None
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """Return the port a runner listens on (useful after binding port 0)."""
    server = runner.addresses[0]
    return int(server[1])
