"""Usage errors and help text of `agogosml run`, `generate` and the release commands."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agogosml_cli import entry, main
from agogosml_cli.main import cli

KAFKA_VARIABLES = (
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_EVENTHUBS_CONNECTION_STRING",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KAFKA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # No release command may get as far as running Helm.
    monkeypatch.setenv("HELM", "/nonexistent/helm")


def invoke(*arguments: str) -> Result:
    return CliRunner().invoke(cli, list(arguments))


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("READER_ORDERING", "sorted", "'sorted' is not one of"),
        ("READER_BATCH_MAX_MESSAGES", "0", "0 is not in the range x>=1"),
    ],
)
def test_run_invalid_reader_variable_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(variable, value)

    result = invoke("run", "--limit", "1")

    assert result.exit_code == 2
    assert f"(env var: '{variable}')" in result.output
    assert problem in flat(result.output)


def run_one_value(tmp_path: Path, fraud_model: Path) -> Result:
    """Invoke `agogosml run` on an input file of one value."""
    values = tmp_path / "values.jsonl"
    values.write_text("1\n")
    return invoke(
        "run", "--input", str(values), "--model", str(fraud_model),
        "--work-dir", str(tmp_path / "work"),
    )  # fmt: skip


def test_run_warns_of_misspelt_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fraud_model: Path
) -> None:
    monkeypatch.setenv("READER_CONCURENCY", "5")
    monkeypatch.setattr(main, "_run", lambda *arguments: None)

    result = run_one_value(tmp_path, fraud_model)

    assert result.exit_code == 0, result.output
    assert (
        "READER_CONCURENCY is not a setting and is ignored; did you mean "
        "READER_CONCURRENCY?"
    ) in flat(result.output)


def test_run_invalid_service_variables_named_before_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fraud_model: Path
) -> None:
    monkeypatch.setenv("READER_RETRY_MAX_ATTEMPTS", "abc")
    monkeypatch.setenv("APP_MAX_BODY_BYTES", "-5")
    # The run sets the services' ports itself, so these values are not read.
    monkeypatch.setenv("READER_PORT", "any")
    monkeypatch.setenv("WRITER_PORT", "any")
    started: list[object] = []
    monkeypatch.setattr(main, "_run", lambda *arguments: started.append(arguments))

    result = run_one_value(tmp_path, fraud_model)

    assert result.exit_code == 2, result.output
    assert started == []
    output = flat(result.output)
    assert (
        "READER_RETRY_MAX_ATTEMPTS='abc' is invalid: Input should be a valid integer"
    ) in output
    assert "APP_MAX_BODY_BYTES='-5' is invalid" in output
    assert "PORT" not in output


@pytest.mark.parametrize(("limit", "code"), [("2", 1), ("3", 0)])
def test_run_max_dead_letters_sets_exit_code(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    fraud_model: Path,
    limit: str,
    code: int,
) -> None:
    from agogosml_cli import run

    summary = run.RunSummary(transport="file", read=5, written=2, dead_lettered=3)
    monkeypatch.setattr(run, "run_pipeline", lambda *arguments: summary)
    values = tmp_path / "values.jsonl"
    values.write_text("1\n")

    result = invoke(
        "run", "--input", str(values), "--model", str(fraud_model),
        "--work-dir", str(tmp_path / "work"), "--max-dead-letters", limit,
    )  # fmt: skip

    assert result.exit_code == code, result.output
    message = "3 records were dead-lettered, more than --max-dead-letters 2"
    assert (message in flat(result.output)) == (code == 1)


def test_run_help_lists_exit_codes() -> None:
    result = invoke("run", "--help")

    lines = [line.split() for line in result.output.splitlines()]
    codes = {words[0] for words in lines if words and words[0].isdigit()}
    assert result.exit_code == 0
    assert codes >= {"0", "1", "2", "130", "143"}
    assert "SIGTERM" in result.output
    assert "--app or --project runs your app" in flat(result.output)


def test_run_help_dead_letter_default_deleted() -> None:
    result = invoke("run", "--help")

    # click may break the line at the hyphen of "--input-topic".
    help_text = flat(result.output.split("--dead-letter-topic NAME")[1])
    assert result.exit_code == 0
    assert help_text.startswith("Dead-letter topic or event hub. Default: ")
    assert "a new topic per run, deleted when the run ends." in help_text


def test_help_lists_whole_command_summaries() -> None:
    result = invoke("--help")

    commands = result.output.split("Commands:")[1]
    assert result.exit_code == 0
    assert "..." not in commands
    assert "through the Docker Engine API." in flat(result.output)
    assert "for 'agogosml generate'." in flat(result.output)


@pytest.mark.parametrize("command", ["deploy", "promote", "rollback", "status"])
@pytest.mark.parametrize(
    "name",
    ["Bad_Name", "scoring-", "-scoring", "a.b", "1abc", "a..b", "a" * 54, ""],
)
def test_release_name_rejected(command: str, name: str) -> None:
    extra = ["--image", "2.0"] if command == "deploy" else []

    result = invoke(command, "--release", name, *extra)

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '--release': {name!r} is not a valid release" in output
    assert "1 to 53 lowercase letters, digits and '-', starts with a letter" in output
    assert "/nonexistent/helm" not in output


@pytest.mark.parametrize("name", ["scoring", "a", "fraud-scoring-2", "a" * 53])
def test_release_name_accepted(name: str) -> None:
    result = invoke("promote", "--release", name)

    # The command gets past the option checks and fails on the missing Helm.
    assert result.exit_code == 1, result.output
    assert "HELM='/nonexistent/helm' is not an executable file" in result.output


def invoke_kafka_run(tmp_path: Path, *arguments: str) -> Result:
    return invoke(
        "run", "--work-dir", str(tmp_path), "--kafka", "127.0.0.1:9092", *arguments
    )


def test_sasl_mechanism_flag_without_protocol(tmp_path: Path) -> None:
    result = invoke_kafka_run(tmp_path, "--kafka-sasl-mechanism", "PLAIN")

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "--kafka-sasl-mechanism PLAIN needs the security protocol" in output
    assert "not the default security protocol PLAINTEXT" in output
    assert "pass --kafka-security-protocol SASL_SSL" in output
    assert "KAFKA_SASL_MECHANISM is set" not in output


def test_sasl_mechanism_flag_with_ssl_flag(tmp_path: Path) -> None:
    result = invoke_kafka_run(
        tmp_path,
        "--kafka-security-protocol", "SSL",
        "--kafka-sasl-mechanism", "SCRAM-SHA-256",
    )  # fmt: skip

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "--kafka-sasl-mechanism SCRAM-SHA-256 needs the security protocol" in (
        output
    )
    assert "not --kafka-security-protocol SSL" in output


def test_sasl_mechanism_flag_with_ssl_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")

    result = invoke_kafka_run(tmp_path, "--kafka-sasl-mechanism", "PLAIN")

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "not KAFKA_SECURITY_PROTOCOL=SSL" in output


def test_sasl_variable_with_ssl_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "PLAIN")

    result = invoke_kafka_run(tmp_path, "--kafka-security-protocol", "SSL")

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "KAFKA_SASL_MECHANISM=PLAIN needs the security protocol" in output
    assert "not --kafka-security-protocol SSL" in output
    assert "or unset KAFKA_SASL_MECHANISM" in output


def test_sasl_protocol_flag_without_mechanism(tmp_path: Path) -> None:
    result = invoke_kafka_run(tmp_path, "--kafka-security-protocol", "SASL_SSL")

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "--kafka-security-protocol SASL_SSL needs a SASL mechanism" in output
    assert "pass --kafka-sasl-mechanism PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512" in (
        output
    )


@pytest.fixture
def link_loop(tmp_path: Path) -> Path:
    """Two symbolic links that point at each other; returns one of them."""
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    return tmp_path / "loop-a"


@pytest.mark.parametrize(
    ("option", "inside"), [("--work-dir", ""), ("--summary-json", "summary.json")]
)
def test_run_path_in_link_loop_named(link_loop: Path, option: str, inside: str) -> None:
    path = link_loop / inside if inside else link_loop

    result = invoke("run", option, str(path), "--limit", "1")

    assert result.exit_code == 2, result.output
    assert f"{option}: " in result.output
    assert "remove the symbolic link loop or give another path" in result.output
    assert "Traceback" not in result.output


def test_generate_output_in_link_loop_named(link_loop: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "agogosml.yaml"
    created = invoke(
        "init", "--no-input", "--name", "looped", "--source", "file",
        "--source-path", "in.jsonl", "--sink", "file", "--sink-path", "out.jsonl",
        "--registry", "r.io", "--manifest", str(manifest),
    )  # fmt: skip
    assert created.exit_code == 0, created.output

    result = invoke("generate", "--manifest", str(manifest), "--output", str(link_loop))

    assert result.exit_code == 1, result.output
    assert f"{str(link_loop)!r} cannot be resolved" in result.output
    assert "Traceback" not in result.output


def test_interrupt_before_run_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*arguments: object, **options: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(main, "resolve_stream", interrupted)

    result = invoke("run", "--limit", "5")

    assert result.exit_code == 130
    assert "Interrupted by SIGINT." in result.output
    assert "Aborted!" not in result.output


def test_interrupt_during_start_up_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Importing(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            raise KeyboardInterrupt  # as a Ctrl-C during the import would

    monkeypatch.setitem(sys.modules, "agogosml_cli.main", Importing("main"))

    with pytest.raises(SystemExit) as exited:
        entry.main()

    assert exited.value.code == 130
    assert "Interrupted by SIGINT." in capsys.readouterr().err


def test_run_variables_cover_the_service_builders(tmp_path: Path) -> None:
    from agogosml_cli import local

    services = [
        local.writer_process(tmp_path, sink="file", output="out.jsonl"),
        local.app_process(tmp_path, "http://127.0.0.1:1"),
        local.reader_process(
            tmp_path, "http://127.0.0.1:1", source="file", input_="in.jsonl"
        ),
    ]

    assert {name for service in services for name in service.env} <= (
        local.RUN_VARIABLES
    )
