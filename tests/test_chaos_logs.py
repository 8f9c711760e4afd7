"""Chaos: hostile recorded logs. Each bad line (bad timestamp, bad byte, bad hex,
truncated) is counted and skipped, the good lines around it are all read, the replay
ends normally, and a log of millions of distinct ids does not grow memory."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import can
import pytest

from gateway.config import load_config
from gateway.runtime.replay import replay
from gateway.source.logs import SourceStats, read_log
from tests.conftest import REPO, shared
from tests.test_source import frames

BAD_TS = ("inf", "nan", "1e20", "-1e18")


def read_all(path: Path) -> tuple[list[tuple[float, int, bytes, str]], SourceStats]:
    st = SourceStats()
    return [f for b in read_log(path, st) for f in b], st


def replay_stdout(path: Path) -> tuple[str, SourceStats]:
    cfg = load_config(REPO / "config" / "gateway.example.yaml", mqtt_url="-")
    buf = io.StringIO()
    rt = asyncio.run(replay(cfg, path, speed=None, stdout=buf))
    assert rt.log_stats is not None
    return buf.getvalue(), rt.log_stats


def write_log(path: Path) -> list[can.Message]:
    msgs = frames()
    with can.Logger(str(path)) as w:
        for m in msgs:
            w.on_message_received(m)
    return msgs


def test_bad_candump_timestamps_are_counted_not_fatal(tmp_path: Path) -> None:
    good = tmp_path / "good.log"
    msgs = write_log(good)
    lines = good.read_text().splitlines()
    hostile = list(lines)
    for i, ts in enumerate(BAD_TS):  # same frames, timestamp replaced
        hostile.insert(10 + 10 * i, lines[10 + 10 * i].replace(
            lines[10 + 10 * i].split()[0], f"({ts})"))
    bad = tmp_path / "bad.log"
    bad.write_text("\n".join(hostile) + "\n")
    out, st = replay_stdout(bad)
    assert st.bad_lines == len(BAD_TS) and st.frames == len(msgs)
    assert all("not a date" in b for b in st.first_bad[:4])
    ref, _ = replay_stdout(good)
    assert out.count("bms/house/state") == ref.count("bms/house/state") > 0


@pytest.mark.parametrize("suffix", [".trc", ".asc"])
def test_bad_timestamps_in_text_logs_are_counted(tmp_path: Path, suffix: str) -> None:
    good = tmp_path / f"good{suffix}"
    msgs = write_log(good)
    text = good.read_text().splitlines()
    data = [i for i, ln in enumerate(text) if " Rx " in ln]
    for n, ts in enumerate(BAD_TS):
        i = data[5 + 7 * n]
        tok = text[i].split()
        at = 1 if suffix == ".trc" else 0  # the time offset column
        text[i] = text[i].replace(tok[at], ts, 1)
    bad = tmp_path / f"bad{suffix}"
    bad.write_text("\n".join(text) + "\n")
    got, st = read_all(bad)
    assert st.bad_lines == len(BAD_TS), st.first_bad
    assert len(got) == len(msgs) - len(BAD_TS)
    out, st2 = replay_stdout(bad)
    assert st2.bad_lines == len(BAD_TS) and "bms/house/state" in out


@pytest.mark.parametrize("suffix", [".trc", ".asc"])
def test_one_bad_byte_does_not_drop_the_rest(tmp_path: Path, suffix: str) -> None:
    good = tmp_path / f"good{suffix}"
    msgs = write_log(good)
    ref, st0 = read_all(good)
    assert len(ref) == len(msgs) and st0.bad_lines == 0
    raw = good.read_bytes().splitlines(keepends=True)
    data = [i for i, ln in enumerate(raw) if b" Rx " in ln]
    hurt = {data[3]: "non-UTF-8", data[20]: "bad hex", data[40]: "truncated",
            data[-2]: "garbage"}
    raw[data[3]] = raw[data[3]].replace(b" Rx ", b" R\xff\xfe ")       # undecodable bytes
    raw[data[20]] = raw[data[20]].rstrip()[:-2] + b"ZZ\n"              # bad hex digit
    raw[data[40]] = raw[data[40]].rstrip()[:-6] + b"\n"                # truncated line
    raw[data[-2]] = b"\x00\x01 \xc3\x28 garbage\n"
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"".join(raw))
    got, st = read_all(bad)
    assert st.bad_lines == len(hurt), st.first_bad
    assert len(got) == len(msgs) - len(hurt)
    # every good line after a bad one is read, identical to the clean file
    skipped = sorted(data.index(i) for i in hurt)
    want = [f for k, f in enumerate(ref) if k not in skipped]
    assert got == want
    assert any("truncated" in b for b in st.first_bad)


def test_real_trc_that_python_can_rejects_matches_its_candump(tmp_path: Path) -> None:
    trc = shared("orion-we-ev/candump-2025-11-22_161709.trc")
    log = shared("orion-we-ev/candump-2025-11-22_161709.log")
    with can.TRCReader(str(trc)) as reader, pytest.raises(ValueError):
        list(reader)  # python-can's own reader gives up on this file
    a, sa = read_all(trc)
    b, sb = read_all(log)
    assert sa.bad_lines == sb.bad_lines == 0
    assert len(a) == len(b) == 50660
    assert [f[1:3] for f in a] == [f[1:3] for f in b]
    # same relative timing (the TRC's start time is a local time without a zone)
    assert abs((a[-1][0] - a[0][0]) - (b[-1][0] - b[0][0])) < 1e-5


def test_real_asc_with_injected_damage(tmp_path: Path) -> None:
    asc = shared("orion-we-ev/candump1_can0.asc")
    raw = asc.read_bytes().splitlines(keepends=True)
    clean, _ = read_all(asc)
    mid = len(raw) // 2
    raw[mid] = raw[mid][:12] + b"\xff" + raw[mid][13:]
    raw[mid + 1000] = raw[mid + 1000][:20] + b"\n"
    bad = tmp_path / "damaged.asc"
    bad.write_bytes(b"".join(raw))
    got, st = read_all(bad)
    assert st.bad_lines == 2 and len(got) == len(clean) - 2 == 62334


PROBE = r"""
import resource, sys, json
from pathlib import Path
from gateway.config import load_config
from gateway.runtime.pipeline import Pipeline
from gateway.source.logs import SourceStats, read_log
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
cfg = load_config(sys.argv[2], mqtt_url="-")
p = Pipeline(cfg)
before = rss()
st = SourceStats()
for batch in read_log(Path(sys.argv[1]), st):
    p.feed_log(batch)
print(json.dumps({"before_mb": before, "after_mb": rss(), "frames": st.frames,
                  "bad": st.bad_lines, "unknown": p.counters[0].unknown,
                  "unknown_ids": len(p.counters[0].unknown_ids)}))
"""


def test_two_million_unique_ids_keep_memory_bounded(tmp_path: Path) -> None:
    n = 2_000_000
    log = tmp_path / "ids.log"
    with log.open("w") as f:  # every line a new 29-bit id and a new channel name
        f.writelines(f"(1700000000.{i:06d}) c{i} {0x100000 + i:08X}#01\n" for i in range(n))
    r = subprocess.run([sys.executable, "-c", PROBE, str(log),
                        str(REPO / "config" / "gateway.example.yaml")],
                       capture_output=True, text=True, timeout=240, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    print("2M unique ids:", got)
    assert got["frames"] == n and got["bad"] == 0 and got["unknown"] == n
    assert got["unknown_ids"] <= 4096
    assert got["after_mb"] - got["before_mb"] < 40, got
