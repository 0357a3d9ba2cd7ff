"""`agogosml run`: the main job, on the real dataset, through files and Kafka."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from agogosml_cli.main import cli

SUMMARY_KEYS = {
    "read",
    "written",
    "dead_lettered",
    "duplicates",
    "elapsed_seconds",
    "messages_per_second",
}


REPO_ROOT = Path(__file__).parents[1]


def run_cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agogosml_cli.main", "run", *arguments],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_run_through_files(tmp_path: Path, fraud_model: Path) -> None:
    summary_path = tmp_path / "summary.json"

    result = run_cli(
        "--limit", "2000",
        "--model", str(fraud_model),
        "--summary-json", str(summary_path),
        "--work-dir", str(tmp_path / "work"),
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    summary = orjson.loads(summary_path.read_bytes())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["read"] == 2000
    assert summary["written"] == 2000
    assert summary["dead_lettered"] == 0
    assert summary["duplicates"] == 0
    assert summary["missing"] == 0
    output_lines = (tmp_path / "work" / "output.jsonl").read_bytes().splitlines()
    assert len(output_lines) == 2000
    assert "written" in result.stderr  # the summary table


@pytest.mark.slow
@pytest.mark.kafka
def test_run_through_kafka(
    tmp_path: Path, fraud_model: Path, kafka_bootstrap: str
) -> None:
    summary_path = tmp_path / "summary.json"

    result = run_cli(
        "--kafka", kafka_bootstrap,
        "--limit", "2000",
        "--model", str(fraud_model),
        "--summary-json", str(summary_path),
        "--work-dir", str(tmp_path / "work"),
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    summary = orjson.loads(summary_path.read_bytes())
    assert summary["transport"] == "kafka"
    assert summary["read"] == 2000
    assert summary["written"] == 2000
    assert summary["dead_lettered"] == 0
    assert summary["missing"] == 0


def test_run_rejects_missing_data_file(tmp_path: Path) -> None:
    result = run_cli("--data", str(tmp_path / "nope.csv"), cwd=tmp_path)

    assert result.returncode == 2
    assert "nope.csv" in result.stderr
    assert "does not exist" in result.stderr


def test_run_rejects_unwritable_summary_path(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")

    result = run_cli(
        "--summary-json", str(tmp_path / "a-file" / "s.json"), cwd=tmp_path
    )

    assert result.returncode == 2
    assert "--summary-json" in result.stderr
    assert "cannot create directory" in result.stderr


def test_run_names_missing_sample_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "sklearn" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    result = CliRunner().invoke(cli, ["run", "--work-dir", str(tmp_path)])

    assert result.exit_code == 1
    assert "sklearn" in result.output
    assert "pip install 'agogosml[sample]'" in result.output
