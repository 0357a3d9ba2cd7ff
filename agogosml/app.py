"""Helpers for writing a model app in Python: HTTP contract, validation, forwarding.

A model app only has to provide a scoring function::

    from agogosml.app import InvalidRecord, ModelApp

    def score(values):
        return [model.predict(v) if valid(v) else InvalidRecord("why") for v in values]

    ModelApp(score).run()

`ModelApp` serves ``POST /`` (one message) and ``POST /batch`` (a JSON array of
``{"id", "key", "traceparent", "value", ...}`` objects) as the input reader
sends them, calls the scoring function once per request, forwards each result
to the output writer with the message id, key and trace context, and responds
with 2xx only after the writer responded with 2xx, so the reader retries
anything not yet durable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import aiohttp
import orjson
from aiohttp import web
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agogosml import exact_json
from agogosml.config import (
    MAX_SHUTDOWN_TIMEOUT_MS,
    BaseUrl,
    BearerToken,
    ListenAddress,
    LogLevel,
    check_single_credential,
    load_settings,
    redact_url,
)
from agogosml.envelope import (
    MESSAGE_ID_HEADER,
    TRACEPARENT_HEADER,
    child_traceparent,
    id_problem,
)
from agogosml.errors import AgogosmlError, ConfigurationError
from agogosml.exact_json import json_type
from agogosml.forwarding import WriterQueue
from agogosml.http import (
    BASE64_RECORD_HEADERS,
    CASED_RECORD_HEADERS,
    MAX_BODY_BYTES,
    NULL_RECORD_HEADERS,
    add_health_routes,
    bearer_auth_middleware,
    bound_port,
    check_readiness,
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
    read_start,
    start_site,
    unknown_field_problem,
)
from agogosml.logs import SLOT_VARIABLE
from agogosml.metrics import (
    IN_FLIGHT,
    MESSAGES_IN,
    MESSAGES_OUT,
    MODEL_INFO,
    REJECTED_REQUESTS,
    REQUEST_SECONDS,
    SCORE_SECONDS,
    SCORED_VALUES,
    start_at_zero,
)
from agogosml.runtime import SettingsT, freeze_startup_objects, run_service

logger = logging.getLogger(__name__)

SERVICE = "app"

#: The service name of the app's health responses (`SERVICE_HEADER`).
HEALTH_NAME = "model_app"

#: Failed writer checks, one per second, before the app logs a warning, and
#: the checks between two warnings while the writer stays not ready.
WRITER_GRACE_CHECKS = 5
WRITER_WARNING_CHECKS = 300
#: Prefix of the request headers that carry record headers, in lower case.
_RECORD_HEADER_PREFIX = "x-record-header-"
#: Record header names that the writer sets from the message id and trace context.
_RESERVED_HEADERS = frozenset({MESSAGE_ID_HEADER, TRACEPARENT_HEADER})

ValueT = TypeVar("ValueT")
ResultT = TypeVar("ResultT")
ClassT = TypeVar("ClassT")
#: The output writer's default WRITER_MAX_BODY_BYTES.
DEFAULT_WRITER_MAX_BODY_BYTES = 1_048_576
#: Bytes of an error response of the writer that are read for its message.
_ERROR_TEXT_BYTES = 65536

#: Bytes of a writer's 2xx response that are read for its count of records.
_WRITER_RESPONSE_BYTES = 16 * 1024 * 1024


class InvalidRecord(Exception):  # noqa: N818 - a result first, raised only at times
    """Result of a scoring function for an input it rejects (the request gets 400).

    A scoring function returns it in place of that input's result. Raised in a
    call with one value, it rejects that value. Raised in a call with several,
    it makes `ModelApp` score each value alone to find the ones that raise it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(str(reason))
        self.reason = str(reason)

    def __repr__(self) -> str:
        return f"InvalidRecord({self.reason!r})"


class ResultArray(Protocol):
    """An array of results with one entry per value, such as a numpy array.

    A pandas DataFrame, whose ``ndim`` is 2, gives one result per row.
    """

    @property
    def ndim(self) -> int:
        """Number of dimensions: 1 for one result per item, 2 for a table."""
        ...

    def __len__(self) -> int: ...


#: Results of one call of a scoring function: a list or tuple of JSON documents
#: and `InvalidRecord`s, or a numpy array or pandas DataFrame.
ScoreResults = Sequence[Any | InvalidRecord] | ResultArray

#: Gets the decoded JSON values of one request and returns one result per value,
#: in order, as `ScoreResults`. May be a coroutine function.
ScoreFunction = Callable[[list[Any]], ScoreResults | Awaitable[ScoreResults]]


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """The metadata of a message beside its value, for ``ModelApp(with_messages=True)``.

    Attributes:
        id: The message id that the reader gave it, or None.
        key: The record key as bytes, or None for a record without one.
        headers: The record headers by name, each as bytes, or None for a
            header without a value. Of names equal but for case, one is kept.
            The ``message-id`` and ``traceparent`` headers are not among them,
            because they are the `id` and the trace context.
        traceparent: The W3C trace context of the message, or ''.
    """

    id: str | None
    key: bytes | None
    headers: Mapping[str, bytes | None]
    traceparent: str

    def __post_init__(self) -> None:
        # Read-only, also when the caller passes a dict.
        headers = types.MappingProxyType(dict(self.headers))
        object.__setattr__(self, "headers", headers)

    def __hash__(self) -> int:
        headers = frozenset(self.headers.items())
        return hash((self.id, self.key, headers, self.traceparent))

    def __reduce__(self) -> tuple[Any, ...]:
        # A mappingproxy cannot be pickled, as for a process pool, so the
        # headers travel as a dict.
        fields = (self.id, self.key, dict(self.headers), self.traceparent)
        return (Message, fields)


class Output:
    """A result that sets the record key or headers it is written with.

    Any other result is written with the key and headers of its message. An
    `Output` among the results of a scoring function replaces them, such as
    to key a result by customer for the consumers of the output topic.

    Attributes:
        value: The result, as any other result would be.
        key: The record key, as bytes or text; None keeps the message's key.
        headers: The record headers by name, each as bytes, text or None for
            a header without a value. They replace all of the message's
            headers, so ``{}`` writes none; None keeps the message's headers.
            ``message-id`` and ``traceparent`` cannot be set this way.

    Not a dataclass, which orjson would encode as an object: an `Output`
    inside a result is an error, not a value with fields.
    """

    __slots__ = ("headers", "key", "value")

    def __init__(
        self,
        value: Any,
        key: bytes | str | None = None,
        headers: Mapping[str, bytes | str | None] | None = None,
    ) -> None:
        self.value = value
        self.key = key
        self.headers = headers

    def __repr__(self) -> str:
        return f"Output({self.value!r}, key={self.key!r}, headers={self.headers!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Output):
            return NotImplemented
        return (self.value, self.key, self.headers) == (
            other.value,
            other.key,
            other.headers,
        )

    __hash__ = None  # type: ignore[assignment]


#: Like `ScoreFunction`, with the `Message` of each value as a second argument.
MessageScoreFunction = Callable[
    [list[Any], list[Message]], ScoreResults | Awaitable[ScoreResults]
]


class AppSettings(BaseSettings):
    """Settings of a model app built on `ModelApp` (prefix ``APP_``)."""

    model_config = SettingsConfigDict(
        env_prefix="APP_", frozen=True, extra="ignore", case_sensitive=False
    )

    host: ListenAddress = Field("127.0.0.1", description="APP_HOST: listen address.")
    port: int = Field(
        8000,
        ge=0,
        le=65535,
        description="APP_PORT: port of the app's HTTP server; 0 picks a free port.",
    )
    writer_url: BaseUrl = Field(
        ..., description="APP_WRITER_URL: base URL of the output writer."
    )
    token: BearerToken = Field(
        SecretStr(""),
        description="APP_TOKEN: bearer token required from the reader, if set; "
        "surrounding whitespace is removed.",
    )
    writer_token: BearerToken = Field(
        SecretStr(""),
        description="APP_WRITER_TOKEN: bearer token sent to the writer; "
        "surrounding whitespace is removed.",
    )
    writer_timeout_ms: int = Field(
        25000,
        ge=1,
        description="APP_WRITER_TIMEOUT_MS: timeout of one writer request, in ms. "
        "Keep it between the writer's KAFKA_DELIVERY_TIMEOUT_MS and the reader's "
        "READER_REQUEST_TIMEOUT_MS, so that a failed write reaches the reader as "
        "a 503 and not as a timeout.",
    )
    writer_max_body_bytes: int = Field(
        DEFAULT_WRITER_MAX_BODY_BYTES,
        ge=2,
        description="APP_WRITER_MAX_BODY_BYTES: largest body of one request to the "
        "writer, in bytes; keep it at most the writer's WRITER_MAX_BODY_BYTES. A "
        "batch is split into several POST /batch requests under it, and a result "
        "that alone exceeds it fails with 413 for its message only.",
    )
    writer_max_requests: int = Field(
        8,
        ge=1,
        description="APP_WRITER_MAX_REQUESTS: writer requests open at once for "
        "single messages; while all are busy, further results wait and go out "
        "together as POST /batch requests of at most APP_WRITER_MAX_BODY_BYTES.",
    )
    max_body_bytes: int = Field(
        4 * 1_048_576,
        ge=1,
        description="APP_MAX_BODY_BYTES: largest request body accepted, in bytes.",
    )
    log_level: LogLevel = Field(
        "INFO",
        description="APP_LOG_LEVEL: DEBUG, INFO, WARNING or ERROR, any case. "
        "Below DEBUG, the messages of logged exceptions are left out, because "
        "they may quote message bodies.",
    )
    shutdown_timeout_ms: int = Field(
        30000,
        ge=0,
        le=MAX_SHUTDOWN_TIMEOUT_MS,
        description="APP_SHUTDOWN_TIMEOUT_MS: how long requests in progress may "
        "take after SIGTERM or SIGINT, in milliseconds, at most one day; the rest "
        "get no response.",
    )

    @model_validator(mode="after")
    def _check_credentials(self) -> AppSettings:
        check_single_credential(
            "APP_WRITER_URL",
            str(self.writer_url),
            "APP_WRITER_TOKEN",
            self.writer_token.get_secret_value(),
        )
        return self


