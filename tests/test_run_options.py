"""`agogosml run` broker options: combinations, secrets from the environment, wiring.

None of these tests reaches a broker or a namespace. The runs over a real
broker are in test_cli_run.py, and the run over a real Event Hubs namespace
is in test_pipeline_eventhubs.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime
import io
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from eventhubs_fakes import FakeHub
from kafka_endpoint import CONNECTION_STRING
from rich.console import Console

from agogosml.config import EventHubSettings, KafkaSettings
from agogosml_cli import eventhubs_run, kafka_run, local, run_options
from agogosml_cli import run as run_module
from agogosml_cli.eventhubs_run import EventHubsBackend, OutputReceiver
from agogosml_cli.kafka_run import KafkaBackend, _broker_error
from agogosml_cli.local import ServiceProcess
from agogosml_cli.main import cli
from agogosml_cli.run import (
    INTERRUPTS,
    Interrupts,
    OutputTally,
    RunOptions,
    RunSummary,
    RunTopics,
    TopicNames,
    run_pipeline,
    stop_services,
)
from agogosml_cli.run_options import eventhubs_kafka_address
from sample_app.data import COLUMNS

STORAGE_CONNECTION_STRING = (
    "DefaultEndpointsProtocol=https;AccountName=agogosmltest;"
    "AccountKey=dGVzdC1zdG9yYWdlLWtleQ==;EndpointSuffix=core.windows.net"
)
SECRET_VARIABLES = (
    "EVENTHUB_CONNECTION_STRING",
    "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING",
    "EVENTHUB_FULLY_QUALIFIED_NAMESPACE",
    "EVENTHUB_CHECKPOINT_STORE_ACCOUNT_URL",
    "EVENTHUB_CHECKPOINT_STORE_CONTAINER",
    "EVENTHUB_CONSUMER_GROUP",
    "KAFKA_EVENTHUBS_CONNECTION_STRING",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SSL_CA_LOCATION",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECRET_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def eventhubs_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTHUB_CONNECTION_STRING", CONNECTION_STRING)
    monkeypatch.setenv(
        "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING", STORAGE_CONNECTION_STRING
    )


def invoke_run(tmp_path: Path, *arguments: str) -> Any:
    return CliRunner().invoke(
        cli, ["run", "--work-dir", str(tmp_path / "work"), *arguments]
    )


# ---------------------------------------------------------------------------
# Option combinations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--kafka", "k:9092", "--eventhubs"], "--kafka and --eventhubs exclude"),
        (
            ["--kafka", "k:9092", "--eventhubs-kafka", "ns"],
            "--kafka and --eventhubs-kafka exclude",
        ),
        (["--kafka-sasl-mechanism", "PLAIN"], "--kafka-sasl-mechanism needs --kafka"),
        (
            ["--eventhubs-kafka", "ns", "--kafka-security-protocol", "SSL"],
            "--kafka-security-protocol does not apply to --eventhubs-kafka",
        ),
        (
            ["--kafka", "k:9092", "--eventhubs-consumer-group", "g"],
            "--eventhubs-consumer-group needs --eventhubs",
        ),
        (["--input-topic", "t"], "--input-topic needs --kafka"),
        (["--eventhubs", "--input-topic", "in"], "--eventhubs needs --input-topic"),
    ],
)
def test_conflicting_options_rejected(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    result = invoke_run(tmp_path, *arguments)

    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.parametrize(
    ("mode", "arguments", "message"),
    [
        (
            ["--kafka", "127.0.0.1:9092"],
            ["--input-topic", "bad topic", "--output-topic", "o"],
            "--input-topic names topic 'bad topic', which is not a legal Kafka "
            "topic name",
        ),
        (
            ["--eventhubs-kafka", "ns"],
            ["--input-topic", "i", "--output-topic", "a,b"],
            "--output-topic names topic 'a,b', which is not a legal Kafka topic",
        ),
        (
            ["--kafka", "127.0.0.1:9092"],
            ["--input-topic", "i", "--output-topic", "o", "--dead-letter-topic", ".."],
            "--dead-letter-topic names topic '..', which is not a legal Kafka",
        ),
        (
            ["--kafka", "127.0.0.1:9092"],
            ["--input-topic", "t" * 247, "--output-topic", "o"],
            "the default dead-letter topic '<--input-topic>.dlq' (choose another "
            "with --dead-letter-topic) names topic 'ttt",
        ),
        (
            ["--eventhubs"],
            ["--input-topic", "-hub", "--output-topic", "o"],
            "--input-topic names event hub '-hub', which is not a legal event hub name",
        ),
    ],
)
def test_illegal_topic_name_rejected(
    tmp_path: Path, mode: list[str], arguments: list[str], message: str
) -> None:
    result = invoke_run(tmp_path, *mode, *arguments)

    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--work-dir", ""], "'--work-dir': the path is empty"),
        (["--stall-timeout-seconds", "nan"], "nan is not a number of seconds"),
        (["--stall-timeout-seconds", "inf"], "inf is not a number of seconds"),
    ],
)
def test_run_rejects_empty_or_infinite_values(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    result = invoke_run(tmp_path, *arguments)

    assert result.exit_code == 2, result.output
    assert message in result.output


def test_kafka_extra_config_property_named() -> None:
    config = {"bootstrap.servers": "127.0.0.1:9", "bogus": 1}
    topics = RunTopics(input="in", output="out", dead_letter="in.dlq")

    with pytest.raises(click.UsageError) as caught:
        kafka_run.prepare_topics(config, topics, [])

    assert 'No such configuration property: "bogus"' in caught.value.message
    assert "KAFKA_EXTRA_CONFIG" in caught.value.message


def test_long_event_hub_name_accepted() -> None:
    assert run_options._EVENT_HUB_NAME.fullmatch("h" * 256)
    assert not run_options._EVENT_HUB_NAME.fullmatch("h" * 257)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--input-topic", "same-u", "--output-topic", "same-u"],
            "--input-topic and --output-topic name the same topic 'same-u', so "
            "the scored records would be read again as input",
        ),
        (
            [
                "--input-topic",
                "in-a",
                "--output-topic",
                "o",
                "--dead-letter-topic",
                "in-a",
            ],
            "--input-topic and --dead-letter-topic name the same topic 'in-a', so "
            "the dead letters would be read again as input",
        ),
        (
            [
                "--input-topic",
                "i",
                "--output-topic",
                "out",
                "--dead-letter-topic",
                "out",
            ],
            "--output-topic and --dead-letter-topic name the same topic 'out', so "
            "scored records and dead letters would mix",
        ),
        (
            ["--input-topic", "in", "--output-topic", "in.dlq"],
            "--output-topic and the default dead-letter topic '<--input-topic>.dlq' "
            "name the same topic 'in.dlq'",
        ),
    ],
)
@pytest.mark.parametrize(
    "mode",
    [["--kafka", "127.0.0.1:9092"], ["--eventhubs-kafka", "ns"], ["--eventhubs"]],
)
def test_shared_topic_rejected(
    tmp_path: Path, mode: list[str], arguments: list[str], message: str
) -> None:
    result = invoke_run(tmp_path, *mode, *arguments)

    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_eventhubs_names_missing_variables(tmp_path: Path) -> None:
    result = invoke_run(
        tmp_path, "--eventhubs", "--input-topic", "in", "--output-topic", "out"
    )

    assert result.exit_code == 2, result.output
    assert "EVENTHUB_CONNECTION_STRING" in result.output
    assert "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING" in result.output


def test_eventhubs_names_only_missing_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVENTHUB_CONNECTION_STRING", CONNECTION_STRING)

    result = invoke_run(
        tmp_path, "--eventhubs", "--input-topic", "in", "--output-topic", "out"
    )

    assert result.exit_code == 2, result.output
    assert "needs EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING in" in result.output
    assert CONNECTION_STRING not in result.output


def test_eventhubs_rejects_hub_connection_string(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, eventhubs_environment: None
) -> None:
    monkeypatch.setenv(
        "EVENTHUB_CONNECTION_STRING", CONNECTION_STRING + ";EntityPath=transactions"
    )

    result = invoke_run(
        tmp_path, "--eventhubs", "--input-topic", "in", "--output-topic", "out"
    )

    assert result.exit_code == 2, result.output
    assert "'transactions' only (EntityPath)" in result.output
    assert "SharedAccessKey=" not in result.output


def test_eventhubs_kafka_needs_connection_string(tmp_path: Path) -> None:
    result = invoke_run(tmp_path, "--eventhubs-kafka", "ns")

    assert result.exit_code == 2, result.output
    assert "KAFKA_EVENTHUBS_CONNECTION_STRING" in result.output


def test_sasl_needs_credentials_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "pipeline")

    result = invoke_run(
        tmp_path,
        "--kafka", "127.0.0.1:9093",
        "--kafka-security-protocol", "SASL_SSL",
        "--kafka-sasl-mechanism", "SCRAM-SHA-512",
    )  # fmt: skip

    assert result.exit_code == 2, result.output
    assert "SCRAM-SHA-512 needs KAFKA_SASL_PASSWORD in" in result.output
    assert "KAFKA_SASL_USERNAME and" not in result.output


def test_sasl_protocol_needs_mechanism(tmp_path: Path) -> None:
    result = invoke_run(
        tmp_path, "--kafka", "127.0.0.1:9093", "--kafka-security-protocol", "SASL_SSL"
    )

    assert result.exit_code == 2, result.output
    assert "KAFKA_SASL_MECHANISM" in result.output


@pytest.mark.parametrize(
    ("namespace", "address"),
    [
        ("scoring", "scoring.servicebus.windows.net:9093"),
        ("scoring.servicebus.windows.net", "scoring.servicebus.windows.net:9093"),
        ("127.0.0.1:19093", "127.0.0.1:19093"),
        ("localhost:9093", "localhost:9093"),
        ("localhost", "localhost.servicebus.windows.net:9093"),
        ("[::1]:9093", "[::1]:9093"),
        ("[::1]", "[::1]:9093"),
        ("127.0.0.1", "127.0.0.1:9093"),
    ],
)
def test_eventhubs_kafka_address(namespace: str, address: str) -> None:
    assert eventhubs_kafka_address(namespace) == address


@pytest.mark.parametrize(
    ("namespace", "message"),
    [
        ("", "is empty"),
        ("localhost:", "port '' is not a number"),
        ("localhost:kafka", "port 'kafka' is not a number"),
        ("localhost:70000", "port '70000' is not a number from 1 to 65535"),
        (":9093", "host is empty"),
        ("::1", "put an IPv6 address in brackets"),
        ("[::1", "close the IPv6 address"),
        ("[::1]9093", "put ':' between"),
    ],
)
def test_eventhubs_kafka_address_invalid(namespace: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        eventhubs_kafka_address(namespace)


@pytest.fixture
def no_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a run that passes the option checks fail instead of streaming."""

    def run_pipeline(options: RunOptions, console: Console) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr("agogosml_cli.run.run_pipeline", run_pipeline)


