"""JSON decoding and encoding that keep integers outside the 64-bit range exact.

orjson (3.x) decodes an integer outside [-2**63, 2**64) to the nearest float
without an error, rejects one beyond the range of a double as "infinity", and
refuses to encode a Python int outside that range. The services decode with
orjson first, because it is several times faster than the standard library, and
decode again with `json` only when a body may contain such an integer.

NOTE: numbers with a fraction or an exponent are decoded to the nearest double
on both paths, so digits beyond the 17 significant digits of a double are lost.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from typing import Any

import orjson

INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1

#: Maps digits to "0", bytes that can precede a JSON number to " ", "-" to
#: itself and any other byte to "x", so that `bytes.translate` and two
#: substring searches find long integers at C speed.
_NUMBER_SHAPE = bytes(
    ord("0")
    if byte in b"0123456789"
    else ord(" ")
    if byte in b" \t\r\n[:,"
    else ord("-")
    if byte == ord("-")
    else ord("x")
    for byte in range(256)
)
#: A positive integer of 20 or more digits (2**64 has 20) or a negative one of
#: 19 or more (-2**63 has 19), after a byte that can precede a JSON number.
_LONG_POSITIVE = b" " + b"0" * 20
_LONG_NEGATIVE = b" -" + b"0" * 19
_DIGIT_RUN = b"0" * 19
#: A word outside quotes, where orjson expected a JSON value.
_WORD = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
_LITERALS = (b"true", b"false", b"null")


def may_contain_big_int(body: bytes) -> bool:
    """Return whether `body` may contain an integer outside the 64-bit range.

    Digits inside strings after a space or comma can match too; such a body
    only takes the slower exact decoding.
    """
    shape = body.translate(_NUMBER_SHAPE)
    if _DIGIT_RUN not in shape:
        # The common case, checked first: each integer outside the range has
        # a run of 19 digits, and floats have at most 17 significant digits.
        return False
    shape = b" " + shape
    return _LONG_POSITIVE in shape or _LONG_NEGATIVE in shape


def loads_exact(body: bytes, parse_int: Callable[[str], Any] = int) -> Any:
    r"""Decode `body` with the standard library, which keeps every integer exact.

    `parse_int` gets the text of each integer. Raises ValueError for invalid
    JSON, NaN, Infinity, a number beyond the range of a double, nesting too deep
    for the recursion limit, and (with the default `parse_int`) an integer of
    more than `sys.get_int_max_str_digits()` digits. A string with a lone
    surrogate escape such as ``"\ud800"`` is rejected too, as orjson rejects it,
    so that both paths accept the same documents.
    """
    try:
        document = json.loads(
            body.decode(),
            parse_int=_bounded(parse_int),
            parse_float=_finite_float,
            parse_constant=_reject_constant,
        )
        _check_strings(document)
    except RecursionError:
        raise ValueError("the JSON document is nested too deeply") from None
    return document


def decode_error(value: bytes, exc: orjson.JSONDecodeError) -> str:
    """Return orjson's message for `value`, naming the first byte that is not UTF-8.

    orjson reports any invalid UTF-8 as "surrogates not allowed", even when
    the input has no surrogate.
    """
    text = str(exc)
    if "not valid UTF-8" not in text:
        return text + _bare_word_hint(value, exc.pos)
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = value[error.start]
        return (
            f"the bytes are not valid UTF-8: byte 0x{byte:02x} at position "
            f"{error.start}; send JSON encoded as UTF-8"
        )
    return text


def _bare_word_hint(value: bytes, position: int) -> str:
    """Return a fix for a word outside quotes at character `position`, else ''.

    orjson reads a word that starts with t, f or n as a misspelt true, false
    or null, so "this is text" gets "expected 'true'", which hides the fix.
    """
    start = len(value.decode("utf-8", "replace")[:position].encode())
    if value[start : start + 1] == b"'":
        return "; JSON strings and keys take double quotes, not single quotes"
    word = _WORD.match(value, start)
    if word is None or word[0] in _LITERALS:
        return ""
    lower = word[0].lower()
    if lower in (b"nan", b"inf", b"infinity"):
        return "; NaN and Infinity are not JSON numbers: send null or a finite number"
    if lower in _LITERALS or word[0] == b"None":
        return "; JSON writes true, false and null in lower case"
    if any(literal.startswith(word[0]) for literal in _LITERALS):
        return ""  # A literal cut short, which orjson's message names.
    return '; text must be a JSON string in double quotes, such as "text"'


def json_error(value: bytes) -> str:
    """Return why `value` is not a JSON document, or '' when it is one.

    A document with an integer beyond the range of a double, which orjson
    rejects, is valid JSON, so it gets a second look with the exact decoder.
    """
    try:
        orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        if "infinity" in str(exc):
            # The exact decoder names the number, where orjson gives only
            # its position.
            try:
                loads_exact(value, int_or_fragment)
            except ValueError as exact_error:
                return str(exact_error)
            return ""
        return decode_error(value, exc)
    return ""


def json_type(value: object) -> str:
    """Return the JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float | orjson.Fragment):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a string"


