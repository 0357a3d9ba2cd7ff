"""Start the pipeline services as local processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from agogosml.errors import AgogosmlError


class ServiceStartError(AgogosmlError):
    """A service process exited or did not become ready in time."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServiceProcess:
    """One service (reader, app or writer) running as a child process.

    Its stderr (JSON logs) goes to `log_path`, so a failure can show the tail.
    """

    def __init__(
        self,
        name: str,
        module: str,
        env: dict[str, str],
        log_path: Path,
        *,
        port: int,
    ) -> None:
        self.name = name
        self.module = module
        self.env = env
        self.log_path = log_path
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the service's HTTP server."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        """Launch the process with the current environment plus `env`."""
        environment = {**os.environ, **self.env}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env=environment,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        return self

    def wait_ready(self, timeout_seconds: float = 30.0) -> None:
        """Wait until GET /readyz returns 200, or raise `ServiceStartError`."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServiceStartError(
                    f"{self.name} exited with code {self.process.returncode} while "
                    f"starting:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.1)
        raise ServiceStartError(
            f"{self.name} was not ready after {timeout_seconds:.0f} s:\n"
            f"{self.log_tail()}"
        )

    def is_ready(self) -> bool:
        """Return whether GET /readyz returns 200 now."""
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def running(self) -> bool:
        """Return whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        """Send `signum` to the process, if it runs."""
        if self.running():
            assert self.process is not None
            self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout_seconds: float = 30.0) -> int | None:
        """SIGTERM the process, SIGKILL it after the timeout; return its exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def wait(self, timeout_seconds: float | None = None) -> int:
        """Wait for the process to exit and return its exit code."""
        assert self.process is not None
        return self.process.wait(timeout_seconds)

    def log_tail(self, lines: int = 40) -> str:
        """Return the last `lines` lines of the service log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def writer_process(
    log_dir: Path, *, sink: str, output: str, extra: dict[str, str] | None = None
) -> ServiceProcess:
    """Return (not started) an output writer writing to `output`."""
    port = free_port()
    env = {
        "WRITER_SINK": sink,
        "WRITER_OUTPUT": output,
        "WRITER_PORT": str(port),
        **(extra or {}),
    }
    return ServiceProcess(
        "output writer", "agogosml.writer", env, log_dir / "writer.log", port=port
    )


def app_process(
    log_dir: Path,
    writer_url: str,
    *,
    module: str = "sample_app.app",
    extra: dict[str, str] | None = None,
) -> ServiceProcess:
    """Return (not started) a model app that forwards to `writer_url`."""
    port = free_port()
    env = {"APP_WRITER_URL": writer_url, "APP_PORT": str(port), **(extra or {})}
    return ServiceProcess("model app", module, env, log_dir / "app.log", port=port)


def reader_process(
    log_dir: Path,
    app_url: str,
    *,
    source: str,
    input_: str,
    extra: dict[str, str] | None = None,
) -> ServiceProcess:
    """Return (not started) an input reader that posts to `app_url`."""
    port = free_port()
    env = {
        "READER_SOURCE": source,
        "READER_INPUT": input_,
        "READER_APP_URL": app_url,
        "READER_PORT": str(port),
        **(extra or {}),
    }
    return ServiceProcess(
        "input reader", "agogosml.reader", env, log_dir / "reader.log", port=port
    )
