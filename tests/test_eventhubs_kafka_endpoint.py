"""Kafka endpoint mode of Event Hubs, run against a local broker that speaks it.

Event Hubs' Kafka endpoint takes SASL_SSL with the PLAIN mechanism, the user
name ``$ConnectionString`` and the connection string as password. The local
broker gets a listener with exactly that: TLS with a certificate signed by a
test CA, and a PLAIN user ``$ConnectionString`` whose password is a test
connection string. The clients use the settings that KafkaSettings derives
from KAFKA_EVENTHUBS_CONNECTION_STRING, with certificate verification on;
only the broker address differs, because the test cannot serve
``<namespace>.servicebus.windows.net:9093``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from kafka_endpoint import CONNECTION_STRING, write_tls_files

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope
from agogosml.transports.kafka import KafkaSink, KafkaSource

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture
def endpoint(eventhubs_kafka_endpoint: tuple[str, Path]) -> tuple[str, Path]:
    """Address and CA file of the broker's Event Hubs-like listener."""
    return eventhubs_kafka_endpoint


def endpoint_settings(address: str, ca_path: Path, **overrides: str) -> KafkaSettings:
    values = {
        "eventhubs_connection_string": CONNECTION_STRING,
        "bootstrap_servers": address,
        "ssl_ca_location": str(ca_path),
        "group_id": "eventhubs-endpoint-test",
        "commit_interval_ms": "100",
        **overrides,
    }
    return KafkaSettings(**values)  # type: ignore[arg-type]


def test_connection_string_gives_eventhubs_client_settings() -> None:
    settings = KafkaSettings(eventhubs_connection_string=CONNECTION_STRING)

    config = settings.client_config()

    assert config["bootstrap.servers"] == "agogosml-test.servicebus.windows.net:9093"
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "PLAIN"
    assert config["sasl.username"] == "$ConnectionString"
    assert config["sasl.password"] == CONNECTION_STRING
    assert config["enable.ssl.certificate.verification"] is True


async def test_endpoint_settings_produce_and_consume(
    endpoint: tuple[str, Path],
) -> None:
    address, ca_path = endpoint
    settings = endpoint_settings(address, ca_path)
    topic = "eventhubs-endpoint"
    sent = [Envelope(value=f'{{"n": {n}}}'.encode(), id=f"m{n}") for n in range(20)]

    config = settings.client_config()
    async with KafkaSink(settings, topic) as sink:
        await sink.send(sent)
    received: list[Envelope] = []
    async with KafkaSource(settings, [topic]) as source:
        async with asyncio.timeout(60):
            while len(received) < len(sent):
                received.extend(await source.fetch(100, 0.5))
        for envelope in received:
            source.ack(envelope)
        await source.commit()
        committed = source.tracker.committable()

    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.username"] == "$ConnectionString"
    assert config["ssl.ca.location"] == str(ca_path)
    assert [e.id for e in received] == [e.id for e in sent]
    assert [e.value for e in received] == [e.value for e in sent]
    assert committed == {(topic, 0): 20}


def client_errors(settings: KafkaSettings) -> list[str]:
    """Return the errors a client with `settings` reports while it fails to connect."""
    errors: list[str] = []
    config = {
        **settings.client_config(),
        "error_cb": lambda error: errors.append(error.str()),
        "logger": logging.getLogger("test.librdkafka"),
    }
    admin = AdminClient(config)
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)
    admin.poll(1)  # serves the error callbacks
    return errors


def test_wrong_key_rejected(endpoint: tuple[str, Path]) -> None:
    address, ca_path = endpoint
    wrong = CONNECTION_STRING.replace("SharedAccessKey=dGVz", "SharedAccessKey=d3Jv")

    errors = client_errors(
        endpoint_settings(address, ca_path, eventhubs_connection_string=wrong)
    )

    assert any("Authentication failed" in error for error in errors), errors


def test_unknown_ca_rejected(endpoint: tuple[str, Path], tmp_path: Path) -> None:
    address, _ = endpoint
    other_ca, _ = write_tls_files(tmp_path)

    errors = client_errors(endpoint_settings(address, other_ca))

    assert any("certificate verify failed" in error for error in errors), errors
