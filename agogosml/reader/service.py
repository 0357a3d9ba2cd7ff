"""Run the input reader as a service: settings, HTTP endpoints and signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from agogosml.config import Ordering, ReaderSettings, redact_url
from agogosml.http import (
    add_health_routes,
    bound_port,
    http_error_middleware,
    start_site,
)
from agogosml.reader.client import AppClient
from agogosml.reader.engine import SERVICE, InputReader
from agogosml.reader.transform import load_transform
from agogosml.transports.base import Sink, stop_within
from agogosml.transports.factory import build_sink, build_source

logger = logging.getLogger(__name__)

#: How long the dead-letter sink may take to stop. A record it has not written
#: by the shutdown belongs to a message that is not finished, and so not
#: committed: it is read again after a restart. Without a limit, a Kafka sink
#: flushes for up to 30 s after READER_SHUTDOWN_TIMEOUT_MS already passed.
DEAD_LETTER_STOP_SECONDS = 5.0


async def stop_dead_letter_sink(sink: Sink) -> None:
    """Stop the dead-letter sink, giving up after `DEAD_LETTER_STOP_SECONDS`."""
    if not await stop_within(sink, DEAD_LETTER_STOP_SECONDS):
        logger.error(
            "the dead-letter sink did not stop within %.1f s; the messages of its "
            "unwritten records are not committed and will be read again",
            DEAD_LETTER_STOP_SECONDS,
        )


def _max_connections(settings: ReaderSettings) -> int:
    """Return the size of the reader's connection pool to the app (0: no limit).

    In partition mode each partition has a lane with one request at a time, and
    the number of partitions is not known ahead. So the pool has no limit,
    because in a smaller one requests would wait for a connection and time out.
    In the other modes `READER_CONCURRENCY` bounds the requests, and the pool
    keeps a few connections more for the readiness checks.
    """
    if settings.ordering is Ordering.PARTITION:
        return 0
    return settings.concurrency + 4


async def serve_reader(settings: ReaderSettings) -> None:
    """Run the reader until SIGTERM/SIGINT, or the input end with READER_STOP_AT_END."""
    for variable in settings.ignored_settings():
        logger.warning(
            "%s applies only to a file source and is ignored with READER_SOURCE=%s; "
            "unset it",
            variable,
            settings.source.value,
        )
    transform = None
    if settings.transform:
        transform = load_transform(settings.transform)
    source = build_source(settings)
    dead_letter = build_sink(
        settings.source, settings.dead_letter_target(), variable="READER_DEAD_LETTER"
    )
    client = AppClient(
        str(settings.app_url),
        token=settings.app_token.get_secret_value(),
        timeout_seconds=settings.request_timeout_ms / 1000,
        max_connections=_max_connections(settings),
        connection_max_age_seconds=settings.app_connection_max_age_ms / 1000,
    )
    reader = InputReader(settings, source, client, dead_letter, transform=transform)

    # JSON errors and the rejected-requests metric, as in the app and writer.
    app = web.Application(middlewares=[http_error_middleware(SERVICE)])

    def not_ready_reason() -> str:
        reasons = []
        if not source.connected:
            reasons.append(f"the source: {source.unavailable_reason}")
        if not dead_letter.connected:
            reasons.append(f"the dead-letter sink: {dead_letter.unavailable_reason}")
        if not reader.app_ready:
            reasons.append(f"the app is not ready: {reader.app_not_ready_reason}")
        if reader.dead_letter_failing:
            reasons.append("writing a dead letter fails and is being retried")
        if reader.setup_error:
            reasons.append(reader.setup_error_reason)
        return "; ".join(reasons)

    add_health_routes(
        app,
        SERVICE,
        lambda: (
            source.connected
            and dead_letter.connected
            and reader.app_ready
            and not reader.dead_letter_failing
            and not reader.setup_error
        ),
        lambda: source.failure or dead_letter.failure,
        not_ready_reason,
    )
    # Only health and metrics requests are served, which finish quickly.
    runner = await start_site(
        app, settings.host, settings.port, "READER_", shutdown_timeout_seconds=1.0
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, reader.request_stop)
    try:
        await client.start()
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(source)
            await dead_letter.start()
            stack.push_async_callback(stop_dead_letter_sink, dead_letter)
            logger.info(
                "input reader started",
                extra={
                    "source": settings.source.value,
                    "input": settings.input,
                    "app_url": redact_url(str(settings.app_url)),
                    "dead_letter": settings.dead_letter_target(),
                    "ordering": settings.ordering.value,
                    "port": bound_port(runner),
                },
            )
            await reader.run()
    finally:
        await client.stop()
        await runner.cleanup()
        logger.info(
            "input reader stopped",
            extra={
                "finished": reader.finished_count,
                "dead_lettered": reader.dead_lettered_count,
            },
        )
