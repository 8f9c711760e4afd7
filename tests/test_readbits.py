"""The bits a generated handler reads, as the kernel is told them (receive: bcm).

With `receive: bcm` the kernel delivers a frame only when the bits the profile reads
change: one content mask per id, or for a multiplexed message one per multiplexer value
(a frame with a value no mask names is not delivered at all). The masks are recorded
while the handlers are generated (decode.dbc.Source.read_bits); these tests hold them to
what the handlers do: two packs fed frames that differ only outside the masks stay
identical, frame after frame, on every shipped profile, and a frame the kernel would
drop changes nothing a subscriber sees.
"""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest

from gateway.config import Problem, load_config
from gateway.decode.dbc import load_dbc
from gateway.normalize.compiler import DbcCache, LivePack, compile_pack
from gateway.source.socketcan import bcm_frames, bcm_mask
from tests.conftest import REPO

PROFILES = sorted((REPO / "config" / "profiles").glob("*.yaml"))

# A 6-byte big-endian message (no shipped profile has one shorter than 8 bytes, where
# `be` is aligned to the DBC length): a 4-bit multiplexer in byte 0, a value per
# multiplexer value and one read whatever the value (so all 16 values get a mask).
SHORT_BE_DBC = """\
VERSION ""
BS_:
BU_: B
BO_ 768 Short: 6 B
 SG_ Sel M : 3|4@0+ (1,0) [0|15] "" Vector__XXX
 SG_ A m0 : 15|12@0+ (0.1,0) [0|100] "%" Vector__XXX
 SG_ B m1 : 23|12@0+ (0.1,0) [0|100] "%" Vector__XXX
 SG_ V : 39|16@0+ (0.01,0) [0|600] "V" Vector__XXX
"""
SHORT_BE_PROFILE = """\
name: short-be
dbc: [short.dbc]
fields:
  voltage_v: {message: Short, signal: V}
  soc_pct: {message: Short, signal: A}
  soh_pct: {message: Short, signal: B}
"""


def _packs(tmp: Path, profile: Path) -> tuple[LivePack, LivePack, dict[int, int]]:
    path = tmp / f"gw-{profile.stem}.yaml"
    path.write_text(textwrap.dedent(f"""\
        gateway_id: g
        can: {{interface: virtual, channel: x}}
        packs: [{{id: p, profile: {profile}}}]
        """))
    cfg = load_config(path)
    problems: list[Problem] = []
    a = compile_pack(cfg.packs[0], DbcCache(), problems)
    b = compile_pack(cfg.packs[0], DbcCache(), problems)
    assert a is not None and b is not None, problems
    lengths = {}
    for path in cfg.packs[0].profile.dbc:
        for msg in load_dbc(path).messages:
            lengths[msg.name] = msg.length
    return a, b, {key: lengths[name] for key, name in a.sources.items()}


def _seen(p: LivePack) -> tuple[object, ...]:
    """Everything a frame can change that a subscriber or the fault stage sees."""
    s = p.state
    c = p.counters
    return (list(s.values), list(s.cell_v), list(s.cell_t), list(s.balancing),
            dict(s.extras), list(p.implausible), list(p.fault_state), c.gated,
            c.bad_checksum, c.bad_counter, s.changed, s.cells_changed)


@pytest.mark.parametrize("profile", [*PROFILES, None],
                         ids=[*(p.stem for p in PROFILES), "short-big-endian"])
def test_frames_equal_under_the_kernels_masks_do_the_same(tmp_path: Path,
                                                          profile: Path | None) -> None:
    """Pack `a` gets random frames; pack `b` the same frames with every bit outside the
    kernel's mask for it randomised, or nothing where the kernel drops the frame. State
    carries over from frame to frame, so messages that depend on each other (gates,
    `sources:`, checks) are covered too."""
    if profile is None:
        (tmp_path / "short.dbc").write_text(SHORT_BE_DBC)
        profile = tmp_path / "short-be.yaml"
        profile.write_text(SHORT_BE_PROFILE)
    a, b, lengths = _packs(tmp_path, profile)
    if profile.stem == "short-be":
        frames = bcm_frames(a.reads[0x300])
        assert frames is not None and len(frames) == 17 and frames[0] == 0x0F << 56
    rnd = random.Random(profile.stem)
    keys = sorted(a.handlers)
    for _ in range(2000):
        key = rnd.choice(keys)
        n = lengths[key]
        frame = rnd.randbytes(n)
        # the bits the kernel compares for this frame (its multiplexer value's included)
        mask = bcm_mask(bcm_frames(a.reads[key]), frame)
        other = None if mask is None else (int.from_bytes(frame.ljust(8, b"\0"), "big")
                                           ^ (rnd.getrandbits(64) & ~mask)).to_bytes(8, "big")[:n]
        a.handlers[key](1.0, frame)
        if other is not None:
            b.handlers[key](1.0, other)
        assert _seen(a) == _seen(b), f"{key:#x}: {frame.hex()} / {other and other.hex()}"
        a.state.changed = a.state.cells_changed = b.state.changed = b.state.cells_changed = False


def test_a_multiplexed_message_gets_one_mask_per_value(tmp_path: Path) -> None:
    """example-bms CellVoltages (0x408): byte 0 selects four cells (bytes 1-7 hold them,
    the last one partly): the kernel compares the cells of the frame's own value, so the
    value changing from frame to frame wakes nobody."""
    a, _, _ = _packs(tmp_path, REPO / "config" / "profiles" / "example-bms.yaml")
    frames = bcm_frames(a.reads[0x408])
    assert frames is not None and frames[0] == 0xFF << 56
    cells = frames[1] & ~frames[0]
    assert cells and cells.bit_length() <= 56
    assert [f >> 56 for f in frames[1:]] == list(range(len(frames) - 1))
    assert all(f & ~frames[0] == cells for f in frames[1:])
    # PackStatus (0x400) is not multiplexed: one mask, the alive counter (byte 7) out
    assert bcm_frames(a.reads[0x400]) == (0xFFFFFFFFFFFFFF00,)


def test_a_checksum_over_the_frame_makes_every_bit_count(tmp_path: Path) -> None:
    """orion-bms2's cell broadcast (0x36) carries a checksum over its bytes."""
    a, _, _ = _packs(tmp_path, REPO / "config" / "profiles" / "orion-bms2.yaml")
    assert a.reads[0x36] is None and bcm_frames(a.reads[0x36]) is None
