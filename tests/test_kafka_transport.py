"""KafkaSource and KafkaSink against librdkafka's in-process mock cluster.

The mock cluster is a fast stand-in for unit tests only; the end-to-end tests
use the real broker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import unittest.mock
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from prometheus_client import REGISTRY

from agogosml.config import MAX_DELIVERY_TIMEOUT_MS, MAX_LINGER_MS, KafkaSettings
from agogosml.envelope import Envelope, Position
from agogosml.errors import SinkError, SourceError
from agogosml.transports.kafka import KafkaSink, KafkaSource, topic_limit
from agogosml.transports.kafka import health as health_module
from agogosml.transports.kafka import source as kafka_source_module
from agogosml.transports.kafka.records import record_size
from agogosml.transports.kafka.sink import is_retriable
from agogosml.transports.kafka.topic_limit import TopicSizeLimit
from agogosml_cli.local import free_port


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


def size_of(envelope: Envelope) -> int:
    return record_size(envelope.value, envelope.key, envelope.record_headers())


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


async def test_sink_connected_once_a_record_is_acknowledged(
    mock_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No statistics during the test: only the acknowledgement shows a broker.
    monkeypatch.setattr(health_module, "STATS_INTERVAL_MS", 600_000)
    sink = KafkaSink(KafkaSettings(bootstrap_servers=mock_bootstrap), "sink-proof")

    async with sink:
        before = sink.connected
        await sink.send([Envelope(value=b"1", id="m1")])
        after = sink.connected

    assert (before, after) == (False, True)


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


async def test_source_stopped_before_statistics_commits(
    mock_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No statistics report comes within the test, as when a source stops
    # within STATS_INTERVAL_MS of its start: it still commits what it finished.
    monkeypatch.setattr(health_module, "STATS_INTERVAL_MS", 600_000)
    topic = "source-quick-stop"
    produce(mock_bootstrap, topic, 5)
    settings = KafkaSettings(bootstrap_servers=mock_bootstrap, group_id="g-quick")
    source = KafkaSource(settings, [topic])

    async with source:
        for envelope in await fetch_all(source, 5):
            source.ack(envelope)

    assert committed(mock_bootstrap, "g-quick", topic) == 5


async def test_failed_rebalance_callback_stops_fetch(
    mock_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = "source-assign-fails"
    produce(mock_bootstrap, topic, 1)
    settings = KafkaSettings(bootstrap_servers=mock_bootstrap, group_id="g-assign")
    source = KafkaSource(settings, [topic])

    def fail(topic: str, partition: int) -> None:
        raise RuntimeError(f"cannot track {topic}[{partition}]")

    monkeypatch.setattr(source._tracker, "assign", fail)
    async with asyncio.timeout(30):
        async with source:
            with pytest.raises(SourceError) as raised:
                while True:
                    await source.fetch(10, 0.1)

    message = str(raised.value)
    assert "a rebalance of consumer group 'g-assign' failed" in message
    assert f"cannot track {topic}[0]" in message
    assert not raised.value.retriable


async def test_missing_input_topic_named_until_created(mock_bootstrap: str) -> None:
    topic = "not-created-yet"
    settings = KafkaSettings(bootstrap_servers=mock_bootstrap, group_id="g-missing")
    source = KafkaSource(settings, [topic])

    async with source:
        async with asyncio.timeout(30):
            while source.connected or "not found" not in source.unavailable_reason:
                await source.fetch(10, 0.1)
        reason = source.unavailable_reason
        produce(mock_bootstrap, topic, 1)
        async with asyncio.timeout(30):
            while not source.connected:
                await source.fetch(10, 0.1)

    assert reason == (
        f"input topic {topic} not found on the brokers; check READER_INPUT, or "
        "create the topic"
    )


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


async def test_partitions_lost_while_paused_resume(mock_bootstrap: str) -> None:
    topic = "source-lost-paused"
    produce(mock_bootstrap, topic, 1)
    settings = KafkaSettings(bootstrap_servers=mock_bootstrap, group_id="g-lost")
    source = KafkaSource(settings, [topic])

    async with source:
        await fetch_all(source, 1)  # join the group and get the assignment
        consumer = source._consumer
        assert consumer is not None
        partitions = consumer.assignment()
        await source.pause()
        # The session times out while the source is paused (a long broker
        # outage): the partitions are lost, and the resume finds none.
        await source._call(source._on_lost, consumer, partitions)
        await source.resume()
        await source._call(source._on_assign, consumer, partitions)
        produce(mock_bootstrap, topic, 3)
        after = await fetch_all(source, 4)

    # Nothing was committed, so the partition is read again from its start.
    assert [e.position.offset for e in after if e.position] == [0, 1, 2, 3]


def consume_until(bootstrap: str, topic: str, group: str, last: bytes) -> list[bytes]:
    """Return the values in `topic` up to `last`, plus any that follow within 1 s."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    try:
        for _ in range(100):
            messages = consumer.consume(100, 0.2)
            values.extend(m.value() for m in messages if m.error() is None)
            if last in values:
                break
        values.extend(m.value() for m in consumer.consume(100, 1) if not m.error())
    finally:
        consumer.close()
    return values


