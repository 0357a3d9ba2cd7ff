"""FileSource and FileSink: JSON Lines on disk."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import os
import stat
import sys
import time
from pathlib import Path

import orjson
import pytest

from agogosml.config import Transport
from agogosml.envelope import Envelope
from agogosml.errors import ConfigurationError, SinkError
from agogosml.transports.factory import build_sink
from agogosml.transports.file import FileSink, FileSource
from agogosml.transports.file import sink as file_sink


async def read_all(source: FileSource, rounds: int = 3) -> list[Envelope]:
    envelopes: list[Envelope] = []
    for _ in range(rounds):
        envelopes.extend(await source.fetch(100, 0.01))
    return envelopes


async def test_source_follow_waits_for_line_end(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2, "half')
    source = FileSource(str(path), follow=True)

    async with source:
        first = await read_all(source)
        with path.open("ab") as file:
            file.write(b'": true}\n{"n": 3}\n')
        second = await read_all(source)

    assert [e.value for e in first] == [b'{"n": 1}']
    assert [e.value for e in second] == [b'{"n": 2, "half": true}', b'{"n": 3}']
    assert source.at_end is False


async def test_source_without_follow_takes_last_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n\n{"n": 2}')
    source = FileSource(str(path))

    async with source:
        envelopes = await read_all(source)

    assert [e.value for e in envelopes] == [b'{"n": 1}', b'{"n": 2}']
    assert source.at_end is True


async def test_stdin_stop_reading_returns_buffered_lines(monkeypatch) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b'{"n": 0}\n{"n": 1}\n{"n": 2')
    stdin = io.TextIOWrapper(os.fdopen(read_end, "rb"))
    monkeypatch.setattr(sys, "stdin", stdin)
    source = FileSource("-")

    try:
        async with source:
            first = await source.fetch(1, 1.0)
            source.stop_reading()
            rest = await source.fetch(500, 0)
    finally:
        os.close(write_end)
        stdin.close()

    assert not source.replayable
    assert [envelope.value for envelope in first] == [b'{"n": 0}']
    assert [envelope.value for envelope in rest] == [b'{"n": 1}', b'{"n": 2']
    # The last line never got its newline: it is dead-lettered, not sent.
    assert "reading stdin stopped at shutdown inside the line" in rest[1].problem
    assert source.at_end


def stream_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "stopped before the end" in r.getMessage()
    ]


async def test_stdin_stopped_before_end_warns(monkeypatch, caplog) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b'{"n": 0}\n{"n": 1}\n\n{"n": 2}\n')
    stdin = io.TextIOWrapper(os.fdopen(read_end, "rb"))
    monkeypatch.setattr(sys, "stdin", stdin)
    source = FileSource("-")

    try:
        async with source:
            first = await source.fetch(1, 1.0)
            source.ack(first[0])
            source.stop_reading()
            rest = await source.fetch(500, 0)
    finally:
        os.close(write_end)
        stdin.close()

    assert len(rest) == 2
    (warning,) = stream_warnings(caplog)
    assert warning.startswith(
        "the reader stopped before the end of its standard input, after it read "
        "3 lines and finished 1 of them"
    )
    assert "up to the producer to send it again" in warning


async def test_stdin_read_to_end_not_warned(monkeypatch, caplog) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b'{"n": 0}\n')
    os.close(write_end)
    stdin = io.TextIOWrapper(os.fdopen(read_end, "rb"))
    monkeypatch.setattr(sys, "stdin", stdin)
    source = FileSource("-")

    try:
        async with source:
            envelopes = await read_all(source)
            source.stop_reading()
    finally:
        stdin.close()

    assert len(envelopes) == 1
    assert source.at_end
    assert stream_warnings(caplog) == []


def values_and_problems(envelopes: list[Envelope]) -> list[tuple[bytes, str]]:
    return [(e.value, e.problem.split(" is ")[-1][:14]) for e in envelopes]


@pytest.mark.parametrize("last_newline", [b"\n", b""])
async def test_source_skips_line_over_limit(tmp_path: Path, last_newline) -> None:
    path = tmp_path / "in.jsonl"
    lines = [b'{"n": 1}', b"x" * 25, b"y" * 10, b'{"n": 2}', b"z" * 11]
    path.write_bytes(b"\n".join(lines) + last_newline)
    # A line of exactly the limit is read, and one byte more is skipped.
    source = FileSource(str(path), max_line_bytes=10)

    async with source:
        envelopes = await read_all(source)

    assert values_and_problems(envelopes) == [
        (b'{"n": 1}', ""),
        (b"", "25 bytes long,"),
        (b"y" * 10, ""),
        (b'{"n": 2}', ""),
        (b"", "11 bytes long,"),
    ]
    overlong = envelopes[1]
    assert overlong.position.offset == 9
    assert overlong.position.next_offset == 9 + 26
    assert "READER_MAX_LINE_BYTES (10)" in overlong.problem
    assert "byte offset 9" in overlong.problem


async def test_source_limit_excludes_crlf(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"a" * 10 + b"\r\n" + b"b" * 11 + b"\r\n" + b"c" * 10 + b"\r")
    source = FileSource(str(path), max_line_bytes=10)

    async with source:
        envelopes = await read_all(source)

    # The last line has no line break, so its "\r" counts.
    assert values_and_problems(envelopes) == [
        (b"a" * 10, ""),
        (b"", "11 bytes long,"),
        (b"", "11 bytes long,"),
    ]
    assert envelopes[2].position.next_offset == path.stat().st_size


async def test_source_skips_growing_line_it_follows(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n' + b"x" * 6)
    source = FileSource(str(path), follow=True, max_line_bytes=10)

    async with source:
        first = await read_all(source)
        for part in (b"x" * 6, b"x" * 30, b'"\n{"n": 2}\n'):
            with path.open("ab") as file:
                file.write(part)
            first.extend(await read_all(source))

    assert values_and_problems(first) == [
        (b'{"n": 1}', ""),
        (b"", "43 bytes long,"),
        (b'{"n": 2}', ""),
    ]


async def test_source_checkpoint_passes_skipped_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"x" * 40 + b'\n{"n": 1}\n')
    checkpoint = tmp_path / "in.offset"
    async with FileSource(
        str(path), checkpoint_path=checkpoint, max_line_bytes=10
    ) as first:
        envelopes = await read_all(first)
        first.ack(envelopes[0])

    async with FileSource(str(path), checkpoint_path=checkpoint) as second:
        assert [e.value for e in await read_all(second)] == [b'{"n": 1}']


async def test_stdin_skips_line_over_limit(monkeypatch) -> None:
    read_end, write_end = os.pipe()
    stdin = io.TextIOWrapper(os.fdopen(read_end, "rb"))
    monkeypatch.setattr(sys, "stdin", stdin)
    source = FileSource("-", max_line_bytes=10)
    envelopes: list[Envelope] = []

    try:
        async with source:
            # The overlong line arrives in parts, as a pipe delivers it.
            for part in (b'{"n": 1}\n' + b"x" * 8, b"x" * 20, b'\n{"n": 2}\nyyy'):
                os.write(write_end, part)
                envelopes.extend(await read_all(source))
            os.write(write_end, b"y" * 9)
            os.close(write_end)
            envelopes.extend(await read_all(source))
    finally:
        stdin.close()

    assert values_and_problems(envelopes) == [
        (b'{"n": 1}', ""),
        (b"", "28 bytes long,"),
        (b'{"n": 2}', ""),
        (b"", "12 bytes long,"),
    ]
    assert source.at_end


async def test_named_pipe_read_as_stream(tmp_path: Path, caplog) -> None:
    path = tmp_path / "in.fifo"
    os.mkfifo(path)
    checkpoint = tmp_path / "in.offset"
    checkpoint.write_text("5")
    source = FileSource(str(path), checkpoint_path=checkpoint, follow=True)

    # Opening returns at once although no process has the pipe open to write.
    async with source:
        before = await read_all(source)
        writer = os.open(path, os.O_WRONLY)
        try:
            os.write(writer, b'{"n": 0}\n{"n": 1}\n{"n": 2')
            first = await source.fetch(1, 1.0)
            source.stop_reading()
            rest = await read_all(source)
        finally:
            os.close(writer)

    assert before == []
    assert not source.replayable
    assert [envelope.value for envelope in first] == [b'{"n": 0}']
    assert [envelope.value for envelope in rest] == [b'{"n": 1}', b'{"n": 2']
    assert rest[0].problem == ""
    assert rest[1].problem.startswith(
        f"reading {path} stopped at shutdown inside the line at byte offset 18: "
        "this value is its first 7 bytes"
    )
    assert source.at_end
    assert "READER_CHECKPOINT_PATH is ignored" in caplog.text


async def test_named_pipe_ends_with_its_writer(tmp_path: Path) -> None:
    path = tmp_path / "in.fifo"
    os.mkfifo(path)
    source = FileSource(str(path))

    async with source:
        writer = os.open(path, os.O_WRONLY)
        os.write(writer, b'{"n": 0}\n{"n": 1}')
        os.close(writer)
        envelopes = await read_all(source, rounds=5)

    assert [envelope.value for envelope in envelopes] == [b'{"n": 0}', b'{"n": 1}']
    assert source.at_end


async def test_followed_pipe_reads_next_writer(tmp_path: Path) -> None:
    path = tmp_path / "in.fifo"
    os.mkfifo(path)
    source = FileSource(str(path), follow=True)
    envelopes: list[Envelope] = []

    async with source:
        for number in range(3):
            # Each writer opens the pipe, writes one line and closes it.
            writer = os.open(path, os.O_WRONLY)
            os.write(writer, b'{"n": %d}\n' % number)
            os.close(writer)
            envelopes.extend(await read_all(source, rounds=5))

    assert [e.value for e in envelopes] == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert not source.at_end


async def test_closed_stdin_rejected(monkeypatch) -> None:
    # Python sets sys.stdin to None when the process starts without it.
    monkeypatch.setattr(sys, "stdin", None)
    source = FileSource("-")

    with pytest.raises(ConfigurationError) as error:
        await source.start()

    assert "started with stdin closed" in str(error.value)
    assert "set READER_INPUT to a file path" in str(error.value)


async def test_directory_input_rejected(tmp_path: Path) -> None:
    source = FileSource(str(tmp_path))

    with pytest.raises(ConfigurationError) as error:
        await source.start()

    assert "is a directory; set READER_INPUT to a JSON Lines file" in str(error.value)
    assert not source.connected


async def test_missing_input_names_source(tmp_path: Path) -> None:
    source = FileSource(str(tmp_path / "transactions"))

    with pytest.raises(ConfigurationError) as error:
        await source.start()

    message = str(error.value)
    assert "cannot open input file" in message
    assert "check READER_INPUT" in message
    assert "set READER_SOURCE=kafka or eventhubs" in message


def positions(envelopes: list[Envelope]) -> list[tuple[bytes, int, int]]:
    return [(e.value, e.position.partition, e.position.offset) for e in envelopes]


async def test_followed_file_truncated_read_again(tmp_path: Path, caplog) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n{"half')
    checkpoint = tmp_path / "in.offset"
    source = FileSource(str(path), follow=True, checkpoint_path=checkpoint)

    async with source:
        before = await read_all(source)
        for envelope in before:
            source.ack(envelope)
        path.write_bytes(b'{"n": 3}\n')  # truncates and writes anew
        after = await read_all(source)
        source.ack(after[0])

    assert positions(before) == [(b'{"n": 1}', 0, 0), (b'{"n": 2}', 0, 9)]
    assert positions(after) == [(b'{"n": 3}', 1, 0)]
    assert after[0].id != before[0].id
    assert "was truncated to 9 bytes; reading it from the start, without the 6 " in (
        caplog.text
    )
    assert checkpoint.read_text().split(" ")[0] == "9"


async def test_followed_file_replaced_read_anew(tmp_path: Path, caplog) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n')
    source = FileSource(str(path), follow=True, rotate_wait_seconds=0)

    async with source:
        before = await read_all(source)
        # Log rotation: the file is renamed, and a new one takes its path.
        path.rename(tmp_path / "in.jsonl.1")
        assert await read_all(source) == []
        path.write_bytes(b'{"n": 2}\n{"n": 3}\n')
        after = await read_all(source)

    assert positions(before) == [(b'{"n": 1}', 0, 0)]
    assert positions(after) == [(b'{"n": 2}', 1, 0), (b'{"n": 3}', 1, 9)]
    assert "was replaced by a new file; reading it from the start" in caplog.text
    # The old file cannot be read again from the path, so the reader sends its
    # lines already read at shutdown.
    assert not source.replayable


async def test_periodic_commit_skipped_while_reading(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n')
    checkpoint = tmp_path / "in.offset"

    async with FileSource(str(path), checkpoint_path=checkpoint) as source:
        source.ack((await read_all(source))[0])
        # As while a thread reads lines, for example skips an overlong one.
        with source._file_lock:
            source.commit(wait=False)
            skipped = checkpoint.exists()
        source.commit(wait=False)

    assert not skipped
    assert checkpoint.read_text().split(" ")[0] == "9"


async def test_checkpoint_after_rotation_starts_new_file(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n')
    checkpoint = tmp_path / "in.offset"
    source = FileSource(
        str(path), follow=True, rotate_wait_seconds=0, checkpoint_path=checkpoint
    )

    async with source:
        for envelope in await read_all(source):
            source.ack(envelope)
        path.rename(tmp_path / "in.jsonl.1")
        path.write_bytes(b"")
        assert await read_all(source) == []
    path.write_bytes(b'{"n": 3}\n')

    assert checkpoint.read_text().split(" ")[0] == "0"
    async with FileSource(str(path), checkpoint_path=checkpoint) as again:
        assert [e.value for e in await read_all(again)] == [b'{"n": 3}']


async def test_followed_file_overwritten_read_again(tmp_path: Path, caplog) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(b'{"id":"old%d"}\n' % n for n in range(10)))
    source = FileSource(str(path), follow=True)

    async with source:
        before = await read_all(source)
        # Longer content written from the start between two reads: the file
        # never looks shorter than the read position.
        path.write_bytes(b"".join(b'{"id":"new%03d"}\n' % n for n in range(20)))
        after = await read_all(source)

    assert len(before) == 10
    assert [e.value for e in after] == [b'{"id":"new%03d"}' % n for n in range(20)]
    assert {e.position.partition for e in after} == {1}
    assert "was overwritten from its start; reading it from the start" in caplog.text


async def test_rotation_checkpointed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n')
    checkpoint = tmp_path / "in.offset"
    source = FileSource(
        str(path),
        follow=True,
        rotate_wait_seconds=0,
        checkpoint_path=checkpoint,
        commit_interval_seconds=60,
    )

    async with source:
        for envelope in await read_all(source):
            source.ack(envelope)
        source.commit()
        path.rename(tmp_path / "in.jsonl.1")
        path.write_bytes(b'{"n": 3}\n')
        await read_all(source)
        # Read before the source stops, as a crash would leave it.
        after_rotation = checkpoint.read_text().split(" ")[0]

    assert after_rotation == "0"


async def rotate_with_lines_in_flight(path: Path, checkpoint: Path) -> None:
    """Read three lines, finish the first, rotate the file and read the new one.

    The source stops with the second and third lines of the rotated file
    unfinished, as a reader killed at that moment would leave its checkpoint.
    """
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n{"n": 3}\n')
    source = FileSource(
        str(path), follow=True, rotate_wait_seconds=0, checkpoint_path=checkpoint
    )
    async with source:
        old = await read_all(source)
        source.ack(old[0])
        path.rename(path.with_name("in.jsonl.1"))
        path.write_bytes(b'{"n": 4}\n{"n": 5}\n')
        new = await read_all(source)
        source.ack(new[0])
        source.ack(new[1])
    assert positions(new) == [(b'{"n": 4}', 1, 0), (b'{"n": 5}', 1, 9)]


async def test_checkpoint_waits_for_rotated_lines(
    tmp_path: Path,
) -> None:
    path = tmp_path / "in.jsonl"
    checkpoint = tmp_path / "in.offset"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n')
    rotated = tmp_path / "in.jsonl.1"
    source = FileSource(
        str(path), follow=True, rotate_wait_seconds=0, checkpoint_path=checkpoint
    )

    async with source:
        old = await read_all(source)
        path.rename(rotated)
        path.write_bytes(b'{"n": 3}\n')
        new = await read_all(source)
        source.ack(new[0])
        source.ack(old[0])
        source.commit()
        while_old_in_flight = checkpoint.read_text().split(" ")
        source.ack(old[1])
        source.commit()
        after_old_finished = checkpoint.read_text().split(" ")

    old_inode = f"inode:{rotated.stat().st_dev}:{rotated.stat().st_ino}"
    new_inode = f"inode:{path.stat().st_dev}:{path.stat().st_ino}"
    assert (while_old_in_flight[0], while_old_in_flight[2]) == ("9", old_inode)
    assert (after_old_finished[0], after_old_finished[2]) == ("9", new_inode)


async def test_restart_reads_rotated_file_first(tmp_path: Path, caplog) -> None:
    path = tmp_path / "in.jsonl"
    checkpoint = tmp_path / "in.offset"
    await rotate_with_lines_in_flight(path, checkpoint)
    caplog.set_level(logging.INFO, "agogosml.transports.file.source")

    again = FileSource(
        str(path), follow=True, checkpoint_path=checkpoint, rotate_wait_seconds=0
    )
    async with again:
        envelopes = await read_all(again, rounds=5)

    # The unfinished lines of the rotated file, then the whole new file: the
    # lines of the new one finished before the restart come again (at least
    # once), and none is lost.
    assert positions(envelopes) == [
        (b'{"n": 2}', 0, 9),
        (b'{"n": 3}', 0, 18),
        (b'{"n": 4}', 1, 0),
        (b'{"n": 5}', 1, 9),
    ]
    assert "reading on from byte 9 of the file it was, now " in caplog.text


async def rotate_twice_then_crash(
    path: Path, checkpoint: Path, first_lines: int = 2
) -> FileSource:
    """Leave a checkpoint as a reader killed after two rotations would.

    The lines after the first of the first file (A) and both lines of the
    second (B) are unfinished. A is renamed to ``.2`` and B to ``.1``; the file
    at the path (C) has one line. Returns the source, which the caller stops
    after the test.
    """
    path.write_bytes(
        b"".join(b'{"f": "a", "n": %d}\n' % n for n in range(1, first_lines + 1))
    )
    source = FileSource(
        str(path), follow=True, rotate_wait_seconds=0, checkpoint_path=checkpoint
    )
    await source.start()
    first = await read_all(source)
    source.ack(first[0])
    path.rename(path.with_name("in.jsonl.1"))
    path.write_bytes(b'{"f": "b", "n": 1}\n{"f": "b", "n": 2}\n')
    await read_all(source)
    path.with_name("in.jsonl.1").rename(path.with_name("in.jsonl.2"))
    path.rename(path.with_name("in.jsonl.1"))
    path.write_bytes(b'{"f": "c", "n": 1}\n')
    await read_all(source)
    source.commit()
    return source


async def test_restart_after_two_rotations_reads_middle_file(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    checkpoint = tmp_path / "in.offset"
    crashed = await rotate_twice_then_crash(path, checkpoint)
    written = checkpoint.read_text().split(" ")

    again = FileSource(
        str(path), follow=True, checkpoint_path=checkpoint, rotate_wait_seconds=0
    )
    async with again:
        envelopes = await read_all(again, rounds=8)
        for envelope in envelopes:
            again.ack(envelope)
    await crashed.stop()

    middle = path.with_name("in.jsonl.1").stat()
    middle_start = hashlib.sha256(path.with_name("in.jsonl.1").read_bytes())
    assert written[3] == (
        f"then:{middle.st_dev}:{middle.st_ino}:38:sha256:{middle_start.hexdigest()}"
    )
    assert written[4].startswith(f"then:{path.stat().st_dev}:{path.stat().st_ino}:19:")
    assert [e.value for e in envelopes] == [
        b'{"f": "a", "n": 2}',
        b'{"f": "b", "n": 1}',
        b'{"f": "b", "n": 2}',
        b'{"f": "c", "n": 1}',
    ]
    assert checkpoint.read_text().split(" ")[0] == "19"


async def test_checkpoint_in_rotated_file_keeps_later_files(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    checkpoint = tmp_path / "in.offset"
    crashed = await rotate_twice_then_crash(path, checkpoint, first_lines=3)
    written = checkpoint.read_text()

    # After a restart the second line of the first file finishes, and the
    # reader is killed again before the third does. The new checkpoint keeps
    # the files after the first, so a third start still reads them.
    again = FileSource(
        str(path), follow=True, checkpoint_path=checkpoint, rotate_wait_seconds=0
    )
    await again.start()
    read_again = await read_all(again, rounds=8)
    again.ack(read_again[0])
    again.commit()
    rewritten = checkpoint.read_text()
    third = FileSource(
        str(path), follow=True, checkpoint_path=checkpoint, rotate_wait_seconds=0
    )
    async with third:
        envelopes = await read_all(third, rounds=8)
    await again.stop()
    await crashed.stop()

    assert (written.split(" ")[0], rewritten.split(" ")[0]) == ("19", "38")
    assert rewritten.split(" ")[2:] == written.split(" ")[2:]
    assert [e.value for e in envelopes][:3] == [
        b'{"f": "a", "n": 3}',
        b'{"f": "b", "n": 1}',
        b'{"f": "b", "n": 2}',
    ]


async def test_restart_without_middle_file_warns(tmp_path: Path, caplog) -> None:
    path = tmp_path / "in.jsonl"
    checkpoint = tmp_path / "in.offset"
    crashed = await rotate_twice_then_crash(path, checkpoint)
    path.with_name("in.jsonl.1").unlink()  # rotated away, e.g. compressed

    again = FileSource(
        str(path), follow=True, checkpoint_path=checkpoint, rotate_wait_seconds=0
    )
    async with again:
        envelopes = await read_all(again, rounds=8)
    await crashed.stop()

    message = " ".join(caplog.text.split())
    assert [e.value for e in envelopes] == [
        b'{"f": "a", "n": 2}',
        b'{"f": "c", "n": 1}',
    ]
    assert "is no longer in its directory; lines of it may not have been" in message


#: Rotation wait of the tests that read within it: long enough for several
#: fetch rounds on a loaded machine.
ROTATE_WAIT_SECONDS = 2.0


async def test_second_rotation_within_wait_reads_middle_file(
    tmp_path: Path, caplog
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"f": "a"}\n')
    source = FileSource(str(path), follow=True, rotate_wait_seconds=ROTATE_WAIT_SECONDS)
    caplog.set_level(logging.INFO, "agogosml.transports.file.source")

    async with source:
        first = await read_all(source)
        path.rename(path.with_name("in.jsonl.1"))
        path.write_bytes(b'{"f": "b"}\n')
        waiting = await read_all(source)
        path.with_name("in.jsonl.1").rename(path.with_name("in.jsonl.2"))
        path.rename(path.with_name("in.jsonl.1"))
        path.write_bytes(b'{"f": "c"}\n')
        await asyncio.sleep(ROTATE_WAIT_SECONDS + 0.1)
        middle = await read_all(source)
        await asyncio.sleep(ROTATE_WAIT_SECONDS + 0.1)
        last = await read_all(source, rounds=5)

    assert [e.value for e in first] == [b'{"f": "a"}']
    assert waiting == []
    assert [e.value for e in middle] == [b'{"f": "b"}']
    assert [e.value for e in last] == [b'{"f": "c"}']
    assert "was rotated again, to " in caplog.text


def reuse_inode(directory: Path, inode: int, content: bytes) -> Path | None:
    """Create files in `directory` until one gets `inode`, as ext4 reuses it."""
    for number in range(50):
        candidate = directory / f"unrelated-{number}.log"
        candidate.write_bytes(content)
        if candidate.stat().st_ino == inode:
            return candidate
    return None


async def test_restart_skips_file_that_reused_inode(tmp_path: Path, caplog) -> None:
    path = tmp_path / "in.jsonl"
    checkpoint = tmp_path / "in.offset"
    crashed = await rotate_twice_then_crash(path, checkpoint)
    written = checkpoint.read_text()
    await crashed.stop()  # closes the files, as the end of the process does
    checkpoint.write_text(written)
    middle = path.with_name("in.jsonl.1")
    inode = middle.stat().st_ino
    middle.unlink()  # deleted while the reader was down
    other = reuse_inode(tmp_path, inode, b'{"not": "input"}\n')
    if other is None:
        pytest.skip("this file system did not reuse the inode number")

    again = FileSource(
        str(path), follow=True, checkpoint_path=checkpoint, rotate_wait_seconds=0
    )
    async with again:
        values = [e.value for e in await read_all(again, rounds=8)]

    assert values == [b'{"f": "a", "n": 2}', b'{"f": "c", "n": 1}']
    assert "is no longer in its directory" in caplog.text


async def test_restart_without_first_file_reads_later_one(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    checkpoint = tmp_path / "in.offset"
    crashed = await rotate_twice_then_crash(path, checkpoint)
    path.with_name("in.jsonl.2").unlink()  # the first file, e.g. compressed

    again = FileSource(
        str(path), follow=True, checkpoint_path=checkpoint, rotate_wait_seconds=0
    )
    async with again:
        values = [e.value for e in await read_all(again, rounds=8)]
    await crashed.stop()

    assert values == [
        b'{"f": "b", "n": 1}',
        b'{"f": "b", "n": 2}',
        b'{"f": "c", "n": 1}',
    ]


async def test_restart_without_rotated_file(tmp_path: Path, caplog) -> None:
    path = tmp_path / "in.jsonl"
    checkpoint = tmp_path / "in.offset"
    await rotate_with_lines_in_flight(path, checkpoint)
    (tmp_path / "in.jsonl.1").unlink()  # rotated away, e.g. compressed

    async with FileSource(str(path), follow=True, checkpoint_path=checkpoint) as again:
        envelopes = await read_all(again)

    assert positions(envelopes) == [(b'{"n": 4}', 0, 0), (b'{"n": 5}', 0, 9)]
    message = " ".join(caplog.text.split())
    assert "was replaced since the checkpoint, and the file it was is no longer" in (
        message
    )
    assert "Lines of the old file after byte 9 may not have been delivered" in message


async def test_unfollowed_restart_rejects_rotation(
    tmp_path: Path,
) -> None:
    path = tmp_path / "in.jsonl"
    checkpoint = tmp_path / "in.offset"
    await rotate_with_lines_in_flight(path, checkpoint)
    source = FileSource(str(path), checkpoint_path=checkpoint)

    # Without following, the input is one file: another one at its path is an
    # error, as for any input that no longer fits its checkpoint.
    with pytest.raises(ConfigurationError, match="delete the checkpoint"):
        await source.start()


async def test_rotated_file_read_for_rotate_wait(tmp_path: Path, caplog) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n')
    rotated = tmp_path / "in.jsonl.1"
    caplog.set_level(logging.INFO, "agogosml.transports.file.source")
    source = FileSource(str(path), follow=True, rotate_wait_seconds=ROTATE_WAIT_SECONDS)

    async with source:
        before = await read_all(source)
        path.rename(rotated)
        path.write_bytes(b'{"n": 3}\n')
        waiting = await read_all(source)
        # The program that writes the log adds a line to the renamed file
        # before it opens the new one.
        with rotated.open("ab") as old:
            old.write(b'{"n": 2}\n')
        late = await read_all(source)
        await asyncio.sleep(ROTATE_WAIT_SECONDS + 0.1)
        after = await read_all(source)

    assert positions(before) == [(b'{"n": 1}', 0, 0)]
    assert waiting == []
    assert positions(late) == [(b'{"n": 2}', 0, 9)]
    assert positions(after) == [(b'{"n": 3}', 1, 0)]
    assert "reading the old one for 2 s more (READER_ROTATE_WAIT_MS)" in caplog.text


async def test_truncation_found_before_file_end(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n{"n": 3}\n')
    source = FileSource(str(path), follow=True)

    async with source:
        first = await source.fetch(2, 0.01)
        path.write_bytes(b'{"a"}\n')
        rest = await read_all(source)

    assert positions(first) == [(b'{"n": 1}', 0, 0), (b'{"n": 2}', 0, 9)]
    assert positions(rest) == [(b'{"a"}', 1, 0)]


async def test_replacement_by_pipe_not_read(tmp_path: Path, caplog) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n')
    source = FileSource(str(path), follow=True, rotate_wait_seconds=0)

    async with source:
        before = await read_all(source)
        path.rename(tmp_path / "in.jsonl.1")
        os.mkfifo(path)
        after = await read_all(source, rounds=5)

    assert [e.value for e in before] == [b'{"n": 1}']
    assert after == []
    assert caplog.text.count("is now not a regular file") == 1


async def test_followed_file_end_waits(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n')
    source = FileSource(str(path), follow=True)

    async with source:
        await read_all(source)
        started = time.monotonic()
        for _ in range(5):
            assert await source.fetch(100, 0.05) == []
        waited = time.monotonic() - started

    # Each fetch at the end waits instead of returning at once, so an idle
    # reader does not keep a core busy.
    assert waited >= 0.2


async def test_checkpoint_of_replaced_input_rejected(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n')
    checkpoint = tmp_path / "in.offset"
    async with FileSource(str(path), checkpoint_path=checkpoint) as first:
        first.ack((await read_all(first))[0])
    # Another file of the same line lengths takes the place of the input.
    path.write_bytes(b'{"n": 7}\n{"n": 8}\n{"n": 9}\n')
    second = FileSource(str(path), checkpoint_path=checkpoint)

    with pytest.raises(ConfigurationError) as error:
        await second.start()

    message = " ".join(str(error.value).split())
    assert "contains offset 9, but the bytes of" in message
    assert "before that offset differ from those read then" in message
    assert "delete the checkpoint" in message
    assert not second.connected


async def test_checkpoint_without_fingerprint_accepted(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n')
    checkpoint = tmp_path / "in.offset"
    checkpoint.write_text("9")

    async with FileSource(str(path), checkpoint_path=checkpoint) as source:
        envelopes = await read_all(source)

    assert [e.value for e in envelopes] == [b'{"n": 2}']


async def test_source_resumes_after_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n{"n": 3}\n')
    checkpoint = tmp_path / "checkpoint"

    async with FileSource(str(path), checkpoint_path=checkpoint) as first:
        envelopes = await read_all(first)
        first.ack(envelopes[0])
        first.ack(envelopes[2])  # the second is unfinished, so only 1 is committed
    async with FileSource(str(path), checkpoint_path=checkpoint) as second:
        again = await read_all(second)

    offset, fingerprint, identity = checkpoint.read_text().split(" ")
    assert offset == str(len(b'{"n": 1}\n'))
    assert fingerprint == "sha256:" + hashlib.sha256(b'{"n": 1}\n').hexdigest()
    assert identity == f"inode:{path.stat().st_dev}:{path.stat().st_ino}"
    assert [e.value for e in again] == [b'{"n": 2}', b'{"n": 3}']


@pytest.mark.parametrize("where", ["missing-dir/checkpoint", ".", "checkpoint.fifo"])
async def test_source_rejects_bad_checkpoint_path(tmp_path: Path, where: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"{}\n")
    os.mkfifo(tmp_path / "checkpoint.fifo")
    source = FileSource(str(path), checkpoint_path=tmp_path / where)

    with pytest.raises(ConfigurationError, match="READER_CHECKPOINT_PATH"):
        await source.start()


async def test_sink_syncs_directory_of_new_file(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        is_directory = os.path.isdir(f"/proc/self/fd/{descriptor}")
        synced.append("directory" if is_directory else "file")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    sink = FileSink(str(tmp_path / "out.jsonl"), fsync=True)

    await sink.start()
    await sink.send([Envelope(value=b'{"n":1}', id="m1")])
    await sink.stop()

    assert synced[0] == "directory"
    assert "file" in synced


async def test_sink_without_fsync_skips_directory(tmp_path: Path, monkeypatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    sink = FileSink(str(tmp_path / "out.jsonl"), fsync=False)

    await sink.start()
    await sink.send([Envelope(value=b'{"n":1}', id="m1")])
    await sink.stop()

    assert synced == []


async def test_sink_reports_failed_directory_sync(tmp_path: Path, monkeypatch) -> None:
    def failing_fsync(descriptor: int) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    sink = FileSink(str(tmp_path / "out.jsonl"), fsync=True)

    with pytest.raises(SinkError) as raised:
        await sink.start()

    assert "fsync of its directory" in str(raised.value)
    assert "WRITER_FSYNC=false" in str(raised.value)
    assert not sink.connected


async def test_sink_keeps_one_record_per_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    records = [
        Envelope(value=b'{\n  "a": "x\\ny"\n}\n', id="pretty"),
        Envelope(value=b"not json", id="text"),
        Envelope(value=b"\xff\xfe{}", id="binary"),
    ]

    async with FileSink(str(path), fsync=False) as sink:
        await sink.send(records)

    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [line["id"] for line in lines] == ["pretty", "text", "binary"]
    assert lines[0]["value"] == {"a": "x\ny"}
    assert "value_encoding" not in lines[0]
    assert lines[1]["value"] == "not json"
    assert lines[1]["value_encoding"] == "text"
    assert base64.b64decode(lines[2]["value"]) == b"\xff\xfe{}"
    assert lines[2]["value_encoding"] == "base64"


async def test_sink_stores_binary_header_as_base64(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    headers = [("raw", b"\xff\x00"), ("text", "café".encode())]

    async with FileSink(str(path), fsync=False) as sink:
        await sink.send([Envelope(value=b"1", id="m", headers=headers)])

    (line,) = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert base64.b64decode(line["headers"]["raw"]) == b"\xff\x00"
    assert line["headers"]["text"] == "café"
    assert line["header_encodings"] == {"raw": "base64"}


async def test_sink_stores_null_header_as_null(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    headers = [("Tombstoned-By", None), ("empty", b"")]

    async with FileSink(str(path), fsync=False) as sink:
        await sink.send([Envelope(value=b"1", id="m", headers=headers)])

    (line,) = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert line["headers"]["Tombstoned-By"] is None
    assert line["headers"]["empty"] == ""
    assert "header_encodings" not in line


async def test_sink_tells_text_from_a_json_string(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"

    async with FileSink(str(path), fsync=False) as sink:
        await sink.send([Envelope(value=b"hello"), Envelope(value=b'"hello"')])

    text, string = (orjson.loads(line) for line in path.read_bytes().splitlines())
    assert (text["value"], text["value_encoding"]) == ("hello", "text")
    assert string["value"] == "hello"
    assert "value_encoding" not in string


async def test_sink_tells_missing_value_from_null(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"

    async with FileSink(str(path), fsync=False) as sink:
        await sink.send([Envelope(value=b"", null_value=True), Envelope(value=b"null")])

    missing, null = (orjson.loads(line) for line in path.read_bytes().splitlines())
    assert (missing["value"], missing["value_encoding"]) == (None, "none")
    assert null["value"] is None
    assert "value_encoding" not in null


async def test_sink_embeds_huge_integer_as_number(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    number = b"1" + b"0" * 400

    async with FileSink(str(path), fsync=False) as sink:
        await sink.send([Envelope(value=number, id="huge")])

    line = path.read_bytes()
    assert b'"value":%s}' % number in line


async def test_sink_starts_after_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "whole"}\n{"id": "torn", "val')

    async with FileSink(str(path), fsync=False) as sink:
        await sink.send([Envelope(value=b"1", id="after-crash")])

    lines = path.read_bytes().splitlines()
    assert lines[1] == b'{"id": "torn", "val'
    assert orjson.loads(lines[2])["id"] == "after-crash"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_sink_full_disk_not_ready() -> None:
    sink = FileSink("/dev/full", fsync=False)

    async with sink:
        with pytest.raises(SinkError):
            await sink.send([Envelope(value=b"{}")])
        connected_after_failure = sink.connected

    assert connected_after_failure is False


async def test_sink_failed_write_leaves_no_bytes(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = FileSink(str(path), fsync=False)

    async with sink:
        await sink.send([Envelope(value=b"1", id="first")])
        assert sink._file is not None
        real_write = sink._file.write
        calls = 0

        def fail_midway(data: object) -> int:
            nonlocal calls
            calls += 1
            if calls == 1:
                return real_write(memoryview(data)[:5])  # type: ignore[arg-type]
            raise OSError(28, "No space left on device")

        sink._file.write = fail_midway  # type: ignore[method-assign]
        with pytest.raises(SinkError):
            await sink.send([Envelope(value=b"2", id="second")])
        sink._file.write = real_write  # type: ignore[method-assign]
        await sink.send([Envelope(value=b"3", id="third")])

    ids = [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()]
    assert ids == ["first", "third"]


async def test_sink_recovers_after_failed_write(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = FileSink(str(path), fsync=False, retry_interval_seconds=0.01)

    async with sink:
        assert sink._file is not None
        real_write = sink._file.write

        def no_space(data: object) -> int:
            raise OSError(28, "No space left on device")

        sink._file.write = no_space  # type: ignore[method-assign]
        with pytest.raises(SinkError):
            await sink.send([Envelope(value=b"1", id="lost")])
        connected_after_failure = sink.connected
        reason = sink.unavailable_reason
        sink._file.write = real_write  # type: ignore[method-assign]
        async with asyncio.timeout(2):
            while not sink.connected:
                await asyncio.sleep(0.01)
        await sink.send([Envelope(value=b"2", id="after")])

    assert connected_after_failure is False
    assert "No space left on device" in reason
    assert "checks every 0.01 s" in reason
    ids = [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()]
    assert ids == ["after"]


async def test_sink_writes_fifo_without_fsync(tmp_path: Path) -> None:
    path = tmp_path / "out.fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)

    try:
        async with FileSink(str(path), fsync=True) as sink:
            await sink.send([Envelope(value=b"1", id="piped")])
            connected = sink.connected
        line = os.read(reader, 65536)
    finally:
        os.close(reader)

    assert connected is True
    assert orjson.loads(line)["id"] == "piped"


@pytest.mark.parametrize("variable", ["WRITER_OUTPUT", "READER_DEAD_LETTER"])
async def test_sink_open_error_names_setting(tmp_path: Path, variable: str) -> None:
    missing_directory = tmp_path / "missing" / "out.jsonl"
    sink = build_sink(Transport.FILE, str(missing_directory), variable=variable)

    with pytest.raises(ConfigurationError) as caught:
        await sink.start()

    message = str(caught.value)
    assert message.endswith(f"check {variable}")
    other = "READER_DEAD_LETTER" if variable == "WRITER_OUTPUT" else "WRITER_OUTPUT"
    assert other not in message


async def test_sink_not_connected_while_a_write_stalls(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(file_sink, "STALL_SECONDS", 0.2)
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    sink = FileSink(str(fifo))
    await sink.start()
    # More than a pipe's buffer, which no process reads yet.
    value = orjson.dumps({"text": "x" * 300_000})
    sending = asyncio.create_task(sink.send([Envelope(value=value)]))

    await asyncio.sleep(0.5)
    stalled = (sink.connected, sink.unavailable_reason)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        while not sending.done():
            try:
                os.read(reader, 1 << 16)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        await sending
        recovered = sink.connected
    finally:
        os.close(reader)
        await sink.stop()

    assert stalled[0] is False
    assert "has not finished after 0.2 s" in stalled[1]
    assert recovered is True


def written_ids(path: Path) -> list[str]:
    """Return the message ids of the records in a sink's output file, in order."""
    return [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()]


