"""Run a single-node Apache Kafka broker in KRaft mode on 127.0.0.1.

The broker jars come from Maven Central through the pom.xml next to this file
and are cached in ``${AGOGOSML_CACHE_DIR:-~/.cache/agogosml}/kafka-<version>/libs``.
The broker needs Java 17 or newer, because the Kafka 4.1 server jars are
compiled for Java 17 (class file version 61). Resolving the jars needs Maven.

Command line::

    python deployment/kafka/broker.py run [--port PORT] [--container-address ADDRESS]
    python deployment/kafka/broker.py fetch

`run` listens on a free port unless ``--port`` names one, prints
``KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:PORT`` on stdout once the broker is
ready and stops it on SIGINT or SIGTERM. `fetch` only fills the jar cache.

Only the readiness check uses a third-party package (confluent-kafka).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

logger = logging.getLogger(__name__)

DEFAULT_KAFKA_VERSION = "4.1.1"
POM_PATH = Path(__file__).resolve().with_name("pom.xml")
HOST = "127.0.0.1"
MIN_JAVA_MAJOR_VERSION = 17
MAVEN_TIMEOUT_SECONDS = 900.0
STOP_TIMEOUT_SECONDS = 30.0
READINESS_TOPIC = "local-broker-readiness"
READINESS_GROUP = "local-broker-readiness"
LOG_TAIL_LINES = 80
#: Name of the listener that `run --container-address` opens.
CONTAINER_LISTENER = "CONTAINERS"

JAVA_INSTALL_HINT = (
    "Install a Java 17+ runtime (for example `apt-get install openjdk-17-jre-headless`"
    " or `brew install openjdk@17`) and put `java` on PATH or set JAVA_HOME."
)
MAVEN_INSTALL_HINT = (
    "Install Maven (for example `apt-get install maven` or `brew install maven`)"
    " and put `mvn` on PATH."
)

# Root logger at WARN keeps the log small. The `kafka` loggers at INFO add
# the startup and shutdown steps (about 60 lines at startup). The loggers set to
# WARN below would add lines for every partition, for every internal thread
# or for every config value.
LOG4J2_PROPERTIES = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.target = SYSTEM_OUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.console.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.log.name = kafka.log
logger.log.level = WARN
logger.cluster.name = kafka.cluster
logger.cluster.level = WARN
logger.fetcher.name = kafka.server.ReplicaFetcherManager
logger.fetcher.level = WARN
logger.channel.name = kafka.server.NodeToControllerRequestThread
logger.channel.level = WARN
logger.reaper.name = kafka.server.ClientQuotaManager$ThrottledChannelReaper
logger.reaper.level = WARN
"""


class BrokerError(RuntimeError):
    """Base class of the local broker's errors."""


class ToolNotFoundError(BrokerError):
    """Error raised when Java or Maven is missing or too old."""


class JarResolutionError(BrokerError):
    """Error raised when Maven fails to resolve the broker jars."""


class BrokerStartError(BrokerError):
    """Error raised when the broker fails to start or is not ready in time.

    Attributes:
        exit_code: Exit code of the broker process, or None if it was still
            running when the wait timed out.
        log_tail: Last lines of the broker log.
    """

    def __init__(self, message: str, *, exit_code: int | None, log_tail: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.log_tail = log_tail


def default_cache_dir() -> Path:
    """Return the jar cache root: AGOGOSML_CACHE_DIR or ~/.cache/agogosml."""
    return Path(
        os.environ.get("AGOGOSML_CACHE_DIR") or "~/.cache/agogosml"
    ).expanduser()


def find_java() -> str:
    """Return the path of a Java 17+ executable, preferring JAVA_HOME over PATH."""
    java_home = os.environ.get("JAVA_HOME")
    java: str | None = None
    if java_home and Path(java_home, "bin", "java").is_file():
        java = str(Path(java_home, "bin", "java"))
    else:
        java = shutil.which("java")
    if java is None:
        raise ToolNotFoundError(
            "java was not found on PATH or in JAVA_HOME, and the Kafka broker "
            f"needs it. {JAVA_INSTALL_HINT}"
        )

    major = _java_major_version(java)
    if major < MIN_JAVA_MAJOR_VERSION:
        raise ToolNotFoundError(
            f"{java} is Java {major}, but the Kafka 4.x broker needs Java "
            f"{MIN_JAVA_MAJOR_VERSION} or newer. {JAVA_INSTALL_HINT}"
        )
    return java


def _java_major_version(java: str) -> int:
    result = subprocess.run(
        [java, "-version"], capture_output=True, text=True, timeout=60, check=False
    )
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr)
    if match is None:
        raise ToolNotFoundError(
            f"could not read the Java version from `{java} -version`: "
            f"{result.stderr.strip()!r}. {JAVA_INSTALL_HINT}"
        )
    major = int(match[1])
    # Java 8 and older report themselves as "1.8.0_392".
    if major == 1 and match[2]:
        major = int(match[2])
    return major