async def test_sink_oversized_record_writes_nothing(mock_bootstrap: str) -> None:
    topic = "sink-oversized"
    settings = KafkaSettings(
        bootstrap_servers=mock_bootstrap, extra_config={"message.max.bytes": 2000}
    )
    sink = KafkaSink(settings, topic)
    batch = [
        Envelope(value=b'{"n": 1}', id="small-1"),
        Envelope(value=b"x" * 3000, id="big-2"),
        Envelope(value=b'{"n": 3}', id="small-3"),
    ]

    async with sink:
        with pytest.raises(SinkError) as caught:
            await sink.send(batch)
        await sink.send([Envelope(value=b'{"n": 4}', id="after")])

    error = caught.value
    assert error.retriable is False
    assert "'big-2'" in str(error)
    assert f"{size_of(batch[1])} bytes" in str(error)
    assert "message.max.bytes=2000" in str(error)
    written = consume_until(mock_bootstrap, topic, "g-oversized", b'{"n": 4}')
    assert written == [b'{"n": 4}']


def test_record_size_matches_librdkafka(mock_bootstrap: str) -> None:
    limit = 1000
    producer = Producer(
        {"bootstrap.servers": mock_bootstrap, "message.max.bytes": limit}
    )
    shapes = [
        {"key": None, "headers": []},
        {"key": b"k" * 10, "headers": []},
        {"key": b"card-7", "headers": [("model-version", b"3"), ("empty", b"")]},
        {"key": None, "headers": [("h" * 70, b"v" * 200)]},
    ]

    for shape in shapes:
        envelope = Envelope(value=b"", id="id-1", **shape)
        fixed = size_of(envelope)
        largest = Envelope(value=b"x" * (limit - fixed), id="id-1", **shape)
        too_large = Envelope(value=b"x" * (limit - fixed + 1), id="id-1", **shape)
        producer.produce(
            "t", value=largest.value, key=largest.key, headers=largest.record_headers()
        )
        with pytest.raises(KafkaException) as caught:
            producer.produce(
                "t",
                value=too_large.value,
                key=too_large.key,
                headers=too_large.record_headers(),
            )

        assert size_of(largest) == limit
        assert caught.value.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
    producer.purge()
    assert producer.flush(5) == 0


