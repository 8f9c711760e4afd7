"""Issue 5: the daemon you can leave beside a pack for a year.

Real parts only: `python -m gateway run` as a subprocess (or `Daemon` in the test's event
loop), a real mosquitto from the fixtures, python-can's `virtual` bus, and an AF_UNIX
datagram socket made here standing in for systemd's NOTIFY_SOCKET.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import can
import cantools
import pytest

from gateway.config import load_config
from gateway.model import FaultEvent, Publication
from gateway.publish.mqtt import MqttSink
from gateway.publish.outbox import Outbox
from gateway.runtime.daemon import Daemon
from tests.conftest import REPO, Broker, free_port, serving, started

DB = cantools.database.load_file(str(REPO / "dbc" / "example-bms.dbc"))
PACK_STATUS = DB.get_message_by_name("PackStatus")
SHUTDOWN_S = 8.0


def pack_frame(voltage: float, counter: int = 0) -> can.Message:
    data = PACK_STATUS.encode({"PackVoltage": voltage, "PackCurrent": -12.5, "StateOfCharge": 80,
                               "StateOfHealth": 99, "State": 3, "AliveCounter": counter % 16})
    return can.Message(arbitration_id=PACK_STATUS.frame_id, data=data, is_extended_id=False)


def write_cfg(path: Path, *, gid: str, url: str | None, packs: list[str] | None = None,
              can_cfg: str | None = None, extra: str = "", shutdown_s: float = SHUTDOWN_S,
              mqtt_extra: str = "") -> Path:
    packs = packs or ["p1"]
    can_cfg = can_cfg or f"{{interface: virtual, channel: {gid}-{uuid.uuid4().hex[:6]}}}"
    mqtt = (f"mqtt: {{url: '{url}', topic_prefix: bms{mqtt_extra}}}" if url
            else "mqtt: {topic_prefix: bms}")
    pack_lines = "\n".join(f"  - {{id: {p}, profile: example-bms}}" for p in packs)
    path.write_text(textwrap.dedent(f"""\
        gateway_id: {gid}
        state_dir: {path.parent / 'state'}
        shutdown_timeout_s: {shutdown_s}
        can: {can_cfg}
        {mqtt}
        publish: {{state: {{min_interval_s: 0.2}}}}
        """) + "packs:\n" + pack_lines + "\n" + extra)
    return path


class Gateway:
    """`python -m gateway run -c CFG` as a child process, its log in a file."""

    def __init__(self, cfg: Path, *, env: dict[str, str] | None = None,
                 watchdog_pid_wrapper: bool = False) -> None:
        self.log_path = cfg.parent / f"{cfg.stem}.log"
        self.log_file = self.log_path.open("wb")
        cmd = [sys.executable, "-m", "gateway", "run", "-c", str(cfg)]
        if watchdog_pid_wrapper:
            # $$ is the shell's pid, and exec keeps it: WATCHDOG_PID then names our daemon
            cmd = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *cmd]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL,
                                     stderr=self.log_file)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_log(self, text: str, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log_file.close()


@pytest.fixture
def gateways() -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(*a: Any, **kw: Any) -> Gateway:
        g = Gateway(*a, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


class NotifySocket:
    """The service manager's end of sd_notify: a bound AF_UNIX datagram socket."""

    def __init__(self) -> None:
        # sun_path is limited to 108 bytes: pytest's tmp_path can be longer
        self.dir = tempfile.mkdtemp(prefix="bmsgw-")
        self.path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.got: list[tuple[float, str]] = []

    def pump(self, until: Callable[[], bool] | None = None, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until is not None and until():
                return True
            with contextlib.suppress(TimeoutError):
                data = self.sock.recv(4096)
                self.got.append((time.monotonic(), data.decode()))
        return until() if until is not None else True

    def has(self, line: str, after: int = 0) -> bool:
        return any(line in d.split("\n") for _, d in self.got[after:])

    def index(self, line: str, after: int = 0) -> int:
        for i, (_, d) in enumerate(self.got[after:], after):
            if line in d.split("\n"):
                return i
        return -1

    def in_order(self, first: str, then: str, after: int = 0) -> bool:
        i = self.index(first, after)
        return i >= 0 and self.index(then, i + 1) > i

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.dir)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    n = NotifySocket()
    yield n
    n.close()