#: Maximum length of the error text of a response, in characters. An
#: exception's message can be of any size, and the reader copies the text into
#: the dead letter.
MAX_ERROR_CHARS = 2000


def safe_error_text(text: object) -> str:
    """Return `text` as an error that JSON can carry, cut to `MAX_ERROR_CHARS`.

    Text that is not valid Unicode, such as a lone surrogate from bytes that
    were not UTF-8, is escaped, because orjson encodes no such text.
    """
    text = str(text)
    if len(text) > MAX_ERROR_CHARS:
        cut = len(text) - MAX_ERROR_CHARS
        text = f"{text[:MAX_ERROR_CHARS]}... ({cut} more characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def read_settings(
    settings_class: type[SettingsT], name: str = "model app"
) -> SettingsT:
    """Read the app's own settings from the environment, exiting on a bad value.

    An invalid value prints ``<name>: <error>`` to stderr, naming the variable
    and the value, and exits with status 2 instead of raising pydantic's
    error, so that an app's own settings fail at start like the ``APP_`` ones.
    """
    try:
        return load_settings(settings_class)
    except ConfigurationError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


async def load_in_thread(function: Callable[..., ResultT], *args: Any) -> ResultT:
    """Return ``function(*args)``, run in a thread of its own, from a coroutine.

    For the slow load of a model in a `ModelApp` lifespan, so that the event
    loop serves ``/healthz`` meanwhile. Unlike `asyncio.to_thread`, the thread is
    a daemon, so a stop during the load does not wait for the load to end.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[ResultT] = loop.create_future()

    def settle(result: ResultT | None, error: BaseException | None) -> None:
        if future.done():
            return  # The awaiting task was cancelled, as at a stop.
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def load() -> None:
        try:
            result: ResultT | None = function(*args)
            error: BaseException | None = None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result, error = None, exc
        # The loop is closed when the app stopped during the load.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    name = getattr(function, "__name__", "load")
    threading.Thread(target=load, name=f"load-{name}", daemon=True).start()
    return await future


def _message_of(exc: BaseException) -> str:
    """Return the message of `exc`, or its repr when its ``__str__`` raises."""
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not fail the request
        return object.__repr__(exc)


class _Reject(Exception):
    """An error response; `log_level` overrides the level of its log line."""

    def __init__(self, status: int, message: str, *, log_level: int = 0) -> None:
        super().__init__(safe_error_text(message))
        self.status = status
        self.log_level = log_level
        #: Retry-After of the writer's response, passed on to the reader.
        self.retry_after: str | None = None


class _ClientGone(_Reject):
    """A 503 for a request whose client closed the connection during scoring."""

    def __init__(self) -> None:
        super().__init__(
            503,
            "the client closed the connection before scoring finished, so the "
            "results were not sent to the writer; if the client is the input "
            "reader, raise READER_REQUEST_TIMEOUT_MS above the time that "
            "scoring takes",
            log_level=logging.WARNING,
        )


class _ScoringFailed(_Reject):
    """A 500 response for an exception that the scoring function raised."""

    def __init__(self, exc: BaseException) -> None:
        try:
            described = repr(exc)
        except Exception:  # noqa: BLE001 - a broken __repr__ must not fail the request
            described = object.__repr__(exc)
        super().__init__(500, f"the scoring function raised {described}")
        self.exception = exc


class ModelApp:
    """An HTTP model app around a scoring function."""

    def __init__(
        self,
        score: ScoreFunction | MessageScoreFunction,
        *,
        name: str = "model app",
        score_in_thread: bool = True,
        extra_settings: Sequence[type[BaseSettings]] = (),
        invalid_input_errors: tuple[type[Exception], ...] = (),
        model_version: str = "",
        with_messages: bool = False,
        lifespan: Callable[[], contextlib.AbstractAsyncContextManager[Any]]
        | None = None,
    ) -> None:
        """Wrap `score`, a function or coroutine function from values to results.

        A plain function runs on one worker thread, one call at a time, so a
        slow model does not hold up the event loop: the health checks and the
        other requests go on while it scores. `score_in_thread=False` calls it
        on the event loop instead, which saves the thread switch (some tens of
        microseconds) for a model that scores in microseconds. An ``async
        def`` always runs on the event loop.

        `extra_settings` are the settings classes (not instances) of the app's
        own variables, each with an ``env_prefix``. `run` logs a warning for a
        variable with one of their prefixes that is close to a field's name but
        names none, as it does for the ``APP_`` variables.

        `invalid_input_errors` are the exception types that `score` raises for
        a value it cannot score, such as the ``ValueError`` of a library that
        checks its input. A value that raises one is rejected like an
        `InvalidRecord`, with the exception as the reason: the reader
        dead-letters it at once. Any other exception gets a 500, which the
        reader retries, because the failure may be temporary, such as a
        feature store that timed out.

        `name` starts the app's ``started`` and ``stopped`` log lines. It and
        `model_version` are the ``name`` and ``version`` labels of
        ``agogosml_model_info`` on ``/metrics``.

        `with_messages` calls ``score(values, messages)``, with the `Message`
        of each value, for a model that needs a record's key, headers or id.
        The results are written with the key and headers of their messages.

        `lifespan` is a function without arguments, or a class, that returns
        an async context manager, such as one made with
        ``contextlib.asynccontextmanager``. The context manager loads the
        model on entry and releases it on exit. The app enters it once it
        serves, so ``/healthz`` responds while the model loads, and ``/readyz``
        and the scoring requests get 503 until the entry finished. A failed
        entry makes ``/healthz`` fail and `run` exit with status 1. The exit
        runs at the stop, after the last request.
        """
        _check_score_function(score, arguments=2 if with_messages else 1)
        self._invalid_input_errors = _checked_error_types(invalid_input_errors)
        self._score: Callable[..., Any] = score
        self._name = name
        self._model_version = str(model_version)
        self._extra_settings = _checked_settings_classes(extra_settings)
        self._with_messages = with_messages
        if lifespan is not None:
            _check_lifespan(lifespan)
        self._lifespan = lifespan
        #: Why the model cannot score yet, or '' once the lifespan entered.
        self._model_reason = ""
        #: Set when the lifespan's entry failed; a restart may clear it.
        self._model_failure: str | None = None
        self._lifespan_failed: asyncio.Event | None = None
        self._threaded = score_in_thread and not _is_coroutine_function(score)
        self._scoring_thread: _ScoringThread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._writer_url = ""
        self._writer_max_body_bytes = DEFAULT_WRITER_MAX_BODY_BYTES
        self._writer_ready = False
        self._writer_reason = "the output writer's readiness was not checked yet"
        self._writer_queue: WriterQueue | None = None

    def run(self) -> None:
        """Serve with settings from the environment until SIGTERM/SIGINT."""
        run_service(
            AppSettings, self.serve, SERVICE, extra_settings=self._extra_settings
        )

    async def serve(self, settings: AppSettings) -> None:
        """Serve with `settings` until SIGTERM/SIGINT."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        async with self.running(settings) as app:
            runner = await start_site(
                app,
                settings.host,
                settings.port,
                "APP_",
                shutdown_timeout_seconds=settings.shutdown_timeout_ms / 1000,
            )
            logger.info("%s started", self._name, extra={"port": bound_port(runner)})
            try:
                await self._wait_for_stop(stop)
            finally:
                await runner.cleanup()
        if self._model_failure is not None:
            raise AgogosmlError(self._model_failure)
        logger.info("%s stopped", self._name)

    async def _wait_for_stop(self, stop: asyncio.Event) -> None:
        """Wait for a stop signal, or for the lifespan's entry to fail."""
        waits = [asyncio.ensure_future(stop.wait())]
        if self._lifespan_failed is not None:
            waits.append(asyncio.ensure_future(self._lifespan_failed.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def running(self, settings: AppSettings) -> _Running:
        """Return an async context manager that yields the aiohttp application."""
        return _Running(self, settings)

    def build_app(self, settings: AppSettings) -> web.Application:
        """Return the aiohttp application (call inside `running`)."""
        middlewares = [http_error_middleware(SERVICE), _reject_middleware]
        token = settings.token.get_secret_value()
        if token:
            middlewares.append(
                bearer_auth_middleware(token, frozenset({"/", "/batch"}))
            )
        app = web.Application(
            client_max_size=settings.max_body_bytes, middlewares=middlewares
        )
        app[MAX_BODY_BYTES] = settings.max_body_bytes
        app.router.add_post("/", self._post_one)
        app.router.add_post("/batch", self._post_batch)
        add_health_routes(
            app,
            HEALTH_NAME,
            lambda: self._writer_ready and not self._model_reason,
            lambda: self._model_failure,
            lambda: self._model_reason or self._writer_reason,
            metrics_service=SERVICE,
        )
        return app

    async def _post_one(self, request: web.Request) -> web.Response:
        self._check_model_loaded()
        value = _decode(await _read_json_body(request))
        MESSAGES_IN.labels(SERVICE).inc()
        with _in_flight(1):
            return await self._score_one(request, value)

    def _check_model_loaded(self) -> None:
        """Reject a request with 503 while the lifespan has not entered.

        While the model loads, the 503 has ``Retry-After: 1``, so the reader
        waits without using up attempts; after a failed load it has none.
        """
        if not self._model_reason:
            return
        reject = _Reject(503, self._model_reason)
        if self._model_failure is None:
            reject.retry_after = "1"
        raise reject

    async def _score_one(self, request: web.Request, value: Any) -> web.Response:
        item = _item_from_headers(request.headers)
        # The headers were checked, so the message can be read.
        messages = [_message(item)] if self._with_messages else None
        try:
            (result,) = await self._call_score(
                [value],
                [item.get("id")],
                functools.partial(_client_left, request),
                messages=messages,
            )
        except _ScoringFailed:
            SCORED_VALUES.labels(SERVICE, "failed").inc()
            raise
        _count_results([result])
        _check_client_waits(request)
        if isinstance(result, InvalidRecord):
            raise _Reject(400, result.reason)
        element = _encode_element(item, result, 0)
        if element is None:
            raise _Reject(422, _NON_FINITE_ERROR)
        size = len(element) + 2
        if size > self._writer_max_body_bytes:
            raise _Reject(413, _oversized_error(size, self._writer_max_body_bytes))
        assert self._writer_queue is not None
        await self._writer_queue.write(element)
        MESSAGES_OUT.labels(SERVICE).inc()
        return json_response({"status": 200})

    async def _post_batch(self, request: web.Request) -> web.Response:
        self._check_model_loaded()
        items = _batch_items(_decode(await _read_json_body(request)))
        MESSAGES_IN.labels(SERVICE).inc(len(items))
        with _in_flight(len(items)):
            return await self._score_items(request, items)

    async def _score_items(
        self, request: web.Request, items: list[dict[str, Any]]
    ) -> web.Response:
        # An item that the writer would reject is not scored: it fails with
        # 400 whatever the scoring function returns for it.
        results: list[Any] = [_item_problem(item) for item in items]
        messages: dict[int, Message] = {}
        if self._with_messages:
            for index, item in enumerate(items):
                if results[index] is None:
                    try:
                        messages[index] = _message(item)
                    except ValueError as exc:
                        results[index] = InvalidRecord(str(exc))
        scored = [index for index, problem in enumerate(results) if problem is None]
        if scored:
            scored_results = await self._score_batch(
                [items[index]["value"] for index in scored],
                [items[index].get("id") for index in scored],
                functools.partial(_client_left, request),
                [messages[index] for index in scored] if messages else None,
            )
            for index, result in zip(scored, scored_results, strict=True):
                results[index] = result
        _check_client_waits(request)
        statuses: list[dict[str, Any]] = [{"status": 200} for _ in items]
        outputs = self._encode_outputs(items, results, statuses)
        for chunk in _chunks(outputs, self._writer_max_body_bytes):
            await self._forward_chunk(items, chunk, statuses)
        written = sum(1 for status in statuses if status["status"] == 200)
        MESSAGES_OUT.labels(SERVICE).inc(written)
        for status in statuses:
            if "error" in status:
                status["error"] = safe_error_text(status["error"])
        return json_response({"results": statuses})

    def _encode_outputs(
        self,
        items: list[dict[str, Any]],
        results: list[Any],
        statuses: list[dict[str, Any]],
    ) -> list[tuple[int, bytes]]:
        """Encode each result as a writer batch element, as (item index, JSON).

        Invalid records, and results too large for one writer request, get
        their error in `statuses` instead.
        """
        outputs = []
        for index, (item, result) in enumerate(zip(items, results, strict=True)):
            if isinstance(result, InvalidRecord):
                statuses[index] = {"status": 400, "error": result.reason}
                continue
            if isinstance(result, _ScoringFailed):
                statuses[index] = {"status": 500, "error": str(result)}
                continue
            try:
                output = _encode_element(item, result, index)
            except _Reject as exc:
                # Only this result cannot be encoded: the others go on.
                logger.error(
                    "result of the scoring function not written",
                    extra={"message_id": item.get("id"), "error": str(exc)},
                )
                statuses[index] = {"status": exc.status, "error": str(exc)}
                continue
            if output is None:
                statuses[index] = {"status": 422, "error": _NON_FINITE_ERROR}
                continue
            # Sent alone, the element is a request of its length plus two brackets.
            size = len(output) + 2
            if size > self._writer_max_body_bytes:
                logger.info(
                    "result too large for one writer request",
                    extra={"message_id": item.get("id"), "size": size},
                )
                error = _oversized_error(size, self._writer_max_body_bytes)
                statuses[index] = {"status": 413, "error": error}
                continue
            outputs.append((index, output))
        return outputs

    async def _forward_chunk(
        self,
        items: list[dict[str, Any]],
        chunk: list[tuple[int, bytes]],
        statuses: list[dict[str, Any]],
    ) -> None:
        """Send one chunk of a batch to the writer as one ``POST /batch``.

        When the writer rejects a chunk of several records (422), they are sent
        again one at a time, so only the record the sink cannot take fails: with
        422, or with a 503 without Retry-After, which the reader retries for
        that record alone. A chunk of one record of a batch of several fails
        alone in the same way, as when the size limit put it in a chunk of its
        own. Any other failure fails the whole request with 503 or 502, and the
        reader retries the whole batch. The records of earlier chunks are then
        written again, which at-least-once delivery allows.
        """
        body = b"[" + b",".join(output for _, output in chunk) + b"]"
        try:
            await self._forward("/batch", body, len(chunk))
        except _Reject as exc:
            # A 503 with Retry-After is the writer or its sink down, which
            # fails the request as a whole.
            alone = len(chunk) == 1 and len(items) > 1
            if alone and exc.status == 503 and not exc.retry_after:
                statuses[chunk[0][0]] = {"status": 503, "error": str(exc)}
                return
            if exc.status != 422:
                raise
            if len(chunk) > 1:
                for entry in chunk:
                    await self._forward_chunk(items, [entry], statuses)
                return
            ((index, _),) = chunk
            logger.info(
                "output writer rejected a record",
                extra={"message_id": items[index].get("id"), "error": str(exc)},
            )
            statuses[index] = {"status": 422, "error": str(exc)}

    async def _score_batch(
        self,
        values: list[Any],
        message_ids: list[Any],
        abandoned: Callable[[], bool],
        messages: list[Message] | None = None,
    ) -> list[Any]:
        """Score a batch, and each value alone when the batch raised.

        The value that makes the scoring function raise then fails alone,
        with a 500 as its result, and the other values of the batch go on.
        `message_ids` are the values' ids, for the log, `abandoned` tells
        whether the request's client left, and `messages` are the values'
        messages with ``with_messages``.
        """
        try:
            scored = await self._call_score(
                values, message_ids, abandoned, messages=messages
            )
        except _ScoringFailed as failure:
            if len(values) == 1:
                SCORED_VALUES.labels(SERVICE, "failed").inc()
                raise
            rejected = isinstance(failure.exception, InvalidRecord)
        else:
            _count_results(scored)
            return scored
        if not rejected:
            logger.warning(
                "the scoring function raised on a batch of %d values; scoring "
                "each value alone to find the ones that fail",
                len(values),
                extra={"message_ids": message_ids[:20]},
            )
        results: list[Any] = []
        failed_ids: list[Any] = []
        failures: list[_ScoringFailed] = []
        for index, (value, message_id) in enumerate(
            zip(values, message_ids, strict=True)
        ):
            try:
                (result,) = await self._call_score(
                    [value],
                    [message_id],
                    abandoned,
                    messages=None if messages is None else [messages[index]],
                    log_exceptions=False,
                )
            except _ScoringFailed as exc:
                result = exc
                failures.append(exc)
                failed_ids.append(message_id)
            results.append(result)
        if failures:
            logger.warning(
                "the scoring function raised on %d of %d values alone; they fail "
                "with 500, and the first error is in the error field",
                len(failures),
                len(values),
                extra={"error": str(failures[0]), "message_ids": failed_ids[:20]},
            )
        _count_results(results)
        return results

    async def _call_score(
        self,
        values: list[Any],
        message_ids: list[Any],
        abandoned: Callable[[], bool],
        *,
        messages: list[Message] | None = None,
        log_exceptions: bool = True,
    ) -> list[Any]:
        # The function gets copies, because a batch that raises is scored again
        # value by value from these lists, even if the function reordered them.
        score: Callable[[list[Any]], Any] = self._score
        if messages is not None:
            score = _given(self._score, list(messages))
        started = time.perf_counter()
        outcome = "error"
        try:
            if self._scoring_thread is not None:
                returned = await self._scoring_thread.call(
                    score, list(values), abandoned
                )
            else:
                returned = score(list(values))
            if inspect.isawaitable(returned):
                returned = await returned
            outcome = "ok"
        except _ClientGone:
            outcome = "skipped"
            raise
        except InvalidRecord as exc:
            outcome = "invalid"
            if len(values) == 1:
                return [exc]
            raise _ScoringFailed(exc) from None
        # SIGINT and SIGTERM stop the app through signal handlers, so a
        # KeyboardInterrupt or SystemExit here comes from the user's code, such
        # as a library that calls sys.exit: a failed call, not a stop.
        except (Exception, KeyboardInterrupt, SystemExit) as exc:  # noqa: BLE001
            if isinstance(exc, self._invalid_input_errors):
                outcome = "invalid"
                invalid = InvalidRecord(f"{type(exc).__name__}: {_message_of(exc)}")
                if len(values) == 1:
                    return [invalid]
                raise _ScoringFailed(invalid) from None
            if log_exceptions:
                logger.exception(
                    "the scoring function raised",
                    extra={"message_ids": message_ids[:20]},
                )
            raise _ScoringFailed(exc) from None
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # This request is being cancelled, such as at a stop.
            # Raised by the scoring function itself, as by a task it awaited
            # that something else cancelled.
            if log_exceptions:
                logger.exception(
                    "the scoring function raised",
                    extra={"message_ids": message_ids[:20]},
                )
            raise _ScoringFailed(exc) from None
        finally:
            if outcome != "skipped":
                SCORE_SECONDS.labels(SERVICE, outcome).observe(
                    time.perf_counter() - started
                )
        results = _result_list(returned)
        if len(results) != len(values):
            raise _Reject(
                500,
                f"the scoring function returned {len(results)} results for "
                f"{len(values)} values; it must return one result per value",
                log_level=logging.ERROR,
            )
        return results

    async def _forward(self, path: str, body: bytes, count: int) -> None:
        """Send a JSON array of `count` results to the writer.

        A 2xx response must give the number of records written, as the output
        writer does: any other server that responds with 2xx, found at a wrong
        APP_WRITER_URL, would otherwise lose the results.
        """
        assert self._session is not None
        url = self._writer_url + path
        headers = {"Content-Type": "application/json"}
        started = time.perf_counter()
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    start = await read_start(response.content, _WRITER_RESPONSE_BYTES)
                    _check_written(url, response.status, start, count)
                    REQUEST_SECONDS.labels(SERVICE, "ok").observe(
                        time.perf_counter() - started
                    )
                    return
                # Only the start of the error goes into the message, so a
                # large body is not read in full.
                start = await read_start(response.content, _ERROR_TEXT_BYTES)
                text = start.decode("utf-8", "replace")
                retry_after = response.headers.get("Retry-After")
        except TimeoutError:
            REQUEST_SECONDS.labels(SERVICE, "error").observe(
                time.perf_counter() - started
            )
            seconds = self._session.timeout.total
            raise _writer_unavailable(
                f"output writer at {url} did not respond within {seconds:g} s "
                "(APP_WRITER_TIMEOUT_MS); check that the writer and its sink work"
            ) from None
        except aiohttp.ClientError as exc:
            REQUEST_SECONDS.labels(SERVICE, "error").observe(
                time.perf_counter() - started
            )
            reason = str(exc) or type(exc).__name__
            raise _writer_unavailable(
                f"output writer at {url} is unreachable: {reason}"
            ) from None
        REQUEST_SECONDS.labels(SERVICE, "error").observe(time.perf_counter() - started)
        error = _writer_error(self._writer_url, response.status, text)
        if error.status == 503 and response.status in (429, 503) and retry_after:
            # The reader then waits that long without using up an attempt.
            error.retry_after = retry_after
        raise error

    async def _watch_writer(self) -> None:
        """Check the writer's readiness every second, which is the app's own.

        A writer that stays not ready is logged after a few seconds, and then
        every 5 minutes, with the reason and the setting to check.
        """
        assert self._session is not None
        writer_url = redact_url(self._writer_url)
        checks_not_ready = 0
        while True:
            readiness = await check_readiness(
                self._session, self._writer_url + "/readyz", writer_url + "/readyz"
            )
            ready = readiness.ready and readiness.service in ("", "output_writer")
            token_problem = await self._token_problem() if ready else ""
            # A wrong APP_WRITER_URL or token does not clear by itself.
            setup_error = bool(token_problem) or readiness.service not in (
                "",
                "output_writer",
            )
            if token_problem:
                ready = False
                self._writer_reason = token_problem
            elif readiness.service and readiness.service != "output_writer":
                self._writer_reason = (
                    f"APP_WRITER_URL {writer_url} is an agogosml "
                    f"{readiness.service.replace('_', ' ')}, not an output writer; "
                    "set it to the output writer's URL"
                )
            elif ready:
                self._writer_reason = ""
            elif readiness.service:
                self._writer_reason = (
                    f"the output writer is not ready: {readiness.detail}"
                )
            else:
                self._writer_reason = (
                    f"the output writer is not reachable or not ready: "
                    f"{readiness.detail}; check APP_WRITER_URL"
                )
            if ready != self._writer_ready:
                logger.info(
                    "output writer at %s is %s",
                    writer_url,
                    "ready" if ready else "not ready",
                )
            self._writer_ready = ready
            checks_not_ready = 0 if ready else checks_not_ready + 1
            if checks_not_ready % WRITER_WARNING_CHECKS == WRITER_GRACE_CHECKS:
                level = logging.ERROR if setup_error else logging.WARNING
                logger.log(level, "model app not ready: %s", self._writer_reason)
            await asyncio.sleep(1.0)

    async def _token_problem(self) -> str:
        """Return why the writer rejected the app's token, or '' when it accepted it.

        An empty batch writes nothing, and the writer checks its token like
        any other, so a wrong APP_WRITER_TOKEN makes the app not ready instead
        of failing every message.
        """
        assert self._session is not None
        try:
            async with self._session.post(
                self._writer_url + "/batch",
                data=b"[]",
                headers={"Content-Type": "application/json"},
                allow_redirects=False,
            ) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            return ""  # The next readiness check finds an unreachable writer.
        if status not in (401, 403):
            return ""
        return (
            f"the output writer rejected the app's bearer token ({status}): set "
            "APP_WRITER_TOKEN to the writer's WRITER_TOKEN"
        )


class _Running:
    def __init__(self, model_app: ModelApp, settings: AppSettings) -> None:
        self._model_app = model_app
        self._settings = settings
        self._watcher: asyncio.Task[None] | None = None
        self._lifespan_task: asyncio.Task[None] | None = None
        self._lifespan_exit = asyncio.Event()
        self._lifespan_entered = False

    async def __aenter__(self) -> web.Application:
        model_app = self._model_app
        if model_app._lifespan is not None:
            model_app._model_reason = (
                "the model is loading: the lifespan given to ModelApp has not "
                "finished its entry"
            )
            model_app._model_failure = None
            model_app._lifespan_failed = asyncio.Event()
            self._lifespan_task = asyncio.create_task(self._live())
        token = self._settings.writer_token.get_secret_value()
        model_app._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100),
            timeout=aiohttp.ClientTimeout(
                total=self._settings.writer_timeout_ms / 1000
            ),
            headers={"Authorization": f"Bearer {token}"} if token else {},
        )
        if model_app._threaded:
            model_app._scoring_thread = _ScoringThread()
        model_app._writer_url = str(self._settings.writer_url).rstrip("/")
        model_app._writer_max_body_bytes = self._settings.writer_max_body_bytes
        model_app._writer_queue = WriterQueue(
            lambda body, count: model_app._forward("/batch", body, count),
            max_body_bytes=self._settings.writer_max_body_bytes,
            max_requests=self._settings.writer_max_requests,
            isolate=lambda exc: isinstance(exc, _Reject) and exc.status == 422,
        )
        self._watcher = asyncio.create_task(model_app._watch_writer())
        MODEL_INFO.labels(
            SERVICE,
            model_app._name,
            model_app._model_version,
            os.environ.get(SLOT_VARIABLE, ""),
        ).set(1)
        start_at_zero(MESSAGES_IN, (SERVICE,))
        start_at_zero(MESSAGES_OUT, (SERVICE,))
        start_at_zero(
            SCORED_VALUES,
            *[(SERVICE, outcome) for outcome in ("scored", "invalid", "failed")],
        )
        return model_app.build_app(self._settings)

    async def _live(self) -> None:
        """Enter the lifespan, then exit it when `__aexit__` sets the exit event.

        Entry and exit run in this one task, as anyio's context managers require.
        """
        model_app = self._model_app
        assert model_app._lifespan is not None
        started = time.monotonic()
        logger.info("%s is loading its model (lifespan)", model_app._name)
        try:
            async with model_app._lifespan():
                self._lifespan_entered = True
                model_app._model_reason = ""
                logger.info(
                    "%s loaded its model in %.1f s",
                    model_app._name,
                    time.monotonic() - started,
                )
                # The model lives as long as the process, like the modules.
                freeze_startup_objects()
                await self._lifespan_exit.wait()
        # A KeyboardInterrupt or SystemExit here comes from the user's code, as
        # in _call_score, because SIGINT and SIGTERM go to signal handlers.
        except (Exception, KeyboardInterrupt, SystemExit) as exc:  # noqa: BLE001
            if self._lifespan_entered:
                logger.exception("the exit of the lifespan given to ModelApp failed")
                return
            logger.exception("the lifespan given to ModelApp failed to enter")
            model_app._model_failure = (
                "the lifespan given to ModelApp failed to enter: "
                f"{type(exc).__name__}: {_message_of(exc)}"
            )
            model_app._model_reason = model_app._model_failure
            assert model_app._lifespan_failed is not None
            model_app._lifespan_failed.set()

    async def __aexit__(self, *exc_info: object) -> None:
        if self._lifespan_task is not None:
            self._model_app._model_reason = "the app is stopping"
            if not self._lifespan_entered:
                # A stop during the load does not wait for the load to end.
                self._lifespan_task.cancel()
            self._lifespan_exit.set()
            timeout = self._settings.shutdown_timeout_ms / 1000
            done, _ = await asyncio.wait({self._lifespan_task}, timeout=timeout)
            if not done:
                logger.error(
                    "the lifespan given to ModelApp did not end within "
                    "APP_SHUTDOWN_TIMEOUT_MS=%d; it is cancelled",
                    self._settings.shutdown_timeout_ms,
                )
                self._lifespan_task.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._model_app._writer_queue is not None:
            await self._model_app._writer_queue.close()
        if self._model_app._session is not None:
            await self._model_app._session.close()
        if self._model_app._scoring_thread is not None:
            self._model_app._scoring_thread.close()
            self._model_app._scoring_thread = None


