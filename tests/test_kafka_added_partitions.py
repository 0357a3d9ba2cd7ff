"""Partitions added to an input topic, against the real broker.

A group that starts at the end of the log (``KAFKA_AUTO_OFFSET_RESET=latest``)
must still read every message of a partition added while it read the topic:
those messages are new to the group, though the partition has no committed
offset yet.
"""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope
from agogosml.transports.kafka import KafkaSource

pytestmark = pytest.mark.kafka

TIMEOUT_SECONDS = 60


def produce(bootstrap: str, topic: str, partition: int, count: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for number in range(count):
        value = orjson.dumps({"partition": partition, "n": number})
        producer.produce(topic, value=value, partition=partition)
    assert producer.flush(TIMEOUT_SECONDS) == 0


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        offsets = consumer.committed(
            [TopicPartition(topic, number) for number in range(partitions)],
            timeout=TIMEOUT_SECONDS,
        )
        return [tp.offset for tp in offsets]
    finally:
        consumer.close()


async def read(source: KafkaSource, count: int) -> list[Envelope]:
    envelopes: list[Envelope] = []
    async with asyncio.timeout(TIMEOUT_SECONDS):
        while len(envelopes) < count:
            envelopes += await source.fetch(100, 0.2)
    return envelopes


async def wait_started(
    source: KafkaSource, bootstrap: str, group: str, topic: str, partitions: int
) -> None:
    """Fetch until the group committed where each partition starts."""
    async with asyncio.timeout(TIMEOUT_SECONDS):
        while min(committed(bootstrap, group, topic, partitions)) < 0:
            assert await source.fetch(100, 0.2) == []


async def test_latest_group_reads_added_partition_from_start(
    kafka_bootstrap: str,
) -> None:
    topic = f"added-{uuid.uuid4().hex[:8]}"
    group = f"g-{topic}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(TIMEOUT_SECONDS)
    produce(kafka_bootstrap, topic, 0, 3)  # before the group: skipped by latest
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="latest",
    )

    first = KafkaSource(settings, [topic])
    async with first:
        await wait_started(first, kafka_bootstrap, group, topic, 2)
    admin.create_partitions([NewPartitions(topic, 3)])[topic].result(TIMEOUT_SECONDS)
    produce(kafka_bootstrap, topic, 2, 4)  # to the added partition
    produce(kafka_bootstrap, topic, 0, 1)
    second = KafkaSource(settings, [topic])
    async with second:
        envelopes = await read(second, 5)
        for envelope in envelopes:
            second.ack(envelope)
        await second.commit()

    values = sorted(orjson.loads(envelope.value)["partition"] for envelope in envelopes)
    assert values == [0, 2, 2, 2, 2]
    assert committed(kafka_bootstrap, group, topic, 3) == [4, 0, 4]


def test_metadata_refreshed_every_30_seconds() -> None:
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:9092", group_id="g")
    changed = KafkaSettings(
        bootstrap_servers="127.0.0.1:9092",
        group_id="g",
        extra_config={"topic.metadata.refresh.interval.ms": 5000},
    )

    default = KafkaSource(settings, ["t"])._consumer_config()
    overridden = KafkaSource(changed, ["t"])._consumer_config()

    assert default["topic.metadata.refresh.interval.ms"] == 30_000
    assert overridden["topic.metadata.refresh.interval.ms"] == 5000
