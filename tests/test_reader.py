"""Tests of the input reader against an in-process model app on loopback.

The source and the dead-letter sink are in-memory fakes. The model app is a
real aiohttp server whose responses each test chooses, so the reader's HTTP
client, retries and batching run as in production.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime
import email.utils
import io
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fakes import MemorySink, MemorySource
from multidict import CIMultiDict
from prometheus_client import REGISTRY

from agogosml.app import AppSettings, ModelApp
from agogosml.config import Ordering, ReaderSettings
from agogosml.envelope import Envelope, header_safe_id, trace_id
from agogosml.reader import client as client_module
from agogosml.reader import engine, waits
from agogosml.reader import service as reader_service
from agogosml.reader.client import AppClient
from agogosml.reader.engine import InputReader, Transform
from agogosml.reader.service import serve_reader
from agogosml.reader.transform import result_problem
from agogosml.transports.file import FileSource

TOPIC = "input"
RUN_TIMEOUT_SECONDS = 5.0


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove READER_ variables, so only the arguments of a test apply."""
    for name in list(os.environ):
        if name.upper().startswith("READER_"):
            monkeypatch.delenv(name)


# ---------------------------------------------------------------------------
# Model app stub
# ---------------------------------------------------------------------------


@dataclass
class Received:
    """One request as the model app received it."""

    path: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def number(self) -> int:
        """The ``n`` field of a single message body."""
        return self.json()["n"]


Responder = Callable[[Received], Awaitable[web.Response]]


def status_response(status: int, error: str = "") -> web.Response:
    if status < 300:
        return web.json_response({"status": status}, status=status)
    return web.json_response({"error": error or f"failed with {status}"}, status=status)


async def accept(received: Received) -> web.Response:
    return status_response(200)


class StubApp:
    """A model app that records requests and responds through `respond`."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.url = ""
        self.requests: list[Received] = []
        self.accepted: list[Received] = []
        self.events: list[str] = []
        self.ready = True
        self.ready_headers: dict[str, str] = {}
        self.active = 0
        self.max_active = 0

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self._handle)
        app.router.add_post("/batch", self._handle)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        received = Received(
            request.path, CIMultiDict(request.headers), await request.read()
        )
        self.requests.append(received)
        self.events.append(f"POST {request.path}")
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            response = await self.respond(received)
        finally:
            self.active -= 1
        if response.status == 200:
            self.accepted.append(received)
        return response

    async def _readyz(self, request: web.Request) -> web.Response:
        status = 200 if self.ready else 503
        self.events.append(f"ready {status}")
        return web.Response(status=status, headers=self.ready_headers)

    def numbers(self) -> list[int]:
        """Return the ``n`` of every accepted single message, in order."""
        return [received.number for received in self.accepted]


def accept_after(release: asyncio.Event) -> Responder:
    """Return a responder that holds every request until `release` is set."""

    async def respond(received: Received) -> web.Response:
        await release.wait()
        return status_response(200)

    return respond


def hold_number(number: int, release: asyncio.Event) -> Responder:
    """Return a responder that holds the message ``{"n": number}`` until `release`."""

    async def respond(received: Received) -> web.Response:
        if received.number == number:
            await release.wait()
        return status_response(200)

    return respond


@contextlib.asynccontextmanager
async def stub_app(respond: Responder = accept) -> AsyncIterator[StubApp]:
    stub = StubApp(respond)
    server = TestServer(stub.build_app())
    await server.start_server()
    stub.url = str(server.make_url(""))
    try:
        yield stub
    finally:
        await server.close()


# ---------------------------------------------------------------------------
# Reader harness
# ---------------------------------------------------------------------------


def reader_settings(app_url: str, **overrides: Any) -> ReaderSettings:
    values: dict[str, Any] = {
        "input": TOPIC,
        "app_url": app_url,
        "app_ready_path": "",
        "retry_initial_backoff_ms": 1,
        "retry_max_backoff_ms": 5,
        "batch_max_wait_ms": 5,
        "request_timeout_ms": 2000,
        "shutdown_timeout_ms": 2000,
        "stop_at_end": True,
    }
    values.update(overrides)
    return ReaderSettings(**values)


@contextlib.asynccontextmanager
async def running_reader(
    settings: ReaderSettings,
    source: MemorySource,
    dead_letter: MemorySink,
    transform: Transform | None = None,
) -> AsyncIterator[tuple[InputReader, asyncio.Task[None]]]:
    """Run an InputReader in a task. On exit, stop it and wait for `run`."""
    client = AppClient(
        str(settings.app_url),
        token=settings.app_token.get_secret_value(),
        timeout_seconds=settings.request_timeout_ms / 1000,
    )
    await client.start()
    try:
        async with dead_letter, source:
            reader = InputReader(
                settings, source, client, dead_letter, transform=transform
            )
            task = asyncio.create_task(reader.run())
            try:
                yield reader, task
            finally:
                reader.request_stop()
                await asyncio.wait_for(task, RUN_TIMEOUT_SECONDS)
    finally:
        await client.stop()


async def run_reader(
    settings: ReaderSettings,
    source: MemorySource,
    dead_letter: MemorySink,
    transform: Transform | None = None,
) -> InputReader:
    """Run an InputReader until the source is read and every message finished."""
    async with running_reader(settings, source, dead_letter, transform) as (
        reader,
        task,
    ):
        await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)
    return reader


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll `condition` until it is true, failing after RUN_TIMEOUT_SECONDS."""
    async with asyncio.timeout(RUN_TIMEOUT_SECONDS):
        while not condition():
            await asyncio.sleep(0.002)


def fill(
    source: MemorySource, count: int, *, partition: int = 0, key: bytes | None = None
) -> None:
    """Add messages ``{"n": 0}`` to ``{"n": count - 1}`` to a partition."""
    for number in range(count):
        source.add(orjson.dumps({"n": number}), partition=partition, key=key)


def dead_letter_headers(envelope: Envelope) -> dict[str, str]:
    return {name: value.decode() for name, value in envelope.headers}


def retries_total() -> float:
    value = REGISTRY.get_sample_value(
        "agogosml_retries_total", {"service": "input_reader"}
    )
    return value or 0.0


def closed_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------
# Delivery
# ---------------------------------------------------------------------------


async def test_all_delivered_and_committed():
    source = MemorySource(TOPIC)
    fill(source, 5)
    dead_letter = MemorySink()

    async with stub_app() as app:
        reader = await run_reader(reader_settings(app.url), source, dead_letter)

    assert app.numbers() == [0, 1, 2, 3, 4]
    assert source.committed == {(TOPIC, 0): 5}
    assert dead_letter.envelopes == []
    assert reader.finished_count == 5
    assert reader.in_flight == 0


async def test_single_request_headers():
    source = MemorySource(TOPIC)
    source.add(b'{"n": 0}', key=b"card-1")
    source.add(b'{"n": 1}', key=b"\xff\xfe")
    source.add(b'{"n": 2}')
    dead_letter = MemorySink()

    async with stub_app() as app:
        settings = reader_settings(app.url, app_token="reader-secret")
        await run_reader(settings, source, dead_letter)

    first, second, third = app.requests
    assert first.path == "/"
    assert first.body == b'{"n": 0}'
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["X-Message-Id"] == f"{TOPIC}:0:0"
    assert first.headers["X-Message-Key"] == "card-1"
    assert "X-Message-Key-Encoding" not in first.headers
    assert trace_id(first.headers["traceparent"]) is not None
    assert first.headers["Authorization"] == "Bearer reader-secret"
    assert second.headers["X-Message-Key"] == base64.b64encode(b"\xff\xfe").decode()
    assert second.headers["X-Message-Key-Encoding"] == "base64"
    assert "X-Message-Key" not in third.headers


@pytest.mark.parametrize("batch_max_messages", [1, 2])
async def test_record_headers_sent_to_app(batch_max_messages):
    source = MemorySource(TOPIC)
    source.add(
        b'{"n": 0}',
        headers=[
            ("Source-System", b"pos-7"),
            ("binary", b"\xff"),
            ("message-id", b"m-1"),
            ("Tombstoned-By", None),
            ("empty", b""),
        ],
    )
    settings_values = {
        "batch_max_messages": batch_max_messages,
        "batch_max_wait_ms": 10,
    }

    async with stub_app() as app:
        settings = reader_settings(app.url, **settings_values)
        await run_reader(settings, source, MemorySink())

    (received,) = app.requests
    if batch_max_messages == 1:
        assert received.headers["X-Record-Header-Source-System"] == "pos-7"
        assert received.headers["X-Record-Header-binary"] == "/w=="
        assert received.headers["X-Base64-Record-Headers"] == "binary"
        assert received.headers["X-Null-Record-Headers"] == "Tombstoned-By"
        assert "X-Record-Header-Tombstoned-By" not in received.headers
        assert received.headers["X-Record-Header-empty"] == ""
        cased = received.headers["X-Cased-Record-Headers"]
        assert cased == "Source-System,Tombstoned-By"
        assert received.headers["X-Message-Id"] == "m-1"
    else:
        (item,) = received.json()
        assert item["headers"] == {
            "Source-System": "pos-7",
            "binary": "/w==",
            "Tombstoned-By": None,
            "empty": "",
        }
        assert item["header_encodings"] == {"binary": "base64"}
        assert item["id"] == "m-1"


async def test_non_token_header_name_batched_not_single():
    """A header name that an HTTP header line cannot carry travels only in batches."""
    single_source = MemorySource(TOPIC)
    single_source.add(b'{"n": 0}', headers=[("shop id", b"7")])
    single_source.add(b'{"n": 1}')
    dead_letter = MemorySink()
    batch_source = MemorySource(TOPIC)
    batch_source.add(b'{"n": 0}', headers=[("shop id", b"7")])

    async with stub_app() as app:
        await run_reader(reader_settings(app.url), single_source, dead_letter)
        batched = reader_settings(app.url, batch_max_messages=2)
        await run_reader(batched, batch_source, MemorySink())

    single, batch = app.requests
    assert single.body == b'{"n": 1}'
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.status"] == "431"
    assert "record header 'shop id' cannot travel" in context["dlq.error"]
    assert "READER_BATCH_MAX_MESSAGES" in context["dlq.error"]
    assert single_source.committed == {(TOPIC, 0): 2}
    (item,) = batch.json()
    assert item["headers"] == {"shop id": "7"}


async def test_oversized_record_header_dead_lettered():
    source = MemorySource(TOPIC)
    source.add(b'{"n": 0}', headers=[("note", b"x" * 9000)])
    source.add(b'{"n": 1}')
    dead_letter = MemorySink()

    async with stub_app() as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    assert [received.body for received in app.requests] == [b'{"n": 1}']
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.status"] == "431"
    assert "record header 'note' cannot travel in a header" in context["dlq.error"]
    assert source.committed == {(TOPIC, 0): 2}


@pytest.mark.parametrize("batch_max_messages", [1, 3])
async def test_tombstone_dead_lettered_unsent(batch_max_messages):
    source = MemorySource(TOPIC)
    source.add(b'{"n": 0}')
    source.add(None, key=b"card-1")
    source.add(b'{"n": 2}')
    dead_letter = MemorySink()

    async with stub_app() as app:
        settings = reader_settings(
            app.url, batch_max_messages=batch_max_messages, batch_max_wait_ms=10
        )
        await run_reader(settings, source, dead_letter)

    if batch_max_messages == 1:
        sent = [orjson.loads(request.body) for request in app.requests]
    else:
        sent = [item["value"] for item in app.requests[0].json()]
    assert sent == [{"n": 0}, {"n": 2}]
    (record,) = dead_letter.envelopes
    assert record.key == b"card-1"
    assert record.null_value
    context = dead_letter_headers(record)
    assert context["dlq.status"] == "400"
    assert context["dlq.attempts"] == "0"
    assert "value is null (a Kafka tombstone)" in context["dlq.error"]
    assert source.committed == {(TOPIC, 0): 3}


@pytest.mark.parametrize("batch_max_messages", [1, 3])
async def test_overlong_line_dead_lettered_unsent(tmp_path, batch_max_messages):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 0}\n{"n": 1, "pad": "' + b"x" * 40 + b'"}\n{"n": 2}\n')
    checkpoint = tmp_path / "in.offset"
    source = FileSource(str(path), checkpoint_path=checkpoint, max_line_bytes=20)
    dead_letter = MemorySink()
    transformed: list[bytes] = []

    def note(envelope: Envelope) -> Envelope:
        transformed.append(envelope.value)
        return envelope

    async with stub_app() as app:
        settings = reader_settings(
            app.url, input=str(path), batch_max_messages=batch_max_messages
        )
        await run_reader(settings, source, dead_letter, transform=note)

    if batch_max_messages == 1:
        sent = [orjson.loads(request.body) for request in app.requests]
    else:
        sent = [item["value"] for item in app.requests[0].json()]
    assert sent == [{"n": 0}, {"n": 2}]
    assert transformed == [b'{"n": 0}', b'{"n": 2}']
    (record,) = dead_letter.envelopes
    assert record.value == b""
    context = dead_letter_headers(record)
    assert context["dlq.source.offset"] == "9"
    assert context["dlq.attempts"] == "0"
    assert (
        "is 59 bytes long, more than READER_MAX_LINE_BYTES (20)"
        in (context["dlq.error"])
    )
    assert checkpoint.read_text().split(" ")[0] == str(path.stat().st_size)


