"""Issue 6 benchmark: per-stage and end-to-end frames/s, CPU per frame, RSS, and baselines.

    python -m bench                   # full: 1M-frame logs, 60 s live, 10M-frame memory run
    python -m bench --short --check   # CI guard: ratios vs bench/baseline.json, exit 1 on regression

Every measurement runs in its own child process (`--child NAME`), so peak RSS and CPU
belong to that measurement alone. CPU is `time.process_time()` around the work (the
mosquitto process is not counted, for us or for the baselines); rates are frames per
CPU second. All traffic is loopback, to a mosquitto this run starts on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import workloads as W

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "realdata"
DBC = REPO / "dbc" / "example-bms.dbc"
BASELINE = Path(__file__).with_name("baseline.json")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
EXT = 0x80000000  # gateway.decode.dbc.EXTENDED_FLAG


@contextlib.contextmanager
def _open_log(path: Path):  # type: ignore[no-untyped-def]
    import can
    reader = can.LogReader(str(path))
    try:
        yield reader
    finally:
        reader.stop()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def result(frames: int, cpu: float, wall: float, **extra: Any) -> dict[str, Any]:
    return {"frames": frames, "cpu_s": cpu, "wall_s": wall,
            "fps": frames / cpu if cpu else 0.0, "us_per_frame": cpu / frames * 1e6 if frames else 0.0,
            "peak_rss_mb": peak_rss_mb(), **extra}


# ------------------------------------------------------------------ children

def child_parse(a: dict[str, Any]) -> dict[str, Any]:
    from gateway.source.logs import SourceStats, read_log
    t, w = time.process_time(), time.perf_counter()
    n = 0
    for b in read_log(a["log"], SourceStats()):
        n += len(b)
    return result(n, time.process_time() - t, time.perf_counter() - w)


def _frames(log: str, limit: int) -> list[tuple[float, int, bytes, str]]:
    from gateway.source.logs import SourceStats, read_log
    out: list[tuple[float, int, bytes, str]] = []
    for b in read_log(log, SourceStats()):
        out.extend(b)
        if len(out) >= limit:
            break
    return out[:limit]


def child_decode(a: dict[str, Any]) -> dict[str, Any]:
    """(a) decode+normalize: compiled handlers vs cantools decode_message, same frames."""
    import cantools

    from gateway.config import load_config
    from gateway.model import FIELD_INDEX
    from gateway.runtime.pipeline import Pipeline

    frames = _frames(a["log"], a["limit"])
    pipe = Pipeline(load_config(a["config"]))
    get = pipe.routes(0).get
    t, w = time.process_time(), time.perf_counter()
    for ts, key, data, _ in frames:
        h = get(key)
        if h is not None:
            h(ts, data)
    ours = result(len(frames), time.process_time() - t, time.perf_counter() - w)

    db = cantools.database.load_file(a["dbc"], strict=False)
    decode = db.decode_message
    t, w = time.process_time(), time.perf_counter()
    unknown = 0
    for _, key, data, _ in frames:
        try:
            decode(key & ~EXT, data)
        except KeyError:
            unknown += 1
    theirs = result(len(frames), time.process_time() - t, time.perf_counter() - w,
                    unknown=unknown)

    checked = 0
    if a.get("check"):  # sample-check our normalized values against cantools
        st = pipe.packs[0].live.state
        iv = FIELD_INDEX["voltage_v"]
        ic = FIELD_INDEX["current_a"]
        for ts, key, data, _ in frames[:: max(1, len(frames) // 5000)]:
            if key == 0x408:
                get(key)(ts, data)  # type: ignore[misc]
                d = decode(key, data, decode_choices=False)
                g = d["CellGroup"]
                for j in range(4):
                    name = f"CellVoltage{g * 4 + j:03d}"
                    if name in d:
                        want = d[name] / 1000.0
                        got = st.cell_v[g * 4 + j]
                        assert got is not None and abs(got - want) < 1e-9, (name, got, want)
                        checked += 1
            elif key == 0x400:
                get(key)(ts, data)  # type: ignore[misc]
                d = decode(key, data, decode_choices=False)
                assert abs(st.values[iv] - d["PackVoltage"]) < 1e-9, (st.values[iv], d)  # type: ignore[operator]
                assert abs(st.values[ic] - d["PackCurrent"]) < 1e-9, (st.values[ic], d)  # type: ignore[operator]
                checked += 2
    return {"ours": ours, "cantools": theirs, "checked": checked}


def child_pipeline(a: dict[str, Any]) -> dict[str, Any]:
    """source + pipeline (decode, normalize, ticks: rules, policy, JSON), no MQTT."""
    from gateway.config import load_config
    from gateway.runtime.pipeline import Pipeline
    from gateway.source.logs import SourceStats, read_log
    pipe = Pipeline(load_config(a["config"]))
    t, w = time.process_time(), time.perf_counter()
    pubs = 0
    for b in read_log(a["log"], SourceStats()):
        pipe.feed_log(b)
        out, _ = pipe.take_split()
        pubs += len(out)
    pipe.finish()
    n = sum(c.received for c in pipe.counters)
    return result(n, time.process_time() - t, time.perf_counter() - w, publications=pubs)


def child_e2e(a: dict[str, Any]) -> dict[str, Any]:
    """(b) `replay()` of the candump log to the real mosquitto, default publishing policy."""
    from gateway.config import load_config
    from gateway.runtime.replay import replay
    from gateway.runtime.runtime import run_loop
    cfg = load_config(a["config"], mqtt_url=a["url"])
    t, w = time.process_time(), time.perf_counter()
    rt = run_loop(replay(cfg, a["log"], speed=None))
    n = sum(c.received for c in rt.pipeline.counters)
    return result(n, time.process_time() - t, time.perf_counter() - w,
                  published=rt.sink.status().published)


def child_baseline1(a: dict[str, Any]) -> dict[str, Any]:
    """can.LogReader + cantools db.decode_message per frame (the naive chain)."""
    import cantools
    db = cantools.database.load_file(a["dbc"], strict=False)
    decode = db.decode_message
    limit = a["limit"]
    n = unknown = 0
    t, w = time.process_time(), time.perf_counter()
    with _open_log(Path(a["log"])) as reader:
        for m in reader:
            try:
                decode(m.arbitration_id, m.data)
            except KeyError:
                unknown += 1
            n += 1
            if n >= limit:
                break
    return result(n, time.process_time() - t, time.perf_counter() - w, unknown=unknown)


def child_baseline2(a: dict[str, Any]) -> dict[str, Any]:
    """The naive DBC-to-MQTT bridge: decode each frame, one JSON message per frame (aiomqtt)."""
    import aiomqtt
    import cantools
    db = cantools.database.load_file(a["dbc"], strict=False)
    limit = a["limit"]

    async def run() -> int:
        n = 0
        async with aiomqtt.Client("127.0.0.1", a["port"], identifier="bench-naive") as c:
            with _open_log(Path(a["log"])) as reader:
                for m in reader:
                    n += 1
                    try:
                        # decode_choices=False: NamedSignalValue is not JSON serializable
                        d = db.decode_message(m.arbitration_id, m.data, decode_choices=False)
                    except KeyError:
                        continue
                    await c.publish(f"naive/{m.arbitration_id:x}", json.dumps(d), qos=0)
                    if n >= limit:
                        break
        return n

    t, w = time.process_time(), time.perf_counter()
    n = asyncio.run(run())
    return result(n, time.process_time() - t, time.perf_counter() - w)


def child_subscriber(a: dict[str, Any]) -> dict[str, Any]:
    """Receipt times of state messages (a separate process: its CPU is not the gateway's)."""
    import paho.mqtt.client as mqtt
    got: list[tuple[float, float | None]] = []
    ready = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}")

    def on_connect(cl: Any, u: Any, f: Any, rc: Any, p: Any = None) -> None:
        cl.subscribe(a["topic"], qos=0)

    def on_subscribe(*_: Any) -> None:
        ready.set()

    def on_message(cl: Any, u: Any, m: Any) -> None:
        now = time.time()
        if m.retain:
            return
        got.append((now, json.loads(m.payload).get("voltage_v")))

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect("127.0.0.1", a["port"])
    c.loop_start()
    c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
    ready.wait(10)
    print("READY", flush=True)
    sys.stdin.readline()  # the parent closes stdin (or writes a line) when done
    time.sleep(0.5)
    c.loop_stop()
    return {"got": got}


