"""Dry runs of `agogosml deploy`, `promote` and `rollback` without a cluster.

tests/fake_helm.py replaces Helm. With the file ``unreachable`` in its
state directory, every command that needs a cluster fails as Helm does
without one, and `helm template` runs the real binary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from agogosml_cli import helm
from agogosml_cli.main import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
SCOPE = ["--release", "rel", "--namespace", "ml"]


@pytest.fixture
def helm_state(
    tmp_path: Path, helm_binary: str, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Point HELM at the fake Helm without a cluster; return its state directory."""
    state_dir = tmp_path / "helm-state"
    state_dir.mkdir()
    (state_dir / "calls.jsonl").touch()
    (state_dir / "unreachable").touch()
    script = tmp_path / "helm"
    script.write_text(
        f"#!{sys.executable}\n"
        "import runpy\n"
        f"runpy.run_path({str(REPO_ROOT / 'tests' / 'fake_helm.py')!r}, "
        "run_name='__main__')\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("HELM", str(script))
    monkeypatch.setenv("FAKE_HELM_DIR", str(state_dir))
    monkeypatch.setenv("FAKE_HELM_REAL", helm_binary)
    return state_dir


def helm_commands(state_dir: Path) -> list[str]:
    lines = (state_dir / "calls.jsonl").read_text().splitlines()
    return [json.loads(line)[0] for line in lines]


def invoke(*arguments: str) -> Result:
    return CliRunner().invoke(cli, list(arguments))


def write_values(path: Path, **app: Any) -> Path:
    path.write_text(yaml.safe_dump({"app": {"slots": {"blue": {}}, **app}}))
    return path


def service_slot(manifests: str) -> str:
    for document in yaml.safe_load_all(manifests):
        if document and document["kind"] == "Service":
            if document["metadata"]["name"] == "rel-agogosml-app":
                return str(document["spec"]["selector"]["agogosml.io/slot"])
    raise AssertionError("no app Service in the rendered manifests")


@pytest.mark.parametrize("command", ["promote", "rollback"])
def test_dry_run_without_cluster_names_fix(helm_state: Path, command: str) -> None:
    result = invoke(command, "--dry-run", *SCOPE)

    message = " ".join(result.stderr.split())
    assert result.exit_code == 1, result.output
    assert "no cluster is reachable" in message
    assert "release 'rel' in namespace 'ml' is unknown" in message
    assert "--release-values FILE" in message
    assert "helm get values RELEASE --output yaml" in message
    assert "Install it with" not in message


def test_promote_dry_run_with_release_values(helm_state: Path, tmp_path: Path) -> None:
    values = write_values(
        tmp_path / "values.yaml", activeSlot="blue", previewSlot="green"
    )

    result = invoke("promote", "--dry-run", "--release-values", str(values), *SCOPE)

    assert result.exit_code == 0, result.output
    assert "--set-string app.activeSlot=green" in result.stderr
    assert "--set-string app.previousSlot=blue" in result.stderr
    assert "--create-namespace" not in result.stderr
    assert service_slot(result.stdout) == "green"
    assert "get" not in helm_commands(helm_state)
    assert "upgrade" not in helm_commands(helm_state)


def test_rollback_dry_run_with_release_values(helm_state: Path, tmp_path: Path) -> None:
    values = write_values(
        tmp_path / "values.json", activeSlot="green", previousSlot="blue"
    )

    result = invoke("rollback", "--dry-run", "--release-values", str(values), *SCOPE)

    would_run = [line for line in result.stderr.splitlines() if "Would run" in line]
    assert result.exit_code == 0, result.output
    assert len(would_run) == 2
    assert "app.activeSlot=blue" in would_run[1]
    assert service_slot(result.stdout) == "blue"


def test_deploy_dry_run_with_release_values(helm_state: Path, tmp_path: Path) -> None:
    values = write_values(tmp_path / "values.yaml", activeSlot="green")

    result = invoke(
        "deploy", "--image", "2.0", "--dry-run", "--release-values", str(values),
        *SCOPE,
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "app.previewSlot=blue" in result.stderr
    assert "assumes a new release" not in result.stderr
    assert service_slot(result.stdout) == "green"


def deployment_images(manifests: str) -> dict[str, str]:
    images = {}
    for document in yaml.safe_load_all(manifests):
        if document and document["kind"] == "Deployment":
            name = document["metadata"]["name"]
            container = document["spec"]["template"]["spec"]["containers"][0]
            images[name.removeprefix("rel-agogosml-app-")] = container["image"]
    return images


def test_deploy_dry_run_keeps_active_image(helm_state: Path, tmp_path: Path) -> None:
    release_values = tmp_path / "release.yaml"
    release_values.write_text(
        yaml.safe_dump(
            {
                "app": {
                    "activeSlot": "blue",
                    "slots": {
                        "blue": {"image": {"repository": "example/fraud", "tag": "1.0"}}
                    },
                }
            }
        )
    )
    user_values = tmp_path / "prod.yaml"
    user_values.write_text(
        yaml.safe_dump(
            {
                "app": {
                    "slots": {
                        slot: {"image": {"repository": "example/fraud", "tag": "0.9"}}
                        for slot in ("blue", "green")
                    }
                }
            }
        )
    )

    result = invoke(
        "deploy", "--image", "2.0", "--dry-run", *SCOPE,
        "--release-values", str(release_values), "--values", str(user_values),
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    images = deployment_images(result.stdout)
    assert images["blue"] == "example/fraud:1.0"
    assert images["green"] == "example/fraud:2.0"
    assert service_slot(result.stdout) == "blue"


def test_release_values_skips_helm_header(helm_state: Path, tmp_path: Path) -> None:
    values = tmp_path / "values.txt"
    values.write_text(
        "USER-SUPPLIED VALUES:\napp:\n  activeSlot: blue\n  previewSlot: green\n"
    )

    result = invoke("promote", "--dry-run", "--release-values", str(values), *SCOPE)

    assert result.exit_code == 0, result.output
    assert service_slot(result.stdout) == "green"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\xff\xfeapp: {}\n", "is not UTF-8 text (byte 0)"),
        (
            b"app:\n  activeSlot: blue\n  previewSlot: green\n  activeSlot: green\n",
            "activeSlot",
        ),
    ],
    ids=["not-utf8", "duplicate-key"],
)
def test_release_values_file_problem_named(
    helm_state: Path, tmp_path: Path, content: bytes, problem: str
) -> None:
    values = tmp_path / "values.yaml"
    values.write_bytes(content)

    result = invoke("promote", "--dry-run", "--release-values", str(values), *SCOPE)

    assert result.exit_code == 2, result.output
    assert problem in result.output
    assert str(values) in result.output
    assert "Traceback" not in result.output


def test_release_values_needs_dry_run(helm_state: Path, tmp_path: Path) -> None:
    values = write_values(tmp_path / "values.yaml", previewSlot="green")

    result = invoke("promote", "--release-values", str(values), *SCOPE)

    assert result.exit_code == 2, result.output
    assert "--release-values applies only with --dry-run" in result.output
    assert helm_commands(helm_state) == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [("- a\n- b\n", "contains a list, not a mapping"), ("app: [\n", "is not YAML")],
)
def test_release_values_rejects_bad_file(
    helm_state: Path, tmp_path: Path, content: str, problem: str
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(content)

    result = invoke("promote", "--dry-run", "--release-values", str(values), *SCOPE)

    assert result.exit_code == 2, result.output
    assert "Invalid value for --release-values" in result.output
    assert problem in result.output


def test_promote_help_states_dry_run_needs() -> None:
    result = invoke("promote", "--help")

    text = " ".join(result.output.split())
    assert "Works without a cluster" not in text
    assert "promote and rollback need --release-values" in text


@pytest.mark.parametrize(
    ("values", "hint"),
    [
        (
            {"kafka": {"bootstrapServer": "k:9092"}},
            "hint: /kafka/bootstrapServer is not a chart value; did you mean "
            "/kafka/bootstrapServers?",
        ),
        (
            {"kafka": {"sasl": {"password": "hunter2"}}},
            "hint: /kafka/sasl/password takes a Kubernetes Secret, never the secret "
            "itself: set {existingSecret: SECRET, key: KEY}",
        ),
        (
            {"zzz": 1},
            "hint: /zzz is not a chart value; the values there are affinity, app,",
        ),
        (
            {"writer": {"settings": {"WRITER_OUTPUT": "scores"}}},
            "hint: the chart sets WRITER_OUTPUT itself, from writer.topic; set "
            "that, not /writer/settings/WRITER_OUTPUT",
        ),
        (
            {"writer": {"settings": {"WRITER_FSYNC": "false"}}},
            "hint: WRITER_FSYNC applies only to a file source or sink",
        ),
    ],
)
def test_dry_run_schema_error_hints(
    helm_state: Path, tmp_path: Path, values: dict[str, Any], hint: str
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))

    result = invoke("deploy", "--dry-run", "--image", "1.0", "-f", str(path), *SCOPE)

    message = " ".join(result.stderr.split())
    assert result.exit_code == 1, result.output
    assert "values don't meet the specifications of the schema" in message
    assert hint in message
    assert "Check the files given with --values and the --set options." in message


