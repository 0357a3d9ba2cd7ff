"""A group that starts at the end of the log keeps the messages it left unfinished.

With ``KAFKA_AUTO_OFFSET_RESET=latest`` and no committed offset, a reader that
stops, or dies, before any message finished must still have committed where it
started. Otherwise the next reader of the group starts at the end of the log
again, past the messages the first one read. These tests use librdkafka's mock
cluster, and a stand-in consumer for a commit that fails.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from fakes import MemorySink
from test_reader import accept, reader_settings, running_reader, stub_app, wait_for

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope, Position
from agogosml.transports.kafka import KafkaSource, source

TOPIC = "latest-in"
GROUP = "g-latest"
#: Time for a new consumer to look up the end of the log ("latest") after its
#: assignment, before the test produces records that must come after it.
RESOLVE_SECONDS = 2.0


def mock_cluster() -> tuple[AdminClient, str]:
    admin = AdminClient({"test.mock.num.brokers": "1"})
    brokers = admin.list_topics(timeout=10).brokers
    return admin, ",".join(f"{b.host}:{b.port}" for b in brokers.values())


def produce(bootstrap: str, numbers: range) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for number in numbers:
        producer.produce(TOPIC, value=orjson.dumps({"n": number}), partition=0)
    assert producer.flush(10) == 0


def committed(bootstrap: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": GROUP})
    try:
        (partition,) = consumer.committed([TopicPartition(TOPIC, 0)], timeout=10)
        return int(partition.offset)
    finally:
        consumer.close()


async def wait_long(condition, seconds=30.0):
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


async def hold(received):
    """Keep every request open until the reader stops."""
    await asyncio.sleep(3600)


async def test_latest_reset_keeps_unfinished_messages():
    admin, bootstrap = mock_cluster()
    produce(bootstrap, range(-2, 0))  # creates the topic: offsets 0 and 1
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap,
        group_id=GROUP,
        auto_offset_reset="latest",
        # The mock cluster waits for a closed member's session before it
        # assigns the partition again.
        extra_config={"session.timeout.ms": 6000},
    )
    dead_letter = MemorySink()

    # The first reader reads n=0..4, the app keeps the first request open, and the
    # reader stops.
    async with stub_app(hold) as app:
        settings = reader_settings(
            app.url, input=TOPIC, stop_at_end=False, shutdown_timeout_ms=300
        )
        source = KafkaSource(kafka, [TOPIC], revoke_timeout_seconds=0.3)
        async with running_reader(settings, source, dead_letter) as (reader, _):
            await wait_long(lambda: source.tracker.generation(TOPIC, 0) > 0)
            await asyncio.sleep(RESOLVE_SECONDS)  # "latest" resolves to offset 2
            produce(bootstrap, range(0, 5))  # offsets 2..6
            await wait_for(lambda: reader.in_flight == 5 and len(app.requests) == 1)
    after_first = committed(bootstrap)

    # A second reader of the same group, with an app that accepts everything.
    async with stub_app(accept) as app:
        settings = reader_settings(app.url, input=TOPIC, stop_at_end=False)
        source = KafkaSource(kafka, [TOPIC], revoke_timeout_seconds=1)
        async with running_reader(settings, source, dead_letter) as (reader, _):
            await wait_long(lambda: source.tracker.generation(TOPIC, 0) > 0)
            await asyncio.sleep(RESOLVE_SECONDS)
            produce(bootstrap, range(5, 10))  # offsets 7..11
            await wait_long(lambda: len(app.accepted) >= 10)
            await asyncio.sleep(2.0)  # time for a duplicate to arrive
        delivered = sorted(app.numbers())
    after_second = committed(bootstrap)
    del admin

    assert after_first == 2  # where the first reader started: n=0
    assert delivered == list(range(10))
    assert dead_letter.envelopes == []
    assert after_second == 12


async def test_start_committed_before_the_first_request():
    """The start offset is durable before the app receives a message.

    A reader killed at any point after it read its first messages has
    committed where it started, even with periodic commits an hour apart.
    """
    admin, bootstrap = mock_cluster()
    produce(bootstrap, range(-2, 0))  # creates the topic: offsets 0 and 1
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap,
        group_id=GROUP,
        auto_offset_reset="latest",
        commit_interval_ms=3_600_000,
        extra_config={"session.timeout.ms": 6000},
    )
    seen_by_app: list[int] = []

    async def record_committed(received):
        seen_by_app.append(await asyncio.to_thread(committed, bootstrap))
        await asyncio.sleep(3600)

    async with stub_app(record_committed) as app:
        settings = reader_settings(
            app.url, input=TOPIC, stop_at_end=False, shutdown_timeout_ms=300
        )
        source_ = KafkaSource(kafka, [TOPIC], revoke_timeout_seconds=0.3)
        async with running_reader(settings, source_, MemorySink()) as (reader, _):
            await wait_long(lambda: source_.tracker.generation(TOPIC, 0) > 0)
            await asyncio.sleep(RESOLVE_SECONDS)  # "latest" resolves to offset 2
            produce(bootstrap, range(0, 3))  # offsets 2..4
            await wait_long(lambda: len(seen_by_app) == 1)
    del admin

    assert seen_by_app == [2]


def latest_settings(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        group_id=GROUP,
        auto_offset_reset="latest",
        # With the default 45 s session, the second member's join took longer
        # than the tests wait.
        extra_config={"session.timeout.ms": 6000},
    )


async def fetch_until_assigned(kafka_source: KafkaSource) -> None:
    """Fetch until the source has partition 0, which serves the assignment."""
    async with asyncio.timeout(30):
        while kafka_source.tracker.generation(TOPIC, 0) == 0:
            assert await kafka_source.fetch(10, 0.1) == []


async def fetch_offsets(kafka_source: KafkaSource, count: int) -> list[int]:
    """Fetch until `count` messages arrived; return their offsets."""
    envelopes: list[Envelope] = []
    async with asyncio.timeout(30):
        while len(envelopes) < count:
            envelopes.extend(await kafka_source.fetch(10, 0.1))
    return [e.position.offset for e in envelopes if e.position]


async def test_partition_never_fetched_keeps_its_start():
    """A reader stopped before it fetched a partition has committed its start.

    The next reader of the group then reads what was produced meanwhile,
    instead of starting at the end again.
    """
    admin, bootstrap = mock_cluster()
    produce(bootstrap, range(-2, 0))  # creates the topic: offsets 0 and 1
    kafka = latest_settings(bootstrap)

    first = KafkaSource(kafka, [TOPIC])
    async with first:
        await fetch_until_assigned(first)
    after_first = committed(bootstrap)
    produce(bootstrap, range(0, 3))  # offsets 2..4, while no reader runs
    second = KafkaSource(kafka, [TOPIC])
    async with second:
        offsets = await fetch_offsets(second, 3)
    del admin

    assert after_first == 2
    assert offsets == [2, 3, 4]


async def test_failed_start_lookup_holds_partition(monkeypatch):
    """A partition whose start cannot be committed is not read until it is."""
    monkeypatch.setattr(source, "START_COMMIT_RETRY_SECONDS", 0.2)
    admin, bootstrap = mock_cluster()
    produce(bootstrap, range(-2, 0))  # creates the topic: offsets 0 and 1
    reader = KafkaSource(latest_settings(bootstrap), [TOPIC])
    lookups: list[bool] = []
    commit_ends = reader._commit_ends

    def first_lookup_fails(consumer, partitions, *, quiet=False):
        lookups.append(quiet)
        if len(lookups) == 1:
            return None  # as when the coordinator request timed out
        return commit_ends(consumer, partitions, quiet=quiet)

    monkeypatch.setattr(reader, "_commit_ends", first_lookup_fails)
    async with reader:
        await fetch_until_assigned(reader)
        waiting = set(reader._start_pending)
        async with asyncio.timeout(30):
            while reader._start_pending:
                assert await reader.fetch(10, 0.1) == []
        produce(bootstrap, range(0, 3))  # offsets 2..4
        offsets = await fetch_offsets(reader, 3)
    after = committed(bootstrap)
    del admin

    assert (TOPIC, 0) in waiting
    assert lookups[:2] == [False, True]
    assert offsets == [2, 3, 4]
    # Where the partition started: nothing of it was finished.
    assert after == 2


class _Message:
    def __init__(self, partition: int, offset: int) -> None:
        self._partition = partition
        self._offset = offset

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


class _FailingCommits:
    """A consumer whose commits fail until `fail` is cleared.

    Seeks of the partitions in `unseekable` fail too.
    """

    def __init__(self, unseekable: tuple[int, ...] = ()) -> None:
        self.fail = True
        self.unseekable = unseekable
        self.commits: list[list[tuple[int, int]]] = []
        self.seeks: list[tuple[int, int]] = []

    def commit(self, *, offsets, asynchronous):
        assert asynchronous is False
        if self.fail:
            raise KafkaException(KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE))
        self.commits.append([(tp.partition, tp.offset) for tp in offsets])

    def seek(self, tp):
        if tp.partition in self.unseekable:
            raise KafkaException(KafkaError(KafkaError._STATE))
        self.seeks.append((tp.partition, tp.offset))


def source_with(consumer, monkeypatch) -> KafkaSource:
    monkeypatch.setattr(source, "START_COMMIT_RETRY_SECONDS", 0)
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:9", auto_offset_reset="latest")
    kafka_source = KafkaSource(kafka, [TOPIC])
    kafka_source._consumer = consumer
    for partition in (0, 1):
        kafka_source.tracker.assign(TOPIC, partition)
    return kafka_source


def test_failed_start_commit_holds_the_partition_back(monkeypatch):
    consumer = _FailingCommits()
    kafka_source = source_with(consumer, monkeypatch)
    fetched = [(_Message(0, 7), 1), (_Message(0, 8), 1), (_Message(1, 3), 1)]

    # Both partitions are new: neither commit went through, so both seek back
    # to their first message and nothing goes out.
    assert kafka_source._commit_starts(fetched) == []
    assert sorted(consumer.seeks) == [(0, 7), (1, 3)]

    consumer.fail = False
    assert kafka_source._commit_starts(fetched) == fetched
    assert sorted(consumer.commits[0]) == [(0, 7), (1, 3)]

    # Once committed, a partition's later messages need no commit of their own.
    later = [(_Message(0, 9), 1)]
    assert kafka_source._commit_starts(later) == later
    assert len(consumer.commits) == 1


def test_unseekable_partition_goes_on_without_later_start(monkeypatch):
    """A partition that cannot seek back never commits a later offset as its start."""
    consumer = _FailingCommits(unseekable=(1,))
    kafka_source = source_with(consumer, monkeypatch)
    fetched = [(_Message(0, 7), 1), (_Message(1, 3), 1), (_Message(1, 4), 1)]

    sent = kafka_source._commit_starts(fetched)

    assert sent == fetched[1:]
    consumer.fail = False
    later = [(_Message(0, 7), 1), (_Message(1, 5), 1)]
    assert kafka_source._commit_starts(later) == later
    assert consumer.commits == [[(0, 7)]]
    # The periodic commit takes the partition's first offset from the tracker.
    kafka_source.tracker.register_many([_position(1, 3), _position(1, 4)])
    assert kafka_source.tracker.committable()[(TOPIC, 1)] == 3


def test_revoked_partition_start_not_committed(monkeypatch):
    consumer = _FailingCommits()
    consumer.fail = False
    kafka_source = source_with(consumer, monkeypatch)
    kafka_source.tracker.revoke(TOPIC, 1)  # read before a rebalance took it
    fetched = [(_Message(0, 7), 1), (_Message(1, 3), 1)]

    assert kafka_source._commit_starts(fetched) == fetched
    assert consumer.commits == [[(0, 7)]]


def _position(partition: int, offset: int) -> Position:
    return Position(TOPIC, partition, offset, offset + 1, 1)


class _UnseekableConsumer:
    """A consumer whose fetch has not started, so librdkafka rejects a seek."""

    def __init__(self) -> None:
        self.resumed: list[list[int]] = []

    def seek(self, tp):
        raise KafkaException(KafkaError(KafkaError._STATE))

    def resume(self, partitions):
        self.resumed.append([tp.partition for tp in partitions])


def test_held_partition_released_when_seek_rejected(monkeypatch):
    consumer = _UnseekableConsumer()
    kafka_source = source_with(consumer, monkeypatch)
    kafka_source._start_pending = {(TOPIC, 0): TopicPartition(TOPIC, 0)}
    monkeypatch.setattr(
        kafka_source,
        "_commit_ends",
        lambda consumer, partitions, quiet: [TopicPartition(TOPIC, 0, 5)],
    )

    kafka_source._retry_starts()

    assert kafka_source._start_pending == {}
    assert kafka_source._committed[(TOPIC, 0)] == 5
    assert consumer.resumed == [[0]]


class _FailingLookup:
    """A consumer whose committed-offset lookup fails with `code`."""

    def __init__(self, code: int) -> None:
        self.code = code

    def committed(self, partitions, timeout):
        raise KafkaException(KafkaError(self.code))


@pytest.mark.parametrize(
    ("code", "level"),
    [(KafkaError._DESTROY, logging.DEBUG), (KafkaError._TIMED_OUT, logging.WARNING)],
)
def test_start_lookup_failure_level(monkeypatch, caplog, code, level):
    # _DESTROY ends the lookup of a consumer that closes, as in a normal stop.
    consumer = _FailingLookup(code)
    kafka_source = source_with(consumer, monkeypatch)

    with caplog.at_level(logging.DEBUG, logger="agogosml.transports.kafka"):
        ends = kafka_source._commit_ends(consumer, [TopicPartition(TOPIC, 0)])

    (record,) = [r for r in caplog.records if "cannot commit where" in r.message]
    assert ends is None
    assert record.levelno == level
