"""Blue/green releases of the model app with the agogosml Helm chart.

The chart runs the model app in two slots, blue and green. Three values
record the state of a release, and every command here reads them from the
release and writes them back with ``helm upgrade --install --atomic``:

- ``app.activeSlot``: the slot that the app Service sends traffic to.
- ``app.previewSlot``: the slot that `deploy` put a new image on, running but
  not yet promoted ("" when none). Between the two upgrades of `promote` or
  `rollback` it is the slot in app.previousSlot, kept running.
- ``app.previousSlot``: the slot that was active before the last `promote`,
  which `rollback` returns to ("" when none).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import yaml

from agogosml_cli import helm
from agogosml_cli.helm import HelmError, HelmTarget
from agogosml_cli.manifest import NAMESPACE_PATTERN
from agogosml_cli.slot_images import (
    ImageReference,
    check_image_values,
    describe_image,
    ignored_image_values,
    image_settings,
    slot_image,
    unset_service_images,
)
from agogosml_cli.yaml_loader import DuplicateKeyError, load_unique_keys

SLOTS = ("blue", "green")
IDLE_POLICIES = ("scaleToZero", "warm")
DEFAULT_RELEASE = "agogosml"
DEFAULT_CHART = Path(__file__).resolve().parents[1] / "helm" / "agogosml"

#: Slot values of a release installed without them, as in the chart's values.yaml.
CHART_DEFAULT_STATE = {
    "activeSlot": "blue",
    "previewSlot": "",
    "previousSlot": "",
    "idleSlot": "scaleToZero",
}

# Helm allows dot-separated RFC 1123 labels of up to 53 characters in all, but
# the chart names its Services after the release, and a Service name must be a
# DNS-1035 label: it starts with a letter and has no dots.
_RELEASE_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_RELEASE_NAME_LENGTH = 53
#: Upper bound of --timeout-seconds: a day, far beyond the minutes a rollout takes.
MAX_TIMEOUT_SECONDS = 86_400


class ReleaseStateError(HelmError):
    """The release's slot values do not allow the requested step."""


NOT_AGOGOSML = (
    "the release's values have no app.slots.blue and app.slots.green, so it was "
    "not installed from the agogosml chart; check --release and --namespace"
)


@dataclass(frozen=True)
class SlotState:
    """Slot values of a release: see the module docstring."""

    active: str
    preview: str
    previous: str
    idle_policy: str

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> SlotState:
        """Read the state from release values, filling in the chart's defaults."""
        app_values = values.get("app")
        if app_values is not None and not isinstance(app_values, dict):
            raise ReleaseStateError(NOT_AGOGOSML)
        _check_slot_mappings(app_values or {})
        app = {**CHART_DEFAULT_STATE, **(app_values or {})}
        state = cls(
            active=str(app["activeSlot"]),
            preview=str(app["previewSlot"] or ""),
            previous=str(app["previousSlot"] or ""),
            idle_policy=str(app["idleSlot"]),
        )
        if state.active not in SLOTS:
            raise ReleaseStateError(
                f"the release's app.activeSlot is {state.active!r}, expected blue or "
                "green. Fix it with `helm upgrade --reuse-values --set "
                "app.activeSlot=blue`."
            )
        state._check_recorded_slots()
        if state.idle_policy not in IDLE_POLICIES:
            raise ReleaseStateError(
                f"the release's app.idleSlot is {state.idle_policy!r}, expected "
                f"{' or '.join(IDLE_POLICIES)}. Fix it with `helm upgrade "
                "--reuse-values --set app.idleSlot=scaleToZero`."
            )
        return state

    def _check_recorded_slots(self) -> None:
        """Reject a preview or previous slot that the chart would reject."""
        for field_name, slot in (
            ("previewSlot", self.preview),
            ("previousSlot", self.previous),
        ):
            fix = (
                "Fix it with `helm upgrade --reuse-values --set-string "
                f"app.{field_name}=` (empty: no slot), then run the command again."
            )
            if slot and slot not in SLOTS:
                raise ReleaseStateError(
                    f"the release's app.{field_name} is {slot!r}, expected blue, "
                    f"green or empty. {fix}"
                )
            if slot == self.active:
                raise ReleaseStateError(
                    f"the release's app.{field_name} is {slot!r}, the active slot "
                    f"too, which the chart rejects. {fix}"
                )

    @property
    def idle(self) -> str:
        """The slot that does not take traffic."""
        return other_slot(self.active)

    def settings(self) -> dict[str, str]:
        """Return the --set-string settings that write this state."""
        return {
            "app.activeSlot": self.active,
            "app.previewSlot": self.preview,
            "app.previousSlot": self.previous,
        }

    def replicas(self, slot: str, configured: int, *, has_image: bool) -> int:
        """Return the replicas that the chart gives `slot`, as its templates do.

        An idle slot runs pods only with idleSlot warm and an image tag or
        digest of its own (`has_image`).
        """
        if slot in (self.active, self.preview):
            return configured
        return configured if self.idle_policy == "warm" and has_image else 0


