"""Command line of the benchmark suite: ``python -m benchmarks [options]``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import signal
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import orjson
from rich.console import Console

from benchmarks.kafka_io import broker_problem
from benchmarks.pipeline import MODES
from benchmarks.report import (
    RESULTS_END,
    RESULTS_START,
    latency_table,
    summarise,
    targets_table,
    throughput_table,
    update_docs,
)
from benchmarks.suite import Settings, Suite
from sample_app.data import fetch_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK = {"messages": 10_000, "rounds": 2, "latency_seconds": 5.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure agogosml's pipeline against a raw Kafka relay on one "
        "broker: throughput per mode, CPU and memory per process, and end-to-end "
        "latency at fixed rates.",
    )
    defaults = Settings()
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run for development: {QUICK['messages']:,} records per "
        f"mode, {QUICK['rounds']} rounds, latency of raw and single only, "
        f"{QUICK['latency_seconds']:.0f} s per pass",
    )
    parser.add_argument(
        "--messages",
        type=_at_least(2),
        help=f"records per mode (default {defaults.messages:,}; "
        f"quick {QUICK['messages']:,})",
    )
    parser.add_argument(
        "--rounds",
        type=_at_least(1),
        help=f"interleaved rounds (default {defaults.rounds})",
    )
    parser.add_argument(
        "--partitions",
        type=_at_least(1),
        default=defaults.partitions,
        help=f"partitions of each topic (default {defaults.partitions})",
    )
    parser.add_argument(
        "--modes",
        default=",".join(defaults.modes),
        help="comma-separated modes: raw, single, batch, echo (default all; raw "
        "always runs, as the reference)",
    )
    parser.add_argument(
        "--latency-seconds",
        type=_positive_float,
        help=f"measured seconds of each latency pass (default "
        f"{defaults.latency_seconds:.0f}; quick {QUICK['latency_seconds']:.0f})",
    )
    parser.add_argument(
        "--latency-rate",
        type=_positive_float,
        default=defaults.latency_rate,
        help=f"fixed rate of the latency passes, in messages per second (default "
        f"{defaults.latency_rate:,.0f}); each pipeline mode also runs at half its "
        "measured maximum",
    )
    parser.add_argument(
        "--latency-modes",
        help="comma-separated modes of the latency passes (default "
        f"{','.join(defaults.latency_modes)})",
    )
    parser.add_argument(
        "--no-latency", action="store_true", help="skip the latency passes"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record py-spy profiles of every process into DIR",
    )
    parser.add_argument(
        "--bootstrap", help="use this running broker instead of starting one"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO_ROOT / "bench-results.json",
        help="where to write the JSON results (default: bench-results.json in the "
        "repository root)",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        metavar="PAGE",
        help="also write the results into the results block of this Markdown page",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=REPO_ROOT / ".agogosml" / "bench",
        help="directory for service logs (default: .agogosml/bench)",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """Combine the defaults, --quick and explicit options."""
    values = dataclasses.asdict(Settings())
    if args.quick:
        values.update(QUICK)
        values["latency_modes"] = ("raw", "single")
        values["latency_half_max"] = False
    for name in ("messages", "rounds", "latency_seconds"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    values["partitions"] = args.partitions
    values["latency_rate"] = args.latency_rate
    values["modes"] = _names(args.modes)
    if "raw" not in values["modes"]:
        values["modes"] = ("raw", *values["modes"])
    values["profile_dir"] = args.profile
    if args.latency_modes is not None:
        values["latency_modes"] = _names(args.latency_modes)
    if args.no_latency:
        values["latency_modes"] = ()
    return Settings(**values)


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {minimum}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above 0")
    return value


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before the run, not after it, when a result cannot be written."""
    if not args.output.parent.is_dir():
        raise SystemExit(
            f"--output: directory {str(args.output.parent)!r} does not exist; "
            "create it or choose another path"
        )
    if args.docs is not None:
        try:
            text = args.docs.read_text()
        except OSError as exc:
            raise SystemExit(f"--docs: cannot read {str(args.docs)!r}: {exc}") from None
        if RESULTS_START not in text or RESULTS_END not in text:
            raise SystemExit(
                f"--docs: {str(args.docs)!r} has no results block; add the lines "
                f"{RESULTS_START} and {RESULTS_END} where the results belong"
            )


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise SystemExit("no mode given; choose from " + ", ".join(MODES))
    unknown = [name for name in names if name not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    """Run the suite and write the results."""
    args = parse_args(argv)
    settings = settings_from(args)
    _check_outputs(args)
    # SIGTERM ends the run like Ctrl-C, so the broker and services it started
    # are stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Wide enough that tables keep their numbers when the output is a log file.
    console = Console(width=None if sys.stdout.isatty() else 160)
    dataset = fetch_dataset().path
    with ExitStack() as stack:
        if args.bootstrap:
            problem = broker_problem(args.bootstrap)
            if problem:
                raise SystemExit(f"--bootstrap: {problem}")
            bootstrap, broker_pid, kafka_version = args.bootstrap, None, "external"
        else:
            sys.path.insert(0, str(REPO_ROOT / "deployment" / "kafka"))
            from broker import LocalKafkaBroker

            broker = stack.enter_context(LocalKafkaBroker())
            bootstrap, broker_pid = broker.bootstrap_servers, broker.pid
            kafka_version = broker.version
            console.print(f"Kafka {kafka_version} broker on {bootstrap}")
        suite = Suite(bootstrap, dataset, args.work_dir, settings, console, broker_pid)
        suite.run()
    command = " ".join(
        ["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]
    )
    document = summarise(
        settings, suite.throughput, suite.latency, kafka_version, command
    )
    args.output.write_bytes(
        orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    console.print(throughput_table(document))
    if document["latency"]:
        console.print(latency_table(document))
    console.print(targets_table(document))
    console.print(f"results written to {args.output}")
    if args.docs is not None:
        update_docs(args.docs, document)
        console.print(f"results block of {args.docs} updated")
    if not document["loss_check_passed"]:
        console.print("[red]loss check failed:[/red]")
        for problem in document["loss_problems"]:
            console.print(f"[red]  {problem}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
