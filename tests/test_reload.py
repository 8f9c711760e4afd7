"""Issue 10 items 4 and 11: a reload keeps what is unchanged, and a silent pack is reported.

Real parts only: `python -m gateway run` as a subprocess, a real mosquitto, and python-can's
`slcan` interface on a pseudo-terminal made here (`os.openpty`): the gateway opens a real
serial CAN adapter, and this test is the adapter's firmware, writing SLCAN `t` lines.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cantools
import pytest

from gateway.config import YAML_MAX_BYTES, ConfigError, load_config
from gateway.runtime.pipeline import Pipeline
from tests import test_daemon
from tests.conftest import REPO, Broker
from tests.test_daemon import SHUTDOWN_S, NotifySocket, no_traceback, retained

pytest.importorskip("serial", reason="python-can's slcan interface needs pyserial")
gateways = test_daemon.gateways  # fixtures shared with the daemon tests
notify_socket = test_daemon.notify_socket

DB = cantools.database.load_file(str(REPO / "dbc" / "example-bms.dbc"))
PACK_STATUS = DB.get_message_by_name("PackStatus")
P2_OFFSET = 0x10  # p2 is the same BMS model, its ids shifted (no clash with p1's)


def status_data(voltage: float, counter: int) -> bytes:
    return bytes(PACK_STATUS.encode({
        "PackVoltage": voltage, "PackCurrent": -12.5, "StateOfCharge": 80,
        "StateOfHealth": 99, "State": 3, "AliveCounter": counter % 16}))


class SlcanAdapter:
    """The adapter end of a pty: what the gateway's python-can `slcan` bus talks to."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.commands = b""
        self._stop = threading.Event()
        # drain what the gateway writes (S6, O, C...): a full pty buffer would block it
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        import select

        while not self._stop.is_set():
            r, _, _ = select.select([self.master], [], [], 0.1)
            if r:
                try:
                    self.commands += os.read(self.master, 4096)
                except OSError:
                    return

    def send(self, can_id: int, data: bytes) -> None:
        os.write(self.master, f"t{can_id:03X}{len(data)}{data.hex().upper()}\r".encode())

    def close(self) -> None:
        self._stop.set()
        self._reader.join(2)
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def adapter() -> Iterator[SlcanAdapter]:
    a = SlcanAdapter()
    yield a
    a.close()


