"""A review of issue 10's landed work, each finding reproduced (real mosquitto where MQTT
is involved): Home Assistant node ids shared by two gateways, a hostile registry growing
our own, ids HA ignores, and values check-config accepted that the daemon then failed on
(a state_dir that is a file, a 300-character host name, `replay --outbox /tmp`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import cli
from gateway.config import MAX_CELLS, load_config
from gateway.publish.homeassistant import node_body
from gateway.runtime.daemon import Daemon
from gateway.runtime.replay import replay
from tests.conftest import REPO, Broker
from tests.test_chaos_config import check, write
from tests.test_daemon import write_cfg
from tests.test_homeassistant import retained, write_log

HA = "homeassistant"
SAMPLE_LOG = REPO / "config" / "sample.log"


def discovery_cfg(tmp: Path, gid: str, url: str, packs: list[str], extra: str = "") -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    return write_cfg(tmp / "gw.yaml", gid=gid, url=url, packs=packs,
                     extra=f"homeassistant: {{discovery: true, prefix: {HA}}}\n{extra}")


def configs(msgs: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    return {t: json.loads(p) for t, p in msgs.items() if t.startswith(f"{HA}/")}


# ---------------------------------------------------------------- 1. shared node ids


def test_two_gateways_never_clear_each_others_entities(
        tmp_path: Path, broker: Broker, subscriber_factory: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """gw + pack b_house and gw_b + pack house were both `bms_gw_b_house`: removing the
    pack from gw (or a registry naming that node) cleared gw_b's entities."""
    log = write_log(tmp_path / "a.log")

    def run(name: str, gid: str, packs: list[str]) -> None:
        cfg = load_config(discovery_cfg(tmp_path / name, gid, broker.url, packs))
        asyncio.run(replay(cfg, log, speed=None))

    run("b1", "gw_b", ["house"])
    run("a1", "gw", ["b_house"])
    both = configs(retained(broker.port, subscriber_factory, [f"{HA}/#"]))
    gw_b = {t: c for t, c in both.items() if "/bms_gw__b_house/" in t}
    gw = {t: c for t, c in both.items() if "/bms_gw_b_house/" in t}
    assert gw_b and gw and len(gw_b) + len(gw) <= len(both)
    # unique ids and device identifiers are disjoint too (HA would merge or drop them)
    assert not {c["unique_id"] for c in gw_b.values()} & {c["unique_id"] for c in gw.values()}
    assert not ({i for c in gw_b.values() for i in c["device"]["identifiers"]}
                & {i for c in gw.values() for i in c["device"]["identifiers"]})
    # gw: unchanged ids for a gateway id without '_' (every host name)
    assert gw[f"{HA}/sensor/bms_gw_b_house/voltage_v/config"]["unique_id"] == \
        "bms_gw_b_house_voltage_v"

    # gw loses its pack b_house: its own entities go, gw_b's all stay
    run("a2", "gw", ["house"])
    after = configs(retained(broker.port, subscriber_factory, [f"{HA}/#"]))
    assert not [t for t in after if "/bms_gw_b_house/" in t]
    assert set(gw_b) <= set(after)

    # a hostile registry on gw's topic naming gw_b's node clears nothing of gw_b's
    sub = subscriber_factory(broker.port, ["bms/gateway/gw/discovery"])
    hostile = {"v": 1, "prefix": HA, "nodes": {"bms_gw__b_house": ["sensor/voltage_v"]}}
    sub.client.publish("bms/gateway/gw/discovery", json.dumps(hostile).encode(), qos=1,
                       retain=True).wait_for_publish(5)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway"):
        run("a3", "gw", ["house"])
    after = configs(retained(broker.port, subscriber_factory, [f"{HA}/#"]))
    assert set(gw_b) <= set(after)
    assert any("ignoring discovery registry" in r.getMessage() and "bms_gw__b_house" in
               r.getMessage() for r in caplog.records)
    assert not any("no longer configured" in r.getMessage() for r in caplog.records)


