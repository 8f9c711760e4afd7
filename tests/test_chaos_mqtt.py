"""Chaos on the MQTT side (issue 10, items 1, 2, 10, 12): a hostile client, a broker that
refuses, a task that dies, a replay that must leave no trace, an early SIGTERM.

Real parts only: mosquitto (with an ACL file where the broker must refuse), aiomqtt,
python-can's `virtual` bus, `python -m gateway` as a child process where the exit status
is the point. Failures are injected as real exceptions in the gateway's own code paths,
never by mocking aiomqtt. Every scenario is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import can
import pytest

from gateway.config import ConfigError, load_config
from gateway.model import FaultEvent
from gateway.publish.mqtt import MqttSink
from gateway.publish.outbox import Outbox
from gateway.runtime import daemon as daemon_mod
from gateway.runtime import runtime as runtime_mod
from gateway.runtime.daemon import Daemon
from gateway.runtime.replay import replay
from tests.conftest import REPO, Broker, Subscriber, serving, started
from tests.test_daemon import DB, pack_frame, write_cfg
from tests.test_events_e2e import write_config as events_config
from tests.test_events_e2e import write_log

ALARMS = DB.get_message_by_name("AlarmFlags")
STATUS_S = 0.3  # the status period in these tests (10 s in production)
OUTBOX: dict[str, Any] = {"max_events": 100_000, "max_age_s": 86400.0, "gateway_id": "ev-test"}


def alarm_frame(on: bool) -> can.Message:
    data = ALARMS.encode({"CellOverVoltage": int(on), "CellUnderVoltage": 0, "OverTemperature": 0,
                          "UnderTemperature": 0, "OverCurrentCharge": 0, "OverCurrentDischarge": 0,
                          "InsulationFault": 0, "InternalFault": 0})
    return can.Message(arbitration_id=ALARMS.frame_id, data=data, is_extended_id=False)


def events(sub: Any, topic: str = "bms/p1/events") -> list[dict[str, Any]]:
    return [json.loads(p) for p in sub.topic(topic)]


def statuses(sub: Any, gid: str) -> list[dict[str, Any]]:
    return [json.loads(p) for p in sub.topic(f"bms/gateway/{gid}/status")]


async def until(sub: Any, pred: Callable[[Any], bool], timeout: float = 15) -> bool:
    return bool(await asyncio.to_thread(sub.wait_for, pred, timeout))


async def toggle_alarm(tx: can.BusABC, times: int) -> None:
    """`times` raise/clear pairs of the BMS's cell over voltage flag: 2 * times events."""
    for i in range(times):
        for on in (True, False):
            tx.send(pack_frame(52.0, i))
            tx.send(alarm_frame(on))
            await asyncio.sleep(0.03)


@pytest.fixture
def fast_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_mod, "STATUS_PERIOD_S", STATUS_S)


# ---------------------------------------------------------------- 1. hostile inbound MQTT

HOSTILE = [
    b'{"v":1,"prefix":"x/#","nodes":{"n":["nokey"]}}',  # the one from the issue
    b'{"v":1,"prefix":"victim","nodes":{"bms_chaos_p1":["sensor/x"]}}',
    b'{"v":1,"prefix":"homeassistant","nodes":{"other_node":["sensor/x"]}}',
    b'{"v":1,"prefix":"homeassistant","nodes":{"bms_chaos_p1":["../../victim/x"]}}',
    b'{"v":1,"prefix":"homeassistant","nodes":{"bms_chaos_p1":"sensor/x"}}',
    b'{"v":1,"prefix":"homeassistant","nodes":[]}',
    b'{"v":2,"prefix":"homeassistant","nodes":{}}',
    b'{"v":true,"prefix":"homeassistant","nodes":{}}',
    b'{"v":1,"prefix":"homeassistant","nodes":{},"extra":1}',
    b"[" * 100_000,
    b"\xff\xfe not json",
    b"null",
]


