"""`bms-gateway run`: the runtime on live buses, plus what a service needs.

`Daemon.serve()` enters its `Runtime` (gateway/runtime/runtime.py) and starts, in the
runtime's one TaskGroup, the sink, one source per bus, the ticker (frame-time ticks on
the wall clock, status, watchdog) and the poller, each under `_supervise`; it handles
signals, reload (SIGHUP), sd_notify and the Prometheus endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TextIO

from gateway import __version__, entry
from gateway.backoff import backoff
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.model import Publication
from gateway.publish.mqtt import BrokerAddressError
from gateway.runtime.pipeline import Pipeline, Prepared
from gateway.runtime.runtime import Runtime
from gateway.runtime.systemd import SystemdNotifier, watchdog_interval
from gateway.source.logs import LiveSource

log = logging.getLogger("gateway.daemon")

STATUS_PERIOD_S = 10.0
MAX_DEATHS = 5  # a task dying this often in a row ends the process (exit 1)
TICK_PERIOD_S = 0.2


class Daemon:
    """`bms-gateway run`: live buses, signals, reload, watchdog, status."""

    def __init__(self, cfg: GatewayConfig, *, stdout: TextIO | None = None) -> None:
        self.cfg = cfg
        self.pipeline = Pipeline(cfg)
        self.runtime = Runtime(cfg, self.pipeline, stdout=stdout)
        self.notifier = SystemdNotifier()
        self.stop_event = asyncio.Event()
        self.should_exit = False
        self._running = False
        self._poller_task: asyncio.Task[None] | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._hup_again = False
        self.sigint_count = 0
        self.alive: set[str] = set()  # supervised tasks running now (not between restarts)
        self.exit_code = 0
        self.metrics: Any = None
        if cfg.prometheus is not None:
            from gateway.runtime.metrics import require

            require(cfg.path)  # missing prometheus-client: a config problem, exit 3

    def stop(self) -> None:
        """Stop serving (as SIGTERM does)."""
        self.should_exit = True
        self.stop_event.set()

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
        rt = self.runtime
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
                rt.last_error = f"task {name}: {err}"
                self.exit_code = err.exit_code
                self.stop()
                return
            deaths = deaths + 1 if time.monotonic() - started < 60 else 1
            rt.task_deaths += 1
            rt.last_error = f"task {name} died: {type(err).__name__}: {err}"
            if deaths >= MAX_DEATHS:
                log.critical("task %s died %d times in a row, last: %r; stopping with exit "
                             "status 1 so that the service manager restarts the gateway",
                             name, deaths, err, exc_info=err)
                self.exit_code = 1
                self.stop()
                return
            delay = backoff(deaths)
            log.error("task %s died (%d in a row): %r; restarting it in %.1f s", name, deaths,
                      err, delay, exc_info=err)
            await asyncio.sleep(delay)

    def _stopping(self) -> bool:
        return self.stop_event.is_set()

    def _supervised_source(self, name: str, src: LiveSource) -> Coroutine[Any, Any, None]:
        return self._supervise(name, src.run, self._stopping)

    # -- periodic work on the event loop
    async def _ticker(self) -> None:
        rt = self.runtime
        wd = watchdog_interval()
        next_status = 0.0
        next_wd = 0.0
        while not self.stop_event.is_set():
            self.pipeline.tick(time.time())
            rt.ship()
            rt.last_progress = mono = time.monotonic()
            if mono >= next_status:
                next_status = mono + STATUS_PERIOD_S
                rt.sink.publish(rt.status())
                self.notifier.status(self._status_line())
            if wd is not None and mono >= next_wd:
                # ping only when this loop iteration really ran the pipeline, and while
                # the sink that delivers its output is alive (not dead, not backing off)
                if mono - rt.last_progress < wd and rt.sink.name in self.alive:
                    self.notifier.watchdog()
                next_wd = mono + wd
            await asyncio.sleep(TICK_PERIOD_S)

    def _status_line(self) -> str:
        p = self.pipeline
        rt = self.runtime
        frames = sum(c.received for c in p.counters)
        online = sum(1 for pack in p.packs if pack.live.state.online)
        lost = [s.cfg.name for s in rt.sources if s.lost]
        refused = sorted(rt.sink.status().refused)
        return (f"{frames} frames, {online}/{len(p.packs)} packs online, outbox "
                f"{rt.outbox.depth()}" + (f", bus lost: {','.join(lost)}" if lost else "")
                + (f", broker refuses: {','.join(refused)}" if refused else ""))

    def _start_poller(self) -> None:
        """Request frames and ISO-TP exchanges (gateway/source/poll.py); only packs with
        `transmit: true` ever send. It taps the current config's frames (Pipeline.tap),
        which a reload drops, so a reload starts a new one."""
        from gateway.source.poll import Poller

        if self._poller_task is not None:
            self._poller_task.cancel()
        poller = self.poller = Poller(self.pipeline, self.runtime.send)

        async def run() -> None:
            await poller.run(self.stop_event)

        self._poller_task = self.runtime.start(
            "poller", self._supervise("poller", run, self._stopping))

    # -- signals and reload
    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_term)
        loop.add_signal_handler(signal.SIGINT, self._on_int)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_term(self) -> None:
        log.info("SIGTERM: stopping")
        self.stop()

    def _on_int(self) -> None:
        self.sigint_count += 1
        if self.sigint_count > 1:
            # no drain, but the outbox is closed: undelivered events stay for the next start
            log.error("second SIGINT: exiting now (%d events stay in the outbox)",
                      self.runtime.outbox.depth())
            self.runtime.close()
            os._exit(130)
        log.info("SIGINT: stopping (again to force)")
        self.stop()

    def _on_hup(self) -> None:
        # The new config is read and compiled in a worker thread: the buses keep being
        # read, and a huge or hostile file cannot starve the loop (or the watchdog).
        if not self._running or (self._reload_task is not None
                                 and not self._reload_task.done()):
            # read the file once more when this reload is done (or once running)
            self._hup_again = True
            return
        self.notifier.reloading()
        self._reload_task = self.runtime.start("reload", self._reload())

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
                    self.runtime.last_error = f"reload failed: {type(e).__name__}: {e}"
                    self.exit_code = 1
                    self.stop()
        if self._hup_again and not self.should_exit:
            self._hup_again = False
            self._reload_task = self.runtime.start("reload", self._reload())
            return
        self.notifier.ready()

    def reload(self, prepared: Prepared) -> None:
        """Switch to a config `_prepare` compiled, on the loop, between two batches:
        packs with an unchanged identity keep their state and faults, removed ones clear
        theirs and go offline, unchanged buses stay open."""
        new = prepared.cfg
        rt = self.runtime
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
        rt.cfg = new
        if self._running:
            # the poller taps the new config first: its replies are part of what a
            # receive: bcm source compares to decide whether it must reopen
            self._start_poller()
            rt.start_sources(self._supervised_source)
        rt.ship()
        if rt.discovery is not None:
            rt.publish(rt.discovery.reconfigure(new))
        log.info("reload: config %s applied (%d packs), %d kept their state", new.path,
                 len(new.packs), kept)

    # -- the service
    async def serve(self, beside: Callable[[], Coroutine[Any, Any, None]] | None = None
                    ) -> int:
        """Run until stopped; the exit status. `beside()` (the demo's simulators) runs as
        one more task of the runtime once the buses are open."""
        self._install_signals()
        early = entry.received()
        if early is not None:  # came while the CLI was still importing and loading
            (self._on_int if early == signal.SIGINT else self._on_term)()
        rt = self.runtime
        try:
            async with rt:  # opens the outbox (OutboxError: exit 3) and builds the sink
                sink = rt.sink
                self._start_metrics()
                self._running = True
                rt.start(sink.name, self._supervise(sink.name, sink.run, lambda: sink.stopping))
                rt.start_sources(self._supervised_source)
                rt.start("ticker", self._supervise("ticker", self._ticker, self._stopping))
                self._start_poller()
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
                if beside is not None:
                    rt.start("beside", beside())
                if self._hup_again:  # a SIGHUP came while starting
                    self._hup_again = False
                    self._on_hup()
                await self.stop_event.wait()
                self._running = False
                await self._stop_inputs()
                self.notifier.stopping()
                await self._shutdown_flush()
        finally:
            if self.metrics is not None:
                self.metrics.stop()
            self.notifier.close()
        return self.exit_code

    async def _stop_inputs(self) -> None:
        """Everything but the sink: it still has the last state and status to deliver."""
        rt = self.runtime
        for s in rt.sources:
            s.stop()
        inputs = [t for t in rt.tasks if t.get_name() != rt.sink.name]
        for t in inputs:
            t.cancel()
        if inputs:
            await asyncio.wait(inputs)

    async def _shutdown_flush(self) -> None:
        """Flush what is in flight, say offline, deliver. Each step on its own: what made
        a task die may fail one of them, and must not skip the others (exit 1 then)."""
        rt = self.runtime

        def offline() -> None:
            rt.publish(self.pipeline.offline())
            rt.sink.publish(Publication(rt.t_avail, b"offline"))

        steps: list[tuple[str, Callable[[], None]]] = [
            ("flush the pipeline", lambda: self.pipeline.finish(time.time())),
            ("store the last events", rt.ship), ("publish offline", offline),
            ("publish the status", lambda: rt.sink.publish(rt.status()))]
        for what, step in steps:
            try:
                step()
            except Exception:
                log.exception("shutdown: could not %s", what)
                self.exit_code = 1
        try:
            if not await rt.sink.delivered(self.cfg.shutdown_timeout_s):
                depth = rt.outbox.depth()
                if depth or not rt.sink.status().away:
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

        server = MetricsServer(self.cfg.prometheus, self.runtime.status_body)
        try:
            server.start()
        except OSError as e:  # port taken: monitoring must not take the gateway down
            log.error("Prometheus endpoint %s not started: %s", self.cfg.prometheus,
                      e.strerror or e)
            return
        self.metrics = server


__all__ = ["Daemon"]