def test_hint_variables_match_the_chart() -> None:
    """The chart sets each variable that the hints name, and takes none in settings."""
    templates = "".join(
        path.read_text()
        for path in (REPO_ROOT / "helm" / "agogosml" / "templates").iterdir()
    )
    schema = (REPO_ROOT / "helm" / "agogosml" / "values.schema.json").read_text()

    for name in helm.CHART_SET_VARIABLES:
        assert f'"{name}"' in templates or f"name: {name}" in templates, name
        assert f'"{name}"' not in schema, name
    for name in helm.FILE_ONLY_VARIABLES:
        assert f'"{name}"' not in schema, name


def test_image_as_text_in_values_named(helm_state: Path, tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"app": {"slots": {"blue": {"image": "repo:1"}}}}))

    result = invoke("deploy", "--dry-run", "--image", "1.0", "-f", str(path), *SCOPE)

    message = " ".join(result.stderr.split())
    assert result.exit_code == 2, result.output
    assert f"{path} sets app.slots.blue.image to 'repo:1'" in message
    assert "write image: {repository: REPOSITORY, tag: TAG}" in message
    assert "interface conversion" not in message


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"app": {"slots": 5}}, "app.slots"),
        ({"app": {"slots": {"green": []}}}, "app.slots.green"),
    ],
)
def test_slot_values_not_mapping_named(
    helm_state: Path, tmp_path: Path, values: dict, key: str
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))

    result = invoke("deploy", "--dry-run", "--image", "1.0", "-f", str(path), *SCOPE)

    message = " ".join(result.stderr.split())
    assert result.exit_code == 2, result.output
    assert f"{path} sets {key} to" in message
    assert "but the chart takes a mapping there" in message
    assert "interface conversion" not in message
