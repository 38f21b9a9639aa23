"""A TCP proxy with faults on command, for the classical channel between two nodes.

It relays raw bytes (TLS passes through untouched: the nodes still verify each other end to
end) and, on command, misbehaves as a broken network or a middlebox would:

  `hang`        accepts and holds connections but forwards nothing (a peer that stops answering)
  `delay`       seconds added before each chunk is forwarded, both ways (a slow path)
  `disconnect`  drops every connection and refuses new ones (a cable pulled, a node gone)
  `garbage`     answers every new connection with bytes that are no TLS (a wrong service)
  `tls`         terminates new connections with this server context instead (a certificate the
                node does not trust: TLS failure)

Setting a fault drops the connections already open, so that it applies at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable


class FaultyLink:
    def __init__(self, upstream: Callable[[], tuple[str, int]], host: str = "127.0.0.1", port: int = 0):
        self.upstream, self.host, self.port = upstream, host, port
        self.hang = self.disconnect = self.garbage = False
        self.delay = 0.0
        self.tls: ssl.SSLContext | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self.accepted = 0

    async def start(self) -> "FaultyLink":
        self._server = await asyncio.start_server(self._client, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def set(self, **faults) -> None:
        """Set faults (hang, delay, disconnect, garbage, tls); clear() puts everything back."""
        for name, value in faults.items():
            if not hasattr(self, name) or name.startswith("_"):
                raise AttributeError(name)
            setattr(self, name, value)
        self.drop()

    def clear(self) -> None:
        self.set(hang=False, delay=0.0, disconnect=False, garbage=False, tls=None)

    def drop(self) -> None:
        for task in list(self._conns):
            task.cancel()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            if self.disconnect:
                return
            if self.garbage:
                writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + os.urandom(64))
                await writer.drain()
                return
            if self.tls is not None:
                await self._terminate(reader, writer)
                return
            if self.hang:
                await asyncio.Event().wait()
            host, port = self.upstream()
            up_r, up_w = await asyncio.open_connection(host, port)
            try:
                await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
            finally:
                up_w.close()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            if self.hang:
                await asyncio.Event().wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            dst.write(data)
            await dst.drain()
        with contextlib.suppress(Exception):
            dst.write_eof()

    async def _terminate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer the TLS handshake with our own (untrusted) certificate, then nothing."""
        loop = asyncio.get_running_loop()
        transport = writer.transport
        protocol = transport.get_protocol()
        with contextlib.suppress(ssl.SSLError, ConnectionError, OSError):
            await loop.start_tls(transport, protocol, self.tls, server_side=True)
            await asyncio.sleep(1.0)
