"""Build the images and run the pipeline in containers through the Engine API.

Where no Docker engine responds, the module fixture sets up Podman's
Docker-compatible service and a Debian base image built with debootstrap
(deployment/containers/engine.py), so these tests run on any Linux machine
where apt-get works.
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from docker.models.containers import Container
from test_scaffold import (
    FILE_FLAGS,
    KAFKA_FLAGS,
    generate,
    init_manifest,
    isolate_git,
)

from agogosml_cli.compose import ComposeProject, load_compose
from agogosml_cli.containers import (
    SAMPLE_MODEL,
    SOURCE_IMAGES,
    Engine,
    build_image,
    network_gateway,
    project_container,
    source_builds,
)
from agogosml_cli.main import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "deployment" / "containers"))
from broker import Listener, LocalKafkaBroker  # noqa: E402
from engine import ensure_engine  # noqa: E402

pytestmark = pytest.mark.containers

IMAGE_TAG = "test"
RECORDS = 10_000
NON_ROOT_USER = "10001:10001"
PIPELINE_SERVICES = ("writer", "app", "reader")
# Topics of the Kafka manifest in test_scaffold.
INPUT_TOPIC = "transactions"
OTHER_INPUT_TOPIC = "refunds"
OUTPUT_TOPIC = "transactions-scored"
DEAD_LETTER_TOPIC = "transactions.dlq"


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[Engine, str | None]]:
    """The container engine and the base image to build from (None: default)."""
    found, podman = ensure_engine()
    client = Engine(found.base_url)
    try:
        yield client, found.base_image
    finally:
        client.close()
        if podman is not None:
            podman.stop()


@pytest.fixture(scope="module")
def images(engine: tuple[Engine, str | None], fraud_model: Path) -> dict[str, str]:
    """Build the reader, writer and sample app images; return their tags."""
    client, base_image = engine
    model = REPO_ROOT / SAMPLE_MODEL
    model.parent.mkdir(exist_ok=True)
    if not model.exists() or model.read_bytes() != fraud_model.read_bytes():
        shutil.copyfile(fraud_model, model)
    tags = {name: f"{repo}:{IMAGE_TAG}" for name, (_, repo) in SOURCE_IMAGES.items()}
    args = {"BASE_IMAGE": base_image} if base_image else {}
    for build in source_builds(REPO_ROOT, list(SOURCE_IMAGES), tags=tags, args=args):
        build_image(client, build, log=lambda _: None)
    return tags


@pytest.fixture
def docker_host(
    engine: tuple[Engine, str | None], monkeypatch: pytest.MonkeyPatch
) -> str:
    monkeypatch.setenv("DOCKER_HOST", engine[0].base_url)
    return engine[0].base_url


def generate_project(directory: Path, flags: list[str]) -> Path:
    (directory / "git").mkdir()
    project = directory / "project"
    project.mkdir()
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate_git(monkeypatch, directory / "git")
        result = generate(init_manifest(project, flags))
    assert result.exit_code == 0, result.output
    return project


@pytest.fixture
def kafka_project(tmp_path: Path) -> Path:
    return generate_project(tmp_path, KAFKA_FLAGS)


def agogosml(*args: str) -> str:
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


def container_logs(containers: dict[str, Container]) -> str:
    return "\n".join(
        f"--- {name} ---\n{container.logs(tail=30).decode(errors='replace')}"
        for name, container in containers.items()
    )


def wait_healthy(client: Engine, container: Container, timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if client.health(container) == "healthy":
            return
        time.sleep(1.0)
    raise AssertionError(f"{container.name} not healthy after {timeout_seconds} s")


def create_topics(bootstrap: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = [
        NewTopic(INPUT_TOPIC, num_partitions=3, replication_factor=1),
        NewTopic(OTHER_INPUT_TOPIC, num_partitions=1, replication_factor=1),
        NewTopic(OUTPUT_TOPIC, num_partitions=3, replication_factor=1),
        NewTopic(DEAD_LETTER_TOPIC, num_partitions=1, replication_factor=1),
    ]
    for future in admin.create_topics(topics).values():
        future.result(timeout=30)


def produce(bootstrap: str, records: list[dict[str, Any]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for record in records:
        key = str(record["transaction_id"]).encode()
        producer.produce(INPUT_TOPIC, value=orjson.dumps(record), key=key)
        producer.poll(0)
    assert producer.flush(60) == 0, "input records were not all delivered"


class OutputCounter:
    """Counts the transaction ids that reach the output and dead-letter topics."""

    def __init__(self, bootstrap: str) -> None:
        self.scored: Counter[str] = Counter()
        self.dead_letters: list[Any] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"counter-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self._consumer.subscribe([OUTPUT_TOPIC, DEAD_LETTER_TOPIC])

    def read_until(self, condition: Callable[[], bool], timeout_seconds: float) -> bool:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            for message in self._consumer.consume(1000, 0.2):
                if message.error() is not None:
                    continue
                value = orjson.loads(message.value())
                if message.topic() == DEAD_LETTER_TOPIC:
                    self.dead_letters.append(value)
                else:
                    self.scored[str(value["transaction_id"])] += 1
            if condition():
                return True
        return False

    def close(self) -> None:
        self._consumer.close()


def test_containers_survive_app_kill(
    engine: tuple[Engine, str | None],
    images: dict[str, str],
    docker_host: str,
    kafka_project: Path,
) -> None:
    from sample_app.data import fetch_dataset, iter_transactions

    client, _ = engine
    name = f"agogosml-e2e-{uuid.uuid4().hex[:6]}"
    variables = {
        "READER_IMAGE": images["reader"],
        "WRITER_IMAGE": images["writer"],
        "APP_IMAGE": images["sample-app"],
    }
    options = [f"--env={key}={value}" for key, value in variables.items()]
    compose = load_compose(kafka_project / "docker-compose.yml", variables, name)
    # Containers reach a broker on the host at their network's gateway.
    gateway = agogosml(
        "gateway", f"--project={kafka_project}", f"--project-name={name}", *options
    ).strip()
    assert gateway == network_gateway(client, compose)
    listener = Listener("CONTAINERS", "0.0.0.0", advertised_host=gateway)
    records = list(iter_transactions(fetch_dataset().path, limit=RECORDS))
    sent = {str(record["transaction_id"]) for record in records}

    with LocalKafkaBroker(listeners=[listener]) as broker:
        create_topics(broker.bootstrap_servers)
        counter = OutputCounter(broker.bootstrap_servers)
        containers: dict[str, Container] = {}
        try:
            output = agogosml(
                "up",
                f"--project={kafka_project}",
                f"--project-name={name}",
                f"--kafka={broker.listener_address('CONTAINERS')}",
                *options,
            )
            containers = {
                service: project_container(client, compose, service)
                for service in PIPELINE_SERVICES
            }
            for service, container in containers.items():
                assert client.health(container) == "healthy", output
                assert container.attrs["Config"]["User"] == NON_ROOT_USER
                exit_code, uid = container.exec_run(["id", "-u"])
                assert (exit_code, uid.strip()) == (0, b"10001"), service
            app_id = containers["app"].id

            half = RECORDS // 2
            produce(broker.bootstrap_servers, records[:half])
            assert counter.read_until(lambda: len(counter.scored) >= 1000, 180), (
                container_logs(containers)
            )
            containers["app"].kill()
            produce(broker.bootstrap_servers, records[half:])
            scored_while_down = len(counter.scored)
            containers["app"].start()
            wait_healthy(client, containers["app"], 120)

            finished = counter.read_until(
                lambda: len(counter.scored) + len(counter.dead_letters) >= RECORDS, 300
            )
            missing = sent - set(counter.scored)
            assert finished and not missing, (
                f"{len(missing)} records missing\n{container_logs(containers)}"
            )
            assert scored_while_down < RECORDS, "the app was killed after the stream"
            assert counter.dead_letters == []
            assert set(counter.scored) == sent
            duplicates = sum(count - 1 for count in counter.scored.values())
            print(f"{RECORDS} records scored, {duplicates} duplicates after the kill")

            # A second `up` keeps the running, unchanged containers.
            agogosml(
                "up",
                f"--project={kafka_project}",
                f"--project-name={name}",
                f"--kafka={broker.listener_address('CONTAINERS')}",
                *options,
            )
            assert project_container(client, compose, "app").id == app_id
        finally:
            counter.close()
            down = agogosml(
                "down", f"--project={kafka_project}", f"--project-name={name}", *options
            )
    assert f"Removed network {compose.network}" in down
    assert "3 containers removed" in down
    assert (
        client.client.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={name}"}
        )
        == []
    )
    assert client.client.networks.list(names=[compose.network]) == []
    again = agogosml(
        "down", f"--project={kafka_project}", f"--project-name={name}", *options
    )
    assert f"0 containers removed; no network {compose.network} was found" in again


def test_file_pipeline_runs_compose_file_unchanged(
    engine: tuple[Engine, str | None],
    images: dict[str, str],
    docker_host: str,
    tmp_path: Path,
) -> None:
    from sample_app.data import fetch_dataset, iter_transactions

    client, _ = engine
    project = generate_project(tmp_path, FILE_FLAGS)
    data = project / "data"
    data.mkdir()
    # The services run as UID 10001 and write their output and checkpoint here.
    data.chmod(0o777)
    records = list(iter_transactions(fetch_dataset().path, limit=2000))
    (data / "input.jsonl").write_bytes(
        b"".join(orjson.dumps(record) + b"\n" for record in records)
    )
    name = f"agogosml-file-{uuid.uuid4().hex[:6]}"
    options = [
        f"--env=READER_IMAGE={images['reader']}",
        f"--env=WRITER_IMAGE={images['writer']}",
        f"--env=APP_IMAGE={images['sample-app']}",
    ]
    output = data / "output.jsonl"

    def scored() -> list[str]:
        if not output.exists():
            return []
        lines = output.read_bytes().splitlines()
        # The file sink writes one envelope per line, with the result as value.
        values = [orjson.loads(line)["value"] for line in lines if line]
        return [str(value["transaction_id"]) for value in values]

    try:
        agogosml("up", f"--project={project}", f"--project-name={name}", *options)
        deadline = time.monotonic() + 180
        while len(scored()) < len(records) and time.monotonic() < deadline:
            time.sleep(0.5)
        ids = scored()
    finally:
        agogosml("down", f"--project={project}", f"--project-name={name}", *options)

    assert sorted(ids) == sorted(str(record["transaction_id"]) for record in records)
    dead_letters = data / "input.jsonl.dlq.jsonl"
    assert not dead_letters.exists() or dead_letters.read_bytes() == b""


def test_project_app_image_turns_healthy(
    engine: tuple[Engine, str | None], docker_host: str, kafka_project: Path
) -> None:
    client, base_image = engine
    base = [f"--base-image={base_image}"] if base_image else []
    agogosml("build", f"--project={kafka_project}", "--only=app", *base)
    compose: ComposeProject = load_compose(kafka_project / "docker-compose.yml", {})
    image = compose.services["app"].image
    assert image is not None and client.image_exists(image)

    container = client.client.containers.run(
        image,
        detach=True,
        name=f"agogosml-app-{uuid.uuid4().hex[:6]}",
        environment={"APP_WRITER_URL": "http://127.0.0.1:9"},
    )
    try:
        wait_healthy(client, container, 120)
        container.reload()
        assert container.attrs["Config"]["User"] == NON_ROOT_USER
        exit_code, uid = container.exec_run(["id", "-u"])
        assert (exit_code, uid.strip()) == (0, b"10001")
    finally:
        container.remove(force=True)


@pytest.fixture
def small_image(engine: tuple[Engine, str | None]) -> str:
    """An image with Python and a shell, as small as this engine offers."""
    return engine[1] or "python:3.12-slim-bookworm"


def write_compose(directory: Path, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "docker-compose.yml").write_text(text)
    return directory


def up_fails(project: Path, name: str, *args: str) -> str:
    result = CliRunner().invoke(
        cli, ["up", f"--project={project}", f"--project-name={name}", *args]
    )
    assert result.exit_code == 1, result.output
    return result.output


def test_up_keeps_foreign_container(
    engine: tuple[Engine, str | None],
    docker_host: str,
    small_image: str,
    tmp_path: Path,
) -> None:
    client, _ = engine
    taken = f"agogosml-foreign-{uuid.uuid4().hex[:6]}"
    foreign = client.client.containers.run(
        small_image, ["sleep", "300"], name=taken, detach=True
    )
    project = write_compose(
        tmp_path / "p",
        f"services:\n  app:\n    image: {small_image}\n"
        f"    container_name: {taken}\n    command: sleep 300\n",
    )
    name = f"agogosml-own-{uuid.uuid4().hex[:6]}"
    try:
        output = up_fails(project, name)
        foreign.reload()
        assert foreign.status == "running"
        assert "is taken by a container that compose did not create" in output
    finally:
        foreign.remove(force=True)
        agogosml("down", f"--project={project}", f"--project-name={name}")


def test_up_fails_on_exited_service(
    engine: tuple[Engine, str | None],
    docker_host: str,
    small_image: str,
    tmp_path: Path,
) -> None:
    project = write_compose(
        tmp_path / "p",
        f"services:\n  app:\n    image: {small_image}\n"
        "    command: [python3, -c, 'import sys, time; time.sleep(1); sys.exit(3)']\n"
        "  other:\n    image: " + small_image + "\n    command: sleep 300\n"
        "    depends_on: [app]\n",
    )
    name = f"agogosml-exit-{uuid.uuid4().hex[:6]}"
    try:
        # `other` takes long enough to start that `app` has exited by the end.
        output = up_fails(project, name, "--wait-seconds=60")
    finally:
        agogosml("down", f"--project={project}", f"--project-name={name}")
    assert "exited with code 3" in output


def test_up_fails_fast_when_unhealthy(
    engine: tuple[Engine, str | None],
    docker_host: str,
    small_image: str,
    tmp_path: Path,
) -> None:
    project = write_compose(
        tmp_path / "p",
        f"services:\n  app:\n    image: {small_image}\n    command: sleep 300\n"
        "    healthcheck:\n      test: [CMD, python3, -c, 'raise SystemExit(1)']\n"
        "      interval: 1s\n      retries: 1\n",
    )
    name = f"agogosml-sick-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    try:
        output = up_fails(project, name, "--wait-seconds=120")
    finally:
        agogosml("down", f"--project={project}", f"--project-name={name}")
    assert "is unhealthy" in output
    assert time.monotonic() - started < 60


def test_up_replaces_container_of_rebuilt_image(
    engine: tuple[Engine, str | None],
    docker_host: str,
    small_image: str,
    tmp_path: Path,
) -> None:
    client, _ = engine
    tag = f"localhost/agogosml-rebuilt-{uuid.uuid4().hex[:6]}:1"
    context = tmp_path / "image"
    context.mkdir()
    dockerfile = context / "Dockerfile"
    project = write_compose(
        tmp_path / "p",
        f"services:\n  app:\n    image: {tag}\n    command: sleep 300\n",
    )
    name = f"agogosml-rebuilt-{uuid.uuid4().hex[:6]}"
    try:
        ids = []
        for generation in ("one", "two"):
            dockerfile.write_text(
                f"FROM {small_image}\nLABEL generation={generation}\n"
            )
            client.client.images.build(path=str(context), tag=tag, pull=False)
            agogosml("up", f"--project={project}", f"--project-name={name}")
            compose = load_compose(project / "docker-compose.yml", {}, name)
            ids.append(project_container(client, compose, "app").id)
        assert ids[0] != ids[1]
    finally:
        agogosml("down", f"--project={project}", f"--project-name={name}")
        client.client.images.remove(tag, force=True)