def test_hostile_registry_leaves_gateway_publishing(tmp_path: Path, broker: Broker,
                                                    subscriber_factory: Any, fast_status: None,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    gid = "chaos"
    channel = f"chaos-{uuid.uuid4().hex[:8]}"
    cfg = write_cfg(tmp_path / "gw.yaml", gid=gid, url=broker.url,
                    can_cfg=f"{{interface: virtual, channel: {channel}}}",
                    extra="homeassistant: {discovery: true}\n")
    registry = f"bms/gateway/{gid}/discovery"
    # retained topics of other tools that a registry names: they must survive
    victims = {"victim/sensor/bms_chaos_p1/x/config": b"keep",
               "homeassistant/sensor/other_node/x/config": b"keep",
               "x/sensor/n/config": b"keep"}
    sub = subscriber_factory(broker.port, ["bms/#", "victim/#", "homeassistant/#", "x/#"])
    for t, p in victims.items():
        sub.client.publish(t, p, qos=1, retain=True).wait_for_publish(5)

    async def scenario() -> None:
        async with serving(cfg, channel) as (d, tx):
            assert await until(sub, lambda ms: any(t == registry and p for t, p, _ in ms))
            await toggle_alarm(tx, 2)
            assert await until(sub, lambda ms: len(events(sub)) >= 4)
            for payload in HOSTILE:
                sub.client.publish(registry, payload, qos=1, retain=True).wait_for_publish(5)
            disc = d.runtime.discovery
            assert disc is not None
            assert await until(sub, lambda ms: disc.rejected >= len(HOSTILE))
            seen = len(statuses(sub, gid))
            await toggle_alarm(tx, 3)  # the gateway still turns frames into events
            assert await until(sub, lambda ms: len(events(sub)) >= 10), len(events(sub))
            assert await until(sub, lambda ms: len(statuses(sub, gid)) >= seen + 3)
            assert d.runtime.sink.connected.is_set()
            assert "mqtt" in d.alive

    with caplog.at_level(logging.WARNING, logger="gateway"):
        asyncio.run(scenario())
    st = statuses(sub, gid)
    ups = [s["uptime_s"] for s in st]
    assert ups == sorted(ups) and ups[-1] > ups[0]  # the status never froze
    assert st[-1]["inbound_rejected"] >= len(HOSTILE)
    ev = events(sub)
    seqs = [e["seq"] for e in ev]
    assert seqs == list(range(1, 11)), seqs  # 10 events, none lost, none twice
    late = subscriber_factory(broker.port, ["victim/#", "homeassistant/sensor/other_node/#",
                                            "x/#", registry], client_id="late")
    assert late.wait_for(lambda ms: len({t for t, _, r in ms if r}) >= 4, 10)
    for t, p in victims.items():
        assert late.topic(t) == [p], t
    # the gateway put its own registry back over the hostile one
    assert json.loads(late.topic(registry)[-1])["prefix"] == "homeassistant"
    warned = [r for r in caplog.records if "ignoring discovery registry" in r.getMessage()]
    assert len(warned) == 1, "a hostile registry is logged once, not once per message"
    print(f"\nhostile registry: {len(HOSTILE)} messages rejected, {len(ev)} events, 0 lost, "
          f"0 duplicates, {len(st)} status messages, uptime {ups[0]} -> {ups[-1]} s")


@pytest.mark.parametrize("payload", HOSTILE)
def test_registry_schema_rejects_and_clears_nothing(tmp_path: Path, payload: bytes) -> None:
    cfg = load_config(write_cfg(tmp_path / "gw.yaml", gid="chaos", url="mqtt://127.0.0.1:1",
                                extra="homeassistant: {discovery: true}\n"))
    d = Daemon(cfg)
    try:
        disc = d.runtime.discovery
        assert disc is not None
        out = disc.on_registry(payload)
        assert [p.topic for p in out] == ["bms/gateway/chaos/discovery"]  # ours, put back
        assert not [p for p in out if p.payload == b""], "nothing is cleared"
        assert disc.rejected == 1
    finally:
        d.runtime.close()


def test_handler_error_is_counted_in_status_and_the_sink_lives(
        tmp_path: Path, broker: Broker, subscriber_factory: Any, fast_status: None) -> None:
    gid = "hdl"
    cfg = write_cfg(tmp_path / "gw.yaml", gid=gid, url=broker.url)
    sub = subscriber_factory(broker.port, ["bms/gateway/#"])

    def fragile(payload: bytes) -> list[Any]:
        return [json.loads(payload)["needs"]]  # KeyError / ValueError on bad input

    async def scenario() -> None:
        d = Daemon(load_config(cfg))
        d.runtime.subscriptions["bms/test/in"] = fragile  # the same dict the sink subscribes
        async with serving(d):
            assert isinstance(d.runtime.sink, MqttSink)
            await asyncio.wait_for(d.runtime.sink.connected.wait(), 10)
            for bad in (b"{}", b"junk", b"[1]"):
                sub.client.publish("bms/test/in", bad, qos=1).wait_for_publish(5)
            assert await until(sub, lambda ms: any(
                s["inbound_errors"] == 3 for s in statuses(sub, gid)))
            n = len(statuses(sub, gid))
            assert await until(sub, lambda ms: len(statuses(sub, gid)) >= n + 2)
            assert d.runtime.status_body()["task_deaths"] == 0

    asyncio.run(scenario())
    last = statuses(sub, gid)[-1]
    assert "inbound bms/test/in" in last["last_error"]


# ---------------------------------------------------------------- 2. delivered = accepted

DENY_EVENTS = "topic readwrite bms/#\ntopic deny bms/+/events\n"
ALLOW_ALL = "topic readwrite bms/#\n"


def test_refused_events_stay_until_the_broker_allows_them(
        tmp_path: Path, subscriber_factory: Any, fast_status: None) -> None:
    from tests.conftest import free_port

    acl = tmp_path / "acl"
    acl.write_text(DENY_EVENTS)
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = Broker(workdir, free_port(), extra_conf=f"acl_file {acl}\n")
    broker.start()
    gid = "acl"
    channel = f"acl-{uuid.uuid4().hex[:8]}"
    cfg = write_cfg(tmp_path / "gw.yaml", gid=gid, url=broker.url,
                    can_cfg=f"{{interface: virtual, channel: {channel}}}")
    pairs = 25
    # a persistent QoS 1 session: it gets the events published while it is reconnecting
    sub = subscriber_factory(broker.port, ["bms/#"], client_id="acl-sub", clean=False)
    sub.client.reconnect_delay_set(0.1, 1)
    refused_status: dict[str, Any] = {}

    async def scenario() -> None:
        async with serving(cfg, channel) as (d, tx):
            await toggle_alarm(tx, pairs)
            # refused, kept, and retried with backoff (three tries at least)
            assert await until(sub, lambda ms: any(
                s["faults"] and s["outbox_depth"] == 2 * pairs and s["mqtt_refused"] >= 3
                for s in statuses(sub, gid)))
            refused_status.update(next(s for s in statuses(sub, gid)
                                       if s["faults"] and s["mqtt_refused"] >= 3))
            assert d.runtime.outbox.depth() == 2 * pairs
            assert events(sub) == []
            assert "broker refuses: bms/p1/events" in d._status_line()  # systemctl status
            broker.stop()
            acl.write_text(ALLOW_ALL)
            broker.start()
            assert await until(sub, lambda ms: len(events(sub)) >= 2 * pairs, 30)
            assert await until(sub, lambda ms: any(
                s["outbox_depth"] == 0 and not s["faults"] for s in statuses(sub, gid)))

    try:
        asyncio.run(scenario())
    finally:
        broker.stop()
    fault = refused_status["faults"][0]
    assert fault["code"] == "mqtt_refused" and fault["topic"] == "bms/p1/events"
    assert fault["reason_code"] == 0x87, fault  # mosquitto 2.0, MQTT 5: not authorized
    assert refused_status["events_published"] == 0
    ev = events(sub)
    seqs = [e["seq"] for e in ev]
    lost = set(range(1, 2 * pairs + 1)) - set(seqs)
    dups = len(seqs) - len(set(seqs))
    assert (sorted(seqs), lost, dups) == (list(range(1, 2 * pairs + 1)), set(), 0)
    assert seqs == sorted(seqs), "delivered in seq order"
    print(f"\nrefused events: {2 * pairs} events, refused {refused_status['mqtt_refused']} "
          f"times (reason 0x87) before the ACL allowed them; delivered {len(ev)}, lost "
          f"{len(lost)}, duplicates {dups}")


def test_mqtt_311_cannot_tell_a_refusal(tmp_path: Path, subscriber_factory: Any) -> None:
    """What the docs say: with MQTT 3.1.1, mosquitto acks an ACL-denied publish."""
    import paho.mqtt.client as mqtt

    from tests.conftest import free_port

    acl = tmp_path / "acl"
    acl.write_text(DENY_EVENTS)
    (tmp_path / "b").mkdir()
    broker = Broker(tmp_path / "b", free_port(), extra_conf=f"acl_file {acl}\n")
    broker.start()
    codes: dict[int, list[int]] = {}
    try:
        for proto in (mqtt.MQTTv5, mqtt.MQTTv311):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=proto)
            got: list[int] = []
            c.on_publish = lambda cl, u, mid, rc, p, got=got: got.append(int(rc.value))
            c.connect("127.0.0.1", broker.port)
            c.loop_start()
            try:
                c.publish("bms/p1/events", b"x", qos=1).wait_for_publish(5)
                c.publish("bms/p1/state", b"x", qos=1).wait_for_publish(5)
            finally:
                c.disconnect()
                c.loop_stop()
            codes[proto] = got
    finally:
        broker.stop()
    assert codes[mqtt.MQTTv5] == [0x87, 0x10]  # not authorized; no matching subscribers
    assert codes[mqtt.MQTTv311] == [0, 0]  # a PUBACK without a reason: looks delivered


