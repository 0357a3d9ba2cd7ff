"""Run Azurite, the Azure Storage emulator, for the checkpoint store tests.

Azurite comes from npm and is installed into
``${AGOGOSML_CACHE_DIR:-~/.cache/agogosml}/azurite-<version>``. Installing needs
Node.js and npm.

Command line::

    python deployment/azurite/azurite.py fetch
    python deployment/azurite/azurite.py run

`run` prints ``EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING=...`` once the blob
service accepts connections, and stops it on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

AZURITE_VERSION = "3.37.0"
HOST = "127.0.0.1"
NPM_TIMEOUT_SECONDS = 600.0
#: The emulator's fixed development account, documented for Azurite; it is
#: public and grants access to nothing but a local emulator.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
    "KBHBeksoGMGw=="
)


class AzuriteError(RuntimeError):
    """Azurite could not be installed or started."""


def default_cache_dir() -> Path:
    """Return the cache root: AGOGOSML_CACHE_DIR or ~/.cache/agogosml."""
    return Path(
        os.environ.get("AGOGOSML_CACHE_DIR") or "~/.cache/agogosml"
    ).expanduser()


def install(version: str = AZURITE_VERSION, cache_dir: Path | None = None) -> Path:
    """Install Azurite with npm unless the cache has it; return its blob server."""
    prefix = (cache_dir or default_cache_dir()) / f"azurite-{version}"
    executable = prefix / "node_modules" / ".bin" / "azurite-blob"
    marker = prefix / "installed"
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if marker.is_file() and executable.is_file():
            return executable
        npm = shutil.which("npm")
        if npm is None:
            raise AzuriteError(
                "npm was not found on PATH; install Node.js 18 or newer with npm "
                "(for example `apt-get install nodejs npm`)"
            )
        logger.info("Installing Azurite %s into %s with npm", version, prefix)
        command = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix)]
        result = subprocess.run(
            [*command, f"azurite@{version}"],
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_SECONDS,
            check=False,
        )
        if result.returncode != 0 or not executable.is_file():
            output = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise AzuriteError(
                f"npm install azurite@{version} failed (exit code "
                f"{result.returncode}); check access to the npm registry:\n{output}"
            )
        marker.write_text(f"azurite {version}\n")
    return executable


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class LocalAzurite:
    """Azurite's blob service on a free loopback port, with data in a temporary dir."""

    def __init__(self, version: str = AZURITE_VERSION) -> None:
        self.version = version
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._work_dir: Path | None = None

    @property
    def connection_string(self) -> str:
        """Storage connection string of the running emulator."""
        if self.port is None:
            raise AzuriteError("Azurite is not running; call start() first")
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};"
            f"AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://{HOST}:{self.port}/{ACCOUNT};"
        )

    def start(self, timeout_seconds: float = 60.0) -> None:
        """Start the blob service and wait until it accepts connections."""
        executable = install(self.version)
        self._work_dir = Path(tempfile.mkdtemp(prefix="agogosml-azurite-"))
        self.port = _free_port()
        command = [str(executable), "--blobHost", HOST, "--blobPort", str(self.port)]
        command += ["--location", str(self._work_dir / "data"), "--skipApiVersionCheck"]
        log = open(self._work_dir / "azurite.log", "wb")
        self._process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + timeout_seconds
        while not self._accepts_connections():
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise AzuriteError(f"Azurite did not start:\n{tail}")
            time.sleep(0.1)
        logger.info("Azurite blob service ready on %s:%d", HOST, self.port)

    def _accepts_connections(self) -> bool:
        assert self.port is not None
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        """Return the end of the emulator's output."""
        if self._work_dir is None or not (self._work_dir / "azurite.log").is_file():
            return ""
        with open(self._work_dir / "azurite.log", errors="replace") as log:
            return "".join(deque(log, maxlen=lines))

    def stop(self) -> None:
        """Stop the emulator and delete its data."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # Azurite waits for idle keep-alive connections to end before it
            # exits, and its data is deleted below, so it gets 2 s, then SIGKILL.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
        self.port = None

    def __enter__(self) -> LocalAzurite:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the exit code."""
    parser = argparse.ArgumentParser(
        prog="azurite.py", description="Install or run the Azurite blob service."
    )
    parser.add_argument("command", choices=["fetch", "run"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "fetch":
            logger.info("Azurite is at %s", install())
            return 0
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        with LocalAzurite() as azurite:
            variable = "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING"
            print(f"{variable}={azurite.connection_string}", flush=True)
            while True:
                time.sleep(1)
    except AzuriteError as error:
        logger.error("%s", error)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
