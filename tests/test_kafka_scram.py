"""SASL/SCRAM over TLS against a real broker listener.

The module's broker gets a SASL_SSL listener that enables SCRAM-SHA-512 and
SCRAM-SHA-256, with a certificate for 127.0.0.1 signed by a test CA. The
users are created as on a production KRaft cluster: through the Admin API
(AlterUserScramCredentials) on the broker's PLAINTEXT listener, which has no
authorizer. The clients are agogosml's own, with KafkaSettings as a service
reads them from KAFKA_* variables, and certificate verification on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import Listener, LocalKafkaBroker
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)
from kafka_endpoint import tls_properties, write_tls_files

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope
from agogosml.errors import SinkError
from agogosml.transports.kafka import KafkaSink, KafkaSource
from agogosml.transports.kafka import health as health_module

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

LISTENER = "SCRAM"
#: One user per mechanism, with credentials for that mechanism only, so that a
#: client which uses another mechanism than it was given fails its login.
USERS = {"SCRAM-SHA-512": "agogosml-sha512", "SCRAM-SHA-256": "agogosml-sha256"}
PASSWORD = "scram-test-password"
#: Kafka's minimum, and so the cheapest, SCRAM iteration count.
ITERATIONS = 4096
LOGIN_TIMEOUT_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class ScramEndpoint:
    """The SASL_SSL listener of the module's broker.

    Attributes:
        address: host:port of the SASL_SSL listener.
        ca_path: PEM file of the CA that signed the listener's certificate.
        plaintext_bootstrap: host:port of the PLAINTEXT listener, for checks
            that should not depend on SCRAM.
    """

    address: str
    ca_path: Path
    plaintext_bootstrap: str


def scram_listener(keystore: Path) -> Listener:
    # The broker validates SCRAM logins against the credentials in the
    # cluster metadata, so the login module needs no users of its own.
    login = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    return Listener(
        name=LISTENER,
        host="127.0.0.1",
        protocol="SASL_SSL",
        properties={
            "sasl.enabled.mechanisms": "SCRAM-SHA-512,SCRAM-SHA-256",
            "scram-sha-512.sasl.jaas.config": login,
            "scram-sha-256.sasl.jaas.config": login,
            **tls_properties(keystore),
        },
    )


def create_scram_users(bootstrap_servers: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    upsertions = [
        UserScramCredentialUpsertion(
            user,
            ScramCredentialInfo(
                ScramMechanism[mechanism.replace("-", "_")], ITERATIONS
            ),
            PASSWORD.encode(),
        )
        for mechanism, user in USERS.items()
    ]
    for future in admin.alter_user_scram_credentials(upsertions).values():
        future.result(timeout=LOGIN_TIMEOUT_SECONDS)


def wait_for_login(settings: KafkaSettings) -> None:
    """Wait until the listener accepts `settings`' credentials.

    The controller commits new credentials before the broker applies them, so
    a login right after the Admin API call may still fail.
    """
    admin = AdminClient(settings.client_config())
    deadline = time.monotonic() + LOGIN_TIMEOUT_SECONDS
    while True:
        try:
            admin.list_topics(timeout=2)
            return
        except KafkaException:
            if time.monotonic() > deadline:
                raise


def scram_settings(
    endpoint: ScramEndpoint, mechanism: str = "SCRAM-SHA-512", **overrides: object
) -> KafkaSettings:
    values: dict[str, object] = {
        "bootstrap_servers": endpoint.address,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": mechanism,
        "sasl_username": USERS[mechanism],
        "sasl_password": PASSWORD,
        "ssl_ca_location": str(endpoint.ca_path),
        "commit_interval_ms": 100,
        **overrides,
    }
    return KafkaSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScramEndpoint]:
    """Start one broker with the SCRAM listener and users for this module."""
    ca_path, keystore = write_tls_files(tmp_path_factory.mktemp("scram-tls"))
    with LocalKafkaBroker(listeners=[scram_listener(keystore)]) as broker:
        create_scram_users(broker.bootstrap_servers)
        endpoint = ScramEndpoint(
            broker.listener_address(LISTENER), ca_path, broker.bootstrap_servers
        )
        for mechanism in USERS:
            wait_for_login(scram_settings(endpoint, mechanism))
        yield endpoint


def committed_offsets(bootstrap_servers: str, group: str) -> dict[tuple[str, int], int]:
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    result = futures[group].result(timeout=LOGIN_TIMEOUT_SECONDS)
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions}


@pytest.mark.parametrize("mechanism", list(USERS))
async def test_scram_produce_consume_commit(
    endpoint: ScramEndpoint, mechanism: str
) -> None:
    topic = f"scram-{mechanism.lower()}"
    group = f"scram-group-{mechanism.lower()}"
    settings = scram_settings(endpoint, mechanism, group_id=group)
    sent = [Envelope(value=f'{{"n": {n}}}'.encode(), id=f"m{n}") for n in range(20)]

    async with KafkaSink(settings, topic) as sink:
        await sink.send(sent)
        # The producer's health follows its statistics, every 2 s.
        async with asyncio.timeout(LOGIN_TIMEOUT_SECONDS):
            while not sink.connected:
                await asyncio.sleep(0.1)
    received: list[Envelope] = []
    async with KafkaSource(settings, [topic]) as source:
        async with asyncio.timeout(60):
            while len(received) < len(sent):
                received.extend(await source.fetch(100, 0.5))
        source_connected = source.connected
        for envelope in received:
            source.ack(envelope)
        await source.commit()

    assert source_connected
    assert [e.id for e in received] == [e.id for e in sent]
    assert [e.value for e in received] == [e.value for e in sent]
    assert committed_offsets(endpoint.plaintext_bootstrap, group) == {(topic, 0): 20}


async def wait_for_reason(client: KafkaSink | KafkaSource, text: str) -> str:
    """Return the client's unavailable reason once it contains `text`."""
    async with asyncio.timeout(LOGIN_TIMEOUT_SECONDS):
        while text not in client.unavailable_reason:
            if isinstance(client, KafkaSource):
                await client.fetch(10, 0.1)  # serves the error callbacks
            else:
                await asyncio.sleep(0.1)
    return client.unavailable_reason


