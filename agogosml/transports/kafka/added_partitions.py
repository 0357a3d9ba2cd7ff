"""Find the partitions added to an input topic after a reader of the group started.

With ``auto.offset.reset=latest``, a partition without a committed offset
starts at its end. That is right for a partition that existed when the group
started to read, and wrong for one added later: every message of such a
partition is new to the group. A reader knows the partitions it saw at its own
start, but a reader started after the partition was added, as at a restart or
a scale-out, cannot tell from its own view. So every commit records, as its
metadata, how many partitions the topic had when the committing reader
started. A partition numbered at or above that count in a commit of another
partition was added after a reader of the group started, and starts at its
beginning.

NOTE: checked against Apache Kafka 4.1 only. Whether the Kafka endpoint of
Azure Event Hubs keeps commit metadata is not tested. If it drops it, added
partitions are found only as before, by the reader's own start-up list.
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import TopicPartition

#: Prefix of the commit metadata, followed by the number of partitions that the
#: topic had when the committing reader started.
PARTITIONS_AT_START = "agogosml-partitions-at-start="


def commit_offset(
    partitions_at_start: dict[str, frozenset[int]] | None,
    topic: str,
    partition: int,
    offset: int,
) -> TopicPartition:
    """Return the commit of `offset`, with the topic's partition count at start.

    A topic that did not exist at start counts 0 partitions. Without a known
    count (a lookup that failed, or the ``earliest`` reset that needs none), the
    commit has no metadata.
    """
    known = partitions_at_start.get(topic) if partitions_at_start else None
    if known is None:
        return TopicPartition(topic, partition, offset)
    count = max(known) + 1 if known else 0
    metadata = f"{PARTITIONS_AT_START}{count}"
    return TopicPartition(topic, partition, offset, metadata=metadata)


def sibling_partitions(uncommitted: Iterable[TopicPartition]) -> list[TopicPartition]:
    """Return the partitions whose commits show whether `uncommitted` were added.

    A partition added after a reader started has a higher number than every
    partition that reader saw, so the partitions below it are enough.
    """
    highest: dict[str, int] = {}
    for tp in uncommitted:
        highest[tp.topic] = max(highest.get(tp.topic, 0), tp.partition)
    return [
        TopicPartition(topic, number)
        for topic, top in highest.items()
        for number in range(top)
    ]


def added_partitions(
    uncommitted: Iterable[TopicPartition], committed: Iterable[TopicPartition]
) -> set[tuple[str, int]]:
    """Return the `uncommitted` partitions that a committing reader did not see.

    `committed` are the committed offsets of other partitions, with their
    metadata. Commits without the metadata, such as those of other tools, are
    ignored.
    """
    counts: dict[str, int] = {}
    for tp in committed:
        count = _partitions_at_start(tp)
        if count is not None and tp.offset >= 0:
            counts[tp.topic] = min(counts.get(tp.topic, count), count)
    return {
        (tp.topic, tp.partition)
        for tp in uncommitted
        if tp.topic in counts and tp.partition >= counts[tp.topic]
    }


def _partitions_at_start(tp: TopicPartition) -> int | None:
    metadata = tp.metadata or ""
    if not metadata.startswith(PARTITIONS_AT_START):
        return None
    # Only ASCII digits, as `commit_offset` writes them: int() also takes a
    # sign, spaces, underscores and other scripts' digits, and a count of -1
    # from another tool would start every uncommitted partition at its
    # beginning.
    count = metadata.removeprefix(PARTITIONS_AT_START)
    if not (count.isascii() and count.isdigit()):
        return None
    return int(count)