class _ScoringThread:
    """One daemon thread that runs the calls of a plain scoring function in turn.

    A daemon, unlike the workers of `concurrent.futures`, which the interpreter
    waits for at exit: a call that never returns must not keep a stopped app
    alive.
    """

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[_ScoringCall | None] = queue.SimpleQueue()
        self._running = False
        self._thread = threading.Thread(target=self._run, name="score", daemon=True)
        self._thread.start()

    async def call(
        self,
        function: Callable[[list[Any]], Any],
        values: list[Any],
        abandoned: Callable[[], bool],
    ) -> Any:
        """Run `function(values)` on the thread and return its result.

        A call whose turn comes after `abandoned()` turned true, such as one
        whose client closed the connection while it waited behind slower
        calls, is not run: it raises `_ClientGone` instead, so an app under
        overload does not spend its scoring thread on results that no client waits for.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.put((function, values, future, loop, abandoned))
        return await future

    def close(self) -> None:
        """Let the thread end after the calls queued; a running call goes on."""
        if self._running:
            logger.warning(
                "the scoring function was still running at the stop; its request "
                "got no response, so the reader sends the message again"
            )
        self._calls.put(None)

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            function, values, future, loop, abandoned = item
            outcome: tuple[Any, BaseException | None]
            if future.done() or abandoned():
                # Read from this thread: a stale value only runs or skips one
                # call that the event loop then handles as it would anyway.
                outcome = (None, _ClientGone())
            else:
                self._running = True
                try:
                    outcome = (function(values), None)
                except BaseException as exc:  # noqa: BLE001 - passed to the caller
                    outcome = (None, exc)
                finally:
                    self._running = False
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:
                return  # The event loop is closed, so no caller awaits the outcome.


#: A queued call: function, values, the future for its outcome, its loop, and
#: whether its client left.
_ScoringCall = tuple[
    Callable[[list[Any]], Any],
    list[Any],
    "asyncio.Future[Any]",
    asyncio.AbstractEventLoop,
    Callable[[], bool],
]


def _settle(
    future: asyncio.Future[Any], result: Any, error: BaseException | None
) -> None:
    """Give `future` the outcome of a call, unless its caller gave up on it."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


