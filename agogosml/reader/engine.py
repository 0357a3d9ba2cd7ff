"""The input reader: fetch, order, batch, send to the app, retry, dead-letter, ack."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import zlib
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass, field
from typing import Any

from agogosml.config import Ordering, ReaderSettings, redact_url
from agogosml.envelope import Envelope, RecordHeaders, trace_id
from agogosml.errors import SinkError
from agogosml.logs import sink_error_fields
from agogosml.metrics import (
    DEAD_LETTERED,
    IN_FLIGHT,
    MESSAGES_IN,
    MESSAGES_OUT,
    RETRIES,
    SINK_ERRORS,
    start_at_zero,
)
from agogosml.reader.client import (
    AppClient,
    Outcome,
    backoff_seconds,
)
from agogosml.reader.transform import Transform, result_problem
from agogosml.reader.waits import Stall, WaitLog
from agogosml.transports.base import Sink, Source

__all__ = ["InputReader", "Transform"]

logger = logging.getLogger(__name__)

#: Dead-letter reasons that mean bad input, which the reader logs at INFO.
_BAD_INPUT_REASONS = frozenset({"rejected", "unreadable"})
#: Every ``reason`` label of ``agogosml_dead_lettered_total``.
_DEAD_LETTER_REASONS = (
    "rejected",
    "retries_exhausted",
    "transform_failed",
    "reader_error",
    "unreadable",
)

SERVICE = "input_reader"

#: Agogosml services that a READER_APP_URL may point at by mistake: their
#: health responses name them, and a reader pointed at one stays not ready.
NOT_AN_APP = frozenset({"input_reader", "output_writer"})

#: How often a batch that waits to fill checks whether a stop or the end of
#: the input ended the wait.
BATCH_CHECK_SECONDS = 0.05

#: Lanes in partition order beyond which an idle lane is removed. Kafka and
#: Event Hubs readers rarely own more partitions than this.
PARTITION_LANES_KEPT = 256

#: How long fetching waits for room among the in-flight messages before it
#: pauses the source (and keeps polling it, to stay in the consumer group).
PAUSE_AFTER_SECONDS = 1.0

#: While the app rejects the reader's requests themselves (401, 403, 404, 405),
#: the reader logs one ERROR at first and then one per this many seconds.
SETUP_ERROR_LOG_INTERVAL_SECONDS = 60.0

#: Statuses of a whole response that mean a set-up error, not a bad message.
CREDENTIAL_STATUSES = frozenset({401, 403})
#: Every 3xx counts too: the reader follows no redirect, because a POST body
#: may not survive it, and no other 3xx is a valid response to a message.
ADDRESS_STATUSES = frozenset({*range(300, 400), 404, 405})


@dataclass
class _Lane:
    """A queue of messages that one or more workers send in order."""

    queue: asyncio.Queue[Envelope] = field(default_factory=asyncio.Queue)
    carry: list[Envelope] = field(default_factory=list)
    workers: list[asyncio.Task[None]] = field(default_factory=list)
    #: The (topic, partition) of a lane in partition order, else None.
    partition: tuple[str, int] | None = None


class InputReader:
    """Move messages from a source to the model app with at-least-once delivery.

    A message is finished when the app responded 2xx to it, or when it was written
    to the dead-letter sink. Only then is it acknowledged to the source, which
    commits the contiguous finished prefix of each partition.

    Ordering: in ``partition`` mode each partition has one lane; in ``key`` mode
    keys are hashed onto `concurrency` lanes; in ``unordered`` mode one lane has
    `concurrency` workers. A lane sends its messages one request (or batch) at a
    time, so a message waits for every earlier message of its lane, retries
    included.
    """

    def __init__(
        self,
        settings: ReaderSettings,
        source: Source,
        client: AppClient,
        dead_letter: Sink,
        *,
        transform: Transform | None = None,
    ) -> None:
        self._settings = settings
        self._source = source
        self._client = client
        self._dead_letter_sink = dead_letter
        self._transform = transform
        self._lanes: dict[Hashable, _Lane] = {}
        self._in_flight = 0
        self._partition_in_flight: collections.Counter[tuple[str, int]] = (
            collections.Counter()
        )
        self._progress = asyncio.Event()
        self._stopping = asyncio.Event()
        #: Whether the last request reached the app, for `_release_on_stop`.
        self._app_reachable = True
        #: Monotonic time by which a requested stop ends the wait for in-flight
        #: messages, for revoked partitions and for the final drain alike.
        self._stop_deadline: float | None = None
        # Without a readiness path the app counts as ready; otherwise fetching
        # waits for the first successful check.
        self._app_ready = not settings.app_ready_path
        #: Why the app is not ready, from the last readiness check.
        self.app_not_ready_reason = "the app's readiness was not checked yet"
        self._round_robin = 0
        self._wait_log = WaitLog(settings.retry_max_attempts)
        self._transform_exit_logged = False
        self._side_tasks: set[asyncio.Task[None]] = set()
        # Object ids of envelopes read and not finished (transforms may replace
        # an envelope, so this is updated where they do).
        self._unfinished: set[int] = set()
        self._dead_letter_failures = 0
        self._stopped = False
        self._setup_error = False
        self._setup_error_status = 0
        self._setup_error_logged_at = float("-inf")
        self._revoking: set[tuple[str, int]] = set()
        # Set, then replaced, to wake lanes that wait before a retry.
        self._wake = asyncio.Event()
        self.finished_count = 0
        self.dead_lettered_count = 0
        self._messages_in = MESSAGES_IN.labels(SERVICE)
        self._messages_out = MESSAGES_OUT.labels(SERVICE)
        IN_FLIGHT.labels(SERVICE).set_function(lambda: self._in_flight)
        start_at_zero(RETRIES, (SERVICE,))
        start_at_zero(SINK_ERRORS, (SERVICE,))
        start_at_zero(
            DEAD_LETTERED, *[(SERVICE, reason) for reason in _DEAD_LETTER_REASONS]
        )
        source.set_revoke_handler(self.drain_partitions)

    @property
    def in_flight(self) -> int:
        """Messages read but not finished."""
        return self._in_flight

    @property
    def dead_letter_failing(self) -> bool:
        """Whether a dead-letter write is failing right now (and being retried)."""
        return self._dead_letter_failures > 0

    @property
    def setup_error(self) -> bool:
        """Whether the app rejects the reader's requests themselves.

        That is a whole response of 401 or 403 (credentials), or 404 or 405
        (READER_APP_URL is not the app).
        """
        return self._setup_error

    @property
    def setup_error_reason(self) -> str:
        """Reason of the set-up error for /readyz, with the setting to check."""
        if self._setup_error_status in CREDENTIAL_STATUSES:
            setting = "READER_APP_TOKEN"
        else:
            setting = "READER_APP_URL"
        return (
            f"the app responds {self._setup_error_status} to the reader's "
            f"requests; check {setting} (the log has details)"
        )

    @property
    def app_ready(self) -> bool:
        """Result of the last readiness check of the app."""
        return self._app_ready

    def request_stop(self) -> None:
        """Stop fetching; `run` then finishes in-flight work and returns."""
        if not self._stopping.is_set():
            logger.info("stop requested; finishing in-flight messages")
            timeout_seconds = self._settings.shutdown_timeout_ms / 1000
            self._stop_deadline = time.monotonic() + timeout_seconds
        self._stopping.set()
        self._wake_waiting_lanes()
        # Wakes a revocation that waits for its partitions, so it checks the deadline.
        self._progress.set()

    async def run(self) -> None:
        """Process messages until `request_stop`, or the end of a bounded source."""
        watcher = None
        if self._settings.app_ready_path:
            watcher = asyncio.create_task(self._watch_app_readiness())
        try:
            await self._fetch_loop()
        finally:
            await self._finish_in_flight(self._shutdown_seconds_left())
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            await self._cancel_workers()
            self._stopped = True
            self._progress.set()

    async def _fetch_loop(self) -> None:
        paused = False
        idle_at_end = False
        while not self._stopping.is_set():
            if self._source.at_end and self._in_flight == 0:
                if self._settings.stop_at_end:
                    logger.info("source read to the end; stopping")
                    return
                if not idle_at_end:
                    logger.info(
                        "source read to the end; waiting for a stop signal, "
                        "because READER_STOP_AT_END is false"
                    )
                    idle_at_end = True
            # NOTE: the limit is shared by all partitions, and librdkafka returns
            # fetched messages partition by partition, so with a slow app one
            # partition's backlog can fill it while other partitions wait.
            capacity = self._settings.max_in_flight - self._in_flight
            if capacity <= 0 and self._app_ready and not paused:
                # Pausing drops what the consumer has fetched ahead, so a short
                # wait for room does not pause; only a long one does.
                if await self._wait_for_room(PAUSE_AFTER_SECONDS):
                    continue
            # Once paused, resume only with room for a useful fetch: each resume
            # fetches again what the pause dropped.
            full = capacity < self._room() if paused else capacity <= 0
            should_pause = full or not self._app_ready
            if should_pause != paused:
                await (self._source.pause() if should_pause else self._source.resume())
                paused = should_pause
                logger.debug("fetching %s", "paused" if paused else "resumed")
            self._admit_all(await self._source.fetch(max(1, min(capacity, 500)), 0.1))
        if not self._source.replayable:
            await self._take_buffered(paused)

    async def _take_buffered(self, paused: bool) -> None:
        """Admit what a source that cannot be read again has read but not returned.

        Its lines are lost once the process exits, so they are sent before the
        shutdown like the messages already in flight.
        """
        if paused:
            await self._source.resume()
        self._source.stop_reading()
        while not self._source.at_end:
            self._admit_all(await self._source.fetch(500, 0))

    def _room(self) -> int:
        """Free in-flight slots worth a fetch: a tenth of the maximum, 1 to 100."""
        return max(1, min(100, self._settings.max_in_flight // 10))

    async def _wait_for_room(self, timeout_seconds: float) -> bool:
        """Wait until enough in-flight messages finished to fetch a useful batch.

        Returns False if that did not happen within `timeout_seconds`.
        """
        maximum = self._settings.max_in_flight
        room = self._room()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        while maximum - self._in_flight < room and not self._stopping.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                return False
        return True

    def _admit_all(self, envelopes: list[Envelope]) -> None:
        if envelopes:
            self._messages_in.inc(len(envelopes))
        for envelope in envelopes:
            self._admit(envelope)

    def _admit(self, envelope: Envelope) -> None:
        self._track_start(envelope)
        if envelope.problem:
            error = envelope.problem
            self._spawn(self._dead_letter(envelope, 0, error, 0, "unreadable"))
            return
        if self._transform is not None:
            transformed = self._apply_transform(self._transform, envelope)
            if transformed is None:
                return
            envelope = transformed
        self._lane_for(envelope).queue.put_nowait(envelope)

    def _apply_transform(
        self, transform: Transform, envelope: Envelope
    ) -> Envelope | None:
        """Return the envelope to send, or None when the message is already handled.

        The source commits by position, so the message keeps the position it was
        read from, whatever the transform did to the envelope.
        """
        original = dataclasses.replace(envelope, headers=list(envelope.headers))
        try:
            transformed = transform(envelope)
            problem = result_problem(transformed)
        except Exception as exc:  # noqa: BLE001 - user code may raise anything
            transformed, problem = None, f"transform failed: {exc!r}"
        # SIGINT and SIGTERM stop the reader through `request_stop`, so a
        # KeyboardInterrupt or SystemExit here comes from the transform, such as
        # a library that calls sys.exit. So do GeneratorExit, a library's own
        # BaseException, and a CancelledError while this task is not being
        # cancelled. Each is a failed transform, not a stop.
        except BaseException as exc:
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and (
                task is not None and task.cancelling()
            ):
                raise  # The reader itself is being cancelled.
            self._log_transform_exit(exc, envelope)
            transformed, problem = None, f"transform failed: {exc!r}"
        if problem:
            # The transform may have changed the envelope before it failed, so
            # the dead letter gets the message as it was read.
            self._unfinished.discard(id(envelope))
            self._unfinished.add(id(original))
            self._spawn(self._dead_letter(original, 0, problem, 0))
            return None
        envelope.position = original.position
        if transformed is None:
            self._finish(envelope)
            return None
        if transformed is not envelope and id(transformed) in self._unfinished:
            # The transform returned an envelope that another unfinished message
            # uses too, such as a constant. Each message needs its own position.
            transformed = dataclasses.replace(
                transformed, headers=list(transformed.headers)
            )
        transformed.position = original.position
        self._unfinished.discard(id(envelope))
        self._unfinished.add(id(transformed))
        return transformed

    def _log_transform_exit(self, exc: BaseException, envelope: Envelope) -> None:
        """Log the first transform failure that is not an Exception, with its trace.

        Later ones show only in the dead-letter line of each message.
        """
        if self._transform_exit_logged:
            return
        self._transform_exit_logged = True
        logger.warning(
            "the transform raised %s. The reader treats it as a failed "
            "transform, not a stop, so it dead-letters the message and goes on. "
            "Only the first is logged here, and the dead-letter line of each "
            "such message has the error",
            type(exc).__name__,
            exc_info=exc,
            extra={"message_id": envelope.id, **_position_fields(envelope)},
        )

    def _lane_for(self, envelope: Envelope) -> _Lane:
        mode = self._settings.ordering
        key: Hashable
        if mode is Ordering.PARTITION:
            position = envelope.position
            key = (position.topic, position.partition) if position else ("", 0)
        elif mode is Ordering.KEY:
            if envelope.key is None:
                self._round_robin += 1
                bucket = self._round_robin
            else:
                bucket = zlib.crc32(envelope.key)
            key = bucket % self._settings.concurrency
        else:
            key = "unordered"
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = self._new_lane(mode)
            if mode is Ordering.PARTITION:
                lane.partition = key  # type: ignore[assignment]
        return lane

    def _new_lane(self, mode: Ordering) -> _Lane:
        lane = _Lane()
        workers = self._settings.concurrency if mode is Ordering.UNORDERED else 1
        for _ in range(workers):
            lane.workers.append(asyncio.create_task(self._work(lane)))
        return lane

    async def _work(self, lane: _Lane) -> None:
        while True:
            # NOTE: an exception in _collect (outside the try below) would end
            # this lane and leave its messages unfinished until a restart. The
            # transform result checks keep every envelope's fields of the types
            # _collect measures, so none is known to raise there.
            batch = await self._collect(lane)
            try:
                await self._deliver(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # An unexpected error (a bug, or a message the HTTP client cannot
                # encode) must not stall the lane and every commit behind it.
                logger.exception(
                    "delivering a batch failed unexpectedly; dead-lettering it",
                    extra={"message_ids": [envelope.id for envelope in batch]},
                )
                error = f"reader failed to send the message: {exc!r}"
                for envelope in batch:
                    if id(envelope) in self._unfinished:
                        await self._dead_letter_or_release(envelope, error)
            if self._retire_idle(lane):
                return

    def _retire_idle(self, lane: _Lane) -> bool:
        """Remove an idle partition lane once there are many; return whether it was.

        A followed file gets a new partition each time it is truncated, so
        without this its lanes and their workers would pile up. A later message
        of the partition gets a new lane.
        """
        key = lane.partition
        if (
            key is None
            or len(self._lanes) <= PARTITION_LANES_KEPT
            or not lane.queue.empty()
            or lane.carry
            or self._partition_in_flight[key] > 0
            or self._lanes.get(key) is not lane
        ):
            return False
        del self._lanes[key]
        del self._partition_in_flight[key]
        return True

    async def _dead_letter_or_release(self, envelope: Envelope, error: str) -> None:
        """Dead-letter a message after an unexpected error, keeping the lane alive.

        If that fails too, the message is released unfinished: its offset is not
        committed, so it is read again after a restart or a rebalance.
        """
        try:
            await self._dead_letter(envelope, 0, error, 0, "reader_error")
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception(
                "dead-lettering after an unexpected error failed; the message "
                "stays uncommitted",
                extra={"message_id": envelope.id},
            )
            if id(envelope) in self._unfinished:
                self._release(envelope)

    async def _collect(self, lane: _Lane) -> list[Envelope]:
        first = lane.carry.pop() if lane.carry else await lane.queue.get()
        batch = [first]
        limit = self._settings.batch_max_messages
        if limit == 1:
            return batch
        size = _request_size(first)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.batch_max_wait_ms / 1000
        while len(batch) < limit:
            try:
                envelope = lane.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0 or self._no_more_input():
                    break
                try:
                    envelope = await asyncio.wait_for(
                        lane.queue.get(), min(remaining, BATCH_CHECK_SECONDS)
                    )
                except TimeoutError:
                    continue
            envelope_size = _request_size(envelope)
            if size + envelope_size > self._settings.batch_max_bytes:
                lane.carry.append(envelope)
                break
            batch.append(envelope)
            size += envelope_size
        return batch

    def _no_more_input(self) -> bool:
        """Return whether a batch can stop waiting for more messages to fill it.

        That is so once a stop is requested, and at the end of an input that the
        reader reads only to its end. It is so during a revocation too, because
        the batch may contain messages of the revoked partitions, which the
        revocation waits for, while the Kafka source fetches nothing until the
        revocation ends.
        """
        return (
            self._stopping.is_set()
            or bool(self._revoking)
            or (self._settings.stop_at_end and self._source.at_end)
        )

    async def _deliver(self, batch: list[Envelope], attempts_spent: int = 0) -> None:
        """Send messages until each is finished, or released unfinished.

        `attempts_spent` counts the requests that already carried the messages
        and count towards READER_RETRY_MAX_ATTEMPTS.
        """
        stall = Stall()
        try:
            await self._send_until_settled(batch, attempts_spent, stall)
        finally:
            # Released at a stop or a revocation while waiting, or failed.
            self._wait_log.ended(stall, recovered=False)

    async def _send_until_settled(
        self, batch: list[Envelope], attempts_spent: int, stall: Stall
    ) -> None:
        settings = self._settings
        as_batch = settings.batch_max_messages > 1
        pending = batch
        attempt = attempts_spent
        while pending:
            pending = self._drop_unsendable(pending)
            if not pending:
                return
            ready_before = self._app_ready
            outcomes = await self._client.send(pending, batch=as_batch)
            self._app_reachable = not all(outcome.unreachable for outcome in outcomes)
            pending, outcomes = await self._reject_unsent(pending, outcomes, attempt)
            if not pending:
                return
            if self._is_setup_error(outcomes, as_batch):
                # The app did not look at the messages: wait for the operator
                # without spending attempts, so nothing is dead-lettered for it.
                await self._wait(settings.retry_max_backoff_ms / 1000, pending)
                continue
            delay = self._delay_without_attempt(outcomes, ready_before, stall.count + 1)
            if delay is not None:
                # Nothing is wrong with the messages: wait for the app without
                # spending attempts, so a restart of the app or of the writer
                # behind it, or a throttling app, dead-letters nothing.
                RETRIES.labels(SERVICE).inc(len(pending))
                self._wait_log.waiting(
                    stall, len(pending), pending[0].id, outcomes[0], delay
                )
                await self._wait(delay, pending)
                continue
            self._wait_log.ended(stall, recovered=True)
            if len(pending) > 1 and _rejected_as_whole(outcomes):
                await self._deliver_in_halves(pending, outcomes[0], attempt)
                return
            attempt += 1
            pending = await self._settle(pending, outcomes, attempt)
            if pending:
                await self._wait(
                    backoff_seconds(
                        attempt,
                        settings.retry_initial_backoff_ms / 1000,
                        settings.retry_max_backoff_ms / 1000,
                    ),
                    pending,
                )

    async def _reject_unsent(
        self, pending: list[Envelope], outcomes: list[Outcome], attempt: int
    ) -> tuple[list[Envelope], list[Outcome]]:
        """Dead-letter the messages that the client rejected without sending.

        Returns the other messages and their outcomes.
        """
        sent: list[Envelope] = []
        sent_outcomes: list[Outcome] = []
        for envelope, outcome in zip(pending, outcomes, strict=True):
            if outcome.sent:
                sent.append(envelope)
                sent_outcomes.append(outcome)
            else:
                await self._reject(envelope, outcome, attempt)
        return sent, sent_outcomes

    async def _settle(
        self, pending: list[Envelope], outcomes: list[Outcome], attempt: int
    ) -> list[Envelope]:
        """Finish accepted messages, dead-letter failed ones, return the retries."""
        retry = []
        delivered = 0
        for envelope, outcome in zip(pending, outcomes, strict=True):
            if outcome.ok:
                delivered += 1
                self._finish(envelope)
            elif outcome.retriable and attempt < self._settings.retry_max_attempts:
                retry.append(envelope)
            else:
                await self._reject(envelope, outcome, attempt)
        self._messages_out.inc(delivered)
        if retry:
            self._log_retry(retry, outcomes, attempt)
        return retry

    async def _deliver_in_halves(
        self, pending: list[Envelope], outcome: Outcome, attempts_spent: int
    ) -> None:
        """Send a batch that the app rejected as a whole again, in two halves.

        A 4xx for a whole batch (a value the app cannot decode, a body over its
        size limit) may be the fault of one message. So each half is sent, and
        split again while the app rejects it whole, down to single messages.
        Only a message that the app rejects on its own is dead-lettered. The
        first half is finished before the second is sent, so the lane keeps its
        order. The rejected request spends no attempt.
        """
        logger.info(
            "the app rejected a batch of %d messages as a whole; sending it "
            "again in two halves to find the messages it rejects",
            len(pending),
            extra={
                "message_id": pending[0].id,
                "status": outcome.status,
                "error": outcome.error,
            },
        )
        middle = (len(pending) + 1) // 2
        await self._deliver(pending[:middle], attempts_spent)
        await self._deliver(pending[middle:], attempts_spent)

    async def _wait(
        self,
        seconds: float,
        pending: list[Envelope],
        still_sendable: Callable[[Envelope], bool] | None = None,
    ) -> None:
        """Sleep before sending `pending` again, ending early if they must not be.

        A stop or a revocation ends the wait, so a long Retry-After holds up
        neither a shutdown nor a rebalance. `still_sendable` returns whether a
        message is still to be sent, `_sendable` by default.
        """
        still_sendable = still_sendable or self._sendable
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while all(still_sendable(envelope) for envelope in pending):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _wake_waiting_lanes(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def _drop_unsendable(self, envelopes: list[Envelope]) -> list[Envelope]:
        """Release messages that must not be sent now, and return the others.

        While stopping in partition order, and for partitions being revoked or
        already lost, a message that was not delivered yet is released
        unfinished. Its offset is not committed, so it is read again later, by
        this reader or the new owner of its partition. It was not delivered
        here, so that is no duplicate. A source that cannot be read again
        (stdin), and key and unordered order while the app is ready
        (`_release_on_stop`), keep messages sendable while stopping, until the
        shutdown timeout.
        """
        sendable = []
        for envelope in envelopes:
            if self._sendable(envelope):
                sendable.append(envelope)
            else:
                self._release(envelope)
        return sendable

    def _sendable(self, envelope: Envelope) -> bool:
        if (
            self._stopping.is_set()
            and self._source.replayable
            and self._release_on_stop()
        ):
            return False
        return self._owned(envelope)

    def _owned(self, envelope: Envelope) -> bool:
        """Return whether the message's partition is neither lost nor being revoked."""
        if not self._source.owns(envelope):
            return False
        position = envelope.position
        return position is None or (
            (position.topic, position.partition) not in self._revoking
        )

    def _release_on_stop(self) -> bool:
        """Return whether a stop releases the messages not yet delivered.

        In partition order, every message that waits comes after the finished
        ones of its partition, so releasing it adds no duplicate. In key and
        unordered order a later message of the same partition may be finished
        already, and would be read again with the released one. So waiting
        messages are sent before the stop, while the app is ready and the last
        request reached it.
        """
        return (
            self._settings.ordering is Ordering.PARTITION
            or not self._app_ready
            or not self._app_reachable
        )

    def _is_setup_error(self, outcomes: list[Outcome], as_batch: bool) -> bool:
        """Return whether the app rejected the request itself, and log it.

        401 and 403 mean wrong credentials, 404, 405 and any 3xx that
        READER_APP_URL does not point at the app. The same status as the
        result of one item of a batch is about that message, so it is not a
        set-up error.
        """
        failure = next(
            (
                outcome
                for outcome in outcomes
                if not outcome.item_result
                and outcome.status in CREDENTIAL_STATUSES | ADDRESS_STATUSES
            ),
            None,
        )
        if failure is None:
            self._setup_error = False
            self._setup_error_status = 0
            return False
        now = asyncio.get_running_loop().time()
        since_log = now - self._setup_error_logged_at
        if (
            failure.status != self._setup_error_status
            or since_log >= SETUP_ERROR_LOG_INTERVAL_SECONDS
        ):
            self._log_setup_error(failure, as_batch)
            self._setup_error_logged_at = now
        self._setup_error = True
        self._setup_error_status = failure.status
        return True

    def _log_setup_error(self, failure: Outcome, as_batch: bool) -> None:
        wait_ms = self._settings.retry_max_backoff_ms
        if failure.status in CREDENTIAL_STATUSES:
            logger.error(
                "the app rejected the reader's credentials (%d); set "
                "READER_APP_TOKEN to the app's token. Retrying every %d ms "
                "(READER_RETRY_MAX_BACKOFF_MS) without dead-lettering",
                failure.status,
                wait_ms,
                extra={"error": failure.error},
            )
            return
        app_url = redact_url(str(self._settings.app_url))
        path = "/batch" if as_batch else "/"
        batch_hint = (
            ", and that the app serves POST /batch, which the reader uses because "
            "READER_BATCH_MAX_MESSAGES is above 1"
            if as_batch
            else ""
        )
        logger.error(
            "the app responded %d to POST %s; check that READER_APP_URL=%r is the "
            "base URL of the model app%s. Retrying every %d ms "
            "(READER_RETRY_MAX_BACKOFF_MS) without dead-lettering",
            failure.status,
            app_url.rstrip("/") + path,
            app_url,
            batch_hint,
            wait_ms,
            extra={"error": failure.error},
        )

    def _delay_without_attempt(
        self, outcomes: list[Outcome], ready_before: bool, waits: int
    ) -> float | None:
        """Return how long to wait when a request failed without spending attempts.

        That is so when the app is unavailable (see `_app_unavailable`), or
        when it responded 429 or 503 with a Retry-After header. A Retry-After
        delay replaces the backoff when it is longer. Returns None when the
        failure spends an attempt.
        """
        settings = self._settings
        backoff = backoff_seconds(
            waits,
            settings.retry_initial_backoff_ms / 1000,
            settings.retry_max_backoff_ms / 1000,
        )
        retry_after = _retry_after_seconds(outcomes)
        if retry_after is not None:
            return max(retry_after, backoff)
        if self._app_unavailable(outcomes, ready_before):
            return backoff
        return None

    def _app_unavailable(self, outcomes: list[Outcome], ready_before: bool) -> bool:
        """Return whether a request failed because the app is down or not ready.

        That is so when no connection to the app could be made, or when the app
        responded 503 or 429 to a request sent while its readiness check was
        already failing (`ready_before`), as `ModelApp` does while its writer is
        down. 502 and 504 count as 503 then: a proxy or ingress in front of an
        app that restarts responds with them. A timeout, a dropped connection
        or a 500 always uses up an attempt: a message that stalls or crashes
        the app makes its readiness check fail too, and it must still reach the
        dead letters.
        """
        if all(outcome.unreachable for outcome in outcomes):
            return True
        if ready_before or self._app_ready:
            return False
        return all(outcome.status in (429, 502, 503, 504) for outcome in outcomes)

    def _log_retry(
        self, retry: list[Envelope], outcomes: list[Outcome], attempt: int
    ) -> None:
        RETRIES.labels(SERVICE).inc(len(retry))
        failed = [outcome for outcome in outcomes if outcome.retriable]
        statuses = collections.Counter(outcome.status for outcome in failed)
        logger.warning(
            "app request failed; retrying %d message(s), with the error of the "
            "first in the error field",
            len(retry),
            extra={
                "message_id": retry[0].id,
                "message_ids": [envelope.id for envelope in retry[:20]],
                "status": failed[0].status,
                # Per status, as the messages of a batch may fail differently.
                "statuses": {str(status): n for status, n in sorted(statuses.items())},
                "error": failed[0].error,
                "attempt": attempt,
            },
        )

    async def _reject(
        self, envelope: Envelope, outcome: Outcome, attempts: int
    ) -> None:
        reason = "retries_exhausted" if outcome.retriable else "rejected"
        await self._dead_letter(
            envelope, outcome.status, outcome.error, attempts, reason
        )

    async def _dead_letter(
        self,
        envelope: Envelope,
        status: int,
        error: str,
        attempts: int,
        reason: str = "transform_failed",
    ) -> None:
        """Write a message to the dead-letter sink, retrying until it succeeds.

        Any error is retried, not only SinkError, because giving up would leave
        the message unfinished and stall every commit behind it. When the sink
        rejects the record for good as too large, the next attempt drops the
        value, and the one after that the key and the record headers too. The
        record keeps the source position, so the message can still be read from
        the source. A record that the sink rejects as possibly too large
        (`SinkError.size_rejected`) counts as too large after
        `_SIZE_REJECTIONS_TOO_LARGE` such failures in a row. Any other error,
        such as a missing permission, is retried with the whole record until an
        operator fixes it, or until the message's partition is lost, or is
        being revoked after an attempt failed. Its next owner reads the message
        again, so the message is then released unfinished, and it is
        dead-lettered once. A revocation ends the wait between two attempts.
        """
        record = _dead_letter_record(envelope, status, error, attempts)
        failures = 0
        size_rejections = 0
        minimal_failures = 0
        try:
            while True:
                # The first attempt goes on during a revocation, which then
                # commits the message as finished when it succeeds. Retries
                # stop as soon as the revocation begins.
                owned = (
                    self._owned(envelope) if failures else self._source.owns(envelope)
                )
                if not owned:
                    logger.info(
                        "dead letter not written: the message's partition is "
                        "revoked, and its next owner reads the message again",
                        extra={"message_id": envelope.id, **_position_fields(envelope)},
                    )
                    self._release(envelope)
                    return
                try:
                    await self._dead_letter_sink.send([record])
                    break
                except Exception as exc:  # noqa: BLE001 - see the docstring
                    SINK_ERRORS.labels(SERVICE).inc()
                    failures += 1
                    if failures == 1:
                        self._dead_letter_failures += 1
                    rejected = isinstance(exc, SinkError) and exc.size_rejected
                    size_rejections = size_rejections + 1 if rejected else 0
                    too_large = (
                        _too_large(exc) or size_rejections >= _SIZE_REJECTIONS_TOO_LARGE
                    )
                    smaller = _smaller_dead_letter(record, exc) if too_large else record
                    if smaller is not record:
                        size_rejections = 0
                        logger.warning(
                            "dead letter too large for %s; writing it again "
                            "without its value (and then without its key and "
                            "headers, and then with only its source position)",
                            self._settings.dead_letter_target(),
                            extra={
                                "message_id": envelope.id,
                                **sink_error_fields(exc),
                            },
                        )
                        record = smaller
                    elif too_large:
                        minimal_failures += 1
                        self._log_dead_letter_failure(
                            envelope,
                            exc,
                            failures,
                            _MINIMAL_DEAD_LETTER_TOO_LARGE,
                            repeat=minimal_failures,
                        )
                    else:
                        self._log_dead_letter_failure(envelope, exc, failures)
                    delay = backoff_seconds(
                        failures,
                        self._settings.retry_initial_backoff_ms / 1000,
                        self._settings.retry_max_backoff_ms / 1000,
                    )
                    await self._wait(delay, [envelope], self._owned)
        finally:
            if failures:
                self._dead_letter_failures -= 1
        DEAD_LETTERED.labels(SERVICE, reason).inc()
        self.dead_lettered_count += 1
        # A message that the app rejected, or that the source could not read
        # whole, is bad input. Any other dead letter is a failure of the
        # pipeline that an operator should see.
        level = logging.INFO if reason in _BAD_INPUT_REASONS else logging.WARNING
        logger.log(
            level,
            "message dead-lettered",
            extra={
                "message_id": envelope.id,
                "trace_id": trace_id(envelope.traceparent),
                **_position_fields(envelope),
                "reason": reason,
                "status": status,
                "error": error,
                "attempts": attempts,
            },
        )
        self._finish(envelope)

    def _log_dead_letter_failure(
        self,
        envelope: Envelope,
        exc: Exception,
        failures: int,
        hint: str = "",
        *,
        repeat: int | None = None,
    ) -> None:
        """Log a failed dead-letter write: the first of a kind and every tenth.

        `repeat` counts the failures of this kind, `failures` all of them.
        """
        repeat = failures if repeat is None else repeat
        if repeat != 1 and repeat % 10:
            return
        if not hint and not getattr(exc, "retriable", False):
            hint = "; this error will not pass by itself"
        logger.error(
            "writing dead letter to %s failed (attempt %d); retrying. Check "
            "READER_DEAD_LETTER and the sink%s",
            self._settings.dead_letter_target(),
            failures,
            hint,
            extra={"message_id": envelope.id, **sink_error_fields(exc)},
        )

    def _track_start(self, envelope: Envelope) -> None:
        self._unfinished.add(id(envelope))
        self._in_flight += 1
        if envelope.position is not None:
            position = envelope.position
            self._partition_in_flight[(position.topic, position.partition)] += 1

    def _finish(self, envelope: Envelope) -> None:
        self._source.ack(envelope)
        self.finished_count += 1
        self._release(envelope)

    def _release(self, envelope: Envelope) -> None:
        """Stop tracking a message; without `_finish` it stays uncommitted."""
        self._unfinished.discard(id(envelope))
        self._in_flight -= 1
        if envelope.position is not None:
            position = envelope.position
            self._partition_in_flight[(position.topic, position.partition)] -= 1
        self._progress.set()

    async def drain_partitions(self, partitions: list[tuple[str, int]]) -> None:
        """Wait until no message of `partitions` is in flight.

        Their messages that wait in a lane are released at once, so that the
        revocation waits only for requests already sent, not for other
        partitions' messages ahead of them in the lane. Returns at once after
        `run` has ended, because no worker is left to finish anything, and when
        the time a requested stop gives in-flight messages is up, so that a stop
        during a revocation does not wait for them twice.
        """
        self._revoking.update(partitions)
        self._wake_waiting_lanes()
        self._release_queued(set(partitions))
        try:
            while not self._stopped and any(
                self._partition_in_flight[key] > 0 for key in partitions
            ):
                self._progress.clear()
                # Without a requested stop, the wait has no time limit.
                left = None
                if self._stop_deadline is not None:
                    left = self._shutdown_seconds_left()
                    if left <= 0:
                        return
                try:
                    await asyncio.wait_for(self._progress.wait(), left)
                except TimeoutError:
                    return
        finally:
            self._revoking.difference_update(partitions)

    def _shutdown_seconds_left(self) -> float:
        """Return the seconds left for in-flight messages before the reader stops."""
        if self._stop_deadline is None:
            return self._settings.shutdown_timeout_ms / 1000
        return max(0.0, self._stop_deadline - time.monotonic())

    def _release_queued(self, partitions: set[tuple[str, int]]) -> None:
        """Release the messages of `partitions` that no worker has taken yet."""

        def revoked(envelope: Envelope) -> bool:
            position = envelope.position
            return (
                position is not None
                and (position.topic, position.partition) in partitions
            )

        for lane in self._lanes.values():
            queued = []
            while not lane.queue.empty():
                queued.append(lane.queue.get_nowait())
            for envelope in [*lane.carry, *queued]:
                if revoked(envelope):
                    self._release(envelope)
            lane.carry[:] = [
                envelope for envelope in lane.carry if not revoked(envelope)
            ]
            for envelope in queued:
                if not revoked(envelope):
                    lane.queue.put_nowait(envelope)

    async def _finish_in_flight(self, timeout_seconds: float) -> None:
        async def wait_all() -> None:
            while self._in_flight > 0:
                self._progress.clear()
                await self._progress.wait()

        if self._in_flight == 0:
            return
        try:
            if timeout_seconds <= 0:
                raise TimeoutError  # wait_for of 0 s times out even when done
            await asyncio.wait_for(wait_all(), timeout_seconds)
        except TimeoutError:
            if not self._source.replayable:
                logger.error(
                    "%d messages were still in flight after %.1f s and are lost: "
                    "the source cannot be read again. Raise "
                    "READER_SHUTDOWN_TIMEOUT_MS, or read from a file with "
                    "READER_CHECKPOINT_PATH instead of stdin",
                    self._in_flight,
                    timeout_seconds,
                )
                return
            logger.warning(
                "%d messages were still in flight after %.1f s; they are not "
                "committed and will be redelivered",
                self._in_flight,
                timeout_seconds,
            )

    async def _cancel_workers(self) -> None:
        tasks = [task for lane in self._lanes.values() for task in lane.workers]
        tasks.extend(self._side_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_task_done)

    def _side_task_done(self, task: asyncio.Task[None]) -> None:
        self._side_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "a background task of the reader failed; a message it handled "
                "stays uncommitted until a restart",
                exc_info=task.exception(),
            )

    async def _watch_app_readiness(self) -> None:
        base_url = redact_url(str(self._settings.app_url)).rstrip("/")
        url = base_url + self._settings.app_ready_path
        checks_not_ready = 0
        while True:
            readiness = await self._client.readiness(self._settings.app_ready_path)
            ready = readiness.ready
            if readiness.service in NOT_AN_APP:
                ready = False
                self.app_not_ready_reason = (
                    f"READER_APP_URL {base_url} is an agogosml "
                    f"{readiness.service.replace('_', ' ')}, not a model app, so "
                    "messages would not be scored; set it to the model app's URL"
                )
            elif ready:
                self.app_not_ready_reason = ""
            elif readiness.service:
                # The app gave its own reason, which names the setting to fix.
                self.app_not_ready_reason = readiness.detail
            else:
                self.app_not_ready_reason = (
                    f"{readiness.detail}; check READER_APP_URL and "
                    "READER_APP_READY_PATH"
                )
            if ready != self._app_ready:
                logger.info(
                    "app is %s; %s fetching",
                    "ready" if ready else "not ready",
                    "resuming" if ready else "pausing",
                    extra={"url": url},
                )
                self._app_ready = ready
            checks_not_ready = 0 if ready else checks_not_ready + 1
            if checks_not_ready % 30 == 1:
                logger.log(
                    logging.ERROR
                    if readiness.service in NOT_AN_APP
                    else logging.WARNING,
                    "waiting for the app to become ready: %s",
                    self.app_not_ready_reason,
                )
            await asyncio.sleep(1.0)


