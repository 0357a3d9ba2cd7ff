"""`agogosml run`: the main job, on the real dataset, through files and brokers."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from broker import LocalKafkaBroker
from click.testing import CliRunner
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from kafka_endpoint import CONNECTION_STRING
from rich.console import Console

import sample_app
from agogosml_cli.local import free_port
from agogosml_cli.main import cli
from agogosml_cli.run import WORK_FILES, RunOptions, RunSummary
from sample_app.data import COLUMNS, DatasetFetchError

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
    assert "written" in result.stdout  # the summary table
    inputs = (tmp_path / "work" / "input.jsonl").read_bytes().splitlines()
    labelled = {
        record["transaction_id"]
        for record in map(orjson.loads, inputs)
        if record["Class"] == 1
    }
    flagged = {
        value["transaction_id"]
        for value in (orjson.loads(line)["value"] for line in output_lines)
        if value["is_fraud"]
    }
    # Every record was written, so the labelled fraud of the output is the input's.
    assert summary["labelled_fraud"] == len(labelled)
    assert summary["flagged_as_fraud"] == len(flagged)
    assert summary["flagged_labelled_fraud"] == len(flagged & labelled)


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
    created = run_topics(summary)
    assert created[0].startswith("agogosml-run-")
    assert "Deleted the topics that this run created: " + ", ".join(created) in (
        result.stderr
    )
    assert summary["deleted_topics"] == created
    assert f"{created[1]} (deleted when the run ended)" in flat(result.stdout)
    assert existing_topics(kafka_bootstrap, created) == []
    group = created[0].removesuffix("-input")
    assert group not in consumer_groups(kafka_bootstrap)
    assert "consumer group" not in result.stderr


def consumer_groups(bootstrap: str) -> set[str]:
    """Return the ids of the consumer groups on the broker."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    listing = admin.list_consumer_groups(request_timeout=30).result(60)
    return {group.group_id for group in listing.valid}


def read_summary(path: Path) -> dict[str, Any]:
    summary: dict[str, Any] = orjson.loads(path.read_bytes())
    return summary


def flat(text: str) -> str:
    return " ".join(text.split())


def run_topics(summary: dict[str, Any]) -> list[str]:
    """Return the input, output and dead-letter topics named in a summary.

    The dead-letter topic must be the default, `<input>.dlq`.
    """
    dead_letter: str = summary["dead_letter"]
    return [dead_letter.removesuffix(".dlq"), summary["output"], dead_letter]


def existing_topics(bootstrap: str, topics: list[str]) -> list[str]:
    """Return those of `topics` that exist on the broker."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = admin.list_topics(timeout=30).topics
    return [topic for topic in topics if topic in existing]


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

    # The run created the named topics, and keeps them for the next run.
    assert first["written"] == 100
    assert second["read"] == 150
    assert second["written"] == 150
    assert second["missing"] == 0
    assert second["output"] == f"{prefix}-output"
    # The second reader began after the first run's input, so each input
    # record was scored once.
    assert record_count(kafka_bootstrap, f"{prefix}-input", 3) == 250
    assert record_count(kafka_bootstrap, f"{prefix}-output", 3) == 250


@pytest.mark.slow
@pytest.mark.kafka
def test_run_keeps_existing_named_topic(
    tmp_path: Path,
    fraud_model: Path,
    kafka_bootstrap: str,
    kafka_topic_factory: Any,
) -> None:
    output = kafka_topic_factory(3)

    result = run_cli(
        "--kafka", kafka_bootstrap,
        "--output-topic", output,
        "--limit", "100",
        "--model", str(fraud_model),
        "--summary-json", str(tmp_path / "summary.json"),
        "--work-dir", str(tmp_path / "work"),
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    input_topic, _, dead_letter = run_topics(read_summary(tmp_path / "summary.json"))
    assert existing_topics(kafka_bootstrap, [input_topic, dead_letter]) == []
    assert record_count(kafka_bootstrap, output, 3) == 100
    assert f"Deleted the topics that this run created: {input_topic}, " in (
        result.stderr
    )
    assert output not in result.stderr
    assert read_summary(tmp_path / "summary.json")["deleted_topics"] == [
        input_topic,
        dead_letter,
    ]
    assert f"{output} (deleted" not in flat(result.stdout)


def test_run_checks_broker_before_input(tmp_path: Path, fraud_model: Path) -> None:
    closed = free_port()
    work = tmp_path / "work"
    started = time.monotonic()

    result = run_cli(
        "--kafka", f"127.0.0.1:{closed}",
        "--model", str(fraud_model),
        "--work-dir", str(work),
        cwd=tmp_path,
    )  # fmt: skip

    elapsed = time.monotonic() - started
    message = flat(result.stderr)
    assert result.returncode == 1, result.stderr
    assert f"cannot reach a Kafka broker at '127.0.0.1:{closed}'" in message
    assert "Connection refused" in message
    assert "In a clone of agogosml, 'make broker' starts a local one" in message
    assert not (work / "input.jsonl").exists()
    # A refused connection ends the check before its 10 s timeout.
    assert elapsed < 10


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

    assert result.exit_code == 2
    assert "needs scikit-learn, which is not installed" in result.output
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


def child_pids(parent: int) -> dict[str, int]:
    """Return the module name and pid of each `python -m` child of `parent`."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            arguments = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == parent and b"-m" in arguments:
            module = arguments[arguments.index(b"-m") + 1].decode()
            children[module] = int(stat.parent.name)
    return children


