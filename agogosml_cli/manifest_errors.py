"""Turn a manifest's validation errors into lines that name the field, value and fix."""

from __future__ import annotations

import datetime
import difflib
import reprlib
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from agogosml_cli.manifest import EndpointType, Manifest, SecretRef
from agogosml_cli.shared_endpoints import SharedEndpointError, flag_label
from agogosml_cli.yaml_loader import scalar_node_at

# Fields whose invalid input is never shown, because it may be a secret that
# was pasted in place of a reference to a Kubernetes Secret.
_SECRET_FIELDS = frozenset({"password", "connection_string", "ca_certificate"})
_UNION_FIELDS = frozenset({"source", "sink"})
_TAGS = frozenset(item.value for item in EndpointType)
_MAX_VALUE_CHARS = 80
#: Errors named one by one; a message gives the number of the others.
SHOWN_ERRORS = 20


def describe_errors(
    exc: ValidationError,
    source_name: str,
    flags: dict[str, str],
    document: yaml.Node | None = None,
) -> str:
    """Return a message with one line per error of `exc`.

    Args:
        exc: The validation error of `Manifest`.
        source_name: The manifest's path, or another name for the input.
        flags: Command-line flags by field path, named next to their field.
        document: The YAML node tree of the manifest, or None when the data
            did not come from YAML.
    """
    errors = exc.errors(include_url=False)
    lines = [f"{source_name} is invalid:"]
    for error in errors[:SHOWN_ERRORS]:
        lines.append("  " + _describe_one(error, flags, document))
    hidden = len(errors) - SHOWN_ERRORS
    if hidden > 0:
        noun = "error" if hidden == 1 else "errors"
        lines.append(f"  and {hidden:,} more {noun}")
    return "\n".join(lines)


def _describe_one(error: Any, flags: dict[str, str], document: yaml.Node | None) -> str:
    location = _location(error["loc"])
    path = _path_text(location)
    flag = flags.get(_flag_key(location))
    where = f"{path} ({flag})" if flag else path
    kind = error["type"]
    message = str(error["msg"]).removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    hint = _field_hint(error["loc"])

    if not location:
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, SharedEndpointError):
            message = cause.describe(flag_label(flags))
        return f"{message}."
    if kind == "missing":
        return f"{where} is missing: set it. {hint}".rstrip()
    if kind == "extra_forbidden":
        home = _home(error["loc"])
        if home:
            section = _path_text(home[:-1])
            place = f"under {section}" if section else "to the top level"
            return (
                f"{where} is not a field at this level: move it {place}, "
                f"as {_path_text(home)}."
            )
        return f"{where} is not a manifest field: remove it{_suggestion(error['loc'])}."
    if kind == "union_tag_not_found":
        return (
            f"{where}.type is missing: set it to kafka, eventhubs or file"
            f"{_misspelt_type(error.get('input'))}."
        )
    if kind == "union_tag_invalid":
        value = _shown_value(location, _tag_input(error))
        return (
            f"{where}: type {value} is invalid: set type to kafka, eventhubs or file."
        )
    if kind == "value_error" and isinstance(error.get("input"), dict):
        # A check across the fields of a section names them itself, and the
        # section's own text would only bury it.
        return f"{where}: {message}. {hint}".rstrip()
    value = _shown_value(location, error.get("input"))
    if kind == "string_pattern_mismatch":
        message = "it does not have the expected form"
    if kind == "string_type":
        hint = _quote_hint(document, location, error.get("input")) + hint
    return f"{where}: invalid value {value}: {message}. {hint}".rstrip()


def _location(loc: tuple[int | str, ...]) -> list[int | str]:
    """Drop the tag that pydantic puts after ``source``/``sink`` in a location."""
    parts = list(loc)
    if len(parts) >= 2 and parts[0] in _UNION_FIELDS and parts[1] in _TAGS:
        del parts[1]
    return parts


def _path_text(location: list[int | str]) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _flag_key(location: list[int | str]) -> str:
    return ".".join(str(part) for part in location if isinstance(part, str))


def _tag_input(error: Any) -> Any:
    context = error.get("ctx") or {}
    return context.get("tag", error.get("input"))


_CONTAINER_REPR = reprlib.Repr()
_CONTAINER_REPR.maxlevel = 3
_CONTAINER_REPR.maxlist = 10
_CONTAINER_REPR.maxdict = 10


def _shown_value(location: list[int | str], value: Any) -> str:
    if any(part in _SECRET_FIELDS for part in location):
        return "<hidden>"
    # A YAML alias can repeat one list inside itself many times over, so a
    # container is shown only to a few levels and items.
    text = (
        _CONTAINER_REPR.repr(value) if isinstance(value, list | dict) else repr(value)
    )
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