def _request_size(envelope: Envelope) -> int:
    """Estimate a message's bytes in a batch request: value, key, id and fields."""
    key_size = len(envelope.key) * 4 // 3 + 4 if envelope.key else 0
    return len(envelope.value) + key_size + len(envelope.id) + 120


def _rejected_as_whole(outcomes: list[Outcome]) -> bool:
    """Return whether the app rejected the whole request with a 4xx not retried.

    Statuses of set-up errors (401, 403, 404, 405) are handled before this.
    """
    first = outcomes[0]
    return (
        400 <= first.status < 500
        and not first.retriable
        and not any(outcome.item_result for outcome in outcomes)
    )


def _retry_after_seconds(outcomes: list[Outcome]) -> float | None:
    """Return the Retry-After delay of a whole 429 or 503 response, else None."""
    first = outcomes[0]
    if first.item_result or first.retry_after_seconds is None:
        return None
    return first.retry_after_seconds


def _position_fields(envelope: Envelope) -> dict[str, object]:
    position = envelope.position
    if position is None:
        return {}
    return {
        "topic": position.topic,
        "partition": position.partition,
        "offset": position.offset,
    }


#: Failures in a row of a dead letter that the sink rejected as possibly too
#: large, after which the record counts as too large and is made smaller.
_SIZE_REJECTIONS_TOO_LARGE = 3


