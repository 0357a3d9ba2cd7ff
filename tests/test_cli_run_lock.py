"""`agogosml run` holds an exclusive lock on its work directory."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from agogosml_cli.main import cli
from agogosml_cli.run import RunOptions, RunSummary
from sample_app.data import COLUMNS

# Lock a file as `agogosml run` does, write the pid into it, say "locked" and
# hold the lock until standard input closes.
HOLD_LOCK = """
import fcntl, os, sys
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(descriptor, fcntl.LOCK_EX)
os.write(descriptor, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
sys.stdin.read()
"""
# Exit with code 0 if the file can be locked at once, else with code 3.
TRY_LOCK = """
import fcntl, os, sys
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
try:
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(3)
"""


@contextlib.contextmanager
def lock_held(path: Path) -> Iterator[int]:
    """Hold the lock on `path` in another process; yield that process's pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        yield holder.pid
    finally:
        holder.communicate(timeout=30)


def can_lock(path: Path) -> bool:
    """Return whether another process can lock `path` right now."""
    result = subprocess.run(
        [sys.executable, "-c", TRY_LOCK, str(path)], timeout=30, check=False
    )
    assert result.returncode in (0, 3)
    return result.returncode == 0


def write_data(tmp_path: Path) -> Path:
    data = tmp_path / "data.csv"
    data.write_text(",".join(COLUMNS) + "\n")
    return data


def invoke_run(tmp_path: Path, work: Path) -> Result:
    # The pipeline is replaced in these tests, so the model file is not read.
    model = tmp_path / "model.joblib"
    model.touch()
    arguments = [
        "run",
        "--data", str(write_data(tmp_path)),
        "--model", str(model),
        "--work-dir", str(work),
    ]  # fmt: skip
    return CliRunner().invoke(cli, arguments)


def test_run_rejects_locked_work_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "output.jsonl").write_text("the other run's output\n")
    started: list[RunOptions] = []

    def run_pipeline(options: RunOptions, console: Console) -> RunSummary:
        started.append(options)
        return RunSummary(transport="file")

    monkeypatch.setattr("agogosml_cli.run.run_pipeline", run_pipeline)

    with lock_held(work / "run.lock") as holder:
        result = invoke_run(tmp_path, work)

    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"--work-dir '{work}' is in use by another 'agogosml run'" in output
    assert f"(pid {holder})" in output
    assert "Wait until that run ends, or pass another --work-dir" in output
    assert started == []
    assert (work / "output.jsonl").read_text() == "the other run's output\n"


def test_run_holds_lock_while_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    locked_during_run: list[bool] = []

    def run_pipeline(options: RunOptions, console: Console) -> RunSummary:
        locked_during_run.append(not can_lock(work / "run.lock"))
        return RunSummary(transport="file")

    monkeypatch.setattr("agogosml_cli.run.run_pipeline", run_pipeline)

    result = invoke_run(tmp_path, work)

    assert result.exit_code == 0, result.output
    assert locked_during_run == [True]
    assert (work / "run.lock").read_text() == f"{os.getpid()}\n"
    assert can_lock(work / "run.lock")


@pytest.mark.parametrize(
    ("failure", "code"), [(RuntimeError("broker gone"), 1), (KeyboardInterrupt(), 130)]
)
def test_run_releases_lock_on_failure(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: BaseException,
    code: int,
) -> None:
    work = tmp_path / "work"

    def run_pipeline(options: RunOptions, console: Console) -> RunSummary:
        raise failure

    monkeypatch.setattr("agogosml_cli.run.run_pipeline", run_pipeline)

    result = invoke_run(tmp_path, work)

    assert result.exit_code == code, result.output
    assert can_lock(work / "run.lock")


def test_run_rejects_summary_over_lock_file(tmp_path: Path) -> None:
    work = tmp_path / "work"

    result = CliRunner().invoke(
        cli,
        ["run", "--work-dir", str(work), "--summary-json", str(work / "run.lock")],
    )

    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"--summary-json '{work / 'run.lock'}' is the run's own run.lock" in output
    assert "which the run locks to keep other runs out" in output
