"""Transforms: user functions that see each envelope before the model app."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

from agogosml.envelope import Envelope
from agogosml.hooks import load_hook

#: A transform gets each envelope before the app and returns it (changed or not),
#: or None to drop the message. Dropped messages count as finished.
Transform = Callable[[Envelope], Envelope | None]


#: Control characters. aiohttp 3.14 does not send a header value with any of
#: them but the tab, and a server strips a tab at either end of a value.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")

#: How to fix a transform that does not fit.
_TRANSFORM_FIX = (
    "name a plain function (def, not async def) that takes one argument, "
    "the Envelope, and returns an Envelope or None"
)


def load_transform(spec: str) -> Transform:
    """Import the transform that READER_TRANSFORM names and check that it fits.

    Transforms run in the loop that fetches messages, before the lane of a
    message is chosen from its key, so an async transform would hold up
    fetching for every message. Async functions are therefore rejected rather
    than awaited.

    Raises:
        ConfigurationError: The function cannot be imported, is not callable, is
            an async or generator function, or cannot be called with one
            positional argument. Such a transform would make every message
            fail, so it stops the reader at start-up instead.
    """
    return load_hook(  # type: ignore[no-any-return]
        spec,
        "READER_TRANSFORM",
        _TRANSFORM_FIX,
        "transforms run synchronously before each message is sent",
    )


def result_problem(result: object) -> str:
    """Return why a transform's result cannot be sent, or '' when it can."""
    if result is None:
        return ""
    if inspect.iscoroutine(result):
        # Close it, so Python does not warn later that it was never awaited.
        result.close()
        return (
            "transform returned a coroutine; READER_TRANSFORM must name a plain "
            "function (def, not async def) that returns an Envelope or None"
        )
    if not isinstance(result, Envelope):
        return (
            f"transform returned {type(result).__name__}; it must return an "
            "Envelope or None"
        )
    if not isinstance(result.value, bytes):
        return f"transform set value to {type(result.value).__name__}, not bytes"
    if result.key is not None and not isinstance(result.key, bytes):
        return f"transform set key to {type(result.key).__name__}, not bytes or None"
    for field in ("id", "traceparent"):
        text = getattr(result, field)
        if not isinstance(text, str):
            return f"transform set {field} to {type(text).__name__}, not str"
        if _CONTROL_CHARACTER.search(text):
            return _control_character_problem(field, text)
    for header in result.headers:
        if not (
            isinstance(header, tuple)
            and len(header) == 2
            and isinstance(header[0], str)
            and (header[1] is None or isinstance(header[1], bytes))
        ):
            return (
                f"transform set header {header!r:.100}; headers are (str, bytes) "
                "or (str, None)"
            )
    return ""


def _control_character_problem(field: str, text: str) -> str:
    """Return why an id or traceparent with a control character cannot be sent."""
    problem = (
        f"transform set {field} to {text!r:.100}, which contains a control "
        f"character (U+0000 to U+001F or U+007F). The {field} travels in an "
        f"HTTP header, which cannot carry one, so set a {field} without them"
    )
    if field == "id":
        problem += (
            ", for example with agogosml.envelope.header_safe_id(raw_bytes), "
            "which percent-encodes them"
        )
    return problem
