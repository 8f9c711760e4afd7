"""`bms-gateway replay`: a recorded log is just another source feeding the runtime.

SIGINT, SIGTERM and SIGHUP stop a replay cleanly, as SIGTERM stops `run`: the first
stops the playing (what was fed is flushed, the packs go offline, and that is delivered
within `shutdown_timeout_s`); another one, or one that comes while delivering, stops
the delivering. The outbox and the sink are closed either way, and the CLI says how
far the replay got and exits with 128 + the signal's number (130 for Ctrl-C).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TextIO, TypeVar

from gateway import entry
from gateway.config import GatewayConfig
from gateway.model import Publication, iso_ts
from gateway.runtime.pipeline import Pipeline
from gateway.runtime.runtime import Runtime
from gateway.source.logformats import LineFormat
from gateway.source.logs import Pacer, SourceStats, read_log

log = logging.getLogger("gateway.daemon")

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop:
    """The stop signals, each cancelling the stage that runs (playing, delivering)."""

    def __init__(self) -> None:
        self.signum = 0  # the first stop signal
        self._stage: asyncio.Task[Any] | None = None
        self._cancelled = False

    def on_signal(self, signum: int) -> None:
        self.signum = self.signum or signum
        if self._stage is not None and not self._stage.done():
            self._cancelled = True
            self._stage.cancel()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T | None:
        """Await `coro` as the current stage; None when a stop signal cancelled it."""
        stage: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._stage = stage
        try:
            return await stage
        except asyncio.CancelledError:
            me = asyncio.current_task()
            # the signal's cancellation, not one of the caller's (it goes on)
            if self._cancelled and stage.cancelled() and me is not None \
                    and not me.cancelling():
                return None
            raise
        finally:
            self._stage = None
            self._cancelled = False


def _install(stop: _Stop) -> list[int]:
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, stop.on_signal, sig)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
            continue
        installed.append(sig)
    return installed


async def replay(cfg: GatewayConfig, log_path: str | Path, *, speed: float | None,
                 stdout: TextIO | None = None, deliver_timeout: float = 30.0,
                 outbox_path: Path | str | None = None,
                 line_format: LineFormat | None = None, start: float | None = None) -> Runtime:
    """Feed a recorded log through the pipeline; return the runtime (for counters, and
    `interrupted`/`interruption` when a stop signal ended it)."""
    pipeline = Pipeline(cfg)
    # its own outbox, never the live daemon's: a replay must not publish the daemon's
    # events, nor leave its own for the daemon to publish
    rt = Runtime(cfg, pipeline, stdout=stdout, outbox_path=outbox_path or ":memory:",
                 guest=True)
    stats = rt.log_stats = SourceStats()
    stop = _Stop()

    def final() -> list[Publication]:
        # a replay is a guest: it leaves its gateway offline (its last will says the same
        # if it dies), and its last status is taken after everything was delivered
        return [Publication(rt.t_avail, b"offline"), rt.status()]

    installed = _install(stop)
    try:
        async with rt:  # the outbox first: a bad --outbox (exit 3) outranks the log's error
            # raises LogError before anything is published (the sink is not started yet)
            batches = read_log(log_path, stats, line_format=line_format, start=start)
            early = entry.received()  # came while the CLI was importing and loading
            if early is not None:
                stop.on_signal(early)
                _interrupted(rt, early, "starting")
                return rt
            rt.start(rt.sink.name, rt.sink_until_it_dies())
            try:
                if not stop.signum:
                    await stop.run(rt.play(batches, Pacer(speed)))
            finally:
                rt.publish(pipeline.offline())
            timeout = deliver_timeout
            if stop.signum:
                # what was fed is delivered as `run` does on SIGTERM; a second signal
                # stops that too
                timeout = min(deliver_timeout, cfg.shutdown_timeout_s)
                _interrupted(rt, stop.signum, "playing")
            delivered = await stop.run(rt.deliver(timeout, final))
            if delivered is None:
                rt.undelivered = rt.outbox.depth()
                if not rt.interrupted:
                    _interrupted(rt, stop.signum, "delivering")
            elif not delivered and not rt.interrupted:  # else the CLI says it
                log.warning("not everything reached the broker within %.0f s; %d events "
                            "not delivered", timeout, rt.undelivered)
    finally:
        loop = asyncio.get_running_loop()
        for sig in installed:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return rt


def _interrupted(rt: Runtime, signum: int, stage: str) -> None:
    """Record on the runtime that `signum` stopped the replay in `stage`, with the line
    the CLI prints: which signal, in which stage, and how far it got."""
    rt.interrupted, rt.interruption = signum, _said(rt, signum, stage)


def _said(rt: Runtime, signum: int, stage: str) -> str:
    p = rt.pipeline
    name = signal.Signals(signum).name
    frames = sum(c.received for c in p.counters)
    if stage == "starting" or not frames:
        return f"replay interrupted by {name} before the first frame"
    reached = ""
    if math.isfinite(p.clock) and p.first_ts is not None:
        reached = (f", up to log time {iso_ts(p.clock)} ({p.clock - p.first_ts:.1f} s into "
                   "the log)")
    if stage == "playing":
        return f"replay interrupted by {name} after {frames} frames{reached}"
    return (f"replay interrupted by {name} while delivering to the broker: all {frames} "
            f"frames replayed{reached}")


__all__ = ["STOP_SIGNALS", "replay"]
