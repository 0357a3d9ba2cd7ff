"""KafkaSink against the real broker on topics whose max.message.bytes is small.

The broker rejects a whole record batch over the topic's max.message.bytes.
These tests check that a record too large for the topic fails alone, and that
records which fit are written even when they are sent at the same time.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)
from fakes import MemorySink, MemorySource
from test_reader import reader_settings, running_reader

from agogosml.app import AppSettings, ModelApp
from agogosml.config import KafkaSettings, Transport, WriterSettings, load_settings
from agogosml.envelope import Envelope
from agogosml.errors import SinkError
from agogosml.reader.client import wait_backoff
from agogosml.transports.factory import build_sink
from agogosml.transports.kafka import KafkaSink
from agogosml.transports.kafka import topic_limit as topic_limit_module
from agogosml.transports.kafka.records import record_batch_size
from agogosml.transports.kafka.topic_limit import TopicSizeLimit
from agogosml.writer.service import OutputWriter

pytestmark = pytest.mark.kafka

TOPIC_LIMIT = 10_000
TIMEOUT_SECONDS = 30.0
#: Attempts and backoff of the input reader's defaults
#: (READER_RETRY_MAX_ATTEMPTS, READER_RETRY_INITIAL_BACKOFF_MS and
#: READER_RETRY_MAX_BACKOFF_MS).
ATTEMPTS = 8
INITIAL_BACKOFF_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 10.0

TopicFactory = Callable[[int], str]


@pytest.fixture
def limited_topic(kafka_bootstrap: str) -> Iterator[TopicFactory]:
    """Create one-partition topics with the given max.message.bytes."""
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created: list[str] = []

    def create(max_message_bytes: int) -> str:
        name = f"sink-limit-{uuid.uuid4().hex[:12]}"
        topic = NewTopic(
            name,
            num_partitions=1,
            replication_factor=1,
            config={"max.message.bytes": str(max_message_bytes)},
        )
        admin.create_topics([topic])[name].result(timeout=TIMEOUT_SECONDS)
        created.append(name)
        wait_for_leader(admin, name)
        return name

    yield create

    if created:
        for future in admin.delete_topics(created).values():
            future.result(timeout=TIMEOUT_SECONDS)


def wait_for_leader(admin: AdminClient, topic: str) -> None:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        metadata = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        if metadata is not None and metadata.error is None and metadata.partitions:
            if all(p.leader >= 0 for p in metadata.partitions.values()):
                return
        time.sleep(0.1)
    raise TimeoutError(f"topic {topic!r} got no leader in {TIMEOUT_SECONDS} s")


def set_topic_limit(bootstrap: str, topic: str, max_message_bytes: int) -> None:
    """Change the topic's max.message.bytes and wait until the broker applies it."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    entry = ConfigEntry(
        "max.message.bytes",
        str(max_message_bytes),
        incremental_operation=AlterConfigOpType.SET,
    )
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    admin.incremental_alter_configs([resource])[resource].result(timeout=30)
    # A record of exactly the new limit is accepted only once the log uses it,
    # and one byte more is rejected.
    producer = Producer({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if not produce_fits(producer, topic, largest_value(max_message_bytes) + 1):
            producer.purge()
            return
        time.sleep(0.2)
    raise TimeoutError(f"max.message.bytes of {topic!r} did not change")


def largest_value(
    limit: int, key: bytes | None = None, headers: list | None = None
) -> int:
    """Return the longest value whose record batch of one record fits `limit`."""
    length = limit
    while record_batch_size(b"x" * length, key, headers or []) > limit:
        length -= 1
    return length


def produce_fits(
    producer: Producer,
    topic: str,
    length: int,
    key: bytes | None = None,
    headers: list | None = None,
) -> bool:
    """Produce one record alone; return whether the broker accepted it."""
    errors: list[KafkaError | None] = []
    producer.produce(
        topic,
        value=b"x" * length,
        key=key,
        headers=headers,
        on_delivery=lambda error, _message: errors.append(error),
    )
    assert producer.flush(TIMEOUT_SECONDS) == 0
    if errors[0] is not None:
        assert errors[0].code() == KafkaError.MSG_SIZE_TOO_LARGE, errors[0]
    return errors[0] is None


def topic_values(bootstrap: str, topic: str) -> list[bytes]:
    """Return every value in the one-partition `topic`, up to its end."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                return values
            if error is None:
                values.append(message.value())
    finally:
        consumer.close()
    raise TimeoutError(f"did not reach the end of {topic!r}")


async def started_sink(bootstrap: str, topic: str) -> KafkaSink:
    """Start a sink and wait until it is connected and has read the topic's limit."""
    sink = KafkaSink(load_settings(KafkaSettings, bootstrap_servers=bootstrap), topic)
    await sink.start()
    async with asyncio.timeout(TIMEOUT_SECONDS):
        while not (sink.connected and sink.topic_max_message_bytes is not None):
            await asyncio.sleep(0.05)
    return sink


async def send_with_retries(sink: KafkaSink, envelope: Envelope) -> SinkError | None:
    """Send as the input reader retries: again after a retriable error.

    Returns the last error, or None once the record was written.
    """
    error: SinkError | None = None
    for attempt in range(1, ATTEMPTS + 1):
        try:
            await sink.send([envelope])
        except SinkError as exc:
            error = exc
            if not exc.retriable:
                return error
            await wait_backoff(attempt, INITIAL_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS)
        else:
            return None
    return error


@pytest.fixture
async def sinks() -> AsyncIterator[list[KafkaSink]]:
    """Stop every sink that a test appends, also when the test fails."""
    started: list[KafkaSink] = []
    yield started
    for sink in started:
        await sink.stop()


def deny_describe_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make reading a topic's limit fail, as for a principal without permission."""

    async def denied(self: TopicSizeLimit) -> int:
        raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))

    monkeypatch.setattr(TopicSizeLimit, "_describe", denied)


