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
from pathlib import Path

import pytest

from gateway.normalize.compiler import LivePack
from gateway.source.socketcan import bcm_frames, bcm_mask
from tests.conftest import REPO, compile_profile

PROFILES = sorted((REPO / "config" / "profiles").glob("*.yaml"))

# 6-byte big-endian messages (no shipped profile has one shorter than 8 bytes, where
# `be` is aligned to the DBC length), each with a 4-bit multiplexer in byte 0. Short: a
# value per multiplexer value and one read whatever the value (which two values write,
# so one mask for every frame). ShortMux: values of three multiplexer values only (one
# of them under two values of which only one is read), the cells of a group by its value.
SHORT_BE_DBC = """\
VERSION ""
BS_:
BU_: B
BO_ 768 Short: 6 B
 SG_ Sel M : 3|4@0+ (1,0) [0|15] "" Vector__XXX
 SG_ A m0 : 15|12@0+ (0.1,0) [0|100] "%" Vector__XXX
 SG_ B m1 : 23|12@0+ (0.1,0) [0|100] "%" Vector__XXX
 SG_ V : 39|16@0+ (0.01,0) [0|600] "V" Vector__XXX
BO_ 769 ShortMux: 6 B
 SG_ Sel M : 3|4@0+ (1,0) [0|15] "" Vector__XXX
 SG_ I m2 : 15|16@0- (0.1,0) [-500|500] "A" Vector__XXX
 SG_ T m5 : 39|8@0+ (1,-40) [-40|100] "degC" Vector__XXX
 SG_ C0 m8 : 15|16@0+ (1,0) [0|5000] "mV" Vector__XXX
 SG_ C1 m8 : 31|16@0+ (1,0) [0|5000] "mV" Vector__XXX
 SG_ C2 m8 : 47|8@0+ (20,0) [0|5000] "mV" Vector__XXX
"""
SHORT_BE_PROFILE = """\
name: short-be
dbc: [short.dbc]
fields:
  voltage_v: {message: Short, signal: V}
  soc_pct: {message: Short, signal: A}
  soh_pct: {message: Short, signal: B}
  current_a: {message: ShortMux, signal: I}
  temp_max_c: {message: ShortMux, signal: T}
cells:
  voltages:
    - {message: ShortMux, mux: true, signals: "C*", unit: mV}
"""


def _packs(tmp: Path, profile: Path) -> tuple[LivePack, LivePack, dict[int, int]]:
    """Two packs of one profile, fed side by side."""
    a, lengths = compile_profile(tmp, profile)
    b, _ = compile_profile(tmp, profile)
    return a, b, lengths


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
        assert bcm_frames(a.reads[0x300]) == (a.reads[0x300].flat(),)
        frames = bcm_frames(a.reads[0x301])
        assert frames is not None and len(frames) == 4 and frames[0] == 0x0F << 56
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


# Extended multiplexing: the cells of a module (inner multiplexer) on page 1, the pack
# voltage on page 0, the power on pages 2 and 3 (one signal under two values of the
# outer multiplexer: frames of both write it).
NESTED_DBC = """\
VERSION ""
BS_:
BU_: B
BO_ 1280 Nested: 8 B
 SG_ Page M : 0|4@1+ (1,0) [0|0] "" Vector__XXX
 SG_ Module m1M : 4|4@1+ (1,0) [0|0] "" Vector__XXX
 SG_ PackV m0 : 8|16@1+ (0.1,0) [0|0] "V" Vector__XXX
 SG_ Cell0 m0 : 8|16@1+ (1,0) [0|0] "mV" Vector__XXX
 SG_ Cell1 m0 : 24|16@1+ (1,0) [0|0] "mV" Vector__XXX
 SG_ Power m2 : 8|16@1- (1,0) [0|0] "W" Vector__XXX
SG_MUL_VAL_ 1280 Module Page 1-1;
SG_MUL_VAL_ 1280 PackV Page 0-0;
SG_MUL_VAL_ 1280 Power Page 2-3;
SG_MUL_VAL_ 1280 Cell0 Module 0-3;
SG_MUL_VAL_ 1280 Cell1 Module 0-3;
"""
NESTED_PROFILE = """\
name: nested
dbc: [nested.dbc]
fields:
  voltage_v: {message: Nested, signal: PackV}
  power_w: {message: Nested, signal: Power}
cells:
  voltages:
    - {message: Nested, mux: true, stride: 2, signals: "Cell*", unit: mV}
"""


class KernelRx:
    """One RX_SETUP as bcm.c's bcm_rx_handler treats a frame (RX_CHECK_DLC set): with no
    frames (RX_FILTER_ID) every frame; with one, a frame whose masked bits or length
    differ from the last delivered; with several, the same against the last frame of
    the first value whose multiplexer bits match (none: dropped)."""

    def __init__(self, frames: tuple[int, ...] | None) -> None:
        self.frames = frames
        self.last: dict[int, bytes] = {}

    def delivers(self, data: bytes) -> bool:
        if self.frames is None:
            return True
        word = int.from_bytes(data.ljust(8, b"\0"), "big")
        index = 0
        if len(self.frames) > 1:
            mux = self.frames[0]
            found = [i for i in range(1, len(self.frames))
                     if self.frames[i] & mux == word & mux]
            if not found:
                return False
            index = found[0]
        cf, last = self.frames[index], self.last.get(index)
        if last is not None and len(last) == len(data) and \
                cf & word == cf & int.from_bytes(last.ljust(8, b"\0"), "big"):
            return False
        self.last[index] = data
        return True


