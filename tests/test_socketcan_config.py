"""The receive-path choice and the kernel filter, checked without a SocketCAN kernel."""

from __future__ import annotations

import struct
import textwrap
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.decode.dbc import BitField, ReadBits
from gateway.runtime.pipeline import Pipeline
from gateway.source.logs import LiveSource
from gateway.source.socketcan import (
    BcmSource,
    RawSource,
    bcm_frames,
    bcm_mask,
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


def test_bcm_refeeds_within_every_window_and_a_reload_that_shortens_one_reopens(
        tmp_path: Path) -> None:
    """receive: bcm feeds the last frames again between changes so that what expects a
    frame within some time sees one: the pack's stale_after_s, but also a `sources:`
    entry's `fresh_s` (a shorter one made the preferred source stale between refeeds,
    and its fallback took over) and a DTC stream's clear_after_s. The kernel's
    RX_TIMEOUT is set when the socket opens, so a reload that needs another interval
    opens a new source."""
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "config" / "profiles" / "can-bms.yaml").read_text()
    text = text.replace("dbc: [can-bms.dbc]", f"dbc: [{repo / 'dbc' / 'can-bms.dbc'}]")
    fresh = text.replace("  temp_min_c:\n    sources:", "  temp_min_c:\n    fresh_s: 1\n    sources:")
    assert fresh != text
    (tmp_path / "fresh.yaml").write_text(fresh)

    def pipeline(profile: str, stale: float) -> Pipeline:
        p = tmp_path / "gw.yaml"
        p.write_text(textwrap.dedent(f"""\
            state_dir: {tmp_path / 'state'}
            can: {{interface: socketcan, receive: bcm}}
            packs: [{{id: p, profile: {profile}, stale_after_s: {stale}}}]
            """))
        return Pipeline(load_config(p))

    running = [pipeline(str(tmp_path / "fresh.yaml"), 10)]
    src = make_source(running[0].cfg.buses[0], 0, lambda b: None, lambda c, a, d: None,
                      lambda: running[0])
    assert isinstance(src, BcmSource)
    assert src.refeed_s <= 0.25  # fresh_s 1, not stale_after_s 10
    running[0] = pipeline("can-bms", 10)
    assert not src.refilter()  # now every 1 s
    src = make_source(running[0].cfg.buses[0], 0, lambda b: None, lambda c, a, d: None,
                      lambda: running[0])
    assert src.refeed_s == 1.0 and src.refilter()
    running[0] = pipeline("can-bms", 0.8)  # SIGHUP with stale_after_s: 0.8
    assert not src.refilter()


def test_an_8_bit_multiplexer_gets_a_mask_for_each_of_its_256_values() -> None:
    """bcm.c takes MAX_NFRAMES (256) content masks after the multiplexer's mask."""
    mux = BitField("Sel", big_endian=False, shift=0, mask=0xFF, signed=False, float_fmt=None,
                   scale=1, offset=0, min_bytes=1, length=8)
    reads = ReadBits(0xFF << 56, mux, 8, dict.fromkeys(range(256), 255 << 48))
    frames = bcm_frames(reads)
    assert frames is not None and len(frames) == 257
    assert bcm_mask(frames, bytes([200, 1])) == 0xFFFF << 48
    more = ReadBits(0xFF << 56, mux, 8, dict.fromkeys(range(257), 255 << 48))
    assert bcm_frames(more) == (0xFFFF << 48,)  # past the kernel's limit: one mask


def test_a_pollers_replies_are_delivered_frame_by_frame(tmp_path: Path) -> None:
    """Daly: each request is matched to its reply (`poll: ... reply:`), and a reply the
    same as the last one is an answer too: the kernel must deliver it, where the pack's
    own handler would only need changes."""
    from gateway.source.poll import Poller

    p = tmp_path / "gw.yaml"
    p.write_text(textwrap.dedent(f"""\
        state_dir: {tmp_path / 'state'}
        can: {{interface: socketcan, receive: bcm}}
        packs: [{{id: p, profile: daly, transmit: true}}]
        """))
    pipeline = Pipeline(load_config(p))
    src = make_source(pipeline.cfg.buses[0], 0, lambda b: None, lambda c, a, d: None,
                      lambda: pipeline)
    assert isinstance(src, BcmSource)
    reply = 0x98904001  # Reply_0x90_PackStatus of board 1, 29-bit
    assert src._masks()[reply] is not None  # no poller yet: the handler's bits
    poller = Poller(pipeline, lambda bus, can_id, data, ext: True)
    assert any(job.reply == reply for job in poller.jobs)
    assert src._masks()[reply] is None
