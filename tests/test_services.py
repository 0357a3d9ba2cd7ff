"""The service entry points as processes: start-up errors and readiness."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agogosml_cli import local
from agogosml_cli.local import free_port, writer_process

REPO_ROOT = Path(__file__).parents[1]


def environment_without_settings() -> dict[str, str]:
    """Return this process's environment without any service setting."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("READER_", "WRITER_", "KAFKA_", "APP_"))
    }


def start_service(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = environment_without_settings()
    return subprocess.run(
        [sys.executable, "-m", module],
        env={**clean, "PYTHONPATH": str(REPO_ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("module", "env", "expected"),
    [
        ("agogosml.reader", {}, "READER_INPUT is missing"),
        (
            "agogosml.reader",
            {
                "READER_INPUT": "x",
                "READER_APP_URL": "http://127.0.0.1:1",
                "READER_ORDERING": "sideways",
            },
            "READER_ORDERING='sideways' is invalid",
        ),
        (
            "agogosml.writer",
            {"WRITER_OUTPUT": "x", "WRITER_PORT": "notaport"},
            "WRITER_PORT='notaport' is invalid",
        ),
        (
            "agogosml.writer",
            {
                "WRITER_OUTPUT": "t",
                "WRITER_SINK": "kafka",
                "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            },
            "KAFKA_SASL_MECHANISM",
        ),
    ],
)
def test_invalid_setting_stops_service(
    module: str, env: dict[str, str], expected: str
) -> None:
    result = start_service(module, env)

    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("module", "env", "expected"),
    [
        (
            "agogosml.reader",
            {
                "READER_INPUT": "{tmp}/missing.jsonl",
                "READER_APP_URL": "http://127.0.0.1:1",
            },
            "cannot open input file",
        ),
        (
            "agogosml.reader",
            {
                "READER_INPUT": "{tmp}",
                "READER_APP_URL": "http://127.0.0.1:1",
            },
            "is a directory; set READER_INPUT",
        ),
        (
            "agogosml.writer",
            {"WRITER_OUTPUT": "{tmp}/missing-dir/out.jsonl", "WRITER_PORT": "0"},
            "cannot open output file",
        ),
        (
            "agogosml.writer",
            {
                "WRITER_OUTPUT": "scores",
                "WRITER_SINK": "kafka",
                "WRITER_PORT": "0",
                "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
                "KAFKA_EXTRA_CONFIG": '{"bogus.property": 1}',
            },
            "cannot create Kafka producer",
        ),
    ],
)
def test_unusable_input_or_output_stops_service_with_2(
    tmp_path: Path, module: str, env: dict[str, str], expected: str
) -> None:
    filled = {
        name: value.replace("{tmp}", str(tmp_path)) for name, value in env.items()
    }

    result = start_service(module, filled)

    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_writer_on_busy_port_creates_no_output(tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"WRITER_OUTPUT": str(output), "WRITER_PORT": str(port)}

        result = start_service("agogosml.writer", env)

    assert result.returncode != 0
    assert "WRITER_PORT" in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists()


def http_status(url: str, body: bytes | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except urllib.error.URLError:
        return 0  # not listening yet


def test_writer_without_broker_is_not_ready(tmp_path: Path) -> None:
    unreachable = f"127.0.0.1:{free_port()}"
    writer = writer_process(
        tmp_path,
        sink="kafka",
        output="nowhere",
        extra={"KAFKA_BOOTSTRAP_SERVERS": unreachable, "PYTHONPATH": str(REPO_ROOT)},
    ).start()
    try:
        deadline = time.monotonic() + 30
        while http_status(writer.url + "/healthz") != 200:
            assert time.monotonic() < deadline, writer.log_tail()
            time.sleep(0.2)
        time.sleep(3)  # more than one statistics interval

        ready = http_status(writer.url + "/readyz")
        post = http_status(writer.url + "/", b'{"n": 1}')
        alive = writer.running()
    finally:
        writer.stop()

    assert ready == 503
    assert post == 503
    assert alive


def test_writer_with_stdin_closed_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WRITER_")},
        "PYTHONPATH": str(REPO_ROOT),
        "WRITER_OUTPUT": str(tmp_path / "out.jsonl"),
        "WRITER_PORT": str(port),
    }
    # The shell's "<&-" starts the service without descriptor 0.
    writer = subprocess.Popen(
        ["sh", "-c", 'exec "$0" -m agogosml.writer <&-', sys.executable],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while http_status(f"http://127.0.0.1:{port}/healthz") != 200:
            assert writer.poll() is None, writer.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        writer.send_signal(signal.SIGTERM)
        _, stderr = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()

    assert writer.returncode == 0, stderr
    assert b"Assertion" not in stderr


class _RejectingApp(http.server.BaseHTTPRequestHandler):
    """An app that rejects every message with 400, so each one is dead-lettered."""

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"error": "rejected"}'
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Keep the test output quiet."""


@contextlib.contextmanager
def rejecting_app() -> Iterator[str]:
    """Serve `_RejectingApp` on a loopback port and yield its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RejectingApp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_reader_reads_stdin_lines_as_they_arrive(tmp_path: Path) -> None:
    dead_letter = tmp_path / "dlq.jsonl"
    clean = environment_without_settings()
    with rejecting_app() as app_url:
        env = {
            "READER_INPUT": "-",
            "READER_APP_URL": app_url,
            "READER_APP_READY_PATH": "",
            "READER_PORT": "0",
            "READER_DEAD_LETTER": str(dead_letter),
            "READER_STOP_AT_END": "true",
        }
        reader = subprocess.Popen(
            [sys.executable, "-m", "agogosml.reader"],
            env={**clean, "PYTHONPATH": str(REPO_ROOT), **env},
            stdin=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert reader.stdin is not None
        try:
            reader.stdin.write(b'{"n": 1}\n')
            reader.stdin.flush()
            deadline = time.monotonic() + 20
            while not dead_letter.exists() or not dead_letter.read_bytes():
                assert time.monotonic() < deadline, (
                    "the first line was not processed alone"
                )
                time.sleep(0.1)
            reader.stdin.write(b'{"n": 2}\n{"n": 3}')
            reader.stdin.close()
            exit_code = reader.wait(30)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()

    assert exit_code == 0
    assert len(dead_letter.read_bytes().splitlines()) == 3


def start_writer(output: Path, timeout_ms: int) -> tuple[subprocess.Popen[bytes], int]:
    """Start a file-sink writer process and wait until it serves /healthz."""
    port = free_port()
    clean = environment_without_settings()
    env = {
        "WRITER_OUTPUT": str(output),
        "WRITER_PORT": str(port),
        "WRITER_SHUTDOWN_TIMEOUT_MS": str(timeout_ms),
    }
    writer = subprocess.Popen(
        [sys.executable, "-m", "agogosml.writer"],
        env={**clean, "PYTHONPATH": str(REPO_ROOT), **env},
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while http_status(f"http://127.0.0.1:{port}/healthz") != 200:
        assert writer.poll() is None, "the writer exited during start-up"
        assert time.monotonic() < deadline, "the writer did not start"
        time.sleep(0.1)
    return writer, port


def open_request(port: int, body_length: int, sent: bytes) -> socket.socket:
    """Send a POST / head announcing `body_length` bytes, then only `sent`."""
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (body_length, sent)
    )
    return connection


def stop_and_time(writer: subprocess.Popen[bytes]) -> float:
    """Send SIGTERM and return the seconds until the process exited."""
    started = time.monotonic()
    writer.send_signal(signal.SIGTERM)
    try:
        writer.wait(15)
    except subprocess.TimeoutExpired:
        writer.kill()
        writer.wait()
    return time.monotonic() - started


def wait_for_in_flight(port: int, count: int, timeout_seconds: float = 30) -> None:
    """Wait until the writer's in-flight gauge shows `count` records."""
    sample = f'agogosml_in_flight_messages{{service="output_writer"}} {count:.1f}'
    deadline = time.monotonic() + timeout_seconds
    while True:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            if sample in response.read().decode():
                return
        assert time.monotonic() < deadline, f"no {sample!r} in /metrics"
        time.sleep(0.05)


def test_writer_stops_with_fifo_unread(tmp_path: Path) -> None:
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    writer, port = start_writer(fifo, timeout_ms=1000)
    value = b'"' + b"x" * 200_000 + b'"'
    connections = [open_request(port, len(value), value) for _ in range(3)]
    # The pipe buffer fills and the write blocks with the three records.
    wait_for_in_flight(port, 3)

    elapsed = stop_and_time(writer)
    assert writer.stderr is not None
    log = writer.stderr.read().decode()
    writer.stderr.close()
    responses = [connection.recv(100) for connection in connections]
    for connection in connections:
        connection.close()

    assert elapsed < 4, log
    assert "records still in flight after 1.0 s" in log
    assert "the sink did not stop within" in log
    assert all(not response.startswith(b"HTTP/1.1 2") for response in responses)


def test_writer_stops_with_half_sent_body(tmp_path: Path) -> None:
    writer, port = start_writer(tmp_path / "out.jsonl", timeout_ms=1000)
    connection = open_request(port, 1000, b'{"half": "')
    time.sleep(0.2)

    elapsed = stop_and_time(writer)
    connection.close()
    assert writer.stderr is not None
    log = writer.stderr.read().decode()
    writer.stderr.close()

    assert elapsed < 4, log
    assert writer.returncode == 0
    assert (tmp_path / "out.jsonl").read_bytes() == b""


class _HoldingApp(http.server.BaseHTTPRequestHandler):
    """An app that accepts every message except the `held_numbers`.

    A held message gets no response until `release` is set, and then a 503. The
    numbers of the accepted messages collect in `accepted`.
    """

    held_numbers: frozenset[int] = frozenset()
    release = threading.Event()
    accepted: list[int] = []

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        number = json.loads(body)["n"]
        if number in self.held_numbers and not self.release.is_set():
            self.release.wait(60)
            with contextlib.suppress(OSError):  # the reader may be gone
                self.send_error(503)
            return
        self.accepted.append(number)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Keep the test output quiet."""


def lines(numbers: range) -> bytes:
    return b"".join(b'{"n": %d}\n' % number for number in numbers)


def test_reader_killed_after_rotation(tmp_path: Path) -> None:
    stack = contextlib.ExitStack()
    path = tmp_path / "in.jsonl"
    checkpoint = tmp_path / "in.offset"
    path.write_bytes(lines(range(1, 6)))
    _HoldingApp.held_numbers = frozenset({2})
    _HoldingApp.accepted = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HoldingApp)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    clean = environment_without_settings()
    env = {
        **clean,
        "PYTHONPATH": str(REPO_ROOT),
        "READER_INPUT": str(path),
        "READER_CHECKPOINT_PATH": str(checkpoint),
        "READER_ROTATE_WAIT_MS": "200",
        "READER_ORDERING": "unordered",
        "READER_APP_URL": f"http://127.0.0.1:{server.server_address[1]}",
        "READER_APP_READY_PATH": "",
        "READER_PORT": "0",
        "READER_DEAD_LETTER": str(tmp_path / "dlq.jsonl"),
    }

    def until(condition: Callable[[], bool], description: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, description
            time.sleep(0.05)

    log = stack.enter_context((tmp_path / "reader.log").open("ab"))

    def start_reader() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "agogosml.reader"], env=env, stderr=log
        )

    reader = start_reader()
    try:
        until(lambda: sorted(_HoldingApp.accepted) == [1, 3, 4, 5], "first file")
        # Log rotation while message 2 is in flight: the file is renamed, and a
        # new one takes its path.
        path.rename(tmp_path / "in.jsonl.1")
        path.write_bytes(lines(range(6, 9)))
        until(lambda: len(_HoldingApp.accepted) == 7, "new file")
        time.sleep(1.5)  # longer than the file source's checkpoint interval
        reader.kill()
        reader.wait()
        _HoldingApp.release.set()

        reader = start_reader()
        until(lambda: 2 in _HoldingApp.accepted, "message 2 after the restart")
        until(lambda: len(_HoldingApp.accepted) >= 14, "both files again")
    finally:
        reader.kill()
        reader.wait()
        server.shutdown()
        server.server_close()
        stack.close()

    # Each message was accepted, 2 once and the others at least once: the
    # restart read the rotated file on from message 2, then the new file.
    assert set(_HoldingApp.accepted) == set(range(1, 9))
    assert _HoldingApp.accepted.count(2) == 1


def test_app_stops_while_plain_score_blocks(tmp_path: Path) -> None:
    """SIGTERM ends the app even while its scoring thread never returns."""
    started = tmp_path / "started"
    port = free_port()
    env = {
        **environment_without_settings(),
        "PYTHONPATH": str(REPO_ROOT),
        "APP_PORT": str(port),
        "APP_WRITER_URL": "http://127.0.0.1:9",
        "APP_SHUTDOWN_TIMEOUT_MS": "500",
        "BLOCKING_STARTED": str(started),
    }
    app = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "apps" / "blocking_app.py")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        request = threading.Thread(
            target=lambda: _post_until_up(f"http://127.0.0.1:{port}/", deadline),
            daemon=True,
        )
        request.start()
        while not started.exists():
            assert time.monotonic() < deadline, "the scoring call did not start"
            assert app.poll() is None, app.communicate()[1]
            time.sleep(0.05)

        app.send_signal(signal.SIGTERM)
        _, stderr = app.communicate(timeout=20)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()

    assert app.returncode == 0, stderr
    assert "the scoring function was still running at the stop" in stderr


def _post_until_up(url: str, deadline: float) -> None:
    """POST one JSON value to `url`, trying again until the server listens."""
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            url, data=b"1", headers={"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(request, timeout=60)
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                time.sleep(0.05)
                continue
            return
        except OSError:
            return
        return


def scrape_when_serving(module: str, env: dict[str, str], port: int) -> str:
    """Start a service process, return its first /metrics text, and stop it."""
    clean = environment_without_settings()
    service = subprocess.Popen(
        [sys.executable, "-m", module],
        env={
            **clean,
            "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests' / 'apps'}",
            **env,
        },
        stderr=subprocess.DEVNULL,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 30
        while True:
            assert service.poll() is None, f"{module} exited during start-up"
            assert time.monotonic() < deadline, f"{module} did not serve /metrics"
            try:
                url = f"http://127.0.0.1:{port}/metrics"
                with opener.open(url, timeout=10) as response:
                    return response.read().decode()
            except urllib.error.URLError:
                time.sleep(0.1)
    finally:
        service.terminate()
        service.wait(15)


def test_service_metrics_at_start(tmp_path: Path) -> None:
    """Check that counters start at 0 and that readiness is a metric."""
    (tmp_path / "in.jsonl").write_bytes(b"")
    unreachable = f"http://127.0.0.1:{free_port()}"
    ports = [free_port() for _ in range(3)]

    reader = scrape_when_serving(
        "agogosml.reader",
        {
            "READER_INPUT": str(tmp_path / "in.jsonl"),
            "READER_APP_URL": unreachable,
            "READER_PORT": str(ports[0]),
        },
        ports[0],
    )
    writer = scrape_when_serving(
        "agogosml.writer",
        {"WRITER_OUTPUT": str(tmp_path / "out.jsonl"), "WRITER_PORT": str(ports[1])},
        ports[1],
    )
    app = scrape_when_serving(
        "fault_app",
        {"APP_WRITER_URL": unreachable, "APP_PORT": str(ports[2])},
        ports[2],
    )

    reader_samples = [
        'agogosml_retries_total{service="input_reader"} 0.0',
        'agogosml_sink_errors_total{service="input_reader"} 0.0',
    ] + [
        f'agogosml_dead_lettered_total{{reason="{reason}",service="input_reader"}} 0.0'
        for reason in (
            "rejected",
            "retries_exhausted",
            "transform_failed",
            "reader_error",
            "unreadable",
        )
    ]
    for sample in reader_samples:
        assert sample in reader
    assert 'agogosml_sink_errors_total{service="output_writer"} 0.0' in writer
    assert 'agogosml_messages_out_total{service="output_writer"} 0.0' in writer
    for outcome in ("scored", "invalid", "failed"):
        sample = (
            f'agogosml_scored_values_total{{outcome="{outcome}",service="app"}} 0.0'
        )
        assert sample in app
    # The reader's app and the app's writer are unreachable.
    assert 'agogosml_ready{service="input_reader"} 0.0' in reader
    assert 'agogosml_ready{service="app"} 0.0' in app
    assert 'agogosml_ready{service="output_writer"} 1.0' in writer
    # No creation timestamps, which would double the series.
    for scraped in (reader, writer, app):
        assert "_created" not in scraped


def test_services_serve_with_start_up_objects_frozen() -> None:
    """Objects alive when serving starts are out of the collector's full passes."""
    script = """
import gc
from pydantic_settings import BaseSettings
from agogosml.runtime import run_service

class Settings(BaseSettings):
    pass

async def serve(settings):
    print(gc.get_freeze_count() > 1000)

run_service(Settings, serve, "probe")
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**environment_without_settings(), "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.split() == ["True"]


class _ReadyService(http.server.BaseHTTPRequestHandler):
    """A service whose GET /readyz returns 200."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(200 if self.path == "/readyz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_readiness_check_ignores_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The proxy port has no listener, so a check through it would fail.
    proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ReadyService)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    service = writer_process(tmp_path, sink="file", output="out.jsonl")
    service.port = server.server_address[1]

    try:
        ready = service.is_ready()
    finally:
        server.shutdown()
        server.server_close()

    assert ready


def test_slow_stop_reported_then_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "SLOW_STOP_SECONDS", 0.2)
    ignores_sigterm = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    service = writer_process(tmp_path, sink="file", output="out.jsonl")
    service.process = subprocess.Popen(
        [sys.executable, "-c", ignores_sigterm], stdout=subprocess.PIPE
    )
    assert service.process.stdout is not None
    with service.process.stdout:
        service.process.stdout.readline()
    slow: list[local.ServiceProcess] = []

    returncode = service.stop(2.0, on_slow=slow.append)

    assert slow == [service]
    assert returncode == -signal.SIGKILL