@pytest.mark.parametrize(
    ("user", "mechanism", "password"),
    [
        (USERS["SCRAM-SHA-512"], "SCRAM-SHA-512", "wrong-password"),
        (USERS["SCRAM-SHA-512"], "SCRAM-SHA-256", PASSWORD),
    ],
    ids=["wrong-password", "no-credentials-for-mechanism"],
)
@pytest.mark.parametrize("client_type", [KafkaSink, KafkaSource])
async def test_rejected_login_reason(
    endpoint: ScramEndpoint,
    caplog: pytest.LogCaptureFixture,
    client_type: type[KafkaSink] | type[KafkaSource],
    user: str,
    mechanism: str,
    password: str,
) -> None:
    settings = scram_settings(
        endpoint, mechanism, sasl_username=user, sasl_password=password
    )
    client = (
        KafkaSink(settings, "scram-rejected")
        if client_type is KafkaSink
        else KafkaSource(settings, ["scram-rejected"])
    )

    async with client:
        reason = await wait_for_reason(client, "Authentication failed")
        connected = client.connected
        failure = client.failure

    errors = [
        r.getMessage()
        for r in caplog.records
        if r.name == health_module.__name__ and r.levelno == logging.ERROR
    ]
    assert not connected
    assert failure is None  # new broker credentials would let it connect
    assert f"with SASL mechanism {mechanism}" in reason
    assert f"the {mechanism} login of user {user!r} failed" in reason
    assert "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD" in reason
    assert f"the broker has {mechanism} credentials for this user" in reason
    assert "Retrying does not help until this is fixed" in reason
    assert "retry shortly" not in reason
    assert password not in reason
    assert any(f"login of user {user!r} failed" in line for line in errors), errors
    assert not any(password in line for line in errors)


async def test_rejected_login_send_error(endpoint: ScramEndpoint) -> None:
    settings = scram_settings(
        endpoint, sasl_password="wrong-password", delivery_timeout_ms=1000
    )

    async with KafkaSink(settings, "scram-rejected") as sink:
        await wait_for_reason(sink, "Authentication failed")
        with pytest.raises(SinkError) as raised:
            await sink.send([Envelope(value=b"{}", id="rejected")])

    message = str(raised.value)
    assert "Message timed out" in message
    assert "The producer cannot connect" in message
    user = USERS["SCRAM-SHA-512"]
    assert f"the SCRAM-SHA-512 login of user {user!r} failed" in message
    # Retriable, so that the reader keeps valid messages waiting for the fix
    # instead of dead-lettering them.
    assert raised.value.retriable


@pytest.mark.parametrize("client_type", [KafkaSink, KafkaSource])
async def test_unknown_ca_rejected(
    endpoint: ScramEndpoint,
    tmp_path: Path,
    client_type: type[KafkaSink] | type[KafkaSource],
) -> None:
    other_ca, _ = write_tls_files(tmp_path)
    settings = scram_settings(endpoint, ssl_ca_location=str(other_ca))
    client = (
        KafkaSink(settings, "scram-unknown-ca")
        if client_type is KafkaSink
        else KafkaSource(settings, ["scram-unknown-ca"])
    )

    async with client:
        reason = await wait_for_reason(client, "SSL handshake failed")
        connected = client.connected

    assert not connected
    assert "certificate verify failed" in reason
    assert "KAFKA_SSL_CA_LOCATION" in reason
    assert "Retrying does not help until this is fixed" in reason
