"""`agogosml deploy`, `promote`, `rollback` and `status` against a fake Helm.

tests/fake_helm.py replaces Helm and a cluster: it records each call
and keeps the release's values. `helm template` runs the real binary, so the
rendered states are checked on real manifests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from fake_helm import merge

from agogosml_cli import helm
from agogosml_cli.main import cli
from agogosml_cli.release_status import format_status, status_report
from agogosml_cli.slot_images import ImageReference

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "helm" / "agogosml"
SCOPE = ["--release", "rel", "--namespace", "ml", "--kube-context", "prod"]


@dataclass
class FakeHelm:
    """The fake Helm executable and the directory with its state."""

    path: Path
    state_dir: Path
    real_helm: str

    def calls(self) -> list[list[str]]:
        lines = (self.state_dir / "calls.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def upgrades(self) -> list[list[str]]:
        return [call for call in self.calls() if call[0] == "upgrade"]

    def values(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "values.json").read_text())

    def set_values(self, values: dict[str, Any]) -> None:
        (self.state_dir / "values.json").write_text(json.dumps(values))
        (self.state_dir / "revision").write_text("1")

    def fail(self, mode: str) -> None:
        (self.state_dir / mode).touch()

    def fail_after(self, upgrades: int) -> None:
        """Let `upgrades` upgrades succeed and fail the ones after them."""
        (self.state_dir / "upgrades-before-failure").write_text(str(upgrades))

    def render(self) -> list[dict]:
        """Render the chart with the stored values, as the release would."""
        values_file = self.state_dir / "render-values.json"
        values_file.write_text(json.dumps(self.values()))
        result = subprocess.run(
            [self.real_helm, "template", "rel", str(CHART), "-f", str(values_file)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture
def fake_helm(
    tmp_path: Path, helm_binary: str, monkeypatch: pytest.MonkeyPatch
) -> FakeHelm:
    state_dir = tmp_path / "helm-state"
    state_dir.mkdir()
    (state_dir / "calls.jsonl").touch()
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
    return FakeHelm(script, state_dir, helm_binary)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def slot_values(active: str, preview: str = "", previous: str = "") -> dict:
    return {
        "app": {
            "activeSlot": active,
            "previewSlot": preview,
            "previousSlot": previous,
            "slots": {"blue": {"image": {"tag": "1.0"}}},
        }
    }


def set_strings(call: list[str]) -> dict[str, str]:
    pairs = [call[i + 1] for i, arg in enumerate(call) if arg == "--set-string"]
    return dict(pair.split("=", 1) for pair in pairs)


def pinned(slot: str, tag: str = "") -> dict[str, str]:
    """Return the settings that keep `slot` on the chart's repository and `tag`."""
    prefix = f"app.slots.{slot}.image"
    return {
        f"{prefix}.repository": "agogosml-sample-app",
        f"{prefix}.tag": tag,
        f"{prefix}.digest": "",
    }


def find(manifests: list[dict], kind: str, name: str) -> dict:
    for manifest in manifests:
        if manifest["kind"] == kind and manifest["metadata"]["name"] == name:
            return manifest
    raise AssertionError(f"no {kind} {name!r} in the rendered manifests")


def slot_view(manifests: list[dict]) -> dict[str, Any]:
    """Return the Service's slot and each slot's image and replicas."""
    view: dict[str, Any] = {
        "service": find(manifests, "Service", "rel-agogosml-app")["spec"]["selector"][
            "agogosml.io/slot"
        ]
    }
    for slot in ("blue", "green"):
        spec = find(manifests, "Deployment", f"rel-agogosml-app-{slot}")["spec"]
        image = spec["template"]["spec"]["containers"][0]["image"]
        view[slot] = (image, spec["replicas"])
    return view


# ---------------------------------------------------------------------------
# deploy
# ---------------------------------------------------------------------------


def test_deploy_installs_new_release(fake_helm: FakeHelm) -> None:
    result = invoke("deploy", "--image", "1.0", *SCOPE)

    assert result.exit_code == 0, result.output
    assert fake_helm.upgrades() == [
        [
            "upgrade", "rel", str(CHART), "--install", "--atomic", "--wait",
            "--timeout", "300s", "--reset-then-reuse-values",
            "--namespace", "ml", "--kube-context", "prod", "--create-namespace",
            "--set-string", "app.activeSlot=blue",
            "--set-string", "app.previewSlot=",
            "--set-string", "app.previousSlot=",
            "--set-string", "app.slots.blue.image.tag=1.0",
            "--set-string", "app.slots.blue.image.digest=",
        ]
    ]  # fmt: skip
    assert fake_helm.calls()[0] == [
        "get", "values", "rel", "--output", "json",
        "--namespace", "ml", "--kube-context", "prod",
    ]  # fmt: skip
    assert "blue slot, which is active" in result.stdout
    warnings = " ".join(result.stderr.split())
    assert "no --values file sets reader.image.repository" in warnings
    assert "no --values file sets writer.image.repository" in warnings


def test_deploy_new_release_with_service_images_quiet(
    fake_helm: FakeHelm, tmp_path: Path
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        "reader:\n  image: {repository: reg.example/agogosml-input-reader}\n"
        "writer:\n  image: {repository: reg.example/agogosml-output-writer}\n"
    )

    result = invoke("deploy", "--image", "1.0", "--values", str(values), *SCOPE)

    assert result.exit_code == 0, result.output
    assert "no --values file sets" not in result.stderr


