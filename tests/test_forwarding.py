import asyncio

import orjson
import pytest

from agogosml.forwarding import WriterQueue


class RecordingPost:
    """A writer stand-in: records bodies; each call waits for `gate` if set."""

    def __init__(self) -> None:
        self.bodies: list[list[object]] = []
        self.gate: asyncio.Event | None = None
        self.fail_on: object = None

    async def __call__(self, body: bytes, count: int) -> None:
        elements = orjson.loads(body)
        assert len(elements) == count
        self.bodies.append(elements)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_on is not None and self.fail_on in elements:
            raise RejectedRecord("the writer rejected a record")


class RejectedRecord(Exception):
    pass


async def test_quiet_queue_sends_each_element_alone():
    post = RecordingPost()
    queue = WriterQueue(post, max_body_bytes=1000)

    await queue.write(b"1")
    await queue.write(b"2")

    assert post.bodies == [[1], [2]]


async def test_busy_queue_sends_waiting_elements_together():
    post = RecordingPost()
    post.gate = asyncio.Event()
    queue = WriterQueue(post, max_body_bytes=1000, max_requests=1)

    first = asyncio.create_task(queue.write(b"0"))
    await asyncio.sleep(0.01)
    rest = [asyncio.create_task(queue.write(str(n).encode())) for n in range(1, 6)]
    await asyncio.sleep(0.01)
    assert post.bodies == [[0]]

    post.gate.set()
    await asyncio.gather(first, *rest)
    assert post.bodies == [[0], [1, 2, 3, 4, 5]]


async def test_requests_stay_under_the_body_limit():
    post = RecordingPost()
    queue = WriterQueue(post, max_body_bytes=9, max_requests=1)

    # Each element is 3 bytes: "[a,b]" of two is 2 + 3 + 1 + 3 = 9 bytes.
    await asyncio.gather(*(queue.write(b"100") for _ in range(5)))

    assert [len(body) for body in post.bodies] == [2, 2, 1]


async def test_failed_request_fails_every_element_in_it():
    post = RecordingPost()
    post.gate = asyncio.Event()
    post.fail_on = 2
    queue = WriterQueue(post, max_body_bytes=1000, max_requests=1)

    first = asyncio.create_task(queue.write(b"1"))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(queue.write(b"2"))
    third = asyncio.create_task(queue.write(b"3"))
    post.gate.set()
    results = await asyncio.gather(first, second, third, return_exceptions=True)

    assert results[0] is None
    assert isinstance(results[1], RejectedRecord)
    assert isinstance(results[2], RejectedRecord)


async def test_isolated_errors_fail_only_the_element_at_fault():
    post = RecordingPost()
    post.gate = asyncio.Event()
    post.fail_on = 2
    queue = WriterQueue(
        post,
        max_body_bytes=1000,
        max_requests=1,
        isolate=lambda exc: isinstance(exc, RejectedRecord),
    )

    first = asyncio.create_task(queue.write(b"1"))
    await asyncio.sleep(0.01)
    others = [asyncio.create_task(queue.write(n)) for n in (b"2", b"3", b"4")]
    post.gate.set()
    results = await asyncio.gather(first, *others, return_exceptions=True)

    assert [isinstance(r, RejectedRecord) for r in results] == [
        False,
        True,
        False,
        False,
    ]
    assert post.bodies == [[1], [2, 3, 4], [2], [3], [4]]


async def test_cancelled_writes_are_not_sent():
    post = RecordingPost()
    post.gate = asyncio.Event()
    queue = WriterQueue(post, max_body_bytes=1000, max_requests=1)

    first = asyncio.create_task(queue.write(b"1"))
    await asyncio.sleep(0.01)
    abandoned = asyncio.create_task(queue.write(b"2"))
    kept = asyncio.create_task(queue.write(b"3"))
    await asyncio.sleep(0.01)
    abandoned.cancel()
    post.gate.set()
    await asyncio.gather(first, kept)

    with pytest.raises(asyncio.CancelledError):
        await abandoned
    assert post.bodies == [[1], [3]]
    await queue.close()


async def test_cancelled_request_cancels_its_writes():
    post = RecordingPost()
    post.gate = asyncio.Event()
    queue = WriterQueue(post, max_body_bytes=1000)
    write = asyncio.create_task(queue.write(b"1"))
    await asyncio.sleep(0.01)

    for task in queue._tasks:
        task.cancel()
    await queue.close()

    # Left pending, the write would wait for ever.
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(write, 1)


async def test_cancelled_resends_cancel_their_writes():
    resent = asyncio.Event()

    async def post(body: bytes, count: int) -> None:
        if count > 1:
            raise RejectedRecord("the writer rejected a record")
        resent.set()
        await asyncio.Event().wait()

    queue = WriterQueue(
        post,
        max_body_bytes=1000,
        isolate=lambda exc: isinstance(exc, RejectedRecord),
    )
    writes = [asyncio.create_task(queue.write(n)) for n in (b"1", b"2", b"3")]
    await asyncio.wait_for(resent.wait(), 1)

    for task in queue._tasks:
        task.cancel()
    await queue.close()

    # The writes whose resends were not sent yet would wait for ever.
    for write in writes:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(write, 1)
