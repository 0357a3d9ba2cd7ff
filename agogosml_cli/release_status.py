"""`agogosml status`: the slots of a blue/green release, read from Helm."""

from __future__ import annotations

import json
from typing import Any

import click

from agogosml_cli import helm
from agogosml_cli.helm import HelmTarget
from agogosml_cli.release import (
    DEFAULT_RELEASE,
    NOT_AGOGOSML,
    SLOTS,
    ReleaseStateError,
    SlotState,
    check_mapping,
    check_namespace,
    check_release_name,
    slot_has_image,
)

#: The image of an idle slot that release values give no tag or digest, so
#: that it runs no pods.
NO_IMAGE = "none (no image deployed)"


@click.command()
@click.option(
    "--release",
    default=DEFAULT_RELEASE,
    show_default=True,
    callback=check_release_name,
    help="Helm release name.",
)
@click.option(
    "--namespace",
    "-n",
    callback=check_namespace,
    help="Kubernetes namespace. Default: the kubeconfig's current namespace.",
)
@click.option("--kube-context", help="kubeconfig context. Default: the current one.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(
    release: str, namespace: str | None, kube_context: str | None, as_json: bool
) -> None:
    """Print the active, preview and idle slots with their images.

    Replica counts are the desired replicas that the release values give each
    slot's Deployment, not the pods that are ready.
    """
    target = HelmTarget(
        release=release, chart="", namespace=namespace, kube_context=kube_context
    )
    report = status_report(
        helm.get_values(target, all_values=True), helm.get_status(target)
    )
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_status(report))


def _replica_count(slot: str, value: Any) -> int:
    """Return the replica count of a slot, or raise when the release has none."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ReleaseStateError(
        f"the release sets app.slots.{slot}.replicas to {value!r}, which is not a "
        "replica count; set it to a whole number of 0 or more with agogosml "
        "deploy --values, or with helm upgrade --reuse-values --set"
    )


def status_report(values: dict[str, Any], release: dict[str, Any]) -> dict[str, Any]:
    """Return the slot state of a release from `helm get values --all` and status."""
    state = SlotState.from_values(values)
    try:
        slot_values_by_name = {slot: values["app"]["slots"][slot] for slot in SLOTS}
    except (KeyError, TypeError):
        raise ReleaseStateError(NOT_AGOGOSML) from None
    for slot, slot_values in slot_values_by_name.items():
        check_mapping(f"app.slots.{slot}", slot_values)
        check_mapping(f"app.slots.{slot}.image", slot_values.get("image") or {})
    app_version = str(_field(release, "chart", "metadata", "appVersion") or "")
    slots = {}
    for slot in SLOTS:
        slot_values = slot_values_by_name[slot]
        configured = _replica_count(slot, slot_values.get("replicas", 0))
        has_image = slot_has_image(values, slot)
        role = _role(state, slot)
        image = _image_name(slot_values.get("image") or {}, app_version)
        slots[slot] = {
            "role": role,
            # An active or preview slot without a tag runs the chart's
            # appVersion, but an idle one runs nothing.
            "image": image if has_image or role != "idle" else NO_IMAGE,
            "replicas": state.replicas(slot, configured, has_image=has_image),
            "configuredReplicas": configured,
        }
    return {
        "release": release.get("name", ""),
        "namespace": release.get("namespace", ""),
        "status": _field(release, "info", "status") or "",
        "revision": release.get("version", 0),
        "lastDeployed": _field(release, "info", "last_deployed") or "",
        "activeSlot": state.active,
        "previewSlot": state.preview,
        "previousSlot": state.previous,
        "idleSlot": state.idle_policy,
        "slots": slots,
    }


def _field(document: Any, *path: str) -> Any:
    """Return the value at `path` in the nested objects of Helm's JSON, or None.

    A part of the path that is missing or not an object gives None, so a
    release that Helm describes in an unexpected shape still gets a status.
    """
    for key in path:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


def format_status(report: dict[str, Any]) -> str:
    """Return `status_report` as lines of text."""
    lines = [
        f"Release {report['release']} in namespace {report['namespace']}: "
        f"{report['status']}, revision {report['revision']}, last deployed "
        f"{report['lastDeployed']}",
        f"{'slot':<7}{'role':<19}{'desired replicas':<18}image",
    ]
    for slot, row in report["slots"].items():
        role = row["role"]
        if role == "idle":
            role = f"idle ({report['idleSlot']})"
        lines.append(f"{slot:<7}{role:<19}{row['replicas']:<18}{row['image']}")
    previous = report["previousSlot"] or "none recorded"
    lines.append(f"Rollback returns to: {previous}")
    lines.append(
        "Desired replicas come from the release values, not ready pods: "
        f"`kubectl get deployments --namespace {report['namespace']}` shows those."
    )
    lines.extend(_next_steps(report))
    return "\n".join(lines)


def _next_steps(report: dict[str, Any]) -> list[str]:
    """Return what to do about a release left in a state that needs a command."""
    steps = []
    scope = f"{report['release']} --namespace {report['namespace']}"
    status = str(report["status"])
    if status.startswith("pending-"):
        steps.append(
            f"The release is {status}: an upgrade, install or rollback is under "
            "way, or was cut short. Once none runs, `helm history "
            f"{scope}` shows the revisions, and `helm rollback {scope} "
            "REVISION` to the last deployed one clears the state."
        )
    elif status == "failed":
        steps.append(
            "The last upgrade failed. Its changes may stay applied (the switch "
            "of a rollback is not undone): the slots above are the release's "
            "values now. Run the command again, or `helm history "
            f"{scope}` to see what was applied."
        )
    preview, previous = report["previewSlot"], report["previousSlot"]
    if preview and preview == previous:
        steps.append(
            f"The {preview} slot is both in preview and the rollback target: a "
            "promote or a rollback stopped between its two upgrades, and the "
            f"app Service points at the {report['activeSlot']} slot. `agogosml "
            f"promote` stays on the {report['activeSlot']} slot and scales the "
            f"{preview} slot down, and `agogosml rollback` switches to the "
            f"{preview} slot."
        )
    elif preview:
        steps.append(
            f"The {preview} slot waits in preview: `agogosml promote` switches "
            "traffic to it."
        )
    return steps


def _role(state: SlotState, slot: str) -> str:
    if slot == state.active:
        return "active"
    if slot == state.preview:
        return "preview"
    return "idle"


def _image_name(image: dict[str, Any], app_version: str) -> str:
    repository = image.get("repository", "")
    if image.get("digest"):
        return f"{repository}@{image['digest']}"
    return f"{repository}:{image.get('tag') or app_version}"
