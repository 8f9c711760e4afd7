"""The loggers people use (gateway/source/logformats.py): SavvyCAN GVRET CSV, a text logger
described by --format, relative time and --start.
The oracle is the candump log each file was made from, read by python-can."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import can
import pytest
from conftest import REPO

from gateway.cli import EXIT_OK, main
from gateway.source.logformats import FormatError, LineFormat, parse_start
from gateway.source.logs import SourceStats, read_log

SAMPLE = REPO / "config" / "sample.log"
T0 = 1767225600.0  # the sample's first frame


def sample() -> list[can.Message]:
    return list(can.CanutilsLogReader(str(SAMPLE)))


def write_gvret(path: Path, with_dir: bool = True) -> None:
    """As SavvyCAN saves: relative microseconds, 8-digit ids, trailing comma."""
    head = "Time Stamp,ID,Extended," + ("Dir," if with_dir else "") + "Bus,LEN," + \
        ",".join(f"D{i}" for i in range(1, 9))
    rows = [head]
    for m in sample():
        us = round((m.timestamp - T0) * 1e6)
        d = ",".join(f"{b:02X}" for b in m.data)
        rows.append(f"{us},{m.arbitration_id:08X},{'true' if m.is_extended_id else 'false'},"
                    + ("Rx," if with_dir else "") + f"0,{m.dlc},{d},")
    path.write_text("\n".join(rows) + "\n")


def write_hex_ms(path: Path) -> None:
    """An SD-card logger's TTTTTTTTxIIIIIIIIDDDD... lines: hex ms since power-up."""
    path.write_text("".join(
        f"{round((m.timestamp - T0) * 1000):08X}x{m.arbitration_id:08X}{bytes(m.data).hex().upper()}\n"
        for m in sample()))


def cfg(tmp: Path) -> Path:
    p = tmp / "g.yaml"
    p.write_text(f"gateway_id: t\nstate_dir: {tmp}/state\nlog_level: warning\n"
                 "can: {interface: virtual, channel: can0}\n"
                 "packs: [{id: house, profile: example-bms}]\n")
    return p


def final_state(capsys: pytest.CaptureFixture[str], tmp: Path, log: Path, *extra: str
                ) -> dict[str, Any]:
    assert main(["replay", str(log), "-c", str(cfg(tmp)), "--mqtt", "-", *extra]) == EXIT_OK
    lines = [ln.split(" ", 1) for ln in capsys.readouterr().out.splitlines() if " " in ln]
    states = [json.loads(p) for t, p in lines if t.endswith("/house/state")]
    cells = [json.loads(p) for t, p in lines if t.endswith("/house/cells")]
    assert states and cells
    return {"state": states[-1], "cells": cells[-1]}


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for part in ("state", "cells"):
        x, y = dict(a[part]), dict(b[part])
        tx, ty = x.pop("ts"), y.pop("ts")
        assert x == y, part
        assert tx[:19] == ty[:19], (tx, ty)  # to the second: ms loggers round