def find_maven() -> str:
    """Return the path of the `mvn` executable."""
    maven = shutil.which("mvn")
    if maven is None:
        raise ToolNotFoundError(
            "mvn was not found on PATH, and Maven is needed once to download the "
            f"Kafka broker jars into the cache. {MAVEN_INSTALL_HINT}"
        )
    return maven


def resolve_jars(version: str, cache_dir: Path) -> Path:
    """Fill the jar cache for `version` with Maven unless it is complete.

    A cache counts as complete when its marker file matches the Kafka version
    and the SHA-256 of pom.xml, so editing the pom refreshes the cache. The
    jars are copied into a staging directory first, and the marker is written
    last, so an interrupted copy is never trusted.

    Returns:
        The directory that contains the jars.
    """
    version_dir = cache_dir / f"kafka-{version}"
    libs_dir = version_dir / "libs"
    marker = version_dir / "libs.complete"
    fingerprint = f"kafka {version}, pom.xml sha256 {_pom_sha256()}\n"
    version_dir.mkdir(parents=True, exist_ok=True)

    # The lock serialises processes that resolve the same version at once.
    with open(version_dir / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if libs_dir.is_dir() and _read_text(marker) == fingerprint:
            return libs_dir

        logger.info("Resolving Kafka %s jars into %s with Maven", version, libs_dir)
        marker.unlink(missing_ok=True)
        staging_dir = Path(tempfile.mkdtemp(prefix="libs-", dir=version_dir))
        try:
            _copy_dependencies(version, staging_dir)
            shutil.rmtree(libs_dir, ignore_errors=True)
            staging_dir.rename(libs_dir)
        finally:
            shutil.rmtree(staging_dir, ignore_errors=True)
        marker.write_text(fingerprint)
    return libs_dir


def _pom_sha256() -> str:
    return hashlib.sha256(POM_PATH.read_bytes()).hexdigest()


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _copy_dependencies(version: str, output_dir: Path) -> None:
    command = [
        find_maven(),
        "-q",
        "-B",
        "-Dstyle.color=never",
        "dependency:copy-dependencies",
        f"-DoutputDirectory={output_dir}",
        "-DincludeScope=runtime",
        f"-Dkafka.version={version}",
        "-f",
        str(POM_PATH),
    ]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=MAVEN_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise JarResolutionError(
            f"Maven did not finish resolving the Kafka {version} jars within "
            f"{MAVEN_TIMEOUT_SECONDS:.0f} s. Check access to Maven Central."
        ) from error

    broker_jar = output_dir / f"kafka_2.13-{version}.jar"
    if result.returncode != 0 or not broker_jar.is_file():
        output = _last_lines(result.stdout + result.stderr, 40)
        raise JarResolutionError(
            f"Maven failed to resolve the Kafka {version} jars "
            f"(exit code {result.returncode}). Check the version and access to "
            f"Maven Central. Command: {' '.join(command)}\n{output}"
        )


def _last_lines(text: str, count: int) -> str:
    return "\n".join(text.splitlines()[-count:])


def _free_port(host: str = HOST) -> int:
    # NOTE: another process may take the port between this call and the
    # broker binding it. The broker then exits and start() reports its log.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_port_free(port: int, host: str = HOST) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # A port whose earlier connections wait in TIME_WAIT is free for a
        # listening server, so it counts as free here too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise BrokerError(
                f"port {port} on {host} is not available ({error.strerror}). "
                "Stop the process that uses it or choose another port."
            ) from error


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def _new_cluster_id() -> str:
    # Kafka cluster ids are 16 random bytes in URL-safe base64 without padding.
    # Like Kafka's Uuid.randomUuid(), skip ids that start with "-", which
    # command-line parsers would read as an option.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclasses.dataclass(frozen=True)
