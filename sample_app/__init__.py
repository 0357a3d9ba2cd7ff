"""Sample model app for agogosml: a credit-card fraud scorer."""

from __future__ import annotations

import importlib.util
import sys

from agogosml.extras import install_command, missing_list

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
    return (
        f"the sample app needs {missing_list(missing)} not installed; "
        f"install the sample extra: {install_command('sample')}"
    )


def main() -> None:
    """Run the sample app (``agogosml-sample-app``), or name the missing packages."""
    missing = missing_packages_message()
    if missing:
        print(f"sample app: {missing}", file=sys.stderr)
        raise SystemExit(2)
    from sample_app.app import main as serve

    serve()
