"""JSON Lines file sink with group commit: one fsync covers every waiting request."""

from __future__ import annotations

import asyncio
import base64
import errno
import logging
import os
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from typing import BinaryIO, TypeVar

import orjson

from agogosml import exact_json
from agogosml.envelope import Envelope
from agogosml.errors import ConfigurationError, SinkError
from agogosml.transports.base import Sink

logger = logging.getLogger(__name__)

ResultT = TypeVar("ResultT")

#: How often a sink whose last write failed checks whether it can write again.
RETRY_INTERVAL_SECONDS = 1.0

#: How long a write may take before the sink counts as not connected, such as
#: a write to a named pipe that no process reads, or to a hung network file system.
STALL_SECONDS = 10.0

#: Maximum attempts of one write whose file is deleted before the write ends.
#: Each attempt after the first goes to a new file at the path.
MAX_WRITES_AFTER_DELETION = 3


class FileSink(Sink):
    """Append one JSON object per record: ``{"id", "key", "headers", "value"}``.

    `send` returns after the lines are written and, with `fsync`, on disk.
    Concurrent calls share one write and one fsync, so the cost of durability is
    paid per flush, not per record. The value is embedded as JSON when it parses,
    else as a string (`encode_line`). Only a regular file is fsynced, because
    fsync fails with EINVAL on a pipe, a FIFO or a terminal.

    After a failed write the sink is not connected, and every
    `retry_interval_seconds` it checks whether the file can take data again. A
    regular file needs free space and a successful fsync. Other files count as
    recovered after one interval, and the next write shows whether they are.

    `variable` names the setting that `path` came from, for the error raised
    when the file cannot be opened.
    """

    def __init__(
        self,
        path: str,
        *,
        fsync: bool = True,
        retry_interval_seconds: float = RETRY_INTERVAL_SECONDS,
        variable: str = "WRITER_OUTPUT",
    ) -> None:
        self._path = path
        self._variable = variable
        self._fsync = fsync and path != "-"
        self._regular_file = False
        self._retry_interval = retry_interval_seconds
        self._file: BinaryIO | None = None
        self._buffer: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._failure: str | None = None
        self._recovery: asyncio.Task[None] | None = None
        #: Why the sink counts as not connected while a write does not return.
        self._stalled: str | None = None

    @property
    def connected(self) -> bool:
        """Whether the file is open and neither the last write nor check failed."""
        return (
            self._file is not None and self._failure is None and self._stalled is None
        )

    @property
    def unavailable_reason(self) -> str:
        """Why the sink is not connected, for error responses."""
        if self._failure is not None:
            return (
                f"{self._failure}; the sink checks every "
                f"{self._retry_interval:g} s whether it can write again"
            )
        if self._stalled is not None:
            return self._stalled
        return super().unavailable_reason

    async def start(self) -> None:
        """Open the file for appending."""
        if self._path == "-":
            self._file = sys.stdout.buffer
        else:
            try:
                # Unbuffered, so bytes of a failed write cannot linger in a buffer
                # and reach the file with a later flush.
                self._file = open(self._path, "ab+", buffering=0)  # noqa: SIM115
                if self._file.seekable():
                    self._end_torn_line(self._file)
                self._regular_file = stat.S_ISREG(os.fstat(self._file.fileno()).st_mode)
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot open output file {self._path!r}: {exc.strerror}; check "
                    f"{self._variable}"
                ) from exc
            if self._fsync and self._regular_file:
                self._sync_directory()
        logger.info("file sink started", extra={"path": self._path})

    def _sync_directory(self) -> None:
        """Make the file's directory entry durable, as a new file's fsync does not.

        Without it, a file created at start-up could vanish in a power loss
        together with the records acknowledged in it.
        """
        directory = os.path.dirname(os.path.abspath(self._path))
        try:
            sync_directory(directory)
        except OSError as exc:
            assert self._file is not None
            self._file.close()
            self._file = None
            fix = "put the file on a local file system"
            if self._variable == "WRITER_OUTPUT":
                fix += (
                    ", or turn fsync off (WRITER_FSYNC=false) if losing "
                    "acknowledged records in a power loss is acceptable"
                )
            raise SinkError(
                f"cannot make output file {self._path!r} durable: fsync of its "
                f"directory {directory!r} failed: {exc.strerror}; {fix}",
                retriable=False,
            ) from exc

    def _end_torn_line(self, file: BinaryIO) -> None:
        """Start on a new line if a crash left the last line without its newline.

        That line was never acknowledged (acknowledgement follows the whole
        write), so it stays as it is, and new records do not join it.
        """
        if file.seek(0, os.SEEK_END) == 0:
            return
        file.seek(-1, os.SEEK_END)
        if file.read(1) != b"\n":
            logger.warning(
                "output file %s ends with an incomplete line; it is left as it is "
                "and writing continues on a new line",
                self._path,
            )
            file.write(b"\n")
            file.flush()

    async def stop(self) -> None:
        """Wait for pending writes and close the file."""
        if self._recovery is not None:
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._file is not None and self._path != "-":
            try:
                self._file.close()
            except OSError as exc:
                logger.error("closing output file %s failed: %s", self._path, exc)
        self._file = None
        logger.info("file sink stopped", extra={"path": self._path})

    async def send(self, envelopes: Sequence[Envelope]) -> None:
        """Append the envelopes and wait until they are flushed."""
        if self._file is None:
            raise SinkError("file sink is not started")
        # Encoded before any line is buffered, so that a request whose encoding
        # fails adds no line that no request waits for.
        lines = [encode_line(envelope) for envelope in envelopes]
        self._buffer.extend(lines)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all())
        await future

    async def _flush_all(self) -> None:
        while self._buffer:
            lines, self._buffer = self._buffer, []
            waiters, self._waiters = self._waiters, []
            try:
                await self._write_watched(b"".join(lines), len(lines))
            except OSError as exc:
                logger.error("writing %s failed: %s", self._path, exc)
                error = SinkError(f"writing output file {self._path!r} failed: {exc}")
                self._fail(str(error))
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(error)
                continue
            self._failure = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _write_watched(self, data: bytes, count: int) -> None:
        """Write `data` on a thread; while it takes over `STALL_SECONDS`, be not ready.

        The write itself goes on, because a thread cannot be stopped; the
        requests that wait for it time out at their clients, which retry.
        """
        writing = asyncio.ensure_future(run_in_daemon_thread(self._write, data))
        try:
            await asyncio.wait_for(asyncio.shield(writing), STALL_SECONDS)
            return
        except TimeoutError:
            self._stalled = (
                f"writing {count} records to {self._path!r} has not finished after "
                f"{STALL_SECONDS:g} s; check that the file can take data, such as "
                "a named pipe that a reader drains"
            )
            logger.error(self._stalled)
        try:
            await writing
        finally:
            logger.info("the write to %s finished", self._path)
            self._stalled = None

    def _write(self, data: bytes) -> None:
        """Append `data` whole to the file at the path, or raise.

        A regular file deleted after `_follow_path` checked it, but before
        its write ended, has the records under no name. They would be
        acknowledged and lost, so they are written again into a new file.
        """
        if not self._regular_file:
            self._append(data)
            return
        for _ in range(MAX_WRITES_AFTER_DELETION):
            self._follow_path()
            self._append(data)
            if not self._deleted():
                return
            logger.warning(
                "output file %s was deleted while %d bytes were written to it; "
                "writing them again at that path",
                self._path,
                len(data),
            )
        raise OSError(
            errno.ENOENT,
            f"{self._path!r} was deleted during each of "
            f"{MAX_WRITES_AFTER_DELETION} writes; stop the program that deletes it",
        )

    def _deleted(self) -> bool:
        """Return whether the open file has no name left.

        The path is checked too, because a file system that does not count
        links may report 0 for a file that still has a name.
        """
        assert self._file is not None
        opened = os.fstat(self._file.fileno())
        if opened.st_nlink > 0:
            return False
        try:
            named = os.stat(self._path)
        except FileNotFoundError:
            return True
        return not _same_file(named, opened)

    def _append(self, data: bytes) -> None:
        """Append `data` whole, or cut the file back to where it was and raise."""
        assert self._file is not None
        seekable = self._file.seekable()
        start = self._file.seek(0, os.SEEK_END) if seekable else 0
        try:
            view = memoryview(data)
            while view:
                written = self._file.write(view)
                view = view[written or 0 :]
            self._file.flush()
            if self._fsync and self._regular_file:
                os.fsync(self._file.fileno())
        except OSError:
            if seekable:
                self._cut_back(start)
            raise

    def _follow_path(self) -> None:
        """Reopen the path if the open file was moved or deleted since.

        Log rotation renames the file, and a user may delete it: writing on
        into the open file would put acknowledged records where nothing reads
        them. The records written before stay in the moved file.

        Raises:
            OSError: The path now names something other than a regular file,
                or the new file cannot be opened.
        """
        assert self._file is not None
        opened = os.fstat(self._file.fileno())
        try:
            named = os.stat(self._path)
        except FileNotFoundError:
            change = "was deleted or moved"
        else:
            if _same_file(named, opened):
                return
            self._check_regular(named)
            change = "was replaced by another file"
        directory = self._check_directory()
        replacement = open(self._path, "ab+", buffering=0)  # noqa: SIM115
        self._file.close()
        self._file = replacement
        self._end_torn_line(replacement)
        if self._fsync:
            sync_directory(directory)
        logger.warning(
            "output file %s %s since the last write; writing on at that path",
            self._path,
            change,
        )

    def _check_regular(self, named: os.stat_result) -> None:
        """Raise OSError unless `named`, the status of the path, is a regular file."""
        if stat.S_ISREG(named.st_mode):
            return
        raise OSError(
            errno.EINVAL,
            f"{self._path!r} is now not a regular file; put the output file back "
            f"there or restart the {self._service()} with another {self._variable}",
        )

    def _check_directory(self) -> str:
        """Return the directory of the path, or raise OSError if it is gone."""
        directory = os.path.dirname(os.path.abspath(self._path))
        if not os.path.isdir(directory):
            raise OSError(
                errno.ENOENT,
                f"the directory {directory!r} of the output file no longer exists; "
                f"create it again or restart the {self._service()} with another "
                f"{self._variable}",
            )
        return directory

    def _service(self) -> str:
        """Return the service whose setting `variable` is, for error messages."""
        return "writer" if self._variable.startswith("WRITER_") else "reader"

    def _fail(self, failure: str) -> None:
        """Mark the sink not connected, and check in the background for recovery."""
        self._failure = failure
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover())

    async def _recover(self) -> None:
        while self._failure is not None and self._file is not None:
            await asyncio.sleep(self._retry_interval)
            try:
                await run_in_daemon_thread(self._check_writable)
            except OSError as exc:
                self._failure = f"writing output file {self._path!r} failed: {exc}"
                continue
            logger.info("output file %s can be written again", self._path)
            self._failure = None

    def _check_writable(self) -> None:
        """Raise OSError unless the regular file has free space and fsync works.

        A path that something other than a regular file took, such as a
        directory, or whose directory is gone fails the check too, because the
        next write would fail.
        """
        if self._file is None or not self._regular_file:
            return
        try:
            self._check_regular(os.stat(self._path))
        except FileNotFoundError:
            self._check_directory()
        descriptor = self._file.fileno()
        filesystem = os.fstatvfs(descriptor)
        free_blocks = filesystem.f_bfree if os.geteuid() == 0 else filesystem.f_bavail
        if free_blocks == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(descriptor)

    def _cut_back(self, size: int) -> None:
        assert self._file is not None
        try:
            self._file.truncate(size)
        except OSError as exc:
            logger.error(
                "cutting %s back after a failed write failed: %s", self._path, exc
            )


