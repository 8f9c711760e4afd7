"""End to end (issue 2): recorded and live CAN in, normalized state on a real mosquitto out.

Expected values are computed here with python-can and cantools directly, never with
the gateway's own decoders.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import can
import cantools
import pytest

from gateway.config import load_config
from gateway.runtime.daemon import Daemon
from gateway.runtime.replay import replay
from tests.conftest import REPO, Broker, shared, started


# The shipped profile for an Orion BMS 2 in inverter mode, pointed at the user's DBC
# (here the third-party one from the shared data); the pack is NMC (4.06 V cells).
def orion_pack(dbc: Path) -> str:
    return f", dbc: {dbc}, chemistry: nmc"


def write_config(tmp: Path, *, profile: str, url: str | None, extra: str = "",
                 can_cfg: str = "{interface: virtual, channel: e2e}", pack_extra: str = "") -> Path:
    """`profile` is a built-in profile's name, or the text of a profile to write."""
    if "\n" in profile:
        (tmp / "profile.yaml").write_text(profile)
        profile = "profile.yaml"
    mqtt = f"mqtt: {{url: '{url}', topic_prefix: bms}}" if url else "mqtt: {topic_prefix: bms}"
    cfg = tmp / "gateway.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        gateway_id: test
        state_dir: {tmp / 'state'}
        can: {can_cfg}
        packs:
          - {{id: ev, profile: {profile}, stale_after_s: 5{pack_extra}}}
        {mqtt}
        """) + extra)
    return cfg


def expected_orion(asc: Path, dbc: Path) -> tuple[dict[str, float], dict[int, float]]:
    """The last value of each mapped signal and of each cell, decoded with cantools."""
    db = cantools.database.load_file(str(dbc), strict=False)
    want: dict[str, float] = {}
    cells: dict[int, float] = {}
    names = {0x356: {"Pack_Inst_Voltage": "voltage_v", "Pack_Current": "current_a",
                     "High_Temperature": "temp_max_c"},
             0x355: {"Pack_SOC": "soc_pct", "Pack_Health": "soh_pct"},
             0x351: {"Pack_CCL": "charge_current_limit_a", "Pack_DCL": "discharge_current_limit_a",
                     "Maximum_Pack_Voltage": "charge_voltage_limit_v",
                     "Minimum_Pack_Voltage": "discharge_voltage_limit_v"}}
    with can.ASCReader(str(asc)) as reader:
        frames = list(reader)
    for m in frames:
        if m.is_extended_id:
            continue
        if m.arbitration_id in names:
            d = db.decode_message(m.arbitration_id, bytes(m.data), decode_choices=False)
            for sig, field in names[m.arbitration_id].items():
                want[field] = d[sig]
        elif m.arbitration_id == 0x36:
            d = db.decode_message(0x36, bytes(m.data), decode_choices=False)
            cells[int(d["CellId"])] = d["CellVoltage"]
    return want, cells


def collect(sub: Any, prefix: str = "bms/ev/") -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    with sub.lock:
        for topic, payload, retained in sub.messages:
            # retained copies from an earlier run arrive first on subscribe: skip them
            if topic.startswith(prefix) and not retained:
                out.setdefault(topic, []).append(payload)
    return out


def test_orion_replay_matches_cantools_and_is_byte_identical(
        tmp_path: Path, broker: Broker, subscriber_factory: Any) -> None:
    asc = shared("orion-we-ev/candump1_can0.asc")
    dbc = shared("orion-we-ev/Orion_CANBUS.dbc")
    cfg_path = write_config(tmp_path, profile="orion-inverter", url=broker.url,
                            pack_extra=orion_pack(dbc))
    want, want_cells = expected_orion(asc, dbc)
    assert 60 <= len(want_cells) <= 80, "the log carries about 70 cells"

    runs = []
    for i in range(2):
        sub = subscriber_factory(broker.port, ["bms/#"], client_id=f"e2e-{i}")
        rt = asyncio.run(replay(load_config(cfg_path), asc, speed=None))
        # the end of *this* run: the previous run's retained `offline` arrives first
        assert sub.wait_for(lambda ms: any(t == "bms/ev/availability" and p == b"offline"
                                           and not retained for t, p, retained in ms))
        runs.append(collect(sub))
        sub.close()
        # bad input is counted, not fatal: most ids on this bus are not Orion's
        c = rt.pipeline.counters[0]
        assert c.received == 62336
        assert c.unknown > 50000 and c.decoded == c.received - c.unknown

    first, second = runs
    assert first["bms/ev/state"] == second["bms/ev/state"], "replays differ"
    assert first["bms/ev/cells"] == second["bms/ev/cells"]

    # the retained snapshot a late subscriber gets equals cantools' view of the last frames
    late = subscriber_factory(broker.port, ["bms/ev/state", "bms/ev/cells"], client_id="late")
    assert late.wait_for(lambda ms: len({t for t, _, r in ms if r}) == 2)
    state = json.loads(late.topic("bms/ev/state")[-1])
    cells = json.loads(late.topic("bms/ev/cells")[-1])
    for field, value in want.items():
        assert state[field] == pytest.approx(value, abs=1e-6), field
    assert state["pack_id"] == "ev"
    assert "2025-11-05T21:37:40" <= state["ts"] <= "2025-11-05T21:38:19"
    assert state["power_w"] == pytest.approx(want["voltage_v"] * want["current_a"], abs=1e-3)
    volts = cells["voltages_v"]
    for idx, v in want_cells.items():
        assert volts[idx] == pytest.approx(v, abs=1e-6), f"cell {idx + 1}"
    seen = [v for v in volts if v is not None]
    assert state["cell_v_min"] == pytest.approx(min(seen))
    assert state["cell_v_max"] == pytest.approx(max(seen))
    assert state["cell_count"] == len(volts)
    assert 4.0 < state["cell_v_avg"] < 4.1


def test_replay_same_payloads_at_any_speed(tmp_path: Path) -> None:
    """--speed 1 and --speed max publish the same bytes (first 3 s of the Orion log)."""
    asc = shared("orion-we-ev/candump1_can0.asc")
    dbc = shared("orion-we-ev/Orion_CANBUS.dbc")
    short = tmp_path / "short.log"
    with short.open("w") as f, can.ASCReader(str(asc), relative_timestamp=False) as reader:
        for m in reader:
            if m.timestamp - 1762378660.0 > 3.0:
                break
            ident = f"{m.arbitration_id:08X}" if m.is_extended_id else f"{m.arbitration_id:03X}"
            f.write(f"({m.timestamp:.6f}) can0 {ident}#{bytes(m.data).hex().upper()}\n")
    cfg_path = write_config(tmp_path, profile="orion-inverter", url=None,
                            pack_extra=orion_pack(dbc))
    outs = []
    for speed in (None, 1.0):
        r = subprocess.run([sys.executable, "-m", "gateway", "replay", str(short), "-c",
                            str(cfg_path), "--speed", "max" if speed is None else "1"],
                           capture_output=True, text=True, timeout=60, check=True)
        lines = [ln for ln in r.stdout.splitlines()
                 if ln.startswith(("bms/ev/state", "bms/ev/cells", "bms/ev/avail"))]
        outs.append(lines)
    assert len(outs[0]) >= 3
    assert outs[0] == outs[1]


def test_live_virtual_bus_reaches_mqtt(tmp_path: Path, broker: Broker,
                                       subscriber_factory: Any) -> None:
    db = cantools.database.load_file(str(REPO / "dbc" / "example-bms.dbc"))
    cfg_path = tmp_path / "gw.yaml"
    cfg_path.write_text(textwrap.dedent(f"""\
        gateway_id: live
        state_dir: {tmp_path / 'state'}
        can: {{interface: virtual, channel: live-e2e}}
        packs: [{{id: p1, profile: example-bms}}]
        mqtt: {{url: '{broker.url}', topic_prefix: bms}}
        publish: {{state: {{min_interval_s: 0.2}}}}
        """))
    sub = subscriber_factory(broker.port, ["bms/#"])

    async def scenario() -> None:
        d = Daemon(load_config(cfg_path))
        task = asyncio.create_task(d.serve())
        await started(d)
        msg = db.get_message_by_name("PackStatus")
        tx = can.Bus(interface="virtual", channel="live-e2e")
        try:
            for i in range(20):
                data = msg.encode({"PackVoltage": 52.5, "PackCurrent": -12.5,
                                   "StateOfCharge": 80, "StateOfHealth": 99, "State": 3,
                                   "AliveCounter": i})
                tx.send(can.Message(arbitration_id=msg.frame_id, data=data,
                                    is_extended_id=False))
                await asyncio.sleep(0.05)
            ok = await asyncio.to_thread(sub.wait_for, lambda ms: any(
                t == "bms/p1/state" and json.loads(p)["voltage_v"] == 52.5 for t, p, _ in ms))
            assert ok, "state never reached the broker"
        finally:
            tx.shutdown()
            d._on_term()
            assert await asyncio.wait_for(task, 15) == 0

    asyncio.run(scenario())
    state = json.loads(sub.topic("bms/p1/state")[-1])
    assert state["current_a"] == -12.5 and state["soc_pct"] == 80
    assert state["bms_state"] == "discharging"
    assert sub.topic("bms/p1/availability")[-1] == b"offline"  # SIGTERM path publishes offline
    assert sub.topic("bms/gateway/live/availability")[-1] == b"offline"


# ----------------------------------------------------------------- bad input


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, check=False)


def test_check_config_example_ok() -> None:
    r = run_cli("check-config", "-c", "config/gateway.example.yaml")
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_check_config_misspelt_signal_names_nearest(tmp_path: Path) -> None:
    prof = (REPO / "config/profiles/example-bms.yaml").read_text()
    prof = prof.replace("dbc: [example-bms.dbc]", f"dbc: [{REPO / 'dbc/example-bms.dbc'}]")
    prof = prof.replace("signal: PackVoltage}", "signal: PackVoltag}")
    prof = prof.replace("message: PackLimits, signal: ChargeCurrentLimit",
                        "message: PackLimit, signal: ChargeCurrentLimit")
    cfg = write_config(tmp_path, profile=prof, url=None)
    r = run_cli("check-config", "-c", str(cfg))
    assert r.returncode == 3
    assert "PackVoltag" in r.stderr and "did you mean 'PackVoltage'" in r.stderr
    assert "no message 'PackLimit'" in r.stderr and "'PackLimits'" in r.stderr
    assert "profile.yaml" in r.stderr and "fields.voltage_v.signal" in r.stderr
    assert "Traceback" not in r.stderr


def test_config_errors_name_file_key_and_fix(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(textwrap.dedent("""\
        can: {interface: virtual, chanel: x}
        packs:
          - {id: "a/b", profile: exmple-bms}
        mqtt: {url: "http://nope", topic_prefix: bms}
        publsh: {}
        """))
    r = run_cli("check-config", "-c", str(cfg))
    assert r.returncode == 3
    err = r.stderr
    assert "bad.yaml: can.chanel: unknown key" in err and "'channel'" in err
    assert "packs[0].id" in err and "'/'" in err
    assert "no profile 'exmple-bms'" in err and "'example-bms'" in err
    assert "mqtt.url" in err
    assert "publsh" in err and "'publish'" in err
    missing = run_cli("check-config", "-c", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 3 and "file not found" in missing.stderr


def test_rejected_dbc_gets_line_and_fix(tmp_path: Path) -> None:
    bad = shared("orion-we-ev/ZeroEv_BMS_DU.dbc")
    prof = f"name: z\ndbc: [{bad}]\nfields:\n  voltage_v: {{message: X, signal: Y}}\n"
    cfg = write_config(tmp_path, profile=prof, url=None)
    r = run_cli("check-config", "-c", str(cfg))
    assert r.returncode == 3
    assert "ZeroEv_BMS_DU.dbc, lines " in r.stderr
    assert "VAL_" in r.stderr and "Fix:" in r.stderr
    assert "Traceback" not in r.stderr


def test_malformed_log_lines_short_frames_and_unknown_ids_are_counted(tmp_path: Path) -> None:
    db = cantools.database.load_file(str(REPO / "dbc" / "example-bms.dbc"))
    msg = db.get_message_by_name("PackStatus")
    good = msg.encode({"PackVoltage": 50.0, "PackCurrent": 1.0, "StateOfCharge": 50,
                       "StateOfHealth": 100, "State": 1, "AliveCounter": 0}).hex().upper()
    log = tmp_path / "mixed.log"
    log.write_text("\n".join([
        f"(1700000000.000000) can0 400#{good}",
        "this is not a candump line",
        "(1700000000.100000) can0 400#0102",          # too short for PackVoltage..State
        "(1700000000.200000) can0 7FF#00",             # unknown id
        "(1700000000.300000) can0 400#ZZ",             # bad hex
        f"(1700000000.400000) can0 400#{good}",
    ]) + "\n")
    cfg_path = write_config(tmp_path, profile=(REPO / "config/profiles/example-bms.yaml")
                            .read_text().replace("[example-bms.dbc]",
                                                 f"[{REPO / 'dbc/example-bms.dbc'}]"),
                            url=None)
    with (tmp_path / "out.txt").open("w") as stream:
        rt = asyncio.run(replay(load_config(cfg_path), log, speed=None, stdout=stream))
    assert rt.log_stats is not None
    assert rt.log_stats.bad_lines == 2
    assert any(":2:" in b for b in rt.log_stats.first_bad)
    c = rt.pipeline.counters[0]
    assert c.received == 4 and c.unknown == 1
    assert rt.pipeline.short_frames() == 1
    out = (tmp_path / "out.txt").read_text()
    assert '"voltage_v":50' in out


def test_unreadable_log_is_a_clear_error(tmp_path: Path) -> None:
    csv = tmp_path / "other.csv"  # not python-can's CSV columns: refused with a fix
    csv.write_text("a,b,c\n1,2,3\n")
    r = run_cli("replay", str(csv), "-c", "config/gateway.example.yaml", "--mqtt", "-")
    assert r.returncode == 1
    assert "other.csv" in r.stderr and "Fix:" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("replay", str(tmp_path / "missing.log"), "-c", "config/gateway.example.yaml")
    assert r.returncode == 1 and "not found" in r.stderr


def test_stdout_mode_prints_topic_and_payload(tmp_path: Path) -> None:
    asc = shared("orion-we-ev/candump1_can0.asc")
    dbc = shared("orion-we-ev/Orion_CANBUS.dbc")
    cfg_path = write_config(tmp_path, profile="orion-inverter", url=None,
                            pack_extra=orion_pack(dbc))
    t0 = time.monotonic()
    r = run_cli("replay", str(asc), "-c", str(cfg_path))
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 60
    lines = r.stdout.splitlines()
    topics = {ln.split(" ", 1)[0] for ln in lines}
    assert {"bms/ev/state", "bms/ev/cells", "bms/ev/availability",
            "bms/gateway/test/status"} <= topics
    for ln in lines:
        topic, payload = ln.split(" ", 1)
        if topic in ("bms/ev/state", "bms/ev/cells"):
            json.loads(payload)
