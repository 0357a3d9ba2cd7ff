"""The source and sink interfaces every transport implements, and offset tracking."""

from __future__ import annotations

import abc
import asyncio
import collections
import threading
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Self

from agogosml.envelope import Envelope, Position

#: Coroutine a source awaits before it gives up partitions, given as
#: (topic, partition) pairs. It returns once the in-flight messages of those
#: partitions are finished, or the source stops waiting after its timeout.
RevokeHandler = Callable[[list[tuple[str, int]]], Coroutine[Any, Any, None]]


async def stop_within(transport: _Lifecycle, timeout_seconds: float) -> bool:
    """Stop `transport` within `timeout_seconds`; return False if it did not stop."""
    try:
        await asyncio.wait_for(transport.stop(), timeout_seconds)
    except TimeoutError:
        return False
    return True


class _Lifecycle(abc.ABC):
    """`start`/`stop` pair usable as ``async with``."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Disconnect."""

    @property
    def failure(self) -> str | None:
        """Why the transport cannot recover without a restart, or None."""
        return None


class Source(_Lifecycle):
    """A stream of messages that commits only finished messages.

    The reader calls `fetch` in a loop, `ack` once per finished message (sent to
    the app successfully or dead-lettered), and `pause`/`resume` for
    back-pressure. A source commits only the contiguous prefix of acknowledged
    messages of each partition.
    """

    #: True once a bounded source (a file) has returned its last message.
    at_end: bool = False

    #: Whether a message left uncommitted is read again after a restart. A
    #: source that cannot read it again (stdin) has its queued messages
    #: delivered at shutdown, not released.
    replayable: bool = True

    def stop_reading(self) -> None:
        """Read no more input; `fetch` then returns only what is already read.

        Called at shutdown on a source that is not `replayable`, which then
        returns its buffered messages and sets `at_end`.
        """
        self.at_end = True

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and subscribe."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Commit every finished message and disconnect."""

    @abc.abstractmethod
    async def fetch(self, max_messages: int, timeout_seconds: float) -> list[Envelope]:
        """Return up to `max_messages` messages, waiting at most `timeout_seconds`.

        Must be called regularly even while paused, so the source keeps its
        group membership.
        """

    @abc.abstractmethod
    def ack(self, envelope: Envelope) -> None:
        """Mark a message finished so its position can be committed."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop delivering new messages until `resume`."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Deliver messages again after `pause`."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Return whether the source is started and reachable."""

    @property
    def unavailable_reason(self) -> str:
        """Why the source is not connected, for the reader's readiness check."""
        return "the source is not connected"

    def set_revoke_handler(self, handler: RevokeHandler) -> None:  # noqa: B027
        """Register the coroutine to await before partitions are given up."""

    def owns(self, envelope: Envelope) -> bool:
        """Return whether the message's partition is still assigned to this source."""
        return True


class TrackedSource(Source):
    """A source that tracks the position of each message in an `OffsetTracker`.

    Subclasses create ``self._tracker`` in ``__init__`` and register each
    message's position with it.
    """

    _tracker: OffsetTracker

    @property
    def tracker(self) -> OffsetTracker:
        """Offset tracker of this source (exposed for tests and metrics)."""
        return self._tracker

    def ack(self, envelope: Envelope) -> None:
        """Mark a message finished; it is committed with the next commit."""
        if envelope.position is not None:
            self._tracker.finish(envelope.position)

    def owns(self, envelope: Envelope) -> bool:
        """Return whether the message was read in the current assignment.

        A message of a partition that was revoked since is stale: the source
        must not send it, because the partition's new owner reads it again.
        """
        position = envelope.position
        if position is None:
            return True
        generation = self._tracker.generation(position.topic, position.partition)
        return generation == position.generation