IDS = st.from_regex(r"[A-Za-z0-9-][A-Za-z0-9_-]{0,8}", fullmatch=True)


@settings(max_examples=3000, deadline=None)
@given(IDS, IDS, IDS, IDS)
def test_node_ids_are_one_to_one(g1: str, p1: str, g2: str, p2: str) -> None:
    if (g1, p1) != (g2, p2):
        assert node_body(g1, p1) != node_body(g2, p2)
    # a gateway's device id is never a pack's device id of another gateway
    assert f"bms_gateway_{g1.replace('_', '__')}" != f"bms_gateway_{node_body(g2, p2)}"


# ---------------------------------------------------------------- 2. registry growth


def test_hostile_registry_cannot_grow_our_own(
        tmp_path: Path, broker: Broker, subscriber_factory: Any) -> None:
    """19,999 `sensor/cell_N` keys for our own node were all adopted: the registry grew
    past mqtt.max_payload and was never published again."""
    cfg_path = discovery_cfg(tmp_path, "t1", broker.url, ["house", "shed"])
    cfg_path.write_text(cfg_path.read_text().replace(
        "{id: shed, profile: example-bms}", "{id: shed, profile: example-bms, cell_count: 4}"))
    reg_topic = "bms/gateway/t1/discovery"
    keys = [f"sensor/cell_{n:02d}" for n in range(1, 10_000)]
    keys += [f"sensor/temp_{n}" for n in range(1, 9_990)]  # 1..9 are not ours (no padding)
    hostile = {"v": 1, "prefix": HA, "nodes": {"bms_t1_house": keys, "bms_t1_shed": keys[:9]}}
    sub = subscriber_factory(broker.port, [reg_topic])
    sub.client.publish(reg_topic, json.dumps(hostile).encode(), qos=1,
                       retain=True).wait_for_publish(5)
    cfg = load_config(cfg_path)
    asyncio.run(replay(cfg, write_log(tmp_path / "a.log", cells=False), speed=None,
                       deliver_timeout=60))
    reg = retained(broker.port, subscriber_factory, [reg_topic])[reg_topic]
    assert len(reg) <= cfg.mqtt.max_payload  # it was published: ours, bounded
    nodes = json.loads(reg)["nodes"]
    house = {k for k in nodes["bms_t1_house"] if re.fullmatch(r"sensor/cell_\d+", k)}
    assert house == {f"sensor/cell_{n:02d}" for n in range(1, MAX_CELLS + 1)}
    shed = {k for k in nodes["bms_t1_shed"] if re.fullmatch(r"sensor/cell_\d+", k)}
    assert shed == {f"sensor/cell_{n:02d}" for n in range(1, 5)}  # its cell_count
    temps = {k for k in nodes["bms_t1_house"] if re.fullmatch(r"sensor/temp_\d+", k)}
    assert temps == {f"sensor/temp_{n}" for n in range(10, MAX_CELLS + 1)}


# ---------------------------------------------------------------- 3-5. check-config


