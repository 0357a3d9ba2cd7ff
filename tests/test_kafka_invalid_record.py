"""KafkaSink against the real broker when a record batch contains an invalid record.

The broker rejects a whole record batch with INVALID_RECORD when one record of
it is invalid, such as a record without a key on a compacted topic. The batch
may contain records of other requests, which must not fail for good.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from test_kafka_sink_limits import (
    TIMEOUT_SECONDS,
    send_with_retries,
    sinks,  # noqa: F401 - a fixture
    started_sink,
    topic_values,
    wait_for_leader,
)

from agogosml.envelope import Envelope
from agogosml.errors import SinkError
from agogosml.transports.kafka import KafkaSink

pytestmark = pytest.mark.kafka


@pytest.fixture
def compacted_topic(kafka_bootstrap: str) -> Iterator[str]:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    name = f"compacted-{uuid.uuid4().hex[:12]}"
    topic = NewTopic(
        name,
        num_partitions=1,
        replication_factor=1,
        config={"cleanup.policy": "compact"},
    )
    admin.create_topics([topic])[name].result(timeout=TIMEOUT_SECONDS)
    wait_for_leader(admin, name)
    yield name
    admin.delete_topics([name])[name].result(timeout=TIMEOUT_SECONDS)


async def test_invalid_record_spares_other_requests(
    kafka_bootstrap: str,
    compacted_topic: str,
    sinks: list[KafkaSink],  # noqa: F811
) -> None:
    sink = await started_sink(kafka_bootstrap, compacted_topic)
    sinks.append(sink)
    keyed = Envelope(value=b'{"n": 1}', key=b"k1", id="keyed")
    keyless = Envelope(value=b'{"n": 2}', id="keyless")

    # Sent at once, the two records share one record batch.
    results = await asyncio.gather(
        sink.send([keyed]), sink.send([keyless]), return_exceptions=True
    )
    keyed_retry = await send_with_retries(sink, keyed)
    written = topic_values(kafka_bootstrap, compacted_topic)

    keyed_result, keyless_result = results
    assert isinstance(keyed_result, SinkError)
    assert keyed_result.retriable is True
    assert keyed_result.batch_rejected is True
    assert isinstance(keyless_result, SinkError)
    assert keyless_result.batch_rejected is True
    assert keyed_retry is None
    assert written == [keyed.value]
