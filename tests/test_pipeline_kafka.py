"""End-to-end tests: reader, app and writer processes over the real Kafka broker.

Every test counts each input record in the output or dead-letter topic.
"""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest.mock import ANY

import orjson
import pytest
from harness import KafkaPipeline, numbered

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PipelineFactory = Callable[..., KafkaPipeline]


@pytest.fixture
def pipeline_factory(
    kafka_bootstrap: str,
    kafka_topic_factory: Callable[[int], str],
    tmp_path: Path,
) -> Iterator[PipelineFactory]:
    pipelines: list[KafkaPipeline] = []

    def make(partitions: int = 1, **options: object) -> KafkaPipeline:
        topics = (
            kafka_topic_factory(partitions),
            kafka_topic_factory(partitions),
            kafka_topic_factory(1),
        )
        pipeline = KafkaPipeline(kafka_bootstrap, tmp_path, topics, **options)  # type: ignore[arg-type]
        pipelines.append(pipeline)
        return pipeline

    yield make

    for pipeline in pipelines:
        pipeline.stop()
        print(pipeline.logs())  # shown by pytest only when the test failed


def wait_until(
    condition: Callable[[], bool], timeout_seconds: float, what: str
) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_seconds} s waiting for {what}")


def test_dataset_records_all_arrive(
    pipeline_factory: PipelineFactory, fraud_model: Path
) -> None:
    from sample_app.data import fetch_dataset, iter_transactions

    records = list(iter_transactions(fetch_dataset().path, limit=10_000))
    pipeline = pipeline_factory(
        partitions=3,
        app_module="sample_app.app",
        app_env={"SAMPLE_APP_MODEL_PATH": str(fraud_model)},
        reader_env={"READER_BATCH_MAX_MESSAGES": "20"},
    )
    schema_id = b"\x00\x00\x01\xff"
    headers = [("Source-System", b"pos-7"), ("schemaId", schema_id), ("null", None)]
    pipeline.produce(records, key_field="transaction_id", headers=headers)

    pipeline.start()
    output = pipeline.read_output(len(records), timeout_seconds=300)

    sent = {record["transaction_id"] for record in records}
    received = {value["transaction_id"] for value in output.values}
    assert sent - received == set()
    assert len(output.dead_letters) == 0
    assert output.duplicates() == 0
    assert all(0.0 <= value["fraud_probability"] <= 1.0 for value in output.values)
    assert all(headers["Source-System"] == b"pos-7" for headers in output.headers)
    assert all(headers["schemaId"] == schema_id for headers in output.headers)
    assert all(headers["null"] is None for headers in output.headers)
    wait_until(
        lambda: sum(pipeline.committed(3)) == len(records), 15, "commit of all offsets"
    )


def test_record_headers_keep_their_names_one_message_per_request(
    pipeline_factory: PipelineFactory, fraud_model: Path
) -> None:
    from sample_app.data import fetch_dataset, iter_transactions

    records = list(iter_transactions(fetch_dataset().path, limit=200))
    pipeline = pipeline_factory(
        app_module="sample_app.app",
        app_env={"SAMPLE_APP_MODEL_PATH": str(fraud_model)},
    )
    headers = [
        ("Source-System", b"pos-7"),
        ("correlationId", b"c-1"),
        ("Raw-Bytes", b"\xff\x00"),
        ("region", b"eu"),
        ("Tombstoned-By", None),
        ("empty", b""),
    ]
    pipeline.produce(records, key_field="transaction_id", headers=headers)

    pipeline.start()
    output = pipeline.read_output(len(records), timeout_seconds=120)

    assert len(output.values) == len(records)
    assert output.dead_letters == []
    expected = {**dict(headers), "message-id": ANY, "traceparent": ANY}
    assert all(headers == expected for headers in output.headers)


def test_app_outage_loses_nothing(
    pipeline_factory: PipelineFactory, tmp_path: Path
) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    pipeline = pipeline_factory(
        app_env={"FAULT_FAIL_FLAG": str(flag)},
        reader_env={"READER_RETRY_MAX_ATTEMPTS": "10000"},
    )
    pipeline.produce(numbered(200))
    pipeline.start()

    # Only the offset where the partition starts: nothing past a message that
    # is not finished, during a second of failures after the first commit.
    wait_until(lambda: pipeline.committed() == [0], 30, "commit of offset 0")
    time.sleep(1)
    committed_while_failing = pipeline.committed()
    early = pipeline.read_output(1, timeout_seconds=1, settle_seconds=0)
    flag.unlink()
    output = pipeline.read_output(200)

    assert committed_while_failing == [0]
    assert early.values == []
    assert output.numbers() == set(range(200))
    assert output.dead_letters == []
    wait_until(lambda: pipeline.committed() == [200], 15, "commit of offset 200")


