"""A Kafka source stops promptly when every broker is gone.

librdkafka 2.16's close() waits for each asynchronous commit that the brokers
have not confirmed, up to the session timeout (45 s by default). A periodic
commit sent as the brokers went away would therefore hold up the reader's
exit past READER_SHUTDOWN_TIMEOUT_MS and a pod's grace period. The test
starts a broker of its own, because it kills it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import orjson
import pytest
from broker import LocalKafkaBroker
from confluent_kafka import Producer

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope
from agogosml.transports.kafka import KafkaSource, source

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

TOPIC = "stop-brokers-down"


@pytest.fixture
def broker() -> Iterator[LocalKafkaBroker]:
    with LocalKafkaBroker() as started:
        yield started


async def fetch_for(kafka_source: KafkaSource, seconds: float) -> None:
    """Fetch as the reader does, serving the client's callbacks meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await kafka_source.fetch(100, 0.1)


async def source_with_records(
    broker: LocalKafkaBroker, group_id: str
) -> tuple[KafkaSource, list[Envelope]]:
    """Produce 5 records, start a source in `group_id` and fetch them all."""
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    for n in range(5):
        producer.produce(TOPIC, value=orjson.dumps({"n": n}))
    assert producer.flush(30) == 0
    # The default session timeout, which bounds close()'s wait.
    settings = KafkaSettings(
        bootstrap_servers=broker.bootstrap_servers,
        group_id=group_id,
        commit_interval_ms=100,
    )
    kafka_source = KafkaSource(settings, [TOPIC])
    await kafka_source.start()
    envelopes: list[Envelope] = []
    deadline = time.monotonic() + 60
    while len(envelopes) < 5:
        assert time.monotonic() < deadline, "the records were not fetched"
        envelopes += await kafka_source.fetch(100, 0.5)
    return kafka_source, envelopes


async def test_stop_with_brokers_down_is_prompt(broker):
    kafka_source, envelopes = await source_with_records(broker, "g-stop-brokers-down")

    # The messages finish after the broker went away, as requests to the app
    # that were under way when it crashed do, so a periodic commit waits.
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGKILL)
    await fetch_for(kafka_source, 2.0)
    for envelope in envelopes:
        kafka_source.ack(envelope)
    await fetch_for(kafka_source, 1.0)
    waiting_commits = dict(kafka_source._committing)
    started = time.monotonic()
    await kafka_source.stop()
    stop_seconds = time.monotonic() - started

    assert waiting_commits, "no commit was waiting for the brokers"
    limit = source.FINAL_COMMIT_TIMEOUT_SECONDS + source.ABANDONED_CLOSE_SECONDS
    assert stop_seconds < limit, f"stopping took {stop_seconds:.1f} s"


async def test_stop_with_hung_broker_is_prompt(broker):
    kafka_source, envelopes = await source_with_records(broker, "g-stop-broker-hung")

    # A stopped broker keeps its connections open and sends no responses, so the
    # client counts it as up and the final commit waits for its whole timeout.
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        for envelope in envelopes:
            kafka_source.ack(envelope)
        await fetch_for(kafka_source, 1.0)
        started = time.monotonic()
        await kafka_source.stop()
        stop_seconds = time.monotonic() - started
    finally:
        os.kill(broker.pid, signal.SIGCONT)

    # The close after the failed commit shares the commit's time.
    limit = source.ABANDONED_CLOSE_SECONDS + 2
    assert stop_seconds < limit, f"stopping took {stop_seconds:.1f} s"
