"""Build sources and sinks from service settings."""

from __future__ import annotations

from agogosml.config import KafkaSettings, ReaderSettings, Transport, load_settings
from agogosml.transports.base import Sink, Source


def build_source(settings: ReaderSettings) -> Source:
    """Return the input source named by READER_SOURCE."""
    if settings.source is Transport.KAFKA:
        from agogosml.transports.kafka import KafkaSource

        return KafkaSource(
            load_settings(KafkaSettings),
            settings.topics(),
            revoke_timeout_seconds=settings.shutdown_timeout_ms / 1000,
        )
    from agogosml.transports.file import FileSource

    return FileSource(
        settings.input,
        checkpoint_path=settings.checkpoint_path,
        follow=not settings.stop_at_end,
    )


def build_sink(transport: Transport, target: str, *, fsync: bool = True) -> Sink:
    """Return a sink writing to a Kafka topic or a JSON Lines file."""
    if transport is Transport.KAFKA:
        from agogosml.transports.kafka import KafkaSink

        return KafkaSink(load_settings(KafkaSettings), target)
    from agogosml.transports.file import FileSink

    return FileSink(target, fsync=fsync)
