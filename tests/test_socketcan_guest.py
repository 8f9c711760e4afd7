"""The live path on a real kernel's SocketCAN, with can-utils as the independent peer.

These run where a vcan interface is up: in CI inside the throw-away qemu guest that
`.ci/guest.sh` boots (`.ci/guest.sh -- python3 -m pytest -m socketcan`), which sets
TEST_SOCKETCAN_CHANNEL=vcan0. Elsewhere they skip. The gateway runs in this process
(its real Daemon); canplayer, cansend, cangen, candump and `ip link` run as processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import signal
import socket
import struct
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import CanBus, load_config
from gateway.runtime.daemon import Daemon
from gateway.runtime.replay import replay
from gateway.source.logs import BATCH, SourceStats
from gateway.source.socketcan import RawSocket, bcm_mask
from tests.conftest import REPO, shared, started
from tests.test_socketcan import CHANNEL

pytestmark = [
    pytest.mark.socketcan,
    pytest.mark.skipif(not CHANNEL, reason="set TEST_SOCKETCAN_CHANNEL=vcan0 on a machine with a "
                       "vcan interface (CI: .ci/guest.sh boots one)"),
    pytest.mark.skipif(shutil.which("canplayer") is None, reason="can-utils is not installed"),
]

PATHS = ["raw", "bcm", "python-can"]


def write_cfg(tmp_path: Path, body: str, name: str = "gw.yaml") -> Path:
    p = tmp_path / name
    p.write_text(f"state_dir: {tmp_path / ('state-' + name)}\n" + textwrap.dedent(body))
    return p


@contextlib.asynccontextmanager
async def daemon(cfg_path: Path) -> AsyncIterator[tuple[Daemon, io.StringIO]]:
    buf = io.StringIO()
    d = Daemon(load_config(cfg_path), stdout=buf)
    task = asyncio.create_task(d.serve())
    try:
        await started(d, 30)
        yield d, buf
    finally:
        d._on_term()
        assert await asyncio.wait_for(task, 30) == 0


async def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, timeout=30)


def events(buf: io.StringIO, code: str) -> list[str]:
    return [json.loads(ln.split(" ", 1)[1])["state"] for ln in buf.getvalue().splitlines()
            if ln.startswith("bms/p/events ") and f'"code":"{code}"' in ln]


def states(text: str, topic: str = "bms/p/state") -> list[dict[str, Any]]:
    return [json.loads(ln.split(" ", 1)[1]) for ln in text.splitlines()
            if ln.startswith(topic + " ")]


def scaled_log(src: Path, dst: Path, factor: float) -> Path:
    """The sample log `factor` times faster, channel vcan0 (canplayer keeps its gaps)."""
    out = []
    for ln in src.read_text().splitlines():
        ts, _chan, frame = ln.split()
        out.append(f"({float(ts[1:-1]) / factor:.6f}) {CHANNEL} {frame}")
    dst.write_text("\n".join(out) + "\n")
    return dst


def candump_log(src: Path, dst: Path, factor: float) -> Path:
    """Any capture python-can reads, as a candump log on vcan0 `factor` times faster
    (canplayer keeps its gaps); error and remote frames left out."""
    import can

    out = []
    for m in can.LogReader(str(src)):
        if m.is_error_frame or m.is_remote_frame:
            continue
        ident = f"{m.arbitration_id:08X}" if m.is_extended_id else f"{m.arbitration_id:03X}"
        out.append(f"({m.timestamp / factor:.6f}) {CHANNEL} {ident}#{bytes(m.data).hex().upper()}")
    dst.write_text("\n".join(out) + "\n")
    return dst


async def play_and_compare(tmp_path: Path, log: Path, profile: str, path: str,
                           broker: Any, subscriber_factory: Any) -> list[tuple[str, str]]:
    """`log` played into vcan0 by canplayer reaches a real mosquitto with the same final
    state and the same fault events as `replay` of the same file gives (returned)."""
    sent: list[tuple[int, bytes]] = []
    for ln in log.read_text().splitlines():
        _ts, _chan, frame = ln.split()
        ident, payload = frame.split("#")
        sent.append((int(ident, 16) | (socket.CAN_EFF_FLAG if len(ident) == 8 else 0),
                     bytes.fromhex(payload)))
    cfg = write_cfg(tmp_path, f"""\
        gateway_id: g
        can: {{interface: socketcan, channel: {CHANNEL}, receive: {path}}}
        packs: [{{id: p, profile: {profile}, stale_after_s: 1}}]
        mqtt: {{url: {broker.url}}}
        publish: {{state: {{min_interval_s: 0.2}}}}
        homeassistant: {{discovery: false}}
        """)
    sub = subscriber_factory(broker.port, ["bms/p/#", "bms/gateway/g/status"])
    async with daemon(cfg) as (d, _):
        assert d.runtime.sources[0].receive_path == path
        # the ids no profile reads never reach us (the kernel's filter)
        read = d.pipeline.routes(0)
        frames = sum(1 for key, _ in sent if key in read)
        proc = await asyncio.create_subprocess_exec("canplayer", "-I", str(log))
        assert await asyncio.wait_for(proc.wait(), 120) == 0
        if path != "bcm":
            await until(lambda: d.pipeline.counters[0].received >= frames, 20, "all frames")
        else:  # the kernel delivered the last frame of each id it watches (or it
            # changed nothing read)
            sock = d.runtime.sources[0].bus

            def word(data: bytes) -> int:
                return int.from_bytes(data.ljust(8, b"\0"), "big")

            # the last frame of each id, and of each multiplexer value of a muxed id
            want = {(key, word(data) & sock.mux.get(key, 0)): data
                    for key, data in sent if key in sock.masks}

            def delivered() -> bool:
                for (key, mux), data in want.items():
                    mask = bcm_mask(sock.masks[key], data)
                    if mask is None:  # a multiplexer value nothing reads: dropped
                        continue
                    got = sock.last.get((key, mux))
                    if got is None or (word(got) ^ word(data)) & mask:
                        return False
                return True

            await until(delivered, 20, "the last frames through the broadcast manager")
        # less than stale_after_s: the replay oracle has no silence after the last frame
        await asyncio.sleep(0.5)
        assert d.runtime.status_body()["buses"][CHANNEL]["receive"] == path
    if path == "bcm":  # only changes of the bits read (plus refeeds of the last frames)
        assert d.runtime.sources[0].stats.frames < frames
    else:
        assert d.pipeline.counters[0].received == frames

    oracle = io.StringIO()
    rcfg = write_cfg(tmp_path, f"""\
        gateway_id: g
        can: {{interface: virtual, channel: {CHANNEL}}}
        packs: [{{id: p, profile: {profile}, stale_after_s: 1}}]
        publish: {{state: {{min_interval_s: 0.2}}}}
        """, "replay.yaml")
    await replay(load_config(rcfg), log, speed=None, stdout=oracle)
    want = states(oracle.getvalue())[-1]
    got = [json.loads(p) for p in sub.topic("bms/p/state")]
    assert got, "nothing reached the broker"
    for k in ("ts", "pack_id"):
        want.pop(k)
        got[-1].pop(k)
    assert got[-1] == want

    def codes(payloads: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(e["code"], e["state"]) for e in payloads if e["code"] != "comm_lost"]

    want_ev = codes(states(oracle.getvalue(), "bms/p/events"))
    got_ev = codes([json.loads(p) for p in sub.topic("bms/p/events")])
    # Each fault must go through the same raise/clear sequence; their interleaving may
    # differ. Live, the rules run on the ticker's clock over batches of frames, not at
    # each frame's time as in the replay, so two faults raised within one batch may come
    # in either order (seen on raw and python-can in the guest under load:
    # implausible_values raised before cell_over_voltage instead of after). With bcm the
    # kernel delivers changes (and the gateway refeeds the last frames), not every
    # frame, so counted rules (implausible_values counts dropped values per frame) may
    # also fire a frame or two earlier or later than in the replay.
    def per_code(evs: list[tuple[str, str]]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for code, state in evs:
            out.setdefault(code, []).append(state)
        return out

    assert per_code(got_ev) == per_code(want_ev)
    return want_ev


@pytest.mark.parametrize("path", PATHS)
async def test_canplayer_frames_are_published_as_replay_publishes_them(
        tmp_path: Path, path: str, broker: Any, subscriber_factory: Any) -> None:
    """The bundled sample played into vcan0 by canplayer: same final state and fault
    events as `replay` (the sample raises faults, so the comparison is not empty)."""
    log = scaled_log(REPO / "config" / "sample.log", tmp_path / "sample.log", 5)
    events = await play_and_compare(tmp_path, log, "example-bms", path, broker,
                                    subscriber_factory)
    assert events, "the sample raises faults: the comparison must not be empty"


# shared real captures (../shared/realdata) and the profile that reads each
CAPTURES = [("orion-we-ev/candump-2025-11-22_161709.log", "orion-bms2", 2.0),
            ("foxbms2/can-log.trc", "foxbms2", 1.0)]


@pytest.mark.parametrize("path", ["raw", "bcm"])
@pytest.mark.parametrize(("capture", "profile", "speed"), CAPTURES,
                         ids=[Path(c[0]).parent.name for c in CAPTURES])
async def test_real_captures_publish_the_same_through_raw_and_bcm(
        tmp_path: Path, capture: str, profile: str, speed: float, path: str, broker: Any,
        subscriber_factory: Any) -> None:
    """Third parties' captures played into vcan0 (`speed` times faster): the kernel's
    filtering (bcm) publishes the same final state and fault events as every frame
    (raw), both as `replay` of the capture publishes them."""
    log = candump_log(shared(capture), tmp_path / "capture.log", speed)
    await play_and_compare(tmp_path, log, profile, path, broker, subscriber_factory)


@pytest.mark.parametrize("path", PATHS)
async def test_interface_down_up_and_delete_recreate_reopen_the_bus(
        tmp_path: Path, path: str) -> None:
    """`ip link set down/up` and an unplugged adapter (`ip link delete`, re-created):
    can_bus_lost is raised and cleared, and frames are decoded again afterwards (a socket
    bound to a deleted interface never works again: the gateway must open a new one)."""
    cfg = write_cfg(tmp_path, f"""\
        can: {{interface: socketcan, channel: {CHANNEL}, receive: {path}}}
        packs: [{{id: p, profile: example-bms}}]
        """)

    sent = 0

    async def frames_arrive(d: Daemon) -> None:
        nonlocal sent
        sent += 1  # a new voltage each time: bcm delivers changes only
        before = d.pipeline.counters[0].decoded
        sh("cansend", CHANNEL, f"400#{sent:02X}14900178620200")
        await until(lambda: d.pipeline.counters[0].decoded > before, 10, "a decoded frame")

    try:
        async with daemon(cfg) as (d, buf):
            src = d.runtime.sources[0]
            await frames_arrive(d)
            sh("ip", "link", "set", CHANNEL, "down")
            await until(lambda: src.lost, 10, "can_bus_lost after link down")
            sh("ip", "link", "set", CHANNEL, "up")
            await until(lambda: not src.lost, 30, "the bus back after link up")
            await frames_arrive(d)
            assert events(buf, "can_bus_lost") == ["raised", "cleared"]

            first = src.bus
            sh("ip", "link", "delete", CHANNEL)
            await until(lambda: src.lost, 10, "can_bus_lost after the interface is deleted")
            await asyncio.sleep(1.0)  # reopening fails while it is missing: still lost
            assert src.lost
            sh("ip", "link", "add", "dev", CHANNEL, "type", "vcan")
            sh("ip", "link", "set", "up", CHANNEL)
            await until(lambda: not src.lost, 30, "the bus back after re-creating it")
            assert src.bus is not first
            await frames_arrive(d)
            assert events(buf, "can_bus_lost") == ["raised", "cleared"] * 2
            assert d.runtime.status_body()["buses"][CHANNEL]["state"] == "up"
    finally:  # leave vcan0 up for the next test whatever happened
        subprocess.run(["ip", "link", "add", "dev", CHANNEL, "type", "vcan"],
                       stderr=subprocess.DEVNULL, check=False)
        subprocess.run(["ip", "link", "set", "up", CHANNEL], check=False)


async def candump_while(seconds: float) -> list[str]:
    proc = await asyncio.create_subprocess_exec("candump", "-L", CHANNEL,
                                                stdout=asyncio.subprocess.PIPE)
    await asyncio.sleep(seconds)
    proc.send_signal(signal.SIGINT)  # candump flushes its output and exits
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    return out.decode().splitlines()


@pytest.mark.parametrize("transmit", [False, True])
async def test_nothing_is_sent_unless_the_pack_says_transmit(
        tmp_path: Path, transmit: bool) -> None:
    """candump on the same bus: a polled BMS (Daly) gets request frames only with
    `transmit: true`."""
    cfg = write_cfg(tmp_path, f"""\
        can: {{interface: socketcan, channel: {CHANNEL}}}
        packs: [{{id: p, profile: daly, transmit: {str(transmit).lower()}}}]
        """)
    async with daemon(cfg) as (d, _):
        lines = await candump_while(3.0)
        tx = d.runtime.sources[0].tx_count
    ids = {ln.split()[2].split("#")[0] for ln in lines}
    if transmit:
        assert tx > 0 and "18900140" in ids, lines  # Request_0x90 to board 1
    else:
        assert tx == 0 and lines == []


async def test_error_frames_and_an_overrun_are_counted_not_fatal(tmp_path: Path) -> None:
    """Bus error frames (sent with CAN_ERR_FLAG through the kernel) and frames the kernel
    drops while the gateway is stalled (a small socket buffer) are counted in the status;
    decoding goes on."""
    cfg = write_cfg(tmp_path, f"""\
        can: {{interface: socketcan, channel: {CHANNEL}, options: {{rcvbuf: 4096}}}}
        packs: [{{id: p, profile: example-bms}}]
        """)
    err = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    err.bind((CHANNEL,))
    try:
        async with daemon(cfg) as (d, _):
            src = d.runtime.sources[0]
            for _ in range(3):  # CAN_ERR_BUSERROR
                err.send(struct.pack("=IB3x8s", socket.CAN_ERR_FLAG | 0x80, 8, bytes(8)))
            await until(lambda: src.stats.error_frames == 3, 10, "3 error frames counted")
            # stall the event loop while cangen fills the socket buffer
            gen = subprocess.Popen(["cangen", CHANNEL, "-I", "400", "-L", "8", "-g", "0",
                                    "-n", "2000"])
            time.sleep(2.0)
            assert gen.wait(30) == 0
            await until(lambda: d.pipeline.counters[0].received > 0, 10, "the frames kept")
            received = d.pipeline.counters[0].received
            assert received < 2000
            assert not src.lost
            # the kernel reports drops with the next frame it queues (SO_RXQ_OVFL)
            sh("cansend", CHANNEL, "400#D014900178620200")
            await until(lambda: d.pipeline.counters[0].received > received, 10, "frames after")
            await until(lambda: src.stats.overruns > 0, 10, "an overrun counted")
            bus = d.runtime.status_body()["buses"][CHANNEL]
            assert bus["errors"] == 3 and bus["overruns"] == src.stats.overruns
    finally:
        err.close()


class CountingEagain:
    """The raw socket, counting the reads the kernel answered with EAGAIN."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.eagain = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def recv_into(self, buf: bytearray) -> int:
        try:
            return self.sock.recv_into(buf)
        except BlockingIOError:
            self.eagain += 1
            raise


