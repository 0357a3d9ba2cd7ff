"""`agogosml run --app` and `--input`: the user's app on the user's records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from agogosml_cli.local import misspelling_warnings
from agogosml_cli.main import cli
from sample_app.data import FEATURE_COLUMNS

REPO_ROOT = Path(__file__).parents[1]

#: The fix that a JSON error gives for a word outside quotes.
QUOTE_HINT = 'text must be a JSON string in double quotes, such as "text"'
#: A model app that doubles integers and rejects any other value.
DOUBLING_APP = """\
from agogosml.app import InvalidRecord, ModelApp


def score(values):
    return [
        value * 2 if isinstance(value, int) else InvalidRecord("not an integer")
        for value in values
    ]


if __name__ == "__main__":
    ModelApp(score, name="doubling app").run()
"""

#: Input of the doubling app: equal values, blank lines, values it rejects.
INPUT_LINES = ["1", "2", "", "2", '"text"', "  3  ", "[1]", "1"]
VALUES = [1, 2, 2, 3, 1]
REJECTED = ["text", [1]]

FRAUD_FIELDS = ("flagged_as_fraud", "labelled_fraud", "flagged_labelled_fraud")

MANIFEST = """\
version: 1
name: doubling-scores
source: {type: file, path: in.jsonl}
sink: {type: file, path: out.jsonl}
registry: localhost:5000
kubernetes: {namespace: ml}
"""


def run_cli(
    *arguments: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agogosml_cli.main", "run", *arguments],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def invoke(*arguments: str) -> Any:
    return CliRunner().invoke(cli, ["run", *arguments])


def flat(text: str) -> str:
    return " ".join(text.split())


def write_app(directory: Path, module: str = "doubling_app") -> None:
    path = directory / (module.replace(".", "/") + ".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DOUBLING_APP)


def write_input(path: Path, lines: list[str] = INPUT_LINES) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def output_values(work: Path, name: str) -> list[Any]:
    lines = (work / name).read_bytes().splitlines()
    return [orjson.loads(line)["value"] for line in lines]


def check_doubling_summary(summary: dict[str, Any]) -> None:
    assert summary["app"] == "doubling_app"
    assert summary["input_records"] == 7
    assert summary["read"] == 7
    assert summary["written"] == 5
    assert summary["dead_lettered"] == 2
    assert summary["duplicates"] == 0
    assert summary["missing"] == 0
    assert summary["dead_letter_reasons"] == [{"reason": "not an integer", "count": 2}]
    # The blank third line of INPUT_LINES counts: the file's lines 5 and 7.
    assert summary["dead_lettered_lines"] == [5, 7]
    for name in FRAUD_FIELDS:
        assert name not in summary


@pytest.mark.slow
def test_app_runs_on_input_file(tmp_path: Path) -> None:
    write_app(tmp_path)
    write_input(tmp_path / "values.jsonl")
    work = tmp_path / "work"

    result = run_cli(
        "--app", "doubling_app",
        "--input", "values.jsonl",
        "--summary-json", "summary.json",
        "--work-dir", str(work),
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    check_doubling_summary(orjson.loads((tmp_path / "summary.json").read_bytes()))
    assert "App: python -m doubling_app" in result.stderr
    assert "python -m doubling_app" in result.stdout
    assert "2 records: not an integer" in flat(result.stdout)
    assert "fraud" not in result.stdout
    assert sorted(output_values(work, "output.jsonl")) == sorted(
        value * 2 for value in VALUES
    )
    assert output_values(work, "dead-letter.jsonl") == REJECTED


@pytest.mark.slow
@pytest.mark.kafka
def test_app_runs_through_kafka(tmp_path: Path, kafka_bootstrap: str) -> None:
    write_app(tmp_path)
    write_input(tmp_path / "values.jsonl")

    result = run_cli(
        "--kafka", kafka_bootstrap,
        "--app", "doubling_app",
        "--input", "values.jsonl",
        "--summary-json", "summary.json",
        "--work-dir", str(tmp_path / "work"),
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert summary["transport"] == "kafka"
    check_doubling_summary(summary)


@pytest.mark.slow
def test_app_module_that_serves_nothing_gets_hint(tmp_path: Path) -> None:
    (tmp_path / "quiet_app.py").write_text("def score(values):\n    return values\n")
    write_input(tmp_path / "values.jsonl")

    result = run_cli(
        "--app", "quiet_app",
        "--input", str(tmp_path / "values.jsonl"),
        "--work-dir", str(tmp_path / "work"),
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1
    assert "model app exited with code 0 while starting" in flat(result.stderr)
    assert 'end it with if __name__ == "__main__": ModelApp(score).run()' in flat(
        result.stderr
    )


#: A model app with a setting of its own, FACTOR_VALUE.
FACTOR_APP = """\
from pydantic_settings import BaseSettings, SettingsConfigDict