def retained(broker: Broker, subscriber_factory: Any, topics: list[str]) -> dict[str, bytes]:
    """What a subscriber arriving now gets as retained messages."""
    sub = subscriber_factory(broker.port, topics, client_id=f"late-{uuid.uuid4().hex[:6]}")
    sub.wait_for(lambda ms: {t for t, _, r in ms if r} >= set(topics), timeout=10)
    with sub.lock:
        return {t: p for t, p, r in sub.messages if r}


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# ---------------------------------------------------------------- 1. SIGTERM / SIGINT


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_exits_0_and_leaves_offline(
        tmp_path: Path, broker: Broker, subscriber_factory: Any, gateways: Any,
        sig: signal.Signals) -> None:
    gid = f"sig{sig.value}"
    cfg = write_cfg(tmp_path / "gw.yaml", gid=gid, url=broker.url, packs=["p1", "p2"])
    avail = f"bms/gateway/{gid}/availability"
    sub = subscriber_factory(broker.port, ["bms/#"])
    gw = gateways(cfg)
    assert sub.wait_for(lambda ms: (avail, b"online", False) in ms, timeout=30), gw.log()
    t0 = time.monotonic()
    gw.signal(sig)
    assert gw.proc.wait(SHUTDOWN_S) == 0, gw.log()
    assert time.monotonic() - t0 < SHUTDOWN_S
    topics = [avail, "bms/p1/availability", "bms/p2/availability"]
    kept = retained(broker, subscriber_factory, topics)
    assert kept == dict.fromkeys(topics, b"offline")
    log = gw.log()
    assert f"{sig.name}: stopping" in log
    no_traceback(log)


def test_second_sigint_forces_exit(tmp_path: Path, broker: Broker, subscriber_factory: Any,
                                   gateways: Any) -> None:
    cfg = write_cfg(tmp_path / "gw.yaml", gid="force", url=broker.url, shutdown_s=60)
    sub = subscriber_factory(broker.port, ["bms/gateway/#"])
    gw = gateways(cfg)
    assert sub.wait_for(lambda ms: any(p == b"online" for _, p, _ in ms), timeout=30), gw.log()
    sub.close()
    broker.stop()
    # An undelivered event for the drain to wait for (with none it does not wait at all),
    # written into the outbox as an earlier run would have left it.
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "outbox.sqlite",
                                            timeout=10)) as db, db:
        db.execute("INSERT INTO events VALUES (1000000, 'force-pending', 'p1', "
                   "'bms/p1/events', x'7b7d', ?)", (time.time(),))
    gw.signal(signal.SIGINT)  # now the drain would wait the whole 60 s
    assert gw.wait_log("SIGINT: stopping")
    with pytest.raises(subprocess.TimeoutExpired):
        gw.proc.wait(1.0)  # still draining
    wal = tmp_path / "state" / "outbox.sqlite-wal"
    assert wal.exists()  # the outbox is open
    gw.signal(signal.SIGINT)
    assert gw.proc.wait(10) == 130
    assert "second SIGINT: exiting now" in gw.log()
    assert not wal.exists(), "the outbox was not closed (its WAL not checkpointed)"


# ---------------------------------------------------------------- 2. SIGHUP


def test_sighup_bad_config_keeps_running_good_config_applies(
        tmp_path: Path, broker: Broker, subscriber_factory: Any, gateways: Any,
        notify_socket: NotifySocket) -> None:
    cfg = write_cfg(tmp_path / "gw.yaml", gid="hup", url=broker.url)
    good = cfg.read_text()
    status_t = "bms/gateway/hup/status"
    sub = subscriber_factory(broker.port, [status_t])
    gw = gateways(cfg, env={"NOTIFY_SOCKET": notify_socket.path})
    assert notify_socket.pump(lambda: notify_socket.has("READY=1")), gw.log()
    assert sub.wait_for(lambda ms: len(ms) >= 1, timeout=20)

    # a typo in the profile name: rejected, the running config stays
    cfg.write_text(good.replace("profile: example-bms", "profile: exmple-bms"))
    n_status, mark = len(sub.topic(status_t)), len(notify_socket.got)
    gw.signal(signal.SIGHUP)
    assert gw.wait_log("reload: new config rejected"), gw.log()
    assert notify_socket.pump(lambda: notify_socket.in_order("RELOADING=1", "READY=1", mark))
    assert gw.proc.poll() is None, "a bad config must not stop the daemon"
    line = next(ln for ln in gw.log().splitlines() if "reload: new config rejected" in ln)
    assert "exmple-bms" in line and "did you mean 'example-bms'" in line
    # status keeps coming, for the old config's pack
    assert sub.wait_for(lambda ms: len(ms) > n_status, timeout=20)
    assert list(json.loads(sub.topic(status_t)[-1])["packs"]) == ["p1"]

    # a good config with a second pack: applied
    cfg.write_text(good.replace("  - {id: p1, profile: example-bms}",
                                "  - {id: p1, profile: example-bms}\n"
                                "  - {id: p2, profile: example-bms}"))
    n_status, mark = len(sub.topic(status_t)), len(notify_socket.got)
    gw.signal(signal.SIGHUP)
    assert gw.wait_log("applied (2 packs)"), gw.log()
    assert sub.wait_for(lambda ms: len(ms) > n_status and "p2" in json.loads(ms[-1][1])["packs"],
                        timeout=20)
    assert notify_socket.pump(lambda: notify_socket.in_order("RELOADING=1", "READY=1", mark))
    assert "MONOTONIC_USEC=" in notify_socket.got[notify_socket.index("RELOADING=1", mark)][1]

    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(SHUTDOWN_S) == 0
    no_traceback(gw.log())


