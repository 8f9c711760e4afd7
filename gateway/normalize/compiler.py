"""Normalize stage: a profile plus its DBCs become one compiled handler per CAN message.

`compile_pack` checks every message and signal the profile names against the DBCs
(a misspelling is a `Problem` naming the nearest real names), then generates, for each
message, a small Python function that extracts just the signals the profile uses and
writes them, converted and range-checked, into the pack's `PackState`. The generated
source contains only numbers and names of our own; nothing from the profile or the DBC
is ever evaluated as code (expressions are parsed with `ast` and re-emitted from a
whitelist of nodes).

The `Compiler` here does fields, extras, BMS flags and trouble codes, and builds the
handlers; beside it: cells.py (where a `cells:` source puts each cell), cellwriter.py
(the code writing them), expr.py (expressions), checks.py (the frames a handler drops:
checksums, rolling counters, validity gates).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cantools.database import Database
from cantools.database.can import Message, Signal

from gateway.config import (
    MAX_CELLS,
    BmsFault,
    CellKind,
    DtcStream,
    FrameCheck,
    PackConfig,
    Problem,
    ValueSpec,
    nearest,
)
from gateway.decode.dbc import (
    BitField,
    DbcError,
    Item,
    MessageLayout,
    MuxStep,
    ReadBits,
    SignalRead,
    Source,
    compile_source,
    load_dbc,
    merge_paths,
    message_key,
    unpack_float,
)
from gateway.model import BMS_STATES, FIELD_BY_NAME, FIELD_INDEX, PackState, Value
from gateway.normalize.cellwriter import PolledWriter, cell_names, compile_cells, polled_writer
from gateway.normalize.checks import (
    CHECK_FUNCTIONS,
    GateSpec,
    compile_check,
    compile_gate,
    emit_checks,
    emit_gates,
)
from gateway.normalize.expr import ExprError, linear, literal, parse, to_python

log = logging.getLogger("gateway.normalize")

# Plausibility ranges applied when the profile gives none (model units).
DEFAULT_VALID: dict[str, tuple[float, float]] = {
    "voltage_v": (0.0, 1500.0), "current_a": (-5000.0, 5000.0), "power_w": (-2e6, 2e6),
    "soc_pct": (0.0, 100.0), "soh_pct": (0.0, 110.0), "temp_min_c": (-60.0, 150.0),
    "temp_max_c": (-60.0, 150.0), "cell_count": (1, MAX_CELLS),
    "cell_v_min": (0.0, 6.0), "cell_v_max": (0.0, 6.0), "cell_v_avg": (0.0, 6.0),
    "cell_v_delta": (0.0, 6.0), "charge_current_limit_a": (-5000.0, 5000.0),
    "discharge_current_limit_a": (-5000.0, 5000.0), "charge_voltage_limit_v": (0.0, 1500.0),
    "discharge_voltage_limit_v": (0.0, 1500.0), "capacity_ah": (0.0, 1e5),
    "remaining_ah": (0.0, 1e5), "cycles": (0, 1e7),
}

# (fault index, ts, active, raw value, cell number or None)
FaultHook = Callable[[int, float, bool, float, int | None], None]
DtcHook = Callable[[int, float, int], None]  # (stream index, ts, trouble code)


@dataclass(slots=True)
class PackCounters:
    frames: int = 0
    short_frames: int = 0
    gated: int = 0  # frames ignored by a validity gate (format 2 `gates`)
    bad_checksum: int = 0  # frames dropped: checksum wrong (format 2 `checks`)
    bad_counter: int = 0  # frames dropped: rolling counter repeated or jumped
    implausible: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class LivePack:
    """A pack's compiled frame handlers and the live state they write: the pack state,
    counters, implausible counts, BMS flag memory and the fault stage's hooks. A reload
    that keeps the pack's identity compiles new handlers onto the same live state."""

    cfg: PackConfig
    state: PackState
    handlers: dict[int, Callable[[float, bytes], None]]
    counters: PackCounters
    implausible: list[int]  # per model slot; cells use the last three slots
    sources: dict[int, str]  # frame key -> message name, for `decode` and logs
    fault_hook: list[FaultHook | None]  # set by the fault stage; list so handlers see it
    code: dict[int, str] = field(default_factory=dict)  # frame key -> generated source
    # frame key -> the bits its handler reads (None: any bit may count); receive: bcm
    reads: dict[int, ReadBits | None] = field(default_factory=dict)
    # the times within which a frame must be seen again (stale_after_s, `fresh_s`s,
    # DTC streams' clear_after_s): receive: bcm feeds its last frames again well within
    windows: tuple[float, ...] = ()
    # format 2 `dtcs`: the streams with their DBC value tables, and the fault stage's hook
    dtc_streams: list[tuple[DtcStream, dict[int, str]]] = field(default_factory=list)
    dtc_hook: list[DtcHook | None] = field(default_factory=lambda: [None])
    # Below: what `prime_state` writes into the state (the profile's constants and
    # layout), kept so a reload can apply it to a state it keeps.
    fault_state: list[bool] = field(default_factory=list)  # last BMS flag seen, per fault
    constants: dict[int, Value] = field(default_factory=dict)
    extra_consts: dict[str, Value] = field(default_factory=dict)

    # cells written by something other than a frame handler (`cell_writer`), by kind
    cell_writers: dict[str, PolledWriter] = field(default_factory=dict)

    def cell_writer(self, kind: CellKind) -> PolledWriter:
        """The writer of cells of `kind` read by something other than the frame handlers
        (an ISO-TP answer): generated on first use by the rules of the handlers' cell
        code (normalize/cellwriter.py), bound to this state."""
        w = self.cell_writers.get(kind)
        if w is None:
            w = self.cell_writers[kind] = polled_writer(self.cfg, kind, self.state,
                                                        self.implausible)
        return w

    def implausible_counts(self) -> dict[str, int]:
        names = [*FIELD_INDEX, "cell_voltage", "cell_temp", "extra"]
        return {n: c for n, c in zip(names, self.implausible, strict=False) if c}


