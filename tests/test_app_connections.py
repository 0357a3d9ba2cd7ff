"""The reader's connections to the app: pool size, and renewal after a maximum age."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from agogosml.config import Ordering, ReaderSettings
from agogosml.envelope import Envelope, Position
from agogosml.reader.client import AppClient
from agogosml.reader.service import _max_connections


class NamedApp:
    """An app that accepts every message and records the connections used."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests = 0
        self.peers: set[tuple[str, int]] = set()

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self._accept)
        return app

    async def _accept(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        return web.json_response({"status": 200})


@contextlib.asynccontextmanager
async def serving(app: NamedApp) -> AsyncIterator[TestServer]:
    server = TestServer(app.build_app())
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


class Switch:
    """A TCP forwarder that sends each new connection to the current target.

    As a Kubernetes Service does, it leaves open connections where they are
    when the target changes.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _forward(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        target_reader, target_writer = await asyncio.open_connection(
            "127.0.0.1", self.port
        )
        await asyncio.gather(
            _pipe(reader, target_writer),
            _pipe(target_reader, writer),
            return_exceptions=True,
        )


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    finally:
        sink.close()


def message(number: int) -> Envelope:
    position = Position("in", 0, number, number + 1, 1)
    return Envelope(value=orjson.dumps({"n": number}), position=position)


async def send_for(client: AppClient, seconds: float) -> None:
    """Send one message at a time for `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    number = 0
    while loop.time() < deadline:
        (outcome,) = await client.send([message(number)], batch=False)
        assert outcome.ok, outcome.error
        number += 1
        await asyncio.sleep(0.01)


async def test_connections_kept_without_max_age() -> None:
    app = NamedApp("blue")
    async with serving(app) as server:
        client = AppClient(str(server.make_url("")))
        await client.start()
        try:
            await send_for(client, 0.5)
        finally:
            await client.stop()

    assert app.requests > 10
    assert len(app.peers) == 1


async def test_connections_renewed_after_max_age() -> None:
    app = NamedApp("blue")
    async with serving(app) as server:
        client = AppClient(str(server.make_url("")), connection_max_age_seconds=0.2)
        await client.start()
        try:
            await send_for(client, 1.0)
        finally:
            await client.stop()

    # About one connection per 0.2 s: a new pool after each maximum age.
    assert 3 <= len(app.peers) <= 7


async def test_switched_service_reached_within_max_age() -> None:
    blue, green = NamedApp("blue"), NamedApp("green")
    async with serving(blue) as blue_server, serving(green) as green_server:
        assert blue_server.port is not None and green_server.port is not None
        switch = Switch(blue_server.port)
        port = await switch.start()
        client = AppClient(f"http://127.0.0.1:{port}", connection_max_age_seconds=0.3)
        await client.start()
        try:
            await send_for(client, 0.3)
            switch.port = green_server.port  # the Service now selects green
            await send_for(client, 0.4)
            blue_before = blue.requests
            await send_for(client, 0.3)
        finally:
            await client.stop()
            await switch.stop()

    # Within one maximum age after the switch, every request goes to green.
    assert blue_before > 0
    assert blue.requests == blue_before
    assert green.requests > 0


class SlowApp(NamedApp):
    """An app that takes `delay` seconds for every message."""

    def __init__(self, delay: float) -> None:
        super().__init__("slow")
        self.delay = delay

    async def _accept(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay)
        return await super()._accept(request)


async def test_unlimited_pool_sends_every_lane_at_once() -> None:
    app = SlowApp(0.5)
    async with serving(app) as server:
        # One request per partition lane, for 40 partitions, and a timeout that
        # a request waiting for a pooled connection behind them would miss.
        client = AppClient(
            str(server.make_url("")), timeout_seconds=1.2, max_connections=0
        )
        await client.start()
        try:
            outcomes = await asyncio.gather(
                *(client.send([message(n)], batch=False) for n in range(40))
            )
        finally:
            await client.stop()

    assert [outcome.ok for (outcome,) in outcomes] == [True] * 40
    assert len(app.peers) == 40


def test_partition_mode_pool_has_no_limit() -> None:
    base = {"input": "in", "app_url": "http://127.0.0.1:1", "concurrency": 8}
    partition = ReaderSettings(**base, ordering=Ordering.PARTITION)
    key = ReaderSettings(**base, ordering=Ordering.KEY)

    assert _max_connections(partition) == 0
    assert _max_connections(key) == 12
