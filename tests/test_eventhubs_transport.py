"""Event Hubs source and sink against fakes of the SDK's consumer and producer.

The fakes (tests/eventhubs_fakes.py) follow the SDK's documented contracts;
the real service is exercised only by tests/test_pipeline_eventhubs.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import eventhubs_fakes
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from azure.eventhub import EventData
from azure.eventhub._pyamqp.error import AMQPLinkError, ErrorCondition
from azure.eventhub.amqp import AmqpAnnotatedMessage
from azure.eventhub.exceptions import (
    AuthenticationError,
    ConnectionLostError,
    EventDataError,
    EventDataSendError,
    EventHubError,
    OperationTimeoutError,
)
from eventhubs_fakes import (
    NAMESPACE,
    FakeConsumerClient,
    FakeHub,
    FakeProducerClient,
    RecordingCheckpointStore,
    offset_of,
)
from prometheus_client import REGISTRY
from pydantic import ValidationError

from agogosml.config import (
    EventHubSettings,
    ReaderSettings,
    WriterSettings,
    load_settings,
)
from agogosml.envelope import Envelope
from agogosml.errors import ConfigurationError, SinkError
from agogosml.transports.eventhubs import EventHubsSink, EventHubsSource, clients
from agogosml.transports.eventhubs import source as source_module
from agogosml.writer.service import OutputWriter

HUB = "input-hub"
CONNECTION_STRING = (
    "Endpoint=sb://test-namespace.servicebus.windows.net/;"
    "SharedAccessKeyName=pipeline;SharedAccessKey=dGVzdC1rZXk="
)
TIMEOUT_SECONDS = 5.0


def settings(**overrides: Any) -> EventHubSettings:
    values: dict[str, Any] = {
        "connection_string": CONNECTION_STRING,
        "checkpoint_interval_ms": 3_600_000,  # tests checkpoint explicitly
    }
    values.update(overrides)
    return EventHubSettings(**values)


def numbered(count: int, key: bytes | None = None) -> list[Envelope]:
    return [
        Envelope(value=orjson.dumps({"n": n}), key=key, id=f"m{n}")
        for n in range(count)
    ]


async def fetch_all(source: EventHubsSource, count: int) -> list[Envelope]:
    envelopes: list[Envelope] = []
    async with asyncio.timeout(TIMEOUT_SECONDS):
        while len(envelopes) < count:
            envelopes.extend(await source.fetch(count - len(envelopes), 0.05))
    return envelopes


async def wait_claimed(source: EventHubsSource, partition: int = 0) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        while source.tracker.generation(HUB, partition) == 0:
            await asyncio.sleep(0.002)


class Pipeline:
    """A hub, a checkpoint store and a started source on them."""

    def __init__(self, hub: FakeHub, store: RecordingCheckpointStore, **options: Any):
        self.hub = hub
        self.store = store
        self.consumer = FakeConsumerClient(hub, store, owned=["0"])
        self.source = EventHubsSource(
            settings(**options),
            hub.name,
            consumer=self.consumer,
            checkpoint_store=store,
        )


@pytest.fixture
async def pipeline() -> AsyncIterator[Pipeline]:
    started = Pipeline(FakeHub(HUB), RecordingCheckpointStore())
    await started.source.start()
    yield started
    await started.source.stop()


def fill(hub: FakeHub, count: int, partition_id: str = "0") -> None:
    for n in range(count):
        hub.add(partition_id, orjson.dumps({"n": n}))


# ---------------------------------------------------------------------------
# Source
# ---------------------------------------------------------------------------


async def test_source_envelopes_keep_ids_and_headers(pipeline: Pipeline) -> None:
    pipeline.hub.add("0", b'{"n": 0}', **{"message-id": "abc", "tenant": "t1"})
    pipeline.hub.add("0", b'{"n": 1}')

    first, second = await fetch_all(pipeline.source, 2)

    assert first.value == b'{"n": 0}'
    assert first.id == "abc"
    assert first.headers == [("tenant", b"t1")]
    assert first.position is not None
    assert (first.position.topic, first.position.partition) == (HUB, 0)
    assert (first.position.offset, first.position.next_offset) == (0, 1)
    assert second.id == f"{HUB}:0:1"


async def test_null_property_is_null_header(
    pipeline: Pipeline, producer: FakeProducerClient
) -> None:
    headers = [("Tombstoned-By", None), ("tenant", b"t1")]
    async with started_sink(producer) as sink:
        await sink.send([Envelope(value=b"{}", id="m1", headers=headers)])
    (partition,) = [p for p in producer.hub.partition_ids if producer.hub.partitions[p]]
    pipeline.hub.add("0", b"{}", **{"Tombstoned-By": None, "tenant": "t1"})  # type: ignore[arg-type]

    (envelope,) = await fetch_all(pipeline.source, 1)

    assert producer.hub.received(partition, 0).properties[b"Tombstoned-By"] is None
    assert envelope.headers == headers


def amqp_event(**body: object) -> EventData:
    event = EventData(b"")
    event._raw_amqp_message = AmqpAnnotatedMessage(**body)  # type: ignore[arg-type]
    return event


async def test_value_bodies_read_as_json(pipeline: Pipeline) -> None:
    pipeline.hub.append("0", amqp_event(value_body={"temp": 21.5}), None)
    pipeline.hub.append("0", amqp_event(value_body=42), None)
    pipeline.hub.append("0", amqp_event(value_body="text"), None)
    pipeline.hub.append("0", amqp_event(value_body=None), None)

    mapping, number, text, null = await fetch_all(pipeline.source, 4)

    assert orjson.loads(mapping.value) == {"temp": 21.5}
    assert number.value == b"42"
    assert text.value == b"text"
    assert null.null_value
    assert not any(e.problem for e in (mapping, number, text, null))


async def test_sequence_body_dead_lettered_partition_goes_on(
    pipeline: Pipeline,
) -> None:
    pipeline.hub.add("0", b'{"n": 0}')
    pipeline.hub.append("0", amqp_event(sequence_body=[[1, 2]]), None)
    pipeline.hub.add("0", b'{"n": 2}')

    first, sequence, last = await fetch_all(pipeline.source, 3)

    assert first.value == b'{"n": 0}'
    assert "AMQP sequence body" in sequence.problem
    assert sequence.position is not None
    assert sequence.position.offset == 1
    assert last.value == b'{"n": 2}'


async def test_checkpoint_only_contiguous_prefix(pipeline: Pipeline) -> None:
    fill(pipeline.hub, 5)
    envelopes = await fetch_all(pipeline.source, 5)

    for index in (0, 2, 3, 4):
        pipeline.source.ack(envelopes[index])
    await pipeline.source.checkpoint()
    written_while_one_open = pipeline.store.written()
    pipeline.source.ack(envelopes[1])
    await pipeline.source.checkpoint()
    await pipeline.source.checkpoint()

    assert written_while_one_open == [(0, offset_of(0))]
    assert pipeline.store.written() == [(0, offset_of(0)), (4, offset_of(4))]
    checkpoint = pipeline.store.updates[-1]
    assert checkpoint["eventhub_name"] == HUB
    assert checkpoint["consumer_group"] == "$Default"


async def test_nothing_finished_nothing_checkpointed(pipeline: Pipeline) -> None:
    fill(pipeline.hub, 3)
    envelopes = await fetch_all(pipeline.source, 3)

    pipeline.source.ack(envelopes[2])
    await pipeline.source.checkpoint()

    assert pipeline.store.updates == []


async def test_lost_partition_not_checkpointed(pipeline: Pipeline) -> None:
    fill(pipeline.hub, 4)
    envelopes = await fetch_all(pipeline.source, 4)
    pipeline.source.ack(envelopes[0])
    pipeline.source.ack(envelopes[1])

    await pipeline.consumer.lose("0")
    pipeline.source.ack(envelopes[2])
    await pipeline.source.checkpoint()

    assert pipeline.store.updates == []
    assert not pipeline.source.owns(envelopes[3])
    assert pipeline.source.tracker.committable() == {}


async def test_reclaimed_partition_redelivers(pipeline: Pipeline) -> None:
    fill(pipeline.hub, 4)
    envelopes = await fetch_all(pipeline.source, 4)
    pipeline.source.ack(envelopes[0])
    await pipeline.source.checkpoint()
    pipeline.source.ack(envelopes[1])

    await pipeline.consumer.lose("0")
    await pipeline.consumer.claim("0")
    again = await fetch_all(pipeline.source, 3)
    pipeline.source.ack(envelopes[2])  # from the lost claim: ignored
    for envelope in again:
        pipeline.source.ack(envelope)
    await pipeline.source.checkpoint()

    assert [e.position.offset for e in again if e.position] == [1, 2, 3]
    assert [e.id for e in again] == [e.id for e in envelopes[1:]]
    assert pipeline.store.written() == [(0, offset_of(0)), (3, offset_of(3))]


async def test_event_after_detach_not_delivered(monkeypatch, pipeline) -> None:
    monkeypatch.setattr(eventhubs_fakes, "CALLBACK_GRACE_SECONDS", 0.05)
    await wait_claimed(pipeline.source)
    await pipeline.source.pause()
    fill(pipeline.hub, 1)
    await asyncio.sleep(0.01)

    # The on_event call waiting for room outlives the partition's close, as
    # in the SDK when another reader's link takes the partition over.
    await pipeline.consumer.detach("0", ConnectionLostError("link stolen"))
    await pipeline.consumer.claim("0")
    await asyncio.sleep(0.01)
    await pipeline.source.resume()
    received = await fetch_all(pipeline.source, 1)
    extra = await pipeline.source.fetch(10, 0.1)

    assert len(received) == 1
    assert received[0].position is not None
    assert pipeline.source.owns(received[0])
    assert extra == []


async def test_shutdown_drains_then_checkpoints() -> None:
    hub, store = FakeHub(HUB), RecordingCheckpointStore()
    fill(hub, 3)
    started = Pipeline(hub, store)
    await started.source.start()
    envelopes = await fetch_all(started.source, 3)
    started.source.ack(envelopes[0])
    drained: list[list[tuple[str, int]]] = []

    async def finish_rest(partitions: list[tuple[str, int]]) -> None:
        drained.append(partitions)
        started.source.ack(envelopes[1])
        started.source.ack(envelopes[2])

    started.source.set_revoke_handler(finish_rest)
    await started.source.stop()

    assert drained == [[(HUB, 0)]]
    assert store.written() == [(0, offset_of(0)), (2, offset_of(2))]


class SlowFirstWriteStore(RecordingCheckpointStore):
    """A checkpoint store whose first write waits until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.started = 0

    async def update_checkpoint(
        self, checkpoint: dict[str, Any], **kwargs: Any
    ) -> None:
        self.started += 1
        if self.started == 1:
            await self.release.wait()
        await super().update_checkpoint(checkpoint, **kwargs)


