"""Run Helm for the release commands and turn its failures into clear errors."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from agogosml_cli.local import signal_name

#: Seconds that a command which reads release state may take.
READ_TIMEOUT_SECONDS = 120
#: Seconds added to twice Helm's own --timeout before the subprocess is stopped.
UPGRADE_GRACE_SECONDS = 60
#: Seconds that Helm gets to exit after SIGTERM or SIGINT before it is killed.
STOP_GRACE_SECONDS = 30

_HELM_HINT = (
    "Install Helm 3 and put `helm` on PATH, set HELM to its path, or build the "
    "pinned version with `python deployment/helm/helm.py fetch`."
)
_CLUSTER_HINT = (
    "Check KUBECONFIG and --kube-context. deploy, promote and rollback also take "
    "--dry-run, which prints the helm command and renders the manifests; without "
    "a cluster, promote and rollback need --release-values for it."
)


class HelmError(click.ClickException):
    """A Helm command failed or Helm is missing. The message names the fix."""


class ReleaseNotFoundError(HelmError):
    """The release does not exist in the namespace."""


class ClusterUnreachableError(HelmError):
    """Helm could not reach a Kubernetes cluster."""


def find_helm() -> str:
    """Return the Helm executable: HELM, else `helm` on PATH, else the cached build."""
    configured = os.environ.get("HELM")
    if configured:
        if shutil.which(configured) is None:
            raise HelmError(
                f"HELM={configured!r} is not an executable file. Set HELM to the "
                "path of a Helm 3 binary or unset it."
            )
        return configured
    on_path = shutil.which("helm")
    if on_path is not None:
        return on_path
    cache_dir = os.environ.get("AGOGOSML_CACHE_DIR") or "~/.cache/agogosml"
    cached = Path(cache_dir).expanduser() / "bin" / "helm"
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    raise HelmError(f"helm was not found on PATH or in {cached.parent}. {_HELM_HINT}")


@dataclass(frozen=True)
class HelmTarget:
    """Release, chart and cluster that one release command works on.

    Attributes:
        release: Helm release name.
        chart: Chart directory or reference, as `helm upgrade` takes it.
        namespace: Kubernetes namespace, or None for the kubeconfig's current one.
        kube_context: kubeconfig context, or None for the current one.
        values_files: Values files passed to every upgrade with --values.
        timeout_seconds: How long Helm waits for the pods to become ready.
        helm: Helm executable.
    """

    release: str
    chart: str
    namespace: str | None = None
    kube_context: str | None = None
    values_files: tuple[Path, ...] = ()
    timeout_seconds: int = 300
    helm: str = field(default_factory=find_helm)

    def scope_args(self) -> list[str]:
        """Return the --namespace and --kube-context arguments."""
        args: list[str] = []
        if self.namespace:
            args += ["--namespace", self.namespace]
        if self.kube_context:
            args += ["--kube-context", self.kube_context]
        return args

    def describe(self) -> str:
        """Return 'release NAME in namespace NS' for messages."""
        namespace = self.namespace or "the current namespace"
        if self.namespace:
            namespace = f"namespace {self.namespace!r}"
        return f"release {self.release!r} in {namespace}"


def run_helm(
    target: HelmTarget, args: Sequence[str], *, timeout_seconds: float
) -> subprocess.CompletedProcess[str]:
    """Run Helm with `args` and return the finished process, failed or not."""
    command = [target.helm, *args]
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
    except OSError as exc:
        # HELM may name a program on PATH, such as HELM=helm3.
        located = shutil.which(target.helm) or target.helm
        if not os.path.isfile(located):
            raise HelmError(f"{target.helm!r} was not found. {_HELM_HINT}") from None
        # The file exists but cannot run, as a binary built for another
        # platform cannot, or a script whose #! interpreter is missing.
        raise HelmError(
            f"{target.helm!r} cannot be run: {exc.strerror or exc}. Check that it "
            f"is a Helm 3 binary for this platform. {_HELM_HINT}"
        ) from None
    try:
        stdout, stderr = process.communicate(timeout=timeout_seconds)
    except KeyboardInterrupt:
        _interrupt(process, target, command, rolls_back="--atomic" in args)
        raise
    except subprocess.TimeoutExpired:
        _stop(process)
        raise HelmError(
            f"`{shlex.join(command)}` timed out after {timeout_seconds:.0f} s. "
            "Check the cluster, or raise --timeout-seconds. An upgrade cut short "
            f"can leave the release pending: `{target.helm} history "
            f"{shlex.join([target.release, *target.scope_args()])}` shows its "
            "state, and `helm rollback` to the last deployed revision clears it."
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _interrupt(
    process: subprocess.Popen[str],
    target: HelmTarget,
    command: list[str],
    *,
    rolls_back: bool = False,
) -> None:
    """Pass a SIGINT on to Helm, await its exit, and print how to check the release.

    A Ctrl-C in a terminal reaches Helm too, but a SIGINT sent to this process
    alone, as a CI runner sends when it cancels a job, would leave Helm
    running unattended. Helm's output is read while it exits, so that it is
    not killed by a closed pipe. An interrupted upgrade with --atomic
    (`rolls_back`) is rolled back by Helm, which waits up to --timeout for the
    rollback's pods, so Helm gets that long too. A second interrupt kills it.
    """
    process.send_signal(signal.SIGINT)
    grace = STOP_GRACE_SECONDS
    if rolls_back:
        grace += target.timeout_seconds
        print(
            "Helm rolls the interrupted upgrade back (--atomic), which may take "
            f"up to {target.timeout_seconds} s. Interrupt again to stop Helm at "
            "once; that can leave the release pending.",
            file=sys.stderr,
        )
    try:
        process.communicate(timeout=grace)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        process.kill()
        process.communicate()
    scope = shlex.join([target.release, *target.scope_args()])
    print(
        f"`{shlex.join(command)}` was interrupted, and {_exit_text(process)}. "
        "`agogosml status` shows the slots of the release, "
        f"and `{target.helm} history {scope}` whether it is left pending; "
        f"`{target.helm} rollback {scope} REVISION` to the last deployed "
        "revision clears a pending state.",
        file=sys.stderr,
    )


def _exit_text(process: subprocess.Popen[str]) -> str:
    """Describe how Helm ended: a negative return code is the signal that ended it."""
    code = process.returncode
    if code >= 0:
        return f"Helm exited with code {code}"
    return f"Helm was ended by {signal_name(-code)}"


def _stop(process: subprocess.Popen[str]) -> None:
    """Stop Helm with SIGTERM, which it handles, and kill it if it does not exit."""
    process.terminate()
    try:
        process.communicate(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


def check_result(
    target: HelmTarget, result: subprocess.CompletedProcess[str], action: str
) -> None:
    """Raise the `HelmError` that matches a failed Helm command's output."""
    if result.returncode == 0:
        return
    # Helm starts its message with "Error: ", which click adds again.
    output = _last_lines(result.stderr or result.stdout, 20).removeprefix("Error: ")
    if "Kubernetes cluster unreachable" in output:
        raise ClusterUnreachableError(
            f"helm could not reach a Kubernetes cluster to {action}. "
            f"{_CLUSTER_HINT}\nhelm: {output}"
        )
    if "release: not found" in output:
        raise ReleaseNotFoundError(
            f"{target.describe()} was not found. Install it with `agogosml deploy "
            "--image TAG`, or check --release and --namespace."
        )
    hints = schema_hints(output, target.chart)
    if "another operation" in output and "in progress" in output:
        scope = shlex.join([target.release, *target.scope_args()])
        hints.append(
            "An earlier upgrade or rollback did not finish, and the release is "
            f"left pending. `{target.helm} history {scope}` shows its revisions; "
            f"`{target.helm} rollback {scope} REVISION` to the last deployed one "
            "clears the pending state, and then the command can run again."
        )
    if not output.strip():
        output = (
            f"(no output). Check that {target.helm!r} is Helm 3: "
            f"`{target.helm} version` prints its version. The command was "
            f"`{shlex.join(result.args)}`"
        )
    raise HelmError(
        f"helm failed to {action} (exit code {result.returncode}).\nhelm: {output}"
        + "".join(f"\n{hint}" for hint in hints)
    )


