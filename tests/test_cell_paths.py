"""The two ways a cell gets into a pack agree: a frame through the profile's compiled
handler, and a value read elsewhere (an ISO-TP answer) through `Pipeline.write_cells`.
The same cells, as frames on one pipeline and as write_cells calls on another, must
leave the same cells, implausible counts, change marks and list lengths, for every
rule: the valid range (its bounds included), "not available" (null, not counted),
the cell count, indexes outside 0..1023, growing the lists and marking changes. Frames
are encoded by cantools."""

from __future__ import annotations

from pathlib import Path

import cantools
import pytest

from gateway.config import load_config
from gateway.runtime.pipeline import Pipeline

DBC = """\
VERSION ""

NS_ :

BS_:

BU_: BMS

BO_ 256 CellV: 4 BMS
 SG_ VIndex : 0|16@1- (1,0) [0|0] "" Vector__XXX
 SG_ VCell : 16|16@1+ (1,0) [0|0] "mV" Vector__XXX

BO_ 257 CellT: 4 BMS
 SG_ TIndex : 0|16@1- (1,0) [0|0] "" Vector__XXX
 SG_ TCell : 16|16@1- (1,0) [0|0] "degC" Vector__XXX
"""

NA_V, NA_T = 65535, 32767  # the sentinels: "not available", None through write_cells

PROFILE = f"""\
cells:
  voltages:
    - {{message: CellV, index: VIndex, signals: [VCell], unit: mV, sentinel: [{NA_V}]}}
  temps:
    - {{message: CellT, index: TIndex, signals: [TCell], sentinel: [{NA_T}]}}
"""

# (kind, first cell (0-based), raw values): runs of cells, each given to both paths
STEPS: list[tuple[str, int, list[int]]] = [
    ("voltages", 0, [3300, 3301, 0, 6000]),  # both bounds of 0..6 V are cells
    ("voltages", 4, [6001, NA_V, 3302]),  # implausible (counted), not available (not)
    ("voltages", 0, [3300]),  # nothing changes
    ("voltages", 6, [3500, 3501, 3502, 3503]),  # past a cell count of 8: not cells
    ("voltages", 1022, [3400, 3401, 3402]),  # cell 1024 and beyond: counted
    ("voltages", -2, [3300, 3300, 3300]),  # negative: counted; nothing changes
    ("voltages", 1, [65534]),  # 65.534 V: a cell becomes null
    ("temps", 0, [25, -60, 150, -61, 151]),  # bounds of -60..150 degC, then beyond
    ("temps", 3, [NA_T, 20]),
    ("temps", 0, [25]),  # nothing changes
    ("temps", 9, [30]),  # temperatures have no cell count: the list grows
    ("temps", 1023, [30, 31]),
    ("temps", -1, [10, 11]),
]


def pipeline(tmp: Path, cell_count: int | None) -> Pipeline:
    (tmp / "paths.dbc").write_text(DBC)
    (tmp / "paths.yaml").write_text(f"name: paths\ndbc: [{tmp / 'paths.dbc'}]\n{PROFILE}")
    cfg = tmp / "gateway.yaml"
    count = f", cell_count: {cell_count}" if cell_count else ""
    cfg.write_text(f"gateway_id: t\nstate_dir: {tmp}/state\nlog_level: warning\n"
                   "can: {interface: virtual, channel: x}\n"
                   f"packs:\n  - {{id: p, profile: {tmp / 'paths.yaml'}{count}}}\n")
    return Pipeline(load_config(cfg, mqtt_url="-"))


@pytest.mark.parametrize("cell_count", [None, 8])
def test_frames_and_write_cells_write_cells_alike(tmp_path: Path, cell_count: int | None) -> None:
    db = cantools.database.load_string(DBC, strict=False)
    framed = pipeline(tmp_path, cell_count).packs[0].live
    polled = pipeline(tmp_path, cell_count)
    live = polled.packs[0].live
    seen: set[tuple[bool, bool]] = set()
    for n, (kind, first, raws) in enumerate(STEPS):
        ts = 1.0 + n
        msg, idx, sig = ((db.get_message_by_name("CellV"), "VIndex", "VCell")
                         if kind == "voltages" else
                         (db.get_message_by_name("CellT"), "TIndex", "TCell"))
        values: list[float | None] = []
        for i, raw in enumerate(raws, first):
            framed.handlers[msg.frame_id](ts, bytes(msg.encode({idx: i, sig: raw})))
            phys = db.decode_message(msg.frame_id, msg.encode({idx: i, sig: raw}))[sig]
            values.append(None if raw in (NA_V, NA_T) else
                          phys * 0.001 if kind == "voltages" else phys)
        polled.write_cells("p", kind, first, values, ts)  # type: ignore[arg-type]
        a, b = framed.state, live.state
        step = f"step {n}: {kind} from {first}"
        assert b.cell_v == a.cell_v, step
        assert b.cell_t == a.cell_t, step
        assert live.implausible == framed.implausible, step
        assert (b.changed, b.cells_changed) == (a.changed, a.cells_changed), step
        assert b.last_seen == a.last_seen == ts, step
        seen.add((a.changed, a.cells_changed))
        for st in (a, b):
            st.changed = st.cells_changed = False
    # the steps did exercise the rules they are meant to
    assert seen == {(True, True), (False, False)}
    a = framed.state
    assert a.cell_v[:8] == pytest.approx([3.3, None, 0.0, 6.0, None, None, 3.5, 3.501])
    assert a.cell_v[2] == 0.0 and a.cell_v[3] == 6.0
    assert a.cell_t[:5] == [11, -60, 150, None, 20]
    assert (len(a.cell_t), a.cell_t[9], a.cell_t[1023]) == (1024, 30, 30)
    if cell_count:
        assert len(a.cell_v) == cell_count
    else:
        assert len(a.cell_v) == 1024
        assert a.cell_v[8:10] + a.cell_v[1022:] == pytest.approx([3.502, 3.503, 3.4, 3.401])
    # 6.001 V, 65.534 V, cells 1024, -2 and -1; -61 and 151 degC, cells 1024 and -1
    assert framed.implausible_counts() == {"cell_voltage": 5, "cell_temp": 4}
