"""The Event Hubs source with the real blob checkpoint store, on Azurite.

The consumer is the SDK fake of tests/eventhubs_fakes.py; the checkpoint store
is azure-eventhub-checkpointstoreblob-aio's BlobCheckpointStore, talking HTTP
to an Azurite blob service that the test session starts.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from azure.eventhub.extensions.checkpointstoreblobaio import BlobCheckpointStore
from eventhubs_fakes import NAMESPACE, FakeConsumerClient, FakeHub, offset_of

from agogosml.config import EventHubSettings
from agogosml.envelope import Envelope
from agogosml.transports.eventhubs import EventHubsSource
from agogosml.transports.eventhubs.clients import ensure_container, new_checkpoint_store

HUB = "checkpointed-hub"
CONSUMER_GROUP = "$Default"
CONNECTION_STRING = (
    f"Endpoint=sb://{NAMESPACE}/;SharedAccessKeyName=pipeline;SharedAccessKey=a2V5"
)
TIMEOUT_SECONDS = 10.0


@pytest.fixture
def eventhub_settings(azurite_connection_string: str) -> EventHubSettings:
    return EventHubSettings(
        connection_string=CONNECTION_STRING,
        checkpoint_store_connection_string=azurite_connection_string,
        checkpoint_store_container=f"checkpoints-{uuid.uuid4().hex[:12]}",
        checkpoint_interval_ms=3_600_000,
    )


@pytest.fixture
async def store(eventhub_settings: EventHubSettings) -> AsyncIterator[Any]:
    blob_store, _ = new_checkpoint_store(eventhub_settings)
    await ensure_container(blob_store)
    yield blob_store
    await blob_store.close()


async def fetch_all(source: EventHubsSource, count: int) -> list[Envelope]:
    envelopes: list[Envelope] = []
    async with asyncio.timeout(TIMEOUT_SECONDS):
        while len(envelopes) < count:
            envelopes.extend(await source.fetch(count - len(envelopes), 0.05))
    return envelopes


async def stored_checkpoints(store: BlobCheckpointStore) -> dict[str, tuple[int, str]]:
    checkpoints = await store.list_checkpoints(NAMESPACE, HUB, CONSUMER_GROUP)
    return {
        c["partition_id"]: (int(c["sequence_number"]), str(c["offset"]))
        for c in checkpoints
    }


def filled_hub(count: int) -> FakeHub:
    hub = FakeHub(HUB, partition_ids=["0", "1"])
    for n in range(count):
        hub.add(str(n % 2), orjson.dumps({"n": n}))
    return hub


@pytest.mark.slow
async def test_checkpoints_survive_restart(
    eventhub_settings: EventHubSettings, store: BlobCheckpointStore
) -> None:
    hub = filled_hub(10)
    first = EventHubsSource(
        eventhub_settings, HUB, consumer=FakeConsumerClient(hub, store)
    )
    await first.start()
    for envelope in await fetch_all(first, 10):
        assert envelope.position is not None
        if envelope.position.offset < 3:
            first.ack(envelope)
    await first.stop()
    written = await stored_checkpoints(store)

    reopened, _ = new_checkpoint_store(eventhub_settings)
    second = EventHubsSource(
        eventhub_settings, HUB, consumer=FakeConsumerClient(hub, reopened)
    )
    await second.start()
    resumed = await fetch_all(second, 4)
    extra = await second.fetch(10, 0.2)
    await second.stop()
    await reopened.close()

    assert written == {"0": (2, offset_of(2)), "1": (2, offset_of(2))}
    positions = sorted(
        (e.position.partition, e.position.offset) for e in resumed if e.position
    )
    assert positions == [(0, 3), (0, 4), (1, 3), (1, 4)]
    assert extra == []


@pytest.mark.slow
async def test_latest_start_checkpointed_in_blob(
    eventhub_settings: EventHubSettings, store: BlobCheckpointStore
) -> None:
    hub = FakeHub(HUB, partition_ids=["0", "1"])
    hub.add("0", orjson.dumps({"n": 0}))
    latest = eventhub_settings.model_copy(update={"starting_position": "latest"})
    first = EventHubsSource(
        latest, HUB, consumer=FakeConsumerClient(hub, store), checkpoint_store=store
    )
    await first.start()
    async with asyncio.timeout(TIMEOUT_SECONDS):
        while len(await stored_checkpoints(store)) < 2:
            await asyncio.sleep(0.05)
    hub.add("0", orjson.dumps({"n": 1}))
    hub.add("1", orjson.dumps({"n": 2}))
    released = await fetch_all(first, 2)
    await first.stop()
    written = await stored_checkpoints(store)

    second = EventHubsSource(
        latest, HUB, consumer=FakeConsumerClient(hub, store), checkpoint_store=store
    )
    await second.start()
    again = await fetch_all(second, 2)
    await second.stop()

    assert written == {"0": (0, offset_of(0)), "1": (-1, "-1")}
    assert sorted(e.value for e in again) == sorted(e.value for e in released)
    assert sorted(orjson.loads(e.value)["n"] for e in again) == [1, 2]


@pytest.mark.slow
async def test_blob_checkpoint_holds_prefix(
    eventhub_settings: EventHubSettings, store: BlobCheckpointStore
) -> None:
    hub = FakeHub(HUB, partition_ids=["0"])
    for n in range(6):
        hub.add("0", orjson.dumps({"n": n}))
    source = EventHubsSource(
        eventhub_settings, HUB, consumer=FakeConsumerClient(hub, store)
    )
    await source.start()
    envelopes = await fetch_all(source, 6)

    for index in (0, 1, 3, 4, 5):
        source.ack(envelopes[index])
    await source.checkpoint()
    while_two_open = await stored_checkpoints(store)
    source.ack(envelopes[2])
    await source.checkpoint()
    after = await stored_checkpoints(store)
    await source.stop()

    assert while_two_open == {"0": (1, offset_of(1))}
    assert after == {"0": (5, offset_of(5))}


@pytest.mark.slow
async def test_ownership_claims_exclusive(store: BlobCheckpointStore) -> None:
    def claim(owner: str, partition: str, etag: str | None) -> dict[str, Any]:
        return {
            "fully_qualified_namespace": NAMESPACE,
            "eventhub_name": HUB,
            "consumer_group": CONSUMER_GROUP,
            "partition_id": partition,
            "owner_id": owner,
            "etag": etag,
        }

    first = await store.claim_ownership([claim("reader-a", "0", None)])
    first_etag = list(first)[0]["etag"]
    taken = await store.claim_ownership([claim("reader-b", "0", first_etag)])
    stale_renewal = await store.claim_ownership([claim("reader-a", "0", first_etag)])
    owners = await store.list_ownership(NAMESPACE, HUB, CONSUMER_GROUP)

    assert [o["owner_id"] for o in first] == ["reader-a"]
    assert [o["owner_id"] for o in taken] == ["reader-b"]
    assert list(stale_renewal) == []
    assert [(o["partition_id"], o["owner_id"]) for o in owners] == [("0", "reader-b")]


@pytest.mark.slow
async def test_missing_container_created(eventhub_settings: EventHubSettings) -> None:
    blob_store, _ = new_checkpoint_store(eventhub_settings)

    await ensure_container(blob_store)
    await ensure_container(blob_store)  # exists now: no error
    checkpoints = await blob_store.list_checkpoints(NAMESPACE, HUB, CONSUMER_GROUP)
    await blob_store.close()

    assert list(checkpoints) == []
