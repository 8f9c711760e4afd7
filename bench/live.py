"""Live mode: instructions per received bus frame on a real SocketCAN (vcan0), by callgrind.

Time means nothing under emulation; instruction counts do. Run inside the qemu guest:

    .ci/guest.sh --timeout 3600 -- python3 -m bench.live            # all cases, table
    .ci/guest.sh -- python3 -m bench.live --cases raw-floor-burst,gw-raw-burst
    .ci/guest.sh -- python3 -m bench.live --check      # CI: the ratio, about 2 minutes

Each case is one child Python under `valgrind --tool=callgrind --instr-atstart=no`: the
child starts uninstrumented (start-up, imports, the DBC and profile compile run at
valgrind's bare speed, several times faster than instrumented), asks callgrind to start
instrumenting by a client request once it is set up (`_callgrind`), then calls
`os.getppid()` (callgrind zeroes its counters there: `--zero-before`) and, once it has
received every frame, `os.getpgrp()` (callgrind dumps there: `--dump-before`), so only
the receiving is counted. The sender is a separate, untraced process. Cases run several
at a time (`--jobs`), each on its own vcan interface, so they never see each other's
frames.

- burst: the sender queues 1,000 frames of config/sample.log while the receiver is
  blocked, then the receiver drains them (the gateway then drains as many per wake-up
  as it allows: 512);
- rate: 8,000 frames/s as the gateway sees them on a real machine: 16 frames back to
  back (8,000/s x the 2 ms coalescing interval), then a pause long enough for the
  traced receiver, so each wake-up finds about 16 frames (the table shows how many);
- single: one frame, then a pause: each wake-up finds one frame (idle time counted).
- steady: a steady stream at ~8,000 frames/s (the same values again and again):
  instructions per frame on the bus, most of which bcm's kernel never delivers; on
  CAN-BMS ids, or (workload `sample`) the sample's first sweep of every id and cell group
  repeated, a multiplexed pack whose cells hold still (`-flat`: with one mask per id, as
  before the per-value masks, for the comparison).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import io
import json
import mmap
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "config" / "sample.log"
CHANNEL = os.environ.get("TEST_SOCKETCAN_CHANNEL", "vcan0")
FRAME = struct.Struct("=IB3x8s")
BURST = 1000
RATE = 1024
RATE_GROUP = 16  # frames per 2 ms coalescing interval at 8,000 frames/s
RATE_PAUSE = 0.5  # s after each group
SINGLE = 100
SINGLE_PAUSE = 0.2  # s after each frame
STEADY = 2000
SWEEP = 25  # the sample's first 25 frames: every id and cell group once
# The paced modes run the bus slower than 8,000 frames/s (the traced receiver is ~1,000x
# slower than on a real machine), so the gateway's frame-time periods (the pipeline's
# 0.1 s tick, the publishing intervals) are stretched by as much: each frame then pays
# the share of ticks and publications it pays on a real bus at 8,000 frames/s.
DILATION = {"rate": 8000 * RATE_PAUSE / RATE_GROUP, "single": 8000 * SINGLE_PAUSE}

# A valgrind client request, as valgrind.h's VALGRIND_DO_CLIENT_REQUEST_EXPR emits it on
# x86-64 (the magic rotations of rdi, then xchg rbx,rbx; rax points at the request and
# its five arguments, the answer comes back in rdx). Natively the rotations add up to
# 128 bits and the function returns 0, so it is harmless outside valgrind.
_CLIENT_REQUEST = bytes.fromhex("4889f8" "31d2" "48c1c703" "48c1c70d" "48c1c73d" "48c1c733"
                                "4887db" "4889d0" "c3")
_CG_START_INSTRUMENTATION = 0x43540004  # VG_USERREQ_TOOL_BASE('C','T') + 4, callgrind.h
_CG_STOP_INSTRUMENTATION = 0x43540005


def _callgrind(request: int) -> int:
    page = mmap.mmap(-1, mmap.PAGESIZE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_CLIENT_REQUEST)
    fn = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)(
        ctypes.addressof(ctypes.c_char.from_buffer(page)))
    args = (ctypes.c_ulong * 6)(request, 0, 0, 0, 0, 0)
    return int(fn(ctypes.addressof(args)))




def _canbms_log() -> Path:
    """A CAN-BMS pack's traffic (the issue's workload: few ids, values moving), from the
    simulator (deterministic: seed 0, fixed start), made once per run."""
    path = Path(os.environ.get("BENCH_CANBMS_LOG") or Path(tempfile.gettempdir())
                / "bench-live-canbms.log")
    if not path.exists():
        cfg = path.with_suffix(".yaml")
        cfg.write_text(f"state_dir: {path.parent / 'bench-live-state'}\n"
                       "can: {interface: virtual, channel: vcan0}\n"
                       "packs: [{id: p, profile: can-bms}]\n")
        subprocess.run([sys.executable, "-m", "gateway", "simulate", "-c", str(cfg),
                        "--duration", "200", "--out", str(path)], check=True, cwd=REPO,
                       capture_output=True)
    return path


WORKLOADS = {"sample": ("example-bms", lambda: SAMPLE), "canbms": ("can-bms", _canbms_log)}


def sample_frames(n: int, workload: str = "sample") -> list[bytes]:
    out = []
    for ln in WORKLOADS[workload][1]().read_text().splitlines():
        _ts, _chan, frame = ln.split()
        ident, data = frame.split("#")
        raw = bytes.fromhex(data)
        out.append(FRAME.pack(int(ident, 16), len(raw), raw.ljust(8, b"\0")))
        if len(out) == n:
            break
    while len(out) < n:
        out.extend(out[: n - len(out)])
    return out


# ------------------------------------------------------------------ sender (untraced)


def warmup(mode: str) -> int:
    """Frames sent before the measured ones: callgrind instruments code when it first
    runs after instrumentation starts, and Python specialises its bytecode over the first
    runs; neither is the cost of a frame on a running gateway."""
    return {"burst": 64, "rate": 64, "single": 16}.get(mode, 0)


CLOSE_ID = 0x400  # the sample's PackStatus: not multiplexed, read by example-bms


def closing_frame(workload: str) -> tuple[int, bytes]:
    """The frame that ends a run whose receiver is not told every frame (receive: bcm
    on a workload): the sample's first PackStatus with every byte inverted, which moves
    bits the profile reads, so the kernel passes it on."""
    for raw in sample_frames(64, workload):
        can_id, length, data = FRAME.unpack(raw)
        if can_id == CLOSE_ID:
            return can_id, bytes(b ^ 0xFF for b in data[:length])
    msg = f"no {CLOSE_ID:#x} frame in the {workload} workload"
    raise ValueError(msg)


def send(mode: str, n: int, workload: str = "sample") -> None:
    """The warm-up frames, then (once the receiver closes our stdin) the measured ones.
    `workload` ending in `+close`: then the closing frame (`closing_frame`)."""
    workload, close = workload.removesuffix("+close"), workload.endswith("+close")
    s = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    s.bind((CHANNEL,))
    if mode == "steady" and workload == "sample+steady":
        # the last frame of every id and cell group in the sample's first sweep, then the
        # same frames again and again (0x408-0x40a: byte 0 is the cell group)
        last: dict[tuple[int, int], bytes] = {}
        for f in sample_frames(SWEEP):
            can_id, _n, data = FRAME.unpack(f)
            last[can_id, data[0] if can_id in (0x408, 0x409, 0x40A) else 0] = f
        frames = list(last.values())
        for f in frames:
            s.send(f)
        print("warm", flush=True)
        sys.stdin.read()
        for k in range(n):
            s.send(frames[k % len(frames)])
            if k % 16 == 15:
                time.sleep(0.002)  # ~8,000 frames/s
        time.sleep(0.5)
        can_id, data = closing_frame("sample")
        s.send(FRAME.pack(can_id, len(data), data.ljust(8, b"\0")))
        return
    if mode == "steady":
        sys.stdin.read()
        # can-bms ids, the same values every time; then one changed frame to end the run
        ids = [0x351, 0x355, 0x356, 0x35C]
        frames = [FRAME.pack(i, 8, bytes([1, 2, 3, 4, 5, 6, 7, 0])) for i in ids]
        for k in range(n):
            s.send(frames[k % len(frames)])
            if k % 16 == 15:
                time.sleep(0.002)  # ~8,000 frames/s
        time.sleep(0.5)
        s.send(FRAME.pack(0x355, 8, bytes([9, 0, 9, 0, 0, 0, 0, 0])))
        return
    w = warmup(mode)
    frames = sample_frames(w + n, workload)
    for k, f in enumerate(frames):
        if k == w:
            print("warm", flush=True)  # the receiver may be told when this is through
            sys.stdin.read()
        s.send(f)
        # pauses: the traced receiver is ~1,000x slower than on a real machine
        if mode == "single":
            time.sleep(SINGLE_PAUSE)
        elif mode == "rate" and k % RATE_GROUP == RATE_GROUP - 1:
            time.sleep(RATE_PAUSE)
    if close:
        time.sleep(RATE_PAUSE)
        can_id, data = closing_frame(workload)
        s.send(FRAME.pack(can_id, len(data), data.ljust(8, b"\0")))


# ------------------------------------------------------------------ receivers (traced)


# Under valgrind the interpreter does not find its venv (and an editable install of
# another checkout in the base interpreter would win): start children with -S and this
# run's site-packages (BENCH_SITE), so they import this checkout's gateway and bench.
_BOOT = ("import os, runpy, site, sys; sys.path.insert(0, os.getcwd()); "
         "[site.addsitedir(d) for d in os.environ['BENCH_SITE'].split(os.pathsep)]; "
         "runpy.run_module('bench.live', run_name='__main__', alter_sys=True)")


def _py(*args: str) -> list[str]:
    import site

    os.environ.setdefault("BENCH_SITE", os.pathsep.join(site.getsitepackages()))
    return [sys.executable, "-S", "-c", _BOOT, *args]


class Sender:
    """The peer process. Made once the receiver is set up: callgrind starts instrumenting
    then, the warm-up frames run instrumented, `go()` zeroes the counters and lets the
    measured frames come."""

    def __init__(self, mode: str, n: int, workload: str = "sample") -> None:
        self.mode = mode
        self.warmup = warmup(mode)
        self.says_warm = bool(self.warmup) or workload == "sample+steady"
        _callgrind(_CG_START_INSTRUMENTATION)
        self.proc = subprocess.Popen(_py("--send", mode, str(n), workload), cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.started = False

    def warmed(self) -> None:
        """Block until the sender has sent its warm-up frames."""
        assert self.proc.stdout is not None
        if self.says_warm:
            self.proc.stdout.readline()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        if self.mode == "burst":
            self.proc.wait()  # the receiver is blocked: the frames queue in its socket
        self.started = True
        os.getppid()  # callgrind zeroes its counters here

    def wait(self) -> None:
        self.proc.wait()


def end() -> None:
    os.getpgrp()  # callgrind dumps the counters here
    _callgrind(_CG_STOP_INSTRUMENTATION)  # the next case's set-up runs at full speed


def recv_python_can(mode: str, n: int) -> int:
    import can

    bus = can.Bus(interface="socketcan", channel=CHANNEL)
    # traced, the loop is slower than the paced sender: room for the whole run
    bus.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4_000_000)
    sender = Sender(mode, n)
    for _ in range(sender.warmup):
        while bus.recv(5) is None:
            pass
    sender.go()
    got = 0
    while got < n:
        if bus.recv(5) is not None:
            got += 1
    end()
    sender.wait()
    bus.shutdown()
    return got


def _raw_socket() -> socket.socket:
    s = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4_000_000)
    s.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS
    s.bind((CHANNEL,))
    return s


def recv_raw_floor(mode: str, n: int) -> int:
    s = _raw_socket()
    buf = bytearray(16)
    unpack = FRAME.unpack_from
    out = []
    sender = Sender(mode, n)
    for _ in range(sender.warmup):
        s.recv_into(buf)
    sender.go()
    for _ in range(n):
        s.recv_into(buf)
        can_id, _len, data = unpack(buf)
        out.append((0.0, can_id, data, "x"))
    end()
    sender.wait()
    return len(out)


def recv_raw_recvmsg(mode: str, n: int) -> int:
    s = _raw_socket()
    unpack = FRAME.unpack_from
    ts = struct.Struct("=qq").unpack_from
    out = []
    sender = Sender(mode, n)
    for _ in range(sender.warmup):
        s.recvmsg(16, 64)
    sender.go()
    for _ in range(n):
        data, anc, _f, _a = s.recvmsg(16, 64)
        can_id, _len, payload = unpack(data)
        sec, ns = ts(anc[0][2])
        out.append((sec + ns * 1e-9, can_id, payload, "x"))
    end()
    sender.wait()
    return len(out)


_REPORT: dict[str, Any] = {}


def _report(**fields: Any) -> None:
    _REPORT.update(fields)


def recv_gateway(mode: str, n: int, receive: str, workload: str = "sample",
                 flat: bool = False) -> int:
    from gateway.config import load_config
    from gateway.runtime import pipeline
    from gateway.runtime.daemon import Daemon
    from gateway.runtime.runtime import run_loop
    from gateway.source import socketcan

    tmp = Path(tempfile.mkdtemp())
    muxed_steady = mode == "steady" and workload == "sample+steady"
    if muxed_steady:
        workload = "sample"
    profile = "can-bms" if mode == "steady" and not muxed_steady else WORKLOADS[workload][0]
    cfg = tmp / "gw.yaml"
    k = DILATION.get(mode, 1.0)
    pipeline.TICK_S *= k
    # bcm's refeed of the last frames is a wall-clock period (at most 1 s): stretched
    # like the frame-time periods, or the paced bus would pay k times its share of it
    plain_refeed = socketcan.refeed_interval
    socketcan.refeed_interval = lambda window_s: plain_refeed(window_s / k) * k  # type: ignore[assignment]
    if flat:  # one mask per id, whatever the multiplexer says (before per-value masks)
        plain_frames = socketcan.bcm_frames
        socketcan.bcm_frames = lambda reads: plain_frames(  # type: ignore[assignment]
            None if reads is None else type(reads)(reads.flat()))
    cfg.write_text(f"state_dir: {tmp / 'state'}\n"
                   f"can: {{interface: socketcan, channel: {CHANNEL}, receive: {receive}, "
                   "options: {rcvbuf: 4000000}}\n"
                   f"packs: [{{id: p, profile: {profile}, stale_after_s: {5 * k}}}]\n"
                   f"publish: {{state: {{min_interval_s: {k}, max_interval_s: {60 * k}}}, "
                   f"cells: {{min_interval_s: {5 * k}, max_interval_s: {60 * k}}}}}\n")
    d = Daemon(load_config(cfg), stdout=io.StringIO())

    # The 0.2 s wall-clock ticker (staleness without frames, status) is left out: traced,
    # the gateway runs ~100x slower, so it would run ~100x more often per frame than on
    # a real bus. Frame-time ticks (publishing, rules) still run inside feed.
    async def no_ticker() -> None:
        await d.stop_event.wait()

    d._ticker = no_ticker  # type: ignore[method-assign]
    done = asyncio.Event()
    feed = d.pipeline.feed
    sender: Sender | None = None
    batches = 0
    counters = d.pipeline.counters[0]
    # receive: bcm on a workload: the kernel passes on only frames whose read bits
    # changed, so neither the warm-up nor the end can be counted in frames: the sender
    # says when its warm-up is through, and a closing frame ends the run
    closing = (mode != "steady" or muxed_steady) and receive == "bcm"
    close = closing_frame(workload) if closing else None
    at_go = [0]  # the source's frames when counting started

    def counting_feed(frames: list[Any], bus: int = 0) -> None:
        nonlocal batches
        feed(frames, bus)
        if sender is None:
            return
        if not sender.started:
            if not closing and counters.received >= sender.warmup:
                sender.go()
            return
        batches += 1
        if mode == "steady" and not muxed_steady:
            if frames[-1][2][0] == 9:  # the closing frame (bcm: or its refeed)
                done.set()
        elif close is not None:
            if any(f[1] == close[0] and f[2] == close[1] for f in frames):
                done.set()
        elif counters.received >= sender.warmup + n:
            done.set()

    d.pipeline.feed = counting_feed  # type: ignore[method-assign]

    async def run() -> int:
        nonlocal sender
        task = asyncio.create_task(d.serve())
        while not (d.runtime.sources and all(s.opened.is_set() for s in d.runtime.sources)):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        sender = Sender(mode, n, "sample+steady" if muxed_steady else
                        workload + ("+close" if closing else ""))
        if closing:
            sender.warmed()  # blocking: the warm-up frames wait in the socket meanwhile
            await asyncio.sleep(2.0)  # ... and are taken now, still not counted
            at_go[0] = d.runtime.sources[0].stats.frames
            sender.go()
        elif not sender.warmup:
            sender.go()
        await done.wait()
        end()
        sender.wait()
        d._on_term()
        await task
        # the source's own count: bcm feeds refeeds too, which are not bus frames
        _report(wakeups=batches, delivered=d.runtime.sources[0].stats.frames,
                loop=type(asyncio.get_running_loop()).__module__.split(".")[0])
        if closing:  # the warm-up's notifications came before the counters were zeroed
            _report(delivered=d.runtime.sources[0].stats.frames - at_go[0])
        return n

    return run_loop(run())  # uvloop when installed, as `bms-gateway run` does


CASES: dict[str, tuple[str, Any]] = {
    "python-can-burst": ("burst", recv_python_can),
    "python-can-rate": ("rate", recv_python_can),
    "python-can-single": ("single", recv_python_can),
    "raw-floor-burst": ("burst", recv_raw_floor),
    "raw-recvmsg-burst": ("burst", recv_raw_recvmsg),
    "gw-python-can-burst": ("burst", lambda m, n: recv_gateway(m, n, "python-can")),
    "gw-python-can-rate": ("rate", lambda m, n: recv_gateway(m, n, "python-can")),
    "gw-python-can-single": ("single", lambda m, n: recv_gateway(m, n, "python-can")),
    "gw-raw-burst": ("burst", lambda m, n: recv_gateway(m, n, "raw")),
    "gw-raw-rate": ("rate", lambda m, n: recv_gateway(m, n, "raw")),
    "gw-raw-single": ("single", lambda m, n: recv_gateway(m, n, "raw")),
    "gw-bcm-steady": ("steady", lambda m, n: recv_gateway(m, n, "bcm")),
    "gw-raw-steady": ("steady", lambda m, n: recv_gateway(m, n, "raw")),
    # the sample's multiplexed cell frames through the kernel's per-value content masks
    "gw-bcm-rate": ("rate", lambda m, n: recv_gateway(m, n, "bcm")),
    # a multiplexed pack holding still: per-value masks against one mask per id
    "gw-bcm-steady-muxed": ("steady", lambda m, n: recv_gateway(m, n, "bcm",
                                                                "sample+steady")),
    "gw-bcm-steady-muxed-flat": ("steady", lambda m, n: recv_gateway(m, n, "bcm",
                                                                     "sample+steady", True)),
    # the workload: CAN-BMS traffic (fewer values a frame than the sample's cells)
    "gw-python-can-canbms-rate": ("rate", lambda m, n: recv_gateway(m, n, "python-can",
                                                                    "canbms")),
    "gw-raw-canbms-burst": ("burst", lambda m, n: recv_gateway(m, n, "raw", "canbms")),
    "gw-raw-canbms-rate": ("rate", lambda m, n: recv_gateway(m, n, "raw", "canbms")),
    "gw-raw-canbms-single": ("single", lambda m, n: recv_gateway(m, n, "raw", "canbms")),
}
# The table of bench/RESULTS.md, every row from one run (the default): (case, what it
# measures, workload).
TABLE = [
    ("python-can-burst", "python-can `bus.recv()` loop (socketcan)", ""),
    ("python-can-single", "python-can `bus.recv()` loop (socketcan)", ""),
    ("raw-floor-burst", "raw AF_CAN `recv_into` + `struct.unpack_from` + the tuple (floor)",
     ""),
    ("raw-recvmsg-burst", "raw AF_CAN `recvmsg` with `SO_TIMESTAMPNS`, one per frame", ""),
    ("gw-python-can-burst", "bms-gateway, `receive: python-can`, all in", "sample"),
    ("gw-python-can-single", "bms-gateway, `receive: python-can`, all in", "sample"),
    ("gw-raw-canbms-burst", "bms-gateway, `receive: raw`, all in", "CAN-BMS"),
    ("gw-raw-canbms-rate", "bms-gateway, `receive: raw`, all in", "CAN-BMS"),
    ("gw-raw-canbms-single", "bms-gateway, `receive: raw`, all in", "CAN-BMS"),
    ("gw-raw-burst", "bms-gateway, `receive: raw`, all in", "sample"),
    ("gw-raw-rate", "bms-gateway, `receive: raw`, all in", "sample"),
    ("gw-raw-single", "bms-gateway, `receive: raw`, all in", "sample"),
    ("gw-bcm-steady", "bms-gateway, `receive: bcm`, per frame on the bus", "CAN-BMS, steady"),
    ("gw-bcm-rate", "bms-gateway, `receive: bcm`, per frame on the bus", "sample (muxed)"),
    ("gw-bcm-steady-muxed", "bms-gateway, `receive: bcm`, per frame on the bus",
     "sample sweep repeated (muxed, steady)"),
    ("gw-bcm-steady-muxed-flat", "bms-gateway, `receive: bcm` with one mask per id, per "
     "frame on the bus", "sample sweep repeated (muxed, steady)"),
]
# CI: the issue's target as it is written, "at most 15,000 a frame at 8,000 frames/s, at
# least 3x below python-can's receive alone": the gateway paced at 8,000 frames/s (~16 a
# wake-up, its per-wake-up costs shared by 16 frames, not by 400 as in a burst) on the
# issue's workload, against python-can's loop at its cheapest (a burst: its cost a frame
# is the same one frame a wake-up). Frames a case: python-can's cost a frame is flat
# from 400 to 1,000 frames (within 0.3 %); the gateway's 512 span about 1.3 frame-time
# ticks (the full run's 1,024 about 2.6), so one tick more or less moves it by ~1 %.
CHECK_CASES = {"python-can-burst": 400, "gw-raw-canbms-rate": 512}
# The guard: the ratio above (env CHECK_MIN_RATIO to move it). The interpreter counts:
# Debian's python3.11 (CI, Raspberry Pi OS) runs python-can's loop in ~37,700, a
# pyenv-built 3.11.7 without PGO in ~43,400, the gateway less apart (bench/RESULTS.md).
CHECK_MIN_RATIO = float(os.environ.get("CHECK_MIN_RATIO", "3.0"))
CHECK_MAX_PER_FRAME = 15_000
SIZES = {"burst": BURST, "rate": RATE, "single": SINGLE, "steady": STEADY}


def measure(cases: list[tuple[str, int]], outdir: Path,
            channel: str = CHANNEL) -> list[dict[str, Any]]:
    """The cases (name, frames) one after the other in one traced child (one interpreter
    start, which under emulation and valgrind takes longer than measuring): one callgrind
    dump each."""
    out = outdir / f"cg.{cases[0][0]}"
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
           f"--callgrind-out-file={out}",
           "--zero-before=getppid", "--dump-before=getpgrp", "--dump-instr=no",
           *_py("--child", ",".join(f"{c}:{n}" for c, n in cases))]
    t0 = time.monotonic()
    env = {**os.environ, "TEST_SOCKETCAN_CHANNEL": channel}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800,
                       check=False, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{cases}: {r.stderr[-2000:]}")
    reports = [json.loads(ln.split(": ", 1)[1]) for ln in r.stdout.splitlines()
               if ln.startswith("bench.live child: ")]
    results = []
    for k, ((case, n), extra) in enumerate(zip(cases, reports, strict=True), 1):
        part = Path(f"{out}.{k}")
        total = None
        if part.exists():
            total = next((int(ln.split()[1]) for ln in part.read_text().splitlines()
                          if ln.startswith("summary:")), None)
        if total is None:
            raise RuntimeError(f"{case}: no callgrind dump at getpgrp ({part})")
        mode = CASES[case][0]
        if "wakeups" in extra:
            extra["frames_per_wakeup"] = round(n / max(1, extra["wakeups"]), 1)
        if "delivered" in extra:
            extra["delivered_per_frame"] = round(extra["delivered"] / n, 3)
        results.append({"case": case, "mode": mode, "frames": n, "instructions": total,
                        "per_frame": round(total / n),
                        "seconds": round(time.monotonic() - t0, 1), "file": str(part),
                        **extra})
    return results


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table of RESULTS.md: one row per receive path and workload, one column
    per mode, and the ratio against python-can's loop in a burst."""
    per = {r["case"]: r for r in results}
    base = per.get("python-can-burst", {}).get("per_frame")
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for case, what, workload in TABLE:
        r = per.get(case)
        if r is None:
            continue
        cell = f"{r['per_frame']:,}"
        if case.startswith("gw-bcm"):
            cell += f" ({r['delivered_per_frame']} notifications a bus frame)"
        elif "frames_per_wakeup" in r:
            cell += f" ({r['frames_per_wakeup']} a wake-up)"
        if base:
            cell += f", {base / r['per_frame']:.2f}x"
        col = {"steady": "rate"}.get(r["mode"], r["mode"])
        rows.setdefault((what, workload), {})[col] = cell
    lines = ["| receive path, instructions per frame (x: python-can loop's burst / this) "
             "| workload | burst | rate, 8,000 frames/s | single |",
             "|---|---|---|---|---|"]
    for (what, workload), cols in rows.items():
        lines.append(f"| {what} | {workload} | {cols.get('burst', '')} | "
                     f"{cols.get('rate', '')} | {cols.get('single', '')} |")
    return "\n".join(lines)