REJECTED = {
    "pack id with a dot": ({"pack": "{id: house.1, profile: example-bms}"}, "packs[0].id",
                           "'.'"),
    "pack id with an accent": ({"pack": "{id: hausé, profile: example-bms}"}, "packs[0].id",
                               "'é'"),
    "pack id with a colon": ({"pack": "{id: 'a:b', profile: example-bms}"}, "packs[0].id",
                             "':'"),
    "pack id starting with _": ({"pack": "{id: _house, profile: example-bms}"}, "packs[0].id",
                                "starts with '_'"),
    "gateway id with a dot": ({"gateway_id": "gw.1"}, "gateway_id", "'.'"),
    "gateway id with an accent": ({"gateway_id": "gwé"}, "gateway_id", "'é'"),
    "state_dir /dev/null": ({"extra": "state_dir: /dev/null"}, "state_dir",
                            "not a directory"),
    "state_dir /etc/passwd": ({"extra": "state_dir: /etc/passwd"}, "state_dir",
                              "not a directory"),
    "state_dir under a file": ({"extra": "state_dir: /etc/passwd/state"}, "state_dir",
                               "cannot be created"),
    "host name of 300 characters": ({"extra": f"mqtt: {{url: 'mqtt://{'a' * 300}:1883'}}"},
                                    "mqtt.url", "more than 253"),
    "host label of 64 characters": ({"extra": f"mqtt: {{url: 'mqtt://{'a' * 64}.lan'}}"},
                                    "mqtt.url", "more than 63"),
    "host name with an empty label": ({"extra": "mqtt: {url: 'mqtt://broker..lan'}"},
                                      "mqtt.url", "empty label"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_check_config_rejects_what_the_review_found(
        case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kw, key, text = REJECTED[case]
    cfg = write(tmp_path, **kw)
    code, out = check(cfg, capsys)
    assert code == cli.EXIT_CONFIG, out
    line = next((ln for ln in out.splitlines() if f"{cfg}: {key}:" in ln), None)
    assert line is not None, out
    assert text in line and "Fix:" in line, line
    assert "Traceback" not in out


@pytest.mark.parametrize("kw", [
    {"pack": "{id: b_house, profile: example-bms}", "gateway_id": "gw_b-1"},
    {"extra": f"mqtt: {{url: 'mqtt://{'a' * 63}.lan:1883'}}"},
    {"extra": "mqtt: {url: 'mqtt://bücher.example:1883'}"},  # IDNA
    {"extra": "mqtt: {url: 'mqtt://[::1]:1883'}"},
])
def test_check_config_accepts_the_valid_neighbours(
        kw: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(write(tmp_path, **kw), capsys)
    assert code == cli.EXIT_OK, out


def test_unusable_broker_address_is_a_config_error_not_a_crash_loop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Had a bad host name got past check-config, the MQTT task died of UnicodeError five
    times with a traceback and the process exited 1 (systemd restarts it for ever)."""
    cfg = load_config(write(tmp_path, extra=f"state_dir: {tmp_path / 'state'}\n"
                                            "mqtt: {url: 'mqtt://127.0.0.1:1'}"))
    bad = dataclasses.replace(cfg, mqtt=dataclasses.replace(
        cfg.mqtt, url=f"mqtt://{'a' * 300}:1883"))

    async def scenario() -> int:
        d = Daemon(bad)
        return int(await asyncio.wait_for(d.serve(), 30))

    with caplog.at_level(logging.WARNING, logger="gateway"):
        code = asyncio.run(scenario())
    assert code == cli.EXIT_CONFIG
    crit = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(crit) == 1, [r.getMessage() for r in crit]
    assert f"{tmp_path / 'gw.yaml'}: mqtt.url:" in crit[0].getMessage()
    assert "Fix:" in crit[0].getMessage() and crit[0].exc_info is None
    assert not [r for r in caplog.records if "died" in r.getMessage()]


# ---------------------------------------------------------------- 6. replay --outbox


@pytest.mark.parametrize("outbox", ["/tmp", "/dev/null", "/proc/version"])
def test_replay_with_an_unusable_outbox_says_so_in_one_line(tmp_path: Path,
                                                            outbox: str) -> None:
    if not Path(outbox).exists():
        pytest.skip(f"{outbox} does not exist here")
    cfg = write(tmp_path)
    mode = Path(outbox).stat().st_mode
    r = subprocess.run([sys.executable, "-m", "gateway", "replay", "-c", str(cfg), "--mqtt",
                        "-", "--outbox", outbox, str(SAMPLE_LOG)], capture_output=True,
                       text=True, timeout=60, cwd=REPO, check=False)
    # refused as it is: a /proc file says 0 bytes, and root may chmod it
    assert Path(outbox).stat().st_mode == mode
    assert r.returncode == cli.EXIT_CONFIG, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: --outbox:"), r.stderr
    assert outbox in errors[0] and "Traceback" not in r.stderr

