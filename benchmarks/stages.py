"""CPU time per record of each stage that a batch goes through, in one process.

``python -m benchmarks.stages`` times the work that the reader, the sample app
and the writer do to each batch of the batched mode, apart from HTTP and Kafka.
It runs on batches of 100 records of the fraud dataset, one stage at a time, in
this process. Each stage runs over the same batches several times and the fastest
pass counts, so other work on the machine changes the figures less than those
of a pipeline run. The stages together show how much of a service's CPU per
record is its own handling of the records, and what is left for HTTP, Kafka
and the event loop.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from agogosml import app as model_app
from agogosml.app import ModelApp
from agogosml.envelope import Envelope, Position
from agogosml.exact_json import json_error
from agogosml.reader.client import batch_body
from agogosml.writer import service as writer
from benchmarks.kafka_io import records
from sample_app.app import make_score_function
from sample_app.data import default_dataset_path
from sample_app.scoring import FraudModel, default_model_path

BATCH = 100
#: The partitions that the records are spread over, as in the pipeline modes.
PARTITIONS = 8
Stage = tuple[str, str, Callable[[int], object]]


class Batches:
    """The records of each batch as each service gets them."""

    def __init__(self, dataset: Path, model: FraudModel, count: int) -> None:
        pairs = records(dataset, count * BATCH)
        self.records = [
            pairs[start : start + BATCH] for start in range(0, len(pairs), BATCH)
        ]
        self.reader = [
            envelopes(batch, index) for index, batch in enumerate(self.records)
        ]
        self.app_bodies = [batch_body(batch) for batch in self.reader]
        self.app_items = [model_app._decode(body) for body in self.app_bodies]
        self.score = make_score_function(model)
        self.results = [
            self.score([item["value"] for item in items]) for items in self.app_items
        ]
        # An app reads its settings when it starts, so only the default body
        # limit of the writer requests is used here.
        self.app = ModelApp(self.score, name="stages", score_in_thread=False)
        self.writer_bodies = []
        for index in range(count):
            outputs = self.app_outputs(index)
            if len(outputs) != len(self.app_items[index]):
                # A stage that drops records would be timed on less work.
                raise RuntimeError(
                    f"the app encoded {len(outputs)} of the "
                    f"{len(self.app_items[index])} records of batch {index}"
                )
            self.writer_bodies.append(
                b"[" + b",".join(output for _, output in outputs) + b"]"
            )

    def app_outputs(self, index: int) -> list[tuple[int, bytes]]:
        """Encode the writer batch elements of batch `index`, as the app does."""
        items = self.app_items[index]
        statuses: list[dict[str, Any]] = [{"status": 200} for _ in items]
        return self.app._encode_outputs(items, self.results[index], statuses)


def envelopes(pairs: list[tuple[bytes, bytes]], index: int) -> list[Envelope]:
    """Return the envelopes of a batch of (key, value) records, as a source does."""
    first = index * BATCH
    return [
        Envelope.from_record(
            value,
            key,
            None,
            Position("stages", offset % PARTITIONS, offset, offset + 1, 1),
        )
        for offset, (key, value) in enumerate(pairs, start=first)
    ]


def stages(batches: Batches) -> list[Stage]:
    """Return (service, stage, call) for each stage. A call takes a batch index."""
    return [
        (
            "input reader",
            "make envelopes of the consumed records",
            lambda index: envelopes(batches.records[index], index),
        ),
        (
            "input reader",
            "check that each value is one JSON document",
            lambda index: [json_error(e.value) for e in batches.reader[index]],
        ),
        (
            "input reader",
            "encode the batch request to the app",
            lambda index: batch_body(batches.reader[index]),
        ),
        (
            "model app",
            "decode the request body",
            lambda index: model_app._decode(batches.app_bodies[index]),
        ),
        (
            "model app",
            "validate and score (the sample app's function)",
            lambda index: batches.score(
                [item["value"] for item in batches.app_items[index]]
            ),
        ),
        (
            "model app",
            "encode the results as writer batch elements",
            batches.app_outputs,
        ),
        (
            "output writer",
            "decode the request body and build the records",
            lambda index: writer._envelopes_from_batch(
                writer._decode_json(batches.writer_bodies[index])
            ),
        ),
    ]


def measure(
    dataset: Path, model_path: Path, batches: int, passes: int
) -> list[tuple[str, str, float]]:
    """Return (service, stage, microseconds per record) of each stage."""
    prepared = Batches(dataset, FraudModel.load(model_path), batches)
    rows = []
    for service, name, call in stages(prepared):
        fastest = float("inf")
        for _ in range(passes):
            started = time.perf_counter()
            for index in range(batches):
                call(index)
            fastest = min(fastest, time.perf_counter() - started)
        rows.append((service, name, fastest / (batches * BATCH) * 1e6))
    return rows


def table(rows: list[tuple[str, str, float]]) -> Table:
    """Return the stages as a table, with a total per service."""
    result = Table(title=f"CPU per record, batches of {BATCH} records, one process")
    result.add_column("service")
    result.add_column("stage")
    result.add_column("µs per record", justify="right")
    totals: dict[str, float] = {}
    for service, name, micros in rows:
        totals[service] = totals.get(service, 0.0) + micros
        result.add_row(service, name, f"{micros:.2f}")
    for service, micros in totals.items():
        result.add_row(service, "all of the above", f"{micros:.2f}", style="bold")
    return result


def main(argv: list[str] | None = None) -> int:
    """Time each stage and print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stages",
        description="Time the record handling of each service on batches of "
        "dataset records, in one process.",
    )
    parser.add_argument(
        "--batches", type=int, default=100, help="batches of 100 (default 100)"
    )
    parser.add_argument(
        "--passes", type=int, default=20, help="passes per stage (default 20)"
    )
    args = parser.parse_args(argv)
    if args.batches < 1 or args.passes < 1:
        parser.error("--batches and --passes must be at least 1")
    rows = measure(
        default_dataset_path(), default_model_path(), args.batches, args.passes
    )
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
