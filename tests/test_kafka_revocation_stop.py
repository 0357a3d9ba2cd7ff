"""A stop requested while a revocation waits ends within one shutdown timeout.

KafkaSource blocks its consumer thread in the revocation callback while the
reader waits for the revoked partitions' requests. A stop requested then must
share that wait's time with the final wait for in-flight messages, so that the
reader stops within READER_SHUTDOWN_TIMEOUT_MS, as a pod's grace period
expects. The test uses librdkafka's mock cluster.
"""

from __future__ import annotations

import asyncio
import threading
import time

import orjson
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from fakes import MemorySink
from test_reader import reader_settings, stub_app

from agogosml.config import KafkaSettings
from agogosml.reader.client import AppClient
from agogosml.reader.engine import InputReader
from agogosml.transports.kafka import KafkaSource

TOPIC = "revoke-in"
GROUP = "g-revoke"
SHUTDOWN_SECONDS = 3.0


async def hold(received):
    """Keep every request open until the reader stops."""
    await asyncio.sleep(3600)


async def wait_long(condition, seconds=60.0):
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


async def test_stop_during_revocation_within_timeout():
    admin = AdminClient({"test.mock.num.brokers": "1"})
    bootstrap = ",".join(
        f"{b.host}:{b.port}" for b in admin.list_topics(timeout=10).brokers.values()
    )
    producer = Producer({"bootstrap.servers": bootstrap})
    for n in range(3):
        producer.produce(TOPIC, value=orjson.dumps({"n": n}), partition=0)
    assert producer.flush(10) == 0

    kafka = KafkaSettings(
        bootstrap_servers=bootstrap,
        group_id=GROUP,
        extra_config={"session.timeout.ms": 6000},
    )
    source = KafkaSource(kafka, [TOPIC], revoke_timeout_seconds=SHUTDOWN_SECONDS)
    dead_letter = MemorySink()
    other_stop = threading.Event()

    def other_member() -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": GROUP,
                "session.timeout.ms": 6000,
            }
        )
        consumer.subscribe([TOPIC])
        while not other_stop.is_set():
            consumer.poll(0.1)
        consumer.close()

    async with stub_app(hold) as app:
        settings = reader_settings(
            app.url,
            input=TOPIC,
            stop_at_end=False,
            shutdown_timeout_ms=int(SHUTDOWN_SECONDS * 1000),
            request_timeout_ms=60_000,
        )
        client = AppClient(str(settings.app_url), timeout_seconds=60)
        await client.start()
        await source.start()
        await dead_letter.start()
        reader = InputReader(settings, source, client, dead_letter)
        task = asyncio.create_task(reader.run())
        await wait_long(lambda: len(app.requests) == 1)

        member = threading.Thread(target=other_member)
        member.start()
        # The second member's join revokes the partition, and the revocation
        # waits for the request that the app keeps open.
        await wait_long(lambda: bool(reader._revoking))
        await asyncio.sleep(0.2)
        stop_requested = time.monotonic()
        reader.request_stop()
        await asyncio.wait_for(task, 30)
        run_seconds = time.monotonic() - stop_requested
        await source.stop()
        await dead_letter.stop()
        await client.stop()
        other_stop.set()
        member.join()
    del admin

    # Waiting for the revocation and then for the final shutdown would take
    # almost twice SHUTDOWN_SECONDS.
    assert run_seconds < SHUTDOWN_SECONDS * 1.5
