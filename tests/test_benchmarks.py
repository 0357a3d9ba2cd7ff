import math
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer
from rich.console import Console

from agogosml.writer import service as writer
from benchmarks import stages
from benchmarks.hops import measure
from benchmarks.kafka_io import Tally, Topics, broker_problem
from benchmarks.report import (
    RESULTS_END,
    RESULTS_START,
    summarise,
    targets_table,
    update_docs,
)
from benchmarks.sampler import Series
from benchmarks.suite import (
    LatencyRun,
    Settings,
    Suite,
    ThroughputRun,
    _percentile,
    latency_passes,
)
from sample_app.data import default_dataset_path
from sample_app.scoring import FraudModel

REPO_ROOT = Path(__file__).parents[1]


def test_percentile_is_nearest_rank():
    values = [float(n) for n in range(1, 101)]

    assert _percentile(values, 0.50) == 50.0
    assert _percentile(values, 0.99) == 99.0
    assert _percentile(values, 0.999) == 100.0
    assert _percentile([7.0], 0.99) == 7.0
    assert math.isnan(_percentile([], 0.5))


def test_latency_passes_pair_each_rate_with_raw():
    settings = Settings(latency_modes=("raw", "single", "batch"))
    rates = {"raw": 80_000.0, "single": 1_234.0, "batch": 9_000.0}

    passes = latency_passes(settings, rates.__getitem__)

    assert passes == [
        ("raw", 1000.0),
        ("single", 1000.0),
        ("batch", 1000.0),
        ("single", 620.0),
        ("raw", 620.0),
        ("batch", 4500.0),
        ("raw", 4500.0),
    ]


def test_latency_passes_without_half_max():
    settings = Settings(latency_modes=("raw", "single"), latency_half_max=False)

    passes = latency_passes(settings, lambda name: 1000.0)

    assert passes == [("raw", 1000.0), ("single", 1000.0)]


def test_cpu_is_interpolated_between_samples():
    series = Series(times=[10.0, 11.0, 12.0], cpu=[1.0, 1.5, 3.5], rss=[0, 0, 0])

    assert series.cpu_at(11.5) == pytest.approx(2.5)
    assert series.cpu_at(9.0) == 1.0
    assert series.cpu_at(13.0) == 3.5


def throughput_run(mode: str, round_number: int, mps: float) -> ThroughputRun:
    return ThroughputRun(
        mode=mode,
        round=round_number,
        messages=1000,
        messages_per_second=mps,
        missing=0,
        duplicates=0,
        dead_lettered=0,
        cpu_per_1k={"input_reader": 0.1},
        peak_rss_mb={"input_reader": 60.0},
        steady_rss_mb={"input_reader": 55.0},
    )


def latency_run(mode: str, p99: float) -> LatencyRun:
    return LatencyRun(
        mode=mode,
        rate=1000.0,
        measured=5000,
        missing=0,
        p50_ms=p99 / 2,
        p99_ms=p99,
        p999_ms=p99 * 2,
        max_ms=p99 * 3,
        idle_rss_mb={"input_reader": 50.0, "model_app": 70.0, "output_writer": 45.0},
    )


def test_span_of_equal_timestamps_is_one_millisecond():
    tally = Tally(first_timestamp_ms=1_700_000_000_000)
    tally.last_timestamp_ms = tally.first_timestamp_ms

    assert tally.span_seconds() == 0.001
    tally.last_timestamp_ms += 250
    assert tally.span_seconds() == 0.25
    assert Tally().span_seconds() == 0.0


def test_ratio_pairs_rounds_with_raw():
    settings = Settings(modes=("raw", "batch"), latency_modes=("raw", "single"))
    # The machine slowed down in round 2; the batch/raw ratio stays 0.5.
    runs = [
        throughput_run("raw", 1, 10_000),
        throughput_run("batch", 1, 5_000),
        throughput_run("raw", 2, 4_000),
        throughput_run("batch", 2, 2_000),
    ]
    latency = [latency_run("raw", 4.0), latency_run("single", 7.0)]

    document = summarise(settings, runs, latency, "4.1.1", "python -m benchmarks")

    assert document["batch_to_raw_ratio"] == pytest.approx(0.5)
    assert document["ratio_spread"]["batch"]["min"] == pytest.approx(0.5)
    assert document["raw_relay_mps"] == pytest.approx(7_000)
    assert document["latency_added_p99_ms"] == pytest.approx(3.0)
    assert document["rss_mb"]["model_app"]["idle"] == 70.0
    assert document["loss_check_passed"] is True
    met = {target["figure"]: target["met"] for target in document["targets"]}
    assert met == {
        "batch_to_raw_ratio": True,
        "pipeline_single_mps": None,
        "latency_added_p99_ms": True,
        "idle_rss_mb_max": True,
    }


def test_missing_records_fail_the_loss_check():
    settings = Settings(modes=("raw",), latency_modes=())
    lost = throughput_run("raw", 1, 10_000)
    lost.missing = 3

    document = summarise(settings, [lost], [], "4.1.1", "python -m benchmarks")

    assert document["loss_check_passed"] is False
    assert document["loss_problems"] == [
        "raw round 1: 3 records missing from the output, 0 dead letters"
    ]


def test_lost_latency_pass_is_named():
    settings = Settings(modes=("raw",), latency_modes=("raw",))
    lost = latency_run("raw", 4.0)
    lost.missing = 7

    document = summarise(
        settings, [throughput_run("raw", 1, 10_000)], [lost], "4.1.1", "bench"
    )

    assert document["loss_problems"] == [
        "latency pass raw at 1,000 msg/s: 7 of 5,007 records missing from the output"
    ]


