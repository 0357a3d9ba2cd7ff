"""The services without the optional extras, and the messages that name a missing one.

agogosml installs only what the reader, the writer and `ModelApp` need; the
``cli``, ``eventhubs`` and ``sample`` extras add the rest. Each test runs
processes that cannot import the packages of the extras.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from agogosml_cli.local import free_port

REPO_ROOT = Path(__file__).parents[1]

#: Top-level modules of the packages that only the extras install.
EXTRA_MODULES = (
    "azure",
    "click",
    "copier",
    "docker",
    "joblib",
    "packaging",
    "pandas",
    "rich",
    "sklearn",
    "yaml",
)

BLOCKER = f"""
import importlib.abc
import sys

BLOCKED = {set(EXTRA_MODULES)!r}


class BlockExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, BlockExtras())
"""

ECHO_APP = """
from agogosml.app import ModelApp

ModelApp(lambda values: [{"echo": value} for value in values]).run()
"""


def without_extras(tmp_path: Path, code: str) -> list[str]:
    """Return the command that runs `code` in a process without the extras."""
    (tmp_path / "block_extras.py").write_text(BLOCKER)
    return [sys.executable, "-c", f"import block_extras\n{code}"]


def environment(tmp_path: Path, **settings: str) -> dict[str, str]:
    kept = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("READER_", "WRITER_", "KAFKA_", "APP_", "EVENTHUB_"))
    }
    return {**kept, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}", **settings}


def run_module(module: str) -> str:
    return f"import runpy\nrunpy.run_module({module!r}, run_name='__main__')"


def test_pipeline_runs_without_extras(tmp_path: Path) -> None:
    lines = [orjson.dumps({"n": n}) for n in range(20)]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "echo_app.py").write_text(ECHO_APP)
    app_port, writer_port = free_port(), free_port()
    services = [
        subprocess.Popen(
            without_extras(tmp_path, run_module("agogosml.writer")),
            env=environment(
                tmp_path,
                WRITER_OUTPUT=str(tmp_path / "out.jsonl"),
                WRITER_PORT=str(writer_port),
            ),
            stderr=subprocess.PIPE,
        ),
        subprocess.Popen(
            without_extras(tmp_path, run_module("echo_app")),
            env=environment(
                tmp_path,
                APP_PORT=str(app_port),
                APP_WRITER_URL=f"http://127.0.0.1:{writer_port}",
            ),
            stderr=subprocess.PIPE,
        ),
    ]
    try:
        reader = subprocess.run(
            without_extras(tmp_path, run_module("agogosml.reader")),
            env=environment(
                tmp_path,
                READER_INPUT=str(tmp_path / "in.jsonl"),
                READER_APP_URL=f"http://127.0.0.1:{app_port}",
                READER_PORT=str(free_port()),
                READER_STOP_AT_END="true",
                READER_BATCH_MAX_MESSAGES="5",
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        for service in services:
            service.terminate()
        for service in services:
            service.communicate(timeout=30)

    assert reader.returncode == 0, reader.stderr
    written = (tmp_path / "out.jsonl").read_bytes().splitlines()
    values = sorted(orjson.loads(line)["value"]["echo"]["n"] for line in written)
    assert values == list(range(20))


def test_agogosml_command_names_cli_extra(tmp_path: Path) -> None:
    command = without_extras(
        tmp_path, "from agogosml_cli.entry import main\nmain()"
    ) + ["--help"]

    result = subprocess.run(
        command,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"python -m pip install -e '{REPO_ROOT}[cli]'" in result.stderr


def test_eventhubs_sink_names_eventhubs_extra(tmp_path: Path) -> None:
    result = subprocess.run(
        without_extras(tmp_path, run_module("agogosml.writer")),
        env=environment(
            tmp_path,
            WRITER_SINK="eventhubs",
            WRITER_OUTPUT="scores",
            WRITER_PORT="0",
            EVENTHUB_FULLY_QUALIFIED_NAMESPACE="ns.servicebus.windows.net",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"python -m pip install -e '{REPO_ROOT}[eventhubs]'" in result.stderr


def test_sample_commands_name_sample_extra(tmp_path: Path) -> None:
    # A package set to None in sys.modules is missing both to an import and to
    # importlib.util.find_spec, which the check uses.
    hide = "import sys\nsys.modules.update(dict.fromkeys(['joblib', 'numpy']))\n"
    for module, program in (
        ("sample_app.train", "python -m sample_app.train"),
        ("sample_app.app", "sample app"),
    ):
        result = subprocess.run(
            [sys.executable, "-c", hide + run_module(module)],
            env=environment(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        needs = f"{program}: the sample app needs joblib, numpy"
        assert result.stderr.startswith(needs)
        assert f"python -m pip install -e '{REPO_ROOT}[sample]'" in result.stderr
