"""Kafka sink: an idempotent producer with acks=all, awaited per record."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope, RecordHeaders
from agogosml.errors import ConfigurationError, SinkError
from agogosml.transports.base import Sink
from agogosml.transports.kafka.health import (
    BrokerHealth,
    authentication_hint,
    client_logger,
)
from agogosml.transports.kafka.records import (
    RECORD_BATCH_OVERHEAD_BYTES,
    Headers,
    record_batch_size,
    record_size,
)
from agogosml.transports.kafka.topic_limit import TopicSizeLimit

logger = logging.getLogger(__name__)

#: The producer's ``message.max.bytes`` unless KAFKA_EXTRA_CONFIG sets it, the
#: default ``max.message.bytes`` of an Apache Kafka topic. librdkafka's own
#: 1,000,000 would reject results that fit the writer's 1 MiB body limit.
DEFAULT_MESSAGE_MAX_BYTES = 1_048_588
#: librdkafka's default ``batch.size``.
DEFAULT_BATCH_SIZE = 1_000_000
#: Maximum time `KafkaSink.stop` waits for outstanding deliveries.
FLUSH_TIMEOUT_SECONDS = 30.0
#: Length of one blocking flush call while stopping.
FLUSH_STEP_SECONDS = 0.1


class KafkaSink(Sink):
    """Produce envelopes to one topic; `send` returns once the broker acknowledged.

    A background thread polls the producer for delivery reports, and the last
    report of a `send` resolves its asyncio future. Records are never flushed one
    by one: the producer batches them (``linger.ms``) while callers wait.

    The broker rejects a whole record batch over the topic's
    ``max.message.bytes``, so the sink reads that limit in the background
    (`TopicSizeLimit`). Once it is known, the sink rejects a record over the
    limit before producing it, and replaces the producer with one whose
    ``batch.size`` fits the limit, so that records which fit are not batched
    beyond it.
    """

    def __init__(
        self, settings: KafkaSettings, topic: str, *, variable: str = "WRITER_OUTPUT"
    ) -> None:
        self._settings = settings
        self._topic = topic
        self._config: dict[str, Any] = {}
        self._producer: Producer | None = None
        # Replaced producers, polled until every record they hold is reported
        # and no `send` produces to them any more. The lock also guards the
        # count of `send` calls producing to each producer.
        self._retired: list[Producer] = []
        self._producing: collections.Counter[Producer] = collections.Counter()
        self._retired_lock = threading.Lock()
        self._message_max_bytes = DEFAULT_MESSAGE_MAX_BYTES
        self._batch_size = DEFAULT_BATCH_SIZE
        self._compresses = False
        self._poller: threading.Thread | None = None
        self._running = False
        self._health = BrokerHealth(
            "producer",
            settings.resolved_bootstrap_servers(),
            authentication_hint=authentication_hint(settings),
        )
        self._topic_limit = TopicSizeLimit(
            settings.client_config(),
            topic,
            self._apply_topic_limit,
            variable=variable,
        )

    @property
    def topic_max_message_bytes(self) -> int | None:
        """The topic's ``max.message.bytes``, or None while it is unknown."""
        return self._topic_limit.value

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
        """Create the producer, start polling it and start reading the topic limit.

        Raises:
            ConfigurationError: when librdkafka rejects the producer
                configuration.
        """
        config = self._settings.client_config()
        config.update(
            {
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": self._settings.linger_ms,
                "delivery.timeout.ms": self._settings.delivery_timeout_ms,
                "message.max.bytes": DEFAULT_MESSAGE_MAX_BYTES,
                **self._health.config(),
            }
        )
        config.update(self._settings.extra_config)
        self._producer = _create_producer(config)
        self._config = config
        # KafkaSettings stores both properties as integers.
        self._message_max_bytes = int(
            config.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES)
        )
        self._batch_size = int(config.get("batch.size", DEFAULT_BATCH_SIZE))
        self._compresses = _compresses(config)
        self._running = True
        self._poller = threading.Thread(
            target=self._poll, name="kafka-producer-poll", daemon=True
        )
        self._poller.start()
        self._topic_limit.start()
        logger.info("kafka sink started", extra={"topic": self._topic})

    def _apply_topic_limit(self, limit: int) -> None:
        """Replace the producer when its ``batch.size`` no longer fits `limit`.

        A record batch that is larger than the topic's limit fails with every
        record in it, so batches must not grow beyond the limit.
        """
        configured = int(self._config.get("batch.size", DEFAULT_BATCH_SIZE))
        batch_size = max(limit, 1) if limit < configured else configured
        if self._producer is None or batch_size == self._batch_size:
            return
        try:
            producer = _create_producer({**self._config, "batch.size": batch_size})
        except ConfigurationError as exc:
            logger.error(
                "cannot replace the kafka producer for topic %r with one of "
                "batch.size=%d: %s",
                self._topic,
                batch_size,
                exc,
            )
            return
        with self._retired_lock:
            self._retired.append(self._producer)
            self._producer = producer
        self._batch_size = batch_size
        logger.info(
            "kafka producer replaced by one with batch.size=%d, to fit "
            "max.message.bytes=%d of topic %r",
            batch_size,
            limit,
            self._topic,
        )

    def _poll(self) -> None:
        while self._running:
            producer = self._producer
            if producer is None:
                return
            try:
                self._poll_retired()
                producer.poll(0.1)
            except Exception:
                # confluent-kafka raises what a callback raised from poll().
                # Without this thread no delivery report arrives, and every
                # send would wait for its acknowledgements for ever.
                logger.exception("a kafka producer callback failed")

    def _poll_retired(self) -> None:
        """Serve the delivery reports of replaced producers, and drop the idle ones."""
        with self._retired_lock:
            retired = list(self._retired)
        if not retired:
            return
        for producer in retired:
            producer.poll(0)
        with self._retired_lock:
            self._retired = [
                producer
                for producer in self._retired
                if len(producer) or self._producing[producer]
            ]

    def _producers(self) -> list[Producer]:
        with self._retired_lock:
            current = [] if self._producer is None else [self._producer]
            return current + self._retired

    async def stop(self) -> None:
        """Flush outstanding records for up to 30 s, then stop the polling thread.

        The flush runs in steps of `FLUSH_STEP_SECONDS`, so a caller that
        cancels `stop` at its own shutdown deadline does not leave a thread
        flushing behind, which would delay the exit of the process.
        """
        if self._producer is None:
            return
        await self._topic_limit.stop()
        remaining = await self._flush(FLUSH_TIMEOUT_SECONDS)
        self._running = False
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join)
        if remaining:
            logger.error("%d records were not delivered before shutdown", remaining)
        with self._retired_lock:
            self._producer = None
            self._retired = []
        logger.info("kafka sink stopped", extra={"topic": self._topic})

    async def _flush(self, timeout_seconds: float) -> int:
        """Flush every producer; return how many records are still undelivered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        while True:
            step = min(FLUSH_STEP_SECONDS, max(deadline - loop.time(), 0))
            remaining = 0
            for producer in self._producers():
                remaining += await asyncio.to_thread(producer.flush, step)
            if remaining == 0 or loop.time() >= deadline:
                return remaining

    async def send(self, envelopes: Sequence[Envelope]) -> None:
        """Produce every envelope and wait for all acknowledgements.

        Raises:
            SinkError: when a record is over ``message.max.bytes`` or over the
                topic's ``max.message.bytes`` (before any record is produced,
                not retriable), or when a record was not acknowledged.
        """
        if self._producer is None:
            raise SinkError("Kafka sink is not started", retriable=True)
        sized = await self._check_sizes(envelopes)
        # Taken after the size check, which may replace the producer.
        producer = self._producer
        if producer is None:
            raise SinkError("Kafka sink is not started", retriable=True)
        report = _DeliveryReport(asyncio.get_running_loop(), len(envelopes))
        try:
            await self._produce_all(producer, sized, report)
        except SinkError:
            # Records produced before the error still get delivery reports;
            # wait for them, so none resolves after the caller gave up.
            await report.done
            raise
        await report.done
        if report.errors:
            raise await self._delivery_error(report.errors, sized)
        if envelopes:
            # An acknowledgement shows a broker up before the next statistics.
            self._health.confirm_connected()

    async def _produce_all(
        self,
        producer: Producer,
        sized: list[tuple[Envelope, RecordHeaders]],
        report: _DeliveryReport,
    ) -> None:
        """Produce the records in order, counting the call as producing to `producer`.

        The count keeps the polling thread from dropping `producer` while this
        call waits for room in its queue, even if the producer was replaced.
        """
        with self._retired_lock:
            self._producing[producer] += 1
        produced = 0
        try:
            for envelope, headers in sized:
                while not self._produce(producer, envelope, headers, report):
                    # The local queue is full: wait for deliveries to drain it.
                    # NOTE: this wait has no limit. A request that outlasts its
                    # client's timeout still produces its records afterwards,
                    # so the client's retry can write them a second time.
                    await asyncio.sleep(0.005)
                produced += 1
        except SinkError:
            report.expect(produced)
            raise
        finally:
            with self._retired_lock:
                self._producing[producer] -= 1
                if not self._producing[producer]:
                    del self._producing[producer]

    async def _check_sizes(
        self, envelopes: Sequence[Envelope]
    ) -> list[tuple[Envelope, RecordHeaders]]:
        """Return each envelope with its record headers, or raise for oversized ones.

        Checking before the first produce call keeps a request all-or-nothing:
        otherwise the records before an oversized one would be written, and
        written again when the request is retried. Before it rejects a record
        for the topic's limit, the sink reads that limit again, in case it was
        raised (at most once per `MIN_READ_INTERVAL_SECONDS`).
        """
        sized = [(envelope, envelope.record_headers()) for envelope in envelopes]
        too_large = self._find_too_large(sized)
        if too_large and self._topic_limit.value is not None:
            await self._topic_limit.refresh()
            too_large = self._find_too_large(sized)
        if too_large:
            envelope, problem = too_large[0]
            raise SinkError(
                f"{len(too_large)} of {len(envelopes)} records are too large, so no "
                f"record of this request was written. Record {envelope.id!r} is "
                f"{problem}",
                retriable=False,
                failures={envelope.id: problem for envelope, problem in too_large},
                too_large=bool(too_large),
            )
        return sized

    def _find_too_large(
        self, sized: list[tuple[Envelope, RecordHeaders]]
    ) -> list[tuple[Envelope, str]]:
        too_large = []
        for envelope, headers in sized:
            problem = self._size_problem(envelope, headers)
            if problem:
                too_large.append((envelope, problem))
        return too_large

    def _size_problem(self, envelope: Envelope, headers: Headers) -> str:
        """Return why a record exceeds a known limit, or "" when it fits them."""
        size = record_size(envelope.value, envelope.key, headers)
        if size > self._message_max_bytes:
            return (
                f"{size} bytes with key, headers and framing, over the producer "
                f"limit message.max.bytes={self._message_max_bytes}. Send a smaller "
                "value, or raise message.max.bytes in KAFKA_EXTRA_CONFIG together "
                "with the topic's max.message.bytes"
            )
        limit = self._topic_limit.value
        # NOTE: the broker compares compressed batches with the topic's limit,
        # so with compression the sink cannot tell whether a record fits, and
        # leaves the decision to the broker.
        if limit is None or self._compresses:
            return ""
        # A record batch of one record is at most the batch header larger than
        # librdkafka's upper bound of the record's size.
        if size + RECORD_BATCH_OVERHEAD_BYTES <= limit:
            return ""
        batch_size = record_batch_size(envelope.value, envelope.key, headers)
        if batch_size <= limit:
            return ""
        return (
            f"{batch_size} bytes as a record batch of its own, over "
            f"max.message.bytes={limit} of topic {self._topic!r}. Send a smaller "
            "value, or raise max.message.bytes of the topic"
        )

    def _produce(
        self,
        producer: Producer,
        envelope: Envelope,
        headers: RecordHeaders,
        report: _DeliveryReport,
    ) -> bool:
        """Hand one record to the producer; return False when its queue is full."""
        try:
            producer.produce(
                self._topic,
                value=None if envelope.null_value else envelope.value,
                key=envelope.key,
                headers=headers,  # type: ignore[arg-type]
                on_delivery=report.on_delivery,
            )
        except BufferError:
            return False
        except KafkaException as exc:
            raise SinkError(
                f"producing record {envelope.id!r} to topic {self._topic!r} "
                f"failed: {exc}{self._error_hint([exc.args[0]])}",
                retriable=is_retriable(exc.args[0]),
            ) from exc
        return True

    def _error_hint(self, errors: list[KafkaError]) -> str:
        """Return the fix of an error that the settings cause, or ""."""
        if any(e.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED for e in errors):
            return (
                f". The Kafka principal of this service may not write to topic "
                f"{self._topic!r}: grant it the Write and Describe operations on "
                "the topic"
            )
        timed_out = any(e.code() == KafkaError._MSG_TIMED_OUT for e in errors)
        if timed_out and self._health.settings_error:
            # The records waited for a connection that the settings prevent.
            return f". The producer cannot connect: {self._health.settings_error}"
        if self._topic_limit.missing:
            return (
                f". Topic {self._topic!r} does not exist, and the broker did not "
                "create it: create the topic, or check the setting that names it"
            )
        return ""

    async def _delivery_error(
        self,
        errors: list[KafkaError],
        sized: list[tuple[Envelope, RecordHeaders]],
    ) -> SinkError:
        """Return the error for failed deliveries, retriable unless all would fail.

        The broker fails a whole record batch with MSG_SIZE_TOO_LARGE when the
        batch is over the topic's limit, and the batch may hold records of other
        requests. So that error is permanent only when a record of this request
        is over the limit alone. The limit is read again before deciding,
        because it may have been lowered. INVALID_RECORD fails a whole batch
        too, so it is retriable for the same reason.
        """
        size_error = any(e.code() == KafkaError.MSG_SIZE_TOO_LARGE for e in errors)
        invalid_error = any(e.code() == KafkaError.INVALID_RECORD for e in errors)
        too_large: list[tuple[Envelope, str]] = []
        if size_error:
            await self._topic_limit.refresh()
            too_large = self._find_too_large(sized)
        text = (
            f"{len(errors)} of {len(sized)} records were not acknowledged by topic "
            f"{self._topic!r}: delivery failed: {errors[0]}"
        )
        text += self._error_hint(errors)
        if too_large:
            envelope, problem = too_large[0]
            text += f". Record {envelope.id!r} is {problem}"
        elif size_error:
            text += (
                ". The broker rejects a record batch over the topic's "
                "max.message.bytes, and records of other requests may have made "
                "the batch too large, so retry. A record that fails this way on "
                "every retry is too large for the topic"
            )
        if invalid_error:
            text += (
                ". The broker rejects a whole record batch that holds one invalid "
                "record, such as a record without a key on a compacted topic, and "
                "records of other requests may share the batch, so retry. A record "
                "that fails this way on every retry is invalid for the topic"
            )
        retriable = not too_large and all(
            error.code() in _BATCH_ERRORS or is_retriable(error) for error in errors
        )
        return SinkError(
            text,
            retriable=retriable,
            failures={envelope.id: problem for envelope, problem in too_large},
            too_large=bool(too_large),
            size_rejected=size_error and not too_large,
            batch_rejected=invalid_error and not too_large,
        )


def _create_producer(config: dict[str, Any]) -> Producer:
    try:
        return Producer(config, logger=client_logger())
    except KafkaException as exc:
        raise ConfigurationError(
            f"cannot create Kafka producer: {exc.args[0].str()}; check the "
            "KAFKA_ settings, KAFKA_EXTRA_CONFIG included"
        ) from exc


def _compresses(config: dict[str, Any]) -> bool:
    """Return whether a producer with `config` compresses its record batches."""
    codecs = (
        str(config.get(name, "none")).lower()
        for name in ("compression.type", "compression.codec")
    )
    return any(codec not in ("none", "inherit") for codec in codecs)


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
#: MSG_SIZE_TOO_LARGE and INVALID_RECORD in a delivery report are judged in
#: `KafkaSink._delivery_error` instead, because they fail a whole batch.
#: TOPIC_AUTHORIZATION_FAILED is not here: once an operator grants the missing
#: permission, every record passes, so valid records wait for that instead of
#: going to the dead letters.
_PERMANENT_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError._INVALID_ARG,
        KafkaError.TOPIC_EXCEPTION,
    }
)


#: Errors with which the broker fails a whole record batch, which may hold
#: records of other `send` calls, for one record of it.
_BATCH_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD})


def is_retriable(error: KafkaError) -> bool:
    """Return whether producing the same record again may succeed.

    KafkaError.retriable() cannot be used here: confluent-kafka builds the errors
    of delivery reports and produce() from a bare code, which leaves that flag
    false (confluent-kafka 2.16).
    """
    return not error.fatal() and error.code() not in _PERMANENT_ERRORS