def test_unmeasured_targets_are_neither_met_nor_missed():
    settings = Settings(modes=("raw",), latency_modes=())

    document = summarise(
        settings, [throughput_run("raw", 1, 10_000)], [], "4.1.1", "bench"
    )

    assert {target["met"] for target in document["targets"]} == {None}
    console = Console(width=120, record=True)
    console.print(targets_table(document))
    assert console.export_text().count("not measured") == len(document["targets"])


def test_dead_letters_count_as_missing():
    tally = Tally()
    tally.ids.update(["t1", "t2"])
    tally.dead_letters.update(["t3", "t3", "None"])

    assert tally.missing(["t1", "t2", "t3"]) == 1
    assert tally.dead_letter_records == 3


def test_broker_problem_names_the_address():
    assert "'nonsense' is not HOST:PORT" in broker_problem("nonsense")
    assert "'b:x' is not HOST:PORT" in broker_problem("a:1,b:x")
    unreachable = broker_problem("127.0.0.1:1", timeout_seconds=2)
    assert unreachable.startswith("no Kafka broker responded at 127.0.0.1:1 within 2 s")


@pytest.mark.kafka
def test_read_back_ends_with_repeated_dead_letter(kafka_bootstrap: str, tmp_path: Path):
    topics = Topics(kafka_bootstrap)
    output = topics.create("collect-output", 1)
    dead_letter = topics.create("collect-dlq", 1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for number in range(3):
        producer.produce(output, orjson.dumps({"transaction_id": f"t{number}"}))
    for _ in range(2):
        producer.produce(dead_letter, orjson.dumps({"transaction_id": "t3"}))
    producer.flush(30)
    settings = Settings(stall_seconds=2.0)
    suite = Suite(kafka_bootstrap, tmp_path, tmp_path, settings, Console(), None)
    expected = ["t0", "t1", "t2", "t3", "t4"]

    try:
        tally = suite._collect(output, dead_letter, expected, None)
    finally:
        topics.close()

    assert tally.missing(expected) == 2
    assert tally.dead_letter_records == 2


def test_profile_directory_is_written_as_text(tmp_path: Path):
    settings = Settings(modes=("raw",), latency_modes=(), profile_dir=tmp_path)
    run = throughput_run("raw", 1, 10_000)

    document = summarise(settings, [run], [], "4.1.1", "python -m benchmarks")

    assert orjson.loads(orjson.dumps(document))["settings"]["profile_dir"] == str(
        tmp_path
    )


def test_results_block_is_replaced(tmp_path: Path):
    settings = Settings(modes=("raw",), latency_modes=())
    document = summarise(
        settings, [throughput_run("raw", 1, 12_345)], [], "4.1.1", "make bench"
    )
    page = tmp_path / "page.md"
    page.write_text(f"# Page\n\n{RESULTS_START}\nold\n{RESULTS_END}\n\nafter\n")

    update_docs(page, document)

    text = page.read_text()
    assert "old" not in text
    assert "12,345" in text
    assert text.endswith(f"{RESULTS_END}\n\nafter\n")


@pytest.mark.kafka
@pytest.mark.slow
def test_benchmark_runs_end_to_end(kafka_bootstrap: str, tmp_path: Path):
    output = tmp_path / "bench-results.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--bootstrap",
            kafka_bootstrap,
            "--messages",
            "400",
            "--rounds",
            "1",
            "--partitions",
            "2",
            "--modes",
            "raw,batch",
            "--latency-modes",
            "raw",
            "--latency-seconds",
            "2",
            "--output",
            str(output),
            "--work-dir",
            str(tmp_path / "logs"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    document = orjson.loads(output.read_bytes())
    assert document["loss_check_passed"] is True
    assert document["modes"]["raw"]["missing"] == 0
    assert document["modes"]["batch"]["missing"] == 0
    assert document["raw_relay_mps"] > 0
    assert document["pipeline_batch_mps"] > 0
    assert [run["rate"] for run in document["latency"]] == [1000]
    for run in document["latency"]:
        assert run["measured"] > 0
        assert run["missing"] == 0


async def test_hops_times_each_hop(kafka_bootstrap, fraud_model, tmp_path):
    rows = await measure(kafka_bootstrap, tmp_path, requests=5, rate=1000.0)

    assert len(rows) == 6
    assert "model app" in rows[3][0]
    for name, durations in rows:
        assert len(durations) == 5, name
        assert durations == sorted(durations), name
        assert durations[0] > 0, name


def test_stages_time_every_record_of_each_stage(fraud_model):
    dataset = default_dataset_path()
    prepared = stages.Batches(dataset, FraudModel.load(fraud_model), 2)
    records = writer._envelopes_from_batch(
        writer._decode_json(prepared.writer_bodies[1])
    )

    rows = stages.measure(dataset, fraud_model, batches=2, passes=1)
    printed = Console(width=200, record=True)
    printed.print(stages.table(rows))

    assert [record.id for record in records] == [
        envelope.id for envelope in prepared.reader[1]
    ]
    assert [service for service, _, _ in rows] == ["input reader"] * 3 + [
        "model app"
    ] * 3 + ["output writer"]
    assert all(micros > 0 for _, _, micros in rows)
    assert printed.export_text().count("all of the above") == 3
