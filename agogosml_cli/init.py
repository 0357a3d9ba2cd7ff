"""``agogosml init``: write a pipeline manifest from flags and prompts."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, TypeAdapter, ValidationError

from agogosml.config import SaslMechanism, SecurityProtocol
from agogosml_cli.manifest import (
    DEFAULT_MANIFEST_PATH,
    AppTemplate,
    EndpointType,
    EventHubsConnection,
    FileSink,
    FileSource,
    KafkaConnection,
    KafkaSink,
    Kubernetes,
    Manifest,
    ManifestError,
    Sasl,
    SecretRef,
    dump_manifest,
    manifest_json_schema,
    validate_manifest,
)

Data = dict[str, Any]
_SASL_PROTOCOLS = (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL)


class SecretRefType(click.ParamType):
    """A ``SECRET:KEY`` reference to a key of a Kubernetes Secret."""

    name = "SECRET:KEY"

    def convert(self, value: Any, param: Any, ctx: Any) -> SecretRef:
        """Parse the reference; the error message never repeats the value."""
        if isinstance(value, SecretRef):
            return value
        try:
            return SecretRef.parse(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class ListType(click.ParamType):
    """A comma-separated list of names."""

    name = "NAME[,NAME...]"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[str]:
        """Split at commas and drop empty items."""
        if isinstance(value, list):
            return value
        items = [item.strip() for item in str(value).split(",") if item.strip()]
        if not items:
            self.fail("expected one or more comma-separated names", param, ctx)
        return items


class FieldValueType(click.ParamType):
    """A value checked against the constraints of one manifest field."""

    def __init__(self, model: type[BaseModel], attribute: str) -> None:
        info = model.model_fields[attribute]
        self._check: TypeAdapter[Any] = TypeAdapter(info.rebuild_annotation())
        self._description = info.description or ""
        self.name = "TEXT"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        """Return the value if the field accepts it, otherwise fail with the rule."""
        try:
            self._check.validate_python(value)
        except ValidationError:
            self.fail(
                f"{value!r} is invalid. Expected: {self._description}", param, ctx
            )
        return value


@dataclass(frozen=True)
class InitField:
    """One manifest field that init sets from a flag, a default or a prompt.

    `default` applies with and without prompts, but a field with `confirm`
    is still prompted for, with the default shown. `suggestion` is only the
    default that a prompt shows. A field whose `applies` returns False for
    the values set so far is skipped.
    """

    path: tuple[str, ...]
    flag: str
    prompt: str
    help: str
    type: click.ParamType
    applies: Callable[[Data], bool] = lambda data: True
    default: Callable[[Data], Any] | None = None
    suggestion: Callable[[Data], Any] | None = None
    ask: bool = True
    confirm: bool = False
    required: bool = True

    @property
    def dest(self) -> str:
        """Name of the click parameter."""
        return self.flag.removeprefix("--").replace("-", "_")


def _get(data: Data, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _put(data: Data, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def _is_type(side: str, *types: EndpointType) -> Callable[[Data], bool]:
    return lambda data: _get(data, (side, "type")) in types


def _uses_sasl(side: str) -> Callable[[Data], bool]:
    def applies(data: Data) -> bool:
        return (
            _is_type(side, EndpointType.KAFKA)(data)
            and _get(data, (side, "security_protocol")) in _SASL_PROTOCOLS
        )

    return applies


def _from_source(*path: str) -> Callable[[Data], Any]:
    """Default a sink setting to the source's, if the sink is of the source's type."""

    def default(data: Data) -> Any:
        if _get(data, ("sink", "type")) != _get(data, ("source", "type")):
            return None
        return _get(data, ("source", *path))

    return default


def _or_plaintext(default: Callable[[Data], Any]) -> Callable[[Data], Any]:
    return lambda data: default(data) or SecurityProtocol.PLAINTEXT.value


def _no_default(*path: str) -> Callable[[Data], Any]:
    return lambda data: None


def _suggest_sink_topic(data: Data) -> str:
    topics = _get(data, ("source", "topics")) or ["output"]
    return f"{topics[0]}-scored"


def _choice(values: type[Any]) -> click.Choice[str]:
    return click.Choice([item.value for item in values])


def _endpoint_fields(side: str) -> list[InitField]:
    title = side.capitalize()
    stream = _is_type(side, EndpointType.KAFKA, EndpointType.EVENTHUBS)
    kafka = _is_type(side, EndpointType.KAFKA)
    eventhubs = _is_type(side, EndpointType.EVENTHUBS)
    file = _is_type(side, EndpointType.FILE)
    # The sink's connection defaults to the source's, because the chart gives
    # the reader and the writer one Kafka connection.
    shared = _from_source if side == "sink" else _no_default
    shared_note = (
        " Default: the source's, when the source is of the sink's type."
        if side == "sink"
        else ""
    )
    fields = [
        InitField(
            (side, "type"),
            f"--{side}",
            f"{title} type",
            f"Type of the {side}: kafka, eventhubs or file.",
            _choice(EndpointType),
            suggestion=(lambda data: _get(data, ("source", "type")))
            if side == "sink"
            else (lambda data: EndpointType.KAFKA.value),
        ),
    ]
    if side == "source":
        fields.append(
            InitField(
                ("source", "topics"),
                "--source-topics",
                "Source topics (comma-separated)",
                "Topics or event hubs to consume, comma-separated.",
                ListType(),
                applies=stream,
            )
        )
    else:
        fields.append(
            InitField(
                ("sink", "topic"),
                "--sink-topic",
                "Sink topic",
                "Topic or event hub to produce the results to.",
                FieldValueType(KafkaSink, "topic"),
                applies=stream,
                suggestion=_suggest_sink_topic,
            )
        )
    fields += [
        InitField(
            (side, "bootstrap_servers"),
            f"--{side}-bootstrap-servers",
            f"{title} Kafka bootstrap servers (host:port,...)",
            f"Kafka brokers of the {side}, as a comma-separated host:port list."
            + shared_note,
            FieldValueType(KafkaConnection, "bootstrap_servers"),
            applies=kafka,
            default=shared("bootstrap_servers"),
        ),
        InitField(
            (side, "security_protocol"),
            f"--{side}-security-protocol",
            f"{title} Kafka security protocol",
            "Kafka security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
            + (shared_note or " Default: PLAINTEXT."),
            _choice(SecurityProtocol),
            applies=kafka,
            default=_or_plaintext(shared("security_protocol")),
            confirm=side == "source",
        ),
        InitField(
            (side, "sasl", "mechanism"),
            f"--{side}-sasl-mechanism",
            f"{title} SASL mechanism",
            "SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512." + shared_note,
            _choice(SaslMechanism),
            applies=_uses_sasl(side),
            default=shared("sasl", "mechanism"),
        ),
        InitField(
            (side, "sasl", "username"),
            f"--{side}-sasl-username",
            f"{title} SASL user name",
            "SASL user name." + shared_note,
            FieldValueType(Sasl, "username"),
            applies=_uses_sasl(side),
            default=shared("sasl", "username"),
        ),
        InitField(
            (side, "sasl", "password"),
            f"--{side}-sasl-password-secret",
            f"{title} SASL password, as SECRET:KEY of a Kubernetes Secret",
            "Kubernetes Secret and key that hold the SASL password, as SECRET:KEY."
            + shared_note,
            SecretRefType(),
            applies=_uses_sasl(side),
            default=shared("sasl", "password"),
        ),
        InitField(
            (side, "ca_certificate"),
            f"--{side}-ca-secret",
            f"{title} CA certificate, as SECRET:KEY of a Kubernetes Secret",
            "Kubernetes Secret and key that hold the PEM file of the CA of the "
            "brokers, as SECRET:KEY."
            + (shared_note or " Default: the system CA store."),
            SecretRefType(),
            applies=kafka,
            default=shared("ca_certificate"),
            ask=False,
            required=False,
        ),
        InitField(
            (side, "namespace"),
            f"--{side}-eventhubs-namespace",
            f"{title} Event Hubs namespace",
            "Event Hubs namespace name, or its full host name." + shared_note,
            FieldValueType(EventHubsConnection, "namespace"),
            applies=eventhubs,
            default=shared("namespace"),
        ),
        InitField(
            (side, "connection_string"),
            f"--{side}-connection-secret",
            f"{title} Event Hubs connection string, as SECRET:KEY of a Kubernetes "
            "Secret",
            "Kubernetes Secret and key that hold the Event Hubs connection string, "
            "as SECRET:KEY." + shared_note,
            SecretRefType(),
            applies=eventhubs,
            default=shared("connection_string"),
        ),
        InitField(
            (side, "path"),
            f"--{side}-path",
            f"{title} file path (JSON Lines)",
            f"Path of the JSON Lines {side} file.",
            FieldValueType(FileSource if side == "source" else FileSink, "path"),
            applies=file,
        ),
    ]
    if side == "source":
        fields.append(
            InitField(
                ("source", "group_id"),
                "--source-group-id",
                "Consumer group",
                "Consumer group of the input reader. Default: the project name.",
                click.STRING,
                applies=stream,
                ask=False,
                required=False,
            )
        )
    return fields


def suggest_name(directory: Path) -> str | None:
    """Return the directory's name as a project name, or None if it is not valid."""
    name = re.sub(r"[^a-z0-9-]+", "-", directory.resolve().name.lower()).strip("-")
    try:
        TypeAdapter(Manifest.model_fields["name"].rebuild_annotation()).validate_python(
            name
        )
    except ValidationError:
        return None
    return name