def test_deploy_to_existing_release_skips_image_warning(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("blue"))

    result = invoke("deploy", "--image", "2.0", *SCOPE)

    assert result.exit_code == 0, result.output
    assert "no --values file sets" not in result.stderr


def test_deploy_targets_idle_slot(fake_helm: FakeHelm, tmp_path: Path) -> None:
    fake_helm.set_values(slot_values("blue"))
    values_file = tmp_path / "prod.yaml"
    values_file.write_text("writer:\n  replicas: 3\n")

    result = invoke(
        "deploy", "--image", "registry.example:5000/model:2.0", *SCOPE,
        "--values", str(values_file), "--timeout-seconds", "90",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    (upgrade,) = fake_helm.upgrades()
    assert upgrade[upgrade.index("--timeout") + 1] == "90s"
    assert upgrade[upgrade.index("--values") + 1] == str(values_file)
    assert "--create-namespace" not in upgrade
    assert set_strings(upgrade) == {
        "app.activeSlot": "blue",
        "app.previewSlot": "green",
        "app.previousSlot": "",
        **pinned("blue", "1.0"),
        "app.slots.green.image.repository": "registry.example:5000/model",
        "app.slots.green.image.tag": "2.0",
        "app.slots.green.image.digest": "",
    }
    assert "rel-agogosml-app-preview" in result.stdout
    assert "agogosml promote" in result.stdout


def test_deploy_pins_active_slot_image(fake_helm: FakeHelm, tmp_path: Path) -> None:
    fake_helm.set_values(slot_values("blue"))
    values_file = tmp_path / "prod.yaml"
    values_file.write_text(
        "app:\n  slots:\n    blue:\n      image:\n        tag: '0.9'\n"
    )

    result = invoke("deploy", "--image", "2.0", *SCOPE, "--values", str(values_file))

    assert result.exit_code == 0, result.output
    (upgrade,) = fake_helm.upgrades()
    settings = set_strings(upgrade)
    assert settings["app.slots.blue.image.repository"] == "agogosml-sample-app"
    assert settings["app.slots.blue.image.tag"] == "1.0"
    assert settings["app.slots.blue.image.digest"] == ""
    assert settings["app.slots.green.image.tag"] == "2.0"
    message = " ".join(result.stderr.split())
    assert f"{values_file} sets app.slots.blue.image.tag to '0.9'" in message
    assert "keeps the blue slot's image" in message


def test_deploy_pins_without_warning(fake_helm: FakeHelm, tmp_path: Path) -> None:
    fake_helm.set_values(slot_values("blue"))
    values_file = tmp_path / "prod.yaml"
    values_file.write_text(
        "app:\n  slots:\n    blue:\n      image:\n        tag: '1.0'\n"
    )

    result = invoke("deploy", "--image", "2.0", *SCOPE, "--values", str(values_file))

    assert result.exit_code == 0, result.output
    assert set_strings(fake_helm.upgrades()[0])["app.slots.blue.image.tag"] == "1.0"
    assert "keeps the blue slot's image" not in result.stderr


def test_deploy_rejects_active_slot(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("blue"))

    result = invoke("deploy", "--slot", "blue", "--image", "2.0", *SCOPE)

    assert result.exit_code == 1
    assert "--slot blue is the active slot" in result.stderr
    assert "idle slot green" in result.stderr
    assert "--force" in result.stderr
    assert fake_helm.upgrades() == []


def test_deploy_force_replaces_active_image(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("blue", preview="green"))

    result = invoke("deploy", "--slot", "blue", "--force", "--image", "2.1", *SCOPE)

    assert result.exit_code == 0, result.output
    (upgrade,) = fake_helm.upgrades()
    assert set_strings(upgrade) == {
        "app.activeSlot": "blue",
        "app.previewSlot": "green",
        "app.previousSlot": "",
        **pinned("green"),
        "app.slots.blue.image.tag": "2.1",
        "app.slots.blue.image.digest": "",
    }
    assert fake_helm.values()["app"]["previewSlot"] == "green"


def test_deploy_over_rollback_target_warns(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("green", previous="blue"))

    result = invoke("deploy", "--image", "3.0", *SCOPE)

    # The next release after a promote goes onto the slot that rollback would
    # return to: that is the usual flow, so it needs no --force.
    assert result.exit_code == 0, result.output
    app = fake_helm.values()["app"]
    assert app["previewSlot"] == "blue"
    assert app["previousSlot"] == ""
    assert app["slots"]["blue"]["image"]["tag"] == "3.0"
    message = " ".join(result.stderr.split())
    assert "Warning: replacing agogosml-sample-app:1.0 on the blue slot" in message
    assert "the release has no rollback target until the next promote" in message


def test_deploy_rejects_replacing_preview(fake_helm: FakeHelm) -> None:
    values = slot_values("blue", preview="green")
    values["app"]["slots"]["green"] = {"image": {"tag": "2.0"}}
    fake_helm.set_values(values)

    result = invoke("deploy", "--image", "2.1", *SCOPE)

    message = " ".join(result.stderr.split())
    assert result.exit_code == 1
    assert "in preview with agogosml-sample-app:2.0" in message
    assert "not yet promoted" in message
    assert "Deploying tag 2.1 there replaces it" in message
    assert "pass --force to replace it" in message
    assert fake_helm.upgrades() == []


def test_deploy_force_replaces_preview(fake_helm: FakeHelm) -> None:
    values = slot_values("blue", preview="green")
    values["app"]["slots"]["green"] = {"image": {"tag": "2.0"}}
    fake_helm.set_values(values)

    result = invoke("deploy", "--image", "2.1", "--force", *SCOPE)

    assert result.exit_code == 0, result.output
    assert fake_helm.values()["app"]["slots"]["green"]["image"]["tag"] == "2.1"
    assert "--force replaces agogosml-sample-app:2.0" in result.stderr


def test_deploy_same_preview_image_again(fake_helm: FakeHelm) -> None:
    values = slot_values("blue", preview="green")
    values["app"]["slots"]["green"] = {"image": {"tag": "2.0"}}
    fake_helm.set_values(values)

    result = invoke("deploy", "--image", "2.0", *SCOPE)

    assert result.exit_code == 0, result.output
    assert len(fake_helm.upgrades()) == 1
    assert "Warning" not in result.stderr


def test_deploy_image_digest(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("blue"))
    digest = "sha256:" + "0f" * 32

    result = invoke("deploy", "--image", f"example/model@{digest}", *SCOPE)

    assert result.exit_code == 0, result.output
    green = fake_helm.values()["app"]["slots"]["green"]["image"]
    assert green == {"repository": "example/model", "tag": "", "digest": digest}


DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("bad tag", "the tag 'bad tag' is invalid"),
        ("model:", "the tag '' is invalid"),
        ("-1.0", "the tag '-1.0' is invalid"),
        ("a@sha256:12", "the digest 'sha256:12' is invalid"),
        ("A@sha256:12", "the repository 'A' is invalid"),
        ("registry:5000/app", "'registry:5000/app' has no tag"),
        ("repo:v1@" + DIGEST, "both a tag and a digest is not supported"),
        ("@" + DIGEST, "the repository before '@' is missing"),
        ("Model/x:1", "the repository 'Model/x' is invalid"),
        ("a//b:1", "the repository 'a//b' is invalid"),
        ("localhost:99999/app:1", "a :PORT from 1 to 65535"),
        (DIGEST, "it looks like a digest, which needs its repository"),
        ("sha256:abc", "it looks like a digest, which needs its repository"),
    ],
)
def test_deploy_rejects_bad_image(
    fake_helm: FakeHelm, image: str, problem: str
) -> None:
    result = invoke("deploy", "--image", image, *SCOPE)

    assert result.exit_code == 2
    assert "--image" in result.stderr
    assert problem in " ".join(result.stderr.split())
    assert fake_helm.calls() == []