async def test_500_twice_then_200_delivered():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()
    commits_seen: list[dict[tuple[str, int], int]] = []
    failures_left = 2

    async def fail_message_one(received: Received) -> web.Response:
        nonlocal failures_left
        if received.number == 1:
            commits_seen.append(dict(source.committed))
            if failures_left > 0:
                failures_left -= 1
                return status_response(500)
        return status_response(200)

    retries_before = retries_total()
    async with stub_app(fail_message_one) as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    assert [received.number for received in app.requests] == [0, 1, 1, 1, 2]
    assert app.numbers() == [0, 1, 2]
    assert retries_total() - retries_before == 2
    assert commits_seen == [{(TOPIC, 0): 1}] * 3


async def test_retried_batch_counts_each_message():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()
    failures_left = 1

    async def fail_first_batch(received: Received) -> web.Response:
        nonlocal failures_left
        if failures_left > 0:
            failures_left -= 1
            return status_response(500)
        return status_response(200)

    retries_before = retries_total()
    async with stub_app(fail_first_batch) as app:
        settings = reader_settings(
            app.url, batch_max_messages=3, batch_max_wait_ms=60_000
        )
        await run_reader(settings, source, dead_letter)

    assert len(app.requests) == 2
    assert retries_total() - retries_before == 3
    assert source.committed == {(TOPIC, 0): 3}
    assert dead_letter.envelopes == []


@pytest.mark.parametrize("status", [408, 429, 502, 503])
async def test_retriable_status_retried(status):
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()
    statuses = [status, 200]

    async def fail_once(received: Received) -> web.Response:
        return status_response(statuses.pop(0))

    async with stub_app(fail_once) as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    assert len(app.requests) == 2
    assert app.numbers() == [0]
    assert dead_letter.envelopes == []
    assert source.committed == {(TOPIC, 0): 1}


async def test_timeout_retried():
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()
    attempts = 0

    async def slow_first(received: Received) -> web.Response:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await asyncio.sleep(0.5)
        return status_response(200)

    async with stub_app(slow_first) as app:
        settings = reader_settings(app.url, request_timeout_ms=200)
        await run_reader(settings, source, dead_letter)

    assert len(app.requests) == 2
    assert dead_letter.envelopes == []
    assert source.committed == {(TOPIC, 0): 1}


def dead_letter_levels(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.levelname
        for record in caplog.records
        if record.getMessage() == "message dead-lettered"
    ]


def dead_letter_reasons(caplog: pytest.LogCaptureFixture) -> list[str | None]:
    return [
        getattr(record, "reason", None)
        for record in caplog.records
        if record.getMessage() == "message dead-lettered"
    ]


async def test_400_dead_lettered_rest_flows(caplog):
    caplog.set_level(logging.INFO, "agogosml.reader")
    source = MemorySource(TOPIC)
    fill(source, 3)
    source.add(b'{"n": 3}', key=b"card-9")
    dead_letter = MemorySink()

    async def reject_one(received: Received) -> web.Response:
        if received.number in (1, 3):
            return status_response(400, "field 'amount' is missing")
        return status_response(200)

    async with stub_app(reject_one) as app:
        reader = await run_reader(reader_settings(app.url), source, dead_letter)

    assert [received.number for received in app.requests] == [0, 1, 2, 3]
    assert app.numbers() == [0, 2]
    assert source.committed == {(TOPIC, 0): 4}
    assert reader.dead_lettered_count == 2
    record = dead_letter.envelopes[0]
    assert record.value == b'{"n":1}'
    assert record.id == f"{TOPIC}:0:1"
    context = dead_letter_headers(record)
    assert context["dlq.source.topic"] == TOPIC
    assert context["dlq.source.partition"] == "0"
    assert context["dlq.source.offset"] == "1"
    assert context["dlq.status"] == "400"
    assert "field 'amount' is missing" in context["dlq.error"]
    assert context["dlq.attempts"] == "1"
    assert dead_letter.envelopes[1].key == b"card-9"
    # Bad input, which the app rejected, is no failure of the pipeline.
    assert dead_letter_levels(caplog) == ["INFO", "INFO"]
    assert dead_letter_reasons(caplog) == ["rejected", "rejected"]
    # The trace id finds the message in a tracing backend.
    logged = [r for r in caplog.records if r.getMessage() == "message dead-lettered"]
    assert logged[0].trace_id == trace_id(dead_letter.envelopes[0].traceparent)
    assert logged[0].trace_id is not None


async def test_retries_exhausted_dead_lettered(caplog):
    caplog.set_level(logging.INFO, "agogosml.reader")
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()

    async def unavailable_for_zero(received: Received) -> web.Response:
        if received.number == 0:
            return status_response(503, "model is loading")
        return status_response(200)

    async with stub_app(unavailable_for_zero) as app:
        settings = reader_settings(app.url, retry_max_attempts=3)
        await run_reader(settings, source, dead_letter)

    assert [received.number for received in app.requests] == [0, 0, 0, 1]
    assert len(dead_letter.envelopes) == 1
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.status"] == "503"
    assert context["dlq.attempts"] == "3"
    assert "model is loading" in context["dlq.error"]
    assert source.committed == {(TOPIC, 0): 2}
    assert dead_letter_levels(caplog) == ["WARNING"]
    assert dead_letter_reasons(caplog) == ["retries_exhausted"]


async def test_oversized_response_not_read(monkeypatch):
    monkeypatch.setattr(client_module, "MAX_RESPONSE_BYTES", 1000)
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()

    async def huge_for_zero(received: Received) -> web.Response:
        if received.number == 0:
            return web.Response(body=b"x" * 200_000)
        return status_response(200)

    async with stub_app(huge_for_zero) as app:
        settings = reader_settings(app.url, retry_max_attempts=2)
        await run_reader(settings, source, dead_letter)

    assert [received.number for received in app.requests] == [0, 0, 1]
    (record,) = dead_letter.envelopes
    context = dead_letter_headers(record)
    assert context["dlq.status"] == "502"
    assert "app responded 200 with a body over 1000 bytes" in context["dlq.error"]
    assert source.committed == {(TOPIC, 0): 2}


async def test_unreachable_app_spends_no_attempts():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()
    port = closed_port()
    stub = StubApp(accept)
    settings = reader_settings(f"http://127.0.0.1:{port}", retry_max_attempts=2)

    retries_before = retries_total()

    async with running_reader(settings, source, dead_letter) as (reader, task):
        # Many more failed connections than attempts, as while an app restarts.
        await wait_for(lambda: retries_total() - retries_before >= 10)
        server = TestServer(stub.build_app(), port=port)
        await server.start_server()
        try:
            await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)
        finally:
            await server.close()

    assert dead_letter.envelopes == []
    assert stub.numbers() == [0, 1, 2]
    assert source.committed == {(TOPIC, 0): 3}


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_503_while_app_not_ready_spends_no_attempts(status: int):
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()

    async def writer_down(received: Received) -> web.Response:
        if len(app.requests) == 1:
            # The writer behind the app goes down: the app reports not ready,
            # and this request fails once the reader has seen that.
            app.ready = False
            await wait_for(lambda: "ready 503" in app.events)
        if len(app.requests) >= 6:
            app.ready = True
        if app.ready:
            return status_response(200)
        # 502 and 504 as a proxy in front of a restarting app responds.
        return status_response(status, "output writer is unreachable")

    async with stub_app(writer_down) as app:
        settings = reader_settings(
            app.url, app_ready_path="/readyz", retry_max_attempts=2
        )
        await run_reader(settings, source, dead_letter)

    assert dead_letter.envelopes == []
    assert len(app.requests) == 6
    assert app.numbers() == [0]
    assert source.committed == {(TOPIC, 0): 1}


async def test_message_that_stalls_app_spends_attempts():
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()

    async def stall_on_zero(received: Received) -> web.Response:
        if received.number != 0:
            return status_response(200)
        # The message blocks the app, whose readiness check then fails too.
        app.ready = False
        await wait_for(lambda: "ready 503" in app.events)
        await asyncio.sleep(1)
        return status_response(200)

    async with stub_app(stall_on_zero) as app:
        settings = reader_settings(
            app.url,
            app_ready_path="/readyz",
            retry_max_attempts=2,
            request_timeout_ms=200,
        )
        async with running_reader(settings, source, dead_letter) as (reader, task):
            await wait_for(lambda: len(dead_letter.envelopes) == 1)
            app.ready = True
            await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)

    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.attempts"] == "2"
    assert "timed out" in context["dlq.error"]
    assert app.numbers() == [1]
    assert source.committed == {(TOPIC, 0): 2}


async def test_dead_letter_failures_retried_before_commit():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()
    dead_letter.fail_next(2)
    commits_at_send: list[dict[tuple[str, int], int]] = []
    dead_letter.on_send = lambda: commits_at_send.append(dict(source.committed))

    async def reject_one(received: Received) -> web.Response:
        return status_response(400 if received.number == 1 else 200)

    async with stub_app(reject_one) as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    assert dead_letter.send_calls == 3
    assert commits_at_send == [{(TOPIC, 0): 1}] * 3
    assert [record.value for record in dead_letter.envelopes] == [b'{"n":1}']
    assert app.numbers() == [0, 2]
    assert source.committed == {(TOPIC, 0): 3}


async def test_dead_letter_failures_count_sink_errors():
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()
    dead_letter.fail_next(2)
    labels = {"service": "input_reader"}
    before = REGISTRY.get_sample_value("agogosml_sink_errors_total", labels) or 0

    async def reject(received: Received) -> web.Response:
        return status_response(400)

    async with stub_app(reject) as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    after = REGISTRY.get_sample_value("agogosml_sink_errors_total", labels)
    assert dead_letter.send_calls == 3
    assert after == before + 2


# ---------------------------------------------------------------------------
# Ordering and commits
# ---------------------------------------------------------------------------


async def test_out_of_order_commits_prefix():
    source = MemorySource(TOPIC)
    fill(source, 5)
    dead_letter = MemorySink()
    release = asyncio.Event()

    async with stub_app(hold_number(1, release)) as app:
        settings = reader_settings(app.url, ordering=Ordering.UNORDERED, concurrency=4)
        async with running_reader(settings, source, dead_letter) as (reader, task):
            await wait_for(lambda: len(source.acked) == 4)
            committed_while_held = dict(source.committed)
            acked_while_held = sorted(e.position.offset for e in source.acked)

            release.set()
            await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)

    assert sorted(app.numbers()[:4]) == [0, 2, 3, 4]
    assert acked_while_held == [0, 2, 3, 4]
    assert committed_while_held == {(TOPIC, 0): 1}
    assert source.committed == {(TOPIC, 0): 5}
    assert source.commits == [(TOPIC, 0, 1), (TOPIC, 0, 5)]


async def test_key_ordering_preserved():
    source = MemorySource(TOPIC)
    keys = [b"a", b"b", b"c", b"d", b"e"]
    for number in range(20):
        key = keys[number % len(keys)]
        source.add(orjson.dumps({"n": number, "key": key.decode()}), key=key)
    dead_letter = MemorySink()
    active = collections.Counter()
    overlapping: list[str] = []
    failed_once: list[int] = []

    async def vary_delay(received: Received) -> web.Response:
        key = received.headers["X-Message-Key"]
        active[key] += 1
        if active[key] > 1:
            overlapping.append(key)
        try:
            await asyncio.sleep((received.number * 7 % 5) / 1000)
            if received.number == 5 and not failed_once:
                failed_once.append(received.number)
                return status_response(500)
            return status_response(200)
        finally:
            active[key] -= 1

    async with stub_app(vary_delay) as app:
        settings = reader_settings(app.url, ordering=Ordering.KEY, concurrency=4)
        await run_reader(settings, source, dead_letter)

    by_key = collections.defaultdict(list)
    for received in app.accepted:
        by_key[received.json()["key"]].append(received.number)
    assert by_key["a"] == [0, 5, 10, 15]
    assert by_key["b"] == [1, 6, 11, 16]
    assert by_key["c"] == [2, 7, 12, 17]
    assert by_key["d"] == [3, 8, 13, 18]
    assert by_key["e"] == [4, 9, 14, 19]
    assert failed_once == [5]
    assert overlapping == []
    assert source.committed == {(TOPIC, 0): 20}


