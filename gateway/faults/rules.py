"""The gateway's fault rules: their kinds, the model fields they judge, their defaults and
the cell voltage limits of each chemistry. gateway/config/rules.py parses a config's
`rules:` into `RuleSpec`s from these; the engine (engine.py) runs them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from gateway.model import Severity, clean

Kind = Literal["high", "low", "rate", "event"]


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One rule's effective settings (defaults merged with YAML overrides)."""

    name: str
    enabled: bool
    severity: Severity
    raise_at: float | None = None
    clear_at: float | None = None
    debounce_s: float = 0.0
    window_s: float | None = None


@dataclass(frozen=True, slots=True)
class RuleDef:
    """What a rule is: its kind, its defaults and the model field it judges."""

    kind: Kind
    severity: Severity
    label: str
    limits: tuple[float | None, float | None, float] = (None, None, 0.0)  # raise, clear, debounce
    window_s: float | None = None
    field: str | None = None  # model field read (the extreme, for per-cell/sensor rules)
    element: Literal["cell", "sensor"] | None = None
    gate: Literal["charge", "discharge"] | None = None
    bounds: tuple[float, float] = (-math.inf, math.inf)
    rel_gap: float = 0.0  # hysteresis when there is no default clear_at, relative to raise_at
    unit: str = ""
    limit_field: str | None = None  # BMS-reported limit used while raise_at is null
    negate: bool = False  # judge -value (discharge current as a magnitude)


def _d(kind: Kind, sev: Severity, label: str,
       limits: tuple[float | None, float | None, float] = (None, None, 0.0), **kw: Any) -> RuleDef:
    return RuleDef(kind, sev, label, limits, **kw)


_CELL_V = (0.0, 6.0)
_TEMP = (-60.0, 150.0)
_AMPS = (0.0, 1e5)

# Defaults: safe for LiFePO4, sensible for other chemistries; override per pack in YAML.
RULES: dict[str, RuleDef] = {
    "cell_over_voltage": _d("high", "alarm", "over voltage", (3.65, 3.55, 2.0),
                            field="cell_v_max", element="cell", bounds=_CELL_V, unit="V"),
    "cell_under_voltage": _d("low", "alarm", "under voltage", (2.8, 2.95, 2.0),
                             field="cell_v_min", element="cell", bounds=_CELL_V, unit="V"),
    "pack_over_voltage": _d("high", "alarm", "pack over voltage", (None, None, 2.0),
                            field="voltage_v", bounds=(0.0, 1500.0), rel_gap=0.02, unit="V"),
    "pack_under_voltage": _d("low", "alarm", "pack under voltage", (None, None, 2.0),
                             field="voltage_v", bounds=(0.0, 1500.0), rel_gap=0.02, unit="V"),
    "over_temp_charge": _d("high", "alarm", "over temperature while charging",
                           (45.0, 42.0, 2.0), field="temp_max_c", element="sensor", gate="charge",
                           bounds=_TEMP, unit="°C"),
    "over_temp_discharge": _d("high", "alarm", "over temperature", (60.0, 55.0, 2.0),
                              field="temp_max_c", element="sensor", gate="discharge",
                              bounds=_TEMP, unit="°C"),
    "under_temp_charge": _d("low", "alarm", "under temperature while charging",
                            (0.0, 3.0, 2.0), field="temp_min_c", element="sensor", gate="charge",
                            bounds=_TEMP, unit="°C"),
    "under_temp_discharge": _d("low", "alarm", "under temperature", (-20.0, -17.0, 2.0),
                               field="temp_min_c", element="sensor", gate="discharge",
                               bounds=_TEMP, unit="°C"),
    "over_current_charge": _d("high", "alarm", "charge over current", (None, None, 2.0),
                              field="current_a", limit_field="charge_current_limit_a",
                              bounds=_AMPS, rel_gap=0.1, unit="A"),
    "over_current_discharge": _d("high", "alarm", "discharge over current", (None, None, 2.0),
                                 field="current_a", limit_field="discharge_current_limit_a",
                                 negate=True, bounds=_AMPS, rel_gap=0.1, unit="A"),
    "cell_imbalance": _d("high", "warning", "cell imbalance", (0.1, 0.05, 10.0),
                         field="cell_v_delta", bounds=_CELL_V, unit="V"),
    "low_soc": _d("low", "warning", "low state of charge", (10.0, 15.0, 2.0),
                  field="soc_pct", bounds=(0.0, 100.0), unit="%"),
    "decode_error_rate": _d("rate", "warning", "decode errors", (5.0, 1.0, 0.0),
                            window_s=10.0, bounds=(0.0, 100.0), unit="%"),
    "implausible_values": _d("rate", "warning", "implausible values dropped", (0.0, 0.0, 0.0),
                             window_s=10.0, bounds=(0.0, 1e9)),
    "comm_lost": _d("event", "critical", "BMS silent"),
    "can_bus_lost": _d("event", "critical", "CAN bus lost"),
    "can_bus_off": _d("event", "critical", "CAN controller bus-off"),
    "can_error_passive": _d("event", "warning", "CAN error passive"),
    "can_error_frames": _d("event", "warning", "CAN error frames"),
}
# Cell voltage limits by chemistry (raise, clear); the pack's or profile's `chemistry`
# picks them, YAML rule overrides still win.
CHEMISTRY: dict[str, dict[str, tuple[float, float]]] = {
    "lfp": {"cell_over_voltage": (3.65, 3.55), "cell_under_voltage": (2.8, 2.95)},
    "nmc": {"cell_over_voltage": (4.25, 4.15), "cell_under_voltage": (3.0, 3.15)},
    "nca": {"cell_over_voltage": (4.25, 4.15), "cell_under_voltage": (2.9, 3.05)},
    "lmo": {"cell_over_voltage": (4.25, 4.15), "cell_under_voltage": (3.0, 3.15)},
    "lto": {"cell_over_voltage": (2.8, 2.7), "cell_under_voltage": (1.7, 1.85)},
    "sodium": {"cell_over_voltage": (4.0, 3.9), "cell_under_voltage": (1.5, 1.7)},
}


def default_rules(chemistry: str = "lfp") -> dict[str, RuleSpec]:
    out = {n: RuleSpec(n, True, d.severity, *d.limits, d.window_s) for n, d in RULES.items()}
    for name, (ra, ca) in CHEMISTRY.get(chemistry, {}).items():
        out[name] = dataclasses.replace(out[name], raise_at=ra, clear_at=ca)
    return out


# the settings each kind of rule takes in YAML
RULE_KEYS: dict[Kind, frozenset[str]] = {
    "event": frozenset({"enabled", "severity"}),
    "high": frozenset({"enabled", "severity", "raise_at", "clear_at", "debounce_s"}),
    "low": frozenset({"enabled", "severity", "raise_at", "clear_at", "debounce_s"}),
    "rate": frozenset({"enabled", "severity", "raise_at", "clear_at", "debounce_s",
                       "window_s"}),
}


def fmt_num(v: float) -> str:
    """A limit or setting as people write it: 3.65, not 3.6500000000000004."""
    return str(clean(round(v, 4)))