# ---------------------------------------------------------------- 3. supervision


def test_dead_task_is_restarted_then_ends_the_process_nonzero(
        tmp_path: Path, broker: Broker, subscriber_factory: Any, fast_status: None,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    gid = "sup"
    cfg = write_cfg(tmp_path / "gw.yaml", gid=gid, url=broker.url)
    sub = subscriber_factory(broker.port, ["bms/gateway/#"])
    monkeypatch.setattr(daemon_mod, "backoff", lambda attempt: 0.05 * attempt)
    failures = {"left": 2}

    async def scenario() -> int:
        d = Daemon(load_config(cfg))
        real_tick = d.pipeline.tick

        def tick(now: float) -> None:
            # a real exception in the ticker's path, as a bug or bad state would raise
            if failures["left"] > 0:
                failures["left"] -= 1
                msg = "injected: pipeline state broken"
                raise RuntimeError(msg)
            real_tick(now)

        d.pipeline.tick = tick  # type: ignore[method-assign]
        task = asyncio.create_task(d.serve())
        await started(d)
        # first: two deaths, restarted with backoff, the gateway goes on
        assert await until(sub, lambda ms: any(
            s["task_deaths"] == 2 for s in statuses(sub, gid)))
        n = len(statuses(sub, gid))
        assert await until(sub, lambda ms: len(statuses(sub, gid)) >= n + 2)
        assert not task.done()
        # then: it keeps dying, and the daemon ends non-zero for systemd to restart it
        failures["left"] = 10**6
        return int(await asyncio.wait_for(task, 30))

    with caplog.at_level(logging.ERROR, logger="gateway"):
        code = asyncio.run(scenario())
    assert code == 1
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("task ticker died (1 in a row)") for m in msgs)
    assert any("stopping with exit status 1" in m for m in msgs)
    st = statuses(sub, gid)
    assert st[-1]["task_deaths"] == daemon_mod.MAX_DEATHS  # 2, then 3 more in a row
    assert "task ticker died" in st[-1]["last_error"]
    avail = sub.topic(f"bms/gateway/{gid}/availability")
    assert avail[-1] == b"offline"


