"""Chaos: the outbox's storage fails or is tampered with. A disk that fills holds events
in memory and raises `storage_error` (nothing lost once space returns); an emptied or
replaced outbox file never makes a seq be given twice."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cantools
import pytest

from gateway.model import FaultEvent
from gateway.publish.outbox import FILENAME, Outbox, SeqMark
from tests.conftest import REPO, Broker

DB = cantools.database.load_file(str(REPO / "dbc" / "example-bms.dbc"))


def _event(i: int) -> FaultEvent:
    return FaultEvent(ts=1_700_000_000.0 + i, pack_id="p", code="bms_cell_over_voltage",
                      severity="alarm", state="raised" if i % 2 else "cleared", source="bms",
                      message=f"event {i} " + "x" * 200, value=i)


def _open(path: Path, **kw: Any) -> Outbox:
    return Outbox.open(path, max_events=kw.pop("max_events", 100_000), max_age_s=86400.0,
                       gateway_id="gw", **kw)


def _deliver(box: Outbox) -> list[dict[str, Any]]:
    got = []
    while rows := box.pending(50):
        for seq, _, payload in rows:
            got.append(json.loads(payload))
            box.ack(seq)
    return got


# ------------------------------------------------------------------ emptied outbox


@pytest.mark.parametrize("how", ["truncate", "delete", "older-copy"])
def test_emptied_or_replaced_outbox_never_reuses_a_seq(tmp_path: Path, how: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / FILENAME
    with _open(path) as box:
        box.append([(_event(i), "bms/p/events") for i in range(10)])
    shutil.copy(path, tmp_path / "copy")  # a backup with 10 events
    with _open(path) as box:
        box.append([(_event(i), "bms/p/events") for i in range(10, 77)])
        assert box.depth() == 77 and box.last_seq == 77
    for side in (path.with_name(FILENAME + "-wal"), path.with_name(FILENAME + "-shm")):
        assert not side.exists()  # closed cleanly: the WAL is merged into the file
    if how == "truncate":
        path.write_bytes(b"")  # `: > outbox.sqlite`
    elif how == "delete":
        path.unlink()
    else:
        shutil.copy(tmp_path / "copy", path)
    with caplog.at_level(logging.ERROR), _open(path) as box:
        assert box.last_seq == 77
        rows = box.append([(_event(99), "bms/p/events")])
        assert rows[0][0] == 78
        assert json.loads(rows[0][2])["seq"] == 78
    first = 11 if how == "older-copy" else 1
    assert "emptied or replaced" in caplog.text and f"events {first}..77 are lost" in caplog.text
    print(f"{how}: seq after emptying continues at {rows[0][0]}")


def test_seq_mark_survives_a_torn_slot(tmp_path: Path) -> None:
    mark = SeqMark(tmp_path / "m.seq")
    for v in (5, 6, 7):
        mark.write(v)
    mark.close()
    raw = bytearray((tmp_path / "m.seq").read_bytes())
    assert len(raw) == 64
    assert raw[40] == 3  # generation 3 went to slot 3 % 2 = 1
    raw[32 + 20] ^= 0xFF  # tear the newest slot: the other one still counts
    (tmp_path / "m.seq").write_bytes(bytes(raw))
    again = SeqMark(tmp_path / "m.seq")
    assert again.value == 6
    again.write(8)
    again.close()
    assert SeqMark(tmp_path / "m.seq").value == 8


# ------------------------------------------------------------------ a full disk

LIMIT_PROBE = r"""
import json, logging, os, resource, signal, sys
from pathlib import Path
from gateway.model import FaultEvent
from gateway.publish.outbox import Outbox
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG, not death
path = Path(sys.argv[1])
box = Outbox.open(path, max_events=int(sys.argv[2]), max_age_s=86400.0, gateway_id="gw")
deliver_while_full = sys.argv[3] == "1"
def ev(i):
    return FaultEvent(ts=1.7e9 + i, pack_id="p", code="bms_cell_over_voltage",
                      severity="alarm", state="raised", source="bms", message="x" * 300,
                      value=i)
