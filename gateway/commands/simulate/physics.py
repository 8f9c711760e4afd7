"""The simulated pack: N cells with an OCV curve, IR drop and drifting offsets, SoC
integrating the current, temperatures following |current| with a lag."""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field

from gateway.config.scenario import Chemistry
from gateway.model import Value

BALANCE_V = 0.010  # a cell this far over the mean balances while charging
CHARGING_A = 0.5

_OCV: dict[Chemistry, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "lfp": ((0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100),
            (2.80, 3.05, 3.18, 3.24, 3.27, 3.29, 3.30, 3.31, 3.32, 3.33, 3.34, 3.37, 3.45)),
    "nmc": ((0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100),
            (3.30, 3.45, 3.55, 3.62, 3.67, 3.72, 3.77, 3.83, 3.90, 3.97, 4.06, 4.12, 4.18)),
    "lto": ((0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100),
            (1.80, 2.05, 2.15, 2.22, 2.26, 2.29, 2.32, 2.35, 2.38, 2.42, 2.50, 2.58, 2.68)),
    "sodium": ((0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100),
               (1.80, 2.40, 2.60, 2.80, 2.95, 3.05, 3.15, 3.25, 3.35, 3.50, 3.65, 3.75, 3.85)),
}
CHARGE_V = {"lfp": 3.55, "nmc": 4.15, "lto": 2.70, "sodium": 3.85}
DISCHARGE_V = {"lfp": 2.90, "nmc": 3.20, "lto": 1.90, "sodium": 1.80}
# Default current cycle: (amps, seconds), + = charging.
DEFAULT_CYCLE: tuple[tuple[float, float], ...] = ((40.0, 60.0), (0.0, 15.0), (-60.0, 60.0),
                                                  (0.0, 15.0))
# Normalized state -> states to try in the profile's map, in order.


def ocv(chem: Chemistry, soc: float) -> float:
    xs, ys = _OCV[chem]
    s = min(100.0, max(0.0, soc))
    i = min(len(xs) - 1, max(1, bisect.bisect_left(xs, s)))
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (s - x0) / (x1 - x0)



@dataclass(slots=True)
class Snapshot:
    """The simulated pack at one instant, in model units (what the gateway should see)."""

    t: float
    fields: dict[str, Value]
    cell_v: list[float]
    cell_t: list[float]
    open_sensors: frozenset[int]  # 0-based
    balancing: list[bool]
    faults: frozenset[str]  # active BMS fault codes


@dataclass(slots=True)
class PackModel:
    cells: int
    sensors: int
    capacity_ah: float
    chemistry: Chemistry
    soc: float
    ambient_c: float
    cycle: tuple[tuple[float, float], ...]
    rng: random.Random
    offsets: list[float] = field(default_factory=list)
    temps: list[float] = field(default_factory=list)
    sensor_offsets: list[float] = field(default_factory=list)
    current: float = 0.0
    hold: float | None = None  # scenario-set current

    def __post_init__(self) -> None:
        self.offsets = [self.rng.uniform(-0.004, 0.004) for _ in range(self.cells)]
        self.sensor_offsets = [self.rng.uniform(-0.8, 0.8) for _ in range(self.sensors)]
        self.temps = [self.ambient_c + o for o in self.sensor_offsets]
        self.current = self._target(0.0)

    @property
    def r_cell(self) -> float:
        return 0.05 / self.capacity_ah  # 0.5 mOhm for a 100 Ah cell

    def _target(self, t: float) -> float:
        if self.hold is not None:
            return self.hold
        total = sum(d for _, d in self.cycle)
        x = t % total if total > 0 else 0.0
        for amps, d in self.cycle:
            if x < d:
                return amps
            x -= d
        return self.cycle[-1][0] if self.cycle else 0.0

    def step(self, t: float, dt: float) -> None:
        target = self._target(t)
        cur = target + (self.rng.gauss(0.0, 0.3) if target else 0.0)
        if (self.soc >= 100.0 and cur > 0) or (self.soc <= 0.0 and cur < 0):
            cur = 0.0
        self.current = cur
        self.soc = min(100.0, max(0.0, self.soc + cur * dt / 3600.0 / self.capacity_ah * 100))
        walk = 0.00002 * math.sqrt(dt)
        self.offsets = [o + self.rng.gauss(0.0, walk) for o in self.offsets]
        k = min(1.0, dt / 60.0)  # thermal time constant 60 s
        for i, temp in enumerate(self.temps):
            goal = self.ambient_c + self.sensor_offsets[i] + 0.08 * abs(cur)
            self.temps[i] = temp + (goal - temp) * k

    def cell_voltages(self) -> list[float]:
        base = ocv(self.chemistry, self.soc) + self.current * self.r_cell
        return [base + o for o in self.offsets]