def check_mapping(key: str, value: Any) -> None:
    """Reject release values where the chart expects a mapping."""
    if not isinstance(value, dict):
        raise ReleaseStateError(
            f"the release sets {key} to {value!r}, which is not a mapping as the "
            "chart expects; fix it with agogosml deploy --values, or with helm "
            "upgrade --reuse-values --set"
        )


def _check_slot_mappings(app: dict[str, Any]) -> None:
    """Reject slot values that are set but are no mapping.

    The release commands set keys below ``app.slots.<slot>.image``, and Helm
    fails on such a value with a Go error that names no key.
    """
    slots = app.get("slots")
    if slots is None:
        return
    check_mapping("app.slots", slots)
    for slot in SLOTS:
        slot_values = slots.get(slot)
        if slot_values is None:
            continue
        check_mapping(f"app.slots.{slot}", slot_values)
        check_mapping(f"app.slots.{slot}.image", slot_values.get("image") or {})


def other_slot(slot: str) -> str:
    """Return the slot that is not `slot`."""
    return "green" if slot == "blue" else "blue"


def slot_has_image(values: dict[str, Any], slot: str) -> bool:
    """Return whether release values give `slot` an image tag or digest.

    Without one the chart runs no pods on the slot while it is idle, even
    with idleSlot warm.
    """
    app = values.get("app")
    slots = app.get("slots") if isinstance(app, dict) else None
    slot_values = slots.get(slot) if isinstance(slots, dict) else None
    image = slot_values.get("image") if isinstance(slot_values, dict) else None
    if not isinstance(image, dict):
        return False
    return bool(image.get("tag") or image.get("digest"))


def fullname(release: str, values: dict[str, Any]) -> str:
    """Return the prefix of the release's resource names, as the chart builds it."""
    override = str(values.get("fullnameOverride") or "")
    if override:
        return override[:51].rstrip("-")
    name = str(values.get("nameOverride") or "agogosml")
    prefix = release if name in release else f"{release}-{name}"
    return prefix[:51].rstrip("-")


@dataclass(frozen=True)
class InstalledRelease:
    """A release that exists, as a release command reads it before an upgrade.

    Attributes:
        name: Helm release name.
        values: The release's user-supplied values, from `helm get values`.
        chart_defaults: Default values of the chart that the upgrade installs,
            which --reset-then-reuse-values puts under `values`.
    """

    name: str
    values: dict[str, Any]
    chart_defaults: dict[str, Any]

    @property
    def state(self) -> SlotState:
        """Slot values of the release."""
        return SlotState.from_values(self.values)

    def image(self, slot: str) -> dict[str, str]:
        """Return the repository, tag and digest of `slot`'s image.

        A key that the release values do not set takes the chart's default.
        """
        return slot_image([self.chart_defaults, self.values], slot)

    def pinned_images(self, *, except_slot: str = "") -> dict[str, str]:
        """Return the settings that keep every slot but `except_slot` on its image.

        An upgrade passes them after the --values files, so a values file
        cannot change the image of a slot that the command does not deploy to.
        """
        settings: dict[str, str] = {}
        for slot in SLOTS:
            if slot != except_slot:
                settings.update(image_settings(slot, self.image(slot)))
        return settings