delivered, seqs = [], []
def deliver():
    while rows := box.pending(50):
        for seq, _, payload in rows:
            delivered.append(json.loads(payload))
            box.ack(seq)
for i in range(20):
    seqs += [r[0] for r in box.append([(ev(i), "bms/p/events")])]
deliver()
size = sum(f.stat().st_size for f in path.parent.iterdir())
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(str(path) + "-wal"),
                                           resource.RLIM_INFINITY))
errors = []
for i in range(20, 220):
    seqs += [r[0] for r in box.append([(ev(i), "bms/p/events")])]
    if box.storage_error:
        errors.append(box.held)
        assert box.faults()[0]["code"] == "storage_error"
    if i % 20 == 0 and deliver_while_full:
        deliver()  # held events go out while the disk refuses them
held_peak = max(errors or [0])
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
box._retry_at = 0.0
box.maintain()
deliver()
print(json.dumps({"appended": len(seqs), "seqs": seqs, "delivered": delivered,
                  "failing_appends": len(errors), "held_peak": held_peak,
                  "error_after": box.storage_error, "depth": box.depth(),
                  "faults_after": box.faults()}))
box.close()
"""


def _check_nothing_lost(appended: list[int], delivered: list[dict[str, Any]]) -> dict[str, int]:
    seqs = [d["seq"] for d in delivered]
    pack = [d["seq"] for d in delivered if d["pack_id"] == "p"]
    storage = [(d["code"], d["state"]) for d in delivered if d["pack_id"] == "gateway"]
    assert ("storage_error", "raised") in storage and ("storage_error", "cleared") in storage
    assert sorted(pack) == sorted(appended), "an appended event was not delivered"
    assert len(seqs) == len(set(seqs)), "a seq was delivered twice"
    assert len({d["event_id"] for d in delivered}) == len(delivered)
    assert sorted(seqs) == list(range(min(seqs), max(seqs) + 1)), "a gap in seq"
    return {"events": len(pack), "lost": len(set(appended) - set(pack)),
            "duplicates": len(seqs) - len(set(seqs)), "storage_events": len(storage)}


def test_file_size_limit_holds_events_and_loses_none(tmp_path: Path) -> None:
    """RLIMIT_FSIZE: the kernel refuses to grow the outbox, as a full disk does."""
    got = _limit_probe(tmp_path, 100_000, deliver_while_full=True)
    figures = _check_nothing_lost(got["seqs"], got["delivered"])
    print("RLIMIT_FSIZE:", figures, "held peak", got["held_peak"])
    assert figures["events"] == 220


def _limit_probe(tmp_path: Path, max_events: int, *, deliver_while_full: bool) -> Any:
    r = subprocess.run([sys.executable, "-c", LIMIT_PROBE, str(tmp_path / FILENAME),
                        str(max_events), "1" if deliver_while_full else "0"],
                       capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert got["failing_appends"] > 0, "the size limit never made a write fail"
    assert got["error_after"] == "" and got["depth"] == 0 and got["faults_after"] == []
    return got


def test_held_events_are_bounded_with_one_overflow_notice(tmp_path: Path) -> None:
    got = _limit_probe(tmp_path, 100, deliver_while_full=False)
    assert got["held_peak"] == 50  # never more than the bound (max_events / 2) in memory
    delivered = got["delivered"]
    notices = [d for d in delivered if d["code"] == "outbox_overflow"]
    assert len(notices) == 1 and "held in memory" in notices[0]["message"]
    dropped = notices[0]["value"]
    seqs = [d["seq"] for d in delivered]
    assert len(seqs) == len(set(seqs))
    # every seq given is either delivered or named in the notice: nothing vanishes unsaid
    first, last = map(int, notices[0]["message"].split("seq ")[1].rstrip(")").split(".."))
    missing = sorted(set(range(1, max(seqs) + 1)) - set(seqs))
    # 200 events while full; the bound keeps 50 held, two of them the notices
    assert len(missing) == dropped == 200 - 48
    assert missing[0] == first and missing[-1] == last
    assert [(d["state"]) for d in delivered if d["code"] == "storage_error"] == [
        "raised", "cleared"]


@contextlib.contextmanager
def small_tmpfs(where: Path, size_kb: int) -> Iterator[Path]:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700", "tmpfs",
                        str(where)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode}); "
                    "test_file_size_limit_holds_events_and_loses_none covers a full disk "
                    "with RLIMIT_FSIZE")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        chunk = b"\1" * 4096
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
    return filler


def test_full_disk_during_a_replay_raises_storage_error_and_loses_nothing(
        tmp_path: Path, broker: Broker, subscriber_factory: Any) -> None:
    log = tmp_path / "toggle.log"
    alarms = DB.get_message_by_name("AlarmFlags")
    pack = DB.get_message_by_name("PackStatus")
    with log.open("w") as f:  # the BMS over-voltage flag toggles every 0.1 s: 1 event each
        for step in range(120):
            t = 1_700_000_000.0 + step / 10
            for fid, data in (
                    (pack.frame_id, pack.encode({"PackVoltage": 52, "PackCurrent": 0,
                                                 "StateOfCharge": 50, "StateOfHealth": 100,
                                                 "State": 3, "AliveCounter": step % 256})),
                    (alarms.frame_id, alarms.encode({
                        "CellOverVoltage": step % 2, "CellUnderVoltage": 0,
                        "OverTemperature": 0, "UnderTemperature": 0, "OverCurrentCharge": 0,
                        "OverCurrentDischarge": 0, "InsulationFault": 0, "InternalFault": 0}))):
                f.write(f"({t:.6f}) can0 {fid:03X}#{data.hex().upper()}\n")
    with small_tmpfs(tmp_path / "disk", 8192) as disk:
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(textwrap.dedent(f"""\
            gateway_id: disk-test
            state_dir: {disk / 'state'}
            can: {{interface: virtual, channel: disk}}
            packs: [{{id: p, profile: example-bms, stale_after_s: 5}}]
            mqtt: {{url: '{broker.url}', topic_prefix: bms}}
            """))
        # the oracle: the same log printed to stdout gives the events that must arrive
        ref = subprocess.run([sys.executable, "-m", "gateway", "replay", str(log), "-c",
                              str(cfg), "--mqtt", "-"], capture_output=True, text=True,
                             timeout=60, cwd=REPO, check=True)
        want = sum(1 for ln in ref.stdout.splitlines() if ln.startswith("bms/p/events "))
        assert want >= 100
        sub = subscriber_factory(broker.port, ["bms/p/events", "bms/gateway/disk-test/status"])
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "replay", str(log), "-c",
                                 str(cfg), "--speed", "1", "--outbox",
                                 str(disk / "state" / FILENAME)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert sub.wait_for(lambda m: sum(t == "bms/p/events" for t, _, _ in m) >= 10, 30)
            filler = fill(disk)
            assert sub.wait_for(lambda m: any(b'"storage_error"' in p for _, p, _ in m), 30), \
                "storage_error was not published while the disk was full"
            time.sleep(1.5)  # events keep coming while the disk is full
            filler.unlink()
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err
        sub.wait_for(lambda m: sum(t == "bms/p/events" for t, _, _ in m) >= want + 2, 30)
        time.sleep(0.5)
        delivered = [json.loads(p) for p in sub.topic("bms/p/events")]
        assert len(delivered) >= want + 2, (want, len(delivered), err[-3000:])
        pack_events = [d for d in delivered if d["pack_id"] == "p"]
        storage = [d for d in delivered if d["code"] == "storage_error"]
        assert [d["state"] for d in storage] == ["raised", "cleared"]
        assert len(pack_events) == want, "events were lost"
        seqs = [d["seq"] for d in delivered]
        assert len(seqs) == len(set(seqs)), "a seq was delivered twice"
        assert sorted(seqs) == list(range(min(seqs), max(seqs) + 1)), "a gap in seq"
        print(f"full disk: {len(pack_events)} events, 0 lost, 0 duplicates, "
              f"storage_error: {storage[0]['message']}")
        stats = [json.loads(p) for p in sub.topic("bms/gateway/disk-test/status")]
        assert stats and stats[-1]["storage_error"] is None
    os.sync()
