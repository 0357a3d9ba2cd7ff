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
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

from agogosml.envelope import Envelope, Position
from agogosml.errors import ConfigurationError, SourceError
from agogosml.transports.base import OffsetTracker, TrackedSource
from agogosml.transports.file.sink import sync_directory

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

#: Default of `rotate_wait_seconds`.
DEFAULT_ROTATE_WAIT_SECONDS = 5.0

#: Bytes last read from a followed file that are compared with the file on
#: every read, so that a file overwritten from its start is read again.
READ_TAIL_BYTES = 64


class _Overlong(NamedTuple):
    """A line over the length limit, returned instead of its content."""

    consumed: int  # bytes read, line break included
    length: int  # bytes of the line, line break not counted


class _Replaced(NamedTuple):
    """A followed file replaced by another at its path, with lines in flight."""

    file: BinaryIO
    start: int  # byte offset where reading it started


class _LaterFile(NamedTuple):
    """A file that replaced the checkpoint's file, named in the checkpoint.

    Its first `length` bytes (at most `FINGERPRINT_BYTES`) have the digest
    `digest`, so that a restart does not take another file that got its inode
    number after it was deleted.
    """

    device: int
    inode: int
    length: int
    digest: str

    def text(self) -> str:
        """Return the entry as the checkpoint writes it."""
        return f"then:{self.device}:{self.inode}:{self.length}:{self.digest}"

    def matches(self, file: BinaryIO) -> bool:
        """Return whether `file` starts with the bytes this entry names."""
        size = os.fstat(file.fileno()).st_size
        return size >= self.length and _fingerprint(file, self.length) == self.digest


