"""Normalize stage: a profile plus its DBCs become one compiled handler per CAN message.

`compile_pack` checks every message and signal the profile names against the DBCs
(a misspelling is a `Problem` naming the nearest real names), then generates, for each
message, a small Python function that extracts just the signals the profile uses and
writes them, converted and range-checked, into the pack's `PackState`. The generated
source contains only numbers and names of our own; nothing from the profile or the DBC
is ever evaluated as code (expressions are parsed with `ast` and re-emitted from a
whitelist of nodes).
"""

from __future__ import annotations

import ast
import fnmatch
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from cantools.database import Database
from cantools.database.can import Message, Signal

from gateway.config import (
    BmsFault,
    CellSource,
    DtcStream,
    FrameCheck,
    Gate,
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
    SignalRead,
    Source,
    bitfield,
    compile_source,
    load_dbc,
    merge_paths,
    message_key,
    unpack_float,
)
from gateway.model import BMS_STATES, FIELD_BY_NAME, FIELD_INDEX, PackState, Value

log = logging.getLogger("gateway.normalize")

MAX_CELLS = 1024  # a garbage index must not allocate without bound

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
CELL_VALID = {"voltages": (0.0, 6.0), "temps": (-60.0, 150.0)}

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
class CompiledPack:
    cfg: PackConfig
    state: PackState
    handlers: dict[int, Callable[[float, bytes], None]]
    counters: PackCounters
    implausible: list[int]  # per model slot; cells use the last three slots
    sources: dict[int, str]  # frame key -> message name, for `decode` and logs
    fault_hook: list[FaultHook | None]  # set by the fault stage; list so handlers see it
    code: dict[int, str] = field(default_factory=dict)  # frame key -> generated source
    # format 2 `dtcs`: the streams with their DBC value tables, and the fault stage's hook
    dtc_streams: list[tuple[DtcStream, dict[int, str]]] = field(default_factory=list)
    dtc_hook: list[DtcHook | None] = field(default_factory=lambda: [None])
    # Below: what `prime_state` writes into the state (the profile's constants and
    # layout), kept so a reload can apply it to a state it keeps.
    fault_state: list[bool] = field(default_factory=list)  # last BMS flag seen, per fault
    constants: dict[int, Value] = field(default_factory=dict)
    extra_consts: dict[str, Value] = field(default_factory=dict)

    def implausible_counts(self) -> dict[str, int]:
        names = [*FIELD_INDEX, "cell_voltage", "cell_temp", "extra"]
        return {n: c for n, c in zip(names, self.implausible, strict=False) if c}


def _pos(bf: BitField, msg: Message) -> int:
    """Position of a signal's first bit in frame order, for slot ordering."""
    if bf.big_endian:
        return msg.length * 8 - 1 - bf.shift - (bf.length - 1)
    return bf.shift


_NUM_IN_NAME = re.compile(r"(\d+)(?!.*\d)")


def _name_number(name: str) -> int | None:
    # the last number in the name that is not part of a trailing flag word
    base = re.sub(r"_?(invalid|valid|flag|Flag|invalidFlag)+$", "", name)
    m = _NUM_IN_NAME.search(base)
    return int(m.group(1)) if m else None


