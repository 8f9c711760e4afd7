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
from dataclasses import dataclass, field
from typing import Any

from cantools.database import Database
from cantools.database.can import Message, Signal

from .config import CellSource, PackConfig, Problem, ValueSpec, nearest
from .decode import BitField, DbcError, bitfield, load_dbc, message_key, mux_signal, unpack_float
from .model import BMS_STATES, FIELD_BY_NAME, FIELD_INDEX, PackState, Value

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

FaultHook = Callable[[int, float, bool, float], None]  # (fault index, ts, active, raw value)


@dataclass(slots=True)
class PackCounters:
    frames: int = 0
    short_frames: int = 0
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

    def implausible_counts(self) -> dict[str, int]:
        names = [*FIELD_INDEX, "cell_voltage", "cell_temp", "extra"]
        return {n: c for n, c in zip(names, self.implausible, strict=False) if c}


class _Codegen:
    """Accumulates one message's handler source and the constants it closes over."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self.n = 0

    def const(self, value: Any, hint: str = "k") -> str:
        self.n += 1
        name = f"_{hint}{self.n}"
        self.consts[name] = value
        return name

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)


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
        self.msgs: dict[str, list[tuple[str, Callable[[_Codegen, int, str], None]]]] = {}
        self.msg_objs: dict[str, Message] = {}
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

    def add(self, msg: Message, key: str, fn: Callable[[_Codegen, int, str], None]) -> None:
        self.msgs.setdefault(msg.name, []).append((key, fn))

    # -- value expressions
    def value_expr(self, spec: ValueSpec, msg: Message, g: _Codegen) -> str | None:
        """Python expression for the spec's value in model units, or None on error."""
        if spec.const is not None:
            return repr(spec.const)
        if spec.signal is not None:
            sig = self.signal(f"{spec.key}.signal", msg, spec.signal)
            if sig is None:
                return None
            expr = bitfield(msg, sig).expr("le", "be")
        else:
            assert spec.expr is not None
            got = self.safe_expr(spec, msg)
            if got is None:
                return None
            expr = got
        return _linear(expr, spec)

    def safe_expr(self, spec: ValueSpec, msg: Message) -> str | None:
        try:
            tree = ast.parse(spec.expr or "", mode="eval")
        except SyntaxError as e:
            self.problems.append(Problem(self.file, f"{spec.key}.expr",
                                         f"not an expression: {e.msg}",
                                         "use signal names, numbers, + - * / and min/max/abs"))
            return None
        names = {s.name: s for s in msg.signals}

        def emit(node: ast.AST) -> str:
            if isinstance(node, ast.Expression):
                return emit(node.body)
            if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                    and not isinstance(node.value, bool):
                return repr(node.value)
            if isinstance(node, ast.Name):
                if node.id not in names:
                    hint = nearest(node.id, names)
                    msg_ = f"message {msg.name!r} has no signal {node.id!r}"
                    raise _ExprError(msg_, hint)
                return bitfield(msg, names[node.id]).expr("le", "be")
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
            return emit(tree)
        except _ExprError as e:
            self.problems.append(Problem(self.file, f"{spec.key}.expr", e.args[0], e.args[1]))
            return None

    # -- profile parts
    def field(self, name: str, spec: ValueSpec) -> None:
        info = FIELD_BY_NAME[name]
        slot = FIELD_INDEX[name]
        if spec.message is None:  # constant
            self.constants[slot] = spec.const
            return
        msg = self.message(spec.key, spec.message)
        if msg is None:
            return
        if info.kind == "enum":
            self.enum_field(slot, spec, msg)
            return
        if info.kind == "bool":
            self.bool_field(slot, spec, msg)
            return
        g0 = _Codegen()
        if self.value_expr(spec, msg, g0) is None:
            return
        lo, hi = spec.valid or DEFAULT_VALID.get(name, (float("-inf"), float("inf")))
        is_int = info.kind == "int"

        def gen(g: _Codegen, ind: int, mux_var: str) -> None:
            expr = self.value_expr(spec, msg, g)
            g.emit(ind, f"v = {expr}")
            if is_int:
                g.emit(ind, "v = int(v)")
            g.emit(ind, f"if {_lit(lo)} <= v <= {_lit(hi)}:")
            g.emit(ind + 1, f"if V[{slot}] != v:")
            g.emit(ind + 2, f"V[{slot}] = v")
            g.emit(ind + 2, "st.changed = True")
            g.emit(ind, "else:")
            g.emit(ind + 1, f"IMPL[{slot}] += 1")

        self.add_muxed(msg, spec.key, [spec.signal] if spec.signal else [], gen)

    def extra(self, name: str, spec: ValueSpec) -> None:
        msg = self.message(spec.key, spec.message) if spec.message else None
        if spec.message is None:
            self.extra_consts[name] = spec.const
            return
        if msg is None:
            return
        g0 = _Codegen()
        if self.value_expr(spec, msg, g0) is None:
            return
        lo, hi = spec.valid or (float("-inf"), float("inf"))
        extra_slot = len(FIELD_INDEX) + 2

        def gen(g: _Codegen, ind: int, mux_var: str) -> None:
            g.emit(ind, f"v = {self.value_expr(spec, msg, g)}")
            g.emit(ind, f"if {_lit(lo)} <= v <= {_lit(hi)}:")
            g.emit(ind + 1, f"if X.get({name!r}) != v:")
            g.emit(ind + 2, f"X[{name!r}] = v")
            g.emit(ind + 2, "st.changed = True")
            g.emit(ind, "else:")
            g.emit(ind + 1, f"IMPL[{extra_slot}] += 1")

        self.add_muxed(msg, spec.key, [spec.signal] if spec.signal else [], gen)

    def raw_expr(self, spec: ValueSpec, msg: Message) -> tuple[str, Signal] | None:
        if spec.signal is None:
            self.problems.append(Problem(self.file, spec.key,
                                         "enum and flag fields need a `signal`"))
            return None
        sig = self.signal(f"{spec.key}.signal", msg, spec.signal)
        if sig is None:
            return None
        bf = bitfield(msg, sig)
        raw = BitField(bf.name, bf.big_endian, bf.shift, bf.mask, bf.signed, None, 1, 0,
                       bf.min_bytes, bf.length)
        return raw.expr("le", "be"), sig

    def enum_field(self, slot: int, spec: ValueSpec, msg: Message) -> None:
        got = self.raw_expr(spec, msg)
        if got is None:
            return
        raw, sig = got
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

        def gen(g: _Codegen, ind: int, mux_var: str) -> None:
            t = g.const(table, "map")
            g.emit(ind, f"v = {t}.get({raw}, 'unknown')")
            g.emit(ind, f"if V[{slot}] != v:")
            g.emit(ind + 1, f"V[{slot}] = v")
            g.emit(ind + 1, "st.changed = True")

        self.add_muxed(msg, spec.key, [spec.signal or ""], gen)

    def bool_field(self, slot: int, spec: ValueSpec, msg: Message) -> None:
        got = self.raw_expr(spec, msg)
        if got is None:
            return
        raw, _ = got
        test = _flag_test(raw, spec.bit, spec.values)
        if spec.invert:
            test = f"not ({test})"

        def gen(g: _Codegen, ind: int, mux_var: str) -> None:
            g.emit(ind, f"v = bool({test})")
            g.emit(ind, f"if V[{slot}] is not v:")
            g.emit(ind + 1, f"V[{slot}] = v")
            g.emit(ind + 1, "st.changed = True")

        self.add_muxed(msg, spec.key, [spec.signal or ""], gen)

    def fault(self, index: int, key: str, message: str, signal: str, bit: int | None,
              values: tuple[int, ...] | None) -> None:
        spec = ValueSpec(key=key, message=message, signal=signal)
        msg = self.message(key, message)
        if msg is None:
            return
        got = self.raw_expr(spec, msg)
        if got is None:
            return
        raw, _ = got
        test = _flag_test("r", bit, values)

        def gen(g: _Codegen, ind: int, mux_var: str) -> None:
            g.emit(ind, f"r = {raw}")
            g.emit(ind, f"a = {test}")
            g.emit(ind, f"if FS[{index}] is not a:")
            g.emit(ind + 1, f"FS[{index}] = a")
            g.emit(ind + 1, "h = FH[0]")
            g.emit(ind + 1, "if h is not None:")
            g.emit(ind + 2, f"h({index}, ts, a, r)")

        self.add_muxed(msg, key, [signal], gen)

    def add_muxed(self, msg: Message, key: str, signals: list[str],
                  gen: Callable[[_Codegen, int, str], None]) -> None:
        """Add `gen`; if its signals live in a multiplexed group, guard by the mux value."""
        muxer = mux_signal(msg)
        ids: set[int] | None = None
        for name in signals:
            for s in msg.signals:
                if s.name == name and s.multiplexer_ids is not None and muxer is not None:
                    ids = set(s.multiplexer_ids) if ids is None else ids & set(s.multiplexer_ids)
        if ids is None or muxer is None:
            self.add(msg, key, gen)
            return
        mux_ids = sorted(ids)

        def guarded(g: _Codegen, ind: int, mux_var: str) -> None:
            g.emit(ind, f"if {mux_var} in {set(mux_ids)!r}:" if len(mux_ids) > 1
                   else f"if {mux_var} == {mux_ids[0]}:")
            gen(g, ind + 1, mux_var)

        self.add(msg, key, guarded)

    def cells(self, kind: str, src: CellSource) -> None:
        msg = self.message(src.key, src.message)
        if msg is None:
            return
        muxer = mux_signal(msg)
        if src.mux and muxer is None:
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
        idx_sig = None
        if src.index_signal is not None:
            idx_sig = self.signal(f"{src.key}.index", msg, src.index_signal)
            if idx_sig is None:
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
                    plan.append((num - src.name_base + src.offset, bf, inv_by_num.get(num)))
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

        def write_cells(g: _Codegen, ind: int, plan: list[tuple[int | None, BitField,
                                                                 BitField | None]],
                        base: str | None, relative: bool = False) -> None:
            arr = {"voltages": "CV", "temps": "CT", "balancing": "CB"}[kind]
            ensure = {"voltages": "st.ensure_cells", "temps": "st.ensure_temps",
                      "balancing": "st.ensure_balancing"}[kind]
            changed = "st.cells_changed = st.changed = True"  # derived fields follow cells
            for slot, bf, inv in plan:
                if relative:
                    idx = f"{base} + {slot}" if slot else f"{base}"
                elif src_.order == "name":
                    idx = f"{slot}" if base is None else f"{base} + {slot}"
                elif base is None:
                    idx = f"{src_.first + src_.offset + (slot or 0)}"
                else:
                    idx = f"{base} + {slot}" if slot else base
                if kind == "balancing" and src_.bitfield:
                    raw = bf.expr("le", "be")
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
                    g.emit(ind + 1, f"v = bool({bf.expr('le', 'be')})")
                else:
                    e = bf.expr("le", "be")
                    if scale != 1:
                        e = f"({e} * {scale!r})"
                    if o:
                        e = f"({e} + {o!r})"
                    g.emit(ind + 1, f"v = {e}")
                kw = "if"
                if inv is not None:  # the BMS itself says the value is invalid: no count
                    raw_inv = BitField(inv.name, inv.big_endian, inv.shift, inv.mask, False, None,
                                       1, 0, inv.min_bytes, inv.length).expr("le", "be")
                    g.emit(ind + 1, f"if {raw_inv} == {src_.invalid_value}:")
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
                if limit == MAX_CELLS:  # a known cell count makes slots past it just unused
                    g.emit(ind, "else:")
                    g.emit(ind + 1, f"IMPL[{impl_slot}] += 1")

        if src.mux:
            assert muxer is not None

            uniform = _uniform_mux(plans, src_)

            def gen_mux(g: _Codegen, ind: int, mux_var: str) -> None:
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
                    write_cells(g, ind + 1, rel, "b0", relative=True)
                    return
                first = True
                for mid, plan in sorted(plans.items(), key=lambda kv: kv[0] or 0):
                    base = None if src_.order == "name" else \
                        f"{(mid or 0) * src_.stride + src_.offset}"
                    g.emit(ind, f"{'if' if first else 'elif'} {mux_var} == {mid}:")
                    write_cells(g, ind + 1, plan, base)
                    first = False

            self.add(msg, src.key, gen_mux)
        else:
            def gen_plain(g: _Codegen, ind: int, mux_var: str) -> None:
                plan = plans.get(None, [])
                base = None
                if idx_sig is not None:
                    ie = bitfield(msg, idx_sig).expr("le", "be")
                    base = f"int({ie}) * {src_.stride} + {src_.offset}" if src_.stride != 1 \
                        else f"int({ie}) + {src_.offset}"
                    g.emit(ind, f"b0 = {base}")
                    base = "b0"
                write_cells(g, ind, plan, base)

            self.add_muxed(msg, src.key, [s.name for s in values], gen_plain)

    constants: dict[int, Value]
    extra_consts: dict[str, Value]

    def build(self, state: PackState, impl: list[int], fault_state: list[bool],
              fault_hook: list[FaultHook | None]) -> tuple[dict[int, Callable[[float, bytes],
                                                                            None]],
                                                           dict[int, str]]:
        handlers: dict[int, Callable[[float, bytes], None]] = {}
        sources: dict[int, str] = {}
        offset = self.cfg.id_offset
        for name, parts in self.msgs.items():
            msg = self.msg_objs[name]
            g = _Codegen()
            body = _Codegen()
            muxer = mux_signal(msg)
            for _key, fn in parts:
                fn(body, 1, "m")
            code = "\n".join(body.lines)
            g.consts.update(body.consts)
            need_le = "le" in _words(code)
            need_be = "be" in _words(code)
            min_bytes = 1
            for s in msg.signals:  # the frame must hold every signal we read
                if re.search(rf"\b{re.escape(s.name)}\b", ""):  # pragma: no cover
                    pass
            used = _bits_used(msg, code)
            min_bytes = max([used, 1])
            L = msg.length
            lines = ["def handler(ts, data):", "    CNT.frames += 1", "    n = len(data)",
                     f"    if n < {min_bytes}:", "        CNT.short_frames += 1", "        return",
                     "    st.last_seen = ts", "    st.last_ts = ts"]
            if need_le or (muxer is not None and muxer.byte_order == "little_endian"):
                lines.append("    le = _fb(data, 'little')")
            if need_be or (muxer is not None and muxer.byte_order == "big_endian"):
                lines.append("    be = _fb(data, 'big')")
                lines.append(f"    if n != {L}:")
                lines.append(f"        be = be << ({L} - n) * 8 if n < {L} else "
                             f"be >> (n - {L}) * 8")
            if muxer is not None and re.search(r"\bm\b", code):
                lines.append(f"    m = {bitfield(msg, muxer).expr('le', 'be')}")
            src = "\n".join(lines) + "\n" + code + "\n"
            ns: dict[str, Any] = {
                "_fb": int.from_bytes, "_unpack": unpack_float, "_INF": math.inf, "st": state, "V": state.values,
                "CV": state.cell_v, "CT": state.cell_t, "CB": state.balancing,
                "X": state.extras, "IMPL": impl, "CNT": self.counters, "FS": fault_state,
                "FH": fault_hook, **g.consts,
            }
            exec(compile(src, f"<handler {self.cfg.id}:{name}>", "exec"), ns)
            key = message_key(msg) + offset
            handlers[key] = ns["handler"]
            sources[key] = name
        return handlers, sources

    counters: PackCounters