@pytest.mark.usefixtures("no_pipeline")
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--kafka", ""], "Invalid value for '--kafka': the broker address is empty"),
        (["--kafka", "  "], "Invalid value for '--kafka'"),
        (
            ["--kafka", "127.0.0.1:99999"],
            "Invalid value for '--kafka': address '127.0.0.1:99999' is invalid: "
            "port '99999' is not a number from 1 to 65535; expected "
            "HOST:PORT[,HOST:PORT...]",
        ),
        (
            ["--kafka", "broker"],
            "Invalid value for '--kafka': address 'broker' has no port",
        ),
        (["--eventhubs-kafka", ""], "Invalid value for '--eventhubs-kafka'"),
        (
            ["--eventhubs-kafka", "ns:kafka"],
            "Invalid value for '--eventhubs-kafka': port 'kafka'",
        ),
    ],
)
def test_invalid_broker_option_rejected(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    data = tmp_path / "data.csv"
    write_dataset(data, 3)

    result = invoke_run(tmp_path, "--data", str(data), "--limit", "3", *arguments)

    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--eventhubs-checkpoint-container", "Bad_Name"],
            "Invalid value for '--eventhubs-checkpoint-container': 'Bad_Name' "
            "is not a valid blob container name",
        ),
        (
            ["--eventhubs-consumer-group", ""],
            "Invalid value for '--eventhubs-consumer-group': the consumer group "
            "is empty",
        ),
    ],
)
def test_eventhubs_option_named_in_error(
    tmp_path: Path, eventhubs_environment: None, arguments: list[str], message: str
) -> None:
    result = invoke_run(
        tmp_path,
        "--eventhubs", "--input-topic", "in", "--output-topic", "out", *arguments,
    )  # fmt: skip

    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "EVENTHUB_" not in result.output