class Stream:
    """Numbered PackStatus frames for p1 and p2 at a steady rate, until stopped."""

    def __init__(self, adapter: SlcanAdapter, rate_hz: float, voltage: float) -> None:
        self.adapter, self.period, self.voltage = adapter, 1.0 / rate_hz, voltage
        self.sent = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set() and self.sent < 20_000:  # bounded in count and time
            n = self.sent
            can_id = PACK_STATUS.frame_id + (P2_OFFSET if n % 2 else 0)
            self.adapter.send(can_id, status_data(self.voltage, n // 2))
            self.sent += 1
            delay = t0 + self.sent * self.period - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def __enter__(self) -> Stream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(5)


def write_config(path: Path, channel: str, url: str, packs: list[str], extra: str = "") -> None:
    lines = {"p1": "  - {id: p1, profile: example-bms}",
             "p2": f"  - {{id: p2, profile: example-bms, id_offset: {P2_OFFSET}}}",
             "quiet": "  - {id: quiet, profile: example-bms, id_offset: 0x40, "
                      "stale_after_s: 1}"}
    path.write_text(
        "gateway_id: rl\n"
        f"state_dir: {path.parent / 'state'}\n"
        f"shutdown_timeout_s: {SHUTDOWN_S}\n"
        f"can: {{name: main, interface: slcan, channel: {channel}, bitrate: 500000}}\n"
        f"mqtt: {{url: '{url}', topic_prefix: bms}}\n"
        "publish: {state: {min_interval_s: 0.2}}\n"
        "rules: {pack_over_voltage: {raise_at: 55, clear_at: 54, debounce_s: 0}}\n"
        "packs:\n" + "\n".join(lines[p] for p in packs) + "\n" + extra)


def events(sub: Any, pack: str) -> list[dict[str, Any]]:
    return [json.loads(p) for p in sub.topic(f"bms/{pack}/events")]


def states(evs: list[dict[str, Any]], code: str) -> list[str]:
    return [e["state"] for e in evs if e["code"] == code]


def test_three_reloads_keep_the_alarm_and_every_frame_and_a_removed_pack_clears(
        tmp_path: Path, broker: Broker, subscriber_factory: Any, gateways: Any,
        adapter: SlcanAdapter) -> None:
    cfg = tmp_path / "gw.yaml"
    write_config(cfg, adapter.path, broker.url, ["p1", "p2"])
    sub = subscriber_factory(broker.port, ["bms/#"])
    gw = gateways(cfg)
    assert sub.wait_for(lambda ms: ("bms/gateway/rl/availability", b"online", False) in ms,
                        timeout=30), gw.log()
    with Stream(adapter, rate_hz=400, voltage=58.0) as stream:
        # both packs hold a pack_over_voltage alarm
        assert sub.wait_for(lambda ms: all(
            states(events(sub, p), "pack_over_voltage") == ["raised"] for p in ("p1", "p2")),
            timeout=20), gw.log()
        # the faults list is a snapshot beside the event: once it is there, it is retained
        assert sub.wait_for(lambda ms: len(sub.topic("bms/p1/faults")) > 0, timeout=10)
        before = retained(broker, subscriber_factory, ["bms/p1/faults"])["bms/p1/faults"]
        for n in (1, 2, 3):  # the same file, three times, while frames keep coming
            time.sleep(0.4)
            gw.signal(signal.SIGHUP)
            assert wait_count(gw, "reload: config", n), gw.log()
        time.sleep(0.4)
    sent = stream.sent
    after = retained(broker, subscriber_factory, ["bms/p1/faults"])["bms/p1/faults"]
    assert json.loads(after) == json.loads(before)  # same fault, `since` unchanged
    assert [f["code"] for f in json.loads(after)] == ["pack_over_voltage"]

    # a reload that removes p2: its alarm is cleared and it goes offline
    write_config(cfg, adapter.path, broker.url, ["p1"])
    gw.signal(signal.SIGHUP)
    assert gw.wait_log("applied (1 packs)"), gw.log()
    assert sub.wait_for(lambda ms: states(events(sub, "p2"), "pack_over_voltage")
                        == ["raised", "cleared"], timeout=10), events(sub, "p2")
    cleared = [e for e in events(sub, "p2") if e["state"] == "cleared"]
    assert "pack removed" in cleared[0]["message"]
    kept = retained(broker, subscriber_factory, ["bms/p2/availability", "bms/p2/faults"])
    assert kept == {"bms/p2/availability": b"offline", "bms/p2/faults": b"[]"}

    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(SHUTDOWN_S) == 0, gw.log()
    final = json.loads(retained(broker, subscriber_factory, ["bms/gateway/rl/status"])[
        "bms/gateway/rl/status"])
    bus = final["buses"]["main"]
    # not a frame lost across three reloads: the bus stayed open
    assert (bus["received"], bus["decoded"], bus["unknown"]) == (sent, sent, 0), (sent, bus)
    # one alarm raised in all, never cleared, for the pack that stayed
    assert states(events(sub, "p1"), "pack_over_voltage") == ["raised"]
    assert all(e["code"] != "comm_lost" for e in events(sub, "p1"))
    log = gw.log()
    assert log.count("kept their state") == 4
    assert "reopening" not in log and "closing it" not in log
    no_traceback(log)


def wait_count(gw: Any, text: str, n: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gw.log().count(text) >= n:
            return True
        time.sleep(0.05)
    return False


def alias_bomb(levels: int = 9) -> str:
    """'Billion laughs': `levels` nested lists of 9 aliases, 9**levels strings in all."""
    parts = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    names = "abcdefghijk"
    for i in range(1, levels):
        parts.append(f"&{names[i]} [" + ",".join([f"*{names[i - 1]}"] * 9) + "]")
    return "[" + ", ".join(parts) + "]"


def test_hostile_reloads_are_bounded_and_a_silent_pack_goes_offline(
        tmp_path: Path, broker: Broker, subscriber_factory: Any, gateways: Any,
        adapter: SlcanAdapter, notify_socket: NotifySocket) -> None:
    """An alias bomb and an 11 MB config, each sent by SIGHUP, are rejected while the
    event loop keeps feeding the watchdog; `quiet`, configured but never sending a frame,
    goes offline with comm_lost after its stale_after_s."""
    cfg = tmp_path / "gw.yaml"
    write_config(cfg, adapter.path, broker.url, ["p1", "quiet"])
    good = cfg.read_text()
    sub = subscriber_factory(broker.port, ["bms/#"])
    gw = gateways(cfg, env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "200000"})
    # every datagram timestamped as it comes (a heartbeat), by a thread of its own
    stop = threading.Event()
    pump = threading.Thread(target=notify_socket.pump, args=(stop.is_set, 120), daemon=True)
    pump.start()
    try:
        gaps = hostile_reloads(cfg, good, gw, sub, adapter, notify_socket)
    finally:
        stop.set()
        pump.join(5)
    # pings every 0.2 s here (WatchdogSec 0.2 s): a starved loop shows as a long gap. The
    # bound leaves room for a loaded CI machine; the unbounded loader stalled 58 s and more.
    assert max(gaps) < 1.0, gaps
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(SHUTDOWN_S) == 0, gw.log()
    assert states(events(sub, "quiet"), "comm_lost") == ["raised"]
    no_traceback(gw.log())
    print(f"max gap between watchdog pings: alias bomb {gaps[0]:.3f} s, "
          f"11 MB config {gaps[1]:.3f} s")


def hostile_reloads(cfg: Path, good: str, gw: Any, sub: Any, adapter: SlcanAdapter,
                    notify_socket: NotifySocket) -> list[float]:
    # the silent pack: offline and comm_lost, once, about stale_after_s (1 s) after start
    assert sub.wait_for(lambda ms: ("bms/quiet/availability", b"offline", False) in ms
                        and states(events(sub, "quiet"), "comm_lost") == ["raised"],
                        timeout=15), gw.log()
    ev = next(e for e in events(sub, "quiet") if e["code"] == "comm_lost")
    assert ev["severity"] == "critical" and ev["limit"] == 1

    def until(pred: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not pred():
            time.sleep(0.01)
        return bool(pred())

    def pings_during(hostile: str, rejected: str) -> float:
        """Longest gap between two watchdog pings around a SIGHUP that reads `hostile`."""
        cfg.write_text(hostile)
        mark = len(notify_socket.got)
        t0 = time.monotonic()
        gw.signal(signal.SIGHUP)
        assert until(lambda: notify_socket.in_order("RELOADING=1", "READY=1", mark), 60), \
            gw.log()
        time.sleep(0.7)  # a few pings after it
        ts = [t for t, d in list(notify_socket.got) if "WATCHDOG=1" in d.split("\n")]
        ts = [t for t in ts if t < t0][-1:] + [t for t in ts if t >= t0]
        assert len(ts) >= 3, notify_socket.got[mark - 1:]
        assert rejected in gw.log(), gw.log()
        return max(b - a for a, b in itertools.pairwise(ts))

    with Stream(adapter, rate_hz=100, voltage=51.0):
        # where the old loader walked it: into an error message (a 312 MB log line)
        bomb = good.replace("rules: {", f"rules: {{low_soc: {alias_bomb()}, ")
        assert len(bomb.encode()) < 1500
        gap_bomb = pings_during(bomb, "aliases (*name) are resolved")
        big = good + "x-big: [" + "1, " * (11 * 2**20 // 3) + "1]\n"
        assert len(big) > 11 * 2**20 > YAML_MAX_BYTES
        gap_big = pings_during(big, f"more than the {YAML_MAX_BYTES} allowed")
    assert gw.log().count("reload: new config rejected") == 2
    assert gw.proc.poll() is None

    # the running config is untouched: p1 still decodes, quiet is still reported silent
    with Stream(adapter, rate_hz=100, voltage=52.0):
        assert sub.wait_for(lambda ms: any(
            t == "bms/p1/state" and json.loads(p)["voltage_v"] == 52.0 for t, p, _ in ms),
            timeout=10), gw.log()
    return [gap_bomb, gap_big]


# ------------------------------------------------------------- the pipeline, in frame time

def pipeline_config(tmp: Path, packs: list[str], rules: str = "{pack_over_voltage: "
                    "{raise_at: 55, clear_at: 54, debounce_s: 0}}") -> Path:
    lines = {"p1": "  - {id: p1, profile: example-bms}",
             "p2": f"  - {{id: p2, profile: example-bms, id_offset: {P2_OFFSET}}}",
             "quiet": "  - {id: quiet, profile: example-bms, id_offset: 0x40, stale_after_s: 5}",
             "p1-moved": "  - {id: p1, profile: example-bms, bus: other}"}
    cfg = tmp / "gw.yaml"
    cfg.write_text("gateway_id: g\ncan: [{interface: virtual, channel: main}, "
                   "{interface: virtual, channel: other}]\nmqtt: {topic_prefix: bms}\n"
                   f"rules: {rules}\npacks:\n" + "\n".join(lines[p] for p in packs) + "\n")
    return cfg


P1, P2, QUIET = PACK_STATUS.frame_id, PACK_STATUS.frame_id + P2_OFFSET, PACK_STATUS.frame_id + 0x40


def feed(pl: Pipeline, t0: float, t1: float, voltage: float, ids: tuple[int, ...] = (P1,)) -> None:
    """PackStatus frames at 10 Hz from t0 (included) to t1 (not), for each id."""
    pl.feed([(t0 + i * 0.1, can_id, status_data(voltage, i), "main")
             for i in range(round((t1 - t0) * 10)) for can_id in ids], 0)


def reload(pl: Pipeline, cfg: Path, ts: float) -> None:
    pl.apply(pl.prepare(load_config(cfg)), ts)


def fault_events(pl: Pipeline) -> list[tuple[str, str, str, float]]:
    return [(ev.pack_id, ev.code, ev.state, ev.ts) for ev, _ in pl.take_split()[1]]


def test_reload_keeps_state_and_faults_of_an_unchanged_pack(tmp_path: Path) -> None:
    cfg = pipeline_config(tmp_path, ["p1", "p2"])
    pl = Pipeline(load_config(cfg))
    feed(pl, 1000.0, 1002.0, 58.0, (P1, P2))
    # rules run on the 0.1 s frame-time tick: the first after the first frame
    assert fault_events(pl) == [("p1", "pack_over_voltage", "raised", 1000.1),
                                ("p2", "pack_over_voltage", "raised", 1000.1)]
    p1 = pl.packs[0]
    state, since = p1.live.state, p1.faults.active()[0]["since"]
    for i in range(3):
        reload(pl, cfg, 1002.0 + i)
        feed(pl, 1002.0 + i, 1003.0 + i, 58.0, (P1, P2))
    assert fault_events(pl) == []  # no second `raised`
    assert pl.packs[0] is p1 and p1.live.state is state
    assert p1.faults.active()[0]["since"] == since
    assert state.get("voltage_v") == 58.0 and state.online
    assert pl.counters[0].decoded == 2 * (20 + 30)  # counters survive too

    # new limits apply to the kept fault: it clears under the new clear_at
    pipeline_config(tmp_path, ["p1", "p2"], "{pack_over_voltage: {raise_at: 60, clear_at: 59, debounce_s: 0}}")
    reload(pl, cfg, 1005.0)
    feed(pl, 1005.0, 1005.5, 58.0, (P1, P2))
    assert fault_events(pl) == [("p1", "pack_over_voltage", "cleared", 1005.0),
                                ("p2", "pack_over_voltage", "cleared", 1005.0)]

    # a rule switched off clears what it raised; a removed pack clears and goes offline
    pipeline_config(tmp_path, ["p1", "p2"])
    reload(pl, cfg, 1005.5)
    feed(pl, 1005.5, 1006.0, 58.0, (P1, P2))
    assert [x[:3] for x in fault_events(pl)] == [("p1", "pack_over_voltage", "raised"),
                                                 ("p2", "pack_over_voltage", "raised")]
    pipeline_config(tmp_path, ["p1"], "{pack_over_voltage: false}")
    reload(pl, cfg, 1006.0)
    pubs, evs = pl.take_split()
    assert [(e.pack_id, e.code, e.state, e.ts) for e, _ in evs] == [
        ("p1", "pack_over_voltage", "cleared", 1006.0),
        ("p2", "pack_over_voltage", "cleared", 1006.0)]
    assert [e.message.split(": ")[-1] for e, _ in evs] == ["rule disabled", "pack removed"]
    assert [(p.topic, p.payload) for p in pubs] == [("bms/p1/faults", b"[]"),
                                                     ("bms/p2/faults", b"[]"),
                                                     ("bms/p2/availability", b"offline")]


def test_reload_that_changes_a_packs_bus_starts_it_afresh(tmp_path: Path) -> None:
    cfg = pipeline_config(tmp_path, ["p1"])
    pl = Pipeline(load_config(cfg))
    feed(pl, 1000.0, 1001.0, 58.0)
    assert fault_events(pl) == [("p1", "pack_over_voltage", "raised", 1000.1)]
    old = pl.packs[0]
    pipeline_config(tmp_path, ["p1-moved"])
    reload(pl, cfg, 1001.0)
    assert pl.packs[0] is not old and pl.packs[0].live.state.get("voltage_v") is None
    assert fault_events(pl) == [("p1", "pack_over_voltage", "cleared", 1001.0)]


def test_a_pack_that_never_speaks_goes_offline_in_frame_time(tmp_path: Path) -> None:
    """Replay: before its first frame, a pack's silence counts from the first frame of
    the log (any pack, any bus), so the result does not depend on the replay speed."""
    pl = Pipeline(load_config(pipeline_config(tmp_path, ["p1", "quiet"])))
    feed(pl, 1000.0, 1012.0, 51.0)
    pubs, evs = pl.take_split()
    assert [(e.pack_id, e.code, e.state, e.ts) for e, _ in evs] == [
        ("quiet", "comm_lost", "raised", 1005.0)]
    assert ("bms/quiet/availability", b"offline") in [(p.topic, p.payload) for p in pubs]
    assert "bms/p1/availability" not in [p.topic for p in pubs if p.payload == b"offline"]
    # it speaks at last: online, comm_lost cleared
    feed(pl, 1012.0, 1012.2, 51.0, (QUIET,))
    pubs, evs = pl.take_split()
    assert [(e.pack_id, e.code, e.state) for e, _ in evs] == [("quiet", "comm_lost", "cleared")]
    assert ("bms/quiet/availability", b"online") in [(p.topic, p.payload) for p in pubs]


# ------------------------------------------------------------- the YAML loader's bounds

def test_yaml_bounds_reject_bombs_and_huge_files_with_a_clear_message(tmp_path: Path) -> None:
    base = "gateway_id: g\ncan: {interface: virtual, channel: x}\n" \
           "packs: [{id: p1, profile: example-bms}]\n"
    cfg = tmp_path / "gw.yaml"

    def problems(text: str | bytes) -> str:
        cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError) as e:
            load_config(cfg)
        return str(e.value)

    assert "expands to more than 100,000 values" in problems(
        base + f"rules: {{low_soc: {alias_bomb()}}}\n")
    assert f"more than the {YAML_MAX_BYTES} allowed" in problems(
        base + "#" * YAML_MAX_BYTES + "\n")
    assert "has more than 100,000 values" in problems(
        base + "x: [" + "1, " * 100_000 + "1]\n")
    assert "not UTF-8 text" in problems(base.encode() + b"x: \xff\n")
    assert "nested too deeply" in problems(base + "x: " + "[" * 5000 + "]" * 5000 + "\n")
    # aliases as people use them still work
    cfg.write_text("gateway_id: g\ncan: {interface: virtual, channel: x}\n"
                   "x-pack: &pack {profile: example-bms, stale_after_s: 3}\n"
                   "packs: [{<<: *pack, id: p1}, {<<: *pack, id: p2, id_offset: 16}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)  # the x- key is unknown, but that is the only problem
    assert [p.key for p in e.value.problems] == ["x-pack"]


def test_expressions_are_bounded(tmp_path: Path) -> None:
    prof = tmp_path / "big-expr.yaml"
    prof.write_text(f"dbc: [{REPO / 'dbc' / 'example-bms.dbc'}]\nfields:\n  voltage_v: "
                    "{message: PackStatus, expr: '" + "+".join(["PackVoltage"] * 200) + "'}\n")
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("gateway_id: g\ncan: {interface: virtual, channel: x}\n"
                   f"packs: [{{id: p1, profile: {prof}}}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert "fields.voltage_v.expr: 2,399 characters long (at most 1000)" in str(e.value)


def test_check_config_on_an_alias_bomb_stays_small(tmp_path: Path) -> None:
    """check-config reads with the same bounded loader: 9**9 strings are refused before
    any is built (the unbounded loader took 1.4 GB on a 404-byte bomb of 9**8)."""
    import subprocess
    import sys

    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("gateway_id: g\ncan: {interface: virtual, channel: x}\n"
                   f"rules: {{low_soc: {alias_bomb()}}}\npacks: [{{id: p1, profile: example-bms}}]\n")
    # `python -m gateway check-config`, reporting its own peak memory as it exits (VmHWM:
    # ru_maxrss would include the pytest process it was forked from)
    run = ("import runpy, sys\n"
           f"sys.argv = ['gateway', 'check-config', '-c', {str(cfg)!r}]\n"
           "try:\n    runpy.run_module('gateway', run_name='__main__')\nfinally:\n"
           "    hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')]\n"
           "    print('PEAK_KB', hwm[0].split()[1], file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", run], cwd=REPO, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 3, r
    assert "expands to more than 100,000 values" in r.stdout + r.stderr
    assert len(r.stdout + r.stderr) < 2000
    peak_mb = int(r.stderr.rsplit("PEAK_KB ", 1)[1]) / 1024
    assert peak_mb < 200, peak_mb  # the interpreter, cantools and python-can included
