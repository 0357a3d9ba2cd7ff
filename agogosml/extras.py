"""The pip command that installs an extra of agogosml where it was installed from.

agogosml is installed from a clone of its repository or from a wheel built
from one, never from pypi.org, whose ``agogosml`` is an unrelated project. So
the command names the clone, or the wheel of a generated project, or else a
wheel path to fill in.
"""

from __future__ import annotations

from pathlib import Path

from agogosml import __version__


def install_command(extra: str) -> str:
    """Return ``pip install`` of agogosml with `extra`, from where it came."""
    checkout = Path(__file__).resolve().parents[1]
    # A generated project keeps the agogosml wheel it installs in wheels/.
    wheel = Path("wheels") / f"agogosml-{__version__}-py3-none-any.whl"
    if (checkout / "pyproject.toml").is_file():
        return f"python -m pip install -e '{checkout}[{extra}]'"
    if wheel.is_file():
        return f"python -m pip install '{wheel.resolve()}[{extra}]'"
    return (
        f"python -m pip install "
        f"'PATH/TO/agogosml-{__version__}-py3-none-any.whl[{extra}]' (the wheel "
        "built from a clone of agogosml; pypi.org's agogosml is another project)"
    )


def missing_list(names: list[str]) -> str:
    """Return "a, which is" or "a, b, which are", naming missing packages."""
    verb = "is" if len(names) == 1 else "are"
    return f"{', '.join(names)}, which {verb}"
