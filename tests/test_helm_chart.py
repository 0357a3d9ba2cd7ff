"""The Helm chart helm/agogosml, rendered by the real Helm binary."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agogosml.app import AppSettings
from agogosml.config import (
    EventHubSettings,
    KafkaSettings,
    ReaderSettings,
    WriterSettings,
)
from agogosml_cli.chart_settings import settings_schema
from agogosml_cli.release import CHART_DEFAULT_STATE, fullname

CHART = Path(__file__).resolve().parents[1] / "helm" / "agogosml"
#: Kubernetes version whose schemas kubernetes-validate 1.37 ships.
KUBERNETES_VERSION = "1.37.0"
RESTRICTED_POD_FIELDS = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER_FIELDS = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
SECRET_VARIABLES = {
    "KAFKA_SASL_PASSWORD",
    "KAFKA_EVENTHUBS_CONNECTION_STRING",
    "EVENTHUB_CONNECTION_STRING",
    "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING",
    "READER_APP_TOKEN",
    "APP_TOKEN",
    "APP_WRITER_TOKEN",
    "WRITER_TOKEN",
}
SASL = [
    "kafka.securityProtocol=SASL_SSL",
    "kafka.sasl.mechanism=SCRAM-SHA-512",
    "kafka.sasl.username=pipeline",
    "kafka.sasl.password.existingSecret=kafka-credentials",
    "kafka.sasl.password.key=password",
    "kafka.caCertificate.existingSecret=kafka-ca",
    "kafka.caCertificate.key=ca.crt",
    "auth.appToken.existingSecret=pipeline-tokens",
    "auth.appToken.key=app",
    "auth.writerToken.existingSecret=pipeline-tokens",
    "auth.writerToken.key=writer",
]
EVENT_HUBS = [
    "kafka.bootstrapServers=example.servicebus.windows.net:9093",
    "kafka.eventHubsConnectionString.existingSecret=eventhubs",
    "kafka.eventHubsConnectionString.key=connection-string",
]
NATIVE_EVENT_HUBS = [
    "transport=eventhubs",
    "reader.topics={transactions}",
    "writer.topic=transactions-scored",
    "eventhubs.connectionString.existingSecret=eventhubs",
    "eventhubs.connectionString.key=connection-string",
    "eventhubs.consumerGroup=scoring",
    "eventhubs.checkpointStore.container=scoring-checkpoints",
    "eventhubs.checkpointStore.connectionString.existingSecret=checkpoints",
    "eventhubs.checkpointStore.connectionString.key=connection-string",
]
CLIENT_ID = "00000000-1111-2222-3333-444444444444"
EVENT_HUBS_AZURE_AD = [
    "transport=eventhubs",
    "eventhubs.fullyQualifiedNamespace=scoring.servicebus.windows.net",
    "eventhubs.checkpointStore.accountUrl=https://scoring.blob.core.windows.net",
    "eventhubs.workloadIdentity.enabled=true",
    f"eventhubs.workloadIdentity.clientId={CLIENT_ID}",
]

# Value combinations that every rendering check runs on.
COMBINATIONS = {
    "defaults": [],
    "green active": ["app.activeSlot=green"],
    "idle warm": ["app.idleSlot=warm"],
    "green in preview": ["app.previewSlot=green", "app.previousSlot=green"],
    "keda": ["keda.enabled=true"],
    "network policy": ["networkPolicy.enabled=true"],
    "sasl secrets": SASL,
    "keda with sasl": ["keda.enabled=true", *SASL],
    "event hubs with keda": ["keda.enabled=true", *EVENT_HUBS],
    "native event hubs": NATIVE_EVENT_HUBS,
    "native event hubs with azure ad": [
        *EVENT_HUBS_AZURE_AD,
        "networkPolicy.enabled=true",
        "auth.appToken.existingSecret=pipeline-tokens",
        "auth.appToken.key=app",
    ],
    "everything": [
        "keda.enabled=true",
        "networkPolicy.enabled=true",
        "app.idleSlot=warm",
        "app.activeSlot=green",
        *SASL,
    ],
}


def helm(helm_binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm_binary, *args], capture_output=True, text=True, timeout=120
    )


def render(
    helm_binary: str, *settings: str, json_settings: str = "", kube_version: str = ""
) -> list[dict]:
    args = ["template", "rel", str(CHART)]
    if kube_version:
        args += ["--kube-version", kube_version]
    for setting in settings:
        args += ["--set", setting]
    if json_settings:
        args += ["--set-json", json_settings]
    result = helm(helm_binary, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(
    helm_binary: str, *settings: str, json_settings: str = "", kube_version: str = ""
) -> str:
    args = ["template", "rel", str(CHART)]
    if kube_version:
        args += ["--kube-version", kube_version]
    for setting in settings:
        args += ["--set", setting]
    if json_settings:
        args += ["--set-json", json_settings]
    result = helm(helm_binary, *args)
    assert result.returncode != 0, "helm template accepted the values"
    return result.stderr


def find(manifests: list[dict], kind: str, name: str) -> dict:
    for manifest in manifests:
        if manifest["kind"] == kind and manifest["metadata"]["name"] == name:
            return manifest
    raise AssertionError(f"no {kind} {name!r} in the rendered manifests")


def pod_specs(manifests: list[dict]) -> list[tuple[str, dict]]:
    return [
        (m["metadata"]["name"], m["spec"]["template"]["spec"])
        for m in manifests
        if m["kind"] == "Deployment"
    ]


def env_of(deployment: dict) -> dict[str, dict[str, Any]]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {variable["name"]: variable for variable in container["env"]}


@pytest.fixture(scope="module", params=list(COMBINATIONS), ids=list(COMBINATIONS))
def rendered(request: pytest.FixtureRequest, helm_binary: str) -> list[dict]:
    return render(helm_binary, *COMBINATIONS[request.param])


# ---------------------------------------------------------------------------
# Lint and Kubernetes schemas
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint --strict"])
def test_chart_lints(helm_binary: str, strict: bool) -> None:
    args = ["lint", str(CHART), *(["--strict"] if strict else [])]

    result = helm(helm_binary, *args)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_chart_lints_with_every_option(helm_binary: str) -> None:
    settings = [
        arg for setting in COMBINATIONS["everything"] for arg in ("--set", setting)
    ]

    result = helm(helm_binary, "lint", str(CHART), "--strict", *settings)

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "values", [NATIVE_EVENT_HUBS, EVENT_HUBS_AZURE_AD], ids=["secrets", "azure ad"]
)
def test_chart_lints_with_native_event_hubs(
    helm_binary: str, values: list[str]
) -> None:
    settings = [arg for setting in values for arg in ("--set", setting)]

    result = helm(helm_binary, "lint", str(CHART), "--strict", *settings)

    assert result.returncode == 0, result.stdout + result.stderr


def test_manifests_match_kubernetes_schemas(rendered: list[dict]) -> None:
    for manifest in rendered:
        if manifest["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: test_keda_* check it
        name = f"{manifest['kind']} {manifest['metadata']['name']}"
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{name} is invalid at {path}: {error.message}")


def test_default_release_resources(helm_binary: str) -> None:
    kinds = sorted(f"{m['kind']} {m['metadata']['name']}" for m in render(helm_binary))

    assert kinds == [
        "Deployment rel-agogosml-app-blue",
        "Deployment rel-agogosml-app-green",
        "Deployment rel-agogosml-reader",
        "Deployment rel-agogosml-writer",
        "PodDisruptionBudget rel-agogosml-app",
        "PodDisruptionBudget rel-agogosml-reader",
        "PodDisruptionBudget rel-agogosml-writer",
        "Service rel-agogosml-app",
        "Service rel-agogosml-app-preview",
        "Service rel-agogosml-writer",
        "ServiceAccount rel-agogosml",
    ]


@pytest.mark.parametrize(
    ("release", "values"),
    [
        ("rel", {}),
        ("agogosml-prod", {}),
        ("scoring-" + "x" * 45, {}),  # the maximum length Helm accepts
        ("rel", {"nameOverride": "fraud"}),
        ("rel", {"fullnameOverride": "fraud-scoring"}),
        ("rel", {"fullnameOverride": "fraud-" + "y" * 44 + "-z"}),
    ],
)
def test_release_names_resources_as_the_chart_does(
    helm_binary: str, release: str, values: dict[str, str]
) -> None:
    args = ["template", release, str(CHART)]
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    result = helm(helm_binary, *args)
    assert result.returncode == 0, result.stderr
    manifests = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    # The release commands find the preview Service by this name.
    preview = find(manifests, "Service", f"{fullname(release, values)}-app-preview")
    assert len(preview["metadata"]["name"]) <= 63


# ---------------------------------------------------------------------------
# Pod security, probes, resources and secrets
# ---------------------------------------------------------------------------


def test_pods_meet_restricted_profile(rendered: list[dict]) -> None:
    for name, spec in pod_specs(rendered):
        for field, expected in RESTRICTED_POD_FIELDS.items():
            assert spec["securityContext"].get(field) == expected, (name, field)
        assert spec["automountServiceAccountToken"] is False, name
        assert "hostNetwork" not in spec, name
        for container in spec["containers"]:
            context = container["securityContext"]
            for field, expected in RESTRICTED_CONTAINER_FIELDS.items():
                assert context.get(field) == expected, (name, field)
            assert "privileged" not in context, name


def test_pods_mount_writable_tmp(rendered: list[dict]) -> None:
    for name, spec in pod_specs(rendered):
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        mounts = {
            m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]
        }
        assert "/tmp" in mounts, name
        assert "emptyDir" in volumes[mounts["/tmp"]], name


def tmp_size_limits(manifests: list[dict]) -> dict[str, str]:
    """Return the size limit of each Deployment's /tmp emptyDir by name."""
    limits = {}
    for name, spec in pod_specs(manifests):
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        mounts = {
            m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]
        }
        limits[name] = volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"]
    return limits


