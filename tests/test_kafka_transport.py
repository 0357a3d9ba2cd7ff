"""KafkaSource and KafkaSink against librdkafka's in-process mock cluster.

The mock cluster is a fast stand-in for unit tests only; the end-to-end tests
use the real broker.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope
from agogosml.transports.kafka import KafkaSink, KafkaSource


@pytest.fixture
def mock_bootstrap() -> Iterator[str]:
    admin = AdminClient({"test.mock.num.brokers": "1"})
    brokers = admin.list_topics(timeout=10).brokers
    bootstrap = ",".join(f"{b.host}:{b.port}" for b in brokers.values())
    yield bootstrap
    del admin  # the mock cluster lives as long as this client


def produce(bootstrap: str, topic: str, count: int) -> None:
    """Produce to partition 0; the mock cluster creates the topic on first use."""
    producer = Producer({"bootstrap.servers": bootstrap})
    for n in range(count):
        producer.produce(topic, value=b'{"n": %d}' % n, key=b"k%d" % n, partition=0)
    assert producer.flush(10) == 0


def committed(bootstrap: str, group: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        (partition,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        return int(partition.offset)
    finally:
        consumer.close()


async def fetch_all(source: KafkaSource, count: int) -> list[Envelope]:
    envelopes: list[Envelope] = []
    for _ in range(200):
        envelopes.extend(await source.fetch(count - len(envelopes), 0.1))
        if len(envelopes) >= count:
            break
    return envelopes


async def test_sink_writes_headers_and_key(mock_bootstrap: str) -> None:
    topic = "sink-out"
    sink = KafkaSink(KafkaSettings(bootstrap_servers=mock_bootstrap), topic)
    envelope = Envelope(value=b'{"a": 1}', key=b"key-1", headers=[("x", b"y")], id="m1")

    async with sink:
        await sink.send([envelope])

    consumer = Consumer(
        {
            "bootstrap.servers": mock_bootstrap,
            "group.id": "check",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    messages = consumer.consume(1, 10)
    consumer.close()

    assert len(messages) == 1
    headers = dict(messages[0].headers())
    assert messages[0].value() == b'{"a": 1}'
    assert messages[0].key() == b"key-1"
    assert headers["message-id"] == b"m1"
    assert headers["traceparent"] == envelope.traceparent.encode()
    assert headers["x"] == b"y"


async def test_source_commits_only_finished_prefix(mock_bootstrap: str) -> None:
    topic = "source-in"
    produce(mock_bootstrap, topic, 10)
    settings = KafkaSettings(bootstrap_servers=mock_bootstrap, group_id="g-prefix")
    source = KafkaSource(settings, [topic])

    async with source:
        envelopes = await fetch_all(source, 10)
        for envelope in envelopes[:3] + envelopes[5:]:
            source.ack(envelope)
        await source.commit()
        committed_with_gap = committed(mock_bootstrap, "g-prefix", topic)
        for envelope in envelopes[3:5]:
            source.ack(envelope)
        await source.commit()
        committed_after_all = committed(mock_bootstrap, "g-prefix", topic)

    assert [e.position.offset for e in envelopes if e.position] == list(range(10))
    assert envelopes[0].id == f"{topic}:0:0"
    assert envelopes[0].key == b"k0"
    assert committed_with_gap == 3
    assert committed_after_all == 10


async def test_paused_source_returns_nothing(mock_bootstrap: str) -> None:
    topic = "source-pause"
    produce(mock_bootstrap, topic, 1)
    settings = KafkaSettings(bootstrap_servers=mock_bootstrap, group_id="g-pause")
    source = KafkaSource(settings, [topic])

    async with source:
        await fetch_all(source, 1)  # join the group and get the assignment
        await source.pause()
        produce(mock_bootstrap, topic, 3)
        while_paused = [await source.fetch(10, 0.2) for _ in range(5)]
        await source.resume()
        after_resume = await fetch_all(source, 3)

    assert all(batch == [] for batch in while_paused)
    assert [e.position.offset for e in after_resume if e.position] == [1, 2, 3]
