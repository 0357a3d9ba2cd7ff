"""Native Event Hubs side of ``agogosml run --eventhubs``.

The run sends the input file to the input hub, starts the reader with a blob
checkpoint container of its own, and receives the output and dead-letter
hubs in a background thread. The hubs must exist. Only the events enqueued
after the run started are read and counted, so the hubs may hold older events.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
from azure.eventhub import EventData
from azure.eventhub.aio import (
    EventHubConsumerClient,
    EventHubProducerClient,
    PartitionContext,
)
from azure.eventhub.exceptions import EventHubError
from rich.console import Console

from agogosml.config import EventHubSettings, load_settings
from agogosml.envelope import MESSAGE_ID_HEADER, Envelope
from agogosml.errors import ConfigurationError
from agogosml.transports.eventhubs import EventHubsSink
from agogosml_cli.run import DEAD_LETTER_ERROR_HEADER, OutputTally, RunTopics

#: Variables that a run over native Event Hubs needs, and what each contains.
REQUIRED_VARIABLES = {
    "EVENTHUB_CONNECTION_STRING": "the namespace's connection string",
    "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING": "the storage account's "
    "connection string, for the reader's checkpoints",
}
#: Events per send call while the input is produced; the sink packs them into
#: batches of the hub's maximum message size.
SEND_CHUNK = 5000
#: Where a hub's events start when it has never held one.
EARLIEST = "earliest"


def load_run_settings(
    consumer_group: str | None, checkpoint_container: str | None
) -> EventHubSettings:
    """Read the EVENTHUB_ settings of a run; flags override the environment.

    Raises:
        ConfigurationError: when a required variable is missing, a setting is
            invalid, or the connection string is limited to one hub.
    """
    missing = [name for name in REQUIRED_VARIABLES if not os.environ.get(name)]
    if missing:
        needs = "; ".join(f"{name}: {REQUIRED_VARIABLES[name]}" for name in missing)
        raise ConfigurationError(
            f"--eventhubs needs {', '.join(missing)} in the environment ({needs}). "
            "They are read from the environment only, so that no secret appears "
            "on a command line"
        )
    # EVENTHUB_CHECKPOINT_STORE_CONTAINER is not used, because checkpoints in
    # it would make the reader resume there instead of at this run's events.
    overrides: dict[str, Any] = {
        "checkpoint_store_container": checkpoint_container or ""
    }
    if consumer_group is not None:
        overrides["consumer_group"] = consumer_group
    settings = load_settings(EventHubSettings, **overrides)
    entity = settings.hub_in_connection_string()
    if entity:
        raise ConfigurationError(
            "EVENTHUB_CONNECTION_STRING grants access to event hub "
            f"{entity!r} only (EntityPath), but a run reads and writes three hubs; "
            "use a connection string of the namespace"
        )
    return settings


class EventHubsBackend:
    """Run through three existing event hubs with the native transport."""

    transport = "eventhubs"

    def __init__(
        self, settings: EventHubSettings, topics: RunTopics, run_id: str
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.checkpoint_container = (
            settings.checkpoint_store_container or f"agogosml-run-{run_id}"
        )
        self._start: dict[str, str] = {}

    def check_connection(self) -> None:
        """Check nothing: `prepare` opens each hub before it sends the input.

        NOTE: so a run that cannot reach the namespace still writes its input
        file first.
        """

    def prepare(self, input_path: Path, count: int, console: Console) -> list[str]:
        """Note where each hub's new events start, then send the input.

        Returns the message id of each input record, which the events carry.
        """
        hubs = (self.topics.input, self.topics.output, self.topics.dead_letter)
        self._start = asyncio.run(_latest_enqueued_times(self.settings, hubs))
        console.print(f"Sending {count} events to event hub {self.topics.input} ...")
        asyncio.run(send_file(self.settings, self.topics.input, input_path))
        return [line_message_id(number) for number in range(1, count + 1)]

    def service_env(self) -> dict[str, str]:
        """Return no variables: the services inherit the EVENTHUB_ connection.

        EVENTHUB_CONNECTION_STRING and the checkpoint store's connection
        string reach the services through the environment that the run's
        settings were read from.
        """
        return {}

    def reader_env(self) -> dict[str, str]:
        """Return the reader's consumer group, checkpoint container and start."""
        return {
            "EVENTHUB_CONSUMER_GROUP": self.settings.consumer_group,
            "EVENTHUB_CHECKPOINT_STORE_CONTAINER": self.checkpoint_container,
            "EVENTHUB_STARTING_POSITION": self._start.get(self.topics.input, EARLIEST),
        }

    def output_reader(self) -> OutputReceiver:
        """Return a receiver of the events this run adds to output and dead letters."""
        return OutputReceiver(self.settings, self.topics, self._start)

    def committed_ids(self) -> None:
        """Return None: the run does not know which events the reader checkpointed.

        NOTE: the producer does not report the sequence numbers of the sent
        events, so the reader's blob checkpoints cannot be mapped to them.
        """
        return None

    def delete_created(self, console: Console) -> list[str]:
        """Delete nothing, because the run creates no event hubs.

        The reader's checkpoint container is kept too.
        """
        return []


