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
from agogosml.transports.kafka.added_partitions import (
    PARTITIONS_AT_START,
    added_partitions,
    commit_offset,
    sibling_partitions,
)

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


def create_topic(bootstrap: str, partitions: int) -> str:
    topic = f"added-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(TIMEOUT_SECONDS)
    return topic


def latest_settings(bootstrap: str, group: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="latest",
        # Notices the added partition within a second instead of 30 s.
        extra_config={"topic.metadata.refresh.interval.ms": 1000},
    )


async def test_latest_group_reads_added_partition_from_start(
    kafka_bootstrap: str,
) -> None:
    topic = create_topic(kafka_bootstrap, 2)
    group = f"g-{topic}"
    produce(kafka_bootstrap, topic, 0, 3)  # before the group: skipped by latest
    source = KafkaSource(latest_settings(kafka_bootstrap, group), [topic])

    async with source:
        await wait_started(source, kafka_bootstrap, group, topic, 2)
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        future = admin.create_partitions([NewPartitions(topic, 3)])[topic]
        future.result(TIMEOUT_SECONDS)
        produce(kafka_bootstrap, topic, 2, 4)  # before the reader noticed it
        envelopes = await read(source, 4)
        envelopes += await source.fetch(100, 2.0)  # nothing else, no history
        for envelope in envelopes:
            source.ack(envelope)
        await source.commit()

    values = [orjson.loads(envelope.value) for envelope in envelopes]
    assert values == [{"partition": 2, "n": number} for number in range(4)]
    assert committed(kafka_bootstrap, group, topic, 3) == [3, 0, 4]


async def test_latest_reader_joining_a_starting_group_skips_history(
    kafka_bootstrap: str,
) -> None:
    """Another reader committed its partitions' ends first, as at a first deploy.

    The partition without a commit is no added one, so it starts at its end.
    """
    topic = create_topic(kafka_bootstrap, 2)
    group = f"g-{topic}"
    produce(kafka_bootstrap, topic, 0, 5)
    produce(kafka_bootstrap, topic, 1, 5)
    other = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    other.commit(offsets=[TopicPartition(topic, 0, 5)], asynchronous=False)
    other.close()
    source = KafkaSource(latest_settings(kafka_bootstrap, group), [topic])

    async with source:
        await wait_started(source, kafka_bootstrap, group, topic, 2)
        produce(kafka_bootstrap, topic, 1, 1)
        envelopes = await read(source, 1)

    assert [orjson.loads(e.value) for e in envelopes] == [{"partition": 1, "n": 0}]
    assert envelopes[0].position is not None
    assert envelopes[0].position.offset == 5


async def test_reader_restarted_after_partition_added_reads_it(
    kafka_bootstrap: str,
) -> None:
    """The first reader stops before it noticed the partition; the next one starts.

    The partition is in the second reader's start-up list, so only the first
    reader's commits show that it was added while the group read the topic.
    """
    topic = create_topic(kafka_bootstrap, 2)
    group = f"g-{topic}"
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap, group_id=group, auto_offset_reset="latest"
    )
    async with KafkaSource(settings, [topic]) as first:
        await wait_started(first, kafka_bootstrap, group, topic, 2)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_partitions([NewPartitions(topic, 3)])[topic].result(TIMEOUT_SECONDS)
    produce(kafka_bootstrap, topic, 2, 4)

    async with KafkaSource(settings, [topic]) as second:
        envelopes = await read(second, 4)
        envelopes += await second.fetch(100, 2.0)  # nothing else

    values = [orjson.loads(envelope.value) for envelope in envelopes]
    assert values == [{"partition": 2, "n": number} for number in range(4)]
    assert committed(kafka_bootstrap, group, topic, 3)[2] == 0


def test_commit_offset_records_partition_count() -> None:
    known = {"t": frozenset({0, 1, 2}), "created-later": frozenset()}

    recorded = commit_offset(known, "t", 1, 7)
    created_later = commit_offset(known, "created-later", 0, 7)
    unknown_topic = commit_offset(known, "other", 0, 7)
    lookup_failed = commit_offset(None, "t", 1, 7)

    assert (recorded.topic, recorded.partition, recorded.offset) == ("t", 1, 7)
    assert recorded.metadata == f"{PARTITIONS_AT_START}3"
    assert created_later.metadata == f"{PARTITIONS_AT_START}0"
    assert unknown_topic.metadata is None
    assert lookup_failed.metadata is None


def test_added_partitions_from_sibling_commits() -> None:
    uncommitted = [TopicPartition("t", 2), TopicPartition("t", 3)]
    two = f"{PARTITIONS_AT_START}2"
    three = f"{PARTITIONS_AT_START}3"
    cases = [
        # (committed siblings, expected added partitions)
        ([TopicPartition("t", 0, 5, metadata=two)], {("t", 2), ("t", 3)}),
        ([TopicPartition("t", 0, 5, metadata=three)], {("t", 3)}),
        (
            [
                TopicPartition("t", 0, 5, metadata=three),
                TopicPartition("t", 1, 5, metadata=two),
            ],
            {("t", 2), ("t", 3)},
        ),
        ([TopicPartition("t", 0, 5)], set()),  # no count recorded
        ([TopicPartition("t", 0, 5, metadata="other tool")], set()),
        ([TopicPartition("t", 0, 5, metadata=f"{PARTITIONS_AT_START}x")], set()),
        ([TopicPartition("t", 0, 5, metadata=f"{PARTITIONS_AT_START}-1")], set()),
        ([TopicPartition("t", 0, 5, metadata=f"{PARTITIONS_AT_START}+1")], set()),
        ([TopicPartition("t", 0, 5, metadata=f"{PARTITIONS_AT_START} 1")], set()),
        ([TopicPartition("t", 0, 5, metadata=f"{PARTITIONS_AT_START}0_1")], set()),
        ([TopicPartition("t", 0, 5, metadata=f"{PARTITIONS_AT_START}\u0661")], set()),
        ([TopicPartition("t", 0, -1001, metadata=two)], set()),  # no offset
        ([TopicPartition("u", 0, 5, metadata=two)], set()),  # another topic
    ]

    for siblings, expected in cases:
        assert added_partitions(uncommitted, siblings) == expected, siblings


def test_sibling_partitions_below_highest() -> None:
    uncommitted = [TopicPartition("t", 3), TopicPartition("t", 1)]

    siblings = sibling_partitions(uncommitted)

    assert [(tp.topic, tp.partition) for tp in siblings] == [
        ("t", 0),
        ("t", 1),
        ("t", 2),
    ]
    assert sibling_partitions([TopicPartition("t", 0)]) == []


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
