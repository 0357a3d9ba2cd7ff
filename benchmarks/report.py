"""Summarise benchmark runs: medians, spread, ratios, targets; JSON and tables."""

from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import confluent_kafka
import psutil
from rich.table import Table

from benchmarks.pipeline import MODES
from benchmarks.suite import LatencyRun, Settings, ThroughputRun

SERVICES = ("input_reader", "model_app", "output_writer")
SHORT = {"input_reader": "reader", "model_app": "app", "output_writer": "writer"}

#: Targets on a 2-core machine whose broker shares the cores.
TARGETS = {
    "batch_to_raw_ratio": (">=", 0.5),
    "pipeline_single_mps": (">=", 3000.0),
    "latency_added_p99_ms": ("<=", 5.0),
    "idle_rss_mb_max": ("<=", 80.0),
}


def _settings_document(settings: Settings) -> dict[str, Any]:
    """Return the settings as JSON types; the profile directory as a string."""
    document = asdict(settings)
    if settings.profile_dir is not None:
        document["profile_dir"] = str(settings.profile_dir)
    return document


def spread(values: list[float]) -> dict[str, float]:
    """Median, minimum and maximum of `values` (NaN when empty)."""
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def summarise(
    settings: Settings,
    throughput: list[ThroughputRun],
    latency: list[LatencyRun],
    kafka_version: str,
    command: str,
) -> dict[str, Any]:
    """Build the bench-results.json document."""
    modes: dict[str, Any] = {}
    for name in settings.modes:
        runs = [run for run in throughput if run.mode == name]
        processes = sorted({p for run in runs for p in run.cpu_per_1k})
        modes[name] = {
            "title": MODES[name].title,
            "messages_per_second": spread([r.messages_per_second for r in runs]),
            "cpu_seconds_per_1k": {
                p: spread([r.cpu_per_1k[p] for r in runs]) for p in processes
            },
            "peak_rss_mb": {p: max(r.peak_rss_mb[p] for r in runs) for p in processes},
            "steady_rss_mb": {
                p: statistics.median(r.steady_rss_mb[p] for r in runs)
                for p in processes
            },
            "missing": sum(r.missing for r in runs),
            "duplicates": sum(r.duplicates for r in runs),
            "dead_lettered": sum(r.dead_lettered for r in runs),
            "rounds": [asdict(r) for r in runs],
        }

    def ratio(mode: str) -> dict[str, float]:
        # Per round, so both sides of each ratio saw the same machine state.
        by_round = {
            r.round: r.messages_per_second for r in throughput if r.mode == "raw"
        }
        values = [
            r.messages_per_second / by_round[r.round]
            for r in throughput
            if r.mode == mode and by_round.get(r.round)
        ]
        return spread(values)

    def median_mps(mode: str) -> float:
        return float(
            modes.get(mode, {}).get("messages_per_second", {}).get("median", math.nan)
        )

    at_rate = [run for run in latency if run.rate == settings.latency_rate]
    single = _find(at_rate, "single")
    raw = _find(at_rate, "raw")
    idle = single.idle_rss_mb if single else {}
    rss = {
        service: {
            "idle": idle.get(service, math.nan),
            "steady": _max_over_modes(modes, "steady_rss_mb", service),
            "peak": _max_over_modes(modes, "peak_rss_mb", service),
        }
        for service in SERVICES
    }
    document: dict[str, Any] = {
        "measured_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine(kafka_version),
        "settings": _settings_document(settings),
        "raw_relay_mps": median_mps("raw"),
        "pipeline_single_mps": median_mps("single"),
        "pipeline_batch_mps": median_mps("batch"),
        "echo_single_mps": median_mps("echo"),
        "batch_to_raw_ratio": ratio("batch")["median"],
        "single_to_raw_ratio": ratio("single")["median"],
        "ratio_spread": {name: ratio(name) for name in settings.modes if name != "raw"},
        "latency_rate_mps": settings.latency_rate,
        "latency_p50_ms": single.p50_ms if single else math.nan,
        "latency_p99_ms": single.p99_ms if single else math.nan,
        "latency_p999_ms": single.p999_ms if single else math.nan,
        "raw_latency_p50_ms": raw.p50_ms if raw else math.nan,
        "raw_latency_p99_ms": raw.p99_ms if raw else math.nan,
        "latency_added_p50_ms": _difference(single, raw, "p50_ms"),
        "latency_added_p99_ms": _difference(single, raw, "p99_ms"),
        "rss_mb": rss,
        "modes": modes,
        "latency": _latency_rows(latency),
    }
    document["loss_problems"] = loss_problems(throughput, latency)
    document["loss_check_passed"] = not document["loss_problems"]
    document["idle_rss_mb_max"] = max(
        (value["idle"] for value in rss.values()), default=math.nan
    )
    document["targets"] = targets(document)
    return document


def loss_problems(
    throughput: list[ThroughputRun], latency: list[LatencyRun]
) -> list[str]:
    """Return one line per run that lost records, with how many."""
    problems = [
        f"{run.mode} round {run.round}: {run.missing} records missing from the "
        f"output, {run.dead_lettered} dead letters"
        for run in throughput
        if run.missing
    ]
    problems += [
        f"latency pass {run.mode} at {run.rate:,.0f} msg/s: {run.missing} of "
        f"{run.measured + run.missing:,} records missing from the output"
        for run in latency
        if run.missing
    ]
    return problems