def int_or_fragment(text: str) -> int | orjson.Fragment:
    """Return an integer that orjson encodes exactly, else its text as a Fragment."""
    if len(text) <= 18:
        return int(text)
    if len(text) > 21:
        return orjson.Fragment(text)
    value = int(text)
    if INT64_MIN <= value <= UINT64_MAX:
        return value
    return orjson.Fragment(text)


def compact(data: bytes) -> bytes:
    """Return a copy of `data` that takes only its own size in memory.

    orjson 3.13 returns its output buffer as the bytes object, so even the
    encoding of ``0`` keeps about 4 KiB allocated. A copy is cheap next to
    that for an encoding that is kept, such as each record of a batch.
    """
    return bytes(memoryview(data))


def dumps(document: Any, *, option: int = 0, default: Any = None) -> bytes:
    """Encode `document` like `orjson.dumps`, including integers beyond 64 bits.

    Raises:
        orjson.JSONEncodeError: when `document` cannot be encoded for another
            reason.
    """
    try:
        return orjson.dumps(document, option=option, default=default)
    except orjson.JSONEncodeError:
        try:
            converted, changed = _big_ints_to_fragments(document)
        except RecursionError:
            # Nested deeper than Python's recursion limit, so deeper than
            # orjson's limit of 255 too, so orjson's error is raised.
            changed = False
        if not changed:
            raise
        return orjson.dumps(converted, option=option, default=default)


def _big_ints_to_fragments(document: Any) -> tuple[Any, bool]:
    """Return a copy of `document` with ints beyond 64 bits as Fragments."""
    if isinstance(document, int) and not isinstance(document, bool):
        if INT64_MIN <= document <= UINT64_MAX:
            return document, False
        return orjson.Fragment(int.__repr__(document)), True
    if isinstance(document, dict):
        pairs = {key: _big_ints_to_fragments(value) for key, value in document.items()}
        changed = any(value_changed for _, value_changed in pairs.values())
        return {key: value for key, (value, _) in pairs.items()}, changed
    if isinstance(document, list | tuple):
        elements = [_big_ints_to_fragments(value) for value in document]
        changed = any(element_changed for _, element_changed in elements)
        return [value for value, _ in elements], changed
    return document, False


def _bounded(parse_int: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap `parse_int` so that an integer too long to convert names its length."""

    def parse(text: str) -> Any:
        try:
            return parse_int(text)
        except ValueError:
            raise ValueError(
                f"an integer of {len(text.lstrip('-'))} digits is longer than the "
                f"{sys.get_int_max_str_digits()} digits this service converts; "
                "send it as a JSON string"
            ) from None

    return parse


def _check_strings(document: Any) -> None:
    """Raise ValueError for a string or key that contains a lone surrogate."""
    if isinstance(document, str):
        _check_text(document)
    elif isinstance(document, dict):
        for key, value in document.items():
            _check_text(key)
            _check_strings(value)
    elif isinstance(document, list):
        for value in document:
            _check_strings(value)


def _check_text(text: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError(
            f"the string {text[:40]!r} contains a lone surrogate escape, which is "
            "not valid Unicode; escape characters outside the BMP as surrogate pairs"
        ) from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is beyond the range of a double")
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")