@pytest.mark.parametrize("change", ["rename", "delete"])
async def test_sink_follows_path_after_file_moved(
    tmp_path: Path, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "out.jsonl"
    rotated = tmp_path / "out.jsonl.1"

    async with FileSink(str(path), fsync=True) as sink:
        await sink.send([Envelope(value=b"1", id="before")])
        if change == "rename":
            path.rename(rotated)
        else:
            path.unlink()
        await sink.send([Envelope(value=b"2", id="after")])

    assert written_ids(path) == ["after"]
    if change == "rename":
        assert orjson.loads(rotated.read_bytes())["id"] == "before"
    assert "writing on at that path" in caplog.text


async def test_sink_refuses_path_that_became_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"

    async with FileSink(str(path), fsync=False, retry_interval_seconds=60) as sink:
        await sink.send([Envelope(value=b"1", id="before")])
        path.unlink()
        path.mkdir()
        with pytest.raises(SinkError, match="is now not a regular file"):
            await sink.send([Envelope(value=b"2", id="after")])
        assert not sink.connected


async def test_sink_rewrites_records_of_deleted_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "out.jsonl"
    sink = FileSink(str(path), fsync=True)
    follow_path = sink._follow_path
    deletions = [True]

    def follow_then_delete() -> None:
        # The file goes after the sink checked its path, before the write.
        follow_path()
        if deletions:
            deletions.pop()
            path.unlink()

    monkeypatch.setattr(sink, "_follow_path", follow_then_delete)

    async with sink:
        await sink.send([Envelope(value=b"1", id="during")])

    assert written_ids(path) == ["during"]
    assert "was deleted while" in caplog.text


async def test_sink_fails_write_deleted_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.jsonl"
    sink = FileSink(str(path), fsync=False, retry_interval_seconds=60)
    follow_path = sink._follow_path

    def follow_then_delete() -> None:
        follow_path()
        path.unlink()

    monkeypatch.setattr(sink, "_follow_path", follow_then_delete)

    async with sink:
        with pytest.raises(SinkError, match="was deleted during each of 3 writes"):
            await sink.send([Envelope(value=b"1", id="lost")])
        assert not sink.connected


async def test_sink_stays_failed_while_path_is_directory(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    sink = FileSink(
        str(path), retry_interval_seconds=0.05, variable="READER_DEAD_LETTER"
    )

    async with sink:
        await sink.send([Envelope(value=b"1", id="before")])
        path.unlink()
        path.mkdir()
        with pytest.raises(SinkError, match="restart the reader with another READER_"):
            await sink.send([Envelope(value=b"2", id="during")])
        await asyncio.sleep(0.3)
        connected_while_directory = sink.connected
        path.rmdir()
        await asyncio.sleep(0.3)
        connected_after = sink.connected
        await sink.send([Envelope(value=b"3", id="after")])

    assert connected_while_directory is False
    assert connected_after is True
    assert written_ids(path) == ["after"]


async def test_sink_writes_once_where_files_show_no_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.jsonl"
    real_fstat = os.fstat

    def fstat_without_links(descriptor: int) -> os.stat_result:
        # As a file system that does not count links may report.
        fields = list(real_fstat(descriptor))
        fields[stat.ST_NLINK] = 0
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", fstat_without_links)

    async with FileSink(str(path), fsync=False) as sink:
        await sink.send([Envelope(value=b"1", id="once")])

    assert written_ids(path) == ["once"]


async def test_sink_names_deleted_directory(tmp_path: Path) -> None:
    directory = tmp_path / "out"
    directory.mkdir()
    path = directory / "out.jsonl"

    async with FileSink(str(path), fsync=False, retry_interval_seconds=0.05) as sink:
        await sink.send([Envelope(value=b"1", id="before")])
        path.unlink()
        directory.rmdir()
        with pytest.raises(SinkError, match="of the output file no longer exists"):
            await sink.send([Envelope(value=b"2", id="after")])
        await asyncio.sleep(0.3)
        connected_without_directory = sink.connected
        directory.mkdir()
        await asyncio.sleep(0.3)
        connected_after = sink.connected
        await sink.send([Envelope(value=b"3", id="after")])

    assert connected_without_directory is False
    assert connected_after is True
    assert orjson.loads(path.read_bytes())["id"] == "after"


@pytest.mark.parametrize(
    ("sink_setting", "warned"),
    [(None, True), ("file", False)],
)
def test_default_file_sink_with_broker_set_warned(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    sink_setting: str | None,
    warned: bool,
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    monkeypatch.delenv("WRITER_SINK", raising=False)
    if sink_setting is not None:
        monkeypatch.setenv("WRITER_SINK", sink_setting)

    build_sink(Transport.FILE, str(tmp_path / "scores"))

    warning = "WRITER_SINK is not set, so it is file, and KAFKA_BOOTSTRAP_SERVERS"
    assert (warning in caplog.text) == warned