# ---------------------------------------------------------------------------
# Environment of the services
# ---------------------------------------------------------------------------


def test_kafka_env_with_security_options(tmp_path: Path) -> None:
    ca_path = tmp_path / "ca.pem"
    ca_path.write_text("")
    values = {
        "bootstrap_servers": "broker:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "PLAIN",
        "sasl_username": "pipeline",
        "sasl_password": "secret-password",
        "ssl_ca_location": str(ca_path),
    }
    settings = KafkaSettings(**values)  # type: ignore[arg-type]
    backend = KafkaBackend(settings, RunTopics("in", "out", "in.dlq"), "abc")

    assert backend.service_env() == {
        "KAFKA_BOOTSTRAP_SERVERS": "broker:9093",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "PLAIN",
        "KAFKA_SSL_CA_LOCATION": str(ca_path),
    }
    # A run's reader reads the input it produced, whatever the environment sets.
    assert backend.reader_env() == {
        "KAFKA_GROUP_ID": "agogosml-run-abc",
        "KAFKA_AUTO_OFFSET_RESET": "earliest",
    }


def test_kafka_env_of_eventhubs_endpoint() -> None:
    values = {
        "bootstrap_servers": "scoring.servicebus.windows.net:9093",
        "eventhubs_connection_string": CONNECTION_STRING,
    }
    settings = KafkaSettings(**values)  # type: ignore[arg-type]
    backend = KafkaBackend(settings, RunTopics("in", "out", "in.dlq"), "abc")

    assert backend.service_env() == {
        "KAFKA_BOOTSTRAP_SERVERS": "scoring.servicebus.windows.net:9093"
    }


