"""`replay` stopped by a signal: it used to die by SIGTERM or SIGHUP (exit -15, -1), saying
nothing and leaving its outbox open; Ctrl-C exited 130 without a word. Now SIGINT,
SIGTERM and SIGHUP stop it cleanly: what was fed is flushed and delivered, the packs go
offline, the outbox is closed, one line on stderr says how far it got, and the exit
status is 128 + the signal (130 for Ctrl-C, as before)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Broker, free_port

SAMPLE_LOG = REPO / "config" / "sample.log"  # 1508 frames over 60 s
CONFIG = REPO / "config" / "gateway.example.yaml"
LINE = re.compile(r"replay interrupted by (SIG[A-Z]+) after (\d+) frames, up to log time "
                  r"2026-01-01T00:00:\d\d\.\d{3}Z \((\d+\.\d) s into the log\)")


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "replay", str(SAMPLE_LOG), "-c", str(CONFIG), *args],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_stops_the_replay_with_one_line_and_128_plus_its_number(
        sig: signal.Signals) -> None:
    proc = spawn("--mqtt", "-", "--speed", "1", "--log-level", "error")
    assert proc.stdout is not None
    before = []
    for line in proc.stdout:  # at real speed the log lasts 60 s
        before.append(line)
        if line.startswith("bms/house/state "):
            break
    assert before and before[-1].startswith("bms/house/state "), before
    proc.send_signal(sig)
    out, err = finish(proc)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    m = LINE.fullmatch(lines[0])
    assert m is not None, lines[0]
    assert m[1] == sig.name
    frames = int(m[2])
    assert 0 < frames < 1508 and float(m[3]) < 59.9
    # what was fed was published, then the packs and the replay's gateway went offline,
    # and the last status counts the same frames as the line
    tail = out.splitlines()[-3:]
    assert tail[:2] == ["bms/house/availability offline",
                        "bms/gateway/example/availability offline"], tail
    topic, _, payload = tail[2].partition(" ")
    assert topic == "bms/gateway/example/status"
    assert json.loads(payload)["buses"]["demo"]["received"] == frames


def test_sigterm_delivers_what_was_fed_and_closes_the_outbox(
        tmp_path: Path, broker: Broker, subscriber_factory: Any) -> None:
    outbox = tmp_path / "replay.sqlite"
    sub = subscriber_factory(broker.port, ["bms/#"])
    proc = spawn("--mqtt", broker.url, "--speed", "1", "--outbox", str(outbox),
                 "--log-level", "error")
    try:
        assert sub.wait_for(lambda ms: any(t == "bms/house/state" for t, _, _ in ms), 30)
        assert Path(f"{outbox}-wal").exists()  # open, in WAL mode
        proc.send_signal(signal.SIGTERM)
    finally:
        _, err = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and LINE.fullmatch(lines[0]), err
    assert sub.wait_for(lambda ms: {("bms/house/availability", b"offline"),
                                    ("bms/gateway/example/availability", b"offline")}
                        <= {(t, p) for t, p, _ in ms}, 10)
    assert not Path(f"{outbox}-wal").exists()  # closed: the WAL went into the file


def test_a_second_signal_stops_the_delivering_at_once(tmp_path: Path) -> None:
    """No broker: the replay waits up to 30 s to deliver (10 s, shutdown_timeout_s,
    after a first signal); the next signal ends that, and the events stay in --outbox."""
    outbox = tmp_path / "replay.sqlite"
    proc = spawn("--mqtt", f"mqtt://127.0.0.1:{free_port()}", "--outbox", str(outbox),
                 "--log-level", "warning")
    assert proc.stderr is not None
    for line in proc.stderr:
        if "Connection refused" in line:
            break
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = finish(proc)
    assert time.monotonic() - t0 < 5, err
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "replay interrupted by SIGTERM" in err, err
    kept = re.search(rf"(\d+) events were not delivered to the broker; they stay in {outbox}",
                     err)
    assert kept is not None and int(kept[1]) > 0, err
    assert "Traceback" not in err
    assert not Path(f"{outbox}-wal").exists()