class _ExprError(Exception):
    pass


def _words(code: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_]\w*", code))


def _bits_used(msg: Message, code: str) -> int:
    """Smallest frame length (bytes) that holds every bit the handler reads."""
    need = 1
    for s in msg.signals:
        bf = bitfield(msg, s)
        src = "be" if bf.big_endian else "le"
        pat = f"({src} >> {bf.shift}) & {bf.mask:#x}" if bf.shift else f"({src} & {bf.mask:#x}"
        if pat in code:
            need = max(need, bf.min_bytes)
    return need


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


def _uniform_mux(plans: dict[int | None, Plan], src: CellSource,
                 ) -> tuple[list[int], int, int, Plan] | None:
    """If every mux group has the same bit layout and its cells start at a*mux + b,
    return (mux values, a, b, the layout with cell offsets relative to the start)."""
    groups = sorted((mid, plan) for mid, plan in plans.items() if mid is not None)
    if len(groups) < 2 or len(groups) != len(plans):
        return None

    def absolute(mid: int, plan: Plan) -> list[tuple[int, BitField, BitField | None]]:
        out = []
        for slot, bf, inv in plan:
            idx = slot if src.order == "name" else mid * src.stride + src.offset + (slot or 0)
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

    def get(self, path: str) -> Database:
        got = self._dbs.get(path)
        if got is None:
            try:
                got = load_dbc(path)
            except DbcError as e:
                got = e
            self._dbs[path] = got
        if isinstance(got, DbcError):
            raise got
        return got