#: The variables that the chart sets itself, and where their values come from.
CHART_SET_VARIABLES = {
    "READER_SOURCE": "transport",
    "WRITER_SINK": "transport",
    "READER_INPUT": "reader.topics",
    "WRITER_OUTPUT": "writer.topic",
    "READER_APP_URL": "the release's app Service",
    "APP_WRITER_URL": "the release's writer Service",
    "READER_HOST": "the pod (all addresses)",
    "WRITER_HOST": "the pod (all addresses)",
    "APP_HOST": "the pod (all addresses)",
    "READER_PORT": "reader.port",
    "WRITER_PORT": "writer.port",
    "APP_PORT": "app.port",
    "READER_APP_TOKEN": "auth.appToken",
    "APP_TOKEN": "auth.appToken",
    "APP_WRITER_TOKEN": "auth.writerToken",
    "WRITER_TOKEN": "auth.writerToken",
    "KAFKA_GROUP_ID": "reader.groupId",
    "KAFKA_AUTO_OFFSET_RESET": "reader.autoOffsetReset",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka.bootstrapServers",
    "KAFKA_SECURITY_PROTOCOL": "kafka.securityProtocol",
    "KAFKA_SASL_MECHANISM": "kafka.sasl.mechanism",
    "KAFKA_SASL_USERNAME": "kafka.sasl.username",
    "KAFKA_SASL_PASSWORD": "kafka.sasl.password",
    "KAFKA_SSL_CA_LOCATION": "kafka.caCertificate",
    "KAFKA_EVENTHUBS_CONNECTION_STRING": "kafka.eventHubsConnectionString",
    "EVENTHUB_FULLY_QUALIFIED_NAMESPACE": "eventhubs.fullyQualifiedNamespace",
    "EVENTHUB_CONSUMER_GROUP": "eventhubs.consumerGroup",
    "EVENTHUB_STARTING_POSITION": "eventhubs.startingPosition",
    "EVENTHUB_CHECKPOINT_STORE_CONTAINER": "eventhubs.checkpointStore.container",
    "EVENTHUB_CHECKPOINT_STORE_ACCOUNT_URL": "eventhubs.checkpointStore.accountUrl",
}
#: The variables that only a file source or sink reads.
FILE_ONLY_VARIABLES = frozenset(
    {
        "READER_STOP_AT_END",
        "READER_MAX_LINE_BYTES",
        "READER_CHECKPOINT_PATH",
        "READER_ROTATE_WAIT_MS",
        "WRITER_FSYNC",
    }
)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]+")
_ADDITIONAL = re.compile(
    r"- at '(?P<path>[^']*)': additional properties (?P<names>.+) not allowed"
)
_NOT_OBJECT = re.compile(r"- at '(?P<path>[^']*)': got \w+, want object")