class FailingProducer:
    """A producer wrapper whose produce calls raise from the `fail_at`-th on."""

    def __init__(self, producer: Producer, fail_at: int) -> None:
        self._producer = producer
        self._calls_left = fail_at
        self.produced = 0
        self.delivered = 0

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self._calls_left -= 1
        if self._calls_left <= 0:
            raise KafkaException(KafkaError(KafkaError._INVALID_ARG))
        on_delivery = kwargs.pop("on_delivery")

        def count_delivery(error: Any, message: Any) -> None:
            self.delivered += 1
            on_delivery(error, message)

        self._producer.produce(*args, on_delivery=count_delivery, **kwargs)
        self.produced += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def __len__(self) -> int:
        return len(self._producer)


async def test_sink_produce_error_waits_for_earlier(mock_bootstrap: str) -> None:
    topic = "sink-produce-error"
    sink = KafkaSink(KafkaSettings(bootstrap_servers=mock_bootstrap), topic)
    batch = [Envelope(value=b'{"n": %d}' % n) for n in range(3)]

    async with sink:
        real_producer = sink._producer
        failing = FailingProducer(real_producer, fail_at=3)
        sink._producer = failing
        try:
            with pytest.raises(SinkError) as caught:
                await sink.send(batch)
            delivered_before_error = failing.delivered
        finally:
            sink._producer = real_producer

    assert failing.produced == 2
    assert f"producing record {batch[2].id!r}" in str(caught.value)
    assert caught.value.retriable is False
    assert delivered_before_error == 2


async def test_sink_reads_hexadecimal_message_max_bytes(mock_bootstrap: str) -> None:
    settings = KafkaSettings(
        bootstrap_servers=mock_bootstrap,
        extra_config={"message.max.bytes": "0x100000"},
    )
    sink = KafkaSink(settings, "sink-hexadecimal")
    fixed = size_of(Envelope(value=b"", id="big"))
    too_large = Envelope(value=b"x" * (1_048_577 - fixed), id="big")

    async with sink:
        with pytest.raises(SinkError) as caught:
            await sink.send([too_large])
        await sink.send([Envelope(value=b'{"n": 1}')])

    assert size_of(too_large) == 1_048_577
    assert "message.max.bytes=1048576" in str(caught.value)
    assert caught.value.retriable is False


async def test_sink_takes_records_of_a_default_topic(mock_bootstrap: str) -> None:
    # Over librdkafka's default message.max.bytes of 1,000,000, within Apache
    # Kafka's default topic limit of 1,048,588.
    sink = KafkaSink(KafkaSettings(bootstrap_servers=mock_bootstrap), "sink-1mib")
    fixed = size_of(Envelope(value=b"", id="big"))
    fits = Envelope(value=b"x" * (1_040_000 - fixed), id="big")
    too_large = Envelope(value=b"x" * (1_048_589 - fixed), id="bigger")

    async with sink:
        await sink.send([fits])
        with pytest.raises(SinkError) as caught:
            await sink.send([too_large])

    assert "message.max.bytes=1048588" in str(caught.value)


async def test_sink_accepts_maximum_timeouts(mock_bootstrap: str) -> None:
    settings = KafkaSettings(
        bootstrap_servers=mock_bootstrap,
        delivery_timeout_ms=MAX_DELIVERY_TIMEOUT_MS,
        linger_ms=MAX_LINGER_MS,
    )

    async with KafkaSink(settings, "sink-maximum-timeouts") as sink:
        started = sink._producer is not None

    assert started


async def test_unreachable_broker_failure_is_retriable() -> None:
    settings = KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{free_port()}", delivery_timeout_ms=1000
    )
    sink = KafkaSink(settings, "nowhere")

    loop = asyncio.get_running_loop()
    began = loop.time()
    async with sink:
        start_seconds = loop.time() - began
        with pytest.raises(SinkError) as caught:
            await sink.send([Envelope(value=b"{}")])
        reason = sink.unavailable_reason
        topic_limit = sink.topic_max_message_bytes

    assert start_seconds < 1.0
    assert topic_limit is None
    assert caught.value.retriable is True
    assert f"not connected to the brokers at {settings.bootstrap_servers}" in reason
    assert "Connection refused" in reason


