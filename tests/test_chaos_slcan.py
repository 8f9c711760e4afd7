"""Live: a real serial CAN adapter, not python-can's in-process `virtual` bus. The test is
the adapter: it speaks SLCAN (`t`/`T` lines) on the master side of a pseudo-terminal, and
a gateway process opens the slave with python-can's `slcan` interface (pyserial). Frames
reach a real mosquitto; closing the pty is an unplugged adapter (`can_bus_lost`); a new
pty behind the same path is the adapter plugged back in (cleared, publishing again)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import cantools
import pytest

from tests.conftest import REPO, Broker

pytest.importorskip("serial", reason="python-can's slcan needs pyserial (pip install .[serial])")

DB = cantools.database.load_file(str(REPO / "dbc" / "example-bms.dbc"))
PACK = DB.get_message_by_name("PackStatus")


class Adapter:
    """One plug-in of a fake SLCAN adapter: a pty whose slave `link` points at."""

    def __init__(self, link: Path) -> None:
        self.master, slave = os.openpty()
        tmp = link.with_name(link.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(os.ttyname(slave))
        tmp.replace(link)  # atomic: the gateway sees the old or the new adapter
        os.close(slave)
        self.rx = bytearray()  # what the gateway sent to the adapter (C, S6, O, ...)
        self.stop = threading.Event()
        self.sent = 0

    def wait_opened(self, timeout: float) -> bool:
        """Until the gateway has sent `O\\r` (open the channel), draining what it writes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.master], [], [], 0.1)
            if r:
                with contextlib.suppress(OSError):
                    self.rx += os.read(self.master, 1024)
            if b"O\r" in self.rx:
                return True
        return False

    def send_frames(self, volts: float, seconds: float, garbage_every: int = 0) -> None:
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end and not self.stop.is_set():
            data = PACK.encode({"PackVoltage": volts, "PackCurrent": -2.0, "StateOfCharge": 55,
                                "StateOfHealth": 99, "State": 3, "AliveCounter": n % 256})
            line = f"t{PACK.frame_id:03X}{len(data)}{data.hex().upper()}\r".encode()
            if garbage_every and n % garbage_every == garbage_every - 1:
                line = b"tXYZ\r" + line  # a garbled line from the adapter: counted, skipped
            os.write(self.master, line)
            self.sent += 1
            n += 1
            r, _, _ = select.select([self.master], [], [], 0.02)
            if r:
                with contextlib.suppress(OSError):
                    self.rx += os.read(self.master, 1024)

    def unplug(self) -> None:
        os.close(self.master)


def events(sub: Any) -> list[dict[str, Any]]:
    return [json.loads(p) for p in sub.topic("bms/p/events")]


def states(sub: Any) -> list[dict[str, Any]]:
    return [json.loads(p) for p in sub.topic("bms/p/state")]


def test_slcan_adapter_over_a_pty_unplugged_and_back(tmp_path: Path, broker: Broker,
                                                    subscriber_factory: Any) -> None:
    link = tmp_path / "ttyCAN"
    adapter = Adapter(link)
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        gateway_id: pty
        state_dir: {tmp_path / 'state'}
        can: {{interface: slcan, channel: {link}, bitrate: 500000,
              options: {{sleep_after_open: 0}}}}
        packs: [{{id: p, profile: example-bms, stale_after_s: 3}}]
        mqtt: {{url: '{broker.url}', topic_prefix: bms}}
        publish: {{state: {{min_interval_s: 0.1, max_interval_s: 1}}}}
        shutdown_timeout_s: 5
        """))
    sub = subscriber_factory(broker.port, ["bms/p/#", "bms/gateway/pty/status"])
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert adapter.wait_opened(20), f"the gateway never opened the adapter: {adapter.rx!r}"
        assert adapter.rx.startswith(b"C\rS6\r"), adapter.rx  # close, 500 kbit/s, open
        adapter.send_frames(51.2, 1.5, garbage_every=10)
        assert sub.wait_for(lambda m: any(t == "bms/p/state" and b'"voltage_v":51.2' in p
                                          for t, p, _ in m), 10), "no state from the pty"
        # unplug: the gateway's read fails, the bus is lost, the pack goes offline
        adapter.unplug()
        assert sub.wait_for(lambda m: any(
            t == "bms/p/events" and b'"can_bus_lost"' in p and b'"raised"' in p
            for t, p, _ in m), 10), "can_bus_lost was not raised"
        assert proc.poll() is None, "the gateway died with its adapter"
        # plug a new adapter in behind the same path: the gateway reopens it with backoff
        again = Adapter(link)
        assert again.wait_opened(30), "the gateway did not reopen the adapter"
        again.send_frames(52.4, 1.5)
        assert sub.wait_for(lambda m: any(t == "bms/p/state" and b'"voltage_v":52.4' in p
                                          for t, p, _ in m), 10), "publishing did not resume"
        assert sub.wait_for(lambda m: any(
            t == "bms/p/events" and b'"can_bus_lost"' in p and b'"cleared"' in p
            for t, p, _ in m), 10), "can_bus_lost was not cleared"
        assert sub.wait_for(lambda m: any(
            t == "bms/gateway/pty/status" and b'"garbled":' in p
            and json.loads(p)["buses"][str(link)]["garbled"] > 0 for t, p, _ in m), 15)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        again.unplug()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    lost = [(e["state"], e["code"]) for e in events(sub) if e["code"] == "can_bus_lost"]
    assert lost == [("raised", "can_bus_lost"), ("cleared", "can_bus_lost")]
    volts = {s["voltage_v"] for s in states(sub)}
    assert {51.2, 52.4} <= volts
    print(f"slcan over pty: {adapter.sent} + {again.sent} frames written, "
          f"states published with {sorted(v for v in volts if v is not None)}, "
          f"events {[(e['code'], e['state']) for e in events(sub)]}")