def test_tmp_size_limit_default(helm_binary: str) -> None:
    limits = tmp_size_limits(render(helm_binary))

    assert limits == {
        "rel-agogosml-reader": "64Mi",
        "rel-agogosml-writer": "64Mi",
        "rel-agogosml-app-blue": "64Mi",
        "rel-agogosml-app-green": "64Mi",
    }


def test_tmp_size_limit_per_component(helm_binary: str) -> None:
    manifests = render(helm_binary, "writer.tmpSizeLimit=256Mi", "app.tmpSizeLimit=2Gi")

    limits = tmp_size_limits(manifests)
    assert limits["rel-agogosml-reader"] == "64Mi"
    assert limits["rel-agogosml-writer"] == "256Mi"
    assert limits["rel-agogosml-app-blue"] == "2Gi"
    assert limits["rel-agogosml-app-green"] == "2Gi"


def test_probes_and_resources_set(rendered: list[dict]) -> None:
    ports = {"reader": "READER_PORT", "writer": "WRITER_PORT", "app": "APP_PORT"}
    for manifest in rendered:
        if manifest["kind"] != "Deployment":
            continue
        name = manifest["metadata"]["name"]
        container = manifest["spec"]["template"]["spec"]["containers"][0]
        env = env_of(manifest)
        port_variable = ports[container["name"]]

        assert container["startupProbe"]["httpGet"]["path"] == "/healthz", name
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert container["startupProbe"]["httpGet"]["port"] == "http", name
        assert container["livenessProbe"]["httpGet"]["port"] == "http", name
        assert container["ports"][0]["name"] == "http", name
        assert (
            str(container["ports"][0]["containerPort"]) == (env[port_variable]["value"])
        ), name
        host_variable = port_variable.replace("_PORT", "_HOST")
        assert env[host_variable]["value"] == "0.0.0.0", name
        assert container["resources"]["requests"], name
        assert container["resources"]["limits"], name


def containers_by_component(manifests: list[dict]) -> dict[str, dict]:
    """Return the container of the reader, the writer and the blue app slot."""
    names = {
        "reader": "rel-agogosml-reader",
        "writer": "rel-agogosml-writer",
        "app": "rel-agogosml-app-blue",
    }
    return {
        component: find(manifests, "Deployment", name)["spec"]["template"]["spec"][
            "containers"
        ][0]
        for component, name in names.items()
    }


def test_app_startup_probe_allows_model_load(helm_binary: str) -> None:
    containers = containers_by_component(render(helm_binary))

    app = containers["app"]["startupProbe"]
    reader = containers["reader"]["startupProbe"]
    assert app["periodSeconds"] * app["failureThreshold"] == 300
    assert reader["periodSeconds"] * reader["failureThreshold"] == 60
    assert containers["app"]["livenessProbe"]["failureThreshold"] == 3


def test_component_probes_override_shared(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        "probes.liveness.periodSeconds=20",
        "app.probes.liveness.periodSeconds=30",
        "reader.probes.readiness.initialDelaySeconds=0",
        "writer.probes.startup.failureThreshold=24",
    )

    containers = containers_by_component(manifests)
    reader = containers["reader"]
    writer = containers["writer"]
    app = containers["app"]
    assert app["livenessProbe"]["periodSeconds"] == 30
    assert app["livenessProbe"]["timeoutSeconds"] == 2
    assert writer["livenessProbe"]["periodSeconds"] == 20
    assert reader["livenessProbe"]["periodSeconds"] == 20
    assert reader["readinessProbe"]["initialDelaySeconds"] == 0
    assert writer["readinessProbe"]["initialDelaySeconds"] == 2
    assert writer["startupProbe"]["failureThreshold"] == 24
    assert reader["startupProbe"]["failureThreshold"] == 12
    assert app["startupProbe"]["failureThreshold"] == 60


def test_pods_spread_over_nodes_and_zones(rendered: list[dict]) -> None:
    for manifest in rendered:
        if manifest["kind"] != "Deployment":
            continue
        name = manifest["metadata"]["name"]
        selector = manifest["spec"]["selector"]["matchLabels"]
        constraints = manifest["spec"]["template"]["spec"]["topologySpreadConstraints"]

        keys = [constraint["topologyKey"] for constraint in constraints]
        assert keys == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"], name
        for constraint in constraints:
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway", name
            assert constraint["maxSkew"] == 1, name
            assert constraint["labelSelector"] == {"matchLabels": selector}, name
            assert constraint["matchLabelKeys"] == ["pod-template-hash"], name


def test_spread_without_revision_keys_before_kubernetes_127(helm_binary: str) -> None:
    manifests = render(helm_binary, kube_version="1.26.0")

    for _, spec in pod_specs(manifests):
        for constraint in spec["topologySpreadConstraints"]:
            assert "matchLabelKeys" not in constraint


def test_app_slots_spread_separately(helm_binary: str) -> None:
    manifests = render(helm_binary)

    for slot in ("blue", "green"):
        deployment = find(manifests, "Deployment", f"rel-agogosml-app-{slot}")
        spec = deployment["spec"]["template"]["spec"]
        for constraint in spec["topologySpreadConstraints"]:
            labels = constraint["labelSelector"]["matchLabels"]
            assert labels["agogosml.io/slot"] == slot
            assert labels["app.kubernetes.io/component"] == "app"


def test_component_spread_overrides_shared(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        "topologySpread.maxSkew=2",
        "app.topologySpread.whenUnsatisfiable=DoNotSchedule",
        "writer.topologySpread.topologyKeys={kubernetes.io/hostname}",
        "reader.topologySpread.enabled=false",
    )

    def constraints(name: str) -> list[dict]:
        spec = find(manifests, "Deployment", name)["spec"]["template"]["spec"]
        return list(spec.get("topologySpreadConstraints", []))

    app = constraints("rel-agogosml-app-blue")
    writer = constraints("rel-agogosml-writer")
    assert constraints("rel-agogosml-reader") == []
    assert [constraint["topologyKey"] for constraint in writer] == [
        "kubernetes.io/hostname"
    ]
    assert writer[0]["whenUnsatisfiable"] == "ScheduleAnyway"
    assert writer[0]["maxSkew"] == 2
    assert len(app) == 2
    for constraint in app:
        assert constraint["whenUnsatisfiable"] == "DoNotSchedule"
        assert constraint["maxSkew"] == 2


def test_spread_disabled_for_every_component(helm_binary: str) -> None:
    manifests = render(helm_binary, "topologySpread.enabled=false")

    for name, spec in pod_specs(manifests):
        assert "topologySpreadConstraints" not in spec, name


def test_spread_without_keys_rejected(helm_binary: str) -> None:
    error = render_error(
        helm_binary, json_settings="writer.topologySpread.topologyKeys=[]"
    )

    assert "'/writer/topologySpread/topologyKeys'" in error
    assert "minItems" in error


def test_secrets_only_from_secret_refs(rendered: list[dict]) -> None:
    for manifest in rendered:
        if manifest["kind"] != "Deployment":
            continue
        for variable_name, variable in env_of(manifest).items():
            if variable_name in SECRET_VARIABLES:
                assert "value" not in variable, variable_name
                assert "secretKeyRef" in variable["valueFrom"], variable_name


