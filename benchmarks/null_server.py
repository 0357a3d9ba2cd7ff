"""An aiohttp server that reads each POST body and responds 200: one bare HTTP hop.

``python -m benchmarks.null_server`` listens on 127.0.0.1 at ``NULL_SERVER_PORT``
and serves ``GET /readyz`` too, so that it starts like the services.
"""

from __future__ import annotations

import os

from aiohttp import web

from agogosml.runtime import loop_factory


async def handle(request: web.Request) -> web.Response:
    """Read the body and respond with 200, as the output writer does."""
    await request.read()
    return web.json_response({"status": 200})


async def ready(_: web.Request) -> web.Response:
    """Respond to the readiness check with 200."""
    return web.json_response({"status": "ready"})


def main() -> None:
    """Serve until interrupted."""
    app = web.Application()
    app.router.add_post("/", handle)
    app.router.add_get("/readyz", ready)
    port = int(os.environ["NULL_SERVER_PORT"])
    factory = loop_factory()
    loop = factory() if factory is not None else None
    web.run_app(app, host="127.0.0.1", port=port, print=None, loop=loop)


if __name__ == "__main__":
    main()
