"""Learning a pack's cell count before anyone is told about it.

Without `cell_count` in the config, the number of cells is whatever the BMS has sent
so far: with cells in multiplexed groups of four, 4 after the first frame, then 8,
12, 16. Publishing that would show a 4-cell pack first and make Home Assistant create
its cell entities in steps. So the count is *known* only after a complete cycle of the
pack's cell sources; until then `cells` is not published and the state's cell fields
are null.

A source (one profile entry under `cells:`) has completed a cycle when:
- it carries all its cells in every frame (no mux, no index signal): its first frame;
- otherwise a frame repeats a group (mux or index value) seen before, or every group
  its DBC defines for these cells has been seen.
A source that never completes (a message the profile lists but this pack does not
send) holds the count back for at most the pack's `stale_after_s` of frame time.

The learner listens beside the pack's handlers (after them, on the same frame keys) and
the pipeline removes it once the count is known: after that it costs nothing per frame.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

from cantools.database import Database, Message

from gateway.config import CellSource, PackConfig
from gateway.decode.dbc import message_key, mux_signal
from gateway.model import PackState

Handler = Callable[[float, bytes], None]


@dataclass(slots=True)
class _Source:
    msg: Message
    group_signal: str | None  # mux or index signal; None: every frame has all cells
    groups: frozenset[int]  # the mux groups the DBC defines for these cells (may be empty)
    seen: set[int] = field(default_factory=set)
    done: bool = False

    def frame(self, data: bytes) -> None:
        if self.group_signal is None:
            self.done = True
            return
        try:
            values = self.msg.decode_simple(data, decode_choices=False, scaling=False,
                                            allow_truncated=True)
        except Exception:  # a short or garbled frame tells nothing; the handler counts it
            return
        g = values.get(self.group_signal)
        if not isinstance(g, int):
            return
        self.done = g in self.seen or (self.groups <= self.seen | {g} if self.groups else False)
        self.seen.add(g)


def _selected(spec: tuple[str, ...] | str, name: str) -> bool:
    if isinstance(spec, str):
        return fnmatch.fnmatchcase(name, spec)
    return name in spec


class CellLearner:
    def __init__(self, state: PackState, sources: dict[int, list[_Source]],
                 timeout_s: float) -> None:
        self.state = state
        self.sources = sources
        self.timeout_s = timeout_s
        self.first_ts: float | None = None
        state.cells_known = False

    @property
    def done(self) -> bool:
        return self.state.cells_known

    def handlers(self) -> dict[int, Handler]:
        return {key: self._handler(srcs) for key, srcs in self.sources.items()}

    def _handler(self, srcs: list[_Source]) -> Handler:
        def learn(ts: float, data: bytes) -> None:
            if self.state.cells_known:
                return
            if self.first_ts is None:
                self.first_ts = ts
            for s in srcs:
                if not s.done:
                    s.frame(data)
            if all(s.done for ss in self.sources.values() for s in ss):
                self.finish()
        return learn

    def tick(self, ts: float) -> None:
        """A source that never completes does not hold the count back for ever."""
        if self.first_ts is not None and ts - self.first_ts >= self.timeout_s:
            self.finish()

    def finish(self) -> None:
        self.state.cells_known = True
        self.state.cells_changed = self.state.changed = True


def cell_learner(pc: PackConfig, state: PackState, dbs: list[Database]) -> CellLearner | None:
    """None when there is nothing to learn: `cell_count` is set, or no frame carries cells."""
    if pc.cell_count:
        return None
    by_key: dict[int, list[_Source]] = {}
    for srcs in pc.profile.cells.values():
        for src in srcs:
            s = _source(src, dbs)
            if s is not None:
                by_key.setdefault(message_key(s.msg) + pc.id_offset, []).append(s)
    if not by_key:
        return None
    return CellLearner(state, by_key, pc.stale_after_s)


def _source(src: CellSource, dbs: list[Database]) -> _Source | None:
    for db in dbs:
        try:
            msg = db.get_message_by_name(src.message)
        except KeyError:
            continue
        muxer = mux_signal(msg)
        if src.mux and muxer is not None:
            groups = frozenset(i for s in msg.signals if s.multiplexer_ids
                               and _selected(src.signals, s.name) for i in s.multiplexer_ids)
            return _Source(msg, muxer.name, groups)
        return _Source(msg, src.index_signal, frozenset())
    return None  # compile_pack has reported the missing message


__all__ = ["CellLearner", "cell_learner"]
