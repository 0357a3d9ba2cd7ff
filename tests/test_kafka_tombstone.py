"""A Kafka record without a value (a tombstone) as the Kafka source reads it."""

from __future__ import annotations

from confluent_kafka import Producer
from test_kafka_transport import fetch_all, mock_bootstrap  # noqa: F401

from agogosml.config import KafkaSettings
from agogosml.transports.kafka import KafkaSource


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
