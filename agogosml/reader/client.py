"""HTTP client that sends messages to the model app and reads per-message results."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import logging
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import aiohttp
import orjson

from agogosml import exact_json
from agogosml.config import redact_url
from agogosml.envelope import Envelope
from agogosml.errors import is_retriable_status
from agogosml.http import (
    BASE64_RECORD_HEADERS,
    CASED_RECORD_HEADERS,
    NULL_RECORD_HEADERS,
    Readiness,
    check_readiness,
    read_start,
)
from agogosml.metrics import REQUEST_SECONDS

logger = logging.getLogger(__name__)

SERVICE = "input_reader"

#: HTTP headers that carry the envelope to the app and on to the writer.
MESSAGE_ID = "X-Message-Id"
MESSAGE_KEY = "X-Message-Key"
MESSAGE_KEY_ENCODING = "X-Message-Key-Encoding"
TRACEPARENT = "traceparent"
#: Prefix of the HTTP headers that carry the input record's headers.
RECORD_HEADER_PREFIX = "X-Record-Header-"

#: Maximum length of a header line (name, ": " and value, in UTF-8) that the
#: reader sends.
#: The server of aiohttp 3.14, which ModelApp runs on, rejects a longer line
#: with 400 by default (its max_field_size).
MAX_HEADER_LINE_BYTES = 8190

#: Maximum number of record headers that a single-message request carries. The
#: server of aiohttp 3.14 rejects a request of more than 128 header lines with
#: 400 by default (its max_headers), and the reader's own header lines, a proxy
#: and the app's framework may take up to 28 of them.
MAX_RECORD_HEADERS = 100

#: Maximum wait that a Retry-After header of the app can request. A longer
#: value is cut to this, so a mistaken value does not stall a lane for hours.
RETRY_AFTER_MAX_SECONDS = 60.0

#: Statuses whose Retry-After header the reader honours.
RETRY_AFTER_STATUSES = frozenset({429, 503})

#: Largest response body the reader reads from the app. A batch response needs
#: only a status and a short error per message, so a larger body is a bug of
#: the app. Reading it all could use any amount of memory.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024

_DELAY_SECONDS = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class Outcome:
    """Result of sending one message: an HTTP status (0 when none) and an error.

    Attributes:
        unreachable: No connection to the app could be made, so the app never
            saw the message.
        retry_after_seconds: The delay that the Retry-After header of a 429 or
            503 response asked for, at most `RETRY_AFTER_MAX_SECONDS`; None
            without a valid header.
        item_result: The status is the app's result for this message in a
            batch response, not the status of the whole response.
        sent: False when the reader rejected the message without sending it
            (a batch value that is not JSON, a header that is too long).
    """

    status: int
    error: str = ""
    unreachable: bool = False
    retry_after_seconds: float | None = None
    item_result: bool = False
    sent: bool = True

    @property
    def ok(self) -> bool:
        """Whether the app accepted the message."""
        return 200 <= self.status < 300

    @property
    def retriable(self) -> bool:
        """Whether a retry may succeed."""
        return not self.ok and is_retriable_status(self.status)


@dataclass(frozen=True, slots=True)
class _Response:
    """The response of the app to one request: a status and body, or an error."""

    status: int
    body: bytes = b""
    error: str = ""
    unreachable: bool = False
    retry_after_seconds: float | None = None

    def outcome(self) -> Outcome:
        """Return the outcome of every message of the request."""
        error = self.error or _error_text(self.status, self.body)
        return Outcome(
            self.status,
            error,
            self.unreachable,
            retry_after_seconds=self.retry_after_seconds,
        )


class AppClient:
    """Post single messages to ``<app_url>/`` or batches to ``<app_url>/batch``.

    A single message goes as its raw body with the id, key and trace context in
    headers. A batch goes as a JSON array of
    ``{"id", "key", "traceparent", "value"}`` objects. The app may respond to a batch
    with ``{"results": [{"status": 200}, {"status": 400, "error": "..."}, ...]}``,
    one entry per message in order; any other 2xx response accepts them all,
    and the first such response is logged as a WARNING.

    `max_connections` limits the pool of connections to the app; 0 means no
    limit.
    """

    def __init__(
        self,
        app_url: str,
        *,
        token: str = "",
        timeout_seconds: float = 30.0,
        max_connections: int = 100,
        connection_max_age_seconds: float = 0.0,
    ) -> None:
        self._url = app_url.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._max_connections = max_connections
        self._max_age = connection_max_age_seconds
        self._session: aiohttp.ClientSession | None = None
        self._session_opened = 0.0
        # Requests under way per connection pool, and the pools replaced by a
        # newer one, which close once their requests are finished.
        self._users: dict[aiohttp.ClientSession, int] = {}
        self._retired: set[aiohttp.ClientSession] = set()
        self._closing: set[asyncio.Task[None]] = set()
        # The Agogosml-Service header of the app's last successful readiness
        # check ("" without one), or None before such a check.
        self._ready_service: str | None = None
        self._whole_batch_noted = False
        self._single_body_checked = False

    async def start(self) -> None:
        """Open the connection pool (keep-alive)."""
        self._session = self._new_session()

    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._max_connections)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._session_opened = time.monotonic()
        session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=headers
        )
        self._users[session] = 0
        return session

    @contextlib.contextmanager
    def _lease(self) -> Iterator[aiohttp.ClientSession]:
        """Yield the connection pool for one request.

        A pool older than the maximum connection age is replaced first, so
        that new connections go wherever the app's address leads now: to
        replicas added since, or to another slot after a blue/green switch.
        The old pool closes once its last request is finished.
        """
        assert self._session is not None, "AppClient.start() was not called"
        if self._max_age and time.monotonic() - self._session_opened >= self._max_age:
            self._retired.add(self._session)
            self._session = self._new_session()
            self._close_retired()
        session = self._session
        self._users[session] += 1
        try:
            yield session
        finally:
            self._users[session] -= 1
            if session in self._retired:
                self._close_retired()

    def _close_retired(self) -> None:
        """Close each retired pool that no request uses any more."""
        for session in [s for s in self._retired if not self._users[s]]:
            self._retired.discard(session)
            del self._users[session]
            task = asyncio.create_task(session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def stop(self) -> None:
        """Close the connection pools."""
        sessions = [*self._retired, *([self._session] if self._session else [])]
        self._session = None
        self._retired.clear()
        self._users.clear()
        for session in sessions:
            await session.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def send(
        self, envelopes: Sequence[Envelope], *, batch: bool
    ) -> list[Outcome]:
        """Send messages and return one outcome per message, in order."""
        started = time.perf_counter()
        if batch:
            outcomes = await self._send_batch(envelopes)
        else:
            outcomes = [await self._send_one(envelopes[0])]
        kind = "ok" if all(outcome.ok for outcome in outcomes) else "error"
        REQUEST_SECONDS.labels(SERVICE, kind).observe(time.perf_counter() - started)
        return outcomes

    async def _send_one(self, envelope: Envelope) -> Outcome:
        if envelope.null_value:
            return _null_value_problem()
        headers = {
            "Content-Type": "application/json",
            MESSAGE_ID: envelope.id,
            TRACEPARENT: envelope.traceparent,
        }
        key, key_is_base64 = envelope.key_text()
        if key is not None:
            headers[MESSAGE_KEY] = key
            if key_is_base64:
                headers[MESSAGE_KEY_ENCODING] = "base64"
        record_headers = envelope.http_headers()
        if len(record_headers.values) > MAX_RECORD_HEADERS:
            return _too_many_headers(len(record_headers.values))
        name = record_headers.non_token_name()
        if name is not None:
            return _unsendable_header_name(name)
        for name, value in record_headers.values.items():
            if value is not None:
                headers[RECORD_HEADER_PREFIX + name] = value
        if record_headers.base64_names:
            headers[BASE64_RECORD_HEADERS] = ",".join(record_headers.base64_names)
        if record_headers.null_names:
            headers[NULL_RECORD_HEADERS] = ",".join(record_headers.null_names)
        cased = record_headers.cased_names()
        if cased:
            headers[CASED_RECORD_HEADERS] = ",".join(cased)
        problem = _oversized_header(headers)
        if problem is not None:
            return problem
        response = await self._post(self._url + "/", envelope.value, headers)
        if 200 <= response.status < 300 and not self._single_body_checked:
            self._single_body_checked = True
            self._check_single_body(response.status, response.body)
        return response.outcome()

    def _check_single_body(self, status: int, body: bytes) -> None:
        """Warn when the app may not be a model app, from its first 2xx response.

        ModelApp responds with JSON and names itself in its readiness
        responses. A server that does neither, such as one that responds "OK"
        to any request, may accept messages without scoring or forwarding
        them, and the reader cannot tell.
        """
        if self._ready_service != "":
            return
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            logger.warning(
                "the app at %s responded %d with a body that is not JSON (%r), "
                "and its readiness check named no agogosml service in the "
                "Agogosml-Service header. The reader counts each message that "
                "gets a 2xx response as accepted, so if this server is not the "
                "model app, and does not forward the messages to the writer, "
                "they are lost: check READER_APP_URL. Logged once",
                redact_url(self._url),
                status,
                body[:100],
            )

    async def _send_batch(self, envelopes: Sequence[Envelope]) -> list[Outcome]:
        """Send a batch, giving a value that is not JSON its own 400 outcome.

        Each value is checked before it goes into the JSON array unchanged: a
        value that is not JSON could otherwise end the array's element early
        and add fields or elements of its own.
        """
        checked: list[Outcome | None] = [
            _null_value_problem()
            if envelope.null_value
            else _json_problem(envelope.value)
            for envelope in envelopes
        ]
        valid = [index for index, problem in enumerate(checked) if problem is None]
        if valid:
            sent = await self._post_batch([envelopes[index] for index in valid])
            for index, outcome in zip(valid, sent, strict=True):
                checked[index] = outcome
        return [outcome for outcome in checked if outcome is not None]

    async def _post_batch(self, envelopes: Sequence[Envelope]) -> list[Outcome]:
        """Post one batch of JSON values and return one outcome per value."""
        headers = {"Content-Type": "application/json"}
        response = await self._post(
            self._url + "/batch", batch_body(envelopes), headers
        )
        if not 200 <= response.status < 300:
            return [response.outcome()] * len(envelopes)
        outcomes = _per_item_outcomes(response.status, response.body, len(envelopes))
        if outcomes[0].ok and not outcomes[0].item_result:
            self._note_whole_batch_accepted(response.status, len(envelopes))
        return outcomes

    def _note_whole_batch_accepted(self, status: int, count: int) -> None:
        """Warn, once, that a 2xx response without results accepted a whole batch."""
        if self._whole_batch_noted:
            return
        self._whole_batch_noted = True
        logger.warning(
            'the app at %s responded %d to a batch of %d without a "results" list, '
            "so the reader counts every message of the batch as accepted, as it "
            "does for every such response. An app that does not forward them to "
            "the writer loses them: check that READER_APP_URL is the model app, "
            'or respond with {"results": [{"status": 200}, ...]}. Logged once',
            redact_url(self._url),
            status,
            count,
        )

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> _Response:
        with self._lease() as session:
            return await self._post_with(session, url, body, headers)

    async def _post_with(
        self,
        session: aiohttp.ClientSession,
        url: str,
        body: bytes,
        headers: dict[str, str],
    ) -> _Response:
        try:
            async with session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                retry_after = None
                if response.status in RETRY_AFTER_STATUSES:
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                body = await read_start(response.content, MAX_RESPONSE_BYTES + 1)
                if len(body) > MAX_RESPONSE_BYTES:
                    error = (
                        f"app responded {response.status} with a body over "
                        f"{MAX_RESPONSE_BYTES} bytes, which the reader does not read; "
                        "a response needs only a status per message and a short error"
                    )
                    return _Response(502, error=error)
                return _Response(response.status, body, retry_after_seconds=retry_after)
        except TimeoutError:
            error = f"request to {url} timed out after {self._timeout.total} s"
            return _Response(0, error=error)
        except aiohttp.ClientConnectorError as exc:
            # No connection was made, so the app did not see the request.
            error = f"cannot connect to the app: request to {url} failed: {exc!s}"
            return _Response(0, error=error, unreachable=True)
        except aiohttp.ClientError as exc:
            return _Response(0, error=f"request to {url} failed: {exc!s}")

    async def readiness(self, path: str) -> Readiness:
        """Check whether GET `path` on the app returns 2xx, and if not, why."""
        url_without_password = redact_url(self._url) + path
        with self._lease() as session:
            readiness = await check_readiness(
                session, self._url + path, url_without_password
            )
        if readiness.ready:
            self._ready_service = readiness.service
        return readiness


def _null_value_problem() -> Outcome:
    """Return the 400 outcome of a record without a value, which is not sent."""
    return Outcome(
        400,
        "the record's value is null (a Kafka tombstone), not a JSON document, so "
        "it was not sent to the app; the dead letter has no value either",
        sent=False,
    )


def batch_body(envelopes: Sequence[Envelope]) -> bytes:
    """Return the ``POST /batch`` body of `envelopes`, whose values are JSON.

    Each value goes into the array unchanged, so the caller checks first that
    each is one JSON document.
    """
    items = []
    for envelope in envelopes:
        key, key_is_base64 = envelope.key_text()
        item: dict[str, object] = {
            "id": envelope.id,
            "key": key,
            "traceparent": envelope.traceparent,
            "value": orjson.Fragment(envelope.value),
        }
        if key_is_base64:
            item["key_encoding"] = "base64"
        record_headers = envelope.http_headers()
        if record_headers.values:
            item["headers"] = record_headers.values
        if record_headers.base64_names:
            item["header_encodings"] = dict.fromkeys(
                record_headers.base64_names, "base64"
            )
        items.append(item)
    return orjson.dumps(items)


def _json_problem(value: bytes) -> Outcome | None:
    """Return a 400 outcome for a message value that is not JSON, else None."""
    error = exact_json.json_error(value)
    if not error:
        return None
    return Outcome(400, f"message value is not valid JSON: {error}", sent=False)


def _too_many_headers(count: int) -> Outcome:
    """Return the 431 outcome of a message with too many record headers to send."""
    error = (
        f"the message has {count} record headers, more than the "
        f"{MAX_RECORD_HEADERS} that travel as {RECORD_HEADER_PREFIX}<name> header "
        "lines (an aiohttp server such as ModelApp accepts 128 header lines by "
        "default): send batches (READER_BATCH_MAX_MESSAGES above 1), which carry "
        "them in the request body, or drop headers with READER_TRANSFORM"
    )
    return Outcome(431, error, sent=False)


def _unsendable_header_name(name: str) -> Outcome:
    """Return the 431 outcome of a record header whose name HTTP cannot carry."""
    error = (
        f"record header {name!r} cannot travel as a {RECORD_HEADER_PREFIX}<name> "
        "header line, because its name is not an HTTP token (letters, digits and "
        "!#$%&'*+-.^_`|~): send batches (READER_BATCH_MAX_MESSAGES above 1), which "
        "carry it in the request body, or rename or drop it with READER_TRANSFORM"
    )
    return Outcome(431, error, sent=False)


def _oversized_header(headers: dict[str, str]) -> Outcome | None:
    """Return a 431 outcome when a header line is too long to send, else None.

    The id, the key and the record headers can grow that long. The app's
    server would reject the request with a parser error that names none of
    them, so the reader does not send it and names the header, the limit and
    the fix.
    """
    for name, value in headers.items():
        size = len(name) + 2 + len(value.encode("utf-8"))
        if size > MAX_HEADER_LINE_BYTES:
            error = (
                f"the {name} header line would be {size} bytes, over the "
                f"{MAX_HEADER_LINE_BYTES} bytes that an aiohttp server such as "
                f"ModelApp accepts by default, so {_header_line_fix(name, value)}"
            )
            return Outcome(431, error, sent=False)
    return None


def _header_line_fix(name: str, value: str) -> str:
    """Return what cannot travel in the header line `name`, and the fixes."""
    batches = (
        "send batches (READER_BATCH_MAX_MESSAGES above 1), which carry it in "
        "the request body"
    )
    if name in (BASE64_RECORD_HEADERS, NULL_RECORD_HEADERS, CASED_RECORD_HEADERS):
        count = len(value.split(","))
        return (
            f"its list of {count} record header names cannot travel in a header: "
            f"{batches}, or shorten or drop record headers with READER_TRANSFORM"
        )
    if name == MESSAGE_ID:
        field = "message id"
    elif name == MESSAGE_KEY:
        field = "message key"
    else:
        field = f"record header {name[len(RECORD_HEADER_PREFIX) :]!r}"
    return f"the {field} cannot travel in a header: {batches}, or shorten the {field}"


def parse_retry_after(value: str | None) -> float | None:
    """Return the delay in seconds that a Retry-After header value requests.

    Both forms of RFC 9110 are read: delay-seconds (``120``) and an HTTP-date
    (``Wed, 21 Oct 2015 07:28:00 GMT``), which is compared with the local
    clock. The result is between 0 and `RETRY_AFTER_MAX_SECONDS`. None means
    no header or a value in neither form.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        return min(float(text), RETRY_AFTER_MAX_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        # The asctime form has no zone; HTTP dates are always in GMT.
        when = when.replace(tzinfo=datetime.UTC)
    delay = (when - datetime.datetime.now(datetime.UTC)).total_seconds()
    return min(max(delay, 0.0), RETRY_AFTER_MAX_SECONDS)


def _per_item_outcomes(status: int, body: bytes, count: int) -> list[Outcome]:
    try:
        document = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        document = None
    if (
        isinstance(document, dict)
        and "results" in document
        and not isinstance(document["results"], list)
    ):
        # A body that tries to give results per message and fails is a broken
        # app, not an acceptance of the whole batch.
        error = (
            f"app returned an invalid batch response {_json_preview(document)}; "
            'give per-message results as {"results": [{"status": 200}, ...]}'
        )
        return [Outcome(502, error)] * count
    if (
        isinstance(document, list)
        and document
        and all(isinstance(item, dict) and "status" in item for item in document)
    ):
        # Per-message results without their "results" object around them.
        results: object = document
    else:
        results = document.get("results") if isinstance(document, dict) else None
    if not isinstance(results, list):
        return [Outcome(status)] * count
    if len(results) != count:
        error = (
            f"app returned {len(results)} results for a batch of {count}; "
            "a batch response must have one result per message, in order"
        )
        return [Outcome(502, error)] * count
    return [_item_outcome(item) for item in results]


#: The outcome of the usual batch result, ``{"status": 200}``, made once.
_ACCEPTED_ITEM = Outcome(200, item_result=True)


def _item_outcome(item: object) -> Outcome:
    if type(item) is dict and len(item) == 1 and type(item.get("status")) is int:
        if item["status"] == 200:
            return _ACCEPTED_ITEM
    fields = item if isinstance(item, dict) else {}
    status = fields.get("status")
    # type() rather than isinstance(), because True is an int too.
    if type(status) is not int or not 200 <= status < 600:
        return Outcome(
            502,
            f"app returned an invalid batch result {_json_preview(item)}; each "
            "result needs a status field with an integer between 200 and 599",
            item_result=True,
        )
    error = str(fields.get("error") or "")
    if not error and status >= 300:
        error = f"app returned status {status} for this message"
    return Outcome(status, error, item_result=True)


def _json_preview(item: object) -> str:
    """Return the start of a decoded JSON value, as JSON, for an error message."""
    return orjson.dumps(item).decode()[:200]


def _error_text(status: int, body: bytes) -> str:
    if 200 <= status < 300:
        return ""
    if 300 <= status < 400:
        return (
            f"app responded {status} (a redirect); redirects are not followed, "
            "because a redirected POST may arrive as a GET: point READER_APP_URL at "
            "the app itself"
        )
    text = body[:500].decode("utf-8", "replace").strip()
    return f"app responded {status}: {text}" if text else f"app responded {status}"


def backoff_seconds(attempt: int, initial_seconds: float, max_seconds: float) -> float:
    """Return the delay before retry `attempt` + 1: exponential, with equal jitter.

    The delay is drawn from [d/2, d], where d = initial * 2**(attempt - 1) capped
    at `max_seconds`.
    """
    # The exponent is capped, because a wait that spends no attempt may repeat
    # for hours, and 2.0 ** 1024 overflows a float.
    exponent = min(max(attempt - 1, 0), 64)
    ceiling = min(max_seconds, initial_seconds * 2.0**exponent)
    return random.uniform(ceiling / 2, ceiling)


async def wait_backoff(
    attempt: int, initial_seconds: float, max_seconds: float
) -> None:
    """Sleep for `backoff_seconds` before retry `attempt` + 1."""
    await asyncio.sleep(backoff_seconds(attempt, initial_seconds, max_seconds))
