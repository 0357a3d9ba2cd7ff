"""Absolute paths for command options, with a clear error for a link loop."""

from __future__ import annotations

from pathlib import Path


def resolve(path: Path) -> Path:
    """Return `path` made absolute, with its symbolic links followed.

    Raises:
        ValueError: naming the path, when its symbolic links form a loop
            (Python 3.11 raises RuntimeError for one, later versions OSError).
    """
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        raise ValueError(
            f"{str(path)!r} cannot be resolved ({exc}): remove the symbolic link "
            "loop or give another path"
        ) from None
