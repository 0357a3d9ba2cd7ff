from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deployment" / "kafka"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deployment" / "azurite"))
from azurite import LocalAzurite  # noqa: E402
from broker import LocalKafkaBroker  # noqa: E402

# ---------------------------------------------------------------------------
# Kafka broker and topics
# ---------------------------------------------------------------------------

TOPIC_TIMEOUT_SECONDS = 30.0


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of the Kafka broker that this test session uses.

    KAFKA_BOOTSTRAP_SERVERS selects an external broker. Without it, one local
    broker starts on first use and stops when the session ends.
    """
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    with LocalKafkaBroker() as broker:
        yield broker.bootstrap_servers


@pytest.fixture
def kafka_topic_factory(
    kafka_bootstrap: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """Create topics with unique names and delete them after the test.

    The factory takes the partition count, waits until every partition has a
    leader and returns the topic name, which starts with the test name.
    """
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    prefix = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:100]
    created: list[str] = []

    def create_topic(partitions: int = 1) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        topic = NewTopic(name, num_partitions=partitions, replication_factor=1)
        futures = admin.create_topics([topic], operation_timeout=TOPIC_TIMEOUT_SECONDS)
        futures[name].result(timeout=TOPIC_TIMEOUT_SECONDS)
        created.append(name)
        _wait_for_partition_leaders(admin, name, partitions)
        return name

    yield create_topic

    if created:
        futures = admin.delete_topics(created, operation_timeout=TOPIC_TIMEOUT_SECONDS)
        for future in futures.values():
            future.result(timeout=TOPIC_TIMEOUT_SECONDS)


@pytest.fixture(scope="session")
def eventhubs_kafka_endpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Path]]:
    """Start a broker with a listener like the Event Hubs Kafka endpoint.

    Yields the listener's host:port and the PEM file of the CA that signed its
    certificate. tests/kafka_endpoint.py describes the listener.
    """
    from kafka_endpoint import LISTENER, eventhubs_listener, write_tls_files

    ca_path, keystore = write_tls_files(tmp_path_factory.mktemp("tls"))
    with LocalKafkaBroker(listeners=[eventhubs_listener(keystore)]) as broker:
        yield broker.listener_address(LISTENER), ca_path


def _wait_for_partition_leaders(
    admin: AdminClient, topic: str, partitions: int
) -> None:
    deadline = time.monotonic() + TOPIC_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        metadata = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        if (
            metadata is not None
            and metadata.error is None
            and len(metadata.partitions) == partitions
            and all(p.leader >= 0 for p in metadata.partitions.values())
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(
        f"topic {topic!r} did not get leaders for all {partitions} partitions "
        f"within {TOPIC_TIMEOUT_SECONDS:.0f} s"
    )


# ---------------------------------------------------------------------------
# Azure Storage emulator
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def azurite_connection_string() -> Iterator[str]:
    """Storage connection string of an Azurite blob service for this session.

    deployment/azurite/azurite.py installs Azurite with npm on first use and
    caches it.
    """
    with LocalAzurite() as azurite:
        yield azurite.connection_string


# ---------------------------------------------------------------------------
# Sample app model
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fraud_model() -> Path:
    """Path of the trained sample-app model, trained once if it is missing."""
    import subprocess

    from sample_app.train import default_model_path

    path = default_model_path()
    if not path.exists():
        subprocess.run([sys.executable, "-m", "sample_app.train"], check=True)
    return path


# ---------------------------------------------------------------------------
# Helm
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm_binary() -> str:
    """Path of the Helm binary that the chart and release tests run.

    HELM selects a binary of your own. Without it, deployment/helm/helm.py
    builds the pinned version with Go on first use (a few minutes) and caches it.
    """
    configured = os.environ.get("HELM")
    if configured:
        return configured
    script = Path(__file__).resolve().parents[1] / "deployment" / "helm" / "helm.py"
    spec = importlib.util.spec_from_file_location("helm_build", script)
    assert spec is not None and spec.loader is not None
    helm_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helm_build)
    return str(helm_build.fetch())