def compile_pack(cfg: PackConfig, cache: DbcCache, problems: list[Problem]) -> CompiledPack | None:
    """Check the pack's profile against its DBCs and build its frame handlers.

    Problems are appended to `problems`; returns None when the pack cannot run.
    """
    dbs: list[tuple[str, Database]] = []
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
    prof = cfg.profile
    for name, spec in prof.fields.items():
        c.field(name, spec)
    for name, spec in prof.extras.items():
        c.extra(name, spec)
    for kind, srcs in prof.cells.items():
        for src in srcs:
            c.cells(kind, src)
    for i, f in enumerate(prof.faults):
        c.fault(i, f.key, f.message, f.signal, f.bit, f.values)
    if len(problems) > before:
        return None
    state = PackState(pack_id=cfg.id)
    state.expected_cells = cfg.cell_count
    for slot, v in c.constants.items():
        state.values[slot] = v
    for name, v in c.extra_consts.items():
        state.extras[name] = v
    for name in prof.fields:
        state.mapped[FIELD_INDEX[name]] = True
    if cfg.cell_count:
        state.ensure_cells(cfg.cell_count)
        if prof.cells.get("balancing"):
            state.ensure_balancing(cfg.cell_count)
    impl = [0] * (len(FIELD_INDEX) + 3)
    fault_state = [False] * len(prof.faults)
    hook: list[FaultHook | None] = [None]
    handlers, sources = c.build(state, impl, fault_state, hook)
    return CompiledPack(cfg, state, handlers, c.counters, impl, sources, hook)