async def test_missing_topic_warning_names_variable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def unknown_topic(self: TopicSizeLimit) -> int:
        raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))

    monkeypatch.setattr(TopicSizeLimit, "_describe", unknown_topic)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    sink = build_sink(Transport.KAFKA, "scores.dlq", variable="READER_DEAD_LETTER")
    assert isinstance(sink, KafkaSink)

    with caplog.at_level(logging.WARNING, logger=topic_limit_module.__name__):
        await sink._topic_limit._read_limit()

    assert sink._topic_limit.missing
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert "kafka topic 'scores.dlq' does not exist" in messages[0]
    assert messages[0].endswith("create the topic, or check READER_DEAD_LETTER")


def small_values(count: int, pad: int) -> list[bytes]:
    return [orjson.dumps({"n": n, "pad": "x" * pad}) for n in range(count)]


@pytest.mark.parametrize(
    ("key", "headers"),
    [
        (None, []),
        (b"k" * 20, []),
        (b"card-7", [("message-id", b"m" * 40), ("traceparent", b"t" * 55)]),
        (None, [("h" * 200, b"v" * 300), ("empty", None)]),
    ],
)
def test_record_batch_size_matches_broker(
    kafka_bootstrap: str,
    limited_topic: TopicFactory,
    key: bytes | None,
    headers: list,
) -> None:
    topic = limited_topic(TOPIC_LIMIT)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    length = largest_value(TOPIC_LIMIT, key, headers)

    largest_fits = produce_fits(producer, topic, length, key, headers)
    one_more_fits = produce_fits(producer, topic, length + 1, key, headers)

    assert record_batch_size(b"x" * length, key, headers) == TOPIC_LIMIT
    assert largest_fits
    assert not one_more_fits