#: Retry-After of the app's 503 when the writer rejects the app's token or URL.
SETUP_ERROR_RETRY_AFTER_SECONDS = 5

#: Retry-After of the app's 503 when the writer is unreachable or timed out.
WRITER_DOWN_RETRY_AFTER_SECONDS = 1


@contextlib.contextmanager
def _in_flight(count: int) -> Iterator[None]:
    """Count `count` messages in the in-flight gauge while the block runs."""
    gauge = IN_FLIGHT.labels(SERVICE)
    gauge.inc(count)
    try:
        yield
    finally:
        gauge.dec(count)


def _writer_unavailable(message: str) -> _Reject:
    """Return a 503 that makes the reader wait without using up an attempt.

    The message is not at fault when the writer cannot be reached, so it must
    not reach the dead letters however long a writer restart takes.
    """
    error = _Reject(503, message)
    error.retry_after = str(WRITER_DOWN_RETRY_AFTER_SECONDS)
    return error


def _check_written(url: str, status: int, body: bytes, count: int) -> None:
    """Raise unless a writer's 2xx response gives `count` records as written.

    Raises:
        _Reject: a 503 with Retry-After, so the reader retries the messages
            without using up attempts, and nothing is committed meanwhile.
    """
    try:
        written = orjson.loads(body).get("written")
    except (orjson.JSONDecodeError, AttributeError):
        written = None
    if type(written) is int and written == count:
        return
    if type(written) is int:
        problem = f"says it wrote {written} of {count} records"
    else:
        problem = (
            "does not say how many records it wrote, so it is not an agogosml "
            "output writer; set APP_WRITER_URL to the output writer's URL"
        )
    logger.error("the response %d of %s %s", status, url, problem)
    raise _writer_unavailable(f"{url} responded {status} but {problem}")


