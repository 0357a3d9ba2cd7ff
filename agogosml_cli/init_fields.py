"""The manifest fields that ``agogosml init`` sets, with their flags and prompts.

`FIELDS` lists them in prompt order, so that a type comes before the fields
that depend on it. Each field has its flag, its prompt, its default and the
source or sink types it applies to.
"""

from __future__ import annotations

import copy
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, TypeAdapter, ValidationError

from agogosml.config import SaslMechanism, SecurityProtocol
from agogosml_cli.manifest import (
    AppTemplate,
    EndpointType,
    EventHubsConnection,
    FileSink,
    FileSource,
    KafkaConnection,
    KafkaSink,
    KafkaSource,
    Kubernetes,
    Manifest,
    Sasl,
    SecretRef,
    repeated_names,
    stream_type_conflict,
)
from agogosml_cli.resolve import resolve
from agogosml_cli.shared_endpoints import find_shared_endpoint, flag_label

#: Manifest data while init collects it: nested dictionaries by field name.
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


class TopicListType(click.ParamType):
    """A comma-separated list of topic (or event hub) names, none twice.

    Each name is checked with the manifest's rule for a topic, so a prompt
    repeats, and a flag fails, at the first invalid name.
    """

    name = "TOPIC[,TOPIC...]"

    def __init__(self) -> None:
        self._topic = FieldValueType(KafkaSink, "topic")

    def convert(self, value: Any, param: Any, ctx: Any) -> list[str]:
        """Split at commas, drop empty items and check each name."""
        if isinstance(value, list):
            items = value
        else:
            items = [item.strip() for item in str(value).split(",") if item.strip()]
        if not items:
            self.fail("expected one or more comma-separated names", param, ctx)
        for item in items:
            self._topic.convert(item, param, ctx)
        repeated = repeated_names(items)
        if repeated:
            self.fail(
                f"{repeated[0]!r} is listed more than once in {value!r}. List each "
                "topic once.",
                param,
                ctx,
            )
        return items


class FieldValueType(click.ParamType):
    """A value checked against the constraints of one manifest field."""

    def __init__(
        self,
        model: type[BaseModel],
        attribute: str,
        suggest: Callable[[str], str | None] | None = None,
    ) -> None:
        """Check values of `attribute`, naming the value that `suggest` returns."""
        info = model.model_fields[attribute]
        self._check: TypeAdapter[Any] = TypeAdapter(info.rebuild_annotation())
        self._description = info.description or ""
        self._suggest = suggest
        self.name = "TEXT"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        """Return the value as the field stores it, or fail with the rule."""
        try:
            return self._check.validate_python(value)
        except ValidationError as exc:
            near = self._suggest(str(value)) if self._suggest else None
            hint = f" Did you mean {near!r}?" if near and near != value else ""
            self.fail(
                f"{value!r} is invalid{_reason(exc)}.{hint} Expected: "
                f"{self._description}",
                param,
                ctx,
            )


def _reason(exc: ValidationError) -> str:
    """Return ": <validator message>", or "" when the value only has the wrong form."""
    error = exc.errors(include_url=False)[0]
    if error["type"] != "value_error":
        return ""
    return ": " + str(error["msg"]).removeprefix("Value error, ")