def wait_for(condition: Any, timeout_seconds: float = 60) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _default_sigint() -> None:
    # A shell that starts a job in the background makes it ignore SIGINT, and
    # Python then installs no KeyboardInterrupt handler: restore the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def running_cli(
    tmp_path: Path, fraud_model: Path, *options: str
) -> Iterator[subprocess.Popen[str]]:
    """Start a run that would take far longer than a test; kill it at exit.

    The run goes through files unless `options` name a broker.
    """
    process = subprocess.Popen(
        [
            sys.executable, "-m", "agogosml_cli.main", "run", *options,
            "--limit", "20000",
            "--batch-size", "1",
            "--model", str(fraud_model),
            "--summary-json", str(tmp_path / "summary.json"),
            "--work-dir", str(tmp_path / "work"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )  # fmt: skip
    try:
        yield process
    finally:
        for pid in child_pids(process.pid).values():
            os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()


def output_started(work: Path) -> bool:
    output = work / "output.jsonl"
    return output.exists() and output.stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "service"),
    [("agogosml.writer", "output writer"), ("sample_app.app", "model app")],
)
def test_run_stops_when_service_killed(
    tmp_path: Path, fraud_model: Path, module: str, service: str
) -> None:
    with running_cli(tmp_path, fraud_model) as process:
        wait_for(lambda: output_started(tmp_path / "work"))
        children = child_pids(process.pid)
        os.kill(children[module], signal.SIGKILL)

        stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 1, stderr
    assert f"{service} ({module}) was killed by SIGKILL during the run" in stderr
    log = "app.log" if module == "sample_app.app" else "writer.log"
    assert str(tmp_path / "work" / log) in stderr
    summary = read_summary(tmp_path / "summary.json")
    assert summary["input_records"] == 20000
    assert summary["read"] < 20000
    assert summary["written"] < 20000
    # Records after the reader's checkpoint were not lost, only not finished.
    assert summary["missing"] == 0
    assert summary["missing_ids"] == []
    unaccounted = 20000 - summary["written"] - summary["dead_lettered"]
    assert summary["not_finished"] == unaccounted
    assert "was killed by SIGKILL" in summary["error"]
    assert "stopped early" in stdout
    assert "not finished" in stdout
    for pid in children.values():
        assert not is_alive(pid)