def _writer_error(writer_url: str, status: int, text: str) -> _Reject:
    """Map an error status of the writer to the status the reader should act on.

    The reader retries 5xx, 408 and 429 and dead-letters any other 4xx at once,
    so a result the writer can never accept becomes 422, and a problem that a
    retry or an operator can fix becomes 503. The 503 of a set-up error (a
    wrong token or URL) carries Retry-After, so valid messages wait for the fix
    instead of using up their attempts.
    """
    message = f"output writer responded {status}: {_error_text(text)}"
    # The fix comes before the writer's response body, because logs below
    # DEBUG cut an error off at "responded <status>: " to hide that body.
    if status in (401, 403):
        fix = (
            "the output writer rejected the bearer token: set APP_WRITER_TOKEN "
            "to the writer's WRITER_TOKEN"
        )
    elif status in (404, 405):
        fix = (
            f"check that APP_WRITER_URL={writer_url!r} is the output writer's base URL"
        )
    elif 300 <= status < 400:
        fix = (
            "redirects are not followed, because a redirected POST may arrive as "
            "a GET: point APP_WRITER_URL at the writer itself"
        )
    else:
        fix = ""
    if fix:
        error = _Reject(503, f"{fix}; {message}", log_level=logging.ERROR)
        error.retry_after = str(SETUP_ERROR_RETRY_AFTER_SECONDS)
        return error
    if status in (400, 413, 415, 422):
        return _Reject(422, message)
    if status in (408, 429) or status >= 500:
        return _Reject(503, message)
    return _Reject(502, f"{message}; this status is not part of the writer's API")


def _check_client_waits(request: web.Request) -> None:
    """Raise `_Reject` when the client closed the connection during scoring.

    The reader closes a request once READER_REQUEST_TIMEOUT_MS passed, and
    sends its messages again. Forwarding the results too would write them
    twice, or write a message that the reader dead-letters.
    """
    if _client_left(request):
        raise _ClientGone()


def _client_left(request: web.Request) -> bool:
    """Return whether the client of `request` closed its connection."""
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def _reject_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Reject as exc:
        REJECTED_REQUESTS.labels(SERVICE, str(exc.status)).inc()
        level = exc.log_level or (
            logging.WARNING if exc.status >= 500 else logging.INFO
        )
        logger.log(
            level,
            "request rejected",
            extra={
                "status": exc.status,
                "error": str(exc),
                "message_id": header_for_log(request.headers, "X-Message-Id"),
            },
        )
        headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
        return error_response(exc.status, str(exc), headers=headers)
    except web.HTTPRequestEntityTooLarge:
        REJECTED_REQUESTS.labels(SERVICE, "413").inc()
        limit = request.app[MAX_BODY_BYTES]
        logger.info(
            "request rejected",
            extra={
                "status": 413,
                "error": f"body over APP_MAX_BODY_BYTES={limit}",
                "message_id": header_for_log(request.headers, "X-Message-Id"),
            },
        )
        return error_response(
            413,
            f"request body exceeds APP_MAX_BODY_BYTES={limit} "
            "bytes; raise APP_MAX_BODY_BYTES, or, for a batch of several messages, "
            "send smaller batches (READER_BATCH_MAX_BYTES)",
        )


def _table_rows(table: Any) -> list[dict[str, Any]]:
    """Return the rows of a DataFrame as objects, by column name as text.

    Column names that are numbers, as in ``DataFrame(predict_proba(X))``,
    become text, because JSON object keys are text. Two columns of one name
    would leave one value in each object, so they are rejected.
    """
    names = [str(column) for column in table.columns]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise _Reject(
            500,
            f"the scoring function returned a DataFrame with the column "
            f"{repeated[0]!r} more than once, so each result would keep only one "
            "of them; give every column its own name",
            log_level=logging.ERROR,
        )
    return [
        dict(zip(names, row, strict=True))
        for row in table.itertuples(index=False, name=None)
    ]


def _is_coroutine_function(function: object) -> bool:
    """Return whether calling `function`, or its ``__call__``, gives a coroutine."""
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        type(function).__call__
    )


def _given(score: Callable[..., Any], messages: list[Message]) -> Callable[..., Any]:
    """Return `score` as a function of the values alone, given their `messages`."""

    def score_values(values: list[Any]) -> Any:
        return score(values, messages)

    return score_values


def _check_score_function(score: object, *, arguments: int = 1) -> None:
    """Raise TypeError unless `score` can be called with its `arguments` lists.

    One argument is the list of values, and a second the list of their
    messages (``with_messages``).
    """
    example = "def score(values)" if arguments == 1 else "def score(values, messages)"
    if not callable(score):
        raise TypeError(
            f"ModelApp needs a scoring function, got {type(score).__name__} "
            f"{score!r}: pass a function such as {example}: ..."
        )
    _check_not_generator(score)
    try:
        signature = inspect.signature(score)
    except (TypeError, ValueError):
        return  # Some built-in callables have no signature to check.
    try:
        signature.bind(*[[]] * arguments)
    except TypeError as exc:
        name = getattr(score, "__qualname__", repr(score))
        if arguments == 1:
            wanted = "one list of values"
            role = "the values of a request as its only required argument"
        else:
            wanted = "a list of values and a list of messages (with_messages=True)"
            role = "the values and their messages as its two required arguments"
        raise TypeError(
            f"the scoring function {name}{signature} cannot be called with "
            f"{wanted} ({exc}); it must take {role}, as in {example}: ..."
            f"{_with_messages_hint(signature, arguments)}"
        ) from None


