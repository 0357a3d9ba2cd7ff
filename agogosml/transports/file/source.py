"""JSON Lines file source: each non-empty line is one message."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import select
import stat
import sys
import threading
from pathlib import Path
from typing import BinaryIO, NamedTuple

from agogosml.envelope import Envelope, Position
from agogosml.errors import SourceError
from agogosml.transports.base import OffsetTracker, TrackedSource

logger = logging.getLogger(__name__)

#: The UTF-8 byte order mark, which some editors write at the start of a file.
UTF8_BOM = b"\xef\xbb\xbf"

#: Default of `max_line_bytes`.
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024

#: Bytes read at a time while the rest of an overlong line is skipped.
SKIP_CHUNK_BYTES = 1024 * 1024

#: Bytes before the checkpoint offset whose digest the checkpoint records, so
#: that a restart can tell that the input was replaced.
FINGERPRINT_BYTES = 4096


class _Overlong(NamedTuple):
    """A line over the length limit, returned instead of its content."""

    consumed: int  # bytes read, line break included
    length: int  # bytes of the line, line break not counted


class FileSource(TrackedSource):
    """Read a JSON Lines file (or stdin with ``-``) line by line.

    The position of a message is the byte offset of its line. With a checkpoint
    path, the finished prefix is stored there on every commit and a restart
    resumes after it, so a file source gives the same at-least-once guarantee as
    Kafka.

    With `follow`, the source keeps reading lines appended after the current end,
    as ``tail -f`` does, and a last line without its newline waits until the line
    is complete. Without it, the end of the file is the end of the stream, and a
    last line without a newline is a message too.

    Stdin and a named pipe (any input that is not a regular file) are streams:
    their end of file ends them, even with `follow`, and they cannot be read
    again. So they are not `replayable`: at shutdown the reader sends the lines
    already read instead of leaving them uncommitted, and a checkpoint is not
    read at start.

    A line longer than `max_line_bytes` (its line break not counted) is not
    held in memory: the source skips it and returns a message without a value
    whose `problem` names its size, which the reader dead-letters.

    A followed file that is truncated, or replaced by a new file at its path
    (log rotation), is read again from its start, as ``tail -F`` does. Lines
    read from the file before are still delivered. Their positions have the
    partition number 0, and each truncation or replacement adds 1, so that
    message ids stay unique within a run.
    """

    def __init__(
        self,
        path: str,
        *,
        checkpoint_path: Path | None = None,
        commit_interval_seconds: float = 1.0,
        follow: bool = False,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        self._path = path
        self._follow = follow
        self._max_line_bytes = max_line_bytes
        self._partial = b""
        self._skipped = 0  # bytes skipped so far of an overlong line
        self._skipped_tail = b""  # the last of those bytes
        self._stream_fd = -1  # file descriptor of stdin or a named pipe
        self._stream_closed = False
        self._reading_stopped = False
        self.replayable = path != "-"
        self._checkpoint = checkpoint_path
        self._commit_interval = commit_interval_seconds
        self._tracker = OffsetTracker()
        self._part = 0  # partition number: truncations and replacements so far
        self._reopen_error = ""  # why the replacement file cannot be opened
        # Held while lines are read and while a commit reads the file, because
        # reading may replace the file object.
        self._file_lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._offset = 0
        self._paused = False
        self._committed: tuple[int, int] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self.at_end = False

    @property
    def connected(self) -> bool:
        """Whether the file is open."""
        return self._file is not None

    async def start(self) -> None:
        """Open the file and seek past the checkpoint, if any."""
        if self._path == "-":
            self._file = sys.stdin.buffer
            self._stream_fd = sys.stdin.fileno()
        else:
            self._file = self._open_input()
            try:
                fingerprint = None
                if stat.S_ISREG(os.fstat(self._file.fileno()).st_mode):
                    self._offset, fingerprint = self._read_checkpoint()
                else:
                    self._stream_fd = self._file.fileno()
                if self._offset:
                    self._check_offset_in_file(self._file, fingerprint)
                    self._file.seek(self._offset)
            except SourceError:
                self._file.close()
                self._file = None
                raise
        if self._stream_fd >= 0:
            self.replayable = False
            self._follow = False
            if self._checkpoint is not None:
                logger.warning(
                    "READER_CHECKPOINT_PATH is ignored for %s, which is stdin or "
                    "a named pipe and cannot be read again from an offset",
                    self._path,
                )
        self._tracker.assign(self._path, 0)
        self._commit_task = asyncio.create_task(self._commit_periodically())
        logger.info(
            "file source started", extra={"path": self._path, "offset": self._offset}
        )

    def _open_input(self) -> BinaryIO:
        """Open the input without blocking, even a named pipe that has no writer yet.

        The descriptor of a regular file is switched back to blocking. A named
        pipe stays non-blocking and is read only once `select` reports data.
        """
        try:
            descriptor = os.open(self._path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise SourceError(
                f"cannot open input file {self._path!r}: {exc.strerror}; "
                "check READER_INPUT",
                retriable=False,
            ) from exc
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            os.close(descriptor)
            raise SourceError(
                f"input file {self._path!r} is a directory; set READER_INPUT to a "
                "JSON Lines file, or '-' for stdin",
                retriable=False,
            )
        if stat.S_ISREG(mode):
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")

    def _check_offset_in_file(self, file: BinaryIO, fingerprint: str | None) -> None:
        """Reject a checkpoint that no longer fits the input, which changed since.

        A checkpoint is the start of a line or the end of the file. An offset
        past the end, one inside the file that does not follow a line break,
        or bytes before the offset that differ from those read then
        (`fingerprint`) mean that the input was truncated, replaced or edited
        since.
        """
        size = os.fstat(file.fileno()).st_size
        problem = ""
        if self._offset > size:
            problem = f"past the end of {self._path!r} ({size} bytes)"
        elif fingerprint is not None and fingerprint != _fingerprint(
            file, self._offset
        ):
            problem = (
                f"but the bytes of {self._path!r} before that offset differ from "
                "those read then"
            )
        # An offset equal to the size is fine: a last line without a line
        # break ends there.
        elif self._offset < size:
            file.seek(self._offset - 1)
            if file.read(1) != b"\n":
                problem = f"inside a line of {self._path!r}, not at the start of one"
        if problem:
            raise SourceError(
                f"checkpoint file {str(self._checkpoint)!r} contains offset "
                f"{self._offset}, {problem}, so the input was truncated or replaced "
                "after the checkpoint. Restore the input, or delete the checkpoint "
                "to read it from the beginning",
                retriable=False,
            )

    def _read_checkpoint(self) -> tuple[int, str | None]:
        """Return the offset of the checkpoint and its fingerprint, if any.

        A checkpoint is ``<offset> sha256:<hex digest>``. A checkpoint of only
        the offset is accepted too, without the fingerprint check.
        """
        if self._checkpoint is None:
            return 0, None
        if self._checkpoint.is_dir() or not self._checkpoint.parent.is_dir():
            raise SourceError(
                f"checkpoint path {str(self._checkpoint)!r} is a directory or lies in "
                "a directory that does not exist; set READER_CHECKPOINT_PATH to a "
                "file path in an existing directory",
                retriable=False,
            )
        if not self._checkpoint.exists():
            return 0, None
        text = self._checkpoint.read_bytes().decode("utf-8", "backslashreplace").strip()
        offset, _, fingerprint = text.partition(" ")
        # Only ASCII digits: int() would also take "1_0", "+5" or other scripts.
        if not (offset.isascii() and offset.isdigit()) or (
            fingerprint and not _is_fingerprint(fingerprint)
        ):
            raise SourceError(
                f"checkpoint file {str(self._checkpoint)!r} contains {text[:60]!r}, "
                "not a byte offset; delete it to start from the beginning",
                retriable=False,
            )
        return int(offset), fingerprint or None

    async def stop(self) -> None:
        """Write the final checkpoint and close the file."""
        if self._commit_task is not None:
            self._commit_task.cancel()
            await asyncio.gather(self._commit_task, return_exceptions=True)
        try:
            self.commit()
        except OSError as exc:
            logger.error("writing the final checkpoint failed: %s", exc)
        if self._file is not None and self._path != "-":
            self._file.close()
        self._file = None
        logger.info("file source stopped", extra={"path": self._path})

    def stop_reading(self) -> None:
        """Read nothing more from a stream; `fetch` returns the lines already read.

        A last line without its newline is returned too, as at the end of a
        stream. A regular file is at its end at once.
        """
        if self._stream_fd >= 0:
            self._stream_closed = True
            self._reading_stopped = True
        else:
            self.at_end = True

    async def fetch(self, max_messages: int, timeout_seconds: float) -> list[Envelope]:
        """Read up to `max_messages` lines; returns [] while paused or at the end."""
        if self._paused or self.at_end or self._file is None:
            await asyncio.sleep(min(timeout_seconds, 0.05))
            return []
        return await asyncio.to_thread(self._read_lines, max_messages)

    def _read_lines(self, max_messages: int) -> list[Envelope]:
        with self._file_lock:
            return self._read_lines_locked(max_messages)

    def _read_lines_locked(self, max_messages: int) -> list[Envelope]:
        envelopes: list[Envelope] = []
        while len(envelopes) < max_messages:
            line = self._next_line()
            if line is None:
                break
            start = self._offset
            if isinstance(line, _Overlong):
                self._offset += line.consumed
                envelopes.append(self._overlong_message(start, line.length))
                continue
            self._offset += len(line)
            value = line.strip()
            if start == 0 and value.startswith(UTF8_BOM):
                # Editors on Windows often start a UTF-8 file with a byte order
                # mark, which is not part of the first record.
                value = value[len(UTF8_BOM) :].strip()
            if not value:
                continue
            position = Position(self._path, self._part, start, self._offset, 1)
            self._tracker.register(position)
            envelopes.append(Envelope(value=value, position=position))
        return envelopes

    def _overlong_message(self, start: int, size: int) -> Envelope:
        position = Position(self._path, self._part, start, self._offset, 1)
        self._tracker.register(position)
        problem = (
            f"line at byte offset {start} is {size} bytes long, more than "
            f"READER_MAX_LINE_BYTES ({self._max_line_bytes}); it was skipped "
            "unread. Split the record, or raise READER_MAX_LINE_BYTES"
        )
        logger.warning(
            "skipped a line of %d bytes, over READER_MAX_LINE_BYTES (%d)",
            size,
            self._max_line_bytes,
            extra={"path": self._path, "offset": start},
        )
        return Envelope(value=b"", position=position, problem=problem)

    def _next_line(self) -> bytes | _Overlong | None:
        """Return the next complete line, or None at the current end of the file.

        A line over the length limit comes back as its length (`_Overlong`).

        NOTE: lines appended to a replaced file after the source moved on to
        the new file are not read, as with ``tail -F``.
        """
        if self._stream_fd >= 0:
            return self._next_stream_line()
        assert self._file is not None
        while True:
            if self._skipped:
                chunk = self._file.readline(SKIP_CHUNK_BYTES)
                if chunk.endswith(b"\n"):
                    return self._end_overlong(chunk)
                self._skip(chunk)
                if len(chunk) == SKIP_CHUNK_BYTES:
                    continue
            else:
                # Room for the longest line and a "\r\n" line break. A line
                # that fills it without a "\n" is too long.
                limit = self._max_line_bytes + 2 - len(self._partial)
                chunk = self._file.readline(limit)
                self._partial += chunk
                if chunk.endswith(b"\n"):
                    line, self._partial = self._partial, b""
                    return self._checked(line)
                if len(self._partial) > self._max_line_bytes + 1:
                    self._skip(self._partial)
                    self._partial = b""
                    continue
            # At the current end of the file, inside a line or between lines.
            if self._follow:
                if self._restart_if_replaced():
                    continue
                return None  # wait for the rest of the line
            self.at_end = True
            if self._skipped:
                return self._end_overlong(b"")
            line, self._partial = self._partial, b""
            return self._checked(line) if line else None

    def _restart_if_replaced(self) -> bool:
        """Read the followed file from its start if it was truncated or replaced.

        Returns whether it was. The bytes of a line that was not finished
        before are dropped with a warning.
        """
        assert self._file is not None
        status = os.fstat(self._file.fileno())
        if status.st_size < self._file.tell():
            change = f"was truncated to {status.st_size} bytes"
            self._file.seek(0)
        else:
            try:
                current = os.stat(self._path)
            except OSError:
                return False  # renamed, and the new file is not there yet
            if (current.st_ino, current.st_dev) == (status.st_ino, status.st_dev):
                return False
            try:
                replacement = self._open_input()
            except SourceError as exc:
                if str(exc) != self._reopen_error:  # logged once, not every poll
                    logger.warning("cannot open the new input file yet: %s", exc)
                self._reopen_error = str(exc)
                return False
            self._reopen_error = ""
            self._file.close()
            self._file = replacement
            change = "was replaced by a new file"
        dropped = len(self._partial) + self._skipped
        self._partial, self._skipped, self._skipped_tail = b"", 0, b""
        self._offset = 0
        self._part += 1
        self._tracker.assign(self._path, self._part)
        logger.warning(
            "input file %s %s; reading it from the start%s",
            self._path,
            change,
            f", without the {dropped} bytes of an unfinished line" if dropped else "",
            extra={"path": self._path, "partition": self._part},
        )
        return True

    def _checked(self, line: bytes) -> bytes | _Overlong:
        """Return a line read whole, or `_Overlong` if it is over the limit."""
        length = _length_without_break(line)
        if length > self._max_line_bytes:
            return _Overlong(len(line), length)
        return line

    def _skip(self, data: bytes) -> None:
        """Count `data` as skipped bytes of an overlong line."""
        self._skipped += len(data)
        if data:
            self._skipped_tail = data[-1:]

    def _end_overlong(self, rest: bytes) -> _Overlong:
        """End skipping an overlong line, whose `rest` was read last."""
        ending = self._skipped_tail + rest
        consumed = self._skipped + len(rest)
        self._skipped, self._skipped_tail = 0, b""
        line_break = len(ending) - _length_without_break(ending)
        return _Overlong(consumed, consumed - line_break)

    def _next_stream_line(self) -> bytes | _Overlong | None:
        """Return the next line of stdin or a pipe, waiting at most 50 ms for input.

        Reads the file descriptor directly, because a buffered readline would
        block until a whole line or the end arrives, and stop would wait for it.
        """
        newline = self._partial.find(b"\n")
        if newline < 0 and not self._stream_closed:
            ready, _, _ = select.select([self._stream_fd], [], [], 0.05)
            if ready:
                chunk = _read_ready(self._stream_fd)
                if chunk is not None:
                    self._partial += chunk
                    self._stream_closed = not chunk
            newline = self._partial.find(b"\n")
        if newline >= 0:
            line = self._partial[: newline + 1]
            self._partial = self._partial[newline + 1 :]
            if self._skipped:
                return self._end_overlong(line)
            return self._checked(line)
        if self._skipped or len(self._partial) > self._max_line_bytes + 1:
            self._skip(self._partial)
            self._partial = b""
        if not self._stream_closed:
            return None
        self.at_end = True
        if self._skipped:
            return self._end_overlong(b"")
        line, self._partial = self._partial, b""
        if line and self._reading_stopped:
            logger.warning(
                "reading %s stopped inside a line: its first %d bytes are sent "
                "as they are, and the rest stays unread",
                "stdin" if self._path == "-" else self._path,
                len(line),
                extra={"offset": self._offset},
            )
        return self._checked(line) if line else None

    async def pause(self) -> None:
        """Stop reading lines until `resume`."""
        self._paused = True

    async def resume(self) -> None:
        """Read lines again."""
        self._paused = False

    def commit(self) -> None:
        """Store the finished prefix in the checkpoint file, atomically.

        Raises:
            OSError: when the checkpoint cannot be written.
        """
        if self._checkpoint is None or self._stream_fd >= 0:
            return  # a stream cannot be read again from an offset
        with self._file_lock:
            part = self._part
            position = self._tracker.committable().get((self._path, part))
            if position is None or (part, position) == self._committed:
                return
            if self._file is None:
                return
            fingerprint = _fingerprint(self._file, position)
        temporary = self._checkpoint.with_name(self._checkpoint.name + ".tmp")
        with temporary.open("w") as file:
            file.write(f"{position} {fingerprint}")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self._checkpoint)
        directory = os.open(self._checkpoint.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # makes the rename itself durable
        finally:
            os.close(directory)
        self._committed = (part, position)

    async def _commit_periodically(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self._commit_interval)
            try:
                self.commit()
                failures = 0
            except OSError as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    logger.error(
                        "writing checkpoint %s failed %d times; will retry: %s",
                        self._checkpoint,
                        failures,
                        exc,
                    )


def _fingerprint(file: BinaryIO, offset: int) -> str:
    """Return the digest of up to `FINGERPRINT_BYTES` bytes before `offset`."""
    start = max(0, offset - FINGERPRINT_BYTES)
    data = os.pread(file.fileno(), offset - start, start)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _is_fingerprint(text: str) -> bool:
    """Return whether `text` has the form that `_fingerprint` returns."""
    digest = text.removeprefix("sha256:")
    return (
        digest != text
        and len(digest) == 64
        and all(character in "0123456789abcdef" for character in digest)
    )


def _length_without_break(line: bytes) -> int:
    """Return the length of a line without its LF or CRLF line break."""
    if line.endswith(b"\r\n"):
        return len(line) - 2
    if line.endswith(b"\n"):
        return len(line) - 1
    return len(line)


def _read_ready(descriptor: int) -> bytes | None:
    """Read what `select` reported, or return None if another reader took it."""
    try:
        return os.read(descriptor, 65536)
    except BlockingIOError:
        return None