class Sink(_Lifecycle):
    """A destination that acknowledges records once they are durable."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect to the destination."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Flush outstanding records and disconnect."""

    @abc.abstractmethod
    async def send(self, envelopes: Sequence[Envelope]) -> None:
        """Write `envelopes` and return once every one of them is durable.

        Raises:
            SinkError: when any record was not acknowledged.
        """

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Return whether the sink is started and reachable."""

    @property
    def unavailable_reason(self) -> str:
        """Why the sink is not connected, for the 503 response to a request."""
        return "the sink is not connected yet; retry shortly"


class OffsetTracker:
    """Tracks finished messages per partition and the position safe to commit.

    Messages of one partition are registered in the order they were read. The
    commit position is the `next_offset` of the last message of the contiguous
    finished prefix, so a message finished out of order is committed only once
    every earlier message is finished too. Thread-safe, because Kafka rebalance
    callbacks run on the client's thread.

    Args:
        commit_first_offset: Make the offset of a partition's first registered
            message its commit position until a message finishes. A Kafka
            group without a committed offset that starts at the end of the log
            (``auto.offset.reset=latest``) then commits where it started, so the
            next consumer of the partition does not skip the messages that were
            read but not finished. The Kafka source also commits that offset
            before the first message goes out, so a crash cannot come first.
    """

    def __init__(self, *, commit_first_offset: bool = False) -> None:
        self._commit_first_offset = commit_first_offset
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], collections.deque[Position]] = {}
        self._finished: dict[tuple[str, int], set[int]] = {}
        self._generation: dict[tuple[str, int], int] = {}
        self._committable: dict[tuple[str, int], int] = {}

    def assign(self, topic: str, partition: int) -> int:
        """Start tracking a partition afresh and return its new generation."""
        key = (topic, partition)
        with self._lock:
            generation = self._generation.get(key, 0) + 1
            self._generation[key] = generation
            self._pending[key] = collections.deque()
            self._finished[key] = set()
            self._committable.pop(key, None)
            return generation

    def generation(self, topic: str, partition: int) -> int:
        """Return the current generation of a partition (0 if never assigned)."""
        with self._lock:
            return self._generation.get((topic, partition), 0)

    def revoke(self, topic: str, partition: int) -> int | None:
        """Stop tracking a partition; return its last committable position."""
        key = (topic, partition)
        with self._lock:
            self._pending.pop(key, None)
            self._finished.pop(key, None)
            self._generation[key] = self._generation.get(key, 0) + 1
            return self._committable.pop(key, None)

    def register(self, position: Position) -> None:
        """Record that a message was read and is now in flight."""
        self.register_many((position,))

    def register_many(self, positions: Iterable[Position]) -> None:
        """Record that messages were read, in order, and are now in flight."""
        with self._lock:
            for position in positions:
                key = (position.topic, position.partition)
                pending = self._pending.get(key)
                if (
                    pending is not None
                    and self._generation.get(key) == position.generation
                ):
                    pending.append(position)
                    if self._commit_first_offset:
                        self._committable.setdefault(key, position.offset)

    def finish(self, position: Position) -> bool:
        """Mark a message finished; return False if its partition was lost since."""
        key = (position.topic, position.partition)
        with self._lock:
            pending = self._pending.get(key)
            finished = self._finished.get(key)
            if (
                self._generation.get(key) != position.generation
                or pending is None
                or finished is None
            ):
                return False
            finished.add(position.offset)
            while pending and pending[0].offset in finished:
                done = pending.popleft()
                finished.discard(done.offset)
                self._committable[key] = done.next_offset
            return True

    def committable(self) -> dict[tuple[str, int], int]:
        """Return the commit position of every partition that has one."""
        with self._lock:
            return dict(self._committable)

    def assigned(self, topic: str, partition: int) -> bool:
        """Return whether a partition is tracked: assigned and not revoked since."""
        with self._lock:
            return (topic, partition) in self._pending

    def in_flight(self, topic: str, partition: int) -> int:
        """Return how many messages of a partition are read but not finished."""
        with self._lock:
            pending = self._pending.get((topic, partition))
            return len(pending) if pending else 0
