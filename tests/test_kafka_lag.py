"""The consumer-lag metric keeps growing while the reader has paused fetching.

librdkafka computes the lag from the end offsets of its fetches, and a paused
partition does not fetch, so the source reads the end offsets itself. These
tests use librdkafka's mock cluster.
"""

from __future__ import annotations

import asyncio

from fakes import MemorySink
from prometheus_client import REGISTRY
from test_kafka_latest_reset import TOPIC, mock_cluster, produce, wait_long
from test_reader import accept, reader_settings, running_reader, stub_app

from agogosml.config import KafkaSettings
from agogosml.transports.kafka import KafkaSource, source


def lag(partition: int) -> float | None:
    return REGISTRY.get_sample_value(
        "agogosml_consumer_lag_messages",
        {"topic": TOPIC, "partition": str(partition)},
    )


async def test_lag_grows_while_paused(monkeypatch):
    monkeypatch.setattr(source, "PAUSED_LAG_SECONDS", 0.1)
    admin, bootstrap = mock_cluster()
    produce(bootstrap, range(0, 3))  # offsets 0..2
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap,
        group_id="g-lag",
        commit_interval_ms=50,
        extra_config={"session.timeout.ms": 6000},
    )
    release = asyncio.Event()
    holding = False

    async def respond(received):
        if holding:
            await release.wait()
        return await accept(received)

    async with stub_app(respond) as app:
        settings = reader_settings(
            app.url, input=TOPIC, stop_at_end=False, max_in_flight=2
        )
        kafka_source = KafkaSource(kafka, [TOPIC], revoke_timeout_seconds=0.3)
        async with running_reader(settings, kafka_source, MemorySink()) as (reader, _):
            await wait_long(lambda: len(app.accepted) == 3)
            await wait_long(lambda: kafka_source._committed.get((TOPIC, 0)) == 3)
            holding = True
            produce(bootstrap, range(3, 5))  # offsets 3 and 4 fill the in-flight room
            await wait_long(lambda: kafka_source._paused)
            produce(bootstrap, range(5, 35))  # 30 more while paused
            # 35 records, of which the 3 committed ones are behind the reader.
            await wait_long(lambda: lag(0) == 32)
            paused_lag = lag(0)
            release.set()
    del admin

    assert paused_lag == 32


def test_lag_only_of_owned_partitions():
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1", group_id="g-owned")
    owned = KafkaSource(kafka, ["lag-owned"])
    owned.tracker.assign("lag-owned", 0)
    partitions = {
        "0": {"consumer_lag": 5, "hi_offset": 100, "committed_offset": 80},
        "1": {"consumer_lag": 7},
        "-1": {"consumer_lag": 9},
    }

    owned._record_fetched_lag({"topics": {"lag-owned": {"partitions": partitions}}})

    def sample(partition: str) -> float | None:
        labels = {"topic": "lag-owned", "partition": partition}
        return REGISTRY.get_sample_value("agogosml_consumer_lag_messages", labels)

    assert sample("0") == 20  # from the commit, with the unfinished messages
    assert sample("1") is None


async def test_commit_loop_survives_error(monkeypatch, caplog):
    kafka = KafkaSettings(
        bootstrap_servers="127.0.0.1:1", group_id="g-loop", commit_interval_ms=10
    )
    kafka_source = KafkaSource(kafka, ["commit-loop"])
    calls = 0

    def commit_async() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("unexpected")

    monkeypatch.setattr(kafka_source, "_commit_async", commit_async)
    task = asyncio.create_task(kafka_source._commit_periodically())
    try:
        await wait_long(lambda: calls >= 2, seconds=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        kafka_source._thread.shutdown(wait=True)

    assert calls >= 2
    assert "offset commit failed unexpectedly" in caplog.text