async def writer_unaware_of_limit(
    kafka_bootstrap: str,
    limited_topic: TopicFactory,
    sinks: list[KafkaSink],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[str, KafkaSink, OutputWriter]:
    """Return a topic with a small size limit, and a writer that cannot read it."""
    deny_describe_configs(monkeypatch)
    topic = limited_topic(TOPIC_LIMIT)
    sink = KafkaSink(
        load_settings(KafkaSettings, bootstrap_servers=kafka_bootstrap), topic
    )
    sinks.append(sink)
    await sink.start()
    return topic, sink, OutputWriter(load_settings(WriterSettings, output=topic), sink)


async def stream_two_through_app(
    writer: OutputWriter,
    source: MemorySource,
    dead_letter: MemorySink,
    batch_max_messages: int,
    **app_options: Any,
) -> None:
    """Stream the two messages of `source` through an app that returns each value.

    The reader tries each request twice, and `batch_max_messages` above 1
    sends both messages in one batch.
    """
    settings = reader_settings(
        "http://127.0.0.1:1",
        input="input",
        stop_at_end=False,
        retry_max_attempts=2,
        app_ready_path="/readyz",
        batch_max_messages=batch_max_messages,
        batch_max_wait_ms=200,
    )
    async with TestServer(writer.build_app()) as writer_server:
        app_settings = AppSettings(
            writer_url=str(writer_server.make_url("")), **app_options
        )
        async with (
            ModelApp(lambda values: values).running(app_settings) as app,
            TestServer(app) as app_server,
        ):
            settings = settings.model_copy(
                update={"app_url": str(app_server.make_url(""))}
            )
            async with running_reader(settings, source, dead_letter):
                deadline = time.monotonic() + TIMEOUT_SECONDS
                while source.committed != {("input", 0): 2}:
                    assert time.monotonic() < deadline, source.committed
                    await asyncio.sleep(0.1)


async def test_writer_rejects_only_oversized_record(
    kafka_bootstrap: str, limited_topic: TopicFactory, sinks: list[KafkaSink]
) -> None:
    topic = limited_topic(TOPIC_LIMIT)
    sink = await started_sink(kafka_bootstrap, topic)
    sinks.append(sink)
    settings = load_settings(WriterSettings, sink="kafka", output=topic)
    writer = OutputWriter(settings, sink)
    # 30 records of about 900 bytes make batches over the limit unless the
    # producer's batch.size fits the topic.
    small = small_values(30, 900)
    big = orjson.dumps({"pad": "x" * 20_000})

    async with TestClient(TestServer(writer.build_app())) as client:

        async def post(value: bytes) -> tuple[int, dict]:
            response = await client.post(
                "/", data=value, headers={"Content-Type": "application/json"}
            )
            return response.status, await response.json()

        results = await asyncio.gather(*(post(value) for value in [*small, big]))
    *small_results, (big_status, big_body) = results
    written = topic_values(kafka_bootstrap, topic)

    assert sink.topic_max_message_bytes == TOPIC_LIMIT
    assert [status for status, _ in small_results] == [200] * len(small)
    assert big_status == 422
    assert (
        f"over max.message.bytes={TOPIC_LIMIT} of topic {topic!r}" in big_body["error"]
    )
    assert "raise max.message.bytes of the topic" in big_body["error"]
    assert sorted(written) == sorted(small)


async def test_oversized_record_in_request_writes_nothing(
    kafka_bootstrap: str, limited_topic: TopicFactory, sinks: list[KafkaSink]
) -> None:
    topic = limited_topic(TOPIC_LIMIT)
    sink = await started_sink(kafka_bootstrap, topic)
    sinks.append(sink)
    batch = [
        Envelope(value=b'{"n": 1}', id="small-1"),
        Envelope(value=b"x" * 20_000, id="big-2"),
        Envelope(value=b'{"n": 3}', id="small-3"),
    ]

    with pytest.raises(SinkError) as caught:
        await sink.send(batch)
    await sink.send([Envelope(value=b'{"n": 4}', id="after")])
    written = topic_values(kafka_bootstrap, topic)

    assert caught.value.retriable is False
    assert list(caught.value.failures) == ["big-2"]
    assert "1 of 3 records are too large" in str(caught.value)
    assert written == [b'{"n": 4}']


async def test_size_error_retriable_while_limit_unknown(
    kafka_bootstrap: str,
    limited_topic: TopicFactory,
    sinks: list[KafkaSink],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    deny_describe_configs(monkeypatch)
    topic = limited_topic(TOPIC_LIMIT)
    sink = KafkaSink(
        load_settings(KafkaSettings, bootstrap_servers=kafka_bootstrap), topic
    )
    sinks.append(sink)
    small = [Envelope(value=value) for value in small_values(30, 50)]
    big = Envelope(value=b"x" * 20_000, id="big")

    with caplog.at_level(logging.WARNING, logger=topic_limit_module.__name__):
        await sink.start()
        errors = await asyncio.gather(
            *(send_with_retries(sink, envelope) for envelope in [*small, big])
        )
    *small_errors, big_error = errors
    written = topic_values(kafka_bootstrap, topic)

    assert sink.topic_max_message_bytes is None
    assert "cannot read max.message.bytes" in caplog.text
    assert small_errors == [None] * len(small)
    assert big_error is not None
    assert big_error.retriable is True
    assert big_error.size_rejected is True
    assert "Message size too large" in str(big_error)
    assert sorted(written) == sorted(envelope.value for envelope in small)


@pytest.mark.parametrize("batch_max_messages", [1, 2], ids=["single", "batch"])
async def test_oversized_result_dead_lettered_while_limit_unknown(
    kafka_bootstrap: str,
    limited_topic: TopicFactory,
    sinks: list[KafkaSink],
    monkeypatch: pytest.MonkeyPatch,
    batch_max_messages: int,
) -> None:
    topic, sink, writer = await writer_unaware_of_limit(
        kafka_bootstrap, limited_topic, sinks, monkeypatch
    )
    source = MemorySource("input")
    source.add(orjson.dumps({"n": 0, "pad": "x" * 20_000}))
    source.add(orjson.dumps({"n": 1}))
    dead_letter = MemorySink()

    # In a batch, the valid result shares the writer request of the one too
    # large, and only that one may fail.
    await stream_two_through_app(writer, source, dead_letter, batch_max_messages)

    (record,) = dead_letter.envelopes
    headers = {name: value.decode() for name, value in record.headers}
    assert orjson.loads(record.value)["n"] == 0
    assert sink.topic_max_message_bytes is None
    assert headers["dlq.status"] == "503"
    assert "Message size too large" in headers["dlq.error"]
    assert topic_values(kafka_bootstrap, topic) == [b'{"n":1}']


async def test_oversized_result_alone_in_chunk(
    kafka_bootstrap: str,
    limited_topic: TopicFactory,
    sinks: list[KafkaSink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic, sink, writer = await writer_unaware_of_limit(
        kafka_bootstrap, limited_topic, sinks, monkeypatch
    )
    source = MemorySource("input")
    small = orjson.dumps({"n": 0, "pad": "y" * 5_000})
    source.add(small)
    source.add(orjson.dumps({"n": 1, "pad": "x" * 20_000}))
    dead_letter = MemorySink()

    # Each result fits one writer request alone, but not both together, so
    # the result too large for the topic is a writer request of its own.
    await stream_two_through_app(
        writer, source, dead_letter, 2, writer_max_body_bytes=24_000
    )

    dead_lettered = [
        orjson.loads(record.value)["n"] for record in dead_letter.envelopes
    ]
    written = topic_values(kafka_bootstrap, topic)

    assert dead_lettered == [1]
    assert written == [orjson.dumps(orjson.loads(small))]


async def test_raised_topic_limit_read_before_rejecting(
    kafka_bootstrap: str,
    limited_topic: TopicFactory,
    sinks: list[KafkaSink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(topic_limit_module, "MIN_READ_INTERVAL_SECONDS", 0.0)
    topic = limited_topic(TOPIC_LIMIT)
    sink = await started_sink(kafka_bootstrap, topic)
    sinks.append(sink)
    set_topic_limit(kafka_bootstrap, topic, 50_000)
    big = Envelope(value=b"x" * 20_000, id="big")

    error = await send_with_retries(sink, big)

    assert error is None
    assert sink.topic_max_message_bytes == 50_000
    assert topic_values(kafka_bootstrap, topic) == [big.value]


async def test_lowered_topic_limit_rejects_after_delivery(
    kafka_bootstrap: str,
    limited_topic: TopicFactory,
    sinks: list[KafkaSink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(topic_limit_module, "MIN_READ_INTERVAL_SECONDS", 0.0)
    topic = limited_topic(50_000)
    sink = await started_sink(kafka_bootstrap, topic)
    sinks.append(sink)
    set_topic_limit(kafka_bootstrap, topic, TOPIC_LIMIT)
    big = Envelope(value=b"x" * 20_000, id="big")
    small = [Envelope(value=value) for value in small_values(30, 900)]

    with pytest.raises(SinkError) as caught:
        await sink.send([big])
    # No retries here: the replaced producer must batch them within the limit.
    small_errors = await asyncio.gather(
        *(sink.send([envelope]) for envelope in small), return_exceptions=True
    )
    written = topic_values(kafka_bootstrap, topic)

    assert "Message size too large" in str(caught.value)
    assert f"over max.message.bytes={TOPIC_LIMIT}" in str(caught.value)
    assert caught.value.retriable is False
    assert list(caught.value.failures) == ["big"]
    assert sink.topic_max_message_bytes == TOPIC_LIMIT
    assert small_errors == [None] * len(small)
    assert sorted(written) == sorted(envelope.value for envelope in small)


async def test_compressed_record_left_to_broker(
    kafka_bootstrap: str, limited_topic: TopicFactory, sinks: list[KafkaSink]
) -> None:
    topic = limited_topic(TOPIC_LIMIT)
    settings = load_settings(
        KafkaSettings,
        bootstrap_servers=kafka_bootstrap,
        extra_config={"compression.type": "lz4"},
    )
    sink = KafkaSink(settings, topic)
    sinks.append(sink)
    await sink.start()
    # Over the limit uncompressed, far below it compressed.
    compressible = Envelope(value=b"x" * 20_000, id="compressible")

    async with asyncio.timeout(TIMEOUT_SECONDS):
        while sink.topic_max_message_bytes is None:
            await asyncio.sleep(0.05)
    await sink.send([compressible])

    assert topic_values(kafka_bootstrap, topic) == [compressible.value]
