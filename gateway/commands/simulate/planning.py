"""Frame plans: for every DBC message the profile reads, the frame variants it needs (one
per mux value, per cell-index value, or one) and the writers that put simulated values into
them, each inverting the profile's conversion back to the DBC's physical value."""

from __future__ import annotations

import ast
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cantools.database import Database
from cantools.database.can import Message, Signal

from gateway.commands.simulate.physics import Snapshot
from gateway.config import BmsFault, CellSource, PackConfig, Problem, ValueSpec, nearest
from gateway.decode.dbc import mux_signal
from gateway.model import FIELD_BY_NAME
from gateway.normalize.cells import (
    CellSlot,
    cell_bits,
    cell_slots,
    cells_per_group,
    is_pattern,
    matching,
)
from gateway.normalize.expr import ExprError, evaluate

log = logging.getLogger("gateway.simulate")

MAX_VARIANTS = 1024
_STATE_FALLBACK: dict[str, tuple[str, ...]] = {
    "charging": ("charging", "balancing", "idle", "standby"),
    "discharging": ("discharging", "idle", "standby"),
    "standby": ("standby", "idle", "init"),
    "error": ("error", "shutdown"),
}


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
    """Model value -> the value of `spec`'s expression (inverse of normalize.expr.linear)."""
    f, o = spec.factor_offset()
    scale, offset, sign = spec.scale or 1.0, spec.offset, -1.0 if spec.invert else 1.0

    def inv(v: float) -> float:
        return ((v * sign - o) / f - offset) / scale

    return inv


def _linear_expr(expr: str, msg: Message) -> tuple[Signal, float, float] | None:
    """An expression over one signal, if affine in it: (signal, a, b) with value = a + b*x."""
    try:
        tree = ast.parse(expr, mode="eval")
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - {"min", "max", "abs"}
        if len(names) != 1:
            return None
        name = names.pop()
        sig = next(s for s in msg.signals if s.name == name)
        y0, y1, y2 = (evaluate(tree, {name: x}.__getitem__) for x in (0.0, 1.0, 2.0))
    except (SyntaxError, ValueError, KeyError, StopIteration, ZeroDivisionError, TypeError,
            ExprError):
        return None
    b = y1 - y0
    if b == 0 or abs((y2 - y0) - 2 * b) > 1e-9 * max(1.0, abs(b)):
        return None
    return sig, y0, b


@dataclass(slots=True)
class Variant:
    selector: dict[str, float]  # mux / index signal values that pick this frame
    writers: list[Writer] = field(default_factory=list)
    mux: int | None = None


@dataclass(slots=True)
class FramePlan:
    msg: Message
    arbitration_id: int
    defaults: dict[str, float]
    common: list[Writer] = field(default_factory=list)
    variants: dict[tuple[tuple[str, float], ...], Variant] = field(default_factory=dict)
    mux_writers: list[tuple[frozenset[int], Writer]] = field(default_factory=list)
    every: int = 1  # steps between (sweeps of) frames
    offsets: list[int] = field(default_factory=list)  # per variant: step offset in the sweep

    def variant(self, selector: dict[str, float], mux: int | None) -> Variant:
        key = tuple(sorted(selector.items()))
        v = self.variants.get(key)
        if v is None:
            v = self.variants[key] = Variant(dict(selector), mux=mux)
        return v

    def encode(self, snap: Snapshot, var: Variant) -> bytes:
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


class PlanBuilder:
    """Turns a profile plus its DBCs into one `FramePlan` per message it reads."""

    def __init__(self, pack: PackConfig, dbs: list[Database], cells: int, sensors: int,
                 problems: list[Problem]) -> None:
        self.pack = pack
        self.dbs = dbs
        self.cells = cells
        self.sensors = sensors
        self.problems = problems
        self.file = str(pack.profile.path)
        self.plans: dict[str, FramePlan] = {}

    def plan(self, key: str, name: str) -> FramePlan | None:
        if name in self.plans:
            return self.plans[name]
        for db in self.dbs:
            try:
                msg = db.get_message_by_name(name)
            except KeyError:
                continue
            defaults = {s.name: _default(s) for s in msg.signals}
            p = FramePlan(msg, msg.frame_id + self.pack.id_offset, defaults)
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

    def add(self, plan: FramePlan, sig: Signal, w: Writer) -> None:
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
        if spec.sources:  # the simulated BMS sends every source, each with the value
            for sub in spec.sources:
                self.field(name, sub)
            return
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
            if isinstance(spec, str) and is_pattern(spec):
                return matching(msg, spec)
            names = (spec,) if isinstance(spec, str) else spec
            return [s for s in msg.signals if s.name in names]

        values = select(src.signals)
        invalid = select(src.invalid) if src.invalid else []
        idx_sig = None
        if src.index_signal is not None:
            idx_sig = self.signal(f"{src.key}.index", msg, src.index_signal)
            if idx_sig is None:
                return
        # per group: (slot number as normalize computes it, value signal, invalid signal);
        # a layout normalize rejects is simulated as far as it goes
        plans, _ = cell_slots(src, values, invalid)
        count = self.cells if kind != "temps" else self.sensors
        per_group = cells_per_group(src, kind, plans)
        stride = per_group if src.stride is None else src.stride

        def add_variant(selector: dict[str, float], mux: int | None,
                        cells: list[CellSlot]) -> None:
            # cells: (0-based element index of the signal's first element, signal, invalid)
            live = [(i, s, inv) for i, s, inv in cells if 0 <= i < count]
            if not live:
                return
            var = plan.variant(selector, mux)
            var.writers.append(self._cell_writer(kind, src, live))

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
                     live: list[CellSlot]) -> Writer:
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
                    n = cell_bits(src, kind, sig)
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
