"""Which asyncio event loop the daemon runs on.

uvloop (libuv, with TLS in C) when it is installed: it carries the HTTPS of the northbound API
and the peer channel with less CPU than asyncio's own loop (docs/performance.md has the
figures). QKDNODE_EVENT_LOOP=asyncio in the environment chooses asyncio's loop instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("qkdnode.eventloop")


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run(main) on the chosen loop."""
    choice = os.environ.get("QKDNODE_EVENT_LOOP", "uvloop")
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    elif choice != "asyncio":
        log.warning("QKDNODE_EVENT_LOOP=%r is neither uvloop nor asyncio; using asyncio", choice)
    return asyncio.run(main)
