"""`bms-gateway identify`: the right profile first on real captures, nothing on noise."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, shared

from gateway.cli import EXIT_OK, EXIT_RUNTIME, main
from gateway.commands.identify import FITS_AT


def identify_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[Any]]:
    rc = main(["identify", *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_orion_capture_ranks_an_orion_profile_first(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, fits = identify_json(capsys, str(shared("orion-we-ev/candump1_can0.asc")))
    assert rc == EXIT_OK
    assert [f["profile"] for f in fits[:2]] == ["orion-bms2", "orion-inverter"]
    best = fits[0]
    assert best["score"] >= FITS_AT and 292.0 <= best["voltage_v"] <= 293.0
    assert best["cells"] > 60
    by_name = {f["profile"]: f for f in fits}
    # the utility-default 0x6B0 layout reads a 7.2 V pack: implausible, ranked lower
    assert by_name["orion-bms2-6b0"]["score"] < best["score"]
    assert any("below the sum of" in n for n in by_name["orion-bms2-6b0"]["notes"])
    # CAN-BMS reads Orion's 0.1 V pack voltage as 0.01 V: against its own limits it is absurd
    assert by_name["can-bms"]["score"] < FITS_AT
    assert by_name["foxbms2"]["score"] == 0
    assert 4.05 <= best["cell_v_avg"] <= 4.07
    # the starter config names the chemistry the cells show (lfp, the default, would
    # raise over-voltage alarms on these 4.06 V cells)
    assert main(["identify", str(shared("orion-we-ev/candump1_can0.asc"))]) == EXIT_OK
    out = capsys.readouterr().out
    assert "{id: pack1, profile: orion-bms2, chemistry: nmc}" in out
    # and it is a config check-config accepts as it stands
    starter = tmp_path / "starter.yaml"
    starter.write_text(out[out.index("# starter config"):])
    assert main(["check-config", "-c", str(starter)]) == EXIT_OK


def test_orion_capture_with_the_users_dbc(capsys: pytest.CaptureFixture[str]) -> None:
    rc, fits = identify_json(capsys, str(shared("orion-we-ev/candump-2025-11-22_161709.log")),
                             "--dbc", str(shared("orion-we-ev/Orion_CANBUS.dbc")))
    assert rc == EXIT_OK
    assert fits[0]["profile"].startswith("orion")
    own = [f for f in fits if f["own_dbc"]]
    assert own and own[0]["profile"] in ("orion-bms2", "orion-inverter")
    assert own[0]["score"] >= FITS_AT
    dbc_only = next(f for f in fits if f["profile"] == "dbc:Orion_CANBUS.dbc")
    assert dbc_only["frames"] > 0


def test_foxbms_log_ranks_foxbms2_first(capsys: pytest.CaptureFixture[str]) -> None:
    rc, fits = identify_json(capsys, str(shared("foxbms2/can-log.trc")))
    assert rc == EXIT_OK
    assert fits[0]["profile"] == "foxbms2" and fits[0]["score"] >= FITS_AT
    assert all(f["score"] == 0 for f in fits[1:])


def test_can_bms_traffic_ranks_can_bms_first(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "g.yaml"
    cfg.write_text(f"gateway_id: t\nstate_dir: {tmp_path}/s\ncan: {{interface: virtual, "
                   "channel: x}\npacks: [{id: house, profile: can-bms}]\n")
    log = tmp_path / "can-bms.log"
    assert main(["simulate", "-c", str(cfg), "--out", str(log), "--duration", "30"]) == EXIT_OK
    capsys.readouterr()
    rc, fits = identify_json(capsys, str(log))
    assert rc == EXIT_OK
    assert fits[0]["profile"] == "can-bms" and fits[0]["score"] >= 90
    # Orion's inverter messages share 0x351/0x355/0x356 but not their scale
    assert max(f["score"] for f in fits[1:]) < FITS_AT
    # the human-readable form ends with a starter config naming the profile
    assert main(["identify", str(log)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "Best fit: can-bms" in out and "profile: can-bms" in out


def test_example_sample_log(capsys: pytest.CaptureFixture[str]) -> None:
    rc, fits = identify_json(capsys, str(REPO / "config" / "sample.log"))
    assert rc == EXIT_OK and fits[0]["profile"] == "example-bms"


def test_random_traffic_fits_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(5)
    log = tmp_path / "noise.log"
    with log.open("w") as f:
        for i in range(20_000):  # every 11-bit id about ten times, random payloads
            data = bytes(rng.getrandbits(8) for _ in range(8)).hex().upper()
            f.write(f"({1767225600 + i / 1000:.6f}) can0 {rng.randint(0, 0x7FF):03X}#{data}\n")
    rc, fits = identify_json(capsys, str(log))
    assert rc == EXIT_RUNTIME
    assert max(f["score"] for f in fits) < FITS_AT
    assert main(["identify", str(log)]) == EXIT_RUNTIME
    assert "Nothing fits" in capsys.readouterr().out