class Compiler:
    """Checks a profile's parts against the DBCs and collects, per message, the code
    generators (`Item`s) its handler runs; `build` generates the handlers."""

    def __init__(self, cfg: PackConfig, dbs: list[tuple[str, Database]],
                 problems: list[Problem]) -> None:
        self.cfg = cfg
        self.dbs = dbs
        self.problems = problems
        self.file = str(cfg.profile.path)
        self.msgs: dict[str, list[Item]] = {}
        self.msg_objs: dict[str, Message] = {}
        self.layouts: dict[str, MessageLayout] = {}
        self.gates: list[Callable[[Source, int], int]] = []
        # format 2 `gates`: (state message, state signal, values, ignored messages or None)
        self.gate_specs: list[GateSpec] = []
        self.checks: dict[str, tuple[FrameCheck, SignalRead | None, SignalRead | None]] = {}
        self.counters = PackCounters()
        self.code: dict[int, str] = {}  # frame key -> generated source
        self.reads: dict[int, ReadBits | None] = {}
        self.windows: list[float] = [cfg.stale_after_s]  # see LivePack.windows
        self.constants: dict[int, Value] = {}
        self.extra_consts: dict[str, Value] = {}
        self.dtc_streams: list[tuple[DtcStream, dict[int, str]]] = []
        self.dtc_hook: list[DtcHook | None] = [None]
        # ungated, unmultiplexed BMS flags (item id -> the fields they read): `_emit_items`
        self.flag_reads: dict[int, tuple[BitField, ...]] = {}

    # -- lookups with helpful errors
    def message(self, key: str, name: str) -> Message | None:
        if name in self.msg_objs:
            return self.msg_objs[name]
        for _, db in self.dbs:
            try:
                m = db.get_message_by_name(name)
            except KeyError:
                continue
            self.msg_objs[name] = m
            return m
        allm = [m.name for _, db in self.dbs for m in db.messages]
        files = ", ".join(p for p, _ in self.dbs) or "(no DBC)"
        self.problems.append(Problem(self.file, f"{key}.message",
                                     f"no message {name!r} in {files}",
                                     nearest(name, allm) or "check the DBC's BO_ lines"))
        return None

    def signal(self, key: str, msg: Message, name: str) -> Signal | None:
        for s in msg.signals:
            if s.name == name:
                return s
        self.problems.append(Problem(
            self.file, key, f"message {msg.name!r} has no signal {name!r}",
            nearest(name, [s.name for s in msg.signals])
            or f"its signals: {', '.join(s.name for s in msg.signals[:12])}"))
        return None

    def layout(self, msg: Message) -> MessageLayout:
        got = self.layouts.get(msg.name)
        if got is None:
            got = self.layouts[msg.name] = MessageLayout(msg)
        return got

    def add(self, msg: Message, key: str, path: tuple[MuxStep, ...], fn: Callable[[Source, int], None],
            muxers: tuple[str, ...] = ()) -> None:
        gates = list(self.gates)
        if gates:  # conditions around the code (format 2: fresh sources, validity gates)
            inner = fn

            def fn(g: Source, ind: int) -> None:
                for gate in gates:
                    ind = gate(g, ind)
                inner(g, ind)
        self.msgs.setdefault(msg.name, []).append(Item(key, path, fn, muxers))

    def with_sources(self, spec: ValueSpec, compile_one: Callable[[ValueSpec], None]) -> None:
        """`sources: [...]`: each source writes only while no source before it is fresh."""
        window = spec.fresh_s or self.cfg.stale_after_s
        self.windows.append(window)
        seen = [-math.inf] * len(spec.sources)  # frame time each source was last present

        for i, sub in enumerate(spec.sources):
            def gate(g: Source, ind: int, i: int = i) -> int:
                t = g.const(seen, "seen")
                g.emit(ind, f"{t}[{i}] = ts")
                if i == 0:
                    return ind
                fresher = " or ".join(f"ts - {t}[{j}] <= {window!r}" for j in range(i))
                g.emit(ind, f"if not ({fresher}):  # a source before this one is fresh")
                return ind + 1
            self.gates.append(gate)
            try:
                compile_one(sub)
            finally:
                self.gates.pop()

    def find_read(self, msg: Message, name: str) -> SignalRead | tuple[str, str]:
        """The occurrence of signal `name` that cantools reports, or (problem, fix)."""
        reads = self.layout(msg).by_name.get(name)
        if reads and len(reads) == 1:
            return reads[0]
        if reads:
            return (f"message {msg.name!r} has {len(reads)} signals named {name!r} in "
                    "different multiplexer branches",
                    "rename them apart in your copy of the DBC")
        sig = next((s for s in msg.signals if s.name == name), None)
        if sig is not None:
            if sig.multiplexer_signal is not None and \
                    sig.multiplexer_signal not in self.layout(msg).muxers:
                return (f"signal {name!r} of {msg.name!r} is under multiplexer "
                        f"{sig.multiplexer_signal!r}, which the message does not have or "
                        "which lies beyond it: cantools never decodes it",
                        "fix the multiplexer's name (or length) in the DBC")
            return (f"signal {name!r} of {msg.name!r} lies beyond the message's "
                    f"{msg.length} bytes", "fix the message length or the signal in the DBC")
        return (f"message {msg.name!r} has no signal {name!r}",
                nearest(name, [s.name for s in msg.signals])
                or f"its signals: {', '.join(s.name for s in msg.signals[:12])}")

    def read(self, key: str, msg: Message, name: str) -> SignalRead | None:
        got = self.find_read(msg, name)
        if isinstance(got, tuple):
            self.problems.append(Problem(self.file, key, *got))
            return None
        return got

    def together(self, key: str, msg: Message, reads: list[SignalRead]) -> tuple[MuxStep, ...] | None:
        """The multiplexer path under which all `reads` are present (a problem if none)."""
        path: tuple[MuxStep, ...] | None = ()
        for r in reads:
            assert path is not None
            path = merge_paths(path, r.path)
            if path is None:
                self.problems.append(Problem(
                    self.file, key, f"signals {', '.join(sorted({x.name for x in reads}))} of "
                    f"{msg.name!r} are in different multiplexer branches: no frame carries "
                    "them all", "read them in separate entries (cells: `mux: true`)"))
                return None
        return path

    # -- value expressions
    def value_expr(self, spec: ValueSpec, msg: Message, g: Source) -> tuple[str, tuple[MuxStep, ...]] | None:
        """Python expression for the spec's value in model units and the multiplexer
        path under which it is present, or None on error."""
        if spec.const is not None:
            return repr(spec.const), ()
        if spec.signal is not None:
            r = self.read(f"{spec.key}.signal", msg, spec.signal)
            if r is None:
                return None
            expr, path = g.read(r.field), r.path
        else:
            assert spec.expr is not None
            got = self.safe_expr(spec, msg, g)
            if got is None:
                return None
            expr, path = got
        return linear(expr, spec), path

    def safe_expr(self, spec: ValueSpec, msg: Message | None, g: Source | None,
                  cross: Callable[[str, str], str] | None = None,
                  ) -> tuple[str, tuple[MuxStep, ...]] | None:
        """The expression as Python over whitelisted nodes. Bare names are signals of
        `msg`; with `cross`, names are `Message.Signal` and `cross` gives their code."""
        tree = parse(spec.expr or "")
        if isinstance(tree, tuple):
            self.problems.append(Problem(self.file, f"{spec.key}.expr", *tree))
            return None
        used: list[SignalRead] = []

        def name(signal: str) -> str:
            if msg is None or g is None:
                raise ExprError(f"{signal!r} names no message",
                                "write Message.Signal, or give the field a `message:`")
            got = self.find_read(msg, signal)
            if isinstance(got, tuple):
                raise ExprError(*got)
            used.append(got)
            return g.read(got.field)

        try:
            expr = to_python(tree, name, cross)
        except ExprError as e:
            self.problems.append(Problem(self.file, f"{spec.key}.expr", e.args[0], e.args[1]))
            return None
        if msg is None:
            return expr, ()
        path = self.together(f"{spec.key}.expr", msg, used)
        return None if path is None else (expr, path)

    def cross_expr(self, spec: ValueSpec, target: str, impl: str, lo: float, hi: float,
                   is_int: bool) -> None:
        """An expression over signals of several messages (`Message.Signal`): each
        message's handler stores its inputs, then computes the value if every input is
        fresh (seen within fresh_s), else the value is null."""
        refs: dict[tuple[str, str], int] = {}
        reads: list[tuple[Message, SignalRead]] = []
        failed = False

        def cross(message: str, signal: str) -> str:
            nonlocal failed
            k = refs.get((message, signal))
            if k is None:
                msg = self.message(f"{spec.key}.expr", message)
                rd = self.read(f"{spec.key}.expr", msg, signal) if msg is not None else None
                if msg is None or rd is None:
                    failed = True
                    return "0"
                k = refs[(message, signal)] = len(reads)
                reads.append((msg, rd))
            return f"XV[{k}]"

        got = self.safe_expr(spec, None, None, cross)
        if got is None or failed:
            return
        if len({m.name for m, _ in reads}) < 2:
            self.problems.append(Problem(self.file, f"{spec.key}.expr",
                                         "names signals of one message only",
                                         "give `message:` and bare signal names"))
            return
        expr = linear(got[0], spec)
        window = spec.fresh_s or self.cfg.stale_after_s
        self.windows.append(window)
        values: list[float | None] = [None] * len(reads)
        seen = [-math.inf] * len(reads)
        for k, (msg, rd) in enumerate(reads):
            def gen(g: Source, ind: int, k: int = k, rd: SignalRead = rd) -> None:
                xv, xt = g.const(values, "xv"), g.const(seen, "xt")
                g.emit(ind, f"{xv}[{k}] = {g.read(rd.field)}")
                g.emit(ind, f"{xt}[{k}] = ts")
                fresh = " and ".join(f"ts - {xt}[{j}] <= {window!r}" for j in range(len(reads)))
                g.emit(ind, f"if {fresh}:")
                g.emit(ind + 1, "try:")
                g.emit(ind + 2, f"v = {expr.replace('XV[', f'{xv}[')}")
                g.emit(ind + 1, "except ZeroDivisionError:")
                g.emit(ind + 2, "v = None")
                g.emit(ind, "else:  # an input is stale")
                g.emit(ind + 1, "v = None")
                g.emit(ind, f"if v is not None and not {literal(lo)} <= v <= {literal(hi)}:")
                g.emit(ind + 1, f"IMPL[{impl}] += 1")
                g.emit(ind, "else:")
                if is_int:
                    g.emit(ind + 1, "v = None if v is None else int(v)")
                current = target.replace("X[", "X.get(").replace("]", ")") \
                    if target.startswith("X[") else target
                g.emit(ind + 1, f"if {current} != v:")
                g.emit(ind + 2, f"{target} = v")
                g.emit(ind + 2, "st.changed = True")
            self.add(msg, spec.key, rd.path, gen)

    # -- profile parts
    def field(self, name: str, spec: ValueSpec) -> None:
        if spec.sources:
            self.with_sources(spec, lambda sub: self.field(name, sub))
            return
        info = FIELD_BY_NAME[name]
        slot = FIELD_INDEX[name]
        if spec.message is None and spec.expr is not None:
            if info.kind in ("enum", "bool"):
                self.problems.append(Problem(self.file, f"{spec.key}.expr",
                                             f"{name} is a {info.kind}: it needs a `message`",
                                             "add message: and a signal"))
                return
            lo, hi = spec.valid or DEFAULT_VALID.get(name, (float("-inf"), float("inf")))
            self.cross_expr(spec, f"V[{slot}]", str(slot), lo, hi, info.kind == "int")
            return
        if spec.message is None:  # constant
            self.constants[slot] = spec.const
            return
        msg = self.message(spec.key, spec.message)
        if msg is None:
            return
        if spec.sentinel and info.kind in ("enum", "bool"):
            self.problems.append(Problem(self.file, f"{spec.key}.sentinel",
                                         f"{name} is a {info.kind}: sentinels apply to numbers",
                                         "map the value in `map:`/`values:` instead"))
            return
        if info.kind == "enum":
            self.enum_field(slot, spec, msg)
            return
        if info.kind == "bool":
            self.bool_field(slot, spec, msg)
            return
        lo, hi = spec.valid or DEFAULT_VALID.get(name, (float("-inf"), float("inf")))
        self.number(spec, msg, f"V[{slot}]", f"V[{slot}]", slot, (lo, hi), info.kind == "int")

    def extra(self, name: str, spec: ValueSpec) -> None:
        if spec.sources:
            self.with_sources(spec, lambda sub: self.extra(name, sub))
            return
        if spec.message is None and spec.expr is not None:
            lo, hi = spec.valid or (float("-inf"), float("inf"))
            self.cross_expr(spec, f"X[{name!r}]", str(len(FIELD_INDEX) + 2), lo, hi, False)
            return
        msg = self.message(spec.key, spec.message) if spec.message else None
        if spec.message is None:
            self.extra_consts[name] = spec.const
            return
        if msg is None:
            return
        self.number(spec, msg, f"X[{name!r}]", f"X.get({name!r})", len(FIELD_INDEX) + 2,
                    spec.valid or (float("-inf"), float("inf")), False)

    def number(self, spec: ValueSpec, msg: Message, target: str, current: str, impl: int,
               valid: tuple[float, float], is_int: bool) -> None:
        """A number from `msg` written to `target` (read back as `current`) when in the
        `valid` range, else counted in IMPL[impl]."""
        got = self.value_expr(spec, msg, Source(self.layout(msg)))
        if got is None:
            return
        lo, hi = valid

        def gen(g: Source, ind: int) -> None:
            expr = self.value_expr(spec, msg, g)
            assert expr is not None
            g.emit(ind, f"v = {expr[0]}")
            g.emit(ind, f"if {literal(lo)} <= v <= {literal(hi)}:")  # NaN fails: int() would raise
            if is_int:
                g.emit(ind + 1, "v = int(v)")
            g.emit(ind + 1, f"if {current} != v:")
            g.emit(ind + 2, f"{target} = v")
            g.emit(ind + 2, "st.changed = True")
            g.emit(ind, "else:")
            g.emit(ind + 1, f"IMPL[{impl}] += 1")

        self.add_with_sentinel(msg, spec, got[1], gen, target)

    def message_read(self, key: str, message: str, signal: str,
                     ) -> tuple[Message, SignalRead] | None:
        msg = self.message(key, message)
        rd = self.read(f"{key}.signal", msg, signal) if msg is not None else None
        return None if msg is None or rd is None else (msg, rd)

    def add_with_sentinel(self, msg: Message, spec: ValueSpec, path: tuple[MuxStep, ...],
                          gen: Callable[[Source, int], None], target: str) -> None:
        """`sentinel: [...]`: a raw value meaning "not available" makes the value null."""
        rd = self.read(f"{spec.key}.signal", msg, spec.signal) if spec.sentinel and \
            spec.signal else None
        if rd is None:
            self.add(msg, spec.key, path, gen)
            return
        values = frozenset(spec.sentinel)

        def gate(g: Source, ind: int) -> int:
            raw = g.read(rd.field, raw=True)
            g.emit(ind, f"if {raw} in {g.const(values, 'sentinel')}:")
            g.emit(ind + 1, f"if {target} is not None:")
            g.emit(ind + 2, f"{target} = None")
            g.emit(ind + 2, "st.changed = True")
            g.emit(ind, "else:")
            return ind + 1

        self.gates.append(gate)
        try:
            self.add(msg, spec.key, path, gen)
        finally:
            self.gates.pop()

    def raw_read(self, spec: ValueSpec, msg: Message) -> tuple[SignalRead, Signal] | None:
        if spec.signal is None:
            self.problems.append(Problem(self.file, spec.key,
                                         "enum and flag fields need a `signal`"))
            return None
        r = self.read(f"{spec.key}.signal", msg, spec.signal)
        if r is None:
            return None
        sig = next(s for s in msg.signals if s.name == r.name)
        return r, sig

    def enum_field(self, slot: int, spec: ValueSpec, msg: Message) -> None:
        got = self.raw_read(spec, msg)
        if got is None:
            return
        rd, sig = got
        choices = {int(k): str(v) for k, v in (sig.choices or {}).items()}
        table: dict[int, str] = {}
        mapping = spec.mapping or {}
        by_name = {v: k for k, v in choices.items()}
        for k, ours in mapping.items():
            if ours not in BMS_STATES:
                self.problems.append(Problem(self.file, f"{spec.key}.map.{k}",
                                             f"{ours!r} is not a BMS state",
                                             nearest(ours, BMS_STATES)
                                             or f"one of {', '.join(BMS_STATES)}"))
            if isinstance(k, int):
                table[k] = ours
            elif k in by_name:
                table[by_name[k]] = ours
            else:
                self.problems.append(Problem(self.file, f"{spec.key}.map.{k}",
                                             f"signal {sig.name!r} has no choice {k!r}",
                                             nearest(k, by_name) or "use the raw number"))

        def gen(g: Source, ind: int) -> None:
            t = g.const(table, "map")
            g.emit(ind, f"v = {t}.get({g.read(rd.field, raw=True)}, 'unknown')")
            g.emit(ind, f"if V[{slot}] != v:")
            g.emit(ind + 1, f"V[{slot}] = v")
            g.emit(ind + 1, "st.changed = True")

        self.add(msg, spec.key, rd.path, gen)

    def bool_field(self, slot: int, spec: ValueSpec, msg: Message) -> None:
        got = self.raw_read(spec, msg)
        if got is None:
            return
        rd, _ = got

        def gen(g: Source, ind: int) -> None:
            test = _flag_test(g.read(rd.field, raw=True), spec.bit, spec.values)
            if spec.invert:
                test = f"not ({test})"
            g.emit(ind, f"v = bool({test})")
            g.emit(ind, f"if V[{slot}] is not v:")
            g.emit(ind + 1, f"V[{slot}] = v")
            g.emit(ind + 1, "st.changed = True")

        self.add(msg, spec.key, rd.path, gen)

    def fault(self, index: int, f: BmsFault) -> None:
        key = f.key
        spec = ValueSpec(key=key, message=f.message, signal=f.signal)
        msg = self.message(key, f.message)
        if msg is None:
            return
        got = self.raw_read(spec, msg)
        if got is None:
            return
        rd, _ = got
        path: tuple[MuxStep, ...] | None = rd.path
        cell_rd = None
        if f.cell_signal is not None:
            cell_rd = self.read(f"{key}.cell_signal", msg, f.cell_signal)
            if cell_rd is None:
                return
            path = self.together(f"{key}.cell_signal", msg, [rd, cell_rd])
        if path is None:
            return
        test = _flag_test("r", f.bit, f.values)

        def gen(g: Source, ind: int) -> None:
            cell = "None"
            if cell_rd is not None:
                cell = f"{g.read(cell_rd.field, raw=True)} - {f.cell_base - 1}" \
                    if f.cell_base != 1 else g.read(cell_rd.field, raw=True)
            g.emit(ind, f"r = {g.read(rd.field, raw=True)}")
            g.emit(ind, f"a = {test}")
            g.emit(ind, f"if FS[{index}] is not a:")
            g.emit(ind + 1, f"FS[{index}] = a")
            g.emit(ind + 1, "h = FH[0]")
            g.emit(ind + 1, "if h is not None:")
            g.emit(ind + 2, f"h({index}, ts, a, r, {cell})")

        self.add(msg, key, path, gen)
        if not path and not self.gates:
            self.flag_reads[id(self.msgs[msg.name][-1])] = (
                rd.field, *(() if cell_rd is None else (cell_rd.field,)))

    def dtc(self, index: int, d: DtcStream) -> None:
        """`dtcs`: a signal carrying one trouble code per frame."""
        got = self.message_read(d.key, d.message, d.signal)
        if got is None:
            return
        msg, rd = got
        sig = next(s for s in msg.signals if s.name == rd.name)
        texts = {int(k): str(v) for k, v in (sig.choices or {}).items()}
        self.dtc_streams.append((d, texts))
        self.windows.append(d.clear_after_s)
        none = frozenset(d.none)

        def gen(g: Source, ind: int) -> None:
            g.emit(ind, f"c = {g.read(rd.field, raw=True, indexes=True)}")
            g.emit(ind, f"if c not in {g.const(none, 'none')}:")
            g.emit(ind + 1, "h = DH[0]")
            g.emit(ind + 1, "if h is not None:")
            g.emit(ind + 2, f"h({index}, ts, c)")

        self.add(msg, d.key, rd.path, gen)

    def build(self, state: PackState, impl: list[int], fault_state: list[bool],
              fault_hook: list[FaultHook | None]) -> tuple[dict[int, Callable[[float, bytes],
                                                                            None]],
                                                           dict[int, str]]:
        handlers: dict[int, Callable[[float, bytes], None]] = {}
        sources: dict[int, str] = {}
        offset = self.cfg.id_offset
        gate_flags = [False] * len(self.gate_specs)
        for name, items in self.msgs.items():
            msg = self.msg_objs[name]
            body = Source(self.layout(msg))
            key = message_key(msg) + offset
            if name in self.checks:
                emit_checks(body, key, msg.length, *self.checks[name])
            emit_gates(body, name, self.gate_specs)
            self._emit_items(body, items)
            L = msg.length
            lines = [f"def handler(ts, data):  # pack {self.cfg.id}: {self.file}: {name} "
                     f"({key & 0x1FFFFFFF:#x})",
                     "    CNT.frames += 1", "    n = len(data)",
                     f"    if n < {max(body.min_bytes, 1)}:", "        CNT.short_frames += 1",
                     "        return", "    st.last_seen = ts", "    st.last_ts = ts"]
            if "le" in body.uses:
                lines.append("    le = _fb(data, 'little')")
            if "be" in body.uses:
                lines.append("    be = _fb(data, 'big')")
                lines.append(f"    if n != {L}:")
                lines.append(f"        be = be << ({L} - n) * 8 if n < {L} else "
                             f"be >> (n - {L}) * 8")
            src = "\n".join(lines + body.lines) + "\n"
            ns: dict[str, Any] = {
                "_fb": int.from_bytes, "_unpack": unpack_float, "_INF": math.inf,
                **cell_names(state), "V": state.values, "X": state.extras, "IMPL": impl,
                "CNT": self.counters, "FS": fault_state, "FH": fault_hook,
                "DH": self.dtc_hook, "G": gate_flags, **CHECK_FUNCTIONS, **body.consts,
            }
            compile_source(src, f"<pack {self.cfg.id} profile {self.cfg.profile.name} "
                           f"message {name}>", ns)
            handlers[key] = ns["handler"]
            sources[key] = name
            self.code[key] = src
            self.reads[key] = body.read_bits()
        return handlers, sources

    def _emit_items(self, body: Source, items: list[Item]) -> None:
        """`body.items(items, 1)`; a run of `flag_reads` flags runs only if their bits changed."""
        idx = [i for i, it in enumerate(items) if id(it) in self.flag_reads]
        reads = [bf for i in idx for bf in self.flag_reads[id(items[i])]]
        if (len(idx) < 2 or idx != list(range(idx[0], idx[-1] + 1))
                or len({bf.big_endian for bf in reads}) != 1
                or any(bf.min_bytes > body.limit for bf in reads)):
            body.items(items, 1)
            return
        first, end = idx[0], idx[-1] + 1
        body.items(items[:first], 1)
        mask = 0
        for bf in reads:
            mask |= bf.mask << bf.shift
        last = body.const([-1], "flags")  # the bits at the last frame (-1: none yet)
        body.tag("faults: the bits the flags read")
        body.emit(1, f"fb = {'be' if reads[0].big_endian else 'le'} & {mask:#x}")
        body.emit(1, f"if fb != {last}[0]:")
        body.items(items[first:end], 2)
        body.tag("faults: the bits the flags read")
        body.emit(2, f"{last}[0] = fb")  # after them: a hook that raised leaves it unset
        body.tag("")
        body.items(items[end:], 1)


