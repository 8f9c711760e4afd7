"""The simulator's scenario file (docs/simulate.md): timed events injected into the pack
model, and overrides of the pack's chemistry, capacity, SoC, temperature and current cycle.

Parsed here, with the config and profiles, into a frozen `Scenario`; gateway/commands/
simulate runs it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.config.problems import ConfigError, Problem, Reader, nearest
from gateway.config.yamlsafe import read_yaml

Chemistry = Literal["lfp", "nmc", "lto", "sodium"]  # OCV curves; nca and lmo use nmc
CHEM_ALIAS: dict[str, Chemistry] = {"lfp": "lfp", "nmc": "nmc", "nca": "nmc", "lmo": "nmc",
                                    "lto": "lto", "sodium": "sodium"}


@dataclass(frozen=True, slots=True)
class Event:
    """One timed injection; `for_s` None = until the end."""

    at: float
    kind: Literal["current", "soc", "cell_drift", "sensor_open", "silent", "bms_fault"]
    for_s: float | None = None
    amps: float | None = None  # current: None = back to the cycle
    value: float = 0.0  # soc
    index: int = 0  # cell or sensor, 1-based
    volts: float = 0.0  # cell_drift: step at `at`
    volts_per_s: float = 0.0
    code: str = ""  # bms_fault

    def active(self, t: float) -> bool:
        return self.at <= t + 1e-9 and (self.for_s is None or t + 1e-9 < self.at + self.for_s)


@dataclass(frozen=True, slots=True)
class Scenario:
    events: tuple[Event, ...] = ()
    chemistry: Chemistry | None = None
    capacity_ah: float | None = None
    soc: float | None = None
    ambient_c: float | None = None
    cells: int | None = None
    sensors: int | None = None
    cycle: tuple[tuple[float, float], ...] | None = None
    path: str = ""


_EVENT_KEYS: dict[str, set[str]] = {
    "cell_drift": {"cell", "volts", "volts_per_s", "for"},
    "sensor_open": {"sensor", "for"},
    "silent": {"for"},
    "bms_fault": {"code", "for"},
}
_TOP_KEYS = {"events", "chemistry", "capacity_ah", "soc", "ambient_c", "cells", "sensors",
             "cycle"}


ACTIONS = "one of current, soc, cell_drift, sensor_open, silent, bms_fault"


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_scenario(path: str | Path) -> Scenario:
    """Parse a scenario file; raise ConfigError listing every problem."""
    p = Path(path)
    problems: list[Problem] = []
    data = read_yaml(p, problems)
    if problems:
        raise ConfigError(problems)
    sc = parse_scenario(data, str(p), problems)
    if problems:
        raise ConfigError(problems)
    return sc


def _number(r: Reader, obj: dict[str, Any], key: str, name: str, lo: float | None = None,
            required: bool = False) -> float | None:
    v = obj.get(name)
    if v is None:
        if required:
            r.bad(key, f"needs `{name}`", f"add {name}: <number>")
        return None
    if not _num(v) or (lo is not None and v < lo):
        # a number below its minimum needs another number; anything else, a plain number
        fix = (f"e.g. {name}: {lo:g}" if _num(v) and lo is not None
               else "write a plain number without quotes")
        r.bad(f"{key}.{name}" if key else name,
              f"must be a number{f' >= {lo}' if lo is not None else ''}, got {v!r}", fix)
        return None
    return float(v)


def _cycle(r: Reader, obj: Any) -> tuple[tuple[float, float], ...] | None:
    if obj is None:
        return None
    if not isinstance(obj, list) or not obj:
        r.bad("cycle", "must be a list of {amps, for} steps", "e.g. [{amps: 40, for: 60}]")
        return None
    steps: list[tuple[float, float]] = []
    for i, st in enumerate(obj):
        k = f"cycle[{i}]"
        if not isinstance(st, dict) or set(st) - {"amps", "for"}:
            r.bad(k, "must be a mapping {amps: A, for: s}", "e.g. {amps: -60, for: 60}")
            continue
        a, d = _number(r, st, k, "amps", required=True), _number(r, st, k, "for", 0.1, True)
        if a is not None and d is not None:
            steps.append((a, d))
    return tuple(steps) or None


def parse_scenario(data: Any, file: str, problems: list[Problem]) -> Scenario:
    r = Reader(file, problems)
    top: dict[str, Any] = {}
    if data is None:
        data = []
    if isinstance(data, list):
        top = {"events": data}
    elif isinstance(data, dict):
        top = data
        r.known(top, "", _TOP_KEYS)
    else:
        r.bad("(top level)", "must be a list of events or a mapping with `events:`",
              "e.g. - {at: 10, silent: {for: 8}}")
    chem = top.get("chemistry")
    if chem is not None and chem not in CHEM_ALIAS:
        r.bad("chemistry", f"unknown chemistry {chem!r}", f"one of {', '.join(CHEM_ALIAS)}")
        chem = None
    cycle = _cycle(r, top.get("cycle"))
    cells = r.int_(top, "", "cells", None, lo=1)
    sensors = r.int_(top, "", "sensors", None, lo=1)
    raw_events = top.get("events") or []
    if not isinstance(raw_events, list):
        r.bad("events", "must be a list", "e.g. events: [{at: 10, silent: {for: 8}}]")
        raw_events = []
    events = [ev for i, item in enumerate(raw_events)
              if (ev := _event(r, f"events[{i}]" if isinstance(data, dict) else f"[{i}]", item))
              is not None]
    events.sort(key=lambda e: e.at)
    return Scenario(
        events=tuple(events), chemistry=CHEM_ALIAS[chem] if chem else None,
        capacity_ah=_number(r, top, "", "capacity_ah", 0.1),
        soc=_number(r, top, "", "soc", 0.0), ambient_c=_number(r, top, "", "ambient_c", -40.0),
        cells=cells, sensors=sensors, cycle=cycle, path=file,
    )


def _event(r: Reader, k: str, item: Any) -> Event | None:
    if not isinstance(item, dict):
        r.bad(k, f"must be a mapping, got {item!r}", "e.g. {at: 10, current: 80}")
        return None
    at = _number(r, item, k, "at", 0.0, required=True)
    actions = [a for a in item if a != "at"]
    if len(actions) != 1:
        r.bad(k, f"needs exactly one action besides `at`, got {actions or 'none'}", ACTIONS)
        return None
    act = str(actions[0])
    arg = item[act]
    ka = f"{k}.{act}"
    if at is None:
        return None
    if act == "current":
        if arg == "auto":
            return Event(at, "current", amps=None)
        if _num(arg):
            return Event(at, "current", amps=float(arg))
        r.bad(ka, f"must be amps (+ = charging) or 'auto', got {arg!r}", "e.g. current: -40")
        return None
    if act == "soc":
        if _num(arg) and 0 <= arg <= 100:
            return Event(at, "soc", value=float(arg))
        r.bad(ka, f"must be a percentage 0..100, got {arg!r}", "e.g. soc: 20")
        return None
    if act not in _EVENT_KEYS:
        r.bad(ka, "unknown action", nearest(act, [*_EVENT_KEYS, "current", "soc"]) or ACTIONS)
        return None
    if not isinstance(arg, dict):
        r.bad(ka, f"must be a mapping, got {arg!r}", "see docs/simulate.md")
        return None
    r.known(arg, ka, _EVENT_KEYS[act])
    for_s = _number(r, arg, ka, "for", 0.0, required=act == "silent")
    if act == "cell_drift":
        cell = arg.get("cell")
        if not isinstance(cell, int) or isinstance(cell, bool) or cell < 1:
            r.bad(f"{ka}.cell", f"must be a cell number >= 1, got {cell!r}", "e.g. cell: 3")
            return None
        volts = _number(r, arg, ka, "volts") or 0.0
        vps = _number(r, arg, ka, "volts_per_s") or 0.0
        if not volts and not vps:
            r.bad(ka, "needs `volts` (a step) or `volts_per_s` (a drift)",
                  "e.g. cell_drift: {cell: 3, volts_per_s: 0.01}")
        return Event(at, "cell_drift", for_s, index=cell, volts=volts, volts_per_s=vps)
    if act == "sensor_open":
        sensor = arg.get("sensor")
        if not isinstance(sensor, int) or isinstance(sensor, bool) or sensor < 1:
            r.bad(f"{ka}.sensor", f"must be a sensor number >= 1, got {sensor!r}",
                  "e.g. sensor: 2")
            return None
        return Event(at, "sensor_open", for_s, index=sensor)
    if act == "silent":
        return Event(at, "silent", for_s)
    code = arg.get("code")
    if not isinstance(code, str) or not code:
        r.bad(f"{ka}.code", "needs the `code` of one of the profile's `faults:`",
              "e.g. bms_fault: {code: bms_cell_over_voltage}")
        return None
    return Event(at, "bms_fault", for_s, code=code)