def test_a_drain_reads_what_is_queued_without_reading_into_eagain() -> None:
    """RawSocket.drain takes every queued frame, in order, up to BATCH a drain, and asks
    the kernel how much is queued (SO_MEMINFO) instead of reading until EAGAIN, whose
    exception costs more than a frame's whole pipeline (bench/RESULTS.md). Before the
    count by truesize, each drain of more than one frame ended in one EAGAIN."""
    cfg = CanBus(name=CHANNEL, interface="socketcan", channel=CHANNEL, receive="raw",
                 options={"rcvbuf": 4_000_000})
    rs = RawSocket(cfg, None)
    tx = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    tx.bind((CHANNEL,))
    try:
        counting = CountingEagain(rs.sock)
        rs.sock = counting  # type: ignore[assignment]
        sent = []
        for k in range(BATCH + 88):
            data = struct.pack(">HI", k, k * 7919 & 0xFFFFFFFF)[: 1 + k % 6]
            sent.append((0x100 + k % 0x600, data))
            tx.send(struct.pack("=IB3x8s", 0x100 + k % 0x600, len(data), data))
        time.sleep(0.5)
        got: list[Any] = []
        stats = SourceStats()
        assert rs.drain(got, CHANNEL, stats) == BATCH  # at most BATCH a drain
        assert rs.drain(got, CHANNEL, stats) == 88
        assert [(f[1], f[2]) for f in got] == sent
        assert counting.eagain == 0 and rs.truesize > 0
        assert rs.drain(got, CHANNEL, stats) == 0  # nothing queued: nothing read
    finally:
        tx.close()
        rs.shutdown()


