"""Topics, input loading and output counting for the benchmarks."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from confluent_kafka import (
    Consumer,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from sample_app.data import iter_transactions

TOPIC_TIMEOUT_SECONDS = 60.0


class OutputStalled(RuntimeError):
    """The output stopped growing before every input record arrived."""


def iter_records(dataset: Path, prefix: str = "") -> Iterator[tuple[bytes, bytes]]:
    """Yield dataset transactions as (key, JSON value) pairs, without end.

    Each value carries a sequence number ``seq``. After the last transaction the
    dataset starts again, with ids made unique by a cycle suffix; `prefix` makes
    ids unique across passes.
    """
    seq = 0
    for cycle in itertools.count():
        suffix = f"-{cycle}" if cycle else ""
        for transaction in iter_transactions(dataset):
            identifier = f"{prefix}{transaction['transaction_id']}{suffix}"
            transaction["transaction_id"] = identifier
            transaction["seq"] = seq
            seq += 1
            yield identifier.encode(), orjson.dumps(transaction)


def records(dataset: Path, count: int, prefix: str = "") -> list[tuple[bytes, bytes]]:
    """Return the first `count` pairs of `iter_records`."""
    return list(itertools.islice(iter_records(dataset, prefix), count))


class Topics:
    """Create topics with unique names on one broker and delete them afterwards."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._client: AdminClient | None = AdminClient({"bootstrap.servers": bootstrap})
        self._created: list[str] = []

    @property
    def _admin(self) -> AdminClient:
        if self._client is None:
            raise RuntimeError("the topics' admin client is closed")
        return self._client

    def create(self, label: str, partitions: int) -> str:
        """Create a topic and wait until every partition has a leader."""
        name = f"bench-{label}-{uuid.uuid4().hex[:8]}"
        futures = self._admin.create_topics(
            [NewTopic(name, partitions, 1)], operation_timeout=TOPIC_TIMEOUT_SECONDS
        )
        futures[name].result(TOPIC_TIMEOUT_SECONDS)
        self._created.append(name)
        deadline = time.monotonic() + TOPIC_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            metadata = self._admin.list_topics(name, timeout=10).topics.get(name)
            if metadata is not None and len(metadata.partitions) == partitions:
                if all(p.leader >= 0 for p in metadata.partitions.values()):
                    return name
            time.sleep(0.1)
        raise RuntimeError(
            f"topic {name} has no leader after {TOPIC_TIMEOUT_SECONDS} s"
        )

    def delete(self, *names: str) -> None:
        """Delete topics, freeing the broker's disk."""
        if not names:
            return
        futures = self._admin.delete_topics(
            list(names), operation_timeout=TOPIC_TIMEOUT_SECONDS
        )
        for name, future in futures.items():
            future.result(TOPIC_TIMEOUT_SECONDS)
            self._created.remove(name)

    def delete_all(self) -> None:
        """Delete every topic this object created."""
        self.delete(*list(self._created))

    def close(self) -> None:
        """Delete every topic this object created and release the admin client.

        The client is dropped before the broker stops, so that it does not log
        the broker's disconnection.
        """
        try:
            self.delete_all()
        finally:
            self._client = None