def test_reload_keeps_an_unchanged_bus_and_closes_a_changed_one(tmp_path: Path) -> None:
    """SIGHUP with the same bus config keeps the source and its open bus (no gap in
    reception); a changed channel closes the old bus, not left reading, and opens the new."""
    chan = f"reopen-{uuid.uuid4().hex[:6]}"
    cfg = write_cfg(tmp_path / "gw.yaml", gid="reopen", url=None,
                    can_cfg=f"{{name: main, interface: virtual, channel: {chan}}}")

    async def hup(d: Daemon) -> None:
        d._on_hup()
        assert d._reload_task is not None
        await asyncio.wait_for(d._reload_task, 15)

    async def scenario() -> None:
        with open(os.devnull, "w") as devnull:
            d = Daemon(load_config(cfg), stdout=devnull)
            task = asyncio.create_task(d.serve())
            await started(d)
            old_src = d.runtime.sources[0]
            old_bus = old_src.bus
            assert old_bus is not None
            await hup(d)
            assert d.runtime.sources[0] is old_src and old_src.bus is old_bus
            assert not old_bus._is_shutdown

            cfg.write_text(cfg.read_text().replace(chan, f"{chan}-moved"))
            await hup(d)
            await started(d)
            assert d.runtime.sources[0] is not old_src
            assert d.runtime.sources[0].cfg.channel == f"{chan}-moved"
            assert old_bus._is_shutdown, "the bus from before the reload is still open"
            assert old_src.bus is None
            d._on_term()
            assert await asyncio.wait_for(task, 15) == 0

    asyncio.run(scenario())


# ---------------------------------------------------------------- 3. the bus goes away


def events_of(sub: Any, topic: str) -> list[dict[str, Any]]:
    return [json.loads(p) for p in sub.topic(topic)]


def test_bus_pulled_and_back_resumes_with_can_bus_lost_raise_and_clear(
        tmp_path: Path, broker: Broker, subscriber_factory: Any) -> None:
    channel = f"pull-{uuid.uuid4().hex[:8]}"
    cfg = write_cfg(tmp_path / "gw.yaml", gid="pull", url=broker.url,
                    can_cfg=f"{{interface: virtual, channel: {channel}}}")
    sub = subscriber_factory(broker.port, ["bms/p1/#"], qos=1)

    def lost_events(ms: Any) -> list[str]:
        return [e["state"] for t, p, _ in ms if t == "bms/p1/events"
                for e in [json.loads(p)] if e["code"] == "can_bus_lost"]

    async def until(pred: Callable[[Any], bool], timeout: float = 15) -> bool:
        return await asyncio.to_thread(sub.wait_for, pred, timeout)

    async def scenario() -> None:
        async with serving(cfg, channel) as (d, tx):
            for i in range(5):
                tx.send(pack_frame(51.0, i))
                await asyncio.sleep(0.05)
            assert await until(lambda ms: any(
                t == "bms/p1/state" and json.loads(p)["voltage_v"] == 51.0 for t, p, _ in ms))

            bus = d.runtime.sources[0].bus
            assert bus is not None
            bus.shutdown()  # the adapter is pulled
            assert await until(lambda ms: lost_events(ms)[-1:] == ["cleared"]), \
                lost_events(sub.messages)
            assert lost_events(sub.messages) == ["raised", "cleared"]
            assert not d.runtime.sources[0].lost
            assert d.runtime.sources[0].bus is not bus, "reopened as a new bus"

            for i in range(5):  # frames sent after the bus came back reach MQTT
                tx.send(pack_frame(53.5, i))
                await asyncio.sleep(0.05)
            assert await until(lambda ms: any(
                t == "bms/p1/state" and json.loads(p)["voltage_v"] == 53.5 for t, p, _ in ms))
            body = d.runtime.status_body()
            assert body["buses"][channel]["state"] == "up"
            assert "CanOperationError" in body["last_error"]

    asyncio.run(scenario())
    raised = next(e for e in events_of(sub, "bms/p1/events") if e["state"] == "raised")
    assert raised["severity"] == "critical" and raised["source"] == "gateway"
    # 7. the state dir the daemon made is private, and so is the outbox in it
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "outbox.sqlite").stat().st_mode) == 0o600