def test_sasl_secrets_reach_each_service(helm_binary: str) -> None:
    manifests = render(helm_binary, *SASL)
    reader = env_of(find(manifests, "Deployment", "rel-agogosml-reader"))
    writer = env_of(find(manifests, "Deployment", "rel-agogosml-writer"))
    app = env_of(find(manifests, "Deployment", "rel-agogosml-app-blue"))

    password = {"name": "kafka-credentials", "key": "password"}
    assert reader["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == password
    assert writer["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == password
    app_token = {"name": "pipeline-tokens", "key": "app"}
    writer_token = {"name": "pipeline-tokens", "key": "writer"}
    assert reader["READER_APP_TOKEN"]["valueFrom"]["secretKeyRef"] == app_token
    assert app["APP_TOKEN"]["valueFrom"]["secretKeyRef"] == app_token
    assert app["APP_WRITER_TOKEN"]["valueFrom"]["secretKeyRef"] == writer_token
    assert writer["WRITER_TOKEN"]["valueFrom"]["secretKeyRef"] == writer_token
    assert reader["KAFKA_SASL_MECHANISM"]["value"] == "SCRAM-SHA-512"
    assert reader["KAFKA_SSL_CA_LOCATION"]["value"] == "/etc/agogosml/kafka-ca/ca.crt"
    assert "KAFKA_SASL_PASSWORD" not in app


def test_keda_trigger_has_no_credentials(helm_binary: str) -> None:
    manifests = render(helm_binary, "keda.enabled=true", *SASL)

    trigger = find(manifests, "ScaledObject", "rel-agogosml-reader")["spec"][
        "triggers"
    ][0]
    assert not [m for m in manifests if m["kind"] == "Secret"]
    assert not {"username", "password", "ca"} & set(trigger["metadata"])


def test_service_urls_wire_pipeline(helm_binary: str) -> None:
    manifests = render(helm_binary)
    reader = env_of(find(manifests, "Deployment", "rel-agogosml-reader"))
    app = env_of(find(manifests, "Deployment", "rel-agogosml-app-green"))

    assert reader["READER_APP_URL"]["value"] == "http://rel-agogosml-app:8000"
    assert app["APP_WRITER_URL"]["value"] == "http://rel-agogosml-writer:8082"
    assert reader["READER_SOURCE"]["value"] == "kafka"
    assert reader["READER_INPUT"]["value"] == "transactions"
    assert reader["KAFKA_GROUP_ID"]["value"] == "agogosml-input-reader"


def test_containers_run_service_commands(helm_binary: str) -> None:
    manifests = render(helm_binary)

    def container(name: str) -> dict:
        deployment = find(manifests, "Deployment", name)
        return deployment["spec"]["template"]["spec"]["containers"][0]

    reader = container("rel-agogosml-reader")
    writer = container("rel-agogosml-writer")
    app = container("rel-agogosml-app-blue")
    assert reader["command"] == ["agogosml-input-reader"]
    assert reader["image"] == "agogosml-input-reader:0.1.0"
    assert writer["command"] == ["agogosml-output-writer"]
    assert writer["image"] == "agogosml-output-writer:0.1.0"
    assert "command" not in app  # the model app image's entrypoint


def test_settings_become_env(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        "reader.settings.READER_ORDERING=key",
        "writer.settings.KAFKA_LINGER_MS=5",
        "app.settings.APP_LOG_LEVEL=DEBUG",
    )

    reader = env_of(find(manifests, "Deployment", "rel-agogosml-reader"))
    writer = env_of(find(manifests, "Deployment", "rel-agogosml-writer"))
    app = env_of(find(manifests, "Deployment", "rel-agogosml-app-blue"))
    assert reader["READER_ORDERING"]["value"] == "key"
    assert writer["KAFKA_LINGER_MS"]["value"] == "5"
    assert app["APP_LOG_LEVEL"]["value"] == "DEBUG"


def test_schema_settings_cover_every_variable() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    components = schema["properties"]
    allowed = set()
    for component in ("reader", "writer", "app"):
        allowed |= set(components[component]["properties"]["settings"]["properties"])
    # The chart sets these itself, or they apply only to file sources and sinks.
    wired = {
        "READER_HOST", "READER_PORT", "READER_SOURCE", "READER_INPUT",
        "READER_APP_URL", "WRITER_HOST", "WRITER_PORT", "WRITER_SINK",
        "WRITER_OUTPUT", "APP_HOST", "APP_PORT", "APP_WRITER_URL",
        "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_GROUP_ID", "KAFKA_AUTO_OFFSET_RESET",
        "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME",
        "KAFKA_SSL_CA_LOCATION", "EVENTHUB_FULLY_QUALIFIED_NAMESPACE",
        "EVENTHUB_CONSUMER_GROUP", "EVENTHUB_STARTING_POSITION",
        "EVENTHUB_CHECKPOINT_STORE_CONTAINER", "EVENTHUB_CHECKPOINT_STORE_ACCOUNT_URL",
    }  # fmt: skip
    file_only = {
        "READER_STOP_AT_END", "READER_CHECKPOINT_PATH", "READER_MAX_LINE_BYTES",
        "READER_ROTATE_WAIT_MS", "WRITER_FSYNC",
    }  # fmt: skip

    documented = set()
    models = (ReaderSettings, WriterSettings, KafkaSettings, EventHubSettings)
    for model in (*models, AppSettings):
        prefix = str(model.model_config.get("env_prefix", ""))
        documented |= {f"{prefix}{name}".upper() for name in model.model_fields}
    assert allowed | wired | file_only | SECRET_VARIABLES == documented
    assert not allowed & (wired | SECRET_VARIABLES)


# ---------------------------------------------------------------------------
# Native Event Hubs
# ---------------------------------------------------------------------------


def test_native_event_hubs_env(helm_binary: str) -> None:
    manifests = render(helm_binary, *NATIVE_EVENT_HUBS)
    reader = env_of(find(manifests, "Deployment", "rel-agogosml-reader"))
    writer = env_of(find(manifests, "Deployment", "rel-agogosml-writer"))
    app = env_of(find(manifests, "Deployment", "rel-agogosml-app-blue"))

    hubs = {"name": "eventhubs", "key": "connection-string"}
    storage = {"name": "checkpoints", "key": "connection-string"}
    assert reader["READER_SOURCE"]["value"] == "eventhubs"
    assert reader["READER_INPUT"]["value"] == "transactions"
    assert reader["EVENTHUB_CONNECTION_STRING"]["valueFrom"]["secretKeyRef"] == hubs
    assert reader["EVENTHUB_CONSUMER_GROUP"]["value"] == "scoring"
    assert reader["EVENTHUB_STARTING_POSITION"]["value"] == "earliest"
    assert reader["EVENTHUB_CHECKPOINT_STORE_CONTAINER"]["value"] == (
        "scoring-checkpoints"
    )
    assert (
        reader["EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING"]["valueFrom"][
            "secretKeyRef"
        ]
        == storage
    )
    assert writer["WRITER_SINK"]["value"] == "eventhubs"
    assert writer["WRITER_OUTPUT"]["value"] == "transactions-scored"
    assert writer["EVENTHUB_CONNECTION_STRING"]["valueFrom"]["secretKeyRef"] == hubs
    for env in (reader, writer):
        assert not [name for name in env if name.startswith("KAFKA_")]
        assert "EVENTHUB_FULLY_QUALIFIED_NAMESPACE" not in env
    assert not [name for name in writer if "CHECKPOINT" in name]
    assert not [name for name in app if name.startswith("EVENTHUB_")]


def test_native_event_hubs_settings_reach_env(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        *NATIVE_EVENT_HUBS,
        "reader.settings.EVENTHUB_CHECKPOINT_INTERVAL_MS=1000",
        "reader.settings.READER_DEAD_LETTER=transactions-dead",
        "writer.settings.EVENTHUB_MAX_BATCH_BYTES=262144",
    )

    reader = env_of(find(manifests, "Deployment", "rel-agogosml-reader"))
    writer = env_of(find(manifests, "Deployment", "rel-agogosml-writer"))
    assert reader["EVENTHUB_CHECKPOINT_INTERVAL_MS"]["value"] == "1000"
    assert reader["READER_DEAD_LETTER"]["value"] == "transactions-dead"
    assert writer["EVENTHUB_MAX_BATCH_BYTES"]["value"] == "262144"


def test_event_hubs_workload_identity(helm_binary: str) -> None:
    manifests = render(helm_binary, *EVENT_HUBS_AZURE_AD)
    account = find(manifests, "ServiceAccount", "rel-agogosml")
    reader_deployment = find(manifests, "Deployment", "rel-agogosml-reader")
    writer_deployment = find(manifests, "Deployment", "rel-agogosml-writer")
    app_deployment = find(manifests, "Deployment", "rel-agogosml-app-blue")
    reader = env_of(reader_deployment)
    writer = env_of(writer_deployment)

    def pod_labels(deployment: dict) -> dict[str, str]:
        labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
        return labels

    annotations = account["metadata"]["annotations"]
    assert annotations["azure.workload.identity/client-id"] == CLIENT_ID
    assert pod_labels(reader_deployment)["azure.workload.identity/use"] == "true"
    assert pod_labels(writer_deployment)["azure.workload.identity/use"] == "true"
    assert "azure.workload.identity/use" not in pod_labels(app_deployment)
    namespace = "scoring.servicebus.windows.net"
    assert reader["EVENTHUB_FULLY_QUALIFIED_NAMESPACE"]["value"] == namespace
    assert writer["EVENTHUB_FULLY_QUALIFIED_NAMESPACE"]["value"] == namespace
    assert reader["EVENTHUB_CHECKPOINT_STORE_ACCOUNT_URL"]["value"] == (
        "https://scoring.blob.core.windows.net"
    )
    for env in (reader, writer):
        assert "EVENTHUB_CONNECTION_STRING" not in env
        assert "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING" not in env


def test_workload_identity_needs_eventhubs_transport(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        "eventhubs.workloadIdentity.enabled=true",
        f"eventhubs.workloadIdentity.clientId={CLIENT_ID}",
    )

    account = find(manifests, "ServiceAccount", "rel-agogosml")
    reader = find(manifests, "Deployment", "rel-agogosml-reader")
    assert "annotations" not in account["metadata"]
    assert (
        "azure.workload.identity/use"
        not in (reader["spec"]["template"]["metadata"]["labels"])
    )


def test_network_policy_opens_event_hubs_ports(helm_binary: str) -> None:
    manifests = render(helm_binary, *NATIVE_EVENT_HUBS, "networkPolicy.enabled=true")

    for component in ("reader", "writer"):
        policy = find(manifests, "NetworkPolicy", f"rel-agogosml-{component}")
        broker = policy["spec"]["egress"][-1]
        assert [port["port"] for port in broker["ports"]] == [5671, 443], component


@pytest.mark.parametrize(
    ("settings", "port"),
    [
        (["kafka.bootstrapServers=broker-0:9092\\,broker-1:29092"], "29092"),
        (["kafka.bootstrapServers=[::1]:9094"], "9094"),
        (
            [
                *EVENT_HUBS[1:],
                "kafka.bootstrapServers=",
                "networkPolicy.kafkaPorts={9092}",
            ],
            "9093",
        ),
    ],
)
def test_network_policy_blocking_broker_rejected(
    helm_binary: str, settings: list[str], port: str
) -> None:
    error = render_error(helm_binary, "networkPolicy.enabled=true", *settings)

    assert "networkPolicy.kafkaPorts" in error
    assert f"add {port} to networkPolicy.kafkaPorts" in error


def test_network_policy_opens_broker_port(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        "networkPolicy.enabled=true",
        "networkPolicy.kafkaPorts={29092}",
        "kafka.bootstrapServers=broker-0:29092",
    )
    unchecked = render(helm_binary, "kafka.bootstrapServers=broker-0:29092")

    reader = find(manifests, "NetworkPolicy", "rel-agogosml-reader")
    broker = reader["spec"]["egress"][-1]
    assert [port["port"] for port in broker["ports"]] == [29092]
    assert not [m for m in unchecked if m["kind"] == "NetworkPolicy"]


def test_literal_eventhubs_secret_in_extra_env_rejected(helm_binary: str) -> None:
    error = render_error(
        helm_binary,
        json_settings='app.extraEnv=[{"name":"EVENTHUB_CONNECTION_STRING","value":"x"}]',
    )

    assert "app.extraEnv[0].value" in error


# ---------------------------------------------------------------------------
# Blue/green slots
# ---------------------------------------------------------------------------


def slot_replicas(manifests: list[dict]) -> dict[str, int]:
    return {
        slot: find(manifests, "Deployment", f"rel-agogosml-app-{slot}")["spec"][
            "replicas"
        ]
        for slot in ("blue", "green")
    }


@pytest.mark.parametrize("active", ["blue", "green"])
def test_service_selects_active_slot(helm_binary: str, active: str) -> None:
    idle = "green" if active == "blue" else "blue"
    manifests = render(helm_binary, f"app.activeSlot={active}")

    service = find(manifests, "Service", "rel-agogosml-app")
    preview = find(manifests, "Service", "rel-agogosml-app-preview")
    budget = find(manifests, "PodDisruptionBudget", "rel-agogosml-app")
    assert service["spec"]["selector"]["agogosml.io/slot"] == active
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "app"
    assert preview["spec"]["selector"]["agogosml.io/slot"] == idle
    assert budget["spec"]["selector"]["matchLabels"]["agogosml.io/slot"] == active


def test_chart_labels_only_on_objects(rendered: list[dict]) -> None:
    for manifest in rendered:
        if manifest["kind"] != "Deployment":
            continue
        name = manifest["metadata"]["name"]
        object_labels = manifest["metadata"]["labels"]
        pod_labels = manifest["spec"]["template"]["metadata"]["labels"]

        assert object_labels["helm.sh/chart"] == "agogosml-0.1.0", name
        assert "app.kubernetes.io/version" in object_labels, name
        assert "helm.sh/chart" not in pod_labels, name
        assert "app.kubernetes.io/version" not in pod_labels, name
        assert pod_labels["app.kubernetes.io/part-of"] == "agogosml", name


def test_chart_upgrade_keeps_pod_templates(helm_binary: str, tmp_path: Path) -> None:
    upgraded = tmp_path / "agogosml"
    shutil.copytree(CHART, upgraded)
    chart_file = upgraded / "Chart.yaml"
    chart = yaml.safe_load(chart_file.read_text())
    chart["version"] = "0.2.0"
    chart["appVersion"] = "0.2.0"
    chart_file.write_text(yaml.safe_dump(chart))
    tags = [
        "reader.image.tag=1.0",
        "writer.image.tag=1.0",
        "app.slots.blue.image.tag=1.0",
        "app.slots.green.image.tag=2.0",
    ]

    def pod_templates(chart_path: Path) -> dict[str, dict]:
        args = ["template", "rel", str(chart_path)]
        for tag in tags:
            args += ["--set", tag]
        result = helm(helm_binary, *args)
        assert result.returncode == 0, result.stderr
        manifests = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return {
            m["metadata"]["name"]: m["spec"]["template"]
            for m in manifests
            if m["kind"] == "Deployment"
        }

    before = pod_templates(CHART)
    after = pod_templates(upgraded)

    assert len(before) == 4
    for name, template in before.items():
        assert after[name] == template, name


def test_slot_pods_carry_their_label(helm_binary: str) -> None:
    manifests = render(helm_binary)

    for slot in ("blue", "green"):
        deployment = find(manifests, "Deployment", f"rel-agogosml-app-{slot}")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert labels["agogosml.io/slot"] == slot
        assert selector["agogosml.io/slot"] == slot
        assert env_of(deployment)["AGOGOSML_SLOT"]["value"] == slot


def test_idle_slot_scaled_to_zero(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        "app.idleSlot=scaleToZero",
        "app.slots.blue.replicas=3",
        "app.slots.green.replicas=4",
    )

    assert slot_replicas(manifests) == {"blue": 3, "green": 0}


def test_idle_slot_kept_warm(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        "app.idleSlot=warm",
        "app.slots.blue.replicas=3",
        "app.slots.green.replicas=4",
        "app.slots.green.image.tag=1.0",
    )

    assert slot_replicas(manifests) == {"blue": 3, "green": 4}


@pytest.mark.parametrize(
    ("image", "replicas"),
    [
        ("", 0),
        ("app.slots.green.image.tag=1.0", 2),
        ("app.slots.green.image.digest=sha256:" + "cd" * 32, 2),
    ],
    ids=["no image", "tag", "digest"],
)
def test_warm_idle_slot_needs_own_image(
    helm_binary: str, image: str, replicas: int
) -> None:
    settings = ["app.idleSlot=warm", "app.slots.blue.image.tag=1.0"]
    manifests = render(helm_binary, *settings, *([image] if image else []))

    assert slot_replicas(manifests) == {"blue": 2, "green": replicas}


def test_preview_slot_without_image_runs(helm_binary: str) -> None:
    manifests = render(helm_binary, "app.previewSlot=green")

    assert slot_replicas(manifests) == {"blue": 2, "green": 2}


def test_preview_slot_runs_when_idle_scales_to_zero(helm_binary: str) -> None:
    manifests = render(
        helm_binary, "app.previewSlot=green", "app.slots.green.replicas=4"
    )

    assert slot_replicas(manifests) == {"blue": 2, "green": 4}


def test_slot_images_independent(helm_binary: str) -> None:
    digest = "sha256:" + "ab" * 32
    manifests = render(
        helm_binary,
        "app.slots.blue.image.repository=registry.example:5000/model",
        "app.slots.blue.image.tag=1.4",
        "app.slots.green.image.digest=" + digest,
    )

    images = {
        slot: find(manifests, "Deployment", f"rel-agogosml-app-{slot}")["spec"][
            "template"
        ]["spec"]["containers"][0]["image"]
        for slot in ("blue", "green")
    }
    assert images["blue"] == "registry.example:5000/model:1.4"
    assert images["green"] == f"agogosml-sample-app@{digest}"


def test_chart_defaults_match_release_commands() -> None:
    app = yaml.safe_load((CHART / "values.yaml").read_text())["app"]

    for key, value in CHART_DEFAULT_STATE.items():
        assert app[key] == value, key


# ---------------------------------------------------------------------------
# PodDisruptionBudgets
# ---------------------------------------------------------------------------


def test_budgets_allow_evicting_unhealthy_pods(helm_binary: str) -> None:
    manifests = render(helm_binary)

    for component in ("reader", "writer", "app"):
        budget = find(manifests, "PodDisruptionBudget", f"rel-agogosml-{component}")
        policy = budget["spec"]["unhealthyPodEvictionPolicy"]
        assert policy == "AlwaysAllow", component


def test_budget_eviction_policy_configurable(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        "writer.podDisruptionBudget.unhealthyPodEvictionPolicy=IfHealthyBudget",
    )

    writer = find(manifests, "PodDisruptionBudget", "rel-agogosml-writer")
    reader = find(manifests, "PodDisruptionBudget", "rel-agogosml-reader")
    assert writer["spec"]["unhealthyPodEvictionPolicy"] == "IfHealthyBudget"
    assert reader["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_budget_eviction_policy_needs_kubernetes_1_27(helm_binary: str) -> None:
    manifests = render(helm_binary, kube_version="1.26.0")

    budget = find(manifests, "PodDisruptionBudget", "rel-agogosml-writer")
    assert "unhealthyPodEvictionPolicy" not in budget["spec"]
    assert budget["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize(
    ("component", "settings", "expected"),
    [
        ("writer", ["writer.podDisruptionBudget.minAvailable=1"], {"minAvailable": 1}),
        (
            "writer",
            ["writer.replicas=3", "writer.podDisruptionBudget.minAvailable=50%"],
            {"minAvailable": "50%"},
        ),
        (
            "writer",
            ["writer.podDisruptionBudget.maxUnavailable=10%"],
            {"maxUnavailable": "10%"},
        ),
        (
            "writer",
            ["writer.replicas=0", "writer.podDisruptionBudget.maxUnavailable=0"],
            {"maxUnavailable": 0},
        ),
        (
            "reader",
            [
                "keda.enabled=true",
                "keda.minReplicaCount=2",
                "reader.podDisruptionBudget.minAvailable=1",
            ],
            {"minAvailable": 1},
        ),
    ],
    ids=["below replicas", "percent below", "percent", "no pods", "keda minimum"],
)
def test_budget_that_allows_eviction_accepted(
    helm_binary: str, component: str, settings: list[str], expected: dict[str, Any]
) -> None:
    manifests = render(helm_binary, *settings)

    budget = find(manifests, "PodDisruptionBudget", f"rel-agogosml-{component}")
    for field, value in expected.items():
        assert budget["spec"][field] == value, field


def test_disabled_budget_not_checked(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        "writer.podDisruptionBudget.enabled=false",
        "writer.podDisruptionBudget.minAvailable=5",
    )

    budgets = [m for m in manifests if m["kind"] == "PodDisruptionBudget"]
    names = {budget["metadata"]["name"] for budget in budgets}
    assert names == {"rel-agogosml-reader", "rel-agogosml-app"}


@pytest.mark.parametrize(
    ("settings", "messages"),
    [
        (
            ["writer.podDisruptionBudget.minAvailable=2"],
            ["writer.podDisruptionBudget.minAvailable is 2", "writer.replicas is 2"],
        ),
        (
            ["reader.podDisruptionBudget.minAvailable=3"],
            ["reader.podDisruptionBudget.minAvailable is 3", "reader.replicas is 1"],
        ),
        (
            ["writer.replicas=1", "writer.podDisruptionBudget.minAvailable=50%"],
            ["minAvailable is 50% (1 pod, rounded up)", "writer.replicas is 1"],
        ),
        (
            ["app.podDisruptionBudget.minAvailable=100%"],
            ["app.podDisruptionBudget.minAvailable is 100%", "app.slots.blue.replicas"],
        ),
        (
            [
                "app.activeSlot=green",
                "app.slots.green.replicas=1",
                "app.podDisruptionBudget.minAvailable=1",
            ],
            ["app.slots.green.replicas is 1"],
        ),
        (
            [
                "keda.enabled=true",
                "keda.minReplicaCount=0",
                "reader.podDisruptionBudget.minAvailable=1",
            ],
            ["reader.podDisruptionBudget.minAvailable is 1", "keda.minReplicaCount"],
        ),
        (
            ["writer.podDisruptionBudget.maxUnavailable=0"],
            ["writer.podDisruptionBudget.maxUnavailable is 0"],
        ),
        (
            ["app.podDisruptionBudget.maxUnavailable=0%"],
            ["app.podDisruptionBudget.maxUnavailable is 0%"],
        ),
    ],
    ids=[
        "min equals replicas",
        "min above replicas",
        "min percent rounds up",
        "min 100 percent",
        "active slot replicas",
        "keda scales to zero",
        "max zero",
        "max zero percent",
    ],
)
def test_budget_that_blocks_drains_rejected(
    helm_binary: str, settings: list[str], messages: list[str]
) -> None:
    error = render_error(helm_binary, *settings)

    for message in messages:
        assert message in error
    assert "node drains" in error


# ---------------------------------------------------------------------------
# KEDA and NetworkPolicy
# ---------------------------------------------------------------------------


def test_keda_scales_reader_on_lag(helm_binary: str) -> None:
    manifests = render(helm_binary, "keda.enabled=true", "keda.lagThreshold=500")

    scaled = find(manifests, "ScaledObject", "rel-agogosml-reader")
    reader = find(manifests, "Deployment", "rel-agogosml-reader")
    trigger = scaled["spec"]["triggers"][0]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "rel-agogosml-reader"
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == "agogosml-input-reader"
    assert trigger["metadata"]["topic"] == "transactions"
    assert trigger["metadata"]["bootstrapServers"] == "kafka:9092"
    assert trigger["metadata"]["lagThreshold"] == "500"
    assert "authenticationRef" not in trigger
    assert "replicas" not in reader["spec"]


def test_keda_authenticates_with_sasl_secret(helm_binary: str) -> None:
    manifests = render(helm_binary, "keda.enabled=true", *SASL)

    trigger = find(manifests, "ScaledObject", "rel-agogosml-reader")["spec"][
        "triggers"
    ][0]
    auth = find(manifests, "TriggerAuthentication", "rel-agogosml-reader")
    secrets = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert trigger["metadata"]["sasl"] == "scram_sha512"
    assert trigger["metadata"]["tls"] == "enable"
    assert trigger["authenticationRef"]["name"] == "rel-agogosml-reader"
    assert secrets["password"]["name"] == "kafka-credentials"
    assert secrets["password"]["key"] == "password"
    assert secrets["ca"]["name"] == "kafka-ca"
    assert auth["spec"]["env"][0]["name"] == "KAFKA_SASL_USERNAME"


def test_keda_uses_own_trigger_authentication(helm_binary: str) -> None:
    manifests = render(
        helm_binary, "keda.enabled=true", "keda.authenticationRef=kafka-auth", *SASL
    )

    trigger = find(manifests, "ScaledObject", "rel-agogosml-reader")["spec"][
        "triggers"
    ][0]
    assert trigger["authenticationRef"]["name"] == "kafka-auth"
    assert "sasl" not in trigger["metadata"]
    assert "tls" not in trigger["metadata"]
    assert not [m for m in manifests if m["kind"] == "TriggerAuthentication"]


def test_keda_omits_topic_for_several_topics(helm_binary: str) -> None:
    manifests = render(helm_binary, "keda.enabled=true", "reader.topics={a,b}")

    trigger = find(manifests, "ScaledObject", "rel-agogosml-reader")["spec"][
        "triggers"
    ][0]
    reader = env_of(find(manifests, "Deployment", "rel-agogosml-reader"))
    assert "topic" not in trigger["metadata"]
    assert reader["READER_INPUT"]["value"] == "a,b"


def test_network_policy_allows_only_pipeline(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        "networkPolicy.enabled=true",
        json_settings='networkPolicy.kafkaPeers=[{"ipBlock":{"cidr":"10.1.0.0/16"}}]',
    )

    def component_of(rule: dict) -> str:
        return rule["podSelector"]["matchLabels"]["app.kubernetes.io/component"]

    reader = find(manifests, "NetworkPolicy", "rel-agogosml-reader")["spec"]
    app = find(manifests, "NetworkPolicy", "rel-agogosml-app")["spec"]
    writer = find(manifests, "NetworkPolicy", "rel-agogosml-writer")["spec"]
    assert reader["ingress"] == []
    assert [component_of(p) for p in app["ingress"][0]["from"]] == ["reader"]
    assert [component_of(p) for p in writer["ingress"][0]["from"]] == ["app"]
    assert component_of(reader["egress"][1]["to"][0]) == "app"
    assert component_of(app["egress"][1]["to"][0]) == "writer"
    assert len(app["egress"]) == 2  # DNS and the writer, no broker
    for policy in (reader, writer):
        broker = policy["egress"][-1]
        assert broker["to"] == [{"ipBlock": {"cidr": "10.1.0.0/16"}}]
        assert [port["port"] for port in broker["ports"]] == [9092, 9093]
    for policy in (reader, app, writer):
        assert "to" not in policy["egress"][0]  # DNS to any address


def test_network_policy_limits_dns_to_peers(helm_binary: str) -> None:
    cluster_dns = {
        "namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
        },
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
    }
    manifests = render(
        helm_binary,
        "networkPolicy.enabled=true",
        json_settings=f"networkPolicy.dnsPeers=[{json.dumps(cluster_dns)}]",
    )

    for component in ("reader", "app", "writer"):
        policy = find(manifests, "NetworkPolicy", f"rel-agogosml-{component}")
        dns = policy["spec"]["egress"][0]
        assert dns["to"] == [cluster_dns]
        assert [port["port"] for port in dns["ports"]] == [53, 53]


# ---------------------------------------------------------------------------
# Rejected values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("app.activeSlot=purple", "/app/activeSlot"),
        ("app.previewSlot=red", "/app/previewSlot"),
        ("app.idleSlot=sleep", "/app/idleSlot"),
        ("app.slots.blue.replicas=two", "/app/slots/blue/replicas"),
        ("reader.port=70000", "/reader/port"),
        ("kafka.securityProtocol=TLS", "/kafka/securityProtocol"),
        ("kafka.sasl.password=hunter2", "/kafka/sasl/password"),
        ("auth.appToken.value=secret", "/auth/appToken"),
        ("reader.settings.READER_PORT=1", "/reader/settings"),
        ("reader.settings.KAFKA_SASL_PASSWORD=x", "/reader/settings"),
        ("app.slots.orange.replicas=1", "/app/slots"),
        ("keda.enabled=yes", "/keda/enabled"),
        ("transport=pulsar", "/transport"),
        ("eventhubs.connectionString=Endpoint=sb://x", "/eventhubs/connectionString"),
        (
            "eventhubs.fullyQualifiedNamespace=sb://ns.servicebus.windows.net",
            "/eventhubs/fullyQualifiedNamespace",
        ),
        (
            "eventhubs.checkpointStore.container=Checkpoints",
            "/eventhubs/checkpointStore/container",
        ),
        (
            "eventhubs.checkpointStore.accountUrl=http://a.blob.core.windows.net",
            "/eventhubs/checkpointStore/accountUrl",
        ),
        ("eventhubs.startingPosition=yesterday", "/eventhubs/startingPosition"),
        ("reader.settings.EVENTHUB_CONNECTION_STRING=x", "/reader/settings"),
        ("writer.settings.EVENTHUB_PREFETCH=10", "/writer/settings"),
        (
            "writer.podDisruptionBudget.minAvailable=150%",
            "/writer/podDisruptionBudget/minAvailable",
        ),
        (
            "app.podDisruptionBudget.unhealthyPodEvictionPolicy=Never",
            "/app/podDisruptionBudget/unhealthyPodEvictionPolicy",
        ),
        (
            "app.probes.startup.failureThreshold=0",
            "/app/probes/startup/failureThreshold",
        ),
        ("reader.probes.liveness.path=/live", "/reader/probes/liveness"),
        ("probes.startup.periodSeconds=fast", "/probes/startup/periodSeconds"),
        (
            "topologySpread.whenUnsatisfiable=Sometimes",
            "/topologySpread/whenUnsatisfiable",
        ),
        ("app.topologySpread.maxSkew=0", "/app/topologySpread/maxSkew"),
        (
            "writer.topologySpread.topologyKeys={}",
            "/writer/topologySpread/topologyKeys/0",
        ),
        ("reader.image.tag=-1.0", "/reader/image/tag"),
        ("writer.image.tag=1.0+build", "/writer/image/tag"),
        ("app.slots.blue.image.tag=" + "a" * 129, "/app/slots/blue/image/tag"),
        (
            "app.slots.green.image.repository=registry.example/Model",
            "/app/slots/green/image/repository",
        ),
        ("writer.image.repository=example/writer:1.0", "/writer/image/repository"),
        ("reader.image.repository=example//reader", "/reader/image/repository"),
        ("reader.image.repository=example/reader-", "/reader/image/repository"),
        ("fullnameOverride=Scoring", "/fullnameOverride"),
        ("fullnameOverride=1scoring", "/fullnameOverride"),
        ("fullnameOverride=scoring.prod", "/fullnameOverride"),
        ("nameOverride=fraud_model", "/nameOverride"),
        ("nameOverride=" + "a" * 64, "/nameOverride"),
        ("app.resources.limits.memory=1 GB", "/app/resources/limits/memory"),
        ("reader.resources.requests.cpu=half", "/reader/resources/requests/cpu"),
        ("writer.resources.limits.memory=-1Gi", "/writer/resources/limits/memory"),
        ("writer.resources.limits.memory=2K", "/writer/resources/limits/memory"),
        ("reader.tmpSizeLimit=lots", "/reader/tmpSizeLimit"),
        ("reader.settings.READER_ORDERING=bogus", "/reader/settings/READER_ORDERING"),
        (
            "reader.settings.READER_CONCURRENCY=abc",
            "/reader/settings/READER_CONCURRENCY",
        ),
        ("reader.settings.READER_CONCURRENCY=0", "/reader/settings/READER_CONCURRENCY"),
        ("writer.settings.KAFKA_LINGER_MS=-5", "/writer/settings/KAFKA_LINGER_MS"),
        ("app.settings.APP_LOG_LEVEL=loud", "/app/settings/APP_LOG_LEVEL"),
    ],
)
def test_schema_rejects_bad_value(helm_binary: str, setting: str, field: str) -> None:
    error = render_error(helm_binary, setting)

    assert "values don't meet the specifications of the schema" in error
    assert f"'{field}'" in error