def test_deploy_rejects_unknown_slot(fake_helm: FakeHelm) -> None:
    result = invoke("deploy", "--slot", "orange", "--image", "1.0", *SCOPE)

    assert result.exit_code == 2
    assert "--slot" in result.stderr
    assert "'orange' is not one of 'blue', 'green'" in result.stderr


@pytest.mark.parametrize("namespace", ["NS", "a b", "-x", "n" * 64])
def test_deploy_rejects_invalid_namespace(fake_helm: FakeHelm, namespace: str) -> None:
    result = invoke(
        "deploy", "--image", "1.0", "--release", "rel", "--namespace", namespace
    )

    assert result.exit_code == 2
    assert f"{namespace!r} is not a valid Kubernetes namespace" in result.stderr
    assert fake_helm.calls() == []


def test_deploy_rejects_timeout_over_a_day(fake_helm: FakeHelm) -> None:
    result = invoke("deploy", "--image", "1.0", *SCOPE, "--timeout-seconds", "86401")

    assert result.exit_code == 2
    assert "--timeout-seconds" in result.stderr
    assert fake_helm.calls() == []


# ---------------------------------------------------------------------------
# promote and rollback
# ---------------------------------------------------------------------------


def test_promote_switches_before_scaling_down(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("blue", preview="green"))

    result = invoke("promote", *SCOPE)

    assert result.exit_code == 0, result.output
    switch, scale_down = fake_helm.upgrades()
    assert set_strings(switch) == {
        "app.activeSlot": "green",
        "app.previewSlot": "blue",
        "app.previousSlot": "blue",
        **pinned("blue", "1.0"),
        **pinned("green"),
    }
    assert set_strings(scale_down) == {
        "app.activeSlot": "green",
        "app.previewSlot": "",
        "app.previousSlot": "blue",
        **pinned("blue", "1.0"),
        **pinned("green"),
    }
    assert "--atomic" in switch
    assert "--atomic" in scale_down
    assert "returns to the blue slot" in result.stdout


def test_promote_switch_keeps_old_pods(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("blue", preview="green"))
    fake_helm.fail_after(1)

    invoke("promote", *SCOPE)

    assert slot_view(fake_helm.render()) == {
        "service": "green",
        "blue": ("agogosml-sample-app:1.0", 2),
        "green": ("agogosml-sample-app:0.1.0", 2),
    }