async def test_partition_ordering_preserved():
    source = MemorySource(TOPIC, partitions=2)
    fill(source, 5, partition=0)
    fill(source, 5, partition=1)
    dead_letter = MemorySink()
    partition_one_done = asyncio.Event()

    def partition(received: Received) -> str:
        return received.headers["X-Message-Id"].split(":")[1]

    async def hold_partition_zero(received: Received) -> web.Response:
        # Partition 0 waits for partition 1 to finish, which only works when
        # the partitions are sent independently.
        if partition(received) == "0" and received.number == 0:
            await partition_one_done.wait()
        if partition(received) == "1" and received.number == 4:
            partition_one_done.set()
        return status_response(200)

    async with stub_app(hold_partition_zero) as app:
        settings = reader_settings(app.url, ordering=Ordering.PARTITION)
        await run_reader(settings, source, dead_letter)

    by_partition = collections.defaultdict(list)
    for received in app.accepted:
        by_partition[partition(received)].append(received.number)
    assert by_partition["0"] == [0, 1, 2, 3, 4]
    assert by_partition["1"] == [0, 1, 2, 3, 4]
    assert source.committed == {(TOPIC, 0): 5, (TOPIC, 1): 5}


async def test_partial_batch_sent_at_end_of_input():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()

    async with stub_app() as app:
        settings = reader_settings(
            app.url, batch_max_messages=10, batch_max_wait_ms=60_000
        )
        began = time.monotonic()
        await run_reader(settings, source, dead_letter)

    assert time.monotonic() - began < 10
    assert len(app.accepted) == 1
    assert source.committed == {(TOPIC, 0): 3}


async def test_batch_split_at_max_bytes():
    source = MemorySource(TOPIC)
    for number in range(5):
        source.add(orjson.dumps({"n": number, "pad": "x" * 100}))
    source.add(orjson.dumps({"n": 5, "pad": "x" * 1000}))
    dead_letter = MemorySink()
    message_size = engine._request_size(
        Envelope(value=orjson.dumps({"n": 0, "pad": "x" * 100}), id=f"{TOPIC}:0:0")
    )

    async with stub_app() as app:
        settings = reader_settings(
            app.url,
            batch_max_messages=10,
            batch_max_bytes=2 * message_size,
            batch_max_wait_ms=60_000,
        )
        await run_reader(settings, source, dead_letter)

    # The last message is over the limit alone, so it goes in a batch of its own.
    batches = [
        [item["value"]["n"] for item in request.json()] for request in app.requests
    ]
    assert batches == [[0, 1], [2, 3], [4], [5]]
    assert source.committed == {(TOPIC, 0): 6}
    assert dead_letter.envelopes == []


def messages_out_total() -> float:
    value = REGISTRY.get_sample_value(
        "agogosml_messages_out_total", {"service": "input_reader"}
    )
    return value or 0.0


async def test_messages_out_counts_accepted_messages():
    source = MemorySource(TOPIC)
    fill(source, 5)
    dead_letter = MemorySink()

    async def reject_third(received: Received) -> web.Response:
        results = [
            {"status": 400 if item["value"]["n"] == 2 else 200}
            for item in received.json()
        ]
        return web.json_response({"results": results})

    before = messages_out_total()
    async with stub_app(reject_third) as app:
        settings = reader_settings(
            app.url, batch_max_messages=5, batch_max_wait_ms=60_000
        )
        await run_reader(settings, source, dead_letter)

    assert len(app.requests) == 1
    assert messages_out_total() - before == 4
    assert len(dead_letter.envelopes) == 1


async def test_unexpected_send_error_dead_letters_batch(monkeypatch):
    source = MemorySource(TOPIC)
    fill(source, 4)
    dead_letter = MemorySink()
    original_send = AppClient.send
    calls = 0

    async def fail_first_send(self, envelopes, *, batch):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("encoder exploded")
        return await original_send(self, envelopes, batch=batch)

    monkeypatch.setattr(AppClient, "send", fail_first_send)
    async with stub_app() as app:
        settings = reader_settings(
            app.url, batch_max_messages=2, batch_max_wait_ms=60_000
        )
        reader = await run_reader(settings, source, dead_letter)

    dead = [orjson.loads(record.value)["n"] for record in dead_letter.envelopes]
    headers = dead_letter_headers(dead_letter.envelopes[0])
    assert dead == [0, 1]
    assert headers["dlq.status"] == "0"
    assert headers["dlq.attempts"] == "0"
    assert "RuntimeError('encoder exploded')" in headers["dlq.error"]
    assert [item["value"]["n"] for item in app.requests[0].json()] == [2, 3]
    assert source.committed == {(TOPIC, 0): 4}
    assert reader.in_flight == 0


async def test_partial_batch_sent_on_stop_of_stdin():
    source = MemorySource(TOPIC)
    source.replayable = False
    fill(source, 3)
    dead_letter = MemorySink()

    async with stub_app() as app:
        settings = reader_settings(
            app.url,
            batch_max_messages=10,
            batch_max_wait_ms=60_000,
            stop_at_end=False,
            shutdown_timeout_ms=20_000,
        )
        async with running_reader(settings, source, dead_letter) as (reader, _):
            await wait_for(lambda: reader._in_flight == 3)
            began = time.monotonic()
            reader.request_stop()
            await wait_for(lambda: len(app.accepted) == 1)

    assert time.monotonic() - began < 10
    assert source.committed == {(TOPIC, 0): 3}


async def test_idle_partition_lanes_removed(monkeypatch):
    monkeypatch.setattr(engine, "PARTITION_LANES_KEPT", 2)
    source = MemorySource(TOPIC, partitions=6)
    for partition in range(6):
        fill(source, 3, partition=partition)
    dead_letter = MemorySink()

    async with stub_app() as app:
        settings = reader_settings(app.url, ordering=Ordering.PARTITION)
        reader = await run_reader(settings, source, dead_letter)

    assert len(app.accepted) == 18
    assert len(reader._lanes) <= 2
    assert source.committed == {(TOPIC, p): 3 for p in range(6)}


async def test_revoke_waits_for_partition():
    source = MemorySource(TOPIC, partitions=2)
    fill(source, 2, partition=0)
    fill(source, 1, partition=1)
    dead_letter = MemorySink()
    release = asyncio.Event()

    async def hold_partition_one(received: Received) -> web.Response:
        if received.headers["X-Message-Id"] == f"{TOPIC}:1:0":
            await release.wait()
        return status_response(200)

    async with stub_app(hold_partition_one) as app:
        settings = reader_settings(app.url)
        async with running_reader(settings, source, dead_letter):
            await wait_for(lambda: len(app.accepted) == 2 and len(app.requests) == 3)
            assert source.revoke_handler is not None
            await asyncio.wait_for(source.revoke_handler([(TOPIC, 0)]), 1)
            drain = asyncio.create_task(source.revoke_handler([(TOPIC, 1)]))
            await asyncio.sleep(0.05)
            drained_while_held = drain.done()

            release.set()
            await asyncio.wait_for(drain, 1)

    assert drained_while_held is False
    assert source.committed == {(TOPIC, 0): 2, (TOPIC, 1): 1}


async def test_revoked_partition_not_sent():
    source = MemorySource(TOPIC)
    fill(source, 5)
    dead_letter = MemorySink()
    release = asyncio.Event()

    async with stub_app(hold_number(0, release)) as app:
        settings = reader_settings(app.url)
        async with running_reader(settings, source, dead_letter) as (reader, _):
            await wait_for(lambda: len(app.requests) == 1 and reader.in_flight == 5)
            source.tracker.revoke(TOPIC, 0)
            release.set()
            await wait_for(lambda: reader.in_flight == 0)

    assert app.numbers() == [0]
    assert source.committed == {}


async def test_revoke_ends_batch_fill_wait():
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()

    async with stub_app(accept) as app:
        # The batch would wait a minute for more messages, which a revocation
        # does not let in: the fetch that serves it waits for the revocation.
        settings = reader_settings(
            app.url,
            stop_at_end=False,
            batch_max_messages=10,
            batch_max_wait_ms=60_000,
        )
        async with running_reader(settings, source, dead_letter) as (reader, _):
            await wait_for(
                lambda: (
                    reader.in_flight == 1
                    and all(lane.queue.empty() for lane in reader._lanes.values())
                )
            )
            assert source.revoke_handler is not None
            await asyncio.wait_for(source.revoke_handler([(TOPIC, 0)]), 1)
            in_flight_after_revoke = reader.in_flight

    assert in_flight_after_revoke == 0
    assert app.requests == []
    assert source.committed == {}


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


def batch_response(results: list[dict[str, Any]]) -> web.Response:
    return web.json_response({"results": results})


def batch_numbers(received: Received) -> list[int]:
    """Return the ``n`` of each value of a batch request, in order."""
    return [item["value"]["n"] for item in received.json()]


def fill_marked(source: MemorySource, count: int, marked: set[int]) -> None:
    """Add ``{"n": ...}`` values, with ``"bad": true`` in those numbered in `marked`."""
    for number in range(count):
        value: dict[str, Any] = {"n": number}
        if number in marked:
            value["bad"] = True
        source.add(orjson.dumps(value), key=f"key-{number % 3}".encode())


async def reject_marked_batch(received: Received) -> web.Response:
    """Respond 400 to a whole batch that contains a marked value."""
    if any(item["value"].get("bad") for item in received.json()):
        return status_response(400, "request body is not valid JSON: int too large")
    return status_response(200)


