"""Build images and run a pipeline's containers through the Docker Engine API.

`agogosml build`, `agogosml up` and `agogosml down` talk to the engine that
``DOCKER_HOST`` names (the default socket when it is unset) with the `docker`
package. Docker serves that API, and so does Podman (``podman system
service``), so the commands work with both.

Podman schedules health checks with systemd timers. Where systemd does not
run, no check ever runs by itself, so `up` runs them through Podman's own API
while it waits for a service to become healthy.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

import agogosml
from agogosml import __version__
from agogosml.errors import AgogosmlError
from agogosml_cli.compose import ComposeProject, Dependency, Service, Volume

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
CONFIG_HASH_LABEL = "io.agogosml.config-hash"
DEFAULT_TIMEOUT_SECONDS = 900
STOP_TIMEOUT_SECONDS = 10
#: Maximum pause between two health checks that `up` runs on Podman.
HEALTH_POLL_SECONDS = 2.0
LOG_TAIL_LINES = 40
#: Seconds that a service without a health check must keep running after the
#: last container started before `up` counts it as up.
SETTLE_SECONDS = 2.0

#: The images that build from the agogosml source tree: name, Dockerfile and
#: repository, the last without a registry.
SOURCE_IMAGES = {
    "reader": ("Dockerfile.input", "agogosml-input-reader"),
    "writer": ("Dockerfile.output", "agogosml-output-writer"),
    "sample-app": ("Dockerfile.app", "agogosml-sample-app"),
}
SAMPLE_MODEL = Path("models") / "fraud-model.joblib"

Log = Callable[[str], None]


class ContainerError(AgogosmlError):
    """A build or run failed, with the reason and the fix."""


@dataclasses.dataclass(frozen=True)
class ImageBuild:
    """One image to build: its Dockerfile, context, tag and build arguments."""

    name: str
    context: Path
    dockerfile: str
    tag: str
    args: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ServiceState:
    """State of one service after `up`."""

    service: str
    container: str
    image: str
    status: str
    health: str | None
    ports: str


class Engine:
    """A connection to a Docker Engine API endpoint, Docker's or Podman's.

    Args:
        base_url: The API address. None takes DOCKER_HOST, or the default
            socket.
        timeout: Seconds to wait for one API call; builds take long.
    """

    def __init__(
        self, base_url: str | None = None, timeout: int = DEFAULT_TIMEOUT_SECONDS
    ):
        self.base_url = (
            base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        )
        try:
            self.client = docker.DockerClient(base_url=self.base_url, timeout=timeout)
            version = self.client.version()
        except (docker.errors.DockerException, OSError) as error:
            raise ContainerError(
                f"no container engine responds at {self.base_url} ({error}). Start "
                "Docker, or start Podman's API service (podman system service "
                "--time=0 unix:///run/podman/podman.sock) and set "
                "DOCKER_HOST=unix:///run/podman/podman.sock. docs/containers.md "
                "describes the Podman set-up for machines without a Docker engine."
            ) from None
        components = [
            str(item.get("Name", "")) for item in version.get("Components") or []
        ]
        self.is_podman = any("podman" in name.lower() for name in components)
        self.version = str(version.get("Version", ""))

    @property
    def kind(self) -> str:
        """``podman`` or ``docker``."""
        return "podman" if self.is_podman else "docker"

    def close(self) -> None:
        """Close the connection."""
        self.client.close()

    def image_id(self, tag: str) -> str | None:
        """Return the id of the image with this tag, or None if there is none.

        Raises:
            ContainerError: The engine rejected the tag, such as one with a
                space or upper-case letters in its repository.
        """
        try:
            return str(self.client.images.get(tag).id)
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as error:
            raise ContainerError(
                f"the image reference {tag!r} is not valid: "
                f"{error.explanation or error}. Fix the image name."
            ) from None

    def image_exists(self, tag: str) -> bool:
        """Return True if the engine has an image with this tag."""
        return self.image_id(tag) is not None

    def health(self, container: Container) -> str | None:
        """Return the container's health, running the check on Podman.

        Returns:
            ``starting``, ``healthy`` or ``unhealthy``; None when the
            container has no health check.
        """
        container.reload()
        state = container.attrs.get("State", {})
        health = state.get("Health") or state.get("Healthcheck")
        if not health:
            return None
        if self.is_podman and state.get("Status") == "running":
            api = self.client.api
            path = f"/v{self.version}/libpod/containers/{container.id}/healthcheck"
            response = api.get(api.base_url + path)
            if response.ok:
                container.reload()
                state = container.attrs.get("State", {})
                health = state.get("Health") or health
        return str(health.get("Status")) or None


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def find_source_tree(source: Path | None) -> Path:
    """Return the agogosml source tree with the service Dockerfiles.

    Raises:
        ContainerError: `source` is not such a tree, or none is next to the
            installed package.
    """
    if source is None:
        candidate = Path(agogosml.__file__).resolve().parents[1]
        if (candidate / "Dockerfile.input").is_file():
            return candidate
        raise ContainerError(
            "the reader and writer images build from the agogosml source tree, "
            f"and none is next to the installed package ({candidate}). Pass "
            f"--source with a checkout of agogosml {__version__}."
        )
    source = source.resolve()
    missing = [
        dockerfile
        for dockerfile, _ in SOURCE_IMAGES.values()
        if not (source / dockerfile).is_file()
    ]
    if missing:
        raise ContainerError(
            f"{source} is not an agogosml source tree: {', '.join(missing)} "
            "missing. Pass --source with the repository root."
        )
    return source


def source_builds(
    source: Path,
    names: Sequence[str],
    *,
    tags: Mapping[str, str],
    args: Mapping[str, str],
) -> list[ImageBuild]:
    """Return the builds of the reader, writer and sample app images.

    Args:
        source: The agogosml source tree.
        names: Which of ``reader``, ``writer`` and ``sample-app`` to build.
        tags: The tag of each image.
        args: Build arguments for every image.
    """
    revision = _git_revision(source)
    common = {
        "VERSION": __version__,
        **({"REVISION": revision} if revision else {}),
        **args,
    }
    builds = []
    for name in names:
        dockerfile, _ = SOURCE_IMAGES[name]
        if name == "sample-app" and not (source / SAMPLE_MODEL).is_file():
            raise ContainerError(
                f"Dockerfile.app copies {SAMPLE_MODEL}, which is missing in {source}. "
                "Pass --model with a trained model, or train one: python -m "
                f"sample_app.train --out {SAMPLE_MODEL}"
            )
        builds.append(ImageBuild(name, source, dockerfile, tags[name], common))
    return builds


def project_builds(
    project: ComposeProject, source: Path | None, args: Mapping[str, str]
) -> list[ImageBuild]:
    """Return the builds of a generated project's images.

    The reader and writer images build from the agogosml source tree. They are
    tagged with the image names of the project's ``reader`` and ``writer``
    services. Each service with a ``build`` section builds from it.
    """
    builds = []
    stream_services: list[str] = [
        name for name in ("reader", "writer") if name in project.services
    ]
    if stream_services:
        tree = find_source_tree(source)
        tags = {
            name: _image_of(project, project.services[name]) for name in stream_services
        }
        builds += source_builds(tree, stream_services, tags=tags, args=args)
    for service in project.services.values():
        if service.build is not None:
            builds.append(
                ImageBuild(
                    service.name,
                    service.build.context,
                    service.build.dockerfile,
                    _image_of(project, service),
                    {**service.build.args, **args},
                )
            )
    return builds


def build_image(engine: Engine, build: ImageBuild, log: Log) -> str:
    """Build one image and return its id.

    A Dockerfile with ``RUN --mount`` needs BuildKit, which Docker's Engine
    API does not offer to this client, so on Docker such a file is built by
    the ``docker build`` command. Podman builds it through the API.

    Raises:
        ContainerError: The build failed. The message has the end of the log.
    """
    dockerfile = build.context / build.dockerfile
    if not dockerfile.is_file():
        raise ContainerError(f"{dockerfile} does not exist. Check the build context.")
    if not engine.is_podman and "--mount=" in dockerfile.read_text():
        return _build_with_docker_cli(engine, build, log)
    lines: list[str] = []
    image_id = None
    try:
        for chunk in engine.client.api.build(
            path=str(build.context),
            dockerfile=build.dockerfile,
            tag=build.tag,
            buildargs=dict(build.args),
            pull=False,
            rm=True,
            forcerm=True,
            decode=True,
        ):
            if "error" in chunk:
                lines.append(str(chunk["error"]))
                raise ContainerError(
                    f"building {build.tag} from {dockerfile} failed:\n"
                    + "\n".join(lines[-LOG_TAIL_LINES:])
                )
            text = str(chunk.get("stream", "")).rstrip()
            if text:
                lines.append(text)
                log(text)
            if "aux" in chunk and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
    except docker.errors.APIError as error:
        raise ContainerError(
            f"the engine rejected the build of {build.tag}: {error}"
        ) from None
    return image_id or engine.client.images.get(build.tag).id


def _build_with_docker_cli(engine: Engine, build: ImageBuild, log: Log) -> str:
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        raise ContainerError(
            f"{build.dockerfile} uses RUN --mount, which needs BuildKit, and the "
            "docker command is not on PATH. Install the Docker CLI with buildx."
        )
    command = [
        docker_cli,
        "build",
        "-f",
        str(build.context / build.dockerfile),
        "-t",
        build.tag,
    ]
    for key, value in build.args.items():
        command += ["--build-arg", f"{key}={value}"]
    pip_conf = Path.home() / ".config" / "pip" / "pip.conf"
    if pip_conf.is_file():
        command += ["--secret", f"id=pipconf,src={pip_conf}"]
    command.append(str(build.context))
    environment = {**os.environ, "DOCKER_HOST": engine.base_url, "DOCKER_BUILDKIT": "1"}
    process = subprocess.Popen(
        command,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        log(line.rstrip())
    if process.wait() != 0:
        raise ContainerError(
            f"docker build of {build.tag} failed with code {process.returncode}:\n"
            + "\n".join(lines[-LOG_TAIL_LINES:])
        )
    return str(engine.client.images.get(build.tag).id)


def _git_revision(source: Path) -> str | None:
    if shutil.which("git") is None:
        return None
    result = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def _image_of(project: ComposeProject, service: Service) -> str:
    return service.image or f"{project.name}-{service.name}"


# ---------------------------------------------------------------------------
# up and down
# ---------------------------------------------------------------------------


def up(
    engine: Engine,
    project: ComposeProject,
    *,
    build: bool = False,
    build_args: Mapping[str, str] | None = None,
    wait_seconds: float = 300.0,
    log: Log = lambda _: None,
) -> list[ServiceState]:
    """Create and start the project's containers, like ``docker compose up --wait``.

    Each service starts once the services it depends on meet their
    condition. A container whose configuration did not change since the last
    `up` keeps running; a changed or stopped one is replaced.

    Raises:
        ContainerError: An image is missing, a container exited or did not
            become healthy in time. The message has the end of its log.
    """
    deadline = time.monotonic() + wait_seconds
    _ensure_network(engine, project)
    for volume in project.volumes.values():
        _ensure_volume(engine, project, volume)
    containers: dict[str, Container] = {}
    started_at = time.monotonic()
    for service in project.start_order():
        for dependency in service.depends_on:
            if dependency.service in containers:
                _wait_for(engine, containers[dependency.service], dependency, deadline)
        _ensure_image(engine, project, service, build, build_args or {}, log)
        containers[service.name] = _ensure_container(engine, project, service, log)
        started_at = time.monotonic()
    for name, container in containers.items():
        service = project.services[name]
        if service.healthcheck is not None and service.healthcheck.test != ["NONE"]:
            _wait_for(engine, container, Dependency(name, "service_healthy"), deadline)
    # A service without a health check counts as up once it has run for a
    # moment, so that one that fails on start-up fails `up` too.
    time.sleep(max(0.0, started_at + SETTLE_SECONDS - time.monotonic()))
    for name, container in containers.items():
        _check_not_failed(container, name)
    return [
        _state(engine, project, service, containers[service.name])
        for service in project.start_order()
    ]


@dataclasses.dataclass(frozen=True)
class Removed:
    """Engine names of the containers, networks and volumes that ``down`` removed."""

    containers: list[str]
    networks: list[str]
    volumes: list[str]


def down(
    engine: Engine,
    project_name: str,
    *,
    volumes: list[str] | None = None,
) -> Removed:
    """Stop and remove the containers and the network of a project.

    Containers are found by the project label, so no compose file is needed.

    Args:
        engine: The engine that runs the project.
        project_name: The project's name.
        volumes: Engine names of the volumes to remove as well.

    Returns:
        What was removed; a network or volume that did not exist is not listed.

    Raises:
        ContainerError: The engine failed to remove a container, the network
            (a container of another project may still use it) or a volume.
    """
    removed = Removed(containers=[], networks=[], volumes=[])
    for container in _project_containers(engine, project_name):
        try:
            container.stop(timeout=STOP_TIMEOUT_SECONDS)
        except docker.errors.APIError:
            pass  # Already stopped, or removed below by force.
        _remove(functools.partial(container.remove, force=True), container.name)
        removed.containers.append(container.name)
    network_name = f"{project_name}_default"
    for network in engine.client.networks.list(names=[network_name]):
        if network.name == network_name:
            _remove(network.remove, f"network {network_name}")
            removed.networks.append(network_name)
    for volume in volumes or []:
        try:
            found = engine.client.volumes.get(volume)
        except docker.errors.NotFound:
            continue
        _remove(functools.partial(found.remove, force=True), f"volume {volume}")
        removed.volumes.append(volume)
    return removed


def _remove(action: Callable[[], object], resource: str) -> None:
    try:
        action()
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as error:
        raise ContainerError(
            f"the engine failed to remove {resource}: {error.explanation or error}. "
            "Stop what still uses it, then run agogosml down again."
        ) from None


def project_container(
    engine: Engine, project: ComposeProject, service: str
) -> Container:
    """Return the container of one service of the project."""
    name = project.container_name(project.services[service])
    try:
        return engine.client.containers.get(name)
    except docker.errors.NotFound:
        raise ContainerError(
            f"service {service} has no container {name}. Run agogosml up first."
        ) from None


def _project_containers(engine: Engine, name: str) -> list[Container]:
    return list(
        engine.client.containers.list(
            all=True, filters={"label": f"{PROJECT_LABEL}={name}"}
        )
    )


def network_gateway(engine: Engine, project: ComposeProject) -> str:
    """Create the project's network if needed and return its gateway address.

    The gateway is the host's address on that network, where containers
    reach a server that runs on the host, such as a development broker.
    """
    _ensure_network(engine, project)
    network = engine.client.networks.get(project.network)
    for config in (network.attrs.get("IPAM") or {}).get("Config") or []:
        if config.get("Gateway"):
            return str(config["Gateway"])
    raise ContainerError(
        f"network {project.network} has no gateway address. Remove it "
        "(agogosml down) and run again."
    )


def _ensure_network(engine: Engine, project: ComposeProject) -> None:
    if any(
        n.name == project.network
        for n in engine.client.networks.list(names=[project.network])
    ):
        return
    engine.client.networks.create(
        project.network,
        driver="bridge",
        labels={PROJECT_LABEL: project.name, "com.docker.compose.network": "default"},
    )


def _ensure_volume(engine: Engine, project: ComposeProject, volume: Volume) -> None:
    name = volume.engine_name(project.name)
    try:
        engine.client.volumes.get(name)
    except docker.errors.NotFound:
        if volume.external:
            raise ContainerError(
                f"the external volume {name} does not exist. Create it first "
                f"(docker volume create {name}), or drop external: true."
            ) from None
        engine.client.volumes.create(
            name,
            labels={
                PROJECT_LABEL: project.name,
                "com.docker.compose.volume": volume.key,
            },
        )


def _ensure_image(
    engine: Engine,
    project: ComposeProject,
    service: Service,
    build: bool,
    build_args: Mapping[str, str],
    log: Log,
) -> None:
    image = _image_of(project, service)
    if service.build is not None and (build or not engine.image_exists(image)):
        log(f"Building {image} for service {service.name}")
        build_image(
            engine,
            ImageBuild(
                service.name,
                service.build.context,
                service.build.dockerfile,
                image,
                {**service.build.args, **build_args},
            ),
            log,
        )
        return
    if engine.image_exists(image):
        return
    log(f"Pulling {image} for service {service.name}")
    try:
        engine.client.images.pull(image)
    except docker.errors.APIError as error:
        if service.is_kafka:
            fix = (
                "Pass --kafka HOST:PORT to use a broker of your own instead of "
                "the file's Kafka services, or set KAFKA_IMAGE to an image that "
                "exists."
            )
        else:
            fix = (
                "Build it with agogosml build, or set the image variable of the "
                "compose file to an image that exists."
            )
        raise ContainerError(
            f"service {service.name} needs the image {image}, which the engine does "
            f"not have and cannot pull ({error.explanation or error}). {fix}"
        ) from None


def _healthcheck_for(engine: Engine, service: Service) -> dict[str, Any] | None:
    if service.healthcheck is None:
        return None
    check = service.healthcheck.to_api()
    test = check["test"]
    # NOTE: Podman 4's Docker-compatible API splits the arguments of a CMD
    # health check at whitespace, so `python -c "import x; ..."` arrives as
    # `python -c import x; ...`. The shell form keeps each argument whole.
    if engine.is_podman and test[0] == "CMD" and any(" " in arg for arg in test[1:]):
        check["test"] = ["CMD-SHELL", shlex.join(test[1:])]
    return check


def _create_options(
    engine: Engine, project: ComposeProject, service: Service
) -> dict[str, Any]:
    bindings: dict[str, list[Any]] = {}
    for port in service.ports:
        key = f"{port.container_port}/{port.protocol}"
        binding = (port.host_ip, port.host_port) if port.host_ip else port.host_port
        bindings.setdefault(key, []).append(binding)
    # One container port may be published on several host ports.
    ports = {
        key: values[0] if len(values) == 1 else values
        for key, values in bindings.items()
    }
    volumes = {
        (
            project.volumes[mount.source].engine_name(project.name)
            if mount.named
            else mount.source
        ): {
            "bind": mount.target,
            "mode": "ro" if mount.read_only else "rw",
        }
        for mount in service.mounts
    }
    restart = service.restart.split(":")
    options: dict[str, Any] = {
        "image": _image_of(project, service),
        "command": service.command,
        "entrypoint": service.entrypoint,
        "environment": service.environment,
        "ports": ports,
        "volumes": volumes,
        "tmpfs": {path: "" for path in service.tmpfs},
        "user": service.user,
        "read_only": service.read_only,
        "healthcheck": _healthcheck_for(engine, service),
        "restart_policy": None
        if restart[0] == "no"
        else {
            "Name": restart[0],
            "MaximumRetryCount": int(restart[1]) if len(restart) > 1 else 0,
        },
    }
    return {key: value for key, value in options.items() if value not in (None, {}, [])}


def _config_hash(engine: Engine, service: Service, options: dict[str, Any]) -> str:
    # The image id and the labels are part of the configuration, so a rebuilt
    # image or a changed label replaces the container.
    configuration = {
        **options,
        "image_id": engine.image_id(options["image"]),
        "labels": service.labels,
    }
    encoded = json.dumps(configuration, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()


def _check_owner(
    container: Container, project: ComposeProject, service: Service
) -> None:
    owner = container.labels.get(PROJECT_LABEL)
    if owner == project.name and container.labels.get(SERVICE_LABEL) == service.name:
        return
    if owner:
        taken_by = f"project {owner}"
    else:
        taken_by = "a container that compose did not create"
    raise ContainerError(
        f"the container name {container.name} is taken by {taken_by}. Remove that "
        "container, or choose another --project-name or container_name."
    )


def _ensure_container(
    engine: Engine, project: ComposeProject, service: Service, log: Log
) -> Container:
    name = project.container_name(service)
    options = _create_options(engine, project, service)
    config_hash = _config_hash(engine, service, options)
    try:
        existing = engine.client.containers.get(name)
    except docker.errors.NotFound:
        existing = None
    if existing is not None:
        _check_owner(existing, project, service)
        unchanged = existing.labels.get(CONFIG_HASH_LABEL) == config_hash
        if unchanged and existing.status == "running":
            log(f"Service {service.name}: {name} is up to date")
            return existing
        if (
            unchanged
            and service.restart == "no"
            and existing.attrs["State"].get("ExitCode") == 0
        ):
            log(f"Service {service.name}: {name} has completed")
            return existing
        existing.remove(force=True)
    labels = {
        **service.labels,
        PROJECT_LABEL: project.name,
        SERVICE_LABEL: service.name,
        "com.docker.compose.container-number": "1",
        "com.docker.compose.oneoff": "False",
        CONFIG_HASH_LABEL: config_hash,
    }
    networking = {
        project.network: engine.client.api.create_endpoint_config(
            aliases=[service.name]
        )
    }
    log(f"Service {service.name}: starting {name}")
    try:
        container = engine.client.containers.create(
            name=name,
            labels=labels,
            network=project.network,
            networking_config=networking,
            **options,
        )
        container.start()
    except docker.errors.APIError as error:
        explanation = str(error.explanation or error)
        hint = ""
        if "netavark" in explanation and "No such file" in explanation:
            # netavark reports a missing iptables binary this way.
            hint = (
                ". Podman's network stack, netavark, needs iptables: install it "
                "(apt-get install iptables) and run agogosml up again"
            )
        raise ContainerError(
            f"the engine failed to start {name} for service {service.name}: "
            f"{explanation}{hint}"
        ) from None
    return container


def _wait_for(
    engine: Engine, container: Container, dependency: Dependency, deadline: float
) -> None:
    """Wait until `container` meets the dependency's condition."""
    condition = dependency.condition
    while True:
        container.reload()
        state = container.attrs.get("State", {})
        status = state.get("Status")
        if condition == "service_completed_successfully":
            if status in ("exited", "stopped"):
                if state.get("ExitCode") == 0:
                    return
                raise _exited(container, dependency.service, state.get("ExitCode"))
        elif status in ("exited", "stopped", "dead"):
            raise _exited(container, dependency.service, state.get("ExitCode"))
        elif condition == "service_started" and status == "running":
            return
        elif condition == "service_healthy":
            health = engine.health(container)
            if health in ("healthy", None):
                return
            if health == "unhealthy":
                raise ContainerError(
                    f"service {dependency.service} ({container.name}) is unhealthy. "
                    f"Last health check output: {_last_health_output(container)!r}. "
                    f"Its log:\n{_log_tail(container)}"
                )
        if time.monotonic() > deadline:
            raise ContainerError(
                f"service {dependency.service} ({container.name}) did not reach "
                f"{condition} in time; it is {status}. Last health check output: "
                f"{_last_health_output(container)!r}. Its log:\n{_log_tail(container)}"
            )
        time.sleep(min(HEALTH_POLL_SECONDS, max(0.1, deadline - time.monotonic())))


