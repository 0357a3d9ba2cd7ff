"""Sample model app for agogosml: a credit-card fraud scorer."""

from __future__ import annotations

import importlib.util
import sys

from agogosml.extras import install_command, missing_list

#: Packages of the ``sample`` extra that the app, training and data fetch import.
#: The packages of the ``sample`` extra, by the module each one installs.
SAMPLE_PACKAGES = {
    "joblib": "joblib",
    "numpy": "numpy",
    "pandas": "pandas",
    "sklearn": "scikit-learn",
}


def missing_packages_message() -> str | None:
    """Name the missing packages of the ``sample`` extra and how to install them.

    Returns:
        None when every package is installed, else one sentence with the fix.
    """
    missing = [
        package
        for module, package in SAMPLE_PACKAGES.items()
        if importlib.util.find_spec(module) is None
    ]
    if not missing:
        return None
    return (
        f"the sample app needs {missing_list(missing)} not installed; "
        f"install the sample extra: {install_command('sample')}"
    )


def exit_if_packages_missing(program: str) -> None:
    """End `program` with exit status 2 and the fix when the sample extra is missing.

    Args:
        program: What the user ran, such as ``sample app``, to start the message.
    """
    missing = missing_packages_message()
    if missing:
        print(f"{program}: {missing}", file=sys.stderr)
        raise SystemExit(2)


def main() -> None:
    """Run the sample app (``agogosml-sample-app``), or name the missing packages."""
    exit_if_packages_missing("sample app")
    from sample_app.app import main as serve

    serve()