def test_promote_failed_scale_down_names_fix(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("blue", preview="green"))
    fake_helm.fail_after(1)

    result = invoke("promote", *SCOPE)

    message = " ".join(result.stderr.split())
    assert result.exit_code == 1
    assert "helm failed to upgrade the release" in message
    assert "The app Service already points at the green slot" in message
    assert "Run `agogosml promote` again to scale the blue slot down" in message
    assert "`agogosml rollback` to return to it" in message
    assert len(fake_helm.upgrades()) == 2


def test_promote_again_finishes_scale_down(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("green", preview="blue", previous="blue"))

    result = invoke("promote", *SCOPE)

    assert result.exit_code == 0, result.output
    (scale_down,) = fake_helm.upgrades()
    assert set_strings(scale_down)["app.activeSlot"] == "green"
    assert set_strings(scale_down)["app.previewSlot"] == ""
    assert set_strings(scale_down)["app.previousSlot"] == "blue"
    assert slot_view(fake_helm.render())["blue"] == ("agogosml-sample-app:1.0", 0)


def test_promote_warm_switches_at_once(fake_helm: FakeHelm) -> None:
    values = slot_values("blue", preview="green")
    values["app"]["idleSlot"] = "warm"
    fake_helm.set_values(values)

    result = invoke("promote", *SCOPE)

    assert result.exit_code == 0, result.output
    (switch,) = fake_helm.upgrades()
    assert set_strings(switch)["app.activeSlot"] == "green"
    assert set_strings(switch)["app.previewSlot"] == ""


def test_promote_pins_both_images(fake_helm: FakeHelm, tmp_path: Path) -> None:
    values = slot_values("blue", preview="green")
    values["app"]["slots"]["green"] = {"image": {"tag": "2.0"}}
    fake_helm.set_values(values)
    values_file = tmp_path / "prod.yaml"
    values_file.write_text(
        "app:\n  slots:\n    green:\n      image:\n        tag: '1.9'\n"
    )

    result = invoke("promote", *SCOPE, "--values", str(values_file))

    assert result.exit_code == 0, result.output
    for upgrade in fake_helm.upgrades():
        settings = set_strings(upgrade)
        assert settings["app.slots.blue.image.tag"] == "1.0"
        assert settings["app.slots.green.image.tag"] == "2.0"
        assert settings["app.slots.green.image.repository"] == "agogosml-sample-app"
    assert "keeps the green slot's image" in " ".join(result.stderr.split())


@pytest.mark.parametrize(
    ("slot_image", "expected"),
    [
        ({"repository": "example/model", "tag": "2.0"}, "2.0"),
        ({"repository": "example/model", "tag": "2.0"}, "example/model:2.0"),
        ({"repository": "example/model", "digest": DIGEST}, f"example/model@{DIGEST}"),
    ],
)
def test_promote_image_matches_preview(
    fake_helm: FakeHelm, slot_image: dict[str, str], expected: str
) -> None:
    values = slot_values("blue", preview="green")
    values["app"]["slots"]["green"] = {"image": slot_image}
    fake_helm.set_values(values)

    result = invoke("promote", "--image", expected, *SCOPE)

    assert result.exit_code == 0, result.output
    assert fake_helm.values()["app"]["activeSlot"] == "green"


@pytest.mark.parametrize(
    ("slot_image", "expected", "running"),
    [
        ({"repository": "example/model", "tag": "2.1"}, "2.0", "example/model:2.1"),
        (
            {"repository": "example/model", "tag": "2.0"},
            "other/model:2.0",
            "example/model:2.0",
        ),
        (
            {"repository": "example/model", "tag": "2.0", "digest": DIGEST},
            "example/model:2.0",
            f"example/model@{DIGEST}",
        ),
        (
            {"repository": "example/model"},
            "0.1.0",
            "example/model with the chart's appVersion as tag",
        ),
    ],
)
def test_promote_rejects_other_image(
    fake_helm: FakeHelm, slot_image: dict[str, str], expected: str, running: str
) -> None:
    values = slot_values("blue", preview="green")
    values["app"]["slots"]["green"] = {"image": slot_image}
    fake_helm.set_values(values)

    result = invoke("promote", "--image", expected, *SCOPE)

    message = " ".join(result.stderr.split())
    assert result.exit_code == 1
    assert f"the preview slot green of release 'rel' runs {running}" in message
    assert f"not {ImageReference.parse(expected)}, the image that --image names" in (
        message
    )
    assert fake_helm.upgrades() == []


def test_promote_image_checks_finishing_slot(fake_helm: FakeHelm) -> None:
    values = slot_values("green", preview="blue", previous="blue")
    values["app"]["slots"]["green"] = {"image": {"tag": "2.0"}}
    fake_helm.set_values(values)

    rejected = invoke("promote", "--image", "1.0", *SCOPE)
    accepted = invoke("promote", "--image", "2.0", *SCOPE)

    assert accepted.exit_code == 0, accepted.output
    assert rejected.exit_code == 1
    assert "the active slot green of release 'rel' runs" in rejected.stderr