def child_live(a: dict[str, Any]) -> dict[str, Any]:
    """(c) the daemon on python-can's virtual bus, fed at `rate` frames/s by a thread."""
    import can

    from gateway.config import load_config
    from gateway.runtime.daemon import Daemon
    from gateway.runtime.runtime import run_loop

    rate, duration = a["rate"], a["duration"]
    chan = f"bench-live-{os.getpid()}"
    cfg_path = W.write_config(Path(a["dir"]) / "live.yaml", (W.PackSpec("live", 96),),
                              url=a["url"], channel=chan, state_min_s=0.0)
    cfg = load_config(cfg_path)
    base = W.base_frames(cfg, base_s=60.0)
    frames = [(aid, data, ext) for _, aid, data, ext in base]
    send_t = [0.0] * 65536
    sender: dict[str, Any] = {}

    def send() -> None:
        bus = can.Bus(interface="virtual", channel=chan)
        n = seq = 0
        t0 = time.perf_counter()
        total = int(rate * duration)
        nf = len(frames)
        try:
            while n < total and time.perf_counter() - t0 < duration + 10:
                due = min(total, int((time.perf_counter() - t0) * rate) + 1)
                while n < due:
                    aid, data, ext = frames[n % nf]
                    if aid == 0x400:  # PackStatus: PackVoltage (raw, 16 bits LE) carries a seq
                        seq = (seq + 1) & 0xFFFF
                        data = seq.to_bytes(2, "little") + data[2:]
                        send_t[seq] = time.time()
                    bus.send(can.Message(arbitration_id=aid, data=data, is_extended_id=ext))
                    n += 1
                time.sleep(0.0005)
        finally:
            sender["cpu"] = time.thread_time()
            sender["end"] = time.time()
            sender["sent"] = n
            sender["wall"] = time.perf_counter() - t0
            bus.shutdown()

    sub = subprocess.Popen([sys.executable, "-m", "bench", "--child", "subscriber",
                            json.dumps({"port": a["port"], "topic": "bms/live/state"})],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert sub.stdout is not None and sub.stdin is not None
    if sub.stdout.readline().strip() != "READY":
        raise RuntimeError("subscriber did not start")

    async def run() -> dict[str, Any]:
        d = Daemon(cfg)
        serve = asyncio.create_task(d.serve(), name="bench.gateway")
        deadline = time.monotonic() + 10
        while not (d.runtime.sources and all(s.opened.is_set() for s in d.runtime.sources)):
            if serve.done() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not open the virtual bus")
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        cpu0, w0 = time.process_time(), time.perf_counter()
        th = threading.Thread(target=send, name="bench.sender", daemon=True)
        th.start()
        while th.is_alive():
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 5
        while (d.pipeline.counters[0].received < sender["sent"]
               and time.monotonic() < deadline):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        cpu = time.process_time() - cpu0 - sender["cpu"]
        wall = time.perf_counter() - w0
        received = d.pipeline.counters[0].received
        d.stop_event.set()
        await asyncio.wait_for(serve, 20)
        return {"cpu": cpu, "wall": wall, "received": received}

    try:
        got = run_loop(run())
    finally:
        out, _ = sub.communicate("\n", timeout=30)
    msgs = json.loads(out.strip().splitlines()[-1].split(" ", 1)[1])["got"]
    lat = []
    for recv, volts in msgs:
        # After the sender stops, the ticker still publishes the (unchanged) state once;
        # the newest frame in it is old by then, which says nothing about latency.
        if volts is None or recv > sender["end"] + 0.05:
            continue
        seq = round(volts / 0.01) & 0xFFFF
        if send_t[seq]:
            lat.append((recv - send_t[seq]) * 1000)
    lat.sort()

    def pct(p: float) -> float | None:
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else None

    sent = sender["sent"]
    return {"sent": sent, "received": got["received"], "lost": sent - got["received"],
            "offered_fps": sent / sender["wall"], "wall_s": got["wall"],
            "gateway_cpu_s": got["cpu"], "sender_cpu_s": sender["cpu"],
            "cpu_pct": 100 * got["cpu"] / got["wall"],
            "us_per_frame": got["cpu"] / max(1, got["received"]) * 1e6,
            "latency_n": len(lat), "p50_ms": pct(50), "p99_ms": pct(99),
            "max_ms": lat[-1] if lat else None, "peak_rss_mb": peak_rss_mb()}


def child_memory(a: dict[str, Any]) -> dict[str, Any]:
    """(d) RSS after warm-up vs after `count` frames through pipeline + MQTT, one process."""
    from gateway.config import load_config
    from gateway.runtime.pipeline import Pipeline
    from gateway.runtime.runtime import Runtime, run_loop

    cfg = load_config(a["config"], mqtt_url=a["url"])
    base = W.base_frames(cfg, base_s=60.0)
    count, warm = a["count"], a["warm"]
    pipe = Pipeline(cfg)
    rt = Runtime(cfg, pipe, guest=True)  # as replay(): every snapshot goes out, in order
    samples: dict[str, float] = {}

    async def body() -> None:
        async with rt:
            rt.start(rt.sink.name, rt.sink_until_it_dies())
            batch: list[tuple[float, int, bytes, str]] = []
            n = 0
            for ts, aid, data, ext in W.tiled(base, count, W.SATURATED):
                batch.append((ts, aid | EXT if ext else aid, data, "can0"))
                if len(batch) == 512:
                    pipe.feed_log(batch)
                    rt.ship()
                    await rt.sink.room()
                    await asyncio.sleep(0)
                    n += len(batch)
                    batch = []
                    if "warm" not in samples and n >= warm:
                        samples["warm"] = rss_mb()
                        samples["warm_cpu"] = time.process_time()
            pipe.feed_log(batch)
            pipe.finish()
            rt.ship()
            samples["end"] = rss_mb()
            samples["end_cpu"] = time.process_time()
            await rt.deliver(30.0, list)  # no final publications: nothing to time

    t, w = time.process_time(), time.perf_counter()
    run_loop(body())
    n = sum(c.received for c in pipe.counters)
    return result(n, time.process_time() - t, time.perf_counter() - w,
                  rss_warm_mb=samples["warm"], rss_end_mb=samples["end"],
                  growth_mb=samples["end"] - samples["warm"], warm_frames=warm,
                  published=rt.sink.status().published)


CHILDREN = {"parse": child_parse, "decode": child_decode, "pipeline": child_pipeline,
            "e2e": child_e2e, "baseline1": child_baseline1, "baseline2": child_baseline2,
            "subscriber": child_subscriber, "live": child_live, "memory": child_memory}


def run_child(name: str, timeout: float = 600, **args: Any) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "bench", "--child", name, json.dumps(args,
                        default=str)], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                       check=False)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    raise RuntimeError(f"bench child {name} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")


