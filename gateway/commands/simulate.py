"""A virtual BMS: a simple physical pack model sending the CAN frames of any profile.

The profile says where each model value lives in the DBC; the simulator runs that
mapping backwards. For every DBC message the profile reads it builds a plan: the
frame variants it needs (one per mux value, per cell-index value, or one), and the
writers that put simulated values into those frames, each inverting the profile's
conversion (`normalize._linear`: scale, offset, unit, invert) back to the DBC's
physical value before cantools encodes it. Signals the profile does not read are 0
(or their minimum when 0 is out of range).

The model: N cells with an OCV curve (LFP or NMC), IR drop and a per-cell offset that
drifts (seeded RNG, so a seed gives the same frames every time); SoC integrates the
current; temperatures follow |current| with a lag; balancing flags come on for cells
more than 10 mV over the mean while charging. A scenario (docs/simulate.md) injects
timed events: set the current or SoC, drift a cell, open a temperature sensor, stop
sending (the BMS goes silent), or set one of the profile's BMS fault flags.

Everything runs in simulated time: `Simulator.frames()` is a pure function of the
config, scenario, seed and start time; `run_on_bus()` only paces it to the wall clock.
"""

from __future__ import annotations

import ast
import asyncio
import bisect
import fnmatch
import itertools
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import can
from cantools.database import Database
from cantools.database.can import Message, Signal

from gateway.config import (
    BmsFault,
    CellSource,
    ConfigError,
    GatewayConfig,
    PackConfig,
    Problem,
    ValueSpec,
    nearest,
    read_yaml,
)
from gateway.decode.dbc import load_dbc, mux_signal
from gateway.model import FIELD_BY_NAME, Value
from gateway.normalize.compiler import group_by_mux

log = logging.getLogger("gateway.simulate")

SimFrame = tuple[float, int, bytes, bool]  # (ts, arbitration id, data, extended)
Chemistry = Literal["lfp", "nmc", "lto", "sodium"]  # OCV curves; nca and lmo use nmc

DEFAULT_CELLS = 16
SWEEP_S = 1.0  # a multiplexed / per-cell message sends all its frames once per sweep
PACK_PERIOD_S = 0.1  # messages without a DBC cycle time
BALANCE_V = 0.010  # a cell this far over the mean balances while charging
CHARGING_A = 0.5
MAX_VARIANTS = 1024
# Start of `--out` logs when no --start is given: the same command gives the same bytes.
FIXED_START = 1_767_225_600.0  # 2026-01-01T00:00:00Z

_OCV: dict[Chemistry, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "lfp": ((0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100),
            (2.80, 3.05, 3.18, 3.24, 3.27, 3.29, 3.30, 3.31, 3.32, 3.33, 3.34, 3.37, 3.45)),
    "nmc": ((0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100),
            (3.30, 3.45, 3.55, 3.62, 3.67, 3.72, 3.77, 3.83, 3.90, 3.97, 4.06, 4.12, 4.18)),
    "lto": ((0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100),
            (1.80, 2.05, 2.15, 2.22, 2.26, 2.29, 2.32, 2.35, 2.38, 2.42, 2.50, 2.58, 2.68)),
    "sodium": ((0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100),
               (1.80, 2.40, 2.60, 2.80, 2.95, 3.05, 3.15, 3.25, 3.35, 3.50, 3.65, 3.75, 3.85)),
}
_CHEM_ALIAS: dict[str, Chemistry] = {"lfp": "lfp", "nmc": "nmc", "nca": "nmc", "lmo": "nmc",
                                     "lto": "lto", "sodium": "sodium"}
_CHARGE_V = {"lfp": 3.55, "nmc": 4.15, "lto": 2.70, "sodium": 3.85}
_DISCHARGE_V = {"lfp": 2.90, "nmc": 3.20, "lto": 1.90, "sodium": 1.80}
# Default current cycle: (amps, seconds), + = charging.
DEFAULT_CYCLE: tuple[tuple[float, float], ...] = ((40.0, 60.0), (0.0, 15.0), (-60.0, 60.0),
                                                  (0.0, 15.0))
# Normalized state -> states to try in the profile's map, in order.
_STATE_FALLBACK: dict[str, tuple[str, ...]] = {
    "charging": ("charging", "balancing", "idle", "standby"),
    "discharging": ("discharging", "idle", "standby"),
    "standby": ("standby", "idle", "init"),
    "error": ("error", "shutdown"),
}


def ocv(chem: Chemistry, soc: float) -> float:
    xs, ys = _OCV[chem]
    s = min(100.0, max(0.0, soc))
    i = min(len(xs) - 1, max(1, bisect.bisect_left(xs, s)))
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (s - x0) / (x1 - x0)