def _check_not_failed(container: Container, service: str) -> None:
    """Raise if the container stopped with a non-zero exit code."""
    container.reload()
    state = container.attrs.get("State", {})
    if state.get("Status") in ("exited", "stopped", "dead") and state.get("ExitCode"):
        raise _exited(container, service, state.get("ExitCode"))


def _exited(container: Container, service: str, code: object) -> ContainerError:
    return ContainerError(
        f"service {service} ({container.name}) exited with code {code}. "
        f"Its log:\n{_log_tail(container)}"
    )


def _last_health_output(container: Container) -> str:
    health = container.attrs.get("State", {}).get("Health") or {}
    log = health.get("Log") or []
    return str(log[-1].get("Output", "")).strip() if log else ""


def _log_tail(container: Container) -> str:
    try:
        return container.logs(tail=LOG_TAIL_LINES).decode(errors="replace")
    except docker.errors.APIError:
        return "(no log)"


def _state(
    engine: Engine, project: ComposeProject, service: Service, container: Container
) -> ServiceState:
    container.reload()
    state = container.attrs.get("State", {})
    health = (state.get("Health") or {}).get("Status")
    bindings = container.attrs.get("NetworkSettings", {}).get("Ports") or {}
    ports = ", ".join(
        f"{binding['HostIp'] or '0.0.0.0'}:{binding['HostPort']}->{port}"
        for port, values in bindings.items()
        for binding in values or []
    )
    return ServiceState(
        service=service.name,
        container=project.container_name(service),
        image=_image_of(project, service),
        status=str(state.get("Status")),
        health=health,
        ports=ports,
    )
