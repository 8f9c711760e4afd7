from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.model import FaultEvent
from gateway.publish.outbox import FILENAME, Outbox, OutboxError

ROOT = Path(__file__).resolve().parents[1]
GW = "gw1"


def _event(i: int, pack: str = "pack1") -> FaultEvent:
    return FaultEvent(ts=1_700_000_000.0 + i, pack_id=pack, code="cell_overvoltage",
                      severity="alarm", state="raised", source="bms",
                      message=f"event {i}", value=3.65, limit=3.6, cell=i)


def _open(path: Path | str, *, max_events: int = 1000, max_age_s: float = 86400.0) -> Outbox:
    return Outbox.open(path, max_events=max_events, max_age_s=max_age_s, gateway_id=GW)


def _append(box: Outbox, n: int, pack: str = "pack1") -> list[tuple[int, str, bytes]]:
    return box.append([(_event(i, pack), f"bms/{pack}/event") for i in range(n)])


def _seqs(box: Outbox) -> list[int]:
    return [seq for seq, _, _ in box.pending(10_000)]


def _overflow_notices(box: Outbox) -> list[dict[str, object]]:
    docs = [json.loads(p) for _, _, p in box.pending(10_000)]
    return [d for d in docs if d["code"] == "outbox_overflow"]


def test_append_returns_payload_and_stores_it(tmp_path: Path) -> None:
    with _open(tmp_path / FILENAME) as box:
        rows = box.append([(_event(1), "bms/pack1/event")])
        assert [(seq, topic) for seq, topic, _ in rows] == [(1, "bms/pack1/event")]
        doc = json.loads(rows[0][2])
        assert doc["seq"] == 1
        assert re.fullmatch(rf"{GW}-1-[0-9a-f]{{12}}", str(doc["event_id"]))
        assert doc == _event(1).payload(1, str(doc["event_id"]))
        assert rows[0][2] == json.dumps(doc, separators=(",", ":")).encode()
        assert box.pending() == rows
        assert box.depth() == 1
        assert box.last_seq == 1


