"""Forward single results to the output writer together, without adding delay.

A model app that gets one message per request would otherwise make one writer
request per message: an HTTP round trip and a produce call each. `WriterQueue`
sends a result at once while fewer than `max_requests` writer requests are
open. When all of them are busy, results wait, and they leave together as one
``POST /batch`` as soon as a request finishes. So a quiet app sends each result
alone, and a busy one sends fewer, larger requests.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable

#: Sends one ``POST /batch`` body, a JSON array of the given number of
#: elements, to the writer, and raises unless the writer wrote them all.
Post = Callable[[bytes, int], Awaitable[None]]


class WriterQueue:
    """Combine concurrent writer requests of single results into batches.

    Args:
        post: Sends a JSON array body to the writer's ``/batch``.
        max_body_bytes: Largest body of one request; each element must fit alone.
        max_requests: Writer requests open at the same time.
        isolate: Returns whether an error of a combined request may concern
            one element only (the writer rejected a record): the elements are
            then sent again one by one, so only the element at fault fails.
    """

    def __init__(
        self,
        post: Post,
        *,
        max_body_bytes: int,
        max_requests: int = 8,
        isolate: Callable[[BaseException], bool] = lambda exc: False,
    ) -> None:
        self._post = post
        self._max_body_bytes = max_body_bytes
        self._max_requests = max_requests
        self._isolate = isolate
        self._waiting: collections.deque[tuple[bytes, asyncio.Future[None]]] = (
            collections.deque()
        )
        self._open = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def write(self, element: bytes) -> None:
        """Send one encoded batch element; return once the writer took it."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((element, future))
        self._schedule()
        await future

    def _schedule(self) -> None:
        # Start on the next loop iteration, so results that are ready in this
        # one leave together.
        if self._waiting and not self._scheduled and self._open < self._max_requests:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        while self._waiting and self._open < self._max_requests:
            batch = self._take()
            if not batch:
                continue
            self._open += 1
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _take(self) -> list[tuple[bytes, asyncio.Future[None]]]:
        """Take waiting elements, dropping cancelled ones, up to the size limit."""
        batch: list[tuple[bytes, asyncio.Future[None]]] = []
        size = 2
        while self._waiting:
            element, future = self._waiting[0]
            if future.done():
                self._waiting.popleft()
                continue
            added = len(element) + (1 if batch else 0)
            if batch and size + added > self._max_body_bytes:
                break
            batch.append(self._waiting.popleft())
            size += added
        return batch

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._open -= 1
        self._schedule()

    async def _send(self, batch: list[tuple[bytes, asyncio.Future[None]]]) -> None:
        try:
            await self._send_or_isolate(batch)
        except asyncio.CancelledError:
            # The requests of the batch that are still waiting, such as those
            # whose one-at-a-time resends had not started, learn that their
            # elements were not sent.
            for _, future in batch:
                future.cancel()
            raise

    async def _send_or_isolate(
        self, batch: list[tuple[bytes, asyncio.Future[None]]]
    ) -> None:
        try:
            await self._post(_array(element for element, _ in batch), len(batch))
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request
            if len(batch) > 1 and self._isolate(exc):
                # One at a time, so the resends stay within one writer request.
                for entry in batch:
                    await self._send([entry])
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    async def close(self) -> None:
        """Wait for the open writer requests to finish."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _array(elements: object) -> bytes:
    return b"[" + b",".join(elements) + b"]"  # type: ignore[arg-type]