def schema_hints(output: str, chart: str) -> list[str]:
    """Return a fix for each values schema error in Helm's `output`.

    Helm names the path of an unknown key, or of a plain value where the
    chart wants an object, but not the keys allowed there. They come from
    the chart's ``values.schema.json``; a chart without one gets no hints.
    """
    try:
        schema = json.loads((Path(chart) / "values.schema.json").read_text())
    except (OSError, ValueError):
        return []
    hints = []
    for match in _ADDITIONAL.finditer(output):
        node = _schema_at(schema, match["path"])
        allowed = sorted((node or {}).get("properties", {}))
        where = match["path"].rstrip("/") + "/"
        for name in re.findall(r"'([^']*)'", match["names"]):
            if not _PLAIN_KEY.fullmatch(name):
                continue  # Quoted in Helm's message in a way that cannot be split.
            hint = f"hint: {where}{name} is not a chart value"
            if name in FILE_ONLY_VARIABLES:
                hints.append(
                    f"hint: {name} applies only to a file source or sink, and the "
                    f"chart runs Kafka or Event Hubs: remove {where}{name}"
                )
                continue
            if name in CHART_SET_VARIABLES:
                hints.append(
                    f"hint: the chart sets {name} itself, from "
                    f"{CHART_SET_VARIABLES[name]}; set that, not {where}{name}"
                )
                continue
            close = difflib.get_close_matches(name, allowed, n=1)
            if close:
                hints.append(f"{hint}; did you mean {where}{close[0]}?")
            elif allowed:
                hints.append(f"{hint}; the values there are {', '.join(allowed)}")
    for match in _NOT_OBJECT.finditer(output):
        node = _schema_at(schema, match["path"])
        if node and "existingSecret" in node.get("properties", {}):
            hints.append(
                f"hint: {match['path']} takes a Kubernetes Secret, never the secret "
                "itself: set {existingSecret: SECRET, key: KEY}, after `kubectl "
                "create secret generic SECRET --from-literal=KEY=...`"
            )
    if hints:
        hints.append("Check the files given with --values and the --set options.")
    return hints