def test_promote_without_preview_fails(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("blue"))

    result = invoke("promote", *SCOPE)

    assert result.exit_code == 1
    assert "app.previewSlot is empty" in result.stderr
    assert "agogosml deploy --image TAG" in result.stderr
    assert fake_helm.upgrades() == []


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        (slot_values("blue", preview="purple"), "app.previewSlot is 'purple'"),
        (slot_values("blue", previous="Green"), "app.previousSlot is 'Green'"),
        (slot_values("green", preview="green"), "app.previewSlot is 'green', the"),
        (slot_values("blue", previous="blue"), "app.previousSlot is 'blue', the"),
    ],
)
@pytest.mark.parametrize("command", ["promote", "rollback", "deploy"])
def test_release_state_the_chart_rejects_is_named(
    fake_helm: FakeHelm, values: dict, problem: str, command: str
) -> None:
    fake_helm.set_values(values)
    extra = ["--image", "2.0"] if command == "deploy" else []

    result = invoke(command, *extra, *SCOPE)

    assert result.exit_code == 1, result.output
    assert problem in result.stderr
    assert "helm upgrade --reuse-values --set-string" in result.stderr
    assert "Traceback" not in result.output
    assert fake_helm.upgrades() == []


def test_release_idle_policy_the_chart_rejects_is_named(fake_helm: FakeHelm) -> None:
    values = slot_values("blue", preview="green")
    values["app"]["idleSlot"] = "cold"
    fake_helm.set_values(values)

    result = invoke("promote", *SCOPE)

    assert result.exit_code == 1, result.output
    assert "app.idleSlot is 'cold', expected scaleToZero or warm" in result.stderr
    assert fake_helm.upgrades() == []


def test_promote_missing_release_fails(fake_helm: FakeHelm) -> None:
    result = invoke("promote", *SCOPE)

    assert result.exit_code == 1
    assert "release 'rel' in namespace 'ml' does not exist" in result.stderr


def test_rollback_starts_previous_slot_first(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("green", previous="blue"))

    result = invoke("rollback", *SCOPE)

    assert result.exit_code == 0, result.output
    warm_up, switch = fake_helm.upgrades()
    assert set_strings(warm_up) == {
        "app.activeSlot": "green",
        "app.previewSlot": "blue",
        "app.previousSlot": "blue",
        **pinned("blue", "1.0"),
        **pinned("green"),
    }
    assert set_strings(switch) == {
        "app.activeSlot": "blue",
        "app.previewSlot": "",
        "app.previousSlot": "",
        **pinned("blue", "1.0"),
        **pinned("green"),
    }


def test_rollback_retry_after_failed_switch(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("green", preview="blue", previous="blue"))

    result = invoke("rollback", *SCOPE)

    assert result.exit_code == 0, result.output
    app = fake_helm.values()["app"]
    assert app["activeSlot"] == "blue"
    assert app["previewSlot"] == ""
    assert app["previousSlot"] == ""


def test_rollback_failed_switch_names_fix(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("green", previous="blue"))
    fake_helm.fail_after(1)

    result = invoke("rollback", *SCOPE)

    message = " ".join(result.stderr.split())
    assert result.exit_code == 1
    assert "The switch is not undone when pods do not become ready" in message
    assert "If it is still the green slot, run `agogosml rollback` again" in message
    assert "`agogosml rollback --no-wait`" in message


def test_rollback_switch_not_atomic(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("green", previous="blue"))

    result = invoke("rollback", *SCOPE)

    assert result.exit_code == 0, result.output
    warm_up, switch = fake_helm.upgrades()
    assert "--atomic" in warm_up
    assert "--atomic" not in switch
    assert "--wait" in switch
    assert set_strings(switch)["app.activeSlot"] == "blue"


def test_rollback_no_wait_switches_at_once(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("green", previous="blue"))

    result = invoke("rollback", *SCOPE, "--no-wait")

    assert result.exit_code == 0, result.output
    (switch,) = fake_helm.upgrades()
    assert "--wait" not in switch
    assert "--atomic" not in switch
    assert set_strings(switch)["app.activeSlot"] == "blue"


def test_rollback_warm_switches_at_once(fake_helm: FakeHelm) -> None:
    values = slot_values("green", previous="blue")
    values["app"]["idleSlot"] = "warm"
    fake_helm.set_values(values)

    result = invoke("rollback", *SCOPE)

    assert result.exit_code == 0, result.output
    (switch,) = fake_helm.upgrades()
    assert set_strings(switch)["app.activeSlot"] == "blue"


def test_rollback_warm_starts_slot_without_image(fake_helm: FakeHelm) -> None:
    values = slot_values("green", previous="blue")
    values["app"]["idleSlot"] = "warm"
    values["app"]["slots"] = {"green": {"image": {"tag": "2.0"}}}
    fake_helm.set_values(values)

    result = invoke("rollback", *SCOPE)

    assert result.exit_code == 0, result.output
    warm_up, switch = fake_helm.upgrades()
    assert set_strings(warm_up)["app.previewSlot"] == "blue"
    assert set_strings(warm_up)["app.activeSlot"] == "green"
    assert set_strings(switch)["app.activeSlot"] == "blue"
    assert slot_view(fake_helm.render())["blue"] == ("agogosml-sample-app:0.1.0", 2)


def test_rollback_without_previous_fails(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("green"))

    result = invoke("rollback", *SCOPE)

    assert result.exit_code == 1
    assert "app.previousSlot is empty" in result.stderr
    assert fake_helm.upgrades() == []


