"""The generated handlers as a user meets them: nested multiplexing in a profile, a
failing handler's traceback naming the profile key, `check-config --show-code`, and
profiles the DBC cannot satisfy rejected with the fix. Expected values come from
cantools' own encode/decode of the same frames."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

import cantools
import pytest

from gateway.cli import EXIT_CONFIG, EXIT_OK, main
from gateway.config import ConfigError, load_config
from gateway.runtime.pipeline import Pipeline

NESTED_DBC = """\
VERSION ""

NS_ :

BS_:

BU_: BMS

BO_ 1280 Nested: 8 BMS
 SG_ Page M : 0|4@1+ (1,0) [0|0] "" Vector__XXX
 SG_ Module m1M : 4|4@1+ (1,0) [0|0] "" Vector__XXX
 SG_ PackV m0 : 8|16@1+ (0.1,0) [0|0] "V" Vector__XXX
 SG_ PackI m0 : 24|16@1- (0.1,0) [0|0] "A" Vector__XXX
 SG_ Cell0 m0 : 8|16@1+ (1,0) [0|0] "mV" Vector__XXX
 SG_ Cell1 m0 : 24|16@1+ (1,0) [0|0] "mV" Vector__XXX
 SG_ Cell2 m0 : 40|16@1+ (1,0) [0|0] "mV" Vector__XXX
 SG_ Power m2 : 8|16@1- (1,0) [0|0] "W" Vector__XXX

SG_MUL_VAL_ 1280 Module Page 1-1;
SG_MUL_VAL_ 1280 PackV Page 0-0;
SG_MUL_VAL_ 1280 PackI Page 0-0;
SG_MUL_VAL_ 1280 Power Page 2-2;
SG_MUL_VAL_ 1280 Cell0 Module 0-3;
SG_MUL_VAL_ 1280 Cell1 Module 0-3;
SG_MUL_VAL_ 1280 Cell2 Module 0-3;
"""


def setup(tmp: Path, profile: str) -> Path:
    (tmp / "nested.dbc").write_text(NESTED_DBC)
    (tmp / "nested.yaml").write_text(f"name: nested\ndbc: [{tmp / 'nested.dbc'}]\n{profile}")
    cfg = tmp / "gateway.yaml"
    cfg.write_text(f"gateway_id: t\nstate_dir: {tmp}/state\nlog_level: warning\n"
                   "can: {interface: virtual, channel: x}\n"
                   f"packs:\n  - {{id: p1, profile: {tmp / 'nested.yaml'}}}\n")
    return cfg


def frame(db: Any, values: dict[str, int | float], ts: float) -> tuple[float, int, bytes, str]:
    m = db.get_message_by_name("Nested")
    return (ts, m.frame_id, bytes(m.encode(values, strict=False)), "x")


PROFILE = """\
fields:
  voltage_v: {message: Nested, signal: PackV}
  current_a: {message: Nested, signal: PackI}
  power_w: {message: Nested, expr: "Power * 1"}
cells:
  voltages:
    - {message: Nested, mux: true, stride: 3, signals: "Cell*", unit: mV}
