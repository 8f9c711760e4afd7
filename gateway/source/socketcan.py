"""The SocketCAN receive path: the AF_CAN socket read directly, without python-can.

python-can's socketcan receive costs about 46,000 instructions a frame (a `Message`,
an `enum.IntFlag` test and a `recvmsg` with its ancillary data for every frame); this
reads the same socket at about a tenth of that (bench/RESULTS.md, live mode):

- one wake-up drains up to `BATCH` frames with `recv_into` into one buffer; the only
  per-frame object is the tuple the pipeline takes (and the payload bytes);
- kernel timestamps without a `recvmsg` per frame: the first frame of a drain is read
  with `recvmsg` (its `SO_TIMESTAMPNS` time and the `SO_RXQ_OVFL` drop counter) and the
  frames drained with it carry that time (they arrived within one coalescing interval,
  a few ms; the pipeline's frame-time tick is 0.1 s);
- on a busy bus the event loop stops watching the socket for `COALESCE_S` after a
  wake-up and drains once when it ends, so 8,000 frames/s cost about 500 wake-ups, not
  8,000; a quiet bus is read the moment a frame arrives;
- the kernel drops frames no profile reads (`CAN_RAW_FILTER` from the pipeline's ids),
  and error frames are delivered (`CAN_RAW_ERR_FILTER`) so they are counted.

`LiveSource` (python-can) stays the path for every other interface and for
`receive: python-can`. `RawSource` keeps its reopen-with-backoff: after
`ip link set can0 down` or an unplugged adapter (ENETDOWN, ENODEV) it opens a new
socket, since a socket bound to a deleted interface never works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
import struct
import time
from collections.abc import Callable, Collection
from typing import Any

from gateway.config import CanBus
from gateway.decode.dbc import ReadBits
from gateway.source.logs import BATCH, COALESCE_S, BatchSink, Frame, LiveSource, StateSink

SO_TIMESTAMPNS = 35  # <asm-generic/socket.h>; not exported by Python's socket module
SO_RXQ_OVFL = 40  # ancillary uint32: frames the kernel dropped on this socket so far
SO_MEMINFO = 55  # u32[]: the first is the bytes queued for reading (sk_rmem_alloc)
CAN_RAW_ERR_FILTER = 2  # <linux/can/raw.h>; not exported by Python either
CAN_RAW_FILTER_MAX = 512

_ERR = socket.CAN_ERR_FLAG
_RTR = socket.CAN_RTR_FLAG
_EFF = socket.CAN_EFF_FLAG
_SPECIAL = _ERR | _RTR
_FRAME = struct.Struct("=IB3x8s")  # struct can_frame (classic); canfd_frame shares the head
_FD_FRAME = struct.Struct("=IB2x64s")
_TIMESPEC = struct.Struct("=qq")
_U32 = struct.Struct("=I")
_ANC = socket.CMSG_SPACE(16) + socket.CMSG_SPACE(4)


def can_filters(keys: Collection[int]) -> bytes:
    """`struct can_filter[]` letting exactly these frame keys through (decode.frame_key
    values: 29-bit ids carry CAN_EFF_FLAG, which is also the kernel's flag)."""
    out = bytearray()
    for key in sorted(keys):
        base = socket.CAN_EFF_MASK if key & _EFF else socket.CAN_SFF_MASK
        out += struct.pack("=II", key, _EFF | _RTR | base)
    return bytes(out)


class RawSocket:
    """One bound CAN_RAW socket. Raises OSError from the kernel unchanged."""

    def __init__(self, cfg: CanBus, keys: Collection[int] | None) -> None:
        self.channel = cfg.channel
        self.fd_frames = cfg.fd
        s = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
            s.setsockopt(socket.SOL_CAN_RAW, CAN_RAW_ERR_FILTER, socket.CAN_ERR_MASK)
            if cfg.fd:
                s.setsockopt(socket.SOL_CAN_RAW, socket.CAN_RAW_FD_FRAMES, 1)
            rcvbuf = cfg.options.get("rcvbuf")
            if isinstance(rcvbuf, int):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock = s
            self.set_filter(keys)
            s.bind((cfg.channel,))
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self.buf = bytearray(_FD_FRAME.size if cfg.fd else _FRAME.size)
        self.dropped = 0  # the kernel's SO_RXQ_OVFL count for this socket
        # bytes of receive buffer one queued frame takes (its skb's truesize): learned
        # from SO_MEMINFO around a read, so a drain knows how many frames are queued
        self.truesize = 0

    def set_filter(self, keys: Collection[int] | None) -> None:
        """Only these keys, or everything (None, or more ids than the kernel allows)."""
        if keys is None or len(keys) > CAN_RAW_FILTER_MAX:
            # one filter matching every id: the kernel default
            flt = struct.pack("=II", 0, 0)
        else:
            # no ids yet: a filter that matches nothing (an empty list would too, but
            # only error frames must wake us)
            flt = can_filters(keys) if keys else struct.pack("=II", _ERR, _ERR | _EFF)
        self.sock.setsockopt(socket.SOL_CAN_RAW, socket.CAN_RAW_FILTER, flt)

    def fileno(self) -> int:
        return self.sock.fileno()

    def shutdown(self) -> None:
        self.sock.close()

    def send_frame(self, can_id: int, data: bytes, extended: bool) -> None:
        self.sock.send(_FRAME.pack(can_id | _EFF if extended else can_id, len(data), data))

    def drain(self, out: list[Frame], name: str, stats: Any) -> int:
        """Read up to BATCH frames into `out`; return how many were read (also the ones
        not appended: error and remote frames). Raises OSError when the bus is gone."""
        sock = self.sock
        buf = self.buf
        try:
            # The first frame with its ancillary data: kernel time and drop counter.
            _n, anc, _flags, _addr = sock.recvmsg_into([buf], _ANC)
        except BlockingIOError:
            return 0
        t_first = 0.0
        for level, kind, value in anc:
            if level == socket.SOL_SOCKET:
                if kind == SO_TIMESTAMPNS:
                    sec, ns = _TIMESPEC.unpack_from(value)
                    t_first = sec + ns * 1e-9
                elif kind == SO_RXQ_OVFL and len(value) >= 4:
                    dropped = _U32.unpack_from(value)[0]
                    if dropped != self.dropped:
                        stats.overruns += (dropped - self.dropped) & 0xFFFFFFFF
                        self.dropped = dropped
        if not t_first:
            t_first = time.time()
        unpack = (_FD_FRAME if self.fd_frames else _FRAME).unpack_from
        append = out.append
        count = 1
        can_id, length, data = unpack(buf)
        if can_id & _SPECIAL:
            _count_special(can_id, stats)
        else:
            append((t_first, can_id, data if length == 8 else data[:length], name))
        # Read what is queued, never until the kernel says EAGAIN: its BlockingIOError
        # costs ~8,000 instructions (strerror and its locale decoding), more than a
        # frame's whole pipeline. SO_MEMINFO says how many bytes are queued; divided by
        # a frame's truesize, how many frames (asked again after them: more may have come).
        meminfo = sock.getsockopt
        queued = _U32.unpack(meminfo(socket.SOL_SOCKET, SO_MEMINFO, 4))[0]
        recv_into = sock.recv_into
        left = BATCH - 1
        try:
            while queued and left:
                size = self.truesize
                k = min(left, queued // size or 1) if size else 1
                left -= k
                for _ in range(k):
                    recv_into(buf)
                    count += 1
                    can_id, length, data = unpack(buf)
                    if can_id & _SPECIAL:
                        _count_special(can_id, stats)
                        continue
                    # The kernel time of the drain's first frame: the rest arrived after
                    # it, within one coalescing interval (a few ms; frame time ticks at
                    # 0.1 s). A recvmsg for each would cost more than all else per frame.
                    append((t_first, can_id, data if length == 8 else data[:length], name))
                was, queued = queued, _U32.unpack(meminfo(socket.SOL_SOCKET, SO_MEMINFO, 4))[0]
                if k == 1 and was > queued and (not size or was - queued < size):
                    self.truesize = was - queued  # one frame's, nothing having come since
        except BlockingIOError:  # more guessed than queued (frames of mixed sizes)
            pass
        return count


def _count_special(can_id: int, stats: Any) -> None:
    if can_id & _ERR:
        stats.error_frames += 1
    else:
        stats.remote_frames += 1


class RawSource(LiveSource):
    """LiveSource on a raw AF_CAN socket (receive: raw, the default for socketcan)."""

    receive_path = "raw"

    def __init__(self, cfg: CanBus, on_batch: BatchSink, on_state: StateSink,
                 keys: Callable[[], Collection[int]] | None = None) -> None:
        super().__init__(cfg, on_batch, on_state)
        self.keys = keys
        self._nkeys = -1
        self._last_wake = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._watching = False

    def _filter_keys(self) -> Collection[int] | None:
        if self.keys is None or not self.cfg.kernel_filter:
            return None
        keys = self.keys()
        self._nkeys = len(keys)
        return keys

    def _open(self) -> Any:
        return RawSocket(self.cfg, self._filter_keys())

    def refilter(self) -> bool:
        """The pipeline's ids changed (a reload): give the kernel the new filter now, not
        at the next frame that passes the old one (there may be none)."""
        sock = self.bus
        if sock is not None and self.keys is not None and self.cfg.kernel_filter:
            with contextlib.suppress(OSError):
                sock.set_filter(self._filter_keys())
        return True

    def _watch(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._watching = True
        loop.add_reader(fd, self._on_readable)

    def _unwatch(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watching:
            loop.remove_reader(fd)
            self._watching = False

    def _drain(self, sock: Any) -> int | None:
        """Read what the socket holds into the pipeline; None when the bus failed."""
        batch: list[Frame] = []
        try:
            n: int = sock.drain(batch, self.cfg.name, self.stats)
        except OSError as e:
            self._fail(e)
            return None
        if batch:
            self.stats.frames += len(batch)
            self.on_batch(batch)
        return n

    def _on_readable(self) -> None:
        sock = self.bus
        if sock is None:
            return
        if self.keys is not None and self.cfg.kernel_filter and len(self.keys()) != self._nkeys:
            # ids added after the socket opened (the poller's reply taps)
            with contextlib.suppress(OSError):
                sock.set_filter(self._filter_keys())
        n = self._drain(sock)
        if n is None:
            return
        now = time.monotonic()
        # Busy bus (woken again within one interval): stop watching the socket and drain
        # once when the interval ends, so frames are read in batches.
        if n and now - self._last_wake < COALESCE_S and self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False
            self._timer = self._loop.call_later(COALESCE_S, self._on_timer)
        self._last_wake = now

    def _on_timer(self) -> None:
        self._timer = None
        sock = self.bus
        if sock is None:
            return
        n = self._drain(sock)
        if n is None:
            return
        if n:
            self._timer = self._loop.call_later(COALESCE_S, self._on_timer)
        else:
            self._watching = True
            self._loop.add_reader(self._fd, self._on_readable)
        self._last_wake = time.monotonic()

    def send(self, arbitration_id: int, data: bytes, extended: bool) -> bool:
        sock = self.bus
        if sock is None:
            return False
        try:
            sock.send_frame(arbitration_id, data, extended)
        except OSError as e:
            if e.errno not in (errno.ENOBUFS, errno.EAGAIN):
                self._fail(e)
            return False
        self.tx_count += 1
        return True



# ------------------------------------------------------------------ kernel filtering (CAN_BCM)

BCM_MAX_VALUES = 256  # bcm.c's MAX_NFRAMES: an RX_SETUP takes the mux mask and this many
_ALL = (1 << 64) - 1


def refeed_interval(window_s: float) -> float:
    """How often receive: bcm feeds the last frames again, for `window_s`, the shortest
    time within which a pack must see a frame again (`stale_after_s`, a source's
    `fresh_s`, a DTC stream's `clear_after_s`)."""
    return max(0.1, min(1.0, window_s / 4))


def bcm_frames(reads: ReadBits | None) -> tuple[int, ...] | None:
    """An RX_SETUP's frame data (as 8-byte big-endian integers) for the bits a handler
    reads: `(mask,)`, or for a multiplexed message `(mux mask, value|mask, ...)`, one
    content mask per multiplexer value, so a frame wakes us only when the bits read for
    its own value change. None: every frame (RX_FILTER_ID)."""
    if reads is None:
        return None
    flat = reads.flat()
    mux = reads.mux_bits()
    # Bits read whatever the value would be compared with the last frame of the same
    # value only, not with the last frame: one mask for every frame then.
    if reads.mux is None or not reads.by_value or reads.always & ~mux \
            or len(reads.by_value) > BCM_MAX_VALUES:
        return (flat,)
    return (mux, *(reads.mux_bits(v) | (bits & ~mux)
                   for v, bits in sorted(reads.by_value.items())))


def bcm_mask(frames: tuple[int, ...] | None, data: bytes) -> int | None:
    """The bits the kernel compares for this frame under `frames` (an RX_SETUP's, from
    `bcm_frames`): the first value whose multiplexer bits match, as bcm.c picks it;
    None when none matches (the frame is dropped). No frames: every bit."""
    if frames is None:
        return _ALL
    if len(frames) == 1:
        return frames[0]
    word = int.from_bytes(data[:8].ljust(8, b"\0"), "big")
    mux = frames[0]
    return next((f | mux for f in frames[1:] if f & mux == word & mux), None)


_BCM_HEAD = struct.Struct("@IIIllllII")  # struct bcm_msg_head (64-bit longs, padding)
_BCM_RX_FLAGS = (socket.CAN_BCM_SETTIMER | socket.CAN_BCM_STARTTIMER
                 | socket.CAN_BCM_RX_CHECK_DLC | socket.CAN_BCM_RX_ANNOUNCE_RESUME)


def _timeval(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, round((seconds - whole) * 1e6)


def bcm_rx_setup(key: int, frames: tuple[int, ...] | None, timeout_s: float,
                 throttle_s: float) -> bytes:
    """One RX_SETUP: a notification when the masked bits (`bcm_frames`; None: anything)
    change, RX_TIMEOUT when the id is silent for `timeout_s`, at most one notification
    per `throttle_s` (0: no throttle)."""
    flags = _BCM_RX_FLAGS
    if frames is None:
        flags |= socket.CAN_BCM_RX_FILTER_ID
    head = _BCM_HEAD.pack(socket.CAN_BCM_RX_SETUP, flags, 0, *_timeval(timeout_s),
                          *_timeval(throttle_s), key, len(frames or ()))
    return head + b"".join(_FRAME.pack(key, 8, f.to_bytes(8, "big")) for f in frames or ())


class BcmSocket:
    """A CAN_BCM socket with one RX_SETUP per id the pipeline reads."""

    def __init__(self, cfg: CanBus, masks: dict[int, tuple[int, ...] | None],
                 timeout_s: float, throttled: Collection[int] = ()) -> None:
        s = socket.socket(socket.AF_CAN, socket.SOCK_DGRAM, socket.CAN_BCM)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.connect((cfg.channel,))
            s.setblocking(False)
            self.sock = s
            self.timeout_s = timeout_s
            self.throttle_s = cfg.bcm_throttle_s
            self.masks: dict[int, tuple[int, ...] | None] = {}
            self.throttled: set[int] = set()  # the ids bcm_throttle_s applies to
            # multiplexed ids: the multiplexer's bits, which tell the frames of an id apart
            self.mux: dict[int, int] = {}
            for key, frames in masks.items():
                self.watch(key, frames, key in throttled)
        except BaseException:
            s.close()
            raise
        self.buf = bytearray(_BCM_HEAD.size + _FRAME.size)
        # (id, multiplexer bits) -> the last frame the kernel delivered
        self.last: dict[tuple[int, int], bytes] = {}
        self.silent: set[int] = set()  # ids in RX_TIMEOUT (no frame for timeout_s)

    def watch(self, key: int, frames: tuple[int, ...] | None, throttled: bool = False) -> None:
        """Subscribe to one id (`bcm_frames`); `throttled`: at most one notification (of
        each multiplexer value) per bcm_throttle_s. Raises OSError from the kernel."""
        self.sock.send(bcm_rx_setup(key, frames, self.timeout_s,
                                    self.throttle_s if throttled else 0.0))
        self.masks[key] = frames
        if throttled:
            self.throttled.add(key)
        if frames is not None and len(frames) > 1:
            self.mux[key] = frames[0]

    def fileno(self) -> int:
        return self.sock.fileno()

    def shutdown(self) -> None:
        self.sock.close()

    def send_frame(self, can_id: int, data: bytes, extended: bool) -> None:
        # transmitting (polls) goes through a raw socket: BCM's TX_SEND needs a head too
        with socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW) as tx:
            tx.bind((self.sock.getpeername()[0],))
            tx.send(_FRAME.pack(can_id | _EFF if extended else can_id, len(data), data))

    def drain(self, out: list[Frame], name: str, stats: Any) -> int:
        sock = self.sock
        buf = self.buf
        head = _BCM_HEAD.unpack_from
        frame = _FRAME.unpack_from
        off = _BCM_HEAD.size
        count = 0
        while count < BATCH:
            try:
                _n, anc, _flags, _addr = sock.recvmsg_into([buf], _ANC)
            except BlockingIOError:
                break
            count += 1
            opcode, _f, _c, _a, _b, _d, _e, key, nframes = head(buf)
            if opcode == socket.CAN_BCM_RX_TIMEOUT:
                self.silent.add(key)
                continue
            if opcode != socket.CAN_BCM_RX_CHANGED or not nframes:
                continue
            can_id, length, data = frame(buf, off)
            data = data if length == 8 else data[:length]
            ts = 0.0
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, ns = _TIMESPEC.unpack_from(value)
                    ts = sec + ns * 1e-9
            self.silent.discard(can_id)
            mux = self.mux.get(can_id, 0)
            self.last[can_id, mux and int.from_bytes(data.ljust(8, b"\0"), "big") & mux] = data
            out.append((ts or time.time(), can_id, data, name))
        return count


class BcmSource(RawSource):
    """receive: bcm. The kernel delivers a frame only when bits a profile reads change and
    reports silent ids; between changes the last frame of each live id is fed again every
    `refeed_s`, so the pipeline's staleness (`stale_after_s`) sees the BMS alive."""

    receive_path = "bcm"

    def __init__(self, cfg: CanBus, on_batch: BatchSink, on_state: StateSink,
                 keys: Callable[[], Collection[int]] | None = None,
                 reads: Callable[[], dict[int, list[ReadBits | None]]] | None = None,
                 window: Callable[[], float] = lambda: 5.0) -> None:
        super().__init__(cfg, on_batch, on_state, keys)
        self.reads = reads
        self.window = window  # see refeed_interval
        self.refeed_s = refeed_interval(window())
        self._refeed: asyncio.TimerHandle | None = None
        self._throttled: set[int] = set()

    def _masks(self) -> dict[int, tuple[int, ...] | None]:
        """`bcm_frames` per id read; `_throttled` the ids a throttle may thin: those whose
        last frame (of each multiplexer value) in an interval stands for the ones before
        it. Not an ISO-TP answer, a checked counter, `index:` cells or inner groups."""
        keys = self.keys() if self.keys is not None else ()
        self._nkeys = len(keys)
        reads = self.reads() if self.reads is not None else {}
        self._throttled = set()
        out: dict[int, tuple[int, ...] | None] = {}
        for key in keys:
            # an id some reader takes whole (a poller's replies, or no handler): every frame
            of_key = reads.get(key) or [None]
            masked = [r for r in of_key if r is not None]
            got = functools.reduce(ReadBits.union, masked) if len(masked) == len(of_key) \
                else None
            out[key] = bcm_frames(got)
            if got is not None and got.whole:
                self._throttled.add(key)
        return out

    def _open(self) -> Any:
        masks = self._masks()
        return BcmSocket(self.cfg, masks, self.refeed_s * 2, self._throttled)

    def refilter(self) -> bool:
        """After a reload: still subscribed to what the pipeline reads, and refeeding
        often enough for its packs? If not, the daemon opens a new source (BCM
        subscriptions and their RX_TIMEOUT are set up when the socket opens)."""
        if refeed_interval(self.window()) != self.refeed_s:
            return False
        sock = self.bus
        return sock is None or bool(self._masks() == sock.masks
                                    and self._throttled == sock.throttled)

    def _watch(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        super()._watch(loop, fd)
        self._refeed = loop.call_later(self.refeed_s, self._on_refeed)

    def _unwatch(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        if self._refeed is not None:
            self._refeed.cancel()
            self._refeed = None
        super()._unwatch(loop, fd)

    def _on_readable(self) -> None:
        sock = self.bus
        if sock is None:
            return
        if self.keys is not None and len(self.keys()) != self._nkeys:
            # ids added after the socket opened (the poller's reply taps): set up the new ones
            masks = self._masks()
            for key in masks.keys() - sock.masks.keys():
                with contextlib.suppress(OSError):
                    sock.watch(key, masks[key], key in self._throttled)
        super()._on_readable()

    def _on_refeed(self) -> None:
        sock = self.bus
        if sock is None:
            return
        now = time.time()
        name = self.cfg.name
        # an id without a mask (a checksum, a rolling counter, a poller's replies) is
        # delivered frame by frame, and a frame of it fed twice is not the same as once
        masks, silent = sock.masks, sock.silent
        batch = [(now, key, data, name) for (key, _), data in sock.last.items()
                 if key not in silent and masks.get(key) is not None]
        if batch:
            self.on_batch(batch)
        self._refeed = self._loop.call_later(self.refeed_s, self._on_refeed)


def make_source(cfg: CanBus, bus: int, on_batch: BatchSink, on_state: StateSink,
                pipeline: Callable[[], Any]) -> LiveSource:
    """The source for configured bus number `bus`; `pipeline()` is the running pipeline
    (the ids it reads on this bus set the kernel's filter, asked again when they grow)."""
    if cfg.interface != "socketcan" or cfg.receive == "python-can":
        return LiveSource(cfg, on_batch, on_state)

    def keys() -> Collection[int]:
        p = pipeline()  # by name: a reload may give the bus another number
        names: list[str] = p.bus_names
        return p.routes(names.index(cfg.name)) if cfg.name in names else {}  # type: ignore[no-any-return]

    if cfg.receive == "raw":
        return RawSource(cfg, on_batch, on_state, keys)

    def reads() -> dict[int, list[ReadBits | None]]:
        out: dict[int, list[ReadBits | None]] = {}
        p = pipeline()
        for pack in p.packs:
            if pack.live.cfg.bus == cfg.name:
                for key, bits in pack.live.reads.items():
                    out.setdefault(key, []).append(bits)
        if cfg.name in p.bus_names:
            # a poller's replies: each one answers a request, changed or not
            for key in p.tapped(p.bus_names.index(cfg.name)):
                out.setdefault(key, []).append(None)
        return out

    def window() -> float:
        return min((w for pack in pipeline().packs if pack.live.cfg.bus == cfg.name
                    for w in pack.live.windows), default=5.0)

    return BcmSource(cfg, on_batch, on_state, keys, reads, window)