@pytest.mark.parametrize(
    "label", ["app.kubernetes.io/component", "agogosml.io/slot", "helm.sh/chart"]
)
def test_schema_rejects_chart_pod_label(helm_binary: str, label: str) -> None:
    # --set reads an unescaped dot as a nesting of keys.
    escaped = label.replace(".", "\\.")

    error = render_error(helm_binary, f"podLabels.{escaped}=x")

    assert "values don't meet the specifications of the schema" in error
    assert f"invalid propertyName '{label}'" in error


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["app.activeSlot=green", "app.previewSlot=green"], "app.previewSlot"),
        (["app.previousSlot=blue"], "app.previousSlot"),
        (
            ["reader.settings.READER_SHUTDOWN_TIMEOUT_MS=120000"],
            "raise terminationGracePeriodSeconds to at least 130",
        ),
        (["writer.terminationGracePeriodSeconds=10"], "writer.terminationGrace"),
        (
            ["app.settings.APP_SHUTDOWN_TIMEOUT_MS=60000"],
            "APP_SHUTDOWN_TIMEOUT_MS=60000 ms",
        ),
        (["kafka.bootstrapServers="], "kafka.bootstrapServers"),
        (["kafka.securityProtocol=SASL_SSL"], "kafka.sasl.mechanism"),
        (
            ["kafka.securityProtocol=SASL_SSL", "kafka.sasl.mechanism=PLAIN"],
            "kafka.sasl.password.existingSecret",
        ),
        (["auth.appToken.existingSecret=tokens"], "auth.appToken.key"),
        (
            ["kafka.caCertificate.existingSecret=ca", "kafka.caCertificate.key=c"],
            "kafka.caCertificate names a Secret but kafka.securityProtocol is "
            "PLAINTEXT, which uses no TLS",
        ),
        (
            [*EVENT_HUBS[1:], "kafka.bootstrapServers=", "keda.enabled=true"],
            "kafka.bootstrapServers",
        ),
        (["transport=eventhubs"], "set one of eventhubs.connectionString"),
        (
            [*NATIVE_EVENT_HUBS, "eventhubs.fullyQualifiedNamespace=ns.example.net"],
            "not both or neither",
        ),
        (
            [*NATIVE_EVENT_HUBS, "eventhubs.checkpointStore.connectionString.key="],
            "eventhubs.checkpointStore.connectionString.key is empty",
        ),
        (
            [
                *NATIVE_EVENT_HUBS,
                "eventhubs.checkpointStore.connectionString.existingSecret=",
            ],
            "set one of eventhubs.checkpointStore.connectionString",
        ),
        ([*NATIVE_EVENT_HUBS, "reader.topics={a,b}"], "reads one event hub"),
        ([*NATIVE_EVENT_HUBS, "keda.enabled=true"], "keda.enabled is true"),
    ],
)
def test_template_rejects_inconsistent_values(
    helm_binary: str, settings: list[str], message: str
) -> None:
    error = render_error(helm_binary, *settings)

    assert message in error


