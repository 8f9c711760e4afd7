"""Profile format 2 features against real traffic and frames encoded by cantools; the
expected values come from cantools' decode of the same frames, never from gateway code.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import can
import cantools
import pytest
from conftest import Broker, shared
from test_profiles import load_db
from test_profiles import pipeline_for as pipeline

from gateway.config import ConfigError, load_config
from gateway.runtime.replay import replay
from gateway.source.logs import Frame


def profile(tmp: Path, dbc: Path, body: str, name: str = "p2") -> str:
    (tmp / f"{name}.yaml").write_text(f"name: {name}\ndbc: [{dbc}]\nstale_after_s: 5\n{body}")
    return f"{{id: p, profile: {tmp / f'{name}.yaml'}}}"


def encoded(db: Any, name: str, values: dict[str, Any], ts: float) -> Frame:
    m = db.get_message_by_name(name)
    full = {s.name: 0 for s in m.signals}
    full.update(values)
    if m.is_multiplexed():
        full = {k: v for k, v in full.items()
                if (s := m.get_signal_by_name(k)).multiplexer_ids is None
                or full[s.multiplexer_signal or ""] in s.multiplexer_ids}
    return (ts, m.frame_id, bytes(m.encode(full, strict=False)), "x")


def config_problems(tmp: Path, pack: str) -> str:
    with pytest.raises(ConfigError) as err:
        pipeline(tmp, pack)
    return str(err.value)


DBC_HEADER = 'VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_: BMS\n\n'


def assert_rejected(tmp: Path, dbc: str | Path, body: str, key: str, words: str) -> None:
    """check-config refuses the profile `body` on `dbc` (a DBC's text or a file), naming
    `key`, saying `words`, and giving a fix (a bound's "at least" names its own)."""
    if isinstance(dbc, str):
        (tmp / "t.dbc").write_text(dbc)
        dbc = tmp / "t.dbc"
    text = config_problems(tmp, profile(tmp, dbc, body + "\n"))
    assert f": {key}: " in text and words in text, text
    line = text.split(f": {key}: ")[1].splitlines()[0]
    assert "Fix:" in line or "at least" in words, line


# ------------------------------------------------------------------ sources: [...]


def test_foxbms2_voltage_from_string_values_on_real_log(tmp_path: Path) -> None:
    """The real foxBMS log has no f_PackValuesP0; its f_StringValuesP0 says 63.93 V."""
    trc = shared("foxbms2/can-log.trc")
    db = load_db(shared("foxbms2/foxbms.dbc"))
    frames = [(m.timestamp, m.arbitration_id, bytes(m.data), "x") for m in can.LogReader(str(trc))]
    sv = [db.decode_message(fid, data, decode_choices=False) for _, fid, data, _ in frames
          if fid == db.get_message_by_name("f_StringValuesP0").frame_id]
    assert sv and sv[-1]["Voltage"] == 63.93
    p = pipeline(tmp_path, "{id: fox, profile: foxbms2}")  # the shipped profile and DBC
    p.feed(frames, 0)
    assert p.packs[0].live.state.get("voltage_v") == pytest.approx(sv[-1]["Voltage"])


def test_foxbms2_voltage_reaches_mosquitto(tmp_path: Path, broker: Broker,
                                          subscriber_factory: Any) -> None:
    """The real foxBMS log replayed to a real mosquitto: the retained state says what
    cantools reads in f_StringValuesP0 (63.93 V)."""
    trc = shared("foxbms2/can-log.trc")
    db = load_db(shared("foxbms2/foxbms.dbc"))
    want = [db.decode_message(m.arbitration_id, bytes(m.data))["Voltage"]
            for m in can.LogReader(str(trc)) if m.arbitration_id == 0x243]
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(f"gateway_id: t\nstate_dir: {tmp_path}/state\nlog_level: warning\n"
                   "can: {interface: virtual, channel: x}\n"
                   "packs:\n  - {id: fox, profile: foxbms2}\n"
                   f"mqtt: {{url: '{broker.url}', topic_prefix: bms}}\n")
    asyncio.run(replay(load_config(cfg), trc, speed=None))
    late = subscriber_factory(broker.port, ["bms/fox/state"], client_id="fox-late")
    assert late.wait_for(lambda ms: any(r for _, _, r in ms))
    state = json.loads(late.topic("bms/fox/state")[-1])
    assert want and state["voltage_v"] == pytest.approx(want[-1]) == 63.93


def test_sources_first_fresh_wins(tmp_path: Path) -> None:
    db = load_db(shared("foxbms2/foxbms.dbc"))
    p = pipeline(tmp_path, "{id: fox, profile: foxbms2, stale_after_s: 2}")
    st = p.packs[0].live.state

    def pack(v: float, ts: float) -> Frame:
        return encoded(db, "f_PackValuesP0", {"BatteryVoltage": v}, ts)

    def string(v: float, ts: float, mux: int = 0) -> Frame:
        f = encoded(db, "f_StringValuesP0", {"f_StringValuesP0_Mux": 0, "Voltage": v}, ts)
        data = bytearray(f[2])  # the DBC lists string 0 only; the mux is byte 0's top 3 bits
        data[0] = (data[0] & 0x1F) | (mux << 5)
        return (ts, f[1], bytes(data), "x")

    steps: list[tuple[Frame, float]] = [
        (string(60.0, 1.0), 60.0),     # only the string values so far
        (pack(400.0, 1.5), 400.0),     # the pack values take over at once
        (string(61.0, 2.0), 400.0),    # pack values fresh: the string's is ignored
        (string(62.0, 3.4), 400.0),    # 1.9 s after the pack frame: still fresh
        (string(63.0, 3.6), 63.0),     # 2.1 s: stale, the string values are used
        (string(99.0, 3.7, mux=1), 63.0),  # string 1 is not a source
        (pack(401.0, 4.0), 401.0),
    ]
    for frame, expected in steps:
        p.feed([frame], 0)
        assert st.get("voltage_v") == pytest.approx(expected), frame
    # the values written are the DBC's, as cantools reads them
    assert db.decode_message(steps[4][0][1], steps[4][0][2])["Voltage"] == 63.0
    assert db.decode_message(steps[1][0][1], steps[1][0][2])["BatteryVoltage"] == 400.0


@pytest.mark.parametrize(("body", "key", "words"), [
    ("sources: [{message: f_PackValuesP0, signal: BatteryVoltage}]",
     "fields.voltage_v.sources", "two or more"),
    ("sources: [{message: f_PackValuesP0, signal: BatteryVoltage}, 5]",
     "fields.voltage_v.sources[1]", "needs a `message`"),
    ("{sources: [{message: f_PackValuesP0, signal: BatteryVoltage},"
     " {message: f_StringValuesP0, signal: Voltage}], signal: X}",
     "fields.voltage_v", "`sources` replaces signal"),
    ("{message: f_PackValuesP0, signal: BatteryVoltage, fresh_s: 2}",
     "fields.voltage_v.fresh_s", "only applies to `sources`"),
    ("sources: [{message: f_PackValuesP0, signal: BatteryVoltage},"
     " {sources: [{message: f_StringValuesP0, signal: Voltage}]}]",
     "fields.voltage_v.sources[1]", "do not nest"),
    ("sources: [{message: f_PackValuesP0, signal: BatteryVoltage},"
     " {message: f_StringValuesP0, signal: Voltag}]",
     "fields.voltage_v.sources[1].signal", "did you mean 'Voltage'"),
])
def test_sources_mistakes_are_config_errors(tmp_path: Path, body: str, key: str,
                                            words: str) -> None:
    if not body.startswith("{"):
        body = "{" + body + "}"
    assert_rejected(tmp_path, shared("foxbms2/foxbms.dbc"), f"fields:\n  voltage_v: {body}",
                    key, words)


# ------------------------------------------------------------------ cell layouts


def modules_dbc() -> str:
    """Three module messages, each multiplexed 0-3 with four 12-bit mV cells per group
    (the Formula Student layout), and one module-indexed temperature message."""
    lines = [DBC_HEADER]
    for m in range(3):
        lines.append(f"BO_ {0x600 + m} Module{m + 1}: 8 BMS")
        lines.append(' SG_ Group M : 0|8@1+ (1,0) [0|0] "" Vector__XXX')
        for g in range(4):
            for c in range(4):
                lines.append(f' SG_ V{g}_{c} m{g} : {8 + 12 * c}|12@1+ (1,0) [0|0] "mV" '
                             "Vector__XXX")
        lines.append("")
    lines.append("BO_ 1616 ModuleTemps: 8 BMS")
    lines.append(' SG_ ModuleId : 0|8@1+ (1,0) [0|0] "" Vector__XXX')
    for c in range(3):
        lines.append(f' SG_ T{c + 1} : {8 + 8 * c}|8@1- (1,0) [0|0] "degC" Vector__XXX')
    lines.append(' SG_ Flat1 : 32|8@1+ (1,0) [0|0] "" Vector__XXX')
    return "\n".join(lines) + "\n"


MODULES_PROFILE = """\
cell_count: 48
cells:
  voltages:
    - {message: Module1, mux: true, signals: "V*", unit: mV}
    - {message: Module2, mux: true, first: 16, signals: "V*", unit: mV}
    - {message: Module3, mux: true, offset: 32, stride: 4, signals: "V*", unit: mV}
  temps:
    - {message: ModuleTemps, index: ModuleId, signals: "T*", order: name, first: 2}
"""


def test_mux_with_first_and_offset_compose(tmp_path: Path) -> None:
    """`mux: true` + `first: 16` was silently ignored (0 of 48 cells right)."""
    (tmp_path / "modules.dbc").write_text(modules_dbc())
    db = cantools.database.load_file(str(tmp_path / "modules.dbc"), strict=False)
    p = pipeline(tmp_path, profile(tmp_path, tmp_path / "modules.dbc", MODULES_PROFILE))
    frames: list[Frame] = []
    expected: dict[int, float] = {}
    ts = 1.0
    for m in range(3):
        msg = db.get_message_by_name(f"Module{m + 1}")
        for g in range(4):
            vals = {f"V{g}_{c}": 3000 + 100 * m + 10 * g + c for c in range(4)}
            data = msg.encode({"Group": g, **vals}, strict=False)
            frames.append((ts, msg.frame_id, bytes(data), "x"))
            ts += 0.01
            for c, (name, v) in enumerate(db.decode_message(msg.frame_id, data).items()):
                if name != "Group":
                    expected[16 * m + 4 * g + c - 1] = float(v) / 1000
    temps = db.get_message_by_name("ModuleTemps")
    texp: dict[int, float] = {}
    for mid in range(3):
        data = temps.encode({"ModuleId": mid, "T1": 20 + mid, "T2": 30 + mid, "T3": -5 - mid,
                             "Flat1": 0})
        frames.append((ts, temps.frame_id, bytes(data), "x"))
        ref = db.decode_message(temps.frame_id, data)
        for n in (1, 2, 3):  # cell = id x 3 (cells a group carries) + first + name - 1
            texp[mid * 3 + 2 + n - 1] = ref[f"T{n}"]
    p.feed(frames, 0)
    st = p.packs[0].live.state
    assert len(expected) == 48
    right = sum(st.cell_v[i] == pytest.approx(v) for i, v in expected.items())
    assert right == 48
    assert {i: st.cell_t[i] for i in texp} == texp
    assert st.cell_t[:2] == [None, None]


@pytest.mark.parametrize(("source", "key", "words"), [
    ("{message: Module1, mux: true, index: Group, signals: 'V*'}", "index", "both choose"),
    ("{message: ModuleTemps, stride: 3, signals: 'T*'}", "stride", "needs `mux: true`"),
    ("{message: Module1, mux: true, order: name, stride: 4, signals: 'V*'}", "stride",
     "not used"),
    ("{message: Module1, mux: true, first: 16, offset: 2, signals: 'V*'}", "first",
     "both shift"),
    ("{message: Module1, mux: true, name_base: 0, signals: 'V*'}", "name_base",
     "only applies to `order: name`"),
    ("{message: Module1, mux: true, invalid_value: 0, signals: 'V*'}", "invalid_value",
     "without `invalid`"),
    ("{message: Module1, mux: true, bitfield: true, signals: 'V*'}", "bitfield",
     "for balancing"),
    ("{message: Module1, mux: true, stride: 0, signals: 'V*'}", "stride", "at least 1"),
    ("{message: Module1, mux: true, stride: 2, signals: 'V*'}", "stride",
     "overwrite each other"),
    ("{message: ModuleTemps, mux: true, signals: 'T*'}", "mux", "not multiplexed"),
    ("{message: ModuleTemps, order: name, signals: [T1, ModuleId]}", "order",
     "no number in its name"),
    ("{message: Module1, index: Group, signals: 'V*'}", "signals",
     "different multiplexer branches"),
    ("{message: Module1, signals: 'V*'}", "signals", "different multiplexer branches"),
    ("{message: Module1, mux: true, signals: 'V*', invalid: [V0_0]}", "invalid",
     "invalid flags for"),
    # cells the layout can never publish (reviewer: 4 of 16, 12 dropped, groups vanished)
    ("{message: Module1, mux: true, stride: 100000, signals: 'V*'}", "stride",
     "reaches cell 300004, past the 1024 cells"),
    ("{message: Module1, mux: true, first: 1020, signals: 'V*'}", "first",
     "(mux 0..3 from the DBC) reaches cell 1036, past the 1024 cells"),
    ("{message: Module1, mux: true, offset: -8, signals: 'V*'}", "offset",
     "reaches cell -7, below cell 1"),
    ("{message: ModuleTemps, first: 1022, signals: 'T*'}", "first", "past the 1024 cells"),
])
def test_invalid_cell_layouts_are_config_errors(tmp_path: Path, source: str, key: str,
                                                words: str) -> None:
    assert_rejected(tmp_path, modules_dbc(), f"cells:\n  voltages:\n    - {source}",
                    f"cells.voltages[0].{key}", words)


def test_the_largest_layout_that_fits_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "modules.dbc").write_text(modules_dbc())
    body = "cells:\n  voltages:\n    - {message: Module1, mux: true, first: 1008, signals: 'V*'}\n"
    p = pipeline(tmp_path, profile(tmp_path, tmp_path / "modules.dbc", body))
    assert p.packs  # cells 1009..1024: the last one a pack can have


def test_an_index_signal_out_of_range_is_counted(tmp_path: Path) -> None:
    """An `index:` signal's range is only known at run time: a cell it puts past 1024
    is counted (implausible), even with a known cell count, never silently dropped."""
    (tmp_path / "modules.dbc").write_text(modules_dbc())
    db = cantools.database.load_file(str(tmp_path / "modules.dbc"), strict=False)
    body = ("cell_count: 48\ncells:\n  voltages:\n"
            "    - {message: ModuleTemps, index: ModuleId, signals: 'T*', stride: 3, "
            "first: 900}\n")
    p = pipeline(tmp_path, profile(tmp_path, tmp_path / "modules.dbc", body))
    msg = db.get_message_by_name("ModuleTemps")
    frames = [(1.0 + i, msg.frame_id, bytes(msg.encode(
        {"ModuleId": mid, "T1": 1, "T2": 2, "T3": 3, "Flat1": 0})), "x")
        for i, mid in enumerate((0, 50))]  # cells 901-903 (past 48: unused), 1051-1053
    p.feed(frames, 0)
    assert p.packs[0].live.implausible_counts() == {"cell_voltage": 3}


# ------------------------------------------------------------------ validity gates, sentinels

GATED_DBC = DBC_HEADER + """\
BO_ 1792 Status: 8 BMS
 SG_ State : 0|4@1+ (1,0) [0|15] "" Vector__XXX
 SG_ PackV : 8|16@1+ (0.1,0) [0|6553.5] "V" Vector__XXX
 SG_ Page M : 24|4@1+ (1,0) [0|15] "" Vector__XXX
 SG_ Paged m1 : 32|8@1+ (1,0) [0|255] "" Vector__XXX

BO_ 1793 Cells: 8 BMS
 SG_ C1 : 0|16@1+ (1,0) [0|65535] "mV" Vector__XXX
 SG_ C2 : 16|16@1+ (1,0) [0|65535] "mV" Vector__XXX
 SG_ C3 : 32|16@1+ (1,0) [0|65535] "mV" Vector__XXX
 SG_ C4 : 48|16@1+ (1,0) [0|65535] "mV" Vector__XXX

BO_ 1794 Temps: 8 BMS
 SG_ T1 : 0|8@1+ (1,-40) [-40|215] "degC" Vector__XXX

VAL_ 1792 State 0 "INIT" 1 "RUN" 2 "FAULT" ;
"""

GATED_PROFILE = """\
fields:
  voltage_v: {message: Status, signal: PackV, sentinel: [0xFFFF]}
  bms_state: {message: Status, signal: State, map: {INIT: init, RUN: idle, FAULT: error}}
  temp_max_c: {message: Temps, signal: T1}
cells:
  voltages:
    - {message: Cells, signals: "C*", unit: mV, sentinel: [0xFFFF]}
gates:
  - {message: Status, signal: State, values: [INIT]}   # placeholders while starting up
"""


def test_startup_gate_and_sentinels(tmp_path: Path) -> None:
    """While the BMS says INIT it sends 156 degC and 3.5 V placeholders (seen on a real
    Formula Student BMS): they are ignored and counted; 0xFFFF means "not available"."""
    (tmp_path / "g.dbc").write_text(GATED_DBC)
    db = cantools.database.load_file(str(tmp_path / "g.dbc"), strict=False)
    p = pipeline(tmp_path, profile(tmp_path, tmp_path / "g.dbc", GATED_PROFILE))
    st = p.packs[0].live.state
    counters = p.packs[0].live.counters

    def status(state: int, raw_v: int, ts: float) -> Frame:
        m = db.get_message_by_name("Status")
        data = m.encode({"State": state, "PackV": raw_v, "Page": 1, "Paged": 0}, scaling=False)
        return (ts, m.frame_id, bytes(data), "x")

    startup = [status(0, 0xFFFF, 1.0),
               encoded(db, "Cells", {"C1": 3500, "C2": 3500, "C3": 3500, "C4": 3500}, 1.1),
               encoded(db, "Temps", {"T1": 156}, 1.2)]
    p.feed(startup, 0)
    assert db.decode_message(0x701, startup[1][2])["C1"] == 3500  # the placeholders
    assert db.decode_message(0x702, startup[2][2])["T1"] == 156
    assert st.get("bms_state") == "init"  # the gate's own message is not gated
    assert st.get("voltage_v") is None  # 0xFFFF: not available
    assert st.get("temp_max_c") is None and all(v is None for v in st.cell_v)
    assert counters.gated == 2
    running = [status(1, 512, 2.0),
               encoded(db, "Cells", {"C1": 3301, "C2": 3302, "C3": 0xFFFF, "C4": 3304}, 2.1),
               encoded(db, "Temps", {"T1": 25}, 2.2)]
    p.feed(running, 0)
    ref = db.decode_message(0x700, running[0][2])
    assert st.get("voltage_v") == pytest.approx(ref["PackV"]) and st.get("bms_state") == "idle"
    assert st.cell_v == pytest.approx([3.301, 3.302, None, 3.304])  # type: ignore[arg-type]
    assert st.get("temp_max_c") == db.decode_message(0x702, running[2][2])["T1"] == 25
    assert counters.gated == 2
    assert p.packs[0].live.implausible_counts() == {}  # sentinels are not errors
    p.feed([status(0, 100, 3.0)], 0)  # back to INIT: value frames are ignored again
    p.feed([encoded(db, "Temps", {"T1": 156}, 3.1)], 0)
    assert st.get("temp_max_c") == 25 and counters.gated == 3


@pytest.mark.parametrize(("body", "key", "words"), [
    ("gates: [{message: Status, signal: State, values: [STARTING]}]", "gates[0].values",
     "no choice 'STARTING'"),
    ("gates: [{message: Status, signal: Paged, values: [1]}]", "gates[0].signal",
     "multiplexed"),
    ("gates: [{message: Status, signal: State}]", "gates[0]", "needs `message`, `signal`"),
    ("gates: [{message: Status, signal: State, values: [0], ignore: [Celz]}]",
     "gates[0].ignore.message", "did you mean 'Cells'"),
    ("fields:\n  voltage_v: {message: Status, expr: PackV * 2, sentinel: [0xFFFF]}",
     "fields.voltage_v.sentinel", "raw values of one `signal`"),
    ("fields:\n  bms_state: {message: Status, signal: State, sentinel: [15]}",
     "fields.bms_state.sentinel", "sentinels apply to numbers"),
    ("fields:\n  voltage_v: {message: Status, signal: PackV, sentinel: [high]}",
     "fields.voltage_v.sentinel", "whole numbers"),
])
def test_gate_and_sentinel_mistakes_are_config_errors(tmp_path: Path, body: str, key: str,
                                                      words: str) -> None:
    assert_rejected(tmp_path, GATED_DBC, body, key, words)


# ------------------------------------------------------------------ trouble codes, fault cells

DTC_DBC = DBC_HEADER + """\
BO_ 1800 Dtc: 8 BMS
 SG_ DtcCode : 0|16@1+ (1,0) [0|65535] "" Vector__XXX

BO_ 1801 Faults: 8 BMS
 SG_ CellOv : 0|1@1+ (1,0) [0|1] "" Vector__XXX
 SG_ CellOvIndex : 8|8@1+ (1,0) [0|255] "" Vector__XXX
 SG_ PackV : 16|16@1+ (0.1,0) [0|6553.5] "V" Vector__XXX

VAL_ 1800 DtcCode 0 "None" 41 "Cell overvoltage" 24 "Temperature sensor open" 7 "Contactor weld" ;
"""

DTC_PROFILE = """\
fields:
  voltage_v: {message: Faults, signal: PackV}
faults:
  - {code: bms_cell_over_voltage, message: Faults, signal: CellOv, cell_signal: CellOvIndex,
     cell_base: 0, severity: alarm}
dtcs:
  - {message: Dtc, signal: DtcCode, clear_after_s: 2, severity: alarm}
"""


def test_trouble_code_stream_and_fault_cell(tmp_path: Path) -> None:
    """Three DTC frames with codes 41, 24, 7 used to become one `bms_dtc` raise that never
    cleared: each code is now its own fault with the DBC's text, cleared when the BMS
    stops reporting it. The over-voltage fault names its cell from CellOvIndex."""
    (tmp_path / "d.dbc").write_text(DTC_DBC)
    db = cantools.database.load_file(str(tmp_path / "d.dbc"), strict=False)
    p = pipeline(tmp_path, profile(tmp_path, tmp_path / "d.dbc", DTC_PROFILE))
    texts = {int(k): str(v) for k, v in db.get_message_by_name("Dtc").signals[0].choices.items()}
    frames: list[Frame] = []
    t = 1.0
    for _ in range(5):  # 41, 24, 7 cycling for 1.5 s
        for code in (41, 24, 7):
            frames.append(encoded(db, "Dtc", {"DtcCode": code}, t))
            frames.append(encoded(db, "Faults", {"PackV": 51.2}, t + 0.01))
            t += 0.1
    for _ in range(30):  # 24 is fixed: only 41 and 7 for 3 s
        for code in (41, 7):
            frames.append(encoded(db, "Dtc", {"DtcCode": code}, t))
            t += 0.05
    frames.append(encoded(db, "Faults", {"CellOv": 1, "CellOvIndex": 11, "PackV": 51.2}, t))
    for _ in range(40):  # nothing to report: code 0
        frames.append(encoded(db, "Dtc", {"DtcCode": 0}, t))
        frames.append(encoded(db, "Faults", {"CellOv": 1, "CellOvIndex": 11, "PackV": 51.2}, t))
        t += 0.1
    frames.append(encoded(db, "Faults", {"CellOv": 0, "CellOvIndex": 0, "PackV": 51.2}, t))
    p.feed(frames, 0)
    p.finish(t + 0.1)
    _, events = p.take_split()
    got = [(e.code, e.state, e.value, e.cell, e.message) for e, _ in events
           if e.code.startswith(("bms_dtc", "bms_cell"))]
    assert [g[:3] for g in got if g[1] == "raised" and g[0].startswith("bms_dtc")] == [
        ("bms_dtc_41", "raised", 41), ("bms_dtc_24", "raised", 24), ("bms_dtc_7", "raised", 7)]
    for code, _state, number, _, message in got:
        if code.startswith("bms_dtc"):
            assert texts[number] in message and f"DTC {number}" in message
    cleared = [g[0] for g in got if g[1] == "cleared" and g[0].startswith("bms_dtc")]
    assert cleared[0] == "bms_dtc_24"  # first: the BMS stopped reporting it first
    assert sorted(cleared) == ["bms_dtc_24", "bms_dtc_41", "bms_dtc_7"]
    cell_events = [g for g in got if g[0] == "bms_cell_over_voltage"]
    assert [(s, c) for _, s, _, c, _ in cell_events] == [("raised", 12), ("cleared", 12)]
    assert "(cell 12)" in cell_events[0][4]  # CellOvIndex 11, counted from 0


@pytest.mark.parametrize(("body", "key", "words"), [
    ("dtcs: [{message: Dtc}]", "dtcs[0]", "needs `message` and `signal`"),
    ("dtcs: [{message: Dtc, signal: DtcKode}]", "dtcs[0].signal", "did you mean 'DtcCode'"),
    ("dtcs: [{message: Dtc, signal: DtcCode, severity: loud}]", "dtcs[0].severity",
     "unknown severity"),
    ("dtcs: [{message: Dtc, signal: DtcCode}, {message: Dtc, signal: DtcCode}]",
     "dtcs[1].signal", "already a trouble-code stream (dtcs[0])"),
    ("dtcs: [{message: Dtc, signal: DtcCode}, {message: Faults, signal: CellOvIndex}]",
     "dtcs[1].code", "'bms_dtc' is already the code of dtcs[0]"),
    ("faults: [{code: x, message: Faults, signal: CellOv, cell_signal: CellIdx}]",
     "faults[0].cell_signal", "did you mean 'CellOvIndex'"),
])
def test_dtc_and_fault_cell_mistakes_are_config_errors(tmp_path: Path, body: str, key: str,
                                                      words: str) -> None:
    assert_rejected(tmp_path, DTC_DBC, body, key, words)


# ------------------------------------------------------------------ checksums, rolling counters


def orion_frames() -> list[Frame]:
    out: list[Frame] = []
    for m in can.ASCReader(str(shared("orion-we-ev/candump1_can0.asc"))):
        if m.arbitration_id == 0x36 and not m.is_error_frame and not m.is_remote_frame:
            out.append((m.timestamp, 0x36, bytes(m.data), "x"))
    return out


def test_orion_cell_broadcast_checksum_on_real_capture(tmp_path: Path) -> None:
    """Every real 0x36 broadcast passes the shipped profile's checksum; a frame with one
    bit flipped is dropped and counted, and its cell keeps the real value."""
    frames = orion_frames()
    assert len(frames) >= 70
    db = load_db(shared("orion-we-ev/Orion_CANBUS.dbc"))
    for _, _, data, _ in frames:  # the rule, independently: (0x36 + 8 + bytes 0-6) & 0xFF
        assert db.decode_message(0x36, data)["Checksum"] == (0x36 + 8 + sum(data[:7])) & 0xFF
    p = pipeline(tmp_path, "{id: orion, profile: orion-bms2}")
    p.feed(frames, 0)
    counters = p.packs[0].live.counters
    assert counters.bad_checksum == 0
    st = p.packs[0].live.state
    ts, _, data, _ = frames[-1]
    cell = db.decode_message(0x36, data)["CellId"]
    before = st.cell_v[cell]
    assert before == pytest.approx(db.decode_message(0x36, data)["CellVoltage"])
    bad = bytearray(data)
    bad[2] ^= 0x10  # CellVoltage's low byte: 409.6 mV off, checksum now wrong
    p.feed([(ts + 1, 0x36, bytes(bad), "x")], 0)
    assert counters.bad_checksum == 1
    assert st.cell_v[cell] == before


COUNTER_DBC = DBC_HEADER + """\
BO_ 1900 Pack: 8 BMS
 SG_ PackV : 0|16@1+ (0.1,0) [0|6553.5] "V" Vector__XXX
 SG_ Alive : 48|4@1+ (1,0) [0|15] "" Vector__XXX
 SG_ Crc : 63|8@0+ (1,0) [0|255] "" Vector__XXX
"""


def test_crc_and_rolling_counter(tmp_path: Path) -> None:
    """An AUTOSAR-style frame: CRC-8 SAE J1850 over the other bytes and a 4-bit alive
    counter. A bad CRC, a repeated counter (a stuck sender) or one that jumps by more
    than half its range (an old frame) drops the frame; a smaller jump is lost frames."""
    (tmp_path / "c.dbc").write_text(COUNTER_DBC)
    db = cantools.database.load_file(str(tmp_path / "c.dbc"), strict=False)
    body = ("fields:\n  voltage_v: {message: Pack, signal: PackV}\n"
            "checks:\n  - {message: Pack, checksum: Crc, method: crc8_sae_j1850, counter: Alive}\n")
    p = pipeline(tmp_path, profile(tmp_path, tmp_path / "c.dbc", body))
    st, counters = p.packs[0].live.state, p.packs[0].live.counters

    def crc8(data: bytes) -> int:  # bit by bit, written from the J1850 definition
        c = 0xFF
        for b in data:
            c ^= b
            for _ in range(8):
                c = ((c << 1) ^ 0x1D) & 0xFF if c & 0x80 else (c << 1) & 0xFF
        return c ^ 0xFF

    assert crc8(b"123456789") == 0x4B  # the catalogue check value of CRC-8/SAE-J1850

    def frame(v: float, alive: int, ts: float, good: bool = True) -> Frame:
        m = db.get_message_by_name("Pack")
        data = bytearray(m.encode({"PackV": v, "Alive": alive, "Crc": 0}))
        data[7] = crc8(bytes(data[:7])) ^ (0 if good else 1)
        return (ts, m.frame_id, bytes(data), "x")

    steps = [(frame(50.0, 14, 1.0), 50.0, 0, 0),
             (frame(50.1, 15, 1.1), 50.1, 0, 0),
             (frame(50.2, 0, 1.2), 50.2, 0, 0),    # wraps 15 -> 0
             (frame(50.3, 0, 1.3), 50.2, 0, 1),    # repeated: dropped
             (frame(50.4, 1, 1.4), 50.4, 0, 1),
             (frame(50.5, 3, 1.5), 50.5, 0, 1),    # a jump of 2: one frame lost, accepted
             (frame(50.6, 4, 1.6, good=False), 50.5, 1, 1),
             (frame(50.7, 5, 1.7), 50.7, 1, 1),    # 3 -> 5 across the dropped frame
             (frame(50.8, 14, 1.8), 50.7, 1, 2),   # 5 -> 14: 9 > 8 (half of 16): dropped
             (frame(50.9, 15, 1.9), 50.9, 1, 2)]
    for f, v, bad_crc, bad_ctr in steps:
        p.feed([f], 0)
        assert (st.get("voltage_v"), counters.bad_checksum, counters.bad_counter) == \
            (pytest.approx(v), bad_crc, bad_ctr), f


@pytest.mark.parametrize(("body", "key", "words"), [
    ("checks: [{message: Pack}]", "checks[0]", "needs `message` and a `checksum`"),
    ("checks: [{message: Pack, checksum: Crc, method: crc16}]", "checks[0].method",
     "unknown checksum method"),
    ("checks: [{message: Pack, checksum: Alive}]", "checks[0].checksum", "not one whole byte"),
    ("checks: [{message: Pack, counter: Alive, with_id: true}]", "checks[0]",
     "describe a `checksum`"),
    ("checks: [{message: Pack, checksum: Crc, max_step: 2}]", "checks[0].max_step",
     "only applies to a `counter`"),
    ("checks: [{message: Pack, checksum: Crc}, {message: Pack, counter: Alive}]",
     "checks[1].message", "already has checks"),
    ("checks: [{message: Pack, counter: Alve}]", "checks[0].counter", "did you mean 'Alive'"),
])
def test_check_mistakes_are_config_errors(tmp_path: Path, body: str, key: str,
                                          words: str) -> None:
    assert_rejected(tmp_path, COUNTER_DBC, body, key, words)


# ------------------------------------------------------------------ expressions across messages

CROSS_DBC = DBC_HEADER + """\
BO_ 1808 Limits: 8 BMS
 SG_ MaxChargePower : 0|16@1+ (0.01,0) [0|655.35] "kW" Vector__XXX

BO_ 1809 Pack: 8 BMS
 SG_ PackV : 0|16@1+ (0.1,0) [0|6553.5] "V" Vector__XXX
"""

CROSS_PROFILE = """\
fields:
  voltage_v: {message: Pack, signal: PackV}
  # the BMS gives its charge limit in kW: divide by the pack voltage for amperes
  charge_current_limit_a: {expr: "Limits.MaxChargePower * 1000 / Pack.PackV", fresh_s: 2}
extras:
  charge_limit_w: {expr: "Limits.MaxChargePower * 1000 + Pack.PackV * 0", fresh_s: 2}
"""


def test_expression_across_messages_with_staleness(tmp_path: Path) -> None:
    (tmp_path / "x.dbc").write_text(CROSS_DBC)
    db = cantools.database.load_file(str(tmp_path / "x.dbc"), strict=False)
    p = pipeline(tmp_path, profile(tmp_path, tmp_path / "x.dbc", CROSS_PROFILE))
    st = p.packs[0].live.state

    def limits(kw: float, ts: float) -> Frame:
        return encoded(db, "Limits", {"MaxChargePower": kw}, ts)

    def pack(v: float, ts: float) -> Frame:
        return encoded(db, "Pack", {"PackV": v}, ts)

    def amps(lim: Frame, pk: Frame) -> float:  # cantools' values, our formula
        kw = db.decode_message(lim[1], lim[2])["MaxChargePower"]
        return float(kw * 1000 / db.decode_message(pk[1], pk[2])["PackV"])

    l1, p1, l2, p0, p2, l3 = (limits(10.0, 1.0), pack(400.0, 1.1), limits(12.0, 1.5),
                              pack(0.0, 1.6), pack(480.0, 2.0), limits(11.0, 5.0))
    steps: list[tuple[Frame, float | None]] = [
        (l1, None),              # no pack voltage yet
        (p1, amps(l1, p1)),      # 25 A
        (l2, amps(l2, p1)),      # 30 A
        (p0, None),              # 0 V: no value, no crash
        (p2, amps(l2, p2)),      # 25 A
        (l3, None),              # the pack voltage is 3 s old (fresh_s 2): null
    ]
    for frame, expected in steps:
        p.feed([frame], 0)
        got = st.get("charge_current_limit_a")
        assert got == (None if expected is None else pytest.approx(expected)), frame
    assert st.extras.get("charge_limit_w") is None
    p.feed([pack(480.0, 5.1)], 0)
    assert st.get("charge_current_limit_a") == pytest.approx(11.0 * 1000 / 480.0)
    assert st.extras["charge_limit_w"] == pytest.approx(11000.0)
    assert p.packs[0].live.counters.frames == 7
    assert sum(c.handler_errors for c in p.counters) == 0


@pytest.mark.parametrize(("body", "key", "words"), [
    ("charge_current_limit_a: {expr: \"Limits.MaxChargePower / Pack.PackVolt\"}",
     "fields.charge_current_limit_a.expr", "did you mean 'PackV'"),
    ("charge_current_limit_a: {expr: \"Limitz.MaxChargePower / Pack.PackV\"}",
     "fields.charge_current_limit_a.expr.message", "did you mean 'Limits'"),
    ("charge_current_limit_a: {expr: \"MaxChargePower / Pack.PackV\"}",
     "fields.charge_current_limit_a.expr", "names no message"),
    ("charge_current_limit_a: {message: Pack, expr: \"Limits.MaxChargePower / PackV\"}",
     "fields.charge_current_limit_a.expr", "next to `message:`"),
    ("charge_current_limit_a: {expr: \"Pack.PackV * 2\"}",
     "fields.charge_current_limit_a.expr", "one message only"),
    ("bms_state: {expr: \"Pack.PackV + Limits.MaxChargePower\"}",
     "fields.bms_state.expr", "needs a `message`"),
    ("voltage_v: {message: Pack, signal: PackV, fresh_s: 2}",
     "fields.voltage_v.fresh_s", "only applies"),
])
def test_cross_message_mistakes_are_config_errors(tmp_path: Path, body: str, key: str,
                                                  words: str) -> None:
    assert_rejected(tmp_path, CROSS_DBC, f"fields:\n  {body}", key, words)