def test_release_flow_renders_each_state(fake_helm: FakeHelm) -> None:
    sample = "agogosml-sample-app"

    assert invoke("deploy", "--image", "1.0", *SCOPE).exit_code == 0
    installed = slot_view(fake_helm.render())
    assert invoke("deploy", "--image", "2.0", *SCOPE).exit_code == 0
    deployed = slot_view(fake_helm.render())
    assert invoke("promote", *SCOPE).exit_code == 0
    promoted = slot_view(fake_helm.render())
    assert invoke("rollback", *SCOPE).exit_code == 0
    rolled_back = slot_view(fake_helm.render())

    assert installed == {
        "service": "blue",
        "blue": (f"{sample}:1.0", 2),
        "green": (f"{sample}:0.1.0", 0),
    }
    assert deployed == {
        "service": "blue",
        "blue": (f"{sample}:1.0", 2),
        "green": (f"{sample}:2.0", 2),
    }
    assert promoted == {
        "service": "green",
        "blue": (f"{sample}:1.0", 0),
        "green": (f"{sample}:2.0", 2),
    }
    assert rolled_back == {
        "service": "blue",
        "blue": (f"{sample}:1.0", 2),
        "green": (f"{sample}:2.0", 0),
    }


# ---------------------------------------------------------------------------
# dry run and status
# ---------------------------------------------------------------------------


def test_dry_run_prints_command_and_renders(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("blue"))

    result = invoke("deploy", "--image", "2.0", "--dry-run", *SCOPE)

    assert result.exit_code == 0, result.output
    assert fake_helm.upgrades() == []
    assert f"Would run: {fake_helm.path} upgrade rel {CHART} --install" in result.stderr
    assert "--set-string app.previewSlot=green" in result.stderr
    view = slot_view([doc for doc in yaml.safe_load_all(result.stdout) if doc])
    assert view["service"] == "blue"
    assert view["green"] == ("agogosml-sample-app:2.0", 2)


def test_dry_run_without_cluster(fake_helm: FakeHelm) -> None:
    fake_helm.fail("unreachable")

    result = invoke("deploy", "--image", "2.0", "--dry-run", "--slot", "green", *SCOPE)

    assert result.exit_code == 0, result.output
    assert "assumes a new release" in result.stderr
    view = slot_view([doc for doc in yaml.safe_load_all(result.stdout) if doc])
    assert view["service"] == "green"
    assert view["green"] == ("agogosml-sample-app:2.0", 2)


def test_first_deploy_warm_leaves_other_slot_empty(
    fake_helm: FakeHelm, tmp_path: Path
) -> None:
    fake_helm.fail("unreachable")
    values_file = tmp_path / "warm.yaml"
    values_file.write_text("app:\n  idleSlot: warm\n")

    result = invoke(
        "deploy", "--image", "1.0", "--dry-run", "--values", str(values_file), *SCOPE
    )

    assert result.exit_code == 0, result.output
    view = slot_view([doc for doc in yaml.safe_load_all(result.stdout) if doc])
    assert view["service"] == "blue"
    assert view["blue"] == ("agogosml-sample-app:1.0", 2)
    assert view["green"][1] == 0


def test_status_counts_no_pods_without_image(fake_helm: FakeHelm) -> None:
    values = slot_values("blue")
    values["app"]["idleSlot"] = "warm"
    fake_helm.set_values(values)

    result = invoke("status", "--release", "rel", "--json")

    assert result.exit_code == 0, result.output
    slots = json.loads(result.stdout)["slots"]
    assert slots["blue"]["replicas"] == 2
    assert slots["green"]["replicas"] == 0
    assert slots["green"]["configuredReplicas"] == 2
    assert slots["green"]["image"] == "none (no image deployed)"
    assert slots["blue"]["image"] == "agogosml-sample-app:1.0"


def test_status_prints_slots(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("green", previous="blue"))

    result = invoke("status", "--release", "rel", "--namespace", "ml")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Release rel in namespace ml: deployed, revision 1")
    assert lines[2].split() == [
        "blue", "idle", "(scaleToZero)", "0", "agogosml-sample-app:1.0"
    ]  # fmt: skip
    assert lines[3].split() == ["green", "active", "2", "agogosml-sample-app:0.1.0"]
    assert lines[4] == "Rollback returns to: blue"


def test_status_labels_desired_replicas(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("green", previous="blue"))

    result = invoke("status", "--release", "rel", "--namespace", "ml")

    lines = result.stdout.splitlines()
    assert lines[1].split() == ["slot", "role", "desired", "replicas", "image"]
    assert "not ready pods" in lines[5]
    assert "kubectl get deployments --namespace ml" in lines[5]


def test_status_rejects_foreign_release(fake_helm: FakeHelm) -> None:
    fake_helm.set_values({"app": "a value of another chart"})

    result = invoke("status", "--release", "rel")

    assert result.exit_code != 0
    assert "not installed from the agogosml chart" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("slots", "key"),
    [
        ({"blue": {"image": "r/app:1"}}, "app.slots.blue.image"),
        ({"green": [["a", "b"]]}, "app.slots.green"),
    ],
)
def test_status_names_slot_value_not_mapping(
    fake_helm: FakeHelm, slots: dict[str, Any], key: str
) -> None:
    fake_helm.set_values({"app": {"slots": slots}})

    result = invoke("status", "--release", "rel")

    assert result.exit_code == 1, result.output
    assert f"the release sets {key} to" in result.output
    assert "not a mapping" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("command", "slots", "key"),
    [
        (["promote"], {"blue": 7}, "app.slots.blue"),
        (["rollback"], {"green": {"image": "r/app:1"}}, "app.slots.green.image"),
        (["deploy", "--image", "r/app:2"], "blue", "app.slots"),
    ],
)
def test_release_command_names_slot_value_not_mapping(
    fake_helm: FakeHelm, command: list[str], slots: Any, key: str
) -> None:
    values = slot_values("blue", preview="green", previous="green")
    values["app"]["slots"] = slots
    fake_helm.set_values(values)

    result = invoke(*command, "--release", "rel")

    assert result.exit_code == 1, result.output
    assert f"the release sets {key} to" in result.output
    assert "not a mapping" in result.output
    assert fake_helm.upgrades() == []


