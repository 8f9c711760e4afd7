"""The normalized pack model: the one vocabulary every stage after decoding speaks.

`FIELDS` is the single table of pack-level quantities. The profile maps DBC signals
onto these names, the publisher serialises them in this order, Home Assistant
discovery reads their units and classes from here, and the fault rules address them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

Kind = Literal["float", "int", "bool", "enum"]
Severity = Literal["info", "warning", "alarm", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "alarm", "critical")

# Normalized BMS states a profile may map a vendor's value table onto.
BMS_STATES = ("init", "standby", "idle", "precharge", "charging", "discharging",
              "balancing", "error", "shutdown", "unknown")


@dataclass(frozen=True, slots=True)
class FieldInfo:
    name: str
    unit: str | None
    kind: Kind
    deadband: float  # default publish deadband, in the field's unit
    ha_device_class: str | None = None
    precision: int = 2  # suggested display precision
    label: str = ""


def _f(name: str, unit: str | None, deadband: float, dc: str | None, prec: int,
       label: str, kind: Kind = "float") -> FieldInfo:
    return FieldInfo(name, unit, kind, deadband, dc, prec, label)


# Order is the order of keys in the state payload.
FIELDS: tuple[FieldInfo, ...] = (
    _f("voltage_v", "V", 0.05, "voltage", 2, "Pack voltage"),
    _f("current_a", "A", 0.1, "current", 1, "Pack current"),
    _f("power_w", "W", 10.0, "power", 0, "Pack power"),
    _f("soc_pct", "%", 0.1, "battery", 1, "State of charge"),
    _f("soh_pct", "%", 0.1, None, 1, "State of health"),
    _f("temp_min_c", "°C", 0.2, "temperature", 1, "Minimum temperature"),
    _f("temp_max_c", "°C", 0.2, "temperature", 1, "Maximum temperature"),
    _f("cell_count", None, 0.0, None, 0, "Cell count", "int"),
    _f("cell_v_min", "V", 0.002, "voltage", 3, "Cell voltage min"),
    _f("cell_v_max", "V", 0.002, "voltage", 3, "Cell voltage max"),
    _f("cell_v_avg", "V", 0.002, "voltage", 3, "Cell voltage average"),
    _f("cell_v_delta", "V", 0.002, "voltage", 3, "Cell voltage delta"),
    _f("cell_v_min_id", None, 0.0, None, 0, "Lowest cell", "int"),
    _f("cell_v_max_id", None, 0.0, None, 0, "Highest cell", "int"),
    _f("charge_current_limit_a", "A", 0.5, "current", 1, "Charge current limit"),
    _f("discharge_current_limit_a", "A", 0.5, "current", 1, "Discharge current limit"),
    _f("charge_voltage_limit_v", "V", 0.05, "voltage", 2, "Charge voltage limit"),
    _f("discharge_voltage_limit_v", "V", 0.05, "voltage", 2, "Discharge voltage limit"),
    _f("capacity_ah", "Ah", 0.5, None, 1, "Capacity"),
    _f("remaining_ah", "Ah", 0.1, None, 1, "Remaining capacity"),
    _f("cycles", None, 0.0, None, 0, "Cycles", "int"),
    _f("charge_enabled", None, 0.0, None, 0, "Charge enabled", "bool"),
    _f("discharge_enabled", None, 0.0, None, 0, "Discharge enabled", "bool"),
    _f("contactor_closed", None, 0.0, None, 0, "Contactor closed", "bool"),
    _f("balancing_active", None, 0.0, None, 0, "Balancing", "bool"),
    _f("bms_state", None, 0.0, "enum", 0, "BMS state", "enum"),
)
FIELD_INDEX: dict[str, int] = {f.name: i for i, f in enumerate(FIELDS)}
FIELD_BY_NAME: dict[str, FieldInfo] = {f.name: f for f in FIELDS}

Value = float | int | bool | str | None


def iso_ts(ts: float) -> str:
    """ISO 8601 UTC with milliseconds, from a frame timestamp in epoch seconds."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def clean(v: Value) -> Value:
    """Round away float noise (292.40000000000003) so payloads are stable and short."""
    if type(v) is float:
        if not math.isfinite(v):
            return None
        r = round(v, 6)
        return int(r) if r.is_integer() and abs(r) < 1e15 else r
    return v


