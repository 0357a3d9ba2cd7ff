"""Start what carries records from the input topic to the output topic.

A mode is either the raw relay (one process) or an agogosml pipeline (input
reader, model app and output writer as separate processes on loopback).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agogosml_cli.local import (
    ServiceProcess,
    ServiceStartError,
    app_process,
    reader_process,
    writer_process,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mode:
    """One way of moving records from the input topic to the output topic.

    Args:
        name: Short name used in tables and in bench-results.json.
        title: What the mode is, for the table.
        app_module: Module of the model app; None for the raw relay.
        reader_env: READER_ settings on top of the common ones.
        writer_env: Settings of the output writer on top of the common ones.
    """

    name: str
    title: str
    app_module: str | None = None
    reader_env: dict[str, str] = field(default_factory=dict)
    writer_env: dict[str, str] = field(default_factory=dict)

    @property
    def is_relay(self) -> bool:
        """Whether this mode is the raw relay."""
        return self.app_module is None


#: The records are keyed by transaction id, and every mode orders by key, the
#: order that Kafka keeps for keyed records. One message per request is bound by
#: the round trip of each request, so the single-message modes keep 64 requests
#: open. The batched mode keeps 32 batches in flight: with the default
#: per-partition order, one batch per partition, it moved about a fifth less.
SINGLE = {
    "READER_ORDERING": "key",
    "READER_CONCURRENCY": "64",
    "READER_MAX_IN_FLIGHT": "2000",
    "READER_BATCH_MAX_MESSAGES": "1",
}
BATCHED = {
    "READER_ORDERING": "key",
    "READER_CONCURRENCY": "32",
    "READER_MAX_IN_FLIGHT": "4000",
    "READER_BATCH_MAX_MESSAGES": "100",
    "READER_BATCH_MAX_WAIT_MS": "10",
}
#: The batched mode is the throughput configuration: like the batches, a linger
#: of 5 ms (librdkafka's own default) trades latency for fewer, larger produce
#: requests, which cost the broker and the writer less per record.
BATCHED_WRITER = {"KAFKA_LINGER_MS": "5"}

MODES = {
    mode.name: mode
    for mode in (
        Mode("raw", "raw relay: confluent-kafka consume -> produce"),
        Mode(
            "single",
            "pipeline, one message per request",
            app_module="sample_app.app",
            reader_env=SINGLE,
        ),
        Mode(
            "batch",
            "pipeline, batches of up to 100 messages or 10 ms",
            app_module="sample_app.app",
            reader_env=BATCHED,
            writer_env=BATCHED_WRITER,
        ),
        Mode(
            "echo",
            "pipeline, one message per request, no-op echo app",
            app_module="benchmarks.echo_app",
            reader_env=SINGLE,
        ),
    )
}


#: Called with a process's name and id as soon as it is launched.
OnLaunch = Callable[[str, int], None]

#: Names of the pipeline's processes, in launch order.
SERVICE_NAMES = ("output_writer", "model_app", "input_reader")


def _ignore(name: str, pid: int) -> None:
    del name, pid


class Relay:
    """The raw relay as a child process."""

    name = "relay"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(
        self,
        bootstrap: str,
        input_topic: str,
        output_topic: str,
        dead_letter: str,
        on_launch: OnLaunch = _ignore,
    ) -> None:
        """Launch the relay with a fresh consumer group; it has no dead letters."""
        del dead_letter
        group = f"bench-relay-{uuid.uuid4().hex[:8]}"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.relay",
                    bootstrap,
                    input_topic,
                    output_topic,
                    group,
                ],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        on_launch("relay", self.process.pid)

    def check_alive(self) -> None:
        """Raise if the relay exited."""
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
            raise ServiceStartError(
                f"the relay exited with code {self.process.returncode}:\n"
                + "\n".join(tail)
            )

    def stop(self) -> None:
        """Stop the relay and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def pids(self) -> dict[str, int]:
        """Process id of the relay, by name."""
        assert self.process is not None
        return {"relay": self.process.pid}


class Pipeline:
    """Output writer, model app and input reader as child processes."""

    def __init__(self, mode: Mode, work_dir: Path) -> None:
        self.mode = mode
        self.work_dir = work_dir
        self.services: list[ServiceProcess] = []

    def start(
        self,
        bootstrap: str,
        input_topic: str,
        output_topic: str,
        dead_letter: str,
        on_launch: OnLaunch = _ignore,
    ) -> None:
        """Launch the three services and wait until each is ready."""
        assert self.mode.app_module is not None
        common = {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "PYTHONPATH": _python_path(),
        }
        writer = writer_process(
            self.work_dir,
            sink="kafka",
            output=output_topic,
            extra={**common, **self.mode.writer_env},
        )
        app = app_process(
            self.work_dir, writer.url, module=self.mode.app_module, extra=common
        )
        reader = reader_process(
            self.work_dir,
            app.url,
            source="kafka",
            input_=input_topic,
            extra={
                **common,
                "KAFKA_GROUP_ID": f"bench-reader-{uuid.uuid4().hex[:8]}",
                "READER_DEAD_LETTER": dead_letter,
                **self.mode.reader_env,
            },
        )
        self.services = [writer, app, reader]
        for name, service in zip(SERVICE_NAMES, self.services, strict=True):
            service.start()
            assert service.process is not None
            on_launch(name, service.process.pid)
            service.wait_ready(60)

    def check_alive(self) -> None:
        """Raise if a service exited."""
        for service in self.services:
            if not service.running():
                raise ServiceStartError(
                    f"{service.name} exited during the benchmark:\n{service.log_tail()}"
                )

    def stop(self) -> None:
        """Stop reader, app and writer, in that order."""
        for service in reversed(self.services):
            service.stop()

    def pids(self) -> dict[str, int]:
        """Process id of each service, by name."""
        result = {}
        for name, service in zip(SERVICE_NAMES, self.services, strict=True):
            assert service.process is not None
            result[name] = service.process.pid
        return result


def _python_path() -> str:
    existing = os.environ.get("PYTHONPATH")
    return f"{REPO_ROOT}:{existing}" if existing else str(REPO_ROOT)