def test_bus_missing_at_start_keeps_daemon_up(tmp_path: Path, broker: Broker,
                                              subscriber_factory: Any,
                                              caplog: pytest.LogCaptureFixture) -> None:
    # no AF_CAN in this kernel (and no vcan-missing anywhere): socketcan cannot open
    cfg = write_cfg(tmp_path / "gw.yaml", gid="nobus", url=broker.url,
                    can_cfg="{interface: socketcan, channel: vcan-missing}")
    sub = subscriber_factory(broker.port, ["bms/#"])
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        d = Daemon(load_config(cfg))
        t0 = time.monotonic()
        task = asyncio.create_task(d.serve())
        try:
            ok = await asyncio.to_thread(sub.wait_for, lambda ms: any(
                t == "bms/p1/events" and json.loads(p)["code"] == "can_bus_lost"
                for t, p, _ in ms), 15)
            assert ok, "can_bus_lost never published"
            await asyncio.to_thread(sub.wait_for, lambda ms: any(
                t == "bms/gateway/nobus/status" for t, _, _ in ms), 15)
            assert time.monotonic() - t0 < 4.5, "READY must not wait 5 s for a missing bus"
            await asyncio.sleep(2.5)  # a few reopen attempts
            assert not task.done(), "the daemon must stay up without its bus"
            assert d.runtime.sources[0].attempt >= 2
        finally:
            d._on_term()
            assert await asyncio.wait_for(task, 15) == 0

    asyncio.run(scenario())
    status = json.loads(sub.topic("bms/gateway/nobus/status")[0])
    assert "vcan-missing" in status["last_error"]
    assert status["buses"]["vcan-missing"]["state"] == "lost"
    lost_lines = [r for r in caplog.records if "CAN bus vcan-missing lost" in r.getMessage()]
    assert len(lost_lines) == 1, "one line for the condition, not one per retry"
    assert lost_lines[0].exc_info is None


# ---------------------------------------------------------------- 5. sd_notify


def test_notify_ready_status_watchdog_stopping(tmp_path: Path, gateways: Any,
                                               notify_socket: NotifySocket) -> None:
    cfg = write_cfg(tmp_path / "gw.yaml", gid="wd", url=None)
    gw = gateways(cfg, env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "1000000"},
                  watchdog_pid_wrapper=True)
    assert notify_socket.pump(lambda: notify_socket.has("READY=1")), gw.log()
    t_ready = notify_socket.got[notify_socket.index("READY=1")][0]
    notify_socket.pump(timeout=2.8)
    pings = [t for t, d in notify_socket.got if d == "WATCHDOG=1" and t >= t_ready]
    in_window = [t for t in pings if t - t_ready <= 2.8]
    assert len(in_window) >= 3, notify_socket.got
    assert any(d.startswith("STATUS=") and "packs online" in d for _, d in notify_socket.got)
    ready = notify_socket.got[notify_socket.index("READY=1")][1]
    assert "STATUS=" in ready  # READY carries the first status line
    mark = len(notify_socket.got)
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(SHUTDOWN_S) == 0
    notify_socket.pump(lambda: notify_socket.has("STOPPING=1", mark), timeout=5)
    assert notify_socket.has("STOPPING=1", mark)


