"""In-memory Source and Sink implementations, and HTTP helpers, for unit tests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import pytest

from agogosml.envelope import Envelope, Position
from agogosml.errors import SinkError
from agogosml.transports.base import OffsetTracker, RevokeHandler, Sink, Source


class MemorySource(Source):
    """A bounded source of records held in lists, one list per partition.

    Offsets of each partition start at 0. `fetch` takes records from the
    partitions in turn, so a batch interleaves partitions as a Kafka fetch can.
    Every `ack` commits the contiguous finished prefix at once, and `commits`
    keeps each position committed, in order.
    """

    def __init__(self, topic: str = "input", partitions: int = 1) -> None:
        self.topic = topic
        self.tracker = OffsetTracker()
        self._records: dict[
            int,
            list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]],
        ] = {}
        self._next_index: dict[int, int] = {}
        self._generations: dict[int, int] = {}
        for partition in range(partitions):
            self._records[partition] = []
            self._next_index[partition] = 0
            self._generations[partition] = self.tracker.assign(topic, partition)
        self.acked: list[Envelope] = []
        self.committed: dict[tuple[str, int], int] = {}
        self.commits: list[tuple[str, int, int]] = []
        self.fetched_count = 0
        self.pause_count = 0
        self.resume_count = 0
        self.paused = False
        self.started = False
        self.revoke_handler: RevokeHandler | None = None

    def add(
        self,
        value: bytes | None,
        *,
        partition: int = 0,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Append a record to the end of a partition."""
        self._records[partition].append((value, key, headers))

    @property
    def at_end(self) -> bool:  # type: ignore[override]
        """Whether every record has been fetched."""
        return all(
            self._next_index[partition] == len(records)
            for partition, records in self._records.items()
        )

    def stop_reading(self) -> None:
        """Return the records left, as a source that cannot be read again does."""

    @property
    def connected(self) -> bool:
        """Whether `start` was called and `stop` was not."""
        return self.started

    async def start(self) -> None:
        """Mark the source started."""
        self.started = True

    async def stop(self) -> None:
        """Commit the finished prefix and mark the source stopped."""
        self._commit()
        self.started = False

    async def fetch(self, max_messages: int, timeout_seconds: float) -> list[Envelope]:
        """Return up to `max_messages` records, or [] after a short wait."""
        envelopes: list[Envelope] = []
        while not self.paused and len(envelopes) < max_messages and not self.at_end:
            for partition in self._records:
                if len(envelopes) < max_messages:
                    envelope = self._take(partition)
                    if envelope is not None:
                        envelopes.append(envelope)
        if not envelopes:
            await asyncio.sleep(min(timeout_seconds, 0.005))
        self.fetched_count += len(envelopes)
        return envelopes

    def _take(self, partition: int) -> Envelope | None:
        offset = self._next_index[partition]
        if offset == len(self._records[partition]):
            return None
        self._next_index[partition] = offset + 1
        value, key, headers = self._records[partition][offset]
        position = Position(
            self.topic, partition, offset, offset + 1, self._generations[partition]
        )
        self.tracker.register(position)
        envelope = Envelope.from_record(value or b"", key, headers, position)
        envelope.null_value = value is None
        return envelope

    def ack(self, envelope: Envelope) -> None:
        """Mark a message finished and commit the finished prefix."""
        self.acked.append(envelope)
        if envelope.position is not None:
            self.tracker.finish(envelope.position)
        self._commit()

    def owns(self, envelope: Envelope) -> bool:
        """Whether the message was read in its partition's current generation."""
        position = envelope.position
        if position is None:
            return True
        generation = self.tracker.generation(position.topic, position.partition)
        return generation == position.generation

    def _commit(self) -> None:
        for (topic, partition), offset in self.tracker.committable().items():
            if self.committed.get((topic, partition)) != offset:
                self.committed[(topic, partition)] = offset
                self.commits.append((topic, partition, offset))

    async def pause(self) -> None:
        """Count the call and stop returning records until `resume`."""
        self.pause_count += 1
        self.paused = True

    async def resume(self) -> None:
        """Count the call and return records again."""
        self.resume_count += 1
        self.paused = False

    def set_revoke_handler(self, handler: RevokeHandler) -> None:
        """Keep the handler so a test can call it."""
        self.revoke_handler = handler


class MemorySink(Sink):
    """A sink that keeps every envelope it acknowledged, in order.

    `fail_next` makes the next sends raise `SinkError`. While `gate` is clear,
    `send` waits, so a test can hold a write in flight. `on_send`, if set, is
    called at the start of every send, so a test can record state at that moment.
    """

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.send_calls = 0
        self.started = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.on_send: Callable[[], None] | None = None
        self._failures_left = 0
        self._failures_retriable = True
        self._failures_too_large = False
        self._failures_size_rejected = False
        self._failures_batch_rejected = False

    def fail_next(
        self,
        count: int,
        *,
        retriable: bool = True,
        too_large: bool = False,
        size_rejected: bool = False,
        batch_rejected: bool = False,
    ) -> None:
        """Make the next `count` calls of `send` raise `SinkError`.

        With `too_large`, the error names every record as too large, as a sink
        does for a record over its size limit. With `size_rejected`, the error
        reports that the destination rejected records as too large without naming
        them, as the Kafka sink does while it cannot read the topic's limit.
        With `batch_rejected`, it reports a batch rejected for an invalid record
        that may belong to another call.
        """
        self._failures_left = count
        self._failures_retriable = retriable
        self._failures_too_large = too_large
        self._failures_size_rejected = size_rejected
        self._failures_batch_rejected = batch_rejected

    @property
    def connected(self) -> bool:
        """Whether `start` was called and `stop` was not."""
        return self.started

    async def start(self) -> None:
        """Mark the sink started."""
        self.started = True

    async def stop(self) -> None:
        """Mark the sink stopped."""
        self.started = False

    async def send(self, envelopes: Sequence[Envelope]) -> None:
        """Store `envelopes`, or raise `SinkError` on a requested failure."""
        self.send_calls += 1
        if self.on_send is not None:
            self.on_send()
        await self.gate.wait()
        if not self.started:
            raise SinkError("memory sink is not started")
        if self._failures_left > 0:
            self._failures_left -= 1
            failures = (
                {envelope.id: "too large" for envelope in envelopes}
                if self._failures_too_large
                else None
            )
            raise SinkError(
                "memory sink failed this send, as fail_next requested",
                retriable=self._failures_retriable,
                failures=failures,
                too_large=self._failures_too_large,
                size_rejected=self._failures_size_rejected,
                batch_rejected=self._failures_batch_rejected,
            )
        self.envelopes.extend(envelopes)


async def send_partial_body(port: int) -> None:
    """Send headers that promise 100 body bytes, 3 of them, then disconnect.

    The client waits for ``100 Continue``, so the server's handler has started
    when the connection closes.
    """
    stream_reader, stream_writer = await asyncio.open_connection("127.0.0.1", port)
    stream_writer.write(
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await stream_reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100"), interim
    stream_writer.write(b"[1,")
    await stream_writer.drain()
    stream_writer.close()
    await stream_writer.wait_closed()


def disconnect_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "agogosml.http" and "disconnected" in record.getMessage()
    ]
