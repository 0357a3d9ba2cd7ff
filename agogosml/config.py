"""Service settings, read from environment variables and validated at start-up.

Each service has one frozen settings model with its own prefix (``READER_``,
``WRITER_``, ``APP_``); the Kafka client settings (``KAFKA_``) and the Azure
Event Hubs settings (``EVENTHUB_``) are shared by the reader and the writer.
`load_settings` turns a validation failure into a `ConfigurationError` that
names the variable, the value and the fix.
"""

from __future__ import annotations

import datetime
import difflib
import enum
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AliasChoices,
    AnyHttpUrl,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from agogosml.errors import ConfigurationError
from agogosml.extras import install_command

SettingsT = TypeVar("SettingsT", bound=BaseSettings)

logger = logging.getLogger(__name__)

#: Upper bound of the reader's retry delays: one hour, in milliseconds.
MAX_BACKOFF_MS = 3_600_000


class Transport(enum.StrEnum):
    """Transport of a source or sink."""

    KAFKA = "kafka"
    EVENTHUBS = "eventhubs"
    FILE = "file"


class Ordering(enum.StrEnum):
    """Ordering mode of the input reader: the scope in which order is kept."""

    PARTITION = "partition"
    KEY = "key"
    UNORDERED = "unordered"


class SecurityProtocol(enum.StrEnum):
    """Kafka security protocol, as librdkafka names it."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class SaslMechanism(enum.StrEnum):
    """SASL mechanisms supported for Kafka."""

    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


def _any_case(choices: Iterable[str]) -> BeforeValidator:
    """Accept a choice in any letter case, converted to its spelling in `choices`.

    Surrounding whitespace is ignored, as it is for numbers. Any other value
    passes on unchanged, so an error message shows it as set.
    """
    spellings = {choice.casefold(): choice for choice in choices}

    def convert(value: Any) -> Any:
        if isinstance(value, str):
            return spellings.get(value.strip().casefold(), value)
        return value

    return BeforeValidator(convert)


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


#: A boolean setting; surrounding whitespace is ignored, as it is for numbers.
Flag = Annotated[bool, BeforeValidator(_strip)]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _empty_as_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


#: An optional path; an empty variable means unset, not the current directory.
OptionalPath = Annotated[Path | None, BeforeValidator(_empty_as_none)]

#: A log level name, in any letter case.
LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR"], _any_case(_LOG_LEVELS)
]


def redact_url(url: str) -> str:
    """Return `url` with the password of its user information replaced by ***.

    The user information is everything before the last ``@`` after the
    scheme, so a password with an unencoded ``#``, ``/`` or ``?`` is found
    too, and so is one in a value without a scheme. User information without
    a colon, which may be a token, is replaced whole.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    user_information, _, host = rest.rpartition("@")
    user, colon, _ = user_information.partition(":")
    masked = f"{user}:***" if colon else "***"
    return f"{scheme}{separator}{masked}@{host}"


def _base_url(value: AnyHttpUrl) -> AnyHttpUrl:
    if value.query or value.fragment:
        raise ValueError(
            "a base URL has no query or fragment; remove the part from '?' or '#'"
        )
    return value


#: The base URL of a service, to which paths such as /batch are appended.
BaseUrl = Annotated[AnyHttpUrl, AfterValidator(_base_url)]

#: librdkafka properties that KAFKA_EXTRA_CONFIG may not override, because the
#: delivery guarantee depends on them, with their aliases in librdkafka 2.16:
#: request.required.acks for acks, and auto.commit.enable, the legacy
#: consumer's enable.auto.commit.
_GUARANTEED_PROPERTIES = frozenset(
    {
        "acks",
        "request.required.acks",
        "enable.idempotence",
        "enable.auto.commit",
        "auto.commit.enable",
        "enable.auto.offset.store",
    }
)

#: The prefix with which librdkafka 2.16 also accepts a topic-level property,
#: such as topic.acks for acks, setting it on the default topic configuration.
_TOPIC_PREFIX = "topic."


def _property_name(name: str) -> str:
    """Return the librdkafka property that `name` sets, without a topic prefix."""
    return name.removeprefix(_TOPIC_PREFIX)


#: librdkafka properties, aliases included, that have their own KAFKA_ variable.
#: KAFKA_EXTRA_CONFIG may not set them, so that the variable is the one value in
#: effect and the messages that quote it are true.
_PROPERTY_VARIABLES = {
    "bootstrap.servers": "KAFKA_BOOTSTRAP_SERVERS",
    "metadata.broker.list": "KAFKA_BOOTSTRAP_SERVERS",
    "group.id": "KAFKA_GROUP_ID",
    "auto.offset.reset": "KAFKA_AUTO_OFFSET_RESET",
    "security.protocol": "KAFKA_SECURITY_PROTOCOL",
    "sasl.mechanism": "KAFKA_SASL_MECHANISM",
    "sasl.mechanisms": "KAFKA_SASL_MECHANISM",
    "sasl.username": "KAFKA_SASL_USERNAME",
    "sasl.password": "KAFKA_SASL_PASSWORD",
    "ssl.ca.location": "KAFKA_SSL_CA_LOCATION",
    "delivery.timeout.ms": "KAFKA_DELIVERY_TIMEOUT_MS",
    "message.timeout.ms": "KAFKA_DELIVERY_TIMEOUT_MS",
    "linger.ms": "KAFKA_LINGER_MS",
    "queue.buffering.max.ms": "KAFKA_LINGER_MS",
}

#: Integer properties that the Kafka sink reads from KAFKA_EXTRA_CONFIG, with
#: the range that librdkafka 2.16 allows.
SIZE_PROPERTY_RANGES = {
    "message.max.bytes": (1000, 1_000_000_000),
    "batch.size": (1, 2_147_483_647),
}
#: An integer as librdkafka's strtol reads it and Python's int(text, 0) reads it
#: alike: decimal, or hexadecimal with 0x. Octal (a leading 0) and digit
#: separators are left out, because the two read them differently.
_INTEGER_TEXT = re.compile(r"\s*[+-]?(0[xX][0-9a-fA-F]+|[1-9][0-9]*|0)\s*")

#: Maximum of librdkafka's message.timeout.ms (delivery.timeout.ms), a 32-bit
#: signed integer of milliseconds.
MAX_DELIVERY_TIMEOUT_MS = 2_147_483_647
#: Maximum of librdkafka's queue.buffering.max.ms (linger.ms), 15 minutes.
MAX_LINGER_MS = 900_000


def _clean_token(value: Any) -> Any:
    """Strip the whitespace around a bearer token, and reject whitespace inside.

    A bearer token (RFC 6750) contains no whitespace, so the newline that a
    Kubernetes Secret made from a file often ends with cannot be part of it.
    """
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if not isinstance(text, str):
        return value
    token = text.strip()
    if text and not token:
        # An empty token turns authentication off, which a value of only
        # whitespace (an empty Secret file with its newline) should not do.
        raise ValueError(
            "the token is only whitespace; set the token, or leave the variable "
            "unset (or empty) to turn authentication off"
        )
    if any(character.isspace() or not character.isprintable() for character in token):
        raise ValueError(
            "the token contains whitespace or a control character, which an HTTP "
            "Authorization header cannot carry; set the token alone"
        )
    return token


