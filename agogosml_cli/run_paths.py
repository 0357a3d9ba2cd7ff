"""Checks of the file options of ``agogosml run``, made before the run starts."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from agogosml_cli.resolve import resolve
from agogosml_cli.run import WORK_FILES

#: File in the work directory that a run holds an exclusive lock on.
LOCK_FILE = "run.lock"


class FilePath(click.Path):
    """A `click.Path` of a file to write.

    It rejects an empty value, and a value that ends with a slash before
    `Path` drops the slash.
    """

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Any:
        """Reject an empty path or a directory path, then convert as `click.Path`."""
        if isinstance(value, str):
            if not value:
                self.fail("the path is empty; give a file path such as summary.json")
            if value.endswith(os.sep):
                self.fail(
                    f"{value!r} ends with {os.sep!r}, so it names a directory; give "
                    f"a file path such as {os.path.join(value, 'summary.json')!r}"
                )
        return super().convert(value, param, ctx)


class DirectoryPath(click.Path):
    """A `click.Path` of a directory that rejects an empty value.

    `Path("")` is the current directory, whose files a run would overwrite.
    """

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Any:
        """Reject an empty path, then convert as `click.Path`."""
        if isinstance(value, str) and not value.strip():
            self.fail(
                "the path is empty; give a directory such as .agogosml/run, or "
                "leave the option out"
            )
        return super().convert(value, param, ctx)


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


@contextlib.contextmanager
def lock_work_dir(work_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `work_dir` until the block ends.

    Two runs in one work directory would delete and rewrite each other's
    files. The lock is `fcntl.flock` on `LOCK_FILE`, so the kernel releases
    it when the process exits, also when the process is killed. The file
    stays, and contains the pid of the run that last held the lock.

    NOTE: flock excludes processes on one host only. On a network file system
    two hosts may both get the lock.

    Raises:
        click.UsageError: another process holds the lock; naming the
            directory, the holder's pid when known, and the fix.
        click.BadParameter: the lock file cannot be opened or locked.
    """
    path = work_dir / LOCK_FILE
    try:
        # os.open makes a descriptor that child processes do not inherit, so a
        # service that outlives the run does not keep the lock.
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise click.BadParameter(
            f"cannot open the lock file {str(path)!r}: {_reason(exc)}",
            param_hint="--work-dir",
        ) from None
    try:
        _lock(descriptor, work_dir, path)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        yield
    finally:
        # Closing the only descriptor of the open file releases the lock.
        os.close(descriptor)


def _lock(descriptor: int, work_dir: Path, path: Path) -> None:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_pid(descriptor)
        process = f" (pid {holder})" if holder else ""
        raise click.UsageError(
            f"--work-dir {str(work_dir)!r} is in use by another 'agogosml run'"
            f"{process}, which holds the lock on {str(path)!r}. Wait until that "
            "run ends, or pass another --work-dir"
        ) from None
    except OSError as exc:
        raise click.BadParameter(
            f"cannot lock {str(path)!r}: {_reason(exc)}", param_hint="--work-dir"
        ) from None


def _holder_pid(descriptor: int) -> str:
    """Return the pid that the lock's holder wrote to the lock file, or ""."""
    try:
        text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


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
    work_dir: Path, inputs: dict[str, Path], summary_json: Path | None
) -> None:
    """Reject a file option that names a file that the run writes, deletes or locks.

    `inputs` maps option names, such as "--data", or descriptions of defaults
    to the files the run reads.

    Raises:
        click.UsageError: naming the option, the file and the conflict.
    """
    effects = dict.fromkeys(WORK_FILES, "which the run deletes and rewrites")
    effects[LOCK_FILE] = "which the run locks to keep other runs out"
    run_files = {
        _resolve_option("--work-dir", work_dir / name): name for name in effects
    }
    file_options: dict[str, Path | None] = {**inputs, "--summary-json": summary_json}
    for option, path in file_options.items():
        if path is None:
            continue
        name = run_files.get(_resolve_option(option, path))
        if name is not None:
            raise click.UsageError(
                f"{option} {str(path)!r} is the run's own {name} in --work-dir "
                f"{str(work_dir)!r}, {effects[name]}; give another file or "
                "another --work-dir"
            )
    if summary_json is None:
        return
    for option, path in inputs.items():
        if resolve(path) == resolve(summary_json):
            raise click.UsageError(
                f"{option} and --summary-json name the same file {str(path)!r}, "
                "which the summary would overwrite; give the summary its own file"
            )


def _resolve_option(option: str, path: Path) -> Path:
    """Return the resolved path of an option, or raise a usage error naming it."""
    try:
        return resolve(path)
    except ValueError as exc:
        raise click.UsageError(f"{option}: {exc}") from None


def _probe_directory(directory: Path) -> None:
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".agogosml-probe-"):
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