def baseline3(dbc: Path, log: Path, limit: int, tmp: Path) -> dict[str, Any]:
    """`python -m cantools decode` as a user runs it: candump log piped in, CPU from wait4."""
    head = tmp / "b3-input.log"
    with log.open() as src, head.open("w") as dst:
        for i, line in enumerate(src):
            if i >= limit:
                break
            dst.write(line)
    w = time.perf_counter()
    with head.open() as stdin:
        p = subprocess.Popen([sys.executable, "-m", "cantools", "decode", "--single-line",
                              str(dbc)], stdin=stdin, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    cpu = ru.ru_utime + ru.ru_stime
    wall = time.perf_counter() - w
    return {"frames": limit, "cpu_s": cpu, "wall_s": wall, "fps": limit / cpu,
            "us_per_frame": cpu / limit * 1e6, "peak_rss_mb": ru.ru_maxrss / 1024,
            "exit": p.returncode}


# ------------------------------------------------------------------ broker

@contextlib.contextmanager
def mosquitto(workdir: Path):  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "set_tcp_nodelay true\nmax_queued_messages 100000\n"
                    f"log_dest file {workdir / 'mosquitto.log'}\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start ({MOSQUITTO})")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ------------------------------------------------------------------ orchestration

FULL = {"frames": 1_000_000, "b1": 1_000_000, "b2": 20_000, "b3": 20_000, "decode": 1_000_000,
        "live_s": 60.0, "memory": 10_000_000, "warm": 1_000_000}