@pytest.mark.slow
def test_run_names_reader_stopped_early(tmp_path: Path, fraud_model: Path) -> None:
    work = tmp_path / "work"
    with running_cli(tmp_path, fraud_model) as process:
        wait_for(lambda: output_started(work))
        children = child_pids(process.pid)
        # The reader stops cleanly on SIGTERM and exits with code 0.
        os.kill(children["agogosml.reader"], signal.SIGTERM)

        stdout, stderr = process.communicate(timeout=60)

    message = "input reader (agogosml.reader) exited with code 0 before the end"
    assert process.returncode == 1, stderr
    assert message in " ".join(stderr.split())
    assert "records are missing" not in stderr
    assert "stopped early" in stdout
    summary = read_summary(tmp_path / "summary.json")
    assert message in summary["error"]
    assert summary["input_records"] == 20000
    checkpoint = int((work / "checkpoint").read_text().split()[0])
    input_bytes = (work / "input.jsonl").read_bytes()
    assert summary["read"] == input_bytes[:checkpoint].count(b"\n")
    assert summary["read"] < 20000
    assert summary["written"] + summary["dead_lettered"] >= summary["read"]
    assert summary["missing"] == 0
    assert summary["not_finished"] > 0


@pytest.mark.slow
def test_second_run_in_work_dir_rejected(tmp_path: Path, fraud_model: Path) -> None:
    work = tmp_path / "work"
    with running_cli(tmp_path, fraud_model) as process:
        wait_for(lambda: output_started(work))
        output_before = (work / "output.jsonl").stat().st_size

        second = run_cli(
            "--limit", "10",
            "--model", str(fraud_model),
            "--work-dir", str(work),
            cwd=tmp_path,
        )  # fmt: skip

        first_running = process.poll() is None
        output_after = (work / "output.jsonl").stat().st_size
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)

    message = " ".join(second.stderr.split())
    assert second.returncode == 2, second.stderr
    assert f"--work-dir '{work}' is in use by another 'agogosml run'" in message
    assert f"(pid {process.pid})" in message
    assert "pass another --work-dir" in message
    assert first_running
    assert output_after >= output_before
    assert process.returncode == 143


@pytest.mark.slow
def test_run_names_writer_killed_while_app_starts(
    tmp_path: Path, fraud_model: Path
) -> None:
    with running_cli(tmp_path, fraud_model) as process:
        wait_for(lambda: "sample_app.app" in child_pids(process.pid))
        children = child_pids(process.pid)
        os.kill(children["agogosml.writer"], signal.SIGKILL)

        _, stderr = process.communicate(timeout=60)

    assert process.returncode == 1, stderr
    assert (
        "output writer (agogosml.writer) was killed by SIGKILL while the model "
        "app was starting"
    ) in stderr
    assert "not ready" not in stderr
    assert not is_alive(children["sample_app.app"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)]
)
def test_run_interrupted_stops_services(
    tmp_path: Path, fraud_model: Path, signum: int, code: int
) -> None:
    with running_cli(tmp_path, fraud_model) as process:
        wait_for(lambda: output_started(tmp_path / "work"))
        children = child_pids(process.pid)
        process.send_signal(signum)

        stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == code, stderr
    assert f"Interrupted by {signal.Signals(signum).name}" in stderr
    assert "Traceback" not in stderr
    assert len(children) == 3
    for pid in children.values():
        assert not is_alive(pid)
    # The counts until the signal are kept, in the table and in the JSON.
    assert "stopped early" in stdout
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert summary["interrupted"] is True
    assert summary["error"] == "interrupted by a signal"
    assert summary["written"] > 0
    assert summary["missing"] == 0
    assert summary["read"] <= summary["written"] + summary["dead_lettered"]
    assert summary["not_finished"] > 0


def output_count(bootstrap: str, topic: str) -> int:
    """Return the records in `topic`, or 0 while the topic does not exist."""
    try:
        return record_count(bootstrap, topic, 3)
    except KafkaException:
        return 0


