"""A plain confluent-kafka relay: the ceiling the pipeline is compared with.

Usage: python -m benchmarks.relay BOOTSTRAP INPUT_TOPIC OUTPUT_TOPIC GROUP_ID

It consumes the input topic, produces every record to the output topic with the
producer settings of agogosml's Kafka sink (acks=all, idempotence, no linger),
waits until the broker acknowledged the batch, and only then stores the batch's
offsets, which the consumer commits every second: the same at-least-once rule
the input reader follows, with no HTTP hops, envelopes or app in between.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

MAX_BATCH = 500


class DeliveryFailed(RuntimeError):
    """The broker rejected a relayed record."""


def relay(bootstrap: str, input_topic: str, output_topic: str, group_id: str) -> None:
    """Relay until SIGTERM or SIGINT."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.offset.store": False,
            "auto.commit.interval.ms": 1000,
        }
    )
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 0,
        }
    )
    failures: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, _message: Any) -> None:
        if error is not None:
            failures.append(error)

    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    consumer.subscribe([input_topic])
    try:
        while not stopping:
            # Block for the first record only, then take what is already there,
            # so a quiet topic adds no batching delay.
            first = consumer.poll(0.1)
            if first is None:
                continue
            batch = [first, *consumer.consume(MAX_BATCH - 1, 0)]
            for message in batch:
                if message.error() is not None:
                    continue
                while True:
                    try:
                        producer.produce(
                            output_topic,
                            value=message.value(),
                            key=message.key(),
                            headers=message.headers(),
                            on_delivery=on_delivery,
                        )
                        break
                    except BufferError:
                        producer.poll(0.01)
            producer.flush()
            if failures:
                raise DeliveryFailed(f"the broker rejected a record: {failures[0]}")
            _store_offsets(consumer, batch)
    finally:
        producer.flush(30)
        consumer.close()


def _store_offsets(consumer: Consumer, batch: list[Any]) -> None:
    """Store the offset after the last relayed record of each partition."""
    last: dict[tuple[str, int], int] = {}
    for message in batch:
        if message.error() is None:
            last[(message.topic(), message.partition())] = message.offset()
    if last:
        consumer.store_offsets(
            offsets=[
                TopicPartition(topic, partition, offset + 1)
                for (topic, partition), offset in last.items()
            ]
        )


if __name__ == "__main__":
    relay(*sys.argv[1:5])