class Listener:
    """A broker listener in addition to the PLAINTEXT listener on 127.0.0.1.

    Attributes:
        name: Listener name, upper case, such as ``CONTAINERS``.
        host: Address the listener binds and advertises. Clients must reach
            the broker at this address.
        port: Port to bind. None picks a free port.
        protocol: Security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or
            SASL_SSL.
        properties: Settings of this listener only, without the
            ``listener.name.<name>.`` prefix, such as
            ``sasl.enabled.mechanisms`` or ``ssl.keystore.location``.
        advertised_host: Address given to clients when it differs from the
            bound one. A listener for containers on a Podman network binds
            0.0.0.0, because the network's gateway address exists only
            while a container is attached, and advertises the gateway.
    """

    name: str
    host: str
    port: int | None = None
    protocol: str = "PLAINTEXT"
    properties: Mapping[str, str] = dataclasses.field(default_factory=dict)
    advertised_host: str | None = None

    @property
    def client_host(self) -> str:
        """The address that clients of this listener connect to."""
        return self.advertised_host or self.host

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", self.name):
            raise BrokerError(
                f"listener name {self.name!r} is not valid. Use upper-case "
                "letters, digits and underscores, such as CONTAINERS."
            )
        if self.name in {"PLAINTEXT", "CONTROLLER"}:
            raise BrokerError(
                f"listener name {self.name} is taken by the broker itself. "
                "Choose another name."
            )


def _server_properties(
    port: int,
    controller_port: int,
    log_dir: Path,
    listeners: Sequence[tuple[Listener, int]] = (),
) -> str:
    bound = [f"PLAINTEXT://{HOST}:{port}", f"CONTROLLER://{HOST}:{controller_port}"]
    advertised = [f"PLAINTEXT://{HOST}:{port}"]
    protocols = ["CONTROLLER:PLAINTEXT", "PLAINTEXT:PLAINTEXT"]
    scoped: dict[str, str] = {}
    for listener, listener_port in listeners:
        bound.append(f"{listener.name}://{listener.host}:{listener_port}")
        advertised.append(f"{listener.name}://{listener.client_host}:{listener_port}")
        protocols.append(f"{listener.name}:{listener.protocol}")
        prefix = f"listener.name.{listener.name.lower()}."
        scoped.update(
            {prefix + key: value for key, value in listener.properties.items()}
        )
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        # Kafka 4.x dynamic quorum: `storage format --standalone` makes this
        # node the only voter, so controller.quorum.voters must stay unset.
        "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
        "listeners": ",".join(bound),
        "advertised.listeners": ",".join(advertised),
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": ",".join(protocols),
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # One partition instead of 50 cuts the first consumer group join from
        # about 4 s to about 1.5 s (measured on a 2-core VM, confluent-kafka
        # 2.16).
        "offsets.topic.num.partitions": "1",
        **scoped,
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


