"""The SocketCAN receive path: the AF_CAN socket read directly, without python-can.

python-can's socketcan receive costs about 46,000 instructions a frame (a `Message`,
an `enum.IntFlag` test and a `recvmsg` with its ancillary data for every frame); this
reads the same socket at about a tenth of that (bench/RESULTS.md, live mode):

- one wake-up drains up to `BATCH` frames with `recv_into` into one buffer; the only
  per-frame object is the tuple the pipeline takes (and the payload bytes);
- kernel timestamps without a `recvmsg` per frame: the first frame of a drain is read
  with `recvmsg` (its `SO_TIMESTAMPNS` time and the `SO_RXQ_OVFL` drop counter), the
  last frame's time comes from `SIOCGSTAMPNS`, and the frames between are spread evenly
  between the two (they all arrived within one coalescing interval, a few ms);
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
import fcntl
import socket
import struct
import time
from collections.abc import Callable, Collection
from typing import Any

from .config import CanBus
from .source import BATCH, COALESCE_S, BatchSink, Frame, LiveSource, StateSink

SO_TIMESTAMPNS = 35  # <asm-generic/socket.h>; not exported by Python's socket module
SO_RXQ_OVFL = 40  # ancillary uint32: frames the kernel dropped on this socket so far
SIOCGSTAMPNS = 0x8907  # time of the last frame read from the socket (struct timespec)
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
_ZERO_TS = bytes(16)


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
            self.filtered = False
            self.set_filter(keys)
            s.bind((cfg.channel,))
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self.buf = bytearray(_FD_FRAME.size if cfg.fd else _FRAME.size)
        self.dropped = 0  # the kernel's SO_RXQ_OVFL count for this socket

    def set_filter(self, keys: Collection[int] | None) -> None:
        """Only these keys, or everything (None, or more ids than the kernel allows)."""
        if keys is None or len(keys) > CAN_RAW_FILTER_MAX:
            # one filter matching every id: the kernel default
            flt = struct.pack("=II", 0, 0)
            self.filtered = False
        else:
            # no ids yet: a filter that matches nothing (an empty list would too, but
            # only error frames must wake us)
            flt = can_filters(keys) if keys else struct.pack("=II", _ERR, _ERR | _EFF)
            self.filtered = True
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
        start = len(out)
        append = out.append
        count = 1
        special = 0
        can_id, length, data = unpack(buf)
        if can_id & _SPECIAL:
            special += 1
            _count_special(can_id, stats)
        else:
            append((t_first, can_id, data if length == 8 else data[:length], name))
        recv_into = sock.recv_into
        try:
            while count < BATCH:
                recv_into(buf)
                count += 1
                can_id, length, data = unpack(buf)
                if can_id & _SPECIAL:
                    special += 1
                    _count_special(can_id, stats)
                    continue
                append((0.0, can_id, data if length == 8 else data[:length], name))
        except BlockingIOError:
            pass
        got = len(out) - start
        if got > 1 or (got and special):
            self._spread(out, start, t_first)
        return count

    def _spread(self, out: list[Frame], start: int, t_first: float) -> None:
        try:
            sec, ns = _TIMESPEC.unpack(fcntl.ioctl(self.sock.fileno(), SIOCGSTAMPNS, _ZERO_TS))
            t_last = sec + ns * 1e-9
        except OSError:
            t_last = t_first
        t_last = max(t_last, t_first)
        last = len(out) - 1
        step = (t_last - t_first) / max(1, last - start)
        for i in range(start, last + 1):
            _, key, data, name = out[i]
            out[i] = (t_first + (i - start) * step, key, data, name)


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

    def _on_readable(self) -> None:
        sock = self.bus
        if sock is None:
            return
        if self.keys is not None and self.cfg.kernel_filter and len(self.keys()) != self._nkeys:
            # ids added after the socket opened (the poller's reply taps)
            with contextlib.suppress(OSError):
                sock.set_filter(self._filter_keys())
        batch: list[Frame] = []
        try:
            n = sock.drain(batch, self.cfg.name, self.stats)
        except OSError as e:
            self._fail(e)
            return
        if batch:
            self.stats.frames += len(batch)
            self.on_batch(batch)
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
        batch: list[Frame] = []
        try:
            n = sock.drain(batch, self.cfg.name, self.stats)
        except OSError as e:
            self._fail(e)
            return
        if batch:
            self.stats.frames += len(batch)
            self.on_batch(batch)
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


def make_source(cfg: CanBus, on_batch: BatchSink, on_state: StateSink,
                keys: Callable[[], Collection[int]]) -> LiveSource:
    """The source for one configured bus; `keys` gives the frame keys the pipeline reads
    on it (for the kernel's filter; asked again when it grows)."""
    if cfg.interface == "socketcan" and cfg.receive == "raw":
        return RawSource(cfg, on_batch, on_state, keys)
    return LiveSource(cfg, on_batch, on_state)
