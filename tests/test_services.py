"""The service entry points as processes: start-up errors and readiness."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agogosml_cli.local import free_port, writer_process

REPO_ROOT = Path(__file__).parents[1]


def start_service(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("READER_", "WRITER_", "KAFKA_", "APP_"))
    }
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


def test_reader_reads_stdin_lines_as_they_arrive(tmp_path: Path) -> None:
    dead_letter = tmp_path / "dlq.jsonl"
    env = {
        "READER_INPUT": "-",
        "READER_APP_URL": f"http://127.0.0.1:{free_port()}",
        "READER_APP_READY_PATH": "",
        "READER_PORT": "0",
        "READER_DEAD_LETTER": str(dead_letter),
        "READER_RETRY_MAX_ATTEMPTS": "1",
        "READER_STOP_AT_END": "true",
    }
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("READER_", "WRITER_", "KAFKA_", "APP_"))
    }
    reader = subprocess.Popen(
        [sys.executable, "-m", "agogosml.reader"],
        env={**clean, "PYTHONPATH": str(REPO_ROOT), **env},
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert reader.stdin is not None

    reader.stdin.write(b'{"n": 1}\n')
    reader.stdin.flush()
    deadline = time.monotonic() + 20
    while not dead_letter.exists() or not dead_letter.read_bytes():
        assert time.monotonic() < deadline, "the first line was not processed alone"
        time.sleep(0.1)
    reader.stdin.write(b'{"n": 2}\n{"n": 3}')
    reader.stdin.close()
    exit_code = reader.wait(30)

    assert exit_code == 0
    assert len(dead_letter.read_bytes().splitlines()) == 3
