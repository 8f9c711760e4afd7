"""The asyncio daemon: wires sources, the pipeline, the outbox and a sink together.

`Runtime` owns the resources (outbox, sink, notifier) and ships what the pipeline
produces. `replay()` feeds it a recorded log, paced by frame timestamps; `serve()`
feeds it live buses and handles signals, reload, watchdog and status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from gateway import __version__, entry
from gateway.backoff import backoff
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.model import Publication
from gateway.publish.homeassistant import Discovery
from gateway.publish.outbox import Outbox
from gateway.publish.sinks import BrokerAddressError, MqttSink, StdoutSink, dumps
from gateway.runtime.pipeline import Pipeline, Prepared
from gateway.runtime.systemd import Notifier, watchdog_interval
from gateway.source.logformats import LineFormat
from gateway.source.logs import LiveSource, LogError, Pacer, SourceStats, read_log
from gateway.source.socketcan import make_source

log = logging.getLogger("gateway.daemon")

STATUS_PERIOD_S = 10.0
MAX_DEATHS = 5  # a task dying this often in a row ends the process (exit 1)


T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """asyncio.run on uvloop when it is installed (`pip install bms-gateway[fast]`):
    measured at 8.5k frames/s on the virtual bus, gateway CPU 14.7 -> 11.3 % and p99
    latency 5.2 -> 4.5 ms, the event loop's own overhead being most of the rest.
    `loop`: auto (uvloop if importable), uvloop, asyncio."""
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                msg = "--loop uvloop: uvloop is not installed (pip install bms-gateway[fast])"
                raise RuntimeError(msg) from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


class Runtime:
    """Pipeline output -> sink. Events pass through the outbox first, always."""

    def __init__(self, cfg: GatewayConfig, pipeline: Pipeline, *, stdout: Any = None,
                 outbox_path: Path | str | None = None) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.started = time.monotonic()
        self.stdout_mode = cfg.mqtt.url is None
        if outbox_path is None:
            outbox_path = ":memory:" if self.stdout_mode else cfg.state_dir / "outbox.sqlite"
        self.outbox = Outbox.open(outbox_path, max_events=cfg.outbox.max_events,
                                  max_age_s=cfg.outbox.max_age_s, gateway_id=cfg.gateway_id)
        self.sink: StdoutSink | MqttSink
        self.t_status = pipeline.topics.gateway("status")
        self.t_avail = pipeline.topics.gateway("availability")
        self.extra_on_connect: list[Callable[[], list[Publication]]] = []
        self.subscriptions: dict[str, Callable[[bytes], list[Publication]]] = {}
        self.sources: list[LiveSource] = []
        self.log_stats: SourceStats | None = None
        self.undelivered = 0  # events still in the outbox when a replay gave up
        self.sink_error = ""  # why a replay's MQTT sink died, if it did
        self.last_error = ""
        self.task_deaths = 0
        self._rate_t = time.monotonic()
        self._rate_n = 0
        self.frames_per_s = 0.0
        # HA discovery; its inbound topics only when enabled (any client can write them).
        # Set up before MqttSink, which copies an empty subscriptions dict.
        self.discovery: Discovery | None = None
        if not self.stdout_mode:
            self.discovery = Discovery(cfg, pipeline.topics)
            self.extra_on_connect.append(self.discovery.on_connect)
            self.subscriptions.update(self.discovery.subscriptions())
        if self.stdout_mode:
            self.sink = StdoutSink(stdout)
        else:
            self.sink = MqttSink(cfg.mqtt, cfg.mqtt.client_id or f"bms-gateway-{cfg.gateway_id}",
                                 self.t_avail, self._next_events, self.outbox.ack,
                                 self._on_connect, self.subscriptions)

    def _next_events(self) -> list[tuple[int, str, bytes]]:
        return self.outbox.pending(100)

    def _on_connect(self) -> list[Publication]:
        pubs = [Publication(self.t_avail, b"online")]
        for fn in self.extra_on_connect:
            pubs.extend(fn())
        return pubs

    def ship(self) -> None:
        if self.outbox.maintain():  # events held through a storage error are now stored
            self.sink.flush()
        out = self.pipeline.drain_ordered()
        if self.discovery is not None:
            out.extend(self.discovery.learn(self.pipeline))
        if not out:
            return
        events = [x for x in out if not isinstance(x, Publication)]
        # one outbox transaction (one fsync) for the batch, before anything is published
        stored = iter(self.outbox.append(events) if events else ())
        sink = self.sink
        for item in out:
            if isinstance(item, Publication):
                sink.snapshot(item)
            elif isinstance(sink, StdoutSink):  # stdout: print in order, "acked" at once
                seq, topic, payload = next(stored)
                sink.snapshot(Publication(topic, payload, retain=False, qos=1))
                sink.events_published += 1
                self.outbox.ack(seq)
        if events:
            sink.flush()

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
        sink = self.sink
        body: dict[str, Any] = {
            "version": __version__, "gateway_id": self.cfg.gateway_id,
            "uptime_s": round(now - self.started, 1), "frames_per_s": round(self.frames_per_s, 1),
            "buses": buses,
            "packs": {rt.compiled.state.pack_id: {
                "online": rt.compiled.state.online,
                "state_published": rt.publisher.state_count,
                "cells_published": rt.publisher.cells_count,
                "implausible": rt.compiled.implausible_counts(),
                "active_faults": len(rt.faults.active()),
            } for rt in p.packs},
            "outbox_depth": self.outbox.depth(),
            "outbox_dropped": self.outbox.dropped_total,
            "outbox_held": self.outbox.held,
            "storage_error": self.outbox.storage_error or None,
            "published": getattr(sink, "published", getattr(sink, "count", 0)),
            "events_published": getattr(sink, "events_published", 0),
            "mqtt_reconnects": getattr(sink, "reconnects", 0),
            "mqtt_connected": sink.connected.is_set() if isinstance(sink, MqttSink) else None,
            "dropped_oversize": getattr(sink, "dropped_oversize", 0),
            "last_error": self.last_error or getattr(sink, "last_error", "") or None,
            # gateway-level faults (the MQTT link, the daemon's own tasks): not pack faults
            "faults": (sink.faults() if isinstance(sink, MqttSink) else [])
            + self.outbox.faults(),
            "mqtt_refused": getattr(sink, "refused_total", 0),
            "inbound_errors": getattr(sink, "inbound_errors", 0),
            "inbound_rejected": self.discovery.rejected if self.discovery is not None else 0,
            "task_deaths": self.task_deaths,
        }
        if self.log_stats is not None:
            body["log"] = {"frames": self.log_stats.frames, "bad_lines": self.log_stats.bad_lines,
                           "error_frames": self.log_stats.error_frames}
        return body

    def close(self) -> None:
        self.outbox.close()


async def _with_sink(rt: Runtime, body: Callable[[], Any], drain_timeout: float,
                     final: Callable[[], list[Publication]]) -> None:
    """Run `body` while the MQTT sink runs, deliver what is pending, then the `final`
    publications (built after that drain, so a final status tells the truth), and stop."""
    sink = rt.sink
    if isinstance(sink, StdoutSink):
        await body()
        for p in final():
            sink.snapshot(p)
        sink.flush()
        return
    task = asyncio.create_task(sink.run(), name="mqtt.run")

    def ended(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            sink.dead = True  # release a replay waiting for room or for delivery
            sink.space.set()

    task.add_done_callback(ended)
    try:
        await body()
        deadline = time.monotonic() + drain_timeout
        delivered = await sink.drain(drain_timeout)
        if delivered:
            for p in final():
                sink.snapshot(p)
            delivered = await sink.drain(max(0.5, deadline - time.monotonic()))
        if not delivered:
            rt.undelivered = rt.outbox.depth()
            log.warning("not everything reached the broker within %.0f s; %d events not "
                        "delivered", drain_timeout, rt.undelivered)
    finally:
        sink.stopping = True
        sink.wake.set()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception as e:  # a dead sink is never swallowed: logged, and exit 1
            rt.sink_error = f"{type(e).__name__}: {e}"
            log.error("the MQTT sink died: %s", rt.sink_error, exc_info=e)


async def replay(cfg: GatewayConfig, log_path: str | Path, *, speed: float | None,
                 stdout: Any = None, drain_timeout: float = 30.0,
                 outbox_path: Path | str | None = None,
                 line_format: LineFormat | None = None, start: float | None = None) -> Runtime:
    """Feed a recorded log through the pipeline; return the runtime (for counters)."""
    pipeline = Pipeline(cfg)
    # its own outbox, never the live daemon's: a replay must not publish the daemon's
    # events, nor leave its own for the daemon to publish
    rt = Runtime(cfg, pipeline, stdout=stdout, outbox_path=outbox_path or ":memory:")
    stats = SourceStats()
    rt.log_stats = stats
    # raises LogError before anything is published
    batches = read_log(log_path, stats, line_format=line_format, start=start)
    pacer = Pacer(speed)
    sink = rt.sink
    if isinstance(sink, MqttSink):
        sink.coalesce = False
        # never take over the live daemon's MQTT session (same gateway_id, same broker)
        sink.client_id = f"{sink.client_id}-replay-{os.getpid()}"

    async def pause() -> None:
        if isinstance(sink, MqttSink):
            await sink.backpressure()
        await asyncio.sleep(0)

    async def body() -> None:
        try:
            for batch in batches:
                if pacer.speed is None:
                    pipeline.feed_log(batch)
                    rt.ship()
                    await pause()
                    continue
                start = 0
                for i, fr in enumerate(batch):
                    d = pacer.delay(fr[0])
                    if d > 0.002:
                        pipeline.feed_log(batch[start:i])
                        rt.ship()
                        start = i
                        await asyncio.sleep(d)
                pipeline.feed_log(batch[start:])
                rt.ship()
                await pause()
        finally:
            pipeline.finish()
            rt.ship()
            for p in pipeline.offline():
                rt.sink.snapshot(p)

    def final() -> list[Publication]:
        # a replay is a guest: it leaves its gateway offline (its last will says the same
        # if it dies), and its last status is taken after everything was delivered
        return [Publication(rt.t_avail, b"offline"), rt.status()]

    try:
        await _with_sink(rt, body, drain_timeout, final)
    finally:
        rt.close()
    return rt


class Daemon:
    """`bms-gateway run`: live buses, signals, reload, watchdog, status."""

    def __init__(self, cfg: GatewayConfig, *, stdout: Any = None) -> None:
        self.cfg = cfg
        self.stdout = stdout
        self.pipeline = Pipeline(cfg)
        self.rt = Runtime(cfg, self.pipeline, stdout=stdout)
        self.notifier = Notifier()
        self.stop_event = asyncio.Event()
        self.should_exit = False
        self._tg: asyncio.TaskGroup | None = None
        self._poller_task: asyncio.Task[None] | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._hup_again = False
        self.sigint_count = 0
        self.last_progress = time.monotonic()
        self.tasks: list[asyncio.Task[None]] = []
        self.alive: set[str] = set()  # supervised tasks running now (not between restarts)
        self.exit_code = 0
        self.metrics: Any = None
        if cfg.prometheus is not None:
            from gateway.runtime.metrics import require

            require(cfg.path)  # missing prometheus-client: a config problem, exit 3

    # -- supervision
    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]],
                         done: Callable[[], bool]) -> None:
        """Run one of the daemon's tasks; never let it die silently.

        An exception is logged with its traceback, shown in the status topic, and the
        task restarted after a jittered backoff. A task that keeps dying (MAX_DEATHS in a
        row, each within a minute of its start) ends the daemon with exit 1, so that the
        service manager restarts the process. A task that returns is finished.
        """
        deaths = 0
        while True:
            started = time.monotonic()
            self.alive.add(name)
            try:
                await run()
                return
            except Exception as e:
                err: Exception = e
            finally:
                self.alive.discard(name)
            if done():
                log.error("task %s failed while stopping: %r", name, err)
                return
            if isinstance(err, BrokerAddressError):
                # a config problem found only at connect: one line, exit 3, which
                # systemd's RestartPreventExitStatus=3 does not restart in a loop
                log.critical("%s: mqtt.url: %s. Fix: use mqtt://host:1883 with a valid host "
                             "name, then run check-config", self.cfg.path, err)
                self.rt.last_error = f"task {name}: {err}"
                self.exit_code = 3
                self.should_exit = True
                self.stop_event.set()
                return
            deaths = deaths + 1 if time.monotonic() - started < 60 else 1
            self.rt.task_deaths += 1
            self.rt.last_error = f"task {name} died: {type(err).__name__}: {err}"
            if deaths >= MAX_DEATHS:
                log.critical("task %s died %d times in a row, last: %r; stopping with exit "
                             "status 1 so that the service manager restarts the gateway",
                             name, deaths, err, exc_info=err)
                self.exit_code = 1
                self.should_exit = True
                self.stop_event.set()
                return
            delay = backoff(deaths)
            log.error("task %s died (%d in a row): %r; restarting it in %.1f s", name, deaths,
                      err, delay, exc_info=err)
            await asyncio.sleep(delay)

    def _stopping(self) -> bool:
        return self.stop_event.is_set()

    # -- sources
    def _start_sources(self, tg: asyncio.TaskGroup) -> None:
        """Open the configured buses. On a reload, a bus whose config is unchanged keeps
        its open source (not a frame lost); a changed or removed one is closed."""
        running = {s.cfg.name: s for s in self.rt.sources}
        sources = []
        for i, bus in enumerate(self.cfg.buses):
            src = running.pop(bus.name, None)
            if src is not None and src.cfg == bus and src.refilter():
                src.on_batch, src.on_state = self._batch_cb(i), self._state_cb(i)
                sources.append(src)
                continue
            new = make_source(bus, i, self._batch_cb(i), self._state_cb(i),
                              lambda: self.pipeline)
            if src is not None:
                log.info("reload: bus %s changed: reopening it", bus.name)
                src.stop()
                new.lost = src.lost  # its can_bus_lost clears when the new one opens
            sources.append(new)
            name = f"source[{bus.name}]"
            self.tasks.append(tg.create_task(self._supervise(name, new.run, self._stopping),
                                             name=name))
        for src in running.values():
            log.info("reload: bus %s removed: closing it", src.cfg.name)
            src.stop()
        self.rt.sources = sources

    def _batch_cb(self, bus: int) -> Callable[[list[Any]], None]:
        def on_batch(batch: list[Any]) -> None:
            self.pipeline.feed(batch, bus)
            self.rt.ship()
            self.last_progress = time.monotonic()
        return on_batch

    def _state_cb(self, bus: int) -> Callable[[str, bool, str], None]:
        def on_state(condition: str, active: bool, detail: str) -> None:
            if active:
                self.rt.last_error = detail
            self.pipeline.bus_state(bus, condition, active, detail, time.time())
            self.rt.ship()
        return on_state

    # -- periodic work on the event loop
    async def _ticker(self) -> None:
        wd = watchdog_interval()
        next_status = 0.0
        next_wd = 0.0
        while not self.stop_event.is_set():
            now = time.time()
            self.pipeline.tick(now)
            self.rt.ship()
            self.last_progress = time.monotonic()
            mono = time.monotonic()
            if mono >= next_status:
                next_status = mono + STATUS_PERIOD_S
                self.rt.sink.snapshot(self.rt.status())
                self.notifier.status(self._status_line())
            if wd is not None and mono >= next_wd:
                # ping only when this loop iteration really ran the pipeline, and while
                # the sink that delivers its output is alive (not dead, not backing off)
                if mono - self.last_progress < wd and (
                        not isinstance(self.rt.sink, MqttSink) or "mqtt" in self.alive):
                    self.notifier.watchdog()
                next_wd = mono + wd
            await asyncio.sleep(0.2)

    def _status_line(self) -> str:
        p = self.pipeline
        frames = sum(c.received for c in p.counters)
        online = sum(1 for rt in p.packs if rt.compiled.state.online)
        lost = [s.cfg.name for s in self.rt.sources if s.lost]
        sink = self.rt.sink
        refused = sorted(sink.refused) if isinstance(sink, MqttSink) else []
        return (f"{frames} frames, {online}/{len(p.packs)} packs online, outbox "
                f"{self.rt.outbox.depth()}" + (f", bus lost: {','.join(lost)}" if lost else "")
                + (f", broker refuses: {','.join(refused)}" if refused else ""))

    def _start_poller(self, tg: asyncio.TaskGroup) -> None:
        """Request frames and ISO-TP exchanges (gateway/poll.py); only packs with
        `transmit: true` ever send. It taps the current config's frames (Pipeline.tap),
        which a reload drops, so a reload starts a new one."""
        from gateway.source.poll import Poller

        if self._poller_task is not None:
            self._poller_task.cancel()
        poller = self.poller = Poller(self.pipeline, self._send)

        async def run() -> None:
            await poller.run(self.stop_event)

        self._poller_task = tg.create_task(self._supervise("poller", run, self._stopping),
                                           name="poller")
        self.tasks.append(self._poller_task)

    def _send(self, bus: int, can_id: int, data: bytes, extended: bool) -> bool:
        if bus >= len(self.rt.sources):
            return False
        return self.rt.sources[bus].send(can_id, data, extended)

    # -- signals and reload
    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_term)
        loop.add_signal_handler(signal.SIGINT, self._on_int)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_term(self) -> None:
        log.info("SIGTERM: stopping")
        self.should_exit = True
        self.stop_event.set()

    def _on_int(self) -> None:
        self.sigint_count += 1
        if self.sigint_count > 1:
            # no drain, but the outbox is closed: undelivered events stay for the next start
            log.error("second SIGINT: exiting now (%d events stay in the outbox)",
                      self.rt.outbox.depth())
            self.rt.close()
            os._exit(130)
        log.info("SIGINT: stopping (again to force)")
        self.should_exit = True
        self.stop_event.set()

    def _on_hup(self) -> None:
        # The new config is read and compiled in a worker thread: the buses keep being
        # read, and a huge or hostile file cannot starve the loop (or the watchdog).
        if self._reload_task is not None and not self._reload_task.done():
            self._hup_again = True  # read the file once more when this one is done
            return
        self.notifier.reloading()
        self._reload_task = asyncio.get_running_loop().create_task(self._reload(),
                                                                   name="reload")

    def _prepare(self) -> Prepared:
        """Worker thread: parse and compile the config file against the running packs."""
        return self.pipeline.prepare(load_config(self.cfg.path))

    async def _reload(self) -> None:
        try:
            prepared = await asyncio.to_thread(self._prepare)
        except ConfigError as e:
            # one line (one journal entry that greps well), however many problems
            log.error("reload: new config rejected, keeping the running one: %s",
                      "; ".join(str(p) for p in e.problems))
        except Exception as e:
            log.error("reload: new config rejected, keeping the running one: %s: %s",
                      type(e).__name__, e)
        else:
            if not self.should_exit:
                try:
                    self.reload(prepared)
                except Exception as e:  # half switched: not a state to keep running in
                    log.critical("reload: applying the new config failed: %r; stopping with "
                                 "exit status 1 so that the service manager restarts the "
                                 "gateway", e, exc_info=e)
                    self.rt.last_error = f"reload failed: {type(e).__name__}: {e}"
                    self.exit_code = 1
                    self.should_exit = True
                    self.stop_event.set()
        if self._hup_again and not self.should_exit:
            self._hup_again = False
            self._reload_task = asyncio.get_running_loop().create_task(self._reload(),
                                                                       name="reload")
            return
        self.notifier.ready()

    def reload(self, prepared: Prepared) -> None:
        """Switch to a config `_prepare` compiled, on the loop, between two batches:
        packs with an unchanged identity keep their state and faults, removed ones clear
        theirs and go offline, unchanged buses stay open."""
        new = prepared.cfg
        unapplied = [k for k, a, b in (
            ("mqtt", self.cfg.mqtt, new.mqtt), ("gateway_id", self.cfg.gateway_id, new.gateway_id),
            ("state_dir", self.cfg.state_dir, new.state_dir),
            ("prometheus", self.cfg.prometheus, new.prometheus),
            ("log_level", self.cfg.log_level, new.log_level),
            ("outbox", self.cfg.outbox, new.outbox)) if a != b]
        if unapplied:
            log.warning("reload: changes to %s take effect only after a restart",
                        ", ".join(unapplied))
        kept = sum(1 for *_, old in prepared.packs if old is not None)
        self.pipeline.apply(prepared, time.time())
        self.cfg = new
        self.rt.cfg = new
        if self._tg is not None:
            self._start_sources(self._tg)
            self._start_poller(self._tg)
        self.rt.ship()
        if self.rt.discovery is not None:
            for p in self.rt.discovery.reconfigure(new):
                self.rt.sink.snapshot(p)
        log.info("reload: config %s applied (%d packs), %d kept their state", new.path,
                 len(new.packs), kept)

    async def serve(self) -> int:
        self._install_signals()
        early = entry.received()
        if early is not None:  # came while the CLI was still importing and loading
            (self._on_int if early == signal.SIGINT else self._on_term)()
        rt = self.rt
        sink = rt.sink
        sink_task = None
        if isinstance(sink, MqttSink):
            mqtt_sink = sink
            sink_task = asyncio.create_task(
                self._supervise("mqtt", sink.run, lambda: mqtt_sink.stopping), name="mqtt")
        self._start_metrics()
        try:
            self.tasks = []
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._start_sources(tg)
                self.tasks.append(tg.create_task(
                    self._supervise("ticker", self._ticker, self._stopping), name="ticker"))
                self._start_poller(tg)
                # READY once every bus is open or known to be missing (can_bus_lost
                # raised): a pulled adapter must not hold start-up for the full 5 s.
                deadline = time.monotonic() + 5
                while (time.monotonic() < deadline and not all(
                        s.opened.is_set() or s.lost for s in rt.sources)):
                    await asyncio.sleep(0.02)
                self.notifier.ready(self._status_line())
                log.info("bms-gateway %s running: %d bus(es), %d pack(s), %s", __version__,
                         len(self.cfg.buses), len(self.cfg.packs),
                         self.cfg.mqtt.url or "stdout")
                await self.stop_event.wait()
                self._tg = None
                if self._reload_task is not None:
                    self._reload_task.cancel()
                for s in rt.sources:
                    s.stop()
                for t in self.tasks:
                    t.cancel()
            self.notifier.stopping()
            await self._shutdown_flush()
        finally:
            if isinstance(sink, MqttSink):
                sink.stopping = True
                sink.wake.set()
            if sink_task is not None:
                sink_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sink_task
            if self.metrics is not None:
                self.metrics.stop()
            rt.close()
            self.notifier.close()
        return self.exit_code

    async def _shutdown_flush(self) -> None:
        """Flush what is in flight, say offline, drain. Each step on its own: what made a
        task die may fail one of them, and must not skip the others (exit 1 then)."""
        rt = self.rt
        sink = rt.sink

        def offline() -> None:
            for p in self.pipeline.offline():
                sink.snapshot(p)
            sink.snapshot(Publication(rt.t_avail, b"offline"))

        steps: list[tuple[str, Callable[[], None]]] = [
            ("flush the pipeline", lambda: self.pipeline.finish(time.time())),
            ("store the last events", rt.ship), ("publish offline", offline),
            ("publish the status", lambda: sink.snapshot(rt.status()))]
        for what, step in steps:
            try:
                step()
            except Exception:
                log.exception("shutdown: could not %s", what)
                self.exit_code = 1
        if not isinstance(sink, MqttSink):
            sink.flush()
            return
        try:
            if not await sink.drain(self.cfg.shutdown_timeout_s):
                depth = rt.outbox.depth()
                if depth or not sink.down:
                    log.warning("shutdown: broker did not take everything within %.1f s; %d "
                                "events stay in the outbox", self.cfg.shutdown_timeout_s, depth)
                else:
                    log.warning("shutdown: broker not connected; no event is waiting, the "
                                "last state and status were not published")
        except Exception:
            log.exception("shutdown: could not deliver what was pending")
            self.exit_code = 1

    def _start_metrics(self) -> None:
        if self.cfg.prometheus is None:
            return
        from gateway.runtime.metrics import MetricsServer

        server = MetricsServer(self.cfg.prometheus, self.rt.status_body)
        try:
            server.start()
        except OSError as e:  # port taken: monitoring must not take the gateway down
            log.error("Prometheus endpoint %s not started: %s", self.cfg.prometheus,
                      e.strerror or e)
            return
        self.metrics = server


__all__ = ["Daemon", "LogError", "Runtime", "replay"]
