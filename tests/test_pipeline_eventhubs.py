"""End-to-end tests over a real Azure Event Hubs namespace, when one is configured.

Set EVENTHUB_CONNECTION_STRING (namespace level),
EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING and EVENTHUB_TEST_HUBS
(``input,output,dead-letter``: three existing hubs) to run them.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from azure.eventhub import EventData
from azure.eventhub.aio import EventHubConsumerClient, PartitionContext
from harness import APPS_DIR, REPO_ROOT, numbered

from agogosml.config import EventHubSettings
from agogosml.envelope import Envelope
from agogosml.transports.eventhubs import EventHubsSink
from agogosml_cli.local import app_process, reader_process, writer_process

REQUIRED = (
    "EVENTHUB_CONNECTION_STRING",
    "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING",
    "EVENTHUB_TEST_HUBS",
)
MISSING = [name for name in REQUIRED if not os.environ.get(name)]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason="needs a real Event Hubs namespace: set "
        + ", ".join(MISSING)
        + " (EVENTHUB_TEST_HUBS=input,output,dead-letter names three existing hubs)",
    ),
]

RECORDS = 200


async def read_hubs(
    hubs: list[str], since: datetime.datetime, expected: int, timeout_seconds: float
) -> dict[str, list[EventData]]:
    """Read events enqueued after `since` from `hubs` until `expected` arrived."""
    received: dict[str, list[EventData]] = {hub: [] for hub in hubs}
    done = asyncio.Event()

    def on_event_for(hub: str) -> Any:
        async def on_event(context: PartitionContext, event: EventData | None) -> None:
            if event is not None:
                received[hub].append(event)
            if sum(len(events) for events in received.values()) >= expected:
                done.set()

        return on_event

    connection_string = os.environ["EVENTHUB_CONNECTION_STRING"]
    clients = [
        EventHubConsumerClient.from_connection_string(
            connection_string, "$Default", eventhub_name=hub
        )
        for hub in hubs
    ]
    tasks = [
        asyncio.create_task(client.receive(on_event_for(hub), starting_position=since))
        for client, hub in zip(clients, hubs, strict=True)
    ]
    try:
        await asyncio.wait_for(done.wait(), timeout_seconds)
        await asyncio.sleep(2)  # let duplicates, if any, arrive too
    finally:
        for client in clients:
            await client.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return received


async def test_pipeline_over_eventhubs(tmp_path: Path) -> None:
    input_hub, output_hub, dead_letter_hub = os.environ["EVENTHUB_TEST_HUBS"].split(",")
    started_at = datetime.datetime.now(datetime.UTC)
    records = numbered(RECORDS)
    records[7]["poison"] = True
    run_id = uuid.uuid4().hex[:8]
    common = {
        "PYTHONPATH": f"{APPS_DIR}:{REPO_ROOT}",
        "EVENTHUB_CHECKPOINT_STORE_CONTAINER": f"agogosml-test-{run_id}",
        "EVENTHUB_STARTING_POSITION": started_at.isoformat(),
        "EVENTHUB_CHECKPOINT_INTERVAL_MS": "500",
    }
    async with EventHubsSink(EventHubSettings(), input_hub) as sink:
        await sink.send(
            [Envelope(value=orjson.dumps(r), key=str(r["n"]).encode()) for r in records]
        )
    writer = writer_process(tmp_path, sink="eventhubs", output=output_hub, extra=common)
    app = app_process(tmp_path, writer.url, module="fault_app", extra=common)
    reader = reader_process(
        tmp_path,
        app.url,
        source="eventhubs",
        input_=input_hub,
        extra={**common, "READER_DEAD_LETTER": dead_letter_hub},
    )
    try:
        for service in (writer, app, reader):
            service.start()
            service.wait_ready(120)
        received = await read_hubs(
            [output_hub, dead_letter_hub], started_at, RECORDS, 300
        )
    finally:
        for service in (reader, app, writer):
            service.stop()
        print("\n".join(s.log_tail(40) for s in (reader, app, writer)))

    outputs = [orjson.loads(b"".join(e.body)) for e in received[output_hub]]
    dead = [orjson.loads(b"".join(e.body)) for e in received[dead_letter_hub]]
    assert {value["n"] for value in outputs} == set(range(RECORDS)) - {7}
    assert [value["n"] for value in dead] == [7]
    assert received[dead_letter_hub][0].properties[b"dlq.status"] == b"400"


def test_run_command_over_eventhubs(tmp_path: Path, fraud_model: Path) -> None:
    input_hub, output_hub, dead_letter_hub = os.environ["EVENTHUB_TEST_HUBS"].split(",")
    summary_path = tmp_path / "summary.json"

    result = subprocess.run(
        [
            sys.executable, "-m", "agogosml_cli.main", "run", "--eventhubs",
            "--input-topic", input_hub,
            "--output-topic", output_hub,
            "--dead-letter-topic", dead_letter_hub,
            "--limit", str(RECORDS),
            "--model", str(fraud_model),
            "--summary-json", str(summary_path),
            "--work-dir", str(tmp_path / "work"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    summary = orjson.loads(summary_path.read_bytes())
    assert summary["transport"] == "eventhubs"
    assert summary["read"] == RECORDS
    assert summary["written"] == RECORDS
    assert summary["dead_lettered"] == 0
    assert summary["missing"] == 0
    assert summary["output"] == output_hub