# ---------------------------------------------------------------- scenario


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
    if chem is not None and chem not in _CHEM_ALIAS:
        bad("chemistry", f"unknown chemistry {chem!r}", f"one of {', '.join(_CHEM_ALIAS)}")
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
        events=tuple(events), chemistry=_CHEM_ALIAS[chem] if chem else None, capacity_ah=number(top, "", "capacity_ah", 0.1),
        soc=number(top, "", "soc", 0.0), ambient_c=number(top, "", "ambient_c", -40.0),
        cells=cells if isinstance(cells, int) and not isinstance(cells, bool) and cells > 0
        else None,
        sensors=sensors if isinstance(sensors, int) and not isinstance(sensors, bool)
        and sensors > 0 else None,
        cycle=cycle, path=file,
    )


# ---------------------------------------------------------------- physical model


@dataclass(slots=True)
class Snapshot:
    """The simulated pack at one instant, in model units (what the gateway should see)."""

    t: float
    fields: dict[str, Value]
    cell_v: list[float]
    cell_t: list[float]
    open_sensors: frozenset[int]  # 0-based
    balancing: list[bool]
    faults: frozenset[str]  # active BMS fault codes


@dataclass(slots=True)
class PackModel:
    cells: int
    sensors: int
    capacity_ah: float
    chemistry: Chemistry
    soc: float
    ambient_c: float
    cycle: tuple[tuple[float, float], ...]
    rng: random.Random
    offsets: list[float] = field(default_factory=list)
    temps: list[float] = field(default_factory=list)
    sensor_offsets: list[float] = field(default_factory=list)
    current: float = 0.0
    hold: float | None = None  # scenario-set current

    def __post_init__(self) -> None:
        self.offsets = [self.rng.uniform(-0.004, 0.004) for _ in range(self.cells)]
        self.sensor_offsets = [self.rng.uniform(-0.8, 0.8) for _ in range(self.sensors)]
        self.temps = [self.ambient_c + o for o in self.sensor_offsets]
        self.current = self._target(0.0)

    @property
    def r_cell(self) -> float:
        return 0.05 / self.capacity_ah  # 0.5 mOhm for a 100 Ah cell

    def _target(self, t: float) -> float:
        if self.hold is not None:
            return self.hold
        total = sum(d for _, d in self.cycle)
        x = t % total if total > 0 else 0.0
        for amps, d in self.cycle:
            if x < d:
                return amps
            x -= d
        return self.cycle[-1][0] if self.cycle else 0.0

    def step(self, t: float, dt: float) -> None:
        target = self._target(t)
        cur = target + (self.rng.gauss(0.0, 0.3) if target else 0.0)
        if (self.soc >= 100.0 and cur > 0) or (self.soc <= 0.0 and cur < 0):
            cur = 0.0
        self.current = cur
        self.soc = min(100.0, max(0.0, self.soc + cur * dt / 3600.0 / self.capacity_ah * 100))
        walk = 0.00002 * math.sqrt(dt)
        self.offsets = [o + self.rng.gauss(0.0, walk) for o in self.offsets]
        k = min(1.0, dt / 60.0)  # thermal time constant 60 s
        for i, temp in enumerate(self.temps):
            goal = self.ambient_c + self.sensor_offsets[i] + 0.08 * abs(cur)
            self.temps[i] = temp + (goal - temp) * k

    def cell_voltages(self) -> list[float]:
        base = ocv(self.chemistry, self.soc) + self.current * self.r_cell
        return [base + o for o in self.offsets]


# ---------------------------------------------------------------- frame plans

Writer = Callable[[Snapshot, dict[str, Any]], None]


def _raw_range(sig: Signal) -> tuple[int, int]:
    if sig.is_signed:
        return -(1 << (sig.length - 1)), (1 << (sig.length - 1)) - 1
    return 0, (1 << sig.length) - 1


def _encodable(sig: Signal, phys: float) -> float:
    """Clamp a physical value to what the signal's bits can carry."""
    if sig.is_float or not math.isfinite(phys):
        return phys if math.isfinite(phys) else 0.0
    scale = float(sig.scale or 1)
    lo, hi = _raw_range(sig)
    raw = round((phys - float(sig.offset)) / scale)
    raw = min(hi, max(lo, raw))
    return raw * scale + float(sig.offset)


def _raw_to_phys(sig: Signal, raw: int) -> float:
    return raw * float(sig.scale or 1) + float(sig.offset)


def _default(sig: Signal) -> float:
    lo, hi = sig.minimum, sig.maximum
    if (lo is None or lo <= 0) and (hi is None or hi >= 0):
        return _encodable(sig, 0.0)
    return _encodable(sig, float(lo if lo is not None else 0.0))


