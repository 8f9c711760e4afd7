"""Several buses per gateway (issue 3): each pack hears only its own bus, live and in replay."""

from __future__ import annotations

import asyncio
import io
import json
import textwrap
from pathlib import Path

import can
import cantools

from gateway.config import load_config
from gateway.runtime.daemon import Daemon
from gateway.runtime.replay import replay
from tests.conftest import REPO, started

DB = cantools.database.load_file(str(REPO / "dbc" / "example-bms.dbc"))
PACK = DB.get_message_by_name("PackStatus")


def status(volts: float, i: int) -> bytes:
    return PACK.encode({"PackVoltage": volts, "PackCurrent": 1.0, "StateOfCharge": 50,
                        "StateOfHealth": 100, "State": 1, "AliveCounter": i % 256})


def config(tmp: Path, a: str, b: str) -> Path:
    cfg = tmp / "gw.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        gateway_id: multi
        state_dir: {tmp / 'state'}
        can:
          - {{name: can0, interface: virtual, channel: {a}}}
          - {{name: can1, interface: virtual, channel: {b}}}
        packs:
          - {{id: left, profile: example-bms, bus: can0}}
          - {{id: right, profile: example-bms, bus: can1}}
        publish: {{state: {{min_interval_s: 0.1}}}}
        """))
    return cfg


def last_state(out: str, pack: str) -> dict[str, object]:
    lines = [ln.split(" ", 1)[1] for ln in out.splitlines()
             if ln.startswith(f"bms/{pack}/state ")]
    assert lines, f"no state for {pack}"
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def test_replay_routes_frames_by_log_channel(tmp_path: Path) -> None:
    log = tmp_path / "two.log"
    rows = []
    for i in range(30):
        t = 1_700_000_000 + i * 0.1
        rows.append(f"({t:.6f}) can0 400#{status(48.0, i).hex().upper()}")
        rows.append(f"({t + 0.01:.6f}) can1 400#{status(51.2, i).hex().upper()}")
    log.write_text("\n".join(rows) + "\n")
    buf = io.StringIO()
    rt = asyncio.run(replay(load_config(config(tmp_path, "x0", "x1")), log, speed=None,
                            stdout=buf))
    assert last_state(buf.getvalue(), "left")["voltage_v"] == 48.0
    assert last_state(buf.getvalue(), "right")["voltage_v"] == 51.2
    assert [c.received for c in rt.pipeline.counters] == [30, 30]


def test_live_two_virtual_buses(tmp_path: Path) -> None:
    buf = io.StringIO()
    cfg = load_config(config(tmp_path, "mb-a", "mb-b"))

    async def run() -> None:
        d = Daemon(cfg, stdout=buf)
        task = asyncio.create_task(d.serve())
        await started(d)
        tx_a = can.Bus(interface="virtual", channel="mb-a")
        tx_b = can.Bus(interface="virtual", channel="mb-b")
        try:
            for i in range(10):
                tx_a.send(can.Message(arbitration_id=0x400, data=status(47.5, i),
                                      is_extended_id=False))
                tx_b.send(can.Message(arbitration_id=0x400, data=status(52.25, i),
                                      is_extended_id=False))
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
        finally:
            tx_a.shutdown()
            tx_b.shutdown()
            d._on_term()
            assert await asyncio.wait_for(task, 15) == 0
        assert [c.received for c in d.pipeline.counters] == [10, 10]

    asyncio.run(run())
    out = buf.getvalue()
    assert last_state(out, "left")["voltage_v"] == 47.5
    assert last_state(out, "right")["voltage_v"] == 52.25


def test_a_change_within_the_deadband_is_published_at_the_end(tmp_path: Path) -> None:
    """A move smaller than the deadband is held back while the log runs, not forgotten:
    the end of the replay publishes the exact last values."""
    log = tmp_path / "creep.log"
    rows = []
    for i in range(40):  # 48.00 V for 2 s, then +0.02 V: under the 0.05 V deadband
        v = 48.0 if i < 20 else 48.02
        data = status(v, 0).hex().upper()  # the same frame again does not change the state
        rows.append(f"({1_700_000_000 + i * 0.1:.6f}) can0 400#{data}")
    log.write_text("\n".join(rows) + "\n")
    buf = io.StringIO()
    asyncio.run(replay(load_config(config(tmp_path, "x0", "x1")), log, speed=None, stdout=buf))
    states = [json.loads(ln.split(" ", 1)[1]) for ln in buf.getvalue().splitlines()
              if ln.startswith("bms/left/state ")]
    assert states[0]["voltage_v"] == 48.0
    assert states[-1]["voltage_v"] == 48.02
    # held back while it ran: one state at the start, one at the end, nothing per frame
    assert len(states) == 2, [s["voltage_v"] for s in states]
