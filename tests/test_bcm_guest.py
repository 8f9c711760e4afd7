"""receive: bcm against the real kernel's broadcast manager: what the kernel's filtering
must not change (values, checks, ISO-TP answers), each next to receive: raw as the
reference. Run where vcan0 is up (CI: the qemu guest of .ci/guest.sh); elsewhere they
skip, like tests/test_socketcan_guest.py."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from pathlib import Path

import pytest

from gateway.config import CanBus
from gateway.model import FIELD_INDEX
from gateway.source.socketcan import BcmSocket
from tests.test_socketcan import CHANNEL
from tests.test_socketcan_guest import daemon, until, write_cfg

pytestmark = [
    pytest.mark.socketcan,
    pytest.mark.skipif(not CHANNEL, reason="set TEST_SOCKETCAN_CHANNEL=vcan0 on a machine with a "
                       "vcan interface (CI: .ci/guest.sh boots one)"),
]

# 0x300: a 4-bit multiplexer with a value per multiplexer value, and the pack voltage in
# every frame whatever the multiplexer says; 0x301: a value and a 4-bit alive counter.
DBC = """\
VERSION ""
BS_:
BU_: B
BO_ 768 Muxed: 8 B
 SG_ Sel M : 0|4@1+ (1,0) [0|15] "" Vector__XXX
 SG_ A m0 : 8|8@1+ (1,0) [0|100] "%" Vector__XXX
 SG_ B m1 : 8|8@1+ (1,0) [0|100] "%" Vector__XXX
 SG_ V : 48|16@1+ (0.1,0) [0|600] "V" Vector__XXX
BO_ 769 Counted: 8 B
 SG_ I : 0|16@1- (0.1,0) [-500|500] "A" Vector__XXX
 SG_ Alive : 56|4@1+ (1,0) [0|15] "" Vector__XXX
"""
PROFILE = """\
name: bcm-guest
dbc: [guest.dbc]
fields:
  voltage_v: {message: Muxed, signal: V}
  soc_pct: {message: Muxed, signal: A}
  soh_pct: {message: Muxed, signal: B}
  current_a: {message: Counted, signal: I}
checks:
  - {message: Counted, counter: Alive}
"""


def setup(tmp_path: Path, path: str, stale: float = 1) -> Path:
    (tmp_path / "guest.dbc").write_text(DBC)
    (tmp_path / "guest.yaml").write_text(PROFILE)
    return write_cfg(tmp_path, f"""\
        can: {{interface: socketcan, channel: {CHANNEL}, receive: {path}}}
        packs: [{{id: p, profile: {tmp_path / 'guest.yaml'}, stale_after_s: {stale}}}]
        """)


def sender() -> socket.socket:
    s = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    s.bind((CHANNEL,))
    return s


def send(s: socket.socket, can_id: int, data: bytes) -> None:
    s.send(struct.pack("=IB3x8s", can_id, len(data), data.ljust(8, b"\0")))


def muxed(sel: int, value: int, volts: float) -> bytes:
    return bytes([sel, value, 0, 0, 0, 0]) + round(volts * 10).to_bytes(2, "little")


@pytest.mark.parametrize("path", ["raw", "bcm"])
async def test_a_value_read_whatever_the_multiplexer_says_follows_the_last_frame(
        tmp_path: Path, path: str) -> None:
    """The pack voltage is in every frame of a multiplexed message. Group 0 says 51.2 V,
    group 1 says 51.3 V, then group 0 says 51.2 V again: the pack is at 51.2 V. The
    kernel compares a frame with the last frame of its own group (bcm.c), and group 0's
    frame is the same as its last one: a per-group mask would never deliver it."""
    tx = sender()
    try:
        async with daemon(setup(tmp_path, path, stale=2)) as (d, _):
            st = d.pipeline.packs[0].live.state
            v = FIELD_INDEX["voltage_v"]
            for sel, volts in ((0, 51.2), (1, 51.3), (0, 51.2)):
                send(tx, 0x300, muxed(sel, 40 + sel, volts))
                await asyncio.sleep(0.05)
            await until(lambda: st.values[FIELD_INDEX["soh_pct"]] == 41, 5, "group 1")
            await asyncio.sleep(0.1)
            assert st.values[v] == pytest.approx(51.2)
            await asyncio.sleep(1.2)  # refeeds (every 0.5 s) must not bring 51.3 back
            assert st.values[v] == pytest.approx(51.2)
    finally:
        tx.close()


@pytest.mark.parametrize("path", ["raw", "bcm"])
async def test_a_checked_rolling_counter_counts_no_refeed_as_a_repeat(
        tmp_path: Path, path: str) -> None:
    """A BMS at 20 Hz with a healthy alive counter: no frame is a repeat, whatever the
    kernel delivers and the gateway feeds again between changes."""
    tx = sender()
    try:
        async with daemon(setup(tmp_path, path)) as (d, _):
            live = d.pipeline.packs[0].live
            for n in range(30):  # 1.5 s: several refeeds (every 0.25 s with stale 1 s)
                send(tx, 0x301, (100).to_bytes(2, "little", signed=True) + bytes(5)
                     + bytes([n % 16]))
                await asyncio.sleep(0.05)
            await until(lambda: live.state.values[FIELD_INDEX["current_a"]] is not None, 5,
                        "the current")
            await asyncio.sleep(0.3)
            assert live.counters.bad_counter == 0
            # a stuck sender (the same frame again) is a repeat on every path
            send(tx, 0x301, (100).to_bytes(2, "little", signed=True) + bytes(5) + bytes([13]))
            await until(lambda: live.counters.bad_counter == 1, 5, "the repeat counted")
    finally:
        tx.close()


def isotp_answer() -> list[bytes]:
    """Nissan Leaf's cell answer (61 02, 96 cells, 4 bytes) as ISO-TP frames on 0x7BB."""
    payload = bytes([0x61, 0x02]) + b"".join((3700 + i).to_bytes(2, "big")
                                             for i in range(96)) + bytes(4)
    frames = [bytes([0x10 | len(payload) >> 8, len(payload) & 0xFF]) + payload[:6]]
    rest, sn = payload[6:], 1
    while rest:
        frames.append(bytes([0x20 | sn]) + rest[:7].ljust(7, b"\xff"))
        rest, sn = rest[7:], (sn + 1) & 0x0F
    return frames


