"""Find a container engine with the Docker Engine API, or set up Podman's.

agogosml builds and runs its containers through the Docker Engine API. Where
a Docker engine responds (DOCKER_HOST, or the default socket), this script
uses it and changes nothing. Elsewhere it sets up Podman, which serves the
same API:

1. installs with apt-get those of podman, runc, netavark, aardvark-dns,
   iptables and debootstrap that are missing (this needs root);
2. writes a containers.conf for machines that refuse ``setrlimit`` and run
   cgroups v1 or hybrid: the cgroupfs manager, runc behind a wrapper that
   drops ``process.rlimits`` from each container's OCI config, no pids limit,
   chroot isolation for builds, and the host's CA certificates mounted into
   builds so that pip trusts the same certificates as the host;
3. builds a Debian bookworm base image with Python from Debian packages with
   debootstrap, for machines where no image registry is reachable;
4. starts ``podman system service`` on a socket in the cache directory.

Each step checks first and does nothing when its result is in place, so the
script can run before every test session.

Command line::

    python deployment/containers/engine.py ensure
    python deployment/containers/engine.py stop

`ensure` prints ``DOCKER_HOST=...`` and ``AGOGOSML_BASE_IMAGE=...`` on stdout
(the base image line only when it built the local base image) and leaves the
Podman service running in the background. `stop` stops a Podman service that
`ensure` started.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import docker
import docker.errors

logger = logging.getLogger(__name__)

#: Name of the base image that debootstrap builds where no registry is reachable.
LOCAL_BASE_IMAGE = "localhost/agogosml-debian-python:bookworm"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = (
    "python3",
    "python3-venv",
    "python3-pip",
    "python-is-python3",
    "ca-certificates",
)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Each Debian package, with a file that shows it is installed. netavark sets up
# container networks with iptables, which no package above depends on.
APT_PACKAGES = {
    "podman": "podman",
    "runc": "runc",
    "netavark": "/usr/lib/podman/netavark",
    "aardvark-dns": "/usr/lib/podman/aardvark-dns",
    "iptables": "iptables",
    "debootstrap": "debootstrap",
}
DEFAULT_DOCKER_SOCKET = "unix:///var/run/docker.sock"
SERVICE_START_SECONDS = 30.0
DEBOOTSTRAP_TIMEOUT_SECONDS = 1200.0
APT_TIMEOUT_SECONDS = 1200.0

# Podman calls this wrapper instead of runc. The OCI specs that Podman writes
# ask for RLIMIT_NPROC and other limits. Where setrlimit is rejected, runc
# fails to start the container or an exec in it, such as a health check. So
# the wrapper first removes the limits from the bundle's config.json (`create`,
# `run`) and from the process file (`exec --process`).
RUNC_WRAPPER = """\
#!{python}
import json
import os
import sys


def drop_rlimits(path, process_only):
    if not os.path.exists(path):
        return
    with open(path) as file:
        spec = json.load(file)
    process = spec if process_only else spec.get("process", {{}})
    if process.pop("rlimits", None) is not None:
        with open(path, "w") as file:
            json.dump(spec, file)


args = sys.argv[1:]
for index, arg in enumerate(args):
    value = args[index + 1] if index + 1 < len(args) else None
    if arg in ("--bundle", "-b") and value:
        drop_rlimits(os.path.join(value, "config.json"), False)
    elif arg.startswith("--bundle="):
        drop_rlimits(os.path.join(arg.split("=", 1)[1], "config.json"), False)
    elif arg in ("--process", "-p") and value:
        drop_rlimits(value, True)
    elif arg.startswith("--process="):
        drop_rlimits(arg.split("=", 1)[1], True)
