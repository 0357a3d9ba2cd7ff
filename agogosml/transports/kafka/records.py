"""Sizes of Kafka records, as librdkafka and the broker compare them with limits."""

from __future__ import annotations

from collections.abc import Sequence

#: Per-record framing, in bytes, that librdkafka adds to value, key and headers
#: before it compares a record with ``message.max.bytes``
#: (``RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`` in librdkafka 2.16).
RECORD_OVERHEAD_BYTES = 36
#: Header of a v2 record batch, in bytes, from its base offset to its record
#: count (``RECORD_BATCH_OVERHEAD`` of Kafka's ``DefaultRecordBatch``).
RECORD_BATCH_OVERHEAD_BYTES = 61
#: Attributes, timestamp delta and offset delta of a record that is alone in its
#: batch: one byte each, because both deltas are 0.
_FIRST_RECORD_FIELDS_BYTES = 3

Headers = Sequence[tuple[str, bytes | None]]


def record_size(value: bytes | None, key: bytes | None, headers: Headers) -> int:
    """Return the size that librdkafka compares with ``message.max.bytes``, in bytes.

    librdkafka counts the largest framing a record may need, so this is an upper
    bound of the record's size on the wire.
    """
    return (
        RECORD_OVERHEAD_BYTES
        + len(value or b"")
        + len(key or b"")
        + _headers_size(headers)
    )


def record_batch_size(value: bytes | None, key: bytes | None, headers: Headers) -> int:
    """Return the size of an uncompressed record batch that holds only this record.

    The broker compares the size of each record batch with the topic's
    ``max.message.bytes``, so a record over it is rejected even when alone.
    """
    body = (
        _FIRST_RECORD_FIELDS_BYTES
        + _bytes_field_size(key)
        + _bytes_field_size(value)
        + _varint_size(len(headers))
        + _headers_size(headers)
    )
    return RECORD_BATCH_OVERHEAD_BYTES + _varint_size(body) + body


def _headers_size(headers: Headers) -> int:
    size = 0
    for name, value in headers:
        # Header names are mostly ASCII, whose UTF-8 length is their length.
        name_length = len(name) if name.isascii() else len(name.encode())
        size += _varint_size(name_length) + name_length + _bytes_field_size(value)
    return size


def _bytes_field_size(data: bytes | None) -> int:
    """Return the size of a length-prefixed field; a null field has length -1."""
    if data is None:
        return 1
    return _varint_size(len(data)) + len(data)


def _varint_size(number: int) -> int:
    """Return the bytes of `number` as a Kafka zigzag varint (non-negative only)."""
    zigzag = number << 1
    if zigzag < 0x80:
        return 1
    size = 1
    while zigzag >= 0x80:
        zigzag >>= 7
        size += 1
    return size