@dataclass(frozen=True)
class InitField:
    """One manifest field that init sets from a flag, a default or a prompt.

    `default` applies with and without prompts, but a field with `confirm`
    (True, or a function of the values set so far that returns True) is still
    prompted for, with the default shown. `suggestion` is only the
    default that a prompt shows. A field whose `applies` returns False for
    the values set so far is skipped. `check` returns why a value conflicts
    with the values set so far, or None: a flag value is then rejected, and a
    prompt asks again. `default_from` is the path of the field whose value
    `default` copies, if any. `metavar` names the flag's value in --help
    (and in docs/cli.md); by default it is the name of `type`.
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
    confirm: bool | Callable[[Data], bool] = False
    required: bool = True
    check: Callable[[Data, Any], str | None] | None = None
    default_from: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        """Name of the click parameter."""
        return self.flag.removeprefix("--").replace("-", "_")


def get_value(data: Data, path: tuple[str, ...]) -> Any:
    """Return the value at `path` in nested `data`, or None if it is not set."""
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def put_value(data: Data, path: tuple[str, ...], value: Any) -> None:
    """Set the value at `path` in nested `data`, creating the parents."""
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def _is_type(side: str, *types: EndpointType) -> Callable[[Data], bool]:
    return lambda data: get_value(data, (side, "type")) in types


def _uses_sasl(side: str) -> Callable[[Data], bool]:
    def applies(data: Data) -> bool:
        return (
            _is_type(side, EndpointType.KAFKA)(data)
            and get_value(data, (side, "security_protocol")) in _SASL_PROTOCOLS
        )

    return applies


def _from_source(*path: str) -> Callable[[Data], Any]:
    """Default a sink setting to the source's, if the sink is of the source's type."""

    def default(data: Data) -> Any:
        if get_value(data, ("sink", "type")) != get_value(data, ("source", "type")):
            return None
        return get_value(data, ("source", *path))

    return default


def _or_plaintext(default: Callable[[Data], Any]) -> Callable[[Data], Any]:
    return lambda data: default(data) or SecurityProtocol.PLAINTEXT.value


def _no_default(*path: str) -> Callable[[Data], Any]:
    return lambda data: None


def _suggest_kafka(data: Data) -> str:
    return EndpointType.KAFKA.value


def _suggest_sink_type(data: Data) -> Any:
    return get_value(data, ("source", "type"))


def _check_sink_type(data: Data, sink_type: Any) -> str | None:
    source_type = get_value(data, ("source", "type"))
    conflict = stream_type_conflict(source_type, sink_type)
    if conflict is None:
        return None
    return (
        f"{conflict}. Choose {source_type} or file as the sink type, or change "
        "the source type."
    )


def _check_shared(*path: str) -> Callable[[Data, Any], str | None]:
    """Return a check that the value at `path` shares no name with another role."""

    def check(data: Data, value: Any) -> str | None:
        candidate = copy.deepcopy(data)
        put_value(candidate, path, value)
        conflict = find_shared_endpoint(candidate.get("source"), candidate.get("sink"))
        if conflict is None:
            return None
        return conflict.describe(flag_label(FLAGS)) + "."

    return check


def _suggest_sink_topic(data: Data) -> str:
    topics = get_value(data, ("source", "topics")) or ["output"]
    return f"{topics[0]}-scored"


def _choice(values: type[Any]) -> click.Choice[str]:
    return click.Choice([item.value for item in values])


@dataclass(frozen=True)
class _Side:
    """The source or the sink, whose fields init collects."""

    name: str

    @property
    def title(self) -> str:
        return self.name.capitalize()

    def of_type(self, *types: EndpointType) -> Callable[[Data], bool]:
        return _is_type(self.name, *types)

    def shared(self, *path: str) -> Callable[[Data], Any]:
        """Return the default of a connection setting.

        The sink's connection defaults to the source's, because the chart
        gives the reader and the writer one Kafka connection.
        """
        return _from_source(*path) if self.name == "sink" else _no_default(*path)

    def shared_note(self, otherwise: str = "") -> str:
        """Return the help sentence on a connection setting's default.

        `otherwise` is the default without the source's value, such as
        "PLAINTEXT", or empty when there is none.
        """
        if self.name == "sink":
            text = " Default: the source's, when the source is of the sink's type"
            return text + (f", else {otherwise}." if otherwise else ".")
        return f" Default: {otherwise}." if otherwise else ""


def _type_fields(side: _Side) -> list[InitField]:
    stream = side.of_type(EndpointType.KAFKA, EndpointType.EVENTHUBS)
    kind = InitField(
        (side.name, "type"),
        f"--{side.name}",
        f"{side.title} type",
        f"Type of the {side.name}: kafka, eventhubs or file.",
        _choice(EndpointType),
        suggestion=_suggest_sink_type if side.name == "sink" else _suggest_kafka,
        check=_check_sink_type if side.name == "sink" else None,
    )
    if side.name == "source":
        topics = InitField(
            ("source", "topics"),
            "--source-topics",
            "Source topics (comma-separated)",
            "Topics or event hubs to consume, comma-separated.",
            TopicListType(),
            applies=stream,
            check=_check_shared("source", "topics"),
        )
    else:
        topics = InitField(
            ("sink", "topic"),
            "--sink-topic",
            "Sink topic",
            "Topic or event hub to produce the results to.",
            FieldValueType(KafkaSink, "topic"),
            applies=stream,
            suggestion=_suggest_sink_topic,
            check=_check_shared("sink", "topic"),
            metavar="TOPIC",
        )
    return [kind, topics]


def _kafka_fields(side: _Side) -> list[InitField]:
    kafka = side.of_type(EndpointType.KAFKA)
    sasl = _uses_sasl(side.name)
    return [
        InitField(
            (side.name, "bootstrap_servers"),
            f"--{side.name}-bootstrap-servers",
            f"{side.title} Kafka bootstrap servers that the pipeline reaches on "
            "Kubernetes (host:port,..., such as kafka.example.svc:9092)",
            f"Kafka brokers of the {side.name} that the pipeline reaches on "
            "Kubernetes, as a comma-separated host:port list. Local runs use the "
            "broker of docker-compose.yml instead." + side.shared_note(),
            FieldValueType(KafkaConnection, "bootstrap_servers"),
            applies=kafka,
            default=side.shared("bootstrap_servers"),
            metavar="HOST:PORT[,HOST:PORT...]",
        ),
        InitField(
            (side.name, "security_protocol"),
            f"--{side.name}-security-protocol",
            f"{side.title} Kafka security protocol",
            "Kafka security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
            + side.shared_note("PLAINTEXT"),
            _choice(SecurityProtocol),
            applies=kafka,
            default=_or_plaintext(side.shared("security_protocol")),
            confirm=side.name == "source",
        ),
        InitField(
            (side.name, "sasl", "mechanism"),
            f"--{side.name}-sasl-mechanism",
            f"{side.title} SASL mechanism",
            "SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
            + side.shared_note(),
            _choice(SaslMechanism),
            applies=sasl,
            default=side.shared("sasl", "mechanism"),
        ),
        InitField(
            (side.name, "sasl", "username"),
            f"--{side.name}-sasl-username",
            f"{side.title} SASL user name",
            "SASL user name." + side.shared_note(),
            FieldValueType(Sasl, "username"),
            applies=sasl,
            default=side.shared("sasl", "username"),
            metavar="NAME",
        ),
        InitField(
            (side.name, "sasl", "password"),
            f"--{side.name}-sasl-password-secret",
            f"{side.title} SASL password, as SECRET:KEY of a Kubernetes Secret",
            "Kubernetes Secret and key that contain the SASL password, as "
            "SECRET:KEY." + side.shared_note(),
            SecretRefType(),
            applies=sasl,
            default=side.shared("sasl", "password"),
        ),
        InitField(
            (side.name, "ca_certificate"),
            f"--{side.name}-ca-secret",
            f"{side.title} CA certificate, as SECRET:KEY of a Kubernetes Secret",
            "Kubernetes Secret and key that contain the PEM file of the CA of the "
            "brokers, as SECRET:KEY." + side.shared_note("the system CA store"),
            SecretRefType(),
            applies=kafka,
            default=side.shared("ca_certificate"),
            ask=False,
            required=False,
        ),
    ]


def _eventhubs_fields(side: _Side) -> list[InitField]:
    eventhubs = side.of_type(EndpointType.EVENTHUBS)
    return [
        InitField(
            (side.name, "namespace"),
            f"--{side.name}-eventhubs-namespace",
            f"{side.title} Event Hubs namespace (a name such as payments-prod, "
            "or a full host name)",
            "Event Hubs namespace name, or its full host name." + side.shared_note(),
            FieldValueType(EventHubsConnection, "namespace"),
            applies=eventhubs,
            default=side.shared("namespace"),
            metavar="NAMESPACE",
        ),
        InitField(
            (side.name, "connection_string"),
            f"--{side.name}-connection-secret",
            f"{side.title} Event Hubs connection string, as SECRET:KEY of a "
            "Kubernetes Secret",
            "Kubernetes Secret and key that contain the Event Hubs connection "
            "string, as SECRET:KEY." + side.shared_note(),
            SecretRefType(),
            applies=eventhubs,
            default=side.shared("connection_string"),
        ),
    ]


def _file_fields(side: _Side) -> list[InitField]:
    model = FileSource if side.name == "source" else FileSink
    return [
        InitField(
            (side.name, "path"),
            f"--{side.name}-path",
            f"{side.title} file path (JSON Lines)",
            f"Path of the JSON Lines {side.name} file.",
            FieldValueType(model, "path"),
            applies=side.of_type(EndpointType.FILE),
            check=_check_shared(side.name, "path"),
            metavar="PATH",
        ),
    ]


def _group_id_field() -> InitField:
    return InitField(
        ("source", "group_id"),
        "--source-group-id",
        "Consumer group",
        "Consumer group of the input reader. Default: the project name.",
        FieldValueType(KafkaSource, "group_id"),
        applies=_is_type("source", EndpointType.KAFKA, EndpointType.EVENTHUBS),
        ask=False,
        required=False,
        metavar="GROUP",
    )


def _endpoint_fields(name: str) -> list[InitField]:
    """Return the fields of the source or the sink, each after those it depends on."""
    side = _Side(name)
    fields = [
        *_type_fields(side),
        *_kafka_fields(side),
        *_eventhubs_fields(side),
        *_file_fields(side),
    ]
    if name == "source":
        fields.append(_group_id_field())
    return fields


def suggest_name(directory: Path) -> str | None:
    """Return the directory's name as a project name, or None if it is not valid."""
    try:
        directory = resolve(directory)
    except ValueError:
        return None
    return project_name_like(directory.name)