class _Compiler:
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
        self.gate_specs: list[tuple[str, SignalRead, frozenset[int], list[str] | None]] = []
        self.checks: dict[str, tuple[FrameCheck, SignalRead | None, SignalRead | None]] = {}
        self.fault_count = 0

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
        return _linear(expr, spec), path

    def safe_expr(self, spec: ValueSpec, msg: Message | None, g: Source | None,
                  cross: Callable[[str, str], str] | None = None,
                  ) -> tuple[str, tuple[MuxStep, ...]] | None:
        """The expression as Python over whitelisted nodes. Bare names are signals of
        `msg`; with `cross`, names are `Message.Signal` and `cross` gives their code."""
        if (problem := expr_problem(spec.expr or "")) is not None:
            self.problems.append(Problem(self.file, f"{spec.key}.expr", *problem))
            return None
        try:
            tree = ast.parse(spec.expr or "", mode="eval")
        except SyntaxError as e:
            self.problems.append(Problem(self.file, f"{spec.key}.expr",
                                         f"not an expression: {e.msg}",
                                         "use signal names, numbers, + - * / and min/max/abs"))
            return None
        used: list[SignalRead] = []

        def emit(node: ast.AST) -> str:
            if isinstance(node, ast.Expression):
                return emit(node.body)
            if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                    and not isinstance(node.value, bool):
                return repr(node.value)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if cross is None:
                    raise _ExprError(f"{node.value.id}.{node.attr}: a Message.Signal name "
                                     "next to `message:`",
                                     "remove `message:` and write every name as Message.Signal")
                return cross(node.value.id, node.attr)
            if isinstance(node, ast.Name):
                if msg is None or g is None:
                    raise _ExprError(f"{node.id!r} names no message",
                                     "write Message.Signal, or give the field a `message:`")
                got = self.find_read(msg, node.id)
                if isinstance(got, tuple):
                    raise _ExprError(*got)
                used.append(got)
                return g.read(got.field)
            if isinstance(node, ast.BinOp) and isinstance(
                    node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
                op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
                return f"({emit(node.left)} {op} {emit(node.right)})"
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
                return f"({'-' if isinstance(node.op, ast.USub) else '+'}{emit(node.operand)})"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("min", "max", "abs") and not node.keywords:
                return f"{node.func.id}({', '.join(emit(a) for a in node.args)})"
            raise _ExprError(f"{type(node).__name__} is not allowed",
                             "only signal names, numbers, + - * /, min(), max(), abs()")

        try:
            expr = emit(tree)
        except _ExprError as e:
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
        expr = _linear(got[0], spec)
        window = spec.fresh_s or self.cfg.stale_after_s
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
                g.emit(ind, f"if v is not None and not {_lit(lo)} <= v <= {_lit(hi)}:")
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
        got = self.value_expr(spec, msg, Source(self.layout(msg)))
        if got is None:
            return
        path = got[1]
        lo, hi = spec.valid or DEFAULT_VALID.get(name, (float("-inf"), float("inf")))
        is_int = info.kind == "int"

        def gen(g: Source, ind: int) -> None:
            expr = self.value_expr(spec, msg, g)
            assert expr is not None
            g.emit(ind, f"v = {expr[0]}")
            g.emit(ind, f"if {_lit(lo)} <= v <= {_lit(hi)}:")  # NaN fails: int() would raise
            if is_int:
                g.emit(ind + 1, "v = int(v)")
            g.emit(ind + 1, f"if V[{slot}] != v:")
            g.emit(ind + 2, f"V[{slot}] = v")
            g.emit(ind + 2, "st.changed = True")
            g.emit(ind, "else:")
            g.emit(ind + 1, f"IMPL[{slot}] += 1")

        self.add_with_sentinel(msg, spec, path, gen, f"V[{slot}]")

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
        got = self.value_expr(spec, msg, Source(self.layout(msg)))
        if got is None:
            return
        path = got[1]
        lo, hi = spec.valid or (float("-inf"), float("inf"))
        extra_slot = len(FIELD_INDEX) + 2

        def gen(g: Source, ind: int) -> None:
            expr = self.value_expr(spec, msg, g)
            assert expr is not None
            g.emit(ind, f"v = {expr[0]}")
            g.emit(ind, f"if {_lit(lo)} <= v <= {_lit(hi)}:")
            g.emit(ind + 1, f"if X.get({name!r}) != v:")
            g.emit(ind + 2, f"X[{name!r}] = v")
            g.emit(ind + 2, "st.changed = True")
            g.emit(ind, "else:")
            g.emit(ind + 1, f"IMPL[{extra_slot}] += 1")

        self.add_with_sentinel(msg, spec, path, gen, f"X[{name!r}]")

    def message_read(self, key: str, message: str, signal: str,
                     ) -> tuple[Message, SignalRead] | None:
        msg = self.message(key, message)
        rd = self.read(f"{key}.signal", msg, signal) if msg is not None else None
        return None if msg is None or rd is None else (msg, rd)

    def gate(self, gate: Gate) -> None:
        """`gates`: while a state signal has given values, listed messages are ignored."""
        got = self.message_read(gate.key, gate.message, gate.signal)
        if got is None:
            return
        msg, rd = got
        if rd.path:
            self.problems.append(Problem(self.file, f"{gate.key}.signal",
                                         f"{gate.signal!r} is multiplexed: a gate needs a "
                                         "signal every frame of its message carries",
                                         "choose an unmultiplexed state signal"))
            return
        sig = next(s for s in msg.signals if s.name == rd.name)
        by_name = {str(v): int(k) for k, v in (sig.choices or {}).items()}
        values: set[int] = set()
        for v in gate.values:
            if isinstance(v, int):
                values.add(v)
            elif v in by_name:
                values.add(by_name[v])
            else:
                self.problems.append(Problem(self.file, f"{gate.key}.values",
                                             f"signal {sig.name!r} has no choice {v!r}",
                                             nearest(v, by_name) or "use the raw number"))
                return
        ignore: list[str] | None = None
        if gate.ignore is not None:
            ignore = []
            for name in gate.ignore:
                m = self.message(f"{gate.key}.ignore", name)
                if m is None:
                    return
                ignore.append(m.name)
        self.msgs.setdefault(msg.name, [])
        self.gate_specs.append((msg.name, rd, frozenset(values), ignore))

    def check(self, chk: FrameCheck) -> None:
        """`checks`: a frame failing its checksum or rolling counter is dropped."""
        msg = self.message(chk.key, chk.message)
        if msg is None:
            return
        cs = ctr = None
        if chk.checksum is not None:
            cs = self.read(f"{chk.key}.checksum", msg, chk.checksum)
            if cs is None:
                return
            if cs.path or cs.field.length != 8 or \
                    (cs.field.shift % 8 if not cs.field.big_endian else
                     (msg.length * 8 - cs.field.shift - 8) % 8):
                self.problems.append(Problem(self.file, f"{chk.key}.checksum",
                                             f"{chk.checksum!r} is not one whole byte of "
                                             "every frame", "checksums are 8-bit, byte-aligned, "
                                             "not multiplexed"))
                return
        if chk.counter is not None:
            ctr = self.read(f"{chk.key}.counter", msg, chk.counter)
            if ctr is None:
                return
            if ctr.path:
                self.problems.append(Problem(self.file, f"{chk.key}.counter",
                                             f"{chk.counter!r} is multiplexed",
                                             "a rolling counter must be in every frame"))
                return
        self.msgs.setdefault(msg.name, [])
        self.checks[msg.name] = (chk, cs, ctr)

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
        for v, cname in choices.items():
            table.setdefault(v, "unknown")
            del cname

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

    def dtc(self, index: int, d: DtcStream) -> None:
        """`dtcs`: a signal carrying one trouble code per frame."""
        got = self.message_read(d.key, d.message, d.signal)
        if got is None:
            return
        msg, rd = got
        sig = next(s for s in msg.signals if s.name == rd.name)
        texts = {int(k): str(v) for k, v in (sig.choices or {}).items()}
        self.dtc_streams.append((d, texts))
        none = frozenset(d.none)

        def gen(g: Source, ind: int) -> None:
            g.emit(ind, f"c = {g.read(rd.field, raw=True)}")
            g.emit(ind, f"if c not in {g.const(none, 'none')}:")
            g.emit(ind + 1, "h = DH[0]")
            g.emit(ind + 1, "if h is not None:")
            g.emit(ind + 2, f"h({index}, ts, c)")

        self.add(msg, d.key, rd.path, gen)

    def cells(self, kind: str, src: CellSource) -> None:
        msg = self.message(src.key, src.message)
        if msg is None:
            return
        layout = self.layout(msg)
        if src.mux and not layout.muxers:
            self.problems.append(Problem(self.file, f"{src.key}.mux",
                                         f"message {msg.name!r} is not multiplexed",
                                         "remove `mux: true`, or use `index:`"))
            return

        def select(spec: tuple[str, ...] | str, key: str) -> list[Signal] | None:
            if isinstance(spec, str) and any(c in spec for c in "*?["):
                found = [s for s in msg.signals if fnmatch.fnmatchcase(s.name, spec)
                         and not s.is_multiplexer]
                if not found:
                    self.problems.append(Problem(
                        self.file, key, f"pattern {spec!r} matches no signal of {msg.name!r}",
                        f"its signals: {', '.join(s.name for s in msg.signals[:10])}"))
                    return None
                return found
            names = (spec,) if isinstance(spec, str) else spec
            out = []
            for n in names:
                s = self.signal(key, msg, n)
                if s is None:
                    return None
                out.append(s)
            return out

        values = select(src.signals, f"{src.key}.signals")
        if values is None:
            return
        invalid = select(src.invalid, f"{src.key}.invalid") if src.invalid else []
        if invalid is None:
            return
        idx_read = None
        if src.index_signal is not None:
            idx_read = self.read(f"{src.key}.index", msg, src.index_signal)
            if idx_read is None:
                return
        reads: list[SignalRead] = []
        for s in values + invalid:
            got = self.read(f"{src.key}.signals", msg, s.name)
            if got is None:
                return
            reads.append(got)
        muxer: str | None = None
        if src.mux:
            # the cells' own multiplexer selects the group (the inner one when nested)
            parents = sorted({s.multiplexer_signal or "" for s in values})
            if parents == [""] or len(parents) != 1:
                self.problems.append(Problem(
                    self.file, f"{src.key}.mux",
                    f"the signals of {msg.name!r} it names are "
                    + ("not multiplexed" if parents == [""] else
                       f"under different multiplexers ({', '.join(p or '(none)' for p in parents)})"),
                    "name the signals of one multiplexer, or remove `mux: true`"))
                return
            muxer = parents[0]
            path: tuple[MuxStep, ...] | None = layout.muxers[muxer][1] if muxer in layout.muxers \
                else None
            if path is None:
                self.problems.append(Problem(self.file, f"{src.key}.mux",
                                             f"multiplexer {muxer!r} lies beyond the message",
                                             "fix the DBC"))
                return
        else:
            path = self.together(f"{src.key}.signals", msg,
                                 reads + ([idx_read] if idx_read else []))
            if path is None:
                return
        groups, inv_groups = group_by_mux(src, values, invalid)
        kind_valid = src.valid or CELL_VALID.get(kind, (float("-inf"), float("inf")))
        f, o = ValueSpec(key=src.key, unit=src.unit).factor_offset()
        scale = src.scale * f
        impl_slot = len(FIELD_INDEX) + (0 if kind == "voltages" else 1)
        # Frames often carry more slots than the pack has cells (the last group of a
        # sweep): with a known cell count, slots past it are ignored, not counted.
        limit = self.cfg.cell_count if kind != "temps" and self.cfg.cell_count else MAX_CELLS
        presized = limit != MAX_CELLS  # compile_pack sizes these lists to the cell count

        plans: dict[int | None, list[tuple[int | None, BitField, BitField | None]]] = {}
        for mid, sigs in groups.items():
            sig_bfs = [(s, bitfield(msg, s)) for s in sigs]
            inv_bfs = [(s, bitfield(msg, s)) for s in inv_groups.get(mid, [])]
            plan: list[tuple[int | None, BitField, BitField | None]] = []
            if src.order == "name":
                inv_by_num = {_name_number(s.name): bf for s, bf in inv_bfs}
                for s, bf in sig_bfs:
                    num = _name_number(s.name)
                    if num is None:
                        self.problems.append(Problem(self.file, f"{src.key}.order",
                                                     f"signal {s.name!r} has no number in its name",
                                                     "use order: position"))
                        return
                    plan.append((num - src.name_base, bf, inv_by_num.get(num)))
            else:
                sig_bfs.sort(key=lambda p: _pos(p[1], msg))
                inv_bfs.sort(key=lambda p: _pos(p[1], msg))
                if inv_bfs and len(inv_bfs) != len(sig_bfs):
                    self.problems.append(Problem(
                        self.file, f"{src.key}.invalid",
                        f"{len(inv_bfs)} invalid flags for {len(sig_bfs)} values",
                        "list one invalid flag per value signal, in the same order"))
                    return
                for slot, (_, bf) in enumerate(sig_bfs):
                    inv = inv_bfs[slot][1] if inv_bfs else None
                    plan.append((slot, bf, inv))
            plans[mid] = plan
        src_ = src
        # cells one group carries: the default stride
        per_group = max((sum(bf.length if src.bitfield else 1 for _, bf, _ in p)
                         for p in plans.values()), default=1)
        if src.stride is not None and src.order == "position" and (muxer or idx_read) \
                and src.stride < per_group:
            self.problems.append(Problem(
                self.file, f"{src.key}.stride",
                f"stride {src.stride} is less than the {per_group} cells each group carries: "
                "groups would overwrite each other", f"stride: {per_group} (or remove it)"))
            return
        if idx_read is None and not self.cells_in_range(src, kind, plans, per_group):
            return

        def write_cells(g: Source, ind: int, plan: list[tuple[int | None, BitField,
                                                                 BitField | None]],
                        base: str | None) -> None:
            arr = {"voltages": "CV", "temps": "CT", "balancing": "CB"}[kind]
            ensure = {"voltages": "st.ensure_cells", "temps": "st.ensure_temps",
                      "balancing": "st.ensure_balancing"}[kind]
            changed = "st.cells_changed = st.changed = True"  # derived fields follow cells
            for slot, bf, inv in plan:
                if base is None:
                    idx = f"{src_.start(None, per_group) + (slot or 0)}"
                else:
                    idx = f"{base} + {slot}" if slot else base
                if kind == "balancing" and src_.bitfield:
                    raw = g.read(bf)
                    g.emit(ind, f"bits = {raw}")
                    g.emit(ind, f"i0 = {idx}")
                    g.emit(ind, f"n0 = min({bf.length}, {limit} - i0)")
                    g.emit(ind, "if 0 <= i0 and n0 > 0:")
                    g.emit(ind + 1, f"if len({arr}) < i0 + n0:")
                    g.emit(ind + 2, f"{ensure}(i0 + n0)")
                    g.emit(ind + 1, "for j in range(n0):")
                    g.emit(ind + 2, "b = bool((bits >> j) & 1)")
                    g.emit(ind + 2, f"if {arr}[i0 + j] is not b:")
                    g.emit(ind + 3, f"{arr}[i0 + j] = b")
                    g.emit(ind + 3, changed)
                    continue
                g.emit(ind, f"i = {idx}")
                g.emit(ind, f"if 0 <= i < {limit}:")
                if kind == "balancing":
                    g.emit(ind + 1, f"v = bool({g.read(bf)})")
                else:
                    e = g.read(bf)
                    if scale != 1:
                        e = f"({e} * {scale!r})"
                    if o:
                        e = f"({e} + {o!r})"
                    g.emit(ind + 1, f"v = {e}")
                kw = "if"
                if src_.sentinel and kind != "balancing":  # "not available": no count
                    sent = g.const(frozenset(src_.sentinel), "sentinel")
                    g.emit(ind + 1, f"if {g.read(bf, raw=True)} in {sent}:")
                    g.emit(ind + 2, "v = None")
                    kw = "elif"
                if inv is not None:  # the BMS itself says the value is invalid: no count
                    raw_inv = g.read(replace(inv, signed=False), raw=True)
                    g.emit(ind + 1, f"{kw} {raw_inv} == {src_.invalid_value}:")
                    g.emit(ind + 2, "v = None")
                    kw = "elif"
                if kind != "balancing":
                    lo, hi = kind_valid
                    g.emit(ind + 1, f"{kw} not ({_lit(lo)} <= v <= {_lit(hi)}):")
                    g.emit(ind + 2, f"IMPL[{impl_slot}] += 1")
                    g.emit(ind + 2, "v = None")
                if not presized:
                    g.emit(ind + 1, f"if i >= len({arr}):")
                    g.emit(ind + 2, f"{ensure}(i + 1)")
                g.emit(ind + 1, f"if {arr}[i] != v:")
                g.emit(ind + 2, f"{arr}[i] = v")
                g.emit(ind + 2, changed)
                # a known cell count makes slots past it just unused; an index outside
                # 1..MAX_CELLS (an `index:` signal with a garbage value) is counted
                g.emit(ind, "else:" if limit == MAX_CELLS else
                       f"elif i < 0 or i >= {MAX_CELLS}:")
                g.emit(ind + 1, f"IMPL[{impl_slot}] += 1")

        if muxer is not None:
            uniform = _uniform_mux(plans, src_, per_group)
            mux_name = muxer

            def gen_mux(g: Source, ind: int) -> None:
                mux_var = g.mux_var(mux_name)
                if uniform is not None:
                    # every group has the same layout (the usual case): one code path
                    # with the first cell computed from the mux value, not a branch
                    # per group
                    mids, a, b, rel = uniform
                    lo, hi = min(mids), max(mids)
                    cond = (f"{lo} <= {mux_var} <= {hi}" if len(mids) == hi - lo + 1
                            else f"{mux_var} in {g.const(frozenset(mids), 'mux')}")
                    g.emit(ind, f"if {cond}:")
                    start = f"{mux_var} * {a}" if a != 1 else mux_var
                    g.emit(ind + 1, f"b0 = {start} + {b}" if b else f"b0 = {start}")
                    write_cells(g, ind + 1, rel, "b0")
                    return
                first = True
                for mid, plan in sorted(plans.items(), key=lambda kv: kv[0] or 0):
                    base = f"{src_.start(mid, per_group)}"
                    g.emit(ind, f"{'if' if first else 'elif'} {mux_var} == {mid}:")
                    write_cells(g, ind + 1, plan, base)
                    first = False

            self.add(msg, src.key, path, gen_mux, (mux_name,))
        else:
            def gen_plain(g: Source, ind: int) -> None:
                plan = plans.get(None, [])
                base = None
                if idx_read is not None:
                    ie = g.read(idx_read.field)
                    stride = per_group if src_.stride is None else src_.stride
                    b = src_.start(0, per_group)
                    base = f"int({ie}) * {stride}" if stride != 1 else f"int({ie})"
                    base = f"{base} + {b}" if b else base
                    g.emit(ind, f"b0 = {base}")
                    base = "b0"
                write_cells(g, ind, plan, base)

            self.add(msg, src.key, path, gen_plain)

    def cells_in_range(self, src: CellSource, kind: str, plans: dict[int | None, Plan],
                       per_group: int) -> bool:
        """Every cell the layout can address (each mux value of the DBC x stride + first
        + offset + slot) must lie in 1..MAX_CELLS: a cell past it or below 1 would be
        dropped on every frame. An `index:` signal's range is not known here: its cells
        out of range are counted at run time."""
        idx = [src.start(mid, per_group) + (slot or 0)
               + ((bf.length - 1) if kind == "balancing" and src.bitfield else 0)
               for mid, plan in plans.items() for slot, bf, _ in plan]
        if not idx:
            return True
        lo, hi = min(idx), max(idx)
        if lo >= 0 and hi < MAX_CELLS:
            return True
        what = "stride" if src.stride is not None else "first" if src.first else \
            "offset" if src.offset else "signals"
        mids = sorted(m for m in plans if m is not None)
        span = f" (mux {mids[0]}..{mids[-1]} from the DBC)" if mids else ""
        where = (f"cell {lo + 1}, below cell 1" if lo < 0 else
                 f"cell {hi + 1}, past the {MAX_CELLS} cells a pack can have")
        self.problems.append(Problem(
            self.file, f"{src.key}.{what}",
            f"the layout{span} reaches {where}: those cells would be dropped on every frame",
            "make group x stride + first + offset + the cells of a group stay within "
            f"1..{MAX_CELLS}"))
        return False

    constants: dict[int, Value]
    extra_consts: dict[str, Value]

    code: dict[int, str]
    dtc_streams: list[tuple[DtcStream, dict[int, str]]]
    dtc_hook: list[DtcHook | None]

    def emit_checks(self, g: Source, key: int, chk: FrameCheck, cs: SignalRead | None,
                    ctr: SignalRead | None) -> None:
        k = chk.key
        if cs is not None:
            bf = cs.field
            pos = bf.shift // 8 if not bf.big_endian else (self.layout_len(chk) * 8 - bf.shift - 8) // 8
            fid = key & 0x1FFFFFFF
            id_bytes = fid.to_bytes(4 if key & 0x80000000 else 2, "big").lstrip(b"\0") or b"\0"
            g.tag(k)
            got = g.read(bf, raw=True)
            if chk.method == "crc8_sae_j1850":
                want = f"_crc8(data[:{pos}] + data[{pos} + 1:])"
            else:
                op = "^" if chk.method == "xor8" else "+"
                extra: list[int | str] = []
                if chk.with_id:
                    extra.append(sum(id_bytes) if op == "+" else _xor(id_bytes))
                if chk.with_length:
                    extra.append("n")
                agg = "_sum" if op == "+" else "_xor"
                want = f"{agg}(data[:{pos}] + data[{pos} + 1:])"
                for e in extra:
                    want = f"({want} {op} {e})"
                want = f"{want} & 0xFF"
            g.emit(1, f"if {got} != {want}:")
            g.emit(2, "CNT.bad_checksum += 1")
            g.emit(2, "return")
        if ctr is not None:
            g.tag(k)
            mod = 1 << ctr.field.length
            step = chk.max_step or max(1, mod // 2)
            slot = g.const([None], "counter")
            g.emit(1, f"c = {g.read(ctr.field, raw=True)}")
            g.emit(1, f"p = {slot}[0]")
            g.emit(1, f"{slot}[0] = c")
            g.emit(1, f"if p is not None and not 0 < (c - p) % {mod} <= {step}:")
            g.emit(2, "CNT.bad_counter += 1")
            g.emit(2, "return")
        g.tag("")

    def layout_len(self, chk: FrameCheck) -> int:
        return self.msg_objs[chk.message].length

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
                self.emit_checks(body, key, *self.checks[name])
            gated = []
            for k, (gmsg, rd, values, ignore) in enumerate(self.gate_specs):
                if gmsg == name:
                    body.emit(1, f"G[{k}] = {body.read(rd.field, raw=True)} in "
                              f"{body.const(values, 'gate')}  # gates[{k}]: state")
                if (ignore is None and gmsg != name) or (ignore is not None and name in ignore):
                    gated.append(k)
            if gated:
                body.emit(1, f"if {' or '.join(f'G[{k}]' for k in gated)}:  # validity gate")
                body.emit(2, "CNT.gated += 1")
                body.emit(2, "return")
            body.items(items, 1)
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
                "_fb": int.from_bytes, "_unpack": unpack_float, "_INF": math.inf, "st": state, "V": state.values,
                "CV": state.cell_v, "CT": state.cell_t, "CB": state.balancing,
                "X": state.extras, "IMPL": impl, "CNT": self.counters, "FS": fault_state,
                "FH": fault_hook, "DH": self.dtc_hook, "G": gate_flags, "_sum": sum,
                "_xor": _xor, "_crc8": crc8_sae_j1850, **body.consts,
            }
            compile_source(src, f"<pack {self.cfg.id} profile {self.cfg.profile.name} "
                           f"message {name}>", ns)
            handlers[key] = ns["handler"]
            sources[key] = name
            self.code[key] = src
        return handlers, sources

    counters: PackCounters


class _ExprError(Exception):
    pass


def group_by_mux(src: CellSource, values: list[Signal], invalid: list[Signal],
                 ) -> tuple[dict[int | None, list[Signal]], dict[int | None, list[Signal]]]:
    """A cell source's value and invalid-flag signals by mux value (None: not muxed)."""
    out: tuple[dict[int | None, list[Signal]], dict[int | None, list[Signal]]] = ({}, {})
    for target, sigs in zip(out, (values, invalid), strict=True):
        for s in sigs:
            mids: list[int | None] = [None]
            if src.mux and s.multiplexer_ids:
                mids = [int(x) for x in s.multiplexer_ids]
            for mid in mids:
                target.setdefault(mid, []).append(s)
    return out


Plan = list[tuple[int | None, BitField, BitField | None]]


def _uniform_mux(plans: dict[int | None, Plan], src: CellSource, per_group: int,
                 ) -> tuple[list[int], int, int, Plan] | None:
    """If every mux group has the same bit layout and its cells start at a*mux + b,
    return (mux values, a, b, the layout with cell offsets relative to the start)."""
    groups = sorted((mid, plan) for mid, plan in plans.items() if mid is not None)
    if len(groups) < 2 or len(groups) != len(plans):
        return None

    def absolute(mid: int, plan: Plan) -> list[tuple[int, BitField, BitField | None]]:
        out = []
        for slot, bf, inv in plan:
            idx = src.start(mid, per_group) + (slot or 0)
            out.append((idx or 0, bf, inv))
        return out

    def layout(bf: BitField | None) -> tuple[object, ...] | None:
        if bf is None:
            return None
        return (bf.big_endian, bf.shift, bf.mask, bf.signed, bf.float_fmt, bf.scale,
                bf.offset, bf.length)

    ref_mid, ref_plan = groups[0]
    ref = absolute(ref_mid, ref_plan)
    if not ref:
        return None
    (m1, p1) = groups[1]
    starts = [a[0] for a in absolute(m1, p1)]
    if not starts:
        return None
    a_num = starts[0] - ref[0][0]
    if (m1 - ref_mid) == 0 or a_num % (m1 - ref_mid):
        return None
    a = a_num // (m1 - ref_mid)
    b = ref[0][0] - a * ref_mid
    rel = [(idx - ref[0][0], bf, inv) for idx, bf, inv in ref]
    for mid, plan in groups:
        cells = absolute(mid, plan)
        if len(cells) != len(ref) or cells[0][0] != a * mid + b:
            return None
        for (idx, bf, inv), (ridx, rbf, rinv) in zip(cells, ref, strict=True):
            if (idx - cells[0][0] != ridx - ref[0][0] or layout(bf) != layout(rbf)
                    or layout(inv) != layout(rinv)):
                return None
    return [m for m, _ in groups], a, b, [(d, bf, inv) for d, bf, inv in rel]


def _xor(data: bytes) -> int:
    x = 0
    for b in data:
        x ^= b
    return x


def _crc8_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = ((c << 1) ^ 0x1D) & 0xFF if c & 0x80 else (c << 1) & 0xFF
        table.append(c)
    return table


_CRC8 = _crc8_table()


def crc8_sae_j1850(data: bytes) -> int:
    """CRC-8 SAE J1850 (poly 0x1D, init 0xFF, final xor 0xFF), as AUTOSAR E2E profile 1."""
    c = 0xFF
    for b in data:
        c = _CRC8[c ^ b]
    return c ^ 0xFF


def _lit(x: float) -> str:
    """A number as Python source; infinities have no literal."""
    if math.isinf(x):
        return "_INF" if x > 0 else "-_INF"
    return repr(x)


def _flag_test(raw: str, bit: int | None, values: tuple[int, ...] | None) -> str:
    if bit is not None:
        return f"(({raw} >> {bit}) & 1) == 1"
    if values is not None:
        return f"{raw} in {set(values)!r}"
    return f"{raw} != 0"


EXPR_MAX_CHARS = 1000
EXPR_MAX_DEPTH = 40
_EXPR_SAMPLES = (1.0, 2.0, 0.5, -3.0, 1000.0)
_EXPR_ARGS = {"abs": (1, 1), "min": (2, 64), "max": (2, 64)}


def expr_problem(text: str) -> tuple[str, str] | None:
    """Why an expression would fail on every frame (or could not even be compiled), as
    (what, fix); None when it is usable. check-config runs it once on sample inputs, so
    `1e999`, `max()` or `x / 0` are rejected there, not counted as errors at run time."""
    fix = "use signal names, finite numbers, + - * / and min(a, b), max(a, b), abs(a)"
    if len(text) > EXPR_MAX_CHARS:
        return f"is {len(text)} characters long, more than {EXPR_MAX_CHARS}", fix
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return None  # reported with its message by the compiler
    except (RecursionError, MemoryError):
        return "is nested too deeply to compile", fix
    depth: dict[int, int] = {id(tree): 0}
    for node in ast.walk(tree):
        d = depth[id(node)]
        if d > EXPR_MAX_DEPTH:
            return f"is nested more than {EXPR_MAX_DEPTH} levels deep", fix
        for child in ast.iter_child_nodes(node):
            depth[id(child)] = d + 1
        if isinstance(node, ast.Constant) and isinstance(node.value, float) \
                and not math.isfinite(node.value):
            return f"the number {ast.get_source_segment(text, node) or node.value} is not " \
                   "finite (too large for a float)", fix
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in _EXPR_ARGS:
            lo, hi = _EXPR_ARGS[node.func.id]
            if not lo <= len(node.args) <= hi:
                want = "one argument" if lo == hi else f"{lo} to {hi} arguments"
                return f"{node.func.id}() takes {want}, got {len(node.args)}", fix
    failures: list[str] = []
    for sample in _EXPR_SAMPLES:
        try:
            value = _trial(tree, sample)
        except (ArithmeticError, TypeError, ValueError) as e:
            failures.append(f"{type(e).__name__}: {e}")
            continue
        except _ExprError:
            return None  # not allowed syntax: the compiler says which
        if math.isfinite(value):
            return None
        failures.append(f"gives {value}")
    return (f"fails for every input value tried ({', '.join(map(str, _EXPR_SAMPLES))}): "
            f"{failures[0]}"), fix


def _trial(node: ast.AST, sample: float) -> float:
    """Evaluate a whitelisted expression with every signal set to `sample`."""
    if isinstance(node, ast.Expression):
        return _trial(node.body, sample)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
            and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.Name):
        return sample
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _trial(node.left, sample), _trial(node.right, sample)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        return a * b if isinstance(node.op, ast.Mult) else a / b
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _trial(node.operand, sample)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id in _EXPR_ARGS and not node.keywords:
        args = [_trial(a, sample) for a in node.args]
        if node.func.id == "abs":
            return abs(args[0])
        return min(args) if node.func.id == "min" else max(args)
    raise _ExprError("", "")