def _inverse(spec: ValueSpec) -> Callable[[float], float]:
    """Model value -> the value of `spec`'s expression (inverse of normalize._linear)."""
    f, o = spec.factor_offset()
    scale, offset, sign = spec.scale or 1.0, spec.offset, -1.0 if spec.invert else 1.0

    def inv(v: float) -> float:
        return ((v * sign - o) / f - offset) / scale

    return inv


def _eval_expr(node: ast.AST, env: dict[str, float]) -> float:
    if isinstance(node, ast.Expression):
        return _eval_expr(node.body, env)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
            and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.BinOp):
        a, b = _eval_expr(node.left, env), _eval_expr(node.right, env)
        ops: dict[type[ast.operator], Callable[[float, float], float]] = {
            ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y,
            ast.Mult: lambda x, y: x * y, ast.Div: lambda x, y: x / y}
        return ops[type(node.op)](a, b)
    if isinstance(node, ast.UnaryOp):
        x = _eval_expr(node.operand, env)
        return -x if isinstance(node.op, ast.USub) else x
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        args = [_eval_expr(a, env) for a in node.args]
        fn: dict[str, Callable[..., float]] = {"min": min, "max": max, "abs": abs}
        return float(fn[node.func.id](*args))
    raise ValueError(type(node).__name__)


def _linear_expr(expr: str, msg: Message) -> tuple[Signal, float, float] | None:
    """An expression over one signal, if affine in it: (signal, a, b) with value = a + b*x."""
    try:
        tree = ast.parse(expr, mode="eval")
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - {"min", "max", "abs"}
        if len(names) != 1:
            return None
        name = names.pop()
        sig = next(s for s in msg.signals if s.name == name)
        y0, y1, y2 = (_eval_expr(tree, {name: x}) for x in (0.0, 1.0, 2.0))
    except (SyntaxError, ValueError, KeyError, StopIteration, ZeroDivisionError, TypeError):
        return None
    b = y1 - y0
    if b == 0 or abs((y2 - y0) - 2 * b) > 1e-9 * max(1.0, abs(b)):
        return None
    return sig, y0, b


@dataclass(slots=True)
class _Variant:
    selector: dict[str, float]  # mux / index signal values that pick this frame
    writers: list[Writer] = field(default_factory=list)
    mux: int | None = None


@dataclass(slots=True)
class _Plan:
    msg: Message
    arbitration_id: int
    defaults: dict[str, float]
    common: list[Writer] = field(default_factory=list)
    variants: dict[tuple[tuple[str, float], ...], _Variant] = field(default_factory=dict)
    mux_writers: list[tuple[frozenset[int], Writer]] = field(default_factory=list)
    every: int = 1  # steps between (sweeps of) frames
    offsets: list[int] = field(default_factory=list)  # per variant: step offset in the sweep

    def variant(self, selector: dict[str, float], mux: int | None) -> _Variant:
        key = tuple(sorted(selector.items()))
        v = self.variants.get(key)
        if v is None:
            v = self.variants[key] = _Variant(dict(selector), mux=mux)
        return v

    def encode(self, snap: Snapshot, var: _Variant) -> bytes:
        values = dict(self.defaults)
        values.update(var.selector)
        for w in self.common:
            w(snap, values)
        for ids, w in self.mux_writers:
            if var.mux in ids:
                w(snap, values)
        for w in var.writers:
            w(snap, values)
        return bytes(self.msg.encode(values, scaling=True, strict=False))


