"""The receive-path choice and the kernel filter, checked without a SocketCAN kernel."""

from __future__ import annotations

import struct
import textwrap
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.runtime.pipeline import Pipeline
from gateway.source.logs import LiveSource
from gateway.source.socketcan import (
    BcmSource,
    RawSource,
    bcm_frames,
    bcm_rx_setup,
    can_filters,
    make_source,
)


def cfg(tmp_path: Path, can: str) -> Path:
    p = tmp_path / "gw.yaml"
    p.write_text(textwrap.dedent(f"""\
        state_dir: {tmp_path / 'state'}
        can: {can}
        packs: [{{id: p, profile: example-bms}}]
        """))
    return p


def test_socketcan_reads_the_socket_directly_unless_told_otherwise(tmp_path: Path) -> None:
    def source(can: str) -> object:
        c = load_config(cfg(tmp_path, can))
        p = Pipeline(c)
        return make_source(c.buses[0], 0, lambda b: None, lambda c, a, d: None, lambda: p)

    raw = load_config(cfg(tmp_path, "{interface: socketcan, channel: can0}")).buses[0]
    assert raw.receive == "raw" and raw.kernel_filter
    assert type(source("{interface: socketcan, channel: can0}")) is RawSource
    assert type(source("{interface: socketcan, receive: python-can}")) is LiveSource
    assert type(source("{interface: socketcan, receive: bcm}")) is BcmSource
    virt = load_config(cfg(tmp_path, "{interface: virtual, channel: x}")).buses[0]
    assert virt.receive == "python-can"


@pytest.mark.parametrize(("can", "says"), [
    ("{interface: virtual, channel: x, receive: raw}", "needs interface: socketcan"),
    ("{interface: socketcan, receive: fast}", "unknown receive path 'fast'"),
    ("{interface: socketcan, kernel_filter: 1}", "must be true or false"),
    ("{interface: socketcan, fd: true, receive: bcm}", "classic CAN frames only"),
])
def test_a_wrong_receive_setting_names_the_key_and_the_fix(
        tmp_path: Path, can: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(cfg(tmp_path, can))
    text = str(e.value)
    assert says in text and "can." in text and "gw.yaml" in text


def test_the_kernel_filter_matches_each_id_exactly_in_its_own_id_space() -> None:
    flt = can_filters({0x400, 0x80000000 | 0x18FF50E5})
    pairs = list(struct.iter_unpack("=II", flt))
    # standard id: 11-bit mask plus the EFF and RTR flags, so 29-bit 0x400 and remote
    # frames do not pass; extended: the 29-bit mask, EFF flag required
    assert pairs == [(0x400, 0xC00007FF), (0x98FF50E5, 0xDFFFFFFF)]


def test_the_kernel_compares_only_the_bits_the_profile_reads(tmp_path: Path) -> None:
    """example-bms PackStatus (0x400): bytes 0-6 are read, byte 7 (AliveCounter) is not,
    so a frame differing only in its counter never wakes the gateway."""
    p = Pipeline(load_config(cfg(tmp_path, "{interface: socketcan, receive: bcm}")))
    frames = bcm_frames(p.packs[0].live.reads[0x400])
    assert frames == (0xFFFFFFFFFFFFFF00,)
    head = bcm_rx_setup(0x400, frames, 2.0, 0.0)
    assert head.endswith(struct.pack("=IB3x8s", 0x400, 8, bytes([255] * 7 + [0])))
    # a multiplexed message: the multiplexer's mask, then one frame per value
    muxed = bcm_frames(p.packs[0].live.reads[0x408])
    assert muxed is not None and len(bcm_rx_setup(0x408, muxed, 2.0, 0.0)) == \
        len(head) + 16 * (len(muxed) - 1)
