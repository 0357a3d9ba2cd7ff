"""Derive the Helm chart's schema of the services' settings from the settings models.

The chart's ``reader.settings``, ``writer.settings`` and ``app.settings`` maps
become environment variables. Each variable's schema follows its field, so
that ``helm install`` rejects a value that would stop the service at start-up.
``python -m agogosml_cli.chart_settings`` rewrites the chart's
values.schema.json with them.
"""

from __future__ import annotations

import enum
import functools
import json
import typing
from pathlib import Path
from typing import Any

import annotated_types

from agogosml_cli.reference import SECTIONS

#: The chart's values schema.
SCHEMA_PATH = Path(__file__).parents[1] / "helm" / "agogosml" / "values.schema.json"

#: The components whose ``settings`` map the schema describes.
COMPONENTS = ("reader", "writer", "app")

#: A whole number as a string, as environment variables carry it.
_DIGITS = r"^\s*[0-9]+\s*$"


def setting_schema(variable: str) -> dict[str, Any]:
    """Return the JSON Schema of one service variable as a chart setting.

    A number range applies to an integer value, and a string of digits is
    accepted too, because an environment variable is text. A choice is
    accepted in lower, upper and capitalised case, as the services accept any
    case. Any other variable takes a string, integer or boolean.

    Raises:
        KeyError: when no settings model has `variable`.
    """
    info = _fields()[variable]
    annotation = info.annotation
    choices = _choices(annotation)
    if choices:
        spellings = {form for choice in choices for form in _spellings(choice)}
        return {"type": "string", "enum": sorted(spellings)}
    if _is_int(annotation):
        schema: dict[str, Any] = {"type": ["integer", "string"], "pattern": _DIGITS}
        for constraint in info.metadata:
            if isinstance(constraint, annotated_types.Ge):
                schema["minimum"] = constraint.ge
            elif isinstance(constraint, annotated_types.Le):
                schema["maximum"] = constraint.le
        return schema
    return {"type": ["string", "integer", "boolean"]}


def settings_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Return `schema` with each setting's entry derived from its field."""
    updated = json.loads(json.dumps(schema))
    for component in COMPONENTS:
        properties = updated["properties"][component]["properties"]["settings"][
            "properties"
        ]
        for variable in properties:
            properties[variable] = setting_schema(variable)
    return updated


@functools.cache
def _fields() -> dict[str, Any]:
    fields = {}
    for _, model in SECTIONS:
        prefix = str(model.model_config.get("env_prefix", ""))
        for name, info in model.model_fields.items():
            fields[f"{prefix}{name}".upper()] = info
    return fields


def _choices(annotation: Any) -> list[str]:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(member.value) for member in annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return [str(value) for value in typing.get_args(annotation)]
    return []


def _spellings(choice: str) -> set[str]:
    return {choice, choice.lower(), choice.upper(), choice.capitalize()}


def _is_int(annotation: Any) -> bool:
    if annotation is int:
        return True
    arguments = typing.get_args(annotation)
    return int in arguments and all(a in (int, type(None)) for a in arguments)


def main() -> None:
    """Rewrite the settings entries of the chart's values.schema.json."""
    schema = json.loads(SCHEMA_PATH.read_text())
    SCHEMA_PATH.write_text(json.dumps(settings_schema(schema), indent=2) + "\n")


if __name__ == "__main__":
    main()
