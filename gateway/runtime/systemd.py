"""A dependency-free client for systemd's sd_notify protocol.

The service manager hands us ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for a
socket in the abstract namespace); each notification is one datagram of ``KEY=value``
lines. Outside systemd the variable is unset and every method is a no-op, so the daemon
calls these unconditionally.

Sending never raises: losing a notification must not take the gateway down. The first
failure is logged at WARNING, repeats at DEBUG until a send succeeds again.

    with SystemdNotifier() as notifier:
        notifier.ready()
        interval = watchdog_interval()  # ping every `interval` seconds, if not None
"""

from __future__ import annotations

import logging
import os
import socket
import time
from types import TracebackType
from typing import Self

__all__ = ["SystemdNotifier", "watchdog_interval"]

log = logging.getLogger("gateway.notify")  # its name before the package layout: journal filters use it


class SystemdNotifier:
    """Sends sd_notify datagrams to the service manager; a no-op when not under systemd.

    ``address`` defaults to ``$NOTIFY_SOCKET``; an empty string disables notification.
    """

    __slots__ = ("_address", "_failing", "_sock")

    def __init__(self, address: str | None = None) -> None:
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET", "")
        self._address = _resolve(address)
        self._failing = False
        self._sock: socket.socket | None = None
        if self._address is not None:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A full receive queue on the manager's side must not stall the event loop.
                self._sock.setblocking(False)
            except OSError as exc:
                log.warning("sd_notify disabled: cannot create socket: %s", exc)
                self._address = None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def ready(self, status: str | None = None) -> None:
        """Start-up finished (also sent again when a reload has finished)."""
        if status is None:
            self.send(READY=1)
        else:
            self.send(READY=1, STATUS=_one_line(status))

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def status(self, text: str) -> None:
        """Free-form text shown by ``systemctl status``."""
        self.send(STATUS=_one_line(text))

    def stopping(self) -> None:
        self.send(STOPPING=1)

    def reloading(self) -> None:
        """Reload started; send ``ready()`` when it is done.

        Type=notify-reload (systemd >= 253) needs the CLOCK_MONOTONIC timestamp to tell
        this reload from an earlier one; ``time.monotonic_ns`` is that clock on Linux.
        """
        self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def send(self, **fields: str | int) -> None:
        """Send one datagram with ``KEY=value`` per field, in the order given.

        A key or value that would corrupt the message (newline, ``=`` in a key) is a
        programming error and raises ValueError; send failures never raise.
        """
        for key, value in fields.items():
            if not key or "=" in key or "\n" in key:
                msg = f"invalid sd_notify field name: {key!r}"
                raise ValueError(msg)
            if "\n" in str(value):
                msg = f"sd_notify field {key} must not contain a newline"
                raise ValueError(msg)
        if self._sock is None or self._address is None or not fields:
            return
        payload = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(payload.encode(), self._address)
        except OSError as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "sd_notify to %r failed: %s", self._address, exc)
            self._failing = True
        else:
            self._failing = False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings, or None if systemd expects none from us.

    This is half of ``WatchdogSec=`` (``$WATCHDOG_USEC``), the period sd_watchdog_enabled(3)
    recommends. ``$WATCHDOG_PID``, when set, names the process meant to ping; a child that
    inherited the environment must not.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_PID=%r", pid)
            return None
    try:
        interval = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
    if interval <= 0:
        return None
    return interval / 2 / 1_000_000


def _resolve(address: str) -> str | None:
    if not address:
        return None
    if address.startswith("@"):
        # Abstract namespace: the kernel name starts with a NUL byte instead of "@".
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    # Relative paths are invalid per sd_notify(3); "vsock:" addresses (systemd >= 254,
    # for VMs) are not needed on a gateway.
    log.warning("sd_notify disabled: unsupported NOTIFY_SOCKET=%r", address)
    return None


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())
