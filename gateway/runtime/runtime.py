"""The runtime: one pipeline, its outbox and one sink, and the TaskGroup that owns every
loop (sources, the sink, the daemon's ticker...), each task named.

Every command composes it: `replay` plays a log into it, the daemon opens the buses and
adds signals, reload, watchdog and status, `demo` runs simulators beside the daemon, and
`watch` gives it the dashboard as its sink.

A frame's path: a source hands a batch to `on_batch` -> `Pipeline.feed` (stages 2 to 4,
synchronous, returns) -> `ship()`: fault events into the outbox, then everything, in
order, to the sink.

    async with Runtime(cfg, Pipeline(cfg), outbox_path=":memory:") as rt:
        rt.start(rt.sink.name, rt.sink.run())
        await rt.play(batches, Pacer(None))
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TextIO, TypeVar

from gateway import __version__
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, require_extra
from gateway.model import Publication
from gateway.publish.homeassistant import Discovery
from gateway.publish.mqtt import MqttSink
from gateway.publish.outbox import Outbox
from gateway.publish.publisher import dumps
from gateway.publish.sink import Sink, StdoutSink
from gateway.runtime.pipeline import Pipeline
from gateway.source.logs import Frame, LiveSource, Pacer, SourceStats
from gateway.source.socketcan import make_source

log = logging.getLogger("gateway.daemon")

T = TypeVar("T")
PACE_MIN_S = 0.002  # a log's pause shorter than this is not worth a sleep


def run_loop(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """asyncio.run on uvloop when it is installed (`pip install bms-gateway[fast]`):
    measured at 8.5k frames/s on the virtual bus, gateway CPU 14.7 -> 11.3 % and p99
    latency 5.2 -> 4.5 ms, the event loop's own overhead being most of the rest.
    `loop`: auto (uvloop if importable), uvloop, asyncio."""
    if loop == "uvloop":
        try:
            required = require_extra("uvloop", "--loop uvloop", "fast", "uvloop>=0.19")
        except GatewayError:
            main.close()  # never started: no "was never awaited" warning
            raise
        return required.run(main)  # type: ignore[no-any-return]
    if loop == "auto":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


class Runtime:
    """Pipeline output -> sink. Events pass through the outbox first, always.

    `sink`: given (the watch dashboard), else built from the config: stdout without
    `mqtt.url`, else MQTT (with Home Assistant discovery when enabled). `guest`: a
    replay, which keeps every snapshot in order and never takes over the daemon's MQTT
    session.
    """

    def __init__(self, cfg: GatewayConfig, pipeline: Pipeline, *, sink: Sink | None = None,
                 stdout: TextIO | None = None, outbox_path: Path | str | None = None,
                 guest: bool = False) -> None:
        # Building acquires nothing: the outbox is opened and the sink built by
        # `async with`, so a caller that fails before it has nothing to close.
        self.cfg = cfg
        self.pipeline = pipeline
        self.started = time.monotonic()
        self._given_sink = sink
        self._stdout = stdout
        self._outbox_path = outbox_path
        self._guest = guest
        self._outbox: Outbox | None = None
        self._closed = False
        self._sink: Sink | None = None
        self.t_status = pipeline.topics.gateway("status")
        self.t_avail = pipeline.topics.gateway("availability")
        self.sources: list[LiveSource] = []
        self.log_stats: SourceStats | None = None
        self.undelivered = 0  # events still in the outbox when a replay gave up
        self.sink_error = ""  # why a replay's sink died, if it did
        self.interrupted = 0  # the signal that stopped a replay, and how far it had got
        self.interruption = ""
        self.last_error = ""
        self.task_deaths = 0
        self.last_progress = time.monotonic()  # the pipeline last ran (the watchdog's test)
        self._rate_t = time.monotonic()
        self._rate_n = 0
        self.frames_per_s = 0.0
        self._tg: asyncio.TaskGroup | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        # Home Assistant discovery and its inbound topics, on a broker only (any client
        # can write them); the dict is the sink's own: handlers added later are honoured
        self.discovery: Discovery | None = None
        self.subscriptions: dict[str, Callable[[bytes], list[Publication]]] = {}
        if sink is None and cfg.mqtt.url is not None:  # plain objects: nothing acquired
            self.discovery = Discovery(cfg, pipeline.topics)
            self.subscriptions.update(self.discovery.subscriptions())

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            msg = "Runtime.outbox before `async with runtime`"
            raise RuntimeError(msg)
        return self._outbox

    @property
    def sink(self) -> Sink:
        if self._sink is None:
            msg = "Runtime.sink before `async with runtime`"
            raise RuntimeError(msg)
        return self._sink

    def _open(self) -> None:
        """The outbox, then the sink: stdout without `mqtt.url`, else MQTT."""
        cfg = self.cfg
        stdout_mode = cfg.mqtt.url is None
        path = self._outbox_path
        if path is None:
            path = ":memory:" if stdout_mode else cfg.state_dir / "outbox.sqlite"
        outbox = self._outbox = Outbox.open(path, max_events=cfg.outbox.max_events,
                                            max_age_s=cfg.outbox.max_age_s,
                                            gateway_id=cfg.gateway_id)
        if self._given_sink is not None:
            self._sink = self._given_sink
        elif stdout_mode:
            self._sink = StdoutSink(self._stdout)
        else:
            client_id = cfg.mqtt.client_id or f"bms-gateway-{cfg.gateway_id}"
            if self._guest:  # never take over the live daemon's MQTT session
                client_id = f"{client_id}-replay-{os.getpid()}"
            self._sink = MqttSink(cfg.mqtt, client_id, self.t_avail, outbox,
                                  self._on_connect, self.subscriptions, ordered=self._guest)

    def _on_connect(self) -> list[Publication]:
        pubs = [Publication(self.t_avail, b"online")]
        if self.discovery is not None:
            pubs.extend(self.discovery.on_connect())
        return pubs

    # -- the TaskGroup
    async def __aenter__(self) -> Self:
        """Open the outbox, build the sink, enter the TaskGroup: a failure closes what
        was opened before it and comes out as itself (OutboxError: exit 3)."""
        try:
            self._open()
            self._tg = asyncio.TaskGroup()
            await self._tg.__aenter__()
        except BaseException:
            self._tg = None
            self.close()
            raise
        return self

    def start(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` as a task of the runtime's group, named `name`."""
        if self._tg is None:
            coro.close()
            msg = "Runtime.start outside `async with runtime`"
            raise RuntimeError(msg)
        task = self._tg.create_task(coro, name=name)
        self.tasks.append(task)
        return task

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        """Stop the sources and the sink, cancel what still runs, close the outbox."""
        assert self._tg is not None
        for s in self.sources:
            s.stop()
        self.sink.stop()
        for t in self.tasks:
            t.cancel()
        try:
            if isinstance(exc, Exception):
                # the body's own error (a LogError in the middle of a log) goes on as it
                # is: handed to the TaskGroup it would come out inside an ExceptionGroup
                await self._tg.__aexit__(None, None, None)
            else:
                await self._tg.__aexit__(et, exc, tb)
        finally:
            self._tg = None
            self.tasks = []
            self.close()

    def close(self) -> None:
        """Close the outbox, if it was opened (as often as it is called)."""
        if self._outbox is not None and not self._closed:
            self._closed = True
            self._outbox.close()

    async def sink_until_it_dies(self) -> None:
        """The sink's task for a run that does not restart it (a replay): a sink that
        dies is logged, kept for the exit status (1), and releases whoever waits on it."""
        try:
            await self.sink.run()
        except Exception as e:  # a dead sink is never swallowed: logged, and exit 1
            self.sink_error = f"{type(e).__name__}: {e}"
            log.error("the MQTT sink died: %s", self.sink_error, exc_info=e)
            self.sink.stop()

    # -- pipeline output -> outbox -> sink
    def ship(self) -> None:
        sink = self.sink
        if self.outbox.maintain():  # events held through a storage error are now stored
            sink.flush()
        out = self.pipeline.take()
        if self.discovery is not None:
            out.extend(self.discovery.learn(pack.live.state for pack in self.pipeline.packs))
        if not out:
            return
        events = [x for x in out if not isinstance(x, Publication)]
        # one outbox transaction (one fsync) for the batch, before anything is published
        stored = iter(self.outbox.append(events) if events else ())
        for item in out:
            if isinstance(item, Publication):
                sink.publish(item)
            else:
                seq, topic, payload = next(stored)
                if sink.event(seq, topic, payload):
                    self.outbox.ack(seq)
        if events:
            sink.flush()

    def publish(self, pubs: Iterable[Publication]) -> None:
        for p in pubs:
            self.sink.publish(p)

    # -- sources
    def on_batch(self, bus: int) -> Callable[[list[Frame]], None]:
        """A live source's batches of bus number `bus` into the pipeline, then shipped."""
        feed, ship = self.pipeline.feed, self.ship

        def batch(frames: list[Frame]) -> None:
            feed(frames, bus)
            ship()
            self.last_progress = time.monotonic()
        return batch

    def on_bus_state(self, bus: int) -> Callable[[str, bool, str], None]:
        def state(condition: str, active: bool, detail: str) -> None:
            if active:
                self.last_error = detail
            self.pipeline.bus_state(bus, condition, active, detail, time.time())
            self.ship()
        return state

    def start_sources(self, run: Callable[[str, LiveSource], Coroutine[Any, Any, None]]
                      | None = None) -> None:
        """Open the configured buses, each source a task (`run(name, source)` wraps it,
        e.g. in the daemon's supervisor). On a reload, a bus whose config is unchanged
        keeps its open source (not a frame lost); a changed or removed one is closed."""
        running = {s.cfg.name: s for s in self.sources}
        sources = []
        for i, bus in enumerate(self.cfg.buses):
            src = running.pop(bus.name, None)
            if src is not None and src.cfg == bus and src.refilter():
                src.on_batch, src.on_state = self.on_batch(i), self.on_bus_state(i)
                sources.append(src)
                continue
            new = make_source(bus, i, self.on_batch(i), self.on_bus_state(i),
                              lambda: self.pipeline)
            if src is not None:
                log.info("reload: bus %s changed: reopening it", bus.name)
                src.stop()
                new.lost = src.lost  # its can_bus_lost clears when the new one opens
            sources.append(new)
            name = f"source[{bus.name}]"
            self.start(name, run(name, new) if run is not None else new.run())
        for src in running.values():
            log.info("reload: bus %s removed: closing it", src.cfg.name)
            src.stop()
        self.sources = sources

    def send(self, bus: int, can_id: int, data: bytes, extended: bool) -> bool:
        if bus >= len(self.sources):
            return False
        return self.sources[bus].send(can_id, data, extended)

    # -- a recorded log
    async def play(self, batches: Iterable[list[Frame]], pacer: Pacer, *,
                   on_pause: Callable[[], None] | None = None,
                   on_batch: Callable[[], None] | None = None) -> None:
        """Feed a recorded log, paced by its frame times (`pacer`), and ship as it goes;
        at the end (or when cancelled) publish what changed since the last publication.
        `on_pause` runs before each wait for the log's clock, `on_batch` after each batch."""
        pipeline, sink = self.pipeline, self.sink
        try:
            for batch in batches:
                start = 0
                if pacer.speed is not None:
                    for i, fr in enumerate(batch):
                        d = pacer.delay(fr[0])
                        if d > PACE_MIN_S:
                            pipeline.feed_log(batch[start:i])
                            self.ship()
                            start = i
                            if on_pause is not None:
                                on_pause()
                            await asyncio.sleep(d)
                pipeline.feed_log(batch[start:] if start else batch)
                self.ship()
                if on_batch is not None:
                    on_batch()
                await sink.room()
                await asyncio.sleep(0)
        finally:
            pipeline.finish()
            self.ship()

    async def deliver(self, timeout: float, final: Callable[[], list[Publication]]) -> bool:
        """Deliver what is pending, then the `final` publications (built after that, so
        a final status tells the truth), within `timeout` s; False when something was
        not (then `undelivered` counts the events left in the outbox)."""
        sink = self.sink
        deadline = time.monotonic() + timeout
        delivered = await sink.delivered(timeout)
        if delivered:
            self.publish(final())
            delivered = await sink.delivered(max(0.5, deadline - time.monotonic()))
        if not delivered:
            self.undelivered = self.outbox.depth()
        return delivered

    # -- status
    def status(self) -> Publication:
        return Publication(self.t_status, dumps(self.status_body()))

    def status_body(self) -> dict[str, Any]:
        p = self.pipeline
        now = time.monotonic()
        received = sum(c.received for c in p.counters)
        if now - self._rate_t >= 1.0:
            self.frames_per_s = (received - self._rate_n) / (now - self._rate_t)
            self._rate_t, self._rate_n = now, received
        buses = {}
        for i, c in enumerate(p.counters):
            src = self.sources[i] if i < len(self.sources) else None
            buses[p.bus_names[i]] = {
                "received": c.received, "decoded": c.decoded, "unknown": c.unknown,
                "errors": (src.stats.error_frames if src else 0),
                "overruns": (src.stats.overruns if src else 0),
                "receive": src.receive_path if src else "log",
                "garbled": (src.stats.bad_lines if src else 0),
                "short_frames": p.short_frames(),
                "state": ("lost" if src and src.lost else "up") if src else "log",
                "transmitted": src.tx_count if src else 0,
            }
        st = self.sink.status()
        body: dict[str, Any] = {
            "version": __version__, "gateway_id": self.cfg.gateway_id,
            "uptime_s": round(now - self.started, 1), "frames_per_s": round(self.frames_per_s, 1),
            "buses": buses,
            "packs": {pack.live.state.pack_id: {
                "online": pack.live.state.online,
                "state_published": pack.publisher.state_count,
                "cells_published": pack.publisher.cells_count,
                "implausible": pack.live.implausible_counts(),
                "active_faults": len(pack.faults.active()),
            } for pack in p.packs},
            "outbox_depth": self.outbox.depth(),
            "outbox_dropped": self.outbox.dropped_total,
            "outbox_held": self.outbox.held,
            "storage_error": self.outbox.storage_error or None,
            "published": st.published,
            "events_published": st.events_published,
            "mqtt_reconnects": st.reconnects,
            "mqtt_connected": st.connected,
            "dropped_oversize": st.dropped_oversize,
            "last_error": self.last_error or st.last_error or None,
            # gateway-level faults (the MQTT link, the daemon's own tasks): not pack faults
            "faults": [*st.faults, *self.outbox.faults()],
            "mqtt_refused": st.refused_total,
            "inbound_errors": st.inbound_errors,
            "inbound_rejected": self.discovery.rejected if self.discovery is not None else 0,
            "task_deaths": self.task_deaths,
        }
        if self.log_stats is not None:
            body["log"] = {"frames": self.log_stats.frames, "bad_lines": self.log_stats.bad_lines,
                           "error_frames": self.log_stats.error_frames}
        return body


__all__ = ["Runtime", "run_loop"]