def test_gvret_csv_and_a_text_log_replay_to_the_candump_state(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    want = final_state(capsys, tmp_path, SAMPLE)
    assert want["state"]["ts"].startswith("2026-01-01")
    gvret = tmp_path / "savvy.csv"
    write_gvret(gvret)
    _same(final_state(capsys, tmp_path, gvret, "--start", str(T0)), want)
    old = tmp_path / "old-savvy.csv"  # older SavvyCAN: no Dir column
    write_gvret(old, with_dir=False)
    _same(final_state(capsys, tmp_path, old, "--start", "2026-01-01T00:00:00Z"), want)
    sd = tmp_path / "LOG0001.TXT"
    write_hex_ms(sd)
    _same(final_state(capsys, tmp_path, sd, "--format", "hex-ms", "--start", str(T0)), want)
    # the same lines described by a regular expression instead of the preset
    rx = r"^(?P<ts>[0-9A-F]{8})x(?P<id>[0-9A-F]{8})(?P<data>[0-9A-F]*)$"
    _same(final_state(capsys, tmp_path, sd, "--format", rx, "--ts-unit", "ms", "--ts-base", "16",
                      "--start", str(T0)), want)


def test_relative_log_without_start_warns(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    gvret = tmp_path / "savvy.csv"
    write_gvret(gvret)
    stats = SourceStats()
    with caplog.at_level(logging.WARNING, logger="gateway.source"):
        frames = [f for b in read_log(gvret, stats) for f in b]
    assert frames[0][0] == 0.0 and stats.frames == len(sample())
    assert "timestamps look relative" in caplog.text and "--start" in caplog.text


def test_bad_lines_are_counted_with_their_line_number(tmp_path: Path) -> None:
    gvret = tmp_path / "savvy.csv"
    write_gvret(gvret)
    lines = gvret.read_text().splitlines()
    lines[3] = "12,zz,false,Rx,0,8,AA,"
    lines[5] = lines[5].replace(",8,", ",9,", 1)
    gvret.write_text("\n".join(lines) + "\n")
    stats = SourceStats()
    frames = [f for b in read_log(gvret, stats, start=T0) for f in b]
    assert stats.bad_lines == 2 and len(frames) == len(sample()) - 2
    assert any(":4:" in s for s in stats.first_bad) and any(":6:" in s for s in stats.first_bad)


def test_a_gvret_csv_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Windows tools save CSV with a UTF-8 BOM: its header was not recognised."""
    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    write_gvret(plain)
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    got = []
    for p in (plain, bom):
        stats = SourceStats()
        got.append([f for b in read_log(p, stats, start=T0) for f in b])
        assert stats.bad_lines == 0
    assert got[1] == got[0] and len(got[0]) == len(sample())


def test_format_specs_are_checked() -> None:
    assert LineFormat.parse("hex-ms").ts_unit == "ms"
    with pytest.raises(FormatError, match="named groups data"):
        LineFormat.parse(r"(?P<ts>\d+) (?P<id>\w+)")
    with pytest.raises(FormatError, match="timestamp unit"):
        LineFormat.parse(r"(?P<ts>\d+) (?P<id>\w+) (?P<data>\w*)", ts_unit="min")
    with pytest.raises(FormatError, match="epoch seconds or an ISO date"):
        parse_start("yesterday")
    assert parse_start("2026-01-01T00:00:00") == T0


@pytest.mark.parametrize("start", ["inf", "-inf", "nan", "1e20", "-5", "0001-01-01"])
def test_a_start_outside_1970_to_9999_is_refused_up_front(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], start: str) -> None:
    """Reviewer: inf/1e20 gave an OverflowError traceback, nan published nothing and
    exited 0, -5 published 1969 timestamps."""
    sd = tmp_path / "LOG0001.TXT"
    write_hex_ms(sd)
    rc = main(["replay", str(sd), "-c", str(cfg(tmp_path)), "--mqtt", "-",
               "--log-format", "hex-ms", f"--start={start}"])
    assert rc == 2
    assert "between 1970 and 9999" in capsys.readouterr().err


def test_frames_anchored_past_9999_are_counted_not_a_crash(tmp_path: Path) -> None:
    """A 60 s relative log started 29 s before the end of 9999: the first half is read,
    the rest are bad lines (was: ValueError year 10000 out of the publisher)."""
    sd = tmp_path / "LOG0001.TXT"
    write_hex_ms(sd)
    stats = SourceStats()
    frames = [f for b in read_log(sd, stats, line_format=LineFormat.parse("hex-ms"),
                                  start=253402300770.0) for f in b]
    assert frames and all(f[0] <= 253402300799.0 for f in frames)
    assert stats.bad_lines == len(sample()) - len(frames) > 0
    assert stats.frames == len(frames)
    assert "not a time between 1970 and 9999" in stats.first_bad[0]


def test_start_on_an_absolute_log_is_ignored_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    stats = SourceStats()
    with caplog.at_level(logging.WARNING, logger="gateway.source"):
        frames = [f for b in read_log(SAMPLE, stats, start=5.0) for f in b]
    assert frames[0][0] == T0
    assert "--start is ignored" in caplog.text


def test_log_format_in_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    want = final_state(capsys, tmp_path, SAMPLE)
    sd = tmp_path / "LOG0001.TXT"
    write_hex_ms(sd)
    c = cfg(tmp_path)
    c.write_text(c.read_text() + "log_format: {preset: hex-ms}\n")
    assert main(["replay", str(sd), "-c", str(c), "--mqtt", "-", "--start", str(T0)]) == EXIT_OK
    lines = [ln.split(" ", 1) for ln in capsys.readouterr().out.splitlines() if " " in ln]
    got = {"state": [json.loads(p) for t, p in lines if t.endswith("/house/state")][-1],
           "cells": [json.loads(p) for t, p in lines if t.endswith("/house/cells")][-1]}
    _same(got, want)
    c.write_text(c.read_text().replace("{preset: hex-ms}", "{regex: '(?P<ts>\\d+)', ts_unit: h}"))
    assert main(["check-config", "-c", str(c)]) == 3
    err = capsys.readouterr().err
    assert "log_format" in err and "named groups data, id" in err