def _producer(settings: EventHubSettings, hub: str) -> EventHubProducerClient:
    return EventHubProducerClient.from_connection_string(
        settings.connection_string.get_secret_value(), eventhub_name=hub
    )


async def latest_enqueued_time(settings: EventHubSettings, hub: str) -> str:
    """Return the enqueued time of the hub's last event, or "earliest" if none.

    The time comes from the service, so events sent later are enqueued after
    it whatever the local clock says.
    """
    client = _producer(settings, hub)
    try:
        async with client:
            partitions = await client.get_partition_ids()
            properties = [await client.get_partition_properties(p) for p in partitions]
    except EventHubError as exc:
        raise RuntimeError(
            f"cannot open event hub {hub!r}: {type(exc).__name__}: {str(exc)[:300]}; "
            "check that the hub exists and that EVENTHUB_CONNECTION_STRING may use it"
        ) from None
    times = [p["last_enqueued_time_utc"] for p in properties if not p["is_empty"]]
    return max(times).isoformat() if times else EARLIEST


async def _latest_enqueued_times(
    settings: EventHubSettings, hubs: tuple[str, ...]
) -> dict[str, str]:
    return {hub: await latest_enqueued_time(settings, hub) for hub in hubs}


def line_message_id(number: int) -> str:
    """Return the message id of the event sent for line `number` of the input."""
    return f"input.jsonl:line-{number}"


def _chunks(path: Path) -> Iterator[list[Envelope]]:
    chunk: list[Envelope] = []
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            value = line.rstrip(b"\n")
            chunk.append(Envelope(value=value, id=line_message_id(number)))
            if len(chunk) == SEND_CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


async def send_file(settings: EventHubSettings, hub: str, path: Path) -> None:
    """Send every line of a JSON Lines file as one event, without partition key.

    Without a key the events fill batches up to the maximum message size and
    the service spreads the batches over the partitions.
    """
    async with EventHubsSink(settings, hub, variable="--input-topic") as sink:
        for chunk in _chunks(path):
            await sink.send(chunk)


class OutputReceiver:
    """Receive the output and dead-letter hubs of a run in a background thread.

    Each hub is read from its `start` time on, in the settings' consumer group,
    without checkpoints.
    """

    def __init__(
        self, settings: EventHubSettings, topics: RunTopics, start: dict[str, str]
    ) -> None:
        self._settings = settings
        self._topics = topics
        self._start = start
        self._events: queue.Queue[tuple[str, EventData]] = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._clients: list[EventHubConsumerClient] = []
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="eventhubs-output", daemon=True
        )

    def __enter__(self) -> OutputReceiver:
        self._thread.start()
        for hub in (self._topics.output, self._topics.dead_letter):
            asyncio.run_coroutine_threadsafe(self._receive(hub), self._loop)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        closing = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
        closing.result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _receive(self, hub: str) -> None:
        client = EventHubConsumerClient.from_connection_string(
            self._settings.connection_string.get_secret_value(),
            self._settings.consumer_group,
            eventhub_name=hub,
        )
        self._clients.append(client)
        start = self._start.get(hub, EARLIEST)

        async def on_event(context: PartitionContext, event: EventData | None) -> None:
            if event is not None:
                self._events.put((hub, event))

        position: str | datetime.datetime = "-1"
        if start != EARLIEST:
            position = datetime.datetime.fromisoformat(start)
        await client.receive(on_event, starting_position=position)

    async def _close(self) -> None:
        for client in self._clients:
            await client.close()

    def poll_into(self, tally: OutputTally, timeout_seconds: float) -> None:
        """Count the events that arrived, waiting up to `timeout_seconds` for one."""
        try:
            items = [self._events.get(timeout=timeout_seconds)]
        except queue.Empty:
            items = []
        while not self._events.empty():
            items.append(self._events.get_nowait())
        for hub, event in items:
            _count(tally, hub == self._topics.dead_letter, event)

    def final_count(self, tally: OutputTally) -> OutputTally:
        """Add to `tally` the events that arrive until none came for 2 s.

        Called once the services stopped, for at most 30 s.

        NOTE: the receiver does not compare with the hubs' last sequence
        numbers, so an event delayed by more than 2 s is not counted.
        """
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                hub, event = self._events.get(timeout=2)
            except queue.Empty:
                break
            _count(tally, hub == self._topics.dead_letter, event)
            self.poll_into(tally, 0)
        return tally


def _count(tally: OutputTally, dead_letter: bool, event: EventData) -> None:
    properties = event.properties or {}
    message_id = properties.get(MESSAGE_ID_HEADER.encode(), b"")
    if isinstance(message_id, bytes):
        message_id = message_id.decode("utf-8", "replace")
    if dead_letter:
        reason = properties.get(DEAD_LETTER_ERROR_HEADER.encode(), b"")
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        tally.add_dead_letter(str(message_id), str(reason))
    else:
        tally.add_output(str(message_id), orjson.loads(event.body_as_str() or "null"))
