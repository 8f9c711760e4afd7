"""Fault stage: BMS flags and gateway rules on the normalized pack -> `FaultEvent`s.

Everything runs in frame time: every method takes the timestamp of the data it is
given and the clock is never read, so replaying a log at any speed gives the same
events.

Threshold rules (`RULES`, kind "high" or "low") raise when the value is past `raise_at`
(strictly: `>` for an upper limit, `<` for a lower one) and clear when it is back past
`clear_at` (`<=` / `>=`); between the two nothing changes (hysteresis). Both the raise
and the clear condition must hold for `debounce_s` of frame time; falling back into
the band restarts the timer. A raise emits one event however long the fault lasts.

Choices worth knowing:

* A value that is None (unknown) never raises and never clears, and leaves a running
  debounce timer alone: unknown is neither OK nor bad.
* Cell rules make one instance per cell (`cell` = 1-based number) when `cell_v` is
  populated, else one instance on `cell_v_max`/`cell_v_min` with `cell` from
  `cell_v_max_id`/`cell_v_min_id`. Cells are only scanned when the extreme field is past
  `clear_at` (or unknown) or an instance is pending/active, so a healthy pack costs a
  few comparisons per rule; this trusts the extreme fields to cover `cell_v`, which
  `PackState.derive()` guarantees when they are not mapped.
* Temperature rules likewise make one instance per sensor (`sensor` = 1-based) when
  `cell_t` is populated, else one instance on `temp_max_c` (over) / `temp_min_c` (under).
* The charge/discharge temperature rules only *raise* while charging (current_a > +0.5 A)
  or not charging (<= +0.5 A, idle counts as discharge); an unknown current raises
  neither. They clear on temperature alone, so "too hot to charge" stays up until the
  pack has cooled below `clear_at`, whether or not the charger stopped.
* over_current_charge / over_current_discharge thresholds are magnitudes in A (the
  discharge value is reported as -current_a). With `raise_at` null they follow the BMS's
  own `charge_current_limit_a` / `discharge_current_limit_a`: raise when the current
  exceeds that limit by 10 % (at least 0.5 A, so a limit of 0 A does not trip on sensor
  noise), clear at the limit. With neither they are off.
* When `raise_at` is set in YAML without `clear_at`, `clear_at` keeps the rule's default
  hysteresis width (for pack voltage 2 %, for currents 10 % of `raise_at`).
* decode_error_rate is in percent: errors / frames over the last `window_s` (frames
  counting every frame received, good or bad), judged only once the window holds at
  least 20 frames. implausible_values counts dropped values over the last `window_s`:
  it raises on more than `raise_at` (default 0) and clears after a window without drops.
* `active()` reports each fault's value, limit and message as of its raise, so the
  retained faults topic only changes when a fault comes or goes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.config import BmsFault, DtcStream
from gateway.faults.rules import RULES, RuleDef, RuleSpec, default_rules, fmt_num
from gateway.model import (
    FIELD_BY_NAME,
    FIELD_INDEX,
    FaultEvent,
    PackState,
    Severity,
    Value,
    clean,
    iso_ts,
)

CHARGING_A = 0.5  # current_a above this counts as charging
_EPS = 1e-6  # frame timestamps summed from 0.1 s steps are not exact
_MIN_FRAMES = 20  # decode error rate is not judged on fewer frames in the window
_LIMIT_MARGIN_A = 0.5  # over current vs the BMS limit: at least this far over it


@dataclass(slots=True)
class _Inst:
    """One fault instance: pending (timer running) or active (raised)."""

    code: str
    severity: Severity
    source: Literal["bms", "gateway"]
    title: str  # "cell 12 over voltage": the message without the numbers
    cell: int | None = None
    sensor: int | None = None
    active: bool = False
    pending: float | None = None  # frame time the opposite condition started
    since: float = 0.0
    value: Value = None
    limit: Value = None
    message: str = ""


@dataclass(slots=True)
class _Rule:
    spec: RuleSpec
    d: RuleDef
    upper: bool
    index: int  # FIELD_INDEX of d.field, -1 if none
    limit_index: int  # FIELD_INDEX of d.limit_field, -1 if none
    insts: dict[int, _Inst] = field(default_factory=dict)  # key: cell/sensor number, 0 = whole


_I_CURRENT = FIELD_INDEX["current_a"]
_I_VMAX_ID = FIELD_INDEX["cell_v_max_id"]
_I_VMIN_ID = FIELD_INDEX["cell_v_min_id"]
_BUS_CODES = ("can_bus_lost", "can_error_passive", "can_bus_off", "can_error_frames")


def _num(v: Value) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class FaultEngine:
    """Fault state of one pack. Events accumulate in `events`; the daemon drains it."""

    def __init__(self, pack_id: str, rules: dict[str, RuleSpec],
                 bms_faults: tuple[BmsFault, ...], stale_after_s: float) -> None:
        self.pack_id = pack_id
        self.events: list[FaultEvent] = []
        self._rules: dict[str, _Rule] = {}
        self._configure(rules, bms_faults, stale_after_s)
        self._bms: dict[int, _Inst] = {}
        self._dtc: dict[tuple[int, int], _Inst] = {}  # (stream, code): `pending` = last seen
        self._dtc_streams: list[tuple[DtcStream, dict[int, str]]] = []
        self._simple: dict[str, _Inst] = {}  # comm_lost and the CAN bus problems
        self._dec: deque[tuple[float, int, int]] = deque()
        self._impl_last: dict[str, int] = {}
        self._impl: deque[tuple[float, dict[str, int]]] = deque()
        self._impl_why = ""

    def reconfigure(self, ts: float, rules: dict[str, RuleSpec],
                    bms_faults: tuple[BmsFault, ...], stale_after_s: float) -> None:
        """A reload: new settings, the same fault state. An active fault stays active
        (no second `raised`, `since` kept) and is judged against the new limits from the
        next evaluation on; a rule switched off clears its faults now."""
        old = self._rules
        self._configure(rules, bms_faults, stale_after_s)
        for name, r in self._rules.items():
            if r.spec.enabled:
                r.insts = old[name].insts
                continue
            for _key, inst in sorted(old[name].insts.items()):
                if inst.active:
                    self._emit(ts, inst, "cleared", f"{inst.title} cleared: rule disabled",
                               value=None, limit=None)
            gone = self._simple.pop(name, None)
            if gone is not None:
                self._emit(ts, gone, "cleared", f"{gone.title} cleared: rule disabled",
                           value=None, limit=None)
        for index in [i for i in self._bms if i >= len(bms_faults)]:
            inst = self._bms.pop(index)
            self._emit(ts, inst, "cleared", f"{inst.title} cleared: no longer in the profile",
                       value=None, limit=None)

    def _configure(self, rules: dict[str, RuleSpec], bms_faults: tuple[BmsFault, ...],
                   stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self._bms_faults = bms_faults
        specs = default_rules()
        specs.update({k: v for k, v in rules.items() if k in specs})
        self._specs = specs
        self._rules = {}
        for name, d in RULES.items():
            s = specs[name]
            self._rules[name] = _Rule(s, d, d.kind != "low",
                                      FIELD_INDEX[d.field] if d.field else -1,
                                      FIELD_INDEX[d.limit_field] if d.limit_field else -1)
        live = [r for r in self._rules.values() if r.spec.enabled
                and r.d.kind in ("high", "low")
                and (r.spec.raise_at is not None or r.d.limit_field is not None)]
        self._element_rules = [r for r in live if r.d.element is not None]
        self._scalar_rules = [r for r in live if r.d.element is None]

    # -- BMS flags, comm and bus: raise/clear at once, one event per change

    def bms_flag(self, index: int, ts: float, active: bool, raw: float,
                 cell: int | None = None) -> None:
        if not 0 <= index < len(self._bms_faults):
            return
        f = self._bms_faults[index]
        inst = self._bms.get(index)
        title = f.text or f.code.replace("_", " ")
        if cell is not None:  # format 2 `cell_signal`: the BMS names the cell
            title = f"{title} (cell {cell})"
        if active and inst is None:
            inst = _Inst(f.code, f.severity, "bms", title, cell=cell, active=True, since=ts,
                         value=raw, message=title)
            self._bms[index] = inst
            self._emit(ts, inst, "raised", title, value=raw, limit=None)
        elif not active and inst is not None:
            del self._bms[index]
            self._emit(ts, inst, "cleared", f"{inst.title} cleared", value=raw, limit=None)

    def set_dtc_streams(self, streams: list[tuple[DtcStream, dict[int, str]]]) -> None:
        self._dtc_streams = streams

    def dtc(self, index: int, ts: float, number: int) -> None:
        """A trouble code reported by stream `index`: raised once, kept while reported."""
        key = (index, number)
        inst = self._dtc.get(key)
        if inst is not None:
            inst.pending = ts  # last reported
            return
        d, texts = self._dtc_streams[index]
        text = texts.get(number)
        title = f"DTC {number}" + (f": {text}" if text else "")
        inst = _Inst(f"{d.code}_{number}", d.severity, "bms", title, active=True, since=ts,
                     pending=ts, value=number, message=title)
        self._dtc[key] = inst
        self._emit(ts, inst, "raised", title, value=number, limit=None)

    def _dtc_expire(self, ts: float) -> None:
        for key, inst in list(self._dtc.items()):
            d, _ = self._dtc_streams[key[0]]
            if inst.pending is not None and ts - inst.pending > d.clear_after_s:
                del self._dtc[key]
                self._emit(ts, inst, "cleared", f"{inst.title} cleared: no longer reported",
                           value=inst.value, limit=None)

    def _simple_event(self, ts: float, code: str, active: bool, title: str, *,
                      detail: str, limit: Value = None) -> None:
        spec = self._specs.get(code)
        if spec is not None and not spec.enabled:
            return
        inst = self._simple.get(code)
        if active and inst is None:
            msg = f"{title}: {detail}" if detail else title
            inst = _Inst(code, spec.severity if spec else "warning", "gateway", title,
                         active=True, since=ts, limit=limit, message=msg)
            self._simple[code] = inst
            self._emit(ts, inst, "raised", msg, value=None, limit=limit)
        elif not active and inst is not None:
            del self._simple[code]
            msg = f"{title} cleared" + (f": {detail}" if detail else "")
            self._emit(ts, inst, "cleared", msg, value=None, limit=limit)

    def comm(self, ts: float, online: bool) -> None:
        """`ts` is when the pack went stale (last frame + stale_after_s), or the frame
        that brought it back."""
        self._simple_event(ts, "comm_lost", not online, RULES["comm_lost"].label,
                           detail="" if online else f"no frames for {fmt_num(self.stale_after_s)} s",
                           limit=self.stale_after_s)

    def bus_problem(self, ts: float, code: str, active: bool, detail: str) -> None:
        d = RULES.get(code)
        title = d.label if d is not None and d.kind == "event" else code.replace("_", " ")
        self._simple_event(ts, code, active, title, detail=detail)

    # -- windowed rules

    def decode_errors(self, ts: float, errors: int, frames: int) -> None:
        r = self._rules["decode_error_rate"]
        if not r.spec.enabled or r.spec.raise_at is None:
            return
        dq = self._dec
        if dq and (errors < dq[-1][1] or frames < dq[-1][2]):
            dq.clear()  # counters restarted
        dq.append((ts, errors, frames))
        cutoff = ts - (r.spec.window_s or 10.0)
        while len(dq) >= 2 and dq[1][0] <= cutoff:
            dq.popleft()
        _, e0, f0 = dq[0]
        n = frames - f0
        if n < _MIN_FRAMES:
            return
        pct = min(100.0, 100.0 * (errors - e0) / n)
        self._step(r, 0, ts, pct, rl=r.spec.raise_at, cl=r.spec.clear_at, can_raise=True)

    def implausible(self, ts: float, counts: dict[str, int], reason: str = "") -> None:
        """`counts`: dropped values per field so far; `reason`: the latest cross-signal
        check that dropped one (plausibility.py), shown in the raised event."""
        r = self._rules["implausible_values"]
        if not r.spec.enabled or r.spec.raise_at is None:
            return
        # The counts start at 0 with the compiled pack, so the first call's counts are
        # drops of this run (a pack whose first values are implausible must raise). Counts
        # below the last ones: a reload compiled the pack anew; count from 0 again.
        last, self._impl_last = self._impl_last, dict(counts)
        if any(c < last.get(k, 0) for k, c in counts.items()) or len(counts) < len(last):
            last = {}
        grown = {k: c - last.get(k, 0) for k, c in counts.items() if c > last.get(k, 0)}
        if grown:
            self._impl.append((ts, grown))
            self._impl_why = reason or f"out of range: {', '.join(sorted(grown))}"
        self._implausible_step(r, ts)

    def _implausible_step(self, r: _Rule, ts: float) -> None:
        dq = self._impl
        cutoff = ts - (r.spec.window_s or 10.0)
        while dq and dq[0][0] <= cutoff:
            dq.popleft()
        total = sum(sum(g.values()) for _, g in dq)
        if total > (r.spec.raise_at or 0.0) or r.insts:
            self._step(r, 0, ts, float(total), rl=r.spec.raise_at or 0.0, cl=r.spec.clear_at,
                       can_raise=True)

    # -- threshold rules on the normalized state

    def evaluate(self, ts: float, state: PackState) -> None:
        if self._dtc:
            self._dtc_expire(ts)
        vals = state.values
        cur = _num(vals[_I_CURRENT])
        charging = None if cur is None else cur > CHARGING_A
        for r in self._scalar_rules:
            v = _num(vals[r.index])
            if v is None:
                continue
            if r.d.negate:
                v = -v
            rl, cl = r.spec.raise_at, r.spec.clear_at
            if rl is None:  # over current following the BMS's own limit
                bl = _num(vals[r.limit_index])
                if bl is None:
                    continue
                cl = abs(bl)
                rl = max(cl * 1.1, cl + _LIMIT_MARGIN_A)
            if not r.insts and not (v > rl if r.upper else v < rl):
                continue
            self._step(r, 0, ts, v, rl=rl, cl=cl, can_raise=True)
        for r in self._element_rules:
            gate = r.d.gate
            can_raise = (True if gate is None else charging if gate == "charge"
                         else None if charging is None else not charging)
            items = state.cell_v if r.d.element == "cell" else state.cell_t
            self._elements(r, ts, vals, items, bool(can_raise))
        imp = self._rules["implausible_values"]
        if imp.insts:
            self._implausible_step(imp, ts)

    def _elements(self, r: _Rule, ts: float, vals: list[Value],
                  items: list[float | None], can_raise: bool) -> None:
        rl = r.spec.raise_at
        if rl is None:
            return
        cl = rl if r.spec.clear_at is None else r.spec.clear_at
        upper, insts = r.upper, r.insts
        extreme = _num(vals[r.index])
        populated = any(v is not None for v in items) if items else False
        if not populated or 0 in insts:
            # No per-element values (or an instance from before they appeared): judge
            # the extreme field; once elements exist it may only clear.
            if extreme is not None and (0 in insts or (can_raise and not populated and (
                    extreme > rl if upper else extreme < rl))):
                cell = None
                if r.d.element == "cell":
                    cid = _num(vals[_I_VMAX_ID if upper else _I_VMIN_ID])
                    cell = int(cid) if cid is not None else None
                self._step(r, 0, ts, extreme, rl=rl, cl=cl, can_raise=can_raise and not populated,
                           cell=cell, aggregate=True)
            if not populated:
                return
        if not insts and (not can_raise or (extreme is not None
                          and (extreme <= cl if upper else extreme >= cl))):
            return  # common case: nothing near a limit, nothing pending
        for i, v in enumerate(items):
            if v is None:
                continue
            n = i + 1
            if n in insts or (can_raise and (v > rl if upper else v < rl)):
                self._step(r, n, ts, v, rl=rl, cl=cl, can_raise=can_raise)

    def _step(self, r: _Rule, key: int, ts: float, v: float, *, rl: float, cl: float | None,
              can_raise: bool, cell: int | None = None, aggregate: bool = False) -> None:
        insts = r.insts
        inst = insts.get(key)
        upper = r.upper
        debounce = r.spec.debounce_s - _EPS
        if inst is None or not inst.active:
            if not (can_raise and (v > rl if upper else v < rl)):
                if inst is not None:
                    del insts[key]
                return
            if inst is None:
                inst = insts[key] = self._new_inst(r, key, cell, aggregate)
            if inst.pending is None:
                inst.pending = ts
            if ts - inst.pending < debounce:
                return
            inst.active, inst.pending, inst.since = True, None, ts
            inst.value, inst.limit = v, rl
            inst.message = self._message(r, inst.title, v, rl, "raised")
            self._emit(ts, inst, "raised", inst.message, value=v, limit=rl)
            return
        clear_at = rl if cl is None else cl
        if not (v <= clear_at if upper else v >= clear_at):
            inst.pending = None
            return
        if inst.pending is None:
            inst.pending = ts
        if ts - inst.pending < debounce:
            return
        del insts[key]
        self._emit(ts, inst, "cleared", self._message(r, inst.title, v, clear_at, "cleared"),
                   value=v, limit=clear_at)

    def _new_inst(self, r: _Rule, key: int, cell: int | None, aggregate: bool) -> _Inst:
        d = r.d
        sensor = None
        if not aggregate:
            if d.element == "cell":
                cell = key
            elif d.element == "sensor":
                sensor = key
        title = d.label
        if cell is not None:
            title = f"cell {cell} {title}"
        elif sensor is not None:
            title = f"sensor {sensor} {title}"
        return _Inst(r.spec.name, r.spec.severity, "gateway", title, cell=cell, sensor=sensor)

    def _message(self, r: _Rule, title: str, v: float, lim: float,
                 state: Literal["raised", "cleared"]) -> str:
        unit = f" {r.d.unit}" if r.d.unit else ""
        prec = FIELD_BY_NAME[r.d.field].precision if r.d.field in FIELD_BY_NAME else 2
        shown = str(clean(round(v, max(prec, 1))))
        if state == "raised":
            op = ">" if r.upper else "<"
            msg = f"{title}: {shown}{unit} {op} {fmt_num(lim)}{unit}"
        else:
            op = "<=" if r.upper else ">="
            msg = f"{title} cleared: {shown}{unit} {op} {fmt_num(lim)}{unit}"
        if r.d.kind == "rate" and r.spec.window_s:
            msg += f" in {fmt_num(r.spec.window_s)} s"
        if state == "raised" and self._impl_why and r is self._rules.get("implausible_values"):
            msg += f" ({self._impl_why})"
        if r.d.limit_field is not None and r.spec.raise_at is None:
            msg += " (BMS limit + 10 %)" if state == "raised" else " (BMS limit)"
        return msg

    def _emit(self, ts: float, inst: _Inst, state: Literal["raised", "cleared"], message: str,
              *, value: Value, limit: Value) -> None:
        self.events.append(FaultEvent(ts, self.pack_id, inst.code, inst.severity, state,
                                      inst.source, message, value, limit, inst.cell,
                                      inst.sensor))

    # -- snapshot and teardown

    def _all_active(self) -> list[_Inst]:
        out = [i for r in self._rules.values() for i in r.insts.values() if i.active]
        out.extend(self._bms.values())
        out.extend(self._dtc.values())
        out.extend(self._simple.values())
        return out

    def active(self) -> list[dict[str, Any]]:
        rows = sorted(self._all_active(), key=lambda i: (
            i.code, i.cell if i.cell is not None else i.sensor if i.sensor is not None else 0,
            i.source))
        out: list[dict[str, Any]] = []
        for i in rows:
            row: dict[str, Any] = {"code": i.code, "severity": i.severity, "source": i.source,
                                   "since": iso_ts(i.since), "value": clean(i.value),
                                   "limit": clean(i.limit)}
            if i.cell is not None:
                row["cell"] = i.cell
            if i.sensor is not None:
                row["sensor"] = i.sensor
            row["message"] = i.message
            out.append(row)
        return out

    def clear_all(self, ts: float) -> None:
        """Clear everything (the pack was removed by a reload)."""
        for i in sorted(self._all_active(), key=lambda i: (i.code, i.cell or i.sensor or 0)):
            self._emit(ts, i, "cleared", f"{i.title} cleared: pack removed", value=None,
                       limit=None)
        for r in self._rules.values():
            r.insts.clear()
        self._bms.clear()
        self._dtc.clear()
        self._simple.clear()
        self._dec.clear()
        self._impl.clear()
