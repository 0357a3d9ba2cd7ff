"""Log requests that wait for the app without spending attempts, rate-limited."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from agogosml.reader.client import Outcome

logger = logging.getLogger(__name__)

#: While requests wait for the app without spending attempts (it is
#: unreachable, not ready, or asked to wait with Retry-After), the reader logs
#: the first wait and then at most one WARNING per this many seconds.
WAIT_LOG_INTERVAL_SECONDS = 300.0


@dataclass
class Stall:
    """The waits of one delivery: requests of it that failed without spending attempts.

    Attributes:
        count: Waits so far.
        messages: Messages of the delivery at its last wait.
    """

    count: int = 0
    messages: int = 0


class WaitLog:
    """Count the deliveries that wait for the app, and log them for the whole reader.

    One outage makes every lane wait at once: with READER_CONCURRENCY=500 in
    unordered order, 500 requests get the same 503 within a millisecond. So
    the limit of one WARNING per `WAIT_LOG_INTERVAL_SECONDS` holds for the
    reader, not per lane. Each line counts the requests and messages that wait
    at that time. Once no request waits any more, it logs at INFO that the
    app responds again, if a WARNING came before it.

    NOTE: an outage that begins and ends within the interval after the last
    WARNING gets no line of its own. Its waits are counted only in the
    ``waits`` field of the next WARNING, and in agogosml_retries_total.
    """

    def __init__(self, max_attempts: int) -> None:
        self._max_attempts = max_attempts
        self._logged_at = float("-inf")
        self._waits_since_log = 0
        self._requests = 0
        self._messages = 0
        self._recovery_due = False

    def waiting(
        self,
        stall: Stall,
        messages: int,
        message_id: str,
        outcome: Outcome,
        delay: float,
    ) -> None:
        """Count a wait of `stall`, whose delivery has `messages`, and log if due.

        `message_id` is the first message of the delivery, `outcome` the first
        of the failed request, and `delay` the seconds that the delivery waits
        before it sends the request again.
        """
        if stall.count == 0:
            self._requests += 1
        stall.count += 1
        self._messages += messages - stall.messages
        stall.messages = messages
        self._waits_since_log += 1
        now = asyncio.get_running_loop().time()
        if now - self._logged_at < WAIT_LOG_INTERVAL_SECONDS:
            return
        self._log_waiting(message_id, outcome, delay)
        self._logged_at = now
        self._waits_since_log = 0
        self._recovery_due = True

    def ended(self, stall: Stall, *, recovered: bool) -> None:
        """Stop counting `stall`: its delivery got a response or stopped waiting.

        `recovered` is True when the app responded in a way that ends the wait.
        """
        if stall.count == 0:
            return
        self._requests -= 1
        self._messages -= stall.messages
        stall.count = stall.messages = 0
        if recovered and self._requests == 0 and self._recovery_due:
            self._recovery_due = False
            logger.info(
                "the app responds again; no request waits for it any more",
                extra={"waits": self._waits_since_log},
            )

    def _log_waiting(self, message_id: str, outcome: Outcome, delay: float) -> None:
        fields = {
            "message_id": message_id,
            "status": outcome.status,
            "error": outcome.error,
            "waiting_requests": self._requests,
            "waiting_messages": self._messages,
            # Waits since the previous line, this one included.
            "waits": self._waits_since_log,
        }
        if outcome.retry_after_seconds is not None:
            logger.warning(
                "the app responded %d with Retry-After, so %d request(s) with %d "
                "message(s) wait for it without using up their %d attempts, this "
                "one for %.1f s. The next such line comes %g s after this one at "
                "the earliest",
                outcome.status,
                self._requests,
                self._messages,
                self._max_attempts,
                delay,
                WAIT_LOG_INTERVAL_SECONDS,
                extra=fields,
            )
            return
        logger.warning(
            "the app is unreachable or not ready, so %d request(s) with %d "
            "message(s) wait for it without using up their %d attempts. Check "
            "that the app runs at READER_APP_URL and that its readiness check "
            "passes. The next such line comes %g s after this one at the "
            "earliest",
            self._requests,
            self._messages,
            self._max_attempts,
            WAIT_LOG_INTERVAL_SECONDS,
            extra=fields,
        )