@pytest.mark.parametrize(
    ("code", "retriable"),
    [
        (KafkaError._MSG_TIMED_OUT, True),
        (KafkaError.NOT_ENOUGH_REPLICAS, True),
        (KafkaError._TRANSPORT, True),
        (KafkaError.MSG_SIZE_TOO_LARGE, False),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, True),
        (KafkaError.INVALID_RECORD, False),
    ],
)
def test_kafka_error_retriable_by_code(code: int, retriable: bool) -> None:
    assert is_retriable(KafkaError(code)) is retriable


async def test_write_denied_retriable_with_fix() -> None:
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    sink = KafkaSink(settings, "scores")
    envelope = Envelope(value=b'{"n": 1}', id="m-1")
    denied = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)

    error = await sink._delivery_error([denied], [(envelope, [])])

    assert error.retriable is True
    assert error.failures == {}
    assert "may not write to topic 'scores'" in str(error)
    assert "grant it the Write and Describe operations" in str(error)


def test_write_denied_at_produce_names_fix() -> None:
    class DeniedProducer:
        """A producer whose topic librdkafka already marked as not writable."""

        def produce(self, *args: Any, **kwargs: Any) -> None:
            raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))

    sink = KafkaSink(KafkaSettings(bootstrap_servers="127.0.0.1:1"), "scores")
    envelope = Envelope(value=b'{"n": 1}', id="m-1")

    with pytest.raises(SinkError) as caught:
        sink._produce(DeniedProducer(), envelope, [], unittest.mock.Mock())  # type: ignore[arg-type]

    assert caught.value.retriable is True
    assert "grant it the Write and Describe operations" in str(caught.value)


async def test_topic_limit_failure_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def denied(self: TopicSizeLimit) -> int:
        raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))

    monkeypatch.setattr(TopicSizeLimit, "_describe", denied)
    changes: list[int] = []
    limit = TopicSizeLimit({}, "scores", changes.append)

    with caplog.at_level(logging.DEBUG, logger=topic_limit.__name__):
        for _ in range(3):
            await limit.refresh(max_age_seconds=0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    delays = []
    for failures in range(1, 8):
        limit._failures = failures
        delays.append(limit._next_read_delay())

    assert limit.value is None
    assert changes == []
    assert len(warnings) == 1
    assert (
        "cannot read max.message.bytes of kafka topic 'scores'" in warnings[0].message
    )
    assert "Allow the DescribeConfigs operation" in warnings[0].message
    assert delays == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0]


async def test_missing_topic_named_in_log_and_delivery_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    found = False

    async def describe(self: TopicSizeLimit) -> int:
        if not found:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
        return 1_000_000

    monkeypatch.setattr(TopicSizeLimit, "_describe", describe)
    sink = KafkaSink(KafkaSettings(bootstrap_servers="127.0.0.1:1"), "scores")

    with caplog.at_level(logging.WARNING, logger=topic_limit.__name__):
        await sink._topic_limit.refresh(max_age_seconds=0)
    error = await sink._delivery_error([KafkaError(KafkaError._MSG_TIMED_OUT)], [])
    found = True
    await sink._topic_limit.refresh(max_age_seconds=0)

    assert "kafka topic 'scores' does not exist" in caplog.text
    assert "Topic 'scores' does not exist, and the broker did not create" in str(error)
    assert error.retriable
    assert not sink._topic_limit.missing


async def test_topic_limit_reads_at_most_every_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[str] = []

    async def describe(self: TopicSizeLimit) -> int:
        reads.append("read")
        return 10_000

    monkeypatch.setattr(TopicSizeLimit, "_describe", describe)
    changes: list[int] = []
    limit = TopicSizeLimit({}, "scores", changes.append)

    await limit.refresh()
    await limit.refresh()
    await limit.refresh(max_age_seconds=0)

    assert len(reads) == 2
    assert limit.value == 10_000
    assert changes == [10_000]


