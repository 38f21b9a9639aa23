"""Which asyncio event loop the daemon runs on.

asyncio's own loop unless QKDNODE_EVENT_LOOP=uvloop is set in the environment and uvloop is
installed (`pip install 'qkdnode[uvloop]'`). uvloop carries HTTPS with less CPU, but it is not
the default: with it, a node whose CV-QKD serial driver is open sometimes does not stop on
SIGTERM (docs/performance.md has the figures and the story).
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
    choice = os.environ.get("QKDNODE_EVENT_LOOP", "asyncio")
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("QKDNODE_EVENT_LOOP=uvloop but uvloop is not installed; using asyncio")
        else:
            return uvloop.run(main)
    elif choice != "asyncio":
        log.warning("QKDNODE_EVENT_LOOP=%r is neither asyncio nor uvloop; using asyncio", choice)
    return asyncio.run(main)