from agogosml.app import ModelApp


class FactorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACTOR_")

    value: int = 2


def score(values):
    return values


if __name__ == "__main__":
    ModelApp(score, extra_settings=[FactorSettings]).run()
"""


def test_misspelling_warnings_from_log(tmp_path: Path) -> None:
    typo = "FACTOR_VALEU is not a setting and is ignored; did you mean FACTOR_VALUE?"
    records = [
        {"level": "WARNING", "logger": "agogosml.config", "message": typo},
        {"level": "INFO", "logger": "agogosml.app", "message": "model app started"},
        {"level": "WARNING", "logger": "my_app", "message": "slow model"},
    ]
    lines = [orjson.dumps(record) for record in records] + [b"loading the model"]
    log = tmp_path / "app.log"
    log.write_bytes(b"\n".join(lines) + b"\n")

    assert misspelling_warnings(log) == [typo]
    assert misspelling_warnings(tmp_path / "missing.log") == []


@pytest.mark.slow
def test_app_setting_typo_is_shown(tmp_path: Path) -> None:
    (tmp_path / "factor_app.py").write_text(FACTOR_APP)
    write_input(tmp_path / "values.jsonl", ["1"])

    result = run_cli(
        "--app", "factor_app",
        "--input", str(tmp_path / "values.jsonl"),
        "--work-dir", str(tmp_path / "work"),
        cwd=tmp_path,
        env={"FACTOR_VALEU": "3", "APP_PROT": "1"},
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    message = flat(result.stderr)
    assert (
        "FACTOR_VALEU is not a setting and is ignored; did you mean FACTOR_VALUE?"
        in message
    )
    # The run warns about APP_ variables itself, before the app starts.
    assert message.count("APP_PROT is not a setting") == 1


@pytest.mark.slow
def test_invalid_reader_setting_is_named(tmp_path: Path) -> None:
    write_app(tmp_path)
    write_input(tmp_path / "values.jsonl")

    result = run_cli(
        "--app", "doubling_app",
        "--input", str(tmp_path / "values.jsonl"),
        "--work-dir", str(tmp_path / "work"),
        cwd=tmp_path,
        env={"READER_CONCURRENCY": "0"},
    )  # fmt: skip

    # Named before any service starts, as a usage error.
    assert result.returncode == 2
    message = flat(result.stderr)
    assert "READER_CONCURRENCY='0' is invalid" in message
    assert not (tmp_path / "work" / "writer.log").exists()
    assert "Traceback" not in result.stderr


def test_project_without_input_names_source(tmp_path: Path) -> None:
    project = tmp_path / "my project"
    project.mkdir()
    (project / "agogosml.yaml").write_text(MANIFEST)

    result = invoke("--project", str(project), "--work-dir", str(tmp_path / "work"))

    assert result.exit_code == 2, result.output
    message = flat(result.output)
    assert "--project needs --input FILE" in message
    assert f"manifest: --input '{project / 'in.jsonl'}'" in message


def test_project_app_runs_in_project(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "agogosml.yaml").write_text(MANIFEST)
    write_app(project, "doubling_scores.app")
    write_input(tmp_path / "values.jsonl")

    result = run_cli(
        "--project", "project",
        "--input", "values.jsonl",
        "--summary-json", "summary.json",
        "--work-dir", str(tmp_path / "work"),
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert summary["app"] == "doubling_scores.app"
    assert summary["written"] == 5
    assert summary["missing"] == 0
    assert f"App: python -m doubling_scores.app in {project}" in flat(result.stderr)


def transaction(amount: float) -> str:
    values = dict.fromkeys(FEATURE_COLUMNS, 0.0)
    values["Amount"] = amount
    return orjson.dumps(values).decode()


@pytest.mark.slow
def test_sample_app_runs_on_input_file(tmp_path: Path, fraud_model: Path) -> None:
    lines = [transaction(1.0), transaction(2.0), '{"Amount": "x"}', transaction(3.0)]
    write_input(tmp_path / "transactions.jsonl", lines)

    result = run_cli(
        "--input", "transactions.jsonl",
        "--model", str(fraud_model),
        "--summary-json", "summary.json",
        "--work-dir", str(tmp_path / "work"),
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert summary["app"] == "sample_app.app"
    assert summary["written"] == 3
    assert summary["dead_lettered"] == 1
    assert summary["missing"] == 0
    assert summary["labelled_fraud"] == 0
    assert "App: agogosml's sample fraud app" in result.stderr
    assert "Dataset:" not in result.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--app", "doubling_app", "--model", "MODEL"],
            "--model sets the model file of the sample app, not of the app of --app",
        ),
        (
            ["--app", "doubling_app", "--data", "DATA"],
            "give the input of the app of --app with --input FILE",
        ),
        (["--app", "doubling_app"], "--app needs --input FILE"),
        (
            ["--app", "doubling_app", "--project", "."],
            "--app and --project exclude each other",
        ),
        (
            ["--input", "INPUT", "--data", "DATA"],
            "--input and --data exclude each other",
        ),
        (
            ["--app", "my-app.app", "--input", "INPUT"],
            "'my-app.app' is not a Python module name",
        ),
        (
            ["--app", "doubling_app.py", "--input", "INPUT"],
            "'doubling_app.py' is a file name; give the module name, as in "
            "--app doubling_app",
        ),
        (
            ["--app", "pkg.doubling_app.py", "--input", "INPUT"],
            "'pkg.doubling_app.py' ends in .py; give the module name without it, "
            "as in --app pkg.doubling_app",
        ),
        (
            ["--app", "src/pkg/doubling_app.py", "--input", "INPUT"],
            "'src/pkg/doubling_app.py' is a file path; give the module name, as in "
            "--app doubling_app, and run agogosml in the directory that contains "
            "doubling_app.py ('src/pkg')",
        ),
    ],
)
def test_run_rejects_app_option_combination(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    arguments: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    write_app(tmp_path)
    files = {
        "MODEL": tmp_path / "model.joblib",
        "DATA": tmp_path / "data.csv",
        "INPUT": write_input(tmp_path / "values.jsonl"),
    }
    for path in files.values():
        path.touch()
    write_input(files["INPUT"])
    arguments = [str(files.get(argument, argument)) for argument in arguments]

    result = invoke(*arguments, "--work-dir", str(tmp_path / "work"))

    assert result.exit_code == 2, result.output
    assert message in flat(result.output)
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["1", "{'a': 1}"], "is not JSON Lines: line 2 is not a JSON value"),
        (["", "  "], "has no records; give a file with one JSON value a line"),
        (['{"a": 1} {"b": 2}'], "is not JSON Lines: line 1 is not a JSON value"),
        (
            ["1", "nul"],
            "is not JSON Lines: line 2 is not a JSON value (unexpected end of data "
            "at column 4)",
        ),
        (
            ["1", '    {"a": x}'],
            "is not JSON Lines: line 2 is not a JSON value (unexpected character, "
            f"expected a JSON value at column 11; {QUOTE_HINT})",
        ),
        (
            ['\t{"a": x}'],
            "is not JSON Lines: line 1 is not a JSON value (unexpected character, "
            f"expected a JSON value at column 8; {QUOTE_HINT})",
        ),
    ],
)
def test_run_rejects_input_not_json_lines(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    path = write_input(tmp_path / "values.jsonl", lines)

    result = invoke("--input", str(path), "--work-dir", str(tmp_path / "work"))

    assert result.exit_code == 2, result.output
    assert "Invalid value for --input" in result.output
    assert f"'{path}' {message}" in flat(result.output)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ["1", "x", "2", "", "y"],
            "line 2 is not a JSON value (unexpected character, expected a JSON "
            f"value at column 1; {QUOTE_HINT}), and 1 more line is not either (5).",
        ),
        (
            ["{"] * 8,
            "line 1 is not a JSON value (unexpected end of data at column 2; "
            "the file looks like one JSON document over several lines, but each "
            "line must hold a whole value: put each value, such as each element "
            "of an array, on a line of its own), and 7 more lines are not either "
            "(2, 3, 4, 5, 6, ...).",
        ),
    ],
)
def test_run_names_every_invalid_input_line(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    path = write_input(tmp_path / "values.jsonl", lines)

    result = invoke("--input", str(path), "--work-dir", str(tmp_path / "work"))

    assert result.exit_code == 2, result.output
    assert f"'{path}' is not JSON Lines: {message}" in flat(result.output)


MULTI_LINE_HINT = "the file looks like one JSON document over several lines"


@pytest.mark.parametrize(
    "lines",
    [
        ["[", '  {"text": "good"},', '  {"text": "bad"}', "]"],
        ["", '{"text": "good",', ' "stars": 4}'],
    ],
)
def test_run_input_document_gets_hint(tmp_path: Path, lines: list[str]) -> None:
    path = write_input(tmp_path / "values.json", lines)

    result = invoke("--input", str(path), "--work-dir", str(tmp_path / "work"))

    assert result.exit_code == 2, result.output
    assert "is not JSON Lines" in flat(result.output)
    assert MULTI_LINE_HINT in flat(result.output)


def test_run_input_hint_only_on_first_value(tmp_path: Path) -> None:
    path = write_input(tmp_path / "values.jsonl", ["1", "[", "2]"])

    result = invoke("--input", str(path), "--work-dir", str(tmp_path / "work"))

    assert result.exit_code == 2, result.output
    assert "line 2 is not a JSON value" in flat(result.output)
    assert MULTI_LINE_HINT not in flat(result.output)


def test_run_rejects_missing_input(tmp_path: Path) -> None:
    result = invoke("--input", str(tmp_path / "nope.jsonl"))

    assert result.exit_code == 2, result.output
    assert "nope.jsonl" in result.output
    assert "does not exist" in result.output


def test_run_rejects_input_inside_run_files(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    path = write_input(work / "input.jsonl")

    result = invoke("--input", str(path), "--work-dir", str(work))

    assert result.exit_code == 2, result.output
    assert f"--input '{path}' is the run's own input.jsonl" in flat(result.output)


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        ("no_such_app.app", "no module of that name was found"),
        ("noisy.missing", "no module of that name was found"),
        ("sys", "it is a module of Python itself, not an app"),
        ("noisy", "it is a package without a __main__ module"),
    ],
)
def test_run_rejects_app_not_importable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, reason: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_input(tmp_path / "values.jsonl")
    # A package whose import would leave a mark: the check must not import it.
    (tmp_path / "noisy").mkdir()
    (tmp_path / "noisy" / "__init__.py").write_text("open('imported', 'w').close()\n")

    result = invoke("--app", module, "--input", str(path))

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert f"--app '{module}': the interpreter of this run" in output
    assert f"cannot run 'python -m {module}': {reason}" in output
    assert "'pip install -e PROJECT_DIR'" in output
    assert not (tmp_path / "imported").exists()


def test_run_rejects_input_that_is_a_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_app(tmp_path)
    fifo = tmp_path / "values.fifo"
    os.mkfifo(fifo)

    result = invoke("--app", "doubling_app", "--input", str(fifo))

    assert result.exit_code == 2, result.output
    assert "is not a regular file" in flat(result.output)


def test_run_rejects_project_without_manifest(tmp_path: Path) -> None:
    path = write_input(tmp_path / "values.jsonl")

    result = invoke("--project", str(tmp_path), "--input", str(path))

    assert result.exit_code == 2, result.output
    assert f"--project '{tmp_path}' has no agogosml.yaml" in flat(result.output)


def test_run_names_project_app_not_installed(tmp_path: Path) -> None:
    # A generated project keeps its package under src/, which only an
    # installation puts on the path.
    (tmp_path / "agogosml.yaml").write_text(MANIFEST)
    write_app(tmp_path / "src", "doubling_scores.app")
    path = write_input(tmp_path / "values.jsonl")

    result = invoke("--project", str(tmp_path), "--input", str(path))

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "cannot run 'python -m doubling_scores.app'" in output
    assert "install the project into this environment" in output
    assert f"'pip install -e {tmp_path}'" in output
    assert "For a module file" not in output


def test_run_names_project_environment_command(tmp_path: Path) -> None:
    (tmp_path / "agogosml.yaml").write_text(MANIFEST)
    write_app(tmp_path / "src", "doubling_scores.app")
    own_command = tmp_path / ".venv" / "bin" / "agogosml"
    own_command.parent.mkdir(parents=True)
    own_command.write_text("#!/bin/sh\n")
    path = write_input(tmp_path / "values.jsonl")

    result = invoke("--project", str(tmp_path), "--input", str(path))

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert f"Run the agogosml of the project's environment, {own_command}" in output
