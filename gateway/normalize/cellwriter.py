"""The generated code that writes cells into the pack state.

One set of rules (`CellRules`: the valid range, the cells written, where implausible
values are counted, growing the lists, the change marks) and one emitter of them
(`CellRules.store`) serve both writers of cells:
- a `cells:` source (voltages, temperatures or balancing flags of one message), laid out
  by normalize/cells.py and checked against the DBC first, so a layout that can never
  write a cell is a config problem: its code goes into the message's frame handler;
- cells read by something other than a frame handler (an ISO-TP answer, through
  `Pipeline.write_cells`): `polled_writer` generates a small function for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from cantools.database.can import Message, Signal

from gateway.config import MAX_CELLS, CellKind, CellSource, PackConfig, Problem, ValueSpec
from gateway.decode.dbc import MuxStep, SignalRead, Source, bitfield, compile_source
from gateway.model import FIELD_INDEX, PackState
from gateway.normalize.cells import (
    BitSlots,
    cell_slots,
    cells_per_group,
    is_pattern,
    matching,
    reach_problem,
    uniform_mux,
)
from gateway.normalize.expr import literal

if TYPE_CHECKING:
    from gateway.normalize.compiler import Compiler

CELL_VALID = {"voltages": (0.0, 6.0), "temps": (-60.0, 150.0)}
_ARRAY = {"voltages": "CV", "temps": "CT", "balancing": "CB"}
_ENSURE = {"voltages": "st.ensure_cells", "temps": "st.ensure_temps",
           "balancing": "st.ensure_balancing"}
_CHANGED = "st.cells_changed = st.changed = True"  # derived fields follow cells

# (frame time, first cell (0-based), values): None is a value the source does not carry
PolledWriter = Callable[[float, int, Sequence[float | None]], None]


def cell_names(state: PackState) -> dict[str, Any]:
    """What the names in generated cell code stand for (both writers bind these)."""
    return {"st": state, "CV": state.cell_v, "CT": state.cell_t, "CB": state.balancing}


class Emitter(Protocol):
    def emit(self, indent: int, line: str) -> None: ...


class _Lines:
    """An `Emitter` for code that reads no frame (Source needs a message layout)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)


@dataclass(frozen=True, slots=True)
class CellRules:
    """What every write of a cell of one kind obeys, wherever its value comes from."""

    kind: str
    limit: int  # cells past it are not written
    presized: bool  # compile_pack sized the state's list to the cell count
    valid: tuple[float, float]
    impl_slot: int

    def store(self, g: Emitter, ind: int, idx: str | None, value: str,
              nulls: Sequence[str] = ()) -> None:
        """Emit the write of value `value` into cell `idx` (None: `i` is already set).
        Where a test in `nulls` holds, the value is not available: the cell is null, not
        counted; a value outside the valid range is counted implausible and null."""
        arr, ensure, limit = _ARRAY[self.kind], _ENSURE[self.kind], self.limit
        if idx is not None:
            g.emit(ind, f"i = {idx}")
        g.emit(ind, f"if 0 <= i < {limit}:")
        g.emit(ind + 1, f"v = {value}")
        kw = "if"
        for test in nulls:
            g.emit(ind + 1, f"{kw} {test}:")
            g.emit(ind + 2, "v = None")
            kw = "elif"
        if self.kind != "balancing":
            lo, hi = self.valid
            g.emit(ind + 1, f"{kw} not ({literal(lo)} <= v <= {literal(hi)}):")
            g.emit(ind + 2, f"IMPL[{self.impl_slot}] += 1")
            g.emit(ind + 2, "v = None")
        if not self.presized:
            g.emit(ind + 1, f"if i >= len({arr}):")
            g.emit(ind + 2, f"{ensure}(i + 1)")
        g.emit(ind + 1, f"if {arr}[i] != v:")
        g.emit(ind + 2, f"{arr}[i] = v")
        g.emit(ind + 2, _CHANGED)
        # a known cell count makes slots past it just unused; an index outside
        # 1..MAX_CELLS (an `index:` signal with a garbage value) is counted
        g.emit(ind, "else:" if limit == MAX_CELLS else
               f"elif i < 0 or i >= {MAX_CELLS}:")
        g.emit(ind + 1, f"IMPL[{self.impl_slot}] += 1")