class _Builder:
    """Turns a profile plus its DBCs into one `_Plan` per message it reads."""

    def __init__(self, pack: PackConfig, dbs: list[Database], cells: int, sensors: int,
                 problems: list[Problem]) -> None:
        self.pack = pack
        self.dbs = dbs
        self.cells = cells
        self.sensors = sensors
        self.problems = problems
        self.file = str(pack.profile.path)
        self.plans: dict[str, _Plan] = {}

    def plan(self, key: str, name: str) -> _Plan | None:
        if name in self.plans:
            return self.plans[name]
        for db in self.dbs:
            try:
                msg = db.get_message_by_name(name)
            except KeyError:
                continue
            defaults = {s.name: _default(s) for s in msg.signals}
            p = _Plan(msg, msg.frame_id + self.pack.id_offset, defaults)
            self.plans[name] = p
            return p
        self.problems.append(Problem(self.file, f"{key}.message", f"no message {name!r} in the "
                                     "profile's DBC files"))
        return None

    def signal(self, key: str, msg: Message, name: str) -> Signal | None:
        for s in msg.signals:
            if s.name == name:
                return s
        self.problems.append(Problem(self.file, key, f"message {msg.name!r} has no signal "
                                     f"{name!r}", nearest(name, [s.name for s in msg.signals])))
        return None

    def add(self, plan: _Plan, sig: Signal, w: Writer) -> None:
        """Attach a writer; a signal inside a mux group only goes into that group's frames."""
        muxer = mux_signal(plan.msg)
        if sig.multiplexer_ids and muxer is not None:
            ids = frozenset(int(i) for i in sig.multiplexer_ids)
            for mid in sorted(ids):
                plan.variant({muxer.name: float(mid)}, mid)
            plan.mux_writers.append((ids, w))
        else:
            plan.common.append(w)

    # -- fields
    def field(self, name: str, spec: ValueSpec) -> None:
        if spec.sources:  # the simulated BMS sends the preferred source
            spec = spec.sources[0]
        if spec.message is None:
            return  # a constant in the profile: nothing on the bus
        plan = self.plan(spec.key, spec.message)
        if plan is None:
            return
        msg = plan.msg
        kind = FIELD_BY_NAME[name].kind if name in FIELD_BY_NAME else "float"
        if spec.signal is None:
            assert spec.expr is not None
            lin = _linear_expr(spec.expr, msg)
            if lin is None:
                log.warning("%s: %s: expression %r is not affine in one signal; the simulator "
                            "leaves its signals at their defaults", self.file, spec.key, spec.expr)
                return
            sig, a, b = lin
            inv = _inverse(spec)

            def w_expr(s: Snapshot, vals: dict[str, Any]) -> None:
                v = s.fields.get(name)
                if isinstance(v, (int, float)):
                    vals[sig.name] = _encodable(sig, (inv(float(v)) - a) / b)

            self.add(plan, sig, w_expr)
            return
        found = self.signal(f"{spec.key}.signal", msg, spec.signal)
        if found is None:
            return
        sig = found
        if kind == "enum":
            self.add(plan, sig, self._enum_writer(name, spec, sig))
            return
        if kind == "bool":
            on, off = _flag_raws(spec.bit, spec.values)
            if spec.invert:
                on, off = off, on

            def w_bool(s: Snapshot, vals: dict[str, Any]) -> None:
                v = s.fields.get(name)
                if isinstance(v, bool):
                    vals[sig.name] = _raw_to_phys(sig, on if v else off)

            self.add(plan, sig, w_bool)
            return
        inv = _inverse(spec)

        def w_num(s: Snapshot, vals: dict[str, Any]) -> None:
            v = s.fields.get(name)
            if isinstance(v, (int, float)):
                vals[sig.name] = _encodable(sig, inv(float(v)))

        self.add(plan, sig, w_num)

    def _enum_writer(self, name: str, spec: ValueSpec, sig: Signal) -> Writer:
        choices = {str(v): int(k) for k, v in (sig.choices or {}).items()}
        ours_to_raw: dict[str, int] = {}
        for k, ours in (spec.mapping or {}).items():
            raw = k if isinstance(k, int) else choices.get(str(k))
            if raw is not None:
                ours_to_raw.setdefault(ours, raw)
        if not spec.mapping:
            ours_to_raw = dict(choices)

        def w_enum(s: Snapshot, vals: dict[str, Any]) -> None:
            st = str(s.fields.get(name) or "standby")
            for cand in _STATE_FALLBACK.get(st, (st,)):
                if cand in ours_to_raw:
                    vals[sig.name] = _raw_to_phys(sig, ours_to_raw[cand])
                    return

        return w_enum

    # -- BMS fault flags
    def faults(self, faults: tuple[BmsFault, ...]) -> None:
        by_sig: dict[tuple[str, str], list[BmsFault]] = {}
        for f in faults:
            by_sig.setdefault((f.message, f.signal), []).append(f)
        for (mname, sname), fs in by_sig.items():
            plan = self.plan(fs[0].key, mname)
            if plan is None:
                continue
            sig = self.signal(f"{fs[0].key}.signal", plan.msg, sname)
            if sig is None:
                continue
            _, idle = _flag_raws(None, tuple(v for f in fs for v in (f.values or ())) or None)
            if any(f.bit is not None for f in fs):
                idle = 0
            flags = [(f.code, _flag_raws(f.bit, f.values)[0], f.bit is not None) for f in fs]

            def w_fault(s: Snapshot, vals: dict[str, Any], sig: Signal = sig,
                        flags: list[tuple[str, int, bool]] = flags, idle: int = idle) -> None:
                raw = idle
                for code, on, is_bit in flags:
                    if code in s.faults:
                        raw = (raw | on) if is_bit else on
                vals[sig.name] = _raw_to_phys(sig, raw)

            self.add(plan, sig, w_fault)

    # -- cells
    def cell_source(self, kind: str, src: CellSource) -> None:
        plan = self.plan(src.key, src.message)
        if plan is None:
            return
        msg = plan.msg
        muxer = mux_signal(msg)

        def select(spec: tuple[str, ...] | str) -> list[Signal]:
            if isinstance(spec, str) and any(c in spec for c in "*?["):
                return [s for s in msg.signals if fnmatch.fnmatchcase(s.name, spec)
                        and not s.is_multiplexer]
            names = (spec,) if isinstance(spec, str) else spec
            return [s for s in msg.signals if s.name in names]

        values = select(src.signals)
        invalid = select(src.invalid) if src.invalid else []
        idx_sig = None
        if src.index_signal is not None:
            idx_sig = self.signal(f"{src.key}.index", msg, src.index_signal)
            if idx_sig is None:
                return
        groups, inv_groups = group_by_mux(src, values, invalid)
        # per group: (slot number as normalize computes it, value signal, invalid signal)
        plans: dict[int | None, list[tuple[int, Signal, Signal | None]]] = {}
        for mid, sigs in groups.items():
            invs = inv_groups.get(mid, [])
            if src.order == "name":
                inv_by_num = {_name_number(s.name): s for s in invs}
                plans[mid] = [(n - src.name_base, s, inv_by_num.get(n))
                              for s in sigs if (n := _name_number(s.name)) is not None]
            else:
                by_pos = sorted(sigs, key=lambda s: _pos(s, msg))
                invs = sorted(invs, key=lambda s: _pos(s, msg))
                plans[mid] = [(i, s, invs[i] if len(invs) == len(by_pos) else None)
                              for i, s in enumerate(by_pos)]
        count = self.cells if kind != "temps" else self.sensors

        def bits(sig: Signal) -> int:
            return sig.length if kind == "balancing" and src.bitfield else 1

        per_group = max((sum(bits(s) for _, s, _ in p) for p in plans.values()), default=1)
        stride = per_group if src.stride is None else src.stride

        def add_variant(selector: dict[str, float], mux: int | None,
                        cells: list[tuple[int, Signal, Signal | None]]) -> None:
            # cells: (0-based element index of the signal's first element, signal, invalid)
            live = [(i, s, inv) for i, s, inv in cells if 0 <= i < count]
            if not live:
                return
            var = plan.variant(selector, mux)
            var.writers.append(self._cell_writer(kind, src, live, bits))

        if src.mux and muxer is not None:
            for mid, items in sorted(plans.items(), key=lambda kv: kv[0] or 0):
                if mid is None:
                    continue
                base = src.start(mid, per_group)
                add_variant({muxer.name: float(mid)}, mid,
                            [(base + slot, s, inv) for slot, s, inv in items])
        elif idx_sig is not None:
            items = plans.get(None, [])
            lo_raw, hi_raw = _raw_range(idx_sig)
            v = max(0, lo_raw)
            while v <= hi_raw and v < MAX_VARIANTS:
                base = src.start(v, per_group)
                if items and base + min(slot for slot, _, _ in items) >= count:
                    break
                add_variant({idx_sig.name: _raw_to_phys(idx_sig, v)}, None,
                            [(base + slot, s, inv) for slot, s, inv in items])
                if stride == 0:
                    break
                v += 1
        else:
            items = plans.get(None, [])
            base = src.start(None, per_group)
            add_variant({}, None, [(base + slot, s, inv) for slot, s, inv in items])

    def _cell_writer(self, kind: str, src: CellSource,
                     live: list[tuple[int, Signal, Signal | None]],
                     bits: Callable[[Signal], int]) -> Writer:
        f, o = ValueSpec(key=src.key, unit=src.unit).factor_offset()
        scale = src.scale * f
        inv_on = src.invalid_value
        inv_off = 0 if inv_on != 0 else 1

        def open_value(sig: Signal) -> float:
            # An open sensor reads as the most extreme value the signal can carry
            # (cold first, as an open NTC does) that the gateway will reject.
            lo, hi = _raw_range(sig)
            for raw in (lo, hi):
                phys = _raw_to_phys(sig, raw)
                if not -60.0 <= phys * scale + o <= 150.0:
                    return phys
            return _raw_to_phys(sig, hi)

        def w_cells(snap: Snapshot, vals: dict[str, Any]) -> None:
            for i, sig, inv in live:
                if kind == "balancing":
                    n = bits(sig)
                    raw = 0
                    for j in range(n):
                        if i + j < len(snap.balancing) and snap.balancing[i + j]:
                            raw |= 1 << j
                    vals[sig.name] = _raw_to_phys(sig, raw)
                    continue
                is_open = kind == "temps" and i in snap.open_sensors
                arr = snap.cell_v if kind == "voltages" else snap.cell_t
                if is_open:
                    vals[sig.name] = open_value(sig) if inv is None else _default(sig)
                else:
                    vals[sig.name] = _encodable(sig, (arr[i] - o) / scale)
                if inv is not None:
                    vals[inv.name] = _raw_to_phys(inv, inv_on if is_open else inv_off)

        return w_cells