def test_watchdog_not_fed_while_the_sink_is_dead(tmp_path: Path, broker: Broker,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  fast_status: None) -> None:
    from tests.test_daemon import NotifySocket

    ns = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", ns.path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    monkeypatch.setattr(daemon_mod, "backoff", lambda attempt: 3.0)
    cfg = write_cfg(tmp_path / "gw.yaml", gid="wd", url=broker.url)
    pings: dict[str, int] = {}
    avail = "bms/gateway/wd/availability"

    async def scenario() -> None:
        d = Daemon(load_config(cfg))
        task = asyncio.create_task(d.serve())
        sub = Subscriber(broker.port, [avail])
        try:
            await started(d)
            assert await until(sub, lambda ms: sub.topic(avail)[-1:] == [b"online"])
            await asyncio.to_thread(ns.pump, lambda: ns.has("WATCHDOG=1"), 10)
            sink = d.runtime.sink
            assert isinstance(sink, MqttSink)

            # a real failure inside the sink's sender: reading the outbox raises
            class Broken:
                def pending(self, limit: int) -> list[tuple[int, str, bytes]]:
                    msg = "injected: outbox read failed"
                    raise RuntimeError(msg)

                def ack(self, seq: int) -> None:
                    pass

            sink.outbox = Broken()
            sink.flush()  # "new events": the sender reads the outbox, and dies
            assert await asyncio.to_thread(ns.pump, lambda: "mqtt" not in d.alive, 15)
            # it left with its last will: nobody is told that it is still online
            assert await until(sub, lambda ms: sub.topic(avail)[-1:] == [b"offline"], 5), \
                sub.messages
            start = len(ns.got)
            await asyncio.to_thread(ns.pump, None, 1.5)  # the sink is backing off (3 s)
            pings["while_dead"] = sum(1 for _, m in ns.got[start:] if "WATCHDOG=1" in m)
            pings["deaths"] = d.runtime.task_deaths
        finally:
            sub.close()
            d._on_term()
            await asyncio.wait_for(task, 15)

    try:
        asyncio.run(scenario())
    finally:
        ns.close()
    assert pings["deaths"] >= 1
    assert pings["while_dead"] == 0, "watchdog fed while the sink was dead"