SHORT = {"frames": 200_000, "b1": 100_000, "b2": 5_000, "b3": 5_000, "decode": 200_000,
         "live_s": 10.0, "memory": 1_000_000, "warm": 200_000}
TARGETS = {"e2e_fps": 150_000, "e2e_us": 7.0, "e2e_vs_b1": 2.0, "decode_vs_cantools": 3.0,
           "live_cpu_pct": 15.0, "live_p99_ms": 5.0, "rss_two192_mb": 60.0, "growth_mb": 2.0}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(short: bool) -> dict[str, Any]:
    P = SHORT if short else FULL
    res: dict[str, Any] = {"mode": "short" if short else "full", "rows": [], "checks": {}}
    rows: list[dict[str, Any]] = res["rows"]
    with tempfile.TemporaryDirectory(prefix="bms-bench-") as td:
        tmp = Path(td)
        t = time.perf_counter()
        log(f"generating workloads ({P['frames']:,} frames each) in {tmp}")
        wls = W.generate(tmp, P["frames"], short=short)
        orion = None if short else W.orion(tmp, SHARED)
        log(f"workloads ready in {time.perf_counter() - t:.1f} s")
        main = wls[0]
        with mosquitto(tmp / "broker") as port:
            url = f"mqtt://127.0.0.1:{port}"

            def row(stage: str, wl: str, r: dict[str, Any], **kw: Any) -> dict[str, Any]:
                d = {"stage": stage, "workload": wl, **{k: r.get(k) for k in (
                    "frames", "fps", "us_per_frame", "peak_rss_mb")}, **kw}
                rows.append(d)
                return d

            log("baseline 1: can.LogReader + db.decode_message")
            b1 = {w.name: run_child("baseline1", log=w.log, dbc=DBC, limit=P["b1"])
                  for w in wls if w.name != "two192"}
            if orion:
                b1["orion"] = run_child("baseline1", log=orion.log, dbc=_orion_dbc(),
                                        limit=P["b1"])
            for name, r in b1.items():
                row("baseline 1: LogReader + decode_message", name, r)
            log("baseline 2: naive bridge, one aiomqtt publish per frame")
            b2 = run_child("baseline2", log=main.log, dbc=DBC, port=port, limit=P["b2"])
            row("baseline 2: naive bridge (JSON per frame, aiomqtt)", main.name, b2)
            log("baseline 3: python -m cantools decode (subprocess)")
            b3 = baseline3(DBC, main.log, P["b3"], tmp)
            row("baseline 3: `python -m cantools decode` piped", main.name, b3,
                note="incl. interpreter start and DBC load")

            all_wl = [*wls, *([orion] if orion else [])]
            for w in all_wl:
                ref = b1.get(w.name) or b1[main.name]
                log(f"{w.name}: stages")
                pr = run_child("parse", log=w.log)
                row("source: candump parser", w.name, pr, vs_b1=pr["fps"] / ref["fps"])
                if w.name != "two192":
                    dbc = _orion_dbc() if w.name == "orion" else DBC
                    dec = run_child("decode", log=w.log, config=w.config, dbc=dbc,
                                    limit=P["decode"], check=w.name != "orion")
                    ratio = dec["ours"]["fps"] / dec["cantools"]["fps"]
                    row("(a) decode_message only (cantools)", w.name, dec["cantools"])
                    row("(a) decode+normalize (compiled handlers)", w.name, dec["ours"],
                        vs_cantools=ratio, checked=dec["checked"],
                        target=f">= {TARGETS['decode_vs_cantools']:.0f}x decode_message",
                        ok=ratio >= TARGETS["decode_vs_cantools"])
                    res["checks"].setdefault("decode_vs_cantools", {})[w.name] = ratio
                pl = run_child("pipeline", log=w.log, config=w.config)
                row("source + pipeline (no MQTT)", w.name, pl, vs_b1=pl["fps"] / ref["fps"],
                    publications=pl["publications"])
                e2e = run_child("e2e", log=w.log, config=w.config, url=url)
                vs = e2e["fps"] / ref["fps"]
                saturated = w.name in ("pack96", "pack192", "two192")
                row("(b) end to end: replay -> mosquitto", w.name, e2e, vs_b1=vs,
                    published=e2e["published"],
                    target=">= 150k/s, >= 2x b1" if saturated else "(info)",
                    ok=(e2e["fps"] >= TARGETS["e2e_fps"] and vs >= TARGETS["e2e_vs_b1"])
                    if saturated else None)
                res["checks"].setdefault("e2e_vs_b1", {})[w.name] = vs
                if w.name == "two192":
                    res["checks"]["rss_two192_mb"] = e2e["peak_rss_mb"]
                    rows[-1]["note"] = "peak RSS: two 192-cell packs"
            log(f"(c) live: virtual bus at {W.SATURATED:,.0f} frames/s for {P['live_s']} s")
            lv = run_child("live", url=url, port=port, rate=W.SATURATED,
                           duration=P["live_s"], dir=tmp / "live")
            res["live"] = lv
            ok = (lv["lost"] == 0 and lv["cpu_pct"] < TARGETS["live_cpu_pct"]
                  and lv["p99_ms"] is not None and lv["p99_ms"] < TARGETS["live_p99_ms"])
            rows.append({"stage": "(c) live: virtual bus -> daemon -> mosquitto -> subscriber",
                         "workload": "live96", "frames": lv["received"],
                         "fps": lv["offered_fps"], "us_per_frame": lv["us_per_frame"],
                         "peak_rss_mb": lv["peak_rss_mb"],
                         "note": (f"lost {lv['lost']}, CPU {lv['cpu_pct']:.1f} % of a core, "
                                  f"latency p50 {_ms(lv['p50_ms'])} p99 {_ms(lv['p99_ms'])} "
                                  f"max {_ms(lv['max_ms'])} (n={lv['latency_n']})"),
                         "target": "no loss, < 15 %, p99 < 5 ms", "ok": ok})
            log(f"(d) memory: {P['memory']:,} frames, two 192-cell packs")
            mem = run_child("memory", timeout=1800, config=next(w for w in wls if w.name == "two192").config, url=url,
                            count=P["memory"], warm=P["warm"])
            res["memory"] = mem
            res["checks"]["growth_mb"] = mem["growth_mb"]
            row("(d) memory: pipeline + MQTT, two 192-cell packs", "two192", mem,
                note=(f"RSS {mem['rss_warm_mb']:.1f} MB after {P['warm']:,} frames -> "
                      f"{mem['rss_end_mb']:.1f} MB after {mem['frames']:,}"),
                target="< 2 MB growth", ok=mem["growth_mb"] < TARGETS["growth_mb"])
        rss = res["checks"].get("rss_two192_mb")
        res["checks"]["rss_ok"] = rss is not None and rss < TARGETS["rss_two192_mb"]
        res["orion"] = str(orion.log) if orion else None
    return res