async def test_batch_per_item_400_dead_lettered():
    source = MemorySource(TOPIC)
    fill(source, 3, key=b"card-1")
    source.add(b'{"n": 3}')
    dead_letter = MemorySink()

    async def reject_item_one(received: Received) -> web.Response:
        results = []
        for item in received.json():
            if item["value"]["n"] == 1:
                results.append({"status": 400, "error": "n=1 is invalid"})
            else:
                results.append({"status": 200})
        return batch_response(results)

    async with stub_app(reject_item_one) as app:
        settings = reader_settings(app.url, batch_max_messages=3, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    assert [received.path for received in app.requests] == ["/batch", "/batch"]
    first_batch = app.requests[0].json()
    assert [item["id"] for item in first_batch] == [
        f"{TOPIC}:0:0",
        f"{TOPIC}:0:1",
        f"{TOPIC}:0:2",
    ]
    assert [item["value"] for item in first_batch] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert first_batch[0]["key"] == "card-1"
    assert trace_id(first_batch[0]["traceparent"]) is not None
    assert app.requests[1].json()[0]["key"] is None
    assert [record.value for record in dead_letter.envelopes] == [b'{"n":1}']
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.status"] == "400"
    assert context["dlq.error"] == "n=1 is invalid"
    assert context["dlq.source.offset"] == "1"
    assert source.committed == {(TOPIC, 0): 4}


async def test_batch_item_503_retries_only_item():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()
    failed_once: list[int] = []

    async def fail_item_one_once(received: Received) -> web.Response:
        results = []
        for item in received.json():
            if item["value"]["n"] == 1 and not failed_once:
                failed_once.append(1)
                results.append({"status": 503, "error": "busy"})
            else:
                results.append({"status": 200})
        return batch_response(results)

    async with stub_app(fail_item_one_once) as app:
        settings = reader_settings(app.url, batch_max_messages=3, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    sent = [[item["value"]["n"] for item in r.json()] for r in app.requests]
    assert sent == [[0, 1, 2], [1]]
    assert dead_letter.envelopes == []
    assert source.committed == {(TOPIC, 0): 3}


async def test_batch_retry_log_counts_each_status(caplog):
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()
    first: list[bool] = []

    async def fail_two_items_once(received: Received) -> web.Response:
        if first:
            return batch_response([{"status": 200}] * len(received.json()))
        first.append(True)
        return batch_response(
            [{"status": 503, "error": "busy"}, {"status": 200}, {"status": 500}]
        )

    with caplog.at_level(logging.WARNING, logger="agogosml.reader.engine"):
        async with stub_app(fail_two_items_once) as app:
            settings = reader_settings(
                app.url, batch_max_messages=3, batch_max_wait_ms=50
            )
            await run_reader(settings, source, dead_letter)

    (retry,) = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert retry.getMessage().startswith("app request failed; retrying 2 message(s)")
    assert retry.message_ids == [f"{TOPIC}:0:0", f"{TOPIC}:0:2"]
    assert retry.statuses == {"500": 1, "503": 1}
    assert retry.error == "busy"


async def test_batch_500_retries_whole_batch():
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()
    statuses = [500, 200]

    async def fail_first_batch(received: Received) -> web.Response:
        return status_response(statuses.pop(0))

    async with stub_app(fail_first_batch) as app:
        settings = reader_settings(app.url, batch_max_messages=2, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    sent = [[item["value"]["n"] for item in r.json()] for r in app.requests]
    assert sent == [[0, 1], [0, 1]]
    assert dead_letter.envelopes == []
    assert source.committed == {(TOPIC, 0): 2}


async def test_batch_array_of_scores_accepted():
    """A 2xx body that is the app's own results, not status objects, accepts all."""
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()

    async def scores(received: Received) -> web.Response:
        return web.json_response([{"score": 0.1}, {"score": 0.9}])

    async with stub_app(scores) as app:
        settings = reader_settings(app.url, batch_max_messages=2, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    assert len(app.requests) == 1
    assert dead_letter.envelopes == []
    assert source.committed == {(TOPIC, 0): 2}


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b'{"results": [{"status": 200}]}', "502", "1 results for a batch of 2"),
        (b'{"results": null}', "502", "invalid batch response"),
        (b'{"results": "all failed"}', "502", "invalid batch response"),
        # Results without the object around them still count per message.
        (b'[{"status": 500}, {"status": 500}]', "500", "app returned status 500"),
        # A status that equals 200 but is no integer is not an acceptance.
        (b'{"results": [{"status": 200.0}, {"status": 200.0}]}', "502", "integer"),
        (b'{"results": [{"status": true}, {"status": "200"}]}', "502", "integer"),
    ],
)
async def test_batch_malformed_results_not_accepted(
    body: bytes, status: str, error: str
):
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()

    async def malformed(received: Received) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async with stub_app(malformed) as app:
        settings = reader_settings(
            app.url, batch_max_messages=2, batch_max_wait_ms=50, retry_max_attempts=2
        )
        await run_reader(settings, source, dead_letter)

    assert len(app.requests) == 2
    assert len(dead_letter.envelopes) == 2
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.status"] == status
    assert error in context["dlq.error"]


async def reject_invalid_json(received: Received) -> web.Response:
    """Respond like a model app: 400 for a body that is not JSON, else 200."""
    try:
        # The standard library, because it accepts integers of any size.
        json.loads(received.body)
    except ValueError:
        return status_response(400, "request body is not valid JSON")
    return status_response(200)


async def test_batch_non_json_value_dead_lettered():
    source = MemorySource(TOPIC)
    source.add(b'{"n": 0}')
    source.add(b"not json")
    source.add(b'{"n": 2}')
    dead_letter = MemorySink()

    async with stub_app(reject_invalid_json) as app:
        settings = reader_settings(app.url, batch_max_messages=3, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    assert len(app.requests) == 1
    assert [item["value"] for item in app.requests[0].json()] == [{"n": 0}, {"n": 2}]
    assert [record.value for record in dead_letter.envelopes] == [b"not json"]
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.status"] == "400"
    assert "not valid JSON" in context["dlq.error"]
    assert context["dlq.attempts"] == "0"
    assert source.committed == {(TOPIC, 0): 3}


async def test_batch_value_beyond_double_named():
    source = MemorySource(TOPIC)
    source.add(b'{"amount": 1e400}')
    dead_letter = MemorySink()

    async with stub_app(reject_invalid_json) as app:
        settings = reader_settings(app.url, batch_max_messages=3, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    context = dead_letter_headers(dead_letter.envelopes[0])
    assert app.requests == []
    assert context["dlq.error"] == (
        "message value is not valid JSON: number 1e400 is beyond the range of a double"
    )


@pytest.mark.parametrize(
    "value",
    [b'1,"id":"forged-id","key":"forged-key"', b'1},{"value":2'],
    ids=["extra-fields", "extra-element"],
)
async def test_batch_value_cannot_change_other_fields(value):
    source = MemorySource(TOPIC)
    source.add(b'{"n": 0}')
    source.add(value)
    source.add(b'{"n": 2}')
    dead_letter = MemorySink()

    async with stub_app() as app:
        settings = reader_settings(app.url, batch_max_messages=3, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    items = app.requests[0].json()
    assert [item["value"] for item in items] == [{"n": 0}, {"n": 2}]
    assert [item["id"] for item in items] == [f"{TOPIC}:0:0", f"{TOPIC}:0:2"]
    assert [record.value for record in dead_letter.envelopes] == [value]


async def test_batch_rejecting_app_dead_letters_each():
    source = MemorySource(TOPIC)
    source.add(b'{"n": 0}')
    source.add(b'{"n": 1}')
    dead_letter = MemorySink()

    async def refuse(received: Received) -> web.Response:
        return status_response(400, "this app refuses every batch")

    async with stub_app(refuse) as app:
        settings = reader_settings(app.url, batch_max_messages=2, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    assert [batch_numbers(r) for r in app.requests] == [[0, 1], [0], [1]]
    assert len(dead_letter.envelopes) == 2
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert "this app refuses every batch" in context["dlq.error"]
    assert context["dlq.attempts"] == "1"
    assert source.committed == {(TOPIC, 0): 2}


async def test_batch_rejected_whole_split_in_halves():
    source = MemorySource(TOPIC)
    fill_marked(source, 10, marked={6})
    dead_letter = MemorySink()

    async with stub_app(reject_marked_batch) as app:
        settings = reader_settings(
            app.url, batch_max_messages=10, batch_max_wait_ms=50, retry_max_attempts=2
        )
        reader = await run_reader(settings, source, dead_letter)

    assert [batch_numbers(r) for r in app.requests] == [
        list(range(10)),
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [5, 6, 7],
        [5, 6],
        [5],
        [6],
        [7],
        [8, 9],
    ]
    accepted = [n for r in app.accepted for n in batch_numbers(r)]
    assert accepted == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert [record.value for record in dead_letter.envelopes] == [b'{"n":6,"bad":true}']
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.status"] == "400"
    assert "int too large" in context["dlq.error"]
    assert context["dlq.attempts"] == "1"
    assert context["dlq.source.offset"] == "6"
    assert reader.dead_lettered_count == 1
    assert source.committed == {(TOPIC, 0): 10}


async def test_batch_413_split_until_it_fits():
    source = MemorySource(TOPIC)
    for number in range(8):
        padding = "x" * (2000 if number == 5 else 100)
        source.add(orjson.dumps({"n": number, "padding": padding}))
    dead_letter = MemorySink()
    max_body_bytes = 1000

    async def limit_body(received: Received) -> web.Response:
        if len(received.body) > max_body_bytes:
            return status_response(413, "request body is over APP_MAX_BODY_BYTES")
        return status_response(200)

    async with stub_app(limit_body) as app:
        settings = reader_settings(app.url, batch_max_messages=8, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    accepted = [n for r in app.accepted for n in batch_numbers(r)]
    assert accepted == [0, 1, 2, 3, 4, 6, 7]
    assert all(len(r.body) <= max_body_bytes for r in app.accepted)
    assert len(dead_letter.envelopes) == 1
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.status"] == "413"
    assert context["dlq.source.offset"] == "5"
    assert source.committed == {(TOPIC, 0): 8}


async def test_batch_split_keeps_key_order():
    source = MemorySource(TOPIC)
    fill_marked(source, 24, marked={4, 11, 12})
    dead_letter = MemorySink()
    failed_once: list[int] = []

    async def reject_marked_fail_once(received: Received) -> web.Response:
        numbers = batch_numbers(received)
        clean = not any(item["value"].get("bad") for item in received.json())
        # The first clean half fails once with 500, so its retry must hold
        # back the rest of its lane.
        if len(numbers) == 2 and clean and not failed_once:
            failed_once.extend(numbers)
            return status_response(500)
        await asyncio.sleep(len(numbers) % 3 / 1000)
        return await reject_marked_batch(received)

    async with stub_app(reject_marked_fail_once) as app:
        settings = reader_settings(
            app.url,
            ordering=Ordering.KEY,
            concurrency=3,
            batch_max_messages=4,
            batch_max_wait_ms=50,
        )
        await run_reader(settings, source, dead_letter)

    by_key = collections.defaultdict(list)
    for received in app.accepted:
        for item in received.json():
            by_key[item["key"]].append(item["value"]["n"])
    assert by_key["key-0"] == [0, 3, 6, 9, 15, 18, 21]
    assert by_key["key-1"] == [1, 7, 10, 13, 16, 19, 22]
    assert by_key["key-2"] == [2, 5, 8, 14, 17, 20, 23]
    dead_numbers = sorted(orjson.loads(r.value)["n"] for r in dead_letter.envelopes)
    assert dead_numbers == [4, 11, 12]
    assert len(failed_once) == 2
    assert source.committed == {(TOPIC, 0): 24}


async def test_batch_split_counts_earlier_attempts():
    source = MemorySource(TOPIC)
    fill_marked(source, 4, marked={2})
    dead_letter = MemorySink()
    failures_left = 2

    async def fail_twice_then_reject(received: Received) -> web.Response:
        nonlocal failures_left
        if failures_left > 0:
            failures_left -= 1
            return status_response(500, "model is warming up")
        return await reject_marked_batch(received)

    async with stub_app(fail_twice_then_reject) as app:
        settings = reader_settings(
            app.url, batch_max_messages=4, batch_max_wait_ms=50, retry_max_attempts=3
        )
        await run_reader(settings, source, dead_letter)

    assert [batch_numbers(r) for r in app.requests] == [
        [0, 1, 2, 3],
        [0, 1, 2, 3],
        [0, 1, 2, 3],
        [0, 1],
        [2, 3],
        [2],
        [3],
    ]
    assert len(dead_letter.envelopes) == 1
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.source.offset"] == "2"
    assert context["dlq.status"] == "400"
    assert context["dlq.attempts"] == "3"
    assert source.committed == {(TOPIC, 0): 4}


async def test_batch_item_results_not_split():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()

    async def reject_every_item(received: Received) -> web.Response:
        return batch_response([{"status": 400, "error": "bad"}] * 3)

    async with stub_app(reject_every_item) as app:
        settings = reader_settings(app.url, batch_max_messages=3, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    assert len(app.requests) == 1
    assert len(dead_letter.envelopes) == 3
    assert source.committed == {(TOPIC, 0): 3}


@contextlib.asynccontextmanager
async def model_app_url(**app_settings: Any) -> AsyncIterator[tuple[str, list[Any]]]:
    """Serve a ModelApp that returns its inputs, and a writer that accepts all.

    Yields the app's URL and the list of values the writer received.
    """
    written: list[Any] = []

    async def write(request: web.Request) -> web.Response:
        document = orjson.loads(await request.read())
        if request.path == "/batch":
            written.extend(item["value"] for item in document)
            return web.json_response({"written": len(document)})
        written.append(document)
        return web.json_response({"written": 1})

    writer = web.Application()
    writer.router.add_post("/", write)
    writer.router.add_post("/batch", write)
    writer_server = TestServer(writer)
    await writer_server.start_server()
    settings = AppSettings(writer_url=str(writer_server.make_url("")), **app_settings)
    try:
        async with ModelApp(lambda values: values).running(settings) as app:
            app_server = TestServer(app)
            await app_server.start_server()
            try:
                yield str(app_server.make_url("")), written
            finally:
                await app_server.close()
    finally:
        await writer_server.close()


async def test_writer_restart_spends_no_attempts():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()
    written: list[Any] = []

    async def write(request: web.Request) -> web.Response:
        document = orjson.loads(await request.read())
        written.extend(item["value"] for item in document)
        return web.json_response({"written": len(document)})

    writer = web.Application()
    writer.router.add_post("/batch", write)
    port = closed_port()
    settings = AppSettings(writer_url=f"http://127.0.0.1:{port}")
    retries_before = retries_total()

    async with ModelApp(lambda values: values).running(settings) as app:
        app_server = TestServer(app)
        await app_server.start_server()
        reader = reader_settings(str(app_server.make_url("")), retry_max_attempts=2)
        try:
            async with running_reader(reader, source, dead_letter) as (_, task):
                # The app responds 503 while its writer is down, more often
                # than the reader has attempts.
                await wait_for(lambda: retries_total() - retries_before >= 3)
                writer_server = TestServer(writer, port=port)
                await writer_server.start_server()
                try:
                    await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)
                finally:
                    await writer_server.close()
        finally:
            await app_server.close()

    assert dead_letter.envelopes == []
    assert sorted(value["n"] for value in written) == [0, 1, 2]
    assert source.committed == {(TOPIC, 0): 3}


# ---------------------------------------------------------------------------
# Servers at READER_APP_URL that may not be model apps
# ---------------------------------------------------------------------------


async def respond_ok(received: Received) -> web.Response:
    return web.Response(text="OK")


def acceptance_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "as accepted" in r.getMessage()
    ]


async def test_batch_without_results_warned_once(caplog):
    source = MemorySource(TOPIC)
    fill(source, 10)
    dead_letter = MemorySink()

    async with stub_app(respond_ok) as app:
        settings = reader_settings(app.url, batch_max_messages=4, batch_max_wait_ms=50)
        reader = await run_reader(settings, source, dead_letter)

    (warning,) = acceptance_warnings(caplog)
    assert app.url.rstrip("/") in warning
    assert "responded 200 to a batch of 4 without a" in warning
    assert "counts every message of the batch as accepted" in warning
    assert len(app.requests) == 3
    assert reader.finished_count == 10
    assert dead_letter.envelopes == []
    assert source.committed == {(TOPIC, 0): 10}


async def test_model_app_batches_not_warned(caplog):
    source = MemorySource(TOPIC)
    fill(source, 4)
    dead_letter = MemorySink()

    async with model_app_url() as (url, written):
        settings = reader_settings(url, batch_max_messages=2, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    assert acceptance_warnings(caplog) == []
    assert len(written) == 4


async def test_single_non_json_response_warned_once(caplog):
    source = MemorySource(TOPIC)
    fill(source, 5)
    dead_letter = MemorySink()

    async with stub_app(respond_ok) as app:
        settings = reader_settings(app.url, app_ready_path="/readyz")
        reader = await run_reader(settings, source, dead_letter)

    (warning,) = acceptance_warnings(caplog)
    assert app.url.rstrip("/") in warning
    assert "body that is not JSON (b'OK')" in warning
    assert "Agogosml-Service" in warning
    assert reader.finished_count == 5
    assert source.committed == {(TOPIC, 0): 5}


@pytest.mark.parametrize(
    ("ready_path", "ready_headers", "respond"),
    [
        # The app names itself as a model app.
        ("/readyz", {"Agogosml-Service": "model_app"}, respond_ok),
        # A JSON response, as a model app gives.
        ("/readyz", {}, accept),
        # Without a readiness check nothing is known about the app.
        ("", {}, respond_ok),
    ],
)
async def test_single_response_not_warned(ready_path, ready_headers, respond, caplog):
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()

    async with stub_app(respond) as app:
        app.ready_headers = ready_headers
        settings = reader_settings(app.url, app_ready_path=ready_path)
        reader = await run_reader(settings, source, dead_letter)

    assert acceptance_warnings(caplog) == []
    assert reader.finished_count == 2


async def test_model_app_bad_integer_dead_lettered():
    source = MemorySource(TOPIC)
    digits = sys.get_int_max_str_digits() + 1
    for number in range(10):
        if number == 6:
            source.add(b'{"n": %s}' % (b"7" * digits))
        else:
            source.add(orjson.dumps({"n": number}))
    dead_letter = MemorySink()

    async with model_app_url() as (url, written):
        settings = reader_settings(url, batch_max_messages=10, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    assert [value["n"] for value in written] == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert len(dead_letter.envelopes) == 1
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.source.offset"] == "6"
    assert context["dlq.status"] == "400"
    assert f"an integer of {digits} digits" in context["dlq.error"]
    assert source.committed == {(TOPIC, 0): 10}


async def test_model_app_body_limit_delivered():
    source = MemorySource(TOPIC)
    for number in range(10):
        source.add(orjson.dumps({"n": number, "padding": "x" * 200}))
    dead_letter = MemorySink()

    async with model_app_url(max_body_bytes=1024) as (url, written):
        settings = reader_settings(url, batch_max_messages=10, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    assert [value["n"] for value in written] == list(range(10))
    assert dead_letter.envelopes == []
    assert source.committed == {(TOPIC, 0): 10}


async def test_batch_huge_integer_value_sent():
    source = MemorySource(TOPIC)
    huge = b'{"n": 1' + b"0" * 400 + b"}"
    source.add(huge)
    source.add(b"not json")
    dead_letter = MemorySink()

    async with stub_app(reject_invalid_json) as app:
        settings = reader_settings(app.url, batch_max_messages=2, batch_max_wait_ms=50)
        await run_reader(settings, source, dead_letter)

    assert huge in app.requests[-1].body
    assert [record.value for record in dead_letter.envelopes] == [b"not json"]


# ---------------------------------------------------------------------------
# Flow control and lifecycle
# ---------------------------------------------------------------------------


async def test_max_in_flight_pauses_source():
    source = MemorySource(TOPIC)
    fill(source, 6)
    dead_letter = MemorySink()
    release = asyncio.Event()

    async with stub_app(accept_after(release)) as app:
        settings = reader_settings(
            app.url, ordering=Ordering.UNORDERED, concurrency=4, max_in_flight=2
        )
        async with running_reader(settings, source, dead_letter) as (reader, task):
            await wait_for(lambda: len(app.requests) == 2 and source.paused)
            await asyncio.sleep(0.05)
            fetched_while_paused = source.fetched_count
            in_flight_while_paused = reader.in_flight
            requests_while_paused = len(app.requests)

            release.set()
            await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)

    assert fetched_while_paused == 2
    assert in_flight_while_paused == 2
    assert requests_while_paused == 2
    assert source.pause_count >= 1
    assert source.resume_count >= 1
    assert app.max_active == 2
    assert sorted(app.numbers()) == [0, 1, 2, 3, 4, 5]
    assert source.committed == {(TOPIC, 0): 6}


async def test_not_ready_app_gets_no_requests():
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()

    async with stub_app() as app:
        app.ready = False
        settings = reader_settings(app.url, app_ready_path="/readyz")
        async with running_reader(settings, source, dead_letter) as (reader, task):
            await wait_for(lambda: "ready 503" in app.events)
            await asyncio.sleep(0.05)
            fetched_while_not_ready = source.fetched_count
            reported_ready = reader.app_ready

            app.ready = True
            await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)

    assert fetched_while_not_ready == 0
    assert reported_ready is False
    assert source.pause_count >= 1
    assert app.events[:4] == ["ready 503", "ready 200", "POST /", "POST /"]
    assert source.committed == {(TOPIC, 0): 2}


async def test_request_stop_finishes_only_sent_requests():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()
    release = asyncio.Event()

    async with stub_app(accept_after(release)) as app:
        settings = reader_settings(app.url, stop_at_end=False)
        async with running_reader(settings, source, dead_letter) as (reader, task):
            await wait_for(lambda: len(app.requests) == 1)
            reader.request_stop()
            source.add(b'{"n": 3}')
            await asyncio.sleep(0.05)
            stopped_early = task.done()

            release.set()
            await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)

    assert stopped_early is False
    assert app.numbers() == [0]  # queued messages are not sent after the stop
    assert source.fetched_count == 3
    assert source.committed == {(TOPIC, 0): 1}  # so they are read again later
    assert reader.in_flight == 0


@pytest.mark.parametrize(
    ("ordering", "sent", "committed"),
    [(Ordering.KEY, [0, 1, 2], 3), (Ordering.PARTITION, [0], 1)],
)
async def test_stop_in_key_order_sends_queued(ordering, sent, committed):
    """A message queued behind its key while a later one finished is sent.

    Released, it would hold the commit back, and the finished later message
    would be read and delivered again after the restart. In partition order
    every queued message comes after the finished ones.
    """
    source = MemorySource(TOPIC)
    # Keys a and d land in different lanes of 2.
    for number, key in enumerate([b"a", b"a", b"d"]):
        source.add(orjson.dumps({"n": number}), key=key)
    dead_letter = MemorySink()
    release = asyncio.Event()

    async with stub_app(hold_number(0, release)) as app:
        settings = reader_settings(
            app.url, stop_at_end=False, ordering=ordering, concurrency=2
        )
        async with running_reader(settings, source, dead_letter) as (reader, task):
            await wait_for(
                lambda: len(app.requests) == (2 if ordering is Ordering.KEY else 1)
            )
            reader.request_stop()
            release.set()
            await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)

    assert sorted(app.numbers()) == sent
    assert source.committed == {(TOPIC, 0): committed}


async def test_stop_in_key_order_releases_when_app_unreachable():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()
    settings = reader_settings(
        f"http://127.0.0.1:{closed_port()}",
        stop_at_end=False,
        ordering=Ordering.KEY,
        shutdown_timeout_ms=20_000,
    )

    async with running_reader(settings, source, dead_letter) as (reader, task):
        await wait_for(lambda: reader.in_flight == 3)
        began = time.monotonic()
        reader.request_stop()
        await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)

    assert time.monotonic() - began < 10
    assert source.committed == {}
    assert dead_letter.envelopes == []


async def test_shutdown_timeout_leaves_uncommitted():
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()
    release = asyncio.Event()

    async with stub_app(accept_after(release)) as app:
        settings = reader_settings(app.url, stop_at_end=False, shutdown_timeout_ms=100)
        try:
            async with running_reader(settings, source, dead_letter) as (reader, _):
                await wait_for(lambda: len(app.requests) == 1)
        finally:
            release.set()

    assert reader.in_flight == 1
    assert source.committed == {}
    assert dead_letter.envelopes == []


class OnceSource(MemorySource):
    """A source that cannot be read again, as stdin: records added before the
    stop are what it has read, and `stop_reading` makes it return them all."""

    replayable = False

    def __init__(self, topic: str) -> None:
        super().__init__(topic)
        self.reading_stopped = False

    def stop_reading(self) -> None:
        self.reading_stopped = True


async def test_stop_sends_queued_of_unreplayable_source():
    source = OnceSource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()
    release = asyncio.Event()

    async with stub_app(accept_after(release)) as app:
        settings = reader_settings(app.url, stop_at_end=False)
        async with running_reader(settings, source, dead_letter) as (reader, task):
            await wait_for(lambda: len(app.requests) == 1)
            reader.request_stop()
            # Read but not yet fetched when the stop came, as stdin's buffer.
            source.add(b'{"n": 3}')
            await asyncio.sleep(0.05)
            release.set()
            await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)

    assert source.reading_stopped
    assert sorted(app.numbers()) == [0, 1, 2, 3]
    assert source.committed == {(TOPIC, 0): 4}
    assert reader.in_flight == 0


async def test_stop_before_end_of_stdin_warns(monkeypatch, caplog):
    read_end, write_end = os.pipe()
    os.write(write_end, b"".join(b'{"n": %d}\n' % number for number in range(100)))
    stdin = io.TextIOWrapper(os.fdopen(read_end, "rb"))
    monkeypatch.setattr(sys, "stdin", stdin)
    source = FileSource("-")
    settings = reader_settings(
        f"http://127.0.0.1:{closed_port()}",
        input="-",
        app_ready_path="/readyz",
        stop_at_end=False,
        shutdown_timeout_ms=100,
    )

    try:
        async with running_reader(settings, source, MemorySink()) as (reader, _):
            await wait_for(lambda: "waiting for the app" in caplog.text)
    finally:
        os.close(write_end)
        stdin.close()

    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "stopped before the end" in r.getMessage()
    ]
    assert warnings == [
        "the reader stopped before the end of its standard input, after it read "
        "0 lines and finished 0 of them (sent to the app or dead-lettered). The "
        "rest of the input was not read, and a stream cannot be read again, so "
        "it is up to the producer to send it again"
    ]
    assert reader.finished_count == 0


@pytest.mark.parametrize("source_class", [MemorySource, OnceSource])
async def test_stop_after_its_deadline_reports_nothing(source_class, caplog):
    source = source_class(TOPIC)
    settings = reader_settings(
        "http://127.0.0.1:1", shutdown_timeout_ms=50, stop_at_end=False
    )
    client = AppClient(str(settings.app_url), timeout_seconds=1)
    reader = InputReader(settings, source, client, MemorySink())
    reader.request_stop()
    await asyncio.sleep(0.1)  # the time of the stop runs out before run()

    with caplog.at_level(logging.WARNING):
        await reader.run()

    assert "still in flight" not in caplog.text


def test_stop_requested_outside_event_loop():
    source = MemorySource(TOPIC)
    settings = reader_settings("http://127.0.0.1:1", stop_at_end=False)
    client = AppClient(str(settings.app_url), timeout_seconds=1)
    reader = InputReader(settings, source, client, MemorySink())

    reader.request_stop()
    asyncio.run(asyncio.wait_for(reader.run(), RUN_TIMEOUT_SECONDS))

    assert reader.in_flight == 0


async def test_shutdown_timeout_reports_unreplayable_loss(caplog):
    source = OnceSource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()
    release = asyncio.Event()

    async with stub_app(accept_after(release)) as app:
        settings = reader_settings(app.url, stop_at_end=False, shutdown_timeout_ms=100)
        try:
            async with running_reader(settings, source, dead_letter) as (reader, _):
                await wait_for(lambda: len(app.requests) == 1)
        finally:
            release.set()

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert reader.in_flight == 2
    assert any("2 messages were still in flight" in text for text in errors)
    assert any("are lost" in text for text in errors)
    assert source.committed == {}


# ---------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------


async def test_transform_drop_finishes_message():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()

    def drop_one(envelope: Envelope) -> Envelope | None:
        return None if orjson.loads(envelope.value)["n"] == 1 else envelope

    async with stub_app() as app:
        reader = await run_reader(
            reader_settings(app.url), source, dead_letter, transform=drop_one
        )

    assert app.numbers() == [0, 2]
    assert dead_letter.envelopes == []
    assert reader.finished_count == 3
    assert source.committed == {(TOPIC, 0): 3}


async def test_transform_error_dead_lettered():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()

    def reject_one(envelope: Envelope) -> Envelope:
        if orjson.loads(envelope.value)["n"] == 1:
            raise ValueError("amount is negative")
        return envelope

    async with stub_app() as app:
        await run_reader(
            reader_settings(app.url), source, dead_letter, transform=reject_one
        )

    assert app.numbers() == [0, 2]
    assert [record.value for record in dead_letter.envelopes] == [b'{"n":1}']
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert "transform failed" in context["dlq.error"]
    assert "amount is negative" in context["dlq.error"]
    assert context["dlq.attempts"] == "0"
    assert context["dlq.source.offset"] == "1"
    assert source.committed == {(TOPIC, 0): 3}


class TransformAbort(BaseException):
    """An exception outside Exception, as some libraries define."""


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (SystemExit(3), "SystemExit(3)"),
        (KeyboardInterrupt(), "KeyboardInterrupt()"),
        (asyncio.CancelledError(), "CancelledError()"),
        (GeneratorExit(), "GeneratorExit()"),
        (TransformAbort(), "TransformAbort()"),
    ],
)
async def test_transform_exit_dead_lettered(error, text, caplog):
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()

    def exit_on_one(envelope: Envelope) -> Envelope:
        if orjson.loads(envelope.value)["n"] == 1:
            raise error
        return envelope

    async with stub_app() as app:
        reader = await run_reader(
            reader_settings(app.url), source, dead_letter, transform=exit_on_one
        )

    assert app.numbers() == [0, 2]
    (record,) = dead_letter.envelopes
    assert record.value == b'{"n":1}'
    assert dead_letter_headers(record)["dlq.error"] == f"transform failed: {text}"
    assert source.committed == {(TOPIC, 0): 3}
    assert reader.in_flight == 0
    assert dead_letter_levels(caplog) == ["WARNING"]
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "transform raised" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert type(error).__name__ in warnings[0].getMessage()
    assert warnings[0].message_id == f"{TOPIC}:0:1"