# ---------------------------------------------------------------- 4. replay hygiene


def test_replay_ends_offline_with_truthful_status_and_its_own_outbox(
        tmp_path: Path, broker: Broker, subscriber_factory: Any) -> None:
    log = tmp_path / "faults.log"
    write_log(log, 16.0)  # 4 events
    cfg_path = events_config(tmp_path, broker.url)
    # the live daemon's outbox (same state_dir), holding one undelivered event
    live = tmp_path / "state" / "outbox.sqlite"
    live.parent.mkdir(mode=0o700)
    with Outbox.open(live, **OUTBOX) as ob:
        ev = FaultEvent(ts=1.0, pack_id="p", code="comm_lost", severity="critical",
                        state="raised", source="gateway", message="live daemon's event")
        ob.append([(ev, "bms/p/events")])
    sub = subscriber_factory(broker.port, ["bms/#"])
    rt = asyncio.run(replay(load_config(cfg_path), log, speed=None))
    assert rt.undelivered == 0
    gw = "bms/gateway/ev-test"
    assert sub.wait_for(lambda ms: any(t == f"{gw}/status" for t, _, _ in ms), 10)
    time.sleep(0.3)
    ev_msgs = events(sub, "bms/p/events")
    assert len(ev_msgs) == 4 and "live daemon's event" not in str(ev_msgs)
    status = json.loads(sub.topic(f"{gw}/status")[-1])
    assert status["outbox_depth"] == 0
    assert status["mqtt_connected"] is True
    assert status["events_published"] == 4
    assert status["published"] > 0
    assert sub.topic(f"{gw}/availability")[-1] == b"offline"
    with Outbox.open(live, **OUTBOX) as ob:
        assert ob.depth() == 1, "a replay must not touch the live daemon's outbox"
    late = subscriber_factory(broker.port, [f"{gw}/availability"], client_id="late-rp")
    assert late.wait_for(lambda ms: ms, 10)
    assert late.topic(f"{gw}/availability") == [b"offline"]


