"""Tests of OffsetTracker: which position a source may commit."""

from __future__ import annotations

from agogosml.envelope import Position
from agogosml.transports.base import OffsetTracker

TOPIC = "orders"


def register(tracker: OffsetTracker, offsets: list[int], partition: int = 0) -> dict:
    """Register one message per offset; each ends where the next offset starts."""
    generation = tracker.generation(TOPIC, partition)
    positions = {}
    for index, offset in enumerate(offsets):
        following = offsets[index + 1] if index + 1 < len(offsets) else offset + 1
        position = Position(TOPIC, partition, offset, following, generation)
        tracker.register(position)
        positions[offset] = position
    return positions


def test_nothing_finished_nothing_committable():
    tracker = OffsetTracker()
    tracker.assign(TOPIC, 0)
    register(tracker, [0, 1, 2])

    assert tracker.committable() == {}
    assert tracker.in_flight(TOPIC, 0) == 3


def test_first_offset_committable_before_any_finish():
    tracker = OffsetTracker(commit_first_offset=True)
    tracker.assign(TOPIC, 0)
    positions = register(tracker, [40, 41, 42])

    assert tracker.committable() == {(TOPIC, 0): 40}

    tracker.finish(positions[41])
    assert tracker.committable() == {(TOPIC, 0): 40}

    tracker.finish(positions[40])
    assert tracker.committable() == {(TOPIC, 0): 42}


def test_first_offset_reset_by_reassign():
    tracker = OffsetTracker(commit_first_offset=True)
    tracker.assign(TOPIC, 0)
    register(tracker, [40])

    revoked = tracker.revoke(TOPIC, 0)
    tracker.assign(TOPIC, 0)
    register(tracker, [35])

    assert revoked == 40
    assert tracker.committable() == {(TOPIC, 0): 35}


def test_in_order_finish_commits_each():
    tracker = OffsetTracker()
    tracker.assign(TOPIC, 0)
    positions = register(tracker, [0, 1, 2])

    tracker.finish(positions[0])
    assert tracker.committable() == {(TOPIC, 0): 1}

    tracker.finish(positions[1])
    assert tracker.committable() == {(TOPIC, 0): 2}

    tracker.finish(positions[2])
    assert tracker.committable() == {(TOPIC, 0): 3}
    assert tracker.in_flight(TOPIC, 0) == 0


def test_out_of_order_commits_contiguous_prefix():
    tracker = OffsetTracker()
    tracker.assign(TOPIC, 0)
    positions = register(tracker, [0, 1, 2, 3])

    tracker.finish(positions[2])
    tracker.finish(positions[3])
    assert tracker.committable() == {}
    assert tracker.in_flight(TOPIC, 0) == 4

    tracker.finish(positions[0])
    assert tracker.committable() == {(TOPIC, 0): 1}
    assert tracker.in_flight(TOPIC, 0) == 3

    tracker.finish(positions[1])
    assert tracker.committable() == {(TOPIC, 0): 4}
    assert tracker.in_flight(TOPIC, 0) == 0


def test_gaps_commit_next_offset():
    # Compacted topics and transaction markers leave gaps between offsets.
    tracker = OffsetTracker()
    tracker.assign(TOPIC, 0)
    positions = register(tracker, [10, 15, 40])

    tracker.finish(positions[15])
    assert tracker.committable() == {}

    tracker.finish(positions[10])
    assert tracker.committable() == {(TOPIC, 0): 40}

    tracker.finish(positions[40])
    assert tracker.committable() == {(TOPIC, 0): 41}


def test_partitions_tracked_separately():
    tracker = OffsetTracker()
    tracker.assign(TOPIC, 0)
    tracker.assign(TOPIC, 1)
    first = register(tracker, [0, 1], partition=0)
    second = register(tracker, [0, 1], partition=1)

    tracker.finish(second[0])
    tracker.finish(second[1])
    tracker.finish(first[1])

    assert tracker.committable() == {(TOPIC, 1): 2}
    assert tracker.in_flight(TOPIC, 0) == 2
    assert tracker.in_flight(TOPIC, 1) == 0


def test_stale_generation_finish_ignored():
    tracker = OffsetTracker()
    tracker.assign(TOPIC, 0)
    old = register(tracker, [0, 1])

    generation = tracker.assign(TOPIC, 0)
    new = register(tracker, [0, 1])

    assert generation == 2
    assert tracker.finish(old[0]) is False
    assert tracker.committable() == {}
    assert tracker.in_flight(TOPIC, 0) == 2

    assert tracker.finish(new[0]) is True
    assert tracker.committable() == {(TOPIC, 0): 1}


def test_stale_generation_register_ignored():
    tracker = OffsetTracker()
    tracker.assign(TOPIC, 0)
    tracker.assign(TOPIC, 0)

    tracker.register(Position(TOPIC, 0, 0, 1, generation=1))

    assert tracker.in_flight(TOPIC, 0) == 0


def test_revoke_returns_last_committable():
    tracker = OffsetTracker()
    tracker.assign(TOPIC, 0)
    positions = register(tracker, [0, 1, 2])
    tracker.finish(positions[0])
    tracker.finish(positions[2])

    committed = tracker.revoke(TOPIC, 0)

    assert committed == 1
    assert tracker.committable() == {}
    assert tracker.in_flight(TOPIC, 0) == 0


def test_revoke_without_finished_returns_none():
    tracker = OffsetTracker()
    tracker.assign(TOPIC, 0)
    register(tracker, [0])

    assert tracker.revoke(TOPIC, 0) is None


def test_finish_after_revoke_ignored():
    tracker = OffsetTracker()
    tracker.assign(TOPIC, 0)
    positions = register(tracker, [0])
    tracker.revoke(TOPIC, 0)

    assert tracker.finish(positions[0]) is False
    assert tracker.committable() == {}


def test_reassign_starts_afresh():
    tracker = OffsetTracker()
    tracker.assign(TOPIC, 0)
    positions = register(tracker, [0, 1])
    tracker.finish(positions[0])

    tracker.revoke(TOPIC, 0)
    generation = tracker.assign(TOPIC, 0)

    assert generation == 3
    assert tracker.generation(TOPIC, 0) == 3
    assert tracker.committable() == {}
    assert tracker.in_flight(TOPIC, 0) == 0


def test_assign_without_revoke_drops_commit_position():
    tracker = OffsetTracker()
    tracker.assign(TOPIC, 0)
    positions = register(tracker, [0, 1])
    tracker.finish(positions[0])

    tracker.assign(TOPIC, 0)

    assert tracker.committable() == {}
    assert tracker.in_flight(TOPIC, 0) == 0
    assert not tracker.finish(positions[1])


def test_unknown_partition_generation_zero():
    tracker = OffsetTracker()

    assert tracker.generation(TOPIC, 7) == 0
    assert tracker.in_flight(TOPIC, 7) == 0