async def test_transform_cancelled_error_propagates_on_cancel():
    source = MemorySource(TOPIC)
    fill(source, 1)
    (envelope,) = await source.fetch(1, 0)
    settings = reader_settings("http://127.0.0.1:1")
    client = AppClient(str(settings.app_url), timeout_seconds=1)
    reader = InputReader(settings, source, client, MemorySink())

    def raise_cancelled(envelope: Envelope) -> Envelope:
        raise asyncio.CancelledError

    raised = []

    async def transform_while_cancelled() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # Takes effect at the next await.
        try:
            reader._apply_transform(raise_cancelled, envelope)
        except asyncio.CancelledError:
            raised.append(True)
            raise

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(transform_while_cancelled())

    assert raised == [True]
    assert reader.in_flight == 0


async def test_transform_changing_then_raising_dead_lettered():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()

    def break_one(envelope: Envelope) -> Envelope:
        if orjson.loads(envelope.value)["n"] == 1:
            envelope.value = b"changed"
            envelope.headers = None  # type: ignore[assignment]
            raise ValueError("half done")
        return envelope

    async with stub_app() as app:
        await run_reader(
            reader_settings(app.url), source, dead_letter, transform=break_one
        )

    assert app.numbers() == [0, 2]
    (record,) = dead_letter.envelopes
    assert record.value == b'{"n":1}'
    assert "half done" in dead_letter_headers(record)["dlq.error"]
    assert source.committed == {(TOPIC, 0): 3}