class FakeReceiver:
    """Count every input record as written on the first poll."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def poll_into(self, tally: OutputTally, timeout_seconds: float) -> None:
        for message_id in self.ids:
            tally.add_output(message_id, {"score": 1})

    def final_count(self, tally: OutputTally) -> OutputTally:
        self.poll_into(tally, 0)
        return tally


class InterruptedReceiver(FakeReceiver):
    """Count two records, then end the run as Ctrl-C does; the rest come last."""

    def poll_into(self, tally: OutputTally, timeout_seconds: float) -> None:
        for message_id in self.ids[:2]:
            tally.add_output(message_id, {"score": 1})
        raise KeyboardInterrupt

    def final_count(self, tally: OutputTally) -> OutputTally:
        FakeReceiver.poll_into(self, tally, 0)
        return tally


@pytest.fixture
def started_services(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, str]]:
    """Record the environment of each service instead of starting it."""
    started: dict[str, dict[str, str]] = {}

    def start(self: ServiceProcess) -> ServiceProcess:
        started[self.name] = dict(self.env)
        return self

    monkeypatch.setattr(ServiceProcess, "start", start)
    monkeypatch.setattr(ServiceProcess, "wait_ready", lambda self, *args, **kw: None)
    monkeypatch.setattr(ServiceProcess, "running", lambda self: True)
    monkeypatch.setattr(ServiceProcess, "stop", lambda self, **options: 0)
    return started


def write_dataset(path: Path, rows: int) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        for _ in range(rows):
            writer.writerow([0] * len(COLUMNS))


def run_through_fake_hubs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, receiver: type[FakeReceiver]
) -> tuple[RunSummary, list[tuple[str, int]]]:
    """Run 5 records through Event Hubs clients replaced by fakes.

    Returns the summary and the (hub, record count) of each input sent.
    """
    sent: list[tuple[str, int]] = []

    async def latest_enqueued_time(settings: EventHubSettings, hub: str) -> str:
        return {"in": "2026-01-02T03:04:05+00:00"}.get(hub, "earliest")

    async def send_file(settings: EventHubSettings, hub: str, path: Path) -> None:
        sent.append((hub, len(path.read_bytes().splitlines())))

    @contextlib.contextmanager
    def output_reader(self: EventHubsBackend) -> Iterator[FakeReceiver]:
        yield receiver([eventhubs_run.line_message_id(n) for n in range(1, 6)])

    monkeypatch.setattr(eventhubs_run, "latest_enqueued_time", latest_enqueued_time)
    monkeypatch.setattr(eventhubs_run, "send_file", send_file)
    monkeypatch.setattr(EventHubsBackend, "output_reader", output_reader)
    data = tmp_path / "data.csv"
    write_dataset(data, 5)
    options = RunOptions(
        data_path=data,
        work_dir=tmp_path / "work",
        eventhubs=eventhubs_run.load_run_settings("scoring", None),
        topics=TopicNames(input="in", output="out"),
        batch_size=10,
    )
    return run_pipeline(options, Console(file=io.StringIO())), sent


def test_eventhubs_input_events_carry_line_ids(tmp_path: Path) -> None:
    path = tmp_path / "input.jsonl"
    path.write_bytes(b'{"a": 1}\n"b"\n')

    events = [event for chunk in eventhubs_run._chunks(path) for event in chunk]

    assert [event.id for event in events] == [
        "input.jsonl:line-1",
        "input.jsonl:line-2",
    ]
    assert [event.value for event in events] == [b'{"a": 1}', b'"b"']


def test_eventhubs_run_wiring(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    eventhubs_environment: None,
    started_services: dict[str, dict[str, str]],
) -> None:
    summary, sent = run_through_fake_hubs(tmp_path, monkeypatch, FakeReceiver)

    writer = started_services["output writer"]
    reader = started_services["input reader"]
    container = reader.pop("EVENTHUB_CHECKPOINT_STORE_CONTAINER")
    assert sent == [("in", 5)]
    assert summary.transport == "eventhubs"
    assert summary.written == 5
    assert summary.missing == 0
    assert summary.output == "out"
    assert summary.dead_letter == "in.dlq"
    assert writer == {
        "WRITER_SINK": "eventhubs",
        "WRITER_OUTPUT": "out",
        "WRITER_PORT": writer["WRITER_PORT"],
    }
    assert container.startswith("agogosml-run-")
    assert reader == {
        "READER_SOURCE": "eventhubs",
        "READER_INPUT": "in",
        "READER_APP_URL": reader["READER_APP_URL"],
        "READER_PORT": reader["READER_PORT"],
        "READER_DEAD_LETTER": "in.dlq",
        "READER_BATCH_MAX_MESSAGES": "10",
        "READER_ORDERING": "partition",
        "READER_MAX_IN_FLIGHT": "1000",
        "EVENTHUB_CONSUMER_GROUP": "scoring",
        "EVENTHUB_STARTING_POSITION": "2026-01-02T03:04:05+00:00",
    }
    for env in (writer, reader):
        assert not any("CONNECTION_STRING" in name for name in env)


def test_run_keeps_max_in_flight_of_environment(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    eventhubs_environment: None,
    started_services: dict[str, dict[str, str]],
) -> None:
    monkeypatch.setenv("READER_MAX_IN_FLIGHT", "50")

    run_through_fake_hubs(tmp_path, monkeypatch, FakeReceiver)

    reader = started_services["input reader"]
    assert "READER_MAX_IN_FLIGHT" not in reader
    assert reader["READER_BATCH_MAX_MESSAGES"] == "10"


def test_eventhubs_checkpoint_container_option(eventhubs_environment: None) -> None:
    settings = eventhubs_run.load_run_settings(None, "scoring-checkpoints")
    backend = EventHubsBackend(settings, RunTopics("in", "out", "in.dlq"), "abc")

    env = backend.reader_env()

    assert env["EVENTHUB_CHECKPOINT_STORE_CONTAINER"] == "scoring-checkpoints"
    assert env["EVENTHUB_CONSUMER_GROUP"] == "$Default"
    assert env["EVENTHUB_STARTING_POSITION"] == "earliest"


def test_eventhubs_ignores_container_variable(
    monkeypatch: pytest.MonkeyPatch, eventhubs_environment: None
) -> None:
    monkeypatch.setenv("EVENTHUB_CHECKPOINT_STORE_CONTAINER", "service-checkpoints")

    settings = eventhubs_run.load_run_settings(None, None)
    backend = EventHubsBackend(settings, RunTopics("in", "out", "in.dlq"), "abc")

    assert backend.reader_env()["EVENTHUB_CHECKPOINT_STORE_CONTAINER"] == (
        "agogosml-run-abc"
    )


class HubConsumer:
    """Consumer client that delivers every event of a `FakeHub` until closed."""

    def __init__(self, hub: FakeHub, positions: dict[str, Any]) -> None:
        self.hub = hub
        self.positions = positions
        self.closed = asyncio.Event()

    async def receive(self, on_event: Any, *, starting_position: Any) -> None:
        self.positions[self.hub.name] = starting_position
        for partition_id in self.hub.partition_ids:
            for index in range(len(self.hub.partitions[partition_id])):
                await on_event(None, self.hub.received(partition_id, index))
        await self.closed.wait()

    async def close(self) -> None:
        self.closed.set()


def test_output_receiver_counts_both_hubs(
    monkeypatch: pytest.MonkeyPatch, eventhubs_environment: None
) -> None:
    output, dead_letters = FakeHub("out"), FakeHub("in.dlq")
    output.add("0", b'{"transaction_id": "tx-000000"}', **{"message-id": "m0"})
    output.add("1", b'{"transaction_id": "tx-000001"}', **{"message-id": "m1"})
    output.add("1", b'{"transaction_id": "tx-000001"}', **{"message-id": "m1"})
    dead_letters.add(
        "0",
        b'{"transaction_id": "tx-000002"}',
        **{"message-id": "m2", "dlq.error": "not an integer"},
    )
    hubs = {"out": output, "in.dlq": dead_letters}
    positions: dict[str, Any] = {}

    def from_connection_string(
        connection_string: str, consumer_group: str, *, eventhub_name: str
    ) -> HubConsumer:
        return HubConsumer(hubs[eventhub_name], positions)

    monkeypatch.setattr(
        eventhubs_run.EventHubConsumerClient,
        "from_connection_string",
        from_connection_string,
    )
    settings = eventhubs_run.load_run_settings(None, None)
    start = {"out": "2026-01-02T03:04:05+00:00", "in.dlq": "earliest"}
    tally = OutputTally()

    with OutputReceiver(settings, RunTopics("in", "out", "in.dlq"), start) as receiver:
        deadline = time.monotonic() + 10
        while (tally.finished, tally.duplicates) != (3, 1) and (
            time.monotonic() < deadline
        ):
            receiver.poll_into(tally, 0.1)

    assert tally.written == {"m0", "m1"}
    assert tally.dead_lettered == {"m2"}
    assert tally.dead_letter_reasons == {"not an integer": 1}
    assert tally.duplicates == 1
    assert positions["out"] == datetime.datetime(
        2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC
    )
    assert positions["in.dlq"] == "-1"


@pytest.mark.parametrize(
    ("config", "used"),
    [
        ({}, "with security protocol PLAINTEXT ("),
        ({"security.protocol": "SSL"}, "with security protocol SSL ("),
        (
            {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"},
            "with security protocol SASL_SSL with SASL mechanism PLAIN (",
        ),
    ],
)
def test_broker_error_names_protocol(config: dict[str, str], used: str) -> None:
    error = KafkaException(
        KafkaError(KafkaError._TRANSPORT, "Broker transport failure")
    )

    message = str(_broker_error({"bootstrap.servers": "127.0.0.1:1", **config}, error))

    assert message.startswith(f"cannot reach a Kafka broker at '127.0.0.1:1' {used}")
    assert "Broker transport failure" in message
    assert "--kafka-security-protocol" in message
    assert "KAFKA_SECURITY_PROTOCOL" in message


def test_eventhubs_run_interrupted_counts_output_last(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    eventhubs_environment: None,
    started_services: dict[str, dict[str, str]],
) -> None:
    summary, _ = run_through_fake_hubs(tmp_path, monkeypatch, InterruptedReceiver)

    assert summary.interrupted is True
    assert summary.written == 5
    # The run cannot map the reader's checkpoints to the events it sent.
    assert summary.read is None
    assert summary.missing is None
    assert summary.not_finished is None


class StoppingService:
    """A service that records stop and kill calls; `interrupt` makes stop raise."""

    def __init__(self, name: str, events: list[str], interrupt: bool = False) -> None:
        self.name = name
        self.events = events
        self.interrupt = interrupt

    def stop(self, **options: object) -> None:
        self.events.append(f"stop {self.name}")
        if self.interrupt:
            raise KeyboardInterrupt

    def kill(self) -> None:
        self.events.append(f"kill {self.name}")


def test_interrupt_while_stopping_kills_every_service() -> None:
    events: list[str] = []
    services = [
        StoppingService("writer", events),
        StoppingService("app", events, interrupt=True),
        StoppingService("reader", events),
    ]
    handler = signal.getsignal(signal.SIGINT)

    interrupted = stop_services(services)  # type: ignore[arg-type]

    assert interrupted is True
    assert events == [
        "stop reader",
        "stop app",
        "kill writer",
        "kill app",
        "kill reader",
    ]
    assert signal.getsignal(signal.SIGINT) is handler


class SlowService(StoppingService):
    """A service that takes long to stop, so `stop` calls its `on_slow`."""

    module = "slow_app"

    def stop(self, **options: Any) -> None:
        super().stop()
        options["on_slow"](self)


def test_slow_service_stop_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    events: list[str] = []

    interrupted = stop_services([SlowService("model app", events)])  # type: ignore[list-item]

    assert interrupted is False
    assert "Waiting for the model app (slow_app) to stop" in capsys.readouterr().err


def test_second_signal_before_the_stop_kills_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []
    services = [StoppingService("writer", events), StoppingService("app", events)]
    monkeypatch.setattr(INTERRUPTS, "signals", [signal.SIGINT, signal.SIGINT])

    interrupted = stop_services(services)  # type: ignore[arg-type]

    assert interrupted is True
    assert events == ["kill writer", "kill app"]
    assert INTERRUPTS.stopping is False


def test_signal_after_the_stop_only_recorded() -> None:
    interrupts = Interrupts()

    with pytest.raises(KeyboardInterrupt):
        interrupts.handle(signal.SIGINT, None)
    interrupts.handle(signal.SIGINT, None)
    interrupts.stopping = True
    with pytest.raises(KeyboardInterrupt):
        interrupts.handle(signal.SIGTERM, None)

    assert interrupts.signals == [signal.SIGINT, signal.SIGINT, signal.SIGTERM]


@pytest.fixture
def mock_cluster() -> Iterator[str]:
    """Start librdkafka's mock cluster; return its bootstrap address."""
    admin = AdminClient({"test.mock.num.brokers": "1"})
    brokers = admin.list_topics(timeout=10).brokers
    yield ",".join(f"{b.host}:{b.port}" for b in brokers.values())
    del admin  # the mock cluster lives as long as this client