@pytest.mark.slow
@pytest.mark.kafka
def test_kafka_run_interrupted_counts_committed(
    tmp_path: Path, fraud_model: Path, kafka_bootstrap: str
) -> None:
    output = f"interrupted-{os.getpid()}-{tmp_path.name}-output"
    options = ("--kafka", kafka_bootstrap, "--output-topic", output)
    with running_cli(tmp_path, fraud_model, *options) as process:
        wait_for(lambda: output_count(kafka_bootstrap, output) >= 500, 120)
        process.send_signal(signal.SIGINT)

        stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    summary = read_summary(tmp_path / "summary.json")
    # The reader commits its finished records when it stops, so the run
    # counts as read those before its committed offsets.
    assert summary["read"] > 0
    assert summary["read"] <= summary["written"] + summary["dead_lettered"]
    assert summary["missing"] == 0
    unaccounted = 20000 - summary["written"] - summary["dead_lettered"]
    assert summary["not_finished"] == unaccounted
    assert "up to the input reader's last committed offsets" in stdout
    # The run counted the committed offsets, then deleted the topics it named
    # after itself, and kept the output topic named on the command line.
    input_topic, _, dead_letter = run_topics(summary)
    assert existing_topics(kafka_bootstrap, [input_topic, dead_letter]) == []
    assert existing_topics(kafka_bootstrap, [output]) == [output]


@pytest.mark.slow
@pytest.mark.kafka
def test_kafka_run_names_topics_left_on_broker_gone(
    tmp_path: Path, fraud_model: Path
) -> None:
    output = f"broker-gone-{os.getpid()}-output"
    with LocalKafkaBroker() as broker:
        bootstrap = broker.bootstrap_servers
        options = ("--kafka", bootstrap, "--output-topic", output)
        with running_cli(
            tmp_path, fraud_model, *options, "--stall-timeout-seconds", "3"
        ) as process:
            wait_for(lambda: output_count(bootstrap, output) >= 100, 120)
            broker.stop()

            _, stderr = process.communicate(timeout=180)

    summary = read_summary(tmp_path / "summary.json")
    input_topic, _, dead_letter = run_topics(summary)
    message = flat(stderr)
    # The exit code is the stalled run's.
    assert process.returncode == 1, stderr
    assert "no progress for 3 s" in summary["error"]
    assert "Could not delete the topics that this run created (" in message
    assert f"): {input_topic}, {dead_letter}. Delete them with: " in message
    assert (
        f"kafka-topics.sh --bootstrap-server {bootstrap} --delete --if-exists "
        f"--topic '{input_topic},{input_topic}\\.dlq'"
    ) in message


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_stopped_run_counts_fraud_of_written(tmp_path: Path, fraud_model: Path) -> None:
    work = tmp_path / "work"
    with running_cli(tmp_path, fraud_model) as process:
        # Past the first two records labelled fraud, the 542nd and the 624th.
        wait_for(lambda: line_count(work / "output.jsonl") >= 1000)
        process.send_signal(signal.SIGTERM)

        stdout, _ = process.communicate(timeout=60)

    summary = read_summary(tmp_path / "summary.json")
    inputs = map(orjson.loads, (work / "input.jsonl").read_bytes().splitlines())
    labelled = {record["transaction_id"] for record in inputs if record["Class"]}
    values = [
        orjson.loads(line)["value"]
        for line in (work / "output.jsonl").read_bytes().splitlines()
    ]
    written = {value["transaction_id"] for value in values}
    flagged = {value["transaction_id"] for value in values if value["is_fraud"]}
    assert process.returncode == 143
    assert summary["written"] < 20000
    assert summary["labelled_fraud"] == len(written & labelled)
    assert summary["flagged_labelled_fraud"] == len(flagged & labelled)
    assert 0 < summary["labelled_fraud"] < len(labelled)
    assert f"{summary['labelled_fraud']} of the written records" in flat(stdout)


@pytest.mark.slow
def test_run_second_interrupt_kills_services(tmp_path: Path, fraud_model: Path) -> None:
    with running_cli(tmp_path, fraud_model) as process:
        wait_for(lambda: output_started(tmp_path / "work"))
        children = child_pids(process.pid)
        # As a terminal sends them: the second while the services stop.
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        alive = [module for module, pid in children.items() if is_alive(pid)]
        for module in alive:
            os.kill(children[module], signal.SIGKILL)

    assert process.returncode == 130, stderr
    assert "no service of the run is left running" in stderr
    assert len(children) == 3
    assert alive == []
    assert read_summary(tmp_path / "summary.json")["interrupted"] is True


def invoke(*arguments: str) -> Any:
    return CliRunner().invoke(cli, ["run", *arguments])


