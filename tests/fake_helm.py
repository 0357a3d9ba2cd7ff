"""Stand-in for the `helm` executable in the release command tests.

It records each call's arguments and keeps one release's values in a
directory, so the release commands run as against a cluster:

- ``get values`` prints the stored values as JSON (``--all`` adds the chart's
  defaults), or fails as Helm does when the release does not exist.
- ``status`` prints a release object with the revision count.
- ``upgrade`` applies the ``--set-string`` settings to the stored values, as
  ``--reset-then-reuse-values`` keeps them, and counts a revision.
- ``template`` and ``show`` run the real Helm binary.

Files in FAKE_HELM_DIR switch failures on: ``unreachable`` makes every
cluster command fail as with no cluster, ``upgrade-fails`` makes upgrades fail,
and ``upgrades-before-failure`` holds a count of upgrades that succeed before
the next ones fail.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "agogosml"
UNREACHABLE = (
    "Error: Kubernetes cluster unreachable: Get "
    '"http://localhost:8080/version": dial tcp 127.0.0.1:8080: connect: '
    "connection refused"
)


def main(argv: list[str]) -> int:
    state_dir = Path(os.environ["FAKE_HELM_DIR"])
    with open(state_dir / "calls.jsonl", "a") as calls:
        calls.write(json.dumps(argv) + "\n")

    command = argv[0]
    if command in ("template", "show"):
        real_helm = os.environ["FAKE_HELM_REAL"]
        os.execv(real_helm, [real_helm, *argv])
    if (state_dir / "unreachable").exists():
        print(UNREACHABLE, file=sys.stderr)
        return 1
    values_path = state_dir / "values.json"
    if command == "upgrade":
        return upgrade(state_dir, values_path, argv)
    if not values_path.exists():
        print("Error: release: not found", file=sys.stderr)
        return 1
    values = json.loads(values_path.read_text())
    if command == "get":
        if "--all" in argv:
            values = merge(yaml.safe_load((CHART / "values.yaml").read_text()), values)
        print(json.dumps(values))
        return 0
    if command == "status":
        print(json.dumps(release_object(state_dir, argv)))
        return 0
    print(f"Error: fake helm does not implement {command!r}", file=sys.stderr)
    return 1


def upgrade(state_dir: Path, values_path: Path, argv: list[str]) -> int:
    if upgrade_fails(state_dir):
        print(
            "Error: UPGRADE FAILED: release rel failed, and has been rolled back "
            "due to atomic being set: context deadline exceeded",
            file=sys.stderr,
        )
        return 1
    values = json.loads(values_path.read_text()) if values_path.exists() else {}
    for index, arg in enumerate(argv):
        if arg == "--set-string":
            key, _, value = argv[index + 1].partition("=")
            set_path(values, key.split("."), value)
    values_path.write_text(json.dumps(values))
    revision = state_dir / "revision"
    count = int(revision.read_text()) if revision.exists() else 0
    revision.write_text(str(count + 1))
    return 0


def upgrade_fails(state_dir: Path) -> bool:
    if (state_dir / "upgrade-fails").exists():
        return True
    budget = state_dir / "upgrades-before-failure"
    if not budget.exists():
        return False
    remaining = int(budget.read_text())
    if remaining <= 0:
        return True
    budget.write_text(str(remaining - 1))
    return False


def release_object(state_dir: Path, argv: list[str]) -> dict[str, Any]:
    namespace = argv[argv.index("--namespace") + 1] if "--namespace" in argv else ""
    return {
        "name": argv[1],
        "namespace": namespace or "default",
        "version": int((state_dir / "revision").read_text()),
        "info": {"status": "deployed", "last_deployed": "2026-01-02T03:04:05Z"},
        "chart": {"metadata": {"name": "agogosml", "appVersion": "0.1.0"}},
    }


def set_path(values: dict[str, Any], keys: list[str], value: str) -> None:
    for key in keys[:-1]:
        values = values.setdefault(key, {})
    values[keys[-1]] = value


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
