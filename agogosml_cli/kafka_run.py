"""Kafka side of ``agogosml run --kafka``: topics, input production, output counting."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import orjson
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from agogosml_cli.run import OutputTally, message_id_of

# The run reports broker problems itself; librdkafka's reconnect lines would
# only bury the progress bar.
_QUIET = logging.getLogger("agogosml_cli.librdkafka")
_QUIET.setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class RunTopics:
    """Topics of one run."""

    input: str
    output: str
    dead_letter: str


def create_topics(bootstrap: str, run_id: str, partitions: int = 3) -> RunTopics:
    """Create the input, output and dead-letter topics of a run."""
    topics = RunTopics(
        input=f"agogosml-run-{run_id}-input",
        output=f"agogosml-run-{run_id}-output",
        dead_letter=f"agogosml-run-{run_id}-input.dlq",
    )
    admin = AdminClient({"bootstrap.servers": bootstrap}, logger=_QUIET)
    try:
        admin.list_topics(timeout=15)
    except KafkaException as exc:
        raise RuntimeError(
            f"cannot reach a Kafka broker at {bootstrap!r} ({exc.args[0].str()}); "
            "check the address, or start a local broker with 'make broker'"
        ) from None
    futures = admin.create_topics(
        [
            NewTopic(topics.input, partitions, 1),
            NewTopic(topics.output, partitions, 1),
            NewTopic(topics.dead_letter, 1, 1),
        ],
        operation_timeout=30,
    )
    for name, future in futures.items():
        try:
            future.result(60)
        except KafkaException as exc:
            raise RuntimeError(
                f"cannot create topic {name!r} on {bootstrap}: {exc}; check that a "
                "broker runs there"
            ) from exc
    return topics


def produce_file(bootstrap: str, topic: str, path: Path) -> int:
    """Produce every line of a JSON Lines file, keyed by transaction id."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 20},
        logger=_QUIET,
    )
    count = 0
    with path.open("rb") as file:
        for line in file:
            key = orjson.loads(line).get("transaction_id", "").encode()
            while True:
                try:
                    producer.produce(topic, value=line.rstrip(b"\n"), key=key)
                    break
                except BufferError:
                    producer.poll(0.1)
            count += 1
    remaining = producer.flush(120)
    if remaining:
        raise RuntimeError(f"{remaining} input records were not delivered to {topic}")
    return count


class OutputConsumer:
    """Read the output and dead-letter topics of a run from the beginning."""

    def __init__(self, bootstrap: str, topics: RunTopics) -> None:
        self._topics = topics
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"{topics.output}-counter",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
            logger=_QUIET,
        )
        self._consumer.subscribe([topics.output, topics.dead_letter])

    def __enter__(self) -> OutputConsumer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._consumer.close()

    def poll_into(self, tally: OutputTally, timeout_seconds: float) -> None:
        """Count the records that arrive within `timeout_seconds`."""
        for message in self._consumer.consume(1000, timeout_seconds):
            if message.error() is not None:
                continue
            value = orjson.loads(message.value() or b"null")
            if message.topic() == self._topics.dead_letter:
                tally.add_dead_letter(value)
            else:
                headers = message.headers()
                assert not isinstance(headers, dict)
                tally.add_output(message_id_of(headers), value)
