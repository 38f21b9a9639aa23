"""Tell systemd how the daemon is doing: the sd_notify protocol, without a dependency.

Under a `Type=notify` unit systemd puts the address of a datagram socket in $NOTIFY_SOCKET and
waits for `READY=1` before it calls the service started. The daemon may then send `STATUS=`
lines (shown by `systemctl status`), `WATCHDOG=1` keep-alives (with `WatchdogSec=` set, systemd
kills and restarts a service that stays silent longer than $WATCHDOG_USEC), and `STOPPING=1`
when it begins to shut down. One message is one datagram of newline-separated `KEY=VALUE`
lines. An address starting with '@' is in Linux's abstract namespace ('@' stands for the NUL
byte), any other is a path.

Outside systemd (no $NOTIFY_SOCKET) every call is a no-op, so the daemon runs the same way
from a shell, a test or the demo. A failed send never raises into the daemon: systemd's view
of a service is not worth a key hand-out. The first failure is logged as a warning, later ones
at debug level, so a broken socket cannot flood the journal.

The watchdog keep-alive runs as a task on the daemon's own event loop: if the loop is stuck
(a blocking call, a deadlock) the pings stop and systemd restarts the node, which is the
point. An optional `healthy()` check lets the daemon withhold pings for other reasons too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Callable, Mapping, MutableMapping

log = logging.getLogger("qkdnode.sdnotify")


class SystemdNotifier:
    """One daemon's channel to the service manager; inert when `address` is None."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None):
        self.address = address or None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *, unset: bool = False) -> "SystemdNotifier":
        """Read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID as systemd set them for this process.

        The watchdog is ours only if $WATCHDOG_PID is unset or names this process: a child that
        inherited the variables must not keep its parent alive. `unset=True` removes the
        variables afterwards, so that processes we start do not talk to systemd in our name.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw_usec, raw_pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        try:
            pid_ok = not raw_pid or int(raw_pid) == os.getpid()
            usec = int(raw_usec) if raw_usec and pid_ok else None
        except ValueError:
            log.warning("ignoring a malformed watchdog setting from systemd (WATCHDOG_USEC=%r, WATCHDOG_PID=%r)",
                        raw_usec, raw_pid)
        if unset and isinstance(env, MutableMapping):
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)
        return cls(address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    # -- the protocol

    def notify(self, **fields: object) -> bool:
        """Send one message, e.g. notify(READY=1, STATUS="up"); True if systemd got it.

        Values are sent as text; a newline inside one would start a new assignment, so it is
        turned into a space.
        """
        if self.address is None:
            return False
        if not fields:
            return True
        message = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items()).encode("utf-8", "replace")
        try:
            target = _sockaddr(self.address)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never wait on the service manager from the event loop: a full queue drops this
                # message (logged) rather than stalling every SAE request behind it.
                sock.setblocking(False)
                sock.sendto(message, target)
        except (OSError, ValueError) as exc:
            self._report(exc, fields)
            return False
        return True

    def _report(self, exc: Exception, fields: Mapping[str, object]) -> None:
        what = ", ".join(fields)
        if not self._failed:
            self._failed = True
            log.warning("cannot notify systemd at %s (%s): %s; later failures are logged at debug level",
                        self.address, what, exc)
        else:
            log.debug("cannot notify systemd at %s (%s): %s", self.address, what, exc)

    def ready(self, status: str | None = None) -> bool:
        """The node serves: systemd's start job completes and units ordered after it start."""
        return self.notify(READY=1, **({"STATUS": status} if status is not None else {}))

    def status(self, text: str) -> bool:
        """One line for `systemctl status`: what the node is doing now (never key material)."""
        return self.notify(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun: systemd waits for the exit (up to TimeoutStopSec=) without alarm."""
        return self.notify(STOPPING=1, **({"STATUS": status} if status is not None else {}))

    def reloading(self) -> bool:
        """A reload (SIGHUP) has begun; send ready() when it is done. MONOTONIC_USEC is what
        systemd >= 253 needs to match the two for Type=notify-reload; older ones ignore it."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time before a start (or stop) counts as failed, e.g. while a large vault opens."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def watchdog(self) -> bool:
        """Keep-alive: the service is healthy now."""
        return self.notify(WATCHDOG=1)

    def watchdog_interval(self) -> float | None:
        """Seconds within which systemd expects the next keep-alive, or None if it expects none."""
        if self.address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1_000_000

    # -- the keep-alive task

    async def watchdog_loop(self, healthy: Callable[[], bool] | None = None) -> None:
        """Send WATCHDOG=1 at half the interval systemd asked for, as long as the loop runs it
        and `healthy()` (if given) says yes. Returns at once when there is no watchdog."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        period = interval / 2
        withheld = False
        while True:
            ok = True
            if healthy is not None:
                try:
                    ok = bool(healthy())
                except Exception:  # a broken health check is an unhealthy node, not a dead watchdog task
                    log.exception("watchdog health check failed")
                    ok = False
            if ok:
                self.watchdog()
                if withheld:
                    log.info("healthy again; watchdog keep-alives resumed")
                withheld = False
            elif not withheld:
                log.error("unhealthy: withholding watchdog keep-alives; systemd restarts the node after %g s",
                          interval)
                withheld = True
            await asyncio.sleep(period)

    def start_watchdog(self, healthy: Callable[[], bool] | None = None) -> asyncio.Task | None:
        """Start `watchdog_loop` on the running loop; None when systemd expects no keep-alives.
        Cancel the task when the node stops."""
        if self.watchdog_interval() is None:
            return None
        return asyncio.get_running_loop().create_task(self.watchdog_loop(healthy), name="systemd-watchdog")


def _one_line(value: object) -> str:
    return str(value).replace("\r", " ").replace("\n", " ")


def _sockaddr(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    if address.startswith("/"):
        return address
    # systemd >= 254 may also hand out "vsock:CID:PORT" (to a VM's host); a node server is not that.
    raise ValueError(f"unsupported NOTIFY_SOCKET address {address!r} (expected a path or @abstract name)")