def _flag_test(raw: str, bit: int | None, values: tuple[int, ...] | None) -> str:
    if bit is not None:
        return f"(({raw} >> {bit}) & 1) == 1"
    if values is not None:
        return f"{raw} in {set(values)!r}"
    return f"{raw} != 0"


class DbcCache:
    """Loads each DBC file once per gateway, however many packs use it."""

    def __init__(self) -> None:
        self._dbs: dict[str, Database | DbcError] = {}
        self.lenient: set[str] = set()  # files a pack allowed to load with `dbc_lenient`

    def get(self, path: str) -> Database:
        got = self._dbs.get(path)
        if got is None:
            try:
                got = load_dbc(path, lenient=path in self.lenient)
            except DbcError as e:
                got = e
            self._dbs[path] = got
        if isinstance(got, DbcError):
            raise got
        return got


def compile_pack(cfg: PackConfig, cache: DbcCache, problems: list[Problem], *,
                 keep: LivePack | None = None) -> LivePack | None:
    """Check the pack's profile against its DBCs and build its frame handlers.

    Problems are appended to `problems`; returns None when the pack cannot run.
    `keep`: the same pack's previous compilation, whose state the handlers take over
    (then call `prime_state` where nothing else touches that state).
    """
    dbs: list[tuple[str, Database]] = []
    if cfg.dbc_lenient:
        cache.lenient.update(str(d) for d in cfg.profile.dbc)
    for d in cfg.profile.dbc:
        try:
            dbs.append((str(d), cache.get(str(d))))
        except DbcError as e:
            problems.append(Problem(str(cfg.profile.path), "dbc", str(e)))
    if not dbs:
        if not cfg.profile.dbc:
            problems.append(Problem(str(cfg.profile.path), "dbc", "the profile names no DBC",
                                    "add dbc: [file.dbc] to the profile or the pack"))
        return None
    before = len(problems)
    c = Compiler(cfg, dbs, problems)
    prof = cfg.profile
    for name, spec in prof.fields.items():
        c.field(name, spec)
    for name, spec in prof.extras.items():
        c.extra(name, spec)
    for kind, srcs in prof.cells.items():
        for src in srcs:
            compile_cells(c, kind, src)
    for i, f in enumerate(prof.faults):
        c.fault(i, f)
    for i, stream in enumerate(prof.dtcs):
        c.dtc(i, stream)
    for chk in prof.checks:
        compile_check(c, chk)
    for gate in prof.gates:
        compile_gate(c, gate)
    if len(problems) > before:
        return None
    if keep is None:
        state = PackState(pack_id=cfg.id)
        impl = [0] * (len(FIELD_INDEX) + 3)
        fault_state = [False] * len(prof.faults)
        hook: list[FaultHook | None] = [None]
    else:
        # A reload of a pack whose identity is unchanged: the new handlers write into the
        # pack's existing state, counters and BMS flag memory. Nothing here writes to
        # them (this may run off the event loop); `prime_state` does, on the loop.
        state, impl, hook, c.counters = keep.state, keep.implausible, keep.fault_hook, \
            keep.counters
        c.dtc_hook = keep.dtc_hook
        fault_state = keep.fault_state
        if len(fault_state) != len(prof.faults):
            fault_state = [False] * len(prof.faults)
    handlers, sources = c.build(state, impl, fault_state, hook)
    compiled = LivePack(cfg, state, handlers, c.counters, impl, sources, hook, c.code,
                        c.reads, tuple(c.windows), c.dtc_streams, c.dtc_hook, fault_state,
                        c.constants, c.extra_consts)
    if keep is None:
        prime_state(compiled)
    return compiled


def prime_state(cp: LivePack) -> None:
    """Write the profile's constants and layout into the pack's state (at compile time,
    or when a reload hands a kept state to newly compiled handlers)."""
    state, cfg = cp.state, cp.cfg
    state.expected_cells = cfg.cell_count
    for slot, v in cp.constants.items():
        state.values[slot] = v
    for name, v in cp.extra_consts.items():
        state.extras[name] = v
    state.mapped[:] = [False] * len(state.mapped)
    for name in cfg.profile.fields:
        state.mapped[FIELD_INDEX[name]] = True
    if cfg.cell_count:
        # in place: the compiled handlers hold these very lists
        del state.cell_v[cfg.cell_count:]
        del state.balancing[cfg.cell_count:]
        state.ensure_cells(cfg.cell_count)
        if cfg.profile.cells.get("balancing"):
            state.ensure_balancing(cfg.cell_count)
