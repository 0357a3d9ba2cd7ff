"""Random failures and rebalances: the reader commits only finished messages.

Each case draws app responses (200, 400, 429, 500, 503, per message or for a
whole batch) and four revocations of a random partition from its seed, for one
combination of ordering and batch size.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import orjson
import pytest
from aiohttp import web
from fakes import MemorySink, MemorySource
from test_reader import (
    TOPIC,
    Received,
    reader_settings,
    running_reader,
    stub_app,
    wait_for,
)

from agogosml.config import Ordering
from agogosml.envelope import Envelope
from agogosml.transports.base import RevokeHandler


class RebalancingSource(MemorySource):
    """MemorySource whose partitions can be revoked and assigned again."""

    def __init__(self, finished: set[str], partitions: int) -> None:
        super().__init__(TOPIC, partitions)
        self.finished = finished
        self.violations: list[str] = []

    def ack(self, envelope: Envelope) -> None:
        self.acked.append(envelope)
        if envelope.id not in self.finished:
            self.violations.append(f"ack of unfinished {envelope.id}")
        if envelope.position is not None:
            self.tracker.finish(envelope.position)
        self._commit()

    def _commit(self) -> None:
        for (topic, partition), offset in self.tracker.committable().items():
            if self.committed.get((topic, partition)) != offset:
                for below in range(offset):
                    if f"{topic}:{partition}:{below}" not in self.finished:
                        self.violations.append(
                            f"commit {partition}@{offset} past unfinished {below}"
                        )
                self.committed[(topic, partition)] = offset
                self.commits.append((topic, partition, offset))

    async def rebalance(self, partition: int, handler: RevokeHandler) -> None:
        """Revoke `partition` as a consumer group would, then assign it again."""
        await handler([(TOPIC, partition)])
        self._commit()
        self.tracker.revoke(TOPIC, partition)
        generation = self.tracker.assign(TOPIC, partition)
        self._generations[partition] = generation
        self._next_index[partition] = self.committed.get((TOPIC, partition), 0)


class RecordingSink(MemorySink):
    """A dead-letter sink that marks each record it takes as finished."""

    def __init__(self, finished: set[str]) -> None:
        super().__init__()
        self.finished = finished

    async def send(self, envelopes: Sequence[Envelope]) -> None:
        await super().send(envelopes)
        for envelope in envelopes:
            self.finished.add(envelope.id)


@pytest.mark.parametrize("seed", range(36))
async def test_random_faults_commit_only_finished(seed: int) -> None:
    rng = random.Random(seed)
    partitions = 3
    count = 40
    finished: set[str] = set()
    source = RebalancingSource(finished, partitions)
    for partition in range(partitions):
        for number in range(count):
            key = f"k{rng.randrange(5)}".encode()
            source.add(
                orjson.dumps({"n": number, "p": partition}),
                partition=partition,
                key=key,
            )
    dead_letter = RecordingSink(finished)

    def item_status() -> int:
        return rng.choice([200] * 6 + [500, 503, 400, 429])

    async def respond(received: Received) -> web.Response:
        await asyncio.sleep(rng.random() / 200)
        if received.path == "/batch":
            items = received.json()
            roll = rng.random()
            if roll < 0.1:
                return web.json_response({"error": "x"}, status=400)
            if roll < 0.2:
                return web.json_response({"error": "x"}, status=500)
            if roll < 0.25:
                return web.json_response(
                    {"error": "x"}, status=429, headers={"Retry-After": "0"}
                )
            statuses = [item_status() for _ in items]
            for item, status in zip(items, statuses, strict=True):
                if status == 200:
                    finished.add(item["id"])
            return web.json_response({"results": [{"status": s} for s in statuses]})
        status = item_status()
        if status == 200:
            finished.add(received.headers["X-Message-Id"])
        headers = {"Retry-After": "0"} if status == 429 and rng.random() < 0.5 else {}
        return web.json_response({"s": status}, status=status, headers=headers)

    ordering = [Ordering.PARTITION, Ordering.KEY, Ordering.UNORDERED][seed % 3]
    batch = [1, 4][seed // 3 % 2]
    async with stub_app(respond) as app:
        settings = reader_settings(
            app.url,
            stop_at_end=False,
            ordering=ordering,
            concurrency=3,
            batch_max_messages=batch,
            retry_max_attempts=3,
            max_in_flight=20,
        )
        async with running_reader(settings, source, dead_letter) as (reader, _):
            for _ in range(4):
                await asyncio.sleep(rng.random() / 10)
                await asyncio.wait_for(
                    source.rebalance(rng.randrange(partitions), source.revoke_handler),
                    5,
                )
            await wait_for(
                lambda: (
                    all(
                        source.committed.get((TOPIC, p)) == count
                        for p in range(partitions)
                    )
                    and reader.in_flight == 0
                )
            )
            counters = dict(reader._partition_in_flight)

    assert source.violations == []
    assert all(value == 0 for value in counters.values()), counters