def test_committed_ids_end_at_committed_offset(
    mock_cluster: str, tmp_path: Path
) -> None:
    input_path = tmp_path / "input.jsonl"
    input_path.write_bytes(
        b"".join(b'{"transaction_id": "tx-%d"}\n' % n for n in range(20))
    )
    settings = KafkaSettings(bootstrap_servers=mock_cluster)
    backend = KafkaBackend(settings, RunTopics("run-in", "out", "run-in.dlq"), "abc")
    positions = kafka_run.produce_file(backend._config, "run-in", input_path)
    backend._positions = {f"line-{n}": p for n, p in enumerate(positions)}
    partition, offset = backend._positions["line-7"]
    # The reader committed past tx-7 on its partition, and nothing elsewhere.
    consumer = Consumer(
        {"bootstrap.servers": mock_cluster, "group.id": backend.group_id}
    )
    consumer.commit(
        offsets=[TopicPartition("run-in", partition, offset + 1)], asynchronous=False
    )
    consumer.close()

    committed = backend.committed_ids()

    assert committed is not None
    assert "line-7" in committed
    assert committed == {
        line
        for line, (other, position) in backend._positions.items()
        if other == partition and position <= offset
    }
    assert len(backend._positions) == 20


def test_signal_during_service_start_waits_for_start() -> None:
    finished_block = False
    handler = signal.getsignal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        with local._signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            finished_block = True

    assert finished_block is True
    assert signal.getsignal(signal.SIGINT) is handler