def _orion_dbc() -> Path:
    return SHARED / "orion-we-ev" / "Orion_CANBUS.dbc"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def machine() -> dict[str, str]:
    from importlib.metadata import version
    libs = {}
    for p in ("python-can", "cantools", "aiomqtt", "paho-mqtt", "uvloop"):
        with contextlib.suppress(Exception):
            libs[p] = version(p)
    try:
        mv = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True,
                            check=False).stdout.split("\n")[0]
    except OSError:
        mv = "?"
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "mosquitto": mv.strip(),
            **libs}


def table(res: dict[str, Any]) -> str:
    head = ("| stage | workload | frames | frames/s (CPU) | µs CPU/frame | peak RSS MB "
            "| vs baseline 1 | target | ok | notes |")
    lines = [head, "|" + "---|" * 10]
    for r in res["rows"]:
        ratio = r.get("vs_b1")
        if r.get("vs_cantools") is not None:
            rtxt = f"{r['vs_cantools']:.1f}x decode_message"
        else:
            rtxt = f"{ratio:.2f}x" if ratio is not None else ""
        ok = r.get("ok")
        notes = r.get("note", "")
        if r.get("checked"):
            notes = f"{r['checked']} values checked equal to cantools"
        if r.get("published") is not None:
            notes = (notes + "; " if notes else "") + f"{r['published']:,} MQTT messages"
        lines.append(f"| {r['stage']} | {r['workload']} | {r['frames']:,} | {r['fps']:,.0f} | "
                     f"{r['us_per_frame']:.2f} | {r['peak_rss_mb']:.1f} | {rtxt} | "
                     f"{r.get('target', '')} | {'' if ok is None else 'yes' if ok else 'NO'} | "
                     f"{notes} |")
    return "\n".join(lines)


