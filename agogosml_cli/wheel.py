"""Put a wheel of the running agogosml into a generated project.

A generated project depends on exactly the agogosml version that generated it
and installs it from the wheel in its ``wheels/`` directory, so that its image
build, CI and CD need no package index that has agogosml. The wheel comes from
the source tree that agogosml runs from (``pip wheel``), or else from the files
of the installed distribution, repacked as a wheel.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import io
import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

import agogosml
from agogosml import __version__
from agogosml.errors import AgogosmlError

WHEELS_DIR = Path("wheels")
PIP_TIMEOUT_SECONDS = 600

#: Files of an installed distribution that the installer wrote, not the wheel.
_INSTALLER_FILES = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"}
#: Timestamp of every member of a repacked wheel, so equal files give equal bytes.
_ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)


class WheelError(AgogosmlError):
    """No wheel of the running agogosml can be built; the message gives the reason."""


def wheel_name() -> str:
    """Return the file name of the running agogosml's wheel."""
    return f"agogosml-{Version(__version__)}-py3-none-any.whl"


def write_wheel(project: Path) -> list[Path]:
    """Write the running agogosml's wheel to ``project/wheels``.

    Other agogosml wheels in that directory are deleted. A wheel of the same
    name whose RECORD equals the new one is kept as it is, so an update that
    does not change agogosml leaves the file unchanged in git.

    Returns:
        The agogosml wheels deleted from the directory.

    Raises:
        WheelError: The wheel cannot be built.
    """
    data = _wheel_bytes()
    directory = project / WHEELS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / wheel_name()
    removed = [path for path in directory.glob("agogosml-*.whl") if path != target]
    for path in removed:
        path.unlink()
    if not (target.is_file() and _record(target.read_bytes()) == _record(data)):
        target.write_bytes(data)
    return removed


# A CLI process renders one project, but the tests generate many in one process,
# and a build from source takes seconds.
@functools.cache
def _wheel_bytes() -> bytes:
    root = _source_root()
    if root is not None:
        return _build_from_source(root)
    return _repack_installed()