FIELDS: list[InitField] = [
    InitField(
        ("name",),
        "--name",
        "Project name",
        "Project name: lowercase letters, digits and '-', starting with a letter.",
        FieldValueType(Manifest, "name"),
    ),
    InitField(
        ("app", "template"),
        "--template",
        "App template",
        "App template: python (a minimal model app) or fraud (the fraud-scoring "
        "app). Default: python.",
        _choice(AppTemplate),
        default=lambda data: AppTemplate.PYTHON.value,
        confirm=True,
    ),
    *_endpoint_fields("source"),
    *_endpoint_fields("sink"),
    InitField(
        ("registry",),
        "--registry",
        "Container registry (host[/path])",
        "Container registry of the images, such as myregistry.azurecr.io.",
        FieldValueType(Manifest, "registry"),
    ),
    InitField(
        ("kubernetes", "namespace"),
        "--namespace",
        "Kubernetes namespace",
        "Kubernetes namespace of the pipeline. Default: the project name.",
        FieldValueType(Kubernetes, "namespace"),
        default=lambda data: data.get("name"),
        confirm=True,
    ),
]

#: The flag of each field, by dotted path, for error messages.
FLAGS = {".".join(field.path): field.flag for field in FIELDS}


def collect_manifest_data(
    values: dict[str, Any],
    *,
    interactive: bool,
    suggestions: dict[str, Any] | None = None,
) -> Data:
    """Return manifest data from flag values, defaults and (if `interactive`) prompts.

    Fields are handled in the order of `FIELDS`, so a type is known before the
    fields that depend on it. `suggestions` gives prompt defaults by parameter
    name, in place of the fields' own.

    Raises:
        click.UsageError: A flag does not apply to the chosen types, or (without
            prompts) required fields are missing; the message lists their flags.
    """
    data: Data = {}
    missing: list[InitField] = []
    for field in FIELDS:
        value = values.get(field.dest)
        if not field.applies(data):
            if value is not None:
                raise click.UsageError(_inapplicable_message(field))
            continue
        default = field.default(data) if field.default is not None else None
        if value is None and interactive and field.confirm:
            value = _prompt(field, default)
        if value is None:
            value = default
        if value is None and interactive and field.ask:
            suggestion = (suggestions or {}).get(field.dest)
            if suggestion is None and field.suggestion is not None:
                suggestion = field.suggestion(data)
            value = _prompt(field, suggestion)
        if value is None:
            if field.required:
                missing.append(field)
            continue
        _put(data, field.path, value)
    if missing:
        listed = ", ".join(f"{'.'.join(f.path)} ({f.flag})" for f in missing)
        raise click.UsageError(
            f"missing required fields: {listed}; pass them as flags, or run without "
            "--no-input to be prompted"
        )
    return data