@pytest.mark.parametrize(
    ("work_dir", "reason"),
    [
        ("a-file/sub", "Not a directory"),
        ("/proc/agogosml-run", "No such file or directory"),
    ],
)
def test_run_rejects_invalid_work_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, work_dir: str, reason: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")

    result = invoke("--work-dir", work_dir)

    assert result.exit_code == 2, result.output
    assert "Invalid value for --work-dir" in result.output
    assert f"cannot create directory '{work_dir}'" in result.output
    assert reason in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory")
def test_run_rejects_unwritable_work_dir(tmp_path: Path) -> None:
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o500)

    result = invoke("--work-dir", str(parent / "work"))

    assert result.exit_code == 2, result.output
    assert "Permission denied" in result.output


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "the path is empty; give a file path such as summary.json"),
        (
            "out/sub/",
            "'out/sub/' ends with '/', so it names a directory; give a file path "
            "such as 'out/sub/summary.json'",
        ),
    ],
)
def test_run_rejects_summary_path_of_no_file(
    tmp_path: Path, value: str, message: str
) -> None:
    result = invoke("--work-dir", str(tmp_path), "--summary-json", value)

    assert result.exit_code == 2, result.output
    assert "Invalid value for '--summary-json'" in result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_run_rejects_summary_in_unwritable_place(tmp_path: Path) -> None:
    result = invoke("--work-dir", str(tmp_path), "--summary-json", "/proc/version")

    assert result.exit_code == 2, result.output
    assert "Invalid value for --summary-json" in result.output
    assert "cannot write '/proc/version'" in " ".join(result.output.split())


def test_run_prints_summary_it_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fraud_model: Path
) -> None:
    summary_dir = tmp_path / "summaries"

    def run_pipeline(options: RunOptions, console: Console) -> RunSummary:
        # The directory checked at the start is gone when the run ends.
        summary_dir.rmdir()
        summary_dir.write_text("")
        return RunSummary(transport="file", read=3, written=3)

    monkeypatch.setattr("agogosml_cli.run.run_pipeline", run_pipeline)
    data = tmp_path / "data.csv"
    data.write_text(",".join(COLUMNS) + "\n")

    result = invoke(
        "--data", str(data),
        "--model", str(fraud_model),
        "--work-dir", str(tmp_path / "work"),
        "--summary-json", str(summary_dir / "summary.json"),
    )  # fmt: skip

    assert result.exit_code == 1, result.output
    assert '"written": 3' in result.output
    assert "cannot write the summary to" in result.output
    assert "Not a directory" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("option", ["--data", "--model", "--summary-json"])
@pytest.mark.parametrize("name", ["input.jsonl", "output.jsonl", "writer.log"])
def test_run_rejects_file_inside_run_files(
    tmp_path: Path, option: str, name: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / name).write_text("Time\n")

    result = invoke("--work-dir", str(work), option, str(work / name))

    assert result.exit_code == 2, result.output
    assert f"{option} '{work / name}' is the run's own {name}" in " ".join(
        result.output.split()
    )
    assert (work / name).read_text() == "Time\n"


def test_run_rejects_summary_over_data(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("Time\n")

    result = invoke(
        "--work-dir", str(tmp_path / "work"),
        "--data", str(data),
        "--summary-json", str(tmp_path / "." / "data.csv"),
    )  # fmt: skip

    assert result.exit_code == 2, result.output
    assert "--data and --summary-json name the same file" in result.output


@pytest.mark.parametrize(
    ("relative", "described"),
    [
        ("data/creditcard.csv", "the cached dataset (default of --data)"),
        ("models/fraud-model.joblib", "the cached model (default of --model)"),
    ],
)
def test_run_rejects_summary_over_default_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: str, described: str
) -> None:
    monkeypatch.setenv("AGOGOSML_CACHE_DIR", str(tmp_path / "cache"))
    target = tmp_path / "cache" / relative

    result = invoke(
        "--work-dir", str(tmp_path / "work"), "--summary-json", str(target)
    )  # fmt: skip

    assert result.exit_code == 2, result.output
    assert f"{described} and --summary-json name the same file" in " ".join(
        result.output.split()
    )
    assert not target.exists()


