"""Readiness checks between services: reasons, and services pointed at the wrong one."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fakes import MemorySink, MemorySource
from test_model_app import closed_port, model_app
from test_reader import TOPIC, fill, reader_settings, running_reader, wait_for

from agogosml import app as app_module
from agogosml.app import InvalidRecord
from agogosml.config import WriterSettings, load_settings
from agogosml.http import SERVICE_HEADER, add_health_routes, check_readiness
from agogosml.writer.service import OutputWriter


def double(values: list) -> list:
    return [{"score": value["n"] * 2} for value in values]


async def serve_health(service: str, ready: bool, reason: str) -> TestServer:
    """Start a server whose health routes name `service`."""
    app = web.Application()
    add_health_routes(app, service, lambda: ready, not_ready_reason=lambda: reason)
    server = TestServer(app)
    await server.start_server()
    return server


async def test_readyz_gives_reason_and_service() -> None:
    server = await serve_health("output_writer", False, "the sink is down")
    try:
        async with aiohttp.ClientSession() as session:
            url = str(server.make_url("/readyz"))
            async with session.get(url) as response:
                body = await response.json()
                header = response.headers[SERVICE_HEADER]
            readiness = await check_readiness(session, url, "http://writer/readyz")
    finally:
        await server.close()

    assert body == {"status": "not ready", "reason": "the sink is down"}
    assert header == "output_writer"
    assert readiness.ready is False
    assert readiness.service == "output_writer"
    assert readiness.detail == (
        "GET http://writer/readyz returned 503: the sink is down"
    )


async def test_readiness_of_unreachable_url() -> None:
    url = f"http://127.0.0.1:{closed_port()}/readyz"

    async with aiohttp.ClientSession() as session:
        readiness = await check_readiness(session, url, url)

    assert readiness.ready is False
    assert readiness.service == ""
    assert readiness.detail.startswith(f"GET {url} failed: ")


async def test_readiness_redirect_not_followed() -> None:
    app = web.Application()

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect(location="/ready-elsewhere")

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app.router.add_get("/readyz", moved)
    app.router.add_get("/ready-elsewhere", ready)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        url = str(server.make_url("/readyz"))
        readiness = await check_readiness(session, url, url)

    assert readiness.ready is False
    assert readiness.detail.startswith(f"GET {url} returned 308")


async def test_writer_readyz_names_sink_problem() -> None:
    settings = load_settings(WriterSettings, output="unused.jsonl")
    writer = OutputWriter(settings, MemorySink())  # not started: not connected

    async with TestClient(TestServer(writer.build_app())) as client:
        response = await client.get("/readyz")
        body = await response.json()

    assert response.status == 503
    assert response.headers[SERVICE_HEADER] == "output_writer"
    assert body["reason"] == MemorySink().unavailable_reason


async def test_reader_pointed_at_writer_stays_not_ready(caplog) -> None:
    source = MemorySource(TOPIC)
    fill(source, 3)
    dead_letter = MemorySink()
    writer = await serve_health("output_writer", True, "")
    settings = reader_settings(
        str(writer.make_url("")).rstrip("/"), app_ready_path="/readyz"
    )

    try:
        async with running_reader(settings, source, dead_letter) as (reader, _):
            await wait_for(lambda: "is an agogosml output writer" in caplog.text)
            await asyncio.sleep(0.2)
            ready = reader.app_ready
            reason = reader.app_not_ready_reason
    finally:
        await writer.close()

    assert ready is False
    assert "READER_APP_URL http://127.0.0.1:" in reason
    assert "not a model app, so messages would not be scored" in reason
    assert "set it to the model app's URL" in reason
    # No message was sent on, so none was committed or dead-lettered.
    assert source.committed == {}
    assert dead_letter.envelopes == []
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("is an agogosml output writer" in r.getMessage() for r in errors)


async def test_app_with_unreachable_writer_says_why(monkeypatch, caplog) -> None:
    monkeypatch.setattr(app_module, "WRITER_GRACE_CHECKS", 1)
    writer_url = f"http://127.0.0.1:{closed_port()}"

    async with model_app(double, writer_url) as client:
        await wait_for_log(caplog, "model app not ready")
        response = await client.get("/readyz")
        body = await response.json()

    assert response.status == 503
    assert response.headers[SERVICE_HEADER] == "model_app"
    reason = body["reason"]
    assert reason.startswith("the output writer is not reachable or not ready: ")
    assert f"GET {writer_url}/readyz failed" in reason
    assert reason.endswith("check APP_WRITER_URL")
    assert reason in caplog.text


@pytest.mark.parametrize("service", ["input_reader", "model_app"])
async def test_app_pointed_at_other_service(monkeypatch, caplog, service) -> None:
    monkeypatch.setattr(app_module, "WRITER_GRACE_CHECKS", 1)
    other = await serve_health(service, True, "")

    try:
        async with model_app(double, str(other.make_url("")).rstrip("/")) as client:
            await wait_for_log(caplog, "model app not ready")
            response = await client.get("/readyz")
            body = await response.json()
    finally:
        await other.close()

    name = service.replace("_", " ")
    assert response.status == 503
    assert f"is an agogosml {name}, not an output writer" in body["reason"]
    assert "set it to the output writer's URL" in body["reason"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("not an output writer" in r.getMessage() for r in errors)


async def wait_for_log(caplog: pytest.LogCaptureFixture, text: str) -> None:
    async with asyncio.timeout(10):
        while text not in caplog.text:
            await asyncio.sleep(0.05)


async def test_app_forwarding_to_other_app_retries(caplog) -> None:
    # The other app responds 200 to the batch with a 400 per item, which
    # gives no count of records written.
    def reject_all(values: list) -> list:
        return [InvalidRecord("not a transaction") for _ in values]

    async with model_app(reject_all, "http://127.0.0.1:9") as other:
        other_url = str(other.make_url("")).rstrip("/")
        async with model_app(double, other_url) as client:
            response = await client.post(
                "/", data=b'{"n": 1}', headers={"Content-Type": "application/json"}
            )
            body = await response.json()

    assert response.status == 503, body
    assert response.headers.get("Retry-After") == "1", body
    assert "does not say how many records it wrote" in body["error"]
    assert "set APP_WRITER_URL to the output writer's URL" in body["error"]
    assert "does not say how many records it wrote" in caplog.text
