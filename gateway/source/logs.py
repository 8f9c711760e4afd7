"""Source stage: frames from a recorded log or a live python-can bus, in batches.

A frame here is a plain tuple `(ts, key, data, channel)`: frame-time seconds (epoch),
`decode.frame_key` (29-bit ids carry `EXTENDED_FLAG`), payload bytes, and the channel
name the log or bus gave. Batches keep the per-frame cost of crossing into the
pipeline to one tuple and one list slot.

Recorded logs: candump `-l` files (any suffix; recognised by content) and SLCAN ASCII
captures are parsed by our own line parsers (about 4x `can.LogReader`); every other
format python-can reads (.asc, .blf, .trc, .csv, .mf4, .db) goes through its readers.
A malformed line is counted and reported with its line number; reading goes on.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import importlib.util
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can

from gateway.backoff import backoff
from gateway.config import CanBus, GatewayConfig, Problem
from gateway.decode.dbc import EXTENDED_FLAG
from gateway.errors import GatewayError
from gateway.source import logformats
from gateway.source.logformats import LineFormat

log = logging.getLogger("gateway.source")

Frame = tuple[float, int, bytes, str]
BATCH = 512
COALESCE_S = 0.002  # reader thread: at most one hand-off to the event loop per this long
# A frame time must be a real date: NaN, inf, 1e20 or -1e18 in a log would reach
# datetime.fromtimestamp (OverflowError) long after the line was read.
TS_MAX = 253402300799.0  # 9999-12-31T23:59:59Z
# The candump parser caches id and channel texts; hostile or huge logs (millions of
# distinct ids) must not grow them without bound, so they are emptied when this full.
CACHE_MAX = 4096
GARBLED_MAX = 1000  # garbled frames in a row before a live bus is taken for lost


_CANDUMP_ID = re.compile(rb"[0-9A-Fa-f]{3}|[0-9A-Fa-f]{8}")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_CLASSIC_LENGTHS = frozenset(range(9))
_FD_LENGTHS = frozenset((*range(9), 12, 16, 20, 24, 32, 48, 64))


def ts_ok(ts: float) -> bool:
    """A usable frame time: finite, not before 1970, not after 9999 (NaN fails too)."""
    return 0.0 <= ts <= TS_MAX


class LogError(GatewayError):
    """A log file that cannot be read at all (missing, unknown format, reader refused it)."""


@dataclass(slots=True)
class SourceStats:
    frames: int = 0
    bad_lines: int = 0
    error_frames: int = 0
    remote_frames: int = 0
    overruns: int = 0  # frames the kernel dropped because the socket buffer was full
    first_bad: list[str] = field(default_factory=list)  # first few bad-line reports

    def bad(self, where: str, why: str) -> None:
        self.bad_lines += 1
        if len(self.first_bad) < 5:
            self.first_bad.append(f"{where}: {why}")
            log.warning("%s: %s (skipped)", where, why)
        elif self.bad_lines in (6, 100, 10_000):
            log.warning("%d malformed log lines so far (only the first 5 are shown)",
                        self.bad_lines)


def _candump_batches(path: Path, stats: SourceStats) -> Iterator[list[Frame]]:
    """candump -l lines: `(1763824854.721518) can0 1FFFFFF0#0119000708000043`.

    The common line takes the fast path (bytes, ids and channel names looked up in
    small caches); remote, CAN FD, error frames and bad lines fall to `_candump_slow`.
    """
    batch: list[Frame] = []
    append = batch.append
    unhex = binascii.unhexlify
    keys: dict[bytes, int] = {}  # id text -> frame key (-1: an error frame)
    chans: dict[bytes, str] = {}
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                # python-can writes a 4th field (direction R/T); candump -l has 3
                parts = line.split()
                ts_s, chan, frame = parts[0], parts[1], parts[2]
                ident, payload = frame.split(b"#")
                key = keys.get(ident)
                if key is None:
                    if len(keys) >= CACHE_MAX:
                        keys.clear()
                    key = keys[ident] = _candump_key(ident)
                if key < 0:
                    stats.error_frames += 1
                    continue
                c = chans.get(chan)
                if c is None:
                    if len(chans) >= CACHE_MAX:
                        chans.clear()
                    c = chans[chan] = chan.decode(errors="replace")
                ts = float(ts_s[1:-1])
                if not 0.0 <= ts <= TS_MAX or len(payload) > 16:  # classic CAN: 8 bytes
                    raise ValueError
                append((ts, key, unhex(payload), c))
            except (ValueError, IndexError, binascii.Error):
                got = _candump_slow(line.decode("ascii", errors="replace"), stats,
                                    f"{path}:{lineno}")
                if got is not None:
                    append(got)
            if len(batch) >= BATCH:
                stats.frames += len(batch)
                yield batch
                batch = []
                append = batch.append
    if batch:
        stats.frames += len(batch)
        yield batch


def _candump_key(ident: bytes) -> int:
    """The frame key of a candump id: 3 hex digits (standard) or 8 (extended), nothing
    else (int(x, 16) alone takes `0x100`, `1_00`, ` -1`). -1: an error frame."""
    if _CANDUMP_ID.fullmatch(ident) is None:
        raise ValueError(f"id {ident[:16]!r} is not 3 or 8 hex digits")
    can_id = int(ident, 16)
    if len(ident) > 3 or can_id > 0x7FF:
        if can_id & 0x20000000:  # CAN_ERR_FLAG: candump prints error frames this way
            return -1
        if can_id > 0x1FFFFFFF:
            raise ValueError(f"id {ident[:16]!r} is wider than 29 bits")
        can_id |= EXTENDED_FLAG
    return can_id


def _candump_slow(line: str, stats: SourceStats, where: str) -> Frame | None:
    """Remote and CAN FD frames, and a clear report for anything malformed."""
    try:
        parts = line.split()
        if len(parts) not in (3, 4):
            raise ValueError
        ts_s, chan, frame = parts[:3]
        ident, sep, payload = frame.partition("#")
        if sep != "#" or ts_s[0] != "(" or ts_s[-1] != ")":
            raise ValueError
        if payload[:1] == "R":  # remote request: no data
            stats.remote_frames += 1
            return None
        fd = payload[:1] == "#"
        if fd:  # CAN FD: ID##<flags><data>
            if payload[1:2] not in _HEX_DIGITS:
                raise ValueError
            payload = payload[2:]
        key = _candump_key(ident.encode())
        if key < 0:
            stats.error_frames += 1
            return None
        ts = float(ts_s[1:-1])
        if not ts_ok(ts):
            stats.bad(where, f"timestamp {ts_s} is not a date between 1970 and 9999")
            return None
        data = bytes.fromhex(payload)
        if len(data) not in (_FD_LENGTHS if fd else _CLASSIC_LENGTHS):
            stats.bad(where, f"{len(data)} data bytes: a {'CAN FD' if fd else 'classic CAN'} "
                      f"frame carries {'0-8, 12, 16, 20, 24, 32, 48 or 64' if fd else '0-8'}")
            return None
        return (ts, key, data, chan)
    except ValueError:
        if line.strip() and not line.startswith("#"):
            stats.bad(where, f"not a candump -l line: {line.strip()[:60]!r}")
        return None


def _slcan_batches(path: Path, stats: SourceStats) -> Iterator[list[Frame]]:
    """SLCAN ASCII: `t<iii><l><data>[<tttt>]` / `T<iiiiiiii><l><data>[<tttt>]`, ms timestamps
    that wrap at 60000 (we unwrap them)."""
    from gateway.source.logtext import line_batches  # it imports this module

    last_ms = -1
    wraps = 0

    def frame(tokens: list[str]) -> Frame | None:
        nonlocal last_ms, wraps
        line = " ".join(tokens)  # as the old reader saw it (stripped)
        kind = line[0]
        if kind in "rR":
            stats.remote_frames += 1
            return None
        if kind not in "tT":
            raise ValueError("not an SLCAN frame line")
        n = 3 if kind == "t" else 8
        can_id = int(line[1:1 + n], 16)
        dlc = int(line[1 + n], 16)
        if dlc > 8:
            raise ValueError(f"DLC {dlc} > 8")
        data = bytes.fromhex(line[2 + n:2 + n + 2 * dlc])
        if len(data) != dlc:
            raise ValueError(f"DLC {dlc} but {len(data)} data bytes")
        rest = line[2 + n + 2 * dlc:]
        if len(rest) > 4:  # SLCAN stamps are 4 hex digits (ms, wrap at 60 s)
            raise ValueError(f"timestamp {rest[:12]!r} is not 4 hex digits")
        ms = int(rest, 16) if rest else 0
        if ms < last_ms:
            wraps += 1
        last_ms = ms
        key = can_id | EXTENDED_FLAG if kind == "T" else can_id
        return ((wraps * 60000 + ms) / 1000.0, key, data, "slcan0")

    return line_batches(path, stats, "SLCAN", lambda _line: False, frame)


def _pycan_batches(path: Path, stats: SourceStats) -> Iterator[list[Frame]]:
    suffix = path.suffix.lower()
    try:
        reader: Any
        if suffix == ".asc":
            reader = can.ASCReader(str(path), relative_timestamp=False)
        else:
            reader = can.LogReader(str(path))
    except Exception as e:
        msg = f"{path}: python-can cannot open this log: {e}"
        raise LogError(msg) from e
    batch: list[Frame] = []
    count = 0
    try:
        it = iter(reader)
        while True:
            try:
                m = next(it)
            except StopIteration:
                break
            except Exception as e:  # python-can readers raise many types on bad lines
                # Most readers cannot resume after a parse error: report where it stopped.
                stats.bad(f"{path} (after frame {count})",
                          f"{type(e).__name__}: {e}; the rest of the file was not read")
                if count == 0:
                    msg = (f"{path}: python-can's reader for {suffix or 'this format'} rejected the "
                           f"file: {type(e).__name__}: {e}. Fix: convert it to candump -l or .asc "
                           "(e.g. with `python -m can.logconvert`)")
                    raise LogError(msg) from e
                break
            count += 1
            if m.is_error_frame:
                stats.error_frames += 1
                continue
            if m.is_remote_frame:
                stats.remote_frames += 1
                continue
            if not ts_ok(m.timestamp):
                stats.bad(f"{path} (frame {count})",
                          f"timestamp {m.timestamp!r} is not a date between 1970 and 9999")
                continue
            key = m.arbitration_id | EXTENDED_FLAG if m.is_extended_id else m.arbitration_id
            batch.append((m.timestamp, key, bytes(m.data), str(m.channel)))
            if len(batch) >= BATCH:
                stats.frames += len(batch)
                yield batch
                batch = []
    finally:
        with contextlib.suppress(Exception):
            reader.stop()
    if batch:
        stats.frames += len(batch)
        yield batch


def sniff_format(path: Path) -> str:
    """'candump', 'slcan' or 'pycan', by content first (suffixes lie in the wild)."""
    try:
        with path.open("r", encoding="ascii", errors="replace") as f:
            head = [f.readline() for _ in range(5)]
    except OSError as e:
        msg = f"{path}: cannot read log: {e.strerror or e}"
        raise LogError(msg) from e
    lines = [h.strip() for h in head if h.strip()]
    if lines and sum(ln.startswith("(") and "#" in ln for ln in lines) > len(lines) // 2:
        return "candump"
    if (path.suffix.lower() in (".raw", ".slcan", ".txt") and lines
            and all(ln[0] in "tTrR" for ln in lines)):
        return "slcan"
    return "pycan"


def read_log(path: str | Path, stats: SourceStats, *, line_format: LineFormat | None = None,
             start: float | None = None) -> Iterator[list[Frame]]:
    """Batches of frames from a log; `line_format` for a text logger of the user's own,
    `start` (epoch s) to anchor a log with relative timestamps (logformats.py)."""
    p = Path(path)
    if not p.exists():
        msg = f"{p}: log file not found"
        raise LogError(msg)
    return logformats.anchor(_open_log(p, stats, line_format), p, start, stats)


def _open_log(p: Path, stats: SourceStats, line_format: LineFormat | None
              ) -> Iterator[list[Frame]]:
    if (ours := logformats.open_log(p, stats, line_format)) is not None:
        return ours
    fmt = sniff_format(p)
    if fmt == "candump":
        return _candump_batches(p, stats)
    if fmt == "slcan":
        return _slcan_batches(p, stats)
    if p.suffix.lower() in (".asc", ".trc"):
        from gateway.source.logtext import asc_batches, trc_batches  # imports this module

        return (asc_batches if p.suffix.lower() == ".asc" else trc_batches)(p, stats)
    if p.suffix.lower() not in (".asc", ".blf", ".csv", ".db", ".log", ".mf4", ".trc"):
        msg = (f"{p}: unknown log format (suffix {p.suffix!r}); supported: candump -l, SLCAN "
               ".raw, .asc, .blf, .trc, .csv, .mf4, .db")
        raise LogError(msg)
    return _pycan_batches(p, stats)


class Pacer:
    """Maps frame time to wall time at `speed` (None = as fast as possible)."""

    def __init__(self, speed: float | None) -> None:
        self.speed = speed
        self.t0: float | None = None
        self.w0 = 0.0

    def delay(self, ts: float) -> float:
        if self.speed is None:
            return 0.0
        if self.t0 is None:
            self.t0, self.w0 = ts, time.monotonic()
            return 0.0
        return (ts - self.t0) / self.speed - (time.monotonic() - self.w0)


# ------------------------------------------------------------------ live bus


# python-can interfaces that need a package python-can does not install itself:
# interface -> (the module it imports, our extra that installs it)
INTERFACE_EXTRAS = {
    "slcan": ("serial", "serial"), "serial": ("serial", "serial"),
    "robotell": ("serial", "serial"), "seeedstudio": ("serial", "serial"),
    "gs_usb": ("gs_usb", "gs_usb"), "canalystii": ("canalystii", "canalystii"),
    "cantact": ("cantact", "cantact"), "udp_multicast": ("msgpack", "multicast"),
}


def missing_extra(interface: str) -> tuple[str, str] | None:
    """(what is missing, how to install it) when the interface cannot be imported."""
    need = INTERFACE_EXTRAS.get(interface)
    if need is None or importlib.util.find_spec(need[0]) is not None:
        return None
    return (f"interface {interface!r} needs the Python module {need[0]!r}, which is not "
            "installed", f"pip install 'bms-gateway[{need[1]}]' (into the gateway's venv)")


def interface_problems(cfg: GatewayConfig) -> list[Problem]:
    """Buses that cannot open in this installation: a config error at start, not a
    retry loop at run time."""
    out = []
    for i, bus in enumerate(cfg.buses):
        miss = missing_extra(bus.interface)
        if miss is not None:
            key = "can.interface" if len(cfg.buses) == 1 else f"can[{i}].interface"
            out.append(Problem(str(cfg.path), key, *miss))
    return out


def open_bus(cfg: CanBus) -> can.BusABC:
    if cfg.interface == "socketcan":
        # python-can leaks its socket when bind fails: a daemon retrying a missing
        # adapter for hours would run out of file descriptors
        socket.if_nametoindex(cfg.channel)
    miss = missing_extra(cfg.interface)
    if miss is not None:
        raise can.CanInterfaceNotImplementedError(f"{miss[0]}: {miss[1]}")
    kwargs: dict[str, Any] = dict(cfg.options)
    if cfg.bitrate is not None:
        kwargs.setdefault("bitrate", cfg.bitrate)
    if cfg.fd:
        kwargs.setdefault("fd", True)
        if cfg.data_bitrate is not None:
            kwargs.setdefault("data_bitrate", cfg.data_bitrate)
    return can.Bus(interface=cfg.interface, channel=cfg.channel, **kwargs)


BatchSink = Callable[[list[Frame]], None]
StateSink = Callable[[str, bool, str], None]  # (condition, active, detail)


def _nonblocking_recv(bus: can.BusABC) -> Callable[[], can.Message | None]:
    """`bus.recv(0)` without BusABC.recv's timing loop: 5.1 -> 3.7 us per frame on the
    virtual bus, the draining loop's whole cost. Software filters still apply, and a
    filtered-out frame does not end the drain (recv(0) returns None on one)."""
    internal = getattr(bus, "_recv_internal", None)
    matches = getattr(bus, "_matches_filters", None)
    if internal is None or matches is None:
        return lambda: bus.recv(0)

    def recv0() -> can.Message | None:
        while True:
            msg, already_filtered = internal(0)
            if msg is None or already_filtered or matches(msg):
                return msg  # type: ignore[no-any-return]

    return recv0


class LiveSource:
    """Reads one bus into the pipeline; survives the interface going away.

    Where the bus has a file descriptor (socketcan), the event loop watches it
    (`add_reader`) and drains with non-blocking `recv(0)`: no thread. Otherwise one
    reader thread blocks in `recv` and hands batches to the loop. A receive error is
    never swallowed: the bus is closed, `can_bus_lost` is raised, and the source
    reopens it with backoff (python-can's own Notifier just stops on an error).
    gateway/source/socketcan.py's RawSource replaces `_open`, `_watch` and `_on_readable`.
    """

    receive_path = "python-can"

    def __init__(self, cfg: CanBus, on_batch: BatchSink, on_state: StateSink) -> None:
        self.cfg = cfg
        self.on_batch = on_batch
        self.on_state = on_state
        self.bus: Any = None  # a can.BusABC here, a socketcan.RawSocket in RawSource
        self.lost = False
        self.attempt = 0
        self.stats = SourceStats()
        self.opened = asyncio.Event()
        self._stop = False
        self._failed: asyncio.Future[BaseException] | None = None
        self.last_error = ""
        self.tx_count = 0
        self._poll: Callable[[], can.Message | None] = lambda: None

    def _to_frame(self, m: can.Message, out: list[Frame]) -> None:
        if m.is_error_frame:
            self.stats.error_frames += 1
            return
        if m.is_remote_frame:
            self.stats.remote_frames += 1
            return
        key = m.arbitration_id | EXTENDED_FLAG if m.is_extended_id else m.arbitration_id
        out.append((m.timestamp, key, bytes(m.data), self.cfg.name))

    def _fail(self, e: BaseException) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_result(e)

    def _on_readable(self) -> None:
        if self.bus is None:
            return
        poll = self._poll
        batch: list[Frame] = []
        try:
            for _ in range(BATCH):
                m = poll()
                if m is None:
                    break
                self._to_frame(m, batch)
        except Exception as e:  # any receive error means the bus is gone
            self._fail(e)
        if batch:
            self.stats.frames += len(batch)
            self.on_batch(batch)

    def _thread_reader(self, loop: asyncio.AbstractEventLoop, bus: can.BusABC) -> None:
        last = 0.0
        busy = False
        poll = self._tolerant(_nonblocking_recv(bus))
        recv = self._tolerant(lambda: bus.recv(0.2))
        while not self._stop and self.bus is bus:
            batch: list[Frame] = []
            try:
                # Hand batches to the event loop at most once per COALESCE_S. A quiet bus
                # blocks in recv and gets each frame at once; a busy one (the last batch
                # was not empty) just sleeps out the rest of the interval and drains, so
                # it is woken once per batch instead of once per frame.
                if not busy:
                    m = recv()
                    if m is None:
                        continue
                    self._to_frame(m, batch)
                gap = time.monotonic() - last
                if gap < COALESCE_S:
                    time.sleep(COALESCE_S - gap)
                for _ in range(BATCH):
                    m = poll()
                    if m is None:
                        break
                    self._to_frame(m, batch)
            except Exception as e:
                # the loop may be closed already when the bus fails during shutdown
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._fail, e)
                return
            busy = bool(batch)
            if batch:
                last = time.monotonic()
                try:
                    loop.call_soon_threadsafe(self._deliver, batch)
                except RuntimeError:  # the event loop closed under us: shutting down
                    return

    def _tolerant(self, recv: Callable[[], can.Message | None]) -> Callable[[], can.Message | None]:
        """A garbled frame from a serial adapter (python-can's slcan raises ValueError on
        `tXYZ`) is counted and skipped, not taken for a lost bus; only a long run of them
        (an interface that keeps failing that way) is."""
        def recv0() -> can.Message | None:
            for _ in range(GARBLED_MAX):
                try:
                    return recv()
                except ValueError as e:  # UnicodeDecodeError included
                    self.stats.bad(f"CAN bus {self.cfg.name}",
                                   f"garbled frame from the interface: {e}")
            msg = f"{GARBLED_MAX} garbled frames in a row"
            raise can.CanOperationError(msg)

        return recv0

    def _deliver(self, batch: list[Frame]) -> None:
        self.stats.frames += len(batch)
        self.on_batch(batch)

    def send(self, arbitration_id: int, data: bytes, extended: bool) -> bool:
        """Transmit one frame (only for profiles that poll and packs with transmit: true)."""
        bus = self.bus
        if bus is None:
            return False
        try:
            bus.send(can.Message(arbitration_id=arbitration_id, data=data,
                                 is_extended_id=extended), timeout=0.05)
        except Exception as e:
            log.debug("send on %s failed: %s", self.cfg.name, e)
            return False
        self.tx_count += 1
        return True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop:
            try:
                bus = self._open()
            except Exception as e:
                self._lost(f"cannot open {self.cfg.interface}:{self.cfg.channel}: {e}")
                await self._sleep_backoff()
                continue
            self.bus = bus
            self._failed = loop.create_future()
            fd = -1
            with contextlib.suppress(Exception):
                fd = bus.fileno()
            thread = None
            if fd >= 0:
                self._watch(loop, fd)
            else:
                thread = threading.Thread(target=self._thread_reader, args=(loop, bus),
                                          name=f"can-rx[{self.cfg.name}]", daemon=True)
                thread.start()
            if self.lost or self.attempt:
                log.info("CAN bus %s is back", self.cfg.name)
            self.attempt = 0
            if self.lost:
                self.lost = False
                self.on_state("can_bus_lost", False, f"{self.cfg.name} reopened")
            self.opened.set()
            try:
                err = await self._failed
            finally:
                # also when cancelled (the daemon cancels sources on SIGHUP): otherwise the
                # old bus stays open, and its fd reader keeps feeding the reloaded pipeline
                if fd >= 0:
                    self._unwatch(loop, fd)
                self.bus = None
                with contextlib.suppress(Exception):
                    bus.shutdown()
            if thread is not None:
                await asyncio.to_thread(thread.join, 1.0)
            if self._stop:
                break
            self._lost(f"receive error on {self.cfg.name}: {type(err).__name__}: {err}")
            await self._sleep_backoff()

    def _open(self) -> Any:
        bus = open_bus(self.cfg)
        self._poll = self._tolerant(_nonblocking_recv(bus))
        return bus

    def _watch(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        loop.add_reader(fd, self._on_readable)

    def _unwatch(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        loop.remove_reader(fd)

    def _lost(self, detail: str) -> None:
        self.last_error = detail
        if not self.lost:
            self.lost = True
            log.error("CAN bus %s lost: %s; retrying with backoff", self.cfg.name, detail)
            self.on_state("can_bus_lost", True, detail)
        else:
            log.debug("CAN bus %s still unavailable: %s", self.cfg.name, detail)

    async def _sleep_backoff(self) -> None:
        self.attempt += 1
        await asyncio.sleep(backoff(self.attempt))

    def refilter(self) -> bool:
        """A reload may change the ids the pipeline reads: True if this open source still
        serves it (a python-can bus receives every id)."""
        return True

    def stop(self) -> None:
        self._stop = True
        self._fail(asyncio.CancelledError())
