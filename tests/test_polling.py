"""Polled BMSes on python-can's `virtual` bus: a responder thread plays the BMS, the real
Daemon polls it, and a third endpoint records everything on the channel.

Expected values are the ones the test chose, encoded with cantools; no gateway code is
used to compute them.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import can
import cantools
import pytest
from conftest import REPO, shared

from gateway.config import CellBlock, ConfigError, IsoTpRequest, load_config
from gateway.runtime.daemon import Daemon
from gateway.source.poll import IsoTpClient, decode_cells

DALY_DBC = REPO / "dbc" / "daly.dbc"


class Recorder:
    """Every frame seen on a virtual channel, from any sender but itself."""

    def __init__(self, channel: str) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.frames: list[can.Message] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            m = self.bus.recv(0.05)
            if m is not None:
                self.frames.append(m)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.bus.shutdown()


class Responder:
    """A BMS on the bus: calls `answer(msg)` for each frame and sends what it returns."""

    def __init__(self, channel: str, answer: Callable[[can.Message], list[can.Message]]) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.answer = answer
        self.requests: list[can.Message] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            m = self.bus.recv(0.05)
            if m is None:
                continue
            self.requests.append(m)
            for reply in self.answer(m):
                self.bus.send(reply)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.bus.shutdown()


def run_daemon(cfg_path: Path, done: Callable[[Daemon], bool], timeout: float = 8.0) -> Daemon:
    cfg = load_config(cfg_path, mqtt_url="-")
    out = io.StringIO()

    async def main() -> Daemon:
        d = Daemon(cfg, stdout=out)

        async def stopper() -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not done(d):
                await asyncio.sleep(0.05)
            d.stop_event.set()

        task = asyncio.create_task(stopper())
        await d.serve()
        await task
        return d

    return asyncio.run(main())


# ------------------------------------------------------------------ Daly


class DalyBms:
    """Answers Daly requests 0x18<cmd><addr>40 as board `addr` would."""

    def __init__(self, addr: int, cells_mv: list[int], temps_c: list[int],
                 balancing: set[int]) -> None:
        self.db = cantools.database.load_file(str(DALY_DBC))
        self.addr = addr
        self.cells_mv = cells_mv
        self.temps_c = temps_c
        self.balancing = balancing

    def _msg(self, name: str, values: dict[str, float]) -> can.Message:
        m = self.db.get_message_by_name(name)
        return can.Message(arbitration_id=m.frame_id + self.addr - 1, is_extended_id=True,
                           data=m.encode(values))

    def answer(self, req: can.Message) -> list[can.Message]:
        if not req.is_extended_id or (req.arbitration_id & 0xFF) != 0x40 \
                or (req.arbitration_id >> 8) & 0xFF != self.addr \
                or req.arbitration_id >> 24 != 0x18:
            return []
        cmd = (req.arbitration_id >> 16) & 0xFF
        if cmd == 0x90:
            return [self._msg("Reply_0x90_PackStatus", {
                "TotalVoltage": sum(self.cells_mv) / 1000, "AcquisitionVoltage": 0,
                "Current": -12.5, "StateOfCharge": 64.2})]
        if cmd == 0x94:
            return [self._msg("Reply_0x94_StatusInfo", {
                "CellCount": len(self.cells_mv), "TemperatureSensorCount": len(self.temps_c),
                "ChargerStatus": 0, "LoadStatus": 1, "CycleCount": 17,
                **{f"DioState_{x}": 0 for x in ("DI1", "DI2", "DI3", "DI4", "DO1", "DO2",
                                                "DO3", "DO4")}})]
        if cmd == 0x95:  # three cells per frame, frames numbered from 1
            out = []
            for f in range((len(self.cells_mv) + 2) // 3):
                chunk = [*self.cells_mv[f * 3:f * 3 + 3], 0, 0][:3]
                out.append(self._msg("Reply_0x95_CellVoltages", {
                    "FrameNumber": f + 1, "CellVoltage1": chunk[0], "CellVoltage2": chunk[1],
                    "CellVoltage3": chunk[2]}))
            return out
        if cmd == 0x96:
            out = []
            for f in range((len(self.temps_c) + 6) // 7):
                chunk = (self.temps_c[f * 7:f * 7 + 7] + [-40] * 7)[:7]
                out.append(self._msg("Reply_0x96_Temperatures", {
                    "FrameNumber": f + 1, **{f"Temperature{i + 1}": t for i, t in enumerate(chunk)}}))
            return out
        if cmd == 0x97:
            return [self._msg("Reply_0x97_BalanceState", {
                f"Cell{i:02d}Balancing": int(i in self.balancing) for i in range(1, 49)})]
        return []


def daly_config(tmp: Path, channel: str, transmit: bool, addrs: list[int]) -> Path:
    packs = "\n".join(
        f"  - {{id: daly{a}, profile: daly, id_offset: {a - 1}, transmit: {str(transmit).lower()},"
        f" stale_after_s: 2}}" for a in addrs)
    p = tmp / "gateway.yaml"
    p.write_text(f"gateway_id: t\nstate_dir: {tmp}/state\nlog_level: warning\n"
                 f"can: {{interface: virtual, channel: {channel}}}\npacks:\n{packs}\n")
    return p


@pytest.fixture
def channel() -> Iterator[str]:
    yield f"test-{uuid.uuid4().hex[:8]}"


def test_daly_polled_two_packs_full_cell_list(tmp_path: Path, channel: str) -> None:
    bms1 = DalyBms(1, [3301, 3302, 3303, 3304, 3305, 3306, 3307, 3308, 3309, 3310, 3311, 3312,
                       3313, 3314, 3315, 3316], [21, 22, 23], {2, 16})
    bms2 = DalyBms(2, [3200 + i for i in range(1, 9)], [30, 31], set())
    responders = [Responder(channel, b.answer) for b in (bms1, bms2)]
    rec = Recorder(channel)
    try:
        cfg = daly_config(tmp_path, channel, True, [1, 2])

        def done(d: Daemon) -> bool:
            sts = [rt.live.state for rt in d.pipeline.packs]
            return all(st.cell_v and all(c is not None for c in st.cell_v[:8]) for st in sts) \
                and all(len(st.cell_t) >= 2 and st.cell_t[1] is not None for st in sts) \
                and sts[0].cell_v[15:16] != [None] and len(sts[0].balancing) >= 16 \
                and sts[0].get("cell_count") is not None
        d = run_daemon(cfg, done)
    finally:
        for r in responders:
            r.close()
        rec.close()
    st1, st2 = (rt.live.state for rt in d.pipeline.packs)
    # pack 1: 16 cells in six frames; the two unused slots of frame 6 are not cells
    assert st1.cell_v[:16] == pytest.approx([mv / 1000 for mv in bms1.cells_mv])
    assert all(c is None for c in st1.cell_v[16:])
    assert st1.cell_t[:3] == [21, 22, 23]
    assert [i + 1 for i, b in enumerate(st1.balancing) if b] == [2, 16]
    assert st1.get("cell_count") == 16
    assert st1.get("current_a") == pytest.approx(-12.5)
    assert st1.get("soc_pct") == pytest.approx(64.2)
    # pack 2 on the same bus, board address 2: its own values only
    assert st2.cell_v[:8] == pytest.approx([mv / 1000 for mv in bms2.cells_mv])
    assert all(c is None for c in st2.cell_v[8:])
    assert st2.cell_t[:2] == [30, 31]
    # requests went to 0x18<cmd><addr>40, and each was matched to its reply
    sent = {m.arbitration_id for m in rec.frames if (m.arbitration_id & 0xFF) == 0x40}
    assert {0x18950140, 0x18950240, 0x18900140, 0x18900240} <= sent
    stats = d.poller.stats()
    assert stats["daly1:poll[5]"]["answered"] >= 1
    assert stats["daly2:poll[5]"]["answered"] >= 1


def test_daly_transmit_off_sends_nothing(tmp_path: Path, channel: str) -> None:
    bms = DalyBms(1, [3300] * 4, [20], set())
    responder = Responder(channel, bms.answer)
    rec = Recorder(channel)
    try:
        cfg = daly_config(tmp_path, channel, False, [1])
        t0 = time.monotonic()
        d = run_daemon(cfg, lambda d: time.monotonic() - t0 > 2.5)
    finally:
        responder.close()
        rec.close()
    assert rec.frames == []          # nothing at all on the channel
    assert responder.requests == []  # the BMS was never asked
    assert sum(s.tx_count for s in d.runtime.sources) == 0
    st = d.pipeline.packs[0].live.state
    assert st.cell_v == [] and st.last_seen is None and not st.online


def test_daly_stops_answering_goes_stale(tmp_path: Path, channel: str) -> None:
    bms = DalyBms(1, [3300] * 4, [20], set())
    answering = threading.Event()
    answering.set()
    responder = Responder(channel, lambda m: bms.answer(m) if answering.is_set() else [])
    try:
        cfg = daly_config(tmp_path, channel, True, [1])
        seen: dict[str, bool] = {}

        def done(d: Daemon) -> bool:
            st = d.pipeline.packs[0].live.state
            if st.online and "online" not in seen:
                seen["online"] = True
                answering.clear()  # the BMS goes silent
            return bool(seen) and not st.online
        d = run_daemon(cfg, done, timeout=10)
    finally:
        responder.close()
    assert seen == {"online": True}
    assert not d.pipeline.packs[0].live.state.online
    stats = d.poller.stats()["daly1:poll[0]"]
    assert stats["unanswered"] >= 1


# ------------------------------------------------------------------ ISO-TP (Nissan Leaf)


def leaf_payload(cells_mv: list[int]) -> bytes:
    # 61 02, 96 x u16 big-endian mV, then 4 trailing bytes as the LBC sends
    return bytes([0x61, 0x02]) + b"".join(v.to_bytes(2, "big") for v in cells_mv) + b"\x00" * 4


def isotp_frames(payload: bytes) -> tuple[bytes, list[bytes]]:
    n = len(payload)
    ff = bytes([0x10 | (n >> 8), n & 0xFF]) + payload[:6]
    cfs, rest, sn = [], payload[6:], 1
    while rest:
        chunk, rest = rest[:7], rest[7:]
        cfs.append(bytes([0x20 | sn]) + chunk + b"\xff" * (7 - len(chunk)))
        sn = (sn + 1) & 0x0F
    return ff, cfs


class LeafLbc:
    """Answers 0x79B `02 21 02` with a multi-frame response on 0x7BB, after our FC."""

    def __init__(self, cells_mv: list[int]) -> None:
        self.ff, self.cfs = isotp_frames(leaf_payload(cells_mv))
        self.flow_controls: list[bytes] = []

    def answer(self, m: can.Message) -> list[can.Message]:
        if m.arbitration_id != 0x79B:
            return []
        data = bytes(m.data)
        if data[:3] == b"\x02\x21\x02":
            return [can.Message(arbitration_id=0x7BB, is_extended_id=False, data=self.ff)]
        if data[0] >> 4 == 3:
            self.flow_controls.append(data)
            return [can.Message(arbitration_id=0x7BB, is_extended_id=False, data=c)
                    for c in self.cfs]
        return []


def leaf_config(tmp: Path, channel: str, transmit: bool) -> Path:
    dbc = shared("nissan-leaf/EV-can_AZE0.dbc")
    p = tmp / "gateway.yaml"
    p.write_text(f"gateway_id: t\nstate_dir: {tmp}/state\nlog_level: warning\n"
                 f"can: {{interface: virtual, channel: {channel}}}\n"
                 f"packs:\n  - {{id: leaf, profile: nissan-leaf, dbc: {dbc}, "
                 f"transmit: {str(transmit).lower()}}}\n")
    return p


def test_leaf_cells_over_isotp(tmp_path: Path, channel: str) -> None:
    cells = [3700 + (i * 7) % 90 for i in range(96)]
    lbc = LeafLbc(cells)
    responder = Responder(channel, lbc.answer)
    rec = Recorder(channel)
    try:
        cfg = leaf_config(tmp_path, channel, True)
        d = run_daemon(cfg, lambda d: d.pipeline.packs[0].live.state.cell_v[95:96] != [None]
                       and bool(d.pipeline.packs[0].live.state.cell_v))
    finally:
        responder.close()
        rec.close()
    st = d.pipeline.packs[0].live.state
    assert st.cell_v == pytest.approx([c / 1000 for c in cells])
    # our request and flow control, padded to 8 bytes
    ours = [bytes(m.data) for m in rec.frames if m.arbitration_id == 0x79B]
    assert ours[0] == bytes.fromhex("022102ffffffffff")
    assert lbc.flow_controls[0] == bytes.fromhex("300000ffffffffff")
    assert d.poller.stats()["leaf:isotp[0]"]["responses"] >= 1


def test_leaf_transmit_off_sends_nothing(tmp_path: Path, channel: str) -> None:
    lbc = LeafLbc([3700] * 96)
    responder = Responder(channel, lbc.answer)
    rec = Recorder(channel)
    try:
        cfg = leaf_config(tmp_path, channel, False)
        t0 = time.monotonic()
        d = run_daemon(cfg, lambda d: time.monotonic() - t0 > 2.5)
    finally:
        responder.close()
        rec.close()
    assert rec.frames == [] and responder.requests == []
    assert d.pipeline.packs[0].live.state.cell_v == [None] * 96


def test_polled_cells_mark_the_state_changed_as_compiled_handlers_do(tmp_path: Path) -> None:
    """An ISO-TP answer's cells go in through Pipeline.write_cells, by the rules of the
    compiled cell handlers: the state is marked changed too, so the derived cell fields
    are published at the next tick, not max_interval_s later (the poller's own copy of
    the writer marked only the cells changed)."""
    from gateway.runtime.pipeline import Pipeline
    from gateway.source.poll import Poller

    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(f"gateway_id: t\nstate_dir: {tmp_path}/state\n"
                   "can: {interface: virtual, channel: x}\n"
                   "packs:\n  - {id: leaf, profile: nissan-leaf}\n")
    p = Pipeline(load_config(cfg, mqtt_url="-"))
    poller = Poller(p, lambda bus, can_id, data, ext: False)
    assert not poller.active  # no `transmit: true`: it only listens
    st = p.packs[0].live.state
    t_state = p.packs[0].publisher.t_state

    def answer(ts: float, cells_mv: list[int]) -> list[dict[str, Any]]:
        ff, cfs = isotp_frames(leaf_payload(cells_mv))
        p.feed([(ts, 0x7BB, frame, "x") for frame in (ff, *cfs)])
        assert st.changed and st.cells_changed
        p.tick(ts + 0.2)
        return [json.loads(pub.payload) for pub in p.take_split()[0] if pub.topic == t_state]

    cells = [3700 + i for i in range(96)]
    first = answer(1.0, cells)
    assert first[-1]["cell_v_max"] == pytest.approx(3.795)
    cells[7] = 3900
    cells[5] = 0xFFFF  # 65.5 V: not a cell voltage
    later = answer(3.0, cells)
    assert later and later[-1]["cell_v_max"] == pytest.approx(3.9)
    assert st.cell_v[5] is None and st.cell_v[7] == pytest.approx(3.9)
    assert p.packs[0].live.implausible_counts() == {"cell_voltage": 1}


REQ = IsoTpRequest("isotp[0]", 0x79B, 0x7BB, bytes.fromhex("022102"), 2.0, 1.0, False, 0xFF, 0,
                   0, CellBlock("voltages", 2, 96, 2, 0.001))


def make_client(clock: list[float]) -> tuple[IsoTpClient, list[bytes], list[bytes]]:
    sent: list[bytes] = []
    got: list[bytes] = []

    def send(can_id: int, data: bytes, ext: bool) -> bool:
        sent.append(data)
        return True
    c = IsoTpClient(REQ, send, lambda ts, p: got.append(p), lambda: clock[0])
    return c, sent, got


def test_isotp_sequence_error_drops_the_message() -> None:
    clock = [100.0]
    c, sent, got = make_client(clock)
    c.poll(clock[0])
    payload = leaf_payload(list(range(3000, 3096)))
    ff, cfs = isotp_frames(payload)
    c.on_frame(1.0, ff)
    assert sent[-1][:3] == b"\x30\x00\x00"
    c.on_frame(1.0, cfs[0])
    c.on_frame(1.0, cfs[2])  # cfs[1] lost
    for cf in cfs[3:]:
        c.on_frame(1.0, cf)
    assert got == [] and c.stats.sequence_errors == 1
    # the next exchange works
    clock[0] += 5
    c.poll(clock[0])
    c.on_frame(2.0, ff)
    for cf in cfs:
        c.on_frame(2.0, cf)
    assert got == [payload]
    assert decode_cells(REQ.cells, got[0]) == pytest.approx(  # type: ignore[arg-type]
        [v / 1000 for v in range(3000, 3096)])


def test_isotp_timeout_and_sequence_wrap() -> None:
    clock = [0.0]
    c, _sent, got = make_client(clock)
    c.poll(0.0)
    ff, cfs = isotp_frames(leaf_payload([3500] * 96))
    assert len(cfs) > 16  # the sequence number wraps 15 -> 0
    c.on_frame(0.0, ff)
    c.on_frame(0.0, cfs[0])
    clock[0] = 1.5  # more than timeout_s without a frame
    c.poll(clock[0])
    assert c.stats.timeouts == 1
    for cf in cfs[1:]:
        c.on_frame(0.0, cf)  # late frames of the dead exchange are ignored
    assert got == []
    clock[0] = 2.5
    c.poll(clock[0])
    c.on_frame(0.0, ff)
    for cf in cfs:
        c.on_frame(0.0, cf)
    assert len(got) == 1 and len(got[0]) == 198


def test_isotp_listen_only_never_sends() -> None:
    got: list[bytes] = []
    c = IsoTpClient(REQ, None, lambda ts, p: got.append(p))
    c.poll(time.monotonic())
    ff, cfs = isotp_frames(leaf_payload([3600] * 96))
    c.on_frame(0.0, ff)  # someone else asked; their tester sends the flow control
    for cf in cfs:
        c.on_frame(0.0, cf)
    assert len(got) == 1 and c.stats.passive == 1 and c.stats.requests == 0


def test_isotp_problems_name_file_key_and_fix(tmp_path: Path) -> None:
    """ISO-TP blocks are read with the rest of the profile: a bad one is a config problem
    from load_config, with its file, key and fix, before any pipeline exists."""
    prof = (REPO / "config" / "profiles" / "nissan-leaf.yaml").read_text()
    prof = prof.replace("request_id: 0x79B", "request_id: 0x79B\n    reqest: x") \
        .replace('request: "022102"', 'request: "0221"') \
        .replace("\ndbc:", "\npoll_id_offset_shift: 30\ndbc:")
    (tmp_path / "leaf.yaml").write_text(prof)
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("can: {interface: virtual, channel: c}\n"
                   "packs: [{id: leaf, profile: ./leaf.yaml}]\n"
                   f"state_dir: {tmp_path / 'state'}\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    by_key = {p.key: p for p in e.value.problems}
    assert set(by_key) >= {"isotp[0].reqest", "isotp[0].request", "poll_id_offset_shift"}
    assert all(p.file == str(tmp_path / "leaf.yaml") and p.fix for p in by_key.values())
    assert "'request'" in by_key["isotp[0].reqest"].fix
    assert "single frame" in by_key["isotp[0].request"].what
    assert "0..28" in by_key["poll_id_offset_shift"].what
