"""Start the pipeline services as local processes on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import orjson

from agogosml.errors import AgogosmlError

#: Number of lines of a failed service's log that `ServiceExitError` quotes.
EXIT_LOG_LINES = 10
#: Logger and text of a service's warning about a likely misspelled variable.
_SETTINGS_LOGGER = "agogosml.config"
_MISSPELLED_TEXT = " is not a setting and is ignored; "
#: Seconds after SIGTERM before `ServiceProcess.stop` kills a process.
STOP_TIMEOUT_SECONDS = 30.0
#: Seconds after SIGTERM before `ServiceProcess.stop` calls its `on_slow`.
SLOW_STOP_SECONDS = 3.0


class ServiceStartError(AgogosmlError):
    """A service process exited or did not become ready in time."""


class ServiceExitError(AgogosmlError):
    """A service process exited while the others still needed it.

    Attributes:
        service: name of the service, such as "output writer".
        returncode: exit code, or the negative signal number that ended it.
        log_path: file of the service's stdout and stderr.
    """

    def __init__(self, service: ServiceProcess, during: str) -> None:
        self.service = service.name
        self.returncode = service.returncode
        self.log_path = service.log_path
        # A failed service, such as one with an invalid setting, names the
        # cause in the last lines of its log.
        failed = (self.returncode or 0) > 0
        tail = service.log_tail(EXIT_LOG_LINES) if failed else ""
        super().__init__(
            f"{service.name} ({service.module}) {service.exit_description()} "
            f"{during}; its log is {service.log_path}" + (f":\n{tail}" if tail else "")
        )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# The services listen on loopback, which a proxy cannot reach, so readiness
# checks bypass the proxy in http_proxy. urllib would send even requests to
# 127.0.0.1 through it unless no_proxy lists that address.
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def signal_name(number: int) -> str:
    """Return the name of a signal, such as SIGKILL, or "signal N" for one without."""
    try:
        return signal.Signals(number).name
    except ValueError:
        # A real-time signal, which the signal module does not name.
        return f"signal {number}"


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
        directory: Path | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.env = env
        self.log_path = log_path
        self.port = port
        #: Working directory of the process; None means that of this process.
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the service's HTTP server."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        """Launch the process with the current environment plus `env`.

        The process gets its own process group, so Ctrl-C in a terminal reaches
        only the parent, which then stops the services in order.
        """
        environment = {**os.environ, **self.env}
        with self.log_path.open("ab") as log, _signals_deferred():
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env=environment,
                cwd=self.directory,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                process_group=0,
            )
        return self

    def wait_ready(
        self,
        timeout_seconds: float = 30.0,
        *,
        others: Iterable[ServiceProcess] = (),
    ) -> None:
        """Wait until GET /readyz returns 200.

        Raises:
            ServiceStartError: the process exited or was not ready in time.
            ServiceExitError: one of `others` exited in the meantime.
        """
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                tail = self.log_tail()
                hint = ""
                if self.returncode == 0 and not tail and self.name == "model app":
                    hint = (
                        ". It ended without an error and logged nothing, so its "
                        "module may start no server when run with python -m: "
                        'end it with if __name__ == "__main__": '
                        "ModelApp(score).run()"
                    )
                raise ServiceStartError(
                    f"{self.name} {self.exit_description()} while starting; its "
                    f"log is {self.log_path}" + (f":\n{tail}" if tail else "") + hint
                )
            check_running(others, f"while the {self.name} was starting")
            if self.is_ready():
                return
            time.sleep(0.1)
        tail = self.log_tail()
        raise ServiceStartError(
            f"{self.name} was not ready after {timeout_seconds:.0f} s; its log is "
            f"{self.log_path}" + (f":\n{tail}" if tail else ", and it is empty")
        )

    def is_ready(self) -> bool:
        """Return whether GET /readyz returns 200 now."""
        try:
            with _DIRECT_OPENER.open(self.url + "/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def running(self) -> bool:
        """Return whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit code, the negative signal number that ended the process, or None."""
        return None if self.process is None else self.process.poll()

    def exit_description(self) -> str:
        """Describe how the process ended: its exit code or the signal."""
        code = self.returncode
        if code is None:
            return "is running"
        if code >= 0:
            return f"exited with code {code}"
        return f"was killed by {signal_name(-code)}"

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

    def stop(
        self,
        timeout_seconds: float = STOP_TIMEOUT_SECONDS,
        *,
        on_slow: Callable[[ServiceProcess], None] | None = None,
    ) -> int | None:
        """SIGTERM the process, SIGKILL it after the timeout; return its exit code.

        `on_slow` is called once when the process still runs
        `SLOW_STOP_SECONDS` after the SIGTERM, so that the caller can say why
        it waits.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_seconds
            try:
                if on_slow is not None:
                    try:
                        self.process.wait(min(SLOW_STOP_SECONDS, timeout_seconds))
                    except subprocess.TimeoutExpired:
                        on_slow(self)
                self.process.wait(max(0.0, deadline - time.monotonic()))
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


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then deliver them.

    A KeyboardInterrupt raised inside ``Popen``, after the child started but
    before its process was stored, would leave a child that nothing stops.
    Python handlers, unlike ignored signals, do not pass to the child. Only
    the main thread can set handlers, so other threads run the block as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: object) -> None:
        received.append(signum)

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, hold) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        if received:
            os.kill(os.getpid(), received[0])


def check_running(services: Iterable[ServiceProcess], during: str) -> None:
    """Raise `ServiceExitError` for the first started service that has exited.

    `during` completes the message, such as "during the run".
    """
    for service in services:
        if service.process is not None and not service.running():
            raise ServiceExitError(service, during)


def misspelling_warnings(log_path: Path) -> list[str]:
    """Return the warnings about misspelled variables in a service's JSON log."""
    try:
        lines = log_path.read_bytes().splitlines()
    except OSError:
        return []
    warnings = []
    for line in lines:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            # Output of the app's own code, such as a print call.
            continue
        if not isinstance(record, dict) or record.get("logger") != _SETTINGS_LOGGER:
            continue
        message = str(record.get("message", ""))
        if _MISSPELLED_TEXT in message:
            warnings.append(message)
    return warnings


#: Variables that `agogosml run` sets for its services, overriding the
#: environment: those of the three process builders below and the reader's
#: of a run. READER_BATCH_MAX_MESSAGES and READER_ORDERING come from options
#: that validate their own values.
RUN_VARIABLES = frozenset(
    {
        "WRITER_SINK",
        "WRITER_OUTPUT",
        "WRITER_PORT",
        "APP_WRITER_URL",
        "APP_PORT",
        "READER_SOURCE",
        "READER_INPUT",
        "READER_APP_URL",
        "READER_PORT",
        "READER_BATCH_MAX_MESSAGES",
        "READER_ORDERING",
        "READER_STOP_AT_END",
        "READER_DEAD_LETTER",
        "READER_CHECKPOINT_PATH",
    }
)


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
    directory: Path | None = None,
    extra: dict[str, str] | None = None,
) -> ServiceProcess:
    """Return (not started) a model app that forwards to `writer_url`.

    The app runs as ``python -m module`` in `directory`, or in the current one.
    """
    port = free_port()
    env = {"APP_WRITER_URL": writer_url, "APP_PORT": str(port), **(extra or {})}
    return ServiceProcess(
        "model app",
        module,
        env,
        log_dir / "app.log",
        port=port,
        directory=directory,
    )


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