def _check_lifespan(lifespan: object) -> None:
    """Raise TypeError unless `lifespan` can be called without arguments.

    A class whose instances are async context managers is such a function.
    """
    # A context manager of contextlib is callable too, as a decorator.
    is_instance = hasattr(lifespan, "__aenter__") and not isinstance(lifespan, type)
    if not callable(lifespan) or is_instance:
        raise TypeError(
            f"lifespan must be a function that returns an async context "
            f"manager, got {type(lifespan).__name__}: pass the function, "
            "such as one decorated with contextlib.asynccontextmanager, not "
            "what calling it returns"
        )
    try:
        signature = inspect.signature(lifespan)
    except (TypeError, ValueError):
        return  # Some built-in callables have no signature to check.
    try:
        signature.bind()
    except TypeError as exc:
        name = getattr(lifespan, "__qualname__", repr(lifespan))
        raise TypeError(
            f"the lifespan {name}{signature} cannot be called without arguments "
            f"({exc}); ModelApp calls it as lifespan(), unlike FastAPI's "
            "lifespan(app), so define it as async def lifespan(): ..."
        ) from None


def _with_messages_hint(signature: inspect.Signature, arguments: int) -> str:
    """Return how to set ``with_messages`` for a function of the other arity, or ''."""
    other = 2 if arguments == 1 else 1
    try:
        signature.bind(*[[]] * other)
    except TypeError:
        return ""
    if other == 2:
        return (
            " If its second argument is for the messages of the values, pass "
            "with_messages=True"
        )
    return " For a function of the values alone, leave out with_messages=True"


def _check_not_generator(score: object) -> None:
    """Raise TypeError when `score`, or its ``__call__``, is a generator function."""
    called = [score, type(score).__call__]
    if any(
        inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function)
        for function in called
    ):
        name = getattr(score, "__qualname__", repr(score))
        raise TypeError(
            f"the scoring function {name} is a generator function, whose results "
            "ModelApp cannot count against the values: return a list, as in "
            "return [result(value) for value in values], instead of using yield"
        )


def _count_results(results: list[Any]) -> None:
    """Count the values of one request by their final outcome."""
    failed = sum(1 for result in results if isinstance(result, _ScoringFailed))
    invalid = sum(1 for result in results if isinstance(result, InvalidRecord))
    scored = len(results) - failed - invalid
    for outcome, count in (
        ("scored", scored),
        ("invalid", invalid),
        ("failed", failed),
    ):
        if count:
            SCORED_VALUES.labels(SERVICE, outcome).inc(count)


def _checked_error_types(types: object) -> tuple[type[Exception], ...]:
    """Return `invalid_input_errors` as a tuple, or raise TypeError naming the fix."""
    checked = _class_tuple(
        types,
        Exception,
        "invalid_input_errors",
        "a tuple of exception types",
        "invalid_input_errors=(ValueError,)",
        "an exception type: list classes such as ValueError, not instances or names",
    )
    if Exception in checked:
        logger.warning(
            "invalid_input_errors contains Exception, so every error of the "
            "scoring function rejects its value at once, temporary ones "
            "included; list the types that mean a bad input, such as ValueError"
        )
    return checked


def _checked_settings_classes(classes: object) -> tuple[type[BaseSettings], ...]:
    """Return `extra_settings` as a tuple, or raise TypeError naming the fix."""
    return _class_tuple(
        classes,
        BaseSettings,
        "extra_settings",
        "a list of settings classes",
        "extra_settings=[MySettings]",
        "a subclass of pydantic_settings.BaseSettings: list the settings "
        "classes themselves, such as extra_settings=[MySettings], not instances",
    )


def _class_tuple(
    value: object,
    base: type[ClassT],
    option: str,
    expected: str,
    example: str,
    item_fix: str,
) -> tuple[type[ClassT], ...]:
    """Return `value`, one class or a list of them, as a tuple of subclasses of `base`.

    Raises TypeError that names `option`, with `example` for a value that is
    no list and `item_fix` for an item that is no such class.
    """
    if isinstance(value, type):
        value = (value,)
    if not isinstance(value, tuple | list):
        raise TypeError(
            f"{option} must be {expected}, got {type(value).__name__} {value!r}: "
            f"pass, for example, {example}"
        )
    for item in value:
        if not (isinstance(item, type) and issubclass(item, base)):
            raise TypeError(f"{option} contains {item!r}, which is not {item_fix}")
    return tuple(value)


def _result_list(returned: object) -> list[Any]:
    """Return the results of a scoring function as a list, or raise a JSON 500.

    Sequences and array-likes of one or more dimensions (numpy arrays, pandas
    Series) are accepted. A table such as a pandas DataFrame, which iterates
    over its column names, gives one result per row: an object of its
    columns. Sets, dicts, generators and None are rejected, because they are
    unordered or have no length to check against the values.
    """
    ndim = getattr(returned, "ndim", 0)
    if (
        isinstance(ndim, int)
        and ndim >= 2
        and not hasattr(returned, "__array_interface__")
    ):
        if hasattr(returned, "itertuples") and hasattr(returned, "columns"):
            return _table_rows(returned)
        raise _Reject(
            500,
            f"the scoring function returned a {ndim}-dimensional "
            f"{type(returned).__name__}, whose items are not its rows; return a "
            "list, a numpy array or a pandas DataFrame with one result per value",
            log_level=logging.ERROR,
        )
    if isinstance(returned, str | bytes | bytearray):
        is_sequence = False
    else:
        is_sequence = isinstance(returned, Sequence) or (
            getattr(returned, "ndim", 0) >= 1 and hasattr(returned, "__iter__")
        )
    if not is_sequence:
        raise _Reject(
            500,
            f"the scoring function returned an object of type "
            f"{type(returned).__name__}; return a list, tuple or numpy array with "
            "one result per value, in order",
            log_level=logging.ERROR,
        )
    return list(returned)  # type: ignore[call-overload]


def _encode_element(item: dict[str, Any], result: Any, index: int) -> bytes | None:
    """Encode the writer batch element of a result, or return None for NaN or infinity.

    orjson encodes NaN and the infinities as ``null``, so only a result whose
    JSON contains ``null`` is searched for them.
    """
    if isinstance(result, Output):
        item = _with_output(item, result, index)
        result = result.value
        if isinstance(result, InvalidRecord | Output):
            raise _output_error(
                index,
                f"a value of type {type(result).__name__}",
                fix=f"return the {type(result).__name__} as a result of its own, "
                "not as the value of an Output",
            )
    value = _encode_json(result, result, index)
    if b"null" in value and has_non_finite(result):
        return None
    try:
        return exact_json.compact(
            exact_json.dumps(_writer_element(item, orjson.Fragment(value)))
        )
    except orjson.JSONEncodeError as exc:
        # The result encoded, so the item's id, key or headers are at fault,
        # such as an id nested deeper than JSON encoders go.
        raise _Reject(
            400,
            f"batch item {index}: its id, key, traceparent or headers cannot be "
            f"encoded as JSON again ({exc}); send them as strings",
        ) from None


def _with_output(item: dict[str, Any], output: Output, index: int) -> dict[str, Any]:
    """Return `item` with the key and headers that `output` sets.

    A key or header value that is not UTF-8 text travels base64-encoded.
    A key or headers of another type is a bug of the scoring function: 500.
    """
    item = dict(item)
    if output.key is not None:
        item["key"], encoded = _text_or_base64(output.key, index, "key")
        item["key_encoding"] = "base64" if encoded else None
    if output.headers is not None:
        if not isinstance(output.headers, Mapping):
            raise _output_error(
                index, f"headers of type {type(output.headers).__name__}"
            )
        headers: dict[str, str | None] = {}
        encodings: dict[str, str] = {}
        for name, value in output.headers.items():
            if not isinstance(name, str) or not name:
                raise _output_error(index, f"a header name {name!r}")
            if not is_utf8(name):
                raise _output_error(
                    index, f"a header name {name!r} that is not valid UTF-8"
                )
            if name.lower() in _RESERVED_HEADERS:
                raise _output_error(
                    index,
                    f"the header {name!r}, which the writer takes as the record's "
                    "id or trace context",
                )
            if value is None:
                headers[name] = None
                continue
            headers[name], encoded = _text_or_base64(value, index, f"header {name!r}")
            if encoded:
                encodings[name] = "base64"
        item["headers"] = headers
        item["header_encodings"] = encodings or None
    return item


def _text_or_base64(value: object, index: int, what: str) -> tuple[str, bool]:
    """Return an Output key or header value as text, or base64 if it is not UTF-8."""
    if isinstance(value, str):
        if not is_utf8(value):
            raise _output_error(index, f"a {what} {value!r} that is not valid UTF-8")
        return value, False
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode(), False
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii"), True
    raise _output_error(index, f"a {what} of type {type(value).__name__}")


#: The fix of an `Output` whose key or headers are wrong.
_OUTPUT_FIX = (
    "give the key and header values as bytes or str, the headers as a dict by "
    "name, and leave out message-id and traceparent"
)


