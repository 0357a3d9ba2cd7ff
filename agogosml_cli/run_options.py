"""Options of ``agogosml run`` that choose the broker and the topics.

Three modes stream through a broker instead of files: ``--kafka`` (any Kafka
broker, with optional TLS and SASL), ``--eventhubs-kafka`` (the Kafka
endpoint of an Azure Event Hubs namespace) and ``--eventhubs`` (native Event
Hubs). Secrets are read from the environment only, never from a flag.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from agogosml.config import SaslMechanism, SecurityProtocol
from agogosml_cli.run import TopicNames

if TYPE_CHECKING:
    from agogosml.config import EventHubSettings, KafkaSettings

FunctionT = TypeVar("FunctionT", bound=Callable[..., Any])

EVENTHUBS_KAFKA_PORT = 9093
EVENTHUBS_DOMAIN = "servicebus.windows.net"

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
        help="Event Hubs consumer group of the reader and of the run's own "
        "receivers. Default: EVENTHUB_CONSUMER_GROUP, else $Default.",
    ),
    click.option(
        "--eventhubs-checkpoint-container",
        metavar="NAME",
        help="Blob container of the reader's checkpoints, created if missing. "
        "Default: agogosml-run-<run id>, new for each run.",
    ),
    click.option(
        "--input-topic",
        metavar="NAME",
        help="Input topic or event hub. Default with Kafka: a new topic per run.",
    ),
    click.option(
        "--output-topic",
        metavar="NAME",
        help="Output topic or event hub. Default with Kafka: a new topic per run.",
    ),
    click.option(
        "--dead-letter-topic",
        metavar="NAME",
        help="Dead-letter topic or event hub. Default: '<input>.dlq'.",
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


def eventhubs_kafka_address(namespace: str) -> str:
    """Return host:port of a namespace's Kafka endpoint.

    A bare name gets the ``servicebus.windows.net`` domain, and an address
    without a port gets port 9093.
    """
    host = namespace if "." in namespace else f"{namespace}.{EVENTHUBS_DOMAIN}"
    if ":" in host:
        return host
    return f"{host}:{EVENTHUBS_KAFKA_PORT}"


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