@pytest.mark.parametrize(
    "json_setting",
    [
        'reader.image.tag="1.0_rc-2"',
        'writer.image.repository="registry.example:5000/team/output-writer"',
        'app.slots.blue.image.repository="Registry.Example/team/fraud__model.v2"',
        'app.slots.green.image.repository="localhost:5000/fraud-model"',
        'fullnameOverride="scoring-prod"',
        'nameOverride="9pipeline"',
        "app.resources.limits.cpu=1.5",
        'reader.resources.requests.memory="1.5Gi"',
        'writer.resources.requests.cpu="250m"',
        'writer.resources.limits.ephemeral-storage="1e9"',
        "app.resources.limits.nvidia\\.com/gpu=1",
    ],
)
def test_schema_accepts_valid_value(helm_binary: str, json_setting: str) -> None:
    manifests = render(helm_binary, json_settings=json_setting)

    assert len(pod_specs(manifests)) == 4


def test_keda_minimum_above_maximum_rejected(helm_binary: str) -> None:
    error = render_error(
        helm_binary,
        "keda.enabled=true",
        "keda.minReplicaCount=7",
        "keda.maxReplicaCount=6",
    )

    assert "keda.minReplicaCount (7)" in error
    assert "keda.maxReplicaCount (6)" in error


def test_keda_minimum_checked_only_when_enabled(helm_binary: str) -> None:
    manifests = render(helm_binary, "keda.minReplicaCount=7", "keda.maxReplicaCount=6")

    assert not [m for m in manifests if m["kind"] == "ScaledObject"]


