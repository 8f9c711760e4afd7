"""`bms-gateway replay`: a recorded log is just another source feeding the runtime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TextIO

from gateway.config import GatewayConfig
from gateway.model import Publication
from gateway.runtime.pipeline import Pipeline
from gateway.runtime.runtime import Runtime
from gateway.source.logformats import LineFormat
from gateway.source.logs import Pacer, SourceStats, read_log

log = logging.getLogger("gateway.daemon")


async def replay(cfg: GatewayConfig, log_path: str | Path, *, speed: float | None,
                 stdout: TextIO | None = None, deliver_timeout: float = 30.0,
                 outbox_path: Path | str | None = None,
                 line_format: LineFormat | None = None, start: float | None = None) -> Runtime:
    """Feed a recorded log through the pipeline; return the runtime (for counters)."""
    pipeline = Pipeline(cfg)
    # its own outbox, never the live daemon's: a replay must not publish the daemon's
    # events, nor leave its own for the daemon to publish
    rt = Runtime(cfg, pipeline, stdout=stdout, outbox_path=outbox_path or ":memory:",
                 guest=True)
    stats = rt.log_stats = SourceStats()

    def final() -> list[Publication]:
        # a replay is a guest: it leaves its gateway offline (its last will says the same
        # if it dies), and its last status is taken after everything was delivered
        return [Publication(rt.t_avail, b"offline"), rt.status()]

    async with rt:  # the outbox first: a bad --outbox (exit 3) outranks the log's error
        # raises LogError before anything is published (the sink is not started yet)
        batches = read_log(log_path, stats, line_format=line_format, start=start)
        rt.start(rt.sink.name, rt.sink_until_it_dies())
        try:
            await rt.play(batches, Pacer(speed))
        finally:
            rt.publish(pipeline.offline())
        if not await rt.deliver(deliver_timeout, final):
            log.warning("not everything reached the broker within %.0f s; %d events not "
                        "delivered", deliver_timeout, rt.undelivered)
    return rt


__all__ = ["replay"]
