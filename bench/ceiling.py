"""The framework ceiling for bench/api.py: a bare aiohttp HTTPS handler with the node's own TLS
setup (qkdnode.tlsutil.server_context: the same CA, certificate type and required client
certificate) that answers enc_keys with a constant key container.

    python -m bench.ceiling CA CERT KEY PORT [uvloop]
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path

from aiohttp import web

from qkdnode.tlsutil import server_context

BODY = json.dumps({"keys": [{"key_ID": "01a208c7-498c-7a07-8736-0ce17d3e3821",
                             "key": base64.b64encode(os.urandom(32)).decode()}]}).encode()


async def enc_keys(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def serve(ca: str, cert: str, key: str, port: int) -> None:
    app = web.Application()
    app.router.add_get("/api/v1/keys/{sae}/enc_keys", enc_keys)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context(Path(ca), Path(cert), Path(key)),
                       reuse_address=True)
    await site.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    ca, cert, key, port = sys.argv[1:5]
    if sys.argv[5:] == ["uvloop"]:
        import uvloop
        uvloop.install()
    asyncio.run(serve(ca, cert, key, int(port)))


if __name__ == "__main__":
    main()
