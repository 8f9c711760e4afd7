"""Plausibility across signals (gateway/faults/plausibility.py): values that contradict each other
are not published, are counted, and raise `implausible_values` with the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, shared
from test_profiles import asc_frames, encode_all, load_db, pipeline_for

from gateway.faults.plausibility import voltage_vs_cells
from gateway.runtime.pipeline import Pipeline
from gateway.source.logs import Frame


def states(p: Pipeline, events: list[Any] | None = None) -> list[dict[str, Any]]:
    pubs, evs = p.take_split()
    if events is not None:
        events.extend(e for e, _ in evs)
    return [json.loads(x.payload) for x in pubs if x.topic.endswith("/state")]


def test_voltage_against_cells() -> None:
    cells: list[float | None] = [4.06] * 72
    assert voltage_vs_cells(292.5, cells, 72) is None
    why = voltage_vs_cells(7.2, cells, 72)
    assert why is not None and "7.2 V" in why and "72 cells" in why
    # two strings in parallel whose cells are all listed: half the sum is right
    assert voltage_vs_cells(146.2, cells, 72) is None
    # a tenth of the sum is not (a scale error)
    assert voltage_vs_cells(29.25, cells, 72) is not None
    # a broadcast still filling in: 20 cells seen, the count not known yet
    filling: list[float | None] = [4.06] * 20
    assert voltage_vs_cells(292.5, filling) is None
    # ... but a pack below what the cells seen so far add up to is already wrong
    assert voltage_vs_cells(7.2, filling) is not None
    # startup placeholders (0 V cells) are not cells
    assert voltage_vs_cells(7.2, [0.0] * 72, 72) is None


def test_orion_capture_never_publishes_a_wrong_pack_voltage(tmp_path: Path) -> None:
    frames = asc_frames(shared("orion-we-ev/candump1_can0.asc"))
    frames.sort(key=lambda f: f[0])
    # as shipped: the true 292.4-292.5 V, nothing dropped
    p = pipeline_for(tmp_path, "{id: o, profile: orion-bms2, chemistry: nmc}")
    p.feed(frames, 0)
    p.finish()
    volts = {s["voltage_v"] for s in states(p)}
    assert volts and all(292.0 <= v <= 293.0 for v in volts), volts
    assert p.packs[0].live.implausible_counts() == {}
    # the old mapping (0x6B0 in the utility's default layout) reads a 7.2 V pack: once
    # the broadcast has shown enough cells it is dropped, counted, and the reason given
    p = pipeline_for(tmp_path, "{id: o6, profile: orion-bms2-6b0, chemistry: nmc}")
    p.feed(frames, 0)
    p.finish()
    seen = [s["voltage_v"] for s in states(p)]
    assert seen[-1] is None and 7.2 in seen  # published only before any cells were known
    assert p.packs[0].live.implausible_counts()["voltage_v"] > 10
    assert "below the sum of" in p.packs[0].impl_reason
    assert "implausible_values" in {f["code"] for f in p.packs[0].faults.active()}


def _can_bms(tmp: Path, temp_min_k: float, temp_max_k: float, volts: float) -> Pipeline:
    """A CAN-BMS pack whose 0x373 gives these cell temperature extremes (kelvin)."""
    db = load_db(REPO / "dbc" / "can-bms.dbc")
    frames: list[Frame] = []
    for i in range(40):  # 20 s of a BMS sending every half second
        t = 1000.0 + i * 0.5
        frames += [
            encode_all(db, "VoltageCurrentTemperature",
                       {"BatteryVoltage": volts, "BatteryCurrent": -3.0,
                        "BatteryTemperature": 25.0}, t),
            encode_all(db, "CellExtremes", {"MinCellVoltage": 3300, "MaxCellVoltage": 3320,
                                            "MinCellTemperature": temp_min_k,
                                            "MaxCellTemperature": temp_max_k}, t + 0.01),
            encode_all(db, "ChargeDischargeLimits",
                       {"ChargeVoltageLimit": 56.0, "DischargeVoltageLimit": 44.0,
                        "ChargeCurrentLimit": 50, "DischargeCurrentLimit": 50}, t + 0.02),
        ]
    p = pipeline_for(tmp, "{id: house, profile: can-bms}")
    p.feed(frames, 0)
    p.finish()
    return p


def test_consistent_values_pass(tmp_path: Path) -> None:
    p = _can_bms(tmp_path, 293, 298, 52.8)
    last = states(p)[-1]
    assert last["temp_min_c"] == pytest.approx(293 - 273.15)
    assert last["temp_max_c"] == pytest.approx(298 - 273.15)
    assert last["voltage_v"] == pytest.approx(52.8)
    assert p.packs[0].live.implausible_counts() == {}
    assert not p.packs[0].faults.active()


def test_temp_min_above_temp_max_is_dropped_counted_and_raised(tmp_path: Path) -> None:
    p = _can_bms(tmp_path, 303, 293, 52.8)  # a BMS sending its extremes swapped
    events: list[Any] = []
    sts = states(p, events)
    assert all(s["temp_min_c"] is None and s["temp_max_c"] is None for s in sts)
    assert sts[-1]["voltage_v"] == pytest.approx(52.8)  # the rest is published
    counts = p.packs[0].live.implausible_counts()
    assert counts["temp_min_c"] >= 10 and counts["temp_max_c"] >= 10
    active = {f["code"]: f for f in p.packs[0].faults.active()}
    assert "implausible_values" in active
    assert "temp_min_c 29.85 degC is above temp_max_c 19.85 degC" in p.packs[0].impl_reason
    raised = [e for e in events if e.code == "implausible_values" and e.state == "raised"]
    assert len(raised) == 1 and "is above temp_max_c" in raised[0].message


def test_pack_voltage_far_below_its_own_limits_is_dropped(tmp_path: Path) -> None:
    # a tenth of the real voltage: the layout's scale is wrong
    p = _can_bms(tmp_path, 293, 298, 5.28)
    sts = states(p)
    assert all(s["voltage_v"] is None for s in sts)
    assert sts[-1]["charge_voltage_limit_v"] == pytest.approx(56.0)
    assert "far below the discharge voltage limit 44 V" in p.packs[0].impl_reason
