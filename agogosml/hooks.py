"""User functions named in settings as module:function, checked at start-up."""

from __future__ import annotations

import inspect
from typing import Any

from agogosml.errors import ConfigurationError
from agogosml.http import import_object


def load_hook(spec: str, variable: str, fix: str, why_not_async: str) -> Any:
    """Import the function that `variable` names and check that it takes one argument.

    Raises:
        ConfigurationError: The function cannot be imported, is not callable, is
            an async or generator function, or cannot be called with one
            positional argument.
    """
    function = import_object(spec, variable)
    problem = signature_problem(function, fix, why_not_async)
    if problem:
        raise ConfigurationError(f"{variable}={spec!r} is invalid: {problem}")
    return function


def signature_problem(function: object, fix: str, why_not_async: str) -> str:
    """Return why `function` cannot be called with one argument, or '' when it can."""
    if not callable(function):
        kind = type(function).__name__
        return f"it names an object of type {kind}, not a function; {fix}"
    functions = _called_functions(function)
    if any(_is_async(called) for called in functions):
        return f"it names an async function, but {why_not_async}; {fix}"
    if any(inspect.isgeneratorfunction(called) for called in functions):
        return f"it names a generator function; {fix}"
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        # Some built-in callables have no signature to check.
        return ""
    try:
        signature.bind(None)
    except TypeError:
        return f"its signature {signature} does not take one positional argument; {fix}"
    return ""


def _called_functions(function: Any) -> list[Any]:
    """Return `function` and, for an instance, the ``__call__`` method it runs.

    `inspect.iscoroutinefunction` unwraps functools.partial, but it does not
    look at the class of an instance that defines ``async def __call__``.
    """
    functions = [function]
    if not inspect.isroutine(function) and not inspect.isclass(function):
        functions.append(type(function).__call__)
    return functions


def _is_async(function: Any) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)