# ---------------------------------------------------------------------------
# Plans: the upgrades that each command runs, as --set-string settings
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One upgrade of a plan.

    Attributes:
        settings: --set-string settings of the upgrade.
        if_failed: Added to the error when the upgrade fails. It describes the
            release after the earlier steps and the command that finishes.
    """

    settings: dict[str, str]
    if_failed: str = ""
    #: Whether Helm undoes the upgrade when its pods do not become ready.
    atomic: bool = True
    #: Whether Helm waits for the release's pods to become ready.
    wait: bool = True


@dataclass(frozen=True)
class Plan:
    """Upgrades that one command runs in order, and the message printed after them.

    Attributes:
        steps: The upgrades, in order.
        message: Printed when every upgrade succeeded.
        state: Slot values after the last upgrade.
        pinned: Image settings that keep slots on their images, which values
            files cannot change.
        warnings: Printed on stderr before the upgrades.
    """

    steps: list[Step]
    message: str
    state: SlotState
    pinned: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def plan_deploy(
    installed: InstalledRelease | None,
    image: ImageReference,
    slot: str | None,
    *,
    force: bool,
) -> Plan:
    """Plan putting `image` on the idle slot, or on `slot`.

    A new release (`installed` is None) gets the image on `slot`, blue by
    default, as its active slot. On an existing release every other slot
    keeps its image.
    """
    if installed is None:
        target = slot or CHART_DEFAULT_STATE["activeSlot"]
        state = SlotState(target, "", "", CHART_DEFAULT_STATE["idleSlot"])
        message = f"Installed {image} on the {target} slot, which is active."
        settings = {**state.settings(), **image.settings(target)}
        return Plan([Step(settings)], message, state)

    current = installed.state
    target = slot or current.idle
    if target == current.active and not force:
        raise ReleaseStateError(
            f"--slot {target} is the active slot of release {installed.name!r}, "
            f"which takes traffic. Deploy to the idle slot {current.idle} (omit "
            "--slot), or pass --force to replace the active slot's image in place."
        )
    pinned = installed.pinned_images(except_slot=target)
    if target == current.active:
        message = f"Replaced the image of the active {target} slot with {image}."
        settings = {**current.settings(), **pinned, **image.settings(target)}
        return Plan([Step(settings)], message, current, pinned)

    warnings = _check_replaced_image(installed, target, image, force=force)
    # The idle slot no longer contains the previous version once it gets a new
    # image, so there is nothing to roll back to.
    previous = "" if current.previous == target else current.previous
    state = SlotState(current.active, target, previous, current.idle_policy)
    preview_service = f"{fullname(installed.name, installed.values)}-app-preview"
    message = (
        f"Deployed {image} to the {target} slot, in preview. Smoke test it through "
        f"Service {preview_service}, then run `agogosml promote`."
    )
    settings = {**state.settings(), **pinned, **image.settings(target)}
    return Plan([Step(settings)], message, state, pinned, warnings)


def _check_replaced_image(
    installed: InstalledRelease, target: str, image: ImageReference, *, force: bool
) -> tuple[str, ...]:
    """Check a deploy onto the idle slot `target` that replaces an image.

    Replacing the rollback target is the usual next release, so it only gets a
    warning. Replacing another image in preview, not yet promoted, needs
    `force`, because that image may belong to a release still under test.

    Returns:
        Warnings that name the replaced image.

    Raises:
        ReleaseStateError: naming the preview image that the deploy would
            replace, without `force`.
    """
    current = installed.state
    running = describe_image(installed.image(target))
    if target == current.previous:
        return (
            f"replacing {running} on the {target} slot, the image that `agogosml "
            "rollback` would return to: the release has no rollback target until "
            "the next promote.",
        )
    if target == current.preview and not image.matches(installed.image(target)):
        problem = (
            f"the {target} slot of release {installed.name!r} is in preview with "
            f"{running}, deployed and not yet promoted. Deploying {image} there "
            "replaces it. Promote it first with `agogosml promote`, or pass --force "
            "to replace it."
        )
        warning = f"--force replaces {running}, which was in preview and not promoted."
    else:
        return ()
    if not force:
        raise ReleaseStateError(problem)
    return (warning,)


def plan_promote(
    installed: InstalledRelease, expected: ImageReference | None = None
) -> Plan:
    """Plan switching the app Service to the preview slot.

    With idleSlot scaleToZero a first upgrade switches the Service and keeps
    the slot that was active running, as the preview slot, so that its pods
    still serve the requests that reach them while the switch takes effect.
    A second upgrade then scales that slot to zero. Between the two, the
    slot that was active is both the preview slot and app.previousSlot, as
    in the middle of a rollback. A promote from that state runs only the
    second upgrade.

    With `expected`, the plan is rejected unless the slot that becomes
    active runs that image.
    """
    current = installed.state
    if not current.preview:
        raise ReleaseStateError(
            f"release {installed.name!r} has no slot in preview (app.previewSlot is "
            "empty). Run `agogosml deploy --image TAG` first."
        )
    switched = current.preview == current.previous
    promoted = current.active if switched else current.preview
    replaced = other_slot(promoted)
    if expected is not None:
        role = "active" if switched else "preview"
        _check_promoted_image(installed, promoted, role, expected)
    pinned = installed.pinned_images()
    steps = []
    if_failed = ""
    if current.idle_policy != "warm":
        if not switched:
            switch = SlotState(promoted, replaced, replaced, current.idle_policy)
            steps.append(Step({**switch.settings(), **pinned}))
        if_failed = (
            f"The app Service already points at the {promoted} slot, and the "
            f"{replaced} slot still runs its pods. Run `agogosml promote` again to "
            f"scale the {replaced} slot down, or `agogosml rollback` to return to it."
        )
    state = SlotState(promoted, "", replaced, current.idle_policy)
    steps.append(Step({**state.settings(), **pinned}, if_failed))
    message = (
        f"Promoted the {state.active} slot: it takes traffic now. "
        f"`agogosml rollback` returns to the {state.previous} slot."
    )
    return Plan(steps, message, state, pinned)


def _check_promoted_image(
    installed: InstalledRelease, slot: str, role: str, expected: ImageReference
) -> None:
    """Reject a promote whose slot does not run the image that --image names."""
    running = installed.image(slot)
    if expected.matches(running):
        return
    raise ReleaseStateError(
        f"the {role} slot {slot} of release {installed.name!r} runs "
        f"{describe_image(running)}, not {expected}, the image that --image names. "
        "Nothing was changed. Deploy that image and promote it, or check --image."
    )


def plan_rollback(installed: InstalledRelease, *, wait: bool = True) -> Plan:
    """Plan switching the app Service back to the previous slot.

    With idleSlot scaleToZero the previous slot runs no pods, and neither
    does it with warm when it has no image tag or digest of its own. A
    first upgrade then starts them as the preview slot and waits until they
    are ready. Only then does a second upgrade switch the Service, so that it
    never points at a slot without ready pods. The first upgrade keeps
    app.previousSlot, so a rollback whose second upgrade failed can be run
    again. Without `wait`, one upgrade switches the Service at once and Helm
    waits for no pod: the way back from a slot so broken that the release's
    pods never all become ready.
    """
    current = installed.state
    if not current.previous:
        raise ReleaseStateError(
            f"release {installed.name!r} records no previous slot (app.previousSlot is "
            "empty): nothing was promoted since the last rollback, or the previous "
            "slot got a new image. Deploy the image to return to and promote it."
        )
    pinned = installed.pinned_images()
    previous_running = current.idle_policy == "warm" and slot_has_image(
        installed.values, current.previous
    )
    steps = []
    if wait and not previous_running:
        warm_up = SlotState(
            current.active, current.previous, current.previous, current.idle_policy
        )
        steps.append(Step({**warm_up.settings(), **pinned}))
    state = SlotState(current.previous, "", "", current.idle_policy)
    # Not atomic: when the slot that is rolled back from is broken, its pods,
    # and the reader that waits for them, do not become ready, and Helm would
    # undo the switch that restores the service.
    if_failed = (
        "The switch is not undone when pods do not become ready in time: "
        "`agogosml status` shows which slot the app Service points at now. If it "
        f"is still the {current.active} slot, run `agogosml rollback` again, or "
        "`agogosml rollback --no-wait` when that slot's broken pods keep the "
        "release from becoming ready."
    )
    steps.append(
        Step({**state.settings(), **pinned}, if_failed, atomic=False, wait=wait)
    )
    message = f"Rolled back to the {state.active} slot: it takes traffic now."
    return Plan(steps, message, state, pinned)


# ---------------------------------------------------------------------------
# Running a plan
# ---------------------------------------------------------------------------


def read_release_values(target: HelmTarget) -> dict[str, Any] | None:
    """Return the release's user-supplied values, or None if it does not exist.

    Raises:
        ClusterUnreachableError: No cluster was reachable.
    """
    try:
        return helm.get_values(target)
    except helm.ReleaseNotFoundError:
        return None


# The first line of `helm get values` without --output, which is not YAML data.
_VALUES_HEADERS = ("USER-SUPPLIED VALUES:", "COMPUTED VALUES:")


def load_release_values(path: Path) -> dict[str, Any]:
    """Read release values from a file that `helm get values` wrote.

    The file is YAML or JSON, as ``--output yaml`` and ``--output json``
    print it. The header line that Helm prints without ``--output`` is
    skipped, and an empty file or ``null`` means a release without values.

    Raises:
        click.BadParameter: The file is not YAML, or not a mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise click.BadParameter(
            f"{str(path)!r} is not UTF-8 text (byte {exc.start}); write the output "
            "of `helm get values RELEASE --output yaml` to it",
            param_hint="--release-values",
        ) from None
    lines = text.splitlines()
    if lines and lines[0].strip() in _VALUES_HEADERS:
        text = "\n".join(lines[1:])
    try:
        values = load_unique_keys(text, str(path))
    except DuplicateKeyError as exc:
        raise click.BadParameter(
            f"{str(path)!r}: {exc}", param_hint="--release-values"
        ) from None
    except yaml.YAMLError as exc:
        raise click.BadParameter(
            f"{str(path)!r} is not YAML or JSON: {exc}", param_hint="--release-values"
        ) from None
    except RecursionError:
        raise click.BadParameter(
            f"{str(path)!r} nests too deeply for release values",
            param_hint="--release-values",
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise click.BadParameter(
            f"{str(path)!r} contains a {type(values).__name__}, not a mapping of "
            "values; write the output of `helm get values RELEASE --output yaml` "
            "to it",
            param_hint="--release-values",
        )
    return values


def execute(
    target: HelmTarget,
    plan: Plan,
    release_values: dict[str, Any] | None,
    *,
    dry_run: bool,
) -> None:
    """Run the plan's upgrades, or with `dry_run` print them and render the result."""
    check_image_values(target.values_files, SLOTS)
    install = release_values is None
    commands = [
        helm.upgrade_args(
            target,
            step.settings,
            install=install,
            atomic=step.atomic,
            wait=step.wait,
        )
        for step in plan.steps
    ]
    warnings = [*plan.warnings, *ignored_image_values(target.values_files, plan.pinned)]
    for warning in warnings:
        click.echo(f"Warning: {warning}", err=True)
    if dry_run:
        for args in commands:
            click.echo(f"Would run: {helm.command_line(target, args)}", err=True)
        merged: dict[str, str] = {}
        for step in plan.steps:
            merged.update(step.settings)
        click.echo(helm.template(target, release_values, merged), nl=False)
        return
    for step, args in zip(plan.steps, commands, strict=True):
        click.echo(f"Running: {helm.command_line(target, args)}", err=True)
        try:
            helm.upgrade(target, args)
        except HelmError as error:
            if not step.if_failed:
                raise
            raise HelmError(f"{error.message}\n{step.if_failed}") from error
    click.echo(plan.message)


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def check_release_name(
    context: click.Context | None, parameter: click.Parameter | None, value: str
) -> str:
    """Reject a release name that Helm or the chart's Service names would reject.

    Raises:
        click.BadParameter: naming the value and the rule.
    """
    if len(value) <= MAX_RELEASE_NAME_LENGTH and _RELEASE_NAME.match(value):
        return value
    raise click.BadParameter(
        f"{value!r} is not a valid release name. A release name has 1 to "
        f"{MAX_RELEASE_NAME_LENGTH} lowercase letters, digits and '-', starts with "
        "a letter and ends with a letter or digit, such as 'scoring' or "
        "'fraud-scoring-2': the chart names Kubernetes Services after it"
    )


def check_namespace(
    context: click.Context, parameter: click.Parameter, value: str | None
) -> str | None:
    """Reject a namespace that Kubernetes would reject, before Helm runs.

    Raises:
        click.BadParameter: naming the value and the rule.
    """
    if value is None or re.fullmatch(NAMESPACE_PATTERN, value):
        return value
    raise click.BadParameter(
        f"{value!r} is not a valid Kubernetes namespace. A namespace has 1 to 63 "
        "lowercase letters, digits and '-', and starts and ends with a letter or "
        "digit, such as 'ml' or 'fraud-prod'"
    )


def _target_options(function: Callable[..., None]) -> Callable[..., None]:
    """Add the options that select the release, the chart and the cluster."""
    options = [
        click.option(
            "--release",
            default=DEFAULT_RELEASE,
            show_default=True,
            callback=check_release_name,
            help="Helm release name: lowercase letters, digits and '-', starting "
            "with a letter and ending with a letter or digit, at most "
            f"{MAX_RELEASE_NAME_LENGTH} characters.",
        ),
        click.option(
            "--namespace",
            "-n",
            callback=check_namespace,
            help="Kubernetes namespace. Default: the kubeconfig's current namespace.",
        ),
        click.option(
            "--chart",
            default=str(DEFAULT_CHART),
            show_default="helm/agogosml in this repository",
            help="Chart directory, packaged chart or chart reference.",
        ),
        click.option(
            "--values",
            "-f",
            "values_files",
            multiple=True,
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Values file passed to helm upgrade; repeat for several.",
        ),
        click.option(
            "--kube-context",
            help="kubeconfig context. Default: the current context.",
        ),
        click.option(
            "--dry-run",
            is_flag=True,
            help="Print the helm upgrade command and render the manifests with "
            "helm template instead of changing the release. Without a reachable "
            "cluster, deploy assumes a new release, and promote and rollback "
            "need --release-values.",
        ),
        click.option(
            "--release-values",
            "release_values_file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="With --dry-run: the release's current values, as `helm get "
            "values RELEASE --output yaml` prints them, used in place of reading "
            "them from the cluster, so the dry run needs no cluster.",
        ),
        click.option(
            "--timeout-seconds",
            type=click.IntRange(min=1, max=MAX_TIMEOUT_SECONDS),
            default=300,
            show_default=True,
            help="How long helm waits for the pods to become ready, in seconds, "
            f"at most {MAX_TIMEOUT_SECONDS} (a day). An upgrade that runs with "
            "--atomic is rolled back after that; the switch of rollback runs "
            "without it and stays.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _make_target(
    release: str,
    namespace: str | None,
    chart: str,
    values_files: tuple[Path, ...],
    kube_context: str | None,
    timeout_seconds: int,
) -> HelmTarget:
    if chart == str(DEFAULT_CHART) and not DEFAULT_CHART.is_dir():
        raise click.BadParameter(
            f"the default chart {chart} does not exist, which happens when "
            "agogosml is not installed from a clone of its repository. Pass the "
            "chart's path or reference.",
            param_hint="--chart",
        )
    return HelmTarget(
        release=release,
        chart=chart,
        namespace=namespace,
        kube_context=kube_context,
        values_files=values_files,
        timeout_seconds=timeout_seconds,
    )


@click.command()
@click.option(
    "--image",
    required=True,
    help="Image of the model app: TAG (in the slot's repository), "
    "REPOSITORY:TAG or REPOSITORY@sha256:DIGEST.",
)
@click.option(
    "--slot",
    type=click.Choice(SLOTS),
    help="Slot to deploy to. Default: the idle slot, or blue for a new release.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Allow a deploy that replaces an image the release still needs: the "
    "active slot's (with --slot, in a rolling update) or a preview image not yet "
    "promoted.",
)
@_target_options
def deploy(
    image: str,
    slot: str | None,
    force: bool,
    dry_run: bool,
    release_values_file: Path | None,
    **target_options: Any,
) -> None:
    """Put a new model app image on the idle slot, in preview.

    The slot starts its pods next to the active slot, and the preview Service
    reaches it for a smoke test. `agogosml promote` then switches traffic to
    it. On a new release the image goes to the active slot.
    """
    reference = ImageReference.parse(image)
    values = _values_from_file(release_values_file, dry_run)
    target = _make_target(**target_options)
    if values is None:
        values = _deploy_values(target, dry_run=dry_run)
    installed = None if values is None else _installed_release(target, values)
    plan = plan_deploy(installed, reference, slot, force=force)
    if installed is None:
        new_release = unset_service_images(target.values_files)
        plan = replace(plan, warnings=(*plan.warnings, *new_release))
    execute(target, plan, values, dry_run=dry_run)


@click.command()
@click.option(
    "--image",
    help="Promote only if the preview slot runs this image: TAG, REPOSITORY:TAG "
    "or REPOSITORY@sha256:DIGEST, as given to deploy. A TAG matches the tag in "
    "any repository. Default: no check.",
)
@_target_options
def promote(
    image: str | None,
    dry_run: bool,
    release_values_file: Path | None,
    **target_options: Any,
) -> None:
    """Switch the app Service to the preview slot that `deploy` prepared.

    The slot that was active becomes idle and is recorded as the slot that
    `agogosml rollback` returns to.
    """
    expected = None if image is None else ImageReference.parse(image)
    values = _values_from_file(release_values_file, dry_run)
    target = _make_target(**target_options)
    if values is None:
        values = _require_release(target, dry_run=dry_run)
    plan = plan_promote(_installed_release(target, values), expected)
    execute(target, plan, values, dry_run=dry_run)


@click.command()
@_target_options
@click.option(
    "--no-wait",
    "no_wait",
    is_flag=True,
    help="Switch the app Service at once, without waiting for any pod to become "
    "ready. For a slot so broken that the release's pods never all become ready.",
)
def rollback(
    dry_run: bool,
    release_values_file: Path | None,
    no_wait: bool,
    **target_options: Any,
) -> None:
    """Switch the app Service back to the slot that was active before promote."""
    values = _values_from_file(release_values_file, dry_run)
    target = _make_target(**target_options)
    if values is None:
        values = _require_release(target, dry_run=dry_run)
    plan = plan_rollback(_installed_release(target, values), wait=not no_wait)
    execute(target, plan, values, dry_run=dry_run)


def _values_from_file(path: Path | None, dry_run: bool) -> dict[str, Any] | None:
    """Return the values of --release-values, or None when it is not given."""
    if path is None:
        return None
    if not dry_run:
        raise click.UsageError(
            "--release-values applies only with --dry-run: a command that changes "
            "the release reads its values from the cluster. Add --dry-run, or "
            "remove --release-values"
        )
    return load_release_values(path)


def _installed_release(target: HelmTarget, values: dict[str, Any]) -> InstalledRelease:
    """Return the release with the defaults of the chart that it is upgraded to."""
    return InstalledRelease(target.release, values, helm.show_values(target))


def _deploy_values(target: HelmTarget, *, dry_run: bool) -> dict[str, Any] | None:
    """Return the release's values, or None for a new release.

    In a dry run an unreachable cluster counts as a new release, so deploy can
    be tried without a cluster.
    """
    try:
        return read_release_values(target)
    except helm.ClusterUnreachableError:
        if not dry_run:
            raise
    click.echo(
        "No cluster is reachable, so the release state is unknown: the dry run "
        "assumes a new release. Pass the release's values with --release-values "
        "to dry-run an upgrade of it.",
        err=True,
    )
    return None


def _require_release(target: HelmTarget, *, dry_run: bool) -> dict[str, Any]:
    """Return the values of a release that must exist.

    Raises:
        ReleaseStateError: The release does not exist, or a dry run cannot
            reach the cluster to read its values.
        ClusterUnreachableError: No cluster was reachable, outside a dry run.
    """
    try:
        values = read_release_values(target)
    except helm.ClusterUnreachableError:
        if not dry_run:
            raise
        raise ReleaseStateError(
            f"no cluster is reachable, so the state of {target.describe()} is "
            "unknown, and this dry run needs it. Pass the release's values with "
            "--release-values FILE: the output of `helm get values RELEASE "
            "--output yaml` on a machine that reaches the cluster, or a file that "
            "sets app.activeSlot, app.previewSlot and app.previousSlot."
        ) from None
    if values is None:
        raise ReleaseStateError(
            f"{target.describe()} does not exist. Install it with `agogosml deploy "
            "--image TAG`, or check --release, --namespace and --kube-context."
        )
    return values


COMMANDS = (deploy, promote, rollback)
