"""Transforms: user functions that see each envelope before the model app."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from agogosml.envelope import Envelope
from agogosml.errors import ConfigurationError
from agogosml.http import import_object

#: A transform gets each envelope before the app and returns it (changed or not),
#: or None to drop the message. Dropped messages count as finished.
Transform = Callable[[Envelope], Envelope | None]


def load_transform(spec: str) -> Transform:
    """Import the transform that READER_TRANSFORM names and check that it fits.

    Raises:
        ConfigurationError: The function cannot be imported, is not callable, is
            an async or generator function, or cannot be called with one
            positional argument. Such a transform would make every message
            fail, so it stops the reader at start-up instead.
    """
    transform = import_object(spec, "READER_TRANSFORM")
    problem = signature_problem(transform)
    if problem:
        raise ConfigurationError(f"READER_TRANSFORM={spec!r} is invalid: {problem}")
    return transform  # type: ignore[no-any-return]


def signature_problem(transform: object) -> str:
    """Return why `transform` cannot be a transform, or '' when it can.

    Transforms run in the loop that fetches messages, before the lane of a
    message is chosen from its key, so an async transform would hold up
    fetching for every message. Async functions are therefore rejected rather
    than awaited.
    """
    fix = (
        "name a plain function (def, not async def) that takes one argument, "
        "the Envelope, and returns an Envelope or None"
    )
    if not callable(transform):
        kind = type(transform).__name__
        return f"it names an object of type {kind}, not a function; {fix}"
    functions = _called_functions(transform)
    if any(_is_async(function) for function in functions):
        return (
            "it names an async function, but transforms run synchronously before "
            f"each message is sent; {fix}. Do I/O in the model app instead"
        )
    if any(inspect.isgeneratorfunction(function) for function in functions):
        return f"it names a generator function; {fix}"
    try:
        signature = inspect.signature(transform)
    except (TypeError, ValueError):
        # Some built-in callables have no signature to check.
        return ""
    try:
        signature.bind(None)
    except TypeError:
        return (
            f"its signature {signature} does not take the envelope as its only "
            f"argument; {fix}"
        )
    return ""


def _called_functions(transform: Any) -> list[Any]:
    """Return `transform` and, for an instance, the ``__call__`` method it runs.

    `inspect.iscoroutinefunction` unwraps functools.partial, but it does not
    look at the class of an instance that defines ``async def __call__``.
    """
    functions = [transform]
    if not inspect.isroutine(transform) and not inspect.isclass(transform):
        functions.append(type(transform).__call__)
    return functions


def _is_async(function: Any) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)


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
    for header in result.headers:
        if not (
            isinstance(header, tuple)
            and len(header) == 2
            and isinstance(header[0], str)
            and isinstance(header[1], bytes)
        ):
            return f"transform set header {header!r:.100}; headers are (str, bytes)"
    return ""
