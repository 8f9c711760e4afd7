"""Checks for the DBC files shipped in dbc/.

Every file must load with cantools in strict mode, and one message per file is
encoded and decoded again to catch layout mistakes (byte order, scaling, offsets,
multiplexing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cantools
import pytest

DBC_DIR = Path(__file__).resolve().parent.parent / "dbc"
DBC_FILES = sorted(DBC_DIR.glob("*.dbc"))

EXPECTED_FILES = {"can-bms.dbc", "example-bms.dbc", "daly.dbc", "orion-bms2.dbc", "nissan-leaf.dbc"}


def _load(name: str) -> cantools.database.can.Database:
    db = cantools.database.load_file(str(DBC_DIR / name), strict=True)
    assert isinstance(db, cantools.database.can.Database)
    return db


def test_expected_files_present() -> None:
    assert {p.name for p in DBC_FILES} >= EXPECTED_FILES


@pytest.mark.parametrize("path", DBC_FILES, ids=lambda p: p.name)
def test_loads_strict_and_documented(path: Path) -> None:
    db = cantools.database.load_file(str(path), strict=True)
    assert isinstance(db, cantools.database.can.Database)
    assert db.messages
    for msg in db.messages:
        # Every message says what it is and where its layout comes from.
        assert msg.comment, f"{path.name}: {msg.name} has no CM_ comment"
        assert "ource" in msg.comment, f"{path.name}: {msg.name} comment names no source"


# (file, message, values to encode, expected raw bytes or None)
ROUND_TRIPS: list[tuple[str, str, dict[str, Any], bytes | None]] = [
    (
        "can-bms.dbc",
        "VoltageCurrentTemperature",
        {"BatteryVoltage": 53.12, "BatteryCurrent": -25.3, "BatteryTemperature": 21.5},
        # 5312 = 0x14C0, -253 = 0xFF03, 215 = 0x00D7, little-endian
        bytes.fromhex("c01403ffd700"),
    ),
    (
        "example-bms.dbc",
        "CellVoltages",
        {
            "CellGroup": 3,
            "CellVoltage012": 3301,
            "CellVoltage013": 3299,
            "CellVoltage014": 3650,
            "CellVoltage015": 2501,
        },
        None,
    ),
    (
        "daly.dbc",
        "Reply_0x90_PackStatus",
        {
            "TotalVoltage": 52.8,
            "AcquisitionVoltage": 52.7,
            "Current": -12.5,
            "StateOfCharge": 87.3,
        },
        # 528 = 0x0210, 527 = 0x020F, 30000 - 125 = 29875 = 0x74B3, 873 = 0x0369, big-endian
        bytes.fromhex("0210020f74b30369"),
    ),
    (
        "orion-bms2.dbc",
        "MSGID_0X36_CELLBCAST",
        {
            "CellId": 7,
            "CellVoltage": 3.6015,
            "CellBalancing": 1,
            "CellResistance": 2.5,
            "CellOpenVoltage": 3.605,
            "Checksum": 0,
        },
        # 36015 = 0x8CAF; shunt bit + 250 = 0x80FA; 36050 = 0x8CD2
        bytes.fromhex("078caf80fa8cd200"),
    ),
]


@pytest.mark.parametrize(
    ("filename", "message", "values", "raw"),
    ROUND_TRIPS,
    ids=[f"{f}:{m}" for f, m, _, _ in ROUND_TRIPS],
)
def test_round_trip(filename: str, message: str, values: dict[str, Any], raw: bytes | None) -> None:
    db = _load(filename)
    msg = db.get_message_by_name(message)
    data = msg.encode(values)
    assert len(data) == msg.length
    if raw is not None:
        assert data == raw
    decoded = msg.decode(data, decode_choices=False)
    assert isinstance(decoded, dict)
    for name, value in values.items():
        assert decoded[name] == pytest.approx(value, abs=1e-6), name


def test_daly_requests_are_zero_filled_extended_frames() -> None:
    db = _load("daly.dbc")
    for cmd in range(0x90, 0x99):
        req = db.get_message_by_name(f"Request_0x{cmd:02X}")
        assert req.is_extended_frame
        assert req.frame_id == 0x18000140 | (cmd << 16)
        assert req.encode({}) == bytes(8)
        reply = db.get_message_by_frame_id(0x18004001 | (cmd << 16))
        assert reply.name.startswith(f"Reply_0x{cmd:02X}_")


def test_can_bms_alarm_pairs_use_value_table() -> None:
    db = _load("can-bms.dbc")
    msg = db.get_message_by_name("AlarmsWarnings")
    # byte 0: general alarm = 1 (active), high voltage alarm = 2 (ok)
    decoded = msg.decode(bytes([0x01 | 0x08, 0, 0, 0, 0, 0, 0, 0]))
    assert isinstance(decoded, dict)
    assert str(decoded["GeneralAlarm"]) == "active"
    assert str(decoded["HighVoltageAlarm"]) == "ok"
    assert str(decoded["CellImbalanceWarning"]) == "not supported"


# Our own DBCs that stand in for third-party files we may not ship: the same decode as
# the community file on random payloads, signal by signal.
OWN_VS_THIRD_PARTY = [
    ("nissan-leaf.dbc", "nissan-leaf/EV-can_AZE0.dbc"),
    ("orion-bms2.dbc", "orion-we-ev/Orion_CANBUS.dbc"),
]


@pytest.mark.parametrize(("ours", "theirs"), OWN_VS_THIRD_PARTY, ids=[o for o, _ in OWN_VS_THIRD_PARTY])
def test_own_dbc_decodes_as_the_community_file(ours: str, theirs: str) -> None:
    import random

    from conftest import shared

    ref = cantools.database.load_file(str(shared(theirs)), strict=False)
    db = _load(ours)
    rng = random.Random(11)
    compared = 0
    for msg in db.messages:
        if msg.name.startswith(("Pack", )):  # Orion 0x6B0/0x6B1: the export's differ (docs)
            continue
        other = ref.get_message_by_frame_id(msg.frame_id)
        for _ in range(500):
            data = bytes(rng.getrandbits(8) for _ in range(msg.length))
            a = msg.decode(data, decode_choices=False)
            b = other.decode(data, decode_choices=False)
            for name, value in a.items():
                assert value == pytest.approx(b[name]), (msg.name, name, data.hex())
                compared += 1
    assert compared > 1000