# ---------------------------------------------------------------------------
# Topics that a run creates and deletes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "run_specific"),
    [
        (
            TopicNames(),
            {
                "agogosml-run-abc-input",
                "agogosml-run-abc-output",
                "agogosml-run-abc-input.dlq",
            },
        ),
        (TopicNames(input="in"), {"agogosml-run-abc-output"}),
        (
            TopicNames(output="out"),
            {"agogosml-run-abc-input", "agogosml-run-abc-input.dlq"},
        ),
        (TopicNames(input="in", output="out", dead_letter="dlq"), set()),
    ],
)
def test_run_specific_topics(names: TopicNames, run_specific: set[str]) -> None:
    topics = RunTopics.for_run("abc", names)

    assert topics.run_specific == run_specific


def deletion_message(backend: KafkaBackend) -> str:
    output = io.StringIO()
    backend.delete_created(Console(file=output, width=80))
    return output.getvalue()


def backend_with_created_topics(**values: Any) -> KafkaBackend:
    """Return a backend that created its input and dead-letter topics and 'out'."""
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", **values)
    topics = RunTopics.for_run("abc", TopicNames(output="out"))
    backend = KafkaBackend(settings, topics, "abc")
    backend.created.extend(
        ["agogosml-run-abc-input", "out", "agogosml-run-abc-input.dlq"]
    )
    return backend


