"""Compare ways of driving confluent-kafka from asyncio, on a running broker.

Usage: python benchmarks/kafka_bridge.py BOOTSTRAP [MESSAGES]

Measures, on the same topic and broker:
- consume: agogosml's KafkaSource (one dedicated thread, batched consume, plus
  envelopes and offset tracking), the bare consume call on one thread, and
  confluent_kafka.aio.AIOConsumer.consume;
- produce: agogosml's KafkaSink (delivery callbacks resolve asyncio futures)
  against confluent_kafka.aio.AIOProducer.produce, each awaiting every
  acknowledgement for requests of 100 records, 8 requests at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import time
import uuid

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.aio import AIOConsumer, AIOProducer

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope
from agogosml.transports.kafka import KafkaSink, KafkaSource

VALUE = b'{"n": 0, "payload": "' + b"x" * 500 + b'"}'
REQUEST_SIZE = 100
CONCURRENT_REQUESTS = 8


def new_topic(bootstrap: str) -> str:
    name = f"bridge-bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(30)
    return name


async def produce_with_sink(bootstrap: str, topic: str, count: int) -> float:
    sink = KafkaSink(
        KafkaSettings.model_validate({"bootstrap_servers": bootstrap}), topic
    )
    await sink.start()
    started = time.perf_counter()
    await _in_requests(count, lambda: sink.send([Envelope(VALUE)] * REQUEST_SIZE))
    elapsed = time.perf_counter() - started
    await sink.stop()
    return count / elapsed


async def produce_with_aio(bootstrap: str, topic: str, count: int) -> float:
    producer = AIOProducer(
        {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True}
    )

    async def request() -> None:
        futures = [
            await producer.produce(topic, value=VALUE) for _ in range(REQUEST_SIZE)
        ]
        await producer.flush()
        await asyncio.gather(*futures)

    started = time.perf_counter()
    await _in_requests(count, request)
    elapsed = time.perf_counter() - started
    await producer.close()
    return count / elapsed


async def _in_requests(count: int, request: object) -> None:
    semaphore = asyncio.Semaphore(CONCURRENT_REQUESTS)

    async def one() -> None:
        async with semaphore:
            await request()  # type: ignore[operator]

    await asyncio.gather(*(one() for _ in range(count // REQUEST_SIZE)))


async def consume_with_source(bootstrap: str, topic: str, count: int) -> float:
    settings = KafkaSettings.model_validate(
        {"bootstrap_servers": bootstrap, "group_id": f"bench-{uuid.uuid4().hex[:6]}"}
    )
    source = KafkaSource(settings, [topic])
    await source.start()
    received = 0
    started = None
    while received < count:
        batch = await source.fetch(500, 0.1)
        if batch and started is None:
            started = time.perf_counter()
        for envelope in batch:
            source.ack(envelope)
        received += len(batch)
    assert started is not None
    elapsed = time.perf_counter() - started
    await source.stop()
    return count / elapsed


async def consume_with_thread(bootstrap: str, topic: str, count: int) -> float:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    thread = concurrent.futures.ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()
    consumer.subscribe([topic])
    received = 0
    started = None
    while received < count:
        batch = await loop.run_in_executor(thread, consumer.consume, 500, 0.1)
        if batch and started is None:
            started = time.perf_counter()
        received += len(batch)
    assert started is not None
    elapsed = time.perf_counter() - started
    await loop.run_in_executor(thread, consumer.close)
    thread.shutdown()
    return count / elapsed


async def consume_with_aio(bootstrap: str, topic: str, count: int) -> float:
    consumer = AIOConsumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    await consumer.subscribe([topic])
    received = 0
    started = None
    while received < count:
        batch = await consumer.consume(500, 0.1)
        if batch and started is None:
            started = time.perf_counter()
        received += len(batch)
    assert started is not None
    elapsed = time.perf_counter() - started
    await consumer.close()
    return count / elapsed


async def main(bootstrap: str, count: int) -> None:
    results: dict[str, list[float]] = {}
    for round_number in range(3):
        topic = new_topic(bootstrap)
        for name, function in (
            ("produce: KafkaSink", produce_with_sink),
            ("produce: AIOProducer", produce_with_aio),
            ("consume: KafkaSource", consume_with_source),
            ("consume: one thread", consume_with_thread),
            ("consume: AIOConsumer", consume_with_aio),
        ):
            rate = await function(bootstrap, topic, count)
            results.setdefault(name, []).append(rate)
            print(f"round {round_number + 1} {name:24} {rate:10,.0f} msg/s")
    print("\nmedian of 3 rounds:")
    for name, rates in results.items():
        print(f"  {name:24} {sorted(rates)[1]:10,.0f} msg/s")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 50_000))
