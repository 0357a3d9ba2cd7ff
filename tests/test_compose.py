"""Reading compose files for `agogosml up`, and the generated projects' files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_scaffold import (
    FILE_FLAGS,
    KAFKA_FLAGS,
    generate,
    init_manifest,
    isolate_git,
    tool,
)

from agogosml_cli.compose import (
    ComposeError,
    interpolate,
    load_compose,
    parse_duration_ns,
)


@pytest.fixture(scope="module", params=["kafka", "file"])
def generated_project(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate_git(monkeypatch, tmp_path_factory.mktemp("git"))
        project = tmp_path_factory.mktemp(f"{request.param}-project")
        flags = KAFKA_FLAGS if request.param == "kafka" else FILE_FLAGS
        result = generate(init_manifest(project, flags))
        assert result.exit_code == 0, result.output
        return project


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "docker-compose.yml"
    path.write_text(text)
    return path


def test_generated_compose_file_passes_compose_schema(generated_project: Path) -> None:
    checker = tool("check-jsonschema")
    assert checker is not None, "check-jsonschema is a dev dependency"
    result = subprocess.run(
        [
            checker,
            "--builtin-schema",
            "vendor.compose-spec",
            str(generated_project / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_compose_file_loads(generated_project: Path) -> None:
    project = load_compose(generated_project / "docker-compose.yml", {})
    order = [service.name for service in project.start_order()]
    assert order.index("writer") < order.index("app") < order.index("reader")
    reader = project.services["reader"]
    assert reader.healthcheck is not None
    assert reader.healthcheck.interval_ns == 5_000_000_000
    assert reader.environment["READER_APP_URL"] == "http://app:8000"
    assert reader.environment["READER_BATCH_MAX_MESSAGES"] == "100"
    assert project.services["app"].build is not None
    assert project.services["app"].build.context == generated_project.resolve()


def test_kafka_services_are_replaced_by_external_broker(tmp_path: Path) -> None:
    (tmp_path / "git").mkdir()
    (tmp_path / "project").mkdir()
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate_git(monkeypatch, tmp_path / "git")
        result = generate(init_manifest(tmp_path / "project", KAFKA_FLAGS))
    assert result.exit_code == 0, result.output
    project = load_compose(tmp_path / "project" / "docker-compose.yml", {})
    assert {"kafka", "kafka-topics"} <= set(project.services)

    dropped = project.use_external_kafka("10.89.0.1:39092")

    assert sorted(dropped) == ["kafka", "kafka-topics"]
    assert set(project.services) == {"reader", "app", "writer"}
    for name in ("reader", "writer"):
        service = project.services[name]
        assert service.environment["KAFKA_BOOTSTRAP_SERVERS"] == "10.89.0.1:39092"
        assert all(d.service in project.services for d in service.depends_on)


def test_external_kafka_needs_labelled_services(tmp_path: Path) -> None:
    path = write(tmp_path, "services:\n  app:\n    image: app:1\n")
    project = load_compose(path, {})
    with pytest.raises(ComposeError, match="io.agogosml.role=kafka"):
        project.use_external_kafka("broker:9092")


@pytest.mark.parametrize(
    ("text", "variables", "expected"),
    [
        ("${IMAGE:-app:1}", {}, "app:1"),
        ("${IMAGE:-app:1}", {"IMAGE": "mine:2"}, "mine:2"),
        ("${IMAGE:-app:1}", {"IMAGE": ""}, "app:1"),
        ("${IMAGE-app:1}", {"IMAGE": ""}, ""),
        ("$HOME_DIR/x", {"HOME_DIR": "/h"}, "/h/x"),
        ("cost $$5", {}, "cost $5"),
        ("${OUTER:-${INNER:-deep}}", {}, "deep"),
        ("${MISSING}", {}, ""),
        ("a$", {}, "a$"),
        ("$1", {}, "$1"),
    ],
)
def test_interpolation_follows_compose(
    text: str, variables: dict[str, str], expected: str
) -> None:
    assert interpolate(text, variables) == expected


@pytest.mark.parametrize("text", ["${UNCLOSED", "${1BAD}", "${}"])
def test_bad_reference_is_named(text: str) -> None:
    with pytest.raises(ComposeError, match="service app image"):
        interpolate(text, {}, "service app image")


def test_required_variable_names_itself() -> None:
    with pytest.raises(ComposeError, match="TOKEN: set the token"):
        interpolate("${TOKEN:?set the token}", {}, "service app environment")


def test_env_file_fills_variables_and_environment_wins(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("# images\nAPP_IMAGE='from-env-file:1'\nTAG=3\n")
    path = write(
        tmp_path,
        "services:\n  app:\n    image: ${APP_IMAGE}\n    environment:\n"
        "      TAG: ${TAG}\n",
    )
    project = load_compose(path, {"TAG": "4"})
    assert project.services["app"].image == "from-env-file:1"
    assert project.services["app"].environment == {"TAG": "4"}


@pytest.mark.parametrize(
    ("value", "nanoseconds"),
    [("5s", 5e9), ("1m30s", 90e9), ("500ms", 5e8), ("1h", 3600e9), ("1.5s", 1.5e9)],
)
def test_durations(value: str, nanoseconds: float) -> None:
    assert parse_duration_ns(value, "interval") == int(nanoseconds)


@pytest.mark.parametrize("value", ["5", "five seconds", "5 s", "-1s", ""])
def test_bad_duration_names_value(value: str) -> None:
    with pytest.raises(ComposeError, match="not a duration"):
        parse_duration_ns(value, "service app healthcheck interval")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services:\n  app:\n    image: a\n    networks: [x]\n", "uses networks"),
        ("services:\n  app:\n    environment: {A: 1}\n", "neither image: nor build:"),
        (
            "services:\n  app:\n    image: a\n    depends_on: [db]\n",
            "depends on db, which is not defined",
        ),
        (
            "services:\n  a:\n    image: a\n    depends_on: [b]\n"
            "  b:\n    image: b\n    depends_on: [a]\n",
            "cycle",
        ),
        (
            "services:\n  app:\n    image: a\n    depends_on:\n"
            "      db: {condition: service_ready}\n  db:\n    image: d\n",
            "condition service_ready",
        ),
        ("services:\n  app:\n    image: a\n    ports: ['x:80']\n", "publishes 'x:80'"),
        ("services:\n  app:\n    image: a\n    volumes: ['data:/d']\n", "volume data"),
        ("services:\n  app:\n    image: a\n    restart: sometimes\n", "restart"),
        ("services: [app]\n", "no services mapping"),
        ("services:\n  app: [\n", "not valid YAML"),
        ("secrets: {}\nservices:\n  app:\n    image: a\n", "uses secrets"),
        (
            "services:\n  app:\n    image: a\n    image: b\n",
            "the key 'image' appears twice in one mapping, on lines 3 and 4",
        ),
        ("services: {}\n", "defines no services"),
        (
            "services:\n  app:\n    image: a\n    depends_on: {b: service_healthy}\n"
            "  b:\n    image: b\n",
            "is not a mapping",
        ),
        (
            "services:\n  app:\n    image: a\n    depends_on:\n"
            "      b: {condition: service_healthy}\n  b:\n    image: b\n",
            "b has no health check",
        ),
        (
            "services:\n  app:\n    image: a\n    healthcheck:\n"
            "      test: [CMD, 'true']\n      retries: three\n",
            "retries is 'three'",
        ),
        (
            "services:\n  app:\n    image: a\n    restart: on-failure:x\n",
            "on-failure:N",
        ),
        ("services:\n  app:\n    image: a\nvolumes: [data]\n", "must be a mapping"),
        ("services:\n  app:\n    image: a\n    container_name: 12\n", "not a string"),
        (
            "services:\n  1:\n    image: a\n  a:\n    image: b\n    depends_on: [x]\n",
            "depends on x",
        ),
        ("services:\n  app:\n    image: a\n    read_only: maybe\n", "true or false"),
        ("services:\n  app:\n    image: a\n    ports: '8080:80'\n", "must be a list"),
        (
            "services:\n  app:\n    image: a\n    environment: {FLAG: yes}\n",
            "YAML boolean True. Quote it",
        ),
        ("services:\n  app:\n    image: a\n    command: 'a \"b'\n", "cannot be split"),
        ("services:\n  app:\n    image: a\n    x-extra: 1\n", "uses x-extra"),
        ("name: Bad Name\nservices:\n  app:\n    image: a\n", "is not valid"),
    ],
)
def test_unsupported_or_wrong_compose_is_named(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ComposeError, match=message):
        project = load_compose(write(tmp_path, text), {})
        project.start_order()


def test_compose_syntax_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "services:\n  app: [unclosed\n")

    with pytest.raises(ComposeError) as caught:
        load_compose(path, {})

    assert f'in "{path}", line' in str(caught.value)
    assert "<unicode string>" not in str(caught.value)


def test_missing_compose_file_says_where(tmp_path: Path) -> None:
    with pytest.raises(ComposeError, match="cannot read the compose file"):
        load_compose(tmp_path / "docker-compose.yml", {})


def test_ports_volumes_and_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "name: demo-pipeline\nservices:\n  app:\n    image: a\n"
        "    ports: ['127.0.0.1:9094:9094', '8080:80', '53/udp']\n"
        "    volumes: ['./data:/data:ro', 'cache:/cache']\n"
        "    command: serve --fast\n"
        "volumes:\n  cache: {}\n",
    )
    project = load_compose(path, {})
    app = project.services["app"]
    assert project.name == "demo-pipeline"
    assert project.network == "demo-pipeline_default"
    assert project.container_name(app) == "demo-pipeline-app-1"
    assert [
        (p.host_ip, p.host_port, p.container_port, p.protocol) for p in app.ports
    ] == [
        ("127.0.0.1", 9094, 9094, "tcp"),
        (None, 8080, 80, "tcp"),
        (None, None, 53, "udp"),
    ]
    assert app.mounts[0].source == str((tmp_path / "data").resolve())
    assert app.mounts[0].read_only
    assert app.mounts[1].named and app.mounts[1].source == "cache"
    assert app.command == ["serve", "--fast"]


def test_alias_expansion_is_capped(tmp_path: Path) -> None:
    # Each level lists the previous one ten times: 10**7 values from 500 bytes.
    levels = ["&x0 [" + ", ".join(["a"] * 10) + "]"]
    for level in range(1, 7):
        levels.append(f"&x{level} [" + ", ".join([f"*x{level - 1}"] * 10) + "]")
    text = "services:\n  app:\n    image: a\n    command: [" + ", ".join(levels) + "]\n"
    with pytest.raises(ComposeError, match="expands to more than"):
        load_compose(write(tmp_path, text), {})


def test_deep_nesting_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "services:\n  app:\n    image: a\n    labels: " + "[" * 5000)
    with pytest.raises(ComposeError, match="nests too deeply|not valid YAML"):
        load_compose(path, {})


@pytest.mark.parametrize("name", ["docker-compose.yml", ".env"])
def test_non_utf8_file_is_named(tmp_path: Path, name: str) -> None:
    write(tmp_path, "services:\n  app:\n    image: a\n")
    (tmp_path / name).write_bytes(b"services:\n  app:\n    image: \xff\n")
    with pytest.raises(ComposeError, match="is not UTF-8"):
        load_compose(tmp_path / "docker-compose.yml", {})


def test_interpolated_boolean_is_parsed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "services:\n  app:\n    image: a\n    read_only: ${RO:-false}\n",
    )
    assert load_compose(path, {}).services["app"].read_only is False
    assert load_compose(path, {"RO": "true"}).services["app"].read_only is True


def test_environment_passes_host_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "services:\n  app:\n    image: a\n    environment:\n"
        "      - FROM_HOST\n      - ABSENT\n      - SET=1\n",
    )
    environment = load_compose(path, {"FROM_HOST": "x"}).services["app"].environment
    assert environment == {"FROM_HOST": "x", "SET": "1"}


def test_null_environment_value_passes_host_value(tmp_path: Path) -> None:
    path = write(
        tmp_path, "services:\n  app:\n    image: a\n    environment:\n      A:\n"
    )
    assert load_compose(path, {"A": "y"}).services["app"].environment == {"A": "y"}


def test_command_and_entrypoint_split_like_shell(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "services:\n  app:\n    image: a\n    entrypoint: python3\n"
        '    command: -c "import time; time.sleep(1)"\n',
    )
    app = load_compose(path, {}).services["app"]
    assert app.entrypoint == ["python3"]
    assert app.command == ["-c", "import time; time.sleep(1)"]


def test_env_file_strips_inline_comment(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("A=1 # the first\nB='2 # kept'\n")
    path = write(
        tmp_path,
        "services:\n  app:\n    image: a\n    environment: {A: $A, B: $B}\n",
    )
    assert load_compose(path, {}).services["app"].environment == {
        "A": "1",
        "B": "2 # kept",
    }


def test_unquoted_restart_no_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "services:\n  app:\n    image: a\n    restart: no\n")
    assert load_compose(path, {}).services["app"].restart == "no"


def test_external_volume_keeps_its_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "name: demo\nservices:\n  app:\n    image: a\n"
        "    volumes: ['data:/d', 'own:/o']\n"
        "volumes:\n  data: {external: true, name: shared-data}\n  own: {}\n",
    )
    project = load_compose(path, {})
    assert project.volumes["data"].engine_name("demo") == "shared-data"
    assert project.volumes["own"].engine_name("demo") == "demo_own"


def test_cycle_is_found_on_load(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "services:\n  a:\n    image: a\n    depends_on: [b]\n"
        "  b:\n    image: b\n    depends_on: [a]\n",
    )
    with pytest.raises(ComposeError, match="cycle"):
        load_compose(path, {})


def test_name_from_directory_is_normalized(tmp_path: Path) -> None:
    directory = tmp_path / "My Pipeline"
    directory.mkdir()
    path = write(directory, "services:\n  app:\n    image: a\n")
    assert load_compose(path, {}).name == "mypipeline"


@pytest.mark.parametrize(
    "bootstrap", ["127.0.0.1:9092", "localhost:9092", "[::1]:9092", "127.0.1.1:1"]
)
def test_external_kafka_rejects_loopback(tmp_path: Path, bootstrap: str) -> None:
    path = write(
        tmp_path,
        "services:\n  kafka:\n    image: k\n    labels: {io.agogosml.role: kafka}\n"
        "  app:\n    image: a\n",
    )
    project = load_compose(path, {})
    with pytest.raises(ComposeError, match="loopback address"):
        project.use_external_kafka(bootstrap)