def test_watchdog_pid_of_another_process_means_no_pings(tmp_path: Path, gateways: Any,
                                                        notify_socket: NotifySocket) -> None:
    cfg = write_cfg(tmp_path / "gw.yaml", gid="wd2", url=None)
    gw = gateways(cfg, env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "1000000",
                            "WATCHDOG_PID": "1"})
    assert notify_socket.pump(lambda: notify_socket.has("READY=1")), gw.log()
    notify_socket.pump(timeout=1.5)
    assert not notify_socket.has("WATCHDOG=1")
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(SHUTDOWN_S) == 0


# ---------------------------------------------------------------- 6. observability


def test_status_and_prometheus_report_the_same_counters(
        tmp_path: Path, broker: Broker, subscriber_factory: Any) -> None:
    pytest.importorskip("prometheus_client")
    port = free_port()
    channel = f"obs-{uuid.uuid4().hex[:8]}"
    cfg = write_cfg(tmp_path / "gw.yaml", gid="obs", url=broker.url,
                    can_cfg=f"{{interface: virtual, channel: {channel}}}",
                    extra=f"prometheus: 127.0.0.1:{port}\n")
    sub = subscriber_factory(broker.port, ["bms/gateway/obs/status", "bms/p1/state"])

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def sample(text: str, name: str) -> float:
        for ln in text.splitlines():
            if ln.startswith((name + " ", name + "{")):
                return float(ln.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not in metrics:\n{text}")

    async def scenario() -> None:
        async with serving(cfg, channel) as (d, tx):
            tx.send(can.Message(arbitration_id=0x7EE, data=b"\x01", is_extended_id=False))
            for i in range(10):
                tx.send(pack_frame(52.0, i))
                await asyncio.sleep(0.03)
            assert await asyncio.to_thread(sub.wait_for, lambda ms: any(
                t == "bms/p1/state" for t, _, _ in ms), 15)
            text = await asyncio.to_thread(scrape)
            body = d.runtime.status_body()
            bus = body["buses"][channel]
            assert bus["received"] == 11 and bus["unknown"] == 1 and bus["decoded"] == 10
            assert sample(text, f'bms_gateway_bus_received_total{{bus="{channel}"}}') == 11
            assert sample(text, f'bms_gateway_bus_unknown_total{{bus="{channel}"}}') == 1
            assert sample(text, f'bms_gateway_bus_decoded_total{{bus="{channel}"}}') == 10
            assert sample(text, f'bms_gateway_bus_up{{bus="{channel}"}}') == 1
            assert sample(text, 'bms_gateway_pack_online{pack="p1"}') == 1
            assert sample(text, 'bms_gateway_pack_state_published_total{pack="p1"}') >= 1
            assert sample(text, "bms_gateway_mqtt_connected") == 1
            assert sample(text, "bms_gateway_mqtt_published_total") >= 1
            assert sample(text, "bms_gateway_outbox_depth") == 0
            assert sample(text, "bms_gateway_uptime_seconds") > 0
            assert f'version="{body["version"]}"' in text and 'gateway_id="obs"' in text
        with pytest.raises(OSError):  # stopped with the daemon
            scrape()

    asyncio.run(scenario())
    # the retained status at exit: every field the issue asks for
    status = json.loads(sub.topic("bms/gateway/obs/status")[-1])
    for key in ("version", "uptime_s", "frames_per_s", "buses", "packs", "published",
                "events_published", "outbox_depth", "mqtt_reconnects", "last_error"):
        assert key in status, key
    assert set(status["buses"][channel]) >= {"received", "decoded", "unknown", "errors"}
    assert status["buses"][channel]["received"] == 11


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_prometheus_without_the_package_is_a_clear_config_error(tmp_path: Path,
                                                                command: str) -> None:
    """check-config is the contract: what `run` refuses, it refuses too."""
    cfg = write_cfg(tmp_path / "gw.yaml", gid="noprom", url=None,
                    extra="prometheus: 127.0.0.1:9\n")
    # a child where `import prometheus_client` fails, as on an install without the extra
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "from gateway.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, command, "-c", str(cfg)], cwd=REPO,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 3, r.stderr
    assert "prometheus-client" in r.stderr and "bms-gateway[prometheus]" in r.stderr
    no_traceback(r.stderr)


def test_broker_down_logs_one_line_and_keeps_running(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    dead = free_port()  # nothing listens here
    cfg = write_cfg(tmp_path / "gw.yaml", gid="nobroker", url=f"mqtt://127.0.0.1:{dead}",
                    shutdown_s=0.5)
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        d = Daemon(load_config(cfg))
        task = asyncio.create_task(d.serve())
        await asyncio.sleep(4)
        assert not task.done()
        assert d.runtime.sink.status().reconnects >= 3
        assert d.runtime.status_body()["last_error"]
        d._on_term()
        assert await asyncio.wait_for(task, 10) == 0

    asyncio.run(scenario())
    lines = [r for r in caplog.records if r.name == "gateway.publish"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "refused" in lines[0].getMessage() and lines[0].exc_info is None


# ---------------------------------------------------------------- 7. payload bound


def _outbox() -> Outbox:
    return Outbox.open(":memory:", max_events=100, max_age_s=3600.0, gateway_id="test")


def test_oversize_payload_dropped_with_one_warning(
        tmp_path: Path, broker: Broker, subscriber_factory: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = write_cfg(tmp_path / "gw.yaml", gid="big", url=broker.url,
                    mqtt_extra=", max_payload: 1024")
    mqtt_cfg = load_config(cfg).mqtt
    assert mqtt_cfg.max_payload == 1024
    sub = subscriber_factory(broker.port, ["big/#"])

    async def scenario() -> MqttSink:
        sink = MqttSink(mqtt_cfg, "big-test", "big/avail", _outbox(), list)
        task = asyncio.create_task(sink.run())
        try:
            await asyncio.wait_for(sink.connected.wait(), 10)
            sink.publish(Publication("big/huge", b"x" * 1025))
            sink.publish(Publication("big/huge", b"y" * 4000))
            sink.publish(Publication("big/fits", b"z" * 1024))
            assert await sink.delivered(10)
        finally:
            sink.stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return sink

    sink = asyncio.run(scenario())
    assert sub.wait_for(lambda ms: any(t == "big/fits" for t, _, _ in ms))
    time.sleep(0.3)
    assert sub.topic("big/huge") == []
    assert sub.topic("big/fits") == [b"z" * 1024]
    assert sink.dropped_oversize == 2
    warnings = [r for r in caplog.records if "max_payload" in r.getMessage()]
    assert len(warnings) == 1 and "big/huge" in warnings[0].getMessage()


# ---------------------------------------------------------------- shutdown, broker away


def test_drain_with_the_broker_away_and_no_event_does_not_wait(tmp_path: Path) -> None:
    """Shutdown with the broker down waited the whole shutdown timeout for nothing, then
    said "0 events stay in the outbox". Only events are worth the wait."""
    url = f"mqtt://127.0.0.1:{free_port()}"  # nobody listens there
    mqtt_cfg = load_config(write_cfg(tmp_path / "gw.yaml", gid="away", url=url)).mqtt
    outbox = _outbox()

    async def scenario() -> tuple[bool, bool]:
        sink = MqttSink(mqtt_cfg, "away-test", "away/avail", outbox, list)
        task = asyncio.create_task(sink.run())
        try:
            sink.publish(Publication("away/state", b"{}"))
            async def refused() -> None:  # the first attempt to connect
                while not sink.down:
                    await asyncio.sleep(0.01)
            await asyncio.wait_for(refused(), 30)
            # an hour's timeout: only the outer bound could end a wait
            nothing = await asyncio.wait_for(sink.delivered(3600), 60)
            outbox.append([(FaultEvent(ts=1.7e9, pack_id="away", code="comm_lost",
                                       severity="alarm", state="raised", source="gateway",
                                       message="test"), "away/events")])
            waited = await sink.delivered(0.3)
        finally:
            sink.stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return nothing, waited

    assert asyncio.run(scenario()) == (False, False)


def test_stdout_status_counts_the_events_it_printed(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """With `--mqtt -` the status said events_published: 0 although events were printed."""
    from gateway.cli import main

    cfg = write_cfg(tmp_path / "gw.yaml", gid="out", url=None)
    assert main(["replay", str(REPO / "config" / "sample.log"), "-c", str(cfg),
                 "--mqtt", "-", "--speed", "max"]) == 0
    lines = [ln.split(" ", 1) for ln in capsys.readouterr().out.splitlines() if " " in ln]
    printed = sum(t.endswith("/events") for t, _ in lines)
    status = json.loads([p for t, p in lines if t == "bms/gateway/out/status"][-1])
    assert printed > 0 and status["events_published"] == printed
