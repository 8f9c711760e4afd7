"""Log formats python-can does not read: the loggers people use.

* **SavvyCAN / GVRET CSV** (`Time Stamp,ID,Extended,Dir,Bus,LEN,D1..D8`; older files
  lack `Dir`): timestamps in microseconds, often relative to the capture start. Told
  apart from python-can's own CSV (`timestamp,arbitration_id,...`) by the header.
* **Any line-oriented text logger**, described by a `LineFormat`: a regular expression
  with named groups `ts`, `id`, `data` (optional `ext`, `channel`), the timestamp's
  unit and base. `LineFormat.parse("hex-ms")` is the preset for the SD-card loggers'
  `TTTTTTTTxIIIIIIIIDDDD...` lines (hex milliseconds, `x`, 29-bit hex id, hex data).

Relative timestamps (a log starting near 0) are anchored with `start` (epoch seconds);
without it the first frame is taken as 1970-01-01 and `source.read_log` warns once.
Every reader counts a bad line with its line number and goes on.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.decode.dbc import EXTENDED_FLAG
from gateway.errors import EXIT_USAGE, GatewayError

if TYPE_CHECKING:
    from gateway.source.logs import Frame, SourceStats

log = logging.getLogger("gateway.source")
RELATIVE_BEFORE = 10 * 365 * 86400.0  # a first timestamp before 1980: relative time
_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


class FormatError(GatewayError, ValueError):
    """A --format / log_format spec that cannot work; the message says how to write it."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True, slots=True)
class LineFormat:
    regex: re.Pattern[str]
    ts_unit: str = "s"
    ts_base: int = 10
    name: str = "custom"

    PRESETS = {
        # SD-card loggers (e.g. a Formula Student team's): TTTTTTTTxIIIIIIIIDDDD...
        "hex-ms": (r"^(?P<ts>[0-9A-Fa-f]{8})x(?P<id>[0-9A-Fa-f]{8})(?P<data>[0-9A-Fa-f]*)$",
                   "ms", 16),
    }

    @classmethod
    def parse(cls, spec: str, ts_unit: str | None = None, ts_base: int | None = None
              ) -> LineFormat:
        """A preset name, or a regex with named groups ts, id and data."""
        if spec in cls.PRESETS:
            rx, unit, base = cls.PRESETS[spec]
            return cls.build(rx, ts_unit or unit, ts_base or base, spec)
        return cls.build(spec, ts_unit or "s", ts_base or 10, "custom")

    @classmethod
    def build(cls, regex: str, ts_unit: str, ts_base: int, name: str = "custom") -> LineFormat:
        try:
            rx = re.compile(regex)
        except re.error as e:
            msg = f"log format: not a regular expression: {e}"
            raise FormatError(msg) from e
        missing = {"ts", "id", "data"} - set(rx.groupindex)
        if missing:
            msg = (f"log format: the regular expression needs the named groups "
                   f"{', '.join(sorted(missing))}, e.g. "
                   r"'^(?P<ts>\d+\.\d+) (?P<id>[0-9A-F]+) (?P<data>[0-9A-F]*)$'"
                   f" (or a preset: {', '.join(cls.PRESETS)})")
            raise FormatError(msg)
        if ts_unit not in _UNITS:
            msg = f"log format: timestamp unit {ts_unit!r}: use one of {', '.join(_UNITS)}"
            raise FormatError(msg)
        if ts_base not in (10, 16):
            msg = f"log format: timestamp base {ts_base}: use 10 or 16"
            raise FormatError(msg)
        return cls(rx, ts_unit, ts_base, name)


def anchor(batches: Iterator[list[Frame]], path: Path, start: float | None,
           stats: SourceStats) -> Iterator[list[Frame]]:
    """Shift a log whose timestamps are relative (first frame before 1980) to `start`;
    without `start`, warn once: its `ts` would be published in 1970. A `start` given for
    a log with absolute times is ignored, with a warning. A frame that anchoring moves
    past 9999 (a long log started late) is a counted bad line, not a crash later on."""
    from gateway.source.logs import ts_ok

    shift: float | None = None
    for batch in batches:
        if shift is None and batch:
            first = batch[0][0]
            shift = 0.0
            if first < RELATIVE_BEFORE:
                if start is not None:
                    shift = start - first
                else:
                    log.warning("%s: timestamps look relative (the first frame is at %.3f s): "
                                "published times will be in 1970; give --start TIME "
                                "(e.g. --start 2025-11-22T16:20:54) to anchor them", path, first)
            elif start is not None:
                log.warning("%s: timestamps are absolute (the first frame is at %s): "
                            "--start is ignored; it only anchors a log with relative times",
                            path, dt.datetime.fromtimestamp(first, dt.UTC).isoformat())
        if not shift:
            yield batch
            continue
        out = [(f[0] + shift, f[1], f[2], f[3]) for f in batch]
        if not ts_ok(out[-1][0]) or not all(ts_ok(f[0]) for f in out):
            kept = [f for f in out if ts_ok(f[0])]
            for f in out:
                if not ts_ok(f[0]):
                    stats.bad(f"{path} (frame at {f[0] - shift:.6f} s)",
                              f"anchored with --start it would be at {f[0]!r}, "
                              "not a time between 1970 and 9999")
            stats.frames -= len(out) - len(kept)
            out = kept
        yield out


