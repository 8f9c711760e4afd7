"""`demo`: simulators and the gateway in one process over python-can `virtual` buses."""

from __future__ import annotations

import asyncio
import logging
import time
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
    """Simulators and the gateway in one process over python-can `virtual` buses."""
    from gateway.runtime.daemon import Daemon

    cfg = demo_config(cfg)
    packs = [find_pack(cfg, pack_id)] if pack_id is not None else list(cfg.packs)
    sims = [Simulator(p, scenario=scenario, seed=seed + i) for i, p in enumerate(packs)]
    d = Daemon(cfg, stdout=stdout)
    serve = asyncio.create_task(d.serve(), name="demo.gateway")
    buses: list[can.BusABC] = []
    sim_tasks: list[asyncio.Task[int]] = []
    try:
        # the gateway's sources must be listening before the first frame is sent
        deadline = time.monotonic() + 10
        while (len(d.rt.sources) < len(cfg.buses)
               or not all(s.opened.is_set() for s in d.rt.sources)):
            if serve.done() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        by_name = {b.name: b for b in cfg.buses}
        for i, (p, sim) in enumerate(zip(packs, sims, strict=True)):
            b = by_name[p.bus]
            bus = can.Bus(interface="virtual", channel=b.channel)
            buses.append(bus)
            sim_tasks.append(asyncio.create_task(sim.run_on_bus(bus, duration=duration),
                                                 name=f"demo.sim[{i}]"))
        waiting: set[asyncio.Task[Any]] = {serve, *sim_tasks}
        while True:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if serve in done or all(t.done() for t in sim_tasks):
                break
            waiting -= done
        if not serve.done():
            await asyncio.sleep(1.5)  # let the last frames reach a publication
            d.stop_event.set()
        return await serve
    finally:
        for t in sim_tasks:
            t.cancel()
        for t in sim_tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception) as e:
                if not isinstance(e, asyncio.CancelledError):
                    log.error("simulator failed: %s", e)
        if not serve.done():
            d.stop_event.set()
            await asyncio.wait({serve}, timeout=cfg.shutdown_timeout_s + 5)
        for bus in buses:
            bus.shutdown()
