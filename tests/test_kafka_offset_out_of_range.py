"""A committed offset that retention deleted, against the real broker.

The group's committed offset is below the start of the log, as after the
reader was down longer than the topic's retention. The reader must go on
with the oldest message still in the log, also with
``KAFKA_AUTO_OFFSET_RESET=latest``, which names only where a new group starts.
"""

from __future__ import annotations

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from test_kafka_added_partitions import (
    TIMEOUT_SECONDS,
    committed,
    create_topic,
    produce,
    read,
)

from agogosml.config import KafkaSettings
from agogosml.transports.kafka import KafkaSource

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("reset", ["earliest", "latest"])
async def test_deleted_committed_offset_resumes_at_log_start(
    kafka_bootstrap: str, reset: str
) -> None:
    topic = create_topic(kafka_bootstrap, 1)
    group = f"g-{topic}"
    produce(kafka_bootstrap, topic, 0, 10)
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    consumer.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)
    consumer.close()
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    deleted = admin.delete_records([TopicPartition(topic, 0, 5)])
    for future in deleted.values():
        future.result(TIMEOUT_SECONDS)
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap, group_id=group, auto_offset_reset=reset
    )

    async with KafkaSource(settings, [topic]) as source:
        envelopes = await read(source, 5)
        for envelope in envelopes:
            source.ack(envelope)
        await source.commit()

    values = [orjson.loads(envelope.value) for envelope in envelopes]
    assert values == [{"partition": 0, "n": number} for number in range(5, 10)]
    assert committed(kafka_bootstrap, group, topic, 1) == [10]