def test_extra_env_reaches_app(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        json_settings='app.extraEnv=[{"name":"MODEL_THRESHOLD","value":"0.7"}]',
    )

    app = env_of(find(manifests, "Deployment", "rel-agogosml-app-blue"))
    assert app["MODEL_THRESHOLD"]["value"] == "0.7"


def test_extra_env_cannot_override_chart_variables(helm_binary: str) -> None:
    settings = [*SASL, "app.settings.APP_LOG_LEVEL=DEBUG"]
    app = env_of(
        find(render(helm_binary, *settings), "Deployment", "rel-agogosml-app-blue")
    )
    reference = {"secretKeyRef": {"name": "other", "key": "value"}}

    assert {"APP_PORT", "APP_TOKEN", "APP_LOG_LEVEL", "AGOGOSML_SLOT"} <= set(app)
    for name in app:
        entry = json.dumps([{"name": name, "valueFrom": reference}])
        error = render_error(
            helm_binary, *settings, json_settings=f"app.extraEnv={entry}"
        )
        assert f"app.extraEnv[0] sets {name}, which the chart sets" in error, name


def test_extra_env_token_allowed_without_auth(helm_binary: str) -> None:
    reference = {"secretKeyRef": {"name": "tokens", "key": "app"}}
    entry = json.dumps([{"name": "APP_TOKEN", "valueFrom": reference}])

    manifests = render(helm_binary, json_settings=f"app.extraEnv={entry}")

    app = env_of(find(manifests, "Deployment", "rel-agogosml-app-blue"))
    assert app["APP_TOKEN"]["valueFrom"] == reference