def _record(wheel: bytes) -> list[str] | None:
    """Return the sorted lines of a wheel's RECORD, or None if it is no zip file."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(wheel))
    except zipfile.BadZipFile:
        return None
    with archive:
        names = [
            name for name in archive.namelist() if name.endswith(".dist-info/RECORD")
        ]
        if len(names) != 1:
            return []
        return sorted(archive.read(names[0]).decode().splitlines())


# ---------------------------------------------------------------------------
# From a source tree
# ---------------------------------------------------------------------------


def _source_root() -> Path | None:
    """Return the source tree that agogosml is imported from, if it is one."""
    root = Path(agogosml.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return None
    project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    return root if project.get("name") == "agogosml" else None


def _build_from_source(root: Path) -> bytes:
    with tempfile.TemporaryDirectory(prefix="agogosml-wheel-") as tmp:
        wheel_dir = Path(tmp) / "wheel"
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet"]
        if _build_requirements_installed(root):
            # Without isolation pip fetches nothing, so an offline build works.
            command.append("--no-build-isolation")
        command += ["--wheel-dir", str(wheel_dir), str(root)]
        try:
            completed = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=PIP_TIMEOUT_SECONDS,
                check=False,
                env=_fresh_build_directory(Path(tmp)),
            )
        except subprocess.TimeoutExpired:
            raise WheelError(
                f"building the agogosml wheel from {root} timed out after "
                f"{PIP_TIMEOUT_SECONDS} seconds: {' '.join(command)}"
            ) from None
        if completed.returncode != 0:
            output = (completed.stderr or completed.stdout).strip()[-2000:]
            raise WheelError(
                f"building the agogosml wheel from {root} failed: "
                f"{' '.join(command)}\n{output}\nThe generated project installs "
                "agogosml from this wheel; fix the build, or install agogosml "
                "from a wheel and run 'agogosml generate' again"
            )
        wheel = wheel_dir / wheel_name()
        if not wheel.is_file():
            names = (
                [path.name for path in wheel_dir.iterdir()]
                if wheel_dir.is_dir()
                else []
            )
            built = ", ".join(names) or "nothing"
            raise WheelError(
                f"building from {root} produced {built}, not {wheel.name}: the "
                f"source tree's version differs from the running agogosml "
                f"{__version__}; reinstall agogosml from {root}"
            )
        return wheel.read_bytes()


def _fresh_build_directory(tmp: Path) -> dict[str, str]:
    """Return the environment of a build whose setuptools builds under `tmp`.

    setuptools builds in the source tree's ``build/`` by default and never
    empties it, so a module deleted from the tree since an earlier build would
    still be packaged from ``build/lib``. ``DIST_EXTRA_CONFIG`` names a
    configuration file that setuptools reads after the tree's own, here one that
    moves the build directory into `tmp`, which is new for each build.
    """
    config = tmp / "build.cfg"
    # setuptools reads the file with interpolation, where "%%" stands for "%".
    build_base = str(tmp / "build").replace("%", "%%")
    config.write_text(f"[build]\nbuild_base = {build_base}\n", encoding="utf-8")
    return {**os.environ, "DIST_EXTRA_CONFIG": str(config)}


def _build_requirements_installed(root: Path) -> bool:
    """Return whether every ``build-system.requires`` entry is installed."""
    data = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    for text in data.get("build-system", {}).get("requires", []):
        try:
            requirement = Requirement(text)
            installed = importlib.metadata.version(requirement.name)
        except (InvalidRequirement, importlib.metadata.PackageNotFoundError):
            return False
        if not requirement.specifier.contains(installed, prereleases=True):
            return False
    return True


# ---------------------------------------------------------------------------
# From an installed distribution
# ---------------------------------------------------------------------------


def _repack_installed() -> bytes:
    """Pack the installed agogosml distribution's files as a wheel again.

    An installed wheel keeps its files and its RECORD, which lists them. The
    console scripts are left out because installers write them from
    ``entry_points.txt``.
    """
    distribution = _installed_distribution()
    files = distribution.files or []
    recorded = {file.as_posix() for file in files}
    members = [
        (file.as_posix(), Path(str(distribution.locate_file(file))))
        for file in files
        if _is_wheel_member(file, recorded)
    ]
    names = {name for name, _ in members}
    dist_info = next(
        (name.split("/")[0] for name in names if name.endswith(".dist-info/WHEEL")),
        None,
    )
    if "agogosml/__init__.py" not in names or dist_info is None:
        raise WheelError(
            f"agogosml {__version__} is installed without its files in RECORD (an "
            "egg or an editable install whose source tree is gone), so no wheel "
            "can be made for the generated project; install agogosml from a "
            "wheel or from a source clone (pip install path/to/agogosml) and run "
            "'agogosml generate' again"
        )
    return _zip_wheel(sorted(members), dist_info)


def _is_wheel_member(file: importlib.metadata.PackagePath, recorded: set[str]) -> bool:
    """Return whether an installed file came from the wheel's root.

    Scripts (``../../bin/agogosml``, or ``bin/agogosml`` under ``pip install
    --target``) and bytecode are the installer's output and are left out.
    """
    parts = file.parts
    if "__pycache__" in parts or file.suffix == ".pyc":
        return False
    if parts[0].endswith(".dist-info"):
        return file.name not in _INSTALLER_FILES
    if len(parts) == 1:
        return file.suffix == ".py"
    return f"{parts[0]}/__init__.py" in recorded


def _installed_distribution() -> importlib.metadata.Distribution:
    try:
        distribution = importlib.metadata.distribution("agogosml")
    except importlib.metadata.PackageNotFoundError:
        raise WheelError(
            "agogosml runs from neither a source tree nor an installed "
            "distribution, so no wheel can be made for the generated project; "
            "install agogosml with pip and run 'agogosml generate' again"
        ) from None
    if Version(distribution.version) != Version(__version__):
        raise WheelError(
            f"the installed agogosml distribution is {distribution.version}, but "
            f"the running package is {__version__}; reinstall agogosml"
        )
    return distribution


def _zip_wheel(members: list[tuple[str, Path]], dist_info: str) -> bytes:
    buffer = io.BytesIO()
    record_lines = []
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, path in members:
            data = path.read_bytes()
            _write_member(archive, name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest())
            record_lines.append(
                f"{name},sha256={digest.decode().rstrip('=')},{len(data)}"
            )
        record_name = f"{dist_info}/RECORD"
        record_lines.append(f"{record_name},,")
        _write_member(archive, record_name, ("\n".join(record_lines) + "\n").encode())
    return buffer.getvalue()


def _write_member(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIMESTAMP)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)
