"""sd_notify without a dependency: one datagram to ``$NOTIFY_SOCKET``.

``READY=1`` after start-up, ``WATCHDOG=1`` from the live main loop (only while
it is healthy), ``STOPPING=1`` when draining. A no-op outside systemd.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    # Non-blocking: with the manager's queue full a blocking send would stall the caller's
    # event loop; a dropped ping is retried by the next one.
    flags = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    with socket.socket(socket.AF_UNIX, flags) as sock:
        try:
            sock.connect(path)
            sock.send(message.encode())
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000 / 2
