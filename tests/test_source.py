"""Sources: our candump and SLCAN parsers, and every log format python-can writes, give
the same frames and so the same published state."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import can
import cantools
import pytest

from gateway.config import load_config
from gateway.decode.dbc import EXTENDED_FLAG
from gateway.runtime.replay import replay
from gateway.source.logs import LogError, SourceStats, read_log
from tests.conftest import REPO

DB = cantools.database.load_file(str(REPO / "dbc" / "example-bms.dbc"))
T0 = 1_700_000_000.0


def frames(n: int = 60) -> list[can.Message]:
    pack = DB.get_message_by_name("PackStatus")
    cells = DB.get_message_by_name("CellVoltages")
    out = []
    for i in range(n):
        t = T0 + i * 0.1
        out.append(can.Message(timestamp=t, arbitration_id=pack.frame_id, is_extended_id=False,
                               channel="can0", data=pack.encode({
                                   "PackVoltage": 50 + i * 0.01, "PackCurrent": -3.5,
                                   "StateOfCharge": 40 + i * 0.5, "StateOfHealth": 97,
                                   "State": 3, "AliveCounter": i % 256})))
        g = i % 4
        sig = {"CellGroup": g, **{f"CellVoltage{g * 4 + k:03d}": 3300 + i + k for k in range(4)}}
        out.append(can.Message(timestamp=t + 0.01, arbitration_id=cells.frame_id,
                               is_extended_id=False, channel="can0", data=cells.encode(sig)))
    return out


def read_all(path: Path) -> tuple[list[tuple[float, int, bytes, str]], SourceStats]:
    st = SourceStats()
    return [f for b in read_log(path, st) for f in b], st


def test_candump_parser_handles_remote_fd_error_and_extended(tmp_path: Path) -> None:
    log = tmp_path / "mix.log"
    log.write_text("\n".join([
        "(1700000000.000000) can0 400#0102030405060708",
        "(1700000000.100000) can0 18904001#0A0B",         # 29-bit
        "(1700000000.200000) can0 123#R",                 # remote request
        "(1700000000.300000) can0 401##1AABBCCDDEEFF0011",  # CAN FD, flags nibble 1
        "(1700000000.400000) can0 20000080#0000000000000000",  # error frame
        "(1700000000.500000) can1 7FF#",                  # empty payload, other channel
        "garbage here",
        "",
    ]))
    got, st = read_all(log)
    assert got == [
        (1700000000.0, 0x400, bytes.fromhex("0102030405060708"), "can0"),
        (1700000000.1, 0x18904001 | EXTENDED_FLAG, b"\x0a\x0b", "can0"),
        (1700000000.3, 0x401, bytes.fromhex("AABBCCDDEEFF0011"), "can0"),
        (1700000000.5, 0x7FF, b"", "can1"),
    ]
    assert st.remote_frames == 1 and st.error_frames == 1 and st.bad_lines == 1
    assert st.first_bad and "mix.log:7" in st.first_bad[0]


@pytest.mark.parametrize("frame", [
    "100#" + "00" * 9,          # classic CAN carries at most 8 bytes
    "100#" + "00" * 64,
    "100##1" + "00" * 65,       # CAN FD at most 64
    "100##1" + "00" * 9,        # and only 0-8, 12, 16, 20, 24, 32, 48 or 64
    "100##1" + "00" * 33,
    "100##" + "00" * 8,         # FD without its flags digit
    "0x100#00",                 # int(x, 16) takes these; candump never writes them
    "1_00#00",
    "-1#00",                    # was counted as a CAN error frame
    "+100#00",
    "1000#00",                  # 3 hex digits (standard) or 8 (extended)
    "10#00",
])
def test_candump_frames_that_cannot_be_are_bad_lines(tmp_path: Path, frame: str) -> None:
    log = tmp_path / "bad.log"
    log.write_text(f"(1700000000.000000) can0 {frame}\n(1700000000.100000) can0 123#0102\n"
                   f"(1700000000.200000) can0 {frame}\n")
    got, st = read_all(log)
    assert got == [(1700000000.1, 0x123, b"\x01\x02", "can0")]
    assert st.bad_lines == 2 and st.error_frames == 0, st.first_bad
    assert "bad.log:1" in st.first_bad[0] and "bad.log:3" in st.first_bad[1]


def test_candump_fd_lengths_that_exist_are_read(tmp_path: Path) -> None:
    log = tmp_path / "fd.log"
    log.write_text("".join(f"(1700000000.{n:06d}) can0 1FFFFFF0##0{'AB' * n}\n"
                           for n in (0, 8, 12, 20, 48, 64)))
    got, st = read_all(log)
    assert [len(f[2]) for f in got] == [0, 8, 12, 20, 48, 64] and st.bad_lines == 0


def test_slcan_parser_unwraps_timestamps(tmp_path: Path) -> None:
    log = tmp_path / "cap.raw"
    # 16-bit millisecond timestamps wrap at 60000
    log.write_text("t4008010203040506070800EA\nt40080102030405060708EA50\nT189040012AABB0010\n"
                   "tXYZ\n")
    got, st = read_all(log)
    assert [round(f[0], 3) for f in got] == [0.234, 59.984, 60.016]
    assert got[2][1] == 0x18904001 | EXTENDED_FLAG and got[2][2] == b"\xaa\xbb"
    assert st.bad_lines == 1


@pytest.mark.parametrize("suffix", [".asc", ".blf", ".csv", ".trc"])
def test_every_python_can_format_gives_the_same_state(tmp_path: Path, suffix: str) -> None:
    msgs = frames()
    ref = tmp_path / "ref.log"
    with can.Logger(str(ref)) as w:
        for m in msgs:
            w.on_message_received(m)
    other = tmp_path / f"same{suffix}"
    with can.Logger(str(other)) as w:
        for m in msgs:
            w.on_message_received(m)
    cfg = load_config(REPO / "config" / "gateway.example.yaml", mqtt_url="-")
    outs = []
    for path in (ref, other):
        got, st = read_all(path)
        assert len(got) == len(msgs) and st.bad_lines == 0
        buf = io.StringIO()
        asyncio.run(replay(cfg, path, speed=None, stdout=buf))
        outs.append([ln for ln in buf.getvalue().splitlines()
                     if ln.startswith(("bms/house/state", "bms/house/cells"))])
    assert outs[0], "nothing published"
    if suffix in (".asc", ".trc"):
        # these formats keep timestamps to fewer digits: compare the values, not `ts`
        strip = [[ln.split('"pack_id"', 1)[1] for ln in out] for out in outs]
        assert strip[0] == strip[1]
    else:
        assert outs[0] == outs[1]


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    odd = tmp_path / "x.bin"
    odd.write_bytes(b"\x00\x01\x02")
    with pytest.raises(LogError, match="unknown log format"):
        read_log(odd, SourceStats())
    with pytest.raises(LogError, match="not found"):
        read_log(tmp_path / "missing.log", SourceStats())


def test_nonblocking_recv_honours_filters() -> None:
    from gateway.source.logs import _nonblocking_recv

    tx = can.Bus(interface="virtual", channel="nb-recv")
    plain = can.Bus(interface="virtual", channel="nb-recv")
    filtered = can.Bus(interface="virtual", channel="nb-recv",
                       can_filters=[{"can_id": 0x400, "can_mask": 0x7FF}])
    try:
        for aid in (0x400, 0x401, 0x400):
            tx.send(can.Message(arbitration_id=aid, data=b"\x01", is_extended_id=False))
        got_plain, got_filtered = [], []
        for bus, out in ((plain, got_plain), (filtered, got_filtered)):
            recv0 = _nonblocking_recv(bus)
            while (m := recv0()) is not None:
                out.append(m.arbitration_id)
        assert got_plain == [0x400, 0x401, 0x400]
        assert got_filtered == [0x400, 0x400]
    finally:
        for b in (tx, plain, filtered):
            b.shutdown()
