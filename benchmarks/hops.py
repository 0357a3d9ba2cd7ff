"""Round-trip time of each hop of a pipeline, one request at a time.

``python -m benchmarks.hops`` times, at a low fixed rate so that nothing
queues: a bare aiohttp server, the output writer with a file sink and with a
Kafka sink, the model app in front of that writer, a confluent-kafka produce
with ``acks=all`` until its delivery report, and the Kafka sink's ``send``.
Together they give the floor of the latency that the pipeline adds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import orjson
from confluent_kafka import Producer
from rich.console import Console
from rich.table import Table

from agogosml.config import KafkaSettings, load_settings
from agogosml.envelope import Envelope
from agogosml.runtime import loop_factory
from agogosml.transports.kafka import KafkaSink
from agogosml_cli.local import ServiceProcess, app_process, free_port, writer_process
from benchmarks.suite import _percentile

REPO_ROOT = Path(__file__).resolve().parents[1]
TOPIC = "hops"
#: One transaction of the fraud dataset, as the sample app expects it.
TRANSACTION = orjson.dumps(
    {"transaction_id": "tx-1", "Time": 0.0, "Amount": 149.62}
    | {f"V{n}": 0.1 * n for n in range(1, 29)}
)
Timed = Callable[[], Awaitable[None]]


async def time_calls(call: Timed, requests: int, rate: float) -> list[float]:
    """Return the duration of each call in milliseconds, after 20 warm-up calls."""
    for _ in range(20):
        await call()
    durations = []
    next_start = time.perf_counter()
    for _ in range(requests):
        # Each call starts 1/rate after the one before, or when it ends.
        await asyncio.sleep(max(0.0, next_start - time.perf_counter()))
        start = time.perf_counter()
        next_start = start + 1 / rate
        await call()
        durations.append((time.perf_counter() - start) * 1000)
    return sorted(durations)


def post(session: aiohttp.ClientSession, url: str) -> Timed:
    """Return a call that POSTs one transaction to `url` and checks for 2xx."""

    async def call() -> None:
        headers = {"Content-Type": "application/json"}
        async with session.post(url, data=TRANSACTION, headers=headers) as response:
            body = await response.read()
            if response.status >= 300:
                raise RuntimeError(f"{url} responded {response.status}: {body!r}")

    return call


def produce(bootstrap: str) -> Timed:
    """Return a call that produces one record and polls for its delivery report."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 0,
        }
    )

    async def call() -> None:
        reports: list[object] = []
        producer.produce(TOPIC, TRANSACTION, on_delivery=lambda e, _: reports.append(e))
        while not reports:
            producer.poll(0.1)
        if reports[0] is not None:
            raise RuntimeError(f"produce failed: {reports[0]}")

    return call


async def measure(
    bootstrap: str, work_dir: Path, requests: int, rate: float
) -> list[tuple[str, list[float]]]:
    """Start the services and time every hop; return (name, durations) rows."""
    rows: list[tuple[str, list[float]]] = []
    kafka = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    with ExitStack() as stack:
        port = free_port()
        trivial = ServiceProcess(
            "aiohttp server",
            "benchmarks.null_server",
            {"NULL_SERVER_PORT": str(port)},
            work_dir / "null_server.log",
            port=port,
        )
        file_writer = writer_process(
            work_dir, sink="file", output="/dev/null", extra={"WRITER_FSYNC": "false"}
        )
        kafka_writer = writer_process(work_dir, sink="kafka", output=TOPIC, extra=kafka)
        for service in (trivial, file_writer, kafka_writer):
            stack.callback(service.stop)
            service.start()
        for service in (trivial, file_writer, kafka_writer):
            service.wait_ready()
        app = app_process(work_dir, kafka_writer.url)
        stack.callback(app.stop)
        app.start().wait_ready()
        async with aiohttp.ClientSession() as session:
            hops = [
                ("aiohttp server that only reads the body", trivial.url + "/"),
                ("output writer, file sink without fsync", file_writer.url + "/"),
                ("output writer, Kafka sink", kafka_writer.url + "/"),
                ("model app, then output writer with Kafka sink", app.url + "/"),
            ]
            for name, url in hops:
                rows.append(
                    (name, await time_calls(post(session, url), requests, rate))
                )
        rows.append(
            (
                "confluent-kafka produce, acks=all, until delivered",
                await time_calls(produce(bootstrap), requests, rate),
            )
        )
        async with KafkaSink(
            load_settings(KafkaSettings, bootstrap_servers=bootstrap), TOPIC
        ) as sink:

            async def send() -> None:
                await sink.send([Envelope(value=TRANSACTION)])

            rows.append(
                (
                    "agogosml Kafka sink send(), in process",
                    await time_calls(send, requests, rate),
                )
            )
    return rows


def table(rows: list[tuple[str, list[float]]], requests: int, rate: float) -> Table:
    """Return the percentiles of each hop as a table."""
    result = Table(
        title=f"{requests} requests per hop, one at a time, {rate:g} per second"
    )
    for column in ("hop", "p50 ms", "p90 ms", "p99 ms"):
        result.add_column(column, justify="left" if column == "hop" else "right")
    for name, durations in rows:
        result.add_row(
            name,
            *(f"{_percentile(durations, q):.2f}" for q in (0.5, 0.9, 0.99)),
        )
    return result


def main(argv: list[str] | None = None) -> int:
    """Start a broker (unless one is given), time the hops and print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hops",
        description="Time each hop of a pipeline, one request at a time.",
    )
    parser.add_argument("--bootstrap", help="use this running broker")
    parser.add_argument(
        "--requests", type=int, default=400, help="per hop (default 400)"
    )
    parser.add_argument(
        "--rate", type=float, default=100.0, help="requests per second (default 100)"
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or not args.rate > 0:
        parser.error("--requests and --rate must be above 0")
    work_dir = REPO_ROOT / ".agogosml" / "bench-hops"
    work_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        bootstrap = args.bootstrap
        if bootstrap is None:
            sys.path.insert(0, str(REPO_ROOT / "deployment" / "kafka"))
            from broker import LocalKafkaBroker

            bootstrap = stack.enter_context(LocalKafkaBroker()).bootstrap_servers
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            rows = runner.run(measure(bootstrap, work_dir, args.requests, args.rate))
    # Wide enough that the table keeps its rows when the output is a log file.
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table(rows, args.requests, args.rate))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
