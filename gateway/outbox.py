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

Exceptions::

    OutboxError   the outbox cannot be used: a corrupt file or one that is not an outbox,
                  an unwritable state directory, a disk full or I/O error on write.
                  The message names the path and the fix; a bad file is never recreated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from gateway.model import FaultEvent, Value

__all__ = ["FILENAME", "Outbox", "OutboxError", "Row"]

log = logging.getLogger(__name__)

FILENAME = "outbox.sqlite"  # conventional name inside the state directory
SCHEMA_VERSION = 1
_MEMORY = ":memory:"
_SCHEMA = (
    "CREATE TABLE events(seq INTEGER PRIMARY KEY, event_id TEXT UNIQUE NOT NULL,"
    " pack_id TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL)",
    "CREATE INDEX events_created ON events(created)",
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value)",
)

Row = tuple[int, str, bytes]  # (seq, topic, payload)
_MakePayload = Callable[[int, str], dict[str, Value]]


class OutboxError(Exception):
    """The outbox file or its directory cannot be used; the message says how to fix it."""


@dataclass(slots=True)
class _Notice:
    """The newest overflow notice, kept in meta so drops can be folded into it."""

    seq: int
    first: int
    last: int
    count: int
    pack_id: str
    by_count: bool


class Outbox:
    """Pending fault events in SQLite; see the module docstring. Build with `Outbox.open`."""

    __slots__ = ("_conn", "_dropped_total", "_gateway_id", "_handed_out", "_last_seq",
                 "_max_age_s", "_max_events", "_overflow_topic", "_path")

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
            with box._write("trimming on open"):
                box._trim(time.time())
        except BaseException:
            conn.close()
            raise
        return box

    @property
    def path(self) -> str:
        return self._path

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def dropped_total(self) -> int:
        return self._dropped_total

    def append(self, events: list[tuple[FaultEvent, str]]) -> list[Row]:
        """Store (event, topic) pairs in one transaction; return (seq, topic, payload) each.

        When the bounds then drop rows, an overflow notice is stored too (see `pending`);
        a batch larger than ``max_events`` loses its own oldest events this way.
        """
        if not events:
            return []
        now = time.time()
        out: list[Row] = []
        with self._write("append"):
            for event, topic in events:
                out.append(self._insert(topic, event.pack_id, event.payload, now))
            self._trim(now)
        return out

    def pending(self, limit: int = 100) -> list[Row]:
        """Up to ``limit`` undelivered events, oldest first; expired ones are dropped first."""
        with self._write("expiring old events"):
            self._trim(time.time())
        try:
            rows: list[Row] = [
                (int(seq), str(topic), bytes(payload)) for seq, topic, payload in
                self._conn.execute(
                    "SELECT seq, topic, payload FROM events ORDER BY seq LIMIT ?", (limit,))]
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {self._path}: reading pending events failed: {exc}") \
                from exc
        if rows:
            self._handed_out = max(self._handed_out, rows[-1][0])
        return rows

    def ack(self, seq: int) -> None:
        """Forget a delivered event; an unknown seq is ignored."""
        # A lost ack costs a duplicate with the same event_id, never an event, so this
        # commit skips its fsync; the next append's commit (or close) makes it durable.
        try:
            self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("DELETE FROM events WHERE seq = ?", (seq,))
            finally:
                self._conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {self._path}: ack of seq {seq} failed: {exc}") from exc

    def depth(self) -> int:
        try:
            return int(self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {self._path}: counting events failed: {exc}") from exc

    def close(self) -> None:
        self._conn.close()  # idempotent; checkpoints the WAL into the main file

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
        self._last_seq = int(self._meta("last_seq") or 0)
        self._dropped_total = int(self._meta("dropped_total") or 0)

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

    def _insert(self, topic: str, pack_id: str, make: _MakePayload, now: float) -> Row:
        seq = self._last_seq + 1
        event_id = f"{self._gateway_id}-{seq}-{uuid.uuid4().hex[:12]}"
        payload = _encode(make(seq, event_id))
        self._conn.execute(
            "INSERT INTO events(seq, event_id, pack_id, topic, payload, created)"
            " VALUES (?, ?, ?, ?, ?, ?)", (seq, event_id, pack_id, topic, payload, now))
        self._set_meta("last_seq", seq)
        self._last_seq = seq
        return seq, topic, payload

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
        if st.st_mode & 0o077:
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
