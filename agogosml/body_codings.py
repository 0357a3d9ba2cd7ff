"""Decoding of compressed request bodies, with checks aiohttp leaves out.

The services read request bodies undecoded and decode them here. The decoding
of aiohttp 3.14 checks that a deflate body is complete, but not a gzip body:
it passes on the part of a truncated one that it could decode, so the request
would be written as a shorter record.
Here a body must be a whole stream of its coding, and its decoded size is
limited while it is decoded, so a small body cannot expand without bound.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable

import brotli

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd


class BodyCodingError(ValueError):
    """A body that is not a whole stream of its declared coding."""


class DecodedBodyTooLarge(ValueError):
    """A body whose decoded size is over the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the decoded body is over {limit} bytes")
        self.limit = limit


def decode_body(coding: str, data: bytes, limit: int) -> bytes:
    """Return `data` decoded from the content coding `coding`.

    `coding` is one of gzip, deflate, br and zstd (identity is not decoded).
    Concatenated gzip members and zstd frames are decoded one after another.

    Raises:
        BodyCodingError: the data is not valid, or ends inside the stream.
        DecodedBodyTooLarge: the decoded data would be over `limit` bytes.
    """
    decoders: dict[str, Callable[[bytes, int], bytes]] = {
        "gzip": _decode_gzip,
        "deflate": _decode_deflate,
        "br": _decode_brotli,
        "zstd": _decode_zstd,
    }
    if not data:
        return b""
    return decoders[coding](data, limit)


def _decode_gzip(data: bytes, limit: int) -> bytes:
    output = bytearray()
    while data:
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        _inflate(decoder, data, output, limit, "gzip")
        data = decoder.unused_data
    return bytes(output)


def _decode_deflate(data: bytes, limit: int) -> bytes:
    # RFC 9110 defines deflate as the zlib format, but some clients send raw
    # deflate data without the zlib header, so that is accepted too.
    has_zlib_header = (
        len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
    )
    wbits = zlib.MAX_WBITS if has_zlib_header else -zlib.MAX_WBITS
    output = bytearray()
    decoder = zlib.decompressobj(wbits)
    _inflate(decoder, data, output, limit, "deflate")
    if decoder.unused_data:
        raise BodyCodingError("it has data after the end of the deflate stream")
    return bytes(output)


def _inflate(
    decoder: zlib._Decompress, data: bytes, output: bytearray, limit: int, name: str
) -> None:
    """Decode one zlib stream into `output`; raise if it is invalid or incomplete."""
    pending = data
    try:
        while pending and not decoder.eof:
            output += decoder.decompress(pending, limit - len(output) + 1)
            _check_size(output, limit)
            pending = decoder.unconsumed_tail
    except zlib.error as exc:
        raise BodyCodingError(f"it is not valid {name} data ({exc})") from None
    if not decoder.eof:
        raise BodyCodingError(f"it ends before the end of its {name} stream")


def _decode_brotli(data: bytes, limit: int) -> bytes:
    decoder = brotli.Decompressor()
    output = bytearray()
    try:
        output += decoder.process(data, output_buffer_limit=limit + 1)
        _check_size(output, limit)
        while not decoder.can_accept_more_data():
            output += decoder.process(b"", output_buffer_limit=limit + 1)
            _check_size(output, limit)
    except brotli.error as exc:
        raise BodyCodingError(f"it is not valid br data ({exc})") from None
    if not decoder.is_finished():
        raise BodyCodingError("it ends before the end of its br stream")
    return bytes(output)


def _decode_zstd(data: bytes, limit: int) -> bytes:
    output = bytearray()
    while data:
        decoder = zstd.ZstdDecompressor()
        try:
            output += decoder.decompress(data, limit - len(output) + 1)
            _check_size(output, limit)
            while not decoder.eof and not decoder.needs_input:
                output += decoder.decompress(b"", limit - len(output) + 1)
                _check_size(output, limit)
        except zstd.ZstdError as exc:
            raise BodyCodingError(f"it is not valid zstd data ({exc})") from None
        if not decoder.eof:
            raise BodyCodingError("it ends before the end of its zstd stream")
        data = decoder.unused_data
    return bytes(output)


def _check_size(output: bytearray, limit: int) -> None:
    if len(output) > limit:
        raise DecodedBodyTooLarge(limit)
