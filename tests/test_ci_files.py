"""Validate the Azure Pipelines files against the schema that check-jsonschema ships.

The schema is vendored in the check-jsonschema package, so validation needs no
network. The tests route HTTP through an unreachable proxy to keep it that way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
CHECK_TIMEOUT_SECONDS = 120.0
PIPELINE_FOLDERS = frozenset({"pipelines", ".azure-pipelines"})
# Folders of tools, caches and build output, which hold no pipeline of this
# repository even when a package there ships an azure-pipelines.yml.
SKIPPED_FOLDERS = frozenset({"node_modules", "build", "dist", "__pycache__"})
# The compile-time condition that keeps registry pushes to builds of main.
MAIN_ONLY = "${{ if eq(variables['Build.SourceBranch'], 'refs/heads/main') }}"
# No proxy serves 127.0.0.1:9, so a schema download fails instead of passing.
UNREACHABLE_PROXY = "http://127.0.0.1:9"


def pipeline_files() -> list[Path]:
    """Return every Azure Pipelines file in the repository, sorted.

    These are the files named azure-pipelines*.yml or .azure-pipelines*.yml
    anywhere, and every YAML file inside a pipelines or .azure-pipelines folder.
    Hidden folders other than .azure-pipelines, such as .git and .venv, are
    skipped.
    """
    found: list[Path] = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if is_searched_folder(name)]
        folder_path = Path(folder)
        in_pipeline_folder = any(
            part in PIPELINE_FOLDERS for part in folder_path.relative_to(ROOT).parts
        )
        for name in files:
            if not name.endswith((".yml", ".yaml")):
                continue
            named_as_pipeline = name.lstrip(".").startswith("azure-pipelines")
            if named_as_pipeline or in_pipeline_folder:
                found.append(folder_path / name)
    return sorted(found)


def is_searched_folder(name: str) -> bool:
    if name in PIPELINE_FOLDERS:
        return True
    hidden = name.startswith(".")
    return not hidden and name not in SKIPPED_FOLDERS and not name.endswith(".egg-info")


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text())


def walk(
    node: Any, parents: tuple[str, ...] = ()
) -> Iterator[tuple[Any, tuple[str, ...]]]:
    """Yield every mapping in a YAML tree with the keys that lead to it."""
    if isinstance(node, dict):
        yield node, parents
        for key, value in node.items():
            yield from walk(value, (*parents, str(key)))
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, parents)


def find_check_jsonschema() -> str:
    search_path = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    )
    tool = shutil.which("check-jsonschema", path=search_path)
    if tool is None:
        pytest.fail(
            "check-jsonschema not found; install the dev tools with `make test`"
        )
    return tool


def test_pipeline_files_found() -> None:
    names = [path.relative_to(ROOT).as_posix() for path in pipeline_files()]

    assert "azure-pipelines.yml" in names


@pytest.mark.parametrize(
    "path",
    pipeline_files(),
    ids=[path.relative_to(ROOT).as_posix() for path in pipeline_files()],
)
def test_pipeline_matches_schema(path: Path) -> None:
    # These are the options of check-jsonschema's own Azure Pipelines hook. The
    # transform unnests ${{ }} template expressions. The schema's branch filter
    # pattern compiles only in non-Unicode ECMAScript mode, and check-jsonschema
    # 0.39.0 crashes on it in the default mode.
    command = [
        find_check_jsonschema(),
        "--builtin-schema",
        "vendor.azure-pipelines",
        "--data-transform",
        "azure-pipelines",
        "--regex-variant",
        "nonunicode",
        str(path),
    ]
    environment = {**os.environ}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        environment[name] = UNREACHABLE_PROXY
    environment.pop("NO_PROXY", None)
    environment.pop("no_proxy", None)

    result = subprocess.run(
        command,
        env=environment,
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_SECONDS,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_templates_exist() -> None:
    for path in pipeline_files():
        for mapping, _ in walk(load_yaml(path)):
            template = mapping.get("template")
            if not isinstance(template, str) or "@" in template:
                continue
            # Azure Pipelines resolves a template path from the including file.
            target = (path.parent / template).resolve()
            assert target.is_file(), f"{path.name}: template {template} not found"
            assert target in pipeline_files(), (
                f"{template} is outside the paths that this test validates"
            )


def test_ci_triggers_on_main_and_pull_requests() -> None:
    pipeline = load_yaml(ROOT / "azure-pipelines.yml")

    assert "main" in pipeline["trigger"]["branches"]["include"]
    assert "main" in pipeline["pr"]["branches"]["include"]


def test_ci_has_each_stage() -> None:
    pipeline = load_yaml(ROOT / "azure-pipelines.yml")
    text = (ROOT / "azure-pipelines.yml").read_text()

    stages = {stage["stage"] for stage in pipeline["stages"]}
    assert {"checks", "test", "images", "chart"} <= stages
    for command in (
        "ruff check",
        "ruff format --check",
        "mypy",
        "make test",
        "lint --strict helm/agogosml",
        "template agogosml helm/agogosml",
    ):
        assert command in text, f"azure-pipelines.yml does not run {command!r}"


def test_ci_builds_every_dockerfile() -> None:
    referenced: set[str] = set()
    for path in pipeline_files():
        for mapping, _ in walk(load_yaml(path)):
            for key in ("dockerfile", "Dockerfile"):
                value = mapping.get(key)
                if isinstance(value, str) and "$" not in value:
                    referenced.add(value)

    dockerfiles = {path.name for path in ROOT.glob("Dockerfile*")}
    assert dockerfiles
    assert referenced == dockerfiles


def test_registry_used_only_on_main() -> None:
    pushes = 0
    for path in pipeline_files():
        for mapping, parents in walk(load_yaml(path)):
            if mapping.get("task") != "Docker@2":
                continue
            inputs = mapping.get("inputs", {})
            on_main = MAIN_ONLY in parents
            if inputs.get("command") in ("push", "buildAndPush"):
                pushes += 1
                assert on_main, f"{path.name}: an image push runs outside main"
            assert on_main or "containerRegistry" not in inputs, (
                f"{path.name}: a Docker@2 step uses the registry outside main"
            )

    assert pushes >= 1