async def test_topic_limit_stop_releases_waiting_refresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reading = asyncio.Event()

    async def slow(self: TopicSizeLimit) -> int:
        reading.set()
        await asyncio.sleep(60)
        return 10_000

    monkeypatch.setattr(TopicSizeLimit, "_describe", slow)
    limit = TopicSizeLimit({}, "scores", lambda value: None)
    waiting = asyncio.create_task(limit.refresh(max_age_seconds=0))
    await reading.wait()

    await limit.stop()
    await asyncio.wait_for(waiting, 1)

    assert not waiting.cancelled()
    assert limit.value is None


class FakeMessage:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return b"{}"

    def key(self) -> None:
        return None

    def headers(self) -> None:
        return None


class RevokingConsumer:
    """Returns one message, then revokes its partition while draining the rest."""

    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    def consume(self, count: int, timeout: float) -> list[FakeMessage]:
        if count == 1:
            return [FakeMessage(0)]
        self._source._tracker.revoke("in", 0)
        self._source._tracker.assign("in", 0)
        return [FakeMessage(0), FakeMessage(1)]


async def test_rebalance_between_consume_calls_marks_stale() -> None:
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", group_id="g-stale")
    source = KafkaSource(settings, ["in"])
    source._tracker.assign("in", 0)
    source._consumer = RevokingConsumer(source)  # type: ignore[assignment]

    stale, *fresh = await source.fetch(500, 0.1)

    assert stale.position is not None
    assert not source.owns(stale)
    assert [source.owns(envelope) for envelope in fresh] == [True, True]
    source.ack(stale)  # an ack of a stale message is ignored, not an error
    for envelope in fresh:
        source.ack(envelope)
    assert source._tracker.committable() == {("in", 0): 2}


class RevokeAfterMessagesConsumer:
    """Returns messages that a call collected before it served a revocation.

    librdkafka serves a rebalance callback in the middle of a ``consume`` call
    and returns the messages collected before it, unless a version barrier of
    the partition purged them before the call ended. The partition here stays
    revoked, as it does until the group's next assignment.
    """

    def __init__(self, source: KafkaSource) -> None:
        self._source = source
        self.commits: list[list[TopicPartition]] = []

    def consume(self, count: int, timeout: float) -> list[FakeMessage]:
        if count == 1:
            return [FakeMessage(5)]
        collected = [FakeMessage(6), FakeMessage(7)]
        self._source._tracker.revoke("in", 0)
        return collected

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append(offsets)


@pytest.mark.parametrize("reset", ["earliest", "latest"])
async def test_revocation_within_consume_marks_stale(reset: str) -> None:
    settings = KafkaSettings(
        bootstrap_servers="127.0.0.1:1",
        group_id="g-stale-within",
        auto_offset_reset=reset,
    )
    source = KafkaSource(settings, ["in"])
    generation = source._tracker.assign("in", 0)
    source._started[("in", 0)] = generation  # messages before 5 were read
    consumer = RevokeAfterMessagesConsumer(source)
    source._consumer = consumer  # type: ignore[assignment]

    envelopes = await source.fetch(500, 0.1)

    assert [envelope.position.offset for envelope in envelopes] == [5, 6, 7]  # type: ignore[union-attr]
    assert [source.owns(envelope) for envelope in envelopes] == [False] * 3
    # The revoked partition's new owner starts at the committed offset, so a
    # commit of offset 6 here would skip message 5.
    assert consumer.commits == []


