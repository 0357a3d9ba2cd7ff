"""A model app that forwards every message unchanged: the pipeline without a model.

Run it as ``python -m benchmarks.echo_app`` with the ``APP_`` settings of
`agogosml.app.AppSettings`. Against the fraud-scoring app it shows how much of a
request's cost is the model and how much is agogosml.
"""

from __future__ import annotations

from typing import Any

from agogosml.app import ModelApp


def echo(values: list[Any]) -> list[Any]:
    """Return the values as they came."""
    return values


if __name__ == "__main__":
    # The echo does no work, so a thread switch would only add cost.
    ModelApp(echo, name="echo app", score_in_thread=False).run()
