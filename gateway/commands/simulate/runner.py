"""The `Simulator`: a pure function from config, scenario, seed and start time to frames,
paced to the wall clock by `run_on_bus`; and the `simulate` command's outputs."""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path

import can
from cantools.database import Database

from gateway.commands.simulate.physics import (
    BALANCE_V,
    CHARGE_V,
    CHARGING_A,
    DEFAULT_CYCLE,
    DISCHARGE_V,
    PackModel,
    Snapshot,
)
from gateway.commands.simulate.planning import PlanBuilder, Variant
from gateway.config import ConfigError, GatewayConfig, PackConfig, Problem, nearest
from gateway.config.scenario import CHEM_ALIAS, Chemistry, Scenario
from gateway.decode.dbc import load_dbc
from gateway.model import Value

log = logging.getLogger("gateway.simulate")

SimFrame = tuple[float, int, bytes, bool]  # (ts, arbitration id, data, extended)

DEFAULT_CELLS = 16
SWEEP_S = 1.0  # a multiplexed / per-cell message sends all its frames once per sweep
PACK_PERIOD_S = 0.1  # messages without a DBC cycle time
# Start of `--out` logs when no --start is given: the same command gives the same bytes.
FIXED_START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class Simulator:
    """One simulated pack speaking `pack`'s profile."""

    def __init__(self, pack: PackConfig, *, scenario: Scenario | None = None, seed: int = 0,
                 dbs: list[Database] | None = None) -> None:
        self.pack = pack
        self.scenario = scenario or Scenario()
        self.seed = seed
        sc = self.scenario
        prof = pack.profile
        self.cells = sc.cells or pack.cell_count or prof.cell_count or DEFAULT_CELLS
        self.chemistry: Chemistry = sc.chemistry or CHEM_ALIAS.get(pack.chemistry, "lfp")
        self.capacity_ah = sc.capacity_ah or 100.0
        problems: list[Problem] = []
        if dbs is None:
            dbs = [load_dbc(d) for d in prof.dbc]
        self.sensors = sc.sensors or self._sensor_count(dbs)
        codes = {f.code for f in prof.faults}
        for i, ev in enumerate(sc.events):
            where = sc.path or "scenario"
            if ev.kind == "bms_fault" and ev.code not in codes:
                problems.append(Problem(where, f"events[{i}].bms_fault.code",
                                        f"profile {prof.name!r} has no BMS fault {ev.code!r}",
                                        nearest(ev.code, codes)
                                        or f"its codes: {', '.join(sorted(codes)) or 'none'}"))
            if ev.kind == "cell_drift" and ev.index > self.cells:
                problems.append(Problem(where, f"events[{i}].cell_drift.cell",
                                        f"the pack has {self.cells} cells"))
            if ev.kind == "sensor_open" and ev.index > self.sensors:
                problems.append(Problem(where, f"events[{i}].sensor_open.sensor",
                                        f"the pack has {self.sensors} temperature sensors"))
        b = PlanBuilder(pack, dbs, self.cells, self.sensors, problems)
        for name, spec in prof.fields.items():
            b.field(name, spec)
        for kind, srcs in prof.cells.items():
            for src in srcs:
                b.cell_source(kind, src)
        b.faults(prof.faults)
        if problems:
            raise ConfigError(problems)
        self.plans = sorted(b.plans.values(), key=lambda p: p.arbitration_id)
        self.snapshot: Snapshot | None = None  # the state the latest frames were built from

    def _sensor_count(self, dbs: list[Database]) -> int:
        want = max(4, self.cells // 4)
        for src in self.pack.profile.cells.get("temps", ()):
            for db in dbs:
                try:
                    msg = db.get_message_by_name(src.message)
                except KeyError:
                    continue
                sigs = [s for s in msg.signals if not s.is_multiplexer and (
                    fnmatch.fnmatchcase(s.name, src.signals) if isinstance(src.signals, str)
                    else s.name in src.signals)]
                if not sigs:
                    break
                if src.mux:
                    per = max(1, len([s for s in sigs if s.multiplexer_ids
                                      and s.multiplexer_ids[0] == sigs[0].multiplexer_ids[0]])
                              if sigs[0].multiplexer_ids else len(sigs))
                    return -(-want // per) * per
                if src.index_signal is not None:
                    return -(-want // len(sigs)) * len(sigs)
                return len(sigs)
        return want

    def _model(self) -> PackModel:
        sc = self.scenario
        return PackModel(self.cells, self.sensors, self.capacity_ah, self.chemistry,
                         sc.soc if sc.soc is not None else 60.0,
                         sc.ambient_c if sc.ambient_c is not None else 25.0,
                         sc.cycle or DEFAULT_CYCLE, random.Random(self.seed))

    def _snapshot(self, m: PackModel, t: float, open_sensors: frozenset[int],
                  faults: frozenset[str]) -> Snapshot:
        cv = m.cell_voltages()
        temps = list(m.temps)
        good_t = [x for i, x in enumerate(temps) if i not in open_sensors] or temps
        mean = sum(cv) / len(cv)
        cur = m.current
        charging = cur > CHARGING_A
        bal = [charging and v > mean + BALANCE_V for v in cv]
        lo, hi = min(cv), max(cv)
        n = self.cells
        state = ("error" if faults else "charging" if charging
                 else "discharging" if cur < -CHARGING_A else "standby")
        volts = sum(cv)
        fields: dict[str, Value] = {
            "voltage_v": volts, "current_a": cur, "power_w": volts * cur, "soc_pct": m.soc,
            "soh_pct": 98.0, "temp_min_c": min(good_t), "temp_max_c": max(good_t),
            "cell_count": n, "cell_v_min": lo, "cell_v_max": hi, "cell_v_avg": mean,
            "cell_v_delta": hi - lo, "cell_v_min_id": cv.index(lo) + 1,
            "cell_v_max_id": cv.index(hi) + 1,
            "charge_current_limit_a": 0.5 * m.capacity_ah,
            "discharge_current_limit_a": 1.0 * m.capacity_ah,
            "charge_voltage_limit_v": n * CHARGE_V[m.chemistry],
            "discharge_voltage_limit_v": n * DISCHARGE_V[m.chemistry],
            "capacity_ah": m.capacity_ah, "remaining_ah": m.capacity_ah * m.soc / 100.0,
            "cycles": 42, "charge_enabled": True, "discharge_enabled": True,
            "contactor_closed": True, "balancing_active": any(bal), "bms_state": state,
        }
        return Snapshot(t, fields, cv, temps, open_sensors, bal, faults)

    def frames(self, t0: float, duration: float | None,
               period: float = PACK_PERIOD_S) -> Iterator[SimFrame]:
        """Every frame the pack sends from `t0` for `duration` s (None: forever), built on a
        `period` grid. Deterministic: the same arguments give the same frames."""
        if period <= 0:
            msg = "period must be positive"
            raise ValueError(msg)
        m = self._model()
        events = self.scenario.events
        applied = [False] * len(events)
        for p in self.plans:
            cyc = p.msg.cycle_time
            n_var = max(1, len(p.variants))
            per = (cyc / 1000.0 if cyc else PACK_PERIOD_S) if n_var == 1 else \
                max(SWEEP_S, (cyc or 0) / 1000.0)
            p.every = max(1, round(per / period))
            p.offsets = [(j * p.every) // n_var for j in range(n_var)]
        if not self.plans:
            return
        steps: Iterator[int] = (itertools.count() if duration is None
                                else iter(range(max(0, round(duration / period)))))
        for k in steps:
            t = k * period
            if k:
                m.step(t, period)
            for i, ev in enumerate(events):
                if ev.at > t + 1e-9:
                    break
                if ev.kind == "cell_drift" and ev.active(t) and ev.index <= len(m.offsets):
                    if not applied[i]:
                        m.offsets[ev.index - 1] += ev.volts
                    elif k:
                        m.offsets[ev.index - 1] += ev.volts_per_s * period
                if applied[i]:
                    continue
                applied[i] = True
                if ev.kind == "current":
                    m.hold = ev.amps
                    m.current = m._target(t)
                elif ev.kind == "soc":
                    m.soc = ev.value
            active = [ev for ev in events if ev.active(t)]
            if any(ev.kind == "silent" for ev in active):
                continue
            snap = self._snapshot(
                m, t, frozenset(ev.index - 1 for ev in active if ev.kind == "sensor_open"),
                frozenset(ev.code for ev in active if ev.kind == "bms_fault"))
            self.snapshot = snap
            out: list[tuple[int, bytes, bool]] = []
            for p in self.plans:
                phase = k % p.every
                vars_ = list(p.variants.values()) or [Variant({})]
                for j, var in enumerate(vars_):
                    if p.offsets[j] == phase:
                        out.append((p.arbitration_id, p.encode(snap, var),
                                    bool(p.msg.is_extended_frame)))
            if not out:
                continue
            gap = min(0.0005, period / 2 / len(out))
            base = t0 + t
            for i, (aid, data, ext) in enumerate(out):
                yield round(base + i * gap, 6), aid, data, ext

    async def run_on_bus(self, bus: can.BusABC, speed: float = 1.0,
                         duration: float | None = None, *, period: float = PACK_PERIOD_S,
                         t0: float | None = None) -> int:
        """Send the frames in real time (times `speed`); return how many were sent."""
        if speed <= 0:
            msg = "speed must be positive"
            raise ValueError(msg)
        start = time.time() if t0 is None else t0
        w0 = time.monotonic()
        sent = errors = 0
        for ts, aid, data, ext in self.frames(start, duration, period):
            delay = (ts - start) / speed - (time.monotonic() - w0)
            if delay > 0.001:
                await asyncio.sleep(delay)
            elif sent % 64 == 0:
                await asyncio.sleep(0)  # let the rest of the loop run when behind
            try:
                bus.send(can.Message(timestamp=ts, arbitration_id=aid, data=data,
                                     is_extended_id=ext))
                sent += 1
            except can.CanError as e:
                errors += 1
                if errors in (1, 10, 100) or errors % 10_000 == 0:
                    log.warning("simulator: send failed (%d so far): %s", errors, e)
        if duration is not None:  # a scenario may end silent: still take the full time
            rest = duration / speed - (time.monotonic() - w0)
            if rest > 0:
                await asyncio.sleep(rest)
        return sent


def find_pack(cfg: GatewayConfig, pack_id: str | None) -> PackConfig:
    if pack_id is None:
        return cfg.packs[0]
    for p in cfg.packs:
        if p.id == pack_id:
            return p
    ids = [p.id for p in cfg.packs]
    raise ConfigError([Problem(str(cfg.path), "--pack", f"no pack {pack_id!r}",
                               nearest(pack_id, ids) or f"packs: {', '.join(ids)}")])


def write_candump(frames: Iterator[SimFrame], path: Path, channel: str = "can0") -> int:
    """Write frames as a candump `-l` log; return the number of frames."""
    n = 0
    with path.open("w", encoding="ascii") as f:
        for ts, aid, data, ext in frames:
            ident = f"{aid:08X}" if ext else f"{aid:03X}"
            f.write(f"({ts:.6f}) {channel} {ident}#{data.hex().upper()}\n")
            n += 1
    return n


def log_channel(cfg: GatewayConfig, pack: PackConfig) -> str:
    """candump channel for a pack's frames: `can0` on a one-bus config, else the bus name
    (replay routes frames by it)."""
    return "can0" if len(cfg.buses) <= 1 else pack.bus