async def test_source_stop_quick_when_broker_gone(caplog) -> None:
    # A cluster of its own, which stops when its last client is deleted.
    admin = AdminClient({"test.mock.num.brokers": "1"})
    brokers = admin.list_topics(timeout=10).brokers
    bootstrap = ",".join(f"{b.host}:{b.port}" for b in brokers.values())
    produce(bootstrap, "stop-in", 2)
    settings = KafkaSettings(bootstrap_servers=bootstrap, group_id="g-stop")
    source = KafkaSource(settings, ["stop-in"], revoke_timeout_seconds=1)
    await source.start()
    envelopes = await fetch_all(source, 2)
    source.ack(envelopes[0])
    await source.commit()

    del admin
    await asyncio.sleep(0.5)
    source.ack(envelopes[1])  # finished while no broker runs
    # A synchronous commit waited for the whole session timeout, 45 s.
    await asyncio.wait_for(source.stop(), 20)

    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("will be delivered again" in text for text in errors)


async def test_partition_reported_gone_stops_fetch(mock_bootstrap: str) -> None:
    produce(mock_bootstrap, "gone-in", 1)
    settings = KafkaSettings(bootstrap_servers=mock_bootstrap, group_id="g-gone")
    source = KafkaSource(settings, ["gone-in"])

    async with source:
        source._note_deleted_partition(
            KafkaError(KafkaError._UNKNOWN_PARTITION, "gone-in [0]: unknown partition")
        )
        with pytest.raises(SourceError) as raised:
            await source.fetch(10, 0.2)

    assert "an assigned input partition no longer exists" in str(raised.value)
    assert not raised.value.retriable


