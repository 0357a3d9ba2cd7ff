"""Read a docker-compose file into the plan that `agogosml up` carries out.

`agogosml up` runs a compose file through the Docker Engine API, so that it
works wherever that API responds, Podman's included, without the compose
plugin. It supports the part of the Compose Specification that pipelines
use: services with an image or a build, environment, ports, bind and named
volumes, entrypoint, command, user, labels, health checks, restart policies
and `depends_on` conditions. A key outside that part stops `up` with the key's
name, so nothing is silently dropped.

Variables in values are interpolated as Compose does (``$VAR``, ``${VAR}``,
``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}``, ``$$``) from the
environment, then from the ``.env`` file next to the compose file.
"""

from __future__ import annotations

import graphlib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agogosml.errors import AgogosmlError
from agogosml_cli.yaml_loader import DuplicateKeyError, load_unique_keys

#: Label that marks the services a pipeline's own Kafka broker consists of.
#: ``agogosml up --kafka`` skips them and points the others at another broker.
KAFKA_ROLE_LABEL = "io.agogosml.role"
KAFKA_ROLE = "kafka"

_SERVICE_KEYS = {
    "build",
    "command",
    "container_name",
    "depends_on",
    "entrypoint",
    "environment",
    "healthcheck",
    "image",
    "labels",
    "ports",
    "read_only",
    "restart",
    "tmpfs",
    "user",
    "volumes",
}
_TOP_LEVEL_KEYS = {"name", "services", "volumes", "version"}
_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
_RESTART_POLICIES = {"no", "always", "on-failure", "unless-stopped"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REFERENCE = re.compile(
    r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>.*))?", re.S
)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_UNITS_NS = {"us": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}
#: Project names as Compose accepts them.
_PROJECT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_SERVICE_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]*")
#: Maximum number of values in a compose file after YAML aliases are
#: expanded. A few hundred bytes of nested aliases expand to billions.
MAX_VALUES = 100_000


class ComposeError(AgogosmlError):
    """A compose file that `agogosml up` cannot run, with the reason and fix."""


@dataclass(frozen=True)
class Build:
    """The ``build`` section of a service."""

    context: Path
    dockerfile: str = "Dockerfile"
    args: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthCheck:
    """A health check, with durations in nanoseconds as the Engine API takes them."""

    test: list[str]
    interval_ns: int = 30_000_000_000
    timeout_ns: int = 30_000_000_000
    retries: int = 3
    start_period_ns: int = 0

    def to_api(self) -> dict[str, Any]:
        """Return the check in the form of the Engine API's ``Healthcheck``."""
        return {
            "test": self.test,
            "interval": self.interval_ns,
            "timeout": self.timeout_ns,
            "retries": self.retries,
            "start_period": self.start_period_ns,
        }


@dataclass(frozen=True)
class Dependency:
    """One entry of ``depends_on``."""

    service: str
    condition: str = "service_started"
    required: bool = True


@dataclass(frozen=True)
class Port:
    """A published port."""

    container_port: int
    host_port: int | None
    host_ip: str | None = None
    protocol: str = "tcp"


@dataclass(frozen=True)
class Mount:
    """A bind mount (``source`` is a host path) or a named volume."""

    source: str
    target: str
    read_only: bool = False
    named: bool = False


@dataclass(frozen=True)
class Volume:
    """A top-level named volume: created by `up` unless it is external."""

    key: str
    name: str | None = None
    external: bool = False

    def engine_name(self, project: str) -> str:
        """Return the volume's name on the engine."""
        if self.name:
            return self.name
        return self.key if self.external else f"{project}_{self.key}"


@dataclass
class Service:
    """One service of the compose file, interpolated and checked."""

    name: str
    image: str | None = None
    build: Build | None = None
    environment: dict[str, str] = field(default_factory=dict)
    ports: list[Port] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)
    tmpfs: list[str] = field(default_factory=list)
    depends_on: list[Dependency] = field(default_factory=list)
    healthcheck: HealthCheck | None = None
    entrypoint: list[str] | None = None
    command: list[str] | None = None
    user: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    restart: str = "no"
    read_only: bool = False
    container_name: str | None = None

    @property
    def is_kafka(self) -> bool:
        """True for the services of the pipeline's own Kafka broker."""
        return self.labels.get(KAFKA_ROLE_LABEL) == KAFKA_ROLE