def test_extra_env_cannot_bypass_app_settings(helm_binary: str) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    settings = schema["properties"]["app"]["properties"]["settings"]["properties"]

    assert "APP_SHUTDOWN_TIMEOUT_MS" in settings
    for name in settings:
        entry = json.dumps([{"name": name, "value": "120000"}])
        error = render_error(helm_binary, json_settings=f"app.extraEnv={entry}")
        assert f"move it to app.settings.{name}" in error, name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("app_port", "sets app_port, which the chart sets from app.port"),
        ("App_Shutdown_Timeout_Ms", "move it to app.settings.APP_SHUTDOWN_TIMEOUT_MS"),
        ("app_token", "app.extraEnv[0].value is set for app_token"),
    ],
)
def test_extra_env_checks_ignore_case(
    helm_binary: str, name: str, message: str
) -> None:
    """ModelApp reads its APP_ variables in any case, so the checks do too."""
    entry = json.dumps([{"name": name, "value": "120000"}])

    error = render_error(helm_binary, json_settings=f"app.extraEnv={entry}")

    assert message in error


def test_extra_env_slot_name_read_by_case(helm_binary: str) -> None:
    """The app reads AGOGOSML_SLOT by case, so agogosml_slot is another variable."""
    entry = json.dumps([{"name": "agogosml_slot", "value": "x"}])

    manifests = render(helm_binary, json_settings=f"app.extraEnv={entry}")

    assert find(manifests, "Deployment", "rel-agogosml-app-blue")


def test_literal_secret_in_extra_env_rejected(helm_binary: str) -> None:
    error = render_error(
        helm_binary, json_settings='app.extraEnv=[{"name":"APP_TOKEN","value":"x"}]'
    )

    assert "app.extraEnv[0].value" in error
    assert "secretKeyRef" in error


