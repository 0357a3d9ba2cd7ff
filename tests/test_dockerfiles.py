"""Lint the three Dockerfiles with hadolint and check the rules they share.

No image is built here. The structural checks parse each Dockerfile into its
instructions, and the health check command runs against a local HTTP server.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HADOLINT_TIMEOUT_SECONDS = 60.0
HEALTHCHECK_TIMEOUT_SECONDS = 30.0
NON_ROOT_USER = "10001:10001"
OCI_LABELS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.source",
)


@dataclass(frozen=True)
class ImageSpec:
    dockerfile: str
    entrypoint: str
    host_variable: str
    port_variable: str
    port: int


IMAGES = (
    ImageSpec(
        dockerfile="Dockerfile.input",
        entrypoint="agogosml-input-reader",
        host_variable="READER_HOST",
        port_variable="READER_PORT",
        port=8081,
    ),
    ImageSpec(
        dockerfile="Dockerfile.output",
        entrypoint="agogosml-output-writer",
        host_variable="WRITER_HOST",
        port_variable="WRITER_PORT",
        port=8082,
    ),
    ImageSpec(
        dockerfile="Dockerfile.app",
        entrypoint="agogosml-sample-app",
        host_variable="APP_HOST",
        port_variable="APP_PORT",
        port=8000,
    ),
)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Split a Dockerfile into instructions, joining continued lines.

    Comment lines are dropped, also inside a continuation, as Docker does.
    """
    instructions: list[Instruction] = []
    pending: list[str] = []
    start_line = 0
    for number, raw_line in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw_line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start_line = number
        continued = stripped.endswith("\\")
        pending.append(stripped.removesuffix("\\").strip())
        if continued:
            continue
        keyword, _, arguments = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start_line))
        pending = []
    assert not pending, f"{path.name} ends inside a line continuation"
    return instructions


