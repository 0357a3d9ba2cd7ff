"""An input topic deleted under a running source, against the real broker.

librdkafka would read a topic created again under the same name from the old
position, past the new topic's first records, if the partition stayed
assigned. Either the consumer's metadata shows the topic gone first, and the
partition is revoked while the source reports the topic missing, or a fetch
reports the partition gone, and the source stops. Either way the new topic is
read from its start.
"""

from __future__ import annotations

import asyncio
import uuid

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope
from agogosml.errors import SourceError
from agogosml.transports.kafka import KafkaSource

TIMEOUT_SECONDS = 60


async def create_topic(admin: AdminClient, topic: str) -> None:
    """Create `topic`, waiting while the broker still deletes a topic of that name."""
    async with asyncio.timeout(TIMEOUT_SECONDS):
        while True:
            future = admin.create_topics([NewTopic(topic, 1, 1)])[topic]
            try:
                await asyncio.to_thread(future.result, TIMEOUT_SECONDS)
                return
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
            await asyncio.sleep(0.5)


def produce(bootstrap: str, topic: str, count: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for number in range(count):
        producer.produce(topic, value=orjson.dumps({"n": number}), partition=0)
    assert producer.flush(30) == 0


async def fetch_and_finish(source: KafkaSource, count: int) -> list[Envelope]:
    envelopes: list[Envelope] = []
    async with asyncio.timeout(TIMEOUT_SECONDS):
        while len(envelopes) < count:
            for envelope in await source.fetch(count - len(envelopes), 0.2):
                envelopes.append(envelope)
                source.ack(envelope)
    await source.commit()
    return envelopes


async def wait_for_deletion(source: KafkaSource) -> SourceError | None:
    """Fetch until the source stops, or reports the topic missing; return the stop."""
    async with asyncio.timeout(TIMEOUT_SECONDS):
        while source.connected or "not found" not in source.unavailable_reason:
            try:
                assert await source.fetch(10, 0.2) == []
            except SourceError as exc:
                return exc
    return None


async def test_deleted_input_topic_read_anew(kafka_bootstrap: str) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    topic = f"deleted-input-{uuid.uuid4().hex[:12]}"
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        group_id=topic,
        # Notices the topic created again within a second.
        extra_config={"topic.metadata.refresh.interval.ms": 1000},
    )
    await create_topic(admin, topic)
    produce(kafka_bootstrap, topic, 3)
    try:
        async with KafkaSource(settings, [topic]) as source:
            before = await fetch_and_finish(source, 3)
            deletion = admin.delete_topics([topic])[topic]
            await asyncio.to_thread(deletion.result, TIMEOUT_SECONDS)
            stopped = await wait_for_deletion(source)
            if stopped is None:
                await create_topic(admin, topic)
                produce(kafka_bootstrap, topic, 2)
                after = await fetch_and_finish(source, 2)
        if stopped is not None:
            await create_topic(admin, topic)
            produce(kafka_bootstrap, topic, 2)
            async with KafkaSource(settings, [topic]) as restarted:
                after = await fetch_and_finish(restarted, 2)
    finally:
        admin.delete_topics([topic])

    assert [envelope.value for envelope in before] == [
        orjson.dumps({"n": number}) for number in range(3)
    ]
    if stopped is not None:
        assert "an assigned input partition no longer exists" in str(stopped)
        assert f"{topic} [0]" in str(stopped)
        assert not stopped.retriable
    # The broker deleted the group's offsets with the topic, so the new topic
    # is read from its first record, not from offset 3.
    assert [envelope.position.offset for envelope in after if envelope.position] == [
        0,
        1,
    ]