def produce_all(
    bootstrap: str, topic: str, pairs: Iterable[tuple[bytes, bytes]]
) -> int:
    """Produce every (key, value) pair and wait until the broker has them all."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": 20,
            "batch.size": 1_000_000,
            # Deleting a run's topics makes librdkafka log a notice per topic.
            "log_level": 4,
        }
    )
    count = 0
    for key, value in pairs:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
        count += 1
    remaining = producer.flush(120)
    if remaining:
        raise RuntimeError(f"{remaining} input records did not reach {topic}")
    return count


def broker_problem(bootstrap: str, timeout_seconds: float = 15.0) -> str:
    """Return why no broker responds at `bootstrap` (HOST:PORT,...), or ''."""
    for address in bootstrap.split(","):
        _, colon, port = address.strip().rpartition(":")
        if not colon or not port.isdigit() or not 0 < int(port) < 65536:
            return (
                f"{address.strip()!r} is not HOST:PORT; give the broker's address "
                "as HOST:PORT, several separated by commas"
            )
    # Level 0 keeps librdkafka from logging each failed connection attempt.
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        admin.list_topics(timeout=timeout_seconds)
    except KafkaException as exc:
        return (
            f"no Kafka broker responded at {bootstrap} within {timeout_seconds:.0f} s "
            f"({exc.args[0].str()}); start one, for example with 'python "
            "deployment/kafka/broker.py run', or leave out --bootstrap and the "
            "benchmark starts its own"
        )
    return ""


def end_offsets(consumer: Consumer, topics: list[str]) -> int:
    """Sum of the high watermarks of every partition of `topics`."""
    total = 0
    for topic in topics:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        for partition in metadata.partitions:
            _, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=10
            )
            total += high
    return total


@contextlib.contextmanager
def _watcher(bootstrap: str) -> Iterator[Consumer]:
    """Yield a consumer that only reads watermarks: it joins no group.

    One consumer serves a whole wait, because a new client per poll costs the
    broker far more than the watermark requests.
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watch"})
    try:
        yield consumer
    finally:
        consumer.close()


def wait_for_records(
    bootstrap: str,
    topics: list[str],
    expected: int,
    stall_seconds: float,
    alive: object = None,
) -> None:
    """Wait until `topics` hold `expected` records; raise if they stop growing."""
    last_total, last_change = -1, time.monotonic()
    with _watcher(bootstrap) as watcher:
        while True:
            total = end_offsets(watcher, topics)
            if total >= expected:
                return
            now = time.monotonic()
            if total != last_total:
                last_total, last_change = total, now
            elif now - last_change > stall_seconds:
                raise OutputStalled(
                    f"{total} of {expected} records arrived and none for "
                    f"{stall_seconds:.0f} s"
                )
            if callable(alive):
                alive()
            time.sleep(0.25)


@dataclass
class Tally:
    """Counts of the records on the output and dead-letter topics."""

    ids: Counter[str] = field(default_factory=Counter)
    #: Dead letters by transaction id; one that is not JSON counts as "None".
    dead_letters: Counter[str] = field(default_factory=Counter)
    first_timestamp_ms: int | None = None
    last_timestamp_ms: int | None = None

    @property
    def records(self) -> int:
        """Output records, duplicates included."""
        return sum(self.ids.values())

    @property
    def duplicates(self) -> int:
        """Output records beyond the first of each id."""
        return self.records - len(self.ids)

    @property
    def dead_letter_records(self) -> int:
        """Count the dead-letter records, duplicates included."""
        return sum(self.dead_letters.values())

    def missing(self, expected_ids: Iterable[str]) -> int:
        """Count the expected ids that are not in the output.

        Every input record is a valid transaction, so a dead-lettered one
        failed in the pipeline and counts as missing too.
        """
        return sum(1 for identifier in expected_ids if identifier not in self.ids)

    def span_seconds(self) -> float:
        """Time between the first and the last output record's timestamp.

        Record timestamps count whole milliseconds, so a fast relay can give
        a short run one timestamp for every record: a span under one
        millisecond counts as one, which keeps the rate a lower bound.
        """
        if self.first_timestamp_ms is None or self.last_timestamp_ms is None:
            return 0.0
        return max(self.last_timestamp_ms - self.first_timestamp_ms, 1) / 1000


def read_output(
    bootstrap: str, output: str, dead_letter: str | None, expected: int
) -> Tally:
    """Read both topics from the start to their current end and tally them."""
    topics = [output] + ([dead_letter] if dead_letter else [])
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-count-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    tally = Tally()
    try:
        ends = _partition_ends(consumer, topics)
        consumer.assign([TopicPartition(t, p, 0) for (t, p) in ends])
        remaining = {tp for tp, end in ends.items() if end > 0}
        deadline = time.monotonic() + 120
        while remaining and time.monotonic() < deadline:
            for message in consumer.consume(5000, 0.5):
                if message.error() is not None:
                    continue
                topic_partition = (str(message.topic()), message.partition() or 0)
                if (message.offset() or 0) + 1 >= ends[topic_partition]:
                    remaining.discard(topic_partition)
                if message.topic() == dead_letter:
                    tally.dead_letters[transaction_id(message)] += 1
                    continue
                _count(tally, message)
    finally:
        consumer.close()
    return tally