def test_poison_record_goes_to_dead_letter(pipeline_factory: PipelineFactory) -> None:
    records = numbered(100)
    records[42]["poison"] = True
    pipeline = pipeline_factory()
    pipeline.produce(records)

    pipeline.start()
    output = pipeline.read_output(100)

    assert output.numbers() == set(range(100)) - {42}
    assert len(output.dead_letters) == 1
    value, headers = output.dead_letters[0]
    assert value == {"n": 42, "poison": True}
    assert headers["dlq.source.topic"] == pipeline.input
    assert headers["dlq.source.partition"] == "0"
    assert headers["dlq.source.offset"] == "42"
    assert headers["dlq.status"] == "400"
    assert "poison record" in headers["dlq.error"]
    assert headers["dlq.attempts"] == "1"
    assert headers["message-id"] == f"{pipeline.input}:0:42"
    wait_until(lambda: pipeline.committed() == [100], 15, "commit of offset 100")


def _slow_stream(pipeline: KafkaPipeline, count: int) -> None:
    pipeline.produce(numbered(count, delay_seconds=0.002))
    pipeline.start()
    wait_until(lambda: pipeline.committed()[0] > 300, 60, "commits to pass 300")


def test_reader_killed_and_restarted_loses_nothing(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = pipeline_factory()
    _slow_stream(pipeline, 3000)

    pipeline.reader.signal(signal.SIGKILL)
    pipeline.reader.wait(10)
    pipeline.restart(pipeline.reader)
    output = pipeline.read_output(3000, timeout_seconds=180)

    assert output.numbers() == set(range(3000))
    assert output.dead_letters == []
    # Redelivery after SIGKILL is expected; it is bounded by what was in flight.
    print(f"duplicates after SIGKILL: {output.duplicates()}")
    assert output.duplicates() <= 1000 + 500


def test_reader_stopped_gracefully_has_no_duplicates(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = pipeline_factory()
    _slow_stream(pipeline, 2000)

    pipeline.reader.signal(signal.SIGTERM)
    exit_code = pipeline.reader.wait(30)
    pipeline.restart(pipeline.reader)
    output = pipeline.read_output(2000, timeout_seconds=180)

    assert exit_code == 0
    assert output.numbers() == set(range(2000))
    assert output.duplicates() == 0


def test_writer_killed_mid_batch_loses_nothing(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = pipeline_factory(
        reader_env={
            "READER_BATCH_MAX_MESSAGES": "50",
            "READER_RETRY_MAX_ATTEMPTS": "10000",
        }
    )
    _slow_stream(pipeline, 3000)

    pipeline.writer.kill()
    time.sleep(1)
    pipeline.restart(pipeline.writer)
    output = pipeline.read_output(3000, timeout_seconds=180)

    assert output.numbers() == set(range(3000))
    assert output.dead_letters == []


def test_only_contiguous_prefix_is_committed(
    pipeline_factory: PipelineFactory, tmp_path: Path
) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    records = numbered(50)
    records[5]["hold_flag"] = str(hold)
    pipeline = pipeline_factory(
        reader_env={"READER_ORDERING": "unordered", "READER_CONCURRENCY": "8"}
    )
    pipeline.produce(records)
    pipeline.start()

    early = pipeline.read_output(49, timeout_seconds=60, settle_seconds=0.5)
    # Five commit intervals after the others finished.
    time.sleep(1)
    committed_early = pipeline.committed()
    hold.unlink()
    output = pipeline.read_output(50)

    assert early.numbers() == set(range(50)) - {5}
    assert committed_early == [5]  # offset 5 is unfinished, so nothing past it
    assert output.numbers() == set(range(50))
    wait_until(lambda: pipeline.committed() == [50], 15, "commit of offset 50")


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())


def test_writer_rejects_bad_requests_and_stays_up(
    pipeline_factory: PipelineFactory,
) -> None:
    pipeline = pipeline_factory()
    pipeline.writer.start()
    pipeline.writer.wait_ready(60)
    url = pipeline.writer.url

    too_big = _post(
        url + "/", b'"' + b"x" * (2 * 1024 * 1024) + b'"', "application/json"
    )
    not_json = _post(url + "/", b"{not json", "application/json")
    wrong_type = _post(url + "/", b'{"n": 1}', "text/plain")
    not_array = _post(url + "/batch", b'{"n": 1}', "application/json")
    good = _post(url + "/", b'{"n": 1}', "application/json")

    assert too_big[0] == 413
    assert "WRITER_MAX_BODY_BYTES" in too_big[1]["error"]
    assert not_json[0] == 400
    assert "not valid JSON" in not_json[1]["error"]
    assert wrong_type[0] == 415
    assert "text/plain" in wrong_type[1]["error"]
    assert not_array[0] == 400
    assert good[0] == 200
    assert pipeline.writer.running()
    assert pipeline.read_output(1).numbers() == {1}