def _output_error(index: int, problem: str, *, fix: str = _OUTPUT_FIX) -> _Reject:
    return _Reject(
        500,
        f"the scoring function's Output for this message (value {index} of its "
        f"request) has {problem}; {fix}",
        log_level=logging.ERROR,
    )


def _encode_json(document: Any, result: Any, index: int) -> bytes:
    """Encode `document`, which contains the `index`-th result, for the writer.

    numpy scalars and arrays are encoded as JSON numbers and arrays. A result
    that cannot be encoded is a bug of the scoring function, so it gets a 500.
    """
    try:
        return exact_json.dumps(
            document, option=orjson.OPT_SERIALIZE_NUMPY, default=_array_to_list
        )
    except orjson.JSONEncodeError as exc:
        if "Recursion limit" in str(exc):
            # The same input gives the same result, so a retry cannot help.
            raise _Reject(
                422,
                "the scoring function's result for this message (value "
                f"{index} of its request) nests arrays and objects too deeply: "
                "the JSON encoder stops at 255 levels, counting the "
                "request to the writer around the result. The result was not "
                "written; return a flatter result, or InvalidRecord for such an "
                "input",
            ) from None
        raise _Reject(
            500,
            "the scoring function's result for this message (value "
            f"{index} of its request), of type {type(result).__name__}, cannot "
            f"be encoded as JSON ({exc}); return "
            "dicts, lists, strings, numbers, booleans, None or numpy values"
            f"{_rejection_hint(result, str(exc))}",
            log_level=logging.ERROR,
        ) from None


def _rejection_hint(result: Any, error: str = "") -> str:
    """Return how to reject a value or set a key, for a result that tries to.

    `error` is orjson's message about the result.
    """
    if error.endswith(": Output"):
        return (
            ". An Output inside a result sets nothing; return the Output itself "
            "as the result of its value"
        )
    if result is InvalidRecord:
        return (
            ". The result is the class InvalidRecord; to reject the value, "
            "return an instance, InvalidRecord(reason)"
        )
    if isinstance(result, BaseException):
        return (
            ". The result is an exception; to reject the value, return "
            "InvalidRecord(reason), or raise the exception for a temporary failure"
        )
    return ""


_NON_FINITE_ERROR = (
    "the scoring function returned NaN or Infinity for this message, which JSON "
    "cannot carry; the result was not written. Return a finite number, or "
    "InvalidRecord for an input that cannot be scored"
)


def has_non_finite(result: Any) -> bool:
    """Return whether a result contains a NaN or an infinity anywhere.

    orjson would encode them as ``null``, so the output record would lose the
    fact that the model failed. numpy scalars and arrays are checked too.
    """
    if type(result) is float:
        return not math.isfinite(result)
    if isinstance(result, dict):
        return any(has_non_finite(value) for value in result.values())
    if isinstance(result, list | tuple):
        return any(has_non_finite(value) for value in result)
    if isinstance(result, str | int | bool) or result is None:
        return False
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        # orjson encodes dataclasses itself, field by field.
        return any(
            has_non_finite(getattr(result, field.name))
            for field in dataclasses.fields(result)
        )
    kind = getattr(getattr(result, "dtype", None), "kind", "")
    numpy = sys.modules.get("numpy")
    if kind in ("f", "c") and numpy is not None:
        # A numpy float, complex or array of them.
        return not bool(numpy.isfinite(result).all())
    if kind == "O" and hasattr(result, "tolist"):
        return has_non_finite(result.tolist())
    if isinstance(result, float):
        return not math.isfinite(result)
    return False


def _array_to_list(value: Any) -> Any:
    """Convert numpy and pandas values that orjson does not encode itself.

    A non-contiguous array is copied to a contiguous one, which orjson encodes
    with the precision of its dtype, any other array-like becomes a list, and
    a timestamp its ISO 8601 text.
    """
    flags = getattr(value, "flags", None)
    if flags is not None and not getattr(flags, "c_contiguous", True):
        return value.copy(order="C")
    to_list = getattr(value, "tolist", None)
    if callable(to_list):
        return to_list()
    # pandas Timestamps, in the rows of a DataFrame, and dates of any kind.
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):
        return isoformat()
    raise TypeError


def _writer_element(item: dict[str, Any], result: Any) -> dict[str, Any]:
    """Return the writer batch element for the result of one batch item.

    The item's ``headers`` go on unchecked: the writer rejects invalid ones,
    and its 400 for that element alone comes back as a 422.
    """
    element = {
        "id": item.get("id"),
        "key": item.get("key"),
        "key_encoding": item.get("key_encoding"),
        "traceparent": child_traceparent(str(item.get("traceparent", ""))),
        "value": result,
    }
    if item.get("headers") is not None:
        element["headers"] = item["headers"]
    if item.get("header_encodings") is not None:
        element["header_encodings"] = item["header_encodings"]
    return element


def _oversized_error(size: int, max_body_bytes: int) -> str:
    return (
        f"the result is {size} bytes as a writer request, over "
        f"APP_WRITER_MAX_BODY_BYTES={max_body_bytes}; return a smaller result, or "
        "raise APP_WRITER_MAX_BODY_BYTES together with the writer's "
        "WRITER_MAX_BODY_BYTES"
    )


def _chunks(
    outputs: list[tuple[int, bytes]], max_body_bytes: int
) -> list[list[tuple[int, bytes]]]:
    """Split encoded batch elements into JSON arrays of at most `max_body_bytes`.

    Each element must fit alone, with the two brackets of its array.
    """
    chunks: list[list[tuple[int, bytes]]] = []
    chunk: list[tuple[int, bytes]] = []
    size = 2
    for index, output in outputs:
        added = len(output) + 1 if chunk else len(output)
        if chunk and size + added > max_body_bytes:
            chunks.append(chunk)
            chunk = []
            size = 2
            added = len(output)
        chunk.append((index, output))
        size += added
    if chunk:
        chunks.append(chunk)
    return chunks


async def _read_json_body(request: web.Request) -> bytes:
    """Return the body of a request, raising a 415 unless it is sent as JSON."""
    problem = content_type_problem(request)
    if problem:
        raise _Reject(415, problem)
    return await read_body(request)


def _decode(body: bytes) -> Any:
    """Decode a request body, with integers beyond 64 bits as exact Python ints.

    orjson would decode such an integer to a float, so a body that may contain
    one is decoded again with the standard library.
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson rejects an integer beyond the range of a double, which is
        # valid JSON, so the exact decoder gets a second look.
        if "infinity" not in str(exc):
            error = exact_json.decode_error(body, exc)
            raise _Reject(400, f"request body is not valid JSON: {error}") from None
        return _decode_exactly(body)
    if exact_json.may_contain_big_int(body):
        return _decode_exactly(body)
    return document


def _decode_exactly(body: bytes) -> Any:
    try:
        return exact_json.loads_exact(body)
    except ValueError as exc:
        # The exact decoder names the first problem in the document, where
        # orjson's error may be about a long integer that is valid JSON.
        raise _Reject(400, f"request body is not valid JSON: {exc}") from None


def _batch_items(document: Any) -> list[dict[str, Any]]:
    """Return the items of a ``POST /batch`` body, or raise `_Reject` for a bad item."""
    if not isinstance(document, list):
        raise _Reject(
            400,
            "POST /batch expects a JSON array of objects with a 'value' field, got "
            f'{json_type(document)}; send [{{"value": ...}}, ...], or POST a '
            "single value to /",
        )
    for index, item in enumerate(document):
        if isinstance(item, dict) and "value" in item:
            continue
        found = json_type(item)
        if isinstance(item, dict):
            fields = ", ".join(repr(field) for field in item)
            found += f" with the fields {fields:.100}" if fields else " without fields"
        raise _Reject(
            400,
            f"POST /batch item {index} must be an object with a 'value' field, "
            f"got {found}",
        )
    return document


def _error_text(body: str) -> str:
    """Return the ``error`` field of a JSON error body, else the start of the body."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return document["error"][:1000]
    return body[:300]


def _item_from_headers(headers: Any) -> dict[str, Any]:
    """Return the batch item that a ``POST /`` request's headers describe."""
    item: dict[str, Any] = {"traceparent": headers.get("traceparent", "")}
    for name, field in (
        ("X-Message-Id", "id"),
        ("X-Message-Key", "key"),
        ("X-Message-Key-Encoding", "key_encoding"),
    ):
        if name not in headers:
            continue
        if is_repeated(headers, name):
            raise _Reject(400, f"header {name} is sent more than once; send it once")
        try:
            headers[name].encode()
        except UnicodeEncodeError:
            # aiohttp decodes bytes that are not UTF-8 to lone surrogates, which
            # its client would not send on unchanged.
            fix = "send it as UTF-8 text"
            if field == "key":
                fix += (
                    " (a key that is not UTF-8 base64-encoded, with "
                    "X-Message-Key-Encoding: base64)"
                )
            raise _Reject(400, f"header {name} is not valid UTF-8; {fix}") from None
        item[field] = headers[name]
    problem = _key_problem(item)
    if problem:
        raise _Reject(400, f"header X-Message-Key{problem}")
    # aiohttp rejects every control character in a header value except the tab.
    problem = id_problem(item.get("id", ""))
    if problem:
        raise _Reject(400, f"header X-Message-Id {problem}")
    record_headers = _record_headers(headers)
    encodings = _header_encodings(headers, record_headers)
    spellings = _header_spellings(headers)
    nulls = _null_headers(headers, record_headers)
    # A batch element's headers of these names would become the id and trace
    # context at the writer, which a POST / to the writer never lets them do.
    record_headers = _without_reserved(record_headers)
    encodings = _without_reserved(encodings)
    nulls = _without_reserved(nulls)
    if record_headers or nulls:
        item["headers"] = {
            spellings.get(name, name): value for name, value in record_headers.items()
        }
        item["headers"].update(nulls)
    if encodings:
        item["header_encodings"] = {
            spellings.get(name, name): encoding for name, encoding in encodings.items()
        }
    return item


