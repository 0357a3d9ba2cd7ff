"""The ``agogosml build``, ``up`` and ``down`` commands."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from agogosml import AgogosmlError, __version__
from agogosml_cli.compose import ComposeProject, load_compose
from agogosml_cli.containers import (
    SAMPLE_MODEL,
    SOURCE_IMAGES,
    Engine,
    ImageBuild,
    ServiceState,
    build_image,
    down,
    find_source_tree,
    network_gateway,
    project_builds,
    source_builds,
    up,
)

COMPOSE_FILE = "docker-compose.yml"

project_option = click.option(
    "--project",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory of the generated project.",
)
file_option = click.option(
    "--file",
    "-f",
    "compose_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Compose file. Default: {COMPOSE_FILE} in the project directory.",
)
base_image_option = click.option(
    "--base-image",
    envvar="AGOGOSML_BASE_IMAGE",
    help="Base image of every build (BASE_IMAGE build argument). "
    "Default: AGOGOSML_BASE_IMAGE, else the Dockerfiles' own default.",
)
name_option = click.option(
    "--project-name",
    "-p",
    help="Project name, which prefixes the container, network and volume "
    "names. Default: the compose file's name: field.",
)
env_option = click.option(
    "--env",
    "-e",
    "variables",
    multiple=True,
    metavar="KEY=VALUE",
    help="Variable for the compose file's ${...} references, such as "
    "APP_IMAGE=my-app:1. Repeatable. Overrides the environment and .env.",
)


#: Width of output to a file or pipe, where Rich would otherwise wrap at 80.
PIPE_COLUMNS = 200


def _console() -> Console:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_COLUMNS
    return console


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(
                f"{value!r} is not KEY=VALUE. Write it like APP_IMAGE=my-app:1.",
                param_hint=option,
            )
        pairs[key] = item
    return pairs


def _load(
    project: Path,
    compose_file: Path | None,
    variables: dict[str, str],
    name: str | None = None,
) -> ComposeProject:
    path = compose_file or project / COMPOSE_FILE
    return load_compose(path, {**os.environ, **variables}, name)


def _finite(value: float) -> float:
    # FloatRange lets nan through, because every comparison with it is false.
    if math.isnan(value):
        raise click.BadParameter("nan is not a number of seconds. Give 1 to 86400.")
    return value


def _connect() -> Engine:
    return Engine()


@click.command()
@click.option(
    "--project",
    type=click.Path(file_okay=False, path_type=Path),
    help="Generated project: build its app image, and tag the reader and writer "
    "images with the names its compose file uses.",
)
@click.option(
    "--source",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="agogosml source tree with Dockerfile.input and Dockerfile.output. "
    "Default: the tree the running agogosml comes from.",
)
@click.option(
    "--only",
    multiple=True,
    type=click.Choice([*SOURCE_IMAGES, "app"]),
    help="Build only these images. Repeatable. Default without --project: "
    "reader, writer and sample-app; with --project: reader, writer and the "
    "project's app.",
)
@click.option(
    "--tag", default=__version__, show_default=True, help="Tag of the source images."
)
@click.option(
    "--registry",
    default="",
    help="Registry prefix of the source images' names, such as myregistry.azurecr.io.",
)
@click.option(
    "--model",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help=f"Trained model for the sample app image; copied to {SAMPLE_MODEL} "
    "in the source tree.",
)
@base_image_option
@click.option(
    "--build-arg",
    "build_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="Build argument. Repeatable.",
)
@click.option("--verbose", is_flag=True, help="Print every line of the build logs.")
def build(
    project: Path | None,
    source: Path | None,
    only: tuple[str, ...],
    tag: str,
    registry: str,
    model: Path | None,
    base_image: str | None,
    build_args: tuple[str, ...],
    verbose: bool,
) -> None:
    """Build the reader, writer and app images through the Docker Engine API."""
    console = _console()
    args = _pairs(build_args, "--build-arg")
    if base_image:
        args["BASE_IMAGE"] = base_image
    try:
        if project is not None:
            compose = _load(project, None, {})
            builds = project_builds(compose, source, args)
            if only:
                builds = [item for item in builds if item.name in only]
        else:
            tree = find_source_tree(source)
            names = [name for name in SOURCE_IMAGES if not only or name in only]
            if model is not None and "sample-app" in names:
                target = tree / SAMPLE_MODEL
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(model, target)
                console.print(f"Copied {model} to {target}")
            prefix = f"{registry.rstrip('/')}/" if registry else ""
            tags = {name: f"{prefix}{SOURCE_IMAGES[name][1]}:{tag}" for name in names}
            builds = source_builds(tree, names, tags=tags, args=args)
        if not builds:
            raise click.UsageError("nothing to build: --only excludes every image.")
        engine = _connect()
        try:
            noun = "image" if len(builds) == 1 else "images"
            console.print(
                f"Building {len(builds)} {noun} with {engine.kind} "
                f"{engine.version} at {engine.base_url}"
            )
            for item in builds:
                _build_one(engine, item, console, verbose)
        finally:
            engine.close()
    except AgogosmlError as error:
        raise click.ClickException(str(error)) from None


def _build_one(
    engine: Engine, item: ImageBuild, console: Console, verbose: bool
) -> None:
    import time

    started = time.monotonic()
    console.print(f"[bold]{item.name}[/bold]: {item.tag} from {item.dockerfile}")

    def log(line: str) -> None:
        if verbose or line.upper().startswith("STEP"):
            console.print(f"  {line}", markup=False)

    image_id = build_image(engine, item, log)
    console.print(f"  built {image_id[:19]} in {time.monotonic() - started:.0f} s")


@click.command(name="up")
@project_option
@file_option
@name_option
@click.option(
    "--kafka",
    metavar="BOOTSTRAP",
    help="Use this Kafka broker instead of the compose file's own: skip the "
    "services labelled io.agogosml.role=kafka and set KAFKA_BOOTSTRAP_SERVERS "
    "of the others. The containers must reach the address, and the topics must exist.",
)
@click.option(
    "--build",
    "rebuild",
    is_flag=True,
    help="Build the services with a build section even if their images exist.",
)
@base_image_option
@env_option
@click.option(
    "--wait-seconds",
    type=click.FloatRange(min=1, max=86400),
    callback=lambda _context, _param, value: _finite(value),
    default=300.0,
    show_default=True,
    help="How long to wait for every service to be healthy.",
)
def up_command(
    project: Path,
    compose_file: Path | None,
    project_name: str | None,
    kafka: str | None,
    rebuild: bool,
    base_image: str | None,
    variables: tuple[str, ...],
    wait_seconds: float,
) -> None:
    """Start the pipeline of a compose file and wait until it is healthy."""
    console = _console()
    try:
        compose = _load(project, compose_file, _pairs(variables, "--env"), project_name)
        if kafka:
            dropped = compose.use_external_kafka(kafka)
            console.print(f"Using Kafka at {kafka} instead of {', '.join(dropped)}")
        engine = _connect()
        try:
            states = up(
                engine,
                compose,
                build=rebuild,
                build_args={"BASE_IMAGE": base_image} if base_image else {},
                wait_seconds=wait_seconds,
                log=lambda line: console.print(line, markup=False),
            )
        finally:
            engine.close()
    except AgogosmlError as error:
        raise click.ClickException(str(error)) from None
    _print_states(states, console)


@click.command(name="down")
@project_option
@file_option
@name_option
@env_option
@click.option("--volumes", is_flag=True, help="Also remove the named volumes.")
def down_command(
    project: Path,
    compose_file: Path | None,
    project_name: str | None,
    variables: tuple[str, ...],
    volumes: bool,
) -> None:
    """Stop and remove the containers and network of a compose file's pipeline.

    With --project-name and no readable compose file, it removes the
    project's containers and network by name.
    """
    console = _console()
    try:
        path = compose_file or project / COMPOSE_FILE
        if project_name and not path.is_file():
            name, volume_names = project_name, []
        else:
            compose = _load(
                project, compose_file, _pairs(variables, "--env"), project_name
            )
            name = compose.name
            volume_names = [
                volume.engine_name(name)
                for volume in compose.volumes.values()
                if not volume.external
            ]
        engine = _connect()
        try:
            removed = down(engine, name, volumes=volume_names if volumes else None)
        finally:
            engine.close()
    except AgogosmlError as error:
        raise click.ClickException(str(error)) from None
    for container in removed.containers:
        console.print(f"Removed {container}")
    for network in removed.networks:
        console.print(f"Removed network {network}")
    for volume in removed.volumes:
        console.print(f"Removed volume {volume}")
    count = len(removed.containers)
    summary = f"{name}: {count} {'container' if count == 1 else 'containers'} removed"
    if not removed.networks:
        summary += f"; no network {name}_default was found"
    console.print(summary)


@click.command(name="gateway")
@project_option
@file_option
@name_option
@env_option
def gateway_command(
    project: Path,
    compose_file: Path | None,
    project_name: str | None,
    variables: tuple[str, ...],
) -> None:
    """Create the project's network if needed and print its gateway address.

    Containers of the project reach a server on the host, such as a Kafka
    broker for `up --kafka`, at this address.
    """
    try:
        compose = _load(project, compose_file, _pairs(variables, "--env"), project_name)
        engine = _connect()
        try:
            address = network_gateway(engine, compose)
        finally:
            engine.close()
    except AgogosmlError as error:
        raise click.ClickException(str(error)) from None
    click.echo(address)


def _print_states(states: list[ServiceState], console: Console) -> None:
    table = Table("service", "container", "image", "status", "health", "ports")
    for state in states:
        table.add_row(
            state.service,
            state.container,
            state.image,
            state.status,
            state.health or "-",
            state.ports or "-",
        )
    console.print(table)


COMMANDS = [build, up_command, down_command, gateway_command]
