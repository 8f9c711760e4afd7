"""The synchronous core: frames in, publications and fault events out.

Everything here runs in frame time and does no I/O, so the same frames always give
the same output; the daemon (live bus or log) feeds it batches and ships what it
produces. Per frame the cost is one dict lookup and the pack's compiled handler;
publishing policy, fault rules and staleness run on a frame-time tick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from gateway.config import CellKind, GatewayConfig, PackConfig, Problem
from gateway.decode.dbc import DbcError, where_failed
from gateway.faults.engine import FaultEngine
from gateway.faults.plausibility import cross_check
from gateway.model import FIELD_INDEX, FaultEvent, Output, Publication
from gateway.normalize.cellcount import CellLearner, cell_learner
from gateway.normalize.compiler import DbcCache, LivePack, compile_pack, prime_state
from gateway.publish.publisher import PackPublisher, Topics, dumps
from gateway.source.logs import Frame

log = logging.getLogger("gateway.pipeline")

Handler = Callable[[float, bytes], None]  # (frame time, data): one frame of one id

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
class Pack:
    """One pack's lasting state: it outlives a reload that keeps the pack's identity
    (id, profile, bus); the reload only swaps `live` (the compiled pack) and the settings."""

    live: LivePack
    publisher: PackPublisher
    faults: FaultEngine
    events_topic: str
    last_faults: bytes = b""
    frames_reported: int = 0
    impl_reported: int = 0
    impl_reason: str = ""  # the latest cross-signal check that dropped a value
    # Before a pack's first frame, its silence counts from here: the first tick after
    # the pack was configured (see Pipeline._tick).
    watch_from: float | None = None
    silent: bool = False  # went offline without ever sending a frame

    @property
    def identity(self) -> tuple[str, object, str]:
        return pack_identity(self.live.cfg)


def pack_identity(pc: PackConfig) -> tuple[str, object, str]:
    """What makes a reloaded pack the same pack: its id, its profile (file and parsed
    content) and its bus. Anything else may change and the pack keeps its state."""
    return (pc.id, pc.profile, pc.bus)


@dataclass(slots=True)
class Prepared:
    """A config compiled against the running pipeline, ready for `Pipeline.apply`.

    Building it (`Pipeline.prepare`) is the slow part and writes nothing the running
    pipeline uses, so it may run in a worker thread while frames keep flowing."""

    cfg: GatewayConfig
    packs: list[tuple[PackConfig, LivePack, Pack | None]]
    learners: dict[str, CellLearner]  # by pack id: packs whose cell count is to be learned
    cache: DbcCache  # the DBCs it was compiled against, for whoever taps the pipeline


def _fanout(handlers: list[Handler]) -> Handler:
    def fan(ts: float, data: bytes) -> None:
        for h in handlers:
            h(ts, data)
    return fan


def _check_polling(pc: PackConfig, cache: DbcCache, problems: list[Problem]) -> None:
    """Poll requests and ISO-TP blocks are checked with the rest, so check-config sees
    them (the poller itself only runs in the live daemon)."""
    from gateway.source.poll import request_frame

    for req in pc.profile.poll:
        try:
            request_frame(pc, req, cache, pc.profile.poll_id_offset_shift)
        except (ValueError, DbcError) as e:
            problems.append(Problem(str(pc.profile.path), req.key, str(e)))


class Pipeline:
    def __init__(self, cfg: GatewayConfig, *, cache: DbcCache | None = None) -> None:
        """Compile every pack; raise ConfigError listing every problem found."""
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.gateway_id)
        self.packs: list[Pack] = []
        # cell-count learners listen only until the count is known (gateway/normalize/cellcount.py)
        self.learners: list[tuple[CellLearner, int]] = []
        # Per bus, frame key -> what runs: composed (_set_entries) from the packs'
        # handlers, the taps and the cell-count learners. Private: others go through
        # tap() and routes().
        self._handler_lists: list[dict[int, list[Handler]]] = []
        self._taps: list[dict[int, list[Handler]]] = []
        self._tables: list[dict[int, Handler]] = []
        self._by_id: dict[str, Pack] = {}
        self.cache = DbcCache()
        self.bus_names: list[str] = []
        self.bus_lookup: dict[str, int] = {}
        self.counters: list[BusCounters] = []
        # Snapshots and fault events in the order they happened in frame time.
        self.out: list[Output] = []
        self.clock = float("-inf")
        self.next_tick = float("-inf")
        self.first_ts: float | None = None
        self.apply(self.prepare(cfg, cache=cache), float("-inf"))

    # ----------------------------------------------------------- (re)configuration

    def prepare(self, cfg: GatewayConfig, *, cache: DbcCache | None = None) -> Prepared:
        """Compile `cfg`'s packs; raise ConfigError listing every problem found.

        A pack with the identity of a running one gets handlers bound to that pack's
        state. Only reads the running pipeline: safe in a worker thread."""
        from gateway.config import ConfigError

        problems: list[Problem] = []
        cache = cache or DbcCache()
        running = {pack.live.cfg.id: pack for pack in self.packs}
        out: list[tuple[PackConfig, LivePack, Pack | None]] = []
        learners: dict[str, CellLearner] = {}
        for pc in cfg.packs:
            old = running.get(pc.id)
            if old is not None and old.identity != pack_identity(pc):
                old = None  # a new profile or bus: a new pack under the same id
            compiled = compile_pack(pc, cache, problems,
                                    keep=old.live if old is not None else None)
            _check_polling(pc, cache, problems)
            if compiled is None:
                continue
            out.append((pc, compiled, old))
            learner = cell_learner(pc, compiled.state,
                                   [cache.get(str(d)) for d in pc.profile.dbc])
            if learner is not None:
                learners[pc.id] = learner
        if problems:
            raise ConfigError(problems)
        return Prepared(cfg, out, learners, cache)

    def apply(self, prep: Prepared, ts: float) -> None:
        """Switch to a prepared config (on the thread that feeds frames; quick).

        Kept packs keep their state, faults and publishing memory; a removed (or
        replaced) pack's active faults are cleared at `ts` and it goes offline. Bus
        counters are kept by bus name. Topics stay those of the start-up config (a
        changed `mqtt:` takes effect at the next start)."""
        cfg = prep.cfg
        packs: list[Pack] = []
        kept: set[int] = set()
        for pc, compiled, old in prep.packs:
            if old is not None:
                kept.add(id(old))
                prime_state(compiled)
                old.live = compiled
                old.publisher.reconfigure(pc, self.topics)
                old.faults.reconfigure(ts, pc.rules, pc.profile.faults, pc.stale_after_s)
                compiled.fault_hook[0] = old.faults.bms_flag
                old.faults.set_dtc_streams(compiled.dtc_streams)
                compiled.dtc_hook[0] = old.faults.dtc
                self._collect(old)  # faults of a rule now switched off: cleared
                packs.append(old)
                continue
            engine = FaultEngine(pc.id, pc.rules, pc.profile.faults, pc.stale_after_s)
            compiled.fault_hook[0] = engine.bms_flag
            engine.set_dtc_streams(compiled.dtc_streams)
            compiled.dtc_hook[0] = engine.dtc
            packs.append(Pack(compiled, PackPublisher(pc, compiled.state, self.topics),
                                     engine, self.topics.pack(pc.id, "events")))
        for pack in self.packs:
            if id(pack) in kept:
                continue
            pack.faults.clear_all(ts)
            self._collect(pack)
            pack.live.state.online = False
            self.out.append(pack.publisher.availability(False))
            log.info("pack %s: removed by the reload: offline", pack.live.state.pack_id)
        bus_index = {b.name: i for i, b in enumerate(cfg.buses)}
        tables: list[dict[int, list[Handler]]] = [{} for _ in cfg.buses]
        for pack in packs:
            table = tables[bus_index.get(pack.live.cfg.bus, 0)]
            for key, h in pack.live.handlers.items():
                table.setdefault(key, []).append(h)
        # a kept pack still learning its cell count goes on with what it has learned
        learning = {id(lr.state): lr for lr, _ in self.learners}
        self.learners = []
        for pack in packs:
            learner = prep.learners.get(pack.live.cfg.id)
            if learner is not None:
                learner = learning.get(id(pack.live.state), learner)
                self.learners.append((learner, bus_index.get(pack.live.cfg.bus, 0)))
        counters = dict(zip(self.bus_names, self.counters, strict=True))
        self.cfg = cfg
        self.packs = packs
        self.cache = prep.cache
        self._by_id = {pack.live.cfg.id: pack for pack in packs}
        self._handler_lists = tables
        self._taps = [{} for _ in cfg.buses]  # the tappers tap the new config again
        self._build_tables()
        self.bus_names = [b.name for b in cfg.buses]
        self.bus_lookup = {}
        for i, b in enumerate(cfg.buses):
            self.bus_lookup[b.name] = i
            self.bus_lookup[b.channel] = i
        self.counters = [counters.get(b.name) or BusCounters() for b in cfg.buses]

    def _build_tables(self) -> None:
        self._tables = [{} for _ in self._handler_lists]
        self._set_entries({(b, k) for b, t in enumerate(self._handler_lists) for k in t}
                          | {(b, k) for lr, b in self.learners for k in lr.sources})

    def _set_entries(self, keys: set[tuple[int, int]]) -> None:
        """(Re)compose these (bus, key) table entries: the taps, the packs' handlers,
        then the cell-count learners still listening."""
        learning: dict[tuple[int, int], list[Handler]] = {}
        for learner, bus in self.learners:
            for key, h in learner.handlers().items():
                learning.setdefault((bus, key), []).append(h)
        for bus, key in keys:
            hs = [*self._taps[bus].get(key, []), *self._handler_lists[bus].get(key, []),
                  *learning.get((bus, key), [])]
            if hs:
                self._tables[bus][key] = hs[0] if len(hs) == 1 else _fanout(hs)
            else:
                self._tables[bus].pop(key, None)

    def _learned(self, ts: float | None) -> None:
        """Time out cell-count learners (None: the log ended) and drop finished ones."""
        for learner, _ in self.learners:
            if ts is None:
                learner.finish()
            else:
                learner.tick(ts)
        done = {(b, k) for lr, b in self.learners if lr.done for k in lr.sources}
        if done:
            self.learners = [(lr, b) for lr, b in self.learners if not lr.done]
            self._set_entries(done)

    # ----------------------------------------------------------- taps and writers
    # For sources that are not a stream of broadcast frames (gateway/source/poll.py):
    # they listen to frames of the buses and write what they learn into a pack.

    def tap(self, bus: int, key: int, fn: Handler) -> None:
        """Also run `fn` for every frame with this key on bus number `bus`, before the
        packs' own handlers. The id then counts as read (not unknown; a SocketCAN bus
        receives it). Taps last until the next `apply`: whoever tapped the old config
        taps the new one (the daemon starts a new poller)."""
        self._taps[bus].setdefault(key, []).append(fn)
        self._set_entries({(bus, key)})

    def tapped(self, bus: int) -> Collection[int]:
        """The frame keys of bus number `bus` something taps (`tap`): every frame of
        them counts, not only frames whose bits a pack reads changed (receive: bcm)."""
        return self._taps[bus].keys()

    def routes(self, bus: int) -> Mapping[int, Handler]:
        """What runs for each frame key of bus number `bus` (read-only): its keys are the
        ids the pipeline reads on that bus."""
        return self._tables[bus]

    def write_cells(self, pack_id: str, kind: CellKind, first: int,
                    values: Sequence[float | None], ts: float) -> None:
        """Write cells `first`, `first + 1`, ... (0-based) of a pack, read at frame time
        `ts` by something other than the pack's compiled handlers (an ISO-TP answer);
        None is a value the source does not carry (the cell is null, not counted).

        The writer is generated from the rules and the emitter of the handlers' own cell
        code (normalize/cellwriter.py): a value outside the kind's valid range is counted
        implausible and stored as None; with a configured `cell_count`, voltages past it
        are not cells; a change marks the cells and the state changed."""
        pack = self._by_id.get(pack_id)
        if pack is None:
            msg = f"write_cells: no pack {pack_id!r} in the running config"
            raise KeyError(msg)
        pack.live.cell_writer(kind)(ts, first, values)

    # ----------------------------------------------------------- hot path

    def feed(self, frames: list[Frame], bus: int = 0) -> None:
        """Process a batch of frames from one bus (the hot path)."""
        get = self._tables[bus].get
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
        if len(self._tables) == 1:
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
                if not 0 <= idx < len(self._tables):
                    idx = 0
            groups.setdefault(idx, []).append(f)
        for idx, fs in groups.items():
            self.feed(fs, idx)

    # ----------------------------------------------------------- frame-time tick

    def tick(self, ts: float, *, force: bool = False) -> None:
        # After a silent gap, first run the tick at the moment a pack went stale, so its
        # `offline` is published at that frame time and not together with the `online`.
        for pack in self.packs:
            st = pack.live.state
            if st.online and st.last_seen is not None:
                deadline = st.last_seen + pack.live.cfg.stale_after_s + 1e-6
            elif st.last_seen is None and pack.watch_from is not None and not pack.silent:
                deadline = pack.watch_from + pack.live.cfg.stale_after_s + 1e-6
            else:
                continue
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
        for pack in self.packs:
            st = pack.live.state
            eng = pack.faults
            if st.last_seen is None:
                # Never a frame from this pack. Its silence counts from the first tick
                # after it was configured: the first frame of any bus in a replay, the
                # daemon's start (or the reload that added it) live, where the ticker
                # runs on the wall clock.
                stale_s = pack.live.cfg.stale_after_s
                if pack.watch_from is None:
                    pack.watch_from = ts
                elif not pack.silent and ts - pack.watch_from > stale_s:
                    pack.silent = True
                    st.online = False
                    out.append(pack.publisher.availability(False))
                    eng.comm(pack.watch_from + stale_s, False)
                    log.warning("pack %s: not a single frame in %.1f s: offline", st.pack_id,
                                stale_s)
            else:
                stale = ts - st.last_seen > pack.live.cfg.stale_after_s
                pack.silent = False
                if st.online and stale:
                    st.online = False
                    out.append(pack.publisher.availability(False))
                    eng.comm(st.last_seen + pack.live.cfg.stale_after_s, False)
                    log.warning("pack %s: no frames for %.1f s: offline", st.pack_id,
                                pack.live.cfg.stale_after_s)
                elif not st.online and not stale:
                    st.online = True
                    out.append(pack.publisher.availability(True))
                    eng.comm(ts, True)
                    if not pack.last_faults:  # replace a previous run's retained list at once
                        pack.last_faults = dumps(eng.active())
                        out.append(Publication(pack.publisher.t_faults, pack.last_faults))
                    log.info("pack %s: frames arriving: online", st.pack_id)
            if st.changed or st.cells_changed:
                for name, reason in cross_check(st):
                    pack.live.implausible[FIELD_INDEX[name]] += 1
                    pack.impl_reason = reason
            pack.publisher.tick(ts, out, force=force)
            if st.online:
                eng.evaluate(ts, st)
            pc = pack.live.counters
            if pc.frames != pack.frames_reported:
                pack.frames_reported = pc.frames
                eng.decode_errors(ts, pc.short_frames + pc.bad_checksum + pc.bad_counter,
                                  pc.frames)
            counts = pack.live.implausible
            total_impl = sum(counts)
            if total_impl != pack.impl_reported:
                pack.impl_reported = total_impl
                eng.implausible(ts, pack.live.implausible_counts(), pack.impl_reason)
            self._collect(pack)

    def _collect(self, pack: Pack) -> None:
        eng = pack.faults
        if not eng.events:
            return
        for ev in eng.events:
            self.out.append((ev, pack.events_topic))
            log.log(logging.WARNING if ev.state == "raised" else logging.INFO,
                    "pack %s: %s %s (%s): %s", ev.pack_id, ev.code, ev.state, ev.severity,
                    ev.message)
        eng.events.clear()
        payload = dumps(eng.active())
        if payload != pack.last_faults:
            pack.last_faults = payload
            self.out.append(Publication(pack.publisher.t_faults, payload))

    def bus_state(self, bus: int, condition: str, active: bool, detail: str, ts: float) -> None:
        """A bus-level condition (can_bus_lost...) concerns every pack on that bus."""
        name = self.bus_names[bus]
        for pack in self.packs:
            if pack.live.cfg.bus == name:
                pack.faults.bus_problem(ts, condition, active, detail)
                self._collect(pack)

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
        for pack in self.packs:
            pack.live.state.online = False
        return [pack.publisher.availability(False) for pack in self.packs]

    def take(self) -> list[Output]:
        """Hand over what was produced since the last call, in frame-time order."""
        out, self.out = self.out, []
        return out

    def take_split(self) -> tuple[list[Publication], list[tuple[FaultEvent, str]]]:
        """`take()` as snapshots and events separately (each list in order)."""
        out = self.take()
        return ([x for x in out if isinstance(x, Publication)],
                [x for x in out if not isinstance(x, Publication)])

    def short_frames(self) -> int:
        return sum(pack.live.counters.short_frames for pack in self.packs)
