"""Tests of settings validation: invalid environment values become clear errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from aiohttp import web
from pydantic import AliasChoices, BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from agogosml import config
from agogosml.app import AppSettings, read_settings
from agogosml.config import (
    KafkaSettings,
    Ordering,
    ReaderSettings,
    WriterSettings,
    load_settings,
    misspelled_variables,
    redact_url,
    warn_misspelled_variables,
)
from agogosml.errors import ConfigurationError
from agogosml.http import bound_port, start_site

SERVICE_PREFIXES = ("KAFKA_", "READER_", "WRITER_", "APP_")
EVENTHUBS_KEY = "c2VjcmV0LWtleS1kby1ub3QtbG9n"
EVENTHUBS_CONNECTION = (
    "Endpoint=sb://fraud-ns.servicebus.windows.net/;"
    f"SharedAccessKeyName=send;SharedAccessKey={EVENTHUBS_KEY}"
)
NO_WAIT = {"shutdown_timeout_seconds": 0}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Remove every service variable, so only what a test sets is read."""
    for name in list(os.environ):
        if name.upper().startswith(SERVICE_PREFIXES):
            monkeypatch.delenv(name)
    return monkeypatch


def configuration_error(cls: type, **environment: str) -> str:
    """Set the variables, load `cls` and return the ConfigurationError text."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        with pytest.raises(ConfigurationError) as caught:
            load_settings(cls)
    return str(caught.value)


def test_reader_valid_environment_loads(clean_environment):
    clean_environment.setenv("READER_INPUT", "orders")
    clean_environment.setenv("READER_APP_URL", "http://app:8000")
    clean_environment.setenv("READER_ORDERING", "key")

    settings = load_settings(ReaderSettings)

    assert settings.ordering is Ordering.KEY
    assert str(settings.app_url) == "http://app:8000/"


def test_reader_invalid_ordering_named():
    text = configuration_error(
        ReaderSettings,
        READER_INPUT="orders",
        READER_APP_URL="http://app:8000",
        READER_ORDERING="sideways",
    )

    assert "READER_ORDERING='sideways' is invalid" in text
    assert "partition, key or unordered" in text


def test_reader_missing_app_url_named():
    text = configuration_error(ReaderSettings, READER_INPUT="orders")

    assert "READER_APP_URL is missing" in text


def test_reader_invalid_integer_named():
    text = configuration_error(
        ReaderSettings,
        READER_INPUT="orders",
        READER_APP_URL="http://app:8000",
        READER_MAX_IN_FLIGHT="many",
    )

    assert "READER_MAX_IN_FLIGHT='many' is invalid" in text


def test_reader_every_invalid_field_listed():
    text = configuration_error(
        ReaderSettings, READER_APP_URL="not a url", READER_CONCURRENCY="0"
    )

    assert "READER_INPUT is missing" in text
    assert "READER_APP_URL='not a url' is invalid" in text
    assert "READER_CONCURRENCY='0' is invalid" in text


def test_reader_backoff_order_checked():
    text = configuration_error(
        ReaderSettings,
        READER_INPUT="orders",
        READER_APP_URL="http://app:8000",
        READER_RETRY_INITIAL_BACKOFF_MS="500",
        READER_RETRY_MAX_BACKOFF_MS="100",
    )

    assert "READER_RETRY_MAX_BACKOFF_MS=100 must be at least" in text
    assert "READER_RETRY_INITIAL_BACKOFF_MS=500" in text
    assert "lower READER_RETRY_INITIAL_BACKOFF_MS" in text


def test_reader_token_not_shown(clean_environment):
    # Any string is a valid token, so only a value of the wrong type makes the
    # field invalid. The message must name the variable but not show the value.
    with pytest.raises(ConfigurationError) as caught:
        load_settings(
            ReaderSettings,
            input="orders",
            app_url="http://app:8000",
            app_token=["bearer-token-do-not-log"],
        )
    text = str(caught.value)

    assert "READER_APP_TOKEN='<secret>' is invalid" in text
    assert "bearer-token-do-not-log" not in text


def test_writer_missing_output_named():
    text = configuration_error(WriterSettings)

    assert "WRITER_OUTPUT is missing" in text


def test_kafka_mechanism_without_sasl_protocol():
    text = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="broker:9092",
        KAFKA_SASL_MECHANISM="PLAIN",
    )

    assert "KAFKA_SASL_MECHANISM is set" in text
    assert "KAFKA_SECURITY_PROTOCOL is PLAINTEXT" in text


def test_kafka_sasl_ssl_without_mechanism():
    text = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="broker:9093",
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_USERNAME="reader",
        KAFKA_SASL_PASSWORD="hunter2-do-not-log",
    )

    assert "security protocol SASL_SSL needs KAFKA_SASL_MECHANISM" in text
    assert "hunter2-do-not-log" not in text


def test_kafka_invalid_mechanism_named():
    text = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="broker:9093",
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_MECHANISM="GSSAPI",
        KAFKA_SASL_PASSWORD="hunter2-do-not-log",
    )

    assert "KAFKA_SASL_MECHANISM='GSSAPI' is invalid" in text
    assert "hunter2-do-not-log" not in text


def test_kafka_missing_ca_file_named(tmp_path):
    missing = tmp_path / "ca.pem"

    text = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="broker:9093",
        KAFKA_SECURITY_PROTOCOL="SSL",
        KAFKA_SSL_CA_LOCATION=str(missing),
    )

    assert f"KAFKA_SSL_CA_LOCATION={str(missing)!r} is invalid" in text
    assert "there is no file or directory" in text


def test_kafka_existing_ca_file_configured(clean_environment, tmp_path):
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n")
    clean_environment.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9093")
    clean_environment.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    clean_environment.setenv("KAFKA_SSL_CA_LOCATION", str(ca_file))

    config = load_settings(KafkaSettings).client_config()

    assert config["security.protocol"] == "SSL"
    assert config["ssl.ca.location"] == str(ca_file)
    assert config["enable.ssl.certificate.verification"] is True


def test_kafka_missing_bootstrap_named():
    text = configuration_error(KafkaSettings)

    assert "KAFKA_BOOTSTRAP_SERVERS is empty" in text


def test_kafka_scram_client_config(clean_environment):
    clean_environment.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9093")
    clean_environment.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    clean_environment.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    clean_environment.setenv("KAFKA_SASL_USERNAME", "reader")
    clean_environment.setenv("KAFKA_SASL_PASSWORD", "hunter2")

    settings = load_settings(KafkaSettings)
    config = settings.client_config()

    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["sasl.username"] == "reader"
    assert config["sasl.password"] == "hunter2"
    assert "hunter2" not in repr(settings)


def test_eventhubs_connection_string_config(clean_environment):
    clean_environment.setenv("KAFKA_EVENTHUBS_CONNECTION_STRING", EVENTHUBS_CONNECTION)

    settings = load_settings(KafkaSettings)
    config = settings.client_config()

    assert config["bootstrap.servers"] == "fraud-ns.servicebus.windows.net:9093"
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "PLAIN"
    assert config["sasl.username"] == "$ConnectionString"
    assert config["sasl.password"] == EVENTHUBS_CONNECTION
    assert config["enable.ssl.certificate.verification"] is True
    assert EVENTHUBS_KEY not in repr(settings)


def test_eventhubs_explicit_bootstrap_wins(clean_environment):
    clean_environment.setenv("KAFKA_EVENTHUBS_CONNECTION_STRING", EVENTHUBS_CONNECTION)
    clean_environment.setenv("KAFKA_BOOTSTRAP_SERVERS", "10.0.0.4:9093")

    config = load_settings(KafkaSettings).client_config()

    assert config["bootstrap.servers"] == "10.0.0.4:9093"


def test_eventhubs_without_endpoint_hides_key():
    text = configuration_error(
        KafkaSettings,
        KAFKA_EVENTHUBS_CONNECTION_STRING=(
            f"SharedAccessKeyName=send;SharedAccessKey={EVENTHUBS_KEY}"
        ),
    )

    assert "KAFKA_EVENTHUBS_CONNECTION_STRING has no Endpoint=sb://" in text
    assert EVENTHUBS_KEY not in text


def test_eventhubs_without_endpoint_rejected_with_bootstrap():
    text = configuration_error(
        KafkaSettings,
        KAFKA_EVENTHUBS_CONNECTION_STRING="garbage-secret",
        KAFKA_BOOTSTRAP_SERVERS="10.0.0.4:9093",
    )

    assert "KAFKA_EVENTHUBS_CONNECTION_STRING has no Endpoint=sb://" in text
    assert "garbage-secret" not in text


def test_kafka_extra_config_not_json_named():
    text = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="broker:9092",
        KAFKA_EXTRA_CONFIG='{"ssl.key.password": "pem-pass-do-not-log",',
    )

    assert "KAFKA_EXTRA_CONFIG" in text
    assert "not valid JSON" in text
    assert "pem-pass-do-not-log" not in text


def test_kafka_extra_config_applied_last(clean_environment):
    clean_environment.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    clean_environment.setenv(
        "KAFKA_EXTRA_CONFIG",
        '{"enable.ssl.certificate.verification": false, "socket.nagle.disable": true}',
    )

    config = load_settings(KafkaSettings).client_config()

    assert config["enable.ssl.certificate.verification"] is False
    assert config["socket.nagle.disable"] is True


@pytest.mark.parametrize(
    ("extra", "variable"),
    [
        ('{"bootstrap.servers": "nohost:1"}', "KAFKA_BOOTSTRAP_SERVERS"),
        ('{"metadata.broker.list": "nohost:1"}', "KAFKA_BOOTSTRAP_SERVERS"),
        ('{"group.id": "other"}', "KAFKA_GROUP_ID"),
        ('{"auto.offset.reset": "latest"}', "KAFKA_AUTO_OFFSET_RESET"),
        ('{"security.protocol": "SSL"}', "KAFKA_SECURITY_PROTOCOL"),
        ('{"sasl.mechanisms": "PLAIN"}', "KAFKA_SASL_MECHANISM"),
        ('{"sasl.password": "hunter2"}', "KAFKA_SASL_PASSWORD"),
        ('{"ssl.ca.location": "/ca.pem"}', "KAFKA_SSL_CA_LOCATION"),
        ('{"message.timeout.ms": 5000}', "KAFKA_DELIVERY_TIMEOUT_MS"),
        ('{"linger.ms": 5}', "KAFKA_LINGER_MS"),
        ('{"topic.auto.offset.reset": "latest"}', "KAFKA_AUTO_OFFSET_RESET"),
        ('{"topic.message.timeout.ms": 5000}', "KAFKA_DELIVERY_TIMEOUT_MS"),
    ],
)
def test_extra_config_property_with_variable_rejected(extra, variable):
    message = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9092",
        KAFKA_EXTRA_CONFIG=extra,
    )
    name = extra.split('"')[1]

    assert f"it sets {name}, which has its own variable" in message
    assert f"set {variable} instead" in message
    assert "hunter2" not in message


def test_extra_config_hexadecimal_size_accepted(clean_environment):
    clean_environment.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    clean_environment.setenv(
        "KAFKA_EXTRA_CONFIG", '{"message.max.bytes": "0x100000", "batch.size": 1e4}'
    )

    settings = load_settings(KafkaSettings)

    assert settings.extra_config == {"message.max.bytes": 1048576, "batch.size": 10000}


@pytest.mark.parametrize(
    "value", ['"1e6"', '"1_000_000"', '"010"', '"1000kb"', "true", "999", '"0x"']
)
def test_extra_config_size_not_integer_named(value):
    message = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9092",
        KAFKA_EXTRA_CONFIG=f'{{"message.max.bytes": {value}}}',
    )

    assert f"property 'message.max.bytes' is {value};" in message
    assert "integer from 1000 to 1000000000" in message


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("1.5", "a number with a fraction"),
        ("null", "null"),
        ("[1]", "an array"),
        ('{"a": 1}', "an object"),
    ],
)
def test_extra_config_value_type_named(value, kind):
    message = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9092",
        KAFKA_EXTRA_CONFIG=f'{{"socket.timeout.ms": {value}}}',
    )
    errors = message.splitlines()[1:]

    assert len(errors) == 1
    assert f"property 'socket.timeout.ms' is {kind}" in errors[0]
    assert "a JSON string, an integer or a boolean" in errors[0]


def test_extra_config_whole_number_becomes_integer(clean_environment):
    clean_environment.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    clean_environment.setenv("KAFKA_EXTRA_CONFIG", '{"socket.timeout.ms": 6e4}')

    settings = load_settings(KafkaSettings)

    assert settings.extra_config == {"socket.timeout.ms": 60000}
    assert isinstance(settings.extra_config["socket.timeout.ms"], int)


@pytest.mark.parametrize("group_id", ["", " ", "\t\n"])
def test_kafka_blank_group_id_rejected(group_id):
    message = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9092",
        KAFKA_GROUP_ID=group_id,
    )

    assert f"KAFKA_GROUP_ID={group_id!r} is invalid" in message
    assert "empty or only whitespace" in message
    assert "set KAFKA_GROUP_ID to a group name" in message


def test_reader_blank_group_id_exits_with_message(tmp_path):
    environment = {
        **{
            name: value
            for name, value in os.environ.items()
            if not name.upper().startswith(SERVICE_PREFIXES)
        },
        "READER_SOURCE": "kafka",
        "READER_INPUT": "transactions",
        "READER_APP_URL": "http://127.0.0.1:1",
        "READER_PORT": "0",
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "KAFKA_GROUP_ID": "",
    }

    result = subprocess.run(
        [sys.executable, "-m", "agogosml.reader"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment,
        cwd=tmp_path,
    )

    assert result.returncode == 2, result.stderr
    assert "KAFKA_GROUP_ID='' is invalid" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "maximum"),
    [
        ("KAFKA_DELIVERY_TIMEOUT_MS", "1000000000000", "2147483647"),
        ("KAFKA_DELIVERY_TIMEOUT_MS", "2147483648", "2147483647"),
        ("KAFKA_LINGER_MS", "1000000", "900000"),
    ],
)
def test_kafka_integer_setting_over_maximum_named(variable, value, maximum):
    message = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9092",
        **{variable: value},
    )

    assert f"{variable}='{value}' is invalid" in message
    assert f"less than or equal to {maximum}" in message
    assert "message.timeout.ms" not in message
    assert "queue.buffering.max.ms" not in message


def test_kafka_linger_not_below_delivery_timeout_rejected():
    message = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9092",
        KAFKA_DELIVERY_TIMEOUT_MS="30000",
        KAFKA_LINGER_MS="30000",
    )

    assert "KAFKA_DELIVERY_TIMEOUT_MS=30000 must be greater than" in message
    assert "KAFKA_LINGER_MS=30000" in message


def test_overrides_win_over_environment(clean_environment):
    clean_environment.setenv("WRITER_OUTPUT", "from-env.jsonl")

    settings = load_settings(WriterSettings, output="from-flag.jsonl")

    assert settings.output == "from-flag.jsonl"


def test_kafka_input_without_topic_rejected():
    message = configuration_error(
        ReaderSettings,
        READER_SOURCE="kafka",
        READER_INPUT=" , ",
        READER_APP_URL="http://127.0.0.1:8000",
    )

    assert "names no topic" in message


def test_kafka_input_topic_twice_rejected():
    message = configuration_error(
        ReaderSettings,
        READER_SOURCE="kafka",
        READER_INPUT="t4.in, t4.in",
        READER_APP_URL="http://127.0.0.1:8000",
    )

    assert "READER_INPUT='t4.in, t4.in' names topic 't4.in' twice" in message


def test_default_dead_letter_topic_too_long_named():
    message = configuration_error(
        ReaderSettings,
        READER_SOURCE="kafka",
        READER_INPUT="t" * 247,
        READER_APP_URL="http://127.0.0.1:8000",
    )

    assert "READER_DEAD_LETTER, unset, so the default dead-letter topic" in message
    assert "is not a legal Kafka topic name" in message


def test_app_url_credentials_with_token_rejected():
    message = configuration_error(
        ReaderSettings,
        READER_INPUT="in.jsonl",
        READER_APP_URL="http://user:pw@127.0.0.1:8000",
        READER_APP_TOKEN="token-1",
    )

    assert "READER_APP_URL has a user name or password and READER_APP_TOKEN" in (
        message
    )
    assert "pw@" not in message
    assert "token-1" not in message


def test_writer_url_credentials_with_token_rejected():
    message = configuration_error(
        AppSettings,
        APP_WRITER_URL="http://user:pw@127.0.0.1:8001",
        APP_WRITER_TOKEN="token-2",
    )

    assert "APP_WRITER_URL has a user name or password and APP_WRITER_TOKEN" in (
        message
    )
    assert "token-2" not in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://ruser:URL#SECRET@127.0.0.1:8000/", "http://ruser:***@127.0.0.1:8000/"),
        ("http://u:a/b?c@h:1/", "http://u:***@h:1/"),
        ("ruser:URLSECRET@127.0.0.1:8000", "ruser:***@127.0.0.1:8000"),
        ("http://TOKENSECRET@127.0.0.1:8000/", "http://***@127.0.0.1:8000/"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/"),
    ],
)
def test_redact_url_hides_user_information(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("cls", "variables"),
    [
        (
            ReaderSettings,
            {
                "READER_INPUT": "in.jsonl",
                "READER_APP_URL": "http://ruser:URL#SECRET@127.0.0.1:8000/",
            },
        ),
        (
            ReaderSettings,
            {"READER_INPUT": "in.jsonl", "READER_APP_URL": "ruser:SECRET@127.0.0.1:8"},
        ),
        (KafkaSettings, {"KAFKA_BOOTSTRAP_SERVERS": "u:SECRET@127.0.0.1:9092"}),
    ],
)
def test_invalid_value_with_password_hidden(cls, variables):
    message = configuration_error(cls, **variables)

    assert "SECRET" not in message
    assert ":***@" in message


def test_ready_path_without_slash_rejected():
    message = configuration_error(
        ReaderSettings,
        READER_INPUT="in.jsonl",
        READER_APP_URL="http://127.0.0.1:8000",
        READER_APP_READY_PATH="readyz",
    )

    assert "READER_APP_READY_PATH='readyz' is invalid" in message
    assert "'/readyz'" in message


def test_ready_path_as_url_rejected():
    message = configuration_error(
        ReaderSettings,
        READER_INPUT="in.jsonl",
        READER_APP_URL="http://127.0.0.1:8000",
        READER_APP_READY_PATH="http://127.0.0.1:8000/readyz",
    )

    assert "give the path alone, relative to READER_APP_URL, as in '/readyz'" in (
        message
    )
    assert "'/http:" not in message


def test_log_level_any_case_accepted(clean_environment):
    clean_environment.setenv("READER_INPUT", "in.jsonl")
    clean_environment.setenv("READER_APP_URL", "http://127.0.0.1:8000")
    clean_environment.setenv("READER_LOG_LEVEL", "debug")

    assert load_settings(ReaderSettings).log_level == "DEBUG"


@pytest.mark.parametrize(
    "extra",
    [
        '{"acks": "1"}',
        '{"request.required.acks": 0}',
        '{"enable.idempotence": false}',
        '{"auto.commit.enable": true}',
        '{"topic.acks": "1"}',
        '{"topic.request.required.acks": 0}',
        '{"topic.auto.commit.enable": true}',
        '{"topic.enable.auto.commit": true}',
    ],
)
def test_extra_config_cannot_weaken_delivery(extra):
    message = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9092",
        KAFKA_EXTRA_CONFIG=extra,
    )

    assert "KAFKA_EXTRA_CONFIG" in message
    assert "at-least-once" in message


def test_extra_config_value_not_shown():
    message = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9092",
        KAFKA_EXTRA_CONFIG='{"sasl.password": ["hunter2"]}',
    )

    assert "KAFKA_EXTRA_CONFIG" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "extra",
    [
        '{"partition.assignment.strategy": "cooperative-sticky"}',
        '{"group.protocol": "consumer"}',
        '{"group.protocol": "CONSUMER"}',
    ],
)
def test_cooperative_rebalancing_rejected(extra):
    message = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9092",
        KAFKA_EXTRA_CONFIG=extra,
    )

    assert "cooperative" in message


@pytest.mark.parametrize(
    ("module", "prefix"),
    [("agogosml.reader", "READER_*"), ("agogosml.writer", "WRITER_*")],
)
def test_service_help_names_environment(module, prefix):
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert prefix in result.stdout
    assert "agogosml settings" in result.stdout


def test_service_rejects_arguments():
    result = subprocess.run(
        [sys.executable, "-m", "agogosml.reader", "--input", "topic"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert "unexpected argument '--input'" in result.stderr
    assert "takes no arguments" in result.stderr


@pytest.mark.parametrize("url", ["127.0.0.1:9000", "localhost:9000"])
def test_reader_url_without_scheme_names_fix(url):
    with pytest.raises(ConfigurationError) as error:
        load_settings(ReaderSettings, app_url=url, input="in.jsonl", transport="file")

    assert f"READER_APP_URL='{url}' is invalid" in str(error.value)
    assert "write the whole URL with its scheme" in str(error.value)


@pytest.mark.parametrize(
    ("field", "value", "limit"),
    [
        ("max_line_bytes", 9223372036854775807, 1073741824),
        ("concurrency", 10**6, 10000),
    ],
)
def test_reader_upper_limits_named(field, value, limit):
    with pytest.raises(ConfigurationError) as error:
        load_settings(
            ReaderSettings, input="in.jsonl", app_url="http://a", **{field: value}
        )

    message = str(error.value)
    assert f"READER_{field.upper()}={value} is invalid" in message
    assert f"less than or equal to {limit}" in message


def test_reader_dead_letter_file_same_as_input_rejected(tmp_path):
    path = tmp_path / "loop.jsonl"
    with pytest.raises(ConfigurationError) as error:
        load_settings(
            ReaderSettings,
            input=str(path),
            dead_letter=str(tmp_path / "." / "loop.jsonl"),
            app_url="http://127.0.0.1:9000",
        )

    assert "READER_INPUT and READER_DEAD_LETTER name the same file" in str(error.value)


def test_reader_checkpoint_same_as_dead_letter_rejected(tmp_path):
    with pytest.raises(ConfigurationError) as error:
        load_settings(
            ReaderSettings,
            input=str(tmp_path / "in.jsonl"),
            dead_letter=str(tmp_path / "state"),
            checkpoint_path=tmp_path / "state",
            app_url="http://127.0.0.1:9000",
        )

    assert "READER_DEAD_LETTER and READER_CHECKPOINT_PATH" in str(error.value)


def test_reader_dead_letter_topic_among_inputs_rejected():
    with pytest.raises(ConfigurationError) as error:
        load_settings(
            ReaderSettings,
            source="kafka",
            input="orders, refunds",
            dead_letter="refunds",
            app_url="http://127.0.0.1:9000",
        )

    assert "READER_DEAD_LETTER='refunds' is also in READER_INPUT" in str(error.value)


def test_reader_stdin_with_default_dead_letter_accepted(clean_environment):
    settings = load_settings(ReaderSettings, input="-", app_url="http://127.0.0.1:9000")

    assert settings.dead_letter_target() == "dead-letter.jsonl"


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/x?q=1", "http://h:1/#part"])
def test_reader_app_url_with_query_rejected(url):
    with pytest.raises(ConfigurationError) as error:
        load_settings(ReaderSettings, app_url=url, input="in.jsonl")

    assert "a base URL has no query or fragment" in str(error.value)


def test_invalid_url_error_hides_password():
    with pytest.raises(ConfigurationError) as error:
        load_settings(
            ReaderSettings, app_url="http://user:hunter2@h:1/?q", input="in.jsonl"
        )

    assert "hunter2" not in str(error.value)
    assert "http://user:***@h:1/?q" in str(error.value)


def test_app_writer_url_with_query_rejected():
    with pytest.raises(ConfigurationError) as error:
        load_settings(AppSettings, writer_url="http://127.0.0.1:8082/?token=x")

    assert "APP_WRITER_URL='http://127.0.0.1:8082/?token=x' is invalid" in str(
        error.value
    )


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        (WriterSettings, "token"),
        (ReaderSettings, "app_token"),
        (AppSettings, "token"),
        (AppSettings, "writer_token"),
    ],
)
def test_token_whitespace_stripped(clean_environment, monkeypatch, settings, field):
    prefix = settings.model_config["env_prefix"]
    monkeypatch.setenv(f"{prefix}{field}".upper(), "  s3cret-token\n")
    required = {
        "output": "out.jsonl",
        "input": "in.jsonl",
        "app_url": "http://app:8000",
        "writer_url": "http://writer:8082",
    }
    overrides = {
        name: value for name, value in required.items() if name in settings.model_fields
    }

    loaded = load_settings(settings, **overrides)

    assert getattr(loaded, field).get_secret_value() == "s3cret-token"


def test_token_inner_whitespace_rejected(clean_environment, monkeypatch):
    monkeypatch.setenv("WRITER_TOKEN", "s3cret token")

    with pytest.raises(ConfigurationError) as caught:
        load_settings(WriterSettings, output="out.jsonl")
    text = str(caught.value)

    assert "WRITER_TOKEN='<secret>' is invalid" in text
    assert "contains whitespace" in text
    assert "s3cret" not in text


def test_token_of_only_whitespace_rejected(clean_environment, monkeypatch):
    monkeypatch.setenv("WRITER_TOKEN", "  \n")

    with pytest.raises(ConfigurationError, match="only whitespace"):
        load_settings(WriterSettings, output="out.jsonl")


def test_empty_token_turns_authentication_off(clean_environment, monkeypatch):
    monkeypatch.setenv("WRITER_TOKEN", "")

    loaded = load_settings(WriterSettings, output="out.jsonl")

    assert loaded.token.get_secret_value() == ""


@pytest.mark.parametrize("topic", ["bad topic!", ".", "..", "a" * 250, "t/x"])
def test_writer_illegal_kafka_topic_rejected(clean_environment, topic):
    with pytest.raises(ConfigurationError) as caught:
        load_settings(WriterSettings, sink="kafka", output=topic)
    text = str(caught.value)

    assert f"WRITER_OUTPUT names topic {topic!r}" in text
    assert "1 to 249 characters of a-z, A-Z, 0-9" in text


def test_writer_legal_kafka_topic_accepted(clean_environment):
    settings = load_settings(WriterSettings, sink="kafka", output="scores.v2_-x")

    assert settings.output == "scores.v2_-x"


def test_reader_illegal_kafka_topics_rejected(clean_environment):
    with pytest.raises(ConfigurationError) as input_error:
        load_settings(
            ReaderSettings, source="kafka", input="orders,bad topic", app_url="http://a"
        )
    with pytest.raises(ConfigurationError) as dead_letter_error:
        load_settings(
            ReaderSettings,
            source="kafka",
            input="orders",
            dead_letter="dead letters",
            app_url="http://a",
        )

    assert "READER_INPUT names topic 'bad topic'" in str(input_error.value)
    assert "READER_DEAD_LETTER names topic 'dead letters'" in str(
        dead_letter_error.value
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("host without port", "address 'host without port' contains whitespace"),
        ("broker", "address 'broker' has no port"),
        ("broker:9092,", "address '' has an empty host"),
        ("127.0.0.1:99999", "port '99999' is not a number from 1 to 65535"),
        ("broker:0", "port '0' is not a number from 1 to 65535"),
        (":9092", "address ':9092' has an empty host"),
        ("::1:9092", "put an IPv6 address in brackets"),
        ("kafka://broker:9092", "has a URL scheme"),
        ("k1:9092;k2:9092", "';' is not a separator of addresses"),
    ],
)
def test_kafka_invalid_bootstrap_servers_named(clean_environment, value, problem):
    text = configuration_error(KafkaSettings, KAFKA_BOOTSTRAP_SERVERS=value)

    assert f"KAFKA_BOOTSTRAP_SERVERS={value!r} is invalid" in text
    assert problem in text
    assert "expected HOST:PORT[,HOST:PORT...]" in text


def test_kafka_bootstrap_servers_spaces_after_commas_dropped(clean_environment):
    clean_environment.setenv(
        "KAFKA_BOOTSTRAP_SERVERS", " broker-0:9092, broker-1:9092 "
    )

    settings = load_settings(KafkaSettings)

    assert settings.bootstrap_servers == "broker-0:9092,broker-1:9092"


@pytest.mark.parametrize(
    "value",
    [
        "broker:9092",
        "broker-0:9092,broker-1:9092",
        "10.0.0.4:9093",
        "[::1]:9092",
        "fraud-ns.servicebus.windows.net:9093",
    ],
)
def test_kafka_valid_bootstrap_servers_accepted(clean_environment, value):
    clean_environment.setenv("KAFKA_BOOTSTRAP_SERVERS", value)

    assert load_settings(KafkaSettings).client_config()["bootstrap.servers"] == value


def test_misspelled_variable_gets_close_setting():
    environment = {
        "READER_PROT": "8080",
        "reader_ordring": "key",
        "READER_PORT": "8081",
        "READER_CUSTOM_FLAG": "1",
        "WRITER_PROT": "8080",
    }

    pairs = misspelled_variables(ReaderSettings, environment)

    assert pairs == [
        ("READER_PROT", "READER_PORT"),
        ("reader_ordring", "READER_ORDERING"),
    ]


def test_broker_variables_not_taken_for_misspellings():
    environment = {
        "KAFKA_LISTENERS": "PLAINTEXT://:9092",
        "KAFKA_ADVERTISED_LISTENERS": "PLAINTEXT://broker:9092",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_SECURITY_PROTOCAL": "SSL",
    }

    pairs = misspelled_variables(KafkaSettings, environment)

    assert pairs == [("KAFKA_SECURITY_PROTOCAL", "KAFKA_SECURITY_PROTOCOL")]


def test_misspelled_variable_is_logged_once(clean_environment, caplog):
    clean_environment.setenv("KAFKA_BOOTSTRAP_SERVER", "broker:9092")
    clean_environment.setattr(config, "_warned", set())

    with caplog.at_level(logging.WARNING, logger="agogosml.config"):
        warn_misspelled_variables(KafkaSettings)
        warn_misspelled_variables(KafkaSettings)

    assert caplog.messages == [
        "KAFKA_BOOTSTRAP_SERVER is not a setting and is ignored; did you mean "
        "KAFKA_BOOTSTRAP_SERVERS?"
    ]


def test_auto_offset_reset_lists_its_values():
    text = configuration_error(KafkaSettings, KAFKA_AUTO_OFFSET_RESET="middle")

    assert "KAFKA_AUTO_OFFSET_RESET='middle' is invalid" in text
    assert "'earliest' or 'latest'" in text


async def test_port_in_use_names_port_setting():
    first = await start_site(web.Application(), "127.0.0.1", 0, "WRITER_", **NO_WAIT)
    try:
        with pytest.raises(ConfigurationError) as error:
            await start_site(
                web.Application(), "127.0.0.1", bound_port(first), "WRITER_", **NO_WAIT
            )
    finally:
        await first.cleanup()

    assert "set WRITER_PORT to a free port" in str(error.value)


async def test_foreign_address_names_host_setting():
    with pytest.raises(ConfigurationError) as error:
        await start_site(web.Application(), "192.0.2.1", 0, "READER_", **NO_WAIT)

    assert "cannot listen on 192.0.2.1:0" in str(error.value)
    assert "set READER_HOST to an address of this machine" in str(error.value)


def test_retry_backoff_over_an_hour_rejected():
    text = configuration_error(
        ReaderSettings,
        READER_INPUT="in.jsonl",
        READER_APP_URL="http://app:8000",
        READER_RETRY_INITIAL_BACKOFF_MS="100000000000000000000",
    )

    assert "READER_RETRY_INITIAL_BACKOFF_MS='100000000000000000000' is invalid" in text
    assert "less than or equal to 3600000" in text


def test_missing_setting_names_its_misspelling():
    text = configuration_error(
        ReaderSettings, READER_INPUT="orders", READER_APP_UR="http://app:8000"
    )

    assert "READER_APP_URL is missing" in text
    assert "READER_APP_UR is set, did you mean READER_APP_URL?" in text


def test_invalid_settings_list_other_misspellings():
    text = configuration_error(
        ReaderSettings,
        READER_INPUT="orders",
        READER_APP_URL="http://app:8000",
        READER_ORDERING="sideways",
        READER_PROT="8080",
    )

    assert text.startswith("invalid READER_* settings:")
    assert (
        "READER_PROT is not a setting and is ignored; did you mean READER_PORT?" in text
    )


def test_missing_setting_names_every_misspelling():
    text = configuration_error(
        ReaderSettings,
        READER_APP_URL="http://app:8000",
        READER_INPT="a",
        READER_INPU="b",
    )

    assert "READER_INPT and READER_INPU are set, did you mean READER_INPUT?" in text


def test_eventhubs_starting_position_any_case():
    settings = config.EventHubSettings(
        connection_string=EVENTHUBS_CONNECTION, starting_position="Latest"
    )

    assert settings.sdk_starting_position() == "@latest"


def test_invalid_boolean_names_accepted_values():
    text = configuration_error(
        ReaderSettings,
        READER_INPUT="orders",
        READER_APP_URL="http://app:8000",
        READER_STOP_AT_END="ture",
    )

    assert "READER_STOP_AT_END='ture' is invalid" in text
    assert "use true or false" in text


def test_invalid_log_level_shown_as_set():
    text = configuration_error(
        ReaderSettings,
        READER_INPUT="orders",
        READER_APP_URL="http://app:8000",
        READER_LOG_LEVEL="verbose",
    )

    assert "READER_LOG_LEVEL='verbose' is invalid" in text


def test_choices_accepted_in_any_case(clean_environment):
    clean_environment.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9093")
    clean_environment.setenv("KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
    clean_environment.setenv("KAFKA_SASL_MECHANISM", "scram-sha-256")
    clean_environment.setenv("KAFKA_AUTO_OFFSET_RESET", "Latest")
    clean_environment.setenv("READER_INPUT", "orders")
    clean_environment.setenv("READER_APP_URL", "http://app:8000")
    clean_environment.setenv("READER_SOURCE", "KAFKA")
    clean_environment.setenv("READER_ORDERING", "Key")

    kafka = load_settings(KafkaSettings)
    reader = load_settings(ReaderSettings)

    assert kafka.client_config()["security.protocol"] == "SASL_SSL"
    assert kafka.client_config()["sasl.mechanism"] == "SCRAM-SHA-256"
    assert kafka.auto_offset_reset == "latest"
    assert reader.source.value == "kafka"
    assert reader.ordering is Ordering.KEY


@pytest.mark.parametrize(
    "url", ["http://[::1:8000", "http://[localhost]:8000", "http://u:pw@[::1:80"]
)
def test_malformed_bracketed_url_named(url):
    text = configuration_error(
        ReaderSettings, READER_INPUT="orders", READER_APP_URL=url
    )

    assert "READER_APP_URL=" in text
    assert "is invalid" in text
    assert "pw" not in text


@pytest.mark.parametrize("cls", [ReaderSettings, WriterSettings, AppSettings])
def test_empty_listen_address_rejected(cls):
    prefix = str(cls.model_config["env_prefix"])
    environment = {
        f"{prefix}HOST": "",
        "READER_INPUT": "orders",
        "READER_APP_URL": "http://app:8000",
        "WRITER_OUTPUT": "out.jsonl",
        "APP_WRITER_URL": "http://writer:8000",
    }

    text = configuration_error(cls, **environment)

    assert f"{prefix}HOST='' is invalid" in text
    assert "set 127.0.0.1, or 0.0.0.0" in text


def test_shutdown_timeout_over_a_day_rejected():
    text = configuration_error(
        ReaderSettings,
        READER_INPUT="orders",
        READER_APP_URL="http://app:8000",
        READER_SHUTDOWN_TIMEOUT_MS="10000000000000",
    )

    assert "READER_SHUTDOWN_TIMEOUT_MS='10000000000000' is invalid" in text


def test_transactional_id_rejected():
    text = configuration_error(
        KafkaSettings,
        KAFKA_BOOTSTRAP_SERVERS="broker:9092",
        KAFKA_EXTRA_CONFIG='{"transactional.id": "writer-1"}',
    )

    assert "it sets transactional.id" in text
    assert "remove it" in text


def test_ca_directory_accepted(clean_environment, tmp_path):
    clean_environment.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9093")
    clean_environment.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    clean_environment.setenv("KAFKA_SSL_CA_LOCATION", str(tmp_path))

    config = load_settings(KafkaSettings).client_config()

    assert config["ssl.ca.location"] == str(tmp_path)


@pytest.mark.parametrize(
    ("protocol", "variables", "named"),
    [
        (
            "PLAINTEXT",
            {"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "s3cr3t-pw"},
            "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD are set but "
            "KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use them",
        ),
        (
            "SSL",
            {"KAFKA_SASL_PASSWORD": "s3cr3t-pw"},
            "KAFKA_SASL_PASSWORD is set but KAFKA_SECURITY_PROTOCOL=SSL does not "
            "use it",
        ),
        (
            "SASL_PLAINTEXT",
            {
                "KAFKA_SASL_MECHANISM": "PLAIN",
                "KAFKA_SSL_CA_LOCATION": "CA",
            },
            "KAFKA_SSL_CA_LOCATION is set but KAFKA_SECURITY_PROTOCOL="
            "SASL_PLAINTEXT does not use it",
        ),
    ],
)
def test_unused_credentials_rejected(
    clean_environment, tmp_path, protocol, variables, named
):
    clean_environment.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9093")
    clean_environment.setenv("KAFKA_SECURITY_PROTOCOL", protocol)
    for name, value in variables.items():
        clean_environment.setenv(name, str(tmp_path) if value == "CA" else value)

    with pytest.raises(ConfigurationError) as caught:
        load_settings(KafkaSettings)

    text = " ".join(str(caught.value).split())
    assert named in text
    assert "s3cr3t-pw" not in text


def test_bootstrap_with_user_rejected(clean_environment):
    clean_environment.setenv("KAFKA_BOOTSTRAP_SERVERS", "user@127.0.0.1:9092")

    with pytest.raises(ConfigurationError) as caught:
        load_settings(KafkaSettings)

    assert "has user information before '@'" in str(caught.value)
    assert "KAFKA_SASL_USERNAME" in str(caught.value)


@pytest.mark.parametrize(
    ("cls", "variables", "named"),
    [
        (WriterSettings, {"WRITER_OUTPUT": " "}, "WRITER_OUTPUT=' '"),
        (
            ReaderSettings,
            {
                "READER_INPUT": "in.jsonl",
                "READER_CHECKPOINT_PATH": "ck ",
                "READER_APP_URL": "http://app:8000",
            },
            "READER_CHECKPOINT_PATH='ck '",
        ),
        (WriterSettings, {"WRITER_OUTPUT": " out.jsonl"}, "WRITER_OUTPUT=' out.jsonl'"),
        (
            ReaderSettings,
            {"READER_INPUT": "in.jsonl\t", "READER_APP_URL": "http://app:8000"},
            "READER_INPUT='in.jsonl\\t'",
        ),
        (
            ReaderSettings,
            {
                "READER_INPUT": "in.jsonl",
                "READER_DEAD_LETTER": "dlq.jsonl ",
                "READER_APP_URL": "http://app:8000",
            },
            "READER_DEAD_LETTER='dlq.jsonl '",
        ),
    ],
)
def test_file_path_with_surrounding_space_rejected(cls, variables, named):
    message = configuration_error(cls, **variables)

    assert f"{named} starts or ends with whitespace; remove it" in message


def test_choices_and_flags_ignore_surrounding_space(clean_environment):
    clean_environment.setenv("READER_INPUT", "in.jsonl")
    clean_environment.setenv("READER_APP_URL", "http://app:8000")
    clean_environment.setenv("READER_ORDERING", " KEY ")
    clean_environment.setenv("READER_STOP_AT_END", "FALSE ")

    settings = load_settings(ReaderSettings)

    assert settings.ordering is Ordering.KEY
    assert settings.stop_at_end is False


def test_empty_paths_mean_unset(clean_environment):
    clean_environment.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9093")
    clean_environment.setenv("KAFKA_SSL_CA_LOCATION", "")
    clean_environment.setenv("READER_INPUT", "orders.jsonl")
    clean_environment.setenv("READER_APP_URL", "http://app:8000")
    clean_environment.setenv("READER_CHECKPOINT_PATH", " ")

    kafka = load_settings(KafkaSettings)
    reader = load_settings(ReaderSettings)

    assert "ssl.ca.location" not in kafka.client_config()
    assert reader.checkpoint_path is None


def test_file_settings_named_as_ignored_for_kafka(clean_environment):
    clean_environment.setenv("READER_SOURCE", "kafka")
    clean_environment.setenv("READER_INPUT", "orders")
    clean_environment.setenv("READER_APP_URL", "http://app:8000")
    clean_environment.setenv("READER_CHECKPOINT_PATH", "/tmp/offset")
    clean_environment.setenv("READER_STOP_AT_END", "true")

    settings = load_settings(ReaderSettings)
    file_settings = settings.model_copy(update={"source": config.Transport.FILE})

    assert settings.ignored_settings() == [
        "READER_STOP_AT_END",
        "READER_CHECKPOINT_PATH",
    ]
    assert file_settings.ignored_settings() == []


class _FlaggerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLAGGER_")

    threshold: float = 100.0


def test_read_settings_of_an_app(monkeypatch):
    monkeypatch.setenv("FLAGGER_THRESHOLD", "250.5")

    settings = read_settings(_FlaggerSettings)

    assert settings.threshold == 250.5


def test_read_settings_invalid_value_exits(monkeypatch, capsys):
    monkeypatch.setenv("FLAGGER_THRESHOLD", "abc")

    with pytest.raises(SystemExit) as stopped:
        read_settings(_FlaggerSettings, "amount flagger")

    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("amount flagger: invalid FLAGGER_* settings")
    assert "FLAGGER_THRESHOLD='abc' is invalid" in error


class _RequiredSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLAGGER_")

    model_path: str
    tags: list[str] = []


@pytest.mark.parametrize(
    ("variables", "line"),
    [
        ({}, "FLAGGER_MODEL_PATH is missing: set it"),
        (
            {"FLAGGER_MODEL_PATH": "m.pkl", "FLAGGER_TAGS": "[1,"},
            "FLAGGER_TAGS is not valid JSON: Expecting value: line 1 column 4 (char 3)",
        ),
    ],
)
def test_read_settings_without_description(monkeypatch, capsys, variables, line):
    monkeypatch.delenv("FLAGGER_MODEL_PATH", raising=False)
    monkeypatch.delenv("FLAGGER_TAGS", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(SystemExit):
        read_settings(_RequiredSettings)

    lines = capsys.readouterr().err.splitlines()
    assert f"  {line}" in lines


def test_read_settings_invalid_without_description(monkeypatch, capsys):
    monkeypatch.setenv("FLAGGER_THRESHOLD", "abc")

    with pytest.raises(SystemExit):
        read_settings(_FlaggerSettings)

    error = capsys.readouterr().err
    assert "()" not in error
    assert error.rstrip().endswith("unable to parse string as a number")


class _Limits(BaseModel):
    burst: int = 1


class _NestedSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLAGGER_", env_nested_delimiter="__")

    limits: _Limits = _Limits()
    threshold: float = Field(
        100.0, validation_alias=AliasChoices("FLAGGER_LIMIT", "AMOUNT_LIMIT")
    )


def test_nested_variable_named_in_error(monkeypatch):
    monkeypatch.setenv("FLAGGER_LIMITS__BURST", "many")

    message = configuration_error(_NestedSettings)

    assert "FLAGGER_LIMITS__BURST='many' is invalid" in message
    assert "is not a setting" not in message


@pytest.mark.parametrize("variable", ["FLAGGER_LIMIT", "AMOUNT_LIMIT"])
def test_alias_variable_named_in_error(monkeypatch, variable):
    monkeypatch.setenv(variable, "abc")

    message = configuration_error(_NestedSettings)

    assert f"\n  {variable}='abc' is invalid" in message


class _AliasedSecretSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLAGGER_")

    api_key: SecretStr = Field(validation_alias="FLAGGER_KEY", min_length=8)


def test_aliased_secret_not_shown(monkeypatch):
    monkeypatch.setenv("FLAGGER_KEY", "hunter2")

    message = configuration_error(_AliasedSecretSettings)

    assert "FLAGGER_KEY='<secret>' is invalid" in message
    assert "hunter2" not in message