def _quote_hint(
    document: yaml.Node | None, location: list[int | str], value: Any
) -> str:
    """Return advice to quote a scalar that YAML read as a boolean, number or date.

    PyYAML follows YAML 1.1, so unquoted yes, no, on and off are booleans too,
    0777 and 1_000 are numbers, and 2001-12-14 is a date. The advice quotes
    the scalar's text from the file, which can differ from the parsed value
    (0777 is 511), unless the field's input is never shown.
    """
    if document is None or not isinstance(value, bool | int | float | datetime.date):
        return ""
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, datetime.date):
        kind = "a date"
    else:
        kind = "a number"
    node = scalar_node_at(document, location)
    if node is None or any(part in _SECRET_FIELDS for part in location):
        return (
            f"YAML reads this unquoted value as {kind}; put it in quotes to keep "
            "it as text. "
        )
    if node.style is not None:
        # A quoted scalar with an explicit tag such as !!int: quotes do not help.
        return ""
    line = node.start_mark.line + 1
    return (
        f'YAML reads the unquoted "{node.value}" on line {line} as {kind}; put it '
        f'in quotes, "{node.value}", to keep it as text. '
    )


def _field_hint(loc: tuple[int | str, ...]) -> str:
    """Return the description of the field at `loc`, which states the valid values."""
    while loc and isinstance(loc[-1], int):
        loc = loc[:-1]
    parent, name = _parent_model(loc[:-1]), loc[-1] if loc else None
    info = parent.model_fields.get(name) if parent and isinstance(name, str) else None
    if info is None or not info.description:
        return ""
    return f"Expected: {info.description}"


def _suggestion(loc: tuple[int | str, ...]) -> str:
    parent = _parent_model(loc[:-1])
    if parent is None or not loc:
        return ""
    matches = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields))
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _home(loc: tuple[int | str, ...]) -> list[int | str] | None:
    """Return the location where the unknown key at `loc` is a field, or None.

    The key's own section is searched first, for a nested section with a
    field of that name. Unless the key looks like a misspelt field of its own
    section, the sections around it are searched next, from the nearest
    outwards, each for a field of that name and then for one in its nested
    sections. So ``registry`` under ``kubernetes`` goes to the top level, and
    ``namespace`` under ``app`` to ``kubernetes``.
    """
    key = loc[-1] if loc else None
    if not isinstance(key, str):
        return None
    nested = _nested_home(loc)
    if nested:
        return [*_location(loc[:-1]), nested, key]
    if _suggestion(loc):
        return None
    for depth in range(len(loc) - 2, -1, -1):
        section = loc[:depth]
        model = _parent_model(section)
        if model is None:
            continue
        if key in model.model_fields:
            return [*_location(section), key]
        nested = _nested_home((*section, key))
        if nested:
            return [*_location(section), nested, key]
    return None


def _nested_home(loc: tuple[int | str, ...]) -> str | None:
    """Return the field of a nested section that has the unknown key's name.

    A key such as ``namespace`` at the top level belongs under ``kubernetes``,
    and ``username`` of a Kafka source under ``sasl``: the fix is to move it.
    A Secret reference is no such section: its ``key`` is not a field that a
    user puts elsewhere by mistake.
    """
    parent = _parent_model(loc[:-1])
    if parent is None or not loc:
        return None
    for name, info in parent.model_fields.items():
        members = _models_of(info.annotation)
        if len(members) != 1 or members[0] is SecretRef:
            continue
        if loc[-1] in members[0].model_fields:
            return name
    return None


def _misspelt_type(section: Any) -> str:
    """Return a hint naming a key of `section` that looks like ``type`` misspelt."""
    if not isinstance(section, dict):
        return ""
    keys = [key for key in section if isinstance(key, str)]
    matches = difflib.get_close_matches("type", keys, n=1)
    return f" (is {matches[0]!r} meant to be 'type'?)" if matches else ""


def _parent_model(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Return the model that contains the fields at the end of `loc`.

    Pydantic puts the tag after ``source`` and ``sink``, as in ``("source",
    "kafka", "topics")``, so the tag selects the member of the tagged union.
    """
    model: type[BaseModel] | None = Manifest
    members: list[type[BaseModel]] = []
    for part in loc:
        if members and part in _TAGS:
            model = next((m for m in members if _tag_of(m) == part), None)
            members = []
            continue
        if model is None or not isinstance(part, str):
            continue
        info = model.model_fields.get(part)
        if info is None:
            return None
        members = _models_of(info.annotation)
        model = members[0] if len(members) == 1 else None
    return model


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    return [
        candidate
        for candidate in candidates
        if isinstance(candidate, type) and issubclass(candidate, BaseModel)
    ]


def _tag_of(model: type[BaseModel]) -> str | None:
    info = model.model_fields.get("type")
    args = getattr(info.annotation, "__args__", ()) if info else ()
    return str(args[0].value) if args else None
