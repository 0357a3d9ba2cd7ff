"""Run a pipeline of real service processes against the test Kafka broker."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from agogosml_cli.local import (
    ServiceProcess,
    app_process,
    reader_process,
    writer_process,
)

APPS_DIR = Path(__file__).parent / "apps"
REPO_ROOT = Path(__file__).parents[1]


@dataclass
class Output:
    """Records read back from the output and dead-letter topics."""

    values: list[dict[str, Any]] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    headers: list[dict[str, bytes]] = field(default_factory=list)
    dead_letters: list[Any] = field(default_factory=list)

    def numbers(self) -> set[int]:
        return {value["n"] for value in self.values}

    def duplicates(self) -> int:
        return sum(count - 1 for count in Counter(self.message_ids).values())


class KafkaPipeline:
    """Writer, app and reader processes wired to three fresh topics."""

    def __init__(
        self,
        bootstrap: str,
        work_dir: Path,
        topics: tuple[str, str, str],
        *,
        app_module: str = "fault_app",
        reader_env: dict[str, str] | None = None,
        app_env: dict[str, str] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.work_dir = work_dir
        self.input, self.output, self.dead_letter = topics
        self.group_id = f"test-reader-{uuid.uuid4().hex[:8]}"
        kafka = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "PYTHONPATH": _python_path()}
        self.writer = writer_process(
            work_dir, sink="kafka", output=self.output, extra=kafka
        )
        self.app = app_process(
            work_dir,
            self.writer.url,
            module=app_module,
            extra={**kafka, **(app_env or {})},
        )
        self.reader = reader_process(
            work_dir,
            self.app.url,
            source="kafka",
            input_=self.input,
            extra={
                **kafka,
                "KAFKA_GROUP_ID": self.group_id,
                "KAFKA_COMMIT_INTERVAL_MS": "200",
                # A killed reader's group membership expires after this, so a
                # restarted reader gets its partitions back quickly.
                # With a heartbeat every second, one late heartbeat does not
                # end the session.
                "KAFKA_EXTRA_CONFIG": (
                    '{"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}'
                ),
                "READER_DEAD_LETTER": self.dead_letter,
                "READER_RETRY_INITIAL_BACKOFF_MS": "20",
                "READER_RETRY_MAX_BACKOFF_MS": "500",
                "READER_SHUTDOWN_TIMEOUT_MS": "20000",
                **(reader_env or {}),
            },
        )

    def start(self) -> KafkaPipeline:
        for service in (self.writer, self.app, self.reader):
            service.start()
            service.wait_ready(60)
        return self

    def restart(self, service: ServiceProcess) -> None:
        service.start()
        service.wait_ready(60)

    def stop(self) -> None:
        for service in (self.reader, self.app, self.writer):
            service.stop()

    def logs(self) -> str:
        return "\n\n".join(
            f"--- {service.name} ---\n{service.log_tail(60)}"
            for service in (self.reader, self.app, self.writer)
        )

    def produce(
        self,
        values: list[dict[str, Any]],
        key_field: str = "n",
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        producer = Producer(
            {"bootstrap.servers": self.bootstrap, "enable.idempotence": True}
        )
        for value in values:
            key = str(value.get(key_field, "")).encode()
            producer.produce(
                self.input, value=orjson.dumps(value), key=key, headers=headers
            )
            producer.poll(0)
        assert producer.flush(60) == 0, "input records were not all delivered"

    def read_output(
        self, expected: int, timeout_seconds: float = 120.0, settle_seconds: float = 1.0
    ) -> Output:
        """Read output and dead letters until `expected` distinct inputs arrived."""
        output = Output()
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"test-counter-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        # Assigned rather than subscribed, so no group join delays the read.
        topics = consumer.list_topics(timeout=30).topics
        consumer.assign(
            [
                TopicPartition(topic, partition, OFFSET_BEGINNING)
                for topic in (self.output, self.dead_letter)
                for partition in topics[topic].partitions
            ]
        )
        deadline = time.monotonic() + timeout_seconds
        done_at = None
        try:
            while time.monotonic() < deadline:
                for message in consumer.consume(1000, 0.2):
                    if message.error() is None:
                        self._count(output, message)
                finished = len(set(output.message_ids)) + len(output.dead_letters)
                if finished >= expected and done_at is None:
                    done_at = time.monotonic()
                if done_at is not None and time.monotonic() - done_at >= settle_seconds:
                    break
        finally:
            consumer.close()
        return output

    def _count(self, output: Output, message: Any) -> None:
        value = orjson.loads(message.value())
        if message.topic() == self.dead_letter:
            headers = {name: raw.decode() for name, raw in message.headers() or []}
            output.dead_letters.append((value, headers))
            return
        output.values.append(value)
        headers = dict(message.headers() or [])
        output.message_ids.append(headers["message-id"].decode())
        output.headers.append(headers)

    def committed(self, partitions: int = 1) -> list[int]:
        """Return the committed offset of each input partition (-1001 if none)."""
        consumer = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": self.group_id}
        )
        try:
            inputs = [TopicPartition(self.input, p) for p in range(partitions)]
            return [tp.offset for tp in consumer.committed(inputs, timeout=10)]
        finally:
            consumer.close()


def _python_path() -> str:
    return f"{APPS_DIR}:{REPO_ROOT}"


def numbered(count: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"n": n, **extra} for n in range(count)]
