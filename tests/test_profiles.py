"""Every shipped profile against real frames (shared logs where they exist, else frames
encoded by cantools from values chosen here). Expected values come from cantools'
own decode of the same frames and python-can's readers, never from gateway code.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import can
import cantools
import pytest
from conftest import REPO, shared

from gateway.config import load_config
from gateway.runtime.pipeline import Pipeline
from gateway.runtime.replay import replay
from gateway.source.logs import Frame

EXT = 0x80000000


def load_db(path: Path) -> Any:
    return cantools.database.load_file(str(path), strict=False)


def config(tmp: Path, packs: str) -> Path:
    p = tmp / "gateway.yaml"
    p.write_text(f"gateway_id: t\nstate_dir: {tmp}/state\nlog_level: warning\n"
                 f"can: {{interface: virtual, channel: x}}\npacks:\n{packs}\n")
    return p


def pipeline_for(tmp: Path, pack: str) -> Pipeline:
    return Pipeline(load_config(config(tmp, f"  - {pack}"), mqtt_url="-"))


def encoded(db: Any, name: str, values: dict[str, Any], ts: float, offset: int = 0) -> Frame:
    m = db.get_message_by_name(name)
    data = m.encode(values, strict=False)
    key = (m.frame_id + offset) | (EXT if m.is_extended_frame else 0)
    return (ts, key, bytes(data), "x")


def encode_all(db: Any, name: str, partial: dict[str, Any], ts: float, offset: int = 0) -> Frame:
    """Encode with every signal of the message present (zero unless given)."""
    m = db.get_message_by_name(name)
    muxer = next((s.name for s in m.signals if s.is_multiplexer), "")
    ids = sorted({i for s in m.signals for i in s.multiplexer_ids or []})
    mux = partial.get(muxer, ids[0] if ids else None)
    vals = {s.name: 0 for s in m.signals
            if s.multiplexer_ids is None or mux in s.multiplexer_ids}
    if muxer:
        vals[muxer] = mux
    for s in m.signals:  # a zero may be outside a signal's range (offsets)
        if s.name in vals and s.minimum is not None and s.minimum > 0:
            vals[s.name] = s.minimum
    vals.update(partial)
    return encoded(db, name, vals, ts, offset)


def asc_frames(path: Path, ids: set[int] | None = None) -> list[Frame]:
    out: list[Frame] = []
    for m in can.ASCReader(str(path)):
        if m.is_error_frame or m.is_remote_frame:
            continue
        if ids is not None and m.arbitration_id not in ids:
            continue
        key = m.arbitration_id | (EXT if m.is_extended_id else 0)
        out.append((m.timestamp, key, bytes(m.data), "x"))
    return out


def last_decoded(db: Any, frames: Iterable[Frame], frame_id: int) -> dict[str, Any]:
    got: dict[str, Any] = {}
    for _, key, data, _ in frames:
        if key & ~EXT == frame_id:
            got = db.decode_message(frame_id, data, decode_choices=False)
    assert got, f"no frame {frame_id:#x}"
    return got


def run(p: Pipeline, frames: list[Frame]) -> Any:
    p.feed(sorted(frames, key=lambda f: f[0]), 0)
    p.finish()
    return p.packs[0].live.state


def active_codes(p: Pipeline, i: int = 0) -> set[str]:
    return {f["code"] for f in p.packs[i].faults.active()}


# ------------------------------------------------------------------ Orion


@pytest.mark.parametrize(("profile", "own_dbc"), [
    ("orion-bms2", False),       # as shipped: our DBC
    ("orion-inverter", True),    # the user's own Orion utility export
])
def test_orion_against_real_log(tmp_path: Path, profile: str, own_dbc: bool) -> None:
    dbc = shared("orion-we-ev/Orion_CANBUS.dbc")  # the oracle in both cases
    log = shared("orion-we-ev/candump1_can0.asc")
    db = load_db(dbc)
    frames = asc_frames(log)
    pack = f"{{id: orion, profile: {profile}, dbc: {dbc}}}" if own_dbc else \
        f"{{id: orion, profile: {profile}}}"
    p = pipeline_for(tmp_path, pack)
    st = run(p, frames)
    # what the shipped orion-bms2 profile published before: 0x6B0 read as a 7.2 V pack,
    # -16.7 A and a false under-temperature alarm
    assert not active_codes(p) & {"under_temperature", "bms_malfunction_indicator"}
    v356, v355, v351 = (last_decoded(db, frames, i) for i in (0x356, 0x355, 0x351))
    assert st.get("voltage_v") == pytest.approx(v356["Pack_Inst_Voltage"])
    assert 292.0 <= st.get("voltage_v") <= 293.0  # SOURCES.md: 292.4-292.5 V
    assert st.get("current_a") == pytest.approx(v356["Pack_Current"])
    assert st.get("temp_max_c") == pytest.approx(v356["High_Temperature"])
    assert st.get("soc_pct") == v355["Pack_SOC"] == 83
    assert st.get("soh_pct") == v355["Pack_Health"]
    assert st.get("capacity_ah") == pytest.approx(v355["Adaptive_Total_Capacity"])
    assert st.get("charge_voltage_limit_v") == pytest.approx(v351["Maximum_Pack_Voltage"])
    assert st.get("discharge_current_limit_a") == pytest.approx(v351["Pack_DCL"])
    # cells: the newest voltage per CellId, 0-based
    cells: dict[int, float] = {}
    for _, key, data, _ in frames:
        if key == 0x36:
            d = db.decode_message(0x36, data)
            cells[d["CellId"]] = d["CellVoltage"]
    assert len(cells) > 60
    for cid, v in cells.items():
        assert st.cell_v[cid] == pytest.approx(v)
    missing = [i for i in range(max(cells) + 1) if i not in cells]
    assert all(st.cell_v[i] is None for i in missing)
    assert 4.05 <= st.get("cell_v_min") <= st.get("cell_v_max") <= 4.07


def test_orion_bms2_6b0_cells_from_log_and_encoded_custom_messages(tmp_path: Path) -> None:
    log = shared("orion-we-ev/candump1_can0.asc")
    db = load_db(REPO / "dbc" / "orion-bms2.dbc")
    frames = asc_frames(log, {0x36})
    frames += [
        encode_all(db, "PackStatus", {"PackCurrent": 42.5, "PackInstVoltage": 292.4,
                                      "PackSOC": 77.5, "Relay_DischargeRelayEnabled": 1,
                                      "Relay_ChargeRelayEnabled": 0,
                                      "Relay_MalfunctionIndicatorActive": 1}, 1e10),
        encode_all(db, "PackLimitsTemperatures", {"PackDCL": 200, "PackCCL": 90,
                                                  "HighTemperature": 31,
                                                  "LowTemperature": -5}, 1e10 + 0.01),
    ]
    p = pipeline_for(tmp_path, "{id: orion, profile: orion-bms2-6b0}")
    st = run(p, frames)
    ps = last_decoded(db, frames, 0x6B0)
    assert st.get("current_a") == pytest.approx(-ps["PackCurrent"])  # Orion: + = discharge
    assert st.get("voltage_v") == pytest.approx(ps["PackInstVoltage"])
    assert st.get("soc_pct") == pytest.approx(ps["PackSOC"])
    assert st.get("discharge_enabled") is True and st.get("charge_enabled") is False
    lt = last_decoded(db, frames, 0x6B1)
    assert st.get("temp_min_c") == lt["LowTemperature"] == -5
    assert st.get("charge_current_limit_a") == lt["PackCCL"]
    newest: dict[int, dict[str, Any]] = {}
    for _, key, data, _ in frames:
        if key == 0x36:
            d = db.decode_message(0x36, data, decode_choices=False)
            newest[d["CellId"]] = d
    for cid, d in newest.items():
        assert st.cell_v[cid] == pytest.approx(d["CellVoltage"])
        assert st.balancing[cid] is bool(d["CellBalancing"])
    assert "bms_malfunction_indicator" in active_codes(p)


# ------------------------------------------------------------------ foxBMS 2


def test_foxbms2_against_real_trc(tmp_path: Path) -> None:
    dbc = shared("foxbms2/foxbms.dbc")
    trc = shared("foxbms2/can-log.trc")
    db = load_db(dbc)
    frames = [(m.timestamp, m.arbitration_id, bytes(m.data), "x") for m in can.LogReader(str(trc))]
    assert len(frames) == 9
    p = pipeline_for(tmp_path, f"{{id: fox, profile: foxbms2, dbc: {dbc}}}")
    st = run(p, frames)
    cv = last_decoded(db, frames, 0x250)
    assert cv["f_CellVoltages_Mux"] == 2
    for n in range(8, 12):
        # flags are 0 next to plausible ~2 V cells: 0 means valid in real traffic
        assert cv[f"CellVoltage_{n:03d}_invalidFlag"] == 0
        assert st.cell_v[n] == pytest.approx(cv[f"CellVoltage_{n:03d}"] / 1000)
    assert all(c is None for c in st.cell_v[:8])
    ct = last_decoded(db, frames, 0x260)
    for n in range(6, 12):
        assert st.cell_t[n] == ct[f"CellTemperature_{n:03d}"]
    bms = db.decode_message(0x220, next(f[2] for f in frames if f[1] == 0x220))
    assert str(bms["BmsState"]) == "ERROR" and st.get("bms_state") == "error"
    lim = last_decoded(db, frames, 0x232)
    assert st.get("charge_voltage_limit_v") == lim["MaximumBatteryVoltage"] == 88
    assert st.get("discharge_voltage_limit_v") == lim["MinimumBatteryVoltage"]
    assert st.get("contactor_closed") is False
    raw = db.decode_message(0x220, next(f[2] for f in frames if f[1] == 0x220),
                            decode_choices=False)
    expected = {code for code, sig in [
        ("bms_general_error", "GeneralError"), ("bms_emergency_shutoff", "EmergencyShutoff"),
        ("bms_system_monitoring_error", "SystemMonitoringError"), ("bms_alert", "AlertFlag"),
        ("bms_can_timing_error", "CanTimingError"), ("bms_general_warning", "GeneralWarning"),
        ("bms_insulation_error", "InsulationError")] if raw[sig] == 1}
    assert expected == {"bms_general_error", "bms_emergency_shutoff",
                        "bms_system_monitoring_error", "bms_alert", "bms_can_timing_error"}
    assert expected <= active_codes(p)
    assert "bms_general_warning" not in active_codes(p)


def test_foxbms2_encoded_pack_values_and_invalid_cells(tmp_path: Path) -> None:
    dbc = shared("foxbms2/foxbms.dbc")
    db = load_db(dbc)
    frames = [
        encode_all(db, "f_PackValuesP0", {"BatteryVoltage": 402.3, "BusVoltage": 401.0,
                                          "Power": 12.34, "Current": 30.67}, 1.0),
        encode_all(db, "f_PackStateEstimation", {"MinimumSoc": 55.5, "MaximumSoc": 56.1,
                                                 "Soh": 97.5, "Energy": 42.2}, 1.01),
        encode_all(db, "f_PackLimits", {"MaximumDischargeCurrent": 150.25,
                                        "MaximumChargeCurrent": 75.5}, 1.02),
        encode_all(db, "f_BmsState", {"BmsState": 9}, 1.03),
        encode_all(db, "f_CellVoltages", {"f_CellVoltages_Mux": 0, "CellVoltage_000": 3301,
                                          "CellVoltage_001": 3302, "CellVoltage_002": 3303,
                                          "CellVoltage_003": 3304,
                                          "CellVoltage_002_invalidFlag": 1}, 1.04),
    ]
    st = run(pipeline_for(tmp_path, f"{{id: fox, profile: foxbms2, dbc: {dbc}}}"), frames)
    pv = db.decode_message(0x233, frames[0][2])
    assert st.get("voltage_v") == pytest.approx(pv["BatteryVoltage"])
    assert st.get("current_a") == pytest.approx(-pv["Current"])  # foxBMS: + = discharge
    assert st.get("power_w") == pytest.approx(-pv["Power"] * 1000)
    se = db.decode_message(0x235, frames[1][2])
    assert st.get("soc_pct") == pytest.approx(se["MinimumSoc"])
    assert st.get("soh_pct") == pytest.approx(se["Soh"])
    assert st.extras["energy_kwh"] == pytest.approx(se["Energy"])
    assert st.get("discharge_current_limit_a") == pytest.approx(150.25)
    assert st.get("bms_state") == "charging" and st.get("contactor_closed") is True
    assert st.cell_v[:4] == pytest.approx([3.301, 3.302, None, 3.304])  # type: ignore[arg-type]


# ------------------------------------------------------------------ Tesla Model 3


TESLA_IDS = {0x132, 0x292, 0x2D2, 0x312, 0x332, 0x401}


def test_tesla_model3_against_real_log_and_encoded_cells(tmp_path: Path) -> None:
    dbc = shared("tesla-model3/Model3CAN.dbc")
    log = shared("orion-we-ev/candump1_can0.asc")
    db = load_db(dbc)
    frames = asc_frames(log, TESLA_IDS)
    present = {f[1] for f in frames}
    # what that vehicle bus really carries of the BMS IDs the profile reads
    assert present == {0x132, 0x2D2, 0x312}
    t_end = max(f[0] for f in frames) + 0.001
    cells = [3.9 + ((i * 37) % 200) / 10000 for i in range(96)]
    for m in range(32):  # 0x401: mux m carries cells 3m..3m+2 at bytes 2-7
        names = [s.name for s in db.get_message_by_name("ID401CellVoltages").signals
                 if s.multiplexer_ids == [m]]
        names.sort(key=lambda n: db.get_message_by_name("ID401CellVoltages")
                   .get_signal_by_name(n).start)
        vals = {"MultiplexSelector": m, "StatusFlags": 0,
                **{n: cells[3 * m + k] for k, n in enumerate(names)}}
        frames.append(encoded(db, "ID401CellVoltages", vals, t_end + m * 0.001))
    frames.append(encode_all(db, "ID292BMS_SOC", {"SOCUI292": 71.3, "SOCave292": 72.0},
                             t_end + 0.1))
    frames.append(encode_all(db, "ID332BattCellMinMax", {
        "BattCellMultiplexer332": 1, "BattCellBrickVoltageMax332": 3.92,
        "BattCellBrickVoltageMin332": 3.9, "BattCellBrickVoltageMaxNum332": 41,
        "BattCellBrickVoltageMinNum332": 7}, t_end + 0.2))
    p = pipeline_for(tmp_path, f"{{id: tesla, profile: tesla-model3, dbc: {dbc}}}")
    st = run(p, frames)
    hv = last_decoded(db, frames, 0x132)
    # this bus's 0x2D2 (sent by a converted car's controller) says 149 V max, its 0x132
    # 292 V: the pack voltage contradicts the BMS's own limit, so it is not published
    assert st.get("voltage_v") is None
    assert (f"pack voltage {hv['BattVoltage132']:.4g} V is far above the charge voltage "
            "limit 149 V") in p.packs[0].impl_reason
    assert st.get("current_a") == pytest.approx(-hv["SmoothBattCurrent132"])
    lim = last_decoded(db, frames, 0x2D2)
    assert st.get("charge_voltage_limit_v") == pytest.approx(lim["MaxVoltage2D2"])
    assert st.get("discharge_current_limit_a") == pytest.approx(lim["MaxDischargeCurrent2D2"])
    th = last_decoded(db, frames, 0x312)
    assert st.get("temp_min_c") == pytest.approx(th["BMSminPackTemperature"])
    assert st.get("temp_max_c") == pytest.approx(th["BMSmaxPackTemperature"])
    # cells by position, checked against cantools' decode of each frame
    want: list[float | None] = [None] * 96
    for _, key, data, _ in frames:
        if key == 0x401:
            d = db.decode_message(0x401, data)
            sigs = sorted((s for s in db.get_message_by_name("ID401CellVoltages").signals
                           if s.multiplexer_ids == [d["MultiplexSelector"]]),
                          key=lambda s: s.start)
            for k, s in enumerate(sigs):
                want[3 * d["MultiplexSelector"] + k] = d[s.name]
    assert st.cell_v == pytest.approx(want) and len(st.cell_v) == 96
    assert st.get("soc_pct") == pytest.approx(71.3)
    mm = db.decode_message(0x332, frames[-1][2])
    assert st.get("cell_v_max") == pytest.approx(mm["BattCellBrickVoltageMax332"])
    assert st.get("cell_v_min_id") == mm["BattCellBrickVoltageMinNum332"] == 7


def test_two_packs_on_one_bus_with_unknown_ids_counted(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    orion = shared("orion-we-ev/Orion_CANBUS.dbc")
    tesla = shared("tesla-model3/Model3CAN.dbc")
    log = shared("orion-we-ev/candump-2025-11-22_161709.log")
    cfg = load_config(config(tmp_path, (
        f"  - {{id: orion, profile: orion-inverter, dbc: {orion}}}\n"
        f"  - {{id: tesla, profile: tesla-model3, dbc: {tesla}}}")), mqtt_url="-")
    out = io.StringIO()
    with caplog.at_level(logging.DEBUG):
        rt = asyncio.run(replay(cfg, log, speed=None, stdout=out))
    # expected counts from python-can's reader and cantools, independently
    ids_used = {0x351, 0x355, 0x356, 0x35A, 0x35B, 0x36} | TESLA_IDS
    total = unknown = 0
    unknown_ids: dict[int, int] = {}
    for m in can.LogReader(str(log)):
        if m.is_error_frame or m.is_remote_frame:
            continue
        total += 1
        if m.is_extended_id or m.arbitration_id not in ids_used:
            unknown += 1
            k = m.arbitration_id | (EXT if m.is_extended_id else 0)
            unknown_ids[k] = unknown_ids.get(k, 0) + 1
    c = rt.pipeline.counters[0]
    assert c.received == total and c.unknown == unknown and c.unknown_ids == unknown_ids
    assert c.decoded == total - unknown
    # no per-frame logging of unknown ids
    assert len(caplog.records) < 50
    pubs: dict[str, list[dict[str, Any]]] = {}
    for line in out.getvalue().splitlines():
        topic, _, payload = line.partition(" ")
        if topic.endswith("/state"):
            pubs.setdefault(topic, []).append(json.loads(payload))
    assert set(pubs) >= {"bms/orion/state", "bms/tesla/state"}
    o, t = pubs["bms/orion/state"][-1], pubs["bms/tesla/state"][-1]
    assert o["pack_id"] == "orion" and t["pack_id"] == "tesla"
    db_o, db_t = load_db(orion), load_db(tesla)
    frames = [(m.timestamp, m.arbitration_id, bytes(m.data), "x") for m in can.LogReader(str(log))
              if m.arbitration_id in (0x356, 0x132, 0x2D2) and not m.is_extended_id]
    assert o["voltage_v"] == pytest.approx(last_decoded(db_o, frames, 0x356)["Pack_Inst_Voltage"])
    assert t["charge_voltage_limit_v"] == pytest.approx(
        last_decoded(db_t, frames, 0x2D2)["MaxVoltage2D2"])
    # 0x132's 292 V contradicts that 149 V limit: not published (plausibility.py)
    assert t["voltage_v"] is None


# ------------------------------------------------------------------ Nissan Leaf


@pytest.mark.parametrize("dbc_name", ["EV-can_AZE0.dbc", "EV-can_ZE1.dbc"])
def test_nissan_leaf_encoded_broadcasts(tmp_path: Path, dbc_name: str) -> None:
    dbc = shared(f"nissan-leaf/{dbc_name}")
    db = load_db(dbc)
    frames = [
        encode_all(db, "x1DB", {"LB_Current": -37.5, "LB_Total_Voltage": 371.5,
                                "LB_Failsafe_Status": 4, "LB_INTER_LOCK": 1,
                                "LB_Usable_SOC": 66}, 1.0),
        encode_all(db, "x1DC", {"LB_Discharge_Power_Limit": 80.25,
                                "LB_Charge_Power_Limit": 30.5,
                                "LB_MAX_POWER_FOR_CHARGER": 6.6}, 1.01),
        encode_all(db, "x55B", {"LB_SOC": 687}, 1.02),
        encode_all(db, "x5BC", {"LB_Remain_Capacity_GIDS": 210,
                                # ZE1's Mux_5BC overlaps bits 32-35: 84 keeps it at 8
                                "LB_Capacity_Deterioration_Rate": 84,
                                "LB_Output_Power_Limit_Reason": 3}, 1.03),
    ]
    p = pipeline_for(tmp_path, f"{{id: leaf, profile: nissan-leaf, dbc: {dbc}}}")
    st = run(p, frames)
    d1 = db.decode_message(0x1DB, frames[0][2], decode_choices=False)
    assert st.get("current_a") == pytest.approx(d1["LB_Current"]) == -37.5
    assert st.get("voltage_v") == pytest.approx(d1["LB_Total_Voltage"])
    soc = db.decode_message(0x55B, frames[2][2], decode_choices=False)["LB_SOC"]
    assert st.get("soc_pct") == pytest.approx(soc / 10)
    try:
        d5 = db.decode_message(0x5BC, frames[3][2], decode_choices=False)
    except cantools.database.DecodeError:
        # EV-can_ZE1.dbc: cantools cannot decode its 0x5BC at all (Mux_5BC overlaps the
        # SOH bits); the AZE0 file has the same layout for these signals
        ref = load_db(shared("nissan-leaf/EV-can_AZE0.dbc"))
        d5 = ref.decode_message(0x5BC, frames[3][2], decode_choices=False)
    assert st.get("soh_pct") == d5["LB_Capacity_Deterioration_Rate"]
    assert st.extras["remaining_gids"] == d5["LB_Remain_Capacity_GIDS"]
    dc = db.decode_message(0x1DC, frames[1][2], decode_choices=False)
    assert st.extras["discharge_power_limit_kw"] == pytest.approx(dc["LB_Discharge_Power_Limit"])
    assert st.cell_v == [None] * 96  # cells come by ISO-TP only (tests/test_polling.py)
    codes = active_codes(p)
    assert {"bms_caution_lamp", "bms_power_limited_high_temperature"} <= codes
    assert "bms_interlock_open" not in codes and "bms_stop_request" not in codes


# ------------------------------------------------------------------ Daly and CAN-BMS


def test_daly_replies_two_boards(tmp_path: Path) -> None:
    db = load_db(REPO / "dbc" / "daly.dbc")
    frames = []
    for addr, base in ((1, 3300), (2, 3400)):
        off = addr - 1
        for f in range(3):
            frames.append(encode_all(db, "Reply_0x95_CellVoltages", {
                "FrameNumber": f + 1, "CellVoltage1": base + 3 * f + 1,
                "CellVoltage2": base + 3 * f + 2, "CellVoltage3": base + 3 * f + 3},
                addr + f * 0.01, off))
        frames.append(encode_all(db, "Reply_0x90_PackStatus", {
            "TotalVoltage": 26.4 + addr, "Current": 5.5 * addr, "StateOfCharge": 50.0 + addr},
            addr + 0.1, off))
        frames.append(encode_all(db, "Reply_0x98_FailureStatus", {
            "CellVoltHighL2": int(addr == 2)}, addr + 0.2, off))
        frames.append(encode_all(db, "Reply_0x93_MosStatus", {
            "ChargeDischargeState": addr, "ChargeMos": 1, "DischargeMos": 1,
            "RemainingCapacity": 12345}, addr + 0.3, off))
    p = Pipeline(load_config(config(tmp_path, "\n".join(
        f"  - {{id: d{a}, profile: daly, id_offset: {a - 1}}}" for a in (1, 2))), mqtt_url="-"))
    p.feed(sorted(frames), 0)
    p.finish()
    for i, (addr, base) in enumerate(((1, 3300), (2, 3400))):
        st = p.packs[i].live.state
        assert st.cell_v == pytest.approx([(base + k) / 1000 for k in range(1, 10)])
        ps = db.decode_message(0x18904001, next(f[2] for f in frames
                                                if f[1] == (0x18904001 + addr - 1) | EXT))
        assert st.get("current_a") == pytest.approx(ps["Current"])
        assert st.get("soc_pct") == pytest.approx(ps["StateOfCharge"])
        assert st.get("remaining_ah") == pytest.approx(12.345)
        assert st.get("bms_state") == ("charging" if addr == 1 else "discharging")
    assert "bms_cell_over_voltage" not in active_codes(p, 0)
    assert "bms_cell_over_voltage" in active_codes(p, 1)


def test_can_bms_encoded(tmp_path: Path) -> None:
    db = load_db(REPO / "dbc" / "can-bms.dbc")
    names = {m.name for m in db.messages}
    frames = [
        encode_all(db, "ChargeDischargeLimits", {"ChargeVoltageLimit": 56.8,
                                                 "ChargeCurrentLimit": 100.0,
                                                 "DischargeCurrentLimit": 150.0,
                                                 "DischargeVoltageLimit": 46.0}, 1.0),
        encode_all(db, "SocSoh", {"StateOfCharge": 81, "StateOfHealth": 99}, 1.01),
        encode_all(db, "VoltageCurrentTemperature", {"BatteryVoltage": 53.12,
                                                     "BatteryCurrent": -20.5,
                                                     "BatteryTemperature": 24.1}, 1.02),
    ]
    if "ModuleCounts" in names:
        frames.append(encode_all(db, "ModuleCounts", {"ModulesOk": 4}, 1.03))
    st = run(pipeline_for(tmp_path, "{id: house, profile: can-bms}"), frames)
    vct = db.decode_message(frames[2][1], frames[2][2])
    assert st.get("voltage_v") == pytest.approx(vct["BatteryVoltage"])
    assert st.get("current_a") == pytest.approx(vct["BatteryCurrent"])
    lim = db.decode_message(frames[0][1], frames[0][2])
    assert st.get("charge_voltage_limit_v") == pytest.approx(lim["ChargeVoltageLimit"])
    assert st.get("soc_pct") == 81
    if "ModuleCounts" in names:
        assert st.extras["modules_ok"] == 4
    # without 0x373 both limits are the one battery temperature 0x356 carries
    assert st.get("temp_min_c") == st.get("temp_max_c") == pytest.approx(24.1)


def test_can_bms_temperatures_come_from_one_message(tmp_path: Path) -> None:
    """0x373 (Victron) gives the cell extremes: while it is fresh both limits are its,
    not a maximum from 0x356's battery temperature beside a minimum from 0x373 (which
    crossed: min 25.85 above max 24.1); when it stops, both fall back to 0x356."""
    db = load_db(REPO / "dbc" / "can-bms.dbc")
    vct = {"BatteryVoltage": 53.1, "BatteryCurrent": 0.0, "BatteryTemperature": 24.1}
    ext = {"MinCellVoltage": 3300, "MaxCellVoltage": 3310, "MinCellTemperature": 299,
           "MaxCellTemperature": 303}
    frames = [encode_all(db, "VoltageCurrentTemperature", vct, 1.0),
              encode_all(db, "CellExtremes", ext, 1.1),
              encode_all(db, "VoltageCurrentTemperature", vct, 2.0)]
    p = pipeline_for(tmp_path, "{id: house, profile: can-bms}")
    st = run(p, frames)
    assert st.get("temp_min_c") == pytest.approx(25.85)
    assert st.get("temp_max_c") == pytest.approx(29.85)
    # 0x373 silent for longer than the pack's stale_after_s (10 s): 0x356 again
    st = run(p, [encode_all(db, "VoltageCurrentTemperature", vct, 20.0)])
    assert st.get("temp_min_c") == st.get("temp_max_c") == pytest.approx(24.1)
