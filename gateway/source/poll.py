"""Polling: periodic request frames and a small ISO-TP client, for BMSes that must be asked.

Two kinds of request come from a profile:

- `poll:` entries (config.PollRequest): one frame, a DBC message or a raw id/data,
  every `period_s`. With `reply:` the reply message is watched, so each request is
  matched to its answer and unanswered requests are counted.
- ISO-TP requests (`isotp:`): a single-frame request, then the response reassembled
  from a First Frame and Consecutive Frames, with our Flow Control in between, the
  sequence numbers checked and a timeout. The payload goes to a decoder the profile
  describes (today: a run of fixed-width cell values at a byte offset).

Nothing is written to a bus unless the pack has `transmit: true`. Without it the
ISO-TP client still listens: if another tool asks the BMS, we reassemble the answer
without sending anything. A BMS that stops answering simply stops producing frames,
so the pipeline's normal `stale_after_s` handling marks it offline.

Frames reach this module through the pipeline's taps (`Pipeline.tap`), so the hot path
is unchanged for every other identifier, and ISO-TP cells go into the pack through
`Pipeline.write_cells`, by the same rules as the cells the profile's handlers write.

gateway/config/polling.py parses the profile's `poll`, `isotp` and `poll_id_offset_shift`
keys into `PollRequest`s and `IsoTpRequest`s; this module only runs them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gateway.config import (
    CellBlock,
    CellKind,
    GatewayConfig,
    IsoTpRequest,
    PackConfig,
    PollRequest,
    Problem,
    nearest,
)
from gateway.decode.dbc import EXTENDED_FLAG, frame_key
from gateway.normalize.compiler import DbcCache

log = logging.getLogger("gateway.poll")

SendFn = Callable[[int, int, bytes, bool], bool]  # (bus index, arbitration id, data, extended)
Handler = Callable[[float, bytes], None]


def request_frame(pc: PackConfig, req: PollRequest, cache: DbcCache,
                  shift: int = 0) -> tuple[int, bool, bytes]:
    """(arbitration id, extended, data) of one `poll:` entry for this pack.

    The pack's id_offset is shifted by the profile's `poll_id_offset_shift`: a BMS address
    sits in a different byte of request and reply IDs (Daly: 0x18<cmd><bms>40 vs
    0x18<cmd>40<bms>)."""
    offset = pc.id_offset << shift
    if req.can_id is not None:
        return req.can_id + offset, req.extended or req.can_id > 0x7FF, req.data or bytes(8)
    for d in pc.profile.dbc:
        db = cache.get(str(d))
        try:
            msg = db.get_message_by_name(req.message or "")
        except KeyError:
            continue
        return msg.frame_id + offset, bool(msg.is_extended_frame), req.data or bytes(msg.length)
    names = [m.name for d in pc.profile.dbc for m in cache.get(str(d)).messages]
    hint = nearest(req.message or "", names)
    text = f"poll message {req.message!r} is not in the profile's DBCs" + (
        f"; {hint}" if hint else "")
    raise ValueError(text)


def reply_key(pc: PackConfig, req: PollRequest, cache: DbcCache) -> int | None:
    """Frame key of the reply message (with the pack's id_offset), if the entry names one."""
    if req.reply is None:
        return None
    for d in pc.profile.dbc:
        try:
            msg = cache.get(str(d)).get_message_by_name(req.reply)
        except KeyError:
            continue
        return frame_key(msg.frame_id, bool(msg.is_extended_frame)) + pc.id_offset
    return None


def decode_cells(block: CellBlock, payload: bytes) -> list[float | None]:
    """The block's cells from a reassembled payload; None where the payload is too short."""
    out: list[float | None] = []
    order: Literal["big", "little"] = "big" if block.big_endian else "little"
    for i in range(block.count):
        a = block.offset + i * block.width
        chunk = payload[a:a + block.width]
        if len(chunk) < block.width:
            out.append(None)
            continue
        out.append(int.from_bytes(chunk, order, signed=block.signed) * block.scale)
    return out


# ---------------------------------------------------------------- ISO-TP client


@dataclass(slots=True)
class IsoTpStats:
    requests: int = 0
    responses: int = 0
    timeouts: int = 0
    sequence_errors: int = 0
    negative: int = 0  # UDS negative responses (0x7F)
    passive: int = 0  # responses to someone else's request, reassembled without sending


class IsoTpClient:
    """One request/response pair on one bus: a minimal ISO 15765-2 receiver.

    `send` is None when the pack may not transmit: the client then only listens.
    """

    def __init__(self, req: IsoTpRequest, send: Callable[[int, bytes, bool], bool] | None,
                 deliver: Callable[[float, bytes], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.req = req
        self.send = send
        self.deliver = deliver
        self.clock = clock
        self.stats = IsoTpStats()
        # the positive response starts with the service id + 0x40 and the request's data
        self.expect = bytes([req.request[1] + 0x40]) + req.request[2:]
        self.buf = bytearray()
        self.length = 0
        self.next_sn = 0
        self.in_block = 0
        self.receiving = False
        self.deadline = 0.0
        self.waiting = False  # a request of ours is outstanding
        self.next_due = 0.0

    def _pad(self, data: bytes) -> bytes:
        return data + bytes([self.req.padding]) * (8 - len(data))

    def _flow_control(self) -> None:
        if self.send is not None:
            self.send(self.req.request_id,
                      self._pad(bytes([0x30, self.req.block_size, self.req.st_min])),
                      self.req.extended)

    def poll(self, now: float) -> float:
        """Send the request when due; expire a stalled exchange. Returns the next wake-up."""
        if (self.waiting or self.receiving) and now >= self.deadline:
            self.stats.timeouts += 1
            if self.stats.timeouts in (1, 10, 100) or self.stats.timeouts % 1000 == 0:
                log.warning("ISO-TP %s: no complete answer on %#x within %.1f s (%d so far)",
                            self.req.key, self.req.response_id, self.req.timeout_s,
                            self.stats.timeouts)
            self._reset()
        if self.send is not None and now >= self.next_due and not self.receiving:
            self.next_due = now + self.req.period_s
            if self.send(self.req.request_id, self._pad(self.req.request), self.req.extended):
                self.stats.requests += 1
                self.waiting = True
                self.deadline = now + self.req.timeout_s
        wake = self.next_due if self.send is not None else now + 1.0
        if self.waiting or self.receiving:
            wake = min(wake, self.deadline)
        return wake

    def _reset(self) -> None:
        self.receiving = False
        self.waiting = False
        self.buf.clear()

    def on_frame(self, ts: float, data: bytes) -> None:
        if not data:
            return
        pci = data[0] >> 4
        now = self.clock()
        if pci == 0:  # single frame
            n = data[0] & 0x0F
            self._complete(ts, bytes(data[1:1 + n]))
        elif pci == 1:  # first frame
            if len(data) < 8:
                return
            length = ((data[0] & 0x0F) << 8) | data[1]
            if not bytes(data[2:8]).startswith(self.expect[:6]):
                return  # an answer to a different request
            self.length = length
            self.buf = bytearray(data[2:8])
            self.next_sn = 1
            self.in_block = 0
            self.receiving = True
            self.deadline = now + self.req.timeout_s
            if not self.waiting:
                self.stats.passive += 1
            if self.waiting:  # only a request of ours gets our flow control
                self._flow_control()
        elif pci == 2 and self.receiving:  # consecutive frame
            sn = data[0] & 0x0F
            if sn != self.next_sn:
                self.stats.sequence_errors += 1
                log.debug("ISO-TP %s: sequence %d, expected %d: dropped", self.req.key, sn,
                          self.next_sn)
                self._reset()
                return
            self.next_sn = (sn + 1) & 0x0F
            self.buf += data[1:8]
            self.deadline = now + self.req.timeout_s
            if len(self.buf) >= self.length:
                payload = bytes(self.buf[:self.length])
                self._reset()
                self._deliver(ts, payload)
                return
            self.in_block += 1
            if self.req.block_size and self.in_block >= self.req.block_size and self.waiting:
                self.in_block = 0
                self._flow_control()
        # flow control frames (pci 3) on the response id are not for us

    def _complete(self, ts: float, payload: bytes) -> None:
        if payload[:1] == b"\x7f":
            self.stats.negative += 1
            self._reset()
            return
        if not payload.startswith(self.expect):
            return
        if not self.waiting:
            self.stats.passive += 1
        self._reset()
        self._deliver(ts, payload)

    def _deliver(self, ts: float, payload: bytes) -> None:
        self.stats.responses += 1
        self.deliver(ts, payload)


# ---------------------------------------------------------------- the poller


class PollPipeline(Protocol):
    """What the poller uses of the pipeline it feeds: gateway.runtime.pipeline.Pipeline
    (not imported: a source does not depend on the runtime that drives it)."""

    @property
    def cfg(self) -> GatewayConfig: ...

    @property
    def cache(self) -> DbcCache: ...

    def tap(self, bus: int, key: int, fn: Handler) -> None: ...

    def write_cells(self, pack_id: str, kind: CellKind, first: int,
                    values: Sequence[float | None], ts: float) -> None: ...


@dataclass(slots=True)
class PollJob:
    pack: str
    key: str
    bus: int
    can_id: int
    extended: bool
    data: bytes
    period_s: float
    reply: int | None
    next_due: float = 0.0
    sent: int = 0
    answered: int = 0
    unanswered: int = 0
    pending: bool = False


@dataclass(slots=True)
class Poller:
    """All requests of all packs of one gateway; `run()` is the daemon's poller task."""

    pipeline: PollPipeline
    send: SendFn
    clock: Callable[[], float] = time.monotonic
    jobs: list[PollJob] = field(default_factory=list)
    clients: list[tuple[str, int, IsoTpClient]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        cfg, cache, tap = self.pipeline.cfg, self.pipeline.cache, self.pipeline.tap
        buses = {b.name: i for i, b in enumerate(cfg.buses)}
        for pc in cfg.packs:
            bus = buses.get(pc.bus, 0)
            if pc.transmit:
                for req in pc.profile.poll:
                    try:
                        can_id, ext, data = request_frame(pc, req, cache,
                                                                 pc.profile.poll_id_offset_shift)
                    except ValueError as e:
                        self.problems.append(Problem(str(pc.profile.path), req.key, str(e)))
                        continue
                    job = PollJob(pc.id, req.key, bus, can_id, ext, data, req.period_s,
                                  reply_key(pc, req, cache))
                    self.jobs.append(job)
                    if job.reply is not None:
                        tap(bus, job.reply, self._answered(job))
            for ireq in pc.profile.isotp:
                send = self._sender(bus) if pc.transmit else None
                deliver = (self._cell_writer(pc.id, ireq.cells) if ireq.cells is not None
                           else (lambda ts, payload: None))
                client = IsoTpClient(ireq, send, deliver, self.clock)
                self.clients.append((pc.id, bus, client))
                key = frame_key(ireq.response_id, ireq.extended)
                tap(bus, key, client.on_frame)
        for p in self.problems:
            log.error("polling: %s", p)

    def _sender(self, bus: int) -> Callable[[int, bytes, bool], bool]:
        def send(can_id: int, data: bytes, ext: bool) -> bool:
            return self.send(bus, can_id, data, ext)
        return send

    @staticmethod
    def _answered(job: PollJob) -> Callable[[float, bytes], None]:
        def seen(ts: float, data: bytes) -> None:
            if job.pending:
                job.pending = False
                job.answered += 1
        return seen

    def _cell_writer(self, pack_id: str, block: CellBlock) -> Handler:
        """Deliver an ISO-TP answer's cells into the pack, through the pipeline."""
        write = self.pipeline.write_cells

        def deliver(ts: float, payload: bytes) -> None:
            write(pack_id, block.kind, block.first, decode_cells(block, payload), ts)
        return deliver

    @property
    def active(self) -> bool:
        return bool(self.jobs) or any(c.send is not None for _, _, c in self.clients)

    def step(self, now: float) -> float:
        """Send whatever is due at `now`; return when to look again."""
        wake = now + 1.0
        for job in self.jobs:
            if now >= job.next_due:
                job.next_due = now + job.period_s
                if job.pending:
                    job.unanswered += 1
                if self.send(job.bus, job.can_id, job.data, job.extended):
                    job.sent += 1
                    job.pending = job.reply is not None
            wake = min(wake, job.next_due)
        for _, _, client in self.clients:
            wake = min(wake, client.poll(now))
        return wake

    async def run(self, stop: asyncio.Event) -> None:
        if not self.active:
            return  # listen-only taps stay installed; nothing to send
        while not stop.is_set():
            wake = self.step(self.clock())
            await asyncio.sleep(max(0.005, min(wake - self.clock(), 0.5)))

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for j in self.jobs:
            out[f"{j.pack}:{j.key}"] = {"id": f"{j.can_id & ~EXTENDED_FLAG:#x}", "sent": j.sent,
                                        "answered": j.answered, "unanswered": j.unanswered}
        for pack, _, c in self.clients:
            s = c.stats
            out[f"{pack}:{c.req.key}"] = {
                "requests": s.requests, "responses": s.responses, "timeouts": s.timeouts,
                "sequence_errors": s.sequence_errors, "negative": s.negative,
                "passive": s.passive}
        return out


__all__ = ["IsoTpClient", "Poller", "decode_cells", "request_frame"]
