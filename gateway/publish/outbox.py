"""Durable outbox for fault events: one SQLite file, so an event survives a power cut.

The fault stage calls `append`, which returns only once the batch is on disk (WAL with
synchronous=FULL: one fsync per batch). The publisher sends `pending()` oldest first and
calls `ack(seq)` on the broker's PUBACK. Delivery is at least once: a crash between PUBACK
and ack sends the event again with the same ``event_id``, which consumers deduplicate on.

``seq`` is strictly increasing without gaps, across restarts too: ``meta.last_seq`` is
kept even when the events table is empty. Rows leave only by `ack` or by the bounds
(``max_events``, ``max_age_s``), and a bound never drops silently: it adds to the
persistent ``dropped_total`` and leaves one ``outbox_overflow`` event naming the count and
the seq range dropped. While that notice has not been handed out by `pending`, later drops
are folded into it rather than adding a notice per append, so a long outage does not fill
the outbox with notices.

Storage failures degrade, never crash. When a write fails (disk full, I/O error), the
events keep their seq and wait in memory (at most ``HELD_MAX``; beyond that the oldest are
dropped and one ``outbox_overflow`` notice says which), a ``storage_error`` event is
raised, and the write is retried with backoff (`maintain`); once it works the held events
are stored and ``storage_error`` is cleared. Held events are handed out by `pending` like
stored ones, so they are delivered while the disk is full, but lost if the process dies
before they could be written.

``seq`` is never given twice: the highest seq ever given is also kept in a small sidecar
file (``<outbox>.seq``, two checksummed slots overwritten in place, so updating it needs
no new disk space). An outbox file that was emptied (``: > outbox.sqlite``), deleted or
replaced by an older copy continues after that mark, with a logged error naming the
range of seqs whose events are gone. A held event is handed out only once the mark
covers its seq.

Exceptions::

    OutboxError   the outbox cannot be opened: a corrupt file or one that is not an
                  outbox, an unwritable state directory. The message names the path
                  and the fix; a bad file is never recreated. After a successful open
                  nothing raises it: a failing read or write is a storage error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import stat
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from gateway.errors import EXIT_CONFIG, GatewayError
from gateway.model import FaultEvent, Value, iso_ts

__all__ = ["FILENAME", "HELD_MAX", "Outbox", "OutboxError", "Row", "SeqMark"]

log = logging.getLogger("gateway.outbox")  # its name before the package layout: journal filters use it

FILENAME = "outbox.sqlite"  # conventional name inside the state directory
SCHEMA_VERSION = 1
_MEMORY = ":memory:"
_SCHEMA = (
    "CREATE TABLE events(seq INTEGER PRIMARY KEY, event_id TEXT UNIQUE NOT NULL,"
    " pack_id TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL)",
    "CREATE INDEX events_created ON events(created)",
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value)",
)

HELD_MAX = 10_000  # events kept in memory while writing fails (also <= max_events / 2)
RETRY_MAX_S = 30.0  # longest wait between two attempts to write held events
Row = tuple[int, str, bytes]  # (seq, topic, payload)
_MakePayload = Callable[[int, str], dict[str, Value]]


class OutboxError(GatewayError):
    """The outbox file or its directory cannot be used; the message says how to fix it."""

    exit_code = EXIT_CONFIG


@dataclass(slots=True)
class _Notice:
    """The newest overflow notice, kept in meta so drops can be folded into it."""

    seq: int
    first: int
    last: int
    count: int
    pack_id: str
    by_count: bool


@dataclass(slots=True)
class _Held:
    """An event with its seq, waiting in memory because writing it failed."""

    seq: int
    event_id: str
    pack_id: str
    topic: str
    payload: bytes
    created: float


class SeqMark:
    """The highest seq ever given, in a 64-byte file beside the outbox.

    Two 32-byte slots (magic, generation, value, CRC32) are overwritten in place in
    turn and fdatasync'ed: a torn write spoils at most one slot, and no write needs a
    new block, so the mark can still move while the disk is full.
    """

    _SLOT = struct.Struct("<8sQQI4x")
    _MAGIC = b"BMSGSEQ1"

    __slots__ = ("_fd", "_gen", "path", "value")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._gen = 0
        self.value = 0
        try:
            raw = os.pread(self._fd, 2 * self._SLOT.size, 0)
            for k in range(2):
                chunk = raw[k * self._SLOT.size:(k + 1) * self._SLOT.size]
                if len(chunk) < self._SLOT.size:
                    continue
                magic, gen, value, crc = self._SLOT.unpack(chunk)
                if magic == self._MAGIC and crc == zlib.crc32(chunk[:24]) and gen >= self._gen:
                    self._gen, self.value = gen, value
            if len(raw) < 2 * self._SLOT.size:
                if raw.strip(b"\0"):
                    log.warning("outbox seq mark %s is damaged; rebuilding it", path)
                # allocate both slots now, while there is room
                os.pwrite(self._fd, raw.ljust(2 * self._SLOT.size, b"\0"), 0)
                os.fsync(self._fd)
        except OSError:
            os.close(self._fd)
            raise

    def write(self, value: int) -> None:
        """Record ``value`` durably (raises OSError); never moves the mark back."""
        if value <= self.value:
            return
        gen = self._gen + 1
        head = struct.pack("<8sQQ", self._MAGIC, gen, value)
        slot = self._SLOT.pack(self._MAGIC, gen, value, zlib.crc32(head))
        os.pwrite(self._fd, slot, (gen % 2) * self._SLOT.size)
        os.fdatasync(self._fd)
        self._gen, self.value = gen, value

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Outbox:
    """Pending fault events in SQLite; see the module docstring. Build with `Outbox.open`."""

    __slots__ = ("_conn", "_dropped_total", "_gateway_id", "_handed_out", "_held",
                 "_held_max", "_held_notice", "_last_seq", "_mark", "_mark_failed",
                 "_max_age_s", "_max_events", "_overflow_topic", "_path", "_retries",
                 "_retry_at", "_since", "_storage_error", "_storage_topic", "_unacked")

    def __init__(self, conn: sqlite3.Connection, path: str, *, max_events: int,
                 max_age_s: float, gateway_id: str, overflow_topic: str | None) -> None:
        self._conn = conn
        self._path = path
        self._max_events = max_events
        self._max_age_s = max_age_s
        self._gateway_id = gateway_id
        self._overflow_topic = overflow_topic
        self._last_seq = 0
        self._dropped_total = 0
        # Highest seq returned by pending() in this process: a notice at or below it may
        # be on the wire, so it must not change any more.
        self._handed_out = 0
        # Degraded mode (a write failed): events in seq order, acks not yet written.
        self._held: dict[int, _Held] = {}
        # at most half the stored bound, so storing the held events after recovery can
        # only push out older stored rows, never the held overflow notice
        self._held_max = max(2, min(HELD_MAX, max_events // 2))
        self._held_notice: _Notice | None = None
        self._unacked: set[int] = set()
        self._storage_error = ""
        self._since = 0.0
        self._storage_topic = overflow_topic or ""
        self._retry_at = 0.0
        self._retries = 0
        self._mark: SeqMark | None = None
        self._mark_failed = False

    @classmethod
    def open(cls, path: Path | str, *, max_events: int, max_age_s: float, gateway_id: str,
             overflow_topic: str | None = None) -> Outbox:
        """Open or create the outbox at ``path`` (a file, e.g. ``state_dir / FILENAME``).

        ``overflow_topic`` is where overflow notices go; by default the topic of the
        newest dropped event. Bounds are enforced once on open, so stale events from
        before a long shutdown are not delivered.
        """
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 2:
            msg = ("max_events must be an integer >= 2 (room for the overflow notice), "
                   f"got {max_events!r}")
            raise ValueError(msg)
        if not (isinstance(max_age_s, int | float) and math.isfinite(max_age_s)
                and max_age_s > 0):
            msg = f"max_age_s must be a positive number of seconds, got {max_age_s!r}"
            raise ValueError(msg)
        if not gateway_id or any(c.isspace() for c in gateway_id):
            msg = f"gateway_id must be non-empty without whitespace, got {gateway_id!r}"
            raise ValueError(msg)
        where = str(path)
        if where != _MEMORY:
            _prepare_file(Path(path))
        try:
            conn = sqlite3.connect(where, timeout=1.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise _open_error(where, exc) from exc
        box = cls(conn, where, max_events=max_events, max_age_s=max_age_s,
                  gateway_id=gateway_id, overflow_topic=overflow_topic)
        try:
            box._setup()
            if where != _MEMORY:
                box._open_mark(Path(path))
            with box._write("trimming on open"):
                box._trim(time.time())
            box._sync_mark()
        except BaseException:
            box.close()
            raise
        return box

    def _open_mark(self, path: Path) -> None:
        mark_path = path.with_name(path.name + ".seq")
        try:
            self._mark = mark = SeqMark(mark_path)
        except OSError as exc:
            msg = (f"cannot use the outbox seq mark {mark_path}: {exc.strerror or exc}; it "
                   "must be a regular file the gateway user can read and write, next to "
                   "the outbox")
            raise OutboxError(msg) from exc
        if mark.value > self._last_seq:
            # The file was emptied, deleted or replaced by an older copy: events after
            # its last seq are gone, and their seqs must not be given again.
            log.error("outbox %s ends at seq %d but seq %d was already given (the file was "
                      "emptied or replaced): events %d..%d are lost; continuing after %d",
                      self._path, self._last_seq, mark.value, self._last_seq + 1,
                      mark.value, mark.value)
            with self._write("moving past the seq mark"):
                self._last_seq = mark.value
                self._set_meta("last_seq", mark.value)

    @property
    def path(self) -> str:
        return self._path

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def dropped_total(self) -> int:
        return self._dropped_total

    @property
    def storage_error(self) -> str:
        """Why writing fails now ("" while it works); events are held in memory meanwhile."""
        return self._storage_error

    def faults(self) -> list[dict[str, Value]]:
        """The gateway fault for the status topic's `faults` list while writing fails."""
        if not self._storage_error:
            return []
        return [{"code": "storage_error", "severity": "critical", "since": iso_ts(self._since),
                 "held": len(self._held), "message": self._storage_error}]

    @property
    def held(self) -> int:
        """Events waiting in memory for the disk (0 while writing works)."""
        return len(self._held)

    def append(self, events: list[tuple[FaultEvent, str]]) -> list[Row]:
        """Store (event, topic) pairs in one transaction; return (seq, topic, payload) each.

        When the bounds then drop rows, an overflow notice is stored too (see `pending`);
        a batch larger than ``max_events`` loses its own oldest events this way. When
        writing fails, the events are held in memory instead (module docstring); every
        event gets its seq either way.
        """
        if not events:
            return []
        now = time.time()
        self.maintain(now)
        entries = [self._new(topic, event.pack_id, event.payload, now)
                   for event, topic in events]
        self._store_or_hold(entries, now)
        return [(h.seq, h.topic, h.payload) for h in entries]

    def maintain(self, now: float | None = None) -> bool:
        """Retry writing held events and acks when due; True when they are now stored."""
        if not self._storage_error and not self._held and not self._unacked:
            return False
        now = time.time() if now is None else now
        if now < self._retry_at:
            return False
        held = list(self._held.values())
        try:
            with self._write("writing held events"):
                for h in held:
                    self._store(h)
                self._conn.executemany("DELETE FROM events WHERE seq = ?",
                                       [(s,) for s in sorted(self._unacked)])
                # a real write even when nothing is held: an empty transaction
                # succeeds on a full disk and would clear storage_error too early
                self._set_meta("last_seq", self._last_seq)
                self._set_meta("dropped_total", self._dropped_total)
                self._trim(now)
        except OutboxError as exc:
            self._failed(exc, now)
            return False
        for h in held:
            self._held.pop(h.seq, None)
        self._unacked.clear()
        self._held_notice = None
        self._sync_mark()
        if self._storage_error:
            log.warning("outbox %s: writing works again; %d held events stored",
                        self._path, len(held))
            was, self._storage_error = self._storage_error, ""
            self._retries = 0
            cleared = self._storage_event("cleared", f"outbox writable again (was: {was})", now)
            self._store_or_hold([self._new(self._storage_topic, "gateway", cleared.payload,
                                           now)], now)
        return True

    def pending(self, limit: int = 100) -> list[Row]:
        """Up to ``limit`` undelivered events, oldest first; expired ones are dropped first."""
        now = time.time()
        self.maintain(now)
        if not self._storage_error:
            try:
                with self._write("expiring old events"):
                    self._trim(now)
            except OutboxError as exc:
                log.debug("%s", exc)  # expiry waits for the next call; delivery must not
        try:
            rows: list[Row] = [
                (int(seq), str(topic), bytes(payload)) for seq, topic, payload in
                self._conn.execute(
                    "SELECT seq, topic, payload FROM events ORDER BY seq LIMIT ?",
                    (limit + len(self._unacked),)) if seq not in self._unacked][:limit]
        except sqlite3.Error as exc:
            # stored events wait for the disk; held ones (newer) can still go out
            self._failed(OutboxError(f"outbox {self._path}: reading pending events failed: "
                                     f"{exc}"), now)
            rows = []
        # held events are newer than every stored one; hand out only those whose seq the
        # mark already covers, so a crash cannot give their seq again
        covered = self._mark.value if self._mark is not None else self._last_seq
        for h in self._held.values():
            if len(rows) >= limit or h.seq > covered:
                break
            rows.append((h.seq, h.topic, h.payload))
        if rows:
            self._handed_out = max(self._handed_out, rows[-1][0])
        return rows

    def ack(self, seq: int) -> None:
        """Forget a delivered event; an unknown seq is ignored."""
        if self._held.pop(seq, None) is not None:
            return
        # A lost ack costs a duplicate with the same event_id, never an event, so this
        # commit skips its fsync; the next append's commit (or close) makes it durable.
        try:
            self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("DELETE FROM events WHERE seq = ?", (seq,))
            finally:
                self._conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            # the disk refuses even a delete: remember it, so the event is not sent again
            self._unacked.add(seq)
            self._failed(OutboxError(f"outbox {self._path}: ack of seq {seq} failed: {exc}"),
                         time.time())

    def depth(self) -> int:
        try:
            stored = int(self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        except sqlite3.Error as exc:  # the status must not die with the disk
            log.debug("outbox %s: counting events failed: %s", self._path, exc)
            stored = len(self._unacked)
        return stored - len(self._unacked) + len(self._held)

    def close(self) -> None:
        if self._storage_error:
            self._retry_at = 0.0
            self.maintain()
        if self._held:
            log.error("outbox %s: %d events could not be written before exit and are lost "
                      "(%s)", self._path, len(self._held), self._storage_error)
        self._conn.close()  # idempotent; checkpoints the WAL into the main file
        if self._mark is not None:
            self._mark.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _setup(self) -> None:
        conn = self._conn
        try:
            # Check before anything writes: a damaged file must stay exactly as found.
            problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise _corrupt(self._path, "; ".join(problems[:3]))
            mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            if mode != "wal" and self._path != _MEMORY:
                msg = (f"outbox {self._path}: cannot use WAL journal mode (got {mode!r}); "
                       "put the state directory on a local filesystem (not NFS/SMB)")
                raise OutboxError(msg)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._init_schema()
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.DatabaseError as exc:
            raise _open_error(self._path, exc) from exc
        self._load_meta()

    def _init_schema(self) -> None:
        conn = self._conn
        tables = {str(r[0]) for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            for sql in _SCHEMA:
                conn.execute(sql)
            conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [
                ("schema_version", SCHEMA_VERSION), ("last_seq", 0), ("dropped_total", 0)])
            return
        version = self._meta("schema_version") if "meta" in tables else None
        if version is None or "events" not in tables:
            msg = (f"{self._path} is an SQLite database but not a bms-gateway outbox "
                   f"(tables: {', '.join(sorted(tables))}); point the outbox at another "
                   "file or move this one aside")
            raise OutboxError(msg)
        if int(version) != SCHEMA_VERSION:
            msg = (f"outbox {self._path} has schema version {version}, this gateway "
                   f"supports {SCHEMA_VERSION}; run the matching gateway version to "
                   "deliver its events, or move the file aside (its events are then lost)")
            raise OutboxError(msg)
        # Never reuse a seq, even if meta was edited by hand behind our back.
        max_seq = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
        last = int(self._meta("last_seq") or 0)
        if max_seq > last:
            log.warning("outbox %s: last_seq %d is behind stored seq %d; continuing after it",
                        self._path, last, max_seq)
            self._set_meta("last_seq", max_seq)

    def _load_meta(self) -> None:
        # never back: after a failed transaction its seqs belong to held events
        self._last_seq = max(self._last_seq, int(self._meta("last_seq") or 0))
        self._dropped_total = max(self._dropped_total, int(self._meta("dropped_total") or 0))

    def _meta(self, key: str) -> int | float | str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: int | str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                           (key, value))

    @contextmanager
    def _write(self, what: str) -> Iterator[None]:
        """One IMMEDIATE transaction; on failure roll back and resync the cached counters."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("COMMIT")
        except BaseException as exc:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                    self._load_meta()
            except sqlite3.Error:
                log.exception("outbox %s: rollback failed", self._path)
            if isinstance(exc, sqlite3.Error):
                msg = f"outbox {self._path}: {what} failed: {exc}"
                raise OutboxError(msg) from exc
            raise

    def _new(self, topic: str, pack_id: str, make: _MakePayload, now: float) -> _Held:
        seq = self._last_seq + 1
        event_id = f"{self._gateway_id}-{seq}-{uuid.uuid4().hex[:12]}"
        self._last_seq = seq
        return _Held(seq, event_id, pack_id, topic, _encode(make(seq, event_id)), now)

    def _store(self, h: _Held) -> None:
        self._conn.execute(
            "INSERT INTO events(seq, event_id, pack_id, topic, payload, created)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (h.seq, h.event_id, h.pack_id, h.topic, h.payload, h.created))
        self._set_meta("last_seq", self._last_seq)

    def _insert(self, topic: str, pack_id: str, make: _MakePayload, now: float) -> Row:
        h = self._new(topic, pack_id, make, now)
        self._store(h)
        return h.seq, h.topic, h.payload

    def _store_or_hold(self, entries: list[_Held], now: float) -> None:
        if not self._storage_topic and entries:
            self._storage_topic = entries[0].topic
        if not self._storage_error:  # degraded: new events queue behind the held ones
            try:
                with self._write("append"):
                    for h in entries:
                        self._store(h)
                    self._trim(now)
            except OutboxError as exc:
                for h in entries:  # first: held stays in seq order
                    self._held[h.seq] = h
                entries = []
                self._failed(exc, now)
            else:
                self._sync_mark()
                return
        for h in entries:
            self._held[h.seq] = h
        self._bound_held(now)
        self._sync_mark()

    def _failed(self, exc: OutboxError, now: float) -> None:
        """A write failed: say so once (log and a storage_error event), retry later."""
        self._retries += 1
        self._retry_at = now + min(RETRY_MAX_S, 0.25 * 2 ** min(self._retries, 10))
        if self._storage_error:
            self._storage_error = str(exc)
            log.debug("%s (still failing, attempt %d)", exc, self._retries)
            return
        self._storage_error = str(exc)
        self._since = now
        log.error("%s; fault events are held in memory (up to %d) and the write is retried",
                  exc, self._held_max)
        raised = self._storage_event("raised", str(exc), now)
        h = self._new(self._storage_topic, "gateway", raised.payload, now)
        self._held[h.seq] = h

    def _storage_event(self, state: Literal["raised", "cleared"], message: str,
                       now: float) -> FaultEvent:
        return FaultEvent(ts=now, pack_id="gateway", code="storage_error",
                          severity="critical", state=state, source="gateway",
                          message=message, value=len(self._held), limit=self._held_max)

    def _bound_held(self, now: float) -> None:
        """Past ``_held_max`` drop the oldest held events; one notice says which."""
        excess = len(self._held) - self._held_max
        if excess <= 0:
            return
        live = self._held_notice
        if live is not None and (live.seq <= self._handed_out or live.seq not in self._held):
            live = None
        keep = live.seq if live is not None else 0
        if live is None:
            excess += 1  # room for the notice
        # the gateway's own notices (storage_error, this one) stay: they explain the gap
        drop = [seq for seq, h in self._held.items()
                if seq != keep and h.pack_id != "gateway"][:excess]
        if not drop:
            return
        for seq in drop:
            del self._held[seq]
        self._dropped_total += len(drop)
        if live is not None:
            notice = _Notice(seq=live.seq, first=min(live.first, drop[0]),
                             last=max(live.last, drop[-1]), count=live.count + len(drop),
                             pack_id="gateway", by_count=True)
            h = self._held[live.seq]
            h.payload = _encode(self._held_event(notice, now).payload(h.seq, h.event_id))
        else:
            notice = _Notice(seq=self._last_seq + 1, first=drop[0], last=drop[-1],
                             count=len(drop), pack_id="gateway", by_count=True)
            h = self._new(self._storage_topic, "gateway", self._held_event(notice, now).payload,
                          now)
            self._held[h.seq] = h
            log.warning("outbox %s: %s", self._path, self._held_event(notice, now).message)
        self._held_notice = notice

    def _held_event(self, notice: _Notice, now: float) -> FaultEvent:
        return FaultEvent(ts=now, pack_id="gateway", code="outbox_overflow", severity="warning",
                          state="raised", source="gateway",
                          message=(f"storage error: dropped {notice.count} events held in "
                                   f"memory (seq {notice.first}..{notice.last})"),
                          value=notice.count, limit=self._held_max)

    def _sync_mark(self) -> None:
        """Move the seq mark up to the last seq given; a failure is logged, retried later."""
        if self._mark is None or self._mark.value >= self._last_seq:
            return
        try:
            self._mark.write(self._last_seq)
        except OSError as exc:
            if not self._mark_failed:
                log.error("outbox seq mark %s cannot be written: %s; held events wait until "
                          "it can", self._mark.path, exc.strerror or exc)
            self._mark_failed = True
        else:
            self._mark_failed = False

    def _notice(self) -> tuple[_Notice, str] | None:
        """The newest overflow notice and its event_id, if still undelivered."""
        raw = self._meta("overflow")
        if raw is None:
            return None
        notice = _Notice(**json.loads(str(raw)))
        row = self._conn.execute("SELECT event_id FROM events WHERE seq = ?",
                                 (notice.seq,)).fetchone()
        return None if row is None else (notice, str(row[0]))

    def _trim(self, now: float) -> None:
        """Enforce the bounds inside the caller's transaction; record what was dropped."""
        conn = self._conn
        found = self._notice()
        # A notice not yet handed out is updated in place, so it is exempt from dropping.
        live = found if found is not None and found[0].seq > self._handed_out else None
        keep = live[0].seq if live is not None else 0
        cutoff = now - self._max_age_s
        dropped: list[tuple[int, str, str]] = conn.execute(
            "SELECT seq, pack_id, topic FROM events WHERE created < ? AND seq != ?"
            " ORDER BY seq", (cutoff, keep)).fetchall()
        total = int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        excess = total - len(dropped) - self._max_events
        if live is None and (dropped or excess > 0):
            excess += 1  # leave room for the notice about to be added
        by_count = excess > 0
        if by_count:
            dropped += conn.execute(
                "SELECT seq, pack_id, topic FROM events WHERE created >= ? AND seq != ?"
                " ORDER BY seq LIMIT ?", (cutoff, keep, excess)).fetchall()
            dropped.sort()
        if not dropped:
            return
        conn.executemany("DELETE FROM events WHERE seq = ?", [(r[0],) for r in dropped])
        self._dropped_total += len(dropped)
        self._set_meta("dropped_total", self._dropped_total)
        packs = {r[1] for r in dropped}
        pack_id = packs.pop() if len(packs) == 1 else "gateway"
        if live is not None:
            old, event_id = live
            notice = _Notice(seq=old.seq, first=min(old.first, dropped[0][0]),
                             last=max(old.last, dropped[-1][0]), count=old.count + len(dropped),
                             pack_id=old.pack_id if old.pack_id == pack_id else "gateway",
                             by_count=old.by_count or by_count)
            payload = _encode(self._notice_event(notice, now).payload(notice.seq, event_id))
            conn.execute("UPDATE events SET pack_id = ?, payload = ?, created = ? WHERE seq = ?",
                         (notice.pack_id, payload, now, notice.seq))
            log.debug("outbox %s: dropped %d more events", self._path, len(dropped))
        else:
            notice = _Notice(seq=self._last_seq + 1, first=dropped[0][0], last=dropped[-1][0],
                             count=len(dropped), pack_id=pack_id, by_count=by_count)
            event = self._notice_event(notice, now)
            self._insert(self._overflow_topic or dropped[-1][2], pack_id, event.payload, now)
            log.warning("outbox %s: %s", self._path, event.message)
        self._set_meta("overflow", json.dumps(asdict(notice)))

    def _notice_event(self, notice: _Notice, now: float) -> FaultEvent:
        span = f"seq {notice.first}..{notice.last}"
        if notice.by_count:
            message = f"outbox full: dropped {notice.count} oldest events ({span})"
            limit: float = self._max_events
        else:
            message = (f"outbox: dropped {notice.count} events older than "
                       f"{self._max_age_s:g} s ({span})")
            limit = self._max_age_s
        return FaultEvent(ts=now, pack_id=notice.pack_id, code="outbox_overflow",
                          severity="warning", state="raised", source="gateway",
                          message=message, value=notice.count, limit=limit)


