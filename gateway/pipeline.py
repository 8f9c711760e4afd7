"""The synchronous core: frames in, publications and fault events out.

Everything here runs in frame time and does no I/O, so the same frames always give
the same output; the daemon (live bus or log) feeds it batches and ships what it
produces. Per frame the cost is one dict lookup and the pack's compiled handler;
publishing policy, fault rules and staleness run on a frame-time tick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .cellcount import CellLearner, cell_learner
from .config import GatewayConfig, PackConfig, Problem
from .decode import DbcError, where_failed
from .faults import FaultEngine, parse_rules
from .model import FIELD_INDEX, FaultEvent, Output, Publication
from .normalize import CompiledPack, DbcCache, compile_pack
from .plausibility import cross_check
from .publish import PackPublisher, Topics, dumps
from .source import Frame

log = logging.getLogger("gateway.pipeline")

TICK_S = 0.1  # frame-time granularity of publishing, rules and staleness
MAX_UNKNOWN_IDS = 4096  # distinct unknown ids counted one by one (all are counted in total)


@dataclass(slots=True)
class BusCounters:
    received: int = 0
    unknown: int = 0
    decoded: int = 0
    unknown_ids: dict[int, int] = field(default_factory=dict)
    handler_errors: int = 0


@dataclass(slots=True)
class PackRuntime:
    compiled: CompiledPack
    publisher: PackPublisher
    faults: FaultEngine
    events_topic: str
    last_faults: bytes = b""
    frames_reported: int = 0
    impl_reported: int = 0
    impl_reason: str = ""  # the latest cross-signal check that dropped a value


def _fanout(handlers: list[Callable[[float, bytes], None]]) -> Callable[[float, bytes], None]:
    def fan(ts: float, data: bytes) -> None:
        for h in handlers:
            h(ts, data)
    return fan


def _check_polling(pc: PackConfig, cache: DbcCache, problems: list[Problem]) -> None:
    """Poll requests and ISO-TP blocks are checked with the rest, so check-config sees
    them (the poller itself only runs in the live daemon)."""
    from .poll import load_extras, request_frame

    shift = load_extras(pc.profile, problems).id_offset_shift
    for req in pc.profile.poll:
        try:
            request_frame(pc, req, cache, shift)
        except (ValueError, DbcError) as e:
            problems.append(Problem(str(pc.profile.path), req.key, str(e)))


class Pipeline:
    def __init__(self, cfg: GatewayConfig, *, cache: DbcCache | None = None) -> None:
        """Compile every pack; raise ConfigError listing every problem found."""
        from .config import ConfigError

        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.gateway_id)
        problems: list[Problem] = []
        cache = cache or DbcCache()
        self.packs: list[PackRuntime] = []
        # cell-count learners listen only until the count is known (gateway/cellcount.py)
        self.learners: list[tuple[CellLearner, int]] = []
        bus_index = {b.name: i for i, b in enumerate(cfg.buses)}
        tables: list[dict[int, list[Callable[[float, bytes], None]]]] = [
            {} for _ in cfg.buses]
        for i, pc in enumerate(cfg.packs):
            compiled = compile_pack(pc, cache, problems)
            rules = parse_rules(pc.rules, str(cfg.path), f"packs[{i}].rules", problems,
                                pc.chemistry)
            _check_polling(pc, cache, problems)
            if compiled is None:
                continue
            engine = FaultEngine(pc.id, rules, pc.profile.faults, pc.stale_after_s)
            compiled.fault_hook[0] = engine.bms_flag
            engine.set_dtc_streams(compiled.dtc_streams)
            compiled.dtc_hook[0] = engine.dtc
            rt = PackRuntime(compiled, PackPublisher(pc, compiled.state, self.topics), engine,
                             self.topics.pack(pc.id, "events"))
            self.packs.append(rt)
            bus = bus_index.get(pc.bus, 0)
            for key, h in compiled.handlers.items():
                tables[bus].setdefault(key, []).append(h)
            learner = cell_learner(pc, compiled.state,
                                   [cache.get(str(d)) for d in pc.profile.dbc])
            if learner is not None:
                self.learners.append((learner, bus))
        if problems:
            raise ConfigError(problems)
        self.handler_lists = tables
        self.tables: list[dict[int, Callable[[float, bytes], None]]] = []
        self._build_tables()
        self.bus_names = [b.name for b in cfg.buses]
        self.bus_lookup: dict[str, int] = {}
        for i, b in enumerate(cfg.buses):
            self.bus_lookup[b.name] = i
            self.bus_lookup[b.channel] = i
        self.counters = [BusCounters() for _ in cfg.buses]
        # Snapshots and fault events in the order they happened in frame time.
        self.out: list[Output] = []
        self.clock = float("-inf")
        self.next_tick = float("-inf")
        self.first_ts: float | None = None

    def _build_tables(self) -> None:
        tables = [{k: list(hs) for k, hs in t.items()} for t in self.handler_lists]
        for learner, bus in self.learners:
            for key, h in learner.handlers().items():
                tables[bus].setdefault(key, []).append(h)
        self.tables = [{k: hs[0] if len(hs) == 1 else _fanout(hs) for k, hs in t.items()}
                       for t in tables]

    def _learned(self, ts: float | None) -> None:
        """Time out cell-count learners (None: the log ended) and drop finished ones."""
        for learner, _ in self.learners:
            if ts is None:
                learner.finish()
            else:
                learner.tick(ts)
        if any(learner.done for learner, _ in self.learners):
            self.learners = [(lr, b) for lr, b in self.learners if not lr.done]
            self._build_tables()

    # ----------------------------------------------------------- hot path

    def feed(self, frames: list[Frame], bus: int = 0) -> None:
        """Process a batch of frames from one bus (the hot path)."""
        get = self.tables[bus].get
        next_tick = self.next_tick
        unknown = 0
        c = self.counters[bus]
        for ts, key, data, _chan in frames:
            if ts >= next_tick:
                self.tick(ts)
                next_tick = self.next_tick
            h = get(key)
            if h is None:
                unknown += 1
                u = c.unknown_ids
                seen = u.get(key)
                if seen is not None:
                    u[key] = seen + 1
                elif len(u) < MAX_UNKNOWN_IDS:  # a noisy bus must not grow this forever
                    u[key] = 1
                continue
            try:
                h(ts, data)
            except Exception as e:  # a bug in a profile's handler must not lose the batch
                c.handler_errors += 1
                if c.handler_errors in (1, 10, 100, 1000) or c.handler_errors % 100_000 == 0:
                    log.error("frame %#x on bus %s: handler failed (%d so far): %s: %s%s",
                              key, self.bus_names[bus], c.handler_errors, type(e).__name__, e,
                              where_failed(e))
        c.received += len(frames)
        c.unknown += unknown
        c.decoded += len(frames) - unknown

    def feed_log(self, frames: list[Frame]) -> None:
        """A log batch may mix channels; route each frame by its channel name."""
        if len(self.tables) == 1:
            self.feed(frames, 0)
            return
        lookup = self.bus_lookup
        groups: dict[int, list[Frame]] = {}
        for f in frames:
            idx = lookup.get(f[3])
            if idx is None:
                try:  # Vector/PEAK logs number channels from 1
                    idx = int(f[3]) - 1 if int(f[3]) >= 1 else int(f[3])
                except ValueError:
                    idx = 0
                if not 0 <= idx < len(self.tables):
                    idx = 0
            groups.setdefault(idx, []).append(f)
        for idx, fs in groups.items():
            self.feed(fs, idx)

    # ----------------------------------------------------------- frame-time tick

    def tick(self, ts: float, *, force: bool = False) -> None:
        # After a silent gap, first run the tick at the moment a pack went stale, so its
        # `offline` is published at that frame time and not together with the `online`.
        for rt in self.packs:
            st = rt.compiled.state
            if st.online and st.last_seen is not None:
                deadline = st.last_seen + rt.compiled.cfg.stale_after_s + 1e-6
                if self.clock < deadline < ts:
                    self._tick(deadline, force=False)
        self._tick(ts, force=force)

    def _tick(self, ts: float, *, force: bool) -> None:
        self.clock = max(self.clock, ts)
        if self.first_ts is None:
            self.first_ts = ts
        self.next_tick = ts + TICK_S
        if self.learners:
            self._learned(ts)
        out = self.out
        for rt in self.packs:
            st = rt.compiled.state
            eng = rt.faults
            if st.last_seen is not None:
                stale = ts - st.last_seen > rt.compiled.cfg.stale_after_s
                if st.online and stale:
                    st.online = False
                    out.append(rt.publisher.availability(False))
                    eng.comm(st.last_seen + rt.compiled.cfg.stale_after_s, False)
                    log.warning("pack %s: no frames for %.1f s: offline", st.pack_id,
                                rt.compiled.cfg.stale_after_s)
                elif not st.online and not stale:
                    st.online = True
                    out.append(rt.publisher.availability(True))
                    eng.comm(ts, True)
                    if not rt.last_faults:  # replace a previous run's retained list at once
                        rt.last_faults = dumps(eng.active())
                        out.append(Publication(rt.publisher.t_faults, rt.last_faults))
                    log.info("pack %s: frames arriving: online", st.pack_id)
            if st.changed or st.cells_changed:
                for name, reason in cross_check(st):
                    rt.compiled.implausible[FIELD_INDEX[name]] += 1
                    rt.impl_reason = reason
            rt.publisher.tick(ts, out, force=force)
            if st.online:
                eng.evaluate(ts, st)
            pc = rt.compiled.counters
            if pc.frames != rt.frames_reported:
                rt.frames_reported = pc.frames
                eng.decode_errors(ts, pc.short_frames + pc.bad_checksum + pc.bad_counter,
                                  pc.frames)
            counts = rt.compiled.implausible
            total_impl = sum(counts)
            if total_impl != rt.impl_reported:
                rt.impl_reported = total_impl
                eng.implausible(ts, rt.compiled.implausible_counts(), rt.impl_reason)
            self._collect(rt)

    def _collect(self, rt: PackRuntime) -> None:
        eng = rt.faults
        if not eng.events:
            return
        for ev in eng.events:
            self.out.append((ev, rt.events_topic))
            log.log(logging.WARNING if ev.state == "raised" else logging.INFO,
                    "pack %s: %s %s (%s): %s", ev.pack_id, ev.code, ev.state, ev.severity,
                    ev.message)
        eng.events.clear()
        payload = dumps(eng.active())
        if payload != rt.last_faults:
            rt.last_faults = payload
            self.out.append(Publication(rt.publisher.t_faults, payload))

    def bus_state(self, bus: int, condition: str, active: bool, detail: str, ts: float) -> None:
        """A bus-level condition (can_bus_lost...) concerns every pack on that bus."""
        name = self.bus_names[bus]
        for rt in self.packs:
            if rt.compiled.cfg.bus == name:
                rt.faults.bus_problem(ts, condition, active, detail)
                self._collect(rt)

    def finish(self, ts: float | None = None) -> None:
        """End of a replay: publish whatever changed since the last publication."""
        t = self.clock if ts is None else ts
        if t == float("-inf"):
            return
        if self.learners:
            self._learned(None)
        self.tick(t, force=True)

    def offline(self) -> list[Publication]:
        """The gateway stops: every pack's availability goes offline."""
        for rt in self.packs:
            rt.compiled.state.online = False
        return [rt.publisher.availability(False) for rt in self.packs]

    def drain_ordered(self) -> list[Output]:
        out, self.out = self.out, []
        return out

    def drain(self) -> tuple[list[Publication], list[tuple[FaultEvent, str]]]:
        """Snapshots and events separately (each list in order)."""
        out = self.drain_ordered()
        return ([x for x in out if isinstance(x, Publication)],
                [x for x in out if not isinstance(x, Publication)])

    def short_frames(self) -> int:
        return sum(rt.compiled.counters.short_frames for rt in self.packs)
