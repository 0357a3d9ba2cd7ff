"""Kafka side of ``agogosml run --kafka``: topics, input production, output counting.

The same code serves a plain broker and the Kafka endpoint of Azure Event
Hubs: every client the run opens takes the librdkafka properties of one
`KafkaSettings`, which the services read from the same environment.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import click
import orjson
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console

from agogosml.config import KafkaSettings
from agogosml.envelope import Position, position_id
from agogosml_cli.run import (
    DEAD_LETTER_ERROR_HEADER,
    OutputTally,
    RunTopics,
    header_text,
    message_id_of,
)

#: Client properties of every client of the run. The run reports broker
#: problems itself, and librdkafka's reconnect lines would only bury the
#: progress bar. A Python logger would silence them too, but Ctrl-C during
#: its callback made `consume` raise SystemError instead of KeyboardInterrupt.
_QUIET = {"log_level": 0}

#: Partitions of the input and output topics that a run creates.
PARTITIONS = 3
_TIMEOUT_SECONDS = 30.0
#: Limit of the broker check before the run writes its input.
_CHECK_TIMEOUT_SECONDS = 10.0
#: Limit of each broker request of the count after a run stopped early, which
#: may have stopped because the broker is gone.
_COUNT_TIMEOUT_SECONDS = 10.0
#: Limit of the deletion of a run's topics, which may come after the broker
#: is gone.
_DELETE_TIMEOUT_SECONDS = 10.0

#: Start offset of each partition of each topic, where the run's records begin.
StartOffsets = dict[str, dict[int, int]]


class KafkaBackend:
    """Run through topics on a Kafka broker or on the Event Hubs Kafka endpoint."""

    transport = "kafka"

    def __init__(
        self,
        settings: KafkaSettings,
        topics: RunTopics,
        run_id: str,
        *,
        key_field: str = "transaction_id",
    ) -> None:
        self.settings = settings
        self.key_field = key_field
        self.topics = topics
        self.group_id = f"agogosml-run-{run_id}"
        self._config = settings.client_config()
        self._start: StartOffsets = {}
        self._positions: dict[str, tuple[int, int]] = {}
        #: Topics that `prepare` created, also when it failed after that.
        self.created: list[str] = []

    def check_connection(self) -> None:
        """Raise RuntimeError when no broker responds to a metadata request in time."""
        check_broker(self._config)

    def prepare(self, input_path: Path, count: int, console: Console) -> list[str]:
        """Create missing topics, skip older records, and produce the input.

        Returns the message id of each input record, which the reader derives
        from the record's topic, partition and offset.
        """
        self._start = prepare_topics(self._config, self.topics, self.created)
        skip_older_input(self._config, self.group_id, self.topics, self._start)
        console.print(f"Producing {count} records to topic {self.topics.input} ...")
        topic = self.topics.input
        positions = produce_file(self._config, topic, input_path, self.key_field)
        ids = [
            position_id(Position(topic, partition, offset, offset + 1))
            for partition, offset in positions
        ]
        self._positions = dict(zip(ids, positions, strict=True))
        return ids

    def committed_ids(self) -> set[str] | None:
        """Return the ids of the input records before the reader's committed offsets.

        The reader commits only past records that it finished, so these are
        the records that it finished. Returns None when the broker does not
        return the committed offsets.
        """
        partitions = sorted({partition for partition, _ in self._positions.values()})
        try:
            committed = committed_offsets(
                self._config, self.group_id, self.topics.input, partitions
            )
        except RuntimeError:
            return None
        return {
            identifier
            for identifier, (partition, offset) in self._positions.items()
            if offset < committed.get(partition, 0)
        }

    def service_env(self) -> dict[str, str]:
        """Return the KAFKA_ variables of the connection, without the secrets.

        The services inherit KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and
        KAFKA_EVENTHUBS_CONNECTION_STRING from the environment that the
        settings were read from.
        """
        settings = self.settings
        env = {"KAFKA_BOOTSTRAP_SERVERS": settings.resolved_bootstrap_servers()}
        if not settings.eventhubs_connection_string.get_secret_value():
            env["KAFKA_SECURITY_PROTOCOL"] = settings.security_protocol.value
        if settings.sasl_mechanism is not None:
            env["KAFKA_SASL_MECHANISM"] = settings.sasl_mechanism.value
        if settings.ssl_ca_location is not None:
            env["KAFKA_SSL_CA_LOCATION"] = str(settings.ssl_ca_location)
        return env

    def reader_env(self) -> dict[str, str]:
        """Return the reader's consumer group, new for each run, and its start.

        The group starts where `prepare` committed, and at the beginning of
        a partition without a commit (a new topic), even when the
        environment sets KAFKA_AUTO_OFFSET_RESET=latest: at the end, the
        reader would skip the input that the run produced before it started.
        """
        return {"KAFKA_GROUP_ID": self.group_id, "KAFKA_AUTO_OFFSET_RESET": "earliest"}

    def output_reader(self) -> OutputConsumer:
        """Return a consumer of the output and dead-letter records of this run."""
        return OutputConsumer(self._config, self.topics, self._start)

    def delete_created(self, console: Console) -> list[str]:
        """Delete the run-specific topics that `prepare` created, and print them.

        Topics that existed before, or that the user named, are kept. The
        reader's consumer group, new for each run, is deleted too. A Ctrl-C
        during the deletion stops it and is not raised again. Returns the
        topics deleted, without those whose deletion failed.
        """
        names = [name for name in self.created if name in self.topics.run_specific]
        deleted: list[str] = []
        # A failure to delete the topics, such as a broker that is gone or a
        # Ctrl-C, would stop the group's deletion the same way, after as long.
        failure: str | None = None
        if names:
            try:
                failures = delete_topics(self._config, names)
            except KafkaException as exc:
                failures = dict.fromkeys(names, exc.args[0].str())
            except KeyboardInterrupt:
                failures = dict.fromkeys(names, "interrupted")
            deleted = [name for name in names if name not in failures]
            if failures:
                message = _left_topics_message(self._config, failures)
                failure = next(iter(failures.values()))
            else:
                message = (
                    f"Deleted the topics that this run created: {', '.join(names)}"
                )
            console.print(message, soft_wrap=True, markup=False, highlight=False)
        if failure is None:
            try:
                failure = delete_group(self._config, self.group_id)
            except KafkaException as exc:
                failure = exc.args[0].str()
            except KeyboardInterrupt:
                failure = "interrupted"
        if failure:
            console.print(
                _left_group_message(self._config, self.group_id, failure),
                soft_wrap=True,
                markup=False,
                highlight=False,
            )
        return deleted


def _broker_error(config: dict[str, Any], exc: KafkaException) -> RuntimeError:
    bootstrap = config["bootstrap.servers"]
    protocol = str(config.get("security.protocol", "PLAINTEXT")).upper()
    mechanism = config.get("sasl.mechanism")
    used = f"security protocol {protocol}"
    if mechanism and protocol.startswith("SASL"):
        used += f" with SASL mechanism {mechanism}"
    return RuntimeError(
        f"cannot reach a Kafka broker at {bootstrap!r} with {used} "
        f"({exc.args[0].str()}); check the address, and that the broker's "
        "listener expects that protocol (set by --kafka-security-protocol and "
        "--kafka-sasl-mechanism, or KAFKA_SECURITY_PROTOCOL and "
        "KAFKA_SASL_MECHANISM), and that a broker runs there. In a clone of "
        "agogosml, 'make broker' starts a local one and prints its address"
    )


def check_broker(
    config: dict[str, Any], timeout_seconds: float = _CHECK_TIMEOUT_SECONDS
) -> None:
    """Send a metadata request; raise RuntimeError when no broker responds.

    A refused connection to every bootstrap server ends the wait early,
    because librdkafka then reports that all brokers are down.

    Raises:
        click.UsageError: the client properties are invalid.
        RuntimeError: no broker responded within `timeout_seconds`.
    """
    errors: list[KafkaError] = []
    admin = _admin_client({**config, "error_cb": errors.append})
    deadline = time.monotonic() + timeout_seconds
    while True:
        remaining = deadline - time.monotonic()
        try:
            admin.list_topics(timeout=min(0.5, max(remaining, 0.01)))
            return
        except KafkaException as exc:
            admin.poll(0)
            all_down = any(
                error.code() == KafkaError._ALL_BROKERS_DOWN for error in errors
            )
            if all_down or remaining <= 0.5:
                # The first error, such as a refused connection, is the most specific.
                cause = KafkaException(errors[0]) if errors else exc
                raise _broker_error(config, cause) from None


def _admin_client(config: dict[str, Any]) -> AdminClient:
    try:
        return AdminClient({**config, **_QUIET})
    except KafkaException as exc:
        raise click.UsageError(
            f"cannot create a Kafka client: {exc.args[0].str()}; check the KAFKA_ "
            "settings, KAFKA_EXTRA_CONFIG included"
        ) from None


def prepare_topics(
    config: dict[str, Any], topics: RunTopics, created: list[str]
) -> StartOffsets:
    """Create the topics that do not exist; return where this run's records start.

    A created topic starts at offset 0. A topic that exists starts at its
    current end, so records of earlier runs are not counted. The name of
    each topic created is appended to `created`, also when creating another
    one fails.
    """
    admin = _admin_client(config)
    try:
        existing = admin.list_topics(timeout=15).topics
    except KafkaException as exc:
        raise _broker_error(config, exc) from None
    partition_counts = {topics.input: PARTITIONS, topics.output: PARTITIONS}
    partition_counts[topics.dead_letter] = 1
    missing = [
        NewTopic(name, partitions, 1)
        for name, partitions in partition_counts.items()
        if name not in existing
    ]
    if missing:
        _create_topics(admin, missing, config["bootstrap.servers"], created)
    start: StartOffsets = {
        topic.topic: dict.fromkeys(range(topic.num_partitions), 0) for topic in missing
    }
    for name in partition_counts.keys() - start.keys():
        partitions = existing[name].partitions
        start[name] = end_offsets(config, name, sorted(partitions))
    return start


def _create_topics(
    admin: AdminClient, topics: list[NewTopic], bootstrap: str, created: list[str]
) -> None:
    futures = admin.create_topics(topics, operation_timeout=_TIMEOUT_SECONDS)
    failures: dict[str, KafkaException] = {}
    for name, future in futures.items():
        try:
            future.result(60)
        except KafkaException as exc:
            failures[name] = exc
        else:
            created.append(name)
    if failures:
        name, error = next(iter(failures.items()))
        raise RuntimeError(
            f"cannot create topic {name!r} on {bootstrap}: {error}; create it "
            "yourself and name it with --input-topic, --output-topic or "
            "--dead-letter-topic"
        ) from error


def delete_topics(config: dict[str, Any], names: list[str]) -> dict[str, str]:
    """Delete topics; return the reason for each topic that was not deleted.

    A topic that no longer exists counts as deleted.
    """
    admin = AdminClient({**config, **_QUIET})
    futures = admin.delete_topics(
        names,
        operation_timeout=_DELETE_TIMEOUT_SECONDS,
        request_timeout=_DELETE_TIMEOUT_SECONDS,
    )
    failures: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(2 * _DELETE_TIMEOUT_SECONDS)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                failures[name] = exc.args[0].str()
        except TimeoutError:
            failures[name] = f"no reply within {2 * _DELETE_TIMEOUT_SECONDS:.0f} s"
    return failures


def delete_group(config: dict[str, Any], group_id: str) -> str | None:
    """Delete a consumer group; return why it was not deleted, or None.

    A group that does not exist counts as deleted: a run whose reader never
    committed leaves none.
    """
    admin = AdminClient({**config, **_QUIET})
    futures = admin.delete_consumer_groups(
        [group_id], request_timeout=_DELETE_TIMEOUT_SECONDS
    )
    try:
        futures[group_id].result(2 * _DELETE_TIMEOUT_SECONDS)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.GROUP_ID_NOT_FOUND:
            return str(exc.args[0].str())
    except TimeoutError:
        return f"no reply within {2 * _DELETE_TIMEOUT_SECONDS:.0f} s"
    return None


def _kafka_tool_command(config: dict[str, Any], tool: str, arguments: str) -> str:
    """Return a command line of one of Kafka's tools for the run's brokers."""
    command = f"{tool} --bootstrap-server {config['bootstrap.servers']} {arguments}"
    if str(config.get("security.protocol", "PLAINTEXT")).upper() != "PLAINTEXT":
        command += " --command-config CLIENT.properties"
    return command


def _left_group_message(config: dict[str, Any], group_id: str, failure: str) -> str:
    """Name the consumer group that the run could not delete, and how to delete it."""
    command = _kafka_tool_command(
        config, "kafka-consumer-groups.sh", f"--delete --group {group_id}"
    )
    return (
        f"Could not delete the reader's consumer group {group_id} ({failure}). "
        f"Delete it with: {command}"
    )


def _left_topics_message(config: dict[str, Any], failures: dict[str, str]) -> str:
    """Name the topics that the run could not delete, and a command that does.

    kafka-topics.sh reads --topic as a regular expression in which a comma
    separates alternatives, so the dots in the names are escaped.
    """
    names = list(failures)
    pattern = ",".join(name.replace(".", "\\.") for name in names)
    command = _kafka_tool_command(
        config, "kafka-topics.sh", f"--delete --if-exists --topic '{pattern}'"
    )
    return (
        f"Could not delete the topics that this run created "
        f"({next(iter(failures.values()))}): {', '.join(names)}. Delete them "
        f"with: {command}"
    )


def end_offsets(
    config: dict[str, Any], topic: str, partitions: list[int]
) -> dict[int, int]:
    """Return the high watermark of each partition of `topic`."""
    consumer = Consumer({**config, **_QUIET, "group.id": "agogosml-run-offsets"})
    try:
        return {
            partition: consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=_TIMEOUT_SECONDS
            )[1]
            for partition in partitions
        }
    except KafkaException as exc:
        raise _broker_error(config, exc) from None
    finally:
        consumer.close()


def skip_older_input(
    config: dict[str, Any], group_id: str, topics: RunTopics, start: StartOffsets
) -> None:
    """Commit the input's start offsets for the reader's new consumer group.

    The reader then begins at the records this run produces, even when the
    input topic contains records of earlier runs.
    """
    offsets = [
        TopicPartition(topics.input, partition, offset)
        for partition, offset in start[topics.input].items()
        if offset > 0
    ]
    if not offsets:
        return
    consumer = Consumer(
        {**config, **_QUIET, "group.id": group_id, "enable.auto.commit": False}
    )
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException as exc:
        raise _broker_error(config, exc) from None
    finally:
        consumer.close()


def committed_offsets(
    config: dict[str, Any], group_id: str, topic: str, partitions: list[int]
) -> dict[int, int]:
    """Return the committed offset of `group_id` on each partition that has one."""
    consumer = Consumer(
        {**config, **_QUIET, "group.id": group_id, "enable.auto.commit": False}
    )
    try:
        committed = consumer.committed(
            [TopicPartition(topic, partition) for partition in partitions],
            timeout=_COUNT_TIMEOUT_SECONDS,
        )
    except KafkaException as exc:
        raise _broker_error(config, exc) from None
    finally:
        consumer.close()
    # A partition without a commit has a negative offset (OFFSET_INVALID).
    return {tp.partition: tp.offset for tp in committed if tp.offset >= 0}


def produce_file(
    config: dict[str, Any], topic: str, path: Path, key_field: str = "transaction_id"
) -> list[tuple[int, int]]:
    """Produce every line of a JSON Lines file.

    A line whose value is an object with a string `key_field`, such as the
    ``transaction_id`` of a row of the fraud dataset, gets that as its key,
    and any other line none. Returns the partition and offset of each record,
    in the order of the file.
    """
    producer = Producer(
        {**config, **_QUIET, "enable.idempotence": True, "linger.ms": 20}
    )
    positions: list[tuple[int, int]] = []
    failures: list[str] = []

    def delivered(index: int, error: Any, message: Any) -> None:
        if error is None:
            positions[index] = (message.partition(), message.offset())
        else:
            failures.append(error.str())

    with path.open("rb") as file:
        for index, line in enumerate(file):
            positions.append((-1, -1))
            on_delivery = functools.partial(delivered, index)
            while True:
                try:
                    producer.produce(
                        topic,
                        value=line.rstrip(b"\n"),
                        key=_record_key(line, key_field),
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    producer.poll(0.1)
    remaining = producer.flush(120)
    if remaining:
        raise RuntimeError(f"{remaining} input records were not delivered to {topic}")
    if failures:
        raise RuntimeError(
            f"{len(failures)} input records were not delivered to {topic}: "
            f"{failures[0]}"
        )
    return positions


def _record_key(line: bytes, key_field: str) -> bytes | None:
    value = orjson.loads(line)
    if isinstance(value, dict):
        key = value.get(key_field)
        if isinstance(key, str):
            return key.encode()
    return None


class OutputConsumer:
    """Read the output and dead-letter topics of a run from its start offsets."""

    def __init__(
        self, config: dict[str, Any], topics: RunTopics, start: StartOffsets
    ) -> None:
        self._topics = topics
        self._consumer = Consumer(
            {
                **config,
                **_QUIET,
                "group.id": f"{topics.output}-counter",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        #: Offset of the run's first record, by topic and partition.
        self._start = {
            (topic, partition): offset
            for topic in (topics.output, topics.dead_letter)
            for partition, offset in start[topic].items()
        }
        #: Offset after the last record counted, by topic and partition.
        self._next = dict(self._start)
        self._assign(self._start)

    def _assign(self, offsets: dict[tuple[str, int], int]) -> None:
        self._consumer.assign(
            [
                TopicPartition(topic, partition, offset)
                for (topic, partition), offset in offsets.items()
            ]
        )

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
            topic, partition, offset = (
                message.topic(),
                message.partition(),
                message.offset(),
            )
            headers = message.headers()
            assert not isinstance(headers, dict)
            if topic == self._topics.dead_letter:
                reason = header_text(headers, DEAD_LETTER_ERROR_HEADER)
                tally.add_dead_letter(message_id_of(headers), reason)
            else:
                value = orjson.loads(message.value() or b"null")
                tally.add_output(message_id_of(headers), value)
            assert topic is not None
            assert partition is not None
            assert offset is not None
            self._next[(topic, partition)] = offset + 1

    def final_count(self, tally: OutputTally) -> OutputTally | None:
        """Count the output and dead letters again, from the run's start to their end.

        Called once the services stopped, the count includes what the writer
        and the reader wrote while they stopped. It starts from nothing,
        because Ctrl-C can discard records of a `poll_into` call before they
        were counted. Returns None when the broker does not return the ends
        or the count does not reach them in time. `tally`, the count during
        the run, is not needed.
        """
        try:
            ends = {
                key: self._consumer.get_watermark_offsets(
                    TopicPartition(*key), timeout=_COUNT_TIMEOUT_SECONDS
                )[1]
                for key in self._start
            }
        except KafkaException:
            return None
        recount = OutputTally()
        self._next = dict(self._start)
        self._assign(self._start)
        deadline = time.monotonic() + _TIMEOUT_SECONDS
        while any(self._next[key] < end for key, end in ends.items()):
            if time.monotonic() > deadline:
                return None
            self.poll_into(recount, 0.2)
        return recount
