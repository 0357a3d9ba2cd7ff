"""Event Hubs source: a load-balancing consumer that checkpoints finished events."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any

from azure.eventhub import CloseReason, EventData
from azure.eventhub.aio import EventHubConsumerClient, PartitionContext
from azure.eventhub.exceptions import EventHubError

from agogosml.config import EventHubSettings
from agogosml.envelope import Envelope, Position
from agogosml.errors import SourceError
from agogosml.metrics import COMMITS, CONSUMER_LAG, start_at_zero
from agogosml.transports.base import OffsetTracker, RevokeHandler, TrackedSource
from agogosml.transports.eventhubs import clients

logger = logging.getLogger(__name__)

#: How long the final checkpoints and the release of the partitions may take at
#: shutdown. The blob client retries a failing write with backoff, which could
#: otherwise hold a stop past a pod's grace period.
FINAL_CHECKPOINT_TIMEOUT_SECONDS = 10.0
#: How long a stop that ran out of FINAL_CHECKPOINT_TIMEOUT_SECONDS still waits
#: for the SDK's event processor to close its partitions. The processor checks
#: once a second whether its partitions are closed (``EventProcessor.stop`` in
#: azure-eventhub 5.15), and its ownership release may wait on the same
#: unresponsive store.
PROCESSOR_STOP_GRACE_SECONDS = 2.0
#: Received events buffered for `fetch`. A full buffer makes the SDK's
#: partition receivers wait in their event callbacks.
BUFFER_EVENTS = 1000
#: How often the consumer lag of the owned partitions is read from the hub.
LAG_INTERVAL_SECONDS = 5.0


class EventHubsSource(TrackedSource):
    """Receive one event hub through a consumer group, checkpointing finished events.

    The SDK's event processor claims partitions through the checkpoint store and
    calls back on the event loop. Each partition's checkpoint advances only to
    the contiguous prefix of finished events, as Kafka offsets do. When the
    processor closes a partition for shutdown, the source waits for its
    in-flight events and checkpoints their prefix. When another reader took the
    partition (ownership lost), nothing of it is checkpointed any more.

    Args:
        settings: The ``EVENTHUB_`` settings.
        hub: The event hub to read.
        revoke_timeout_seconds: How long a closed partition waits for its
            in-flight events.
        consumer: A consumer client to use instead of one made from
            `settings`, with its checkpoint store as `checkpoint_store`.
        checkpoint_store: The checkpoint store of `consumer`.
    """

    def __init__(
        self,
        settings: EventHubSettings,
        hub: str,
        *,
        revoke_timeout_seconds: float = 10.0,
        consumer: EventHubConsumerClient | None = None,
        checkpoint_store: Any = None,
    ) -> None:
        clients.check_hub(settings, hub, "READER_INPUT")
        self._settings = settings
        self._hub = hub
        self._revoke_timeout = revoke_timeout_seconds
        self._consumer = consumer
        start_at_zero(COMMITS, ("ok",), ("error",))
        self._owns_clients = consumer is None
        self._credentials: list[Any] = []
        # The store of a given `consumer`, or the one that start() creates.
        self._store: Any = checkpoint_store
        self._tracker = OffsetTracker()
        self._buffer: collections.deque[Envelope] = collections.deque()
        self._buffered = asyncio.Event()
        self._room = asyncio.Event()
        self._paused = False
        self._contexts: dict[int, PartitionContext] = {}
        # (sequence number, offset) of each received event not checkpointed yet.
        self._offsets: dict[int, collections.deque[tuple[int, str]]] = {}
        self._checkpointed: dict[int, int] = {}
        # Sequence number of the first event received since each claim.
        self._first_received: dict[int, int] = {}
        # One checkpoint write at a time: two concurrent writes of a partition
        # may finish in either order and leave the older checkpoint in place.
        self._checkpoint_lock = asyncio.Lock()
        self._revoke_handler: RevokeHandler | None = None
        self._receive_task: asyncio.Task[None] | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._failing: Exception | None = None
        # Set when the final checkpoints timed out: the partitions that the SDK
        # closes afterwards get no checkpoint write.
        self._abandoned = False

    @property
    def connected(self) -> bool:
        """Whether the consumer runs and its last connection attempt succeeded."""
        running = self._receive_task is not None and not self._receive_task.done()
        return running and self._failing is None

    @property
    def unavailable_reason(self) -> str:
        """Why the source is not connected: not started, or the last receive error."""
        if self._failing is None:
            return "the Event Hubs source is not running"
        return (
            f"receiving from event hub {self._hub!r} failed: "
            f"{type(self._failing).__name__}: {str(self._failing)[:300]}"
        )

    def set_revoke_handler(self, handler: RevokeHandler) -> None:
        """Register the coroutine awaited before partitions are given up."""
        self._revoke_handler = handler

    async def start(self) -> None:
        """Create the consumer and start receiving from every claimable partition."""
        if self._consumer is None:
            self._store, credential = clients.new_checkpoint_store(self._settings)
            self._credentials.append(credential)
            await self._prepare_store()
            self._consumer, credential = clients.new_consumer(
                self._settings, self._hub, self._store
            )
            self._credentials.append(credential)
        self._receive_task = asyncio.create_task(self._receive(self._consumer))
        self._checkpoint_task = asyncio.create_task(self._checkpoint_periodically())
        self._lag_task = asyncio.create_task(self._record_lag_periodically())
        logger.info(
            "eventhubs source started",
            extra={"hub": self._hub, "consumer_group": self._settings.consumer_group},
        )

    async def _prepare_store(self) -> None:
        try:
            await clients.ensure_container(self._store)
        except Exception as exc:  # noqa: BLE001 - any storage error stops start-up
            raise SourceError(
                "cannot reach the checkpoint container "
                f"{self._settings.checkpoint_store_container!r}: "
                f"{type(exc).__name__}: {str(exc)[:300]}; check the "
                "EVENTHUB_CHECKPOINT_STORE_ settings",
                retriable=False,
            ) from None

    async def _receive(self, consumer: EventHubConsumerClient) -> None:
        await consumer.receive(
            self._on_event,
            starting_position=self._settings.sdk_starting_position(),
            prefetch=self._settings.prefetch,
            on_error=self._on_error,
            on_partition_initialize=self._on_partition_initialize,
            on_partition_close=self._on_partition_close,
        )

    async def stop(self) -> None:
        """Checkpoint every finished event, release the partitions and close.

        Takes at most FINAL_CHECKPOINT_TIMEOUT_SECONDS, plus
        PROCESSOR_STOP_GRACE_SECONDS when the checkpoint store does not respond.
        """
        for task in (self._checkpoint_task, self._lag_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        try:
            async with asyncio.timeout(FINAL_CHECKPOINT_TIMEOUT_SECONDS):
                await self._close_consumer()
        except TimeoutError:
            self._abandoned = True
            logger.error(
                "final checkpoints and partition release timed out after %g s; "
                "events finished since the last checkpoint will be delivered "
                "again, and other readers claim the partitions once their "
                "ownership expires; check the checkpoint store's connection",
                FINAL_CHECKPOINT_TIMEOUT_SECONDS,
                extra={"hub": self._hub},
            )
            await self._abandon_receive()
        if self._owns_clients:
            await self._close_clients()
        logger.info("eventhubs source stopped", extra={"hub": self._hub})

    async def _close_consumer(self) -> None:
        await self._checkpoint_logged(None)
        if self._consumer is not None:
            # close() stops the processor, which calls on_partition_close with
            # SHUTDOWN for each partition and releases its ownership.
            await self._consumer.close()
        if self._receive_task is not None:
            # The processor's load-balancing loop sleeps between rounds even
            # after close(), so its task is cancelled rather than awaited.
            self._receive_task.cancel()
            await asyncio.gather(self._receive_task, return_exceptions=True)

    async def _abandon_receive(self) -> None:
        """Cancel the SDK's receive without waiting for an unresponsive store.

        A cancelled ``receive`` stops the event processor, which closes each
        partition (with on_partition_close, shielded from cancellation) and then
        releases its ownership in the checkpoint store, so awaiting it could
        last as long as the store does not respond.
        """
        if self._receive_task is None:
            return
        self._receive_task.cancel()
        done, _ = await asyncio.wait(
            {self._receive_task}, timeout=PROCESSOR_STOP_GRACE_SECONDS
        )
        if not done:
            logger.error(
                "the Event Hubs event processor did not stop within %g s after "
                "the final checkpoints timed out; stopping without it",
                PROCESSOR_STOP_GRACE_SECONDS,
                extra={"hub": self._hub},
            )

    async def _close_clients(self) -> None:
        if self._store is not None:
            await self._store.close()
        for credential in self._credentials:
            if credential is not None:
                await credential.close()

    async def fetch(self, max_messages: int, timeout_seconds: float) -> list[Envelope]:
        """Return up to `max_messages` received events, waiting at most the timeout.

        While paused it returns nothing, as a paused Kafka consumer does.
        """
        if self._paused or not self._buffer:
            self._buffered.clear()
            try:
                await asyncio.wait_for(self._buffered.wait(), timeout_seconds)
            except TimeoutError:
                return []
            if self._paused:
                return []
        envelopes: list[Envelope] = []
        while self._buffer and len(envelopes) < max_messages:
            envelopes.append(self._buffer.popleft())
        self._room.set()
        return envelopes

    async def pause(self) -> None:
        """Stop delivering events; the partition receivers wait meanwhile."""
        self._paused = True

    async def resume(self) -> None:
        """Deliver events again."""
        self._paused = False
        self._room.set()
        if self._buffer:
            self._buffered.set()

    async def checkpoint(self) -> None:
        """Checkpoint the finished prefix of every owned partition now."""
        await self._write_checkpoints(None)

    # SDK callbacks, called on the event loop by the event processor.

    async def _on_event(
        self, context: PartitionContext, event: EventData | None
    ) -> None:
        if event is None:
            return
        partition = _partition_number(context.partition_id)
        generation = self._tracker.generation(self._hub, partition)
        while self._paused or len(self._buffer) >= BUFFER_EVENTS:
            self._room.clear()
            await self._room.wait()
        sequence_number = event.sequence_number
        offset = event.offset
        if sequence_number is None or offset is None:
            logger.error(
                "event without sequence number or offset skipped",
                extra={"hub": self._hub, "partition": partition},
            )
            return
        position = Position(
            self._hub, partition, sequence_number, sequence_number + 1, generation
        )
        envelope = clients.to_envelope(event, position)
        offsets = self._offsets.get(partition)
        if offsets is None or generation != self._tracker.generation(
            self._hub, partition
        ):
            return
        offsets.append((sequence_number, offset))
        self._first_received.setdefault(partition, sequence_number)
        self._tracker.register(position)
        self._buffer.append(envelope)
        self._buffered.set()
        self._failing = None

    async def _on_partition_initialize(self, context: PartitionContext) -> None:
        partition = _partition_number(context.partition_id)
        self._tracker.assign(self._hub, partition)
        self._contexts[partition] = context
        self._offsets[partition] = collections.deque()
        self._checkpointed.pop(partition, None)
        self._failing = None
        logger.info(
            "partition claimed", extra={"hub": self._hub, "partition": partition}
        )
        if self._settings.starting_position == "latest":
            await self._checkpoint_start(context)

    async def _checkpoint_start(self, context: PartitionContext) -> None:
        """Checkpoint the end of a claimed partition that has no checkpoint yet.

        A partition without a checkpoint starts at its end with ``latest``, and a
        checkpoint names the last finished event. Without this one, a reader that
        stopped before any event finished would leave the next owner starting at
        the end again, past the events it read.

        NOTE: a link that fails before its first event is attached at the end
        again by the SDK (azure-eventhub 5.15), which skips the events enqueued
        meanwhile; this checkpoint recovers them only if no event finishes first.
        """
        try:
            existing = await self._store.list_checkpoints(
                context.fully_qualified_namespace,
                context.eventhub_name,
                context.consumer_group,
            )
            if any(c["partition_id"] == context.partition_id for c in existing):
                return
            assert self._consumer is not None
            properties = await self._consumer.get_partition_properties(
                context.partition_id
            )
            event = clients.checkpoint_event(
                properties["last_enqueued_sequence_number"],
                properties["last_enqueued_offset"],
            )
            await _counted(context.update_checkpoint(event))
        except Exception as exc:  # noqa: BLE001 - the partition is read anyway
            logger.warning(
                "cannot checkpoint the start of a partition read from its end "
                "(EVENTHUB_STARTING_POSITION=latest): %s: %s. Until one of its "
                "events finishes, a new owner starts at its end again",
                type(exc).__name__,
                str(exc)[:300],
                extra={"hub": self._hub, "partition": context.partition_id},
            )

    async def _on_partition_close(
        self, context: PartitionContext, reason: CloseReason
    ) -> None:
        partition = _partition_number(context.partition_id)
        if reason is CloseReason.SHUTDOWN and self._abandoned:
            logger.warning(
                "partition closed without a final checkpoint, because the "
                "checkpoint store did not respond",
                extra={"hub": self._hub, "partition": partition},
            )
        elif reason is CloseReason.SHUTDOWN:
            await self._drain([(self._hub, partition)])
            await self._checkpoint_logged({partition})
            logger.info(
                "partition released", extra={"hub": self._hub, "partition": partition}
            )
        else:
            logger.warning(
                "partition ownership lost; its unfinished and uncheckpointed "
                "events will be delivered to the new owner",
                extra={"hub": self._hub, "partition": partition},
            )
        self._forget(partition)

    async def _on_error(
        self, context: PartitionContext | None, error: Exception
    ) -> None:
        partition = context.partition_id if context is not None else None
        # The SDK reports a receive error only after its retries ran out. A
        # missing consumer group or hub, for one, comes as ConnectionLostError,
        # which is not a ConnectError (azure-eventhub 5.15). A stolen link
        # (amqp:link:stolen) comes at once when another reader takes the
        # partition over, which is load balancing, not a failure.
        if isinstance(error, EventHubError) and error.error != "link:stolen":
            self._failing = error
        logger.error(
            "eventhubs receive failed: %s: %s",
            type(error).__name__,
            str(error)[:500],
            extra={"hub": self._hub, "partition": partition},
        )

    # Checkpoints.

    def _forget(self, partition: int) -> None:
        self._tracker.revoke(self._hub, partition)
        self._contexts.pop(partition, None)
        self._offsets.pop(partition, None)
        self._checkpointed.pop(partition, None)
        self._first_received.pop(partition, None)
        # Its next owner reports the partition's lag.
        with contextlib.suppress(KeyError):
            CONSUMER_LAG.remove(self._hub, str(partition))

    # Consumer lag.

    async def _record_lag_periodically(self) -> None:
        while True:
            await asyncio.sleep(LAG_INTERVAL_SECONDS)
            await self._record_lag()

    async def _record_lag(self) -> None:
        """Set the lag of each owned partition: events after its last checkpoint.

        The events not finished yet count, as in the Kafka source's lag. The
        hub names its last enqueued event, so the lag is known also while the
        reader is paused and receives nothing. Before its first checkpoint, a
        partition counts from the first event received since it was claimed.
        """
        assert self._consumer is not None
        for partition in list(self._contexts):
            start = self._checkpointed.get(
                partition, self._first_received.get(partition)
            )
            if start is None:
                continue
            try:
                properties = await self._consumer.get_partition_properties(
                    str(partition)
                )
            except Exception as exc:  # noqa: BLE001 - read again at the next interval
                logger.debug("lag of partition %d unknown: %s", partition, exc)
                continue
            if partition not in self._contexts:
                continue  # closed while its properties were read
            last = properties["last_enqueued_sequence_number"]
            lag = max(0, last + 1 - start)
            CONSUMER_LAG.labels(self._hub, str(partition)).set(lag)

    async def _drain(self, keys: list[tuple[str, int]]) -> None:
        if self._revoke_handler is None:
            return
        try:
            await asyncio.wait_for(self._revoke_handler(keys), self._revoke_timeout)
        except TimeoutError:
            logger.warning(
                "in-flight events of released partitions did not finish in %.1f s; "
                "they will be redelivered",
                self._revoke_timeout,
            )

    async def _checkpoint_periodically(self) -> None:
        interval = self._settings.checkpoint_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await self._checkpoint_logged(None)

    async def _checkpoint_logged(self, only: set[int] | None) -> None:
        try:
            await self._write_checkpoints(only)
        except Exception as exc:  # noqa: BLE001 - retried at the next interval
            logger.warning(
                "checkpoint failed, will retry: %s: %s",
                type(exc).__name__,
                str(exc)[:300],
                extra={"hub": self._hub},
            )

    async def _write_checkpoints(self, only: set[int] | None) -> None:
        partitions = [
            partition
            for (_, partition) in self._tracker.committable()
            if only is None or partition in only
        ]
        for partition in partitions:
            await self._write_checkpoint(partition)

    async def _write_checkpoint(self, partition: int) -> None:
        async with self._checkpoint_lock:
            await self._write_checkpoint_now(partition)

    async def _write_checkpoint_now(self, partition: int) -> None:
        # Read everything again after each await: the partition may have been
        # closed while another partition's checkpoint was written.
        next_sequence = self._tracker.committable().get((self._hub, partition))
        context = self._contexts.get(partition)
        if next_sequence is None or context is None:
            return
        if self._checkpointed.get(partition) == next_sequence:
            return
        offset = self._offset_of(partition, next_sequence - 1)
        if offset is None:
            return
        event = clients.checkpoint_event(next_sequence - 1, offset)
        await _counted(context.update_checkpoint(event))
        if self._contexts.get(partition) is context:
            self._checkpointed[partition] = next_sequence
        logger.debug(
            "checkpoint written",
            extra={
                "hub": self._hub,
                "partition": partition,
                "sequence_number": next_sequence - 1,
            },
        )

    def _offset_of(self, partition: int, sequence_number: int) -> str | None:
        """Return the offset of a received event, dropping the entries before it."""
        offsets = self._offsets.get(partition)
        while offsets and offsets[0][0] < sequence_number:
            offsets.popleft()
        if offsets and offsets[0][0] == sequence_number:
            return offsets[0][1]
        return None


async def _counted(write: Awaitable[None]) -> None:
    """Await a checkpoint write, counting its outcome in agogosml_commits_total."""
    try:
        await write
    except BaseException:
        COMMITS.labels("error").inc()
        raise
    COMMITS.labels("ok").inc()


def _partition_number(partition_id: str) -> int:
    try:
        return int(partition_id)
    except ValueError:
        raise SourceError(
            f"partition id {partition_id!r} is not a number; agogosml tracks "
            "Event Hubs partitions by number",
            retriable=False,
        ) from None
