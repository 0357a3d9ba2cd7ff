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
import datetime
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import Listener, LocalKafkaBroker
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope
from agogosml.transports.kafka import KafkaSink, KafkaSource

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CONNECTION_STRING = (
    "Endpoint=sb://agogosml-test.servicebus.windows.net/;"
    "SharedAccessKeyName=RootManageSharedAccessKey;"
    "SharedAccessKey=dGVzdC1rZXktZm9yLXRoZS1sb2NhbC1icm9rZXI="
)
KEYSTORE_PASSWORD = "local-test-keystore"
LISTENER = "EVENTHUBS"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: str,
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256())


def write_tls_files(directory: Path) -> tuple[Path, Path]:
    """Write a test CA (PEM) and a broker keystore (PKCS12) signed by it."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate(
        "agogosml test CA", ca_key.public_key(), "agogosml test CA", ca_key, ca=True
    )
    broker_key = ec.generate_private_key(ec.SECP256R1())
    broker_cert = _certificate(
        "127.0.0.1", broker_key.public_key(), "agogosml test CA", ca_key, ca=False
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    keystore_path = directory / "broker.p12"
    keystore_path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"broker",
            broker_key,
            broker_cert,
            [ca_cert],
            serialization.BestAvailableEncryption(KEYSTORE_PASSWORD.encode()),
        )
    )
    return ca_path, keystore_path


def eventhubs_listener(keystore: Path) -> Listener:
    jaas = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'user_$ConnectionString="{CONNECTION_STRING}";'
    )
    return Listener(
        name=LISTENER,
        host="127.0.0.1",
        protocol="SASL_SSL",
        properties={
            "sasl.enabled.mechanisms": "PLAIN",
            "plain.sasl.jaas.config": jaas,
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(keystore),
            "ssl.keystore.password": KEYSTORE_PASSWORD,
            "ssl.key.password": KEYSTORE_PASSWORD,
        },
    )


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Start a broker with the Event Hubs-like listener; yield its address and CA."""
    directory = tmp_path_factory.mktemp("tls")
    ca_path, keystore = write_tls_files(directory)
    with LocalKafkaBroker(listeners=[eventhubs_listener(keystore)]) as broker:
        yield broker.listener_address(LISTENER), ca_path


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