def split_stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Group instructions by build stage. Each group starts with its FROM."""
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def global_arguments(instructions: list[Instruction]) -> dict[str, str]:
    """Return the ARGs declared before the first FROM, with their defaults."""
    arguments: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            name, _, default = instruction.arguments.partition("=")
            arguments[name] = default
    return arguments


def key_values(instructions: list[Instruction], keyword: str) -> dict[str, str]:
    """Merge the KEY=VALUE pairs of every ENV or LABEL instruction given."""
    pairs: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword != keyword:
            continue
        for item in shlex.split(instruction.arguments):
            key, separator, value = item.partition("=")
            assert separator, f"line {instruction.line}: {item!r} is not KEY=VALUE"
            pairs[key] = value
    return pairs


def last(instructions: list[Instruction], keyword: str) -> Instruction | None:
    matching = [item for item in instructions if item.keyword == keyword]
    return matching[-1] if matching else None


def exec_form(instruction: Instruction) -> list[str]:
    """Parse the JSON array of an exec-form instruction, or fail the test."""
    try:
        command = json.loads(instruction.arguments)
    except json.JSONDecodeError:
        command = None
    assert isinstance(command, list), (
        f"line {instruction.line}: {instruction.keyword} is not in exec form "
        f"(a JSON array): {instruction.arguments}"
    )
    return command


def argument_default(path: Path, name: str) -> str:
    """Return the default of the first ARG `name` in a Dockerfile."""
    for instruction in parse_dockerfile(path):
        if instruction.keyword == "ARG" and instruction.arguments.startswith(
            f"{name}="
        ):
            return instruction.arguments.partition("=")[2]
    raise AssertionError(f"{path.name} declares no ARG {name} with a default")


def dockerignore_exceptions() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line[1:] for line in lines if line.startswith("!")]


def find_tool(name: str) -> str:
    """Return the path of a dev tool installed next to this Python, or on PATH."""
    search_path = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    )
    tool = shutil.which(name, path=search_path)
    if tool is None:
        pytest.fail(f"{name} not found; install the dev tools with `make test`")
    return tool


@pytest.fixture(params=IMAGES, ids=[image.dockerfile for image in IMAGES])
def image(request: pytest.FixtureRequest) -> ImageSpec:
    spec: ImageSpec = request.param
    return spec


@pytest.fixture
def instructions(image: ImageSpec) -> list[Instruction]:
    return parse_dockerfile(ROOT / image.dockerfile)


@pytest.fixture
def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    return split_stages(instructions)[-1]


def test_hadolint_passes(image: ImageSpec, tmp_path: Path) -> None:
    # An empty configuration keeps a stray .hadolint.yaml from ignoring rules.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    command = [
        find_tool("hadolint"),
        "--config",
        str(config),
        "--no-color",
        "--failure-threshold",
        "style",
        "--require-label",
        "org.opencontainers.image.title:text",
        "--require-label",
        "org.opencontainers.image.licenses:spdx",
        image.dockerfile,
    ]

    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HADOLINT_TIMEOUT_SECONDS,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_ignores_are_justified(image: ImageSpec) -> None:
    lines = (ROOT / image.dockerfile).read_text().splitlines()
    for index, line in enumerate(lines):
        if "hadolint ignore" not in line:
            continue
        previous = lines[index - 1].strip() if index else ""
        message = (
            f"{image.dockerfile}:{index + 1}: an ignore pragma needs a comment "
            "line above it that says why the rule does not apply"
        )
        assert previous.startswith("#"), message
        assert "hadolint" not in previous, message


def test_base_image_is_build_argument(
    image: ImageSpec, instructions: list[Instruction]
) -> None:
    arguments = global_arguments(instructions)
    stages = split_stages(instructions)

    assert "BASE_IMAGE" in arguments
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", arguments["BASE_IMAGE"]), (
        arguments["BASE_IMAGE"]
    )
    for stage in stages:
        source = stage[0].arguments.split()[0]
        assert source == "${BASE_IMAGE}", f"line {stage[0].line}: FROM {source}"


def test_build_is_multi_stage(instructions: list[Instruction]) -> None:
    stages = split_stages(instructions)
    first_from = stages[0][0].arguments.split()

    assert len(stages) >= 2
    assert first_from[1:] == ["AS", "builder"]


def test_final_stage_copies_only_build_results(
    final_stage: list[Instruction],
) -> None:
    copies = [item for item in final_stage if item.keyword in ("COPY", "ADD")]
    runs = [item for item in final_stage if item.keyword == "RUN"]

    assert any("/opt/venv" in item.arguments for item in copies)
    for item in copies:
        assert item.arguments.startswith("--from=builder "), (
            f"line {item.line}: the final stage copies from the build context"
        )
    for item in runs:
        assert not re.search(r"\b(pip|apt-get|apt|apk)\b", item.arguments), (
            f"line {item.line}: the final stage installs packages: {item.arguments}"
        )


def test_pip_keeps_no_cache(instructions: list[Instruction]) -> None:
    installs = [
        item
        for item in instructions
        if item.keyword == "RUN" and "pip" in item.arguments
    ]

    assert installs
    for item in installs:
        assert "--no-cache-dir" in item.arguments, f"line {item.line}"


def test_final_stage_runs_as_uid_10001(final_stage: list[Instruction]) -> None:
    user = last(final_stage, "USER")
    runs_after_user = [
        item
        for item in final_stage
        if item.keyword == "RUN" and user is not None and item.line > user.line
    ]

    assert user is not None
    assert user.arguments == NON_ROOT_USER
    assert not runs_after_user


def test_final_stage_suits_read_only_root(final_stage: list[Instruction]) -> None:
    environment = key_values(final_stage, "ENV")
    workdir = last(final_stage, "WORKDIR")

    assert environment.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert workdir is not None
    assert workdir.arguments == "/tmp"


def test_listen_address_and_port(
    image: ImageSpec, final_stage: list[Instruction]
) -> None:
    environment = key_values(final_stage, "ENV")
    exposed = [item.arguments for item in final_stage if item.keyword == "EXPOSE"]

    assert environment.get(image.host_variable) == "0.0.0.0"
    assert environment.get(image.port_variable) == str(image.port)
    assert exposed == [str(image.port)]


def test_entrypoint_is_exec_form(
    image: ImageSpec, final_stage: list[Instruction]
) -> None:
    entrypoint = last(final_stage, "ENTRYPOINT")

    assert entrypoint is not None
    assert exec_form(entrypoint) == [f"/opt/venv/bin/{image.entrypoint}"]
    assert last(final_stage, "CMD") is None


def test_healthcheck_calls_healthz(
    image: ImageSpec, final_stage: list[Instruction]
) -> None:
    healthcheck = last(final_stage, "HEALTHCHECK")

    assert healthcheck is not None
    options, _, command = healthcheck.arguments.partition("CMD ")
    assert "--timeout=" in options
    assert "--start-period=" in options
    code = exec_form(Instruction("CMD", command, healthcheck.line))
    assert code[:2] == ["/opt/venv/bin/python", "-c"]
    assert "urllib.request" in code[2]
    assert "/healthz" in code[2]
    assert image.port_variable in code[2]


def test_oci_labels(image: ImageSpec, final_stage: list[Instruction]) -> None:
    labels = key_values(final_stage, "LABEL")

    for name in OCI_LABELS:
        assert name in labels, f"{image.dockerfile} has no label {name}"
    assert labels["org.opencontainers.image.licenses"] == "MIT"


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[http.server.HTTPServer, type]]:
    handler = type("HealthHandler", (_HealthHandler,), {})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()
    thread.join()


def run_healthcheck(image: ImageSpec, port: int) -> subprocess.CompletedProcess[str]:
    final_stage = split_stages(parse_dockerfile(ROOT / image.dockerfile))[-1]
    healthcheck = last(final_stage, "HEALTHCHECK")
    assert healthcheck is not None
    _, _, command = healthcheck.arguments.partition("CMD ")
    code = exec_form(Instruction("CMD", command, healthcheck.line))
    environment = {**os.environ, image.port_variable: str(port)}
    # The check must reach 127.0.0.1 directly even when a proxy is set.
    environment["http_proxy"] = environment["HTTP_PROXY"] = "http://127.0.0.1:9"
    return subprocess.run(
        [sys.executable, *code[1:]],
        env=environment,
        capture_output=True,
        text=True,
        timeout=HEALTHCHECK_TIMEOUT_SECONDS,
        check=False,
    )


def test_healthcheck_passes_on_200(
    image: ImageSpec, health_server: tuple[http.server.HTTPServer, type]
) -> None:
    server, _ = health_server

    result = run_healthcheck(image, server.server_address[1])

    assert result.returncode == 0, result.stderr


def test_healthcheck_fails_on_503(
    image: ImageSpec, health_server: tuple[http.server.HTTPServer, type]
) -> None:
    server, handler = health_server
    handler.status = 503

    result = run_healthcheck(image, server.server_address[1])

    assert result.returncode == 1
    assert "503" in result.stderr


def test_healthcheck_fails_when_nothing_listens(image: ImageSpec) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _HealthHandler)
    unused_port = server.server_address[1]
    server.server_close()

    result = run_healthcheck(image, unused_port)

    assert result.returncode == 1
    assert "Connection refused" in result.stderr


def test_dockerignore_excludes_everything_else() -> None:
    rules = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    assert rules[0] == "*"
    for path in (".git", ".venv", "tests", ".mypy_cache", ".agogosml", "docs"):
        for exception in dockerignore_exceptions():
            assert not fnmatch.fnmatch(path, exception.rstrip("/")), (
                f".dockerignore admits {path} through !{exception}"
            )


def test_dockerignore_admits_copied_paths() -> None:
    exceptions = [item.rstrip("/") for item in dockerignore_exceptions()]
    copied: set[str] = set()
    for image in IMAGES:
        for stage in split_stages(parse_dockerfile(ROOT / image.dockerfile)):
            for item in stage:
                if item.keyword == "COPY" and not item.arguments.startswith("--"):
                    copied.update(item.arguments.split()[:-1])
    model_default = argument_default(ROOT / "Dockerfile.app", "MODEL_FILE")
    copied.discard("${MODEL_FILE}")
    copied.add(model_default)

    for source in sorted(copied):
        path = source.removeprefix("./")
        assert any(fnmatch.fnmatch(path, pattern) for pattern in exceptions), (
            f".dockerignore excludes {path}, which a Dockerfile copies"
        )
