"""`agogosml run`: the main job, on the real dataset, through files and brokers."""

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
from confluent_kafka import Consumer, TopicPartition
from kafka_endpoint import CONNECTION_STRING

import sample_app
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


def run_cli(
    *arguments: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agogosml_cli.main", "run", *arguments],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
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


def read_summary(path: Path) -> dict[str, Any]:
    summary: dict[str, Any] = orjson.loads(path.read_bytes())
    return summary


@pytest.mark.slow
@pytest.mark.kafka
@pytest.mark.parametrize("form", ["security options", "eventhubs-kafka shortcut"])
def test_run_through_eventhubs_kafka_endpoint(
    tmp_path: Path,
    fraud_model: Path,
    eventhubs_kafka_endpoint: tuple[str, Path],
    form: str,
) -> None:
    # The listener accepts only SASL_SSL with PLAIN, user $ConnectionString and
    # the test connection string, verified against the test CA.
    address, ca_path = eventhubs_kafka_endpoint
    if form == "security options":
        mode = [
            "--kafka", address,
            "--kafka-security-protocol", "SASL_SSL",
            "--kafka-sasl-mechanism", "PLAIN",
        ]  # fmt: skip
        env = {
            "KAFKA_SASL_USERNAME": "$ConnectionString",
            "KAFKA_SASL_PASSWORD": CONNECTION_STRING,
        }
    else:
        mode = ["--eventhubs-kafka", address]
        env = {"KAFKA_EVENTHUBS_CONNECTION_STRING": CONNECTION_STRING}
    summary_path = tmp_path / "summary.json"

    result = run_cli(
        *mode,
        "--kafka-ca-file", str(ca_path),
        "--limit", "200",
        "--model", str(fraud_model),
        "--summary-json", str(summary_path),
        "--work-dir", str(tmp_path / "work"),
        cwd=tmp_path,
        env=env,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    summary = read_summary(summary_path)
    assert summary["transport"] == "kafka"
    assert summary["read"] == 200
    assert summary["written"] == 200
    assert summary["dead_lettered"] == 0
    assert summary["duplicates"] == 0
    assert summary["missing"] == 0
    assert CONNECTION_STRING not in result.stderr
    for log in ("reader.log", "writer.log"):
        assert CONNECTION_STRING not in (tmp_path / "work" / log).read_text()


def record_count(bootstrap: str, topic: str, partitions: int) -> int:
    """Return how many records a topic contains, from its high watermarks."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "count"})
    try:
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in range(partitions)
        )
    finally:
        consumer.close()


@pytest.mark.slow
@pytest.mark.kafka
def test_run_reuses_named_topics(
    tmp_path: Path, fraud_model: Path, kafka_bootstrap: str
) -> None:
    prefix = f"named-{os.getpid()}-{tmp_path.name}"
    topics = [
        "--input-topic", f"{prefix}-input",
        "--output-topic", f"{prefix}-output",
        "--dead-letter-topic", f"{prefix}-dlq",
    ]  # fmt: skip

    def run(limit: int, name: str) -> dict[str, Any]:
        result = run_cli(
            "--kafka", kafka_bootstrap, *topics,
            "--limit", str(limit),
            "--model", str(fraud_model),
            "--summary-json", str(tmp_path / f"{name}.json"),
            "--work-dir", str(tmp_path / name),
            cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return read_summary(tmp_path / f"{name}.json")

    first = run(100, "first")
    second = run(150, "second")

    assert first["written"] == 100
    assert second["read"] == 150
    assert second["written"] == 150
    assert second["missing"] == 0
    assert second["output"] == f"{prefix}-output"
    # The second reader began after the first run's input, so each input
    # record was scored once.
    assert record_count(kafka_bootstrap, f"{prefix}-input", 3) == 250
    assert record_count(kafka_bootstrap, f"{prefix}-output", 3) == 250


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
    assert f"pip install -e '{REPO_ROOT.resolve()}[sample]'" in result.output


def test_sample_app_names_missing_sample_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in ("joblib", "pandas") else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    with pytest.raises(SystemExit) as exit_info:
        sample_app.main()

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "needs joblib, pandas, which are not installed" in error
    assert "[sample]'" in error
