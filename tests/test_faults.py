"""Fault stage in frame time: real PackState objects, timestamps passed in, no mocks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.config import BmsFault, Problem
from gateway.config.rules import parse_rules
from gateway.faults.engine import FaultEngine
from gateway.faults.rules import RULES, RuleSpec, default_rules
from gateway.model import FIELD_INDEX, FaultEvent, PackState, Value

TICK = 0.1
FILE = "gateway.yaml"
KEY = "packs[0].rules"


def engine(overrides: dict[str, dict[str, Any]] | None = None,
           bms: tuple[BmsFault, ...] = (), stale: float = 10.0) -> FaultEngine:
    problems: list[Problem] = []
    rules = parse_rules(overrides or {}, FILE, KEY, problems)
    assert problems == []
    return FaultEngine("house", rules, bms, stale)


def put(st: PackState, **values: Value) -> PackState:
    for k, v in values.items():
        st.values[FIELD_INDEX[k]] = v
        st.mapped[FIELD_INDEX[k]] = True
    return st


def ticks(t0: float, t1: float) -> list[float]:
    """Frame-time ticks t0, t0+0.1, ... up to and including t1."""
    n = round((t1 - t0) / TICK)
    return [round(t0 + i * TICK, 6) for i in range(n + 1)]


def hold(eng: FaultEngine, st: PackState, t0: float, t1: float,
         code: str | None = None) -> list[FaultEvent]:
    """Evaluate on every tick in [t0, t1]; drain the events and return those of `code`."""
    for ts in ticks(t0, t1):
        eng.evaluate(ts, st)
    out = [e for e in eng.events if code is None or e.code == code]
    eng.events.clear()
    return out


# ---------------------------------------------------------------- every threshold rule


def _cells(cell: int, other: float) -> Callable[[PackState, float | None], None]:
    def setter(st: PackState, v: float | None) -> None:
        st.cell_v = [other] * 16
        st.cell_v[cell - 1] = v
        st.derive()
    return setter


def _sensor(sensor: int) -> Callable[[PackState, float | None], None]:
    def setter(st: PackState, v: float | None) -> None:
        st.cell_t = [20.0] * 4
        st.cell_t[sensor - 1] = v
        st.derive()
    return setter


def _field(name: str, sign: float = 1.0) -> Callable[[PackState, float | None], None]:
    def setter(st: PackState, v: float | None) -> None:
        put(st, **{name: None if v is None else sign * v})
    return setter


@dataclass
class Case:
    rule: str
    set: Callable[[PackState, float | None], None]
    ok: float  # well inside the safe side
    bad: float  # past raise_at
    band: float  # between clear_at and raise_at
    clear: float  # past clear_at
    base: dict[str, Value] = field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    cell: int | None = None
    sensor: int | None = None

    def __str__(self) -> str:
        return self.rule


CASES = [
    Case("cell_over_voltage", _cells(5, 3.3), 3.3, 3.70, 3.60, 3.50, cell=5),
    Case("cell_under_voltage", _cells(7, 3.3), 3.3, 2.70, 2.90, 3.00, cell=7),
    Case("pack_over_voltage", _field("voltage_v"), 53.0, 58.6, 57.5, 56.9,
         overrides={"pack_over_voltage": {"raise_at": 58.4, "clear_at": 57.0}}),
    Case("pack_under_voltage", _field("voltage_v"), 53.0, 43.5, 45.0, 46.5,
         overrides={"pack_under_voltage": {"raise_at": 44.0, "clear_at": 46.0}}),
    Case("over_temp_charge", _field("temp_max_c"), 25.0, 46.0, 43.0, 41.0,
         base={"current_a": 20.0}),
    Case("over_temp_charge", _sensor(3), 25.0, 46.0, 43.0, 41.0,
         base={"current_a": 20.0}, sensor=3),
    Case("over_temp_discharge", _field("temp_max_c"), 25.0, 61.0, 57.0, 54.0,
         base={"current_a": -30.0}),
    Case("over_temp_discharge", _sensor(2), 25.0, 61.0, 57.0, 54.0,
         base={"current_a": -30.0}, sensor=2),
    Case("under_temp_charge", _field("temp_min_c"), 20.0, -1.0, 1.5, 4.0,
         base={"current_a": 20.0}),
    Case("under_temp_charge", _sensor(4), 20.0, -1.0, 1.5, 4.0,
         base={"current_a": 20.0}, sensor=4),
    Case("under_temp_discharge", _field("temp_min_c"), 20.0, -21.0, -18.0, -16.0,
         base={"current_a": -5.0}),
    Case("under_temp_discharge", _sensor(1), 20.0, -21.0, -18.0, -16.0,
         base={"current_a": -5.0}, sensor=1),
    Case("over_current_charge", _field("current_a"), 50.0, 120.0, 95.0, 85.0,
         overrides={"over_current_charge": {"raise_at": 100, "clear_at": 90}}),
    Case("over_current_discharge", _field("current_a", -1.0), 50.0, 220.0, 190.0, 170.0,
         overrides={"over_current_discharge": {"raise_at": 200, "clear_at": 180}}),
    Case("cell_imbalance", _field("cell_v_delta"), 0.01, 0.12, 0.07, 0.04),
    Case("low_soc", _field("soc_pct"), 50.0, 9.0, 12.0, 16.0),
]


@pytest.fixture(params=CASES, ids=str)
def case(request: pytest.FixtureRequest) -> Case:
    c: Case = request.param
    return c


def _setup(case: Case) -> tuple[FaultEngine, PackState, RuleSpec]:
    eng = engine(case.overrides)
    st = put(PackState("house"), **case.base)
    case.set(st, case.ok)
    spec = parse_rules(case.overrides, FILE, KEY, [])[case.rule]
    return eng, st, spec


def test_rule_lifecycle(case: Case) -> None:
    eng, st, spec = _setup(case)
    d = spec.debounce_s
    assert hold(eng, st, 0.0, 5.0, case.rule) == []

    # Past raise_at: nothing until the debounce has elapsed, then exactly one event.
    case.set(st, case.bad)
    assert hold(eng, st, 10.0, round(10.0 + d - TICK, 6), case.rule) == []
    raised = hold(eng, st, round(10.0 + d, 6), round(10.0 + d, 6), case.rule)
    assert len(raised) == 1
    ev = raised[0]
    assert (ev.code, ev.state, ev.source, ev.severity) == (case.rule, "raised", "gateway",
                                                           spec.severity)
    assert ev.ts == pytest.approx(10.0 + d)
    assert ev.value == pytest.approx(case.bad) and ev.limit == pytest.approx(spec.raise_at)
    assert (ev.cell, ev.sensor) == (case.cell, case.sensor)
    assert ev.pack_id == "house" and ev.message

    # Sustained: still just the one event.
    assert hold(eng, st, round(10.1 + d, 6), 100.0, case.rule) == []

    # Inside the hysteresis band: stays raised, silently, however long.
    case.set(st, case.band)
    assert hold(eng, st, 100.1, 200.0, case.rule) == []
    assert [a["code"] for a in eng.active() if a["code"] == case.rule] == [case.rule]

    # Past clear_at, but back into the band before the debounce: nothing.
    if d > 0:
        case.set(st, case.clear)
        assert hold(eng, st, 200.1, round(200.1 + d - 2 * TICK, 6), case.rule) == []
        case.set(st, case.band)
        assert hold(eng, st, round(200.1 + d - TICK, 6), 230.0, case.rule) == []

    # Past clear_at for the debounce: one clear with the value and the clear limit.
    case.set(st, case.clear)
    assert hold(eng, st, 300.0, round(300.0 + d - TICK, 6), case.rule) == []
    cleared = hold(eng, st, round(300.0 + d, 6), 400.0, case.rule)
    assert len(cleared) == 1
    ev = cleared[0]
    assert ev.state == "cleared" and ev.ts == pytest.approx(300.0 + d)
    assert ev.value == pytest.approx(case.clear) and ev.limit == pytest.approx(spec.clear_at)
    assert (ev.cell, ev.sensor) == (case.cell, case.sensor)
    assert [a for a in eng.active() if a["code"] == case.rule] == []


def test_rule_flapping_across_raise_at_before_debounce_is_silent(case: Case) -> None:
    eng, st, spec = _setup(case)
    if spec.debounce_s == 0:
        pytest.skip("no debounce")
    t = 0.0
    for _ in range(50):  # past raise_at for less than the debounce, then back, repeatedly
        case.set(st, case.bad)
        assert hold(eng, st, t, round(t + spec.debounce_s - 2 * TICK, 6), case.rule) == []
        t = round(t + spec.debounce_s - TICK, 6)
        case.set(st, case.band)
        assert hold(eng, st, t, t, case.rule) == []
        t = round(t + TICK, 6)
    assert [a for a in eng.active() if a["code"] == case.rule] == []


def test_rule_none_never_raises_nor_clears(case: Case) -> None:
    eng, st, spec = _setup(case)
    case.set(st, None)
    assert hold(eng, st, 0.0, 60.0, case.rule) == []
    case.set(st, case.bad)
    assert len(hold(eng, st, 100.0, 100.0 + spec.debounce_s + 1, case.rule)) == 1
    case.set(st, None)
    assert hold(eng, st, 200.0, 400.0, case.rule) == []
    assert [a["code"] for a in eng.active() if a["code"] == case.rule] == [case.rule]


def test_rule_disabled_is_silent(case: Case) -> None:
    over = {**case.overrides, case.rule: {**case.overrides.get(case.rule, {}),
                                          "enabled": False}}
    eng = engine(over)
    st = put(PackState("house"), **case.base)
    case.set(st, case.bad)
    assert hold(eng, st, 0.0, 60.0, case.rule) == []


def test_every_threshold_rule_is_covered() -> None:
    threshold = {n for n, d in RULES.items() if d.kind in ("high", "low")}
    assert threshold == {c.rule for c in CASES}


# ---------------------------------------------------------------- cells, sensors, gates


def test_each_cell_is_its_own_instance() -> None:
    eng = engine()
    st = PackState("house")
    st.cell_v = [3.3] * 192
    st.cell_v[4], st.cell_v[150] = 3.70, 3.72
    st.derive()
    evs = hold(eng, st, 0.0, 3.0, "cell_over_voltage")
    assert [(e.cell, e.state) for e in evs] == [(5, "raised"), (151, "raised")]
    assert evs[0].message == "cell 5 over voltage: 3.7 V > 3.65 V"
    # Cell 5 recovers; cell 151 stays.
    st.cell_v[4] = 3.4
    st.derive()
    evs = hold(eng, st, 3.1, 10.0, "cell_over_voltage")
    assert [(e.cell, e.state) for e in evs] == [(5, "cleared")]
    assert [a.get("cell") for a in eng.active()] == [None, 151]  # cell_imbalance, then 151


def test_cell_rule_without_cell_list_uses_the_extreme_and_its_id() -> None:
    eng = engine()
    st = put(PackState("house"), cell_v_max=3.71, cell_v_max_id=12)
    evs = hold(eng, st, 0.0, 2.0)
    assert [(e.code, e.cell, e.value) for e in evs] == [("cell_over_voltage", 12, 3.71)]
    assert evs[0].message == "cell 12 over voltage: 3.71 V > 3.65 V"


def test_charge_temperature_limits_apply_only_while_charging() -> None:
    eng = engine()
    st = put(PackState("house"), temp_max_c=50.0, temp_min_c=-5.0, current_a=-10.0)
    # Discharging at 50 degC / -5 degC: inside the discharge limits.
    assert hold(eng, st, 0.0, 30.0) == []
    # Idle (<= +0.5 A) counts as discharge.
    put(st, current_a=0.5)
    assert hold(eng, st, 30.1, 60.0) == []
    # Unknown current: the gated rules cannot raise.
    put(st, current_a=None)
    assert hold(eng, st, 60.1, 90.0) == []
    # Charging: both charge limits are exceeded.
    put(st, current_a=10.0)
    evs = hold(eng, st, 90.1, 95.0)
    assert sorted(e.code for e in evs) == ["over_temp_charge", "under_temp_charge"]
    assert all(e.ts == pytest.approx(92.1) for e in evs)
    # Charger stops: the faults stay until the temperature is back past clear_at.
    put(st, current_a=-1.0)
    assert hold(eng, st, 95.1, 200.0) == []
    put(st, temp_max_c=41.0, temp_min_c=4.0)
    evs = hold(eng, st, 200.1, 210.0)
    assert sorted((e.code, e.state) for e in evs) == [("over_temp_charge", "cleared"),
                                                      ("under_temp_charge", "cleared")]


def test_discharge_temperature_limits_do_not_raise_while_charging() -> None:
    eng = engine()
    st = put(PackState("house"), temp_max_c=44.0, current_a=5.0)
    assert hold(eng, st, 0.0, 30.0) == []
    put(st, temp_max_c=62.0)
    evs = hold(eng, st, 30.1, 40.0)
    assert [e.code for e in evs] == ["over_temp_charge"]  # not over_temp_discharge


def test_over_current_follows_bms_limit_when_raise_at_is_null() -> None:
    eng = engine()
    st = put(PackState("house"), current_a=105.0, charge_current_limit_a=100.0,
             discharge_current_limit_a=150.0)
    assert hold(eng, st, 0.0, 30.0) == []  # within the 10 % margin
    put(st, current_a=111.0)
    evs = hold(eng, st, 30.1, 40.0)
    assert [(e.code, e.value, e.limit) for e in evs] == [
        ("over_current_charge", 111.0, pytest.approx(110.0))]
    assert "BMS limit" in evs[0].message
    put(st, current_a=100.0)
    evs = hold(eng, st, 40.1, 50.0)
    assert [(e.state, e.limit) for e in evs] == [("cleared", 100.0)]
    put(st, current_a=-170.0)
    evs = hold(eng, st, 50.1, 60.0)
    assert [(e.code, e.value, e.limit) for e in evs] == [
        ("over_current_discharge", 170.0, pytest.approx(165.0))]


def test_over_current_bms_limit_zero_ignores_noise_and_no_limit_means_off() -> None:
    eng = engine()
    st = put(PackState("house"), current_a=0.3, charge_current_limit_a=0.0)
    assert hold(eng, st, 0.0, 30.0) == []
    put(st, current_a=400.0, charge_current_limit_a=None)
    assert hold(eng, st, 30.1, 60.0) == []


def test_sensor_instances_replace_the_aggregate() -> None:
    eng = engine()
    st = put(PackState("house"), current_a=-1.0)
    st.cell_t = [20.0, 70.0, 65.0, None]
    st.derive()
    evs = hold(eng, st, 0.0, 3.0)
    assert [(e.code, e.sensor) for e in evs] == [("over_temp_discharge", 2),
                                                 ("over_temp_discharge", 3)]
    assert evs[0].message == "sensor 2 over temperature: 70 °C > 60 °C"


# ---------------------------------------------------------------- BMS, comm, bus


BMS = (
    BmsFault("faults[0]", "bms_cell_ov", "Alarms", "CellOV", "alarm", bit=0,
             text="BMS cell over voltage"),
    BmsFault("faults[1]", "bms_comm", "Alarms", "Comm", "critical", bit=1),
)


def test_bms_flags_raise_and_clear_on_one_frame_without_duplicates() -> None:
    eng = engine(bms=BMS)
    eng.bms_flag(0, 5.0, True, 1.0)
    eng.bms_flag(0, 5.1, True, 1.0)  # repeated: nothing new
    eng.bms_flag(1, 5.2, False, 0.0)  # clear of something never raised: nothing
    eng.bms_flag(7, 5.2, True, 1.0)  # no such flag: ignored, never raises
    assert [(e.code, e.state, e.source, e.severity, e.ts, e.message) for e in eng.events] == [
        ("bms_cell_ov", "raised", "bms", "alarm", 5.0, "BMS cell over voltage")]
    eng.events.clear()
    assert eng.active()[0]["source"] == "bms"
    eng.bms_flag(0, 9.0, False, 0.0)
    eng.bms_flag(0, 9.1, False, 0.0)
    eng.bms_flag(1, 9.2, True, 2.0)
    assert [(e.code, e.state, e.ts, e.value) for e in eng.events] == [
        ("bms_cell_ov", "cleared", 9.0, 0.0), ("bms_comm", "raised", 9.2, 2.0)]
    assert eng.events[1].message == "bms comm"


def test_comm_lost() -> None:
    eng = engine(stale=10.0)
    eng.comm(1.0, True)
    assert eng.events == []
    eng.comm(20.0, False)
    eng.comm(25.0, False)
    eng.comm(30.0, True)
    eng.comm(31.0, True)
    assert [(e.code, e.state, e.ts, e.severity, e.limit) for e in eng.events] == [
        ("comm_lost", "raised", 20.0, "critical", 10.0),
        ("comm_lost", "cleared", 30.0, "critical", 10.0)]
    assert "10 s" in eng.events[0].message


def test_comm_lost_can_be_disabled_and_reclassified() -> None:
    assert _events_of(engine({"comm_lost": {"enabled": False}})) == []
    assert [e.severity for e in _events_of(engine({"comm_lost": {"severity": "alarm"}}))] \
        == ["alarm"]


def _events_of(eng: FaultEngine) -> list[FaultEvent]:
    eng.comm(1.0, False)
    return eng.events


@pytest.mark.parametrize(("code", "severity"), [
    ("can_bus_lost", "critical"), ("can_error_passive", "warning"),
    ("can_bus_off", "critical"), ("can_error_frames", "warning")])
def test_bus_problems(code: str, severity: str) -> None:
    eng = engine()
    eng.bus_problem(1.0, code, True, "can0")
    eng.bus_problem(1.5, code, True, "can0")
    assert eng.active()[0]["code"] == code
    eng.bus_problem(2.0, code, False, "")
    eng.bus_problem(2.5, code, False, "")
    assert [(e.state, e.ts, e.severity, e.source) for e in eng.events] == [
        ("raised", 1.0, severity, "gateway"), ("cleared", 2.0, severity, "gateway")]
    assert eng.events[0].message.endswith(": can0")


# ---------------------------------------------------------------- windowed rules


def test_decode_error_rate_with_hysteresis() -> None:
    eng = engine()
    errors = frames = 0

    def run(t0: float, t1: float, per_tick: int, bad: int) -> list[FaultEvent]:
        nonlocal errors, frames
        for ts in ticks(t0, t1):
            frames += per_tick
            errors += bad
            eng.decode_errors(ts, errors, frames)
        out = list(eng.events)
        eng.events.clear()
        return out

    assert run(0.0, 20.0, 10, 0) == []
    evs = run(20.1, 40.0, 10, 1)  # 10 % errors
    assert [(e.code, e.state, e.severity) for e in evs] == [
        ("decode_error_rate", "raised", "warning")]
    assert evs[0].value > 5.0 and evs[0].limit == 5.0
    assert run(40.1, 80.0, 100, 3) == []  # 3 %: inside the band, stays raised
    evs = run(80.1, 100.0, 100, 0)
    assert [e.state for e in evs] == ["cleared"]
    assert evs[0].value <= 1.0 and evs[0].limit == 1.0
    # Clears within one window of going clean (10 s), not before 1 % is reached.
    assert 80.1 < evs[0].ts <= 90.1


def test_decode_error_rate_needs_enough_frames() -> None:
    eng = engine()
    eng.decode_errors(0.0, 0, 0)
    eng.decode_errors(1.0, 5, 10)  # 50 %, but only 10 frames
    assert eng.events == []
    eng.decode_errors(2.0, 15, 30)
    assert [e.state for e in eng.events] == ["raised"]


def test_implausible_values_raise_on_growth_and_clear_after_quiet_window() -> None:
    eng = engine()
    st = PackState("house")
    eng.implausible(2.0, {"voltage_v": 7, "cell_voltage": 2})
    evs = list(eng.events)
    eng.events.clear()
    assert [(e.code, e.state, e.value, e.severity) for e in evs] == [
        ("implausible_values", "raised", 9.0, "warning")]
    eng.implausible(5.0, {"voltage_v": 8, "cell_voltage": 2})  # more drops: still one fault
    assert eng.events == []
    # Quiet; the clear comes from the frame-time tick even without further counts.
    evs = hold(eng, st, 5.1, 20.0)
    assert [(e.state, e.ts) for e in evs] == [("cleared", 15.0)]


def test_implausible_values_raise_on_the_first_batch() -> None:
    """The first call was taken as a baseline: a pack whose very first values were
    implausible never raised."""
    eng = engine()
    eng.implausible(0.5, {"voltage_v": 1})
    assert [(e.code, e.state, e.value) for e in eng.events] == [
        ("implausible_values", "raised", 1.0)]


def test_implausible_counts_that_restart_count_from_zero() -> None:
    """A reload compiles the pack anew (its counts start at 0) and keeps the engine:
    new drops below the old totals still count."""
    eng = engine()
    st = PackState("house")
    eng.implausible(0.0, {"voltage_v": 5})
    hold(eng, st, 0.1, 20.0)
    eng.events.clear()
    eng.implausible(21.0, {"voltage_v": 2})
    assert [(e.state, e.value) for e in eng.events] == [("raised", 2.0)]


# ---------------------------------------------------------------- parse_rules


def test_parse_rules_defaults() -> None:
    problems: list[Problem] = []
    rules = parse_rules({}, FILE, KEY, problems)
    assert problems == []
    assert rules == default_rules()
    assert set(rules) == set(RULES)
    cov = rules["cell_over_voltage"]
    assert (cov.raise_at, cov.clear_at, cov.debounce_s, cov.severity, cov.enabled) == (
        3.65, 3.55, 2.0, "alarm", True)
    assert rules["pack_over_voltage"].raise_at is None


def _problems(overrides: Any) -> list[Problem]:
    problems: list[Problem] = []
    parse_rules(overrides, FILE, KEY, problems)
    return problems


def test_parse_rules_unknown_rule_suggests_nearest() -> None:
    (p,) = _problems({"cell_overvoltage": {"raise_at": 3.6}})
    assert (p.file, p.key, p.what) == (FILE, f"{KEY}.cell_overvoltage", "unknown rule")
    assert "'cell_over_voltage'" in p.fix and "did you mean" in p.fix


def test_parse_rules_unknown_key_suggests_nearest() -> None:
    (p,) = _problems({"low_soc": {"rasie_at": 20}})
    assert p.key == f"{KEY}.low_soc.rasie_at" and p.what == "unknown key"
    assert "'raise_at'" in p.fix


def test_parse_rules_threshold_on_event_rule() -> None:
    (p,) = _problems({"comm_lost": {"raise_at": 5}})
    assert p.key == f"{KEY}.comm_lost.raise_at" and "no thresholds" in p.what


@pytest.mark.parametrize(("rule", "raise_at", "clear_at", "side"), [
    ("cell_over_voltage", 3.65, 3.70, "above"),
    ("cell_under_voltage", 2.8, 2.7, "below"),
    ("low_soc", 10, 5, "below"),
    ("decode_error_rate", 5, 6, "above"),
])
def test_parse_rules_clear_at_on_the_wrong_side(rule: str, raise_at: float, clear_at: float,
                                                side: str) -> None:
    (p,) = _problems({rule: {"raise_at": raise_at, "clear_at": clear_at}})
    assert p.key == f"{KEY}.{rule}.clear_at"
    assert side in p.what and "clear_at:" in p.fix


@pytest.mark.parametrize(("rule", "key", "value", "unit"), [
    ("cell_over_voltage", "debounce_s", -1, "in s "),
    ("decode_error_rate", "window_s", 0, "in s "),
    ("cell_over_voltage", "raise_at", 9, "in V "),
    ("low_soc", "raise_at", 150, "in % "),
])
def test_parse_rules_out_of_range_fix_names_the_settings_unit(rule: str, key: str,
                                                              value: float, unit: str) -> None:
    # debounce_s and window_s are seconds whatever the rule judges (not "in V")
    (p,) = _problems({rule: {key: value}})
    assert p.key == f"{KEY}.{rule}.{key}" and "out of range" in p.what
    assert unit in p.fix, p.fix


def test_parse_rules_bad_values_name_the_fix() -> None:
    problems = _problems({
        "low_soc": {"severity": "warn", "debounce_s": -1, "enabled": "yes"},
        "cell_imbalance": {"raise_at": "0.1"},
        "cell_over_voltage": {"raise_at": 9.0},
        "over_temp_charge": "off",
        "pack_over_voltage": {"clear_at": 50},
    })
    by_key = {p.key.removeprefix(KEY + "."): p for p in problems}
    assert set(by_key) == {"low_soc.severity", "low_soc.debounce_s", "low_soc.enabled",
                           "cell_imbalance.raise_at", "cell_over_voltage.raise_at",
                           "over_temp_charge", "pack_over_voltage.clear_at"}
    assert "'warning'" in by_key["low_soc.severity"].fix
    assert all(str(p).startswith(f"{FILE}: {KEY}.") for p in problems)


def test_parse_rules_overrides() -> None:
    problems: list[Problem] = []
    rules = parse_rules({
        "cell_imbalance": False,
        "low_soc": {"raise_at": 20, "severity": "alarm", "debounce_s": 0},
        "pack_over_voltage": {"raise_at": 58.4},
        "cell_over_voltage": {"clear_at": 3.5},
        "decode_error_rate": {"window_s": 30},
    }, FILE, KEY, problems)
    assert problems == []
    assert rules["cell_imbalance"].enabled is False
    soc = rules["low_soc"]
    # Only raise_at moved: clear_at keeps the default 5 % hysteresis.
    assert (soc.raise_at, soc.clear_at, soc.severity, soc.debounce_s) == (20.0, 25.0, "alarm",
                                                                          0.0)
    assert rules["pack_over_voltage"].clear_at == pytest.approx(58.4 * 0.98)
    assert (rules["cell_over_voltage"].raise_at, rules["cell_over_voltage"].clear_at) == (
        3.65, 3.5)
    assert rules["decode_error_rate"].window_s == 30.0


def test_load_config_parses_rules_once_per_pack(tmp_path: Any) -> None:
    """`rules:` is read with the rest of the config: a pack carries typed RuleSpecs (the
    global rules refined by its own, its chemistry's limits), and a bad rule is a
    ConfigError from load_config naming the pack's key."""
    from gateway.config import ConfigError, load_config

    cfg = tmp_path / "gw.yaml"
    base = (f"state_dir: {tmp_path / 'state'}\ncan: {{interface: virtual, channel: c}}\n"
            "rules: {low_soc: {raise_at: 20, severity: alarm}}\n")
    cfg.write_text(base + "packs: [{id: a, profile: example-bms, chemistry: nmc, "
                   "rules: {low_soc: {raise_at: 30}}}, {id: b, profile: example-bms}]\n")
    a, b = load_config(cfg).packs
    assert all(isinstance(s, RuleSpec) for s in a.rules.values()) and set(a.rules) == set(RULES)
    assert (a.rules["low_soc"].raise_at, a.rules["low_soc"].severity) == (30.0, "alarm")
    assert (b.rules["low_soc"].raise_at, b.rules["low_soc"].severity) == (20.0, "alarm")
    assert a.rules["cell_over_voltage"].raise_at == 4.25  # nmc
    assert b.rules["cell_over_voltage"].raise_at == 3.65  # lfp
    cfg.write_text(base + "packs: [{id: a, profile: example-bms, "
                   "rules: {low_soc: {rasie_at: 30}}}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    (p,) = e.value.problems
    assert (p.file, p.key, p.what) == (str(cfg), "packs[0].rules.low_soc.rasie_at", "unknown key")
    assert "'raise_at'" in p.fix


# ---------------------------------------------------------------- active() and clear_all


def test_active_content_and_order() -> None:
    eng = engine(bms=BMS)
    st = put(PackState("house"), soc_pct=5.0)
    st.cell_v = [3.3] * 16
    st.cell_v[9], st.cell_v[2] = 3.8, 3.7
    st.derive()
    hold(eng, st, 1000.0, 1003.0)
    eng.bms_flag(0, 1004.0, True, 1.0)
    eng.comm(1005.0, False)
    act = eng.active()
    assert [(a["code"], a.get("cell")) for a in act] == [
        ("bms_cell_ov", None), ("cell_over_voltage", 3), ("cell_over_voltage", 10),
        ("comm_lost", None), ("low_soc", None)]
    assert act[1] == {
        "code": "cell_over_voltage", "severity": "alarm", "source": "gateway",
        "since": "1970-01-01T00:16:42.000Z", "value": 3.7, "limit": 3.65, "cell": 3,
        "message": "cell 3 over voltage: 3.7 V > 3.65 V"}
    assert act[4]["message"] == "low state of charge: 5 % < 10 %"
    assert "sensor" not in act[4] and "cell" not in act[4]


def test_clear_all() -> None:
    eng = engine(bms=BMS)
    st = put(PackState("house"), soc_pct=5.0)
    hold(eng, st, 0.0, 3.0)
    eng.bms_flag(1, 3.0, True, 1.0)
    eng.events.clear()
    eng.clear_all(4.0)
    assert sorted((e.code, e.state, e.ts) for e in eng.events) == [
        ("bms_comm", "cleared", 4.0), ("low_soc", "cleared", 4.0)]
    assert eng.active() == []


# ---------------------------------------------------------------- replay and speed


def test_same_input_gives_same_events() -> None:
    def replay() -> list[FaultEvent]:
        eng = engine()
        st = put(PackState("house"), current_a=10.0)
        out: list[FaultEvent] = []
        for i, ts in enumerate(ticks(0.0, 60.0)):
            put(st, temp_max_c=40.0 + (i % 97) / 10, soc_pct=20.0 - i / 50)
            eng.evaluate(ts, st)
            out += eng.events
            eng.events.clear()
        return out

    first = replay()
    assert first and first == replay()


class CountingList(list[float | None]):
    """A cell list that counts how many of its values are read by iteration."""

    reads = 0

    def __iter__(self) -> Iterator[float | None]:
        for v in super().__iter__():
            CountingList.reads += 1
            yield v


def test_evaluate_is_cheap_with_192_healthy_cells() -> None:
    """Healthy cells far from every limit are judged by the pack's extremes: a tick does
    not walk the 192 cells (counted in frame time, not timed on the wall clock)."""
    eng = engine()
    st = put(PackState("house"), current_a=20.0, voltage_v=620.0, soc_pct=60.0,
             charge_current_limit_a=100.0, discharge_current_limit_a=150.0)
    st.cell_v = [3.30 + (i % 7) / 1000 for i in range(192)]
    st.cell_t = [25.0] * 48
    st.derive()
    st.cell_v, st.cell_t = CountingList(st.cell_v), CountingList(st.cell_t)
    n = 2000
    CountingList.reads = 0
    for ts in ticks(0.0, n * TICK):
        eng.evaluate(ts, st)
    per_call = CountingList.reads / n
    assert eng.events == []
    # about one value per element rule (six by default), to see that the list is
    # populated; walking the cells would read 192 + 48 per rule
    assert per_call <= 8, f"{per_call:.0f} cell values read per evaluate()"
