"""Line-tolerant readers for Vector ASC and PEAK TRC text logs.

python-can's readers for these formats stop at the first line they cannot parse (the
rest of the file is lost), refuse a file with one non-UTF-8 byte, skip truncated frames
silently, and reject real TRC files whose header does not match their lines. Here every
line stands alone: a bad one (bad hex, bad timestamp, truncated, undecodable bytes) is
counted in `SourceStats.bad_lines` with its line number and reading goes on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from can.io.asc import ASCReader
from can.util import dlc2len

from gateway.decode.dbc import EXTENDED_FLAG
from gateway.source.logs import BATCH, Frame, SourceStats, ts_ok

__all__ = ["asc_batches", "line_batches", "trc_batches"]

_HEX = frozenset("0123456789abcdefABCDEF")
_EPOCH_DAYS = 25569  # 1970-01-01 in TRC's day count (days since 1899-12-30)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    # A stray non-UTF-8 byte becomes U+FFFD: its line fails to parse and is counted,
    # instead of a UnicodeDecodeError rejecting the whole file.
    # utf-8-sig: a file saved with a byte order mark (Windows tools) reads as without.
    with path.open("r", encoding="utf-8-sig", errors="replace", newline=None) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if line:
                yield lineno, line


def _decodable(line: str) -> None:
    if "\ufffd" in line:
        msg = "bytes that are not UTF-8 text"
        raise ValueError(msg)


def _frame_id(text: str, base: int) -> int:
    ext = text[-1:] in ("x", "X")
    can_id = int(text[:-1] if ext else text, base)
    if not 0 <= can_id <= 0x1FFFFFFF:
        msg = f"id {text[:16]!r} is not a CAN id"
        raise ValueError(msg)
    return can_id | EXTENDED_FLAG if ext or can_id > 0x7FF else can_id


def _data(tokens: list[str], n: int, base: int) -> bytes:
    if len(tokens) < n:
        msg = f"truncated: {n} data bytes announced, {len(tokens)} present"
        raise ValueError(msg)
    out = bytes(int(t, base) for t in tokens[:n])
    if base == 16 and not all(len(t) == 2 for t in tokens[:n]):
        msg = "data bytes must be two hex digits each"
        raise ValueError(msg)
    return out


def line_batches(path: Path, stats: SourceStats, kind: str, header: Callable[[str], bool],
                 frame: Callable[[list[str]], Frame | None]) -> Iterator[list[Frame]]:
    """Lines to batches: `header` takes the lines it knows, `frame` parses the others;
    a line `frame` refuses is counted with its number and skipped."""
    batch: list[Frame] = []
    for lineno, line in _lines(path):
        if header(line):
            continue
        try:
            _decodable(line)
            got = frame(line.split())
        except (ValueError, IndexError) as e:
            stats.bad(f"{path}:{lineno}", f"{e or f'not a {kind} frame line'}: {line[:60]!r}")
            continue
        if got is not None:
            batch.append(got)
            if len(batch) >= BATCH:
                stats.frames += len(batch)
                yield batch
                batch = []
    if batch:
        stats.frames += len(batch)
        yield batch


# ------------------------------------------------------------------ Vector ASC

_ASC_HEADER = re.compile(r"(date|base|internal events|no internal events|//|begin triggerblock"
                         r"|end triggerblock)", re.IGNORECASE)


def asc_batches(path: Path, stats: SourceStats) -> Iterator[list[Frame]]:
    """`<t> <ch> <id>[x] Rx|Tx d|r <dlc> <data>...`, `<t> CANFD <ch> Rx|Tx <id> ...`;
    times are offsets from the trigger block's (or `date` line's) start."""
    start = 0.0
    base = 16

    def header(line: str) -> bool:
        nonlocal start, base
        low = line.lower()
        if not _ASC_HEADER.match(low):
            return False
        if low.startswith(("date ", "begin triggerblock ")):
            start = _asc_start(line) or start
        elif low.startswith("base "):
            base = 10 if low.split()[1:2] == ["dec"] else 16
        return True

    return line_batches(path, stats, "ASC", header,
                    lambda tok: _asc_line(tok, start, base, stats))


def _asc_start(line: str) -> float | None:
    # "date Wed Nov  5 21:37:40 2025", "Begin Triggerblock Tue Nov 14 22:13:20.500 2023"
    parts = line.split(None, 3 if line[:1] in "Bb" else 2)
    try:
        return ASCReader._datetime_to_timestamp(parts[-1])
    except (ValueError, IndexError):
        return None


def _asc_line(tok: list[str], start: float, base: int, stats: SourceStats) -> Frame | None:
    offset = float(tok[0])
    ts = start + offset
    if not ts_ok(ts):
        msg = f"timestamp {tok[0]} is not a date between 1970 and 9999"
        raise ValueError(msg)
    chan = tok[1]
    if chan == "CANFD":  # <ch> Rx|Tx <id> [name] <brs> <esi> <dlc> <len> <data>...
        chan, rest = tok[2], tok[3:]
        if rest[1].lower() == "errorframe":
            stats.error_frames += 1
            return None
        key = _frame_id(rest[1], base)
        i = 2 if rest[2].isdigit() else 3  # a symbolic name may follow the id
        length = int(rest[i + 3])
        if length == 0:
            stats.remote_frames += 1
            return None
        return ts, key, _data(rest[i + 4:], length, base), chan
    if not chan.isdigit():
        return None  # other events: statistics, J1939, system variables
    what = tok[2]
    if what.lower() == "errorframe":
        stats.error_frames += 1
        return None
    if what.endswith(":") or what.lower() in ("start", "statistic:", "status:"):
        return None  # chip status, "Start of measurement"
    key = _frame_id(what, base)
    if tok[3] not in ("Rx", "Tx"):
        msg = f"direction {tok[3]!r} is not Rx or Tx"
        raise ValueError(msg)
    if tok[4].lower() == "r":
        stats.remote_frames += 1
        return None
    if tok[4].lower() != "d":
        msg = f"frame type {tok[4]!r} is not d or r"
        raise ValueError(msg)
    dlc = int(tok[5], base)
    if not 0 <= dlc <= 15:
        msg = f"DLC {dlc} is not 0..15"
        raise ValueError(msg)
    return ts, key, _data(tok[6:], min(8, dlc2len(dlc)), base), chan


# ------------------------------------------------------------------ PEAK TRC

_TRC_DATA = frozenset(("DT", "FD", "FB", "FE", "BI", "Rx", "Tx"))
_TRC_FD = frozenset(("FD", "FB", "FE", "BI"))
_TRC_ERROR = frozenset(("ER", "EC", "EV", "ST", "Error", "Warng", "Overrun", "Buslight",
                        "Busheavy", "Busoff", "ERROR", "Hwstatus"))


def trc_batches(path: Path, stats: SourceStats) -> Iterator[list[Frame]]:
    """PEAK TRC 1.0 to 2.1, read by token shape rather than by the declared columns,
    which real files get wrong (see ../shared/realdata/orion-we-ev/*.trc)."""
    start = 0.0
    scale = 0.001  # PEAK writes offsets in ms
    dlc_code = False

    def header(line: str) -> bool:
        nonlocal start, scale, dlc_code
        if not line.startswith(";"):
            return False
        if line.startswith(";$STARTTIME="):
            start, scale = _trc_start(line.split("=", 1)[1].strip(), start, scale)
        elif line.startswith(";$COLUMNS="):
            cols = line.split("=", 1)[1].split(",")
            dlc_code = "L" in cols and "l" not in cols
        return True

    return line_batches(path, stats, "TRC", header,
                    lambda tok: _trc_line(tok, start, scale, dlc_code, stats))


def _trc_start(text: str, start: float, scale: float) -> tuple[float, float]:
    try:
        days = float(text)
    except ValueError:
        # Not PEAK's day count but a date: written by converters that also write the
        # offsets in seconds (6 decimals), as in the Orion capture.
        try:
            return datetime.fromisoformat(text).timestamp(), 1.0
        except ValueError:
            return start, scale
    ts = (days - _EPOCH_DAYS) * 86400.0
    return (ts, scale) if ts_ok(ts) else (start, scale)


def _trc_line(tok: list[str], start: float, scale: float, dlc_code: bool,
              stats: SourceStats) -> Frame | None:
    number = tok[0].rstrip(")")
    if not number.isdigit():
        msg = "does not start with a message number"
        raise ValueError(msg)
    offset = float(tok[1])
    ts = start + offset * scale
    if not ts_ok(ts):
        msg = f"time offset {tok[1]} does not give a date between 1970 and 9999"
        raise ValueError(msg)
    rest = tok[2:]
    kinds = [t for t in rest[:3] if t in _TRC_ERROR or t == "RR"]
    if kinds:
        if kinds[0] == "RR":
            stats.remote_frames += 1
        else:
            stats.error_frames += 1
        return None
    fd = any(t in _TRC_FD for t in rest[:2])
    i = next((k for k, t in enumerate(rest) if len(t) >= 3 and all(c in _HEX for c in t)),
             -1)
    if i < 0:
        msg = "no CAN id"
        raise ValueError(msg)
    ident = rest[i]
    can_id = int(ident, 16)
    if can_id > 0x1FFFFFFF:
        msg = f"id {ident!r} is wider than 29 bits"
        raise ValueError(msg)
    # PEAK pads 11-bit ids to 4 digits and 29-bit ones to 8; converters that write
    # offsets in seconds pad every id to 8, so there only the value can tell.
    wide = len(ident) > 4 and scale != 1.0
    key = can_id | EXTENDED_FLAG if wide or can_id > 0x7FF else can_id
    chans = [t for t in rest[:i] if t not in _TRC_DATA and t != "-"]
    chan = chans[0] if chans else "1"
    j = i + 1
    while j < len(rest) and rest[j] in ("Rx", "Tx", "-"):
        j += 1
    n = int(rest[j])
    if fd and dlc_code:
        n = dlc2len(n)
    if not 0 <= n <= 64:
        msg = f"length {n} is not 0..64"
        raise ValueError(msg)
    data = rest[j + 1:]
    if data[:1] == ["RTR"]:
        stats.remote_frames += 1
        return None
    return ts, key, _data(data, n, 16), chan
