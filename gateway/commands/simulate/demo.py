"""`demo`: simulators and the gateway in one process over python-can `virtual` buses."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import can

from gateway.commands.simulate.runner import Simulator, find_pack
from gateway.config import GatewayConfig
from gateway.config.scenario import Scenario

log = logging.getLogger("gateway.simulate")


def demo_config(cfg: GatewayConfig, channel_prefix: str = "bms-gateway-demo") -> GatewayConfig:
    """The config with every bus replaced by an in-process `virtual` bus."""
    buses = tuple(replace(b, interface="virtual", channel=f"{channel_prefix}-{b.name}",
                          bitrate=None, fd=False, data_bitrate=None, options={})
                  for b in cfg.buses)
    return replace(cfg, buses=buses)


async def run_demo(cfg: GatewayConfig, *, scenario: Scenario | None = None,
                   duration: float | None = None, seed: int = 0,
                   pack_id: str | None = None, stdout: Any = None) -> int:
    """Simulators and the gateway in one process over python-can `virtual` buses: the
    daemon, with the simulators as tasks of its runtime once its buses are open."""
    from gateway.runtime.daemon import Daemon

    cfg = demo_config(cfg)
    packs = [find_pack(cfg, pack_id)] if pack_id is not None else list(cfg.packs)
    sims = [Simulator(p, scenario=scenario, seed=seed + i) for i, p in enumerate(packs)]
    d = Daemon(cfg, stdout=stdout)

    async def simulate(sim: Simulator, bus: can.BusABC) -> None:
        try:
            await sim.run_on_bus(bus, duration=duration)
        except Exception as e:
            log.error("simulator failed: %s", e)

    async def simulators() -> None:
        by_name = {b.name: b for b in cfg.buses}
        buses: list[can.BusABC] = []
        try:
            tasks = []
            for i, (p, sim) in enumerate(zip(packs, sims, strict=True)):
                bus = can.Bus(interface="virtual", channel=by_name[p.bus].channel)
                buses.append(bus)
                tasks.append(d.runtime.start(f"demo.sim[{i}]", simulate(sim, bus)))
            await asyncio.wait(tasks)
            await asyncio.sleep(1.5)  # let the last frames reach a publication
            d.stop()
        finally:
            for bus in buses:
                bus.shutdown()

    return await d.serve(beside=simulators)
