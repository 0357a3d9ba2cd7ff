"""The Kafka broker goes away under a running pipeline and comes back.

These tests start a broker of their own, because they stop it, and count
every input record in the output or dead-letter topic.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from broker import LocalKafkaBroker
from confluent_kafka.admin import AdminClient, NewTopic
from harness import KafkaPipeline, numbered

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

RECORDS = 3000


@pytest.fixture
def broker() -> Iterator[LocalKafkaBroker]:
    with LocalKafkaBroker() as started:
        yield started


def _topics(bootstrap: str) -> tuple[str, str, str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = ("input", "output", "dead-letter")
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=1, replication_factor=1) for name in names],
        operation_timeout=30,
    )
    for future in futures.values():
        future.result(timeout=30)
    return names


def _readiness(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
            return response.status, ""
    except urllib.error.HTTPError as error:
        return error.code, str(orjson.loads(error.read()).get("reason", ""))
    except OSError as error:
        return 0, str(error)


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_broker_restart_loses_nothing(
    broker: LocalKafkaBroker, tmp_path: Path, kill: bool
) -> None:
    bootstrap = broker.bootstrap_servers
    pipeline = KafkaPipeline(
        bootstrap,
        tmp_path,
        _topics(bootstrap),
        reader_env={"READER_RETRY_MAX_ATTEMPTS": "10000"},
    )
    try:
        # One message per request, each held 5 ms by the app: the stream
        # takes over 15 s, so the broker goes away in the middle of it.
        pipeline.produce(numbered(RECORDS, delay_seconds=0.005))
        pipeline.start()
        deadline = time.monotonic() + 60
        while pipeline.committed()[0] < 300:
            assert time.monotonic() < deadline, "commits did not pass 300"
            time.sleep(0.1)

        committed_before = pipeline.committed()[0]
        outage = threading.Thread(
            target=broker.restart, kwargs={"kill": kill, "down_seconds": 8}
        )
        outage.start()
        reasons: set[str] = set()
        while outage.is_alive():
            for service in (pipeline.reader, pipeline.writer):
                status, reason = _readiness(service.url)
                if status == 503:
                    reasons.add(f"{service.name}: {reason}")
            time.sleep(0.2)
        outage.join()
        output = pipeline.read_output(RECORDS, timeout_seconds=180)
        reader_running = pipeline.reader.running()
        writer_running = pipeline.writer.running()
    finally:
        pipeline.stop()
        print(pipeline.logs())  # shown by pytest only when the test failed

    assert committed_before < RECORDS // 2
    assert output.numbers() == set(range(RECORDS))
    assert output.dead_letters == []
    assert reader_running
    assert writer_running
    # While the broker was away, readiness failed with its address as the reason.
    assert any(bootstrap in reason for reason in reasons), reasons
    print(f"duplicates after the broker restart: {output.duplicates()}")