def _flag_raws(bit: int | None, values: tuple[int, ...] | None) -> tuple[int, int]:
    """(raw value meaning active, raw value meaning inactive) for a flag test."""
    if bit is not None:
        return 1 << bit, 0
    if values:
        idle = next(v for v in itertools.count() if v not in values)
        return values[0], idle
    return 1, 0


_NUM_IN_NAME = re.compile(r"(\d+)(?!.*\d)")


def _name_number(name: str) -> int | None:
    # same rule as normalize._name_number
    base = re.sub(r"_?(invalid|valid|flag|Flag|invalidFlag)+$", "", name)
    m = _NUM_IN_NAME.search(base)
    return int(m.group(1)) if m else None


def _pos(sig: Signal, msg: Message) -> int:
    if sig.byte_order == "little_endian":
        return int(sig.start)
    msb = (sig.start // 8) * 8 + (7 - sig.start % 8)
    return int(msb)


# ---------------------------------------------------------------- simulator


class Simulator:
    """One simulated pack speaking `pack`'s profile."""

    def __init__(self, pack: PackConfig, *, scenario: Scenario | None = None, seed: int = 0,
                 dbs: list[Database] | None = None) -> None:
        self.pack = pack
        self.scenario = scenario or Scenario()
        self.seed = seed
        sc = self.scenario
        prof = pack.profile
        self.cells = sc.cells or pack.cell_count or prof.cell_count or DEFAULT_CELLS
        self.chemistry: Chemistry = sc.chemistry or _CHEM_ALIAS.get(pack.chemistry, "lfp")
        self.capacity_ah = sc.capacity_ah or 100.0
        problems: list[Problem] = []
        if dbs is None:
            dbs = [load_dbc(d) for d in prof.dbc]
        self.sensors = sc.sensors or self._sensor_count(dbs)
        codes = {f.code for f in prof.faults}
        for i, ev in enumerate(sc.events):
            where = sc.path or "scenario"
            if ev.kind == "bms_fault" and ev.code not in codes:
                problems.append(Problem(where, f"events[{i}].bms_fault.code",
                                        f"profile {prof.name!r} has no BMS fault {ev.code!r}",
                                        nearest(ev.code, codes)
                                        or f"its codes: {', '.join(sorted(codes)) or 'none'}"))
            if ev.kind == "cell_drift" and ev.index > self.cells:
                problems.append(Problem(where, f"events[{i}].cell_drift.cell",
                                        f"the pack has {self.cells} cells"))
            if ev.kind == "sensor_open" and ev.index > self.sensors:
                problems.append(Problem(where, f"events[{i}].sensor_open.sensor",
                                        f"the pack has {self.sensors} temperature sensors"))
        b = _Builder(pack, dbs, self.cells, self.sensors, problems)
        for name, spec in prof.fields.items():
            b.field(name, spec)
        for kind, srcs in prof.cells.items():
            for src in srcs:
                b.cell_source(kind, src)
        b.faults(prof.faults)
        if problems:
            raise ConfigError(problems)
        self.plans = sorted(b.plans.values(), key=lambda p: p.arbitration_id)
        self.snapshot: Snapshot | None = None  # the state the latest frames were built from

    def _sensor_count(self, dbs: list[Database]) -> int:
        want = max(4, self.cells // 4)
        for src in self.pack.profile.cells.get("temps", ()):
            for db in dbs:
                try:
                    msg = db.get_message_by_name(src.message)
                except KeyError:
                    continue
                sigs = [s for s in msg.signals if not s.is_multiplexer and (
                    fnmatch.fnmatchcase(s.name, src.signals) if isinstance(src.signals, str)
                    else s.name in src.signals)]
                if not sigs:
                    break
                if src.mux:
                    per = max(1, len([s for s in sigs if s.multiplexer_ids
                                      and s.multiplexer_ids[0] == sigs[0].multiplexer_ids[0]])
                              if sigs[0].multiplexer_ids else len(sigs))
                    return -(-want // per) * per
                if src.index_signal is not None:
                    return -(-want // len(sigs)) * len(sigs)
                return len(sigs)
        return want

    def _model(self) -> PackModel:
        sc = self.scenario
        return PackModel(self.cells, self.sensors, self.capacity_ah, self.chemistry,
                         sc.soc if sc.soc is not None else 60.0,
                         sc.ambient_c if sc.ambient_c is not None else 25.0,
                         sc.cycle or DEFAULT_CYCLE, random.Random(self.seed))

    def _snapshot(self, m: PackModel, t: float, open_sensors: frozenset[int],
                  faults: frozenset[str]) -> Snapshot:
        cv = m.cell_voltages()
        temps = list(m.temps)
        good_t = [x for i, x in enumerate(temps) if i not in open_sensors] or temps
        mean = sum(cv) / len(cv)
        cur = m.current
        charging = cur > CHARGING_A
        bal = [charging and v > mean + BALANCE_V for v in cv]
        lo, hi = min(cv), max(cv)
        n = self.cells
        state = ("error" if faults else "charging" if charging
                 else "discharging" if cur < -CHARGING_A else "standby")
        volts = sum(cv)
        fields: dict[str, Value] = {
            "voltage_v": volts, "current_a": cur, "power_w": volts * cur, "soc_pct": m.soc,
            "soh_pct": 98.0, "temp_min_c": min(good_t), "temp_max_c": max(good_t),
            "cell_count": n, "cell_v_min": lo, "cell_v_max": hi, "cell_v_avg": mean,
            "cell_v_delta": hi - lo, "cell_v_min_id": cv.index(lo) + 1,
            "cell_v_max_id": cv.index(hi) + 1,
            "charge_current_limit_a": 0.5 * m.capacity_ah,
            "discharge_current_limit_a": 1.0 * m.capacity_ah,
            "charge_voltage_limit_v": n * _CHARGE_V[m.chemistry],
            "discharge_voltage_limit_v": n * _DISCHARGE_V[m.chemistry],
            "capacity_ah": m.capacity_ah, "remaining_ah": m.capacity_ah * m.soc / 100.0,
            "cycles": 42, "charge_enabled": True, "discharge_enabled": True,
            "contactor_closed": True, "balancing_active": any(bal), "bms_state": state,
        }
        return Snapshot(t, fields, cv, temps, open_sensors, bal, faults)

    def frames(self, t0: float, duration: float | None,
               period: float = PACK_PERIOD_S) -> Iterator[SimFrame]:
        """Every frame the pack sends from `t0` for `duration` s (None: forever), built on a
        `period` grid. Deterministic: the same arguments give the same frames."""
        if period <= 0:
            msg = "period must be positive"
            raise ValueError(msg)
        m = self._model()
        events = self.scenario.events
        applied = [False] * len(events)
        for p in self.plans:
            cyc = p.msg.cycle_time
            n_var = max(1, len(p.variants))
            per = (cyc / 1000.0 if cyc else PACK_PERIOD_S) if n_var == 1 else \
                max(SWEEP_S, (cyc or 0) / 1000.0)
            p.every = max(1, round(per / period))
            p.offsets = [(j * p.every) // n_var for j in range(n_var)]
        if not self.plans:
            return
        steps: Iterator[int] = (itertools.count() if duration is None
                                else iter(range(max(0, round(duration / period)))))
        for k in steps:
            t = k * period
            if k:
                m.step(t, period)
            for i, ev in enumerate(events):
                if ev.at > t + 1e-9:
                    break
                if ev.kind == "cell_drift" and ev.active(t) and ev.index <= len(m.offsets):
                    if not applied[i]:
                        m.offsets[ev.index - 1] += ev.volts
                    elif k:
                        m.offsets[ev.index - 1] += ev.volts_per_s * period
                if applied[i]:
                    continue
                applied[i] = True
                if ev.kind == "current":
                    m.hold = ev.amps
                    m.current = m._target(t)
                elif ev.kind == "soc":
                    m.soc = ev.value
            active = [ev for ev in events if ev.active(t)]
            if any(ev.kind == "silent" for ev in active):
                continue
            snap = self._snapshot(
                m, t, frozenset(ev.index - 1 for ev in active if ev.kind == "sensor_open"),
                frozenset(ev.code for ev in active if ev.kind == "bms_fault"))
            self.snapshot = snap
            out: list[tuple[int, bytes, bool]] = []
            for p in self.plans:
                phase = k % p.every
                vars_ = list(p.variants.values()) or [_Variant({})]
                for j, var in enumerate(vars_):
                    if p.offsets[j] == phase:
                        out.append((p.arbitration_id, p.encode(snap, var),
                                    bool(p.msg.is_extended_frame)))
            if not out:
                continue
            gap = min(0.0005, period / 2 / len(out))
            base = t0 + t
            for i, (aid, data, ext) in enumerate(out):
                yield round(base + i * gap, 6), aid, data, ext

    async def run_on_bus(self, bus: can.BusABC, speed: float = 1.0,
                         duration: float | None = None, *, period: float = PACK_PERIOD_S,
                         t0: float | None = None) -> int:
        """Send the frames in real time (times `speed`); return how many were sent."""
        if speed <= 0:
            msg = "speed must be positive"
            raise ValueError(msg)
        start = time.time() if t0 is None else t0
        w0 = time.monotonic()
        sent = errors = 0
        for ts, aid, data, ext in self.frames(start, duration, period):
            delay = (ts - start) / speed - (time.monotonic() - w0)
            if delay > 0.001:
                await asyncio.sleep(delay)
            elif sent % 64 == 0:
                await asyncio.sleep(0)  # let the rest of the loop run when behind
            try:
                bus.send(can.Message(timestamp=ts, arbitration_id=aid, data=data,
                                     is_extended_id=ext))
                sent += 1
            except can.CanError as e:
                errors += 1
                if errors in (1, 10, 100) or errors % 10_000 == 0:
                    log.warning("simulator: send failed (%d so far): %s", errors, e)
        if duration is not None:  # a scenario may end silent: still take the full time
            rest = duration / speed - (time.monotonic() - w0)
            if rest > 0:
                await asyncio.sleep(rest)
        return sent


def find_pack(cfg: GatewayConfig, pack_id: str | None) -> PackConfig:
    if pack_id is None:
        return cfg.packs[0]
    for p in cfg.packs:
        if p.id == pack_id:
            return p
    ids = [p.id for p in cfg.packs]
    raise ConfigError([Problem(str(cfg.path), "--pack", f"no pack {pack_id!r}",
                               nearest(pack_id, ids) or f"packs: {', '.join(ids)}")])


def write_candump(frames: Iterator[SimFrame], path: Path, channel: str = "can0") -> int:
    """Write frames as a candump `-l` log; return the number of frames."""
    n = 0
    with path.open("w", encoding="ascii") as f:
        for ts, aid, data, ext in frames:
            ident = f"{aid:08X}" if ext else f"{aid:03X}"
            f.write(f"({ts:.6f}) {channel} {ident}#{data.hex().upper()}\n")
            n += 1
    return n


def log_channel(cfg: GatewayConfig, pack: PackConfig) -> str:
    """candump channel for a pack's frames: `can0` on a one-bus config, else the bus name
    (replay routes frames by it)."""
    return "can0" if len(cfg.buses) <= 1 else pack.bus


def demo_config(cfg: GatewayConfig, channel_prefix: str = "bms-gateway-demo") -> GatewayConfig:
    """The config with every bus replaced by an in-process `virtual` bus."""
    buses = tuple(replace(b, interface="virtual", channel=f"{channel_prefix}-{b.name}",
                          bitrate=None, fd=False, data_bitrate=None, options={})
                  for b in cfg.buses)
    return replace(cfg, buses=buses)


async def run_demo(cfg: GatewayConfig, *, scenario: Scenario | None = None,
                   duration: float | None = None, seed: int = 0,
                   pack_id: str | None = None, stdout: Any = None) -> int:
    """Simulators and the gateway in one process over python-can `virtual` buses."""
    from gateway.runtime.daemon import Daemon

    cfg = demo_config(cfg)
    packs = [find_pack(cfg, pack_id)] if pack_id is not None else list(cfg.packs)
    sims = [Simulator(p, scenario=scenario, seed=seed + i) for i, p in enumerate(packs)]
    d = Daemon(cfg, stdout=stdout)
    serve = asyncio.create_task(d.serve(), name="demo.gateway")
    buses: list[can.BusABC] = []
    sim_tasks: list[asyncio.Task[int]] = []
    try:
        # the gateway's sources must be listening before the first frame is sent
        deadline = time.monotonic() + 10
        while (len(d.rt.sources) < len(cfg.buses)
               or not all(s.opened.is_set() for s in d.rt.sources)):
            if serve.done() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        by_name = {b.name: b for b in cfg.buses}
        for i, (p, sim) in enumerate(zip(packs, sims, strict=True)):
            b = by_name[p.bus]
            bus = can.Bus(interface="virtual", channel=b.channel)
            buses.append(bus)
            sim_tasks.append(asyncio.create_task(sim.run_on_bus(bus, duration=duration),
                                                 name=f"demo.sim[{i}]"))
        waiting: set[asyncio.Task[Any]] = {serve, *sim_tasks}
        while True:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if serve in done or all(t.done() for t in sim_tasks):
                break
            waiting -= done
        if not serve.done():
            await asyncio.sleep(1.5)  # let the last frames reach a publication
            d.stop_event.set()
        return await serve
    finally:
        for t in sim_tasks:
            t.cancel()
        for t in sim_tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception) as e:
                if not isinstance(e, asyncio.CancelledError):
                    log.error("simulator failed: %s", e)
        if not serve.done():
            d.stop_event.set()
            await asyncio.wait({serve}, timeout=cfg.shutdown_timeout_s + 5)
        for bus in buses:
            bus.shutdown()


__all__ = ["Event", "PackModel", "Scenario", "SimFrame", "Simulator", "Snapshot",
           "demo_config", "find_pack", "load_scenario", "log_channel", "ocv", "parse_scenario",
           "run_demo", "write_candump"]