def _prompt(field: InitField, suggestion: Any) -> Any:
    return click.prompt(
        field.prompt,
        type=field.type,
        default=suggestion,
        show_choices=isinstance(field.type, click.Choice),
    )


def _inapplicable_message(field: InitField) -> str:
    side = field.path[0]
    if field.path[-1] in ("mechanism", "username", "password"):
        return (
            f"{field.flag} applies only to a Kafka {side} with security protocol "
            "SASL_PLAINTEXT or SASL_SSL"
        )
    kinds = [
        kind.value
        for kind in EndpointType
        if field.applies({side: {"type": kind.value}})
    ]
    return f"{field.flag} applies only to a {' or '.join(kinds)} {side}; remove it"


def _field_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for field in reversed(FIELDS):
        command = click.option(
            field.flag, field.dest, type=field.type, help=field.help
        )(command)
    return command


def _print_schema(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(manifest_json_schema(), nl=False)
        ctx.exit()


@click.command()
@click.option(
    "--manifest",
    "manifest_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_MANIFEST_PATH,
    show_default=True,
    help="File to write the manifest to.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing manifest.")
@click.option(
    "--no-input",
    is_flag=True,
    help="Never prompt; fail with the list of required fields that no flag sets.",
)
@click.option(
    "--print-schema",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_schema,
    help="Print the manifest's JSON Schema and exit.",
)
@_field_options
def init(manifest_path: Path, force: bool, no_input: bool, **values: Any) -> None:
    """Write a pipeline manifest (agogosml.yaml) for 'agogosml generate'.

    Every field can be set by a flag. Fields that no flag sets are prompted for,
    with defaults in brackets, unless --no-input is given. Secrets are never
    written: flags such as --source-connection-secret take SECRET:KEY, the name
    of a Kubernetes Secret and a key in it.
    """
    if manifest_path.exists() and not force:
        raise click.ClickException(
            f"{manifest_path} exists; edit it and run 'agogosml generate', or pass "
            "--force to overwrite it"
        )
    data = collect_manifest_data(
        values,
        interactive=not no_input,
        suggestions={"name": suggest_name(manifest_path.parent)},
    )
    data = _serializable(data)
    try:
        manifest = validate_manifest(data, "the manifest", FLAGS)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(dump_manifest(manifest), encoding="utf-8")
    click.echo(
        f"Wrote {manifest_path}. Next: 'agogosml generate --manifest "
        f"{manifest_path}' renders the project."
    )


def _serializable(data: Any) -> Any:
    """Replace `SecretRef` values by mappings, as the YAML manifest has them."""
    if isinstance(data, SecretRef):
        return data.model_dump()
    if isinstance(data, dict):
        return {key: _serializable(value) for key, value in data.items()}
    return data