def cell_rules(cfg: PackConfig, kind: str, valid: tuple[float, float] | None = None,
               ) -> CellRules:
    """The rules for cells of `kind` in this pack (`valid`: a source's own range)."""
    # Frames often carry more slots than the pack has cells (the last group of a
    # sweep): with a known cell count, slots past it are ignored, not counted.
    limit = cfg.cell_count if kind != "temps" and cfg.cell_count else MAX_CELLS
    return CellRules(kind, limit, limit != MAX_CELLS,
                     valid or CELL_VALID.get(kind, (float("-inf"), float("inf"))),
                     len(FIELD_INDEX) + (0 if kind == "voltages" else 1))


def polled_writer(cfg: PackConfig, kind: CellKind, state: PackState,
                  impl: list[int]) -> PolledWriter:
    """The function writing cells `first`, `first + 1`, ... of `kind` read by something
    other than a frame handler: by the pack's `CellRules`, through the emitter of the
    frame handlers' cell code, so a rule changed there changes both."""
    g = _Lines()
    g.emit(0, f"def write(ts, first, values):  # pack {cfg.id}: {kind} not from a frame")
    g.emit(1, "for i, x in enumerate(values, first):")
    cell_rules(cfg, kind).store(g, 2, None, "x", ("x is None",))
    g.emit(1, "st.last_seen = ts")
    g.emit(1, "st.last_ts = ts")
    src = "\n".join(g.lines) + "\n"
    ns: dict[str, Any] = {**cell_names(state), "IMPL": impl}
    compile_source(src, f"<pack {cfg.id} profile {cfg.profile.name} {kind} writer>", ns)
    write: PolledWriter = ns["write"]
    return write


@dataclass(frozen=True, slots=True)
class _CellCode:
    """How a source's generated code writes one cell."""

    src: CellSource
    per_group: int
    scale: float
    offset: float
    rules: CellRules

    def write(self, g: Source, ind: int, plan: BitSlots, base: str | None) -> None:
        """Write the cells of `plan`, slot offsets from `base` (None: the fixed start)."""
        src, rules = self.src, self.rules
        kind, limit = rules.kind, rules.limit
        arr, ensure = _ARRAY[kind], _ENSURE[kind]
        for slot, bf, inv in plan:
            if base is None:
                idx = f"{src.start(None, self.per_group) + slot}"
            else:
                idx = f"{base} + {slot}" if slot else base
            if kind == "balancing" and src.bitfield:
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
                g.emit(ind + 3, _CHANGED)
                continue
            if kind == "balancing":
                e = f"bool({g.read(bf)})"
            else:
                e = g.read(bf)
                if self.scale != 1:
                    e = f"({e} * {self.scale!r})"
                if self.offset:
                    e = f"({e} + {self.offset!r})"
            nulls = []
            if src.sentinel and kind != "balancing":  # "not available": no count
                sent = g.const(frozenset(src.sentinel), "sentinel")
                nulls.append(f"{g.read(bf, raw=True)} in {sent}")
            if inv is not None:  # the BMS itself says the value is invalid: no count
                raw_inv = g.read(replace(inv, signed=False), raw=True)
                nulls.append(f"{raw_inv} == {src.invalid_value}")
            rules.store(g, ind, idx, e, nulls)


def _select(c: Compiler, msg: Message, spec: tuple[str, ...] | str,
            key: str) -> list[Signal] | None:
    """The signals a source names (a problem and None if one is missing)."""
    if isinstance(spec, str) and is_pattern(spec):
        found = matching(msg, spec)
        if not found:
            c.problems.append(Problem(
                c.file, key, f"pattern {spec!r} matches no signal of {msg.name!r}",
                f"its signals: {', '.join(s.name for s in msg.signals[:10])}"))
            return None
        return found
    names = (spec,) if isinstance(spec, str) else spec
    out = []
    for n in names:
        s = c.signal(key, msg, n)
        if s is None:
            return None
        out.append(s)
    return out


