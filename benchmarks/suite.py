"""Run the benchmark modes in interleaved rounds and the latency passes."""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.kafka_io import (
    ArrivalClock,
    OpenLoopLoad,
    OutputStalled,
    Tally,
    Topics,
    produce_all,
    read_output,
    records,
    wait_for_records,
)
from benchmarks.pipeline import MODES, Mode, Pipeline, Relay
from benchmarks.sampler import ProcessSampler, rss_mb

#: Share of a mode's measured throughput above which a latency pass is marked
#: saturated.
SATURATION = 0.8

#: Distinct records the latency passes cycle through; each send gets its own key.
LATENCY_VALUES = 20_000


@dataclass
class Settings:
    """Sizes, rounds and rates of a benchmark run."""

    messages: int = 200_000
    rounds: int = 3
    partitions: int = 8
    modes: tuple[str, ...] = ("raw", "single", "batch", "echo")
    latency_modes: tuple[str, ...] = ("raw", "single", "batch")
    latency_rate: float = 1000.0
    latency_half_max: bool = True
    latency_seconds: float = 15.0
    idle_seconds: float = 3.0
    stall_seconds: float = 60.0
    profile_dir: Path | None = None


@dataclass
class ThroughputRun:
    """One mode in one round."""

    mode: str
    round: int
    messages: int
    messages_per_second: float
    missing: int
    duplicates: int
    dead_lettered: int
    cpu_per_1k: dict[str, float]
    peak_rss_mb: dict[str, float]
    steady_rss_mb: dict[str, float]


@dataclass
class LatencyRun:
    """One latency pass: a mode at a fixed open-loop rate."""

    mode: str
    rate: float
    measured: int
    missing: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    idle_rss_mb: dict[str, float] = field(default_factory=dict)
    #: The rate is above SATURATION of the mode's measured throughput, so the
    #: latency is mostly time spent queued.
    saturated: bool = False


