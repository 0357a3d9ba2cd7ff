"""Build sources and sinks from service settings."""

from __future__ import annotations

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

    return FileSink(target, fsync=fsync, variable=variable)


def _require_eventhubs_extra() -> None:
    """Raise ConfigurationError with the fix unless the eventhubs extra is installed."""
    try:
        require_eventhubs_extra()
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