#: Latin letters that Unicode does not split into a letter and an accent.
_UNSPLIT_LETTERS = str.maketrans(
    {"ø": "o", "Ø": "o", "ß": "ss", "æ": "ae", "Æ": "ae", "œ": "oe", "Œ": "oe",
     "ð": "d", "đ": "d", "Đ": "d", "ł": "l", "Ł": "l", "þ": "th", "Þ": "th"}
)  # fmt: skip


def project_name_like(text: str) -> str | None:
    """Return `text` as a valid project name, such as bad-name for Bad_Name, or None.

    Letters become lowercase without their accents (Ü becomes u), and each run
    of characters other than letters, digits and '-' becomes one '-'.
    """
    folded = unicodedata.normalize("NFKD", text.translate(_UNSPLIT_LETTERS))
    plain = folded.encode("ascii", "ignore").decode()
    name = re.sub(r"[^a-z0-9-]+", "-", plain.lower()).strip("-")
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
        "Project name: 1 to 40 lowercase letters, digits and '-', starting with a "
        "letter and ending with a letter or digit; not the name of a Python keyword "
        "or of a module that the project imports (docs/manifest.md).",
        FieldValueType(Manifest, "name", project_name_like),
        metavar="NAME",
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
        "Container registry of the images (host[:port][/path], such as "
        "myregistry.azurecr.io)",
        "Container registry of the images, such as myregistry.azurecr.io.",
        FieldValueType(Manifest, "registry"),
        metavar="HOST[:PORT][/PATH]",
    ),
    InitField(
        ("kubernetes", "namespace"),
        "--namespace",
        "Kubernetes namespace",
        "Kubernetes namespace of the pipeline. Default: the project name.",
        FieldValueType(Kubernetes, "namespace"),
        metavar="NAMESPACE",
        default=lambda data: data.get("name"),
        default_from=("name",),
        # A project with files at both ends gets no Helm values and no CD
        # pipeline, so the namespace is not worth a question there.
        confirm=lambda data: (
            not (
                _is_type("source", EndpointType.FILE)(data)
                and _is_type("sink", EndpointType.FILE)(data)
            )
        ),
    ),
]

#: The flag of each field, by dotted path, for error messages.
FLAGS = {".".join(field.path): field.flag for field in FIELDS}
