"""/healthz fails on an error that only a restart clears, so liveness probes act."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import KafkaError
from fakes import MemorySink

from agogosml.config import KafkaSettings, WriterSettings, load_settings
from agogosml.transports.kafka import KafkaSink, KafkaSource
from agogosml.transports.kafka import health as health_module
from agogosml.transports.kafka.health import BrokerHealth
from agogosml.writer.service import OutputWriter

FAILURE = "the kafka producer failed for good (boom); restart the service"


class FailedSink(MemorySink):
    """A started sink that reports a failure only a restart clears."""

    @property
    def failure(self) -> str | None:
        return FAILURE


async def health_of(sink: MemorySink) -> tuple[int, dict]:
    await sink.start()
    settings = load_settings(WriterSettings, output="unused.jsonl")
    writer = OutputWriter(settings, sink)
    async with TestClient(TestServer(writer.build_app())) as client:
        response = await client.get("/healthz")
        return response.status, await response.json()


async def test_writer_healthz_fails_on_sink_failure() -> None:
    status, body = await health_of(FailedSink())

    assert status == 503
    assert body == {"status": "failed", "error": FAILURE}


async def test_writer_healthz_ok_without_failure() -> None:
    status, body = await health_of(MemorySink())

    assert status == 200
    assert body == {"status": "ok"}


def test_kafka_clients_report_fatal_error() -> None:
    settings = load_settings(KafkaSettings, bootstrap_servers="127.0.0.1:9092")
    sink = KafkaSink(settings, "scores")
    source = KafkaSource(settings, ["transactions"])
    assert sink.failure is None
    assert source.failure is None

    fatal = KafkaError(KafkaError._FATAL, "producer fenced", fatal=True)
    sink._health.on_error(fatal)
    source._health.on_error(fatal)

    assert sink.failure is not None and "restart the service" in sink.failure
    assert source.failure is not None and "producer fenced" in source.failure


def test_repeated_kafka_error_logged_once(caplog) -> None:
    health = BrokerHealth("consumer", "127.0.0.1:9092")
    error = KafkaError(KafkaError._AUTHENTICATION, "SASL handshake failed")

    for _ in range(20):
        health.on_error(error)

    lines = [r.getMessage() for r in caplog.records if r.name == health_module.__name__]
    assert len(lines) == 1
    assert "SASL handshake failed" in lines[0]
    assert "check KAFKA_SECURITY_PROTOCOL" in lines[0]


def test_invalid_session_timeout_names_setting(caplog) -> None:
    health = BrokerHealth("consumer", "127.0.0.1:9092")

    health.on_error(KafkaError(KafkaError.INVALID_SESSION_TIMEOUT, "out of range"))

    (line,) = [
        r.getMessage() for r in caplog.records if r.name == health_module.__name__
    ]
    assert "session.timeout.ms, set in KAFKA_EXTRA_CONFIG" in line


def test_connection_confirmed_before_statistics() -> None:
    health = BrokerHealth("consumer", "127.0.0.1:9092")

    health.confirm_connected()

    assert health.up is True


def test_buffered_confirmation_ignored_while_brokers_down() -> None:
    health = BrokerHealth("consumer", "127.0.0.1:9092")
    health.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "all brokers down"))

    health.confirm_connected(buffered=True)

    assert health.up is False


def test_assignment_confirms_after_brokers_down() -> None:
    health = BrokerHealth("consumer", "127.0.0.1:9092")
    health.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "all brokers down"))

    health.confirm_connected()
    health.confirm_connected(buffered=True)

    assert health.up is True


def test_buffered_confirmation_after_transport_error() -> None:
    # A refused connection before the broker started is no outage afterwards.
    health = BrokerHealth("consumer", "127.0.0.1:9092")
    health.on_error(KafkaError(KafkaError._TRANSPORT, "connection refused"))

    health.confirm_connected(buffered=True)

    assert health.up is True


def test_settings_error_kept_behind_brokers_down(caplog) -> None:
    health = BrokerHealth("consumer", "127.0.0.1:9092")
    health.on_error(KafkaError(KafkaError._AUTHENTICATION, "SASL handshake failed"))

    health.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))

    reason = health.describe_down()
    lines = [r.getMessage() for r in caplog.records if r.name == health_module.__name__]
    assert "SASL handshake failed; check KAFKA_SECURITY_PROTOCOL" in reason
    assert "the connection failed with SASL handshake failed" in lines[-1]
    assert "check KAFKA_BOOTSTRAP_SERVERS and the network" not in lines[-1]


def test_settings_error_cleared_once_connected() -> None:
    health = BrokerHealth("consumer", "127.0.0.1:9092")
    health.on_error(KafkaError(KafkaError._AUTHENTICATION, "SASL handshake failed"))

    health.on_statistics({"brokers": {"b": {"state": "UP"}}})
    health.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))

    assert "SASL" not in health.describe_down()
    assert "1/1 brokers are down" in health.describe_down()


def test_authentication_hint_names_user_and_mechanism() -> None:
    settings = KafkaSettings(
        bootstrap_servers="127.0.0.1:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="scorer",
        sasl_password="secret-password",
    )
    health = BrokerHealth(
        "producer",
        "127.0.0.1:9093",
        authentication_hint=health_module.authentication_hint(settings),
    )

    health.on_error(KafkaError(KafkaError._AUTHENTICATION, "Authentication failed"))

    reason = health.describe_down()
    assert "the SCRAM-SHA-256 login of user 'scorer' failed" in reason
    assert "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD" in reason
    assert "Retrying does not help until this is fixed" in reason
    assert "secret-password" not in reason


def test_authentication_hint_for_eventhubs() -> None:
    settings = KafkaSettings(
        eventhubs_connection_string="Endpoint=sb://ns.servicebus.windows.net/;"
        "SharedAccessKeyName=send;SharedAccessKey=c2VjcmV0"
    )

    hint = health_module.authentication_hint(settings)

    assert "user $ConnectionString" in hint
    assert "KAFKA_EVENTHUBS_CONNECTION_STRING" in hint
    assert "c2VjcmV0" not in hint


def test_authentication_hint_without_sasl() -> None:
    settings = KafkaSettings(
        bootstrap_servers="127.0.0.1:9093", security_protocol="SSL"
    )

    hint = health_module.authentication_hint(settings)

    assert hint.startswith("check KAFKA_SECURITY_PROTOCOL")
