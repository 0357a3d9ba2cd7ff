"""In-memory stand-ins for the azure-eventhub async clients, at their API boundary.

The fakes follow the contracts of azure-eventhub 5.15 (read in its source):

- `FakeProducerClient.create_batch` returns a real `EventDataBatch`, so
  ``add`` raises ValueError exactly when the SDK would; ``send_batch`` stores
  each event as the AMQP bytes the SDK would put on the wire, or raises the
  `EventHubError` subclass a test queued.
- `FakeConsumerClient.receive` runs one task per claimed partition, as the
  SDK's event processor does: it starts after the offset of the partition's
  checkpoint in the checkpoint store (or at the starting position), awaits
  ``on_partition_initialize`` with a real `PartitionContext` that is reused
  across claims of the partition, awaits ``on_event`` per event from a
  separate callback task, and on cancellation or a receive error awaits
  ``on_partition_close`` with OWNERSHIP_LOST while running, SHUTDOWN after
  `close` or when ``receive`` itself ends.
- Received events are decoded from the stored bytes and carry the service's
  annotations (sequence number, offset, enqueued time, partition key).
"""

from __future__ import annotations

import asyncio
import datetime
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from azure.eventhub import CloseReason, EventData, EventDataBatch
from azure.eventhub._pyamqp._decode import decode_payload
from azure.eventhub._pyamqp._encode import encode_payload
from azure.eventhub._transport._pyamqp_transport import PyamqpTransport
from azure.eventhub.aio import PartitionContext

NAMESPACE = "test-namespace.servicebus.windows.net"
#: Maximum message size of a Standard tier hub, in bytes.
MAX_MESSAGE_BYTES = 1_048_576
#: Offsets of Event Hubs are opaque strings; these differ from the sequence
#: numbers, so a test can tell which of the two was checkpointed.
OFFSET_STEP = 1000


def offset_of(sequence_number: int) -> str:
    return str(sequence_number * OFFSET_STEP)


@dataclass
class StoredEvent:
    sequence_number: int
    payload: bytes
    partition_key: str | None
    enqueued_ms: int


