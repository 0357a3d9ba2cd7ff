"""Event Hubs sink: a producer that sends envelopes in size-limited batches."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from azure.eventhub import EventDataBatch
from azure.eventhub.aio import EventHubProducerClient
from azure.eventhub.exceptions import EventDataError, EventHubError

from agogosml.config import EventHubSettings
from agogosml.envelope import Envelope
from agogosml.errors import SinkError
from agogosml.transports.base import Sink
from agogosml.transports.eventhubs import clients

logger = logging.getLogger(__name__)


@dataclass
class _KeyBatches:
    """The batches of one partition key, in order, with their envelopes."""

    key: str | None
    batches: list[tuple[EventDataBatch, list[Envelope]]] = field(default_factory=list)


class EventHubsSink(Sink):
    """Send envelopes to one event hub; `send` returns once every batch was accepted.

    Envelopes are grouped by partition key, keeping their order within a key,
    and packed into batches up to the hub's maximum message size (or
    EVENTHUB_MAX_BATCH_BYTES). Batches of one key are sent one after another,
    and different keys are passed to the SDK concurrently, whose producer then
    sends one batch at a time. After a batch fails, the later batches of its
    key are not sent, so a retry keeps the key's order.
    """

    def __init__(
        self,
        settings: EventHubSettings,
        hub: str,
        *,
        variable: str = "WRITER_OUTPUT",
        producer: EventHubProducerClient | None = None,
    ) -> None:
        clients.check_hub(settings, hub, variable)
        self._settings = settings
        self._hub = hub
        self._producer = producer
        self._owns_producer = producer is None
        self._credential: Any = None
        self._started = False

    @property
    def connected(self) -> bool:
        """Whether the producer is started.

        A failed send does not count as disconnected: the writer rejects
        requests while its sink is not connected, so no later send could
        succeed and show that the hub is back.
        """
        return self._started

    async def start(self) -> None:
        """Create the producer and check the hub, its access and its batch limit.

        Raises:
            SinkError: when the hub cannot be opened, or when
                EVENTHUB_MAX_BATCH_BYTES is over the hub's maximum message size
                (not retriable).
        """
        if self._producer is None:
            self._producer, self._credential = clients.new_producer(
                self._settings, self._hub
            )
        try:
            properties = await self._producer.get_eventhub_properties()
            # A batch without a size limit gets the hub's maximum message size.
            hub_batch = await self._producer.create_batch()
        except EventHubError as exc:
            await self._close()
            raise SinkError(
                f"cannot open event hub {self._hub!r}: {type(exc).__name__}: "
                f"{str(exc)[:300]}; check that the hub exists and that the "
                "EVENTHUB_ credentials may send to it",
                retriable=False,
            ) from None
        limit = self._settings.max_batch_bytes
        if limit is not None and limit > hub_batch.max_size_in_bytes:
            await self._close()
            raise self._batch_limit_error(hub_batch.max_size_in_bytes, retriable=False)
        self._started = True
        logger.info(
            "eventhubs sink started",
            extra={
                "hub": self._hub,
                "partitions": len(properties.get("partition_ids", [])),
            },
        )

    def _batch_limit_error(self, hub_limit: int, *, retriable: bool) -> SinkError:
        return SinkError(
            f"EVENTHUB_MAX_BATCH_BYTES={self._settings.max_batch_bytes} is over the "
            f"maximum message size of {hub_limit} bytes of event hub {self._hub!r}. "
            f"Set it to {hub_limit} or less, or unset it to use the hub's maximum",
            retriable=retriable,
        )

    async def stop(self) -> None:
        """Close the producer; every `send` has returned by then."""
        self._started = False
        await self._close()
        logger.info("eventhubs sink stopped", extra={"hub": self._hub})

    async def _close(self) -> None:
        if self._producer is not None and self._owns_producer:
            await self._producer.close()
            self._producer = None
        if self._credential is not None:
            await self._credential.close()
            self._credential = None

    async def send(self, envelopes: Sequence[Envelope]) -> None:
        """Send every envelope and wait until the service accepted each batch.

        Raises:
            SinkError: when an event is too large for an empty batch (before
                any event is sent, not retriable), when the hub's maximum
                message size fell below EVENTHUB_MAX_BATCH_BYTES (before any
                event is sent, retriable), or when a batch was not accepted.
                ``failures`` maps each unsent message id to why.
        """
        if self._producer is None or not self._started:
            raise SinkError("Event Hubs sink is not started", retriable=True)
        groups = await self._pack(envelopes)
        failed: list[tuple[Envelope, str]] = []
        retriable = await asyncio.gather(
            *(self._send_key(group, failed) for group in groups)
        )
        if failed:
            first, first_reason = failed[0]
            raise SinkError(
                f"{len(failed)} of {len(envelopes)} events were not accepted by "
                f"event hub {self._hub!r}; event {first.id!r}: {first_reason}",
                retriable=all(retriable),
                failures=_by_id(failed),
            )

    async def _pack(self, envelopes: Sequence[Envelope]) -> list[_KeyBatches]:
        """Pack envelopes into batches per partition key, checking every size first.

        Rejecting an oversized event before the first send keeps such a request
        all-or-nothing: otherwise the events before it would be written, and
        written again when the request is retried.
        """
        groups: dict[str | None, _KeyBatches] = {}
        # A list, not a dict by id, so that events sharing an id are all counted.
        too_large: list[tuple[Envelope, str]] = []
        for envelope in envelopes:
            key = clients.partition_key(envelope)
            group = groups.get(key)
            if group is None:
                group = groups[key] = _KeyBatches(key)
            reason = await self._add(group, envelope)
            if reason:
                too_large.append((envelope, reason))
        if too_large:
            first, reason = too_large[0]
            raise SinkError(
                f"{len(too_large)} of {len(envelopes)} events are too large for "
                f"event hub {self._hub!r}, so no event of this request was sent; "
                f"event {first.id!r}: {reason}",
                retriable=False,
                failures=_by_id(too_large),
                too_large=True,
            )
        return list(groups.values())

    async def _add(self, group: _KeyBatches, envelope: Envelope) -> str:
        """Add an envelope to the group's last batch, or to a new one when full.

        Returns:
            Why the event fits no batch, or "" when it was added.
        """
        event = clients.to_event(envelope)
        if group.batches:
            batch, members = group.batches[-1]
            try:
                batch.add(event)
            except ValueError:
                pass
            else:
                members.append(envelope)
                return ""
        batch = await self._new_batch(group.key)
        try:
            batch.add(event)
        except ValueError:
            return _too_large_reason(envelope, batch.max_size_in_bytes)
        group.batches.append((batch, [envelope]))
        return ""

    async def _new_batch(self, key: str | None) -> EventDataBatch:
        """Create an empty batch of the configured size for a partition key.

        Raises:
            SinkError: when the SDK rejects EVENTHUB_MAX_BATCH_BYTES because the
                hub's maximum message size is now lower than at `start`.
        """
        assert self._producer is not None
        try:
            return await self._producer.create_batch(
                partition_key=key, max_size_in_bytes=self._settings.max_batch_bytes
            )
        except ValueError:
            # azure-eventhub 5.15 raises ValueError here only for a size over
            # the hub's maximum; a batch without a size reports that maximum.
            # NOTE: the client reads that maximum once and keeps it, so after
            # the check in start() this branch is a guard that the SDK of
            # 5.15 does not reach.
            hub_batch = await self._producer.create_batch(partition_key=key)
        raise self._batch_limit_error(hub_batch.max_size_in_bytes, retriable=True)

    async def _send_key(
        self, group: _KeyBatches, failed: list[tuple[Envelope, str]]
    ) -> bool:
        """Send the batches of one key in order; return whether failures may pass."""
        assert self._producer is not None
        timeout = self._settings.send_timeout_ms / 1000
        for index, (batch, members) in enumerate(group.batches):
            try:
                await self._producer.send_batch(batch, timeout=timeout)
            except EventHubError as exc:
                reason = f"send failed: {type(exc).__name__}: {str(exc)[:300]}"
                failed.extend((envelope, reason) for envelope in members)
                for _, later in group.batches[index + 1 :]:
                    failed.extend(
                        (envelope, _NOT_SENT_AFTER_FAILURE) for envelope in later
                    )
                # NOTE: the default pyamqp transport of azure-eventhub 5.15
                # raises EventDataSendError, not EventDataError, for a rejected
                # message, so such a failure counts as retriable.
                return not isinstance(exc, EventDataError)
        return True


_NOT_SENT_AFTER_FAILURE = (
    "not sent, because an earlier batch with the same partition key failed"
)


def _by_id(failed: list[tuple[Envelope, str]]) -> dict[str, str]:
    """Return the reason of each failed message id; a repeated id keeps its last."""
    return {envelope.id: reason for envelope, reason in failed}


def _too_large_reason(envelope: Envelope, limit: int) -> str:
    """Return why an event fits no empty batch, naming its largest part."""
    key = len((clients.partition_key(envelope) or "").encode())
    headers = sum(
        len(name.encode()) + len(value or b"")
        for name, value in envelope.record_headers()
    )
    sizes = {"value": len(envelope.value), "key": key, "headers": headers}
    advice = {
        "value": "send a smaller value",
        "key": "shorten the key",
        "headers": "send fewer or shorter headers",
    }
    largest = max(sizes, key=lambda part: sizes[part])
    return (
        f"it is {sizes['value']} bytes of value, {key} bytes of partition key and "
        f"{headers} bytes of headers, over the batch limit of {limit} bytes once "
        f"encoded. {advice[largest].capitalize()} (the hub's maximum message "
        "size is set by its tier)"
    )