@pytest.mark.parametrize("path", ["raw", "bcm"])
async def test_an_iso_tp_answer_with_a_pause_is_not_broken_by_a_refeed(
        tmp_path: Path, path: str) -> None:
    """A slow ISO-TP sender pauses 0.6 s within an answer (the client allows 1 s between
    frames): the answer is complete. A refeed of the last consecutive frame in the
    pause would be a sequence error and drop the answer."""
    cfg = write_cfg(tmp_path, f"""\
        can: {{interface: socketcan, channel: {CHANNEL}, receive: {path}}}
        packs: [{{id: p, profile: nissan-leaf, stale_after_s: 1}}]
        """)
    frames = isotp_answer()
    tx = sender()
    try:
        async with daemon(cfg) as (d, _):
            for f in frames[:2]:
                send(tx, 0x7BB, f)
            await asyncio.sleep(0.6)
            for f in frames[2:]:
                send(tx, 0x7BB, f)
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.8)  # the answer's cells written, and refeeds since
            stats = d.poller.stats()["p:isotp[0]"]
            assert (stats["responses"], stats["sequence_errors"]) == (1, 0)
            cells = d.pipeline.packs[0].live.state.cell_v
            assert cells == pytest.approx([(3700 + i) / 1000 for i in range(96)])
    finally:
        tx.close()


def test_the_kernel_takes_a_multiplexer_mask_and_256_values() -> None:
    """bcm.c: RX_SETUP takes MAX_NFRAMES + 1 frames (the multiplexer's mask first), so an
    8-bit multiplexer can have a content mask for every value; one more is refused."""
    cfg = CanBus(name=CHANNEL, interface="socketcan", channel=CHANNEL, receive="bcm")
    mux = 0xFF << 56
    frames = (mux, *((v << 56) | (0xFF << 48) for v in range(256)))
    sock = BcmSocket(cfg, {0x123: frames}, 2.0)
    tx = sender()
    try:
        send(tx, 0x123, bytes([0xFF, 7]))
        send(tx, 0x123, bytes([0xFF, 7]))  # the same again: not delivered
        send(tx, 0x123, bytes([0x05, 9]))
        out: list = []
        deadline = time.monotonic() + 5
        while len(out) < 2 and time.monotonic() < deadline:
            sock.drain(out, CHANNEL, None)
            time.sleep(0.05)
        time.sleep(0.1)
        sock.drain(out, CHANNEL, None)
        assert [f[2] for f in out] == [bytes([0xFF, 7]), bytes([0x05, 9])]
        with pytest.raises(OSError):
            sock.watch(0x124, (*frames, 1 << 56))
    finally:
        tx.close()
        sock.shutdown()


@pytest.mark.parametrize("path", ["raw", "bcm"])
async def test_a_throttle_thins_no_index_cells_and_no_iso_tp_answer(
        tmp_path: Path, path: str) -> None:
    """bcm_throttle_s keeps the last frame of an id per interval, which stands for the
    ones before it only where each frame carries all its id writes: Daly's cell answer
    (five frames numbered in byte 0) and a Leaf ISO-TP answer (29 frames) are parts,
    and must arrive whole."""
    throttle = ", bcm_throttle_s: 0.5" if path == "bcm" else ""
    cfg = write_cfg(tmp_path, f"""\
        can: {{interface: socketcan, channel: {CHANNEL}, receive: {path}{throttle}}}
        packs: [{{id: d, profile: daly}}, {{id: l, profile: nissan-leaf}}]
        """)
    tx = sender()
    try:
        async with daemon(cfg) as (d, _):
            for n in range(5):
                cells = b"".join((3300 + 3 * n + i).to_bytes(2, "big") for i in range(3))
                send(tx, 0x18954001 | socket.CAN_EFF_FLAG, bytes([n + 1]) + cells + b"\0")
            for f in isotp_answer():
                send(tx, 0x7BB, f)
            await asyncio.sleep(1.5)
            daly, leaf = (p.live.state for p in d.pipeline.packs)
            assert daly.cell_v == pytest.approx([(3300 + i) / 1000 for i in range(15)])
            assert leaf.cell_v == pytest.approx([(3700 + i) / 1000 for i in range(96)])
    finally:
        tx.close()