class _Fragment(NamedTuple):
    """The start of a stream's line whose rest was not read, at shutdown."""

    data: bytes


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

    Stdin and a named pipe (any input that is not a regular file) are streams.
    The end of stdin ends it. A named pipe is opened again for the next writer
    with `follow`, and ends at its end of file without. Streams cannot be read
    again, so they are not `replayable`: at shutdown the reader sends the
    lines already read instead of leaving them uncommitted, and the checkpoint
    is ignored. The rest of a stream is lost, so a stop before its end logs a
    WARNING.

    A line longer than `max_line_bytes` (its line break not counted) is not
    held in memory: the source skips it and returns a message without a value
    whose `problem` names its size, which the reader dead-letters.

    A followed file that is truncated, overwritten from its start, or replaced
    by a new file at its path (log rotation), is read again from its start, as
    ``tail -F`` does. A replaced file is read on for `rotate_wait_seconds`
    first, for the lines that its writer adds before it opens the new file.
    Lines read from the file before are still delivered.
    Their positions have the partition number 0, and each restart adds 1, so
    that message ids stay unique within a run.

    A checkpoint records the file's device and inode numbers too. It stays in a
    replaced file until every line read from that file is finished, and then
    also names the files that replaced it after it. A restart that finds another
    file at the path looks for the checkpoint's file by its inode in the same
    directory and reads it on. It then reads each file named after it, found the
    same way, and last the new file at the path, each from its start.
    """

    def __init__(
        self,
        path: str,
        *,
        checkpoint_path: Path | None = None,
        commit_interval_seconds: float = 1.0,
        follow: bool = False,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        rotate_wait_seconds: float = DEFAULT_ROTATE_WAIT_SECONDS,
    ) -> None:
        self._path = path
        self._follow = follow
        # A named pipe read with `follow` is opened again after its writers
        # close it, for the next writer.
        self._reopen_pipe_at_end = False
        self._buffer = bytearray()  # stream bytes read but not yet returned
        self._scanned = 0  # length of the start of `_buffer` without a newline
        self._max_line_bytes = max_line_bytes
        self._partial = b""
        self._skipped = 0  # bytes skipped so far of an overlong line
        self._skipped_tail = b""  # the last of those bytes
        self._stream_fd = -1  # file descriptor of stdin or a named pipe
        self._stream_closed = False
        self._stream_ended = False  # whether the stream's end was read
        self._reading_stopped = False
        self._lines_read = 0  # messages returned, for the warning at a stop
        self._lines_finished = 0
        self.replayable = path != "-"
        self._checkpoint = checkpoint_path
        self._commit_interval = commit_interval_seconds
        self._tracker = OffsetTracker()
        self._part = 0  # partition number: truncations and replacements so far
        self._rotate_wait = rotate_wait_seconds
        self._rotation_seen: float | None = None  # when a replacement was found
        # Device and inode numbers of the file first found at the path after a
        # replacement. It is read next, even when it was rotated away again
        # within the rotate wait.
        self._rotation_target: tuple[int, int] | None = None
        self._part_start = 0  # byte offset where reading the current part started
        # Replaced files, by partition number, whose lines are not all finished.
        self._replaced: dict[int, _Replaced] = {}
        # After a restart, the device and inode numbers of the files that
        # replaced the checkpoint's file, to read before the file at the path.
        self._later_files: list[_LaterFile] = []
        self._reopen_error = ""  # why the replacement file cannot be opened
        self._read_tail = b""  # the last bytes read from a followed file
        self._restarted = False  # whether a restart awaits its checkpoint
        # Held while lines are read and while a commit reads the file, because
        # reading may replace the file object.
        self._file_lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._offset = 0
        self._paused = False
        self._committed: tuple[int, int, tuple[_LaterFile, ...]] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self.at_end = False

    @property
    def connected(self) -> bool:
        """Whether the file is open."""
        return self._file is not None

    async def start(self) -> None:
        """Open the file and seek past the checkpoint, if any.

        Raises:
            ConfigurationError: The input or the checkpoint cannot be used as
                READER_INPUT and READER_CHECKPOINT_PATH name them, such as an
                input file that does not exist.
        """
        try:
            await self._start()
        except SourceError as exc:
            if exc.retriable:
                raise
            raise ConfigurationError(str(exc)) from exc

    async def _start(self) -> None:
        if self._path == "-":
            if sys.stdin is None:
                raise SourceError(
                    "READER_INPUT is '-', but the reader was started with stdin "
                    "closed; give it the input on stdin, or set READER_INPUT to a "
                    "file path",
                    retriable=False,
                )
            self._file = sys.stdin.buffer
            self._stream_fd = sys.stdin.fileno()
        else:
            self._file = self._open_input()
            try:
                fingerprint = None
                if stat.S_ISREG(os.fstat(self._file.fileno()).st_mode):
                    checkpoint = self._read_checkpoint()
                    self._offset, fingerprint, identity, later = checkpoint
                    if (
                        self._follow
                        and identity is not None
                        and identity != _identity(self._file)
                        and not self._fits(self._file, fingerprint)
                    ):
                        self._later_files = later
                        fingerprint = self._open_rotated(identity, fingerprint)
                        if fingerprint is None:
                            # The checkpoint's file is gone: read the files
                            # that replaced it first, if any is left.
                            status = os.fstat(self._file.fileno())
                            replacement = self._open_later_file(status)
                            if replacement is not None:
                                self._file.close()
                                self._file = replacement
                    self._part_start = self._offset
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
            self._reopen_pipe_at_end = self._follow and self._path != "-"
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
            next_step = "check READER_INPUT"
            if isinstance(exc, FileNotFoundError):
                # READER_SOURCE defaults to file, so a Kafka reader that left it
                # unset fails here with its topic taken for a path.
                next_step += (
                    ", or set READER_SOURCE=kafka or eventhubs if it names a topic "
                    "or an event hub"
                )
            raise SourceError(
                f"cannot open input file {self._path!r}: {exc.strerror}; {next_step}",
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

    def _fits(self, file: BinaryIO, fingerprint: str | None) -> bool:
        """Return whether the checkpoint's bytes are those of `file`."""
        return self._offset <= os.fstat(file.fileno()).st_size and (
            fingerprint is None or fingerprint == _fingerprint(file, self._offset)
        )

    def _open_rotated(
        self, identity: tuple[int, int], fingerprint: str | None
    ) -> str | None:
        """Read on from the rotated file of the checkpoint, found by its inode.

        The checkpoint names a file that no longer has the input's path. When a
        file with its device and inode numbers is in the path's directory and
        fits the checkpoint, it becomes the file read, and the input's path is
        read from its start after it. Otherwise the path is read from its
        start, with a warning. Returns the fingerprint to check.
        """
        assert self._file is not None
        found = self._open_by_identity(
            identity, lambda file: self._fits(file, fingerprint)
        )
        if found is not None:
            self._file.close()
            self._file, name = found
            logger.info(
                "input file %s was replaced since the checkpoint; reading on "
                "from byte %d of the file it was, now %s, then %s from its start",
                self._path,
                self._offset,
                name,
                self._path,
                extra={"path": self._path, "offset": self._offset},
            )
            return fingerprint
        directory = os.path.dirname(self._path) or "."
        logger.warning(
            "input file %s was replaced since the checkpoint, and the file it was "
            "is no longer in %s; reading on from the start of the files that "
            "replaced it. Lines of the old file after byte %d may not have been "
            "delivered",
            self._path,
            directory,
            self._offset,
            extra={"path": self._path, "offset": self._offset},
        )
        self._offset = 0
        return None

    def _open_by_identity(
        self, identity: tuple[int, int], accept: Callable[[BinaryIO], bool]
    ) -> tuple[BinaryIO, str] | None:
        """Open the file of the input's directory with these device and inode numbers.

        Returns the open file and its path, or None when no such file is there
        or `accept` rejects it.
        """
        directory = os.path.dirname(self._path) or "."
        try:
            with os.scandir(directory) as entries:
                names = [
                    entry.path
                    for entry in entries
                    if entry.inode() == identity[1] and entry.is_file()
                ]
        except OSError:
            names = []
        for name in names:
            try:
                file = open(name, "rb")  # kept open while it is read
            except OSError:
                continue
            if _identity(file) == identity and accept(file):
                return file, name
            file.close()
        return None

    def _open_later_file(self, current: os.stat_result) -> BinaryIO | None:
        """Open the next file that replaced the checkpoint's file before a restart.

        Returns None when none is left to read before the file at the path, whose
        status is `current`. A file that is no longer in the directory is
        skipped with a warning, because its lines may not have been delivered.
        """
        while self._later_files:
            later = self._later_files.pop(0)
            identity = (later.device, later.inode)
            if identity == (current.st_dev, current.st_ino) and self._path_matches(
                later
            ):
                self._later_files.clear()  # the rest came after the path's file
                return None
            found = self._open_by_identity(identity, self._accepts(later))
            if found is not None:
                file, name = found
                logger.info(
                    "reading %s, which replaced the input file %s before the "
                    "restart, from its start",
                    name,
                    self._path,
                    extra={"path": self._path},
                )
                return file
            logger.warning(
                "a file that replaced the input file %s before the restart "
                "(inode %d) is no longer in its directory; lines of it may not "
                "have been delivered",
                self._path,
                later.inode,
                extra={"path": self._path},
            )
        return None

    def _accepts(self, later: _LaterFile) -> Callable[[BinaryIO], bool]:
        """Return a check that a file found by inode is the one `later` names."""

        def accept(file: BinaryIO) -> bool:
            return later.matches(file) and not self._is_own(file)

        return accept

    def _path_matches(self, later: _LaterFile) -> bool:
        """Return whether the file at the input's path starts as `later` names."""
        try:
            with open(self._path, "rb") as file:
                return later.matches(file)
        except OSError:
            return False

    def _is_own(self, file: BinaryIO) -> bool:
        """Return whether `file` is the checkpoint file or its temporary copy."""
        if self._checkpoint is None:
            return False
        status = os.fstat(file.fileno())
        temporary = self._checkpoint.with_name(self._checkpoint.name + ".tmp")
        for path in (self._checkpoint, temporary):
            try:
                if os.path.samestat(status, os.stat(path)):
                    return True
            except OSError:
                continue
        return False

    def _open_first_replacement(self, identity: tuple[int, int]) -> BinaryIO | None:
        """Open the file that first replaced the input, rotated away again since.

        Returns None, after a warning, when it is no longer in the directory.
        """
        # Its inode number may have gone to the checkpoint file since.
        found = self._open_by_identity(identity, lambda file: not self._is_own(file))
        if found is None:
            logger.warning(
                "the file that replaced the input file %s (inode %d) was rotated "
                "away and is no longer in its directory; lines of it may not have "
                "been delivered. Set READER_ROTATE_WAIT_MS below the time "
                "between two rotations",
                self._path,
                identity[1],
                extra={"path": self._path},
            )
            return None
        file, name = found
        logger.info(
            "the file that replaced the input file %s was rotated again, to %s; "
            "reading it from its start before the file now at the path",
            self._path,
            name,
            extra={"path": self._path},
        )
        return file

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

    def _read_checkpoint(
        self,
    ) -> tuple[int, str | None, tuple[int, int] | None, list[_LaterFile]]:
        """Return the checkpoint's offset, fingerprint, file identity and later files.

        A checkpoint is ``<offset> sha256:<hex digest> inode:<device>:<inode>``,
        followed by ``then:<device>:<inode>:<length>:sha256:<hex digest>`` for
        each file that replaced that file at the path after it, in order. A
        checkpoint without the identity, or of only the offset, is accepted too,
        without the checks that need them.
        """
        if self._checkpoint is None:
            return 0, None, None, []
        if self._checkpoint.exists() and not (
            self._checkpoint.is_file() or self._checkpoint.is_dir()
        ):
            raise SourceError(
                f"checkpoint path {str(self._checkpoint)!r} is not a regular file "
                "(a named pipe or a device); set READER_CHECKPOINT_PATH to a file "
                "path in an existing directory",
                retriable=False,
            )
        if self._checkpoint.is_dir() or not self._checkpoint.parent.is_dir():
            raise SourceError(
                f"checkpoint path {str(self._checkpoint)!r} is a directory or lies in "
                "a directory that does not exist; set READER_CHECKPOINT_PATH to a "
                "file path in an existing directory",
                retriable=False,
            )
        if not self._checkpoint.exists():
            return 0, None, None, []
        text = self._checkpoint.read_bytes().decode("utf-8", "backslashreplace").strip()
        offset, fingerprint, identity, *rest = [*text.split(" "), "", ""]
        later = [_parse_later_file(entry) for entry in rest if entry]
        # Only ASCII digits: int() would also take "1_0", "+5" or other scripts.
        if (
            not (offset.isascii() and offset.isdigit())
            or (fingerprint and not _is_fingerprint(fingerprint))
            or (identity and _parse_identity(identity) is None)
            or (identity and not fingerprint)
            or (later and not identity)
            or None in later
            or any(rest[len(later) :])
        ):
            raise SourceError(
                f"checkpoint file {str(self._checkpoint)!r} contains {text[:160]!r}, "
                "not a byte offset, optionally followed by 'sha256:<digest>', "
                "'inode:<device>:<inode>' and any number of "
                "'then:<device>:<inode>:<length>:sha256:<digest>', separated by "
                "spaces; delete it to start from the beginning",
                retriable=False,
            )
        files = [entry for entry in later if entry is not None]
        return int(offset), fingerprint or None, _parse_identity(identity), files

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
        if self._stream_fd >= 0 and not self._stream_ended:
            self._warn_stream_not_read_to_end()
        for replaced in self._replaced.values():
            replaced.file.close()
        self._replaced.clear()
        logger.info("file source stopped", extra={"path": self._path})

    def _warn_stream_not_read_to_end(self) -> None:
        """Warn that a stream was not read to its end, so the rest of it is lost."""
        name = "its standard input" if self._path == "-" else f"the pipe {self._path}"
        logger.warning(
            "the reader stopped before the end of %s, after it read %d lines and "
            "finished %d of them (sent to the app or dead-lettered). The rest of "
            "the input was not read, and a stream cannot be read again, so it "
            "is up to the producer to send it again",
            name,
            self._lines_read,
            self._lines_finished,
            extra={"path": self._path},
        )

    def ack(self, envelope: Envelope) -> None:
        """Mark a message finished; it is committed with the next commit."""
        super().ack(envelope)
        self._lines_finished += 1

    def stop_reading(self) -> None:
        """Read nothing more from a stream; `fetch` returns the lines already read.

        A last line without its newline comes with a `problem`, so the reader
        dead-letters it. A regular file is at its end at once.
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
        envelopes = await asyncio.to_thread(self._read_lines, max_messages)
        if self._restarted and self._checkpoint is not None:
            # Record the start of the new content at once: the checkpoint of a
            # truncated or overwritten file would not fit it after a crash. A
            # replaced file with lines in flight keeps the checkpoint.
            self._restarted = False
            try:
                self.commit()
            except OSError as exc:
                logger.error("writing the checkpoint failed: %s", exc)
        if not envelopes and self._follow:
            # At the end of a followed file: wait a little before looking again.
            await asyncio.sleep(min(timeout_seconds, 0.05))
        return envelopes

    def _read_lines(self, max_messages: int) -> list[Envelope]:
        with self._file_lock:
            return self._read_lines_locked(max_messages)

    def _read_lines_locked(self, max_messages: int) -> list[Envelope]:
        envelopes: list[Envelope] = []
        if self._follow:
            self._restart_if_replaced(at_end=False)
        while len(envelopes) < max_messages:
            line = self._next_line()
            if line is None:
                break
            start = self._offset
            if isinstance(line, _Overlong):
                self._offset += line.consumed
                envelopes.append(self._overlong_message(start, line.length))
                continue
            if isinstance(line, _Fragment):
                self._offset += len(line.data)
                envelopes.append(self._fragment_message(start, line.data))
                continue
            self._offset += len(line)
            value = line.strip()
            if start == 0 and value.startswith(UTF8_BOM):
                # Editors on Windows often start a UTF-8 file with a byte order
                # mark, which is not part of the first record.
                value = value[len(UTF8_BOM) :].strip()
            if not value:
                continue
            envelopes.append(Envelope(value=value, position=self._register(start)))
        return envelopes

    def _register(self, start: int) -> Position:
        """Track the line from byte `start` to the current offset, and return it."""
        position = Position(self._path, self._part, start, self._offset, 1)
        self._tracker.register(position)
        self._lines_read += 1
        return position

    def _overlong_message(self, start: int, size: int) -> Envelope:
        position = self._register(start)
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

    def _fragment_message(self, start: int, data: bytes) -> Envelope:
        position = self._register(start)
        name = "stdin" if self._path == "-" else self._path
        problem = (
            f"reading {name} stopped at shutdown inside the line at byte offset "
            f"{start}: this value is its first {len(data)} bytes, and the rest "
            "was not read"
        )
        logger.warning(
            "reading %s stopped inside a line: its first %d bytes are dead-lettered",
            name,
            len(data),
            extra={"offset": start},
        )
        return Envelope(value=data.strip(), position=position, problem=problem)

    def _next_line(self) -> bytes | _Overlong | _Fragment | None:
        """Return the next complete line, or None at the current end of the file.

        A line over the length limit comes back as its length (`_Overlong`).

        NOTE: lines appended to a replaced file after the source moved on to
        the new file, `rotate_wait_seconds` after the replacement, are not read.
        """
        if self._stream_fd >= 0:
            return self._next_stream_line()
        assert self._file is not None
        while True:
            if self._skipped:
                chunk = self._file.readline(SKIP_CHUNK_BYTES)
                self._remember(chunk)
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
                self._remember(chunk)
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
                if self._restart_if_replaced(at_end=True):
                    continue
                return None  # wait for the rest of the line
            self.at_end = True
            if self._skipped:
                return self._end_overlong(b"")
            line, self._partial = self._partial, b""
            return self._checked(line) if line else None

    def _restart_if_replaced(self, *, at_end: bool) -> bool:
        """Read the followed file from its start if it was truncated or replaced.

        Returns whether it was. A file shorter than the read position was
        truncated, and one whose last bytes read changed was overwritten.
        Whether a new file took the path is checked only `at_end`, so the old
        file is read to its end first. The bytes of a line that was not
        finished before are dropped with a warning. The lines read before
        cannot be read again from the path, so from then on the source is not
        `replayable`: the reader sends them at shutdown.

        NOTE: an overwrite is found by comparing the last bytes read with the
        file, so one that writes those same bytes at the same place is read on
        from the read position. A file replaced twice while fetching is paused
        skips the file in between.
        """
        assert self._file is not None
        status = os.fstat(self._file.fileno())
        position = self._file.tell()
        change = ""
        if status.st_size < position:
            change = f"was truncated to {status.st_size} bytes"
        elif self._overwritten(position):
            change = "was overwritten from its start"
        if change:
            # The read-ahead buffer still contains old bytes, and a seek into it
            # only moves within it. A seek to the end drops it first.
            self._file.seek(0, os.SEEK_END)
            self._file.seek(0)
        elif not at_end:
            return False
        else:
            replacement = self._replacement(status)
            if replacement is None:
                return False
            if self._checkpoint is not None and self._tracker.in_flight(
                self._path, self._part
            ):
                # Kept open for the checkpoint until its lines are finished.
                self._replaced[self._part] = _Replaced(self._file, self._part_start)
            else:
                self._file.close()
            self._file = replacement
            change = "was replaced by a new file"
        dropped = len(self._partial) + self._skipped
        self._partial, self._skipped, self._skipped_tail = b"", 0, b""
        self._read_tail = b""
        self._offset = 0
        self._part_start = 0
        self._part += 1
        self._tracker.assign(self._path, self._part)
        self.replayable = False
        self._restarted = True
        logger.warning(
            "input file %s %s; reading it from the start%s",
            self._path,
            change,
            f", without the {dropped} bytes of an unfinished line" if dropped else "",
            extra={"path": self._path, "partition": self._part},
        )
        return True

    def _waiting_for_rotation(self) -> bool:
        """Return whether the file replaced at the path is still to be read on.

        The writer of a log may add lines to the old file until it opens the
        path again, so the old file is read for `rotate_wait_seconds` after the
        replacement was found.
        """
        if not self._rotate_wait:
            return False
        now = time.monotonic()
        if self._rotation_seen is None:
            self._rotation_seen = now
            logger.info(
                "input file %s was replaced by a new file; reading the old one "
                "for %g s more (READER_ROTATE_WAIT_MS) before the new one",
                self._path,
                self._rotate_wait,
                extra={"path": self._path},
            )
        return now - self._rotation_seen < self._rotate_wait

    def _remember(self, chunk: bytes) -> None:
        """Keep the last `READ_TAIL_BYTES` bytes read from a followed file."""
        if self._follow and chunk:
            self._read_tail = (self._read_tail + chunk)[-READ_TAIL_BYTES:]

    def _overwritten(self, position: int) -> bool:
        """Return whether the bytes before `position` differ from those read.

        That is so when a program overwrote the file from its start, with
        content at least as long as what was read, between two reads.
        """
        if not self._read_tail:
            return False
        assert self._file is not None
        length = len(self._read_tail)
        start = position - length
        return start < 0 or (
            os.pread(self._file.fileno(), length, start) != self._read_tail
        )

    def _replacement(self, status: os.stat_result) -> BinaryIO | None:
        """Open the file that took the input's path, or return None if there is none.

        A path that is missing, or names something other than a regular file,
        is looked at again later; the reason is logged once. A new file is
        opened only `rotate_wait_seconds` after it was found.
        """
        try:
            current = os.stat(self._path)
        except OSError:
            return None  # renamed, and the new file is not there yet
        if os.path.samestat(current, status):
            self._rotation_seen = None
            self._rotation_target = None
            return None
        if self._rotation_target is None:
            self._rotation_target = (current.st_dev, current.st_ino)
        if self._waiting_for_rotation():
            return None
        target, self._rotation_target = self._rotation_target, None
        later = self._open_later_file(current)
        if later is None and target != (current.st_dev, current.st_ino):
            later = self._open_first_replacement(target)
        if later is not None:
            self._rotation_seen = None
            return later
        problem = ""
        replacement = None
        if not stat.S_ISREG(current.st_mode):
            problem = f"{self._path!r} is now not a regular file"
        else:
            try:
                replacement = self._open_input()
            except SourceError as exc:
                problem = str(exc)
        if problem and problem != self._reopen_error:  # logged once, not every poll
            logger.warning("cannot read the new input file yet: %s", problem)
        self._reopen_error = problem
        if replacement is not None:
            self._rotation_seen = None
        return replacement

    def _checked(self, line: bytes) -> bytes | _Overlong:
        """Return a line read whole, or `_Overlong` if it is over the limit."""
        length = _length_without_break(line)
        if length > self._max_line_bytes:
            return _Overlong(len(line), length)
        return line

    def _skip(self, data: bytes | bytearray) -> None:
        """Count `data` as skipped bytes of an overlong line."""
        self._skipped += len(data)
        if data:
            self._skipped_tail = bytes(data[-1:])

    def _end_overlong(self, rest: bytes) -> _Overlong:
        """End skipping an overlong line, whose `rest` was read last."""
        ending = self._skipped_tail + rest
        consumed = self._skipped + len(rest)
        self._skipped, self._skipped_tail = 0, b""
        line_break = len(ending) - _length_without_break(ending)
        return _Overlong(consumed, consumed - line_break)

    def _next_stream_line(self) -> bytes | _Overlong | _Fragment | None:
        """Return the next line of stdin or a pipe, waiting at most 50 ms for input.

        Reads the file descriptor directly, because a buffered readline would
        block until a whole line or the end arrives, and stop would wait for it.
        A line cut off by `stop_reading` comes back as a `_Fragment`.
        """
        buffer = self._buffer
        newline = buffer.find(b"\n", self._scanned)
        if newline < 0 and not self._stream_closed:
            self._scanned = len(buffer)
            ready, _, _ = select.select([self._stream_fd], [], [], 0.05)
            if ready:
                self._read_stream_chunk()
            newline = buffer.find(b"\n", self._scanned)
        if newline >= 0:
            line = bytes(buffer[: newline + 1])
            del buffer[: newline + 1]
            self._scanned = 0
            if self._skipped:
                return self._end_overlong(line)
            return self._checked(line)
        if self._skipped or len(buffer) > self._max_line_bytes + 1:
            self._skip(buffer)
            buffer.clear()
            self._scanned = 0
        if not self._stream_closed:
            return None
        self.at_end = True
        if self._skipped:
            return self._end_overlong(b"")
        line = bytes(buffer)
        buffer.clear()
        self._scanned = 0
        if line and self._reading_stopped:
            return _Fragment(line)
        return self._checked(line) if line else None

    def _read_stream_chunk(self) -> None:
        """Append what the stream has to the buffer, and note its end."""
        chunk = _read_ready(self._stream_fd)
        if chunk is None:
            return
        if chunk:
            self._buffer += chunk
        elif self._reopen_pipe_at_end:
            self._reopen_pipe()
        else:
            self._stream_closed = True
            self._stream_ended = True

    def _reopen_pipe(self) -> None:
        """Open the named pipe again after its writers closed it, for the next one.

        Without that, a later writer would fill the pipe's buffer unread. The
        stream ends if the path no longer names a named pipe.
        """
        assert self._file is not None
        self._file.close()
        self._file = None
        try:
            reopened = self._open_input()
        except SourceError as exc:
            logger.warning("the input pipe ended and cannot be opened again: %s", exc)
            self._stream_closed = self._stream_ended = True
            return
        if not stat.S_ISFIFO(os.fstat(reopened.fileno()).st_mode):
            reopened.close()
            logger.warning("%s is no longer a named pipe; its stream ends", self._path)
            self._stream_closed = self._stream_ended = True
            return
        self._file = reopened
        self._stream_fd = reopened.fileno()

    async def pause(self) -> None:
        """Stop reading lines until `resume`."""
        self._paused = True

    async def resume(self) -> None:
        """Read lines again."""
        self._paused = False

    def commit(self, *, wait: bool = True) -> None:
        """Store the finished prefix in the checkpoint file, atomically.

        Without `wait`, nothing is stored while lines are being read, which can
        take a while when an overlong line is skipped, so that the event loop
        does not wait for that.

        Raises:
            OSError: when the checkpoint cannot be written.
        """
        if self._checkpoint is None or self._stream_fd >= 0:
            return  # a stream cannot be read again from an offset
        if not self._file_lock.acquire(blocking=wait):
            return  # the next periodic commit stores it
        try:
            if self._file is None:
                return
            part, file, start = self._checkpointed_part()
            position = self._tracker.committable().get((self._path, part))
            if position is None and part:
                position = start  # nothing finished yet since the restart
            later = self._files_after(part)
            if position is None or (part, position, later) == self._committed:
                return
            fingerprint = _fingerprint(file, position)
            device, inode = _identity(file)
        finally:
            self._file_lock.release()
        text = f"{position} {fingerprint} inode:{device}:{inode}"
        text += "".join(f" {entry.text()}" for entry in later)
        temporary = self._checkpoint.with_name(self._checkpoint.name + ".tmp")
        with temporary.open("w") as output:
            output.write(text)
            output.flush()
            os.fsync(output.fileno())
        os.replace(temporary, self._checkpoint)
        sync_directory(self._checkpoint.parent)  # makes the rename itself durable
        self._committed = (part, position, later)

    def _files_after(self, part: int) -> tuple[_LaterFile, ...]:
        """Return the files to read after `part` before a restart.

        Those are the replaced files after it that are still open, the current
        file when it is a later part, and the files that a restart still has to
        read before the file at the path.
        """
        files = [
            _later_file(replaced.file)
            for number, replaced in sorted(self._replaced.items())
            if number > part
        ]
        if self._part > part:
            assert self._file is not None
            files.append(_later_file(self._file))
        return (*files, *self._later_files)

    def _checkpointed_part(self) -> tuple[int, BinaryIO, int]:
        """Return the part the checkpoint is in: its number, file and start.

        That is the oldest replaced file with lines in flight, or else the
        current file. Replaced files whose lines are all finished are closed.
        """
        for part in sorted(self._replaced):
            if self._tracker.in_flight(self._path, part):
                replaced = self._replaced[part]
                return part, replaced.file, replaced.start
            self._replaced.pop(part).file.close()
        assert self._file is not None
        return self._part, self._file, self._part_start

    async def _commit_periodically(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self._commit_interval)
            try:
                self.commit(wait=False)
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


def _identity(file: BinaryIO) -> tuple[int, int]:
    """Return the device and inode numbers of an open file."""
    status = os.fstat(file.fileno())
    return status.st_dev, status.st_ino


def _later_file(file: BinaryIO) -> _LaterFile:
    """Return the checkpoint entry of an open file that replaced another."""
    device, inode = _identity(file)
    length = min(os.fstat(file.fileno()).st_size, FINGERPRINT_BYTES)
    return _LaterFile(device, inode, length, _fingerprint(file, length))


def _parse_later_file(text: str) -> _LaterFile | None:
    """Parse ``then:<device>:<inode>:<length>:sha256:<digest>``, else return None."""
    label, device, inode, length, digest = [*text.split(":", 4), "", "", "", ""][:5]
    numbers = (device, inode, length)
    if label != "then" or not all(n.isascii() and n.isdigit() for n in numbers):
        return None
    if not _is_fingerprint(digest) or int(length) > FINGERPRINT_BYTES:
        return None
    return _LaterFile(int(device), int(inode), int(length), digest)


def _parse_identity(text: str) -> tuple[int, int] | None:
    """Parse ``inode:<device>:<inode>``, or return None for any other text."""
    prefix, _, numbers = text.partition(":")
    device, _, inode = numbers.partition(":")
    if prefix != "inode" or not all(
        part.isascii() and part.isdigit() for part in (device, inode)
    ):
        return None
    return int(device), int(inode)


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
