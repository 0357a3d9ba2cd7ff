"""`agogosml init`: each flag and prompt value is checked where it is given."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from agogosml_cli.main import cli
from agogosml_cli.manifest import ManifestError, load_manifest

KAFKA_SOURCE = ["--name", "scoring", "--source", "kafka"]
KAFKA_REST = [
    "--source-bootstrap-servers", "kafka:9092",
    "--sink", "kafka",
    "--sink-topic", "scored",
    "--registry", "r.io",
]  # fmt: skip


def invoke(*arguments: str, input_text: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(arguments), input=input_text)


def init_no_input(tmp_path: Path, *flags: str) -> Result:
    manifest = tmp_path / "agogosml.yaml"
    return invoke("init", "--no-input", "--manifest", str(manifest), *flags)


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("topics", "named"),
    [
        ("bad topic", "'bad topic' is invalid"),
        ("ok,bad topic", "'bad topic' is invalid"),
        ("a/b", "'a/b' is invalid"),
        ("x" * 250, f"'{'x' * 250}' is invalid"),
    ],
)
def test_init_rejects_invalid_topic_flag(
    tmp_path: Path, topics: str, named: str
) -> None:
    result = init_no_input(tmp_path, *KAFKA_SOURCE, "--source-topics", topics)

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '--source-topics': {named}" in output
    assert "1 to 249 letters, digits, '.', '_' and '-'" in output
    assert not (tmp_path / "agogosml.yaml").exists()


@pytest.mark.parametrize(
    ("topics", "repeated"),
    [("a,a", "a"), ("in, out ,in", "in"), ("x,y,y,x", "y"), ("z,z,z", "z")],
)
def test_init_rejects_repeated_topic_flag(
    tmp_path: Path, topics: str, repeated: str
) -> None:
    result = init_no_input(tmp_path, *KAFKA_SOURCE, "--source-topics", topics)

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert f"{repeated!r} is listed more than once in {topics!r}" in output
    assert "List each topic once" in output


def test_init_accepts_topics_with_spaces_around(tmp_path: Path) -> None:
    flags = [*KAFKA_SOURCE, "--source-topics", " in-a , in.b,in_c ", *KAFKA_REST]

    result = init_no_input(tmp_path, *flags)

    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "agogosml.yaml")
    assert manifest.source.topics == ["in-a", "in.b", "in_c"]  # type: ignore[union-attr]


def test_init_prompt_asks_again_for_topics(tmp_path: Path) -> None:
    answers = [
        "scoring",  # project name
        "",  # app template
        "kafka",  # source type
        "",  # no source topics, rejected and asked again
        "bad topic",  # source topics, rejected and asked again
        "in,in",  # repeated, rejected and asked again
        "transactions",
        "  ",  # no bootstrap servers, rejected and asked again
        "kafka:9092",  # bootstrap servers
        "",  # security protocol
        "",  # sink type: kafka
        "",  # sink topic: the suggested transactions-scored
        "r.io",  # registry
        "",  # namespace
    ]
    path = tmp_path / "agogosml.yaml"

    result = invoke(
        "init", "--manifest", str(path), input_text="\n".join(answers) + "\n"
    )

    output = flat(result.output)
    assert result.exit_code == 0, result.output
    assert "Error: source.topics is required; enter a value" in output
    assert "Error: source.bootstrap_servers is required; enter a value" in output
    assert "'bad topic' is invalid" in output
    assert "'in' is listed more than once in 'in,in'" in output
    assert "bad topic-scored" not in output
    assert "Sink topic [transactions-scored]" in output
    manifest = load_manifest(path)
    assert manifest.source.topics == ["transactions"]  # type: ignore[union-attr]
    assert manifest.sink.topic == "transactions-scored"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("group", "problem"),
    [
        ("", "'' is invalid"),
        ("a\nb", "non-printable character U+000A"),
        ("   ", "it has only spaces"),
    ],
)
def test_init_rejects_invalid_group_id_flag(
    tmp_path: Path, group: str, problem: str
) -> None:
    flags = [*KAFKA_SOURCE, "--source-topics", "in", "--source-group-id", group]

    result = init_no_input(tmp_path, *flags, *KAFKA_REST)

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--source-group-id'" in output
    assert problem in output
    assert "Consumer group of the input reader: text of at least one" in output


def test_manifest_rejects_repeated_topics(tmp_path: Path) -> None:
    result = init_no_input(
        tmp_path, *KAFKA_SOURCE, "--source-topics", "in,other", *KAFKA_REST
    )
    assert result.exit_code == 0, result.output
    path = tmp_path / "agogosml.yaml"
    data = yaml.safe_load(path.read_text())
    data["source"]["topics"] = ["in", "other", "in"]
    path.write_text(yaml.safe_dump(data))

    with pytest.raises(ManifestError) as error:
        load_manifest(path)

    message = flat(str(error.value))
    assert "source.topics: invalid value ['in', 'other', 'in']" in message
    assert "topic 'in' is listed more than once. List each topic once" in message


def test_init_names_missing_sink_type(tmp_path: Path) -> None:
    flags = [
        *KAFKA_SOURCE,
        "--source-topics", "in",
        "--source-bootstrap-servers", "kafka:9092",
        "--sink-topic", "scored",
        "--registry", "r.io",
    ]  # fmt: skip

    result = init_no_input(tmp_path, *flags)

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "missing required fields: sink.type (--sink);" in output
    assert "--sink takes kafka, eventhubs or file." in output
    assert "applies only to" not in output
    assert not (tmp_path / "agogosml.yaml").exists()


def test_init_names_choices_of_missing_types(tmp_path: Path) -> None:
    result = init_no_input(tmp_path, "--name", "scoring", "--source-path", "in.jsonl")

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "source.type (--source), sink.type (--sink)" in output
    assert "--source and --sink take kafka, eventhubs or file." in output
    assert "applies only to" not in output


def test_init_still_rejects_flag_of_other_type(tmp_path: Path) -> None:
    flags = [*KAFKA_SOURCE, "--source-topics", "in", "--source-path", "in.jsonl"]

    result = init_no_input(tmp_path, *flags)

    assert result.exit_code == 2, result.output
    assert "--source-path applies only to a file source" in result.output


def test_init_sasl_flag_without_protocol_names_fix(tmp_path: Path) -> None:
    flags = [*KAFKA_SOURCE, "--source-topics", "in", "--source-sasl-username", "me"]

    result = init_no_input(tmp_path, *flags)

    assert result.exit_code == 2, result.output
    assert "--source-sasl-username applies only to a Kafka source" in flat(
        result.output
    )
    assert "add --source-security-protocol SASL_SSL, or remove it" in flat(
        result.output
    )


def test_init_strips_registry_trailing_slash(tmp_path: Path) -> None:
    flags = [
        *KAFKA_SOURCE,
        "--source-topics", "in",
        "--source-bootstrap-servers", "kafka:9092",
        "--sink", "kafka",
        "--sink-topic", "scored",
        "--registry", "registry.example.com/ml/",
    ]  # fmt: skip

    result = init_no_input(tmp_path, *flags)

    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "agogosml.yaml")
    assert manifest.registry == "registry.example.com/ml"


def test_init_lists_only_source_sasl_flags(tmp_path: Path) -> None:
    flags = [
        *KAFKA_SOURCE,
        "--source-topics", "in",
        *KAFKA_REST,
        "--source-security-protocol", "SASL_SSL",
    ]  # fmt: skip

    result = init_no_input(tmp_path, *flags)

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "source.sasl.mechanism (--source-sasl-mechanism)" in output
    assert "source.sasl.password (--source-sasl-password-secret)" in output
    assert "--sink-sasl" not in output
    assert not (tmp_path / "agogosml.yaml").exists()


@pytest.mark.parametrize(
    ("name", "near"),
    [
        ("Bad_Name", "bad-name"),
        ("Fraud Scoring", "fraud-scoring"),
        ("svc.v2", "svc-v2"),
        ("Ünï cødé", "uni-code"),
    ],
)
def test_init_name_flag_suggests_valid_name(
    tmp_path: Path, name: str, near: str
) -> None:
    result = init_no_input(tmp_path, "--name", name)

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert f"'--name': {name!r} is invalid. Did you mean {near!r}?" in output
    assert not (tmp_path / "agogosml.yaml").exists()


@pytest.mark.parametrize("name", ["1abc", "___", "class"])
def test_init_name_flag_without_suggestion(tmp_path: Path, name: str) -> None:
    result = init_no_input(tmp_path, "--name", name)

    output = flat(result.output)
    assert result.exit_code == 2, result.output
    assert f"'--name': {name!r} is invalid" in output
    assert "Did you mean" not in output
