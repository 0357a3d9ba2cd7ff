"""Render the settings models as the configuration reference."""

from __future__ import annotations

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from agogosml.app import AppSettings
from agogosml.config import (
    EventHubSettings,
    KafkaSettings,
    ReaderSettings,
    WriterSettings,
)

SECTIONS: list[tuple[str, type[BaseSettings]]] = [
    ("Input reader", ReaderSettings),
    ("Output writer", WriterSettings),
    ("Kafka (reader and writer)", KafkaSettings),
    ("Azure Event Hubs (reader and writer)", EventHubSettings),
    ("Model apps built on agogosml.app.ModelApp", AppSettings),
]


def settings_reference() -> str:
    """Return a Markdown table per settings model: variable, default, range, meaning."""
    parts = []
    for title, model in SECTIONS:
        prefix = str(model.model_config.get("env_prefix", ""))
        rows = [
            "| variable | default | range | meaning |",
            "|---|---|---|---|",
        ]
        for name, info in model.model_fields.items():
            variable = f"{prefix}{name}".upper()
            rows.append(
                f"| `{variable}` | {_default(info)} | {_range(info)} "
                f"| {_meaning(info)} |"
            )
        parts.append(f"## {title}\n\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    if hasattr(value, "value"):
        value = value.value
    if value in ("", None, {}):
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _range(info: FieldInfo) -> str:
    """Return the numeric bounds that validation enforces, such as `10` to `60000`."""
    low = high = None
    for constraint in info.metadata:
        if isinstance(constraint, annotated_types.Ge):
            low = f"`{constraint.ge}`"
        elif isinstance(constraint, annotated_types.Gt):
            low = f"over `{constraint.gt}`"
        elif isinstance(constraint, annotated_types.Le):
            high = f"`{constraint.le}`"
        elif isinstance(constraint, annotated_types.Lt):
            high = f"under `{constraint.lt}`"
    if low and high:
        return f"{low} to {high}"
    if low:
        return f"at least {low}" if low.startswith("`") else low
    if high:
        return f"at most {high}" if high.startswith("`") else high
    return ""


def _meaning(info: FieldInfo) -> str:
    description = info.description or ""
    _, _, meaning = description.partition(": ")
    return (meaning or description).replace("|", "\\|")
