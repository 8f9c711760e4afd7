"""Fault events end to end (issue 4): the exact sequence from an injected-fault log,
the same at any replay speed, and no gap in `seq` across a broker outage or SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cantools
import pytest

from gateway.config import load_config
from gateway.runtime.replay import replay
from tests.conftest import REPO, Broker

DB = cantools.database.load_file(str(REPO / "dbc" / "example-bms.dbc"))
T0 = 1_700_000_000.0
CELLS = 16


def cell_volts(t: float) -> list[float]:
    v = [3.52] * CELLS
    if 6.0 <= t < 12.0:
        v[4] = 3.70  # cell 5 over voltage for 6 s (imbalance 0.18 V: shorter than its debounce)
    v[6] = 3.60 if int(t * 2) % 2 else 3.58  # cell 7 flaps inside the hysteresis band
    return v


def frames_at(t: float, silent: Callable[[float], bool]) -> list[tuple[float, int, bytes]]:
    if silent(t):
        return []
    charging = 16.0 <= t < 20.0
    soc = 8.0 if 22.0 <= t < 26.0 else 60.0
    tmax = 50 if charging else 25
    out = []
    pack = DB.get_message_by_name("PackStatus")
    out.append((pack.frame_id, pack.encode({
        "PackVoltage": 52.8, "PackCurrent": 20.0 if charging else -5.0, "StateOfCharge": soc,
        "StateOfHealth": 98, "State": 2 if charging else 3, "AliveCounter": int(t * 10) % 256})))
    temps = DB.get_message_by_name("TemperatureSummary")
    out.append((temps.frame_id, temps.encode({
        "MinTemperature": 20, "MaxTemperature": tmax, "AvgTemperature": 22,
        "MinTemperatureSensor": 1, "MaxTemperatureSensor": 2, "SensorCount": 2})))
    alarms = DB.get_message_by_name("AlarmFlags")
    out.append((alarms.frame_id, alarms.encode({
        "CellOverVoltage": 1 if 2.0 <= t < 4.0 else 0, "CellUnderVoltage": 0,
        "OverTemperature": 0, "UnderTemperature": 0, "OverCurrentCharge": 0,
        "OverCurrentDischarge": 0, "InsulationFault": 0, "InternalFault": 0})))
    if round(t * 10) % 10 == 0:  # a full cell sweep once a second
        cv = DB.get_message_by_name("CellVoltages")
        volts = cell_volts(t)
        for g in range(CELLS // 4):
            sig = {"CellGroup": g}
            for k in range(4):
                sig[f"CellVoltage{g * 4 + k:03d}"] = round(volts[g * 4 + k] * 1000)
            out.append((cv.frame_id, cv.encode(sig)))
    return [(T0 + t, fid, data) for fid, data in out]


def write_log(path: Path, duration: float, silent: Callable[[float], bool] = lambda t: False,
              ) -> None:
    with path.open("w") as f:
        for step in range(int(duration * 10) + 1):
            t = step / 10
            for ts, fid, data in frames_at(t, silent):
                f.write(f"({ts:.6f}) can0 {fid:03X}#{data.hex().upper()}\n")


def write_config(tmp: Path, url: str | None) -> Path:
    cfg = tmp / "gw.yaml"
    mqtt = f"{{url: '{url}', topic_prefix: bms}}" if url else "{topic_prefix: bms}"
    cfg.write_text(textwrap.dedent(f"""\
        gateway_id: ev-test
        state_dir: {tmp / 'state'}
        can: {{interface: virtual, channel: events}}
        packs: [{{id: p, profile: example-bms, stale_after_s: 5, cell_count: {CELLS}}}]
        mqtt: {mqtt}
        shutdown_timeout_s: 5
        """))
    return cfg


def silence(t: float) -> bool:
    return 30.0 <= t < 37.0


# (code, state, cell/sensor, expected frame time) for the 40 s log above
EXPECTED = [
    ("bms_cell_over_voltage", "raised", None, 2.0),
    ("bms_cell_over_voltage", "cleared", None, 4.0),
    ("cell_over_voltage", "raised", 5, 8.0),      # 3.70 V from 6 s, 2 s debounce
    ("cell_over_voltage", "cleared", 5, 14.0),    # back to 3.30 V at 12 s, 2 s debounce
    ("over_temp_charge", "raised", None, 18.0),   # 50 degC while charging from 16 s
    ("over_temp_charge", "cleared", None, 22.0),
    ("low_soc", "raised", None, 24.0),            # 8 % from 22 s
    ("low_soc", "cleared", None, 28.0),
    ("comm_lost", "raised", None, 29.9 + 5.0),    # last frame 29.9 s + stale_after_s
    ("comm_lost", "cleared", None, 37.0),
]


def parse_events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(ln.split(" ", 1)[1]) for ln in lines if ln.startswith("bms/p/events ")]


def test_injected_faults_give_exactly_the_expected_events(tmp_path: Path) -> None:
    log = tmp_path / "faults.log"
    write_log(log, 40.0, silence)
    cfg = write_config(tmp_path, None)
    r = subprocess.run([sys.executable, "-m", "gateway", "replay", str(log), "-c", str(cfg)],
                       capture_output=True, text=True, timeout=120, cwd=REPO, check=True)
    events = parse_events(r.stdout.splitlines())
    got = [(e["code"], e["state"], e.get("cell", e.get("sensor"))) for e in events]
    assert got == [(c, s, n) for c, s, n, _ in EXPECTED]
    for e, (_, _, _, t) in zip(events, EXPECTED, strict=True):
        ts = time.mktime(time.strptime(e["ts"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        ts += float("0" + e["ts"][19:-1])
        assert abs(ts - (T0 + t)) <= 0.25, (e["code"], e["state"], e["ts"])
        assert e["pack_id"] == "p" and e["severity"] in ("warning", "alarm", "critical")
        assert e["source"] == ("bms" if e["code"].startswith("bms_") else "gateway")
        assert e["message"]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert len({e["event_id"] for e in events}) == len(events)
    over = events[2]
    assert over["value"] == pytest.approx(3.70) and over["limit"] == pytest.approx(3.65)
    # the retained faults list follows raise and clear; it ends empty
    faults = [json.loads(ln.split(" ", 1)[1]) for ln in r.stdout.splitlines()
              if ln.startswith("bms/p/faults ")]
    assert any(f and f[0]["code"] == "cell_over_voltage" and f[0]["cell"] == 5 for f in faults)
    assert faults[-1] == []


def test_events_identical_at_speed_max_and_speed_1(tmp_path: Path) -> None:
    log = tmp_path / "short.log"
    write_log(log, 9.0)  # BMS flag at 2-4 s and the cell 5 raise at 8 s
    cfg = write_config(tmp_path, None)
    outs = []
    for speed in ("max", "1"):
        r = subprocess.run([sys.executable, "-m", "gateway", "replay", str(log), "-c", str(cfg),
                            "--speed", speed], capture_output=True, text=True, timeout=120,
                           cwd=REPO, check=True)
        outs.append([{k: v for k, v in e.items() if k not in ("seq", "event_id")}
                     for e in parse_events(r.stdout.splitlines())])
    assert len(outs[0]) == 3
    assert outs[0] == outs[1]


def _seqs(sub: Any) -> list[int]:
    return [json.loads(p)["seq"] for p in sub.topic("bms/p/events")]


def test_broker_outage_loses_no_event(tmp_path: Path, broker: Broker,
                                      subscriber_factory: Any) -> None:
    """The broker goes away for several seconds mid-replay; every seq still arrives."""
    log = tmp_path / "toggle.log"
    # a BMS flag toggling every 0.5 s: one event per 0.5 s over 14 s
    with log.open("w") as f:
        alarms = DB.get_message_by_name("AlarmFlags")
        pack = DB.get_message_by_name("PackStatus")
        for step in range(141):
            t = step / 10
            on = int(t * 2) % 2
            for fid, data in (
                    (pack.frame_id, pack.encode({"PackVoltage": 52, "PackCurrent": 0,
                                                 "StateOfCharge": 50, "StateOfHealth": 100,
                                                 "State": 1, "AliveCounter": step % 256})),
                    (alarms.frame_id, alarms.encode({
                        "CellOverVoltage": 0, "CellUnderVoltage": 0, "OverTemperature": 0,
                        "UnderTemperature": 0, "OverCurrentCharge": 0,
                        "OverCurrentDischarge": 0, "InsulationFault": on,
                        "InternalFault": 0}))):
                f.write(f"({T0 + t:.6f}) can0 {fid:03X}#{data.hex().upper()}\n")
    cfg = write_config(tmp_path, broker.url)
    sub = subscriber_factory(broker.port, ["bms/p/events"], client_id="outage-sub", clean=False)
    # the subscriber comes back after the gateway: the events sent meanwhile wait in the
    # broker for its persistent session
    sub.client.reconnect_delay_set(3, 3)

    async def run() -> None:
        task = asyncio.create_task(replay(load_config(cfg), log, speed=1.0, deliver_timeout=30))
        await asyncio.sleep(4.0)
        broker.stop()
        await asyncio.sleep(4.0)
        broker.start()
        await task

    asyncio.run(run())
    assert sub.wait_for(lambda ms: len({json.loads(p)["seq"] for t, p, _ in ms}) >= 28, 30)
    seqs = sorted(set(_seqs(sub)))
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a seq is missing"
    assert len(seqs) == 28  # 14 s, a change every 0.5 s
    assert "offline" not in [p.decode() for p in sub.topic("bms/p/events")]


def _outbox_depth(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute("SELECT count(*) FROM events").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_sigkill_with_events_in_outbox_loses_nothing(tmp_path: Path, broker: Broker,
                                                     subscriber_factory: Any) -> None:
    log = tmp_path / "faults.log"
    write_log(log, 16.0)  # 4 events: BMS flag raise/clear, cell 5 raise/clear
    cfg = write_config(tmp_path, broker.url)
    sub = subscriber_factory(broker.port, ["bms/p/events"], client_id="kill-sub", clean=False)
    sub.client.reconnect_delay_set(0.2, 1)
    broker.stop()  # nothing can be delivered: events stay in the outbox
    # a replay keeps its events in memory unless given --outbox: this one must survive
    outbox = tmp_path / "state" / "outbox.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "replay", str(log), "-c", str(cfg),
                             "--speed", "4", "--outbox", str(outbox)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while _outbox_depth(outbox) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _outbox_depth(outbox) == 4, "events did not reach the outbox"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert proc.stderr is not None
    proc.stderr.close()

    broker.start()
    # restart: unacknowledged events first, then live ones, seq continuing
    log2 = tmp_path / "more.log"
    write_log(log2, 5.0)  # the BMS flag again: 2 new events
    r = subprocess.run([sys.executable, "-m", "gateway", "replay", str(log2), "-c", str(cfg),
                        "--outbox", str(outbox)],
                       capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr
    assert sub.wait_for(lambda ms: len(ms) >= 6, 20)
    seqs = _seqs(sub)
    assert sorted(set(seqs)) == list(range(1, 7))
    first_seen = {s: seqs.index(s) for s in set(seqs)}
    assert max(first_seen[s] for s in (1, 2, 3, 4)) < min(first_seen[s] for s in (5, 6))
    assert _outbox_depth(outbox) == 0
    assert oct(os.stat(outbox).st_mode & 0o777) == "0o600"
