"""A model app for fault tests, driven by its input and a flag file.

- While the file named by FAULT_FAIL_FLAG exists, every request fails with 500.
- A value with ``"poison": true`` is rejected with 400.
- A value with ``"delay_seconds": x`` is held for x seconds before the response.
- A value with ``"hold_flag": path`` is held while the file at that path exists.

Each result is ``{"n": <n of the input>, "echo": true}``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from agogosml.app import InvalidRecord, ModelApp

FAIL_FLAG = os.environ.get("FAULT_FAIL_FLAG", "")


async def score(values: list[Any]) -> list[Any]:
    if FAIL_FLAG and Path(FAIL_FLAG).exists():
        raise RuntimeError("failing on purpose while the flag file exists")
    delay = max(float(value.get("delay_seconds", 0)) for value in values)
    if delay:
        await asyncio.sleep(delay)
    for value in values:
        while "hold_flag" in value and Path(value["hold_flag"]).exists():
            await asyncio.sleep(0.05)
    return [
        InvalidRecord("poison record") if value.get("poison") else {"n": value["n"]}
        for value in values
    ]


if __name__ == "__main__":
    ModelApp(score, name="fault app").run()