@pytest.mark.parametrize(
    ("protocol", "extra"),
    [("PLAINTEXT", ""), ("SSL", " --command-config CLIENT.properties")],
)
def test_deletion_failure_names_topics_left(
    monkeypatch: pytest.MonkeyPatch, protocol: str, extra: str
) -> None:
    monkeypatch.setattr(kafka_run, "_DELETE_TIMEOUT_SECONDS", 1.0)
    backend = backend_with_created_topics(security_protocol=protocol)

    topics, group = deletion_message(backend).splitlines()

    assert topics.startswith("Could not delete the topics that this run created (")
    assert topics.endswith(
        "): agogosml-run-abc-input, agogosml-run-abc-input.dlq. Delete them with: "
        "kafka-topics.sh --bootstrap-server 127.0.0.1:1 --delete --if-exists "
        f"--topic 'agogosml-run-abc-input,agogosml-run-abc-input\\.dlq'{extra}"
    )
    assert group.startswith(
        "Could not delete the reader's consumer group agogosml-run-abc ("
    )
    assert group.endswith(
        "). Delete it with: kafka-consumer-groups.sh --bootstrap-server "
        f"127.0.0.1:1 --delete --group agogosml-run-abc{extra}"
    )


def test_deletion_interrupted_names_topics_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def delete_topics(config: dict[str, Any], names: list[str]) -> dict[str, str]:
        raise KeyboardInterrupt

    monkeypatch.setattr(kafka_run, "delete_topics", delete_topics)
    backend = backend_with_created_topics()

    topics, group = deletion_message(backend).splitlines()

    assert topics.startswith(
        "Could not delete the topics that this run created (interrupted): "
        "agogosml-run-abc-input, agogosml-run-abc-input.dlq. "
    )
    # The interrupt stops the group's deletion too, which is not tried.
    assert group.startswith(
        "Could not delete the reader's consumer group agogosml-run-abc (interrupted)."
    )


