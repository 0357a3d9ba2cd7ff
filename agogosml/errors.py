"""Exceptions raised by agogosml.

Every exception derives from `AgogosmlError`::

    AgogosmlError
    ├── ConfigurationError      a setting is invalid; the service cannot start
    ├── TransportError          a source or sink failed; see ``retriable``
    │   ├── SourceError         fetching or committing failed
    │   └── SinkError           a record was not acknowledged by the sink
    └── AppRequestError         the model app rejected or failed a request
"""

from __future__ import annotations


class AgogosmlError(Exception):
    """Base class of every exception raised by agogosml."""


class ConfigurationError(AgogosmlError):
    """A setting is invalid: the message names the variable, the value and the fix."""


class TransportError(AgogosmlError):
    """A source or sink operation failed.

    Attributes:
        retriable: True when the same operation may succeed if tried again.
    """

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class SourceError(TransportError):
    """Fetching from or committing to a source failed."""


class SinkError(TransportError):
    """A sink did not acknowledge every record it was given.

    Attributes:
        failures: Message id of each record known not to be written, with the
            reason. Empty when the sink cannot tell records apart.
        too_large: True when the records in `failures` are over a size limit of
            the sink, so that only smaller records can be written.
        size_rejected: True when the destination rejected records as too large
            but the sink cannot tell whether a record of this call is over the
            limit alone. A retry may succeed, and a record that fails this way on
            every retry is too large.
        batch_rejected: True when the destination rejected a whole batch of
            records for one invalid record, and the batch may hold records of
            other calls. A retry may succeed, and a record that fails this way
            on every retry is invalid.
    """

    def __init__(
        self,
        message: str,
        *,
        retriable: bool = True,
        failures: dict[str, str] | None = None,
        too_large: bool = False,
        size_rejected: bool = False,
        batch_rejected: bool = False,
    ) -> None:
        super().__init__(message, retriable=retriable)
        self.failures = failures or {}
        self.too_large = too_large
        self.size_rejected = size_rejected
        self.batch_rejected = batch_rejected


class AppRequestError(AgogosmlError):
    """The model app responded to a request with an error status, or not at all.

    Attributes:
        status: HTTP status, or 0 when no response arrived (connection error, timeout).
        url: The URL that was requested.
        retriable: True for connection errors, timeouts, 429 and 5xx.
    """

    def __init__(self, message: str, *, status: int, url: str) -> None:
        super().__init__(message)
        self.status = status
        self.url = url
        self.retriable = is_retriable_status(status)


def is_retriable_status(status: int) -> bool:
    """Return whether a request that ended with `status` may succeed on a retry.

    Status 0 stands for a connection error or a timeout. A redirect (3xx) is
    retried too: redirects are not followed, so it means a misconfigured URL that
    an operator can fix, not a bad message.
    """
    return (
        status == 0
        or 300 <= status < 400
        or status == 408
        or status == 429
        or status >= 500
    )