def _too_large(error: Exception) -> bool:
    """Return whether a sink rejected a record for good because of its size."""
    return isinstance(error, SinkError) and error.too_large and not error.retriable


#: The headers of the smallest dead letter: the source position and the outcome.
_MINIMAL_DEAD_LETTER_HEADERS = frozenset(
    {
        "dlq.source.topic",
        "dlq.source.partition",
        "dlq.source.offset",
        "dlq.status",
        "dlq.error",
        "dlq.attempts",
    }
)
#: Headers that name what a smaller dead letter left out.
_DROPPED_MARKERS = frozenset({"dlq.value_dropped", "dlq.key_and_headers_dropped"})
#: The start of ``dlq.error`` that the smallest dead letter keeps.
_MINIMAL_ERROR_BYTES = 100
_MINIMAL_DEAD_LETTER_TOO_LARGE = (
    "; the dead letter is too large even with only its source position and "
    "the start of the error, so raise the size limit of the dead-letter "
    "destination (max.message.bytes of the topic, or message.max.bytes in "
    "KAFKA_EXTRA_CONFIG), and the reader writes it"
)


def _smaller_dead_letter(record: Envelope, error: Exception) -> Envelope:
    """Return the dead letter with less of the message, after the sink rejected it.

    The value goes first. Then the key and the record headers go, leaving the
    ``dlq.*`` headers, which name the source position. Last, only the source
    position, the status, the attempts, the start of the error and the
    markers of what was dropped, without their reasons, stay.
    Returns `record` itself when nothing is left to drop.
    """
    reason = str(error)[:500].encode()
    if record.value:
        headers = [*record.headers, ("dlq.value_dropped", reason)]
        return dataclasses.replace(record, value=b"", headers=headers)
    context = [
        (name, value) for name, value in record.headers if name.startswith("dlq.")
    ]
    if record.key is not None or len(context) < len(record.headers):
        headers = [*context, ("dlq.key_and_headers_dropped", reason)]
        return dataclasses.replace(record, key=None, headers=headers)
    minimal: RecordHeaders = []
    for name, value in context:
        if name in _DROPPED_MARKERS:
            # The marker stays, without its reason, so that a dropped value
            # can still be distinguished from an empty one.
            minimal.append((name, b""))
        elif name == "dlq.error" and value:
            minimal.append((name, value[:_MINIMAL_ERROR_BYTES]))
        elif name in _MINIMAL_DEAD_LETTER_HEADERS:
            minimal.append((name, value))
    if minimal == record.headers:
        return record
    return dataclasses.replace(record, headers=minimal)


def _dead_letter_record(
    envelope: Envelope, status: int, error: str, attempts: int
) -> Envelope:
    context = {
        "dlq.source.topic": "",
        "dlq.source.partition": "",
        "dlq.source.offset": "",
        "dlq.status": str(status),
        "dlq.error": error[:1000],
        "dlq.attempts": str(attempts),
    }
    for name, value in _position_fields(envelope).items():
        context[f"dlq.source.{name}"] = str(value)
    headers = list(envelope.headers)
    headers.extend((name, value.encode()) for name, value in context.items())
    return Envelope(
        value=envelope.value,
        key=envelope.key,
        headers=headers,
        id=envelope.id,
        traceparent=envelope.traceparent,
        null_value=envelope.null_value,
    )
