from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.runtime.systemd import SystemdNotifier, watchdog_interval


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify.sock")
    sock = _receiver(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def test_ready_watchdog_status_stopping(receiver: socket.socket) -> None:
    with SystemdNotifier() as notifier:
        assert notifier.enabled
        notifier.ready()
        assert receiver.recv(4096) == b"READY=1"
        notifier.watchdog()
        assert receiver.recv(4096) == b"WATCHDOG=1"
        notifier.status("2 packs, 48 frames/s")
        assert receiver.recv(4096) == b"STATUS=2 packs, 48 frames/s"
        notifier.stopping()
        assert receiver.recv(4096) == b"STOPPING=1"


def test_ready_with_status_is_one_datagram(receiver: socket.socket) -> None:
    with SystemdNotifier() as notifier:
        notifier.ready(status="running")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=running"


def test_status_newlines_are_flattened(receiver: socket.socket) -> None:
    with SystemdNotifier() as notifier:
        notifier.status("line one\nline two")
        assert receiver.recv(4096) == b"STATUS=line one line two"


def test_reloading_carries_monotonic_timestamp(receiver: socket.socket) -> None:
    with SystemdNotifier() as notifier:
        before = time.monotonic_ns() // 1000
        notifier.reloading()
        after = time.monotonic_ns() // 1000
        lines = receiver.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2


def test_send_keeps_field_order(receiver: socket.socket) -> None:
    with SystemdNotifier() as notifier:
        notifier.send(STATUS="x", EXTEND_TIMEOUT_USEC=5_000_000)
        assert receiver.recv(4096) == b"STATUS=x\nEXTEND_TIMEOUT_USEC=5000000"


def test_send_rejects_fields_that_would_corrupt_the_message(receiver: socket.socket) -> None:
    with SystemdNotifier() as notifier, pytest.raises(ValueError, match="newline"):
        notifier.send(STATUS="a\nREADY=1")


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"bms-gateway-test-{uuid.uuid4().hex}"
    sock = _receiver("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        with SystemdNotifier() as notifier:
            assert notifier.enabled
            notifier.ready()
            assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_explicit_address_overrides_environment(tmp_path: Path) -> None:
    path = str(tmp_path / "other.sock")
    sock = _receiver(path)
    try:
        with SystemdNotifier(path) as notifier:
            notifier.watchdog()
            assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


@pytest.mark.parametrize("value", [None, "", "relative/path.sock"])
def test_noop_without_usable_socket(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    with SystemdNotifier() as notifier:
        assert not notifier.enabled
        notifier.ready()
        notifier.watchdog()
        notifier.status("ignored")
        notifier.stopping()
        notifier.reloading()


def test_send_failure_is_logged_once_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Nobody listens on this path: every send fails with ENOENT.
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    # the logger keeps its name from before the package layout: journal filters use it
    caplog.set_level(logging.DEBUG, logger="gateway.notify")
    with SystemdNotifier() as notifier:
        for _ in range(5):
            notifier.watchdog()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "sd_notify" in warnings[0].getMessage()
    assert warnings[0].name == "gateway.notify"


def test_warning_rearms_after_a_successful_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "flaky.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    with SystemdNotifier() as notifier:
        notifier.watchdog()  # fails: not bound yet
        sock = _receiver(str(path))
        try:
            notifier.watchdog()
            assert sock.recv(4096) == b"WATCHDOG=1"
        finally:
            sock.close()
        path.unlink()
        notifier.watchdog()  # fails again: a new outage deserves a new warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2


def test_closed_notifier_is_a_noop(receiver: socket.socket) -> None:
    notifier = SystemdNotifier()
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    notifier.ready()
    receiver.settimeout(0.05)
    with pytest.raises(TimeoutError):
        receiver.recv(4096)


async def test_async_context_manager(receiver: socket.socket) -> None:
    async with SystemdNotifier() as notifier:
        notifier.ready()
    assert receiver.recv(4096) == b"READY=1"
    assert not notifier.enabled


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", "self", 15.0),
        ("30000000", None, 15.0),
        ("1000000", "self", 0.5),
        (None, None, None),
        (None, "self", None),
        ("", None, None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("30000000", "not-a-pid", None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert watchdog_interval() == expected


def test_watchdog_interval_is_none_for_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # systemd set WATCHDOG_PID for our parent; we merely inherited the environment.
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    assert os.getppid() != os.getpid()
    assert watchdog_interval() is None
