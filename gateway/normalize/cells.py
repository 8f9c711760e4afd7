"""Where a profile's `cells:` source puts each cell: one description that both sides read.
Normalize generates the code that writes the cells into the pack state from it
(normalize/cellwriter.py), the simulator the frames that carry them
(commands/simulate/planning.py).

A source's value signals and invalid flags fall into groups by multiplexer value
(`group_by_mux`); in a group each signal has a slot, its cell offset from the group's
first cell, by bit position or by the number in its name (`cell_slots`); the group's first
cell is group x stride + first + offset (`CellSource.start`), the stride by default the
cells one group carries (`cells_per_group`).
"""

from __future__ import annotations

import fnmatch
import re

from cantools.database.can import Message, Signal

from gateway.config import MAX_CELLS, CellSource
from gateway.decode.dbc import BitField

CellSlot = tuple[int, Signal, Signal | None]  # (slot, value signal, its invalid flag)
Slots = dict[int | None, list[CellSlot]]  # by mux value (None: not multiplexed)
# (key under the source, what is wrong, the fix)
LayoutProblem = tuple[str, str, str]

_NUM_IN_NAME = re.compile(r"(\d+)(?!.*\d)")


def name_number(name: str) -> int | None:
    """The last number in a signal name that is not part of a trailing flag word."""
    base = re.sub(r"_?(invalid|valid|flag|Flag|invalidFlag)+$", "", name)
    m = _NUM_IN_NAME.search(base)
    return int(m.group(1)) if m else None


def bit_position(sig: Signal) -> int:
    """Where a signal starts in frame order (a big-endian signal: its most significant
    bit, numbered MSB first), for ordering slots by position."""
    if sig.byte_order == "little_endian":
        return int(sig.start)
    return int((sig.start // 8) * 8 + (7 - sig.start % 8))


def is_pattern(spec: tuple[str, ...] | str) -> bool:
    return isinstance(spec, str) and any(c in spec for c in "*?[")


def matching(msg: Message, pattern: str) -> list[Signal]:
    """The signals of `msg` an fnmatch pattern names (never a multiplexer)."""
    return [s for s in msg.signals if fnmatch.fnmatchcase(s.name, pattern)
            and not s.is_multiplexer]


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


def cell_slots(src: CellSource, values: list[Signal], invalid: list[Signal],
               ) -> tuple[Slots, LayoutProblem | None]:
    """Each group's slots, and the first problem of the layout: with `order: name` a
    signal without a number in its name (it gets no slot), by position a number of
    invalid flags other than of value signals (then no flag is paired)."""
    groups, inv_groups = group_by_mux(src, values, invalid)
    slots: Slots = {}
    problem: LayoutProblem | None = None
    for mid, sigs in groups.items():
        invs = inv_groups.get(mid, [])
        group: list[CellSlot] = []
        if src.order == "name":
            inv_by_num = {name_number(s.name): s for s in invs}
            for s in sigs:
                num = name_number(s.name)
                if num is None:
                    problem = problem or ("order", f"signal {s.name!r} has no number in its "
                                          "name", "use order: position")
                    continue
                group.append((num - src.name_base, s, inv_by_num.get(num)))
        else:
            by_pos = sorted(sigs, key=bit_position)
            invs = sorted(invs, key=bit_position)
            if invs and len(invs) != len(by_pos):
                problem = problem or ("invalid", f"{len(invs)} invalid flags for "
                                      f"{len(by_pos)} values", "list one invalid flag per "
                                      "value signal, in the same order")
            paired = len(invs) == len(by_pos)
            group = [(i, s, invs[i] if paired else None) for i, s in enumerate(by_pos)]
        slots[mid] = group
    return slots, problem


def cell_bits(src: CellSource, kind: str, sig: Signal) -> int:
    """Cells one signal carries: each bit of a `bitfield` balancing signal is a cell."""
    return int(sig.length) if kind == "balancing" and src.bitfield else 1


def cells_per_group(src: CellSource, kind: str, slots: Slots) -> int:
    """The cells the largest group carries: the stride when the profile gives none."""
    return max((sum(cell_bits(src, kind, s) for _, s, _ in group)
                for group in slots.values()), default=1)


def reach_problem(src: CellSource, kind: str, slots: Slots,
                  per_group: int) -> LayoutProblem | None:
    """Every cell the layout can address (each mux value of the DBC x stride + first
    + offset + slot) must lie in 1..MAX_CELLS: a cell past it or below 1 would be
    dropped on every frame. An `index:` signal's range is not known here: its cells
    out of range are counted at run time."""
    idx = [src.start(mid, per_group) + slot + cell_bits(src, kind, s) - 1
           for mid, group in slots.items() for slot, s, _ in group]
    if not idx:
        return None
    lo, hi = min(idx), max(idx)
    if lo >= 0 and hi < MAX_CELLS:
        return None
    what = "stride" if src.stride is not None else "first" if src.first else \
        "offset" if src.offset else "signals"
    mids = sorted(m for m in slots if m is not None)
    span = f" (mux {mids[0]}..{mids[-1]} from the DBC)" if mids else ""
    where = (f"cell {lo + 1}, below cell 1" if lo < 0 else
             f"cell {hi + 1}, past the {MAX_CELLS} cells a pack can have")
    return (what, f"the layout{span} reaches {where}: those cells would be dropped on "
            "every frame", "make group x stride + first + offset + the cells of a group "
            f"stay within 1..{MAX_CELLS}")


# A group's slots as bit fields, for code generation.
BitSlots = list[tuple[int, BitField, BitField | None]]


def uniform_mux(groups: dict[int | None, BitSlots], src: CellSource, per_group: int,
                ) -> tuple[list[int], int, int, BitSlots] | None:
    """If every mux group has the same bit layout and its cells start at a*mux + b,
    return (mux values, a, b, the layout with cell offsets relative to the start)."""
    muxed = sorted((mid, plan) for mid, plan in groups.items() if mid is not None)
    if len(muxed) < 2 or len(muxed) != len(groups):
        return None

    def absolute(mid: int, plan: BitSlots) -> BitSlots:
        return [(src.start(mid, per_group) + slot, bf, inv) for slot, bf, inv in plan]

    def layout(bf: BitField | None) -> tuple[object, ...] | None:
        if bf is None:
            return None
        return (bf.big_endian, bf.shift, bf.mask, bf.signed, bf.float_fmt, bf.scale,
                bf.offset, bf.length)

    ref_mid, ref_plan = muxed[0]
    ref = absolute(ref_mid, ref_plan)
    if not ref:
        return None
    (m1, p1) = muxed[1]
    starts = [a[0] for a in absolute(m1, p1)]
    if not starts:
        return None
    a_num = starts[0] - ref[0][0]
    if (m1 - ref_mid) == 0 or a_num % (m1 - ref_mid):
        return None
    a = a_num // (m1 - ref_mid)
    b = ref[0][0] - a * ref_mid
    rel = [(idx - ref[0][0], bf, inv) for idx, bf, inv in ref]
    for mid, plan in muxed:
        cells = absolute(mid, plan)
        if len(cells) != len(ref) or cells[0][0] != a * mid + b:
            return None
        for (idx, bf, inv), (ridx, rbf, rinv) in zip(cells, ref, strict=True):
            if (idx - cells[0][0] != ridx - ref[0][0] or layout(bf) != layout(rbf)
                    or layout(inv) != layout(rinv)):
                return None
    return [m for m, _ in muxed], a, b, rel
