"""The live path on a real SocketCAN interface (the file-descriptor reader, no thread).

This kernel has no SocketCAN, so the test is gated the way python-can gates its own:
set `TEST_SOCKETCAN_CHANNEL=vcan0` on a machine with a vcan interface up
(`ip link add dev vcan0 type vcan && ip link set up vcan0`).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import textwrap
from pathlib import Path

import can
import cantools
import pytest

from gateway.config import load_config
from gateway.runtime.daemon import Daemon
from tests.conftest import REPO, started

CHANNEL = os.environ.get("TEST_SOCKETCAN_CHANNEL")
pytestmark = [pytest.mark.socketcan, pytest.mark.skipif(
    not CHANNEL, reason="set TEST_SOCKETCAN_CHANNEL=vcan0 on a machine with a vcan interface")]


def test_socketcan_frames_reach_the_pipeline_without_a_thread(tmp_path: Path) -> None:
    db = cantools.database.load_file(str(REPO / "dbc" / "example-bms.dbc"))
    msg = db.get_message_by_name("PackStatus")
    cfg_path = tmp_path / "gw.yaml"
    cfg_path.write_text(textwrap.dedent(f"""\
        state_dir: {tmp_path / 'state'}
        can: {{interface: socketcan, channel: {CHANNEL}}}
        packs: [{{id: p, profile: example-bms}}]
        publish: {{state: {{min_interval_s: 0.1}}}}
        """))
    buf = io.StringIO()

    async def run() -> None:
        d = Daemon(load_config(cfg_path), stdout=buf)
        task = asyncio.create_task(d.serve())
        await started(d)
        bus = d.runtime.sources[0].bus
        assert bus is not None and bus.fileno() >= 0  # the event loop watches the socket
        tx = can.Bus(interface="socketcan", channel=CHANNEL)
        try:
            for i in range(20):
                tx.send(can.Message(arbitration_id=msg.frame_id, is_extended_id=False,
                                    data=msg.encode({"PackVoltage": 51.0, "PackCurrent": 2.5,
                                                     "StateOfCharge": 70, "StateOfHealth": 99,
                                                     "State": 2, "AliveCounter": i})))
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
        finally:
            tx.shutdown()
            d._on_term()
            assert await asyncio.wait_for(task, 15) == 0
        assert d.pipeline.counters[0].received == 20

    asyncio.run(run())
    states = [json.loads(ln.split(" ", 1)[1]) for ln in buf.getvalue().splitlines()
              if ln.startswith("bms/p/state ")]
    assert states and states[-1]["voltage_v"] == 51.0 and states[-1]["bms_state"] == "charging"