def _schema_at(schema: dict[str, Any], path: str) -> dict[str, Any] | None:
    """Return the schema of the value at a JSON pointer such as '/kafka/sasl'."""
    node: Any = schema
    for part in [part for part in path.split("/") if part]:
        node = _resolve(schema, node)
        properties = node.get("properties") if isinstance(node, dict) else None
        if not isinstance(properties, dict) or part not in properties:
            return None
        node = properties[part]
    node = _resolve(schema, node)
    return node if isinstance(node, dict) else None


def _resolve(schema: dict[str, Any], node: Any) -> Any:
    """Follow a local ``$ref`` such as '#/definitions/image'."""
    while isinstance(node, dict) and str(node.get("$ref", "")).startswith("#/"):
        target: Any = schema
        for part in node["$ref"][2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        node = target
    return node


def get_values(target: HelmTarget, *, all_values: bool = False) -> dict[str, Any]:
    """Return the release's values: user-supplied ones, or with `all_values` all.

    Raises:
        ReleaseNotFoundError: The release does not exist.
        ClusterUnreachableError: No cluster was reachable.
    """
    args = ["get", "values", target.release, "--output", "json", *target.scope_args()]
    if all_values:
        args.append("--all")
    result = run_helm(target, args, timeout_seconds=READ_TIMEOUT_SECONDS)
    check_result(target, result, "read the release values")
    return _parse_json_object(result.stdout, "helm get values") or {}


def get_status(target: HelmTarget) -> dict[str, Any]:
    """Return `helm status` of the release as a dictionary."""
    args = ["status", target.release, "--output", "json", *target.scope_args()]
    result = run_helm(target, args, timeout_seconds=READ_TIMEOUT_SECONDS)
    check_result(target, result, "read the release status")
    return _parse_json_object(result.stdout, "helm status") or {}


def show_values(target: HelmTarget) -> dict[str, Any]:
    """Return the default values of the target's chart, from `helm show values`.

    Raises:
        HelmError: Helm could not read the chart, or printed no YAML mapping.
    """
    args = ["show", "values", target.chart]
    result = run_helm(target, args, timeout_seconds=READ_TIMEOUT_SECONDS)
    check_result(target, result, f"read the default values of chart {target.chart}")
    try:
        values = yaml.safe_load(result.stdout)
    except yaml.YAMLError as exc:
        raise HelmError(f"helm show values printed invalid YAML: {exc}") from None
    if values is not None and not isinstance(values, dict):
        raise HelmError(
            f"helm show values printed {type(values).__name__}, expected a mapping"
        )
    return values or {}


def upgrade_args(
    target: HelmTarget,
    settings: dict[str, str],
    *,
    install: bool,
    atomic: bool = True,
    wait: bool = True,
) -> list[str]:
    """Return the `helm upgrade --install --wait` arguments that apply `settings`.

    --wait waits for the release's pods to become ready, unless `wait` is
    False, and --atomic, unless `atomic` or `wait` is False, undoes an upgrade
    whose pods did not. --reset-then-reuse-values keeps the values of the release's
    last upgrade and takes new defaults from the chart. Values files come
    next, and the slot settings last, as --set-string so that a tag such as
    1.10 stays a string.
    """
    args = [
        "upgrade",
        target.release,
        target.chart,
        "--install",
        *(["--atomic"] if atomic and wait else []),
        *(["--wait"] if wait else []),
        "--timeout",
        f"{target.timeout_seconds}s",
        "--reset-then-reuse-values",
        *target.scope_args(),
    ]
    if install and target.namespace:
        args.append("--create-namespace")
    for path in target.values_files:
        args += ["--values", str(path)]
    for key, value in settings.items():
        args += ["--set-string", f"{key}={value}"]
    return args


def upgrade(target: HelmTarget, args: list[str]) -> None:
    """Run a `helm upgrade` built by `upgrade_args` and wait for it.

    With --atomic, Helm waits up to --timeout for the upgrade and as long again
    for the rollback of a failed one, so it gets twice the timeout.
    """
    timeout = 2 * target.timeout_seconds + UPGRADE_GRACE_SECONDS
    result = run_helm(target, args, timeout_seconds=timeout)
    action = (
        "upgrade the release (--atomic rolls a failed upgrade back)"
        if "--atomic" in args
        else "upgrade the release (without --atomic: the changes stay applied)"
    )
    check_result(target, result, action)


def template(
    target: HelmTarget, release_values: dict[str, Any] | None, settings: dict[str, str]
) -> str:
    """Render the chart with the values that an upgrade would use, without a cluster.

    `release_values` replaces the release's current values, which
    --reset-then-reuse-values would carry over.
    """
    args = ["template", target.release, target.chart]
    if target.namespace:
        args += ["--namespace", target.namespace]
    with _temporary_values_file(release_values) as current:
        if current is not None:
            args += ["--values", current]
        for path in target.values_files:
            args += ["--values", str(path)]
        for key, value in settings.items():
            args += ["--set-string", f"{key}={value}"]
        result = run_helm(target, args, timeout_seconds=READ_TIMEOUT_SECONDS)
    check_result(target, result, "render the chart")
    return result.stdout


def command_line(target: HelmTarget, args: Sequence[str]) -> str:
    """Return the shell command line of a Helm call, quoted for copying."""
    return shlex.join([target.helm, *args])


@contextlib.contextmanager
def _temporary_values_file(values: dict[str, Any] | None) -> Iterator[str | None]:
    """Yield the path of a JSON file with `values`, or None without values."""
    if not values:
        yield None
        return
    handle, name = tempfile.mkstemp(prefix="agogosml-values-", suffix=".json")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(values, file)
        yield name
    finally:
        Path(name).unlink(missing_ok=True)


def _parse_json_object(text: str, source: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(text or "null")
    except json.JSONDecodeError as exc:
        raise HelmError(
            f"{source} printed invalid JSON ({exc}): {text[:200]!r}"
        ) from None
    if parsed is not None and not isinstance(parsed, dict):
        raise HelmError(f"{source} printed {type(parsed).__name__}, expected an object")
    return parsed


def _last_lines(text: str, count: int) -> str:
    return "\n".join(text.strip().splitlines()[-count:])