def _same_file(first: os.stat_result, second: os.stat_result) -> bool:
    """Return whether two file statuses are of the same file."""
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def sync_directory(directory: str | os.PathLike[str]) -> None:
    """Flush `directory` to disk, so that files created or renamed in it stay.

    Raises:
        OSError: when the directory cannot be opened or flushed.
    """
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


async def run_in_daemon_thread(
    function: Callable[..., ResultT], *args: object
) -> ResultT:
    """Run a blocking call in a new daemon thread and return its result.

    ``asyncio.to_thread`` uses the default executor, whose threads the
    interpreter joins at exit. A write to a FIFO that no process reads blocks
    until one does, so in that executor it would keep the service from
    exiting after its shutdown timeout. A daemon thread is abandoned at exit.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[ResultT] = loop.create_future()

    def deliver(result: ResultT | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            outcome: tuple[ResultT | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        try:
            loop.call_soon_threadsafe(deliver, *outcome)
        except RuntimeError:
            pass  # the event loop closed while the call ran

    threading.Thread(target=run, name="file-sink-io", daemon=True).start()
    return await future


def encode_line(envelope: Envelope) -> bytes:
    """Encode an envelope as one JSON Lines record.

    A JSON value is embedded as it is, except that line breaks, which valid JSON
    can only have as whitespace, become spaces. Any other value is embedded as a
    string marked ``"value_encoding": "text"``, so that the text ``hello`` and
    the JSON string ``"hello"`` stay apart, or as base64 (marked ``"base64"``) if
    it is not UTF-8. A record without a value (a Kafka tombstone) has the value
    ``null`` and ``"value_encoding": "none"``, so that it differs from the JSON
    document ``null``. A header value that is not UTF-8 is stored as base64,
    its name mapped to ``"base64"`` in ``header_encodings``, and a null
    header value as ``null``.
    """
    key, key_is_base64 = envelope.key_text()
    value: object
    value_encoding = ""
    if envelope.null_value:
        value, value_encoding = None, "none"
    elif not exact_json.json_error(envelope.value):
        raw = envelope.value
        if b"\n" in raw or b"\r" in raw:
            raw = raw.replace(b"\r", b" ").replace(b"\n", b" ")
        value = orjson.Fragment(raw)
    else:
        try:
            value = envelope.value.decode("utf-8")
            value_encoding = "text"
        except UnicodeDecodeError:
            value = base64.b64encode(envelope.value).decode("ascii")
            value_encoding = "base64"
    headers: dict[str, str | None] = {}
    header_encodings: dict[str, str] = {}
    for name, header_value in envelope.record_headers():
        if header_value is None:
            headers[name] = None
            header_encodings.pop(name, None)
            continue
        try:
            headers[name] = header_value.decode("utf-8")
        except UnicodeDecodeError:
            headers[name] = base64.b64encode(header_value).decode("ascii")
            header_encodings[name] = "base64"
        else:
            header_encodings.pop(name, None)
    document: dict[str, object] = {
        "id": envelope.id,
        "key": key,
        "headers": headers,
        "value": value,
    }
    if header_encodings:
        document["header_encodings"] = header_encodings
    if key_is_base64:
        document["key_encoding"] = "base64"
    if value_encoding:
        document["value_encoding"] = value_encoding
    return orjson.dumps(document) + b"\n"