@dataclass(slots=True)
class PackState:
    """Mutable live picture of one pack, written by the normalizer stage.

    Values are stored in flat lists indexed by `FIELD_INDEX` and cell number - 1:
    the hot path writes a list slot, nothing else.
    """

    pack_id: str
    values: list[Value] = field(default_factory=lambda: [None] * len(FIELDS))
    mapped: list[bool] = field(default_factory=lambda: [False] * len(FIELDS))
    cell_v: list[float | None] = field(default_factory=list)
    cell_t: list[float | None] = field(default_factory=list)
    balancing: list[bool | None] = field(default_factory=list)
    expected_cells: int | None = None
    # False while the cell count is still being learned (gateway/cellcount.py): cells
    # are then neither published nor summarised, so nobody sees a 4-cell pack first.
    cells_known: bool = True
    last_seen: float | None = None  # frame time of the last frame for this pack
    last_ts: float = 0.0  # frame time of the newest value
    online: bool = False
    changed: bool = False  # something was written since the last publish check
    cells_changed: bool = False
    extras: dict[str, Value] = field(default_factory=dict)

    def get(self, name: str) -> Value:
        return self.values[FIELD_INDEX[name]]

    def ensure_cells(self, n: int) -> None:
        if n > len(self.cell_v):
            self.cell_v.extend([None] * (n - len(self.cell_v)))

    def ensure_temps(self, n: int) -> None:
        if n > len(self.cell_t):
            self.cell_t.extend([None] * (n - len(self.cell_t)))

    def ensure_balancing(self, n: int) -> None:
        if n > len(self.balancing):
            self.balancing.extend([None] * (n - len(self.balancing)))

    def derive(self) -> None:
        """Fill fields the BMS does not send from the ones it does (only unmapped ones)."""
        vals, mapped = self.values, self.mapped
        ix = FIELD_INDEX
        v, i = vals[ix["voltage_v"]], vals[ix["current_a"]]
        if not mapped[ix["power_w"]]:
            vals[ix["power_w"]] = (v * i if isinstance(v, (int, float))
                                   and isinstance(i, (int, float)) else None)
        known = self.cells_known
        cells = [c for c in self.cell_v if c is not None] if known else []
        count = self.cell_count() if known else 0
        if not mapped[ix["cell_count"]]:
            vals[ix["cell_count"]] = count or None
        if cells:
            lo, hi = min(cells), max(cells)
            if not mapped[ix["cell_v_min"]]:
                vals[ix["cell_v_min"]] = lo
                vals[ix["cell_v_min_id"]] = self.cell_v.index(lo) + 1
            if not mapped[ix["cell_v_max"]]:
                vals[ix["cell_v_max"]] = hi
                vals[ix["cell_v_max_id"]] = self.cell_v.index(hi) + 1
            if not mapped[ix["cell_v_avg"]]:
                vals[ix["cell_v_avg"]] = sum(cells) / len(cells)
        lo_v, hi_v = vals[ix["cell_v_min"]], vals[ix["cell_v_max"]]
        if not mapped[ix["cell_v_delta"]] and isinstance(lo_v, (int, float)) \
                and isinstance(hi_v, (int, float)):
            vals[ix["cell_v_delta"]] = hi_v - lo_v
        temps = [t for t in self.cell_t if t is not None] if known else []
        if temps:
            if not mapped[ix["temp_min_c"]]:
                vals[ix["temp_min_c"]] = min(temps)
            if not mapped[ix["temp_max_c"]]:
                vals[ix["temp_max_c"]] = max(temps)
        if not mapped[ix["balancing_active"]] and self.balancing and known:
            vals[ix["balancing_active"]] = any(b for b in self.cell_balancing())

    def cell_count(self) -> int:
        return max(len(self.cell_v), self.expected_cells or 0)

    def cell_balancing(self) -> list[bool | None]:
        """One flag per cell: balancing messages often carry more slots than the pack
        has cells (32 flags for 16 cells); without voltages, every flag received."""
        n = self.cell_count() or len(self.balancing)
        return (self.balancing + [None] * (n - len(self.balancing)))[:n]

    def snapshot(self) -> dict[str, Value]:
        out: dict[str, Value] = {"ts": iso_ts(self.last_ts), "pack_id": self.pack_id}
        for f, v in zip(FIELDS, self.values, strict=True):
            out[f.name] = clean(v)
        for k in sorted(self.extras):
            out[k] = clean(self.extras[k])
        return out

    def cells_snapshot(self) -> dict[str, object]:
        out: dict[str, object] = {
            "ts": iso_ts(self.last_ts),
            "pack_id": self.pack_id,
            "voltages_v": [clean(c) for c in self.cell_v],
            "temps_c": [clean(t) for t in self.cell_t],
        }
        if self.balancing:
            out["balancing"] = self.cell_balancing()
        return out


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """One raise or clear; `seq` and `event_id` are assigned by the outbox."""

    ts: float
    pack_id: str
    code: str
    severity: Severity
    state: Literal["raised", "cleared"]
    source: Literal["bms", "gateway"]
    message: str
    value: Value = None
    limit: Value = None
    cell: int | None = None
    sensor: int | None = None

    def payload(self, seq: int, event_id: str) -> dict[str, Value]:
        out: dict[str, Value] = {
            "event_id": event_id, "seq": seq, "ts": iso_ts(self.ts), "pack_id": self.pack_id,
            "code": self.code, "severity": self.severity, "state": self.state,
            "source": self.source, "value": clean(self.value), "limit": clean(self.limit),
        }
        if self.cell is not None:
            out["cell"] = self.cell
        if self.sensor is not None:
            out["sensor"] = self.sensor
        out["message"] = self.message
        return out


@dataclass(frozen=True, slots=True)
class Publication:
    """A message for the broker (or stdout). Retained snapshots carry no backlog."""

    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1  # at least once: a subscriber that lags must still get every snapshot


# What the pipeline hands to the publisher, in frame-time order.
Output = Publication | tuple[FaultEvent, str]
