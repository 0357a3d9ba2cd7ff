"""Checks of the file options of ``agogosml run``, made before the run starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from agogosml_cli.run import WORK_FILES


def prepare_work_dir(work_dir: Path) -> None:
    """Create `work_dir` if needed and check that files can be created in it.

    Raises:
        click.BadParameter: naming --work-dir, the path and the reason.
    """
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(
            f"cannot create directory {str(work_dir)!r}: {_reason(exc)}",
            param_hint="--work-dir",
        ) from None
    try:
        _probe_directory(work_dir)
    except OSError as exc:
        raise click.BadParameter(
            f"cannot create files in directory {str(work_dir)!r}: {_reason(exc)}",
            param_hint="--work-dir",
        ) from None


def check_summary_path(path: Path) -> None:
    """Check that `write_summary` can replace `path`, creating its directory.

    Raises:
        click.BadParameter: naming --summary-json, the path and the reason.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(
            f"cannot create directory {str(path.parent)!r}: {_reason(exc)}",
            param_hint="--summary-json",
        ) from None
    if path.exists() and not path.is_file():
        raise click.BadParameter(
            f"{str(path)!r} exists and is not a regular file; give a file path",
            param_hint="--summary-json",
        )
    try:
        _probe_directory(path.parent)
    except OSError as exc:
        raise click.BadParameter(
            f"cannot write {str(path)!r}, because files cannot be created in "
            f"{str(path.parent)!r}: {_reason(exc)}",
            param_hint="--summary-json",
        ) from None


def write_summary(path: Path, content: bytes) -> None:
    """Write `content` to a temporary file next to `path`, then rename it to `path`.

    A reader of `path` sees either the old file or the whole summary.

    Raises:
        OSError: the file could not be written.
    """
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
        # mkstemp creates the file readable by its owner only; give it the mode
        # that an ordinary open() would.
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_run_files(
    work_dir: Path, inputs: dict[str, Path | None], summary_json: Path | None
) -> None:
    """Reject a file option that names one of the files the run writes or deletes.

    `inputs` maps option names, such as "--data", to the files the run reads.

    Raises:
        click.UsageError: naming the option, the file and the conflict.
    """
    run_files = {(work_dir / name).resolve(): name for name in WORK_FILES}
    file_options = {**inputs, "--summary-json": summary_json}
    for option, path in file_options.items():
        if path is None:
            continue
        name = run_files.get(path.resolve())
        if name is not None:
            raise click.UsageError(
                f"{option} {str(path)!r} is the run's own {name} in --work-dir "
                f"{str(work_dir)!r}, which the run deletes and rewrites; give "
                "another file or another --work-dir"
            )
    if summary_json is None:
        return
    for option, path in inputs.items():
        if path is not None and path.resolve() == summary_json.resolve():
            raise click.UsageError(
                f"{option} and --summary-json name the same file {str(path)!r}, "
                "which the summary would overwrite; give the summary its own file"
            )


def _probe_directory(directory: Path) -> None:
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".agogosml-probe-"):
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