def test_run_rejects_non_utf8_data(tmp_path: Path, fraud_model: Path) -> None:
    data = tmp_path / "bin.csv"
    data.write_bytes(b"\xff\xfe")

    result = invoke(
        "--data", str(data),
        "--model", str(fraud_model),
        "--work-dir", str(tmp_path / "work"),
    )  # fmt: skip

    assert result.exit_code == 1, result.output
    assert f"{data} is not UTF-8 text" in " ".join(result.output.split())
    assert isinstance(result.exception, SystemExit)


def write_csv(path: Path, rows: list[str]) -> None:
    path.write_text(",".join(COLUMNS) + "\n" + "".join(row + "\n" for row in rows))


VALID_ROW = ",".join(["0"] * (len(COLUMNS) - 1) + ["1"])
BAD_ROW = ",".join(["0", "abc"] + ["0"] * (len(COLUMNS) - 3) + ["1"])


@pytest.mark.parametrize(
    ("rows", "line"),
    [
        pytest.param([VALID_ROW, BAD_ROW], 3, id="third-line"),
        pytest.param([BAD_ROW], 2, id="first-row"),
        pytest.param([VALID_ROW, "", "", BAD_ROW], 5, id="after-blank-lines"),
    ],
)
def test_run_names_csv_line_of_bad_value(
    tmp_path: Path, fraud_model: Path, rows: list[str], line: int
) -> None:
    data = tmp_path / "data.csv"
    write_csv(data, rows)

    result = invoke(
        "--data", str(data),
        "--model", str(fraud_model),
        "--work-dir", str(tmp_path / "work"),
    )  # fmt: skip

    output = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert f"{data}: line {line} has the invalid value 'abc' in column 'V1'" in output
    assert "data row" not in output


def test_run_deletes_every_earlier_run_file(tmp_path: Path, fraud_model: Path) -> None:
    data = tmp_path / "data.csv"
    write_csv(data, [BAD_ROW])
    work = tmp_path / "work"
    work.mkdir()
    for name in WORK_FILES:
        (work / name).write_text("from an earlier run\n")

    result = invoke(
        "--data", str(data),
        "--model", str(fraud_model),
        "--work-dir", str(work),
    )  # fmt: skip

    assert result.exit_code == 1, result.output
    left = [name for name in WORK_FILES if name != "input.jsonl"]
    assert [name for name in left if (work / name).exists()] == []


def test_run_names_csv_line_not_parsable(tmp_path: Path, fraud_model: Path) -> None:
    data = tmp_path / "data.csv"
    huge = '"' + "9" * 200_000 + '"'
    write_csv(data, [VALID_ROW, VALID_ROW, huge + VALID_ROW[1:]])

    result = invoke(
        "--data", str(data),
        "--model", str(fraud_model),
        "--work-dir", str(tmp_path / "work"),
    )  # fmt: skip

    output = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert f"{data}: line 4 is not valid CSV" in output
    assert "field larger than field limit" in output
    assert "Traceback" not in output


def test_run_without_trained_model_names_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGOGOSML_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "cache" / "models" / "fraud-model.joblib"

    result = invoke("--work-dir", str(tmp_path / "work"))

    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"no trained model at '{model}', the default of --model" in output
    assert "train one with 'python -m sample_app.train'" in output
    assert "or pass --model FILE" in output
    # It stops before fetching the dataset.
    assert not (tmp_path / "cache" / "data").exists()


def test_run_names_dataset_fetch_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fraud_model: Path
) -> None:
    def fetch_dataset() -> None:
        raise DatasetFetchError("Could not fetch the fraud dataset. Check network.")

    monkeypatch.setattr("sample_app.data.fetch_dataset", fetch_dataset)

    result = invoke("--model", str(fraud_model), "--work-dir", str(tmp_path / "work"))

    output = flat(result.output)
    assert result.exit_code == 1, result.output
    assert "Could not fetch the fraud dataset. Check network, or pass a copy" in output
    assert "--data FILE" in output
    assert isinstance(result.exception, SystemExit)