def _partition_ends(
    consumer: Consumer, topics: list[str]
) -> dict[tuple[str, int], int]:
    ends = {}
    for topic in topics:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        for partition in metadata.partitions:
            _, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=10
            )
            ends[(topic, partition)] = high
    return ends


def transaction_id(message: Message) -> str:
    """Return the ``transaction_id`` field of a record's JSON value."""
    value = orjson.loads(message.value() or b"{}")
    return str(value.get("transaction_id") if isinstance(value, dict) else None)


def _count(tally: Tally, message: Message) -> None:
    tally.ids[transaction_id(message)] += 1
    _, timestamp = message.timestamp()
    if tally.first_timestamp_ms is None or timestamp < tally.first_timestamp_ms:
        tally.first_timestamp_ms = timestamp
    if tally.last_timestamp_ms is None or timestamp > tally.last_timestamp_ms:
        tally.last_timestamp_ms = timestamp


class ArrivalClock:
    """Record when each output record arrives, by key, on a consumer thread.

    The consumer blocks for one record and then drains what is already fetched,
    so it adds no batching delay to the measured latency.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.arrivals: dict[bytes, float] = {}
        self.first_arrival = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-clock-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 5,
            }
        )
        self._topic = topic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clock", daemon=True)

    def __enter__(self) -> ArrivalClock:
        self._consumer.subscribe([self._topic])
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            first = self._consumer.poll(0.05)
            if first is None:
                continue
            now = time.perf_counter()
            for message in [first, *self._consumer.consume(1000, 0)]:
                if message.error() is not None:
                    continue
                key = message.key()
                if key is not None:
                    self.arrivals.setdefault(key, now)
            self.first_arrival.set()


class OpenLoopLoad:
    """Produce records at a fixed rate, whatever the pipeline does.

    Each record's latency counts from the moment the schedule meant to send it,
    so a stalled pipeline shows in the results instead of slowing the sender
    (no coordinated omission). The values cycle through `values`; every record
    gets its own key, which the relay and the pipeline both keep.
    """

    def __init__(
        self, bootstrap: str, topic: str, rate: float, values: list[bytes]
    ) -> None:
        self.scheduled: dict[bytes, float] = {}
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "linger.ms": 0,
                "queue.buffering.max.messages": 1_000_000,
                "log_level": 4,
            }
        )
        self._topic = topic
        self._interval = 1.0 / rate
        self._values = values
        self._prefix = f"lat-{uuid.uuid4().hex[:8]}-"

    def run(
        self,
        flowing: threading.Event,
        measure_seconds: float,
        settle_seconds: float = 2.0,
        max_warmup_seconds: float = 60.0,
    ) -> None:
        """Send on schedule: a warm-up, then `measure_seconds` of measured records.

        The warm-up lasts until `flowing` is set (the first record came out)
        plus `settle_seconds`. Records scheduled after that are measured; their
        scheduled send times end up in ``scheduled``, by key.
        """
        start = time.perf_counter()
        measure_from: float | None = None
        for sent in itertools.count():
            due = start + sent * self._interval
            if measure_from is None:
                if flowing.is_set():
                    measure_from = due + settle_seconds
                elif due - start > max_warmup_seconds:
                    raise RuntimeError(
                        f"no record came out within {max_warmup_seconds:.0f} s"
                    )
            elif due >= measure_from + measure_seconds:
                break
            delay = due - time.perf_counter()
            if delay > 0.0005:
                time.sleep(delay)
            key = f"{self._prefix}{sent}".encode()
            if measure_from is not None and due >= measure_from:
                self.scheduled[key] = due
            value = self._values[sent % len(self._values)]
            try:
                self._producer.produce(self._topic, value=value, key=key)
            except BufferError as exc:
                raise RuntimeError("the load producer's queue is full") from exc
            self._producer.poll(0)
        if self._producer.flush(60):
            raise KafkaException("load records were not all delivered")