async def test_stop_bounded_when_store_hangs(monkeypatch, caplog) -> None:
    class HangingStore(RecordingCheckpointStore):
        async def update_checkpoint(
            self, checkpoint: dict[str, Any], **kwargs: Any
        ) -> None:
            await asyncio.sleep(30)

    monkeypatch.setattr(source_module, "FINAL_CHECKPOINT_TIMEOUT_SECONDS", 0.5)
    hub = FakeHub(HUB)
    fill(hub, 3)
    started = Pipeline(hub, HangingStore())
    await started.source.start()
    for envelope in await fetch_all(started.source, 3):
        started.source.ack(envelope)
    began = time.monotonic()

    await started.source.stop()

    assert time.monotonic() - began < 5
    assert "timed out after 0.5 s" in caplog.text
    assert "partition closed without a final checkpoint" in caplog.text


async def test_stop_bounded_when_partition_close_hangs(monkeypatch, caplog) -> None:
    class HangingStore(RecordingCheckpointStore):
        async def update_checkpoint(
            self, checkpoint: dict[str, Any], **kwargs: Any
        ) -> None:
            await asyncio.sleep(30)

    monkeypatch.setattr(source_module, "FINAL_CHECKPOINT_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(source_module, "PROCESSOR_STOP_GRACE_SECONDS", 0.2)
    hub = FakeHub(HUB)
    fill(hub, 2)
    started = Pipeline(hub, HangingStore())
    await started.source.start()
    envelopes = await fetch_all(started.source, 2)

    async def finish_all(partitions: list[tuple[str, int]]) -> None:
        for envelope in envelopes:
            started.source.ack(envelope)

    # Nothing is finished before the stop, so the first checkpoint write is
    # the one of the partition's close, which the SDK shields from cancellation.
    started.source.set_revoke_handler(finish_all)
    began = time.monotonic()

    await started.source.stop()

    assert time.monotonic() - began < 5
    assert "timed out after 0.5 s" in caplog.text
    assert "did not stop within 0.2 s" in caplog.text


async def test_checkpoint_waits_for_slower_earlier_write() -> None:
    hub, store = FakeHub(HUB), SlowFirstWriteStore()
    fill(hub, 3)
    started = Pipeline(hub, store)
    await started.source.start()
    envelopes = await fetch_all(started.source, 3)
    started.source.ack(envelopes[0])
    earlier = asyncio.create_task(started.source.checkpoint())
    async with asyncio.timeout(TIMEOUT_SECONDS):
        while store.started == 0:
            await asyncio.sleep(0.002)
    started.source.ack(envelopes[1])
    started.source.ack(envelopes[2])
    later = asyncio.create_task(started.source.checkpoint())
    for _ in range(10):
        await asyncio.sleep(0)
    store.release.set()
    await asyncio.gather(earlier, later)
    await started.source.stop()

    # Written the other way round, the older checkpoint would be the last.
    assert store.written() == [(0, offset_of(0)), (2, offset_of(2))]


class FailingOnceStore(RecordingCheckpointStore):
    """A checkpoint store whose first write fails, as when its container is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def update_checkpoint(
        self, checkpoint: dict[str, Any], **kwargs: Any
    ) -> None:
        if not self.failed:
            self.failed = True
            raise OSError("the checkpoint container is gone")
        await super().update_checkpoint(checkpoint, **kwargs)


def commits(outcome: str) -> float:
    labels = {"outcome": outcome}
    return REGISTRY.get_sample_value("agogosml_commits_total", labels) or 0.0


async def test_checkpoint_outcomes_counted(caplog) -> None:
    hub, store = FakeHub(HUB), FailingOnceStore()
    fill(hub, 2)
    started = Pipeline(hub, store)
    await started.source.start()
    envelopes = await fetch_all(started.source, 2)
    ok_before, errors_before = commits("ok"), commits("error")
    started.source.ack(envelopes[0])

    await started.source._checkpoint_logged(None)
    failed = commits("ok") - ok_before, commits("error") - errors_before
    started.source.ack(envelopes[1])
    await started.source._checkpoint_logged(None)
    await started.source.stop()

    assert failed == (0, 1)
    assert "checkpoint failed, will retry: OSError" in caplog.text
    assert (commits("ok") - ok_before, commits("error") - errors_before) == (1, 1)
    assert store.written() == [(1, offset_of(1))]


def lag(partition: str = "0") -> float | None:
    labels = {"topic": HUB, "partition": partition}
    return REGISTRY.get_sample_value("agogosml_consumer_lag_messages", labels)


async def test_lag_counts_events_after_checkpoint() -> None:
    hub, store = FakeHub(HUB), RecordingCheckpointStore()
    fill(hub, 5)
    started = Pipeline(hub, store)
    await started.source.start()
    envelopes = await fetch_all(started.source, 5)

    await started.source._record_lag()
    before_checkpoint = lag()
    for envelope in envelopes[:2]:
        started.source.ack(envelope)
    await started.source.checkpoint()
    fill(hub, 3)  # enqueued while the reader receives nothing more
    await started.source.pause()
    await started.source._record_lag()
    after_checkpoint = lag()
    await started.source.stop()

    assert before_checkpoint == 5
    # Events 2 to 7: three unfinished and three not received.
    assert after_checkpoint == 6
    assert lag() is None  # the partition's next owner reports it


async def test_restart_resumes_after_checkpoint() -> None:
    hub, store = FakeHub(HUB), RecordingCheckpointStore()
    fill(hub, 5)
    first = Pipeline(hub, store)
    await first.source.start()
    for envelope in (await fetch_all(first.source, 5))[:3]:
        first.source.ack(envelope)
    await first.source.stop()

    second = Pipeline(hub, store)
    await second.source.start()
    resumed = await fetch_all(second.source, 2)
    extra = await second.source.fetch(10, 0.1)
    await second.source.stop()

    assert [e.position.offset for e in resumed if e.position] == [3, 4]
    assert extra == []


async def test_paused_source_delivers_nothing(pipeline: Pipeline) -> None:
    await pipeline.source.pause()
    fill(pipeline.hub, 3)

    while_paused = await pipeline.source.fetch(10, 0.1)
    await pipeline.source.resume()
    after = await fetch_all(pipeline.source, 3)

    assert while_paused == []
    assert len(after) == 3


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        ("earliest", "-1"),
        ("latest", "@latest"),
        (
            "2026-01-31T12:00:00+00:00",
            datetime.datetime(2026, 1, 31, 12, tzinfo=datetime.UTC),
        ),
        (
            " 2026-01-31T12:00:00Z\n",
            datetime.datetime(2026, 1, 31, 12, tzinfo=datetime.UTC),
        ),
    ],
)
async def test_starting_position_passed_to_sdk(position: str, expected: object) -> None:
    started = Pipeline(
        FakeHub(HUB), RecordingCheckpointStore(), starting_position=position
    )
    await started.source.start()
    await wait_claimed(started.source)
    kwargs = started.consumer.receive_kwargs
    await started.source.stop()

    assert kwargs["starting_position"] == expected


async def test_latest_skips_existing_events() -> None:
    hub = FakeHub(HUB)
    fill(hub, 3)
    started = Pipeline(hub, RecordingCheckpointStore(), starting_position="latest")
    await started.source.start()
    await wait_claimed(started.source)
    hub.add("0", b'{"n": 99}')
    received = await fetch_all(started.source, 1)
    await started.source.stop()

    assert [e.value for e in received] == [b'{"n": 99}']


async def test_latest_keeps_events_released_unfinished() -> None:
    hub = FakeHub(HUB)
    fill(hub, 2)
    store = RecordingCheckpointStore()
    first = Pipeline(hub, store, starting_position="latest")
    await first.source.start()
    await wait_claimed(first.source)
    for n in range(2, 5):
        hub.add("0", orjson.dumps({"n": n}))
    released = await fetch_all(first.source, 3)
    await first.source.stop()
    second = Pipeline(hub, store, starting_position="latest")
    await second.source.start()
    again = await fetch_all(second.source, 3)
    await second.source.stop()

    assert store.written() == [(1, offset_of(1))]
    assert [e.value for e in released] == [e.value for e in again]
    assert [orjson.loads(e.value)["n"] for e in again] == [2, 3, 4]


async def test_latest_keeps_existing_checkpoint() -> None:
    hub = FakeHub(HUB)
    fill(hub, 4)
    store = RecordingCheckpointStore()
    await store.update_checkpoint(
        {
            "fully_qualified_namespace": NAMESPACE,
            "eventhub_name": HUB,
            "consumer_group": "$Default",
            "partition_id": "0",
            "sequence_number": 1,
            "offset": offset_of(1),
        }
    )
    started = Pipeline(hub, store, starting_position="latest")
    await started.source.start()
    received = await fetch_all(started.source, 2)
    await started.source.stop()

    assert store.written() == [(1, offset_of(1))]
    assert [orjson.loads(e.value)["n"] for e in received] == [2, 3]


async def test_receive_error_marks_disconnected(pipeline: Pipeline) -> None:
    await wait_claimed(pipeline.source)
    connected_before = pipeline.source.connected

    await pipeline.consumer.fail("0", AuthenticationError("token rejected"))
    connected_after_error = pipeline.source.connected
    fill(pipeline.hub, 1)
    await fetch_all(pipeline.source, 1)

    assert connected_before
    assert not connected_after_error
    assert pipeline.source.connected


@pytest.mark.parametrize(
    "error",
    [
        # A link detached with a standard AMQP condition, such as amqp:not-found
        # for a missing consumer group, after the SDK's retries ran out.
        ConnectionLostError("amqp:not-found: consumer group not found"),
        OperationTimeoutError("receive timed out"),
        EventHubError("socket error"),
    ],
)
async def test_receive_error_after_retries_marks_disconnected(
    pipeline: Pipeline, error: EventHubError
) -> None:
    await wait_claimed(pipeline.source)

    await pipeline.consumer.fail("0", error)

    assert not pipeline.source.connected
    assert type(error).__name__ in pipeline.source.unavailable_reason


async def test_stolen_link_keeps_source_ready(pipeline: Pipeline) -> None:
    # The SDK raises this at once, without retries, when another reader's link
    # takes a partition over, as after another reader starts.
    stolen = AMQPLinkError(
        condition=ErrorCondition.LinkStolen,
        description="New receiver with higher epoch is created",
    )
    await wait_claimed(pipeline.source)

    await pipeline.consumer.detach("0", ConnectionLostError(str(stolen), stolen))

    assert pipeline.source.connected


# ---------------------------------------------------------------------------
# Sink
# ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def started_sink(
    producer: FakeProducerClient, **options: Any
) -> AsyncIterator[EventHubsSink]:
    sink = EventHubsSink(settings(**options), producer.hub.name, producer=producer)
    await sink.start()
    yield sink
    await sink.stop()


@pytest.fixture
async def producer() -> FakeProducerClient:
    return FakeProducerClient(FakeHub("output-hub", partition_ids=["0", "1", "2"]))


def all_bodies(hub: FakeHub) -> list[bytes]:
    return [body for p in hub.partition_ids for body in hub.bodies(p)]


async def test_sink_batches_within_size_limit(producer: FakeProducerClient) -> None:
    envelopes = [
        Envelope(value=b"x" * 300, key=b"k", id=f"m{n}", headers=[("h", b"v")])
        for n in range(20)
    ]
    async with started_sink(producer, max_batch_bytes=2048) as sink:
        await sink.send(envelopes)

    sizes = [batch.size_in_bytes for batch in producer.sent_batches]
    counts = [len(batch) for batch in producer.sent_batches]
    assert len(producer.sent_batches) > 1
    assert all(size <= 2048 for size in sizes)
    assert sum(counts) == 20
    partition = next(
        p for p in producer.hub.partition_ids if producer.hub.partitions[p]
    )
    received = [
        producer.hub.received(partition, i)
        for i in range(len(producer.hub.partitions[partition]))
    ]
    assert [e.properties[b"message-id"] for e in received] == [
        f"m{n}".encode() for n in range(20)
    ]
    assert all(e.partition_key == b"k" for e in received)


async def test_sink_keeps_order_per_key(producer: FakeProducerClient) -> None:
    envelopes = []
    for n in range(30):
        key = b"a" if n % 2 else b"b"
        envelopes.append(Envelope(value=orjson.dumps({"n": n}), key=key, id=f"m{n}"))
    async with started_sink(producer, max_batch_bytes=1024) as sink:
        await sink.send(envelopes)

    by_key: dict[bytes, list[int]] = {}
    for partition in producer.hub.partition_ids:
        for index in range(len(producer.hub.partitions[partition])):
            event = producer.hub.received(partition, index)
            body = orjson.loads(b"".join(event.body))  # type: ignore[arg-type]
            by_key.setdefault(event.partition_key, []).append(body["n"])
    assert by_key[b"a"] == list(range(1, 30, 2))
    assert by_key[b"b"] == list(range(0, 30, 2))
    assert all(batch._partition_key in ("a", "b") for batch in producer.sent_batches)


async def test_sink_without_key_sends_no_partition_key(
    producer: FakeProducerClient,
) -> None:
    async with started_sink(producer) as sink:
        await sink.send(numbered(3))

    assert len(producer.sent_batches) == 1
    assert producer.sent_batches[0]._partition_key is None
    assert len(all_bodies(producer.hub)) == 3


async def test_oversized_event_rejected_before_sending(
    producer: FakeProducerClient,
) -> None:
    envelopes = numbered(3)
    envelopes[1] = Envelope(value=b"x" * 5000, id="big")

    async with started_sink(producer, max_batch_bytes=2048) as sink:
        with pytest.raises(SinkError) as caught:
            await sink.send(envelopes)

    assert not caught.value.retriable
    assert list(caught.value.failures) == ["big"]
    assert "over the batch limit of 2048 bytes" in caught.value.failures["big"]
    assert producer.sent_batches == []
    assert all_bodies(producer.hub) == []


async def test_oversized_key_named(producer: FakeProducerClient) -> None:
    envelope = Envelope(value=b'{"n":1}', key=b"k" * 3000, id="long-key")

    async with started_sink(producer, max_batch_bytes=2048) as sink:
        with pytest.raises(SinkError) as caught:
            await sink.send([envelope])

    reason = caught.value.failures["long-key"]
    assert "3000 bytes of partition key" in reason
    assert "7 bytes of value" in reason
    assert "Shorten the key" in reason
    assert producer.sent_batches == []


async def test_oversized_events_counted_by_position(
    producer: FakeProducerClient,
) -> None:
    envelopes = [
        Envelope(value=b"x" * 5000, id="same"),
        Envelope(value=b"small", id="same"),
        Envelope(value=b"x" * 5000, id="same"),
    ]

    async with started_sink(producer, max_batch_bytes=2048) as sink:
        with pytest.raises(SinkError) as caught:
            await sink.send(envelopes)

    assert "2 of 3 events are too large" in str(caught.value)
    assert list(caught.value.failures) == ["same"]
    assert producer.sent_batches == []


async def test_failed_events_counted_by_position(
    producer: FakeProducerClient,
) -> None:
    envelopes = [Envelope(value=b"v", key=b"k", id="same") for _ in range(3)]
    producer.fail_next(EventDataSendError("server busy"))

    async with started_sink(producer) as sink:
        with pytest.raises(SinkError) as caught:
            await sink.send(envelopes)

    assert "3 of 3 events were not accepted" in str(caught.value)


async def test_sink_start_rejects_batch_over_hub_limit(
    producer: FakeProducerClient,
) -> None:
    producer.max_message_bytes = 1_048_576
    sink = EventHubsSink(
        settings(max_batch_bytes=2_000_000), producer.hub.name, producer=producer
    )

    with pytest.raises(SinkError) as caught:
        await sink.start()

    message = str(caught.value)
    assert "EVENTHUB_MAX_BATCH_BYTES=2000000" in message
    assert "maximum message size of 1048576 bytes" in message
    assert not caught.value.retriable
    assert not sink.connected


async def test_writer_503_when_hub_limit_shrinks(producer: FakeProducerClient) -> None:
    sink = EventHubsSink(
        settings(max_batch_bytes=2048), producer.hub.name, producer=producer
    )
    await sink.start()
    writer = OutputWriter(WriterSettings(output=producer.hub.name), sink)
    client = TestClient(TestServer(writer.build_app()))
    await client.start_server()
    producer.max_message_bytes = 1024

    try:
        response = await client.post("/", json={"n": 1})
        body = await response.json()
    finally:
        await client.close()
        await sink.stop()

    assert response.status == 503
    assert "EVENTHUB_MAX_BATCH_BYTES=2048" in body["error"]
    assert "maximum message size of 1024 bytes" in body["error"]
    assert all_bodies(producer.hub) == []


async def test_failed_batch_reports_its_events(producer: FakeProducerClient) -> None:
    envelopes = [
        Envelope(value=b"x" * 400, key=b"a" if n < 6 else b"b", id=f"m{n}")
        for n in range(10)
    ]
    producer.fail_next(EventDataSendError("server busy"))

    async with started_sink(producer, max_batch_bytes=1024) as sink:
        with pytest.raises(SinkError) as caught:
            await sink.send(envelopes)
        connected_after_failure = sink.connected

    failures = caught.value.failures
    assert caught.value.retriable
    assert sorted(failures) == [f"m{n}" for n in range(6)]
    assert "EventDataSendError" in failures["m0"]
    assert "earlier batch with the same partition key failed" in failures["m5"]
    sent_ids = {
        e.properties[b"message-id"].decode()
        for p in producer.hub.partition_ids
        for e in (
            producer.hub.received(p, i) for i in range(len(producer.hub.partitions[p]))
        )
    }
    assert sent_ids == {"m6", "m7", "m8", "m9"}
    assert connected_after_failure


async def test_event_data_error_not_retriable(producer: FakeProducerClient) -> None:
    producer.fail_next(EventDataError("invalid event"))

    async with started_sink(producer) as sink:
        with pytest.raises(SinkError) as caught:
            await sink.send(numbered(2))

    assert not caught.value.retriable
    assert sorted(caught.value.failures) == ["m0", "m1"]


async def test_sink_start_fails_for_missing_hub(producer: FakeProducerClient) -> None:
    producer.properties_error = EventHubError("The messaging entity could not be found")
    sink = EventHubsSink(settings(), "output-hub", producer=producer)

    with pytest.raises(SinkError, match="cannot open event hub 'output-hub'") as caught:
        await sink.start()

    assert not caught.value.retriable
    assert not sink.connected


@pytest.fixture
async def writer_client(
    producer: FakeProducerClient,
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    sink = EventHubsSink(settings(), producer.hub.name, producer=producer)
    await sink.start()
    writer = OutputWriter(WriterSettings(output=producer.hub.name), sink)
    client = TestClient(TestServer(writer.build_app()))
    await client.start_server()
    yield client
    await client.close()
    await sink.stop()


async def test_writer_never_200_for_unsent_events(
    writer_client: TestClient[web.Request, web.Application],
    producer: FakeProducerClient,
) -> None:
    batch = [{"value": {"n": n}, "key": "k", "id": f"m{n}"} for n in range(5)]
    producer.fail_next(ConnectionLostError("link detached"))

    failed = await writer_client.post("/batch", json=batch)
    failed_body = await failed.json()
    written_after_failure = all_bodies(producer.hub)
    accepted = await writer_client.post("/batch", json=batch)

    assert failed.status == 503
    assert "5 of 5 events were not accepted" in failed_body["error"]
    assert written_after_failure == []
    assert accepted.status == 200
    assert [orjson.loads(b) for b in all_bodies(producer.hub)] == [
        {"n": n} for n in range(5)
    ]


async def test_writer_422_for_oversized_event(
    writer_client: TestClient[web.Request, web.Application],
    producer: FakeProducerClient,
) -> None:
    producer.max_message_bytes = 2048

    response = await writer_client.post("/", json={"blob": "x" * 4000})

    assert response.status == 422
    assert all_bodies(producer.hub) == []


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


@pytest.fixture
def no_eventhub_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("EVENTHUB_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("no_eventhub_environment")
def test_settings_need_a_credential() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(EventHubSettings)

    assert "set EVENTHUB_CONNECTION_STRING, or EVENTHUB_FULLY_QUALIFIED_NAMESPACE" in (
        str(caught.value)
    )


@pytest.mark.usefixtures("no_eventhub_environment")
def test_malformed_connection_string_not_echoed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "EVENTHUB_CONNECTION_STRING", "SharedAccessKeyName=a;SharedAccessKey=s3cr3t"
    )

    with pytest.raises(ConfigurationError) as caught:
        load_settings(EventHubSettings)

    assert "EVENTHUB_CONNECTION_STRING is malformed" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


@pytest.mark.usefixtures("no_eventhub_environment")
@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("EVENTHUB_STARTING_POSITION", "yesterday", "use earliest, latest"),
        ("EVENTHUB_STARTING_POSITION", "2026-01-31T12:00:00", "add a UTC offset"),
        ("EVENTHUB_CHECKPOINT_STORE_CONTAINER", "Bad_Name", "blob container name"),
        ("EVENTHUB_FULLY_QUALIFIED_NAMESPACE", "sb://ns.example", "host name alone"),
        ("EVENTHUB_CONSUMER_GROUP", " $Default", "remove the whitespace"),
        ("EVENTHUB_CONSUMER_GROUP", "scoring\n", "remove the whitespace"),
    ],
)
def test_invalid_setting_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    if variable != "EVENTHUB_FULLY_QUALIFIED_NAMESPACE":
        monkeypatch.setenv("EVENTHUB_CONNECTION_STRING", CONNECTION_STRING)
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as caught:
        load_settings(EventHubSettings)

    assert f"{variable}={value!r} is invalid" in str(caught.value)
    assert message in str(caught.value)


@pytest.mark.usefixtures("no_eventhub_environment")
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("AccountKey=s3cr3t;garbage", "is malformed (Connection string is either"),
        ("AccountKey=s3cr3t", "is malformed (Connection string missing"),
        ("AccountName=acct", "has no credential"),
        ("BlobEndpoint=https://acct.blob.core.windows.net", "has no credential"),
        ("UseDevelopmentStorage=true", "give Azurite's full connection string"),
    ],
)
def test_malformed_storage_connection_string_named(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("EVENTHUB_CONNECTION_STRING", CONNECTION_STRING)
    monkeypatch.setenv("EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING", value)

    with pytest.raises(ConfigurationError) as caught:
        load_settings(EventHubSettings)

    assert "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING" in str(caught.value)
    assert message in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "url"),
    [
        (
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;"
            "EndpointSuffix=core.windows.net",
            "https://acct.blob.core.windows.net/checkpoints",
        ),
        (
            "BlobEndpoint=https://acct.blob.core.windows.net;"
            "SharedAccessSignature=sv=2024-05-04&sig=c2ln",
            "https://acct.blob.core.windows.net/checkpoints",
        ),
        (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            "AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1",
            "http://127.0.0.1:10000/devstoreaccount1/checkpoints",
        ),
    ],
)
async def test_storage_connection_string_accepted(value: str, url: str) -> None:
    accepted = settings(
        checkpoint_store_connection_string=value,
        checkpoint_store_container="checkpoints",
    )

    store, credential = clients.new_checkpoint_store(accepted)

    assert store._container_client.url.partition("?")[0] == url
    assert credential is None
    await store.close()


def test_connection_string_of_other_hub_rejected() -> None:
    hub_level = settings(connection_string=CONNECTION_STRING + ";EntityPath=orders")

    with pytest.raises(ConfigurationError, match="READER_INPUT='payments'"):
        EventHubsSource(hub_level, "payments")
    EventHubsSource(hub_level, "orders")


@pytest.mark.parametrize("key", ["EntityPath", "entitypath", "ENTITYPATH"])
def test_entity_path_read_in_any_case(key: str) -> None:
    # The SDK's clients read connection string keys in any case.
    hub_level = settings(connection_string=f"{CONNECTION_STRING};{key}=orders")

    with pytest.raises(ConfigurationError, match="READER_INPUT='payments'"):
        EventHubsSource(hub_level, "payments")


def test_hub_level_string_rejected_for_dead_letters() -> None:
    hub_level = settings(connection_string=CONNECTION_STRING + ";EntityPath=orders")

    with pytest.raises(ConfigurationError) as caught:
        EventHubsSink(hub_level, "orders.dlq", variable="READER_DEAD_LETTER")

    assert "READER_DEAD_LETTER='orders.dlq'" in str(caught.value)
    assert "namespace-level connection string" in str(caught.value)
    # The input hub cannot take the dead letters, so it is no fix.
    assert "set READER_DEAD_LETTER to 'orders'" not in str(caught.value)


def test_hub_level_string_for_other_input_needs_namespace() -> None:
    hub_level = settings(connection_string=CONNECTION_STRING + ";EntityPath=orders")

    with pytest.raises(ConfigurationError) as caught:
        EventHubsSource(hub_level, "payments")

    assert "READER_INPUT='payments'" in str(caught.value)
    assert "namespace-level connection string" in str(caught.value)
    # The reader also writes dead letters to a second hub, so no input fixes it.
    assert "set READER_INPUT to 'orders'" not in str(caught.value)


async def test_source_needs_checkpoint_store() -> None:
    source = EventHubsSource(settings(), HUB)

    with pytest.raises(ConfigurationError, match="EVENTHUB_CHECKPOINT_STORE_CONTAINER"):
        await source.start()


def test_reader_takes_one_hub() -> None:
    with pytest.raises(ValidationError, match="exactly one event hub"):
        ReaderSettings(source="eventhubs", input="a,b", app_url="http://127.0.0.1:1")

    reader = ReaderSettings(source="eventhubs", input="a", app_url="http://127.0.0.1:1")
    assert reader.dead_letter_target() == "a.dlq"
