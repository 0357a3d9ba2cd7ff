"""The message envelope that travels from a source, through the app, to a sink."""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import random
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import NamedTuple

MESSAGE_ID_HEADER = "message-id"
TRACEPARENT_HEADER = "traceparent"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: An HTTP field name (an RFC 9110 token).
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PRINTABLE_ASCII = re.compile(rb"[\x20-\x7e]+")
_ID_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_TRACEPARENT_LENGTH = 55
_HEX_VERSION = re.compile(r"[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

#: Record headers as a source reads them and a sink writes them: name and
#: value, where a value may be None (Kafka distinguishes null from empty).
RecordHeaders = list[tuple[str, bytes | None]]


class HttpHeaders(NamedTuple):
    """Record headers as text for HTTP: values by name, and which are base64.

    Names keep their spelling. Of names that differ only in case, which HTTP
    treats as one, the last one counts. A null value is None in `values` and
    its name is in `null_names`, because a request header carries only text.
    """

    values: dict[str, str | None]
    base64_names: list[str]
    null_names: list[str]

    def non_token_name(self) -> str | None:
        """Return the first name that cannot end an HTTP header name, or None."""
        for name in self.values:
            if not HEADER_NAME.fullmatch(name):
                return name
        return None

    def cased_names(self) -> list[str]:
        """Return the names that are not all lower case, which HTTP may fold."""
        return [name for name in self.values if name != name.lower()]


def _header_text(raw: bytes) -> str | None:
    """Return a header value as text if HTTP carries it unchanged, else None.

    HTTP drops whitespace around a header value and rejects control
    characters, so such values do not count as text.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text != text.strip() or _CONTROL.search(text):
        return None
    return text


class Position(NamedTuple):
    """Source position of a message: enough for the source to commit past it.

    A named tuple rather than a frozen dataclass: a source makes one per message,
    and a tuple is built in a third of the time.

    Attributes:
        topic: Topic name, or the file path for file sources.
        partition: Partition number (0 for files).
        offset: Offset of the message (byte offset of the line for files).
        next_offset: Position to commit once this message is finished.
        generation: Assignment generation, so a source can ignore completions of
            messages from a partition it has since lost and regained.
    """

    topic: str
    partition: int
    offset: int
    next_offset: int
    generation: int = 0


@dataclass(slots=True)
class Envelope:
    """A message with its identity, routing key, headers and trace context.

    Attributes:
        value: Message body, normally a JSON document.
        key: Partitioning key, or None.
        headers: Record headers other than the id and trace context.
        id: Message id, kept from a ``message-id`` header or derived from the
            position, so a redelivered message keeps its id.
        traceparent: W3C trace context header value.
        position: Where the message was read, for sources that commit.
        null_value: Whether the record had no value at all (a Kafka tombstone),
            as opposed to an empty one; `value` is then empty.
        problem: Why the source could not read the message whole, such as a
            line over the length limit. The reader dead-letters such a message
            with this error instead of sending it to the app.
    """

    value: bytes
    key: bytes | None = None
    headers: RecordHeaders = field(default_factory=list)
    id: str = ""
    traceparent: str = ""
    position: Position | None = None
    null_value: bool = False
    problem: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = position_id(self.position) if self.position else new_id()
        if not self.traceparent:
            self.traceparent = new_traceparent()

    @classmethod
    def from_record(
        cls,
        value: bytes,
        key: bytes | None,
        headers: RecordHeaders | None,
        position: Position | None,
    ) -> Envelope:
        """Build an envelope from a raw record, lifting out the id and trace context."""
        if not headers:
            return cls(
                value=value,
                key=key,
                headers=[],
                id=position_id(position) if position else new_id(),
                traceparent=new_traceparent(),
                position=position,
            )
        message_id = ""
        parent = ""
        rest = []
        for name, raw in headers:
            lowered = name.lower()
            # An empty or null id or trace context is left out: the envelope
            # gets its own, and the output record has one of each.
            if lowered == MESSAGE_ID_HEADER:
                message_id = header_safe_id(raw) if raw else message_id
            elif lowered == TRACEPARENT_HEADER:
                parent = raw.decode("ascii", "replace") if raw else parent
            else:
                rest.append((name, raw))
        return cls(
            value=value,
            key=key,
            headers=rest,
            id=message_id,
            traceparent=child_traceparent(parent),
            position=position,
        )

    def record_headers(self) -> RecordHeaders:
        """Return the headers to write with the record, id and trace context first."""
        return [
            (MESSAGE_ID_HEADER, self.id.encode()),
            (TRACEPARENT_HEADER, self.traceparent.encode()),
            *self.headers,
        ]

    def http_headers(self) -> HttpHeaders:
        """Return the record headers by name, as text that HTTP carries.

        A value that is UTF-8 text without control characters or surrounding
        whitespace goes as it is. Any other value, binary data included, is
        base64-encoded and its name listed in `base64_names`, so that it fits
        in an ``X-Record-Header-<name>`` request header unchanged. An output
        record has one value per name, and HTTP does not tell names apart by
        case, so of names equal but for case the last one and its value win.
        A header with an empty name is left out. A null value stays None.
        """
        if not self.headers:
            return HttpHeaders({}, [], [])
        # By lower-case name: the name as spelled, its text, whether base64.
        latest: dict[str, tuple[str, str | None, bool]] = {}
        for name, raw in self.headers:
            if not name:
                # NOTE: a header without a name stays behind: no request
                # header and no writer batch element can carry one.
                continue
            lowered = name.lower()
            if raw is None:
                latest[lowered] = (name, None, False)
                continue
            text = _header_text(raw)
            if text is None:
                latest[lowered] = (name, base64.b64encode(raw).decode("ascii"), True)
            else:
                latest[lowered] = (name, text, False)
        values = {name: text for name, text, _ in latest.values()}
        encoded = sorted(name for name, _, is_base64 in latest.values() if is_base64)
        nulls = sorted(name for name, text, _ in latest.values() if text is None)
        return HttpHeaders(values, encoded, nulls)

    def key_text(self) -> tuple[str | None, bool]:
        """Return the key as text and whether it had to be base64-encoded.

        Keys that are not UTF-8, or that an HTTP header would not carry unchanged
        (control characters, leading or trailing whitespace), are base64-encoded.
        """
        if self.key is None:
            return None, False
        try:
            text = self.key.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if text and text == text.strip() and not _CONTROL.search(text):
            return text, False
        if not self.key:
            return "", False
        return base64.b64encode(self.key).decode("ascii"), True


#: Maximum length of a message id kept from a ``message-id`` header, in bytes
#: as encoded.
MAX_ID_BYTES = 512


def id_problem(message_id: str) -> str:
    """Return why `message_id` cannot be an agogosml id, or '' when it can.

    Ids travel in HTTP headers, which cannot carry a control character.
    """
    if message_id.isprintable() or not _CONTROL.search(message_id):
        return ""
    return (
        f"{message_id!r:.100} contains a control character (U+0000 to U+001F or "
        "U+007F), which agogosml ids may not contain, because they travel in "
        "HTTP headers; send an id without them, such as one that "
        "agogosml.envelope.header_safe_id returns"
    )


def header_safe_id(raw: bytes) -> str:
    """Return a message id that fits in an HTTP header unchanged.

    An id of printable ASCII is kept. Any other id is percent-encoded, so
    distinct ids stay distinct and a redelivered message gets the same id. An
    id longer than `MAX_ID_BYTES` becomes ``sha256:`` and the hex digest of the
    header, which is as stable and keeps every request and dead letter of the
    message small.
    """
    if _PRINTABLE_ASCII.fullmatch(raw) and raw == raw.strip():
        text = raw.decode("ascii")
    else:
        text = urllib.parse.quote(raw, safe=_ID_SAFE)
    if len(text) > MAX_ID_BYTES:
        return _digest_id(raw)
    return text


def bounded_id(message_id: str) -> str:
    """Return `message_id`, or ``sha256:`` and its hex digest when it is too long.

    An id over `MAX_ID_BYTES` bytes of UTF-8 gets the digest of those bytes,
    as a long ``message-id`` header does in `header_safe_id`, so an id that an
    app sets stays as small in the output as one that the reader derives.
    """
    # A character takes at most 4 bytes of UTF-8, so a short id is not encoded.
    if len(message_id) <= MAX_ID_BYTES // 4:
        return message_id
    raw = message_id.encode()
    if len(raw) > MAX_ID_BYTES:
        return _digest_id(raw)
    return message_id


def _digest_id(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


#: Ids need to be unique, not secret, so a seeded generator makes them without
#: the system call that os.urandom makes per id.
_ids = random.Random(os.urandom(32))


def _random_hex(bits: int) -> str:
    """Return a random non-zero number of `bits` bits as lower-case hex digits."""
    digits = _ids.randbytes(bits // 8).hex()
    # All zeros is not a valid trace id, span id or message id.
    return digits if digits.strip("0") else _random_hex(bits)


def new_id() -> str:
    """Return a random 128-bit message id as 32 hex digits."""
    return _random_hex(128)


def position_id(position: Position) -> str:
    """Return the message id of a record without a message-id header.

    The id is ``topic:partition:offset``, percent-encoded when the topic (or
    file path) has characters that an HTTP header cannot carry unchanged.
    """
    text = f"{position.topic}:{position.partition}:{position.offset}"
    if _is_plain(position.topic):
        return text
    # "%" is encoded too, so that a file named "%C3%A9" and one named "é" get
    # different ids.
    return urllib.parse.quote(text.encode(), safe=_ID_SAFE)


@functools.lru_cache(maxsize=256)
def _is_plain(topic: str) -> bool:
    """Return whether an id that starts with `topic` can go in a header as it is."""
    return (
        bool(_PRINTABLE_ASCII.fullmatch(topic.encode()))
        and "%" not in topic
        and topic == topic.strip()
    )


def new_traceparent() -> str:
    """Return a W3C traceparent that starts a new, sampled trace."""
    return f"00-{_random_hex(128)}-{_random_hex(64)}-01"


def child_traceparent(parent: str) -> str:
    """Return a traceparent for a new span in the trace of `parent`.

    A missing or malformed parent starts a new trace, as the W3C Trace Context
    recommendation requires of a receiver.
    """
    # Most parents were written by another agogosml service, in canonical form.
    if len(parent) != _TRACEPARENT_LENGTH or _TRACEPARENT.match(parent) is None:
        parent = _as_version_00(parent.strip().lower())
        if _TRACEPARENT.match(parent) is None:
            return new_traceparent()
    if parent[3:35] == _ZERO_TRACE or parent[36:52] == _ZERO_SPAN:
        return new_traceparent()
    # Keep "00-<trace id>-" and "-<flags>"; the span id between them is new.
    return f"{parent[:36]}{_random_hex(64)}{parent[52:]}"


def _as_version_00(parent: str) -> str:
    """Return a traceparent of a later version in the form of version 00.

    A later version may append fields after a dash, so its first 55 characters
    are read as version 00, and the trace of a newer caller goes on. Version ff
    is invalid. Any other value is returned unchanged.
    """
    version = parent[:2]
    if version in ("00", "ff") or _HEX_VERSION.fullmatch(version) is None:
        return parent
    if len(parent) > _TRACEPARENT_LENGTH and parent[_TRACEPARENT_LENGTH] != "-":
        return parent
    return "00" + parent[2:_TRACEPARENT_LENGTH]


def trace_id(traceparent: str) -> str | None:
    """Return the trace id of a traceparent, or None when it is malformed."""
    match = _TRACEPARENT.match(traceparent)
    return match.group(1) if match else None