def _key(ident: str, ext: bool | None) -> int:
    i = int(ident, 16)
    if i > 0x1FFFFFFF:
        msg = f"id {ident} is more than 29 bits"
        raise ValueError(msg)
    if ext is None:
        ext = i > 0x7FF
    return i | EXTENDED_FLAG if ext else i


# ---------------------------------------------------------------- GVRET CSV

def is_gvret(head: str) -> bool:
    cols = [c.strip().lower() for c in head.lstrip("\ufeff").split(",")]
    return cols[:2] == ["time stamp", "id"] and "extended" in cols and "len" in cols


def gvret_batches(path: Path, stats: SourceStats) -> Iterator[list[Frame]]:
    from gateway.source.logtext import (
        line_batches as batches,  # it imports source, which imports us
    )

    with path.open("r", encoding="utf-8-sig", errors="replace") as f:
        cols = [c.strip().lower() for c in f.readline().split(",")]
    i_ts, i_id, i_ext, i_len = (cols.index(c) for c in ("time stamp", "id", "extended", "len"))
    i_bus = cols.index("bus") if "bus" in cols else None
    i_d1 = cols.index("d1") if "d1" in cols else i_len + 1

    def frame(tokens: list[str]) -> Frame:
        f = "".join(tokens).split(",")
        length = int(f[i_len])
        if not 0 <= length <= 64:
            msg = f"length {length} is not 0-64"
            raise ValueError(msg)
        data = bytes(int(x, 16) for x in f[i_d1:i_d1 + length])
        if len(data) != length:
            msg = f"LEN says {length} bytes, the line has {len(data)}"
            raise ValueError(msg)
        ext = f[i_ext].strip().lower() in ("true", "1", "yes")
        return (_ts(int(f[i_ts]) * 1e-6), _key(f[i_id].strip(), ext), data,
                f[i_bus].strip() if i_bus is not None else "0")
    return batches(path, stats, "GVRET CSV", is_gvret, frame)


# ---------------------------------------------------------------- user line formats

def line_batches(path: Path, stats: SourceStats, fmt: LineFormat) -> Iterator[list[Frame]]:
    """Lines of a text logger; runs of blanks count as one space for the expression."""
    from gateway.source.logtext import (
        line_batches as batches,  # it imports source, which imports us
    )

    unit = _UNITS[fmt.ts_unit]

    def frame(tokens: list[str]) -> Frame:
        m = fmt.regex.search(" ".join(tokens))
        if m is None:
            msg = f"does not match the {fmt.name} log format"
            raise ValueError(msg)
        ts = int(m["ts"], 16) * unit if fmt.ts_base == 16 else float(m["ts"]) * unit
        raw_ext = m.groupdict().get("ext")
        ext = None if raw_ext is None else raw_ext.lower() in ("1", "x", "true", "e")
        data = bytes.fromhex(m["data"].replace(" ", ""))
        if len(data) > 64:
            msg = f"{len(data)} data bytes"
            raise ValueError(msg)
        return (_ts(ts), _key(m["id"], ext), data, m.groupdict().get("channel") or "0")
    return batches(path, stats, fmt.name, lambda _line: False, frame)


def _ts(ts: float) -> float:
    from gateway.source.logs import ts_ok

    if not ts_ok(ts):
        msg = f"timestamp {ts!r} is not a time between 1970 and 9999"
        raise ValueError(msg)
    return ts


def parse_start(text: str) -> float:
    """--start: epoch seconds, or an ISO date and time (UTC unless it has an offset),
    between 1970 and 9999 (NaN, inf, 1e20 or -5 would only fail later, frame by frame)."""
    from gateway.source.logs import TS_MAX, ts_ok

    how = ("give epoch seconds or an ISO date and time between 1970 and 9999, "
           "e.g. 2025-11-22T16:20:54 (UTC) or 2025-11-22T17:20:54+01:00")
    try:
        t0 = float(text)
    except ValueError:
        try:
            t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            msg = f"--start {text!r}: {how}"
            raise FormatError(msg) from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.UTC)
        t0 = t.timestamp()
    if not ts_ok(t0):
        msg = f"--start {text!r} is not a time between 1970 and 9999 (0 to {TS_MAX:.0f}): {how}"
        raise FormatError(msg)
    return t0


def open_log(path: Path, stats: SourceStats, line_format: LineFormat | None
             ) -> Iterator[list[Frame]] | None:
    """Our reader for `path` when it needs one (a line format, GVRET CSV); None to let
    source.read_log choose among the others (PEAK .trc variants: logtext.py)."""
    if line_format is not None:
        return line_batches(path, stats, line_format)
    try:
        with path.open("r", encoding="utf-8-sig", errors="replace") as f:
            head = [f.readline() for _ in range(8)]
    except OSError:
        return None
    if head and is_gvret(head[0]):
        return gvret_batches(path, stats)
    return None
