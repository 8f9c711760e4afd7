"""Profile format 2 features against real traffic and frames encoded by cantools; the
expected values come from cantools' decode of the same frames, never from gateway code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import can
import cantools
import pytest
from conftest import shared

from gateway.config import ConfigError, load_config
from gateway.pipeline import Pipeline
from gateway.source import Frame


def load_db(path: Path) -> Any:
    return cantools.database.load_file(str(path), strict=False)


def config(tmp: Path, pack: str) -> Path:
    p = tmp / "gateway.yaml"
    p.write_text(f"gateway_id: t\nstate_dir: {tmp}/state\nlog_level: warning\n"
                 f"can: {{interface: virtual, channel: x}}\npacks:\n  - {pack}\n")
    return p


def pipeline(tmp: Path, pack: str) -> Pipeline:
    return Pipeline(load_config(config(tmp, pack), mqtt_url="-"))


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
    assert p.packs[0].compiled.state.get("voltage_v") == pytest.approx(sv[-1]["Voltage"])


def test_sources_first_fresh_wins(tmp_path: Path) -> None:
    db = load_db(shared("foxbms2/foxbms.dbc"))
    p = pipeline(tmp_path, "{id: fox, profile: foxbms2, stale_after_s: 2}")
    st = p.packs[0].compiled.state

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
    dbc = shared("foxbms2/foxbms.dbc")
    if not body.startswith("{"):
        body = "{" + body + "}"
    text = config_problems(tmp_path, profile(tmp_path, dbc, f"fields:\n  voltage_v: {body}\n"))
    assert f": {key}: " in text and words in text, text