#: A bearer token setting; surrounding whitespace is removed.
BearerToken = Annotated[SecretStr, BeforeValidator(_clean_token)]

_FROZEN = {"frozen": True, "extra": "ignore", "case_sensitive": False}
_EVENTHUBS_ENDPOINT = re.compile(r"Endpoint=sb://([^/;]+)/?", re.IGNORECASE)
_SETTINGS_ERROR_FIELD = re.compile(r'field "(\w+)"')
#: A legal Kafka topic name (Apache Kafka's Topic.validate).
_KAFKA_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_BLOB_CONTAINER = re.compile(r"[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]")


def split_host_port(address: str) -> tuple[str, int | None]:
    """Split HOST, HOST:PORT, [IPv6] or [IPv6]:PORT into the host and the port.

    Raises:
        ValueError: the port is not a number from 1 to 65535, or an IPv6
            address is not in brackets.
    """
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise ValueError("close the IPv6 address with ']', such as [::1]:9093")
        host, rest = address[: end + 1], address[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(
                "put ':' between the IPv6 address and the port, such as [::1]:9093"
            )
        return host, _port(rest[1:])
    if ";" in address:
        raise ValueError(
            "';' is not a separator of addresses; separate HOST:PORT pairs with commas"
        )
    if address.count(":") > 1:
        raise ValueError("put an IPv6 address in brackets, such as [::1]:9093")
    if ":" not in address:
        return address, None
    host, port = address.split(":")
    return host, _port(port)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


#: The form of KAFKA_BOOTSTRAP_SERVERS and of ``agogosml run --kafka``.
BOOTSTRAP_SERVERS_FORM = (
    "HOST:PORT[,HOST:PORT...], such as broker-0:9092,broker-1:9092 or [::1]:9092"
)


def check_bootstrap_servers(value: str) -> str:
    """Check a comma-separated list of broker addresses and return it normalized.

    Spaces around the commas are dropped. librdkafka adds port 9092 to an
    address without one, so a missing port is rejected here rather than guessed.

    Raises:
        ValueError: an address contains whitespace, or has an empty host, a URL
            scheme, no port, a port outside 1 to 65535, or is an IPv6 address
            without brackets.
    """
    addresses = [address.strip() for address in value.split(",")]
    for address in addresses:
        if any(character.isspace() for character in address):
            raise ValueError(
                f"address {redact_url(address)!r} contains whitespace; expected "
                f"{BOOTSTRAP_SERVERS_FORM}"
            )
        problem = _bootstrap_address_problem(address)
        if problem:
            raise ValueError(
                f"address {redact_url(address)!r} {problem}; expected "
                f"{BOOTSTRAP_SERVERS_FORM}"
            )
    return ",".join(addresses)


def _bootstrap_address_problem(address: str) -> str:
    if "://" in address:
        return "has a URL scheme, which Kafka addresses do not take"
    if "@" in address:
        return (
            "has user information before '@', which Kafka addresses do not take; "
            "set the user name in KAFKA_SASL_USERNAME"
        )
    try:
        host, port = split_host_port(address)
    except ValueError as exc:
        return f"is invalid: {exc}"
    if host in ("", "[]"):
        return "has an empty host"
    if port is None:
        return "has no port"
    return ""


class KafkaSettings(BaseSettings):
    """Kafka client settings shared by the reader and the writer."""

    model_config = SettingsConfigDict(env_prefix="KAFKA_", **_FROZEN)  # type: ignore[typeddict-item]

    bootstrap_servers: str = Field(
        "",
        description="KAFKA_BOOTSTRAP_SERVERS: comma-separated host:port list. "
        "Derived from the Event Hubs connection string when that is set.",
    )
    group_id: str = Field(
        "agogosml-input-reader",
        description="KAFKA_GROUP_ID: consumer group of the input reader, which "
        "must not be empty.",
    )
    auto_offset_reset: Annotated[
        Literal["earliest", "latest"], _any_case(("earliest", "latest"))
    ] = Field(
        "earliest",
        description="KAFKA_AUTO_OFFSET_RESET: where a new group starts: "
        "earliest or latest.",
    )
    commit_interval_ms: int = Field(
        1000,
        ge=10,
        description="KAFKA_COMMIT_INTERVAL_MS: how often finished offsets are "
        "committed, in milliseconds.",
    )
    security_protocol: Annotated[SecurityProtocol, _any_case(SecurityProtocol)] = Field(
        SecurityProtocol.PLAINTEXT,
        description="KAFKA_SECURITY_PROTOCOL: PLAINTEXT, SSL, SASL_PLAINTEXT or "
        "SASL_SSL.",
    )
    sasl_mechanism: Annotated[SaslMechanism | None, _any_case(SaslMechanism)] = Field(
        None,
        description="KAFKA_SASL_MECHANISM: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.",
    )
    sasl_username: str = Field("", description="KAFKA_SASL_USERNAME: SASL user name.")
    sasl_password: SecretStr = Field(
        SecretStr(""), description="KAFKA_SASL_PASSWORD: SASL password."
    )
    ssl_ca_location: OptionalPath = Field(
        None,
        description="KAFKA_SSL_CA_LOCATION: PEM file of the CA that signed the "
        "broker certificates, or a directory of CA certificates. Unset means the "
        "system CA store.",
    )
    eventhubs_connection_string: SecretStr = Field(
        SecretStr(""),
        description="KAFKA_EVENTHUBS_CONNECTION_STRING: Azure Event Hubs connection "
        "string; sets SASL_SSL, PLAIN and the username $ConnectionString.",
    )
    delivery_timeout_ms: int = Field(
        20000,
        ge=1000,
        le=MAX_DELIVERY_TIMEOUT_MS,
        description="KAFKA_DELIVERY_TIMEOUT_MS: how long the producer retries a "
        "record before reporting it failed, in milliseconds, greater than "
        "KAFKA_LINGER_MS. Keep it below "
        "APP_WRITER_TIMEOUT_MS, so that the writer responds 503 before the app "
        "gives up on it.",
    )
    # The writer responds only after the broker acknowledged, so any linger adds
    # to every request's latency. Records of concurrent requests still batch
    # while a produce request is in flight.
    linger_ms: int = Field(
        0,
        ge=0,
        le=MAX_LINGER_MS,
        description="KAFKA_LINGER_MS: how long the producer waits to fill a batch, "
        "in ms. 0 sends at once, for the lowest latency; 5 "
        "(librdkafka's default) "
        "makes fewer, larger produce requests, which raises throughput under load "
        "and adds up to 5 ms to each write (docs/benchmarks.md).",
    )
    extra_config: dict[str, str | int | bool] = Field(
        default_factory=dict,
        description="KAFKA_EXTRA_CONFIG: JSON object of further librdkafka "
        "properties, applied last. Values are JSON strings, integers or booleans. "
        "Properties that have a KAFKA_ variable, and acks, enable.idempotence, "
        "enable.auto.commit and enable.auto.offset.store (and their aliases), "
        "are rejected, with or without the prefix topic.",
    )

    @field_validator("extra_config", mode="before")
    @classmethod
    def _check_value_types(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {key: _librdkafka_value(key, item) for key, item in value.items()}

    @field_validator("extra_config")
    @classmethod
    def _check_size_properties(
        cls, value: dict[str, str | int | bool]
    ) -> dict[str, str | int | bool]:
        checked = dict(value)
        for name, (minimum, maximum) in SIZE_PROPERTY_RANGES.items():
            if name in value:
                checked[name] = _integer_property(name, value[name], minimum, maximum)
        return checked

    @field_validator("extra_config")
    @classmethod
    def _reject_properties_with_variables(
        cls, value: dict[str, str | int | bool]
    ) -> dict[str, str | int | bool]:
        for name in value:
            variable = _PROPERTY_VARIABLES.get(_property_name(name))
            if variable is not None:
                raise ValueError(
                    f"it sets {name}, which has its own variable, so set {variable} "
                    f"instead and remove {name} from KAFKA_EXTRA_CONFIG"
                )
        return value

    @field_validator("extra_config")
    @classmethod
    def _keep_delivery_guarantees(
        cls, value: dict[str, str | int | bool]
    ) -> dict[str, str | int | bool]:
        overridden = sorted(
            name for name in value if _property_name(name) in _GUARANTEED_PROPERTIES
        )
        # librdkafka 2.16 accepts group.protocol in any case (CONSUMER too).
        strategy = str(value.get("partition.assignment.strategy", "")).lower()
        protocol = str(value.get("group.protocol", "")).lower()
        if "cooperative" in strategy or protocol == "consumer":
            raise ValueError(
                "incremental (cooperative) rebalancing is not supported: the reader "
                "assigns partitions eagerly; remove partition.assignment.strategy "
                "and group.protocol"
            )
        if "transactional.id" in value:
            # A transactional producer needs init_transactions() and a
            # transaction around each produce, which the sinks do not make.
            raise ValueError(
                "it sets transactional.id, but agogosml's producers do not use "
                "transactions, so every produce would fail; remove it"
            )
        if overridden:
            raise ValueError(
                f"it sets {', '.join(overridden)}, which agogosml sets itself to keep "
                "at-least-once delivery (acks=all, idempotence, manual commits); "
                "remove them"
            )
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_bootstrap_servers(cls, value: str) -> str:
        return check_bootstrap_servers(value) if value else value

    @field_validator("group_id")
    @classmethod
    def _check_group_id(cls, value: str) -> str:
        # confluent-kafka 2.16 aborts the process (a failed assertion in
        # Consumer_init) when it creates a consumer with such a group id.
        if not value.strip():
            raise ValueError(
                "the consumer group id is empty or only whitespace; set "
                "KAFKA_GROUP_ID to a group name, or unset it to use "
                "agogosml-input-reader"
            )
        return value

    @model_validator(mode="after")
    def _check_linger_within_delivery_timeout(self) -> KafkaSettings:
        if self.delivery_timeout_ms <= self.linger_ms:
            raise ValueError(
                f"KAFKA_DELIVERY_TIMEOUT_MS={self.delivery_timeout_ms} must be "
                f"greater than KAFKA_LINGER_MS={self.linger_ms}, because librdkafka "
                "requires a delivery timeout longer than the time a record may "
                "wait for its batch; lower KAFKA_LINGER_MS or raise "
                "KAFKA_DELIVERY_TIMEOUT_MS"
            )
        return self

    @field_validator("ssl_ca_location")
    @classmethod
    def _ca_file_exists(cls, value: Path | None) -> Path | None:
        # librdkafka takes a file of certificates or a directory of them.
        if value is not None and not (value.is_file() or value.is_dir()):
            raise ValueError(
                f"there is no file or directory {str(value)!r}; set the path of a "
                "PEM file or of a directory of CA certificates"
            )
        return value

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        connection_string = self.eventhubs_connection_string.get_secret_value()
        if connection_string:
            # Checked also when KAFKA_BOOTSTRAP_SERVERS is set, because the
            # string is the SASL password, which the namespace would reject.
            if not _EVENTHUBS_ENDPOINT.search(connection_string):
                raise ValueError(
                    "KAFKA_EVENTHUBS_CONNECTION_STRING has no Endpoint=sb://...; "
                    "copy the connection string from the namespace's Shared "
                    "access policies"
                )
            return self
        sasl = self.security_protocol in (
            SecurityProtocol.SASL_SSL,
            SecurityProtocol.SASL_PLAINTEXT,
        )
        if sasl and self.sasl_mechanism is None:
            raise ValueError(
                f"security protocol {self.security_protocol.value} needs "
                "KAFKA_SASL_MECHANISM (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
            )
        if not sasl and self.sasl_mechanism is not None:
            raise ValueError(
                "KAFKA_SASL_MECHANISM is set but KAFKA_SECURITY_PROTOCOL is "
                f"{self.security_protocol.value}; set the protocol to SASL_SSL "
                "(or SASL_PLAINTEXT), or unset KAFKA_SASL_MECHANISM"
            )
        # Credentials or a CA that the protocol does not use mean a forgotten
        # KAFKA_SECURITY_PROTOCOL, which would fail later with errors about
        # the connection that name none of these settings.
        unused = []
        if not sasl:
            if self.sasl_username:
                unused.append("KAFKA_SASL_USERNAME")
            if self.sasl_password.get_secret_value():
                unused.append("KAFKA_SASL_PASSWORD")
        tls = self.security_protocol in (
            SecurityProtocol.SSL,
            SecurityProtocol.SASL_SSL,
        )
        if not tls and self.ssl_ca_location is not None:
            unused.append("KAFKA_SSL_CA_LOCATION")
        if unused:
            verb = "are" if len(unused) > 1 else "is"
            raise ValueError(
                f"{' and '.join(unused)} {verb} set but KAFKA_SECURITY_PROTOCOL="
                f"{self.security_protocol.value} does not use "
                f"{'them' if len(unused) > 1 else 'it'}; set the protocol (SASL_SSL "
                "for a user name and password, SSL or SASL_SSL for a CA), or unset "
                f"{'them' if len(unused) > 1 else 'it'}"
            )
        if not self.bootstrap_servers:
            raise ValueError(
                "KAFKA_BOOTSTRAP_SERVERS is empty; set it to host:port of a broker"
            )
        return self

    def resolved_bootstrap_servers(self) -> str:
        """Return the bootstrap servers, derived from Event Hubs when unset."""
        if self.bootstrap_servers:
            return self.bootstrap_servers
        conn = self.eventhubs_connection_string.get_secret_value()
        match = _EVENTHUBS_ENDPOINT.search(conn)
        return f"{match.group(1)}:9093" if match else ""

    def client_config(self) -> dict[str, Any]:
        """Return the librdkafka properties common to consumers and producers."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.resolved_bootstrap_servers(),
            "security.protocol": self.security_protocol.value,
            "enable.ssl.certificate.verification": True,
        }
        conn = self.eventhubs_connection_string.get_secret_value()
        if conn:
            config["security.protocol"] = SecurityProtocol.SASL_SSL.value
            config["sasl.mechanism"] = SaslMechanism.PLAIN.value
            config["sasl.username"] = "$ConnectionString"
            config["sasl.password"] = conn
        elif self.sasl_mechanism is not None:
            config["sasl.mechanism"] = self.sasl_mechanism.value
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location is not None:
            config["ssl.ca.location"] = str(self.ssl_ca_location)
        config.update(self.extra_config)
        return config


def _librdkafka_value(name: str, value: Any) -> Any:
    """Return a KAFKA_EXTRA_CONFIG value as librdkafka takes it, or raise ValueError.

    A JSON number with a zero fraction, such as 1e6, becomes an integer. The
    message leaves the value out, because it may be a password.
    """
    if isinstance(value, str | int | bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, float):
        kind = "a number with a fraction"
    elif value is None:
        kind = "null"
    elif isinstance(value, list):
        kind = "an array"
    elif isinstance(value, dict):
        kind = "an object"
    else:
        kind = f"a {type(value).__name__}"
    raise ValueError(
        f"property {name!r} is {kind}; give each property a JSON string, an "
        'integer or a boolean, such as "lz4", 5 or true'
    )


def _integer_property(
    name: str, value: str | int | bool, minimum: int, maximum: int
) -> int:
    """Return the integer of a size property, or raise ValueError naming the range."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _INTEGER_TEXT.fullmatch(value):
        number = int(value.strip(), 0)
    if number is None or not minimum <= number <= maximum:
        raise ValueError(
            f"property {name!r} is {json.dumps(value)}; set it to an integer from "
            f"{minimum} "
            f"to {maximum}, as a JSON integer or as a string of decimal digits or "
            "of hexadecimal digits after 0x"
        )
    return number


class EventHubsTransportType(enum.StrEnum):
    """Protocol between the Event Hubs clients and the service."""

    AMQP = "amqp"
    WEBSOCKET = "websocket"


class EventHubSettings(BaseSettings):
    """Azure Event Hubs client settings shared by the reader and the writer.

    The clients authenticate with a connection string (shared access key), or
    with Azure AD through ``DefaultAzureCredential`` when only the namespace is
    set. The reader also needs a blob container for checkpoints and partition
    ownership.
    """

    model_config = SettingsConfigDict(env_prefix="EVENTHUB_", **_FROZEN)  # type: ignore[typeddict-item]

    connection_string: SecretStr = Field(
        SecretStr(""),
        description="EVENTHUB_CONNECTION_STRING: connection string of the namespace "
        "or of the hub, from its Shared access policies.",
    )
    fully_qualified_namespace: str = Field(
        "",
        description="EVENTHUB_FULLY_QUALIFIED_NAMESPACE: "
        "<namespace>.servicebus.windows.net; set it instead of the connection "
        "string to authenticate with Azure AD (DefaultAzureCredential).",
    )
    consumer_group: str = Field(
        "$Default",
        min_length=1,
        description="EVENTHUB_CONSUMER_GROUP: consumer group of the input reader.",
    )
    starting_position: str = Field(
        "earliest",
        description="EVENTHUB_STARTING_POSITION: where a partition without a "
        "checkpoint starts: earliest, latest, or an ISO 8601 enqueued time such "
        "as 2026-01-31T12:00:00+00:00.",
    )
    checkpoint_store_connection_string: SecretStr = Field(
        SecretStr(""),
        description="EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING: connection "
        "string of the storage account that keeps checkpoints and partition "
        "ownership (reader), with AccountName and AccountKey, or BlobEndpoint and "
        "SharedAccessSignature. UseDevelopmentStorage=true is not supported.",
    )
    checkpoint_store_account_url: str = Field(
        "",
        description="EVENTHUB_CHECKPOINT_STORE_ACCOUNT_URL: "
        "https://<account>.blob.core.windows.net; set it instead of the storage "
        "connection string to authenticate with Azure AD (reader).",
    )
    checkpoint_store_container: str = Field(
        "",
        description="EVENTHUB_CHECKPOINT_STORE_CONTAINER: blob container of the "
        "checkpoints, created if missing (reader).",
    )
    checkpoint_interval_ms: int = Field(
        5000,
        ge=10,
        description="EVENTHUB_CHECKPOINT_INTERVAL_MS: how often finished events "
        "are checkpointed, in milliseconds; each checkpoint is one blob write "
        "per partition that made progress.",
    )
    load_balancing_interval_ms: int = Field(
        30000,
        ge=1000,
        description="EVENTHUB_LOAD_BALANCING_INTERVAL_MS: how often a reader "
        "claims and renews partition ownership, in milliseconds. Ownership "
        "expires after six intervals without renewal.",
    )
    prefetch: int = Field(
        300,
        ge=1,
        description="EVENTHUB_PREFETCH: events each partition receiver fetches ahead.",
    )
    max_batch_bytes: int | None = Field(
        None,
        ge=1024,
        description="EVENTHUB_MAX_BATCH_BYTES: largest batch the writer sends, in "
        "bytes. Unset means the hub's maximum message size, and a larger value "
        "stops the writer at start-up.",
    )
    send_timeout_ms: int = Field(
        20000,
        ge=1000,
        description="EVENTHUB_SEND_TIMEOUT_MS: how long the producer tries to "
        "send one batch before it reports the batch failed, in milliseconds. Keep "
        "it below APP_WRITER_TIMEOUT_MS, as KAFKA_DELIVERY_TIMEOUT_MS.",
    )
    transport_type: Annotated[
        EventHubsTransportType, _any_case(EventHubsTransportType)
    ] = Field(
        EventHubsTransportType.AMQP,
        description="EVENTHUB_TRANSPORT_TYPE: amqp (port 5671) or websocket (AMQP "
        "over WebSocket, port 443).",
    )

    @field_validator("fully_qualified_namespace")
    @classmethod
    def _bare_host_name(cls, value: str) -> str:
        if "://" in value or "/" in value:
            raise ValueError(
                "give the host name alone, such as "
                "mynamespace.servicebus.windows.net, without scheme or path"
            )
        return value

    @field_validator("starting_position")
    @classmethod
    def _known_position(cls, value: str) -> str:
        value = value.strip()
        if value.lower() in ("earliest", "latest"):
            return value.lower()
        try:
            parsed = datetime.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                "use earliest, latest, or an ISO 8601 time with a UTC offset"
            ) from None
        if parsed.tzinfo is None:
            raise ValueError("add a UTC offset to the time, such as +00:00")
        return value

    @field_validator("consumer_group")
    @classmethod
    def _consumer_group_name(cls, value: str) -> str:
        # Surrounding whitespace comes from copying the name, and a consumer
        # group that does not exist fails only when a partition's link attaches.
        if value != value.strip():
            raise ValueError(
                "the consumer group name starts or ends with whitespace; remove "
                "the whitespace"
            )
        return value

    @field_validator("checkpoint_store_container")
    @classmethod
    def _container_name(cls, value: str) -> str:
        if value:
            check_blob_container_name(value)
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> EventHubSettings:
        connection_string = self.connection_string.get_secret_value()
        if connection_string and self.fully_qualified_namespace:
            raise ValueError(
                "both EVENTHUB_CONNECTION_STRING and "
                "EVENTHUB_FULLY_QUALIFIED_NAMESPACE are set; unset the namespace "
                "to use the connection string, or the connection string to use "
                "Azure AD"
            )
        if not connection_string and not self.fully_qualified_namespace:
            raise ValueError(
                "set EVENTHUB_CONNECTION_STRING, or "
                "EVENTHUB_FULLY_QUALIFIED_NAMESPACE to authenticate with Azure AD"
            )
        if connection_string:
            _check_eventhubs_connection_string(connection_string)
        storage_connection_string = (
            self.checkpoint_store_connection_string.get_secret_value()
        )
        if storage_connection_string and self.checkpoint_store_account_url:
            raise ValueError(
                "both EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING and "
                "EVENTHUB_CHECKPOINT_STORE_ACCOUNT_URL are set; keep one"
            )
        if storage_connection_string:
            _check_storage_connection_string(storage_connection_string)
        return self

    def namespace(self) -> str:
        """Return the fully qualified namespace, from the connection string if set."""
        connection_string = self.connection_string.get_secret_value()
        if not connection_string:
            return self.fully_qualified_namespace
        from azure.eventhub import parse_connection_string

        return parse_connection_string(connection_string).fully_qualified_namespace

    def hub_in_connection_string(self) -> str | None:
        """Return the EntityPath of a hub-level connection string, else None.

        The key is read in any case, as the SDK's clients read it, although
        ``azure.eventhub.parse_connection_string`` matches keys by case.
        """
        connection_string = self.connection_string.get_secret_value()
        if not connection_string:
            return None
        from azure.core.utils import parse_connection_string

        keys = parse_connection_string(connection_string, case_sensitive_keys=False)
        return keys.get("entitypath") or None

    def sdk_starting_position(self) -> str | datetime.datetime:
        """Return the starting position in the form the SDK's receive() takes."""
        if self.starting_position == "earliest":
            return "-1"
        if self.starting_position == "latest":
            return "@latest"
        return datetime.datetime.fromisoformat(self.starting_position)


def check_kafka_topic(variable: str, topic: str) -> None:
    """Raise ValueError if `topic`, from setting `variable`, is not a legal name."""
    if _KAFKA_TOPIC.fullmatch(topic) and topic not in (".", ".."):
        return
    raise ValueError(
        f"{variable} names topic {topic!r}, which is not a legal Kafka topic name: "
        "use 1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-', other than "
        "'.' and '..'"
    )


def check_file_path(variable: str, path: str) -> None:
    """Raise ValueError if `path`, from setting `variable`, has surrounding spaces.

    A file name can start or end with spaces, but in a setting they are most
    likely a copy mistake, which would create or read an unintended file.
    """
    if path != path.strip():
        raise ValueError(
            f"{variable}={path!r} starts or ends with whitespace; remove it"
        )


def check_single_credential(
    url_variable: str, url: str, token_variable: str, token: str
) -> None:
    """Raise ValueError when a URL with a user name comes with a bearer token.

    Both would go in the Authorization header, and aiohttp refuses to send a
    request that has both.
    """
    if token and urllib.parse.urlsplit(url).username is not None:
        raise ValueError(
            f"{url_variable} has a user name or password and {token_variable} is "
            "set, but a request carries one Authorization header: remove the "
            f"user information from {url_variable}, or unset {token_variable}"
        )


def check_blob_container_name(value: str) -> None:
    """Raise ValueError if `value` is not a valid Azure blob container name."""
    if not _BLOB_CONTAINER.fullmatch(value):
        raise ValueError(
            "a blob container name has 3 to 63 lower-case letters, digits and "
            "single hyphens, and starts with a letter or digit"
        )


def require_eventhubs_extra() -> None:
    """Raise ValueError with the fix unless the eventhubs extra is installed."""
    try:
        import azure.eventhub  # noqa: F401
        import azure.eventhub.extensions.checkpointstoreblobaio  # noqa: F401
    except ModuleNotFoundError:
        raise ValueError(
            "the native Event Hubs transport needs the packages of agogosml's "
            "eventhubs extra, which are not installed; install them with "
            f"{install_command('eventhubs')} (the reader and writer images "
            "contain them)"
        ) from None


def _check_eventhubs_connection_string(value: str) -> None:
    """Raise ValueError, without the secret, if the SDK cannot parse `value`."""
    require_eventhubs_extra()
    from azure.eventhub import parse_connection_string

    try:
        parse_connection_string(value)
    except ValueError as exc:
        raise ValueError(
            f"EVENTHUB_CONNECTION_STRING is malformed ({exc}); copy it from the "
            "namespace's or hub's Shared access policies, in the form "
            "Endpoint=sb://<namespace>.servicebus.windows.net/;"
            "SharedAccessKeyName=<policy>;SharedAccessKey=<key>"
        ) from None


_STORAGE_CONNECTION_STRING_FORM = (
    "copy it from the storage account's Access keys, in the form "
    "DefaultEndpointsProtocol=https;AccountName=<account>;AccountKey=<key>;"
    "EndpointSuffix=core.windows.net, or give "
    "BlobEndpoint=<url>;SharedAccessSignature=<token>"
)


def _check_storage_connection_string(value: str) -> None:
    """Raise ValueError, without the secret, unless the blob client accepts `value`.

    The check is the parser of the blob client that the checkpoint store uses
    (vendored in azure-eventhub-checkpointstoreblob-aio), plus a credential:
    AccountName with AccountKey, or SharedAccessSignature.
    """
    require_eventhubs_extra()
    from azure.eventhub.extensions.checkpointstoreblobaio._vendor.storage.blob._shared.base_client_async import (  # noqa: E501
        parse_connection_str,
    )

    if value.strip().rstrip(";").lower() == "usedevelopmentstorage=true":
        # The vendored parser (checkpointstoreblob-aio 1.2.0) has no case for it.
        raise ValueError(
            "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING=UseDevelopmentStorage=true "
            "is not supported by the checkpoint store's blob client; give Azurite's "
            "full connection string: DefaultEndpointsProtocol=http;"
            "AccountName=devstoreaccount1;AccountKey=<key>;"
            "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1"
        )
    try:
        _, _, credential = parse_connection_str(value, None, "blob")
    except ValueError as exc:
        raise ValueError(
            f"EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING is malformed ({exc}); "
            f"{_STORAGE_CONNECTION_STRING_FORM}"
        ) from None
    if not credential:
        raise ValueError(
            "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING has no credential, "
            "because it contains neither AccountName with AccountKey nor "
            f"SharedAccessSignature; {_STORAGE_CONNECTION_STRING_FORM}"
        )


#: Upper bound of a shutdown timeout: one day, in milliseconds.
MAX_SHUTDOWN_TIMEOUT_MS = 86_400_000


def _listen_address(value: str) -> str:
    if not value.strip():
        raise ValueError(
            "the listen address is empty, which would listen on every interface; "
            "set 127.0.0.1, or 0.0.0.0 to listen on every interface on purpose"
        )
    return value.strip()


#: The address an HTTP server listens on; an empty one is rejected.
ListenAddress = Annotated[str, AfterValidator(_listen_address)]


class _ServiceSettings(BaseSettings):
    host: ListenAddress = Field(
        "127.0.0.1",
        description="address the HTTP server listens on (0.0.0.0 in containers).",
    )
    log_level: LogLevel = Field(
        "INFO",
        description="Log level: DEBUG, INFO, WARNING or ERROR, any case. Below "
        "DEBUG, the messages of logged exceptions are left out, because they "
        "may quote message bodies.",
    )
    shutdown_timeout_ms: int = Field(
        30000,
        ge=0,
        le=MAX_SHUTDOWN_TIMEOUT_MS,
        description="how long a graceful shutdown may take, in milliseconds, at "
        "most one day.",
    )


#: Reader settings that only a file source reads.
_FILE_SOURCE_FIELDS = (
    "stop_at_end",
    "max_line_bytes",
    "checkpoint_path",
    "rotate_wait_ms",
)


class ReaderSettings(_ServiceSettings):
    """Settings of the input reader (prefix ``READER_``)."""

    model_config = SettingsConfigDict(env_prefix="READER_", **_FROZEN)  # type: ignore[typeddict-item]

    source: Annotated[Transport, _any_case(Transport)] = Field(
        Transport.FILE, description="READER_SOURCE: kafka, eventhubs or file."
    )
    input: str = Field(
        ...,
        min_length=1,
        description="READER_INPUT: comma-separated topics (kafka), one event hub "
        "(eventhubs) or a JSON Lines file path, '-' for stdin (file). Stdin "
        "cannot be read again, so a stop before its end loses the input not yet "
        "read, and the reader logs a WARNING with the lines it read and "
        "finished. The producer must send the rest again.",
    )
    app_url: BaseUrl = Field(
        ..., description="READER_APP_URL: base URL of the model app."
    )
    app_token: BearerToken = Field(
        SecretStr(""),
        description="READER_APP_TOKEN: bearer token sent to the app, if set; "
        "surrounding whitespace is removed.",
    )
    app_ready_path: str = Field(
        "/readyz",
        description="READER_APP_READY_PATH: readiness path of the app; empty "
        "turns the readiness check off.",
    )
    dead_letter: str = Field(
        "",
        description="READER_DEAD_LETTER: dead-letter topic (kafka), event hub "
        "(eventhubs) or file (file). Default: '<first input>.dlq' for kafka and "
        "eventhubs, '<input>.dlq.jsonl' for files, 'dead-letter.jsonl' in the "
        "working directory when the input is stdin.",
    )
    port: int = Field(
        8081,
        ge=0,
        le=65535,
        description="READER_PORT: port of /healthz, /readyz and /metrics; 0 "
        "picks a free port.",
    )
    ordering: Annotated[Ordering, _any_case(Ordering)] = Field(
        Ordering.PARTITION,
        description="READER_ORDERING: partition, key or unordered.",
    )
    max_in_flight: int = Field(
        1000,
        ge=1,
        description="READER_MAX_IN_FLIGHT: messages read but not yet finished "
        "before fetching pauses.",
    )
    concurrency: int = Field(
        16,
        ge=1,
        le=10_000,
        description="READER_CONCURRENCY: parallel requests to the app in key and "
        "unordered modes, at most 10000.",
    )
    batch_max_messages: int = Field(
        1,
        ge=1,
        description="READER_BATCH_MAX_MESSAGES: messages per request; above 1 the "
        "reader posts JSON arrays to <app>/batch.",
    )
    batch_max_bytes: int = Field(
        1_048_576,
        ge=1,
        description="READER_BATCH_MAX_BYTES: largest estimated size of one batch "
        "request, in bytes: each message counts its value, key and id, plus 120 "
        "bytes for its other fields. A message over the limit is sent in a batch "
        "of its own.",
    )
    batch_max_wait_ms: int = Field(
        10,
        ge=0,
        le=60_000,
        description="READER_BATCH_MAX_WAIT_MS: how long a batch waits to fill, "
        "in milliseconds. A stop, or the end of the input with "
        "READER_STOP_AT_END, sends a batch at once.",
    )
    request_timeout_ms: int = Field(
        30000,
        ge=1,
        description="READER_REQUEST_TIMEOUT_MS: timeout of one app request, in "
        "milliseconds.",
    )
    app_connection_max_age_ms: int = Field(
        30000,
        ge=0,
        description="READER_APP_CONNECTION_MAX_AGE_MS: how long the reader keeps "
        "using its keep-alive connections to the app, in milliseconds; then it "
        "opens new ones and closes the old ones once their requests finish. New "
        "connections reach app replicas added since, and the active slot after "
        "a blue/green switch. 0 keeps connections open as long as they work.",
    )
    retry_max_attempts: int = Field(
        8,
        ge=1,
        description="READER_RETRY_MAX_ATTEMPTS: requests per message before it is "
        "dead-lettered. Requests that find no app, 429, 502, 503 and 504 "
        "responses while the app's readiness check fails, 429 and 503 responses "
        "with Retry-After, 3xx, 401, 403, 404 and 405 responses to a whole "
        "request, and batch requests the app rejects as a whole with a 4xx "
        "other than 408 and 429 do not count.",
    )
    retry_initial_backoff_ms: int = Field(
        100,
        ge=1,
        le=MAX_BACKOFF_MS,
        description="READER_RETRY_INITIAL_BACKOFF_MS: longest delay before the "
        "first retry, in milliseconds; it doubles per attempt. Each delay is drawn "
        "at random between half that bound and the bound (jitter).",
    )
    retry_max_backoff_ms: int = Field(
        10000,
        ge=1,
        le=MAX_BACKOFF_MS,
        description="READER_RETRY_MAX_BACKOFF_MS: upper bound of the doubling "
        "delay between retries, in milliseconds; at least "
        "READER_RETRY_INITIAL_BACKOFF_MS. The app's Retry-After can ask for a "
        "longer wait, up to 60 s, and a setup error (3xx, 401, 403, 404, 405) is "
        "retried every READER_RETRY_MAX_BACKOFF_MS.",
    )
    stop_at_end: Flag = Field(
        False,
        description="READER_STOP_AT_END: exit once a file source is read to the "
        "end and every message is finished. Otherwise the reader follows the file "
        "as 'tail -f' does.",
    )
    max_line_bytes: int = Field(
        16_777_216,
        ge=1,
        le=1_073_741_824,
        description="READER_MAX_LINE_BYTES: longest line a file source reads, in "
        "bytes, not counting its line break; a longer line is dead-lettered "
        "without its value instead of being held in memory. At most 1 GiB.",
    )
    checkpoint_path: OptionalPath = Field(
        None,
        description="READER_CHECKPOINT_PATH: file that stores the committed byte "
        "offset of a file source, so a restart resumes there.",
    )
    rotate_wait_ms: int = Field(
        5000,
        ge=0,
        le=3_600_000,
        description="READER_ROTATE_WAIT_MS: how long a followed input file that "
        "another file replaced at its path (log rotation) is still read, in "
        "milliseconds, for the lines that its writer adds before it reopens the "
        "path; then the reader moves to the new file. 0 moves at once.",
    )
    transform: str = Field(
        "",
        description="READER_TRANSFORM: 'module:function', a plain (not async) "
        "function of one argument, applied to each envelope before the app; "
        "returning None drops the message.",
    )

    @field_validator("app_ready_path")
    @classmethod
    def _ready_path_is_absolute(cls, value: str) -> str:
        if "://" in value:
            path = urllib.parse.urlsplit(value).path or "/"
            raise ValueError(
                "give the path alone, relative to READER_APP_URL, as in "
                f"{path!r}, not a URL"
            )
        if value and not value.startswith("/"):
            raise ValueError(f"the path must start with '/', as in '/{value}'")
        return value

    @model_validator(mode="after")
    def _check_credentials(self) -> ReaderSettings:
        check_single_credential(
            "READER_APP_URL",
            str(self.app_url),
            "READER_APP_TOKEN",
            self.app_token.get_secret_value(),
        )
        return self

    @model_validator(mode="after")
    def _check_backoff(self) -> ReaderSettings:
        if self.retry_max_backoff_ms < self.retry_initial_backoff_ms:
            raise ValueError(
                f"READER_RETRY_MAX_BACKOFF_MS={self.retry_max_backoff_ms} must be "
                "at least READER_RETRY_INITIAL_BACKOFF_MS="
                f"{self.retry_initial_backoff_ms}, because it bounds the "
                "doubling delay that starts there; raise "
                "READER_RETRY_MAX_BACKOFF_MS or lower "
                "READER_RETRY_INITIAL_BACKOFF_MS"
            )
        return self

    @model_validator(mode="after")
    def _check_topics(self) -> ReaderSettings:
        if self.source is Transport.FILE:
            check_file_path("READER_INPUT", self.input)
            check_file_path("READER_DEAD_LETTER", self.dead_letter)
        if self.checkpoint_path is not None:
            check_file_path("READER_CHECKPOINT_PATH", str(self.checkpoint_path))
        if self.source is Transport.KAFKA and not self.topics():
            raise ValueError(
                f"READER_INPUT={self.input!r} names no topic; set it to one or more "
                "comma-separated topic names"
            )
        if self.source is Transport.KAFKA:
            seen: set[str] = set()
            for topic in self.topics():
                check_kafka_topic("READER_INPUT", topic)
                if topic in seen:
                    # librdkafka rejects the subscription with "Invalid argument".
                    raise ValueError(
                        f"READER_INPUT={self.input!r} names topic {topic!r} twice; "
                        "name each topic once"
                    )
                seen.add(topic)
            variable = "READER_DEAD_LETTER"
            if not self.dead_letter:
                variable = (
                    "READER_DEAD_LETTER, unset, so the default dead-letter topic "
                    "(the first READER_INPUT topic and '.dlq'),"
                )
            check_kafka_topic(variable, self.dead_letter_target())
        if self.source is Transport.EVENTHUBS and len(self.topics()) != 1:
            raise ValueError(
                f"READER_INPUT={self.input!r} must name exactly one event hub; run "
                "one reader per hub"
            )
        self._check_dead_letter_is_not_input()
        return self

    def ignored_settings(self) -> list[str]:
        """Return the variables set that only a file source reads, if it is another."""
        if self.source is Transport.FILE:
            return []
        return [
            f"READER_{name.upper()}"
            for name in _FILE_SOURCE_FIELDS
            if name in self.model_fields_set
        ]

    def _check_dead_letter_is_not_input(self) -> None:
        dead_letter = self.dead_letter_target()
        if self.source is Transport.FILE:
            files = {"READER_INPUT": self.input, "READER_DEAD_LETTER": dead_letter}
            if self.checkpoint_path is not None:
                files["READER_CHECKPOINT_PATH"] = str(self.checkpoint_path)
            seen: dict[Path, str] = {}
            for variable, name in files.items():
                if name == "-":
                    continue
                path = Path(name).expanduser().resolve()
                if path in seen:
                    raise ValueError(
                        f"{seen[path]} and {variable} name the same file "
                        f"{name!r}; give each its own file"
                    )
                seen[path] = variable
        elif dead_letter in self.topics():
            raise ValueError(
                f"READER_DEAD_LETTER={dead_letter!r} is also in READER_INPUT, so "
                "dead letters would be read again as input; choose another "
                "dead-letter topic"
            )

    def topics(self) -> list[str]:
        """Return the input topics (kafka source)."""
        return [topic.strip() for topic in self.input.split(",") if topic.strip()]

    def dead_letter_target(self) -> str:
        """Return the dead-letter topic or file, applying the default."""
        if self.dead_letter:
            return self.dead_letter
        if self.source in (Transport.KAFKA, Transport.EVENTHUBS):
            return f"{self.topics()[0]}.dlq"
        if self.input == "-":
            return "dead-letter.jsonl"
        return f"{self.input}.dlq.jsonl"


class WriterSettings(_ServiceSettings):
    """Settings of the output writer (prefix ``WRITER_``)."""

    model_config = SettingsConfigDict(env_prefix="WRITER_", **_FROZEN)  # type: ignore[typeddict-item]

    sink: Annotated[Transport, _any_case(Transport)] = Field(
        Transport.FILE, description="WRITER_SINK: kafka, eventhubs or file."
    )
    output: str = Field(
        ...,
        min_length=1,
        description="WRITER_OUTPUT: topic (kafka), event hub (eventhubs) or JSON "
        "Lines file path, '-' for stdout (file).",
    )
    port: int = Field(
        8082,
        ge=0,
        le=65535,
        description="WRITER_PORT: port of POST /, POST /batch, /healthz, /readyz "
        "and /metrics; 0 picks a free port.",
    )
    token: BearerToken = Field(
        SecretStr(""),
        description="WRITER_TOKEN: bearer token required on POST / and /batch, if "
        "set; surrounding whitespace is removed.",
    )
    max_body_bytes: int = Field(
        1_048_576,
        ge=1,
        description="WRITER_MAX_BODY_BYTES: largest request body accepted, in "
        "bytes; larger requests get 413.",
    )
    fsync: Flag = Field(
        True,
        description="WRITER_FSYNC: fsync the output file before acknowledging "
        "(file sink).",
    )
    tap: str = Field(
        "",
        description="WRITER_TAP: 'module:function' called with the envelopes of "
        "each request once they are durable.",
    )

    @model_validator(mode="after")
    def _check_topic(self) -> WriterSettings:
        if self.sink is Transport.KAFKA:
            check_kafka_topic("WRITER_OUTPUT", self.output)
        if self.sink is Transport.FILE:
            check_file_path("WRITER_OUTPUT", self.output)
        return self


def load_settings(cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """Read `cls` from the environment, raising `ConfigurationError` on a bad value.

    Keyword overrides (for example from command-line flags) win over the
    environment.
    """
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(describe_validation_error(cls, exc)) from None
    except SettingsError as exc:
        raise ConfigurationError(_describe_settings_error(cls, exc)) from None


#: Characters changed, added or removed by a typo, a swap of two counting as two.
#: A broker's own variable such as KAFKA_LISTENERS is further from every setting.
_TYPO_EDITS = 2


def _edits(name: str, known: str) -> int:
    """Return how many characters differ between `name` and `known`, roughly."""
    opcodes = difflib.SequenceMatcher(None, name, known).get_opcodes()
    return sum(
        max(end - start, known_end - known_start)
        for tag, start, end, known_start, known_end in opcodes
        if tag != "equal"
    )


def misspelled_variables(
    cls: type[BaseSettings], environ: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """Return (set variable, known variable) pairs for likely misspellings.

    pydantic-settings ignores a variable with the prefix of `cls` that names no
    setting. When its name is close to a setting's, such as ``READER_PROT`` to
    ``READER_PORT``, the user most likely meant that setting.
    Variables far from every setting (``APP_ENV`` of some other tool) are not
    reported.
    """
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    if not prefix:
        return []
    known = [f"{prefix}{field}".upper() for field in cls.model_fields]
    aliases = {
        alias.upper()
        for info in cls.model_fields.values()
        for alias in _aliases(info.validation_alias)
    }
    # With a nested delimiter, APP_INNER__LIMIT sets the field limit of inner.
    delimiter = str(cls.model_config.get("env_nested_delimiter") or "").upper()
    nested = tuple(f"{name}{delimiter}" for name in known) if delimiter else ()
    pairs = []
    for name in sorted(os.environ if environ is None else environ):
        upper = name.upper()
        if not upper.startswith(prefix) or upper in known or upper in aliases:
            continue
        if nested and upper.startswith(nested):
            continue
        match = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        if match and _edits(upper, match[0]) <= _TYPO_EDITS:
            pairs.append((name, match[0]))
    return pairs


_warned: set[type[BaseSettings]] = set()


def warn_misspelled_variables(cls: type[BaseSettings]) -> None:
    """Log a warning, once per settings class, for each likely misspelling."""
    if cls in _warned:
        return
    _warned.add(cls)
    for name, known in misspelled_variables(cls):
        logger.warning(
            "%s is not a setting and is ignored; did you mean %s?", name, known
        )


def describe_validation_error(cls: type[BaseSettings], exc: ValidationError) -> str:
    """Return one line per invalid field, naming its environment variable."""
    lines = [_error_heading(cls)]
    # A misspelled variable leaves the one it meant unset or at its default.
    meant: dict[str, list[str]] = {}
    for name, known in misspelled_variables(cls):
        meant.setdefault(known, []).append(name)
    for error in exc.errors():
        location = [str(part) for part in error["loc"]]
        field = _field_of(cls, location[0]) if location else ""
        name = _variable_name(cls, location) if field else "settings"
        if error["type"] == "missing":
            line = f"  {name} is missing: set it{_described(cls, field)}"
            if name in meant:
                unknown = meant.pop(name)
                verb = "is" if len(unknown) == 1 else "are"
                line += f"; {' and '.join(unknown)} {verb} set, did you mean {name}?"
            lines.append(line)
        elif field:
            lines.append(f"  {_invalid_value(cls, field, name, error)}")
        else:
            lines.append(f"  {error['msg'].removeprefix('Value error, ')}")
    for known, unknown in meant.items():
        for variable in unknown:
            lines.append(
                f"  {variable} is not a setting and is ignored; did you mean {known}?"
            )
    return "\n".join(lines)


def invalid_variables(
    cls: type[BaseSettings], ignored: Collection[str] = ()
) -> list[str]:
    """Return a line for each set variable of `cls` whose value is invalid.

    A command that sets some variables of its services itself can check the
    user's other variables before it starts any service. A missing setting, a
    variable in `ignored` and an error between settings are left to the
    service, which gets the whole environment.
    """
    try:
        cls()
    except ValidationError as exc:
        errors = exc.errors()
    except SettingsError as exc:
        return [_describe_settings_error(cls, exc).partition("\n  ")[2]]
    else:
        return []
    set_names = {variable.upper() for variable in os.environ}
    skipped = {variable.upper() for variable in ignored}
    lines = []
    for error in errors:
        location = [str(part) for part in error["loc"]]
        if error["type"] == "missing" or not location:
            continue
        field = _field_of(cls, location[0])
        name = _variable_name(cls, location)
        if name not in set_names or name in skipped:
            continue
        lines.append(_invalid_value(cls, field, name, error))
    return lines


def _invalid_value(cls: type[BaseSettings], field: str, name: str, error: Any) -> str:
    """Return the line of a field error: the variable, its value and the fix."""
    displayed = "<secret>" if _is_secret(cls, field) else error.get("input")
    if isinstance(displayed, str) and "@" in displayed:
        displayed = redact_url(displayed)
    return (
        f"{name}={displayed!r} is invalid: "
        f"{error['msg'].removeprefix('Value error, ')}"
        f"{_TYPE_HINTS.get(error['type'], '')}"
        f"{_described(cls, field)}"
    )


def _variable_name(cls: type[BaseSettings], location: list[str]) -> str:
    """Return the environment variable of an error's location, in upper case.

    A field with a validation alias is read from the alias without the
    prefix, and pydantic names the alias in the location. With
    `env_nested_delimiter`, a nested value may come from a variable of its
    own, such as ``APP_INNER__LIMIT``: that one is named when it is set.
    """
    key = location[0]
    info = cls.model_fields.get(_field_of(cls, key))
    names = _aliases(info.validation_alias) if info is not None else []
    if not names:
        names = [f"{cls.model_config.get('env_prefix', '')}{key}"]
    set_names = {variable.upper() for variable in os.environ}
    # Of several aliases, the first one that is set is the one read.
    name = next((n for n in names if n.upper() in set_names), names[0]).upper()
    delimiter = cls.model_config.get("env_nested_delimiter")
    if delimiter and len(location) > 1:
        nested = delimiter.join([name, *location[1:]]).upper()
        if nested in set_names:
            return nested
    return name


def _field_of(cls: type[BaseSettings], key: str) -> str:
    """Return the field that `key` names, itself or by one of the field's aliases."""
    if key in cls.model_fields:
        return key
    for field, info in cls.model_fields.items():
        if key in _aliases(info.validation_alias):
            return field
    return key


def _aliases(alias: object) -> list[str]:
    """Return the variable names of a field's validation alias, if any."""
    if isinstance(alias, str):
        return [alias]
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)]
    return []


def _error_heading(cls: type[BaseSettings]) -> str:
    prefix = str(cls.model_config.get("env_prefix", ""))
    return f"invalid {prefix}* settings:" if prefix else "invalid settings:"


#: The fix for errors whose pydantic messages do not name one, by error type.
_URL_HINT = "; write the whole URL with its scheme, like http://127.0.0.1:8000/"
_TYPE_HINTS = {
    "url_parsing": _URL_HINT,
    "url_scheme": _URL_HINT,
    "bool_parsing": "; use true or false",
}


def _describe_settings_error(cls: type[BaseSettings], exc: SettingsError) -> str:
    # pydantic-settings raises SettingsError, not ValidationError, when a JSON
    # variable such as KAFKA_EXTRA_CONFIG does not parse. The value is left out
    # because such JSON may contain passwords.
    match = _SETTINGS_ERROR_FIELD.search(str(exc))
    field = match.group(1) if match else ""
    prefix = str(cls.model_config.get("env_prefix", ""))
    name = f"{prefix}{field}".upper() if field else "a setting"
    cause = exc.__cause__
    problem = "cannot be read"
    if isinstance(cause, json.JSONDecodeError):
        problem = "is not valid JSON"
    return f"{_error_heading(cls)}\n  {name} {problem}: {cause}{_described(cls, field)}"


def _is_secret(cls: type[BaseSettings], field: str) -> bool:
    """Return whether a field's value must not appear in error messages.

    KAFKA_EXTRA_CONFIG counts as secret because it may carry ``sasl.password``.
    """
    info = cls.model_fields.get(field)
    return field == "extra_config" or (
        info is not None and info.annotation is SecretStr
    )


def _described(cls: type[BaseSettings], field: str) -> str:
    """Return the field's description in brackets after a space, or ''.

    The fields of an app's own settings often have no description.
    """
    info = cls.model_fields.get(field)
    description = info.description if info else None
    return f" ({description})" if description else ""