def _without_reserved(by_name: dict[str, ValueT]) -> dict[str, ValueT]:
    """Return `by_name` without the names in `_RESERVED_HEADERS`, in any case."""
    return {
        name: value
        for name, value in by_name.items()
        if name.lower() not in _RESERVED_HEADERS
    }


def _null_headers(headers: Any, record_headers: dict[str, str]) -> dict[str, None]:
    """Return None by the name of each record header that `NULL_RECORD_HEADERS` lists.

    A name must not also come as an ``X-Record-Header-<name>``, because a
    record header has one value.
    """
    listed = _name_list(headers, NULL_RECORD_HEADERS, "record header with a null value")
    if listed is None:
        return {}
    try:
        names = null_header_names(listed)
    except ValueError as exc:
        raise _Reject(400, str(exc)) from None
    for name in names:
        if name.lower() in record_headers:
            raise _Reject(
                400,
                f"header {NULL_RECORD_HEADERS} lists {name}, which the request "
                f"also sends as X-Record-Header-{name.lower()}; a record header "
                "has one value, so send it in one of the two",
            )
    return dict.fromkeys(names)


def _name_list(headers: Any, name: str, listed: str) -> str | None:
    """Return a request header that lists record header names, or None if absent.

    `listed` describes the names it lists, for the error of a repeated header.
    """
    if name not in headers:
        return None
    if is_repeated(headers, name):
        raise _Reject(
            400,
            f"header {name} is sent more than once; list every {listed} in one, "
            "separated by commas",
        )
    value = headers[name]
    if not is_utf8(value):
        raise _Reject(
            400,
            f"header {name} is not valid UTF-8; list record header names as UTF-8 text",
        )
    return value


def _header_spellings(headers: Any) -> dict[str, str]:
    """Return the record header names that `CASED_RECORD_HEADERS` lists, by lower case.

    The writer takes a batch element's header names as they are spelled, so
    the app restores the spelling of a ``POST /`` request's record headers.
    """
    listed = _name_list(
        headers,
        CASED_RECORD_HEADERS,
        "record header name that is not all lower case",
    )
    return {} if listed is None else header_spellings(listed)


def _header_encodings(headers: Any, record_headers: dict[str, str]) -> dict[str, str]:
    """Return ``base64`` by the name of each record header that the request lists.

    Each name listed must have its ``X-Record-Header-<name>`` with a base64
    value. The writer checks that too, but its 400 would come back as a 422
    about the writer, so the request to the app is rejected here instead.
    """
    listed = _name_list(headers, BASE64_RECORD_HEADERS, "base64-encoded record header")
    if listed is None:
        return {}
    names = listed_header_names(listed)
    for name in names:
        if name not in record_headers:
            raise _Reject(
                400,
                f"header {BASE64_RECORD_HEADERS} lists {name}, but no "
                f"X-Record-Header-{name} header has that name; list only the "
                "record headers sent base64-encoded",
            )
        try:
            base64.b64decode(record_headers[name], validate=True)
        except ValueError:
            raise _Reject(
                400,
                f"header X-Record-Header-{name} is listed as base64-encoded, but "
                f"{record_headers[name]!r:.60} is not valid base64; send the value "
                "base64-encoded, or do not list the header",
            ) from None
    return dict.fromkeys(names, "base64")


def _record_headers(headers: Any) -> dict[str, str]:
    """Return the ``X-Record-Header-<name>`` request headers by record header name.

    The writer takes them in the ``headers`` field of a batch element, an
    object with one value per name, so a name sent twice is rejected here.
    """
    record_headers: dict[str, str] = {}
    for name, value in headers.items():
        if not name.lower().startswith(_RECORD_HEADER_PREFIX):
            continue
        record_name = name[len(_RECORD_HEADER_PREFIX) :].lower()
        if not is_utf8(name) or not is_utf8(value):
            # Escaped, because a lone surrogate cannot go into a JSON error body.
            escaped_name = name.encode("utf-8", "surrogateescape").decode(
                "utf-8", "backslashreplace"
            )
            raise _Reject(
                400,
                f"header {escaped_name} is not valid UTF-8; send record header "
                "names and values as UTF-8 text",
            )
        if not record_name:
            raise _Reject(
                400,
                "header X-Record-Header- has no record header name after the "
                "prefix; send X-Record-Header-<name>, or leave it out",
            )
        if record_name in record_headers:
            raise _Reject(
                400,
                f"header X-Record-Header-{record_name} is sent more than once; a "
                "record has one value per header name, so send it once",
            )
        record_headers[record_name] = value
    return record_headers


def _message(item: dict[str, Any]) -> Message:
    """Return the `Message` of a checked batch item, decoding its key and headers.

    Raises:
        ValueError: the item's headers are not an object of text or null
            values, or a value listed as base64-encoded is not base64. The
            writer would reject such an item too.
    """
    key = item.get("key")
    if key is not None:
        base64_key = str(item.get("key_encoding") or "").lower() == "base64"
        key = base64.b64decode(key) if base64_key else key.encode()
    headers = item.get("headers") or {}
    encodings = item.get("header_encodings") or {}
    if not isinstance(headers, dict) or not isinstance(encodings, dict):
        raise ValueError(
            "the item's headers and header_encodings must be JSON objects; send "
            'them as {"name": "value"} and {"name": "base64"}'
        )
    # HTTP and the writer take header names in any case.
    base64_names = {
        str(name).lower()
        for name, encoding in encodings.items()
        if str(encoding).lower() == "base64"
    }
    decoded: dict[str, bytes | None] = {}
    for name, value in headers.items():
        if name.lower() in _RESERVED_HEADERS:
            # The writer makes these the record's id and trace context, not
            # headers, as the app does for a POST / request.
            continue
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"record header {name!r} is {json_type(value)}; send a string or null"
            )
        if value is None:
            decoded[name] = None
        elif name.lower() in base64_names:
            try:
                decoded[name] = base64.b64decode(value, validate=True)
            except ValueError:
                raise ValueError(
                    f"record header {name!r} is listed as base64-encoded, but its "
                    "value is not valid base64; send it base64-encoded, or do not "
                    "list it in header_encodings"
                ) from None
        else:
            decoded[name] = value.encode()
    return Message(
        id=item.get("id"),
        key=key,
        headers=decoded,
        traceparent=str(item.get("traceparent") or ""),
    )


def _item_problem(item: dict[str, Any]) -> InvalidRecord | None:
    """Return why the writer would reject a batch item, as `InvalidRecord`, or None.

    Its fields, key, id and traceparent are checked before scoring, so such an
    item fails alone with 400 and its value is not scored.
    """
    problem = unknown_field_problem(item)
    if not problem:
        key_problem = _key_problem(item)
        problem = f"the key{key_problem}" if key_problem else ""
        problem = problem or _id_problem(item) or _traceparent_problem(item)
    if not problem:
        return None
    logger.info(
        "batch item rejected", extra={"message_id": item.get("id"), "error": problem}
    )
    return InvalidRecord(problem)


def _id_problem(item: dict[str, Any]) -> str:
    """Return why an item's id is neither null nor a valid id string, or ''.

    The writer rejects such an id with a 400 about its own batch element, which
    would reach the client as a 422 about the writer.
    """
    message_id = item.get("id")
    if message_id is None:
        return ""
    if not isinstance(message_id, str):
        return (
            f"'id' must be a string or null, got {json_type(message_id)}; send "
            "the message id as a JSON string"
        )
    problem = id_problem(message_id)
    return f"'id' {problem}" if problem else ""


def _traceparent_problem(item: dict[str, Any]) -> str:
    """Return why an item's traceparent is neither a string nor null, or ''.

    The writer rejects such a trace context, as the app does here. A string
    that is not a valid traceparent starts a new trace instead.
    """
    parent = item.get("traceparent")
    if parent is None or isinstance(parent, str):
        return ""
    return (
        f"'traceparent' must be a string or null, got {json_type(parent)}; send "
        "the W3C traceparent header value, or leave it out to start a new trace"
    )


def _key_problem(item: dict[str, Any]) -> str:
    """Return why an item's key is not a string or null, or not of its encoding, or ''.

    The writer would reject such a key, and its 400 would come back as a 422
    about the writer, so the request to the app is rejected here instead.
    """
    key = item.get("key")
    if key is not None and not isinstance(key, str):
        return (
            f" must be a string or null, got {json_type(key)}; send the key as a "
            "JSON string, base64-encoded with 'key_encoding': 'base64' when it "
            "is not UTF-8 text"
        )
    encoding = item.get("key_encoding")
    if not encoding:
        return ""
    if not isinstance(encoding, str) or encoding.lower() != "base64":
        return (
            f" has the encoding {encoding!r:.40}; use base64, or send a UTF-8 key "
            "without an encoding"
        )
    if key is None:
        return ""
    try:
        base64.b64decode(key, validate=True)
    except ValueError:
        return f" {key!r:.60} is not valid base64; send the key base64-encoded"
    return ""