@pytest.mark.parametrize("profile", [*PROFILES, "short-big-endian", "nested"],
                         ids=[*(p.stem for p in PROFILES), "short-big-endian", "nested"])
def test_a_frame_the_kernel_holds_back_changes_nothing(tmp_path: Path,
                                                       profile: Path | str) -> None:
    """Pack `a` gets every frame, pack `b` only those the kernel delivers: a frame equal
    (under the mask of its multiplexer value) to the last one delivered of that value
    is held back. Frames repeat often (a few payloads per id, a bit flipped now and
    then), so values that come back, groups that repeat while another group changes a
    value both write, and stuck counters all happen. Implausible and gated counts are
    counted per delivered frame (docs/config.md), the rest must stay equal."""
    if profile == "short-big-endian":
        (tmp_path / "short.dbc").write_text(SHORT_BE_DBC)
        profile = tmp_path / "short-be.yaml"
        profile.write_text(SHORT_BE_PROFILE)
    elif profile == "nested":
        (tmp_path / "nested.dbc").write_text(NESTED_DBC)
        profile = tmp_path / "nested.yaml"
        profile.write_text(NESTED_PROFILE)
    assert isinstance(profile, Path)
    a, b, lengths = _packs(tmp_path, profile)
    kernel = {key: KernelRx(bcm_frames(a.reads[key])) for key in a.handlers}
    rnd = random.Random(profile.stem)
    keys = sorted(a.handlers)
    pool = {key: [rnd.randbytes(lengths[key]) for _ in range(6)] for key in keys}

    def seen(p: LivePack) -> tuple[object, ...]:
        out = _seen(p)
        return out[:5] + out[6:7] + out[8:]  # without implausible counts and `gated`

    for i in range(3000):
        key = rnd.choice(keys)
        frame = bytearray(rnd.choice(pool[key]))
        if rnd.random() < 0.3:
            frame[rnd.randrange(len(frame))] ^= 1 << rnd.randrange(8)
        a.handlers[key](1.0, bytes(frame))
        if kernel[key].delivers(bytes(frame)):
            b.handlers[key](1.0, bytes(frame))
        assert seen(a) == seen(b), f"frame {i}, {key:#x}: {frame.hex()}"
        a.state.changed = a.state.cells_changed = b.state.changed = b.state.cells_changed = False


def test_a_checked_rolling_counter_leaves_every_frame_to_the_handler(tmp_path: Path) -> None:
    """A repeated counter is a stuck sender (counted), and a frame fed twice is a
    repeat: the kernel delivers every frame of the id, and the gateway feeds none of
    them again (BcmSource skips ids without a mask)."""
    (tmp_path / "short.dbc").write_text(SHORT_BE_DBC)
    profile = tmp_path / "counted.yaml"
    profile.write_text(SHORT_BE_PROFILE + "checks:\n  - {message: Short, counter: Sel}\n")
    a, _, _ = _packs(tmp_path, profile)
    assert a.reads[0x300] is None and bcm_frames(a.reads[0x300]) is None
    assert a.reads[0x301] is not None


def test_whole_says_whether_the_last_frame_of_a_group_stands_for_the_ones_before(
        tmp_path: Path) -> None:
    """bcm_throttle_s keeps the last frame of each group per interval: fine where every
    frame of a group writes all the group writes, data lost where a signal of the frame
    chooses the place (`index:` cells, an inner multiplexer's groups)."""
    profiles = REPO / "config" / "profiles"
    example, _, _ = _packs(tmp_path, profiles / "example-bms.yaml")
    assert example.reads[0x400] is not None and example.reads[0x400].whole
    assert example.reads[0x408] is not None and example.reads[0x408].whole  # per value
    daly, _, _ = _packs(tmp_path, profiles / "daly.yaml")
    cells = daly.reads[0x98954001]  # Reply_0x95_CellVoltages: index FrameNumber
    assert cells is not None and not cells.whole
    assert not cells.union(example.reads[0x400]).whole
    (tmp_path / "nested.dbc").write_text(NESTED_DBC.replace("Page 2-3", "Page 2-2"))
    (tmp_path / "nested.yaml").write_text(NESTED_PROFILE)
    nested, _, _ = _packs(tmp_path, tmp_path / "nested.yaml")
    page = nested.reads[0x500]  # the modules of page 1 share one group
    assert page is not None and page.mux is not None and not page.whole


def test_a_dtc_stream_is_not_whole(tmp_path: Path) -> None:
    """A DTC stream reports one active code per frame, in turn: the last frame of a
    throttle interval stands for none of the other codes, which would expire."""
    (tmp_path / "dtc.dbc").write_text(
        'VERSION ""\nBS_:\nBU_: B\nBO_ 1800 Dtc: 8 B\n'
        ' SG_ Code : 0|16@1+ (1,0) [0|65535] "" Vector__XXX\n'
        ' SG_ V : 16|16@1+ (0.1,0) [0|600] "V" Vector__XXX\n')
    profile = tmp_path / "dtc.yaml"
    profile.write_text("name: dtc\ndbc: [dtc.dbc]\nfields:\n  voltage_v: {message: Dtc, signal: V}\n"
                       "dtcs:\n  - {message: Dtc, signal: Code, clear_after_s: 2}\n")
    a, _, _ = _packs(tmp_path, profile)
    assert a.reads[1800] is not None and not a.reads[1800].whole
    assert 2 in a.windows  # fed again well within clear_after_s