class Suite:
    """Runs every mode against one broker and collects the results."""

    def __init__(
        self,
        bootstrap: str,
        dataset: Path,
        work_dir: Path,
        settings: Settings,
        console: Console,
        broker_pid: int | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.dataset = dataset
        self.work_dir = work_dir
        self.settings = settings
        self.console = console
        self.broker_pid = broker_pid
        self.topics = Topics(bootstrap)
        self.throughput: list[ThroughputRun] = []
        self.latency: list[LatencyRun] = []
        self._latency_values: list[bytes] | None = None

    def run(self) -> None:
        """Pre-load the input, run the rounds, then the latency passes."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._run_rounds()
            self._run_latency()
        finally:
            self.topics.close()

    # -- throughput ------------------------------------------------------------

    def _run_rounds(self) -> None:
        settings = self.settings
        self.console.print(
            f"pre-loading {settings.messages:,} records into "
            f"{settings.partitions} partitions"
        )
        pairs = records(self.dataset, settings.messages)
        expected_ids = [key.decode() for key, _ in pairs]
        input_topic = self.topics.create("input", settings.partitions)
        produce_all(self.bootstrap, input_topic, pairs)
        del pairs
        for round_number in range(1, settings.rounds + 1):
            # Rotate the order each round, so no mode always runs first or last.
            shift = (round_number - 1) % len(settings.modes)
            order = settings.modes[shift:] + settings.modes[:shift]
            for name in order:
                run = self._throughput(
                    MODES[name], round_number, input_topic, expected_ids
                )
                self.throughput.append(run)
                self.console.print(
                    f"round {round_number} {name:7} "
                    f"{run.messages_per_second:10,.0f} msg/s  missing {run.missing}  "
                    f"duplicates {run.duplicates}"
                )

    def _throughput(
        self, mode: Mode, round_number: int, input_topic: str, expected_ids: list[str]
    ) -> ThroughputRun:
        output = self.topics.create(f"{mode.name}-output", self.settings.partitions)
        dead_letter = self.topics.create(f"{mode.name}-dlq", 1)
        runner = self._runner(mode)
        profilers: list[subprocess.Popen[bytes]] = []
        label = f"{mode.name}-round{round_number}"

        try:
            with ProcessSampler(self._broker_pids()) as sampler:
                # Sampled from launch: a fast mode may be done before it is ready.
                runner.start(
                    self.bootstrap, input_topic, output, dead_letter, sampler.add
                )
                for name, pid in runner.pids().items():
                    profilers.extend(self._profile(name, pid, label))
                tally = self._collect(
                    output, dead_letter, expected_ids, runner.check_alive
                )
        finally:
            for profiler in profilers:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(60)
            runner.stop()
        self.topics.delete(output, dead_letter)

        start = (tally.first_timestamp_ms or 0) / 1000
        end = (tally.last_timestamp_ms or 0) / 1000
        count = len(tally.ids)
        span = tally.span_seconds()
        usage = {name: sampler.usage(name, start, end) for name in sampler.series}
        return ThroughputRun(
            mode=mode.name,
            round=round_number,
            messages=count,
            messages_per_second=(count - 1) / span if span > 0 else 0.0,
            missing=tally.missing(expected_ids),
            duplicates=tally.duplicates,
            dead_lettered=tally.dead_letter_records,
            cpu_per_1k={
                n: u.cpu_seconds / count * 1000 if count else math.nan
                for n, u in usage.items()
            },
            peak_rss_mb={n: u.peak_rss_mb for n, u in usage.items()},
            steady_rss_mb={n: u.steady_rss_mb for n, u in usage.items()},
        )

    def _collect(
        self,
        output: str,
        dead_letter: str,
        expected_ids: list[str],
        alive: Any,
    ) -> Tally:
        expected = len(expected_ids)
        topics = [output, dead_letter]
        try:
            wait_for_records(
                self.bootstrap, topics, expected, self.settings.stall_seconds, alive
            )
        except OutputStalled as exc:
            self.console.print(f"[red]output stalled: {exc}[/red]")
        tally = read_output(self.bootstrap, output, dead_letter, expected)
        # Duplicates can fill the topics before the last ids arrive: wait for
        # the rest until the output stops growing.
        while tally.missing(expected_ids):
            # Both counts include duplicates, like the topics' end offsets.
            have = tally.records + tally.dead_letter_records
            try:
                wait_for_records(self.bootstrap, topics, have + 1, 10.0, alive)
            except OutputStalled:
                break
            tally = read_output(self.bootstrap, output, dead_letter, expected)
        return tally

    # -- latency ---------------------------------------------------------------

    def _run_latency(self) -> None:
        settings = self.settings
        passes = latency_passes(settings, self.median_rate)
        for name, rate in passes:
            run = self._latency(MODES[name], rate)
            self.latency.append(run)
            self.console.print(
                f"latency {name:7} at {rate:8,.0f} msg/s: p50 {run.p50_ms:7.2f} ms  "
                f"p99 {run.p99_ms:7.2f} ms  p99.9 {run.p999_ms:7.2f} ms  "
                f"missing {run.missing}"
                + ("  (saturated: mostly queueing)" if run.saturated else "")
            )

    def median_rate(self, mode: str) -> float:
        """Median throughput of `mode` over the rounds, 0 if it did not run."""
        rates = sorted(r.messages_per_second for r in self.throughput if r.mode == mode)
        return _median(rates) if rates else 0.0

    def _latency(self, mode: Mode, rate: float) -> LatencyRun:
        input_topic = self.topics.create(
            f"{mode.name}-lat-input", self.settings.partitions
        )
        output = self.topics.create(f"{mode.name}-lat-output", self.settings.partitions)
        dead_letter = self.topics.create(f"{mode.name}-lat-dlq", 1)
        runner = self._runner(mode)
        runner.start(self.bootstrap, input_topic, output, dead_letter)
        try:
            time.sleep(self.settings.idle_seconds)
            idle = {name: rss_mb(pid) for name, pid in runner.pids().items()}
            load = OpenLoopLoad(self.bootstrap, input_topic, rate, self._values())
            with ArrivalClock(self.bootstrap, output) as clock:
                load.run(clock.first_arrival, self.settings.latency_seconds)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and any(
                    key not in clock.arrivals for key in load.scheduled
                ):
                    runner.check_alive()
                    time.sleep(0.2)
                arrivals = dict(clock.arrivals)
        finally:
            runner.stop()
        self.topics.delete(input_topic, output, dead_letter)
        latencies = sorted(
            (arrivals[key] - due) * 1000
            for key, due in load.scheduled.items()
            if key in arrivals
        )
        return LatencyRun(
            mode=mode.name,
            rate=rate,
            measured=len(latencies),
            missing=len(load.scheduled) - len(latencies),
            p50_ms=_percentile(latencies, 0.50),
            p99_ms=_percentile(latencies, 0.99),
            p999_ms=_percentile(latencies, 0.999),
            max_ms=latencies[-1] if latencies else math.nan,
            idle_rss_mb=idle,
            saturated=rate > SATURATION * self.median_rate(mode.name) > 0,
        )

    # -- helpers ---------------------------------------------------------------

    def _values(self) -> list[bytes]:
        """Encoded dataset records for the latency passes, read once."""
        if self._latency_values is None:
            pairs = records(self.dataset, LATENCY_VALUES, prefix="lat-")
            self._latency_values = [value for _, value in pairs]
        return self._latency_values

    def _runner(self, mode: Mode) -> Relay | Pipeline:
        if mode.is_relay:
            return Relay(self.work_dir / "relay.log")
        return Pipeline(mode, self.work_dir)

    def _profile(
        self, name: str, pid: int, label: str
    ) -> list[subprocess.Popen[bytes]]:
        """Attach py-spy to a process when profiling is on."""
        directory = self.settings.profile_dir
        if directory is None:
            return []
        directory.mkdir(parents=True, exist_ok=True)
        command = [
            _py_spy(),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(directory / f"{label}-{name}.txt"),
        ]
        profiler = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return [profiler]

    def _broker_pids(self) -> dict[str, int]:
        return {} if self.broker_pid is None else {"broker": self.broker_pid}


def latency_passes(
    settings: Settings, median_rate: Callable[[str], float]
) -> list[tuple[str, float]]:
    """Return the (mode, rate) latency passes to run, in order.

    Every latency mode runs at ``latency_rate``. With ``latency_half_max``, each
    pipeline mode also runs at half its median throughput, and the raw relay at
    that same rate, so the latency a mode adds is known at both rates.
    """
    passes = [(name, settings.latency_rate) for name in settings.latency_modes]
    if not settings.latency_half_max:
        return passes
    for name in settings.latency_modes:
        best = median_rate(name)
        if name == "raw" or not best:
            continue
        rate = round(best / 2, -1)
        passes.append((name, rate))
        if "raw" in settings.latency_modes and ("raw", rate) not in passes:
            passes.append(("raw", rate))
    return passes


def _py_spy() -> str:
    """Path of py-spy: on PATH, else next to this interpreter (a venv's bin)."""
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def _percentile(sorted_values: list[float], quantile: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(quantile * len(sorted_values)))
    return sorted_values[rank - 1]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


__all__ = ["LatencyRun", "Settings", "Suite", "ThroughputRun"]