def test_group_deletion_failure_names_group_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kafka_run, "_DELETE_TIMEOUT_SECONDS", 1.0)
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    topics = RunTopics.for_run("abc", TopicNames(input="in", output="out"))

    message = deletion_message(KafkaBackend(settings, topics, "abc"))

    # No topic was created under the run's names, so only the group is left.
    assert message.startswith(
        "Could not delete the reader's consumer group agogosml-run-abc ("
    )
    assert message.count("\n") == 1


def test_produce_file_keys_records_by_the_named_field(
    mock_cluster: str, tmp_path: Path
) -> None:
    input_path = tmp_path / "input.jsonl"
    input_path.write_bytes(b'{"customer": "c-1"}\n{"customer": 7}\n[1]\n')
    config = {"bootstrap.servers": mock_cluster}

    kafka_run.produce_file(config, "keyed-in", input_path, "customer")

    consumer = Consumer(
        {
            "bootstrap.servers": mock_cluster,
            "group.id": "keyed-check",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe(["keyed-in"])
    messages = consumer.consume(3, 10)
    consumer.close()
    # A field that is not text, and a line that is no object, give no key.
    assert sorted(m.key() or b"" for m in messages) == [b"", b"", b"c-1"]


def test_run_key_field_reaches_the_kafka_backend() -> None:
    options = run_module.RunOptions(
        data_path=None,
        work_dir=Path("."),
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
        key_field="customer",
    )

    backend = run_module._stream_backend(options)

    assert isinstance(backend, KafkaBackend)
    assert backend.key_field == "customer"