def test_seq_continues_across_reopen_with_empty_table(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    with _open(path) as box:
        for seq, _, _ in _append(box, 3):
            box.ack(seq)
        assert box.depth() == 0
    with _open(path) as box:
        assert box.last_seq == 3
        assert [seq for seq, _, _ in _append(box, 2)] == [4, 5]


def test_ack_removes_only_that_row_and_pending_is_oldest_first(tmp_path: Path) -> None:
    with _open(tmp_path / FILENAME) as box:
        _append(box, 3)
        _append(box, 2)
        assert _seqs(box) == [1, 2, 3, 4, 5]
        assert [seq for seq, _, _ in box.pending(limit=2)] == [1, 2]
        box.ack(3)
        box.ack(99)  # unknown: ignored
        assert _seqs(box) == [1, 2, 4, 5]
        assert box.depth() == 4


def test_event_ids_are_unique(tmp_path: Path) -> None:
    with _open(tmp_path / FILENAME) as box:
        rows = _append(box, 200)
        ids = [json.loads(p)["event_id"] for _, _, p in rows]
        assert len(set(ids)) == 200
        assert all(str(i).startswith(f"{GW}-{seq}-") for i, (seq, _, _) in zip(ids, rows,
                                                                                strict=True))


def test_events_survive_sigkill_right_after_append(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    script = """
import os, signal, sys
from gateway.model import FaultEvent
from gateway.publish.outbox import Outbox
box = Outbox.open(sys.argv[1], max_events=1000, max_age_s=86400, gateway_id="gw1")
for batch in range(5):
    box.append([(FaultEvent(ts=1.0, pack_id="p", code="c", severity="info", state="raised",
                            source="bms", message=f"{batch}-{i}"), "t") for i in range(4)])
os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, str(path)], env=env, check=False,
                          capture_output=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert Path(f"{path}-wal").exists()  # nothing checkpointed: recovery is from the WAL
    with _open(path) as box:
        assert _seqs(box) == list(range(1, 21))
        assert box.last_seq == 20
        messages = [json.loads(p)["message"] for _, _, p in box.pending(100)]
        assert messages == [f"{b}-{i}" for b in range(5) for i in range(4)]


def test_garbage_file_raises_and_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    garbage = b"this is not sqlite\x00\xff" * 500
    path.write_bytes(garbage)
    with pytest.raises(OutboxError) as info:
        _open(path)
    text = str(info.value)
    assert str(path) in text
    assert "move the file aside" in text
    assert path.read_bytes() == garbage


def test_damaged_page_fails_the_check(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    with _open(path) as box:
        box.append([(replace(_event(i), message="x" * 500), "t") for i in range(200)])
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[2 * page:3 * page] = b"\xa5" * page
    path.write_bytes(bytes(data))
    with pytest.raises(OutboxError, match=re.escape(str(path))):
        _open(path)


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE readings(x)")
    con.commit()
    con.close()
    with pytest.raises(OutboxError, match="not a bms-gateway outbox"):
        _open(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o500)
    try:
        with pytest.raises(OutboxError, match=re.escape(str(state / FILENAME))):
            _open(state / FILENAME)
    finally:
        state.chmod(0o700)


def test_path_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    path = blocker / FILENAME
    with pytest.raises(OutboxError, match="not a directory") as info:
        _open(path)
    assert str(path) in str(info.value)


def test_files_are_private(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    path = state / FILENAME
    old = os.umask(0o022)
    try:
        with _open(path) as box:
            _append(box, 1)
            for name in (FILENAME, f"{FILENAME}-wal", f"{FILENAME}-shm"):
                assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_loose_mode_is_logged_under_gateway_outbox(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # log lines keep the logger name they had before the package layout (issue 14: no
    # behaviour change): "gateway.outbox", not the module path gateway.publish.outbox
    path = tmp_path / FILENAME
    path.touch(mode=0o644)
    path.chmod(0o644)
    with _open(path):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    names = {r.name for r in caplog.records if "restricting it to 0600" in r.getMessage()}
    assert names == {"gateway.outbox"}


def test_a_file_that_is_no_outbox_keeps_its_mode(tmp_path: Path) -> None:
    # `--outbox /etc/passwd` (a slip of the finger): refused as damaged, as before, but
    # not made 0600 first (that locks every other user out of the file)
    other = tmp_path / "passwd"
    other.write_text("root:x:0:0:root:/root:/bin/sh\n")
    other.chmod(0o644)
    with pytest.raises(OutboxError, match="damaged"):
        _open(other)
    assert stat.S_IMODE(other.stat().st_mode) == 0o644
    assert other.read_text() == "root:x:0:0:root:/root:/bin/sh\n"


def test_overflow_by_count(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    with _open(path, max_events=5) as box:
        _append(box, 5)
        assert box.dropped_total == 0
        _append(box, 1)  # 6 rows + a notice: seq 1, 2 dropped, notice is seq 7
        assert _seqs(box) == [3, 4, 5, 6, 7]
        assert box.dropped_total == 2
        (notice,) = _overflow_notices(box)
        assert notice["seq"] == 7
        assert re.fullmatch(rf"{GW}-7-[0-9a-f]{{12}}", str(notice["event_id"]))
        assert {k: notice[k] for k in ("pack_id", "code", "severity", "state", "source",
                                       "value", "limit", "message")} == {
            "pack_id": "pack1", "code": "outbox_overflow", "severity": "warning",
            "state": "raised", "source": "gateway", "value": 2, "limit": 5,
            "message": "outbox full: dropped 2 oldest events (seq 1..2)"}
        assert list(notice) == ["event_id", "seq", "ts", "pack_id", "code", "severity",
                                "state", "source", "value", "limit", "message"]


def test_overflow_folds_into_undelivered_notice(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    with _open(path, max_events=5) as box:
        _append(box, 6)  # 1..6, drops 1..2, notice 7
        box.append([(_event(9, "pack2"), "bms/pack2/event")])  # seq 8, drops 3
        assert _seqs(box) == [4, 5, 6, 7, 8]
        assert box.dropped_total == 3
        (notice,) = _overflow_notices(box)
        assert (notice["seq"], notice["value"], notice["pack_id"]) == (7, 3, "pack1")
        assert notice["message"] == "outbox full: dropped 3 oldest events (seq 1..3)"
        # The notice has now been handed out: the next drop gets a notice of its own.
        box.append([(_event(10, "pack2"), "bms/pack2/event")])  # seq 9, drops 4, 5
        assert box.dropped_total == 5
        assert _seqs(box) == [6, 7, 8, 9, 10]
        first, second = _overflow_notices(box)
        assert first["message"] == "outbox full: dropped 3 oldest events (seq 1..3)"
        assert (second["seq"], second["value"]) == (10, 2)
        assert second["message"] == "outbox full: dropped 2 oldest events (seq 4..5)"
        last_seq = box.last_seq
    with _open(path, max_events=5) as box:  # counters survive a restart
        assert (box.dropped_total, box.last_seq) == (5, last_seq)


def test_overflow_seq_is_gapless(tmp_path: Path) -> None:
    with _open(tmp_path / FILENAME, max_events=10) as box:
        for i in range(7):
            _append(box, 1 + i % 3, pack=f"pack{i % 2}")
            if i % 3 == 0:
                box.pending()  # hand out notices now and then
        kept = set(_seqs(box))
        notices = _overflow_notices(box)
        assert notices
        dropped: set[int] = set()
        for n in notices:
            a, b = map(int, re.findall(r"seq (\d+)\.\.(\d+)", str(n["message"]))[0])
            dropped |= set(range(a, b + 1)) - kept
        assert kept | dropped == set(range(1, box.last_seq + 1))
        assert len(dropped) == box.dropped_total
        assert box.depth() <= 10


def test_overflow_by_age(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    with _open(path, max_age_s=60) as box:
        _append(box, 3, pack="pack1")
        _append(box, 1, pack="pack2")
        with sqlite3.connect(path) as db:  # age them (a sleep is flaky on a loaded machine)
            db.execute("UPDATE events SET created = created - 120")
        _append(box, 1)  # seq 5; 1..4 expired; notice is seq 6
        assert _seqs(box) == [5, 6]
        assert box.dropped_total == 4
        (notice,) = _overflow_notices(box)
        assert (notice["seq"], notice["value"], notice["limit"], notice["pack_id"]) == (
            6, 4, 60, "gateway")
        assert notice["message"] == "outbox: dropped 4 events older than 60 s (seq 1..4)"


def test_expired_events_are_dropped_on_open(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    with _open(path) as box:
        _append(box, 2)
    # age the events instead of sleeping: with max_age_s=0.1 and a sleep, a loaded
    # machine let the overflow notice itself expire between two calls
    with sqlite3.connect(path) as db:
        db.execute("UPDATE events SET created = created - 120")
    with _open(path, max_age_s=60) as box:
        assert _seqs(box) == [3]
        assert box.dropped_total == 2
        assert _overflow_notices(box)[0]["value"] == 2


def test_memory_outbox_and_bad_arguments() -> None:
    with _open(":memory:", max_events=3) as box:
        _append(box, 4)
        assert box.dropped_total == 2
        assert _seqs(box) == [3, 4, 5]
    with pytest.raises(ValueError, match="max_events"):
        _open(":memory:", max_events=1)
    with pytest.raises(ValueError, match="max_age_s"):
        _open(":memory:", max_age_s=0)