async def test_transform_changed_value_sent():
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()

    def double(envelope: Envelope) -> Envelope:
        number = orjson.loads(envelope.value)["n"]
        return replace(envelope, value=orjson.dumps({"n": number * 2}))

    async with stub_app() as app:
        await run_reader(
            reader_settings(app.url), source, dead_letter, transform=double
        )

    assert app.numbers() == [0, 2]
    assert app.requests[1].headers["X-Message-Id"] == f"{TOPIC}:0:1"
    assert source.committed == {(TOPIC, 0): 2}


async def test_transform_new_envelope_committed():
    # A transform may build a fresh Envelope; the reader must still commit the
    # position the original message was read from.
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()

    def rebuild(envelope: Envelope) -> Envelope:
        return Envelope(value=b'{"n": 7}', key=envelope.key)

    async with stub_app() as app:
        reader = await run_reader(
            reader_settings(app.url), source, dead_letter, transform=rebuild
        )

    assert app.numbers() == [7, 7]
    assert reader.in_flight == 0
    assert source.committed == {(TOPIC, 0): 2}
    await asyncio.wait_for(reader.drain_partitions([(TOPIC, 0)]), 1)


async def test_transform_shared_envelope_committed():
    # A transform may return the same Envelope object for several messages,
    # such as a constant. Each message must still commit its own position.
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()
    shared = Envelope(value=b'{"n": 7}')

    def constant(envelope: Envelope) -> Envelope:
        return shared

    async with stub_app() as app:
        reader = await run_reader(
            reader_settings(app.url), source, dead_letter, transform=constant
        )

    assert app.numbers() == [7, 7, 7]
    assert reader.in_flight == 0
    assert source.committed == {(TOPIC, 0): 3}


# ---------------------------------------------------------------------------
# Input the HTTP client cannot send as it is
# ---------------------------------------------------------------------------


async def test_key_with_line_break_sent_base64():
    source = MemorySource(TOPIC)
    source.add(b'{"n": 0}', key=b"line\nbreak")
    source.add(b'{"n": 1}', key=b"  padded  ")
    dead_letter = MemorySink()

    async with stub_app() as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    first, second = app.requests
    assert base64.b64decode(first.headers["X-Message-Key"]) == b"line\nbreak"
    assert first.headers["X-Message-Key-Encoding"] == "base64"
    assert base64.b64decode(second.headers["X-Message-Key"]) == b"  padded  "
    assert source.committed == {(TOPIC, 0): 2}
    assert dead_letter.envelopes == []


async def test_unsendable_message_dead_lettered_not_stalled(monkeypatch):
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()
    original = AppClient.send

    async def fail_on_one(self, envelopes, *, batch):
        if envelopes[0].value == b'{"n":1}':
            raise ValueError("cannot encode this message")
        return await original(self, envelopes, batch=batch)

    monkeypatch.setattr(AppClient, "send", fail_on_one)
    async with stub_app() as app:
        reader = await run_reader(reader_settings(app.url), source, dead_letter)

    assert app.numbers() == [0, 2]
    assert len(dead_letter.envelopes) == 1
    headers = dead_letter_headers(dead_letter.envelopes[0])
    assert "cannot encode this message" in headers["dlq.error"]
    assert source.committed == {(TOPIC, 0): 3}
    assert reader.in_flight == 0


async def test_transform_wrong_type_dead_lettered():
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()

    def to_dict(envelope: Envelope) -> Any:
        return {"value": envelope.value}

    async with stub_app() as app:
        reader = await run_reader(
            reader_settings(app.url), source, dead_letter, transform=to_dict
        )

    assert app.requests == []
    assert len(dead_letter.envelopes) == 2
    headers = dead_letter_headers(dead_letter.envelopes[0])
    assert "transform returned dict" in headers["dlq.error"]
    assert source.committed == {(TOPIC, 0): 2}
    assert reader.in_flight == 0


@pytest.mark.parametrize("batch_max_messages", [1, 4])
async def test_transform_non_text_id_dead_lettered(batch_max_messages):
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()

    def number_id(envelope: Envelope) -> Envelope:
        if envelope.value == b'{"n":1}':
            envelope.id = 12345  # type: ignore[assignment]
        return envelope

    async with stub_app() as app:
        settings = reader_settings(
            app.url, batch_max_messages=batch_max_messages, batch_max_wait_ms=10
        )
        reader = await run_reader(settings, source, dead_letter, transform=number_id)

    (record,) = dead_letter.envelopes
    assert (
        "transform set id to int, not str" in dead_letter_headers(record)["dlq.error"]
    )
    assert source.committed == {(TOPIC, 0): 3}
    assert reader.in_flight == 0


@pytest.mark.parametrize("field", ["id", "traceparent"])
@pytest.mark.parametrize("batch_max_messages", [1, 4])
async def test_transform_control_character_dead_lettered(
    field, batch_max_messages, caplog
):
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()

    def break_header(envelope: Envelope) -> Envelope:
        if envelope.value == b'{"n":1}':
            setattr(envelope, field, "bad\r\nid")
        return envelope

    async with stub_app() as app:
        settings = reader_settings(
            app.url, batch_max_messages=batch_max_messages, batch_max_wait_ms=10
        )
        reader = await run_reader(settings, source, dead_letter, transform=break_header)

    (record,) = dead_letter.envelopes
    headers = dead_letter_headers(record)
    assert headers["dlq.error"].startswith(
        f"transform set {field} to 'bad\\r\\nid', which contains a control character"
    )
    assert headers["dlq.status"] == "0"
    assert record.value == b'{"n":1}'
    assert source.committed == {(TOPIC, 0): 3}
    assert reader.in_flight == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("message_id", "rejected"),
    [
        ("tab\tinside", True),
        ("delete\x7f", True),
        ("nul\x00", True),
        ("naïve-ü", False),
        (header_safe_id(b"bad\r\nid"), False),
    ],
)
def test_transform_id_control_characters_checked(message_id, rejected):
    envelope = Envelope(value=b"{}", id=message_id)

    problem = result_problem(envelope)

    assert bool(problem) is rejected
    if rejected:
        assert repr(message_id) in problem


@pytest.mark.parametrize(
    ("header", "rejected"),
    [
        (("tag", b"x"), False),
        (("tag", None), False),
        (("tag", "text"), True),
        (("tag",), True),
    ],
)
def test_transform_header_types_checked(header, rejected):
    envelope = Envelope(value=b"{}", headers=[header])

    problem = result_problem(envelope)

    assert bool(problem) is rejected
    if rejected:
        assert "headers are (str, bytes) or (str, None)" in problem


def rejected_message_failing_dead_letter() -> tuple[MemorySource, MemorySink]:
    """Return a source of one message and a dead-letter sink that keeps failing."""
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()
    dead_letter.fail_next(1_000_000)
    return source, dead_letter


async def reject_invalid(received: Received) -> web.Response:
    return status_response(400, "invalid")


async def test_failing_dead_letter_sink_marks_not_ready():
    source, dead_letter = rejected_message_failing_dead_letter()

    async with stub_app(reject_invalid) as app:
        settings = reader_settings(app.url, retry_max_backoff_ms=1)
        async with running_reader(settings, source, dead_letter) as (reader, _):
            await wait_for(lambda: reader.dead_letter_failing)
            committed_while_failing = dict(source.committed)
            dead_letter.fail_next(0)
            await wait_for(lambda: not reader.dead_letter_failing)
            await wait_for(lambda: reader.in_flight == 0)

    assert committed_while_failing == {}
    assert len(dead_letter.envelopes) == 1
    assert source.committed == {(TOPIC, 0): 1}


async def test_dead_letter_retry_ends_when_partition_revoked():
    source, dead_letter = rejected_message_failing_dead_letter()

    async with stub_app(reject_invalid) as app:
        settings = reader_settings(app.url, retry_max_backoff_ms=1)
        async with running_reader(settings, source, dead_letter) as (reader, _):
            await wait_for(lambda: reader.dead_letter_failing)
            source.tracker.revoke(TOPIC, 0)
            await wait_for(lambda: reader.in_flight == 0)
            calls_after_release = dead_letter.send_calls
            await asyncio.sleep(0.05)

    assert dead_letter.envelopes == []
    assert dead_letter.send_calls == calls_after_release
    assert not reader.dead_letter_failing
    assert reader.dead_lettered_count == 0
    assert source.committed == {}


async def test_revocation_ends_dead_letter_retry():
    source, dead_letter = rejected_message_failing_dead_letter()

    async with stub_app(reject_invalid) as app:
        # A long backoff, so that only the revocation can end the wait.
        settings = reader_settings(
            app.url,
            stop_at_end=False,
            retry_initial_backoff_ms=10_000,
            retry_max_backoff_ms=10_000,
        )
        async with running_reader(settings, source, dead_letter) as (reader, _):
            await wait_for(lambda: reader.dead_letter_failing)
            assert source.revoke_handler is not None
            await asyncio.wait_for(source.revoke_handler([(TOPIC, 0)]), 1)
            in_flight_after_revoke = reader.in_flight
            failing_after_revoke = reader.dead_letter_failing

    assert in_flight_after_revoke == 0
    assert not failing_after_revoke
    assert dead_letter.send_calls == 1
    assert dead_letter.envelopes == []
    assert source.committed == {}