class LocalKafkaBroker:
    """Single-node Apache Kafka broker (KRaft mode) on 127.0.0.1.

    Each start() uses a fresh temporary directory for the configuration, the
    data and the log, and stop() deletes it. stop() also runs at interpreter
    exit. restart() keeps the directory and the ports.

    NOTE: if the Python process is killed with SIGKILL, the broker keeps
    running. start() logs its pid so that it can be stopped by hand.

    Args:
        port: PLAINTEXT listener port. None picks a free port.
        version: Apache Kafka version to resolve with Maven.
        cache_dir: Root of the jar cache. Defaults to AGOGOSML_CACHE_DIR or
            ~/.cache/agogosml.
        listeners: Listeners in addition to PLAINTEXT on 127.0.0.1, for
            clients that cannot reach the loopback address (containers) or
            that need TLS or SASL.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        version: str = DEFAULT_KAFKA_VERSION,
        cache_dir: Path | None = None,
        listeners: Sequence[Listener] = (),
    ) -> None:
        names = [listener.name for listener in listeners]
        if len(set(names)) != len(names):
            raise BrokerError(
                f"listener names must be unique, got {names}. Rename the duplicates."
            )
        self.version = version
        self.cache_dir = cache_dir or default_cache_dir()
        self._requested_port = port
        self._listeners = tuple(listeners)
        self._listener_ports: list[tuple[Listener, int]] = []
        self._port: int | None = None
        self._work_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._command: list[str] = []
        self._log_file: IO[bytes] | None = None

    @property
    def listeners(self) -> tuple[Listener, ...]:
        """The listeners in addition to PLAINTEXT on 127.0.0.1."""
        return self._listeners

    @property
    def pid(self) -> int | None:
        """Process id of the broker's JVM, while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def bootstrap_servers(self) -> str:
        """Bootstrap servers of the running broker, as host:port."""
        if self._port is None or self._process is None:
            raise BrokerError("the broker is not running. Call start() first.")
        return f"{HOST}:{self._port}"

    def listener_address(self, name: str) -> str:
        """Return the host:port that clients of listener `name` connect to."""
        if self._port is None or self._process is None:
            raise BrokerError("the broker is not running. Call start() first.")
        for listener, port in self._listener_ports:
            if listener.name == name:
                return f"{listener.client_host}:{port}"
        known = [listener.name for listener in self._listeners]
        raise BrokerError(
            f"the broker has no listener {name!r}. Its listeners: {known}."
        )

    @property
    def log_path(self) -> Path | None:
        """Broker log file, or None when the broker is not started."""
        return self._work_dir / "broker.log" if self._work_dir else None

    @property
    def exit_code(self) -> int | None:
        """Exit code of the broker process, or None while it runs or before start."""
        return self._process.poll() if self._process else None

    def ensure_jars(self) -> Path:
        """Resolve the broker jars into the cache unless it is complete.

        Returns:
            The directory that contains the jars.
        """
        return resolve_jars(self.version, self.cache_dir)

    def start(self, timeout_seconds: float = 90.0) -> None:
        """Start the broker and wait until it serves produce and group requests.

        Args:
            timeout_seconds: Maximum time to wait for the broker to become
                ready, including the storage format step but not the Maven
                download.

        Raises:
            ToolNotFoundError: Java or Maven is missing or too old.
            JarResolutionError: Maven failed.
            BrokerStartError: The broker exited or timed out. The message
                contains the exit code and the end of the broker log.
        """
        if self._process is not None:
            raise BrokerError(
                f"the broker is already running at {self.bootstrap_servers}"
            )
        java = find_java()
        classpath = str(self.ensure_jars() / "*")
        deadline = time.monotonic() + timeout_seconds

        self._work_dir = Path(tempfile.mkdtemp(prefix="agogosml-kafka-"))
        try:
            process = self._launch(java, classpath, deadline)
            self._wait_until_ready(deadline, timeout_seconds)
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)
        logger.info(
            "Kafka %s broker ready at %s (pid %d, log %s)",
            self.version,
            self.bootstrap_servers,
            process.pid,
            self.log_path,
        )

    def _launch(
        self, java: str, classpath: str, deadline: float
    ) -> subprocess.Popen[bytes]:
        assert self._work_dir is not None
        if self._requested_port is not None:
            _check_port_free(self._requested_port)
        port = self._requested_port or _free_port()
        controller_port = _free_port()
        self._listener_ports = []
        for listener in self._listeners:
            if listener.port is not None:
                _check_port_free(listener.port, listener.host)
            listener_port = listener.port or _free_port(listener.host)
            self._listener_ports.append((listener, listener_port))
        config_path = self._work_dir / "server.properties"
        config_path.write_text(
            _server_properties(
                port, controller_port, self._work_dir / "data", self._listener_ports
            )
        )
        log4j_path = self._work_dir / "log4j2.properties"
        log4j_path.write_text(LOG4J2_PROPERTIES)
        java_options = [
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j_path}",
        ]

        self._format_storage(java, java_options, classpath, config_path, deadline)
        self._command = [java, "-Xmx512m", "-Xms256m", *java_options]
        self._command += ["-cp", classpath, "kafka.Kafka", str(config_path)]
        self._port = port
        process = self._spawn()
        logger.info(
            "Started Kafka %s broker (pid %d) on %s:%d, controller port %d",
            self.version,
            process.pid,
            HOST,
            port,
            controller_port,
        )
        return process

    def _spawn(self) -> subprocess.Popen[bytes]:
        assert self._work_dir is not None
        # Log4j writes to stdout, and stdout and stderr both go to one file, so
        # JVM errors such as a wrong class version land in the same log. A
        # restarted broker appends to the log of the one before.
        if self._log_file is None:
            self._log_file = open(self._work_dir / "broker.log", "ab")
        self._process = subprocess.Popen(
            self._command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self._work_dir,
        )
        return self._process

    def restart(
        self,
        *,
        kill: bool = False,
        down_seconds: float = 0.0,
        timeout_seconds: float = 90.0,
    ) -> None:
        """Stop the broker process and start it again on the same data and ports.

        Topics, records and committed offsets survive, and clients reconnect
        to the same address: this is how tests take the broker away from a
        running pipeline.

        Args:
            kill: Send SIGKILL, as in a crash, instead of SIGTERM, which
                starts Kafka's controlled shutdown.
            down_seconds: How long the broker stays stopped.
            timeout_seconds: Maximum time to wait for the restarted broker to
                become ready.

        Raises:
            BrokerError: The broker is not running.
            BrokerStartError: The restarted broker exited or timed out.
        """
        process = self._process
        if process is None or self._port is None:
            raise BrokerError("the broker is not running. Call start() first.")
        if kill:
            process.kill()
            process.wait()
        else:
            _terminate(process, STOP_TIMEOUT_SECONDS)
        logger.info(
            "Stopped Kafka broker (pid %d, exit code %s) for a restart",
            process.pid,
            process.returncode,
        )
        time.sleep(down_seconds)
        deadline = time.monotonic() + timeout_seconds
        process = self._spawn()
        try:
            self._wait_until_ready(deadline, timeout_seconds)
        except BaseException:
            self.stop()
            raise
        logger.info(
            "Kafka broker restarted at %s (pid %d)", self.bootstrap_servers, process.pid
        )

    def _format_storage(
        self,
        java: str,
        java_options: list[str],
        classpath: str,
        config_path: Path,
        deadline: float,
    ) -> None:
        # C1-only compilation starts this short-lived tool about 0.5 s sooner
        # (1.3 s instead of 1.8 s, measured on a 2-core VM).
        command = [java, "-Xmx256m", "-XX:TieredStopAtLevel=1", *java_options]
        command += ["-cp", classpath]
        command += ["kafka.tools.StorageTool", "format", "--standalone"]
        command += ["--cluster-id", _new_cluster_id(), "--config", str(config_path)]
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=max(deadline - time.monotonic(), 1.0),
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            # TimeoutExpired carries bytes even when run() was given text=True.
            output = ((error.stdout or b"") + (error.stderr or b"")).decode(
                errors="replace"
            )
            raise BrokerStartError(
                "Kafka storage format timed out. Increase timeout_seconds.\n" + output,
                exit_code=None,
                log_tail=output,
            ) from error
        if result.returncode != 0:
            output = _last_lines(result.stdout + result.stderr, LOG_TAIL_LINES)
            raise BrokerStartError(
                f"Kafka storage format failed with exit code {result.returncode}:\n"
                + output,
                exit_code=result.returncode,
                log_tail=output,
            )

    def _wait_until_ready(self, deadline: float, timeout_seconds: float) -> None:
        assert self._process is not None and self._port is not None
        while True:
            exit_code = self._process.poll()
            if exit_code is not None:
                raise self._start_error(
                    f"the Kafka broker exited with code {exit_code} "
                    "before it was ready",
                    exit_code,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._start_error(
                    f"the Kafka broker was not ready within {timeout_seconds:.0f} s "
                    "and is still running. Increase timeout_seconds on a slow machine",
                    None,
                )
            if _accepts_connections(self._port) and _is_ready(
                self.bootstrap_servers, min(remaining, 10.0)
            ):
                return
            time.sleep(0.25)

    def _start_error(self, summary: str, exit_code: int | None) -> BrokerStartError:
        # A failed broker logs its shutdown after the error, so the tail alone
        # can miss the cause. The message lists the error lines first.
        tail = self.log_tail(LOG_TAIL_LINES)
        message = f"{summary}."
        errors = self._log_errors()
        if errors:
            message += f"\nErrors in the broker log:\n{errors}"
        message += f"\nLast {LOG_TAIL_LINES} lines of the broker log:\n{tail}"
        return BrokerStartError(message, exit_code=exit_code, log_tail=tail)

    def _log_errors(self, max_lines: int = 20) -> str:
        """Return the ERROR and "Caused by:" lines of the log, without repeats."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        selected: dict[str, None] = {}
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            for line in log:
                if "] ERROR " in line or line.startswith("Caused by:"):
                    selected.setdefault(line, None)
        return "".join(list(selected)[:max_lines])

    def stop(self, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> None:
        """Stop the broker and delete its temporary directory.

        Sends SIGTERM, which starts Kafka's controlled shutdown, and sends
        SIGKILL if the process is still running after `timeout_seconds`.
        Calling stop() on a stopped broker does nothing.
        """
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is not None:
            _terminate(process, timeout_seconds)
            logger.info(
                "Stopped Kafka broker (pid %d, exit code %s)",
                process.pid,
                process.returncode,
            )
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
        self._port = None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last `lines` lines of the broker log, or "" if there is none."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return "".join(deque(log, maxlen=lines))

    def __enter__(self) -> LocalKafkaBroker:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _terminate(process: subprocess.Popen[bytes], timeout_seconds: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_seconds)
    except subprocess.TimeoutExpired:
        logger.warning(
            "Kafka broker (pid %d) still running %.0f s after SIGTERM, sending SIGKILL",
            process.pid,
            timeout_seconds,
        )
        process.kill()
        process.wait()


def _is_ready(bootstrap_servers: str, timeout_seconds: float) -> bool:
    """Check that the broker serves metadata, idempotent produce and groups."""
    # Imported here so that `fetch` works without confluent-kafka installed.
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    # The readiness loop retries, so librdkafka's warnings while the broker
    # starts (such as "Coordinator load in progress") are expected. The
    # clients log only errors (syslog level 3).
    client_config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "logger": logging.getLogger(f"{__name__}.readiness"),
        "log_level": 3,
    }
    try:
        admin = AdminClient(client_config)
        admin.list_topics(timeout=timeout_seconds)
        _produce_once(client_config, timeout_seconds)
        # Describing a group makes the broker create __consumer_offsets and
        # load the group coordinator. Without this step the first consumer
        # group join after start takes 1 to 3 s longer (measured on a 2-core VM).
        futures = admin.describe_consumer_groups(
            [READINESS_GROUP], request_timeout=timeout_seconds
        )
        futures[READINESS_GROUP].result()
    except KafkaException as error:
        logger.debug("Broker not ready yet: %s", error)
        return False
    return True


def _produce_once(client_config: dict[str, Any], timeout_seconds: float) -> None:
    from confluent_kafka import KafkaError, KafkaException, Producer

    # Idempotent producers need a producer id from the broker, so this also
    # waits for the coordinator that hands out producer ids.
    producer = Producer(
        {
            **client_config,
            "acks": "all",
            "enable.idempotence": True,
            "message.timeout.ms": int(timeout_seconds * 1000),
        }
    )
    delivery_errors: list[KafkaError | None] = []
    producer.produce(
        READINESS_TOPIC,
        b"ready",
        on_delivery=lambda error, _message: delivery_errors.append(error),
    )
    if producer.flush(timeout_seconds) > 0:
        raise KafkaException(
            KafkaError(KafkaError._MSG_TIMED_OUT, "readiness produce timed out")
        )
    if delivery_errors[0] is not None:
        raise KafkaException(delivery_errors[0])


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the process exit code."""
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    listeners = []
    if getattr(args, "container_address", None):
        # Bound on every interface, because a container network's gateway
        # address may exist only while a container is attached to it.
        listeners.append(
            Listener(
                CONTAINER_LISTENER,
                "0.0.0.0",
                port=args.container_port,
                advertised_host=args.container_address,
            )
        )
    broker = LocalKafkaBroker(
        args.port, version=args.kafka_version, listeners=listeners
    )
    try:
        if args.command == "fetch":
            logger.info(
                "Kafka %s jars are in %s", args.kafka_version, broker.ensure_jars()
            )
            return 0
        return _run_in_foreground(broker, args.timeout_seconds)
    except BrokerError as error:
        logger.error("%s", error)
        return 1


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="broker.py",
        description=f"Run a single-node Apache Kafka broker on {HOST} for local "
        "runs and tests.",
    )
    parser.add_argument(
        "--kafka-version",
        default=DEFAULT_KAFKA_VERSION,
        help="Apache Kafka version to resolve with Maven (default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="start the broker in the foreground and print "
        "KAFKA_BOOTSTRAP_SERVERS=host:port on stdout when it is ready",
    )
    run.add_argument(
        "--port",
        type=int,
        help="PLAINTEXT listener port (default: a free port)",
    )
    run.add_argument(
        "--container-address",
        metavar="ADDRESS",
        help="also open a listener for containers, bound on every interface and "
        "advertised at ADDRESS, such as the gateway of the containers' network; "
        "prints KAFKA_CONTAINER_BOOTSTRAP_SERVERS=ADDRESS:PORT",
    )
    run.add_argument(
        "--container-port",
        type=int,
        help="port of the container listener (default: a free port)",
    )
    run.add_argument(
        "--timeout-seconds",
        type=float,
        default=90.0,
        help="maximum seconds to wait for the broker to become ready "
        "(default: %(default)s)",
    )
    fetch = commands.add_parser("fetch", help="resolve the broker jars into the cache")
    fetch.set_defaults(port=None, container_address=None, container_port=None)
    return parser.parse_args(argv)


def _run_in_foreground(broker: LocalKafkaBroker, timeout_seconds: float) -> int:
    # During start(), SIGTERM raises KeyboardInterrupt like SIGINT does, so
    # start() cleans up in both cases.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        broker.start(timeout_seconds)
    except KeyboardInterrupt:
        logger.info("Interrupted while starting the broker")
        return 130

    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("Received %s, stopping the broker", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        print(f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
        if any(listener.name == CONTAINER_LISTENER for listener in broker.listeners):
            address = broker.listener_address(CONTAINER_LISTENER)
            print(f"KAFKA_CONTAINER_BOOTSTRAP_SERVERS={address}", flush=True)
        while not stop_requested.wait(1.0):
            if broker.exit_code is not None:
                logger.error(
                    "Kafka broker exited unexpectedly with code %d. "
                    "Last lines of %s:\n%s",
                    broker.exit_code,
                    broker.log_path,
                    broker.log_tail(),
                )
                return 1
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
