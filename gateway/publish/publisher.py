"""Publish stage: the publishing policy, what is due and when, in frame time.

Per pack and topic: publish on a change beyond the field's deadband, at most once per
`min_interval_s`, at least once per `max_interval_s`, all in frame time, so replaying a
log gives byte-identical payloads at any speed. Where it goes is a sink's business
(gateway/publish/sink.py).
"""

from __future__ import annotations

import json

from gateway.config import PackConfig
from gateway.model import FIELDS, Output, PackState, Publication, Value, clean


def dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class Topics:
    def __init__(self, prefix: str, gateway_id: str) -> None:
        self.prefix = prefix.rstrip("/")
        self.gateway_id = gateway_id

    def pack(self, pack_id: str, leaf: str) -> str:
        return f"{self.prefix}/{pack_id}/{leaf}"

    def gateway(self, leaf: str) -> str:
        return f"{self.prefix}/gateway/{self.gateway_id}/{leaf}"


class PackPublisher:
    """Decides, at frame-time ticks, which of one pack's snapshots are due."""

    def __init__(self, cfg: PackConfig, state: PackState, topics: Topics) -> None:
        self.state = state
        self.reconfigure(cfg, topics)
        self.last_state: list[Value] | None = None
        self.last_extras: dict[str, Value] = {}
        self.last_state_ts = float("-inf")
        self.last_cells: list[float | None] | None = None
        self.last_cells_other: tuple[object, ...] = ()
        self.last_cells_ts = float("-inf")
        self.state_count = 0
        self.cells_count = 0

    def reconfigure(self, cfg: PackConfig, topics: Topics) -> None:
        """The policy from `cfg`; what was last published (and when) is kept, so a reload
        does not publish again what has not changed."""
        self.cfg = cfg
        pol = cfg.publish
        self.state_pol = pol.state
        self.cells_pol = pol.cells
        self.deadbands = [pol.deadband.get(f.name, f.deadband) for f in FIELDS]
        self.cell_db = pol.cell_deadband_v
        self.per_value = pol.per_value_topics
        self.t_state = topics.pack(cfg.id, "state")
        self.t_cells = topics.pack(cfg.id, "cells")
        self.t_avail = topics.pack(cfg.id, "availability")
        self.t_faults = topics.pack(cfg.id, "faults")
        self.topics = topics

    def _state_moved(self) -> bool:
        last = self.last_state
        if last is None or self.state.extras != self.last_extras:
            return True
        for new, old, db in zip(self.state.values, last, self.deadbands, strict=True):
            if new is old or new == old:
                continue
            if (type(new) in (int, float) and type(old) in (int, float)
                    and abs(new - old) <= db):  # type: ignore[operator]
                continue
            return True
        return False

    def _cells_moved(self) -> bool:
        st = self.state
        last = self.last_cells
        if last is None or len(last) != len(st.cell_v):
            return True
        if (tuple(st.cell_t), tuple(st.balancing)) != self.last_cells_other:
            return True
        db = self.cell_db
        for new, old in zip(st.cell_v, last, strict=True):
            if new is old:
                continue
            if new is None or old is None or abs(new - old) > db:
                return True
        return False

    def tick(self, ts: float, out: list[Output], force: bool = False) -> None:
        st = self.state
        if st.last_seen is None:
            return
        sp = self.state_pol
        age = ts - self.last_state_ts
        if (st.changed and (age >= sp.min_interval_s or force)) or age >= sp.max_interval_s:
            st.derive()
            if age >= sp.max_interval_s or (self._state_moved() if not force else
                                             self.last_state != st.values
                                             or self.last_extras != st.extras):
                self._emit_state(ts, out)
            st.changed = False
        cp = self.cells_pol
        if (not st.cell_v and not st.cell_t) or not st.cells_known:
            return
        age = ts - self.last_cells_ts
        if (st.cells_changed and (age >= cp.min_interval_s or force)) \
                or age >= cp.max_interval_s:
            if age >= cp.max_interval_s or force or self._cells_moved():
                out.append(Publication(self.t_cells, dumps(st.cells_snapshot())))
                self.last_cells = list(st.cell_v)
                self.last_cells_other = (tuple(st.cell_t), tuple(st.balancing))
                self.last_cells_ts = ts
                self.cells_count += 1
            st.cells_changed = False

    def _emit_state(self, ts: float, out: list[Output]) -> None:
        st = self.state
        snap = st.snapshot()
        out.append(Publication(self.t_state, dumps(snap)))
        if self.per_value:
            last = self.last_state
            for i, f in enumerate(FIELDS):
                v = st.values[i]
                if last is None or last[i] != v:
                    out.append(Publication(self.topics.pack(self.cfg.id, f.name),
                                           _plain(clean(v))))
        self.last_state = list(st.values)
        self.last_extras = dict(st.extras)
        self.last_state_ts = ts
        self.state_count += 1

    def availability(self, online: bool) -> Publication:
        return Publication(self.t_avail, b"online" if online else b"offline")


def _plain(v: Value) -> bytes:
    if v is None:
        return b""
    if isinstance(v, bool):
        return b"true" if v else b"false"
    return str(v).encode()
