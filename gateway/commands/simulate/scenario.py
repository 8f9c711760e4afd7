"""The simulator's scenario file (docs/simulate.md): timed events injected into the pack
model, and overrides of the pack's chemistry, capacity, SoC, temperature and current cycle."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.config import ConfigError, Problem, nearest, read_yaml

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


def parse_scenario(data: Any, file: str, problems: list[Problem]) -> Scenario:
    def bad(key: str, what: str, fix: str = "") -> None:
        problems.append(Problem(file, key, what, fix))

    top: dict[str, Any] = {}
    if data is None:
        data = []
    if isinstance(data, list):
        top = {"events": data}
    elif isinstance(data, dict):
        top = data
        for k in top:
            if k not in _TOP_KEYS:
                bad(str(k), "unknown key", nearest(str(k), _TOP_KEYS)
                    or f"allowed keys: {', '.join(sorted(_TOP_KEYS))}")
    else:
        bad("(top level)", "must be a list of events or a mapping with `events:`",
            "e.g. - {at: 10, silent: {for: 8}}")

    def number(obj: dict[str, Any], key: str, name: str, lo: float | None = None,
               required: bool = False) -> float | None:
        v = obj.get(name)
        if v is None:
            if required:
                bad(key, f"needs `{name}`")
            return None
        if not _num(v) or (lo is not None and v < lo):
            bad(f"{key}.{name}", f"must be a number{f' >= {lo}' if lo is not None else ''}, "
                f"got {v!r}")
            return None
        return float(v)

    chem = top.get("chemistry")
    if chem is not None and chem not in CHEM_ALIAS:
        bad("chemistry", f"unknown chemistry {chem!r}", f"one of {', '.join(CHEM_ALIAS)}")
        chem = None
    cycle: tuple[tuple[float, float], ...] | None = None
    if top.get("cycle") is not None:
        raw_cycle = top["cycle"]
        steps: list[tuple[float, float]] = []
        if not isinstance(raw_cycle, list) or not raw_cycle:
            bad("cycle", "must be a list of {amps, for} steps", "e.g. [{amps: 40, for: 60}]")
        else:
            for i, st in enumerate(raw_cycle):
                k = f"cycle[{i}]"
                if not isinstance(st, dict) or set(st) - {"amps", "for"}:
                    bad(k, "must be a mapping {amps: A, for: s}")
                    continue
                a, d = number(st, k, "amps", required=True), number(st, k, "for", 0.1, True)
                if a is not None and d is not None:
                    steps.append((a, d))
        cycle = tuple(steps) or None
    cells = top.get("cells")
    sensors = top.get("sensors")
    for name, v in (("cells", cells), ("sensors", sensors)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            bad(name, f"must be a whole number >= 1, got {v!r}")
    events: list[Event] = []
    raw_events = top.get("events") or []
    if not isinstance(raw_events, list):
        bad("events", "must be a list", "e.g. events: [{at: 10, silent: {for: 8}}]")
        raw_events = []
    for i, item in enumerate(raw_events):
        k = f"events[{i}]" if isinstance(data, dict) else f"[{i}]"
        if not isinstance(item, dict):
            bad(k, f"must be a mapping, got {item!r}", "e.g. {at: 10, current: 80}")
            continue
        at = number(item, k, "at", 0.0, required=True)
        actions = [a for a in item if a != "at"]
        if len(actions) != 1:
            bad(k, f"needs exactly one action besides `at`, got {actions or 'none'}",
                "one of current, soc, cell_drift, sensor_open, silent, bms_fault")
            continue
        act = str(actions[0])
        arg = item[act]
        ka = f"{k}.{act}"
        if at is None:
            continue
        if act == "current":
            if arg == "auto":
                events.append(Event(at, "current", amps=None))
            elif _num(arg):
                events.append(Event(at, "current", amps=float(arg)))
            else:
                bad(ka, f"must be amps (+ = charging) or 'auto', got {arg!r}")
            continue
        if act == "soc":
            if _num(arg) and 0 <= arg <= 100:
                events.append(Event(at, "soc", value=float(arg)))
            else:
                bad(ka, f"must be a percentage 0..100, got {arg!r}")
            continue
        if act not in _EVENT_KEYS:
            bad(ka, "unknown action", nearest(act, [*_EVENT_KEYS, "current", "soc"])
                or "one of current, soc, cell_drift, sensor_open, silent, bms_fault")
            continue
        if not isinstance(arg, dict):
            bad(ka, f"must be a mapping, got {arg!r}", "see docs/simulate.md")
            continue
        for kk in arg:
            if kk not in _EVENT_KEYS[act]:
                bad(f"{ka}.{kk}", "unknown key", nearest(str(kk), _EVENT_KEYS[act])
                    or f"allowed: {', '.join(sorted(_EVENT_KEYS[act]))}")
        for_s = number(arg, ka, "for", 0.0, required=act == "silent")
        if act == "cell_drift":
            cell = arg.get("cell")
            if not isinstance(cell, int) or isinstance(cell, bool) or cell < 1:
                bad(f"{ka}.cell", f"must be a cell number >= 1, got {cell!r}")
                continue
            volts = number(arg, ka, "volts") or 0.0
            vps = number(arg, ka, "volts_per_s") or 0.0
            if not volts and not vps:
                bad(ka, "needs `volts` (a step) or `volts_per_s` (a drift)")
            events.append(Event(at, "cell_drift", for_s, index=cell, volts=volts,
                                volts_per_s=vps))
        elif act == "sensor_open":
            sensor = arg.get("sensor")
            if not isinstance(sensor, int) or isinstance(sensor, bool) or sensor < 1:
                bad(f"{ka}.sensor", f"must be a sensor number >= 1, got {sensor!r}")
                continue
            events.append(Event(at, "sensor_open", for_s, index=sensor))
        elif act == "silent":
            events.append(Event(at, "silent", for_s))
        else:
            code = arg.get("code")
            if not isinstance(code, str) or not code:
                bad(f"{ka}.code", "needs the `code` of one of the profile's `faults:`")
                continue
            events.append(Event(at, "bms_fault", for_s, code=code))
    events.sort(key=lambda e: e.at)
    return Scenario(
        events=tuple(events), chemistry=CHEM_ALIAS[chem] if chem else None, capacity_ah=number(top, "", "capacity_ah", 0.1),
        soc=number(top, "", "soc", 0.0), ambient_c=number(top, "", "ambient_c", -40.0),
        cells=cells if isinstance(cells, int) and not isinstance(cells, bool) and cells > 0
        else None,
        sensors=sensors if isinstance(sensors, int) and not isinstance(sensors, bool)
        and sensors > 0 else None,
        cycle=cycle, path=file,
    )