def check(res: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """Regressions: a ratio below half the stored one (same mode)."""
    bad = []
    base = stored.get(res["mode"], {})
    for key in ("e2e_vs_b1", "decode_vs_cantools"):
        for wl, want in base.get(key, {}).items():
            got = res["checks"].get(key, {}).get(wl)
            if got is None:
                continue
            floor = want * base.get("tolerance", 0.5)
            if got < floor:
                bad.append(f"{key}[{wl}] = {got:.2f}, below {floor:.2f} "
                           f"(50 % of the stored {want:.2f})")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="CI size (about a minute)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if a ratio fell below half of bench/baseline.json")
    ap.add_argument("--update-baseline", action="store_true",
                    help="store this run's ratios in bench/baseline.json")
    ap.add_argument("--results", type=Path, help="write a Markdown report here")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        out = CHILDREN[a.child](json.loads(a.args or "{}"))
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    t0 = time.perf_counter()
    res = measure(a.short)
    res["machine"] = machine()
    res["elapsed_s"] = time.perf_counter() - t0
    text = table(res)
    print(text)
    m = res["machine"]
    print(f"\n{res['mode']} run, {res['elapsed_s']:.0f} s; {m['date']}; nproc {m['nproc']}; "
          f"Python {m['python']}; python-can {m.get('python-can')}; cantools {m.get('cantools')}; "
          f"aiomqtt {m.get('aiomqtt')}; paho-mqtt {m.get('paho-mqtt')}; {m['mosquitto']}")
    if res["orion"] is None and not a.short:
        print("note: the shared Orion log (../shared/realdata/orion-we-ev) is absent: skipped")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    if a.results:
        a.results.write_text(report(res, text))
    stored = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    if a.update_baseline:
        stored[res["mode"]] = {"tolerance": 0.5, **{k: res["checks"][k] for k in (
            "e2e_vs_b1", "decode_vs_cantools")}}
        BASELINE.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    if a.check:
        bad = check(res, stored)
        for b in bad:
            print(f"REGRESSION: {b}")
        if bad:
            return 1
        print("check: no ratio fell below 50 % of bench/baseline.json")
    return 0


def report(res: dict[str, Any], text: str) -> str:
    m = res["machine"]
    facts = "\n".join(f"- {k}: {v}" for k, v in m.items())
    return (f"# Benchmark results ({res['mode']} run)\n\n"
            f"`python -m bench{' --short' if res['mode'] == 'short' else ''}`, "
            f"{res['elapsed_s']:.0f} s.\n\n{facts}\n\n{text}\n")