async def test_consumer_property_warns_no_producer(
    mock_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    # KAFKA_EXTRA_CONFIG reaches the consumer and the producers alike.
    settings = KafkaSettings(
        bootstrap_servers=mock_bootstrap,
        extra_config={"session.timeout.ms": 10_000},
    )

    with caplog.at_level(logging.DEBUG, logger="agogosml.transports.kafka"):
        async with KafkaSink(settings, "sink-consumer-property") as sink:
            await sink.send([Envelope(value=b"{}")])

    assert "session.timeout.ms is a consumer property" not in caplog.text


class BlockingCloseConsumer:
    """A consumer whose close waits, as librdkafka's waits for a commit."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def close(self) -> None:
        self.release.wait(30)


async def test_stop_bounds_close_after_unexpected_commit_error(monkeypatch) -> None:
    monkeypatch.setattr(kafka_source_module, "ABANDONED_CLOSE_SECONDS", 0.2)
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", group_id="g-close")
    source = KafkaSource(settings, ["in"])
    consumer = BlockingCloseConsumer()
    source._consumer = consumer  # type: ignore[assignment]

    def fail(timeout_seconds: float) -> None:
        raise RuntimeError("commit failed unexpectedly")

    monkeypatch.setattr(source, "_commit_final", fail)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(RuntimeError, match="commit failed unexpectedly"):
            await asyncio.wait_for(source.stop(), 10)
        stopped_after = loop.time() - started
    finally:
        consumer.release.set()

    assert stopped_after < 5
    assert source._consumer is None


def commits(outcome: str) -> float:
    labels = {"outcome": outcome}
    return REGISTRY.get_sample_value("agogosml_commits_total", labels) or 0.0


async def test_source_counts_committed_partitions(mock_bootstrap: str) -> None:
    topic = "source-counted"
    produce(mock_bootstrap, topic, 4)
    settings = KafkaSettings(
        bootstrap_servers=mock_bootstrap,
        group_id="g-counted",
        commit_interval_ms=3_600_000,  # the test commits explicitly
    )
    source = KafkaSource(settings, [topic])

    async with source:
        envelopes = await fetch_all(source, 4)
        before = commits("ok")
        source.ack(envelopes[0])
        await source.commit()
        await source.commit()  # nothing finished since, so nothing to commit
        after_one = commits("ok")
        for envelope in envelopes[1:]:
            source.ack(envelope)
    after_stop = commits("ok")

    assert after_one - before == 1
    assert after_stop - before == 2  # the final commit at shutdown
    assert committed(mock_bootstrap, "g-counted", topic) == 4


class FailingCommitConsumer:
    """A consumer whose commits fail, as when the group coordinator is gone."""

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        raise KafkaException(KafkaError(KafkaError.REQUEST_TIMED_OUT))


async def test_source_counts_failed_commits() -> None:
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", group_id="g-failing")
    source = KafkaSource(settings, ["in"])
    for partition in (0, 1):
        generation = source._tracker.assign("in", partition)
        position = Position("in", partition, 0, 1, generation)
        source._tracker.register(position)
        source._tracker.finish(position)
    source._consumer = FailingCommitConsumer()  # type: ignore[assignment]
    before = commits("error")

    with pytest.raises(KafkaException):
        await source.commit()
    with pytest.raises(KafkaException):
        source._commit_async()
    no_offset = KafkaError(KafkaError._NO_OFFSET)
    source._committing[("in", 0)] = 1
    source._on_commit(no_offset, [TopicPartition("in", 0, 1)])
    source._committing[("in", 1)] = 1
    unavailable = KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE)
    source._on_commit(unavailable, [TopicPartition("in", 1, 1)])

    # Two partitions for each of the two commits, and one failed partition
    # in a commit result; a commit with nothing to commit is no failure.
    assert commits("error") - before == 5
    assert source._committed == {}


class FailingOncePoller:
    """A producer whose first poll raises, as when a callback raised."""

    def __init__(self, sink: KafkaSink) -> None:
        self._sink = sink
        self.polls = 0

    def poll(self, timeout: float) -> int:
        self.polls += 1
        if self.polls == 1:
            raise RuntimeError("callback failed")
        if self.polls == 3:
            self._sink._running = False
        return 0


def test_sink_polling_survives_failed_callback(caplog) -> None:
    sink = KafkaSink(KafkaSettings(bootstrap_servers="127.0.0.1:1"), "out")
    producer = FailingOncePoller(sink)
    sink._producer = producer  # type: ignore[assignment]
    sink._running = True

    sink._poll()

    assert producer.polls == 3
    assert "a kafka producer callback failed" in caplog.text


class UnconfirmedCommitConsumer:
    """A consumer whose asynchronous commits the brokers confirm only late."""

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        assert asynchronous

    def poll(self, timeout: float) -> None:
        time.sleep(timeout)


def test_final_commit_confirmed_late_counts_once() -> None:
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", group_id="g-late")
    source = KafkaSource(settings, ["in"])
    generation = source._tracker.assign("in", 0)
    position = Position("in", 0, 0, 1, generation)
    source._tracker.register(position)
    source._tracker.finish(position)
    source._consumer = UnconfirmedCommitConsumer()  # type: ignore[assignment]
    source._health.up = True
    before = commits("ok") + commits("error")

    source._commit_final(0.05)
    # The close() that follows serves the commit's result.
    source._on_commit(None, [TopicPartition("in", 0, 1)])

    assert source._skip_closing_commit
    assert commits("ok") + commits("error") - before == 1


class UncommittedPartitionConsumer:
    """A consumer of one partition without a committed offset."""

    def __init__(self, error: KafkaError | None = None) -> None:
        self.error = error

    def committed(
        self, partitions: list[TopicPartition], timeout: float
    ) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in partitions]

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float
    ) -> tuple[int, int]:
        return 0, 5

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        if self.error is not None:
            raise KafkaException(self.error)


@pytest.mark.parametrize(
    ("error", "outcome"),
    [(None, "ok"), (KafkaError(KafkaError.REQUEST_TIMED_OUT), "error")],
)
def test_source_counts_commit_of_partition_ends(
    error: KafkaError | None, outcome: str
) -> None:
    settings = KafkaSettings(
        bootstrap_servers="127.0.0.1:1", group_id="g-ends", auto_offset_reset="latest"
    )
    source = KafkaSource(settings, ["in"])
    consumer = UncommittedPartitionConsumer(error)
    before = commits(outcome)

    source._commit_ends(consumer, [TopicPartition("in", 0)])  # type: ignore[arg-type]

    assert commits(outcome) - before == 1