@dataclass
class FakeHub:
    """Partitions of one event hub, each a list of stored events."""

    name: str
    partition_ids: list[str] = field(default_factory=lambda: ["0", "1"])
    partitions: dict[str, list[StoredEvent]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        for partition_id in self.partition_ids:
            self.partitions.setdefault(partition_id, [])

    def append(self, partition_id: str, event: EventData, key: str | None) -> None:
        events = self.partitions[partition_id]
        message = PyamqpTransport.to_outgoing_amqp_message(event.raw_amqp_message)
        payload = bytearray()
        encode_payload(payload, message)
        now = datetime.datetime.now(datetime.UTC)
        events.append(
            StoredEvent(len(events), bytes(payload), key, int(now.timestamp() * 1000))
        )
        self.changed.set()

    def add(self, partition_id: str, body: bytes, **properties: str) -> None:
        event = EventData(body)
        event.properties = dict(properties)  # type: ignore[arg-type]
        self.append(partition_id, event, None)

    def received(self, partition_id: str, index: int) -> EventData:
        """Return a stored event as the consumer receives it."""
        stored = self.partitions[partition_id][index]
        message = decode_payload(memoryview(stored.payload))
        annotations = {
            b"x-opt-sequence-number": stored.sequence_number,
            b"x-opt-offset": offset_of(stored.sequence_number).encode(),
            b"x-opt-enqueued-time": stored.enqueued_ms,
        }
        if stored.partition_key is not None:
            annotations[b"x-opt-partition-key"] = stored.partition_key.encode()
        message = message._replace(message_annotations=annotations)
        return EventData._from_message(message)  # type: ignore[arg-type]

    def bodies(self, partition_id: str) -> list[bytes]:
        return [
            b"".join(self.received(partition_id, i).body)  # type: ignore[arg-type]
            for i in range(len(self.partitions[partition_id]))
        ]


class FakeProducerClient:
    """`EventHubProducerClient` of a `FakeHub`, without buffered mode."""

    def __init__(self, hub: FakeHub, *, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.hub = hub
        self.eventhub_name = hub.name
        self.max_message_bytes = max_message_bytes
        self.sent_batches: list[EventDataBatch] = []
        self.errors: list[Exception] = []
        self.properties_error: Exception | None = None
        self.closed = False
        self._next_partition = 0

    def fail_next(self, *errors: Exception) -> None:
        """Make the next ``send_batch`` calls raise these errors, one each."""
        self.errors.extend(errors)

    async def get_eventhub_properties(self) -> dict[str, Any]:
        if self.properties_error is not None:
            raise self.properties_error
        return {
            "eventhub_name": self.hub.name,
            "created_at": datetime.datetime.now(datetime.UTC),
            "partition_ids": list(self.hub.partition_ids),
        }

    async def create_batch(
        self,
        *,
        partition_id: str | None = None,
        partition_key: str | None = None,
        max_size_in_bytes: int | None = None,
    ) -> EventDataBatch:
        if max_size_in_bytes and max_size_in_bytes > self.max_message_bytes:
            raise ValueError(
                f"Max message size: {max_size_in_bytes} is too large, acceptable "
                f"max batch size is: {self.max_message_bytes} bytes."
            )
        return EventDataBatch(
            max_size_in_bytes=max_size_in_bytes or self.max_message_bytes,
            partition_id=partition_id,
            partition_key=partition_key,
        )

    async def send_batch(
        self, event_data_batch: EventDataBatch, *, timeout: float | None = None
    ) -> None:
        assert isinstance(event_data_batch, EventDataBatch)
        await asyncio.sleep(0)
        if self.errors:
            raise self.errors.pop(0)
        key = event_data_batch._partition_key
        partition_id = self._partition_for(key)
        for event in event_data_batch._internal_events:
            self.hub.append(partition_id, event, key)
        self.sent_batches.append(event_data_batch)

    def _partition_for(self, key: str | bytes | None) -> str:
        ids = self.hub.partition_ids
        if key is None:
            self._next_partition += 1
            return ids[self._next_partition % len(ids)]
        raw = key.encode() if isinstance(key, str) else key
        return ids[zlib.crc32(raw) % len(ids)]

    async def close(self) -> None:
        self.closed = True


OnEvent = Callable[[PartitionContext, EventData | None], Awaitable[None]]


@dataclass
class _Claim:
    """One claim of a partition: its receive side and its callback task."""

    #: Whether the callback task takes further events (the SDK's
    #: ``_callback_task_run``).
    delivering: bool = True
    #: The receive side of the link; `detach` fails it.
    link: asyncio.Future[None] | None = None
    callback: asyncio.Task[None] | None = None


#: How long the SDK waits for an on_event call still running when a partition's
#: receive ends with an error, before it leaves that call running and closes the
#: partition (``receive_messages_async`` in azure-eventhub 5.15).
CALLBACK_GRACE_SECONDS = 1.0


class FakeConsumerClient:
    """`EventHubConsumerClient` of a `FakeHub` that owns the partitions given to it.

    As the SDK's event processor does, it keeps one `PartitionContext` per
    partition across claims, calls ``on_event`` from a callback task separate
    from the partition's receive task, and stops every partition (awaiting
    ``on_partition_close``) when ``receive`` ends, also when it is cancelled.
    """

    def __init__(
        self,
        hub: FakeHub,
        checkpoint_store: Any,
        *,
        consumer_group: str = "$Default",
        owned: list[str] | None = None,
    ) -> None:
        self.hub = hub
        self.checkpoint_store = checkpoint_store
        self.consumer_group = consumer_group
        self.owned = list(hub.partition_ids if owned is None else owned)
        self.receive_kwargs: dict[str, Any] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._claims: dict[str, _Claim] = {}
        self._contexts: dict[str, PartitionContext] = {}
        self._callbacks: dict[str, Any] = {}
        self._running = False
        self._stopped = asyncio.Event()

    async def receive(
        self,
        on_event: OnEvent,
        *,
        max_wait_time: float | None = None,
        partition_id: str | None = None,
        owner_level: int | None = None,
        prefetch: int = 300,
        track_last_enqueued_event_properties: bool = False,
        starting_position: Any = None,
        starting_position_inclusive: bool = False,
        on_error: Callable[[PartitionContext | None, Exception], Awaitable[None]]
        | None = None,
        on_partition_initialize: Callable[[PartitionContext], Awaitable[None]]
        | None = None,
        on_partition_close: Callable[[PartitionContext, CloseReason], Awaitable[None]]
        | None = None,
    ) -> None:
        self.receive_kwargs = {
            "starting_position": starting_position,
            "starting_position_inclusive": starting_position_inclusive,
            "prefetch": prefetch,
        }
        self._callbacks = {
            "on_event": on_event,
            "on_error": on_error,
            "on_partition_initialize": on_partition_initialize,
            "on_partition_close": on_partition_close,
        }
        self._running = True
        try:
            for owned in list(self.owned):
                await self.claim(owned)
            await self._stopped.wait()
        finally:
            # The SDK's receive() stops its event processor in a finally clause.
            await self._stop_partitions()

    async def get_partition_properties(self, partition_id: str) -> dict[str, Any]:
        """Return the partition's last event, as the SDK's client does."""
        count = len(self.hub.partitions[partition_id])
        return {
            "id": partition_id,
            "last_enqueued_sequence_number": count - 1,
            "last_enqueued_offset": offset_of(count - 1) if count else "-1",
            "is_empty": count == 0,
        }

    async def claim(self, partition_id: str) -> None:
        """Start receiving a partition, as after a load-balancing round."""
        checkpoints = await self.checkpoint_store.list_checkpoints(
            NAMESPACE, self.hub.name, self.consumer_group
        )
        checkpoint = None
        for stored in checkpoints:
            if stored["partition_id"] == partition_id:
                checkpoint = stored
        start = self._start_index(partition_id, checkpoint)
        self._tasks[partition_id] = asyncio.create_task(
            self._run_partition(partition_id, start)
        )
        await asyncio.sleep(0)

    def _start_index(self, partition_id: str, checkpoint: dict[str, Any] | None) -> int:
        """Return the index of the first event to deliver, as the SDK positions it.

        The SDK starts after a checkpoint's offset, not its sequence number.
        Without a checkpoint it starts at `starting_position`, and
        `starting_position_inclusive` applies to both (``get_init_event_position``
        and ``event_position_selector`` in azure-eventhub 5.15). The offset "-1"
        is the start of the partition.
        """
        events = self.hub.partitions[partition_id]
        inclusive = bool(self.receive_kwargs["starting_position_inclusive"])
        position = checkpoint["offset"] if checkpoint and checkpoint["offset"] else None
        if position is None:
            position = self.receive_kwargs["starting_position"] or "@latest"
        if position == "@latest":
            return len(events)
        if isinstance(position, datetime.datetime):
            limit = int(position.timestamp() * 1000)
            keys = [event.enqueued_ms for event in events]
        elif isinstance(position, int):
            limit = position
            keys = [event.sequence_number for event in events]
        else:
            limit = int(position)
            keys = [int(offset_of(event.sequence_number)) for event in events]
        for index, key in enumerate(keys):
            if key > limit or (inclusive and key == limit):
                return index
        return len(events)

    async def lose(self, partition_id: str) -> None:
        """Take a partition away, as a load-balancing round does after a steal.

        The SDK cancels the partition's task, which cancels its on_event call.
        """
        task = self._tasks.pop(partition_id)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def detach(self, partition_id: str, error: Exception) -> None:
        """End a partition's receive with an error, as when another reader's link
        took it over (LinkStolen) or receive retries ran out.

        As in the SDK, an on_event call still running is not cancelled: it is
        awaited up to CALLBACK_GRACE_SECONDS and then left running, while
        ``on_error`` and ``on_partition_close`` are called.
        """
        link = self._claims[partition_id].link
        assert link is not None
        link.set_exception(error)
        task = self._tasks.pop(partition_id)
        await asyncio.gather(task, return_exceptions=True)

    async def fail(self, partition_id: str | None, error: Exception) -> None:
        """Report an error through ``on_error``, as after exhausted retries."""
        context = self._context(partition_id) if partition_id is not None else None
        await self._callbacks["on_error"](context, error)

    def _context(self, partition_id: str) -> PartitionContext:
        context = self._contexts.get(partition_id)
        if context is None:
            context = self._contexts[partition_id] = PartitionContext(
                NAMESPACE,
                self.hub.name,
                self.consumer_group,
                partition_id,
                self.checkpoint_store,
            )
        return context

    async def _run_partition(self, partition_id: str, start: int) -> None:
        context = self._context(partition_id)
        context._last_received_event = None
        claim = self._claims[partition_id] = _Claim()
        try:
            await self._initialize(context)
            claim.link = asyncio.get_running_loop().create_future()
            claim.callback = asyncio.create_task(
                self._deliver(claim, context, partition_id, start)
            )
            try:
                await asyncio.gather(claim.callback, claim.link)
            finally:
                claim.delivering = False
                if not claim.callback.done():
                    await asyncio.wait([claim.callback], timeout=CALLBACK_GRACE_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - as the SDK's processor
            await self._report(context, error)
        finally:
            reason = (
                CloseReason.OWNERSHIP_LOST if self._running else CloseReason.SHUTDOWN
            )
            await asyncio.shield(self._close_partition(partition_id, context, reason))

    async def _initialize(self, context: PartitionContext) -> None:
        try:
            await self._callbacks["on_partition_initialize"](context)
        except Exception as error:  # noqa: BLE001 - the SDK reports it and receives
            await self._report(context, error)

    async def _deliver(
        self, claim: _Claim, context: PartitionContext, partition_id: str, start: int
    ) -> None:
        index = start
        while claim.delivering:
            events = self.hub.partitions[partition_id]
            if index < len(events):
                event = self.hub.received(partition_id, index)
                context._last_received_event = event
                await self._callbacks["on_event"](context, event)
                index += 1
                continue
            self.hub.changed.clear()
            await self.hub.changed.wait()

    async def _report(self, context: PartitionContext, error: Exception) -> None:
        if self._callbacks["on_error"] is not None:
            await self._callbacks["on_error"](context, error)

    async def _close_partition(
        self, partition_id: str, context: PartitionContext, reason: CloseReason
    ) -> None:
        try:
            await self._callbacks["on_partition_close"](context, reason)
        except Exception as error:  # noqa: BLE001 - the SDK reports it
            await self._report(context, error)
        finally:
            self._tasks.pop(partition_id, None)

    async def _stop_partitions(self) -> None:
        """Cancel every partition and wait until each is closed.

        As ``EventProcessor.stop`` does, it polls until every partition's close
        (shielded from cancellation) has removed its task, so a cancelled
        partition task does not end the wait. The SDK polls once a second.
        """
        self._running = False
        for task in list(self._tasks.values()):
            task.cancel()
        while self._tasks:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        await self._stop_partitions()
        self._stopped.set()


class RecordingCheckpointStore:
    """A checkpoint store that keeps every `update_checkpoint` call in order."""

    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []
        self.latest: dict[tuple[str, str, str, str], dict[str, Any]] = {}

    async def update_checkpoint(
        self, checkpoint: dict[str, Any], **kwargs: Any
    ) -> None:
        await asyncio.sleep(0)
        self.updates.append(dict(checkpoint))
        key = (
            checkpoint["fully_qualified_namespace"],
            checkpoint["eventhub_name"],
            checkpoint["consumer_group"],
            checkpoint["partition_id"],
        )
        self.latest[key] = dict(checkpoint)

    async def list_checkpoints(
        self, fully_qualified_namespace: str, eventhub_name: str, consumer_group: str
    ) -> list[dict[str, Any]]:
        return [
            checkpoint
            for key, checkpoint in self.latest.items()
            if key[:3] == (fully_qualified_namespace, eventhub_name, consumer_group)
        ]

    def written(self, partition_id: str = "0") -> list[tuple[int, str]]:
        """Return (sequence number, offset) of each checkpoint of a partition."""
        return [
            (update["sequence_number"], update["offset"])
            for update in self.updates
            if update["partition_id"] == partition_id
        ]