os.execv({runc!r}, [{runc!r}, *args])
"""

CONTAINERS_CONF = """\
[containers]
pids_limit = 0
volumes = ["/etc/ssl/certs:/etc/ssl/certs:ro"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "agogosml-runc"

[engine.runtimes]
agogosml-runc = ["{wrapper}"]

[network]
network_backend = "netavark"
"""


class EngineError(RuntimeError):
    """Error raised when no container engine can be found or set up."""


@dataclasses.dataclass(frozen=True)
class Engine:
    """A Docker Engine API endpoint.

    Attributes:
        base_url: The API address, such as ``unix:///var/run/docker.sock``.
        kind: ``docker`` or ``podman``.
        base_image: Base image to build from, or None for the Dockerfiles'
            default.
    """

    base_url: str
    kind: str
    base_image: str | None = None

    def client(self, timeout: int = 600) -> docker.DockerClient:
        """Return a client of this engine."""
        return docker.DockerClient(base_url=self.base_url, timeout=timeout)


def default_state_dir() -> Path:
    """Return the directory for the Podman configuration, socket and log."""
    root = os.environ.get("AGOGOSML_CACHE_DIR") or Path.home() / ".cache" / "agogosml"
    return Path(root) / "podman"


def probe(base_url: str) -> str | None:
    """Return ``docker`` or ``podman`` if `base_url` serves the API, else None."""
    # The docker package leaks the socket of a failed unix connection, so a
    # missing socket file is checked here instead of by connecting.
    if base_url.startswith("unix://") and not Path(base_url[7:]).exists():
        return None
    try:
        client = docker.DockerClient(base_url=base_url, timeout=5)
        try:
            version = client.version()
        finally:
            client.close()
    except (docker.errors.DockerException, OSError) as error:
        logger.debug("No engine at %s: %s", base_url, error)
        return None
    components = [str(item.get("Name", "")) for item in version.get("Components", [])]
    return (
        "podman" if any("podman" in name.lower() for name in components) else "docker"
    )


def find_engine() -> Engine | None:
    """Return the Docker engine that DOCKER_HOST or the default socket names."""
    candidates = [os.environ.get("DOCKER_HOST", ""), DEFAULT_DOCKER_SOCKET]
    for base_url in filter(None, candidates):
        kind = probe(base_url)
        if kind is not None:
            # A Podman service that this script set up earlier has the local
            # base image, and builds need it where no registry is reachable.
            base_image = (
                LOCAL_BASE_IMAGE if _has_image(base_url, LOCAL_BASE_IMAGE) else None
            )
            return Engine(base_url=base_url, kind=kind, base_image=base_image)
    return None


def _has_image(base_url: str, tag: str) -> bool:
    client = docker.DockerClient(base_url=base_url, timeout=30)
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    finally:
        client.close()
    return True


class PodmanService:
    """Podman's Docker-compatible API service, set up for this machine.

    Args:
        state_dir: Directory of the configuration, socket, pid file and log.
    """

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = state_dir or default_state_dir()
        self.socket_path = self.state_dir / "podman.sock"
        self.pid_path = self.state_dir / "service.pid"
        self.log_path = self.state_dir / "service.log"
        self.config_path = self.state_dir / "containers.conf"
        self.wrapper_path = self.state_dir / "runc-without-rlimits"
        self._process: subprocess.Popen[bytes] | None = None
        #: True when `ensure` started the service, False when it was running.
        self.started = False

    @property
    def base_url(self) -> str:
        """The API address of the service."""
        return f"unix://{self.socket_path}"

    def environment(self) -> dict[str, str]:
        """Return the environment for podman commands that use this setup."""
        return {
            **os.environ,
            "CONTAINERS_CONF": str(self.config_path),
            "BUILDAH_ISOLATION": "chroot",
        }

    def ensure(self) -> Engine:
        """Install, configure and start Podman, and build the base image."""
        install_podman()
        self.write_config()
        self.started = self.start()
        self.ensure_base_image()
        return Engine(
            base_url=self.base_url, kind="podman", base_image=LOCAL_BASE_IMAGE
        )

    def write_config(self) -> None:
        """Write containers.conf and the runc wrapper."""
        runc = shutil.which("runc")
        if runc is None:
            raise EngineError("runc is not on PATH. Install it: apt-get install runc")
        python = (
            "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _write_if_changed(
            self.wrapper_path, RUNC_WRAPPER.format(python=python, runc=runc)
        )
        self.wrapper_path.chmod(0o755)
        _write_if_changed(
            self.config_path, CONTAINERS_CONF.format(wrapper=self.wrapper_path)
        )

    def running_pid(self) -> int | None:
        """Return the pid of the service this class started, if it still runs."""
        try:
            pid = int(self.pid_path.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def start(self) -> bool:
        """Start the service unless it already responds.

        Returns:
            True if this call started the service.
        """
        if self.running_pid() is not None and probe(self.base_url) is not None:
            logger.info("Podman service already runs at %s", self.base_url)
            return False
        self.stop()
        self.socket_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                ["podman", "system", "service", "--time=0", self.base_url],
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._process = process
        self.pid_path.write_text(str(process.pid))
        deadline = time.monotonic() + SERVICE_START_SECONDS
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise EngineError(
                    f"podman system service exited with code {process.returncode}. "
                    f"Its log:\n{_tail(self.log_path)}"
                )
            if probe(self.base_url) is not None:
                logger.info(
                    "Podman service (pid %d) responds at %s", process.pid, self.base_url
                )
                return True
            time.sleep(0.2)
        self.stop()
        raise EngineError(
            "podman system service did not respond within "
            f"{SERVICE_START_SECONDS:.0f} s. "
            f"Its log:\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """Stop the service that `start` started, if it runs."""
        pid = self.running_pid()
        if pid is not None:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
            else:
                os.killpg(pid, signal.SIGKILL)
            logger.info("Stopped the Podman service (pid %d)", pid)
        if self._process is not None:
            self._process.wait()
            self._process = None
        self.pid_path.unlink(missing_ok=True)

    def ensure_base_image(self) -> None:
        """Build the Debian base image with debootstrap unless it exists."""
        client = docker.DockerClient(base_url=self.base_url, timeout=60)
        try:
            client.images.get(LOCAL_BASE_IMAGE)
            logger.info("Base image %s is present", LOCAL_BASE_IMAGE)
            return
        except docker.errors.ImageNotFound:
            pass
        finally:
            client.close()
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        if not Path(debootstrap).exists():
            raise EngineError(
                "debootstrap is missing. Install it: apt-get install debootstrap"
            )
        mirror = debian_mirror()
        logger.info("Building %s with debootstrap from %s", LOCAL_BASE_IMAGE, mirror)
        with tempfile.TemporaryDirectory(prefix="agogosml-rootfs-") as work:
            rootfs = Path(work) / "rootfs"
            _run(
                [
                    debootstrap,
                    "--variant=minbase",
                    f"--include={','.join(DEBIAN_PACKAGES)}",
                    DEBIAN_SUITE,
                    str(rootfs),
                    mirror,
                ],
                timeout=DEBOOTSTRAP_TIMEOUT_SECONDS,
            )
            # apt's package lists are not needed at run time.
            shutil.rmtree(
                rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True
            )
            tar = subprocess.Popen(
                ["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
            )
            try:
                _run(
                    [
                        "podman",
                        "import",
                        "--change",
                        'CMD ["/bin/bash"]',
                        "-",
                        LOCAL_BASE_IMAGE,
                    ],
                    stdin=tar.stdout,
                    env=self.environment(),
                    timeout=DEBOOTSTRAP_TIMEOUT_SECONDS,
                )
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait()
        logger.info("Built %s", LOCAL_BASE_IMAGE)


def install_podman() -> None:
    """Install with apt-get the Podman packages that are missing."""
    missing = [
        package
        for package, probe in APT_PACKAGES.items()
        if not (Path(probe).exists() if probe.startswith("/") else _on_path(probe))
    ]
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise EngineError(
            "No Docker engine responds and these Podman packages are missing: "
            f"{', '.join(missing)}. Start Docker and set DOCKER_HOST, or install "
            f"them (as root on Debian: apt-get install {' '.join(missing)})."
        )
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    logger.info("Installing %s with apt-get", ", ".join(missing))
    _run(["apt-get", "update"], env=environment, timeout=APT_TIMEOUT_SECONDS)
    _run(
        ["apt-get", "install", "-y", "--no-install-recommends", *missing],
        env=environment,
        timeout=APT_TIMEOUT_SECONDS,
    )


def _on_path(command: str) -> bool:
    """Tell whether ``command`` is on PATH or in the sbin directories."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(command, path=search) is not None


def debian_mirror() -> str:
    """Return the Debian mirror that this machine's apt uses."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] == "deb" and "security" not in fields[1]:
                return fields[1]
    return DEFAULT_MIRROR


def ensure_engine(state_dir: Path | None = None) -> tuple[Engine, PodmanService | None]:
    """Return a Docker API engine, setting up Podman where none responds.

    Returns:
        The engine, and the Podman service when this call started it, so that
        the caller can stop it. A service that was already running is left to
        whoever started it.
    """
    engine = find_engine()
    if engine is not None:
        logger.info("Using the %s engine at %s", engine.kind, engine.base_url)
        return engine, None
    service = PodmanService(state_dir)
    engine = service.ensure()
    return engine, service if service.started else None


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _run(
    command: list[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    stdin: IO[bytes] | None = None,
) -> None:
    result = subprocess.run(
        command,
        env=env,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise EngineError(
            f"{command[0]} failed with code {result.returncode}:\n{output}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the process exit code."""
    parser = argparse.ArgumentParser(
        prog="engine.py",
        description="Find a Docker engine or set up Podman's Docker-compatible API.",
    )
    parser.add_argument("command", choices=["ensure", "stop"])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "stop":
            PodmanService().stop()
            return 0
        engine, _ = ensure_engine()
    except (EngineError, subprocess.TimeoutExpired) as error:
        logger.error("%s", error)
        return 1
    print(f"DOCKER_HOST={engine.base_url}")
    if engine.base_image is not None:
        print(f"AGOGOSML_BASE_IMAGE={engine.base_image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