def test_large_numbers_render_as_integers(helm_binary: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        "writer:\n  settings:\n    WRITER_MAX_BODY_BYTES: 4194304\n"
        "reader:\n  settings:\n    READER_MAX_IN_FLIGHT: 1000000\n"
        "keda:\n  enabled: true\n  lagThreshold: 5000000\n"
    )

    result = helm(helm_binary, "template", "rel", str(CHART), "-f", str(values))

    assert result.returncode == 0, result.stderr
    manifests = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    writer = find(manifests, "Deployment", "rel-agogosml-writer")
    reader = find(manifests, "Deployment", "rel-agogosml-reader")
    writer_env = {
        e["name"]: e.get("value")
        for e in writer["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    reader_env = {
        e["name"]: e.get("value")
        for e in reader["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    trigger = find(manifests, "ScaledObject", "rel-agogosml-reader")["spec"][
        "triggers"
    ][0]
    assert writer_env["WRITER_MAX_BODY_BYTES"] == "4194304"
    assert reader_env["READER_MAX_IN_FLIGHT"] == "1000000"
    assert trigger["metadata"]["lagThreshold"] == "5000000"


@pytest.mark.parametrize(
    ("component", "token"), [("writer", "writerToken"), ("app", "appToken")]
)
def test_exposed_service_needs_token(
    helm_binary: str, component: str, token: str
) -> None:
    exposed = f"{component}.service.type=LoadBalancer"

    error = render_error(helm_binary, exposed)
    manifests = render(
        helm_binary,
        exposed,
        f"auth.{token}.existingSecret=tokens",
        f"auth.{token}.key={component}",
    )

    message = " ".join(error.split())
    assert f"{component}.service.type is LoadBalancer" in message
    assert f"auth.{token} names no Secret" in message
    assert "or use ClusterIP" in message
    services = [m for m in manifests if m["kind"] == "Service"]
    assert any(service["spec"]["type"] == "LoadBalancer" for service in services)


@pytest.mark.parametrize(
    ("component", "token"), [("writer", "writerToken"), ("app", "appToken")]
)
def test_exposed_service_needs_ingress_rule(
    helm_binary: str, component: str, token: str
) -> None:
    settings = [
        f"{component}.service.type=NodePort",
        f"auth.{token}.existingSecret=tokens",
        f"auth.{token}.key={component}",
        "networkPolicy.enabled=true",
    ]
    rule = [{"from": [{"ipBlock": {"cidr": "10.2.0.0/16"}}]}]

    error = render_error(helm_binary, *settings)
    scraped = render_error(
        helm_binary,
        *settings,
        json_settings='networkPolicy.metricsFrom=[{"namespaceSelector": {}}]',
    )
    manifests = render(
        helm_binary,
        *settings,
        json_settings=f"networkPolicy.extraIngress.{component}={json.dumps(rule)}",
    )

    assert f"{component}.service.type is NodePort" in error
    assert f"{component}.service.type is NodePort" in scraped
    assert f"networkPolicy.extraIngress.{component}" in error
    policy = find(manifests, "NetworkPolicy", f"rel-agogosml-{component}")
    assert policy["spec"]["ingress"][-1] == rule[0]


def test_extra_config_from_secret(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        "kafka.extraConfig.existingSecret=kafka-extra",
        "kafka.extraConfig.key=config",
    )

    for name in ("rel-agogosml-reader", "rel-agogosml-writer"):
        variable = env_of(find(manifests, "Deployment", name))["KAFKA_EXTRA_CONFIG"]
        assert variable["valueFrom"]["secretKeyRef"] == {
            "name": "kafka-extra",
            "key": "config",
        }


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ('{"ssl.key.password": "x"}', "password"),
        ('{"sasl.oauthbearer.client.secret": "x"}', "secret"),
        ('{"ssl.key.pem": "-----BEGIN"}', "ssl.key.pem"),
    ],
)
def test_secret_in_plain_extra_config_rejected(
    helm_binary: str, config: str, named: str
) -> None:
    setting = "writer.settings.KAFKA_EXTRA_CONFIG=" + json.dumps(config)

    error = render_error(helm_binary, json_settings=setting)

    assert f'writer.settings.KAFKA_EXTRA_CONFIG contains "{named}"' in error
    assert "name it in kafka.extraConfig" in error


def test_plain_extra_config_kept(helm_binary: str) -> None:
    config = '{"fetch.min.bytes": "1"}'
    setting = "reader.settings.KAFKA_EXTRA_CONFIG=" + json.dumps(config)

    manifests = render(helm_binary, json_settings=setting)

    reader = find(manifests, "Deployment", "rel-agogosml-reader")
    assert env_of(reader)["KAFKA_EXTRA_CONFIG"]["value"] == config


def test_settings_schema_follows_the_settings() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    assert settings_schema(schema) == schema, (
        "the settings in values.schema.json are out of date; regenerate them "
        "with 'python -m agogosml_cli.chart_settings'"
    )


def test_settings_accept_text_numbers_and_any_case(helm_binary: str) -> None:
    setting = "reader.settings=" + json.dumps(
        {"READER_CONCURRENCY": "64", "READER_ORDERING": "KEY", "READER_LOG_LEVEL": 10}
    )

    error = render_error(helm_binary, json_settings=setting)
    manifests = render(
        helm_binary,
        json_settings="reader.settings="
        + json.dumps({"READER_CONCURRENCY": "64", "READER_ORDERING": "KEY"}),
    )

    assert "/reader/settings/READER_LOG_LEVEL" in error
    reader = env_of(find(manifests, "Deployment", "rel-agogosml-reader"))
    assert reader["READER_CONCURRENCY"]["value"] == "64"
    assert reader["READER_ORDERING"]["value"] == "KEY"


def test_network_policy_extra_rules_added(helm_binary: str) -> None:
    egress = {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 443}]}
    ingress = {"from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}]}
    setting = "networkPolicy=" + json.dumps(
        {
            "enabled": True,
            "extraEgress": {"app": [egress]},
            "extraIngress": {"reader": [ingress], "writer": [ingress]},
        }
    )

    manifests = render(helm_binary, json_settings=setting)

    policies = {
        m["metadata"]["name"]: m["spec"]
        for m in manifests
        if m["kind"] == "NetworkPolicy"
    }
    assert policies["rel-agogosml-app"]["egress"][-1] == egress
    assert egress not in policies["rel-agogosml-reader"]["egress"]
    assert policies["rel-agogosml-reader"]["ingress"] == [ingress]
    assert policies["rel-agogosml-writer"]["ingress"][-1] == ingress
    assert len(policies["rel-agogosml-writer"]["ingress"]) == 2


def test_app_extra_volumes_mounted(helm_binary: str) -> None:
    volume = {"name": "model", "persistentVolumeClaim": {"claimName": "models"}}
    mount = {"name": "model", "mountPath": "/models", "readOnly": True}
    setting = "app=" + json.dumps(
        {"extraVolumes": [volume], "extraVolumeMounts": [mount]}
    )

    manifests = render(helm_binary, json_settings=setting)

    for slot in ("blue", "green"):
        pod = find(manifests, "Deployment", f"rel-agogosml-app-{slot}")["spec"][
            "template"
        ]["spec"]
        assert volume in pod["volumes"]
        assert mount in pod["containers"][0]["volumeMounts"]


@pytest.mark.parametrize(
    "setting",
    [
        'app.extraVolumes=[{"name": "tmp", "emptyDir": {}}]',
        'app.extraVolumeMounts=[{"name": "x", "mountPath": "/tmp"}]',
    ],
)
def test_app_extra_volume_cannot_replace_tmp(helm_binary: str, setting: str) -> None:
    error = render_error(helm_binary, json_settings=setting)

    assert "values don't meet the specifications of the schema" in error


def test_app_slots_keep_every_pod_in_rollouts(helm_binary: str) -> None:
    manifests = render(helm_binary)

    for slot in ("blue", "green"):
        deployment = find(manifests, "Deployment", f"rel-agogosml-app-{slot}")
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        assert rolling["maxUnavailable"] == 0


def test_app_and_writer_pods_keep_serving_before_sigterm(helm_binary: str) -> None:
    manifests = render(helm_binary)

    hooks = {
        name: spec["containers"][0].get("lifecycle")
        for name, spec in pod_specs(manifests)
    }
    wait = {"preStop": {"sleep": {"seconds": 5}}}
    assert hooks == {
        "rel-agogosml-reader": None,
        "rel-agogosml-writer": wait,
        "rel-agogosml-app-blue": wait,
        "rel-agogosml-app-green": wait,
    }


def test_pre_stop_wait_counts_in_the_grace_period(helm_binary: str) -> None:
    error = render_error(helm_binary, "app.terminationGracePeriodSeconds=44")
    manifests = render(
        helm_binary,
        "app.terminationGracePeriodSeconds=40",
        "app.preStopSleepSeconds=0",
    )

    assert (
        "app.terminationGracePeriodSeconds is 44, but a stopping pod takes "
        "app.preStopSleepSeconds=5 s, then APP_SHUTDOWN_TIMEOUT_MS=30000 ms"
    ) in error
    assert "at least 45" in error
    app = find(manifests, "Deployment", "rel-agogosml-app-blue")
    assert "lifecycle" not in app["spec"]["template"]["spec"]["containers"][0]


def test_no_pre_stop_wait_before_kubernetes_1_30(helm_binary: str) -> None:
    # The sleep action came in 1.30, so the grace period needs no room for it.
    manifests = render(
        helm_binary, "app.terminationGracePeriodSeconds=40", kube_version="1.29.0"
    )

    specs = pod_specs(manifests)
    assert len(specs) == 4
    assert all("lifecycle" not in spec["containers"][0] for _, spec in specs)


def test_zero_shutdown_timeout_needs_only_the_margin(helm_binary: str) -> None:
    manifests = render(
        helm_binary,
        "reader.settings.READER_SHUTDOWN_TIMEOUT_MS=0",
        "reader.terminationGracePeriodSeconds=10",
    )

    reader = find(manifests, "Deployment", "rel-agogosml-reader")
    assert reader["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 10


def test_padded_shutdown_timeout_checked(helm_binary: str) -> None:
    setting = 'reader.settings.READER_SHUTDOWN_TIMEOUT_MS=" 120000 "'

    error = render_error(helm_binary, json_settings=setting)

    assert "raise terminationGracePeriodSeconds to at least 130" in error