def targets(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Compare the headline figures with the targets.

    A figure that the run did not measure, such as the latency without
    latency passes, has ``met`` None.
    """
    result = []
    for key, (operator, goal) in TARGETS.items():
        measured = float(document.get(key, math.nan))
        met: bool | None = None
        if not math.isnan(measured):
            met = measured >= goal if operator == ">=" else measured <= goal
        result.append(
            {
                "figure": key,
                "target": f"{operator} {goal:g}",
                "measured": measured,
                "met": met,
            }
        )
    return result


def machine(kafka_version: str) -> dict[str, Any]:
    """Describe the machine and the software versions."""
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        model = platform.processor()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "confluent_kafka": _client_version(),
        "librdkafka": confluent_kafka.libversion()[0],
        "kafka": kafka_version,
        "system": platform.platform(),
    }


def _client_version() -> str:
    # confluent_kafka.version() returns a string in 2.16 and a tuple before.
    version = confluent_kafka.version()
    return str(version[0] if isinstance(version, tuple) else version)


def throughput_table(document: dict[str, Any]) -> Table:
    """Tabulate messages per second, CPU per 1,000 messages and RSS of each mode."""
    table = Table(title="Throughput (median of rounds, min-max in brackets)")
    table.add_column("mode")
    table.add_column("msg/s", justify="right")
    table.add_column("vs raw", justify="right")
    table.add_column("CPU s / 1k msg", justify="left")
    table.add_column("steady / peak RSS MiB", justify="left")
    table.add_column("missing / dup / dead letters", justify="right")
    for name, mode in document["modes"].items():
        mps = mode["messages_per_second"]
        cpu = ", ".join(
            f"{SHORT.get(p, p)} {v['median']:.3f}"
            for p, v in mode["cpu_seconds_per_1k"].items()
        )
        steady = mode["steady_rss_mb"]
        rss = ", ".join(
            f"{SHORT.get(p, p)} {steady[p]:.0f}/{peak:.0f}"
            for p, peak in mode["peak_rss_mb"].items()
            if p != "broker"
        )
        table.add_row(
            name,
            f"{mps['median']:,.0f} [{mps['min']:,.0f}-{mps['max']:,.0f}]",
            "1.00" if name == "raw" else _ratio_median(document, name),
            cpu,
            rss,
            f"{mode['missing']} / {mode['duplicates']} / {mode['dead_lettered']}",
        )
    return table


def latency_table(document: dict[str, Any]) -> Table:
    """Tabulate the end-to-end latency of each pass."""
    table = Table(title="End-to-end latency at a fixed open-loop rate")
    for column in (
        "mode",
        "rate msg/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "missing",
    ):
        table.add_column(column, justify="right" if column != "mode" else "left")
    for run in document["latency"]:
        table.add_row(
            run["mode"] + (" (saturated)" if run.get("saturated") else ""),
            f"{run['rate']:,.0f}",
            f"{run['p50_ms']:.2f}",
            f"{run['p99_ms']:.2f}",
            f"{run['p999_ms']:.2f}",
            f"{run['max_ms']:.2f}",
            str(run["missing"]),
        )
    return table


def targets_table(document: dict[str, Any]) -> Table:
    """Tabulate each target, its measured value and whether it is met."""
    table = Table(title="Targets")
    for column in ("figure", "target", "measured", "met"):
        table.add_column(column)
    for target in document["targets"]:
        table.add_row(
            target["figure"],
            target["target"],
            _number(target["measured"], 2),
            "NO" if target["met"] is False else _met_text(target["met"]),
        )
    return table


def _latency_rows(latency: list[LatencyRun]) -> list[dict[str, Any]]:
    """Return the latency passes, each with what it adds over the raw relay."""
    raw = {run.rate: run for run in latency if run.mode == "raw"}
    rows = []
    for run in latency:
        row = asdict(run)
        baseline = raw.get(run.rate)
        row["added_p50_ms"] = _difference(run, baseline, "p50_ms")
        row["added_p99_ms"] = _difference(run, baseline, "p99_ms")
        rows.append(row)
    return rows


def _find(runs: list[LatencyRun], mode: str) -> LatencyRun | None:
    return next((run for run in runs if run.mode == mode), None)


def _difference(a: LatencyRun | None, b: LatencyRun | None, attribute: str) -> float:
    if a is None or b is None:
        return math.nan
    return float(getattr(a, attribute) - getattr(b, attribute))


def _max_over_modes(modes: dict[str, Any], key: str, service: str) -> float:
    values = [mode[key][service] for mode in modes.values() if service in mode[key]]
    return max(values, default=math.nan)


RESULTS_START = "<!-- bench-results:start -->"
RESULTS_END = "<!-- bench-results:end -->"


def markdown(document: dict[str, Any]) -> str:
    """Render the results as Markdown: setup, throughput, CPU, memory, latency."""
    lines = _markdown_setup(document)
    lines += _markdown_throughput(document)
    lines += _markdown_memory(document)
    if document["latency"]:
        lines += _markdown_latency(document)
    lines += _markdown_targets(document)
    return "\n".join(lines) + "\n"


def _markdown_setup(document: dict[str, Any]) -> list[str]:
    machine_info = document["machine"]
    settings = document["settings"]
    return [
        f"Measured {document['measured_at']} with `{document['command']}`: "
        f"{settings['messages']:,} records per mode, {settings['rounds']} "
        f"interleaved rounds, {settings['partitions']} partitions per topic.",
        "",
        f"Machine: {machine_info['cpus']} CPUs ({machine_info['cpu_model']}), "
        f"{machine_info['memory_gib']} GiB, Python {machine_info['python']}, "
        f"confluent-kafka {machine_info['confluent_kafka']} (librdkafka "
        f"{machine_info['librdkafka']}), Apache Kafka {machine_info['kafka']} on "
        "the same machine.",
        "",
    ]


def _markdown_throughput(document: dict[str, Any]) -> list[str]:
    lines = [
        "| mode | msg/s, median [min-max] | vs raw relay | missing | duplicates | "
        "dead letters |",
        "|---|---|---|---|---|---|",
    ]
    for name, mode in document["modes"].items():
        mps = mode["messages_per_second"]
        ratio = "1" if name == "raw" else _ratio_text(document, name)
        lines.append(
            f"| {name}: {mode['title']} | {mps['median']:,.0f} "
            f"[{mps['min']:,.0f}-{mps['max']:,.0f}] | {ratio} | {mode['missing']} | "
            f"{mode['duplicates']} | {mode['dead_lettered']} |"
        )
    lines += [
        "",
        "CPU seconds per 1,000 messages (median over rounds):",
        "",
        "| mode | " + " | ".join(PROCESS_COLUMNS) + " |",
        "|---|" + "---|" * len(PROCESS_COLUMNS),
    ]
    for name, mode in document["modes"].items():
        cells = [
            _number(mode["cpu_seconds_per_1k"].get(p, {}).get("median"), 3)
            for p in PROCESS_COLUMNS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _markdown_memory(document: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Resident memory per service, MiB (idle: started, no traffic; steady: "
        "median during a throughput run, the largest over modes; peak: largest "
        "sample):",
        "",
        "| service | idle | steady | peak |",
        "|---|---|---|---|",
    ]
    for service, rss in document["rss_mb"].items():
        lines.append(
            f"| {service} | {_number(rss['idle'], 0)} | {_number(rss['steady'], 0)} | "
            f"{_number(rss['peak'], 0)} |"
        )
    return lines


def _markdown_latency(document: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "End-to-end latency at a fixed open-loop rate (from each record's "
        "scheduled send time to its arrival on the output topic):",
        "",
        "| mode | rate, msg/s | p50 ms | p99 ms | p99.9 ms | max ms | "
        "added p50 / p99 ms | missing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in document["latency"]:
        saturated = " (saturated)" if run.get("saturated") else ""
        lines.append(
            f"| {run['mode']}{saturated} | {run['rate']:,.0f} | {run['p50_ms']:.2f} | "
            f"{run['p99_ms']:.2f} | {run['p999_ms']:.2f} | {run['max_ms']:.2f} | "
            f"{_added(run)} | {run['missing']} |"
        )
    return lines


def _markdown_targets(document: dict[str, Any]) -> list[str]:
    lines = ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for target in document["targets"]:
        lines.append(
            f"| `{target['figure']}` | {target['target']} | "
            f"{_number(target['measured'], 2)} | {_met_text(target['met'])} |"
        )
    return lines


PROCESS_COLUMNS = ("relay", "input_reader", "model_app", "output_writer", "broker")


def update_docs(path: Any, document: dict[str, Any]) -> None:
    """Replace the results block of a Markdown page with `document`'s results."""
    text = path.read_text()
    start = text.index(RESULTS_START) + len(RESULTS_START)
    end = text.index(RESULTS_END)
    path.write_text(text[:start] + "\n" + markdown(document) + text[end:])


def _ratio_text(document: dict[str, Any], mode: str) -> str:
    spread_of = document["ratio_spread"].get(mode)
    if spread_of is None:
        raw = document["raw_relay_mps"]
        median = document["modes"][mode]["messages_per_second"]["median"]
        return f"{median / raw:.3f}" if raw else "-"
    return f"{spread_of['median']:.3f} [{spread_of['min']:.3f}-{spread_of['max']:.3f}]"


def _ratio_median(document: dict[str, Any], mode: str) -> str:
    """Format the median of a mode's per-round ratios to the raw relay."""
    median = document["ratio_spread"].get(mode, {}).get("median", math.nan)
    return _number(median, 2)


def _met_text(met: bool | None) -> str:
    if met is None:
        return "not measured"
    return "yes" if met else "no"


def _added(run: dict[str, Any]) -> str:
    if run["mode"] == "raw":
        return "-"
    return f"{_number(run['added_p50_ms'], 2)} / {_number(run['added_p99_ms'], 2)}"


def _number(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"
