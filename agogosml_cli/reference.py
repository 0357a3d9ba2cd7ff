"""Render the settings models as the configuration reference."""

from __future__ import annotations

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
    """Return a Markdown table per settings model: variable, default, meaning."""
    parts = []
    for title, model in SECTIONS:
        prefix = str(model.model_config.get("env_prefix", ""))
        rows = [
            "| variable | default | meaning |",
            "|---|---|---|",
        ]
        for name, info in model.model_fields.items():
            variable = f"{prefix}{name}".upper()
            rows.append(f"| `{variable}` | {_default(info)} | {_meaning(info)} |")
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


def _meaning(info: FieldInfo) -> str:
    description = info.description or ""
    _, _, meaning = description.partition(": ")
    return (meaning or description).replace("|", "\\|")
