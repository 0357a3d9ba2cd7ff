"""How `agogosml up` turns a compose service into Engine API create options."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import docker.errors
import pytest

from agogosml_cli.compose import load_compose
from agogosml_cli.containers import (
    ContainerError,
    Engine,
    _create_options,
    _ensure_container,
)

COMPOSE = """\
name: demo
services:
  app:
    image: app:1
    environment: {A: "1"}
    ports: ["127.0.0.1:8000:8000", "9000"]
    volumes: ["./data:/data:ro", "cache:/cache"]
    tmpfs: [/tmp]
    user: "10001:10001"
    read_only: true
    restart: on-failure:3
    healthcheck:
      test: ["CMD", "python", "-c", "import sys; sys.exit(0)"]
      interval: 2s
      start_period: 1m
volumes:
  cache: {}
"""


def options(tmp_path: Path, *, podman: bool) -> dict[str, Any]:
    path = tmp_path / "docker-compose.yml"
    path.write_text(COMPOSE)
    project = load_compose(path, {})
    engine = cast(Engine, SimpleNamespace(is_podman=podman))
    return _create_options(engine, project, project.services["app"])


def test_ports_volumes_and_restart(tmp_path: Path) -> None:
    created = options(tmp_path, podman=False)
    assert created["ports"] == {"8000/tcp": ("127.0.0.1", 8000), "9000/tcp": None}
    assert created["volumes"] == {
        str((tmp_path / "data").resolve()): {"bind": "/data", "mode": "ro"},
        "demo_cache": {"bind": "/cache", "mode": "rw"},
    }
    assert created["tmpfs"] == {"/tmp": ""}
    assert created["restart_policy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
    assert created["user"] == "10001:10001"
    assert created["read_only"] is True
    assert created["environment"] == {"A": "1"}


def test_docker_keeps_exec_form_check(tmp_path: Path) -> None:
    check = options(tmp_path, podman=False)["healthcheck"]
    assert check["test"] == ["CMD", "python", "-c", "import sys; sys.exit(0)"]
    assert check["interval"] == 2_000_000_000
    assert check["start_period"] == 60_000_000_000
    assert check["retries"] == 3


@pytest.mark.parametrize(
    ("test", "expected"),
    [
        (
            ["CMD", "python", "-c", "import sys; sys.exit(0)"],
            ["CMD-SHELL", "python -c 'import sys; sys.exit(0)'"],
        ),
        (["CMD", "true"], ["CMD", "true"]),
        (["CMD-SHELL", "curl -f x"], ["CMD-SHELL", "curl -f x"]),
    ],
)
def test_podman_gets_shell_form_for_spaced_arguments(
    tmp_path: Path, test: list[str], expected: list[str]
) -> None:
    compose = COMPOSE.replace(
        '["CMD", "python", "-c", "import sys; sys.exit(0)"]',
        "[" + ", ".join(f'"{part}"' for part in test) + "]",
    )
    path = tmp_path / "docker-compose.yml"
    path.write_text(compose)
    project = load_compose(path, {})
    engine = cast(Engine, SimpleNamespace(is_podman=True))
    created = _create_options(engine, project, project.services["app"])
    assert created["healthcheck"]["test"] == expected


class _FailingStart:
    """The containers API of an engine whose start fails with ``explanation``."""

    def __init__(self, explanation: str) -> None:
        self.explanation = explanation

    def get(self, name: str) -> None:
        raise docker.errors.NotFound(name)

    def create(self, **options: Any) -> SimpleNamespace:
        def start() -> None:
            response = SimpleNamespace(status_code=500, reason="Internal Server Error")
            raise docker.errors.APIError(
                "start", cast(Any, response), explanation=self.explanation
            )

        return SimpleNamespace(start=start)


def start_error(tmp_path: Path, explanation: str) -> str:
    path = tmp_path / "docker-compose.yml"
    path.write_text(COMPOSE)
    project = load_compose(path, {})
    engine = SimpleNamespace(
        is_podman=True,
        image_id=lambda image: "sha256:0",
        client=SimpleNamespace(
            containers=_FailingStart(explanation),
            api=SimpleNamespace(create_endpoint_config=lambda **kw: kw),
        ),
    )
    with pytest.raises(ContainerError) as error:
        _ensure_container(
            cast(Engine, engine), project, project.services["app"], lambda line: None
        )
    return str(error.value)


def test_missing_iptables_named_in_start_error(tmp_path: Path) -> None:
    message = start_error(tmp_path, "netavark: No such file or directory (os error 2)")

    assert "failed to start demo-app-1 for service app" in message
    assert "apt-get install iptables" in message


def test_other_start_error_passed_on(tmp_path: Path) -> None:
    message = start_error(tmp_path, "port 8000 is already allocated")

    assert message.endswith("port 8000 is already allocated")
    assert "iptables" not in message
