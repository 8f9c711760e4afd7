"""Live mode: instructions per received bus frame on a real SocketCAN (vcan0), by callgrind.

Time means nothing under emulation; instruction counts do. Run inside the qemu guest:

    .ci/guest.sh --timeout 1800 -- python3 -m bench.live            # all cases, table
    .ci/guest.sh -- python3 -m bench.live --cases raw-floor,gw-raw   # some of them

Each case is one child Python under `valgrind --tool=callgrind`: it sets up, then calls
`os.getppid()` (callgrind zeroes its counters there: `--zero-before`) and, once it has
received every frame, `os.getpgrp()` (callgrind dumps there: `--dump-before`), so start-up
and shutdown are not counted. The sender is a separate, untraced process.

- burst: the sender queues 1,000 frames of config/sample.log while the receiver is
  blocked, then the receiver drains them (the batch the gateway drains per wake-up is
  then as large as it allows: 512);
- single: one frame every 20 ms, so each wake-up finds one frame (idle time counted).
- bcm-steady: a steady CAN-BMS stream (the same values again and again): instructions per
  frame on the bus, most of which the kernel never delivers.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import io
import json
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
SINGLE = 100
STEADY = 2000


def sample_frames(n: int) -> list[bytes]:
    out = []
    for ln in SAMPLE.read_text().splitlines():
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


def send(mode: str, n: int) -> None:
    s = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    s.bind((CHANNEL,))
    if mode == "steady":
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
    frames = sample_frames(n)
    for f in frames:
        s.send(f)
        if mode == "single":
            time.sleep(0.1)  # the traced receiver is ~100x slower than on a real machine


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


def _sender(mode: str, n: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(_py("--send", mode, str(n)), cwd=REPO)


def recv_python_can(mode: str, n: int) -> int:
    import can

    bus = can.Bus(interface="socketcan", channel=CHANNEL)
    proc = _sender(mode, n)
    if mode == "burst":
        proc.wait()
    got = 0
    os.getppid()
    while got < n:
        if bus.recv(5) is not None:
            got += 1
    os.getpgrp()
    proc.wait()
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
    proc = _sender(mode, n)
    if mode == "burst":
        proc.wait()
    os.getppid()
    for _ in range(n):
        s.recv_into(buf)
        can_id, _len, data = unpack(buf)
        out.append((0.0, can_id, data, "x"))
    os.getpgrp()
    proc.wait()
    return len(out)


def recv_raw_recvmsg(mode: str, n: int) -> int:
    s = _raw_socket()
    unpack = FRAME.unpack_from
    ts = struct.Struct("=qq").unpack_from
    out = []
    proc = _sender(mode, n)
    if mode == "burst":
        proc.wait()
    os.getppid()
    for _ in range(n):
        data, anc, _f, _a = s.recvmsg(16, 64)
        can_id, _len, payload = unpack(data)
        sec, ns = ts(anc[0][2])
        out.append((sec + ns * 1e-9, can_id, payload, "x"))
    os.getpgrp()
    proc.wait()
    return len(out)


def recv_gateway(mode: str, n: int, receive: str) -> int:
    from gateway.config import load_config
    from gateway.runtime.daemon import Daemon

    tmp = Path(tempfile.mkdtemp())
    profile = "can-bms" if mode == "steady" else "example-bms"
    cfg = tmp / "gw.yaml"
    cfg.write_text(f"state_dir: {tmp / 'state'}\n"
                   f"can: {{interface: socketcan, channel: {CHANNEL}, receive: {receive}, "
                   "options: {rcvbuf: 4000000}}\n"
                   f"packs: [{{id: p, profile: {profile}}}]\n")
    d = Daemon(load_config(cfg), stdout=io.StringIO())

    # The 0.2 s wall-clock ticker (staleness without frames, status) is left out: traced,
    # the gateway runs ~100x slower, so it would run ~100x more often per frame than on
    # a real bus. Frame-time ticks (publishing, rules) still run inside feed.
    async def no_ticker() -> None:
        await d.stop_event.wait()

    d._ticker = no_ticker  # type: ignore[method-assign]
    done = asyncio.Event()
    feed = d.pipeline.feed
    proc: subprocess.Popen[bytes] | None = None

    def counting_feed(frames: list[Any], bus: int = 0) -> None:
        feed(frames, bus)
        if mode == "steady":
            if proc is not None and proc.poll() is not None:  # the closing frame
                done.set()
        elif d.pipeline.counters[0].received >= n:
            done.set()

    d.pipeline.feed = counting_feed  # type: ignore[method-assign]

    async def run() -> int:
        nonlocal proc
        task = asyncio.create_task(d.serve())
        while not (d.runtime.sources and all(s.opened.is_set() for s in d.runtime.sources)):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        proc = _sender(mode, n)
        if mode == "burst":
            proc.wait()  # blocks the event loop: the frames queue in the socket
        os.getppid()
        await done.wait()
        os.getpgrp()
        proc.wait()
        d._on_term()
        await task
        return n

    return asyncio.run(run())


CASES: dict[str, tuple[str, Any]] = {
    "python-can-burst": ("burst", recv_python_can),
    "python-can-single": ("single", recv_python_can),
    "raw-floor-burst": ("burst", recv_raw_floor),
    "raw-recvmsg-burst": ("burst", recv_raw_recvmsg),
    "gw-python-can-burst": ("burst", lambda m, n: recv_gateway(m, n, "python-can")),
    "gw-python-can-single": ("single", lambda m, n: recv_gateway(m, n, "python-can")),
    "gw-raw-burst": ("burst", lambda m, n: recv_gateway(m, n, "raw")),
    "gw-raw-single": ("single", lambda m, n: recv_gateway(m, n, "raw")),
    "gw-bcm-burst": ("burst", lambda m, n: recv_gateway(m, n, "bcm")),
    "gw-bcm-steady": ("steady", lambda m, n: recv_gateway(m, n, "bcm")),
    "gw-raw-steady": ("steady", lambda m, n: recv_gateway(m, n, "raw")),
}
SIZES = {"burst": BURST, "single": SINGLE, "steady": STEADY}


def measure(case: str, outdir: Path) -> dict[str, Any]:
    mode, _fn = CASES[case]
    n = SIZES[mode]
    out = outdir / f"cg.{case}"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
           "--zero-before=getppid", "--dump-before=getpgrp", "--dump-instr=no",
           *_py("--child", case)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                       check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{case}: {r.stderr[-2000:]}")
    parts = sorted(glob.glob(f"{out}.1")) or sorted(glob.glob(f"{out}*"))
    total = None
    for p in parts:
        for ln in Path(p).read_text().splitlines():
            if ln.startswith("summary:"):
                total = int(ln.split()[1])
                break
        if total is not None:
            break
    if total is None:
        raise RuntimeError(f"{case}: no callgrind dump at getpgrp ({parts})")
    return {"case": case, "mode": mode, "frames": n, "instructions": total,
            "per_frame": round(total / n), "seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.live", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--jobs", type=int, default=1,
                    help="cases measured at once; they share vcan0, so a case also sees "
                         "the other's frames: exact figures need 1 (the default)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless the gateway's raw path costs at most a third of "
                         "python-can's receive loop alone (burst; CI runs this)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--send", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.send:
        send(a.send[0], int(a.send[1]))
        return 0
    if a.child:
        mode, fn = CASES[a.child]
        fn(mode, SIZES[mode])
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
    from concurrent.futures import ThreadPoolExecutor

    def one(case: str) -> dict[str, Any]:
        r = measure(case, outdir)
        print(f"{case:24} {r['mode']:7} {r['frames']:6} frames  {r['per_frame']:>8,} "
              f"instructions/frame  ({r['seconds']} s)", flush=True)
        return r

    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(one, a.cases.split(",")))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    if a.check:
        per = {r["case"]: r["per_frame"] for r in results}
        pc, gw = per.get("python-can-burst"), per.get("gw-raw-burst")
        if pc is None or gw is None:
            print("bench.live --check needs the cases python-can-burst and gw-raw-burst",
                  file=sys.stderr)
            return 2
        ratio = pc / gw
        print(f"python-can receive loop / gateway raw path, all in: {ratio:.2f}x (need >= 3)")
        if ratio < 3:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