async def test_leaf_cells_polled_over_the_kernels_isotp_stack(tmp_path: Path) -> None:
    """Nissan Leaf: the gateway polls 0x79B with `02 21 02` (UDS 0x21 group 2); the
    kernel's can-isotp answers as the battery controller (can-utils isotprecv reads the
    request, isotpsend sends the 198-byte reply on 0x7BB: a First Frame, our Flow Control,
    then the kernel's Consecutive Frames). The 96 cells are decoded and published."""
    cells_mv = [3700 + (i * 7) % 90 for i in range(96)]
    payload = bytes([0x61, 0x02]) + b"".join(v.to_bytes(2, "big") for v in cells_mv) + bytes(4)
    reply = " ".join(f"{b:02X}" for b in payload).encode()
    cfg = write_cfg(tmp_path, f"""\
        can: {{interface: socketcan, channel: {CHANNEL}}}
        packs: [{{id: p, profile: nissan-leaf, transmit: true}}]
        """)
    # the battery controller: receives on 0x79B, sends (and its flow control) on 0x7BB
    ecu = await asyncio.create_subprocess_exec(
        "stdbuf", "-oL", "isotprecv", "-l", "-s", "7BB", "-d", "79B", CHANNEL,
        stdout=asyncio.subprocess.PIPE)
    requests: list[str] = []

    async def answer() -> None:
        assert ecu.stdout is not None
        async for line in ecu.stdout:
            requests.append(line.decode().strip())
            tx = await asyncio.create_subprocess_exec(
                "isotpsend", "-s", "7BB", "-d", "79B", "-p", "FF", CHANNEL,
                stdin=asyncio.subprocess.PIPE)
            await tx.communicate(reply)

    lbc = asyncio.create_task(answer())
    try:
        async with daemon(cfg) as (d, buf):
            st = d.pipeline.packs[0].live.state
            await until(lambda: bool(st.cell_v) and None not in st.cell_v, 30,
                        "the 96 cells through ISO-TP")
            await until(lambda: bool(states(buf.getvalue(), "bms/p/cells")), 10,
                        "a cells snapshot")
            stats = d.poller.stats()["p:isotp[0]"]
    finally:
        lbc.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lbc
        ecu.terminate()
        await ecu.wait()
    assert requests and requests[0] == "21 02"  # the kernel stripped PCI and padding
    want = pytest.approx([v / 1000 for v in cells_mv])
    assert st.cell_v == want
    assert states(buf.getvalue(), "bms/p/cells")[-1]["voltages_v"] == want
    assert stats["responses"] >= 1