def test_replay_to_unreachable_broker_says_how_many_were_not_delivered(tmp_path: Path) -> None:
    from tests.conftest import free_port

    log = tmp_path / "faults.log"
    write_log(log, 16.0)
    cfg = events_config(tmp_path, f"mqtt://127.0.0.1:{free_port()}")
    r = subprocess.run([sys.executable, "-c",
                        "import sys; from gateway.runtime.replay import replay; "
                        "from gateway.config import load_config; import asyncio; "
                        f"rt = asyncio.run(replay(load_config({str(cfg)!r}), {str(log)!r}, "
                        "speed=None, deliver_timeout=1)); print(rt.undelivered)"],
                       capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "4"
    assert not (tmp_path / "state" / "outbox.sqlite").exists()


# ---------------------------------------------------------------- 5. signals and config


def _catches_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_sigterm_while_starting_exits_0(tmp_path: Path, broker: Broker) -> None:
    cfg = write_cfg(tmp_path / "gw.yaml", gid="early", url=broker.url)
    log = tmp_path / "early.log"
    with log.open("wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while not _catches_sigterm(proc.pid):
                assert proc.poll() is None and time.monotonic() - t0 < 10
                time.sleep(0.001)
            caught_after = time.monotonic() - t0
            proc.send_signal(signal.SIGTERM)  # the CLI is still importing
            assert proc.wait(15) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    text = log.read_text()
    assert "SIGTERM while starting: stopping" in text or "SIGTERM: stopping" in text, text
    assert "running" not in text  # it never went on to serve
    print(f"\nSIGTERM handler installed {caught_after * 1000:.0f} ms after spawn")


@pytest.mark.parametrize(("yaml_line", "key"), [
    ("homeassistant: {discovery: true, prefix: 'ha/#'}", "homeassistant.prefix"),
    ("homeassistant: {prefix: '$SYS'}", "homeassistant.prefix"),
    ("homeassistant: {prefix: 'ha/+/x'}", "homeassistant.prefix"),
])
def test_check_config_rejects_ha_prefix(tmp_path: Path, yaml_line: str, key: str) -> None:
    cfg = write_cfg(tmp_path / "gw.yaml", gid="cc", url="mqtt://127.0.0.1:1",
                    extra=yaml_line + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert [p.key for p in e.value.problems] == [key]
    assert e.value.problems[0].fix and str(cfg) in str(e.value.problems[0])


@pytest.mark.parametrize(("mqtt_extra", "key"), [
    (", keepalive: 1000000000000", "mqtt.keepalive"),
    (", keepalive: 65536", "mqtt.keepalive"),
    (", keepalive: 2", "mqtt.keepalive"),
])
def test_check_config_rejects_mqtt_values(tmp_path: Path, mqtt_extra: str, key: str) -> None:
    cfg = write_cfg(tmp_path / "gw.yaml", gid="cc", url="mqtt://127.0.0.1:1",
                    mqtt_extra=mqtt_extra)
    r = subprocess.run([sys.executable, "-m", "gateway", "check-config", "-c", str(cfg)],
                       capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert r.returncode == 3
    assert f"{cfg}: {key}:" in r.stderr and "Fix:" in r.stderr, r.stderr


@pytest.mark.parametrize("prefix", ["'$SYS'", "'$share/x'", "'bms/#'", "'a/+/b'"])
def test_check_config_rejects_topic_prefix(tmp_path: Path, prefix: str) -> None:
    cfg = tmp_path / "gw.yaml"
    write_cfg(cfg, gid="cc", url="mqtt://127.0.0.1:1")
    cfg.write_text(cfg.read_text().replace("topic_prefix: bms", f"topic_prefix: {prefix}"))
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert {p.key for p in e.value.problems} == {"mqtt.topic_prefix"}


# ---------------------------------------------------------------- 6. the dashboard's inbound

WATCH_HOSTILE = [
    ("bms/p/state", b"[" * 100_000),  # RecursionError in json
    ("bms/p/state", b'{"voltage_v":"x","soc_pct":[1],"current_a":{"a":1},"cell_count":"many"}'),
    ("bms/p/cells", b'{"voltages_v":"abc","temps_c":[null,"x",1e308],"balancing":5}'),
    ("bms/p/cells", b'{"voltages_v":[1e308,-1e308,null,"3.3",true]}'),  # inf spread, once NaN
    ("bms/p/faults", b'[1,"x",{"code":5,"severity":[],"since":3,"message":"[/v]"}]'),
    ("bms/p/faults", b'{"not":"a list"}'),
    ("bms/p/availability", b"\xff" * 10_000),
    ("bms/q/state", b'{"voltage_v":NaN,"soc_pct":Infinity,"cell_v_delta":-Infinity}'),
    ("bms/q/state", b'{"voltage_v":1e300,"soc_pct":-1e300,"temp_max_c":1e300}'),
]


def test_watch_dashboard_survives_hostile_payloads() -> None:
    pytest.importorskip("rich")
    from gateway.commands.watch import MAX_PACKS, WatchStore, render_text

    store = WatchStore("bms")
    for topic, payload in WATCH_HOSTILE:
        store.apply(topic, payload)
        render_text(store.view(time.time()))  # the view a broken payload used to crash
    assert store.bad == 3  # deep nesting, a faults object, NaN/Infinity
    for i in range(MAX_PACKS + 50):  # a flood of invented packs stays bounded
        store.apply(f"bms/flood{i}/availability", b"online")
    assert len(store.data) == MAX_PACKS
    assert store.bad == 3 + 52  # p and q took two of the places


def test_replay_whose_sink_dies_ends_nonzero_at_once(
        tmp_path: Path, broker: Broker, subscriber_factory: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "faults.log"
    write_log(log, 16.0)
    cfg_path = events_config(tmp_path, broker.url)
    sub = subscriber_factory(broker.port, ["bms/gateway/#"])

    def broken(self: Any) -> list[Any]:
        msg = "injected: on-connect failed"
        raise RuntimeError(msg)

    monkeypatch.setattr(runtime_mod.Runtime, "_on_connect", broken)
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="gateway"):
        rt = asyncio.run(replay(load_config(cfg_path), log, speed=None, deliver_timeout=20))
    assert time.monotonic() - t0 < 10, "the replay waited for a sink that was dead"
    assert "injected: on-connect failed" in rt.sink_error
    assert any("the MQTT sink died" in r.getMessage() for r in caplog.records)
    # it left with its last will (MQTT 5): the replay's gateway is not 'online'
    assert sub.wait_for(lambda ms: any(
        t == "bms/gateway/ev-test/availability" and p == b"offline" for t, p, _ in ms), 5)
