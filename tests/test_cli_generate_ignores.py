"""A generated project's .gitignore keeps `agogosml run` files out of git."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from agogosml_cli.main import cli
from agogosml_cli.run import RunOptions, RunSummary
from sample_app.data import COLUMNS

FLAGS = [
    "--name", "scoring",
    "--source", "kafka",
    "--source-topics", "transactions",
    "--source-bootstrap-servers", "kafka:9092",
    "--sink", "kafka",
    "--sink-topic", "transactions-scored",
    "--registry", "r.io",
]  # fmt: skip


@pytest.fixture(autouse=True)
def git_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Give git an identity and no user or system configuration."""
    empty_config = tmp_path / "gitconfig"
    empty_config.touch()
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty_config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Test User")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "test@example.com")


def invoke(*arguments: str) -> Result:
    return CliRunner().invoke(cli, list(arguments))


def git(project: Path, *arguments: str) -> str:
    completed = subprocess.run(
        ["git", *arguments], cwd=project, capture_output=True, text=True, check=True
    )
    return completed.stdout


def generate_project(tmp_path: Path) -> Path:
    """Write a manifest, generate its project and return the project directory."""
    project = tmp_path / "scoring"
    manifest = project / "agogosml.yaml"
    init = invoke("init", "--no-input", "--manifest", str(manifest), *FLAGS)
    assert init.exit_code == 0, init.output
    generate = invoke("generate", "--manifest", str(manifest))
    assert generate.exit_code == 0, generate.output
    return project


def fake_run_in(
    directory: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Result:
    """Run `agogosml run` in `directory` with its default work directory.

    The pipeline is replaced by one that writes a service log, as the real
    one does. The dataset is an empty CSV in `data_dir`.
    """

    def run_pipeline(options: RunOptions, console: Console) -> RunSummary:
        (options.work_dir / "app.log").write_text("{}\n")
        return RunSummary(transport="file")

    monkeypatch.setattr("agogosml_cli.run.run_pipeline", run_pipeline)
    data = data_dir / "data.csv"
    data.write_text(",".join(COLUMNS) + "\n")
    monkeypatch.chdir(directory)
    return invoke("run", "--data", str(data))


@pytest.mark.slow
def test_generate_after_run_in_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = generate_project(tmp_path)

    run = fake_run_in(project, tmp_path, monkeypatch)
    update = invoke("generate", "--manifest", str(project / "agogosml.yaml"))

    assert run.exit_code == 0, run.output
    assert (project / ".agogosml" / "run" / "app.log").is_file()
    assert (project / ".agogosml" / "run" / "run.lock").is_file()
    assert git(project, "status", "--porcelain", "--untracked-files=all") == ""
    assert update.exit_code == 0, update.output
    assert "is up to date" in update.output
    # The template history next to the work directory stays tracked.
    assert ".agogosml/template.bundle" in git(project, "ls-files")


@pytest.mark.slow
def test_run_files_ignored_in_subdirectory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = generate_project(tmp_path)

    run = fake_run_in(project / "tests", tmp_path, monkeypatch)

    assert run.exit_code == 0, run.output
    assert git(project, "status", "--porcelain", "--untracked-files=all") == ""
    ignored = git(project, "check-ignore", "tests/.agogosml/run/app.log")
    assert ignored.strip() == "tests/.agogosml/run/app.log"
