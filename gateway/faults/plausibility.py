"""Plausibility across signals: values that each pass their own range but disagree.

A wrong layout or scale in a profile produces numbers that are individually possible and
jointly absurd: a 7.2 V pack made of 72 cells at 4.06 V, a minimum temperature above the
maximum, a pack at a tenth of its own discharge voltage limit. `cross_check` runs on the
frame-time tick, before anything is published or judged by the fault rules; each value
it rejects is set to "no value" (so it is not published), and returned with the reason
so the caller can count it and raise `implausible_values` (docs/faults.md).

Single values out of their range (SoC outside 0-100 %, a cell at 9 V) are dropped where
they are decoded (gateway/normalize/, `valid:` and the model's default ranges); this module
only adds the checks that need two or more values.
"""

from __future__ import annotations

from gateway.model import FIELD_INDEX, PackState, Value

# A pack may be several strings in parallel whose cells are all listed: its voltage is
# then the cell sum divided by the number of strings.
MAX_PARALLEL_STRINGS = 4
# Cells are sampled at other moments than the pack voltage (a slow broadcast may take
# half a minute to go round), so only gross disagreement counts.
SUM_TOLERANCE = 0.15
SUM_TOLERANCE_V = 2.0
CELL_COVERAGE = 0.9  # share of the cells known before the sum is compared at all
# voltage against the BMS's own limits
LIMIT_HIGH = 1.5
LIMIT_LOW = 0.5

_I = FIELD_INDEX


def _num(v: Value) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def voltage_vs_cells(voltage: float, cells: list[float | None],
                     count: int | None = None) -> str | None:
    """Why `voltage` cannot be the pack voltage of these cells, or None if it can.

    `count` is the number of cells when it is known for sure (configured, or sent by
    the BMS); the length of `cells` is not, while a slow broadcast is still filling it.
    """
    known = [c for c in cells if c is not None and c > 0.5]  # placeholders are not cells
    if len(known) < 2:
        return None
    partial = sum(known)
    # the cells seen so far are in series within a string: the pack has at least their
    # sum divided by the largest plausible number of parallel strings
    floor = partial / MAX_PARALLEL_STRINGS * (1 - SUM_TOLERANCE) - SUM_TOLERANCE_V
    if voltage < floor:
        return (f"pack voltage {_fmt(voltage)} V is below the sum of {len(known)} cells "
                f"({_fmt(partial)} V)")
    if count is None or count < len(known) or len(known) < CELL_COVERAGE * count:
        return None
    est = partial / len(known) * count
    for strings in range(1, MAX_PARALLEL_STRINGS + 1):
        want = est / strings
        if abs(voltage - want) <= want * SUM_TOLERANCE + SUM_TOLERANCE_V:
            return None
    return (f"pack voltage {_fmt(voltage)} V disagrees with the sum of the cells "
            f"({_fmt(est)} V over {count} cells)")


def cross_check(st: PackState) -> list[tuple[str, str]]:
    """Drop values that contradict each other; return (field, reason) for each dropped."""
    vals = st.values
    out: list[tuple[str, str]] = []

    def drop(reason: str, *names: str) -> None:
        for n in names:
            if vals[_I[n]] is not None:
                vals[_I[n]] = None
                out.append((n, reason))

    v = _num(vals[_I["voltage_v"]])
    if v is not None:
        n = _num(vals[_I["cell_count"]]) if st.mapped[_I["cell_count"]] else None
        why = voltage_vs_cells(v, st.cell_v, st.expected_cells or (int(n) if n else None))
        cvl = _num(vals[_I["charge_voltage_limit_v"]])
        dvl = _num(vals[_I["discharge_voltage_limit_v"]])
        if why is None and cvl is not None and cvl > 0 and v > cvl * LIMIT_HIGH + 1:
            why = f"pack voltage {_fmt(v)} V is far above the charge voltage limit {_fmt(cvl)} V"
        if why is None and dvl is not None and dvl > 0 and v < dvl * LIMIT_LOW - 1:
            why = (f"pack voltage {_fmt(v)} V is far below the discharge voltage limit "
                   f"{_fmt(dvl)} V")
        if why is not None:
            drop(why, "voltage_v")
    for lo_name, hi_name, slack, unit in (("temp_min_c", "temp_max_c", 0.5, "degC"),
                                          ("cell_v_min", "cell_v_max", 0.001, "V")):
        lo, hi = _num(vals[_I[lo_name]]), _num(vals[_I[hi_name]])
        if lo is not None and hi is not None and lo > hi + slack:
            drop(f"{lo_name} {_fmt(lo)} {unit} is above {hi_name} {_fmt(hi)} {unit}",
                 lo_name, hi_name)
    rem, cap = _num(vals[_I["remaining_ah"]]), _num(vals[_I["capacity_ah"]])
    if rem is not None and cap is not None and cap > 0 and rem > cap * 1.2 + 1:
        drop(f"remaining_ah {_fmt(rem)} Ah is above the capacity {_fmt(cap)} Ah", "remaining_ah")
    return out
