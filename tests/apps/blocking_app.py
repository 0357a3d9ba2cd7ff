"""A model app whose plain scoring function blocks until its process ends.

It writes a line to the file named by BLOCKING_STARTED when a call begins, so
a test can tell that a call is running.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from agogosml.app import ModelApp

STARTED = Path(os.environ["BLOCKING_STARTED"])


def score(values: list[Any]) -> list[Any]:
    STARTED.write_text("scoring\n")
    threading.Event().wait()
    return values


if __name__ == "__main__":
    ModelApp(score, name="blocking app").run()