def compile_cells(c: Compiler, kind: str, src: CellSource) -> None:
    """Check one cell source against its message and add the code writing its cells."""
    msg = c.message(src.key, src.message)
    if msg is None:
        return
    layout = c.layout(msg)
    if src.mux and not layout.muxers:
        c.problems.append(Problem(c.file, f"{src.key}.mux",
                                  f"message {msg.name!r} is not multiplexed",
                                  "remove `mux: true`, or use `index:`"))
        return
    values = _select(c, msg, src.signals, f"{src.key}.signals")
    if values is None:
        return
    invalid = _select(c, msg, src.invalid, f"{src.key}.invalid") if src.invalid else []
    if invalid is None:
        return
    idx_read = None
    if src.index_signal is not None:
        idx_read = c.read(f"{src.key}.index", msg, src.index_signal)
        if idx_read is None:
            return
    reads: list[SignalRead] = []
    for s in values + invalid:
        got = c.read(f"{src.key}.signals", msg, s.name)
        if got is None:
            return
        reads.append(got)
    muxer: str | None = None
    if src.mux:
        # the cells' own multiplexer selects the group (the inner one when nested)
        parents = sorted({s.multiplexer_signal or "" for s in values})
        if parents == [""] or len(parents) != 1:
            c.problems.append(Problem(
                c.file, f"{src.key}.mux",
                f"the signals of {msg.name!r} it names are "
                + ("not multiplexed" if parents == [""] else
                   f"under different multiplexers ({', '.join(p or '(none)' for p in parents)})"),
                "name the signals of one multiplexer, or remove `mux: true`"))
            return
        muxer = parents[0]
        path: tuple[MuxStep, ...] | None = layout.muxers[muxer][1] if muxer in layout.muxers \
            else None
        if path is None:
            c.problems.append(Problem(c.file, f"{src.key}.mux",
                                      f"multiplexer {muxer!r} lies beyond the message",
                                      "fix the DBC"))
            return
    else:
        path = c.together(f"{src.key}.signals", msg, reads + ([idx_read] if idx_read else []))
        if path is None:
            return
    slots, problem = cell_slots(src, values, invalid)
    if problem is not None:
        c.problems.append(Problem(c.file, f"{src.key}.{problem[0]}", *problem[1:]))
        return
    plans: dict[int | None, BitSlots] = {
        mid: [(slot, bitfield(msg, s), None if inv is None else bitfield(msg, inv))
              for slot, s, inv in group]
        for mid, group in slots.items()}
    per_group = cells_per_group(src, kind, slots)  # the default stride
    if src.stride is not None and src.order == "position" and (muxer or idx_read) \
            and src.stride < per_group:
        c.problems.append(Problem(
            c.file, f"{src.key}.stride",
            f"stride {src.stride} is less than the {per_group} cells each group carries: "
            "groups would overwrite each other", f"stride: {per_group} (or remove it)"))
        return
    if idx_read is None and (problem := reach_problem(src, kind, slots, per_group)):
        c.problems.append(Problem(c.file, f"{src.key}.{problem[0]}", *problem[1:]))
        return
    f, o = ValueSpec(key=src.key, unit=src.unit).factor_offset()
    code = _CellCode(src, per_group, src.scale * f, o, cell_rules(c.cfg, kind, src.valid))

    if muxer is not None:
        uniform = uniform_mux(plans, src, per_group)
        mux_name = muxer

        def gen_mux(g: Source, ind: int) -> None:
            mux_var = g.mux_var(mux_name)
            if uniform is not None:
                # every group has the same layout (the usual case): one code path with
                # the first cell computed from the mux value, not a branch per group
                mids, a, b, rel = uniform
                lo, hi = min(mids), max(mids)
                cond = (f"{lo} <= {mux_var} <= {hi}" if len(mids) == hi - lo + 1
                        else f"{mux_var} in {g.const(frozenset(mids), 'mux')}")
                g.emit(ind, f"if {cond}:")
                start = f"{mux_var} * {a}" if a != 1 else mux_var
                g.emit(ind + 1, f"b0 = {start} + {b}" if b else f"b0 = {start}")
                with g.under(MuxStep(mux_name, frozenset(mids)), by_value=True):
                    code.write(g, ind + 1, rel, "b0")
                return
            first = True
            for mid, plan in sorted(plans.items(), key=lambda kv: kv[0] or 0):
                g.emit(ind, f"{'if' if first else 'elif'} {mux_var} == {mid}:")
                with g.under(MuxStep(mux_name, frozenset(() if mid is None else (mid,)))):
                    code.write(g, ind + 1, plan, f"{src.start(mid, per_group)}")
                first = False

        c.add(msg, src.key, path, gen_mux, (mux_name,))
        return

    def gen_plain(g: Source, ind: int) -> None:
        base = None
        if idx_read is not None:
            ie = g.read(idx_read.field, indexes=True)
            stride = per_group if src.stride is None else src.stride
            b = src.start(0, per_group)
            base = f"int({ie}) * {stride}" if stride != 1 else f"int({ie})"
            g.emit(ind, f"b0 = {base} + {b}" if b else f"b0 = {base}")
            base = "b0"
        code.write(g, ind, plans.get(None, []), base)

    c.add(msg, src.key, path, gen_plain)
