"""Sample model app for agogosml: a credit-card fraud scorer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from agogosml import __version__

#: Packages of the ``sample`` extra that the app, training and data fetch import.
SAMPLE_MODULES = ("joblib", "numpy", "pandas", "sklearn")


def missing_packages_message() -> str | None:
    """Name the missing packages of the ``sample`` extra and how to install them.

    Returns:
        None when every package is installed, else one sentence with the fix.
    """
    missing = [
        name for name in SAMPLE_MODULES if importlib.util.find_spec(name) is None
    ]
    if not missing:
        return None
    checkout = Path(__file__).resolve().parents[1]
    # A generated project keeps the agogosml wheel it installs in wheels/.
    wheel = Path("wheels") / f"agogosml-{__version__}-py3-none-any.whl"
    if (checkout / "pyproject.toml").is_file():
        command = f"pip install -e '{checkout}[sample]'"
    elif wheel.is_file():
        command = f"pip install '{wheel.resolve()}[sample]'"
    else:
        # agogosml is installed from a checkout or a wheel built from one.
        command = (
            f"pip install 'PATH/TO/agogosml-{__version__}-py3-none-any.whl[sample]'"
        )
    return (
        f"the sample app needs {', '.join(missing)}, which are not installed; "
        f"install the sample extra: {command}"
    )


def main() -> None:
    """Run the sample app (``agogosml-sample-app``), or name the missing packages."""
    missing = missing_packages_message()
    if missing:
        print(f"sample app: {missing}", file=sys.stderr)
        raise SystemExit(2)
    from sample_app.app import main as serve

    serve()
