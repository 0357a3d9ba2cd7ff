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

#: librdkafka's default ``message.max.bytes``.
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
#: Per-record framing, in bytes, that librdkafka adds to value, key and headers
#: before it compares a record with ``message.max.bytes``
#: (``RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`` in librdkafka 2.16).
RECORD_OVERHEAD_BYTES = 36
#: Maximum time `KafkaSink.stop` waits for outstanding deliveries.
FLUSH_TIMEOUT_SECONDS = 30.0
#: Length of one blocking flush call while stopping.
FLUSH_STEP_SECONDS = 0.1


class KafkaSink(Sink):
    """Produce envelopes to one topic; `send` returns once the broker acknowledged.

    A background thread polls the producer for delivery reports, and the last
    report of a `send` resolves its asyncio future. Records are never flushed one
    by one: the producer batches them (``linger.ms``) while callers wait.
    """

    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        self._settings = settings
        self._topic = topic
        self._producer: Producer | None = None
        self._message_max_bytes = DEFAULT_MESSAGE_MAX_BYTES
        self._poller: threading.Thread | None = None
        self._running = False
        self._health = BrokerHealth("producer", settings.resolved_bootstrap_servers())

    @property
    def failure(self) -> str | None:
        """The fatal client error, after which only a restart helps, or None."""
        return self._health.describe_down() if self._health.fatal else None

    @property
    def connected(self) -> bool:
        """Whether the producer runs and has a broker connection."""
        return self._producer is not None and self._health.up

    @property
    def unavailable_reason(self) -> str:
        """Why the sink is not connected: not started, or the broker connection."""
        if self._producer is None:
            return "the Kafka sink is not started"
        return self._health.describe_down()

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
        # librdkafka accepted the value, so it is an integer.
        self._message_max_bytes = int(
            config.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES)
        )
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
        """Flush outstanding records for up to 30 s, then stop the polling thread.

        The flush runs in steps of `FLUSH_STEP_SECONDS`, so a caller that
        cancels `stop` at its own shutdown deadline does not leave a thread
        flushing behind, which would delay the exit of the process.
        """
        if self._producer is None:
            return
        remaining = await self._flush(FLUSH_TIMEOUT_SECONDS)
        self._running = False
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join)
        if remaining:
            logger.error("%d records were not delivered before shutdown", remaining)
        self._producer = None
        logger.info("kafka sink stopped", extra={"topic": self._topic})

    async def _flush(self, timeout_seconds: float) -> int:
        """Flush the producer; return how many records are still undelivered."""
        assert self._producer is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        while True:
            step = min(FLUSH_STEP_SECONDS, max(deadline - loop.time(), 0))
            remaining = await asyncio.to_thread(self._producer.flush, step)
            if remaining == 0 or loop.time() >= deadline:
                return int(remaining)

    async def send(self, envelopes: Sequence[Envelope]) -> None:
        """Produce every envelope and wait for all acknowledgements.

        Raises:
            SinkError: when a record is over ``message.max.bytes`` (before any
                record is produced, not retriable), or when a record was not
                acknowledged.
        """
        if self._producer is None:
            raise SinkError("Kafka sink is not started", retriable=True)
        sized = self._check_sizes(envelopes)
        report = _DeliveryReport(asyncio.get_running_loop(), len(envelopes))
        produced = 0
        try:
            for envelope, headers in sized:
                while not self._produce(envelope, headers, report.on_delivery):
                    # The local queue is full: wait for deliveries to drain it.
                    await asyncio.sleep(0.005)
                produced += 1
        except SinkError:
            # Records produced before the error still get delivery reports;
            # wait for them, so none resolves after the caller gave up.
            report.expect(produced)
            await report.done
            raise
        await report.done
        if report.errors:
            error = report.errors[0]
            raise SinkError(
                f"{len(report.errors)} of {len(envelopes)} records were not "
                f"acknowledged by topic {self._topic!r}: delivery failed: {error}",
                retriable=all(is_retriable(e) for e in report.errors),
            )

    def _check_sizes(
        self, envelopes: Sequence[Envelope]
    ) -> list[tuple[Envelope, list[tuple[str, bytes]]]]:
        """Return each envelope with its record headers, or raise for an oversized one.

        Checking before the first produce call keeps a request all-or-nothing:
        otherwise the records before the oversized one would be written, and
        written again when the request is retried.
        """
        sized = []
        for envelope in envelopes:
            headers = envelope.record_headers()
            size = _record_size(envelope, headers)
            if size > self._message_max_bytes:
                raise SinkError(
                    f"record {envelope.id!r} is {size} bytes with key, headers and "
                    f"framing, over the producer limit message.max.bytes="
                    f"{self._message_max_bytes}; no record of this request was "
                    "written. Send a smaller value, or raise message.max.bytes in "
                    "KAFKA_EXTRA_CONFIG together with the topic's max.message.bytes",
                    retriable=False,
                )
            sized.append((envelope, headers))
        return sized

    def _produce(
        self, envelope: Envelope, headers: list[tuple[str, bytes]], callback: Any
    ) -> bool:
        """Hand one record to the producer; return False when its queue is full."""
        assert self._producer is not None
        try:
            self._producer.produce(
                self._topic,
                value=envelope.value,
                key=envelope.key,
                headers=headers,  # type: ignore[arg-type]
                on_delivery=callback,
            )
        except BufferError:
            return False
        except KafkaException as exc:
            raise SinkError(
                f"producing record {envelope.id!r} to topic {self._topic!r} "
                f"failed: {exc}",
                retriable=is_retriable(exc.args[0]),
            ) from exc
        return True


