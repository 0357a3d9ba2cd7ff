"""Produce and consume through the real Kafka broker of the test session."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import BrokerError, Listener, LocalKafkaBroker
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

pytestmark = pytest.mark.kafka

MESSAGE_COUNT = 100
KEY_COUNT = 10
PARTITION_COUNT = 3
TIMEOUT_SECONDS = 60.0


def _produce(bootstrap: str, topic: str, count: int) -> list[Message]:
    """Produce `count` keyed messages and return their delivery reports in order."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True}
    )
    delivered: list[Message] = []
    errors: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            errors.append(error)
        else:
            delivered.append(message)

    for index in range(count):
        key = f"key-{index % KEY_COUNT}".encode()
        producer.produce(topic, f"{index}".encode(), key, on_delivery=on_delivery)
    assert producer.flush(TIMEOUT_SECONDS) == 0, "messages still queued after flush"
    assert errors == []
    return delivered


def _new_consumer(bootstrap: str, group_id: str, topic: str) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    return consumer


def _consume(consumer: Consumer, count: int) -> list[Message]:
    """Poll until `count` messages arrive or the timeout passes.

    Fails on a consumer error. On timeout it returns fewer messages, which the
    caller's length check reports.
    """
    messages: list[Message] = []
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while len(messages) < count and time.monotonic() < deadline:
        message = consumer.poll(1.0)
        if message is None:
            continue
        assert message.error() is None, message.error()
        messages.append(message)
    return messages


def _values_by_partition(messages: list[Message]) -> dict[int, list[bytes]]:
    values: dict[int, list[bytes]] = defaultdict(list)
    for message in messages:
        values[message.partition()].append(message.value())
    return dict(values)


def test_consumed_messages_keep_partition_order(
    kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    topic = kafka_topic_factory(PARTITION_COUNT)
    delivered = _produce(kafka_bootstrap, topic, MESSAGE_COUNT)

    consumer = _new_consumer(kafka_bootstrap, f"{topic}-group", topic)
    try:
        received = _consume(consumer, MESSAGE_COUNT)
        last_offsets = {m.partition(): m.offset() for m in received}
        consumer.commit(
            offsets=[
                TopicPartition(topic, partition, offset + 1)
                for partition, offset in last_offsets.items()
            ],
            asynchronous=False,
        )
        committed = consumer.committed(
            [TopicPartition(topic, p) for p in range(PARTITION_COUNT)],
            timeout=TIMEOUT_SECONDS,
        )
        high_watermarks = [
            consumer.get_watermark_offsets(TopicPartition(topic, p))[1]
            for p in range(PARTITION_COUNT)
        ]
    finally:
        consumer.close()

    assert len(delivered) == MESSAGE_COUNT
    assert len(received) == MESSAGE_COUNT
    assert sorted(int(m.value()) for m in received) == list(range(MESSAGE_COUNT))

    delivered_values = _values_by_partition(delivered)
    received_values = _values_by_partition(received)
    assert sorted(received_values) == list(range(PARTITION_COUNT))
    for partition, values in delivered_values.items():
        assert received_values[partition] == values, f"partition {partition}"
        offsets = [m.offset() for m in received if m.partition() == partition]
        assert offsets == list(range(len(values))), f"partition {partition}"

    partitions_by_key: dict[bytes, set[int]] = defaultdict(set)
    for message in received:
        partitions_by_key[message.key()].add(message.partition())
    assert len(partitions_by_key) == KEY_COUNT
    for key, partitions in partitions_by_key.items():
        assert len(partitions) == 1, f"key {key!r} in partitions {partitions}"

    assert [tp.offset for tp in committed] == high_watermarks
    assert sum(high_watermarks) == MESSAGE_COUNT


def test_second_consumer_resumes_from_commit(
    kafka_bootstrap: str, kafka_topic_factory: Callable[..., str]
) -> None:
    topic = kafka_topic_factory(1)
    group_id = f"{topic}-group"
    _produce(kafka_bootstrap, topic, 10)

    first = _new_consumer(kafka_bootstrap, group_id, topic)
    try:
        first_messages = _consume(first, 4)
        first.commit(message=first_messages[-1], asynchronous=False)
    finally:
        first.close()

    second = _new_consumer(kafka_bootstrap, group_id, topic)
    try:
        second_messages = _consume(second, 6)
        extra_message = second.poll(2.0)
    finally:
        second.close()

    assert [m.value() for m in first_messages] == [b"0", b"1", b"2", b"3"]
    assert [m.offset() for m in second_messages] == [4, 5, 6, 7, 8, 9]
    assert [m.value() for m in second_messages] == [b"4", b"5", b"6", b"7", b"8", b"9"]
    assert extra_message is None


def test_extra_listener_serves_clients_at_its_own_address() -> None:
    # 127.0.0.2 is loopback too on Linux, so this stands for an address such
    # as a container network's gateway without leaving the machine.
    listener = Listener(name="SECOND", host="127.0.0.2")
    with LocalKafkaBroker(listeners=[listener]) as broker:
        second = broker.listener_address("SECOND")
        assert second.startswith("127.0.0.2:")
        assert second != broker.bootstrap_servers
        _produce(second, "extra-listener", 5)
        consumer = _new_consumer(broker.bootstrap_servers, "extra", "extra-listener")
        try:
            messages = _consume(consumer, 5)
        finally:
            consumer.close()
        with pytest.raises(BrokerError, match="no listener 'OTHER'"):
            broker.listener_address("OTHER")
    assert [m.value() for m in messages] == [b"0", b"1", b"2", b"3", b"4"]


def test_duplicate_listener_names_are_rejected() -> None:
    listeners = [Listener("A", "127.0.0.2"), Listener("A", "127.0.0.3")]
    with pytest.raises(BrokerError, match="must be unique"):
        LocalKafkaBroker(listeners=listeners)


@pytest.mark.parametrize(
    ("name", "message"),
    [("lower", "not valid"), ("PLAINTEXT", "taken by the broker"), ("", "not valid")],
)
def test_bad_listener_names_are_rejected(name: str, message: str) -> None:
    with pytest.raises(BrokerError, match=message):
        Listener(name, "127.0.0.2")


def test_run_prints_container_listener() -> None:
    script = Path(__file__).resolve().parents[1] / "deployment" / "kafka" / "broker.py"
    process = subprocess.Popen(
        [sys.executable, str(script), "run", "--container-address", "127.0.0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(2)]
        assert lines[0].startswith("KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:")
        assert lines[1].startswith("KAFKA_CONTAINER_BOOTSTRAP_SERVERS=127.0.0.2:")
        container_bootstrap = lines[1].split("=", 1)[1]
        _produce(container_bootstrap, "container-listener", 3)
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(60)
        assert process.stdout is not None
        process.stdout.close()
    assert exit_code == 0