async def test_dead_letter_written_during_revocation():
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()
    answer = asyncio.Event()

    async def reject_later(received: Received) -> web.Response:
        await answer.wait()
        return status_response(400, "invalid")

    async with stub_app(reject_later) as app:
        settings = reader_settings(app.url, stop_at_end=False)
        async with running_reader(settings, source, dead_letter) as (reader, _):
            await wait_for(lambda: len(app.requests) == 1)
            assert source.revoke_handler is not None
            revocation = asyncio.ensure_future(source.revoke_handler([(TOPIC, 0)]))
            await asyncio.sleep(0.05)
            answer.set()
            await asyncio.wait_for(revocation, 5)
            in_flight_after_revoke = reader.in_flight

    # The rejected message's dead letter is written once, by this reader, and
    # the revocation commits past it.
    assert in_flight_after_revoke == 0
    assert len(dead_letter.envelopes) == 1
    assert source.committed == {(TOPIC, 0): 1}


@pytest.mark.parametrize("status", [True, 100, 600, -1, "200"])
async def test_invalid_batch_status_not_accepted(status):
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()

    async def odd_status(received: Received) -> web.Response:
        return web.json_response({"results": [{"status": status}]})

    async with stub_app(odd_status) as app:
        settings = reader_settings(app.url, batch_max_messages=10, retry_max_attempts=2)
        await run_reader(settings, source, dead_letter)

    assert len(dead_letter.envelopes) == 1
    headers = dead_letter_headers(dead_letter.envelopes[0])
    assert headers["dlq.status"] == "502"
    assert "between 200 and 599" in headers["dlq.error"]


@pytest.mark.parametrize("status", [301, 300, 304, 306])
async def test_redirect_not_followed_nor_dead_lettered(caplog, status):
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()
    redirects_left = 3

    async def redirect(received: Received) -> web.Response:
        nonlocal redirects_left
        if received.path == "/elsewhere":
            return status_response(200)
        if redirects_left > 0:
            redirects_left -= 1
            return web.Response(status=status, headers={"Location": "/elsewhere"})
        return status_response(200)

    async with stub_app(redirect) as app:
        settings = reader_settings(app.url, retry_max_attempts=2)
        async with running_reader(settings, source, dead_letter) as (reader, task):
            await wait_for(lambda: reader.setup_error)
            await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)

    assert [request.path for request in app.requests] == ["/"] * 4
    assert dead_letter.envelopes == []
    assert source.committed == {(TOPIC, 0): 1}
    assert f"the app responded {status} to POST" in caplog.text
    assert "READER_APP_URL" in caplog.text


async def test_transform_bad_key_type_dead_lettered():
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()

    def text_key(envelope: Envelope) -> Envelope:
        return replace(envelope, key="text")  # type: ignore[arg-type]

    async with stub_app() as app:
        settings = reader_settings(app.url, ordering=Ordering.KEY)
        reader = await run_reader(settings, source, dead_letter, transform=text_key)

    assert app.requests == []
    headers = dead_letter_headers(dead_letter.envelopes[0])
    assert "key to str" in headers["dlq.error"]
    assert source.committed == {(TOPIC, 0): 2}
    assert reader.in_flight == 0


async def test_transform_moving_position_keeps_commit():
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()

    def move(envelope: Envelope) -> Envelope:
        envelope.position = None
        return envelope

    async with stub_app() as app:
        reader = await run_reader(
            reader_settings(app.url), source, dead_letter, transform=move
        )

    assert app.numbers() == [0, 1, 2]
    assert source.committed == {(TOPIC, 0): 3}
    assert reader.in_flight == 0


async def test_permanent_dead_letter_error_drops_value():
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()
    dead_letter.fail_next(1, retriable=False, too_large=True)

    async def reject(received: Received) -> web.Response:
        return status_response(400, "invalid")

    async with stub_app(reject) as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    (record,) = dead_letter.envelopes
    headers = dead_letter_headers(record)
    assert record.value == b""
    assert "fail_next" in headers["dlq.value_dropped"]
    assert headers["dlq.source.offset"] == "0"
    assert source.committed == {(TOPIC, 0): 1}


async def test_dead_letter_too_large_at_minimum_named(
    caplog: pytest.LogCaptureFixture,
):
    source = MemorySource(TOPIC)
    source.add(b'{"n": 0}', key=b"k", headers=[("tenant", b"t1")])
    dead_letter = MemorySink()
    # Value, key and headers, and then all but the source position, are
    # dropped one step at a time; the smallest record fails twice more.
    dead_letter.fail_next(5, retriable=False, too_large=True)

    async def reject(received: Received) -> web.Response:
        return status_response(400, "invalid " * 50)

    async with stub_app(reject) as app:
        settings = reader_settings(app.url, retry_max_backoff_ms=1)
        await run_reader(settings, source, dead_letter)

    (record,) = dead_letter.envelopes
    headers = dead_letter_headers(record)
    assert record.value == b""
    assert record.key is None
    assert set(headers) == {
        "dlq.source.topic",
        "dlq.source.partition",
        "dlq.source.offset",
        "dlq.status",
        "dlq.error",
        "dlq.attempts",
        "dlq.value_dropped",
        "dlq.key_and_headers_dropped",
    }
    # The markers stay without their reasons, so that a dropped value can
    # still be distinguished from an empty one.
    assert headers["dlq.value_dropped"] == ""
    assert headers["dlq.key_and_headers_dropped"] == ""
    assert len(headers["dlq.error"]) == 100
    assert headers["dlq.source.offset"] == "0"
    warnings = [r for r in caplog.records if "writing it again" in r.getMessage()]
    errors = [
        r for r in caplog.records if "even with only its source" in r.getMessage()
    ]
    assert len(warnings) == 3
    assert len(errors) == 1
    assert "max.message.bytes" in errors[0].getMessage()
    assert source.committed == {(TOPIC, 0): 1}


@pytest.mark.parametrize(("rejections", "written_value"), [(2, b'{"n":0}'), (3, b"")])
async def test_size_rejected_dead_letter_shrinks_after_three(
    rejections: int, written_value: bytes
):
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()
    dead_letter.fail_next(rejections, size_rejected=True)

    async def reject(received: Received) -> web.Response:
        return status_response(400, "invalid")

    async with stub_app(reject) as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    (record,) = dead_letter.envelopes
    dropped = dead_letter_headers(record).get("dlq.value_dropped", "")
    assert record.value == written_value
    assert ("fail_next" in dropped) is (rejections == 3)
    assert dead_letter.send_calls == rejections + 1
    assert source.committed == {(TOPIC, 0): 1}


async def test_permanent_dead_letter_error_keeps_value():
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()
    # Say a missing permission: an operator fixes it, and the record is whole.
    dead_letter.fail_next(2, retriable=False)

    async def reject(received: Received) -> web.Response:
        return status_response(400, "invalid")

    async with stub_app(reject) as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    (record,) = dead_letter.envelopes
    assert record.value == b'{"n":0}'
    assert "dlq.value_dropped" not in dead_letter_headers(record)
    assert dead_letter.send_calls == 3
    assert source.committed == {(TOPIC, 0): 1}


async def test_permanent_dead_letter_error_drops_key_next():
    source = MemorySource(TOPIC)
    source.add(b'{"n": 0}', key=b"card-1", headers=[("region", b"eu")])
    dead_letter = MemorySink()
    dead_letter.fail_next(2, retriable=False, too_large=True)

    async def reject(received: Received) -> web.Response:
        return status_response(400, "invalid")

    async with stub_app(reject) as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    (record,) = dead_letter.envelopes
    headers = dead_letter_headers(record)
    assert record.value == b""
    assert record.key is None
    assert "region" not in headers
    assert "fail_next" in headers["dlq.value_dropped"]
    assert "fail_next" in headers["dlq.key_and_headers_dropped"]
    assert headers["dlq.source.offset"] == "0"
    assert headers["dlq.status"] == "400"
    assert source.committed == {(TOPIC, 0): 1}


async def test_unauthorised_app_not_dead_lettered():
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()
    rejections_left = 5

    async def reject_credentials(received: Received) -> web.Response:
        nonlocal rejections_left
        if rejections_left > 0:
            rejections_left -= 1
            return status_response(401, "missing bearer token")
        return status_response(200)

    async with stub_app(reject_credentials) as app:
        settings = reader_settings(app.url, retry_max_attempts=2)
        async with running_reader(settings, source, dead_letter) as (reader, task):
            await wait_for(lambda: reader.setup_error)
            await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)

    assert dead_letter.envelopes == []
    assert app.numbers() == [0, 1]
    assert reader.setup_error is False
    assert source.committed == {(TOPIC, 0): 2}


# ---------------------------------------------------------------------------
# Retry-After
# ---------------------------------------------------------------------------


def retry_after_response(status: int, retry_after: str) -> web.Response:
    return web.json_response(
        {"error": "slow down"}, status=status, headers={"Retry-After": retry_after}
    )


@pytest.mark.parametrize("form", ["delay-seconds", "http-date"])
async def test_retry_after_waited_for(form):
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()
    request_times: list[float] = []

    async def throttle_once(received: Received) -> web.Response:
        request_times.append(time.monotonic())
        if len(request_times) > 1:
            return status_response(200)
        if form == "delay-seconds":
            return retry_after_response(429, "1")
        # HTTP dates have whole seconds, so this requests a wait of 1 to 2 s.
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=2)
        return retry_after_response(429, email.utils.format_datetime(later, True))

    async with stub_app(throttle_once) as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    assert app.numbers() == [0]
    assert request_times[1] - request_times[0] >= 0.95
    assert dead_letter.envelopes == []


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_spends_no_attempts(status):
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()
    throttled_left = 5

    async def throttle(received: Received) -> web.Response:
        nonlocal throttled_left
        if throttled_left > 0:
            throttled_left -= 1
            return retry_after_response(status, "0")
        return status_response(200)

    async with stub_app(throttle) as app:
        settings = reader_settings(app.url, retry_max_attempts=2)
        await run_reader(settings, source, dead_letter)

    assert len(app.requests) == 7
    assert app.numbers() == [0, 1]
    assert dead_letter.envelopes == []
    assert source.committed == {(TOPIC, 0): 2}


def throttle_until(release: asyncio.Event) -> Responder:
    """Return a responder of 503 with Retry-After: 0 until `release` is set."""

    async def respond(received: Received) -> web.Response:
        if release.is_set():
            return status_response(200)
        return retry_after_response(503, "0")

    return respond


def wait_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "with Retry-After" in r.getMessage()]


def recovery_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "responds again" in r.getMessage()]


async def test_retry_after_logged_once_for_all_lanes(caplog):
    source = MemorySource(TOPIC)
    fill(source, 50)
    dead_letter = MemorySink()
    release = asyncio.Event()

    async with stub_app(throttle_until(release)) as app:
        settings = reader_settings(app.url, ordering=Ordering.UNORDERED, concurrency=50)
        with caplog.at_level(logging.INFO):
            async with running_reader(settings, source, dead_letter) as (_, task):
                # Every lane waits, most of them several times.
                await wait_for(lambda: len(app.requests) >= 200)
                release.set()
                await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)

    (line,) = wait_lines(caplog)
    assert line.levelno == logging.WARNING
    assert "1 request(s) with 1 message(s) wait" in line.getMessage()
    assert line.waiting_requests == 1
    (recovery,) = recovery_lines(caplog)
    assert recovery.waits >= 199
    assert dead_letter.envelopes == []
    assert source.committed == {(TOPIC, 0): 50}


async def test_wait_log_repeats_with_counts(monkeypatch, caplog):
    monkeypatch.setattr(waits, "WAIT_LOG_INTERVAL_SECONDS", 0.05)
    source = MemorySource(TOPIC)
    fill(source, 5)
    dead_letter = MemorySink()
    release = asyncio.Event()

    async with stub_app(throttle_until(release)) as app:
        settings = reader_settings(app.url, ordering=Ordering.UNORDERED, concurrency=5)
        with caplog.at_level(logging.INFO):
            async with running_reader(settings, source, dead_letter) as (_, task):
                await wait_for(lambda: len(wait_lines(caplog)) >= 3)
                release.set()
                await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)

    lines = wait_lines(caplog)
    first = lines[0]
    last = lines[-1]
    assert "1 request(s) with 1 message(s) wait" in first.getMessage()
    assert "5 request(s) with 5 message(s) wait" in last.getMessage()
    assert last.waits > 1
    assert len(recovery_lines(caplog)) == 1
    assert source.committed == {(TOPIC, 0): 5}


