"""Options of ``agogosml run`` that choose the broker and the topics.

Three modes stream through a broker instead of files: ``--kafka`` (any Kafka
broker, with optional TLS and SASL), ``--eventhubs-kafka`` (the Kafka
endpoint of an Azure Event Hubs namespace) and ``--eventhubs`` (native Event
Hubs). Secrets are read from the environment only, never from a flag.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic_settings import EnvSettingsSource

from agogosml.config import (
    SaslMechanism,
    SecurityProtocol,
    check_bootstrap_servers,
    check_kafka_topic,
    split_host_port,
)
from agogosml_cli.run import TopicNames
from agogosml_cli.shared_endpoints import SHARED_EFFECTS

if TYPE_CHECKING:
    from agogosml.config import EventHubSettings, KafkaSettings

#: A legal event hub name: letters, digits, '.', '_' and '-', starting and
#: ending with a letter or digit.
_EVENT_HUB_NAME = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9._-]{0,254}[a-zA-Z0-9])?")

FunctionT = TypeVar("FunctionT", bound=Callable[..., Any])

EVENTHUBS_KAFKA_PORT = 9093
EVENTHUBS_DOMAIN = "servicebus.windows.net"


def eventhubs_kafka_address(namespace: str) -> str:
    """Return host:port of a namespace's Kafka endpoint.

    An address with a port (``HOST:PORT`` or ``[IPv6]:PORT``) is returned
    unchanged. A name without dots gets the ``servicebus.windows.net`` domain,
    and a host without a port gets port 9093.

    Raises:
        ValueError: when the host is empty, the port is not a number from 1 to
            65535, or an IPv6 address is not in brackets.
    """
    if not namespace.strip():
        raise ValueError(
            "the namespace is empty. Give a namespace name, a host name or HOST:PORT"
        )
    host, port = split_host_port(namespace)
    if not host or host == "[]":
        raise ValueError(
            "the host is empty. Give HOST:PORT, such as "
            f"scoring.{EVENTHUBS_DOMAIN}:{EVENTHUBS_KAFKA_PORT}"
        )
    if port is not None:
        return namespace
    if not host.startswith("[") and "." not in host:
        host = f"{host}.{EVENTHUBS_DOMAIN}"
    return f"{host}:{EVENTHUBS_KAFKA_PORT}"


def check_kafka_option(
    context: click.Context, parameter: click.Parameter, value: str | None
) -> str | None:
    """Reject an empty or malformed ``--kafka``; empty would otherwise mean files."""
    if value is None:
        return None
    if not value.strip():
        raise click.BadParameter(
            "the broker address is empty. Give HOST:PORT, or leave --kafka out "
            "to stream through files"
        )
    try:
        return check_bootstrap_servers(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_eventhubs_kafka_option(
    context: click.Context, parameter: click.Parameter, value: str | None
) -> str | None:
    if value is None:
        return None
    try:
        eventhubs_kafka_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _check_consumer_group_option(
    context: click.Context, parameter: click.Parameter, value: str | None
) -> str | None:
    if value is not None and not value:
        raise click.BadParameter(
            "the consumer group is empty. Give a consumer group of the hubs, "
            "such as $Default, or leave the option out"
        )
    return value


def _check_container_option(
    context: click.Context, parameter: click.Parameter, value: str | None
) -> str | None:
    from agogosml.config import check_blob_container_name

    if value is None:
        return None
    try:
        check_blob_container_name(value)
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r} is not a valid blob container name, because {exc}"
        ) from None
    return value


_OPTIONS = [
    click.option(
        "--kafka-security-protocol",
        type=click.Choice([protocol.value for protocol in SecurityProtocol]),
        help="Security protocol of --kafka. Default: KAFKA_SECURITY_PROTOCOL, "
        "else PLAINTEXT.",
    ),
    click.option(
        "--kafka-sasl-mechanism",
        type=click.Choice([mechanism.value for mechanism in SaslMechanism]),
        help="SASL mechanism of --kafka; the user name and password are read "
        "from KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD.",
    ),
    click.option(
        "--kafka-ca-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="PEM file of the CA that signed the broker certificates. Default: "
        "KAFKA_SSL_CA_LOCATION, else the system CA store.",
    ),
    click.option(
        "--eventhubs-kafka",
        metavar="NAMESPACE",
        callback=_check_eventhubs_kafka_option,
        help="Stream through the Kafka endpoint of this Event Hubs namespace "
        "(a name, a host name, or host:port) with SASL_SSL, PLAIN and the "
        "connection string in KAFKA_EVENTHUBS_CONNECTION_STRING.",
    ),
    click.option(
        "--eventhubs",
        is_flag=True,
        help="Stream through existing event hubs with the native transport; "
        "needs --input-topic, --output-topic, EVENTHUB_CONNECTION_STRING and "
        "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING.",
    ),
    click.option(
        "--eventhubs-consumer-group",
        metavar="GROUP",
        callback=_check_consumer_group_option,
        help="Event Hubs consumer group of the reader and of the run's own "
        "receivers. Default: EVENTHUB_CONSUMER_GROUP, else $Default.",
    ),
    click.option(
        "--eventhubs-checkpoint-container",
        metavar="NAME",
        callback=_check_container_option,
        help="Blob container of the reader's checkpoints, created if missing. "
        "Default: agogosml-run-<run id>, new for each run.",
    ),
    click.option(
        "--input-topic",
        metavar="NAME",
        help="Input topic or event hub. Default with Kafka: a new topic per run, "
        "deleted when the run ends.",
    ),
    click.option(
        "--output-topic",
        metavar="NAME",
        help="Output topic or event hub. Default with Kafka: a new topic per run, "
        "deleted when the run ends.",
    ),
    click.option(
        "--dead-letter-topic",
        metavar="NAME",
        help="Dead-letter topic or event hub. Default: '<input>.dlq'; with Kafka "
        "and no --input-topic, a new topic per run, deleted when the run ends.",
    ),
]


def stream_options(function: FunctionT) -> FunctionT:
    """Add the broker and topic options to a click command."""
    for option in reversed(_OPTIONS):
        function = option(function)
    return function


@dataclass(frozen=True)
class StreamOptions:
    """Values of the broker and topic options, as click passes them."""

    kafka: str | None = None
    kafka_security_protocol: str | None = None
    kafka_sasl_mechanism: str | None = None
    kafka_ca_file: Path | None = None
    eventhubs_kafka: str | None = None
    eventhubs: bool = False
    eventhubs_consumer_group: str | None = None
    eventhubs_checkpoint_container: str | None = None
    input_topic: str | None = None
    output_topic: str | None = None
    dead_letter_topic: str | None = None


@dataclass(frozen=True)
class StreamChoice:
    """The broker settings of a run; both None means files."""

    kafka: KafkaSettings | None = None
    eventhubs: EventHubSettings | None = None
    topics: TopicNames = TopicNames()


def resolve_stream(options: StreamOptions) -> StreamChoice:
    """Check the option combination and read the broker settings.

    Raises:
        click.UsageError: when options conflict, a required option or
            environment variable is missing, or a setting is invalid.
    """
    _check_combination(options)
    topics = TopicNames(
        input=options.input_topic,
        output=options.output_topic,
        dead_letter=options.dead_letter_topic,
    )
    if options.eventhubs:
        return StreamChoice(eventhubs=_eventhubs_settings(options), topics=topics)
    if options.kafka or options.eventhubs_kafka:
        return StreamChoice(kafka=_kafka_settings(options), topics=topics)
    return StreamChoice(topics=topics)


def _given(options: StreamOptions, *names: str) -> list[str]:
    return [
        "--" + name.replace("_", "-")
        for name in names
        if getattr(options, name) not in (None, False)
    ]


def _check_combination(options: StreamOptions) -> None:
    modes = _given(options, "kafka", "eventhubs_kafka", "eventhubs")
    if len(modes) > 1:
        raise click.UsageError(f"{' and '.join(modes)} exclude each other; use one")
    kafka_only = _given(
        options, "kafka_security_protocol", "kafka_sasl_mechanism", "kafka_ca_file"
    )
    if kafka_only and not _given(options, "kafka", "eventhubs_kafka"):
        raise click.UsageError(f"{kafka_only[0]} needs --kafka or --eventhubs-kafka")
    derived = _given(options, "kafka_security_protocol", "kafka_sasl_mechanism")
    if derived and options.eventhubs_kafka:
        raise click.UsageError(
            f"{derived[0]} does not apply to --eventhubs-kafka, which uses SASL_SSL "
            "with PLAIN; leave it out"
        )
    eventhubs_only = _given(
        options, "eventhubs_consumer_group", "eventhubs_checkpoint_container"
    )
    if eventhubs_only and not options.eventhubs:
        raise click.UsageError(f"{eventhubs_only[0]} needs --eventhubs")
    topics = _given(options, "input_topic", "output_topic", "dead_letter_topic")
    if topics and not modes:
        raise click.UsageError(
            f"{topics[0]} needs --kafka, --eventhubs-kafka or --eventhubs; a run "
            "without them streams through files"
        )
    if options.eventhubs and not (options.input_topic and options.output_topic):
        raise click.UsageError(
            "--eventhubs needs --input-topic and --output-topic: the names of "
            "existing event hubs, because a run cannot create hubs"
        )
    _check_topic_names(options)
    _check_distinct_topics(options)


def _check_topic_names(options: StreamOptions) -> None:
    """Reject a topic or event hub name that the broker or the service rejects.

    Event hub names allow the characters of Kafka topic names, up to 256 of
    them, and start and end with a letter or digit.
    """
    names = [
        (option, getattr(options, option.removeprefix("--").replace("-", "_")))
        for option in _given(
            options, "input_topic", "output_topic", "dead_letter_topic"
        )
    ]
    if options.input_topic and not options.dead_letter_topic:
        names.append(
            (
                "the default dead-letter topic '<--input-topic>.dlq' (choose another "
                "with --dead-letter-topic)",
                f"{options.input_topic}.dlq",
            )
        )
    for option, name in names:
        if not options.eventhubs:
            try:
                check_kafka_topic(option, name)
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None
        elif not _EVENT_HUB_NAME.fullmatch(name):
            raise click.UsageError(
                f"{option} names event hub {name!r}, which is not a legal event "
                "hub name: use 1 to 256 characters of a-z, A-Z, 0-9, '.', '_' and "
                "'-', starting and ending with a letter or digit"
            )


def _check_distinct_topics(options: StreamOptions) -> None:
    """Reject input, output and dead-letter topics (or event hubs) that coincide.

    A dead-letter topic left out defaults to '<input>.dlq', so the output
    topic must differ from that too.
    """
    dead_letter_option = "--dead-letter-topic"
    dead_letter = options.dead_letter_topic
    if dead_letter is None and options.input_topic is not None:
        dead_letter_option = "the default dead-letter topic '<--input-topic>.dlq'"
        dead_letter = f"{options.input_topic}.dlq"
    topics = [
        ("input", "--input-topic", options.input_topic),
        ("output", "--output-topic", options.output_topic),
        ("dead-letter", dead_letter_option, dead_letter),
    ]
    for index, (role, option, name) in enumerate(topics):
        for other_role, other_option, other_name in topics[index + 1 :]:
            if name is not None and name == other_name:
                effect = SHARED_EFFECTS[role, other_role]
                raise click.UsageError(
                    f"{option} and {other_option} name the same topic {name!r}, "
                    f"so {effect}; give each its own topic"
                )


def _kafka_settings(options: StreamOptions) -> KafkaSettings:
    from agogosml.config import KafkaSettings, load_settings
    from agogosml.errors import ConfigurationError

    overrides: dict[str, Any] = {}
    if options.eventhubs_kafka:
        if not os.environ.get("KAFKA_EVENTHUBS_CONNECTION_STRING"):
            raise click.UsageError(
                "--eventhubs-kafka needs KAFKA_EVENTHUBS_CONNECTION_STRING in the "
                "environment: the namespace's connection string, which the clients "
                "send as the SASL password"
            )
        overrides["bootstrap_servers"] = eventhubs_kafka_address(
            options.eventhubs_kafka
        )
    else:
        overrides["bootstrap_servers"] = options.kafka
        _check_sasl_flags(options)
    if options.kafka_security_protocol:
        overrides["security_protocol"] = options.kafka_security_protocol
    if options.kafka_sasl_mechanism:
        overrides["sasl_mechanism"] = options.kafka_sasl_mechanism
    if options.kafka_ca_file:
        overrides["ssl_ca_location"] = options.kafka_ca_file.resolve()
    try:
        settings = load_settings(KafkaSettings, **overrides)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    _check_sasl_credentials(settings)
    return settings


def _check_sasl_flags(options: StreamOptions) -> None:
    """Reject a security protocol and SASL mechanism that do not fit together.

    `KafkaSettings` rejects the same combinations, but its messages name the
    environment variables. This check runs when at least one of the two values
    comes from a flag, so that the message names the flag.

    Raises:
        click.UsageError: naming each value's flag or variable, and the fix.
    """
    from agogosml.config import KafkaSettings

    if not (options.kafka_security_protocol or options.kafka_sasl_mechanism):
        return
    environment = EnvSettingsSource(KafkaSettings)()
    if environment.get("eventhubs_connection_string"):
        # The Event Hubs connection string sets SASL_SSL and PLAIN itself.
        return
    protocol, shown_protocol = _flag_or_variable(
        options.kafka_security_protocol,
        "--kafka-security-protocol",
        environment.get("security_protocol"),
        "KAFKA_SECURITY_PROTOCOL",
    )
    mechanism, shown_mechanism = _flag_or_variable(
        options.kafka_sasl_mechanism,
        "--kafka-sasl-mechanism",
        environment.get("sasl_mechanism"),
        "KAFKA_SASL_MECHANISM",
    )
    uses_sasl = str(protocol).upper() in _SASL_PROTOCOLS
    if mechanism and not uses_sasl:
        if not protocol:
            shown_protocol = "the default security protocol PLAINTEXT"
        fix = "pass --kafka-security-protocol SASL_SSL (SASL_PLAINTEXT for a broker "
        fix += "without TLS)"
        if not options.kafka_sasl_mechanism:
            fix += ", or unset KAFKA_SASL_MECHANISM"
        raise click.UsageError(
            f"{shown_mechanism} needs the security protocol SASL_SSL or "
            f"SASL_PLAINTEXT, not {shown_protocol}; {fix}"
        )
    if uses_sasl and not mechanism:
        raise click.UsageError(
            f"{shown_protocol} needs a SASL mechanism; pass --kafka-sasl-mechanism "
            "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, or set KAFKA_SASL_MECHANISM"
        )


_SASL_PROTOCOLS = frozenset(
    {SecurityProtocol.SASL_PLAINTEXT.value, SecurityProtocol.SASL_SSL.value}
)


def _flag_or_variable(
    flag_value: str | None, flag: str, variable_value: Any, variable: str
) -> tuple[str | None, str]:
    """Return a setting's value and how a message shows it.

    The flag wins over the environment variable, as in `KafkaSettings`, and
    is shown as "--flag VALUE", the variable as "VARIABLE=VALUE".
    """
    if flag_value:
        return flag_value, f"{flag} {flag_value}"
    if variable_value:
        return str(variable_value), f"{variable}={variable_value}"
    return None, ""


def _check_sasl_credentials(settings: KafkaSettings) -> None:
    if settings.sasl_mechanism is None:
        return
    if settings.eventhubs_connection_string.get_secret_value():
        return
    missing = [
        name
        for name in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD")
        if not os.environ.get(name)
    ]
    if missing:
        raise click.UsageError(
            f"SASL {settings.sasl_mechanism.value} needs {' and '.join(missing)} "
            "in the environment; they are read from there only, so that no secret "
            "appears on a command line"
        )


def _eventhubs_settings(options: StreamOptions) -> EventHubSettings:
    from agogosml.errors import ConfigurationError
    from agogosml_cli.eventhubs_run import load_run_settings

    try:
        return load_run_settings(
            options.eventhubs_consumer_group, options.eventhubs_checkpoint_container
        )
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
