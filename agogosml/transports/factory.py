"""Build sources and sinks from service settings."""

from __future__ import annotations

import logging
import os

from agogosml.config import (
    EventHubSettings,
    KafkaSettings,
    ReaderSettings,
    SettingsT,
    Transport,
    load_settings,
    require_eventhubs_extra,
    warn_misspelled_variables,
)
from agogosml.errors import ConfigurationError
from agogosml.transports.base import Sink, Source

logger = logging.getLogger(__name__)

#: Variables that point at a broker, which a file source or sink does not read.
_BROKER_VARIABLES = (
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_EVENTHUBS_CONNECTION_STRING",
    "EVENTHUB_CONNECTION_STRING",
    "EVENTHUB_FULLY_QUALIFIED_NAMESPACE",
)


def _warn_default_file(setting: str) -> None:
    """Warn when `setting` defaults to file while a broker variable is set.

    Its default is file, so a service meant for Kafka that lacks it reads or
    writes a local file named like the topic, with only its log to tell.
    """
    set_names = {name.upper() for name in os.environ}
    if setting in set_names:
        return
    broker = next((name for name in _BROKER_VARIABLES if name in set_names), None)
    if broker is not None:
        logger.warning(
            "%s is not set, so it is file, and %s is not used: the service uses a "
            "local file; set %s=kafka or eventhubs to use the broker",
            setting,
            broker,
            setting,
        )


def _transport_settings(cls: type[SettingsT]) -> SettingsT:
    """Load KAFKA_ or EVENTHUB_ settings, warning about misspelled variables."""
    warn_misspelled_variables(cls)
    return load_settings(cls)


def build_source(settings: ReaderSettings) -> Source:
    """Return the input source named by READER_SOURCE."""
    if settings.source is Transport.KAFKA:
        from agogosml.transports.kafka import KafkaSource

        return KafkaSource(
            _transport_settings(KafkaSettings),
            settings.topics(),
            revoke_timeout_seconds=settings.shutdown_timeout_ms / 1000,
        )
    if settings.source is Transport.EVENTHUBS:
        _require_eventhubs_extra()
        from agogosml.transports.eventhubs import EventHubsSource

        return EventHubsSource(
            _transport_settings(EventHubSettings),
            settings.topics()[0],
            revoke_timeout_seconds=settings.shutdown_timeout_ms / 1000,
        )
    from agogosml.transports.file import FileSource

    _warn_default_file("READER_SOURCE")
    return FileSource(
        settings.input,
        checkpoint_path=settings.checkpoint_path,
        follow=not settings.stop_at_end,
        max_line_bytes=settings.max_line_bytes,
        rotate_wait_seconds=settings.rotate_wait_ms / 1000,
    )


def build_sink(
    transport: Transport,
    target: str,
    *,
    fsync: bool = True,
    variable: str = "WRITER_OUTPUT",
) -> Sink:
    """Return a sink writing to a Kafka topic, an event hub or a JSON Lines file.

    `variable` names the setting that `target` came from, for error messages.
    """
    if transport is Transport.KAFKA:
        from agogosml.transports.kafka import KafkaSink

        return KafkaSink(_transport_settings(KafkaSettings), target, variable=variable)
    if transport is Transport.EVENTHUBS:
        _require_eventhubs_extra()
        from agogosml.transports.eventhubs import EventHubsSink

        return EventHubsSink(
            _transport_settings(EventHubSettings), target, variable=variable
        )
    from agogosml.transports.file import FileSink

    if variable == "WRITER_OUTPUT":
        _warn_default_file("WRITER_SINK")
    return FileSink(target, fsync=fsync, variable=variable)


def _require_eventhubs_extra() -> None:
    """Raise ConfigurationError with the fix unless the eventhubs extra is installed."""
    try:
        require_eventhubs_extra()
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
