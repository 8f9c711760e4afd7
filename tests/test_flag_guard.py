"""BMS flags run only when the bits they read change (normalize.compiler `_emit_items`).

A flag acts only on a change (`FS`), and a BMS repeats its flag words unchanged nearly
always, so a message's run of flags sits under one test of the bits they read: on
CAN-BMS traffic that took 0x359/0x35A (34 flags) from ~10,000-14,000 instructions a frame
to ~3,000 (bench/RESULTS.md). These tests hold the guarded handlers to the plain ones.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from gateway.decode.dbc import Item, Source
from gateway.normalize.compiler import Compiler
from tests.conftest import REPO, compile_profile

PROFILES = sorted(p for p in (REPO / "config" / "profiles").glob("*.yaml")
                  if "\nfaults:" in p.read_text())


def _plain(self: Compiler, body: Source, items: list[Item]) -> None:
    body.items(items, 1)


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_guarded_flags_act_as_the_plain_ones(tmp_path: Path, profile: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The same frames (each id's payload drawn from three, so most frames repeat the
    flags of the one before and some change them) into a pack generated with the test and
    one without: the same flag states and the same hook calls, frame after frame."""
    guarded, lengths = compile_profile(tmp_path, profile)
    with monkeypatch.context() as m:
        m.setattr(Compiler, "_emit_items", _plain)
        plain, _ = compile_profile(tmp_path, profile)
    calls: tuple[list[Any], list[Any]] = ([], [])
    for pack, got in zip((guarded, plain), calls, strict=True):
        pack.fault_hook[0] = lambda *a, got=got: got.append(a)
    flagged = [key for key, code in plain.code.items() if "FS[" in code]
    assert flagged
    if profile.stem == "can-bms":  # the guard is there where it pays
        assert "if fb != " in guarded.code[0x35A] and "if fb != " in guarded.code[0x359]
    rnd = random.Random(profile.stem)
    pool = {key: [rnd.randbytes(lengths[key]) for _ in range(3)] for key in flagged}
    for i in range(3000):
        key = rnd.choice(flagged)
        frame = rnd.choice(pool[key])
        if rnd.random() < 0.02:  # a new word now and then
            pool[key][rnd.randrange(3)] = frame = rnd.randbytes(lengths[key])
        guarded.handlers[key](float(i), frame)
        plain.handlers[key](float(i), frame)
        assert guarded.fault_state == plain.fault_state, f"{key:#x} {frame.hex()}"
        assert calls[0] == calls[1], f"{key:#x} {frame.hex()}"
    assert len(calls[0]) > 20  # flags did change