def _encode(payload: dict[str, Value]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _prepare_file(path: Path) -> None:
    """Create the directory (0700) and the file (0600) ourselves, never world-readable.

    SQLite gives the -wal and -shm files it creates the main file's mode, so they are
    0600 too; no process-wide umask change is needed.
    """
    parent = path.parent
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        msg = (f"cannot create outbox {path}: {exc.filename or parent} is not a directory; "
               "set the state directory to a directory the gateway user owns")
        raise OutboxError(msg) from exc
    except OSError as exc:
        msg = (f"cannot create the state directory {parent} for outbox {path}: {exc.strerror}; "
               "create it (mode 0700) owned by the gateway user, e.g. StateDirectory= in "
               "the systemd unit")
        raise OutboxError(msg) from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        msg = (f"cannot use outbox {path}: directory {parent} is not writable by this user "
               "(SQLite creates -wal and -shm files next to the outbox); chown it to the "
               "gateway user or choose another state directory")
        raise OutboxError(msg)
    existed = path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        msg = (f"cannot open outbox {path}: {exc.strerror}; it must be a regular file "
               "readable and writable by the gateway user")
        raise OutboxError(msg) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            msg = f"outbox {path} is not a regular file; remove it or choose another path"
            raise OutboxError(msg)
        # a file that is not SQLite (a wrong --outbox) is left as it is: SQLite refuses
        # it as damaged next, and it must not be made 0600 on the way. Read, not
        # st_size: /proc and /sys files say 0 bytes and are not empty.
        ours = os.pread(fd, 16, 0) in (b"", b"SQLite format 3\x00")
        if st.st_mode & 0o077 and ours:
            log.warning("outbox %s had mode %o; restricting it to 0600", path,
                        stat.S_IMODE(st.st_mode))
            os.fchmod(fd, 0o600)
        if not existed:
            os.fsync(fd)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        try:
            if os.stat(side).st_mode & 0o077:
                os.chmod(side, 0o600)
        except FileNotFoundError:
            pass
    if not existed:
        # The new directory entry must survive a power cut too, not just the data.
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _corrupt(path: str, problem: str) -> OutboxError:
    return OutboxError(
        f"outbox {path} is damaged ({problem}); stop the gateway and move the file aside "
        f"(mv {path} {path}.corrupt, with its -wal/-shm files if present) to start an empty "
        f"outbox; unsent events in it are lost: inspect with sqlite3 {path}.corrupt .dump")


def _open_error(path: str, exc: sqlite3.Error) -> OutboxError:
    text = str(exc)
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return _corrupt(path, text)
    return OutboxError(
        f"cannot open outbox {path}: {text}; check that the gateway user can read and write "
        "the file and its directory and that the disk is not full")
