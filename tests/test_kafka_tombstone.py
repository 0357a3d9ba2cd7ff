"""Kafka records without a value (tombstones) through the Kafka source and sink."""

from __future__ import annotations

from confluent_kafka import Consumer, Producer
from test_kafka_transport import fetch_all, mock_bootstrap  # noqa: F401

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope
from agogosml.transports.kafka import KafkaSink, KafkaSource


async def test_tombstone_marked_null_value(mock_bootstrap: str) -> None:  # noqa: F811
    topic = "tombstones"
    producer = Producer({"bootstrap.servers": mock_bootstrap})
    producer.produce(topic, value=None, key=b"card-1", partition=0)
    producer.produce(topic, value=b"", key=b"card-2", partition=0)
    assert producer.flush(10) == 0
    settings = KafkaSettings(bootstrap_servers=mock_bootstrap, group_id="g-tomb")

    async with KafkaSource(settings, [topic]) as source:
        tombstone, empty = await fetch_all(source, 2)

    assert tombstone.key == b"card-1"
    assert tombstone.null_value
    assert tombstone.value == b""
    assert empty.key == b"card-2"
    assert not empty.null_value


async def test_sink_writes_null_value_as_tombstone(mock_bootstrap: str) -> None:  # noqa: F811
    topic = "tombstones-out"
    settings = KafkaSettings(bootstrap_servers=mock_bootstrap)
    async with KafkaSink(settings, topic) as sink:
        await sink.send(
            [
                Envelope(value=b"", key=b"card-1", null_value=True),
                Envelope(value=b"", key=b"card-2"),
            ]
        )

    consumer = Consumer(
        {
            "bootstrap.servers": mock_bootstrap,
            "group.id": "check-tombstones",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    messages = []
    for _ in range(20):
        messages.extend(consumer.consume(2 - len(messages), 1))
        if len(messages) == 2:
            break
    consumer.close()

    values = {message.key(): message.value() for message in messages}
    assert values == {b"card-1": None, b"card-2": b""}
