"""Kafka sink: an idempotent producer with acks=all, awaited per record."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope
from agogosml.errors import SinkError
from agogosml.transports.base import Sink
from agogosml.transports.kafka.health import BrokerHealth, client_logger

logger = logging.getLogger(__name__)


class KafkaSink(Sink):
    """Produce envelopes to one topic; `send` returns once the broker acknowledged.

    A background thread polls the producer for delivery reports, which resolve
    one asyncio future per record. Records are never flushed one by one: the
    producer batches them (``linger.ms``) while callers await their futures.
    """

    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        self._settings = settings
        self._topic = topic
        self._producer: Producer | None = None
        self._poller: threading.Thread | None = None
        self._running = False
        self._health = BrokerHealth("producer", settings.resolved_bootstrap_servers())

    @property
    def connected(self) -> bool:
        """Whether the producer runs and has a broker connection."""
        return self._producer is not None and self._health.up

    async def start(self) -> None:
        """Create the producer and start polling for delivery reports."""
        config = self._settings.client_config()
        config.update(
            {
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": self._settings.linger_ms,
                "delivery.timeout.ms": self._settings.delivery_timeout_ms,
                **self._health.config(),
            }
        )
        config.update(self._settings.extra_config)
        try:
            self._producer = Producer(config, logger=client_logger())
        except KafkaException as exc:
            raise SinkError(
                f"cannot create Kafka producer: {exc.args[0].str()}; check the "
                "KAFKA_ settings, KAFKA_EXTRA_CONFIG included",
                retriable=False,
            ) from exc
        self._running = True
        self._poller = threading.Thread(
            target=self._poll, name="kafka-producer-poll", daemon=True
        )
        self._poller.start()
        logger.info("kafka sink started", extra={"topic": self._topic})

    def _poll(self) -> None:
        while self._running and self._producer is not None:
            self._producer.poll(0.1)

    async def stop(self) -> None:
        """Flush outstanding records, then stop the polling thread."""
        if self._producer is None:
            return
        remaining = await asyncio.to_thread(self._producer.flush, 30)
        self._running = False
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join)
        if remaining:
            logger.error("%d records were not delivered before shutdown", remaining)
        self._producer = None
        logger.info("kafka sink stopped", extra={"topic": self._topic})

    async def send(self, envelopes: Sequence[Envelope]) -> None:
        """Produce every envelope and wait for all acknowledgements."""
        if self._producer is None:
            raise SinkError("Kafka sink is not started", retriable=True)
        loop = asyncio.get_running_loop()
        futures = []
        for envelope in envelopes:
            future: asyncio.Future[None] = loop.create_future()
            await self._produce(envelope, _resolver(loop, future))
            futures.append(future)
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            raise SinkError(
                f"{len(errors)} of {len(envelopes)} records were not acknowledged "
                f"by topic {self._topic!r}: {errors[0]}",
                retriable=all(getattr(e, "retriable", True) for e in errors),
            )

    async def _produce(self, envelope: Envelope, callback: Any) -> None:
        assert self._producer is not None
        while True:
            try:
                self._producer.produce(
                    self._topic,
                    value=envelope.value,
                    key=envelope.key,
                    headers=envelope.record_headers(),  # type: ignore[arg-type]
                    on_delivery=callback,
                )
                return
            except BufferError:
                # The local queue is full: wait for deliveries to drain it.
                await asyncio.sleep(0.005)
            except KafkaException as exc:
                raise SinkError(
                    f"producing to topic {self._topic!r} failed: {exc}",
                    retriable=exc.args[0].retriable(),
                ) from exc


def _resolver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> Any:
    def on_delivery(error: KafkaError | None, message: Message) -> None:
        loop.call_soon_threadsafe(_settle, future, error)

    return on_delivery


def _settle(future: asyncio.Future[None], error: KafkaError | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        exc = SinkError(f"delivery failed: {error}", retriable=error.retriable())
        future.set_exception(exc)
