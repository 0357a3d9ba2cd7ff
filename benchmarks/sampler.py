"""Sample the CPU time and resident memory of benchmark processes."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

import psutil

MIB = 1024 * 1024


@dataclass
class Series:
    """Samples of one process: wall time, CPU seconds (user + system), RSS bytes."""

    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    def cpu_at(self, moment: float) -> float:
        """CPU seconds used by `moment`, interpolated between samples."""
        if not self.times:
            return 0.0
        if moment <= self.times[0]:
            return self.cpu[0]
        for index in range(1, len(self.times)):
            if self.times[index] >= moment:
                before, after = self.times[index - 1], self.times[index]
                share = (moment - before) / (after - before) if after > before else 1.0
                low, high = self.cpu[index - 1], self.cpu[index]
                return low + share * (high - low)
        return self.cpu[-1]

    def rss_mb(
        self, start: float | None = None, end: float | None = None
    ) -> list[float]:
        """RSS samples in MiB, optionally only those between `start` and `end`."""
        return [
            rss / MIB
            for moment, rss in zip(self.times, self.rss, strict=True)
            if (start is None or moment >= start) and (end is None or moment <= end)
        ]


@dataclass(frozen=True)
class Usage:
    """CPU and memory of one process during a measured window."""

    cpu_seconds: float
    peak_rss_mb: float
    steady_rss_mb: float


class ProcessSampler:
    """Sample named processes every `interval_seconds` on a background thread.

    A process that exits keeps the samples it had.
    """

    def __init__(self, pids: dict[str, int], interval_seconds: float = 0.1) -> None:
        self._processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.series = {name: Series() for name in pids}
        self._lock = threading.Lock()
        self._interval = interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def add(self, name: str, pid: int) -> None:
        """Start sampling another process, from now on."""
        process = psutil.Process(pid)
        with self._lock:
            self._processes[name] = process
            self.series[name] = Series()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _sample(self) -> None:
        with self._lock:
            processes = list(self._processes.items())
        for name, process in processes:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    rss = process.memory_info().rss
            except psutil.Error:
                continue
            with self._lock:
                series = self.series[name]
                series.times.append(time.time())
                series.cpu.append(times.user + times.system)
                series.rss.append(rss)

    def usage(self, name: str, start: float, end: float) -> Usage:
        """CPU seconds between `start` and `end`, and RSS over the whole sampling.

        Peak RSS is the largest sample; steady RSS is the median of the samples
        inside the window (the largest sample when the window contains none).
        """
        series = self.series[name]
        window = series.rss_mb(start, end)
        everything = series.rss_mb()
        return Usage(
            cpu_seconds=series.cpu_at(end) - series.cpu_at(start),
            peak_rss_mb=max(everything, default=0.0),
            steady_rss_mb=statistics.median(window) if window else max(everything),
        )


def rss_mb(pid: int) -> float:
    """Resident memory of one process now, in MiB."""
    return float(psutil.Process(pid).memory_info().rss / MIB)