def _linear(expr: str, spec: ValueSpec) -> str:
    f, o = spec.factor_offset()
    if spec.scale != 1 or spec.offset != 0:
        expr = f"({expr} * {spec.scale!r} + {spec.offset!r})" if spec.offset else \
            f"({expr} * {spec.scale!r})"
    if f != 1:
        expr = f"({expr} * {f!r})"
    if o:
        expr = f"({expr} + {o!r})"
    if spec.invert:
        expr = f"(-{expr})"
    return expr


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
                 keep: CompiledPack | None = None) -> CompiledPack | None:
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
    c = _Compiler(cfg, dbs, problems)
    c.constants = {}
    c.extra_consts = {}
    c.counters = PackCounters()
    c.code = {}
    prof = cfg.profile
    for name, spec in prof.fields.items():
        c.field(name, spec)
    for name, spec in prof.extras.items():
        c.extra(name, spec)
    for kind, srcs in prof.cells.items():
        for src in srcs:
            c.cells(kind, src)
    for i, f in enumerate(prof.faults):
        c.fault(i, f)
    c.dtc_streams = []
    for i, stream in enumerate(prof.dtcs):
        c.dtc(i, stream)
    for chk in prof.checks:
        c.check(chk)
    for gate in prof.gates:
        c.gate(gate)
    if len(problems) > before:
        return None
    if keep is None:
        state = PackState(pack_id=cfg.id)
        impl = [0] * (len(FIELD_INDEX) + 3)
        fault_state = [False] * len(prof.faults)
        hook: list[FaultHook | None] = [None]
        c.dtc_hook = [None]
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
    compiled = CompiledPack(cfg, state, handlers, c.counters, impl, sources, hook, c.code,
                            c.dtc_streams, c.dtc_hook, fault_state, c.constants,
                            c.extra_consts)
    if keep is None:
        prime_state(compiled)
    return compiled


def prime_state(cp: CompiledPack) -> None:
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