def record_size(envelope: Envelope) -> int:
    """Return the size librdkafka compares with ``message.max.bytes``, in bytes."""
    return _record_size(envelope, envelope.record_headers())


def _record_size(envelope: Envelope, headers: list[tuple[str, bytes]]) -> int:
    size = RECORD_OVERHEAD_BYTES + len(envelope.value) + len(envelope.key or b"")
    for name, value in headers:
        # Header names are mostly ASCII, whose UTF-8 length is their length.
        name_length = len(name) if name.isascii() else len(name.encode())
        value_length = len(value or b"")
        size += _varint_size(name_length) + name_length
        size += _varint_size(value_length) + value_length
    return size


def _varint_size(number: int) -> int:
    """Return the bytes of `number` as a Kafka zigzag varint (non-negative only)."""
    zigzag = number << 1
    if zigzag < 0x80:
        return 1
    size = 1
    while zigzag >= 0x80:
        zigzag >>= 7
        size += 1
    return size


class _DeliveryReport:
    """Count the delivery reports of one request; `done` resolves after the last.

    librdkafka calls `on_delivery` on whichever thread polls the producer (the
    polling thread, or a flush at shutdown), so the count is kept under a lock
    and the event loop is woken once per request, not once per record.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, expected: int) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._expected = expected
        self._reported = 0
        self.errors: list[KafkaError] = []
        self.done: asyncio.Future[None] = loop.create_future()
        if expected == 0:
            self.done.set_result(None)

    def on_delivery(self, error: KafkaError | None, _message: Message) -> None:
        with self._lock:
            if error is not None:
                self.errors.append(error)
            self._reported += 1
            finished = self._reported == self._expected
        if finished:
            self._loop.call_soon_threadsafe(_resolve, self.done)

    def expect(self, expected: int) -> None:
        """Lower the count to the records actually produced (call on the loop)."""
        with self._lock:
            self._expected = expected
            finished = self._reported >= expected
        if finished:
            _resolve(self.done)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


#: Errors that the same record will meet again on every attempt. Everything else
#: (timeouts, unavailable leaders, missing replicas, a broker outage) may pass.
_PERMANENT_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError._INVALID_ARG,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,
    }
)


def is_retriable(error: KafkaError) -> bool:
    """Return whether producing the same record again may succeed.

    KafkaError.retriable() cannot be used here: confluent-kafka builds the errors
    of delivery reports and produce() from a bare code, which leaves that flag
    false (confluent-kafka 2.16).
    """
    return not error.fatal() and error.code() not in _PERMANENT_ERRORS
