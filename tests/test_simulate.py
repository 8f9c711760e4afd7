"""The simulator (issue 7): its frames decode back to the simulated values, and it drives
the real gateway over python-can's `virtual` bus to a real mosquitto.

Frames are checked with cantools `decode_message` directly, never with the gateway's
own decoders.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import can
import cantools
import pytest

from gateway.commands.simulate import Simulator, write_candump
from gateway.config import ConfigError, GatewayConfig, load_config, load_scenario, parse_scenario
from gateway.runtime.daemon import Daemon
from gateway.runtime.replay import replay
from tests.conftest import REPO, Broker

DBC = REPO / "dbc"


def make_config(tmp: Path, profile: str, *, url: str | None = None, channel: str = "sim",
                stale: float = 5.0) -> GatewayConfig:
    mqtt = f"mqtt: {{url: '{url}', topic_prefix: bms}}" if url else "mqtt: {topic_prefix: bms}"
    p = tmp / "gateway.yaml"
    p.write_text(textwrap.dedent(f"""\
        gateway_id: simtest
        state_dir: {tmp / 'state'}
        can: {{interface: virtual, channel: {channel}}}
        packs:
          - {{id: p1, profile: {profile}, stale_after_s: {stale}}}
        {mqtt}
        publish:
          state: {{min_interval_s: 0.2, max_interval_s: 5}}
          cells: {{min_interval_s: 0.5, max_interval_s: 5}}
        """))
    return load_config(p)


def scenario(tmp: Path, text: str) -> Any:
    p = tmp / "scenario.yaml"
    p.write_text(textwrap.dedent(text))
    return load_scenario(p)


def near(got: float, want: float, res: float) -> bool:
    return abs(got - want) <= res / 2 + 1e-6


def test_example_bms_frames_decode_to_simulated_values(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "example-bms")
    sc = scenario(tmp_path, """\
        - {at: 1, bms_fault: {code: bms_over_temperature, for: 1}}
        - {at: 2.5, current: -75}
        """)
    sim = Simulator(cfg.packs[0], scenario=sc, seed=7)
    db = cantools.database.load_file(str(DBC / "example-bms.dbc"), strict=False)
    seen: dict[str, int] = {}
    cells_seen: set[int] = set()
    temps_seen: set[int] = set()
    for ts, aid, data, ext in sim.frames(1_000_000.0, 4.0, 0.1):
        assert not ext
        snap = sim.snapshot
        assert snap is not None and snap.t == pytest.approx(round(ts - 1_000_000.0, 1), abs=0.01)
        msg = db.get_message_by_frame_id(aid)
        d = db.decode_message(aid, data, decode_choices=False)
        seen[msg.name] = seen.get(msg.name, 0) + 1
        f: dict[str, Any] = snap.fields
        if msg.name == "PackStatus":
            assert near(d["PackVoltage"], f["voltage_v"], 0.01)
            assert near(d["PackCurrent"], f["current_a"], 0.1)
            assert near(d["StateOfCharge"], f["soc_pct"], 0.5)
            want_state = {"charging": 2, "discharging": 3, "standby": 1, "error": 4}
            assert d["State"] == want_state[str(f["bms_state"])]
        elif msg.name == "CellVoltages":
            g = int(d["CellGroup"])
            for i in range(4):
                n = 4 * g + i
                assert near(d[f"CellVoltage{n:03d}"] / 1000, snap.cell_v[n], 0.001)
                cells_seen.add(n)
        elif msg.name == "CellTemperatures":
            g = int(d["TemperatureGroup"])
            for i in range(6):
                n = 6 * g + i
                assert near(d[f"Temperature{n:02d}"], snap.cell_t[n], 1.0)
                temps_seen.add(n)
        elif msg.name == "AlarmFlags":
            assert d["OverTemperature"] == (1 if 1.0 <= snap.t < 2.0 else 0)
            assert d["CellOverVoltage"] == 0
        elif msg.name == "TemperatureSummary":
            assert near(d["MaxTemperature"], f["temp_max_c"], 1.0)
    assert cells_seen == set(range(16))
    assert temps_seen == set(range(6))
    assert seen["PackStatus"] == 40 and seen["AlarmFlags"] == 40
    assert {"PackLimits", "TemperatureSummary", "CellBalancing"} <= set(seen)
    assert "CellSummary" not in seen  # the profile does not read it


def test_can_bms_frames_decode_to_simulated_values(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "can-bms")
    sc = scenario(tmp_path, """\
        events:
          - {at: 0.5, bms_fault: {code: bms_general_alarm, for: 1}}
          - {at: 0.5, bms_fault: {code: bms_cell_over_voltage, for: 1}}
        capacity_ah: 280
        soc: 35
        """)
    sim = Simulator(cfg.packs[0], scenario=sc, seed=3)
    db = cantools.database.load_file(str(DBC / "can-bms.dbc"), strict=False)
    seen: set[str] = set()
    for _ts, aid, data, _ext in sim.frames(2_000_000.0, 3.0, 0.1):
        snap = sim.snapshot
        assert snap is not None
        f: dict[str, Any] = snap.fields
        name = db.get_message_by_frame_id(aid).name
        d = db.decode_message(aid, data, decode_choices=False)
        seen.add(name)
        active = 0.5 <= snap.t < 1.5
        if name == "VoltageCurrentTemperature":
            assert near(d["BatteryVoltage"], f["voltage_v"], 0.01)
            assert near(d["BatteryCurrent"], f["current_a"], 0.1)
            assert near(d["BatteryTemperature"], f["temp_max_c"], 0.1)
        elif name == "SocSoh":
            assert near(d["StateOfCharge"], f["soc_pct"], 1.0)
            assert 34 <= d["StateOfCharge"] <= 36
        elif name == "CellExtremes":
            assert near(d["MinCellVoltage"] / 1000, min(snap.cell_v), 0.001)
            assert near(d["MaxCellVoltage"] / 1000, max(snap.cell_v), 0.001)
            assert near(d["MinCellTemperature"] - 273.15, f["temp_min_c"], 1.0)
        elif name == "InstalledCapacity":
            assert d["InstalledCapacityAh"] == 280
        elif name == "ChargeDischargeLimits":
            assert near(d["ChargeCurrentLimit"], 140, 0.1)
        elif name == "AlarmsWarnings":
            assert d["GeneralAlarm"] == (1 if active else 0)
            assert d["HighVoltageAlarm"] == 0
        elif name == "PylonProtectionAlarm":
            assert d["ProtectionCellOverVoltage"] == (1 if active else 0)
            assert d["ProtectionSystemError"] == 0
    assert {"VoltageCurrentTemperature", "SocSoh", "CellExtremes", "AlarmsWarnings",
            "PylonProtectionAlarm", "RequestFlags"} <= seen


def test_frames_are_deterministic_for_a_seed(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "example-bms")
    sc = scenario(tmp_path, "- {at: 1, cell_drift: {cell: 2, volts_per_s: 0.05}}\n")
    a = list(Simulator(cfg.packs[0], scenario=sc, seed=5).frames(10.0, 3.0, 0.1))
    b = list(Simulator(cfg.packs[0], scenario=sc, seed=5).frames(10.0, 3.0, 0.1))
    c = list(Simulator(cfg.packs[0], scenario=sc, seed=6).frames(10.0, 3.0, 0.1))
    assert a == b
    assert a != c
    assert all(x[0] < y[0] for x, y in itertools.pairwise(a))  # strictly increasing


def test_scenario_problems_are_reported(tmp_path: Path) -> None:
    problems: list[Any] = []
    parse_scenario([{"at": 1, "silnet": {"for": 2}}, {"at": 2, "silent": {}},
                    {"current": 5}], "s.yaml", problems)
    text = "\n".join(str(p) for p in problems)
    assert "did you mean 'silent'" in text
    assert "needs `for`" in text
    assert "needs `at`" in text
    cfg = make_config(tmp_path, "example-bms")
    sc = scenario(tmp_path, "- {at: 1, bms_fault: {code: bms_cell_overvoltage}}\n")
    with pytest.raises(ConfigError, match="bms_cell_over_voltage"):
        Simulator(cfg.packs[0], scenario=sc)


def test_scenario_number_out_of_range_is_not_told_to_drop_quotes() -> None:
    # a plain number below its minimum needs another number, not "without quotes"
    problems: list[Any] = []
    parse_scenario([{"at": -1, "current": 5}, {"at": 1, "silent": {"for": -8}},
                    {"at": "soon", "current": 5}], "s.yaml", problems)
    text = [str(p) for p in problems]
    assert len(text) == 3, text
    at, silent, quoted = text
    assert "[0].at: must be a number >= 0.0, got -1" in at, at
    assert "without quotes" not in at and "at: 0" in at, at
    assert "without quotes" not in silent and "for: 0" in silent, silent
    assert "without quotes" in quoted, quoted


def test_sample_log_replays_with_the_injected_faults(tmp_path: Path) -> None:
    """config/sample.log is what the documented command writes, and the gateway sees its
    scenario: a cell over voltage, the BMS alarm, the BMS going silent."""
    cfg = load_config(REPO / "config" / "gateway.example.yaml")
    sc = load_scenario(REPO / "config" / "scenarios" / "sample.yaml")
    out = tmp_path / "sample.log"
    sim = Simulator(cfg.packs[0], scenario=sc, seed=1)
    write_candump(sim.frames(1_767_225_600.0, 60.0, 0.1), out)
    assert out.read_bytes() == (REPO / "config" / "sample.log").read_bytes()
    assert out.stat().st_size < 1_000_000
    buf = io.StringIO()
    asyncio.run(replay(cfg, out, speed=None, stdout=buf))
    events = [json.loads(line.split(" ", 1)[1]) for line in buf.getvalue().splitlines()
              if line.startswith("bms/house/events ")]
    got = {(e["code"], e["state"]) for e in events}
    assert {("comm_lost", "raised"), ("comm_lost", "cleared"), ("cell_over_voltage", "raised"),
            ("bms_cell_over_voltage", "raised"), ("bms_cell_over_voltage", "cleared")} <= got
    assert next(e for e in events if e["code"] == "cell_over_voltage")["cell"] == 5


async def test_simulator_drives_the_gateway_over_a_virtual_bus(
        tmp_path: Path, broker: Broker, subscriber_factory: Any) -> None:
    channel = f"sim-e2e-{time.monotonic_ns()}"
    cfg = make_config(tmp_path, "example-bms", url=broker.url, channel=channel, stale=1.0)
    sc = scenario(tmp_path, """\
        - {at: 0.5, bms_fault: {code: bms_internal_fault, for: 1.5}}
        - {at: 0.5, cell_drift: {cell: 3, volts: 0.5}}
        - {at: 3.5, silent: {for: 2.5}}
        """)
    sim = Simulator(cfg.packs[0], scenario=sc, seed=11)
    sub = subscriber_factory(broker.port, ["bms/p1/#"])
    d = Daemon(cfg)
    serve = asyncio.create_task(d.serve())
    tx = can.Bus(interface="virtual", channel=channel)
    try:
        deadline = time.monotonic() + 20
        while not (d.runtime.sources and d.runtime.sources[0].opened.is_set()):
            assert time.monotonic() < deadline, "gateway bus did not open"
            assert not serve.done(), serve.exception() if serve.done() else ""
            await asyncio.sleep(0.05)
        sent = await sim.run_on_bus(tx, speed=1.0, duration=7.5)
        assert sent > 100

        def events(msgs: list[tuple[str, bytes, bool]]) -> set[tuple[str, str]]:
            out = set()
            for topic, payload, _ in msgs:
                if topic == "bms/p1/events":
                    e = json.loads(payload)
                    out.add((e["code"], e["state"]))
            return out

        want = {("bms_internal_fault", "raised"), ("bms_internal_fault", "cleared"),
                ("cell_over_voltage", "raised"), ("comm_lost", "raised"),
                ("comm_lost", "cleared")}
        ok = await asyncio.to_thread(sub.wait_for, lambda m: want <= events(m), 30.0)
        assert ok, f"events seen: {events(list(sub.messages))}"
        states = [json.loads(p) for p in sub.topic("bms/p1/state")]
        assert states, "no state on bms/p1/state"
        last = states[-1]
        assert last["pack_id"] == "p1" and last["cell_count"] == 16
        assert 40 < last["voltage_v"] < 60 and last["bms_state"] in ("charging", "error")
        ev = next(json.loads(p) for p in sub.topic("bms/p1/events")
                  if json.loads(p)["code"] == "cell_over_voltage")
        assert ev["cell"] == 3 and ev["source"] == "gateway"
    finally:
        d.stop_event.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serve, 30)
        tx.shutdown()