@pytest.mark.parametrize("replicas", ["two", 1e400, -1, True])
def test_status_names_invalid_replicas(fake_helm: FakeHelm, replicas: Any) -> None:
    fake_helm.set_values({"app": {"slots": {"blue": {"replicas": replicas}}}})

    result = invoke("status", "--release", "rel", "--json")

    assert result.exit_code == 1, result.output
    assert "app.slots.blue.replicas" in result.output
    assert "not a replica count" in result.output
    assert "Traceback" not in result.output


def test_status_json(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("blue", preview="green"))

    result = invoke("status", "--release", "rel", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["activeSlot"] == "blue"
    assert report["previewSlot"] == "green"
    assert report["revision"] == 1
    assert report["slots"]["green"] == {
        "role": "preview",
        "image": "agogosml-sample-app:0.1.0",
        "replicas": 2,
        "configuredReplicas": 2,
    }


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_unreachable_cluster_names_fix(fake_helm: FakeHelm) -> None:
    fake_helm.fail("unreachable")

    result = invoke("promote", *SCOPE)

    assert result.exit_code == 1
    assert "could not reach a Kubernetes cluster" in result.stderr
    assert "--kube-context" in result.stderr
    assert "--dry-run" in result.stderr


def test_failed_upgrade_reports_helm_output(fake_helm: FakeHelm) -> None:
    fake_helm.set_values(slot_values("blue", preview="green"))
    fake_helm.fail("upgrade-fails")

    result = invoke("promote", *SCOPE)

    assert result.exit_code == 1
    assert "helm failed to upgrade the release" in result.stderr
    assert "context deadline exceeded" in result.stderr


def test_missing_helm_names_fix(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent),
        "AGOGOSML_CACHE_DIR": str(tmp_path),
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop("HELM", None)

    result = subprocess.run(
        [sys.executable, "-m", "agogosml_cli.main", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert "helm was not found on PATH" in result.stderr
    assert "deployment/helm/helm.py fetch" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_helm_variable_names_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HELM", "/nonexistent/helm")

    result = invoke("status")

    assert result.exit_code == 1
    assert "HELM='/nonexistent/helm' is not an executable file" in result.stderr


def test_helm_for_other_platform_names_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "helm"
    binary.write_bytes(b"\x7fELF\x02\x01\x01 not a program for this machine")
    binary.chmod(0o755)
    monkeypatch.setenv("HELM", str(binary))

    result = invoke("status")

    assert result.exit_code == 1
    assert f"{str(binary)!r} cannot be run: Exec format error" in result.stderr
    assert "Helm 3 binary for this platform" in result.stderr


def test_helm_on_path_that_cannot_run_names_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "other-helm"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HELM", "other-helm")

    result = invoke("status")

    assert result.exit_code == 1
    assert "'other-helm' cannot be run" in result.stderr
    assert "was not found" not in result.stderr


def test_helm_output_not_utf8_is_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "helm"
    script.write_text("#!/bin/sh\nprintf 'Error: caf\\351 failed' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("HELM", str(script))

    result = invoke("status")

    assert result.exit_code == 1
    assert "helm: caf\ufffd failed" in result.stderr


def test_help_lists_release_options() -> None:
    result = invoke("deploy", "--help")

    for option in (
        "--image", "--slot", "--force", "--release", "--namespace", "--chart",
        "--values", "--kube-context", "--dry-run", "--timeout-seconds",
    ):  # fmt: skip
        assert option in result.stdout


def test_promote_help_lists_image() -> None:
    result = invoke("promote", "--help")

    assert "--image" in result.stdout


def test_timed_out_helm_stopped_with_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "signals.log"
    script = tmp_path / "slow-helm"
    script.write_text(
        "#!/bin/sh\n"
        f"trap 'echo TERM >> {log}; kill $!; exit 1' TERM\n"
        "sleep 30 >/dev/null 2>&1 &\n"
        "wait\n"
    )
    script.chmod(0o755)
    monkeypatch.setattr(helm, "STOP_GRACE_SECONDS", 5)
    target = helm.HelmTarget("scoring", "chart", namespace="ml", helm=str(script))

    with pytest.raises(helm.HelmError) as raised:
        helm.run_helm(target, ["upgrade"], timeout_seconds=1)

    assert log.read_text() == "TERM\n"
    assert "timed out after 1 s" in str(raised.value)
    assert "history scoring --namespace ml" in str(raised.value)


def interrupt_helm(
    script: Path, capsys: pytest.CaptureFixture[str], *options: str
) -> str:
    """Run `script` as helm upgrade, SIGINT this process alone, return stderr."""
    target = helm.HelmTarget(
        "scoring", "chart", namespace="ml", timeout_seconds=5, helm=str(script)
    )
    # A signal to this process alone, as a CI runner sends when it cancels.
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        helm.run_helm(target, ["upgrade", *options], timeout_seconds=30)
    timer.join()
    return " ".join(capsys.readouterr().err.split())


def test_interrupted_cli_passes_sigint_to_helm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "signals.log"
    script = tmp_path / "slow-helm"
    script.write_text(
        "#!/bin/sh\n"
        f"trap 'echo INT >> {log}; kill $!; exit 1' INT\n"
        "sleep 30 >/dev/null 2>&1 &\n"
        "wait\n"
    )
    script.chmod(0o755)

    message = interrupt_helm(script, capsys)

    assert log.read_text() == "INT\n"
    assert "upgrade` was interrupted, and Helm exited with code 1" in message
    assert "history scoring --namespace ml" in message


@pytest.mark.parametrize(
    ("options", "rolled_back"), [(["--atomic"], True), ([], False)]
)
def test_interrupted_atomic_upgrade_waits_for_rollback(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    options: list[str],
    rolled_back: bool,
) -> None:
    log = tmp_path / "signals.log"
    script = tmp_path / "rolling-back-helm"
    script.write_text(
        "#!/bin/sh\n"
        f"trap 'kill $!; sleep 2; echo ROLLED BACK >> {log}; exit 1' INT\n"
        "sleep 30 >/dev/null 2>&1 &\n"
        "wait\n"
    )
    script.chmod(0o755)
    monkeypatch.setattr(helm, "STOP_GRACE_SECONDS", 0.5)

    message = interrupt_helm(script, capsys, *options)

    # Without --atomic Helm has no rollback to finish, and is killed sooner.
    assert log.exists() == rolled_back
    assert ("rolls the interrupted upgrade back" in message) == rolled_back
    if rolled_back:
        assert "up to 5 s" in message
        assert "Helm exited with code 1" in message
    else:
        assert "Helm was ended by SIGKILL" in message


def test_interrupted_helm_killed_by_signal_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "helm-without-handler"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)

    message = interrupt_helm(script, capsys)

    assert "upgrade` was interrupted, and Helm was ended by SIGINT." in message
    assert "exited with code -" not in message


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (1, "Helm exited with code 1"),
        (-signal.SIGKILL, "Helm was ended by SIGKILL"),
        (-35, "Helm was ended by signal 35"),
    ],
)
def test_helm_exit_described(code: int, text: str) -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    process.returncode = code

    assert helm._exit_text(process) == text


def test_helm_failure_without_output_names_command() -> None:
    target = helm.HelmTarget("scoring", "chart", namespace="ml", helm="helm")
    command = ["helm", "get", "values", "scoring", "--namespace", "ml"]
    result = subprocess.CompletedProcess(command, 3, "", "")

    with pytest.raises(helm.HelmError) as raised:
        helm.check_result(target, result, "read the release values")

    message = str(raised.value)
    assert "helm failed to read the release values (exit code 3)" in message
    assert "(no output). Check that 'helm' is Helm 3" in message
    assert "The command was `helm get values scoring --namespace ml`" in message


def with_chart_values(values: dict[str, Any]) -> dict[str, Any]:
    chart_values = yaml.safe_load(
        (Path(helm.__file__).parents[1] / "helm/agogosml/values.yaml").read_text()
    )
    return merge(chart_values, values)


def status_text(values: dict[str, Any], status: str = "deployed") -> str:
    release = {"name": "rel", "namespace": "ml", "info": {"status": status}}
    return " ".join(
        format_status(status_report(with_chart_values(values), release)).split()
    )


@pytest.mark.parametrize(
    "shape",
    [
        {"info": "deployed", "chart": ["agogosml"]},
        {"info": None, "chart": {"metadata": 1}},
    ],
)
def test_status_of_release_in_odd_shape(shape: dict[str, Any]) -> None:
    release = {"name": "rel", "namespace": "ml", **shape}

    values = with_chart_values(slot_values("green", previous="blue"))

    report = status_report(values, release)

    assert report["status"] == ""
    assert report["lastDeployed"] == ""
    assert report["activeSlot"] == "green"


def test_status_explains_pending_release() -> None:
    text = status_text(slot_values("green", previous="blue"), "pending-upgrade")

    assert "The release is pending-upgrade" in text
    assert "`helm rollback rel --namespace ml REVISION`" in text


def test_status_explains_half_done_rollback() -> None:
    text = status_text(slot_values("green", preview="blue", previous="blue"))

    assert "The blue slot is both in preview and the rollback target" in text
    assert "a promote or a rollback stopped between its two upgrades" in text
    assert "`agogosml promote` stays on the green slot" in text
    assert "`agogosml rollback` switches to the blue slot" in text


def test_status_names_promote_for_preview() -> None:
    text = status_text(slot_values("green", preview="blue"))

    assert "The blue slot waits in preview: `agogosml promote`" in text


def test_status_quiet_when_settled() -> None:
    text = status_text(slot_values("green", previous="blue"))

    assert "agogosml promote" not in text
    assert "helm rollback" not in text
