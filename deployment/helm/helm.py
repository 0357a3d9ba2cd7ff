"""Build the Helm binary that the chart tests and the release commands use.

Helm is built from source with ``go install helm.sh/helm/v3/cmd/helm@<version>``
through the Go module proxy, so only a Go toolchain is needed. The binary goes
to ``${AGOGOSML_CACHE_DIR:-~/.cache/agogosml}/bin/helm``.

Command line::

    python deployment/helm/helm.py fetch    # build Helm unless the right one is there
    python deployment/helm/helm.py path     # print the binary's path (exit 1 if absent)

`fetch` skips the build when the binary exists and ``helm version`` reports
the pinned version, or when HELM names a binary of your own. The first build
takes about five minutes on two cores.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

HELM_VERSION = "v3.21.4"
HELM_MODULE = "helm.sh/helm/v3/cmd/helm"
# Helm's Makefile derives the Kubernetes version that `helm template` and
# `helm lint` assume from its k8s.io/client-go module, v0.36.2 in v3.21.4's
# go.mod, so 1.36. Without these flags a build assumes Kubernetes 1.20 and
# reports its version as "v3.21".
KUBERNETES_MAJOR_VERSION = "1"
KUBERNETES_MINOR_VERSION = "36"
GO_BUILD_TIMEOUT_SECONDS = 1800.0
VERSION_TIMEOUT_SECONDS = 30.0

# Helm v3.21.4's go.mod requires Go 1.26. An older Go 1.21+ downloads that
# toolchain itself unless GOTOOLCHAIN=local.
GO_INSTALL_HINT = (
    "Install Go 1.21 or newer (for example `apt-get install golang`) and put `go` "
    "on PATH, or set HELM to an existing Helm 3 binary."
)


class HelmBuildError(RuntimeError):
    """Error raised when Go is missing or the Helm build fails."""


def default_cache_dir() -> Path:
    """Return the cache root: AGOGOSML_CACHE_DIR or ~/.cache/agogosml."""
    return Path(
        os.environ.get("AGOGOSML_CACHE_DIR") or "~/.cache/agogosml"
    ).expanduser()


def binary_path(cache_dir: Path | None = None) -> Path:
    """Return where `fetch` puts the Helm binary."""
    return (cache_dir or default_cache_dir()) / "bin" / "helm"


def installed_version(helm: Path) -> str | None:
    """Return the version that `helm` reports, or None if it does not run."""
    try:
        result = subprocess.run(
            [str(helm), "version", "--template", "{{ .Version }}"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip()


def fetch(version: str = HELM_VERSION, cache_dir: Path | None = None) -> Path:
    """Build Helm `version` into the cache unless it is already there.

    Returns:
        The path of the Helm binary.

    Raises:
        HelmBuildError: Go is missing, or `go install` failed.
    """
    helm = binary_path(cache_dir)
    helm.parent.mkdir(parents=True, exist_ok=True)

    # The lock serialises processes that build at the same time, such as two
    # test sessions started together.
    with open(helm.parent / ".helm.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if helm.is_file() and installed_version(helm) == version:
            return helm
        _go_install(version, helm.parent)

    found = installed_version(helm)
    if found != version:
        raise HelmBuildError(
            f"{helm} reports version {found!r} after the build, expected "
            f"{version!r}. Delete {helm} and run fetch again."
        )
    return helm


def _go_install(version: str, bin_dir: Path) -> None:
    go = shutil.which("go")
    if go is None:
        raise HelmBuildError(
            f"go was not found on PATH, and it is needed once to build Helm "
            f"{version}. {GO_INSTALL_HINT}"
        )
    ldflags = [
        "-s",
        "-w",
        f"-X helm.sh/helm/v3/internal/version.version={version}",
    ]
    for package in ("pkg/chartutil", "pkg/lint/rules"):
        ldflags += [
            f"-X helm.sh/helm/v3/{package}.k8sVersionMajor={KUBERNETES_MAJOR_VERSION}",
            f"-X helm.sh/helm/v3/{package}.k8sVersionMinor={KUBERNETES_MINOR_VERSION}",
        ]
    command = [go, "install", "-ldflags", " ".join(ldflags), f"{HELM_MODULE}@{version}"]
    logger.info("Building Helm %s into %s (a few minutes)", version, bin_dir)
    try:
        result = subprocess.run(
            command,
            env={**os.environ, "GOBIN": str(bin_dir), "CGO_ENABLED": "0"},
            capture_output=True,
            text=True,
            timeout=GO_BUILD_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise HelmBuildError(
            f"`{' '.join(command)}` timed out after "
            f"{GO_BUILD_TIMEOUT_SECONDS:.0f} s. Check access to the Go module proxy "
            "(GOPROXY)."
        ) from error
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise HelmBuildError(
            f"`{' '.join(command)}` failed with exit code {result.returncode}. "
            f"Check the Go version and access to the Go module proxy.\n{output}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the process exit code."""
    parser = argparse.ArgumentParser(
        prog="helm.py",
        description=f"Build Helm {HELM_VERSION} with Go into the agogosml cache.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="build Helm unless the cached one is current")
    commands.add_parser("path", help="print the path of the cached Helm binary")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )

    if args.command == "path":
        helm = binary_path()
        if installed_version(helm) != HELM_VERSION:
            logger.error(
                "Helm %s is not in %s. Run `python deployment/helm/helm.py fetch`.",
                HELM_VERSION,
                helm,
            )
            return 1
        print(helm)
        return 0

    configured = os.environ.get("HELM")
    if configured:
        logger.info(
            "HELM=%s is set, so the tests use it and nothing is built", configured
        )
        return 0

    try:
        helm = fetch()
    except HelmBuildError as error:
        logger.error("%s", error)
        return 1
    logger.info("Helm %s is at %s", HELM_VERSION, helm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
