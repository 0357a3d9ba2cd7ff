"""Kafka source on confluent-kafka, bridged to asyncio through one worker thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope, Position
from agogosml.errors import ConfigurationError, SourceError
from agogosml.metrics import COMMITS, CONSUMER_LAG, start_at_zero
from agogosml.transports.base import OffsetTracker, RevokeHandler, TrackedSource
from agogosml.transports.kafka.added_partitions import (
    added_partitions,
    commit_offset,
    sibling_partitions,
)
from agogosml.transports.kafka.health import (
    BrokerHealth,
    authentication_hint,
    client_logger,
)

logger = logging.getLogger(__name__)

#: How long the final commit at shutdown may wait for the broker. A synchronous
#: commit has no time limit: with the coordinator gone it waited for the whole
#: session timeout (45 s by default), past a pod's grace period.
FINAL_COMMIT_TIMEOUT_SECONDS = 5.0
#: How long a stop waits for the consumer to close once the final commit was
#: skipped or failed, before it leaves the close behind on a daemon thread. The
#: time is counted from the start of the final commit, so a commit that timed
#: out does not add its own wait to it.
ABANDONED_CLOSE_SECONDS = 5.0
#: The minimum time a close after a failed final commit gets, so that the consumer
#: can leave the group when the brokers respond again.
ABANDONED_CLOSE_MIN_SECONDS = 0.5
#: How often the consumer refreshes the metadata of its topics, which is how
#: it notices partitions added to them.
METADATA_REFRESH_MS = 30_000
#: How often the lag of paused partitions is read from the brokers, and how
#: long one read may take.
PAUSED_LAG_SECONDS = 5.0
PAUSED_LAG_TIMEOUT_SECONDS = 1.0
#: How long the consumer thread waits after it could not commit where a
#: partition starts, before it fetches that partition's messages again, or
#: tries again to commit where held partitions start.
START_COMMIT_RETRY_SECONDS = 0.5
#: Time limit of the lookups that find where newly assigned partitions
#: without a committed offset start, at assignment and at each retry.
START_LOOKUP_TIMEOUT_SECONDS = 5.0
#: How often a retry that still fails logs a warning while partitions are held.
START_HELD_WARNING_SECONDS = 60.0


class KafkaSource(TrackedSource):
    """Consume topics with a consumer group, committing only finished messages.

    Every call into the consumer runs on one dedicated thread, so rebalance
    callbacks run there too. On revocation the source waits (up to
    `revoke_timeout_seconds`) for the reader to finish in-flight messages of the
    revoked partitions, then commits their finished prefix synchronously.
    Periodic commits are asynchronous, so a broker that does not respond holds up
    neither fetching nor a stop, and the commit at shutdown waits at most
    `FINAL_COMMIT_TIMEOUT_SECONDS`.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topics: list[str],
        *,
        revoke_timeout_seconds: float = 10.0,
    ) -> None:
        self._settings = settings
        self._topics = topics
        self._revoke_timeout = revoke_timeout_seconds
        self._tracker = OffsetTracker(commit_first_offset=True)
        start_at_zero(COMMITS, ("ok",), ("error",))
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="kafka-consumer"
        )
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._revoke_handler: RevokeHandler | None = None
        self._paused = False
        self._committed: dict[tuple[str, int], int] = {}
        #: Generation of each partition whose start offset is committed, with
        #: ``auto.offset.reset=latest`` (see `_commit_starts`).
        self._started: dict[tuple[str, int], int] = {}
        #: Partitions held paused until their start is committed, by key.
        self._start_pending: dict[tuple[str, int], TopicPartition] = {}
        self._start_retry_at = 0.0
        self._start_warned_at = 0.0
        #: Offsets of asynchronous commits that the broker has not confirmed.
        self._committing: dict[tuple[str, int], int] = {}
        #: Set at shutdown when the final commit did not finish: close() then
        #: does not try again, which would wait without a time limit.
        self._skip_closing_commit = False
        #: Partitions of each input topic when the source started, with
        #: ``auto.offset.reset=latest``: see `_added_since_start`.
        self._partitions_at_start: dict[str, frozenset[int]] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._health = BrokerHealth(
            "consumer",
            settings.resolved_bootstrap_servers(),
            authentication_hint=authentication_hint(settings),
        )
        #: Input topics that the broker reported as unknown, until one of their
        #: partitions is assigned. Replaced whole, because the consumer thread
        #: writes it and the event loop reads it.
        self._missing_topics: frozenset[str] = frozenset()
        #: Why the source cannot go on, such as a failed rebalance callback;
        #: `fetch` then raises it.
        self._stop_error: str | None = None

    @property
    def failure(self) -> str | None:
        """The fatal client error, after which only a restart helps, or None."""
        return self._health.describe_down() if self._health.fatal else None

    @property
    def connected(self) -> bool:
        """Whether the consumer runs, has a broker connection and its topics exist."""
        return (
            self._consumer is not None and self._health.up and not self._missing_topics
        )

    @property
    def unavailable_reason(self) -> str:
        """Why the source is not connected: not started, the broker or a topic."""
        if self._consumer is None:
            return "the Kafka source is not started"
        if not self._health.up:
            return self._health.describe_down()
        missing = ", ".join(sorted(self._missing_topics))
        return (
            f"input topic {missing} not found on the brokers; check READER_INPUT, "
            "or create the topic"
        )

    def set_revoke_handler(self, handler: RevokeHandler) -> None:
        """Register the coroutine awaited before partitions are given up."""
        self._revoke_handler = handler

    async def start(self) -> None:
        """Create the consumer and subscribe to the topics."""
        self._loop = asyncio.get_running_loop()
        config = self._consumer_config()
        await self._call(self._create, config)
        self._commit_task = asyncio.create_task(self._commit_periodically())
        logger.info(
            "kafka source started",
            extra={"topics": self._topics, "group_id": self._settings.group_id},
        )

    def _create(self, config: dict[str, Any]) -> None:
        try:
            self._consumer = Consumer(config, logger=client_logger())
        except KafkaException as exc:
            raise ConfigurationError(
                f"cannot create Kafka consumer: {exc.args[0].str()}; check the "
                "KAFKA_ settings, KAFKA_EXTRA_CONFIG included"
            ) from exc
        self._consumer.subscribe(
            self._topics,
            on_assign=self._guard(self._on_assign),
            on_revoke=self._guard(self._on_revoke),
            on_lost=self._guard(self._on_lost),
        )
        if self._settings.auto_offset_reset == "latest":
            self._partitions_at_start = self._topic_partitions()

    def _topic_partitions(self) -> dict[str, frozenset[int]] | None:
        """Return the partitions of each input topic now, or None if unknown."""
        assert self._consumer is not None
        try:
            metadata = self._consumer.list_topics(
                timeout=START_LOOKUP_TIMEOUT_SECONDS
            ).topics
        except KafkaException as exc:
            logger.warning(
                "cannot list the partitions of the input topics at start: %s; "
                "partitions added to them later start at their end, like the "
                "others without a committed offset",
                exc.args[0].str(),
            )
            return None
        return {
            topic: frozenset(metadata[topic].partitions if topic in metadata else ())
            for topic in self._topics
        }

    def _consumer_config(self) -> dict[str, Any]:
        config = self._settings.client_config()
        config.update(
            {
                "group.id": self._settings.group_id,
                # The reader starts a partition without a committed offset at
                # its end itself (`_commit_ends`), so librdkafka's reset applies
                # only to a committed offset out of the log's range, as after
                # retention deleted it. Jumping to the end would then skip every
                # message still in the log.
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                # librdkafka's 5 minutes left partitions added to a topic
                # unread for that long. KAFKA_EXTRA_CONFIG may change it.
                "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
                "on_commit": self._on_commit,
                **self._health.config(
                    on_statistics=self._record_fetched_lag,
                    on_error=self._note_deleted_partition,
                ),
            }
        )
        config.update(self._settings.extra_config)
        return config

    def _note_deleted_partition(self, error: KafkaError) -> None:
        """Record an error that reports an assigned partition gone, for `fetch`.

        librdkafka keeps reading a partition of a deleted topic at its old
        position once the topic is created again, which skips the records of
        the new topic before that position. So the source stops instead: the
        broker deleted the group's offsets of the topic with it, and a restarted
        reader reads the new topic from KAFKA_AUTO_OFFSET_RESET.
        """
        if error.code() == KafkaError._UNKNOWN_PARTITION and self._stop_error is None:
            self._stop_error = (
                f"an assigned input partition no longer exists ({error.str()}): "
                "its topic was deleted. The reader stops, since a topic created "
                "again under the same name would be read from the old position; "
                "create the topic again if it should exist, and restart the reader"
            )

    async def stop(self) -> None:
        """Commit every finished message, then leave the group and close."""
        if self._commit_task is not None:
            self._commit_task.cancel()
            await asyncio.gather(self._commit_task, return_exceptions=True)
        if self._consumer is not None:
            close_deadline = time.monotonic() + ABANDONED_CLOSE_SECONDS
            try:
                await self._call(self._commit_final, FINAL_COMMIT_TIMEOUT_SECONDS)
            except BaseException:
                # A commit that failed in an unexpected way may still wait for
                # the brokers, so the close is bounded as after a failed commit.
                self._skip_closing_commit = True
                raise
            finally:
                await self._close(close_deadline)
                self._consumer = None
        self._thread.shutdown(wait=True)
        logger.info("kafka source stopped", extra={"topics": self._topics})

    async def _close(self, deadline: float) -> None:
        """Close the consumer, giving up at `deadline` when the brokers are gone.

        close() waits for every asynchronous commit that the brokers have not
        confirmed, up to the session timeout (45 s by default), which is past
        the shutdown timeout and a pod's grace period. When the final commit
        did not go through, nothing is committed anyway, so the close runs on
        a daemon thread that may be left behind at the exit. The stop waits
        for it until `deadline` (`time.monotonic`), and at least
        `ABANDONED_CLOSE_MIN_SECONDS`. A final commit that timed out because
        the brokers hang has then used up most of that time.
        """
        assert self._consumer is not None
        if not self._skip_closing_commit:
            await self._call(self._consumer.close)
            return
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[None] = loop.create_future()
        consumer = self._consumer

        def close() -> None:
            try:
                consumer.close()
            finally:
                # The loop is closed when the close returns after the exit began.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, closed)

        threading.Thread(target=close, name="kafka-consumer-close", daemon=True).start()
        wait_seconds = max(ABANDONED_CLOSE_MIN_SECONDS, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(closed), wait_seconds)
        except TimeoutError:
            logger.warning(
                "the kafka consumer did not close within %.1f s, because a commit "
                "waits for the unreachable brokers at %s; stopping without it",
                wait_seconds,
                self._settings.resolved_bootstrap_servers(),
            )

    async def fetch(self, max_messages: int, timeout_seconds: float) -> list[Envelope]:
        """Consume up to `max_messages` messages, serving rebalance callbacks."""
        messages = await self._call(self._consume, max_messages, timeout_seconds)
        envelopes = []
        for message, generation in messages:
            envelope = self._to_envelope(message, generation)
            if envelope is not None:
                envelopes.append(envelope)
        self._tracker.register_many(
            [envelope.position for envelope in envelopes]  # type: ignore[misc]
        )
        return envelopes

    def _consume(
        self, max_messages: int, timeout_seconds: float
    ) -> list[tuple[Any, int]]:
        """Wait up to `timeout_seconds` for one message, then take what is fetched.

        A single ``consume(max_messages, timeout)`` call waits until it has
        `max_messages` or the timeout passed, which delays every message of a
        quiet topic by up to the timeout. Each message comes with the generation
        of its partition right after the call that returned it: a rebalance
        served by the second call makes the first message stale, and the reader
        then releases it instead of sending it.
        """
        assert self._consumer is not None
        if self._start_pending and time.monotonic() >= self._start_retry_at:
            self._retry_starts()
        stamped = self._stamp(self._consumer.consume(1, timeout_seconds))
        if stamped and max_messages > 1:
            stamped.extend(self._stamp(self._consumer.consume(max_messages - 1, 0)))
        if self._stop_error is not None:
            raise SourceError(self._stop_error, retriable=False)
        if any(message.error() is None for message, _ in stamped):
            self._health.confirm_connected(buffered=True)
        if self._settings.auto_offset_reset == "latest":
            return self._commit_starts(stamped)
        return stamped

    def _commit_starts(self, stamped: list[tuple[Any, int]]) -> list[tuple[Any, int]]:
        """Commit where each newly assigned partition starts, before it is read on.

        A group without a committed offset that starts at the end of the log
        would otherwise, after a crash before its first commit, start at the
        end again and skip the messages it had read. The offset of a
        partition's first message is therefore committed synchronously, once
        per assignment, before that message is handed to the reader. When the
        commit fails, the partition is sought back to that message, whose batch
        then waits for the next fetch and another try.
        """
        assert self._consumer is not None
        starts: dict[tuple[str, int], TopicPartition] = {}
        generations: dict[tuple[str, int], int] = {}
        for message, generation in stamped:
            if generation == 0:
                continue
            key = (message.topic(), message.partition())
            if key in starts or self._started.get(key) == generation:
                continue
            # A partition revoked since this message was read belongs to
            # another member now, whose commits this one must not overwrite.
            if self._tracker.generation(*key) != generation:
                continue
            starts[key] = self._commit_offset(*key, message.offset())
            generations[key] = generation
        if not starts:
            return stamped
        offsets = list(starts.values())
        try:
            _commit_counted(self._consumer, offsets)
        except KafkaException as exc:
            sought_back = self._seek_back(offsets)
            # A partition that could not seek back sends its messages on. Its
            # start is then committed with the next periodic commit (the
            # tracker's first offset), never as a later fetch's first offset.
            for key in starts.keys() - sought_back:
                self._started[key] = generations[key]
            logger.warning(
                "cannot commit where partitions start, so their messages wait and "
                "are fetched again: %s",
                exc.args[0].str(),
                extra={"partitions": _describe(offsets)},
            )
            time.sleep(START_COMMIT_RETRY_SECONDS)
            return [
                (message, generation)
                for message, generation in stamped
                if generation == 0
                or (message.topic(), message.partition()) not in sought_back
            ]
        for key, tp in starts.items():
            self._committed[key] = tp.offset
        for message, generation in stamped:
            if generation:
                self._started[(message.topic(), message.partition())] = generation
        return stamped

    def _seek_back(self, offsets: list[TopicPartition]) -> set[tuple[str, int]]:
        """Seek each partition back to `offsets`; return those that were sought."""
        assert self._consumer is not None
        sought = set()
        for tp in offsets:
            try:
                self._consumer.seek(tp)
            except KafkaException as exc:
                logger.warning(
                    "cannot seek %s back: %s", _describe([tp])[0], exc.args[0].str()
                )
            else:
                sought.add((tp.topic, tp.partition))
        return sought

    def _stamp(self, messages: list[Any]) -> list[tuple[Any, int]]:
        """Pair each message with its partition's current generation.

        Errors get 0, and so do the messages of a partition that is not
        assigned now. A call that served the partition's revocation returns
        the messages it collected before, unless the partition's version
        barrier purged them first (``rd_kafka_q_serve_rkmessages`` in
        librdkafka 2.16). Generation 0 makes them stale, so they are neither
        sent nor committed.
        """
        generations: dict[tuple[str, int], int] = {}
        stamped = []
        for message in messages:
            if message.error() is not None:
                stamped.append((message, 0))
                continue
            key = (message.topic(), message.partition())
            generation = generations.get(key)
            if generation is None:
                assigned = self._tracker.assigned(*key)
                generation = self._tracker.generation(*key) if assigned else 0
                generations[key] = generation
            stamped.append((message, generation))
        return stamped

    def _to_envelope(self, message: Any, generation: int) -> Envelope | None:
        error = message.error()
        if error is not None:
            if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                topic = message.topic()
                if topic and topic not in self._missing_topics:
                    self._missing_topics = self._missing_topics | {topic}
                logger.error(
                    "input topic not found: %s; check READER_INPUT, or create the "
                    "topic",
                    error.str(),
                )
            elif error.code() != KafkaError._PARTITION_EOF:
                # Logged at most once per interval and error code, with the
                # setting to check, as the client's error callback is: a
                # failed group join repeats every few seconds.
                self._health.on_error(error)
            return None
        topic, partition, offset = (
            message.topic(),
            message.partition(),
            message.offset(),
        )
        # `fetch` registers the positions, all under one lock.
        position = Position(topic, partition, offset, offset + 1, generation)
        value = message.value()
        envelope = Envelope.from_record(
            value or b"", message.key(), message.headers(), position
        )
        if value is None:
            envelope.null_value = True
        return envelope

    async def pause(self) -> None:
        """Pause fetching from every assigned partition; polling goes on."""
        self._paused = True
        await self._call(self._set_paused, True)

    async def resume(self) -> None:
        """Resume fetching from every assigned partition."""
        self._paused = False
        await self._call(self._set_paused, False)

    def _set_paused(self, paused: bool) -> None:
        if self._consumer is None:
            return
        assignment = self._consumer.assignment()
        if not paused:
            assignment = [
                tp
                for tp in assignment
                if (tp.topic, tp.partition) not in self._start_pending
            ]
        if assignment:
            if paused:
                self._consumer.pause(assignment)
            else:
                self._consumer.resume(assignment)

    async def commit(self) -> None:
        """Commit the finished prefix of every partition now and wait for it."""
        await self._call(self._commit_sync, None)

    async def _commit_periodically(self) -> None:
        interval = self._settings.commit_interval_ms / 1000
        lag_checked = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                await self._call(self._commit_async)
            except KafkaException as exc:
                logger.warning("offset commit failed, will retry: %s", exc)
            except Exception:
                # The loop must outlive any failure: once it ends, nothing is
                # committed until the stop, and `stop` ignores how it ended.
                logger.exception("offset commit failed unexpectedly, will retry")
            if self._paused and time.monotonic() - lag_checked >= PAUSED_LAG_SECONDS:
                lag_checked = time.monotonic()
                try:
                    await self._call(self._record_paused_lag)
                except Exception:
                    logger.exception("reading the lag of paused partitions failed")

    def _record_fetched_lag(self, stats: dict[str, Any]) -> None:
        """Set the lag from librdkafka's statistics, unless fetching is paused.

        The statistics also list partitions that the consumer has metadata of
        but does not own, whose lag another member reports.
        """
        if not self._paused:
            _record_lag(stats, self._tracker.assigned)

    def _record_paused_lag(self) -> None:
        """Set the lag of paused partitions from the brokers' end offsets.

        librdkafka's statistics give the lag from the end offset of the last
        fetch, and a paused partition does not fetch, so its lag would stay
        where it was just when the lag matters: while the app is down.
        """
        if self._consumer is None:
            return
        for tp in self._consumer.assignment():
            committed = self._committed.get((tp.topic, tp.partition))
            if committed is None:
                continue
            try:
                _, high = self._consumer.get_watermark_offsets(
                    tp, timeout=PAUSED_LAG_TIMEOUT_SECONDS, cached=False
                )
            except KafkaException as exc:
                logger.debug("end offset of %s unknown: %s", _describe([tp])[0], exc)
                continue
            if high >= 0:
                CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                    max(0, high - committed)
                )

    def _uncommitted(self, only: set[tuple[str, int]] | None) -> list[TopicPartition]:
        """Return the finished prefixes that differ from the last confirmed commit."""
        return [
            self._commit_offset(topic, partition, offset)
            for (topic, partition), offset in self._tracker.committable().items()
            if self._committed.get((topic, partition)) != offset
            and (only is None or (topic, partition) in only)
        ]

    def _commit_async(self) -> None:
        """Commit the finished prefixes without waiting for the broker.

        `_on_commit` records the result, during a later consume call.
        """
        if self._consumer is None:
            return
        offsets = [
            tp
            for tp in self._uncommitted(None)
            if self._committing.get((tp.topic, tp.partition)) != tp.offset
        ]
        if offsets:
            self._send_commit(offsets)

    def _send_commit(self, offsets: list[TopicPartition]) -> None:
        """Send an asynchronous commit of `offsets`, marking them as in progress."""
        assert self._consumer is not None
        for tp in offsets:
            self._committing[(tp.topic, tp.partition)] = tp.offset
        try:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            for tp in offsets:
                self._committing.pop((tp.topic, tp.partition), None)
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                COMMITS.labels("error").inc(len(offsets))
            raise

    def _on_commit(self, error: KafkaError | None, partitions: list[Any]) -> None:
        """Record the partitions of an asynchronous commit that the broker confirmed."""
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if self._committing.get(key) != tp.offset:
                # NOTE: the result of a commit that a newer one of the same
                # partition overtook is not counted in agogosml_commits_total.
                continue  # an older commit, or a partition assigned again since
            del self._committing[key]
            if error is None and tp.error is None:
                self._committed[key] = tp.offset
                COMMITS.labels("ok").inc()
            elif error is None or error.code() != KafkaError._NO_OFFSET:
                COMMITS.labels("error").inc()
        if error is not None and error.code() != KafkaError._NO_OFFSET:
            logger.warning("offset commit failed, will retry: %s", error)

    def _commit_final(self, timeout_seconds: float) -> None:
        """Commit every finished prefix at shutdown, waiting at most `timeout_seconds`.

        The commit is asynchronous, and polling serves its result. A message
        that a poll returns now is past every message the reader took, so it
        is neither sent nor committed, and is read again after a restart.
        """
        assert self._consumer is not None
        offsets = self._uncommitted(None)
        if not offsets:
            return
        # Serves the callbacks that arrived since the last fetch, error reports
        # of a lost broker connection among them.
        self._consumer.poll(0)
        if not self._health.up:
            # close() would wait for a commit that no broker confirms.
            self._skip_closing_commit = True
            COMMITS.labels("error").inc(len(offsets))
            logger.error(
                "final offset commit skipped, because the brokers at %s are "
                "unreachable (%s); the messages finished since the last commit "
                "will be delivered again",
                self._settings.resolved_bootstrap_servers(),
                self._health.last_error or "no connection",
            )
            return
        try:
            self._send_commit(offsets)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                logger.error("final offset commit failed: %s", exc)
                self._skip_closing_commit = True
            return
        deadline = time.monotonic() + timeout_seconds
        keys = [(tp.topic, tp.partition) for tp in offsets]
        while any(key in self._committing for key in keys):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._skip_closing_commit = True
                unconfirmed = [key for key in keys if key in self._committing]
                COMMITS.labels("error").inc(len(unconfirmed))
                # close() may still serve their results, which must not be
                # counted a second time.
                for key in unconfirmed:
                    del self._committing[key]
                logger.error(
                    "final offset commit not confirmed by the brokers at %s within "
                    "%.1f s (last error: %s); the messages finished since the last "
                    "commit will be delivered again",
                    self._settings.resolved_bootstrap_servers(),
                    timeout_seconds,
                    self._health.last_error or "none",
                )
                return
            self._consumer.poll(min(remaining, 0.1))
        confirmed = all(
            self._committed.get(key) == tp.offset
            for key, tp in zip(keys, offsets, strict=True)
        )
        if not confirmed:
            self._skip_closing_commit = True
            logger.error(
                "final offset commit failed; the messages finished since the last "
                "commit will be delivered again"
            )

    def _commit_sync(self, only: set[tuple[str, int]] | None) -> None:
        if self._consumer is None:
            return
        offsets = self._uncommitted(only)
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError._NO_OFFSET:
                return
            COMMITS.labels("error").inc(len(offsets))
            raise
        COMMITS.labels("ok").inc(len(offsets))
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset
        logger.debug("committed offsets", extra={"offsets": _describe(offsets)})

    def _guard(
        self, callback: Callable[[Consumer, list[TopicPartition]], None]
    ) -> Callable[[Consumer, list[TopicPartition]], None]:
        """Return `callback` with its exceptions recorded for `fetch` to raise.

        confluent-kafka raises what a rebalance callback raised from the
        ``consume`` call that ran it, so the reader would end with a traceback
        instead of an error that names the failed rebalance.
        """

        def guarded(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            try:
                callback(consumer, partitions)
            except Exception as exc:  # noqa: BLE001 - any failure stops the source
                logger.exception(
                    "rebalance callback failed",
                    extra={"partitions": _describe(partitions)},
                )
                if isinstance(exc, KafkaException):
                    detail = exc.args[0].str()
                else:
                    detail = str(exc) or type(exc).__name__
                self._stop_error = (
                    f"a rebalance of consumer group {self._settings.group_id!r} "
                    f"failed: {detail}; the reader stops, and its uncommitted "
                    "messages are read again after a restart"
                )

        return guarded

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # An assignment comes from the group coordinator, so a broker is reachable.
        self._health.confirm_connected()
        self._missing_topics = self._missing_topics - {tp.topic for tp in partitions}
        starts: list[TopicPartition] | None = []
        if self._settings.auto_offset_reset == "latest" and partitions:
            starts = self._commit_ends(consumer, partitions)
        if starts is None:
            # Held paused until `_retry_starts` commits where they start.
            self._start_pending.update(
                {(tp.topic, tp.partition): tp for tp in partitions}
            )
            self._start_retry_at = time.monotonic() + START_COMMIT_RETRY_SECONDS
            self._start_warned_at = time.monotonic()
            starts = []
        for tp in partitions:
            self._tracker.assign(tp.topic, tp.partition)
            self._committed.pop((tp.topic, tp.partition), None)
            self._committing.pop((tp.topic, tp.partition), None)
        for tp in starts:
            key = (tp.topic, tp.partition)
            self._committed[key] = tp.offset
            self._started[key] = self._tracker.generation(*key)
        by_key = {(tp.topic, tp.partition): tp for tp in starts}
        consumer.assign([by_key.get((tp.topic, tp.partition), tp) for tp in partitions])
        # librdkafka 2.16 keeps a partition's pause across unassign and assign
        # (a test shows it), so a partition lost while paused comes back
        # paused. Its state is therefore set anew.
        waiting = [
            tp for tp in partitions if (tp.topic, tp.partition) in self._start_pending
        ]
        fetching = [
            tp
            for tp in partitions
            if (tp.topic, tp.partition) not in self._start_pending
        ]
        if self._paused or waiting:
            consumer.pause(partitions if self._paused else waiting)
        if fetching and not self._paused:
            consumer.resume(fetching)
        logger.info("partitions assigned", extra={"partitions": _describe(partitions)})

    def _retry_starts(self) -> None:
        """Commit where the held partitions start, then let them be fetched.

        They were assigned while the start lookup failed. Until their start is
        committed, none of their messages goes out, so a reader that stops
        meanwhile leaves nothing behind that the next one would skip. A
        partition without a committed offset starts at its end at this time,
        which the seek makes the fetch position too.
        """
        assert self._consumer is not None
        waiting = list(self._start_pending.values())
        now = time.monotonic()
        warn = now - self._start_warned_at >= START_HELD_WARNING_SECONDS
        ends = self._commit_ends(self._consumer, waiting, quiet=not warn)
        if warn:
            self._start_warned_at = now
        if ends is None:
            self._start_retry_at = time.monotonic() + START_COMMIT_RETRY_SECONDS
            return
        for tp in ends:
            key = (tp.topic, tp.partition)
            try:
                self._consumer.seek(tp)
            except KafkaException as exc:
                # librdkafka rejects a seek before the partition's fetch has
                # started. That fetch then starts at the offset just committed.
                logger.debug(
                    "seek to the committed start skipped: %s", exc.args[0].str()
                )
            self._committed[key] = tp.offset
            self._started[key] = self._tracker.generation(*key)
        self._start_pending.clear()
        if not self._paused:
            self._consumer.resume(waiting)
        logger.info(
            "partitions resumed after their start was committed",
            extra={"partitions": _describe(waiting)},
        )

    def _commit_ends(
        self,
        consumer: Consumer,
        partitions: list[TopicPartition],
        *,
        quiet: bool = False,
    ) -> list[TopicPartition] | None:
        """Commit the end of each partition without a committed offset; return them.

        With ``auto.offset.reset=latest``, such a partition starts at its end.
        Committed at once, that start stays even when the reader stops before
        it fetched a message of the partition, for example while fetching is
        paused behind another partition's backlog. Otherwise the next reader
        would start at the end again and skip what was produced meanwhile.
        Returns None when the lookup or the commit fails; the partitions are
        then held paused and `_retry_starts` tries again. `quiet` logs the
        failure at DEBUG, for the retries between the periodic warnings.

        NOTE: a failure keeps every partition of the assignment paused, also those
        with a committed offset, and the synchronous commit has no time limit
        of its own.
        """
        # One time limit for all the lookups, so that a retry in the consumer
        # thread does not hold up polling for a time that grows with the
        # number of partitions.
        deadline = time.monotonic() + START_LOOKUP_TIMEOUT_SECONDS

        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
            return left

        try:
            committed = consumer.committed(partitions, timeout=remaining())
            # A partition without a commit has a negative offset (OFFSET_INVALID).
            uncommitted = [tp for tp in committed if tp.offset < 0]
            siblings = sibling_partitions(uncommitted)
            added = added_partitions(
                uncommitted,
                consumer.committed(siblings, timeout=remaining()) if siblings else [],
            )
            ends = []
            for tp in uncommitted:
                low, high = consumer.get_watermark_offsets(tp, timeout=remaining())
                key = (tp.topic, tp.partition)
                start = low if key in added or self._added_since_start(tp) else high
                ends.append(self._commit_offset(tp.topic, tp.partition, start))
            if ends:
                _commit_counted(consumer, ends)
        except KafkaException as exc:
            # A consumer that closes during the lookup ends it with _DESTROY,
            # which is part of a normal stop.
            closing = exc.args[0].code() == KafkaError._DESTROY
            logger.log(
                logging.DEBUG if quiet or closing else logging.WARNING,
                "cannot commit where new partitions start, so they are not read "
                "until it succeeds: %s",
                exc.args[0].str(),
                extra={"partitions": _describe(partitions)},
            )
            return None
        if ends:
            logger.info(
                "committed where new partitions start",
                extra={"offsets": _describe(ends)},
            )
        return ends

    def _added_since_start(self, tp: TopicPartition) -> bool:
        """Return whether a partition was created after the source started.

        Such a partition was added to a topic that the group reads, or belongs
        to a topic created since, so all its messages are new to the group,
        and it starts at its beginning instead of its end. Otherwise the
        messages produced to it before the reader noticed it would be skipped.
        Unknown when the start-up lookup failed, which counts as not added.
        """
        # A reader started after the partition was added, even while no reader
        # of the group ran, finds it in its start-up list. `added_partitions`
        # then finds it from the commits of the readers that ran before.
        # NOTE: commits without a partition count, such as those of other
        # tools, are ignored there, so such a partition then starts at its end
        # and its earlier messages are skipped.
        known = self._partitions_at_start
        return known is not None and tp.partition not in known.get(tp.topic, ())

    def _commit_offset(self, topic: str, partition: int, offset: int) -> TopicPartition:
        return commit_offset(self._partitions_at_start, topic, partition, offset)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        for key in keys:
            self._start_pending.pop(key, None)
        self._drain(keys)
        if not self._skip_closing_commit:
            try:
                self._commit_sync(set(keys))
            except KafkaException as exc:
                logger.error("commit on revocation failed: %s", exc)
        for topic, partition in keys:
            self._tracker.revoke(topic, partition)
            _forget_lag(topic, partition)
        consumer.unassign()
        logger.info("partitions revoked", extra={"partitions": _describe(partitions)})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._start_pending.pop((tp.topic, tp.partition), None)
            self._tracker.revoke(tp.topic, tp.partition)
            _forget_lag(tp.topic, tp.partition)
        consumer.unassign()
        logger.warning(
            "partitions lost; their in-flight messages will be redelivered",
            extra={"partitions": _describe(partitions)},
        )

    def _drain(self, keys: list[tuple[str, int]]) -> None:
        if self._revoke_handler is None or self._loop is None or not keys:
            return
        future: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(
            self._revoke_handler(keys), self._loop
        )
        try:
            future.result(self._revoke_timeout)
        except TimeoutError:
            future.cancel()
            logger.warning(
                "in-flight messages of revoked partitions did not finish in %.1f s; "
                "they will be redelivered",
                self._revoke_timeout,
            )

    async def _call(self, function: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, function, *args)


def _commit_counted(consumer: Consumer, offsets: list[TopicPartition]) -> None:
    """Commit `offsets` synchronously, counting them in agogosml_commits_total."""
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException:
        COMMITS.labels("error").inc(len(offsets))
        raise
    COMMITS.labels("ok").inc(len(offsets))


def _describe(partitions: list[TopicPartition]) -> list[str]:
    """Return topic[partition]@offset for each partition, for the logs.

    A partition without an offset of its own (librdkafka's OFFSET_INVALID,
    -1001, in an assignment) starts at its committed offset.
    """
    return [
        f"{tp.topic}[{tp.partition}]@"
        + ("committed" if tp.offset == OFFSET_INVALID else str(tp.offset))
        for tp in partitions
    ]


def _forget_lag(topic: str, partition: int) -> None:
    try:
        CONSUMER_LAG.remove(topic, str(partition))
    except KeyError:
        pass


def _record_lag(stats: dict[str, Any], owned: Callable[[str, int], bool]) -> None:
    """Set the lag of each owned partition from one statistics report.

    The lag counts from the committed offset, as KEDA's and the paused
    partitions' figures do, so messages fetched but not finished count too.
    Before the first commit it is librdkafka's lag from the fetch position.
    """
    for topic, topic_stats in stats.get("topics", {}).items():
        for partition, partition_stats in topic_stats.get("partitions", {}).items():
            if partition == "-1" or not owned(topic, int(partition)):
                continue
            high = partition_stats.get("hi_offset", -1)
            committed = partition_stats.get("committed_offset", -1)
            lag = (
                high - committed
                if high >= 0 and committed >= 0
                else partition_stats.get("consumer_lag", -1)
            )
            if lag >= 0:
                CONSUMER_LAG.labels(topic, partition).set(lag)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