def _own_channels(n: int) -> list[str] | None:
    """One new vcan interface per case, so cases measured at once never see each other's
    frames; None when they cannot be made (not root: then one case at a time on CHANNEL)."""
    names = [f"vcanbench{i}" for i in range(n)]
    for name in names:
        made = subprocess.run(["ip", "link", "add", "dev", name, "type", "vcan"],
                              capture_output=True, check=False).returncode == 0
        if not made or subprocess.run(["ip", "link", "set", "up", name],
                                      check=False).returncode != 0:
            for other in names[: names.index(name) + made]:
                subprocess.run(["ip", "link", "delete", other], check=False)
            return None
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.live", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(c for c, _w, _l in TABLE),
                    help="comma-separated (default: every row of RESULTS.md's table); "
                         f"known: {', '.join(CASES)}")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="cases measured at once, each on its own vcan interface "
                         "(default: one per CPU; 1 where no vcan can be created)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--check", action="store_true",
                    help="CI: measure only python-can-burst (400 frames) and "
                         "gw-raw-canbms-rate (512) in one traced child, and exit 1 unless "
                         "python-can's loop costs at least CHECK_MIN_RATIO (3) times the "
                         "gateway's raw path all in")
    ap.add_argument("--annotate", type=int, metavar="N", default=0,
                    help="also print each case's N costliest functions, inclusive "
                         "(callgrind_annotate), to find where the instructions go")
    ap.add_argument("--frames", type=int, help="frames a case (default: per mode, "
                    "burst 1,000, rate 1,024, single 100, steady 2,000)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--send", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.send:
        send(a.send[0], int(a.send[1]), a.send[2])
        return 0
    if a.child:
        for spec in a.child.split(","):
            case, n = spec.split(":")
            mode, fn = CASES[case]
            _REPORT.clear()
            fn(mode, int(n))
            print("bench.live child: " + json.dumps(_REPORT), flush=True)
        return 0
    if shutil.which("valgrind") is None:
        print("bench.live: valgrind is not installed", file=sys.stderr)
        return 2
    try:
        socket.if_nametoindex(CHANNEL)
    except OSError:
        print(f"bench.live: no {CHANNEL} here: run it in the guest (.ci/guest.sh -- "
              "python3 -m bench.live)", file=sys.stderr)
        return 2
    outdir = Path(tempfile.mkdtemp(prefix="bench-live-"))
    os.environ["BENCH_CANBMS_LOG"] = str(outdir / "canbms.log")
    from concurrent.futures import ThreadPoolExecutor

    cases = a.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"bench.live: unknown cases {unknown}; known: {', '.join(CASES)}",
              file=sys.stderr)
        return 2
    # --check: the two cases it compares, in one traced child (CI: under two minutes)
    groups = ([[(c, a.frames or n) for c, n in CHECK_CASES.items()]] if a.check
              else [[(c, a.frames or SIZES[CASES[c][0]])] for c in cases])
    if any("canbms" in c for g in groups for c, _n in g):
        _canbms_log()  # once, before the cases that share it
    channels = _own_channels(len(groups)) if a.jobs > 1 and len(groups) > 1 else None
    jobs = a.jobs if channels else 1

    def one(i: int, group: list[tuple[str, int]]) -> list[dict[str, Any]]:
        rs = measure(group, outdir, channels[i] if channels else CHANNEL)
        for r in rs:
            case = r["case"]
            extra = ""
            if "delivered_per_frame" in r and case.startswith("gw-bcm"):
                extra = f"  {r['delivered_per_frame']:>6} notifications/bus frame"
            elif "frames_per_wakeup" in r:
                extra = f"  {r['frames_per_wakeup']:>6} frames/wake-up"
            print(f"{case:26} {r['mode']:7} {r['frames']:6} frames  {r['per_frame']:>8,} "
                  f"instructions/frame{extra}  ({r['seconds']} s)", flush=True)
            if a.annotate:
                ann = subprocess.run(["callgrind_annotate", "--inclusive=yes",
                                      "--threshold=100", r["file"]],
                                     capture_output=True, text=True, check=False).stdout
                lines = [ln for ln in ann.splitlines() if ln.strip()]
                start = next((k for k, ln in enumerate(lines) if "file:function" in ln), 0)
                print(f"--- {case}: costliest functions, inclusive\n"
                      + "\n".join(lines[start:start + 1 + a.annotate]), flush=True)
        return rs

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        with ThreadPoolExecutor(jobs) as pool:
            results = [r for rs in pool.map(one, range(len(groups)), groups) for r in rs]
    finally:
        for ch in channels or ():
            subprocess.run(["ip", "link", "delete", ch], check=False)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    if a.check:
        per = {r["case"]: r["per_frame"] for r in results}
        pc, gw = (per[c] for c in CHECK_CASES)
        ratio = pc / gw
        print(f"python-can receive loop (burst) / gateway raw path all in at 8,000 frames/s "
              f"(CAN-BMS): {pc:,} / {gw:,} = {ratio:.2f}x (need >= {CHECK_MIN_RATIO}); "
              f"target <= {CHECK_MAX_PER_FRAME:,} a frame: "
              f"{'met' if gw <= CHECK_MAX_PER_FRAME else 'NOT met'}")
        return 0 if ratio >= CHECK_MIN_RATIO else 1
    if len(results) > 1:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, check=False).stdout.strip()
        print(f"\n{started}, commit {commit or '?'}, {sys.implementation.cache_tag} "
              f"({sys.executable}, {sys.version.split()[0]}), cases {a.jobs} at a time\n")
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