@dataclass
class ComposeProject:
    """A compose file ready to run: its name, directory and services."""

    name: str
    directory: Path
    services: dict[str, Service]
    volumes: dict[str, Volume] = field(default_factory=dict)

    @property
    def network(self) -> str:
        """Name of the project's default network, as Compose names it."""
        return f"{self.name}_default"

    def container_name(self, service: Service) -> str:
        """Return the container's name, as Compose names a service's first one."""
        return service.container_name or f"{self.name}-{service.name}-1"

    def start_order(self) -> list[Service]:
        """Return the services so that each comes after those it depends on."""
        graph = {
            name: {dependency.service for dependency in service.depends_on}
            for name, service in self.services.items()
        }
        try:
            order = list(graph_order(graph))
        except graphlib.CycleError as error:
            cycle = " -> ".join(error.args[1])
            raise ComposeError(
                f"depends_on forms a cycle: {cycle}. Remove one of these dependencies."
            ) from None
        return [self.services[name] for name in order]

    def use_external_kafka(self, bootstrap_servers: str) -> list[str]:
        """Drop the project's Kafka services and point the others at another broker.

        Returns:
            The names of the dropped services.
        """
        host = bootstrap_servers.split(",")[0].rsplit(":", 1)[0].strip("[]")
        if host == "localhost" or host.startswith("127.") or host == "::1":
            raise ComposeError(
                f"--kafka {bootstrap_servers} is a loopback address, which inside a "
                "container is the container itself. Give an address that the "
                "containers reach, such as the gateway of the project's network "
                "(docs/containers.md shows how)."
            )
        dropped = [name for name, service in self.services.items() if service.is_kafka]
        if not dropped:
            raise ComposeError(
                f"no service carries the label {KAFKA_ROLE_LABEL}={KAFKA_ROLE}, so "
                "--kafka has no broker service to replace. Label the broker "
                "services, or leave out --kafka."
            )
        for name in dropped:
            del self.services[name]
        for service in self.services.values():
            service.depends_on = [
                dependency
                for dependency in service.depends_on
                if dependency.service not in dropped
            ]
            if "KAFKA_BOOTSTRAP_SERVERS" in service.environment:
                service.environment["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap_servers
        return dropped


def graph_order(graph: Mapping[str, set[str]]) -> tuple[str, ...]:
    """Return the nodes of `graph` with every node after its dependencies."""
    return tuple(graphlib.TopologicalSorter(graph).static_order())


def load_compose(
    path: Path, environ: Mapping[str, str], project_name: str | None = None
) -> ComposeProject:
    """Read, interpolate and check a compose file.

    Args:
        path: The compose file.
        environ: Variables for interpolation. They take precedence over the
            ``.env`` file next to the compose file.
        project_name: Overrides the file's ``name``.

    Raises:
        ComposeError: The file is missing, is not YAML, or uses something
            that `agogosml up` does not support. The message names the key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ComposeError(
            f"cannot read the compose file {path}: {error.strerror}. "
            "Run the command in a generated project, or pass --file."
        ) from None
    except UnicodeDecodeError as error:
        raise ComposeError(
            f"{path} is not UTF-8 text (byte {error.start}). Save it as UTF-8."
        ) from None
    try:
        raw = load_unique_keys(text, str(path))
    except DuplicateKeyError as error:
        raise ComposeError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ComposeError(f"{path} is not valid YAML: {error}") from None
    except RecursionError:
        raise ComposeError(f"{path} nests too deeply. Flatten it.") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict):
        raise ComposeError(f"{path} has no services mapping. Add a services: section.")
    if not raw["services"]:
        raise ComposeError(f"{path} defines no services. Add at least one.")
    # Unknown keys are rejected before interpolation expands any aliases.
    _reject_unknown(raw, _TOP_LEVEL_KEYS, "the top level")
    for service_name, spec in raw["services"].items():
        if isinstance(spec, Mapping):
            _reject_unknown(spec, _SERVICE_KEYS, f"service {service_name}")
    variables = {**read_env_file(path.parent / ".env"), **environ}
    data = _interpolate(raw, variables, "", [0])
    name = _project_name(project_name, data.get("name"), path)
    directory = path.parent.resolve()
    services = {}
    for key, spec in data["services"].items():
        service_name = str(key)
        if not _SERVICE_NAME.fullmatch(service_name):
            raise ComposeError(
                f"service name {service_name!r} is not valid. Use letters, digits, "
                "dots, dashes and underscores, starting with a letter or digit."
            )
        services[service_name] = _service(service_name, spec, directory, variables)
    volumes = _volumes(data.get("volumes"))
    _check_references(services, volumes)
    project = ComposeProject(
        name=name, directory=directory, services=services, volumes=volumes
    )
    project.start_order()
    return project


def _project_name(explicit: str | None, from_file: Any, path: Path) -> str:
    for value, source in ((explicit, "--project-name"), (from_file, "name:")):
        if value is None or value == "":
            continue
        if not isinstance(value, str) or not _PROJECT_NAME.fullmatch(value):
            raise ComposeError(
                f"project name {value!r} from {source} is not valid. Use lower-case "
                "letters, digits, dashes and underscores, starting with a letter "
                "or digit."
            )
        return value
    # Like Compose, a name taken from the directory is normalized.
    directory = path.resolve().parent.name
    name = re.sub(r"[^a-z0-9_-]", "", directory.lower()).lstrip("_-")
    if not name:
        raise ComposeError(
            f"cannot derive a project name from the directory {directory!r}. Add "
            "name: to the file or pass --project-name."
        )
    return name


def _volumes(value: Any) -> dict[str, Volume]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ComposeError(
            "the top-level volumes: must be a mapping of volume names, such as "
            "volumes: {data: {}}."
        )
    volumes = {}
    for key, spec in value.items():
        where = f"volume {key}"
        spec = spec or {}
        if not isinstance(spec, Mapping):
            raise ComposeError(f"{where} must be a mapping, such as {key}: {{}}.")
        _reject_unknown(spec, {"external", "name"}, where)
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise ComposeError(f"{where} name must be a string.")
        external = _boolean(spec.get("external", False), f"{where} external")
        volumes[str(key)] = Volume(str(key), name, external)
    return volumes


def _check_references(services: dict[str, Service], volumes: dict[str, Volume]) -> None:
    for service in services.values():
        for dependency in service.depends_on:
            target = services.get(dependency.service)
            if target is None:
                raise ComposeError(
                    f"service {service.name} depends on {dependency.service}, "
                    f"which is not defined. Defined services: {sorted(services)}."
                )
            unchecked = target.healthcheck is None or target.healthcheck.test == [
                "NONE"
            ]
            if dependency.condition == "service_healthy" and unchecked:
                raise ComposeError(
                    f"service {service.name} waits for {dependency.service} to be "
                    f"healthy, but {dependency.service} has no health check. Add "
                    "one, or use condition: service_started."
                )
        for mount in service.mounts:
            if mount.named and mount.source not in volumes:
                raise ComposeError(
                    f"service {service.name} mounts the volume {mount.source}, which "
                    "the top-level volumes: section does not declare. Declare it."
                )


def read_env_file(path: Path) -> dict[str, str]:
    """Return the variables of a Compose ``.env`` file, or {} if there is none."""
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ComposeError(
            f"{path} is not UTF-8 text (byte {error.start}). Save it as UTF-8."
        ) from None
    variables = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.removeprefix("export ").split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            # An unquoted value ends at " #", where a comment starts.
            value = value.split(" #", 1)[0].rstrip()
        variables[key.strip()] = value
    return variables


def interpolate(text: str, variables: Mapping[str, str], where: str = "") -> str:
    """Replace Compose variable references in `text`.

    A default may itself hold references, as in ``${A:-${B:-b}}``.
    """
    result = []
    index = 0
    while index < len(text):
        char = text[index]
        if char != "$" or index + 1 == len(text):
            result.append(char)
            index += 1
            continue
        following = text[index + 1]
        if following == "$":
            result.append("$")
            index += 2
        elif following == "{":
            end = _closing_brace(text, index + 2, where)
            result.append(_expand(text[index + 2 : end], variables, where))
            index = end + 1
        else:
            match = _NAME.match(text, index + 1)
            if match is None:
                result.append(char)
                index += 1
                continue
            result.append(variables.get(match.group(), ""))
            index = match.end()
    return "".join(result)


def _closing_brace(text: str, start: int, where: str) -> int:
    depth = 1
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    raise ComposeError(
        f"{where or 'a value'} has an unclosed ${{ in {text!r}. Close it with }}."
    )


def _expand(body: str, variables: Mapping[str, str], where: str) -> str:
    match = _REFERENCE.fullmatch(body)
    if match is None:
        raise ComposeError(
            f"{where or 'a value'} has the reference ${{{body}}}, which is not "
            "valid. Write ${NAME}, ${NAME:-default} or ${NAME:?message}."
        )
    name, op, arg = match["name"], match["op"], match["arg"] or ""
    value = variables.get(name)
    unset = value is None or (value == "" and op is not None and op.startswith(":"))
    if op in ("-", ":-") and (value is None if op == "-" else unset):
        return interpolate(arg, variables, where)
    if op in ("?", ":?") and (value is None if op == "?" else unset):
        raise ComposeError(
            f"{where or 'a value'} needs the variable {name}: "
            f"{arg or 'it is not set'}. Set {name} in the environment or .env."
        )
    return value or ""


def parse_duration_ns(value: object, where: str) -> int:
    """Return a Compose duration such as ``1m30s`` or ``500ms`` in nanoseconds."""
    text = str(value).strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ComposeError(
            f"{where} is {value!r}, which is not a duration. "
            "Write it like 5s, 1m30s or 500ms."
        )
    return int(sum(float(number) * _DURATION_UNITS_NS[unit] for number, unit in parts))


def _interpolate(
    value: Any, variables: Mapping[str, str], where: str, count: list[int]
) -> Any:
    count[0] += 1
    if count[0] > MAX_VALUES:
        raise ComposeError(
            f"the compose file expands to more than {MAX_VALUES} values, through "
            "YAML aliases or sheer size. Write it out without nested aliases."
        )
    if isinstance(value, str):
        return interpolate(value, variables, where)
    if isinstance(value, list):
        return [_interpolate(item, variables, where, count) for item in value]
    if isinstance(value, dict):
        return {
            key: _interpolate(item, variables, f"{where}.{key}".lstrip("."), count)
            for key, item in value.items()
        }
    return value


def _reject_unknown(data: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(str(key) for key in set(data) - known)
    if unknown:
        raise ComposeError(
            f"{where} uses {', '.join(unknown)}, which agogosml up does not support. "
            f"Supported keys: {', '.join(sorted(known))}. Run the file with docker "
            "compose, or remove these keys."
        )


def _service(
    name: str, spec: Any, directory: Path, variables: Mapping[str, str]
) -> Service:
    where = f"service {name}"
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise ComposeError(f"{where} is not a mapping. Give it image: or build:.")
    if "image" not in spec and "build" not in spec:
        raise ComposeError(f"{where} has neither image: nor build:. Add one of them.")
    build = _build(spec["build"], directory, where) if "build" in spec else None
    image = _string(spec.get("image"), f"{where} image")
    container_name = _string(spec.get("container_name"), f"{where} container_name")
    user = spec.get("user")
    return Service(
        name=name,
        image=image or None,
        build=build,
        environment=_environment(spec.get("environment"), variables, where),
        ports=[_port(item, where) for item in _list(spec, "ports", where)],
        mounts=[
            _mount(item, directory, where) for item in _list(spec, "volumes", where)
        ],
        tmpfs=_tmpfs(spec.get("tmpfs"), where),
        depends_on=_dependencies(spec.get("depends_on"), where),
        healthcheck=_healthcheck(spec.get("healthcheck"), where),
        entrypoint=_command(spec.get("entrypoint"), f"{where} entrypoint"),
        command=_command(spec.get("command"), f"{where} command"),
        user=str(user) if user is not None else None,
        labels=_mapping(spec.get("labels"), f"{where} labels"),
        restart=_restart(spec.get("restart", "no"), where),
        read_only=_boolean(spec.get("read_only", False), f"{where} read_only"),
        container_name=container_name or None,
    )


def _string(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ComposeError(f"{where} is {value!r}, not a string. Quote it.")
    return value


def _list(spec: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ComposeError(
            f'{where} {key} must be a list, such as {key}: ["..."]; got {value!r}.'
        )
    return value


def _tmpfs(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ComposeError(f"{where} tmpfs must be a path or a list of paths.")


def _boolean(value: Any, where: str) -> bool:
    """Return a Compose boolean, which interpolation may have made a string."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ComposeError(f"{where} is {value!r}. Write true or false.")


def _restart(value: Any, where: str) -> str:
    # YAML 1.1 reads an unquoted `no` as false.
    policy = "no" if value is False else str(value)
    name, _, count = policy.partition(":")
    if name not in _RESTART_POLICIES or (
        count and (name != "on-failure" or not count.isdigit())
    ):
        raise ComposeError(
            f"{where} has restart: {policy}. Use one of {sorted(_RESTART_POLICIES)}, "
            "or on-failure:N with a whole number N."
        )
    return policy


def _environment(
    value: Any, variables: Mapping[str, str], where: str
) -> dict[str, str]:
    """Return a service's environment, with values passed through from the host.

    As in Compose, a variable given without a value (``- NAME`` or ``NAME:``)
    takes the host's value and is left out when the host has none.
    """
    where = f"{where} environment"
    entries: list[tuple[str, Any]]
    if value is None:
        return {}
    if isinstance(value, Mapping):
        entries = [(str(key), item) for key, item in value.items()]
    elif isinstance(value, list):
        entries = []
        for item in value:
            if not isinstance(item, str):
                raise ComposeError(f"{where} has {item!r}. Write KEY=VALUE strings.")
            key, sep, item_value = item.partition("=")
            entries.append((key, item_value if sep else None))
    else:
        raise ComposeError(f"{where} must be a mapping or a list of KEY=VALUE.")
    environment = {}
    for key, item in entries:
        if item is None:
            if key in variables:
                environment[key] = variables[key]
        elif isinstance(item, bool):
            raise ComposeError(
                f"{where} sets {key} to the YAML boolean {item}. Quote it, such as "
                f'{key}: "{str(item).lower()}".'
            )
        elif isinstance(item, str | int | float):
            environment[key] = str(item)
        else:
            raise ComposeError(f"{where} sets {key} to {item!r}. Use a string.")
    return environment


def _build(spec: Any, directory: Path, where: str) -> Build:
    if isinstance(spec, str):
        return Build(context=(directory / spec).resolve())
    if not isinstance(spec, Mapping):
        raise ComposeError(f"{where} build is not a path or mapping. Write build: .")
    _reject_unknown(spec, {"context", "dockerfile", "args"}, f"{where} build")
    return Build(
        context=(directory / str(spec.get("context", "."))).resolve(),
        dockerfile=str(spec.get("dockerfile", "Dockerfile")),
        args=_mapping(spec.get("args"), f"{where} build args"),
    )


def _mapping(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if isinstance(item, list | dict):
                raise ComposeError(f"{where} sets {key} to {item!r}. Use a string.")
            result[str(key)] = "" if item is None else _scalar(item)
        return result
    if isinstance(value, list):
        result = {}
        for item in value:
            key, _, item_value = str(item).partition("=")
            result[key] = item_value
        return result
    raise ComposeError(f"{where} must be a mapping or a list of KEY=VALUE.")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _command(value: Any, where: str) -> list[str] | None:
    """Return a command or entrypoint; a string is split as a shell would."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as error:
            raise ComposeError(f"{where} {value!r} cannot be split: {error}.") from None
    if isinstance(value, list):
        return [str(item) for item in value]
    raise ComposeError(f"{where} must be a string or a list of strings.")


def _port(value: Any, where: str) -> Port:
    text = str(value)
    protocol = "tcp"
    if "/" in text:
        text, protocol = text.split("/", 1)
    parts = text.rsplit(":", 2)
    try:
        if len(parts) == 1:
            return Port(int(parts[0]), None, protocol=protocol)
        if len(parts) == 2:
            return Port(int(parts[1]), int(parts[0]), protocol=protocol)
        return Port(
            int(parts[2]), int(parts[1]), host_ip=parts[0] or None, protocol=protocol
        )
    except ValueError:
        raise ComposeError(
            f"{where} publishes {value!r}, which agogosml up cannot read. "
            "Write it as [IP:]HOST_PORT:CONTAINER_PORT, such as 127.0.0.1:8080:80."
        ) from None


def _mount(value: Any, directory: Path, where: str) -> Mount:
    if not isinstance(value, str):
        raise ComposeError(
            f"{where} has a long-form volume, which agogosml up does not support. "
            "Write it as SOURCE:TARGET[:ro]."
        )
    parts = value.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise ComposeError(
            f"{where} mounts {value!r}. Write it as SOURCE:TARGET or SOURCE:TARGET:ro."
        )
    source, target = parts[0], parts[1]
    read_only = len(parts) == 3 and parts[2] == "ro"
    if source.startswith((".", "/", "~")):
        host_path = (directory / Path(source).expanduser()).resolve()
        return Mount(str(host_path), target, read_only)
    return Mount(source, target, read_only, named=True)


def _dependencies(value: Any, where: str) -> list[Dependency]:
    if value is None:
        return []
    if isinstance(value, list):
        return [Dependency(str(name)) for name in value]
    if not isinstance(value, Mapping):
        raise ComposeError(f"{where} depends_on must be a list or a mapping.")
    dependencies = []
    for name, spec in value.items():
        spec = spec or {}
        if not isinstance(spec, Mapping):
            raise ComposeError(
                f"{where} depends_on {name}: {spec!r} is not a mapping. Write "
                f"{name}: {{condition: service_healthy}}."
            )
        condition = str(spec.get("condition", "service_started"))
        if condition not in _CONDITIONS:
            raise ComposeError(
                f"{where} waits for {name} with condition {condition}. "
                f"Use one of {sorted(_CONDITIONS)}."
            )
        required = _boolean(spec.get("required", True), f"{where} depends_on required")
        dependencies.append(Dependency(str(name), condition, required))
    return dependencies


def _healthcheck(value: Any, where: str) -> HealthCheck | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ComposeError(f"{where} healthcheck must be a mapping.")
    where = f"{where} healthcheck"
    _reject_unknown(
        value,
        {"test", "interval", "timeout", "retries", "start_period", "disable"},
        where,
    )
    if value.get("disable"):
        return HealthCheck(test=["NONE"])
    test = value.get("test")
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if (
        not isinstance(test, list)
        or not test
        or test[0] not in ("CMD", "CMD-SHELL", "NONE")
    ):
        raise ComposeError(
            f"{where} test must be a string or a list that starts with CMD, "
            "CMD-SHELL or NONE."
        )
    check = HealthCheck(test=[str(item) for item in test])
    durations = {
        "interval_ns": value.get("interval"),
        "timeout_ns": value.get("timeout"),
        "start_period_ns": value.get("start_period"),
    }
    overrides: dict[str, Any] = {
        key: parse_duration_ns(raw, f"{where} {key.removesuffix('_ns')}")
        for key, raw in durations.items()
        if raw is not None
    }
    retries = value.get("retries")
    if retries is not None:
        if isinstance(retries, bool) or not isinstance(retries, int | str):
            raise ComposeError(f"{where} retries is {retries!r}. Use a whole number.")
        if isinstance(retries, str) and not retries.isdigit():
            raise ComposeError(f"{where} retries is {retries!r}. Use a whole number.")
        overrides["retries"] = int(retries)
    return HealthCheck(**{**check.__dict__, **overrides})
