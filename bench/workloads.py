"""Workloads the benchmark generates for itself: candump logs from the simulated pack.

The simulator (gateway.commands.simulate) encodes one stretch of a pack's traffic with cantools;
longer logs repeat that stretch with the timestamps shifted, so a million frames take
seconds to write instead of minutes to simulate. The frame mix is the pack's own:
for the example BMS, multiplexed cell voltage, temperature and balancing frames are
about 57 % of the frames (PackStatus and AlarmFlags at 10 Hz make most of the rest).
"""

from __future__ import annotations

import heapq
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.commands.simulate import FIXED_START, Simulator
from gateway.config import GatewayConfig, load_config

BASE_S = 300.0  # simulated seconds encoded once, then repeated


@dataclass(frozen=True)
class PackSpec:
    id: str
    cells: int
    id_offset: int = 0


@dataclass(frozen=True)
class Workload:
    name: str
    log: Path
    config: Path
    frames: int
    packs: tuple[PackSpec, ...]
    note: str = ""


def write_config(path: Path, packs: tuple[PackSpec, ...], *, url: str | None = None,
                 channel: str = "bench", state_min_s: float | None = None) -> Path:
    mqtt = f"mqtt: {{url: '{url}', topic_prefix: bms}}" if url else "mqtt: {topic_prefix: bms}"
    pack_lines = "\n".join(
        f"  - {{id: {p.id}, profile: example-bms, cell_count: {p.cells}, "
        f"id_offset: {p.id_offset}, stale_after_s: 5}}" for p in packs)
    publish = ""
    if state_min_s is not None:
        publish = f"publish:\n  state: {{min_interval_s: {state_min_s}, max_interval_s: 60}}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(f"""\
        gateway_id: bench
        state_dir: {path.parent / 'state'}
        can: {{interface: virtual, channel: {channel}}}
        homeassistant: {{discovery: false}}
        {mqtt}
        packs:
        """) + pack_lines + "\n" + publish)
    return path


def config(path: Path, packs: tuple[PackSpec, ...], **kw: object) -> GatewayConfig:
    return load_config(write_config(path, packs, **kw))  # type: ignore[arg-type]


def base_frames(cfg: GatewayConfig, seed: int = 1, base_s: float = BASE_S,
                ) -> list[tuple[float, int, bytes, bool]]:
    """`base_s` seconds of every pack in `cfg`, merged in time order."""
    streams = [list(Simulator(p, seed=seed + i).frames(FIXED_START, base_s))
               for i, p in enumerate(cfg.packs)]
    return list(heapq.merge(*streams, key=lambda f: f[0]))


SATURATED = 8500.0  # frames/s on a saturated 1 Mbit/s bus (FIELD-NOTES: 7,400 to 9,000)


def tiled(base: list[tuple[float, int, bytes, bool]], count: int, rate: float | None = None,
          ) -> Iterator[tuple[float, int, bytes, bool]]:
    """`count` frames: `base` repeated, each repeat one base span later. With `rate`, the same frames
    in the same order are re-timed evenly at `rate` frames/s (a saturated bus) instead."""
    n = 0
    rep = 0
    t0 = base[0][0] if base else 0.0
    span = (base[-1][0] - t0 + 0.1) if base else 0.0
    while n < count:
        shift = rep * span
        for ts, aid, data, ext in base:
            if n >= count:
                return
            yield (t0 + n / rate if rate else ts + shift), aid, data, ext
            n += 1
        rep += 1


def write_candump(frames: Iterator[tuple[float, int, bytes, bool]], path: Path,
                  channel: str = "can0") -> int:
    n = 0
    with path.open("w", encoding="ascii") as f:
        w = f.write
        for ts, aid, data, ext in frames:
            ident = f"{aid:08X}" if ext else f"{aid:03X}"
            w(f"({ts:.6f}) {channel} {ident}#{data.hex().upper()}\n")
            n += 1
    return n


def make(tmp: Path, name: str, packs: tuple[PackSpec, ...], count: int,
         rate: float | None = SATURATED, base_s: float = BASE_S) -> Workload:
    d = tmp / name
    cfg_path = write_config(d / "gateway.yaml", packs)
    base = base_frames(load_config(cfg_path), base_s=base_s)
    log = d / f"{name}.log"
    n = write_candump(tiled(base, count, rate), log)
    timing = f"re-timed to {rate:,.0f} frames/s" if rate else "the pack's own timing"
    return Workload(name, log, cfg_path, n, packs, note=timing)


def generate(tmp: Path, count: int, *, short: bool = False) -> list[Workload]:
    """The saturated-bus workloads of issue 6, plus one pack at its own (sparse) timing:
    at 54 frames/s of frame time the 10 Hz tick (rules, policy) costs 150x more per frame.
    The first is the reference workload; `short` keeps the first and the two-pack one."""
    b = 60.0 if short else BASE_S
    out = [make(tmp, "pack96", (PackSpec("p96", 96),), count, base_s=b)]
    if not short:
        out.append(make(tmp, "pack192", (PackSpec("p192", 192),), count, base_s=b))
    out.append(make(tmp, "two192", (PackSpec("a", 192), PackSpec("b", 192, 0x100)), count,
                    base_s=b))
    if not short:
        out.append(make(tmp, "pack96-own-timing", (PackSpec("p96", 96),), count, rate=None))
    return out


def orion(tmp: Path, shared: Path) -> Workload | None:
    """The shared Orion bus log (a real EV bus, most ids not the BMS's), if present."""
    d = shared / "orion-we-ev"
    log = d / "candump-2025-11-22_161709.log"
    dbc = d / "Orion_CANBUS.dbc"
    if not (log.exists() and dbc.exists()):
        return None
    w = tmp / "orion"
    w.mkdir(parents=True, exist_ok=True)
    cfg = w / "gateway.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        gateway_id: bench
        state_dir: {w / 'state'}
        can: {{interface: virtual, channel: bench}}
        homeassistant: {{discovery: false}}
        mqtt: {{topic_prefix: bms}}
        packs:
          - {{id: ev, profile: orion-inverter, dbc: {dbc}, chemistry: nmc, stale_after_s: 5}}
        """))
    with log.open() as f:
        n = sum(1 for _ in f)
    return Workload("orion", log, cfg, n, (), note=str(log))

