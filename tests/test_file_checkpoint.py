"""A file source's checkpoint and the start of its input."""

from __future__ import annotations

from pathlib import Path

import pytest

from agogosml.errors import ConfigurationError
from agogosml.transports.file import FileSource


async def test_checkpoint_past_end_of_input_rejected(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n')
    checkpoint = tmp_path / "checkpoint"
    checkpoint.write_text("999999")
    source = FileSource(str(path), checkpoint_path=checkpoint)

    with pytest.raises(ConfigurationError) as error:
        await source.start()

    message = str(error.value)
    assert "contains offset 999999, past the end of" in message
    assert "(9 bytes)" in message
    assert "delete the checkpoint" in message
    assert not source.connected


async def test_checkpoint_at_end_of_input_reads_nothing(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n')
    checkpoint = tmp_path / "checkpoint"
    checkpoint.write_text("9")

    async with FileSource(str(path), checkpoint_path=checkpoint) as source:
        envelopes = await source.fetch(100, 0.01)

    assert envelopes == []


async def test_checkpoint_inside_a_line_rejected(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n')
    checkpoint = tmp_path / "checkpoint"
    checkpoint.write_text("12")
    source = FileSource(str(path), checkpoint_path=checkpoint)

    with pytest.raises(ConfigurationError) as error:
        await source.start()

    message = str(error.value)
    assert "contains offset 12, inside a line of" in message
    assert "delete the checkpoint" in message
    assert not source.connected


async def test_checkpoint_at_start_of_a_line_resumes(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n')
    checkpoint = tmp_path / "checkpoint"
    checkpoint.write_text("9")

    async with FileSource(str(path), checkpoint_path=checkpoint) as source:
        envelopes = await source.fetch(100, 0.01)

    assert [envelope.value for envelope in envelopes] == [b'{"n": 2}']


async def test_byte_order_mark_not_part_of_first_record(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"n": 1}\n{"n": 2}\n')

    async with FileSource(str(path)) as source:
        envelopes = await source.fetch(100, 0.01)

    assert [envelope.value for envelope in envelopes] == [b'{"n": 1}', b'{"n": 2}']
    assert envelopes[1].position is not None
    assert envelopes[1].position.offset == 12


async def test_checkpoint_after_last_line_without_line_break(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}')
    checkpoint = tmp_path / "checkpoint"
    checkpoint.write_text("17")

    async with FileSource(str(path), checkpoint_path=checkpoint) as source:
        envelopes = await source.fetch(100, 0.01)

    assert envelopes == []


@pytest.mark.parametrize(
    ("content", "shown"),
    [
        (b"\xff\xfe\x00", r"'\\xff\\xfe\x00'"),
        (b"12x", "'12x'"),
        (b"1_0", "'1_0'"),
        (b"-3", "'-3'"),
        ("\u0663".encode(), "'\u0663'"),
        (b"9 inode:1:2", "'9 inode:1:2'"),
        (b"9 sha256:" + b"0" * 64 + b" inode:1", "'9 sha256:" + "0" * 64 + " inode:1'"),
        (
            b"9 sha256:" + b"0" * 64 + b" inode:1:2 x",
            "'9 sha256:" + "0" * 64 + " inode:1:2 x'",
        ),
        (
            b"9 sha256:" + b"0" * 64 + b" inode:1:2 then:3",
            "'9 sha256:" + "0" * 64 + " inode:1:2 then:3'",
        ),
        (
            b"9 sha256:" + b"0" * 64 + b" inode:1:2  then:3:4",
            "'9 sha256:" + "0" * 64 + " inode:1:2  then:3:4'",
        ),
        (b"9 then:3:4", "'9 then:3:4'"),
    ],
)
async def test_unreadable_checkpoint_rejected(
    tmp_path: Path, content: bytes, shown: str
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 1}\n')
    checkpoint = tmp_path / "checkpoint"
    checkpoint.write_bytes(content)
    source = FileSource(str(path), checkpoint_path=checkpoint)

    with pytest.raises(ConfigurationError) as error:
        await source.start()

    message = str(error.value)
    assert f"contains {shown}, not a byte offset" in message
    assert "delete it to start from the beginning" in message
