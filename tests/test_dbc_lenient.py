"""A DBC cantools refuses even non-strictly: the message names the lines, and
`dbc_lenient: true` loads it with the offending VAL_ lines ignored and reported."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cantools
import pytest
from conftest import shared
from test_profiles import asc_frames, config

from gateway.config import load_config
from gateway.decode.dbc import DbcError, load_dbc
from gateway.runtime.pipeline import Pipeline


def test_refused_dbc_names_the_lines_and_the_option() -> None:
    path = shared("orion-we-ev/ZeroEv_BMS_DU.dbc")
    with pytest.raises(DbcError) as e:
        load_dbc(path)
    text = str(e.value)
    assert "lines 386, 387" in text and "dbc_lenient: true" in text


def test_lenient_load_ignores_and_reports_each_orphan_value_line(
        caplog: pytest.LogCaptureFixture) -> None:
    path = shared("orion-we-ev/ZeroEv_BMS_DU.dbc")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    orphans = [n for n, ln in enumerate(lines, 1) if ln.startswith("VAL_ 3221225472 ")]
    assert orphans
    with caplog.at_level(logging.WARNING, logger="gateway.decode"):
        db = load_dbc(path, lenient=True)
    reported = {int(m) for m in re.findall(r"ZeroEv_BMS_DU\.dbc:(\d+): ignored", caplog.text)}
    assert reported == set(orphans)
    # the oracle: cantools on the same text without those lines
    ref = cantools.database.Database(strict=False)
    ref.add_dbc_string("\n".join(ln for n, ln in enumerate(lines, 1) if n not in set(orphans)))
    assert sorted(m.name for m in db.messages) == sorted(m.name for m in ref.messages)


def test_pack_with_dbc_lenient_decodes_the_real_capture(tmp_path: Path) -> None:
    dbc = shared("orion-we-ev/ZeroEv_BMS_DU.dbc")
    prof = tmp_path / "zeroev.yaml"
    prof.write_text(f"name: zeroev\ndbc: [{dbc}]\nfields:\n"
                    "  voltage_v: {message: BmsStatus1, signal: HvBatteryVoltage}\n")
    with pytest.raises(Exception, match="dbc_lenient"):
        Pipeline(load_config(config(tmp_path, f"  - {{id: z, profile: {prof}}}"), mqtt_url="-"))
    p = Pipeline(load_config(config(tmp_path, f"  - {{id: z, profile: {prof}, dbc_lenient: true}}"),
                             mqtt_url="-"))
    p.feed(asc_frames(shared("orion-we-ev/candump1_can0.asc"), {0x356}), 0)
    p.finish()
    assert 292.0 <= p.packs[0].live.state.get("voltage_v") <= 293.0