"""


def test_nested_multiplexing_in_a_profile(tmp_path: Path) -> None:
    """Cells under the inner multiplexer land by its value, and only when the outer one
    selects it; the pack values only from their own page (the one-level decoder wrote
    page 0's bytes as cells and page 1's as pack voltage)."""
    db = cantools.database.load_string(NESTED_DBC, strict=False)
    p = Pipeline(load_config(setup(tmp_path, PROFILE), mqtt_url="-"))
    frames = [
        frame(db, {"Page": 0, "PackV": 51.2, "PackI": -3.5}, 1.0),
        frame(db, {"Page": 1, "Module": 2, "Cell0": 3301, "Cell1": 3302, "Cell2": 3303}, 1.1),
        frame(db, {"Page": 1, "Module": 0, "Cell0": 3201, "Cell1": 3202, "Cell2": 3203}, 1.2),
        frame(db, {"Page": 2, "Power": -1500}, 1.3),
    ]
    expected = {}
    for _, fid, data, _ in frames:
        expected.update(db.decode_message(fid, data, decode_choices=False))
    # Module 9 is not a listed value (cantools refuses to encode it): patch the nibble
    data = bytearray(frame(db, {"Page": 1, "Module": 0, "Cell0": 1, "Cell1": 2, "Cell2": 3}, 1.4)[2])
    data[0] = 0x91
    frames.append((1.4, 0x500, bytes(data), "x"))
    p.feed(frames, 0)
    st = p.packs[0].live.state
    assert st.values[0] == pytest.approx(expected["PackV"])  # 51.2, never a page-1 word
    assert st.values[1] == pytest.approx(expected["PackI"])
    assert st.values[2] == -1500
    cells = [None if v is None else round(v * 1000) for v in st.cell_v]
    assert cells[:9] == [3201, 3202, 3203, None, None, None, 3301, 3302, 3303]
    assert len(cells) == 9  # module 9 is not a listed value: nothing written


def test_traceback_names_line_and_profile_key(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A handler failing at run time (a division by a zero the BMS sent) shows the
    generated line, the profile key it came from, and the pack and profile."""
    profile = "fields:\n  current_a: {message: Nested, expr: \"PackI / PackV\"}\n"
    p = Pipeline(load_config(setup(tmp_path, profile), mqtt_url="-"))
    db = cantools.database.load_string(NESTED_DBC, strict=False)
    handler = p.packs[0].live.handlers[0x500]
    _, _, data, _ = frame(db, {"Page": 0, "PackV": 0, "PackI": 0}, 1.0)
    with pytest.raises(ZeroDivisionError) as err:
        handler(1.0, data)
    text = "".join(traceback.format_exception(err.value))
    assert "<pack p1 profile nested message Nested>" in text
    assert "# fields.current_a" in text
    assert "/ " in text.split("# fields.current_a")[0].splitlines()[-1]  # the failing line
    with caplog.at_level(logging.ERROR, logger="gateway.pipeline"):
        p.feed([(1.0, 0x500, data, "x")], 0)
    assert "message Nested> line" in caplog.text
    assert "fields.current_a" in caplog.text


def test_show_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = setup(tmp_path, PROFILE)
    assert main(["check-config", "-c", str(cfg), "--show-code", "p1"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("def handler(ts, data):  # pack p1:")
    assert "# fields.voltage_v" in out and "# cells.voltages[0]" in out
    assert "# multiplexer Module" in out
    compile(out, "shown", "exec")  # what is shown is the real, complete source
    assert main(["check-config", "-c", str(cfg), "--show-code", "nope"]) != EXIT_OK
    assert "no pack 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(("profile", "key", "words"), [
    # signals on two branches of one multiplexer: no frame has both
    ("fields:\n  voltage_v: {message: Nested, expr: \"PackV + Power\"}\n",
     "fields.voltage_v.expr", "different multiplexer branches"),
    # a cell pattern across branches without `mux: true` (was IndexError in `guarded`)
    ("cells:\n  voltages:\n    - {message: Nested, signals: \"P*\", index: Module}\n",
     "cells.voltages[0].signals", "different multiplexer branches"),
    # `mux: true` over signals of different multiplexers
    ("cells:\n  voltages:\n    - {message: Nested, mux: true, signals: [PackV, Cell0]}\n",
     "cells.voltages[0].mux", "different multiplexers"),
])
def test_unsatisfiable_profiles_are_config_errors(tmp_path: Path, profile: str, key: str,
                                                  words: str) -> None:
    with pytest.raises(ConfigError) as err:
        Pipeline(load_config(setup(tmp_path, profile), mqtt_url="-"))
    text = str(err.value)
    assert f"nested.yaml: {key}:" in text and words in text and "Fix:" in text, text
    assert main(["check-config", "-c", str(tmp_path / "gateway.yaml")]) == EXIT_CONFIG
