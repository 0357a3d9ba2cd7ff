"""The ``max.message.bytes`` of a topic, read with DescribeConfigs (best effort)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from agogosml.transports.kafka.health import client_logger

logger = logging.getLogger(__name__)

#: How often a known limit is read again: librdkafka's default interval of topic
#: metadata refreshes (``topic.metadata.refresh.interval.ms``).
REFRESH_INTERVAL_SECONDS = 300.0
#: Delay before the first retry of a failed read; it doubles per failure, up to
#: `REFRESH_INTERVAL_SECONDS`.
RETRY_INITIAL_SECONDS = 5.0
#: Reads that `TopicSizeLimit.refresh` starts are at least this far apart, so a
#: burst of records that are too large sends one DescribeConfigs request.
MIN_READ_INTERVAL_SECONDS = 10.0
#: Timeout of one DescribeConfigs request.
READ_TIMEOUT_SECONDS = 10.0
#: Maximum time that `TopicSizeLimit.refresh` waits for a read.
REFRESH_WAIT_SECONDS = 5.0

_AUTHORIZATION_ERRORS = frozenset(
    {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED}
)


class TopicSizeLimit:
    """Read and refresh a topic's ``max.message.bytes`` in the background.

    `value` is None until a read succeeds. A read fails with a Kafka error or
    a timeout when the broker is down, the principal may not use
    DescribeConfigs, or the service does not support it. Such a failure is
    logged once and retried with backoff, and `value` keeps its last value.
    `on_change` is called on the event loop with each new value. `variable`
    names the setting that names the topic, for the warning about a missing one.

    NOTE: checked against Apache Kafka 4.1 only. Whether the Kafka endpoint of
    Azure Event Hubs supports DescribeConfigs for an event hub is not tested.
    If it does not, `value` stays None.
    """

    def __init__(
        self,
        config: dict[str, Any],
        topic: str,
        on_change: Callable[[int], None],
        *,
        variable: str = "WRITER_OUTPUT",
    ) -> None:
        self._config = config
        self._topic = topic
        self._variable = variable
        self._resource = ConfigResource(ResourceType.TOPIC, topic)
        self._on_change = on_change
        self.value: int | None = None
        #: Whether the last read found that the topic does not exist.
        self.missing = False
        self._failures = 0
        self._read_finished_at = float("-inf")
        self._read: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start reading the limit now and again every `REFRESH_INTERVAL_SECONDS`."""
        self._refresher = asyncio.create_task(self._refresh_periodically())

    async def stop(self) -> None:
        """Cancel the refresh task and any read in progress."""
        tasks = [task for task in (self._refresher, self._read) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._refresher = self._read = None

    async def refresh(self, max_age_seconds: float | None = None) -> None:
        """Read the limit again unless a read finished within `max_age_seconds`.

        The age defaults to `MIN_READ_INTERVAL_SECONDS`. Joins a read in
        progress, and returns after `REFRESH_WAIT_SECONDS` at the latest,
        keeping the last value when the read has not finished.
        """
        if max_age_seconds is None:
            max_age_seconds = MIN_READ_INTERVAL_SECONDS
        read = self._read
        if read is None or read.done():
            age = asyncio.get_running_loop().time() - self._read_finished_at
            if age < max_age_seconds:
                return
            read = self._read = asyncio.create_task(self._read_limit())
        try:
            await asyncio.wait_for(asyncio.shield(read), REFRESH_WAIT_SECONDS)
        except TimeoutError:
            logger.debug(
                "reading max.message.bytes of topic %r did not finish in %.0f s; "
                "the last value stays in use",
                self._topic,
                REFRESH_WAIT_SECONDS,
            )
        except asyncio.CancelledError:
            # `stop` cancels the read; a caller that joined it goes on with the
            # last value unless the caller itself is being cancelled.
            current = asyncio.current_task()
            if not read.cancelled() or (current is not None and current.cancelling()):
                raise

    async def _refresh_periodically(self) -> None:
        while True:
            await self.refresh(max_age_seconds=0)
            await asyncio.sleep(self._next_read_delay())

    def _next_read_delay(self) -> float:
        if self._failures == 0:
            return REFRESH_INTERVAL_SECONDS
        backoff = RETRY_INITIAL_SECONDS * 2 ** (self._failures - 1)
        return min(backoff, REFRESH_INTERVAL_SECONDS)

    async def _read_limit(self) -> None:
        """Read the limit once, store it and report a change; log a failure."""
        try:
            limit = await self._describe()
        except (KafkaException, KeyError, ValueError, TimeoutError) as exc:
            self._failures += 1
            error = exc.args[0] if isinstance(exc, KafkaException) else None
            self.missing = (
                isinstance(error, KafkaError)
                and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
            )
            self._log_failure(exc)
            return
        finally:
            self._read_finished_at = asyncio.get_running_loop().time()
        self._failures = 0
        self.missing = False
        if limit != self.value:
            logger.info(
                "kafka topic %r accepts record batches of up to %d bytes "
                "(max.message.bytes)",
                self._topic,
                limit,
            )
            self.value = limit
            self._on_change(limit)

    async def _describe(self) -> int:
        """Return the topic's max.message.bytes from a DescribeConfigs request.

        Each read uses a new admin client, so no idle connection stays open
        between reads and the client's log lines are served right after it.
        """
        admin = AdminClient(self._config, logger=client_logger())
        try:
            futures = admin.describe_configs(
                [self._resource], request_timeout=READ_TIMEOUT_SECONDS
            )
            entries = await asyncio.wait_for(
                asyncio.wrap_future(futures[self._resource]),
                READ_TIMEOUT_SECONDS + 1,
            )
        finally:
            admin.poll(0)
        return int(entries["max.message.bytes"].value)

    def _log_failure(self, exc: Exception) -> None:
        error = exc.args[0] if isinstance(exc, KafkaException) else None
        reason = error.str() if isinstance(error, KafkaError) else repr(exc)
        if self._failures > 1:
            logger.debug(
                "reading max.message.bytes of topic %r failed again: %s",
                self._topic,
                reason,
            )
            return
        if self.missing:
            logger.warning(
                "kafka topic %r does not exist: records to it wait until the "
                "broker creates it, if it creates topics on first use "
                "(auto.create.topics.enable), and then fail after "
                "KAFKA_DELIVERY_TIMEOUT_MS; create the topic, or check %s",
                self._topic,
                self._variable,
            )
            return
        hint = ""
        if isinstance(error, KafkaError) and error.code() in _AUTHORIZATION_ERRORS:
            hint = (
                " Allow the DescribeConfigs operation on the topic for the Kafka "
                "principal of this service."
            )
        logger.warning(
            "cannot read max.message.bytes of kafka topic %r (%s); records are "
            "checked against the producer's message.max.bytes only, and a record "
            "that the broker rejects as too large is reported as retriable.%s "
            "Retrying in the background",
            self._topic,
            reason,
            hint,
        )