async def test_429_without_retry_after_spends_attempts():
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()

    async def throttle(received: Received) -> web.Response:
        return status_response(429, "slow down")

    async with stub_app(throttle) as app:
        settings = reader_settings(app.url, retry_max_attempts=3)
        await run_reader(settings, source, dead_letter)

    assert len(app.requests) == 3
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.status"] == "429"
    assert context["dlq.attempts"] == "3"


async def test_revoke_skips_wait_of_other_partition():
    source = MemorySource(TOPIC, partitions=2)
    fill(source, 1, partition=0)
    fill(source, 1, partition=1)
    dead_letter = MemorySink()

    async def throttle_partition_zero(received: Received) -> web.Response:
        if received.headers["X-Message-Id"].startswith(f"{TOPIC}:0:"):
            return retry_after_response(429, "3600")
        return status_response(200)

    async with stub_app(throttle_partition_zero) as app:
        # One lane for both keys: partition 1's message waits behind 0's.
        settings = reader_settings(
            app.url, stop_at_end=False, ordering=Ordering.KEY, concurrency=1
        )
        async with running_reader(settings, source, dead_letter) as (reader, _):
            await wait_for(lambda: len(app.requests) == 1 and reader.in_flight == 2)
            assert source.revoke_handler is not None
            await asyncio.wait_for(source.revoke_handler([(TOPIC, 1)]), 5)
            in_flight = reader.in_flight

    assert [r.headers["X-Message-Id"] for r in app.requests] == [f"{TOPIC}:0:0"]
    assert in_flight == 1
    assert source.committed == {}


async def test_stop_ends_retry_after_wait():
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()

    async def throttle(received: Received) -> web.Response:
        return retry_after_response(503, "3600")

    async with stub_app(throttle) as app:
        settings = reader_settings(
            app.url, stop_at_end=False, shutdown_timeout_ms=30000
        )
        async with running_reader(settings, source, dead_letter) as (reader, task):
            await wait_for(lambda: len(app.requests) == 1)
            await asyncio.sleep(0.05)
            stop_requested = time.monotonic()
            reader.request_stop()
            await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)
            stop_seconds = time.monotonic() - stop_requested

    assert stop_seconds < 1.0
    assert len(app.requests) == 1
    assert reader.in_flight == 0
    assert dead_letter.envelopes == []
    assert source.committed == {}


async def test_revoke_ends_retry_after_wait():
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()

    async def throttle(received: Received) -> web.Response:
        return retry_after_response(429, "3600")

    async with stub_app(throttle) as app:
        settings = reader_settings(app.url, stop_at_end=False)
        async with running_reader(settings, source, dead_letter) as (reader, _):
            await wait_for(lambda: len(app.requests) == 1)
            await asyncio.sleep(0.05)
            assert source.revoke_handler is not None
            await asyncio.wait_for(source.revoke_handler([(TOPIC, 0)]), 1)
            in_flight_after_revoke = reader.in_flight

    assert in_flight_after_revoke == 0
    assert len(app.requests) == 1
    assert dead_letter.envelopes == []
    assert source.committed == {}


async def test_batch_retry_after_waited_for():
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()
    request_times: list[float] = []

    async def throttle_once(received: Received) -> web.Response:
        request_times.append(time.monotonic())
        if len(request_times) == 1:
            return retry_after_response(429, "1")
        return status_response(200)

    async with stub_app(throttle_once) as app:
        settings = reader_settings(
            app.url, batch_max_messages=2, batch_max_wait_ms=50, retry_max_attempts=1
        )
        await run_reader(settings, source, dead_letter)

    assert [batch_numbers(r) for r in app.requests] == [[0, 1], [0, 1]]
    assert request_times[1] - request_times[0] >= 0.95
    assert dead_letter.envelopes == []


# ---------------------------------------------------------------------------
# Set-up errors
# ---------------------------------------------------------------------------


def setup_error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "agogosml.reader.engine" and record.levelno == logging.ERROR
    ]


@pytest.mark.parametrize("status", [404, 405])
async def test_wrong_app_not_dead_lettered(status, caplog):
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()
    rejections_left = 4

    async def wrong_service(received: Received) -> web.Response:
        nonlocal rejections_left
        if rejections_left > 0:
            rejections_left -= 1
            if status == 404:
                raise web.HTTPNotFound()
            raise web.HTTPMethodNotAllowed("POST", ["GET"])
        return status_response(200)

    async with stub_app(wrong_service) as app:
        settings = reader_settings(
            app.url, app_ready_path="/readyz", retry_max_attempts=1
        )
        async with running_reader(settings, source, dead_letter) as (reader, task):
            await wait_for(lambda: reader.setup_error)
            await asyncio.wait_for(asyncio.shield(task), RUN_TIMEOUT_SECONDS)

    assert dead_letter.envelopes == []
    assert app.numbers() == [0, 1]
    assert reader.setup_error is False
    assert source.committed == {(TOPIC, 0): 2}
    (record,) = setup_error_records(caplog)
    message = record.getMessage()
    assert f"responded {status} to POST {app.url.rstrip('/')}/" in message
    assert "READER_APP_URL" in message


async def test_wrong_app_path_keeps_reader_not_ready(caplog, monkeypatch):
    monkeypatch.setattr(engine, "SETUP_ERROR_LOG_INTERVAL_SECONDS", 0.0)
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()

    async with stub_app() as app:
        # The router of the app responds 404 to a path it does not serve.
        wrong_url = app.url.rstrip("/") + "/v1"
        settings = reader_settings(
            wrong_url,
            app_ready_path="",
            retry_max_attempts=1,
            batch_max_messages=2,
            batch_max_wait_ms=1,
        )
        async with running_reader(settings, source, dead_letter) as (reader, _):
            await wait_for(lambda: len(setup_error_records(caplog)) >= 3)
            not_ready = reader.setup_error

    assert not_ready is True
    assert dead_letter.envelopes == []
    assert source.committed == {}
    message = setup_error_records(caplog)[0].getMessage()
    assert f"POST {wrong_url}/batch" in message
    assert f"READER_APP_URL='{wrong_url}'" in message
    assert "POST /batch" in message


async def test_wrong_app_fails_reader_readyz(tmp_path):
    input_file = tmp_path / "in.jsonl"
    input_file.write_text('{"n": 0}\n')
    port = closed_port()

    async def wrong_service(received: Received) -> web.Response:
        raise web.HTTPNotFound()

    async with stub_app(wrong_service) as app:
        settings = reader_settings(
            app.url,
            input=str(input_file),
            port=port,
            app_ready_path="/readyz",
            retry_max_backoff_ms=20,
            shutdown_timeout_ms=100,
        )
        service = asyncio.create_task(serve_reader(settings))
        try:
            await wait_for(lambda: len(app.requests) >= 2)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    readyz_status = response.status
                    readyz_body = await response.json()
        finally:
            service.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await service

    assert "ready 200" in app.events
    assert readyz_status == 503
    assert "the app responds 404" in readyz_body["reason"]
    assert "check READER_APP_URL" in readyz_body["reason"]
    assert (tmp_path / "in.jsonl.dlq.jsonl").read_text() == ""


async def test_batch_item_404_dead_lettered():
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()

    async def unknown_item(received: Received) -> web.Response:
        return batch_response(
            [{"status": 404, "error": "no such card"}, {"status": 200}]
        )

    async with stub_app(unknown_item) as app:
        settings = reader_settings(app.url, batch_max_messages=2, batch_max_wait_ms=50)
        reader = await run_reader(settings, source, dead_letter)

    assert len(app.requests) == 1
    assert [record.value for record in dead_letter.envelopes] == [b'{"n":0}']
    assert reader.setup_error is False
    assert source.committed == {(TOPIC, 0): 2}


async def test_transform_returning_coroutine_dead_lettered():
    source = MemorySource(TOPIC)
    fill(source, 1)
    dead_letter = MemorySink()

    async def enrich(envelope: Envelope) -> Envelope:
        return envelope

    def call_enrich(envelope: Envelope) -> Any:
        return enrich(envelope)

    async with stub_app() as app:
        await run_reader(
            reader_settings(app.url), source, dead_letter, transform=call_enrich
        )

    assert app.requests == []
    headers = dead_letter_headers(dead_letter.envelopes[0])
    assert "transform returned a coroutine" in headers["dlq.error"]
    assert source.committed == {(TOPIC, 0): 1}


# ---------------------------------------------------------------------------
# Header size
# ---------------------------------------------------------------------------


def key_of_line_size(size: int) -> bytes:
    """Return a key whose X-Message-Key header line is `size` bytes long."""
    return b"k" * (size - len("X-Message-Key: "))


async def test_oversized_key_header_dead_lettered():
    source = MemorySource(TOPIC)
    source.add(b'{"n": 0}', key=key_of_line_size(8190))
    source.add(b'{"n": 1}', key=key_of_line_size(8191))
    source.add(b'{"n": 2}', key=b"k" * 20000)
    dead_letter = MemorySink()

    async with stub_app() as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    assert app.numbers() == [0]
    assert [orjson.loads(r.value)["n"] for r in dead_letter.envelopes] == [1, 2]
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.status"] == "431"
    assert context["dlq.attempts"] == "0"
    assert "X-Message-Key header line would be 8191 bytes" in context["dlq.error"]
    assert "8190" in context["dlq.error"]
    assert "READER_BATCH_MAX_MESSAGES" in context["dlq.error"]
    assert source.committed == {(TOPIC, 0): 3}


async def test_oversized_id_header_dead_lettered():
    source = MemorySource(TOPIC)
    fill(source, 2)
    dead_letter = MemorySink()

    def long_id(envelope: Envelope) -> Envelope:
        if orjson.loads(envelope.value)["n"] == 0:
            return replace(envelope, id="i" * 9000)
        return envelope

    async with stub_app() as app:
        await run_reader(reader_settings(app.url), source, dead_letter, long_id)

    assert app.numbers() == [1]
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.status"] == "431"
    assert "X-Message-Id header line" in context["dlq.error"]
    assert "shorten the message id" in context["dlq.error"]


async def test_oversized_null_header_list_dead_lettered():
    names = [f"h{i:02d}" + "x" * 90 for i in range(95)]
    source = MemorySource(TOPIC)
    source.add(b'{"n": 0}', headers=[(name, None) for name in names])
    source.add(b'{"n": 1}', headers=[(name, b"v") for name in names[:1]])
    dead_letter = MemorySink()

    async with stub_app() as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    assert app.numbers() == [1]
    headers = dead_letter.envelopes[0].headers
    context = {name: value.decode() for name, value in headers if value is not None}
    error = context["dlq.error"]
    assert context["dlq.status"] == "431"
    assert [name for name, value in headers if value is None] == names
    assert "X-Null-Record-Headers header line would be" in error
    assert "its list of 95 record header names" in error
    assert "READER_BATCH_MAX_MESSAGES" in error
    assert "'aders'" not in error
    assert source.committed == {(TOPIC, 0): 2}


async def test_too_many_record_headers_dead_lettered():
    source = MemorySource(TOPIC)
    source.add(b'{"n": 0}', headers=[(f"h{i}", b"v") for i in range(100)])
    source.add(b'{"n": 1}', headers=[(f"h{i}", b"v") for i in range(101)])
    dead_letter = MemorySink()

    async with stub_app() as app:
        await run_reader(reader_settings(app.url), source, dead_letter)

    assert app.numbers() == [0]
    context = dead_letter_headers(dead_letter.envelopes[0])
    assert context["dlq.status"] == "431"
    assert context["dlq.attempts"] == "0"
    assert (
        "the message has 101 record headers, more than the 100"
        in (context["dlq.error"])
    )
    assert "READER_BATCH_MAX_MESSAGES" in context["dlq.error"]
    assert source.committed == {(TOPIC, 0): 2}


async def test_batch_sends_long_key_in_body():
    source = MemorySource(TOPIC)
    long_key = b"k" * 20000
    source.add(b'{"n": 0}', key=long_key)
    dead_letter = MemorySink()

    async with stub_app() as app:
        settings = reader_settings(app.url, batch_max_messages=2, batch_max_wait_ms=5)
        await run_reader(settings, source, dead_letter)

    assert [item["key"] for item in app.accepted[0].json()] == [long_key.decode()]
    assert dead_letter.envelopes == []


class StuckSink(MemorySink):
    """A sink whose stop never returns, as a flush to an unreachable broker."""

    async def stop(self) -> None:
        await asyncio.Event().wait()


async def test_dead_letter_stop_bounded(monkeypatch, caplog):
    monkeypatch.setattr(reader_service, "DEAD_LETTER_STOP_SECONDS", 0.1)
    sink = StuckSink()
    await sink.start()

    await asyncio.wait_for(reader_service.stop_dead_letter_sink(sink), 5)

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("did not stop within 0.1 s" in text for text in errors)
