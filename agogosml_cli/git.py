"""Run git commands for `agogosml generate`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from agogosml.errors import AgogosmlError

#: The identity of commits that only temporary repositories see.
TEMPORARY_IDENTITY = {
    "GIT_AUTHOR_NAME": "agogosml",
    "GIT_AUTHOR_EMAIL": "agogosml@localhost",
    "GIT_COMMITTER_NAME": "agogosml",
    "GIT_COMMITTER_EMAIL": "agogosml@localhost",
}


class GitError(AgogosmlError):
    """A git command failed; the message has its output."""


def run_git(
    args: list[str],
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    input_text: str | None = None,
    ok_codes: tuple[int, ...] = (0,),
) -> str:
    """Run ``git`` with `args` in `cwd` and return its standard output.

    `env` adds to the environment, and `input_text` is the standard input.
    `ok_codes` are the exit codes that are not errors, such as 1 for
    ``git check-ignore``, which exits with 1 when no path is ignored.

    Raises:
        GitError: git is missing or exited with a code not in `ok_codes`.
    """
    try:
        completed = subprocess.run(
            ["git", *args],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            input=input_text,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise GitError(
            "git is not installed; 'agogosml generate' needs it to version the "
            "project and to update it"
        ) from None
    if completed.returncode not in ok_codes:
        output = (completed.stderr or completed.stdout).strip()
        raise GitError(f"'git {' '.join(args)}' failed in {cwd}: {output}")
    return completed.stdout
