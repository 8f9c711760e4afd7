"""Home Assistant MQTT discovery (issue 7) against a real mosquitto.

Frames are encoded here with cantools from dbc/example-bms.dbc; templates are rendered
with jinja2, as Home Assistant would (HA adds filters, but these templates use only
Jinja built-ins).
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import cantools
import jinja2
import pytest

from gateway.config import load_config
from gateway.publish.homeassistant import Discovery
from gateway.runtime.daemon import Daemon
from gateway.runtime.pipeline import Pipeline
from gateway.runtime.replay import replay
from tests.conftest import REPO, Broker

T0 = 1_700_000_000.0
HA = "homeassistant"
CELLS_MV = [3301, 3302, 3303, 3304, 3305, 3306, 3307, 3350]  # 8 cells, two mux groups


def render(template: str, payload: bytes) -> str:
    env = jinja2.Environment(autoescape=False)
    return env.from_string(template).render(value_json=json.loads(payload)).strip()


def write_log(path: Path, *, seconds: float = 3.0, cells: bool = True,
              alarm: bool = True) -> Path:
    db = cantools.database.load_file(str(REPO / "dbc" / "example-bms.dbc"))
    lines: list[str] = []

    def add(ts: float, name: str, data: dict[str, Any]) -> None:
        msg = db.get_message_by_name(name)
        lines.append(f"({ts:.6f}) can0 {msg.frame_id:03X}#{msg.encode(data).hex().upper()}")

    flags = ("CellOverVoltage", "CellUnderVoltage", "OverTemperature", "UnderTemperature",
             "OverCurrentCharge", "OverCurrentDischarge", "InsulationFault", "InternalFault")
    for k in range(int(seconds * 10)):
        ts = T0 + k * 0.1
        add(ts, "PackStatus", {"PackVoltage": 52.3, "PackCurrent": -12.5, "StateOfCharge": 80,
                               "StateOfHealth": 99, "State": 3, "AliveCounter": k % 256})
        add(ts, "AlarmFlags", {f: int(alarm and f == "CellOverVoltage" and k >= 10)
                               for f in flags})
        if k % 5 == 0:
            add(ts, "PackLimits", {"ChargeCurrentLimit": 50, "DischargeCurrentLimit": 100,
                                   "ChargeVoltageLimit": 56.0, "DischargeVoltageLimit": 44.0})
            add(ts, "TemperatureSummary", {"MinTemperature": 21, "MaxTemperature": 24,
                                           "AvgTemperature": 22, "MinTemperatureSensor": 1,
                                           "MaxTemperatureSensor": 2, "SensorCount": 2})
            if cells:
                for g in range(2):
                    add(ts, "CellVoltages", {"CellGroup": g, **{
                        f"CellVoltage{g * 4 + s:03d}": CELLS_MV[g * 4 + s] for s in range(4)}})
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(tmp: Path, url: str, packs: list[str], *, extra: str = "",
                 discovery: bool = True, name: str = "gw.yaml") -> Path:
    specs = {"house": "{id: house, profile: example-bms}",
             "shed": "{id: shed, profile: example-bms, cell_count: 4, id_offset: 256}"}
    cfg = tmp / name
    cfg.write_text(textwrap.dedent(f"""\
        gateway_id: t1
        state_dir: {tmp / 'state'}
        can: {{interface: virtual, channel: ha-{tmp.name}}}
        packs: [{', '.join(specs[p] for p in packs)}]
        mqtt: {{url: '{url}', topic_prefix: bms}}
        homeassistant: {{discovery: {str(discovery).lower()}, prefix: {HA}}}
        """) + extra)
    return cfg


def retained(port: int, subscriber_factory: Any, topics: list[str]) -> dict[str, bytes]:
    """What a client connecting now (like Home Assistant) gets: the retained messages."""
    sub = subscriber_factory(port, topics)
    last = -1
    while last != len(sub.messages):  # until a quiet 0.3 s
        last = len(sub.messages)
        time.sleep(0.3)
    return {t: p for t, p, r in sub.messages if r and p}


def cfg_topic(component: str, pack: str, obj: str) -> str:
    return f"{HA}/{component}/bms_t1_{pack}/{obj}/config"


# ----------------------------------------------------------------- broker tests


def test_discovery_configs_field_by_field(tmp_path: Path, broker: Broker,
                                          subscriber_factory: Any) -> None:
    cfg = load_config(write_config(tmp_path, broker.url, ["house", "shed"]))
    asyncio.run(replay(cfg, write_log(tmp_path / "a.log"), speed=None))
    got = retained(broker.port, subscriber_factory, [f"{HA}/#", "bms/#"])
    state = got["bms/house/state"]

    v = json.loads(got[cfg_topic("sensor", "house", "voltage_v")])
    assert v["device_class"] == "voltage" and v["state_class"] == "measurement"
    assert v["unit_of_measurement"] == "V" and v["suggested_display_precision"] == 2
    assert v["state_topic"] == "bms/house/state"
    assert v["unique_id"] == "bms_t1_house_voltage_v"
    assert v["default_entity_id"] == "sensor.bms_house_voltage_v"
    assert render(v["value_template"], state) == "52.3"
    # null and missing render None (HA: unknown), never 0 or "" (which keeps a stale value)
    assert render(v["value_template"], b'{"voltage_v": null}') == "None"
    assert render(v["value_template"], b"{}") == "None"
    assert v["availability"] == [{"topic": "bms/gateway/t1/availability"},
                                 {"topic": "bms/house/availability"}]
    assert v["availability_mode"] == "all"
    dev = v["device"]
    assert dev["identifiers"] == ["bms_gateway_t1_house"]
    assert dev["model"] == "example-bms" and dev["manufacturer"] == "bms-gateway"
    assert dev["via_device"] == "bms_gateway_t1"

    expect = {  # field: (device_class, unit, precision, rendered)
        "current_a": ("current", "A", 1, "-12.5"),
        "power_w": ("power", "W", 0, str(json.loads(state)["power_w"])),
        "soc_pct": ("battery", "%", 1, "80"),
        "temp_min_c": ("temperature", "°C", 1, "21"),
        "temp_max_c": ("temperature", "°C", 1, "24"),
        "cell_v_min": ("voltage", "V", 3, "3.301"),
        "cell_v_max": ("voltage", "V", 3, "3.35"),
        "cell_v_delta": ("voltage", "V", 3, str(json.loads(state)["cell_v_delta"])),
        "charge_current_limit_a": ("current", "A", 1, "50"),
    }
    for name, (dc, unit, prec, val) in expect.items():
        c = json.loads(got[cfg_topic("sensor", "house", name)])
        assert (c["device_class"], c["unit_of_measurement"], c["suggested_display_precision"],
                c["state_class"]) == (dc, unit, prec, "measurement"), name
        assert render(c["value_template"], state) == val, name
    soh = json.loads(got[cfg_topic("sensor", "house", "soh_pct")])
    assert "device_class" not in soh and soh["entity_category"] == "diagnostic"
    st = json.loads(got[cfg_topic("sensor", "house", "bms_state")])
    assert st["device_class"] == "enum" and "state_class" not in st
    assert "discharging" in st["options"]
    assert render(st["value_template"], state) == "discharging"
    # fields the example profile cannot fill are not announced
    assert cfg_topic("sensor", "house", "cycles") not in got
    assert cfg_topic("sensor", "house", "capacity_ah") not in got

    # fault classes: one binary sensor per code, reading the retained faults list
    faults = got["bms/house/faults"]
    assert [f["code"] for f in json.loads(faults)] == ["bms_cell_over_voltage"]
    ov = json.loads(got[cfg_topic("binary_sensor", "house", "fault_bms_cell_over_voltage")])
    assert ov["device_class"] == "problem" and ov["state_topic"] == "bms/house/faults"
    assert render(ov["value_template"], faults) == "ON"
    assert render(ov["value_template"], b"[]") == "OFF"
    for code in ("cell_over_voltage", "cell_under_voltage", "over_temp_charge",
                 "over_current_discharge", "low_soc", "comm_lost"):
        c = json.loads(got[cfg_topic("binary_sensor", "house", f"fault_{code}")])
        assert render(c["value_template"], faults) == "OFF", code
    comm = json.loads(got[cfg_topic("binary_sensor", "house", "fault_comm_lost")])
    assert comm["availability"] == [{"topic": "bms/gateway/t1/availability"}]
    anyf = json.loads(got[cfg_topic("binary_sensor", "house", "fault")])
    assert render(anyf["value_template"], faults) == "ON"
    online = json.loads(got[cfg_topic("binary_sensor", "house", "online")])
    assert online["state_topic"] == "bms/house/availability"
    assert online["device_class"] == "connectivity"

    # cells: house learned 8 from data, shed has cell_count 4 from its config
    cells = got["bms/house/cells"]
    for i, mv in enumerate(CELLS_MV, 1):
        c = json.loads(got[cfg_topic("sensor", "house", f"cell_{i:02d}")])
        assert c["state_topic"] == "bms/house/cells" and c["unit_of_measurement"] == "V"
        assert render(c["value_template"], cells) == str(mv / 1000)
    assert cfg_topic("sensor", "house", "cell_09") not in got
    assert render(c["value_template"], b'{"voltages_v": [3.3]}') == "None"
    assert {cfg_topic("sensor", "shed", f"cell_{i:02d}") for i in range(1, 5)} <= set(got)
    assert cfg_topic("sensor", "shed", "cell_05") not in got

    # gateway device
    fps = json.loads(got[f"{HA}/sensor/bms_t1_gateway/frames_per_s/config"])
    assert fps["state_topic"] == "bms/gateway/t1/status"
    assert fps["device"]["identifiers"] == ["bms_gateway_t1"]
    assert float(render(fps["value_template"], got["bms/gateway/t1/status"])) >= 0
    depth = json.loads(got[f"{HA}/sensor/bms_t1_gateway/outbox_depth/config"])
    status = json.loads(got["bms/gateway/t1/status"])
    assert render(depth["value_template"], got["bms/gateway/t1/status"]) == str(
        status["outbox_depth"])

    reg = json.loads(got["bms/gateway/t1/discovery"])
    assert set(reg["nodes"]) == {"bms_t1_gateway", "bms_t1_house", "bms_t1_shed"}
    assert "sensor/cell_08" in reg["nodes"]["bms_t1_house"]


def test_pack_removed_between_runs_loses_its_entities(tmp_path: Path, broker: Broker,
                                                      subscriber_factory: Any) -> None:
    run1 = tmp_path / "run1"
    run2 = tmp_path / "run2"
    run1.mkdir()
    run2.mkdir()
    cfg = load_config(write_config(run1, broker.url, ["house", "shed"]))
    asyncio.run(replay(cfg, write_log(run1 / "a.log"), speed=None))
    before = retained(broker.port, subscriber_factory, [f"{HA}/#"])
    assert cfg_topic("sensor", "shed", "voltage_v") in before
    assert cfg_topic("sensor", "house", "cell_08") in before

    # second run: shed is gone, and this log has no cell frames at all
    cfg = load_config(write_config(run2, broker.url, ["house"]))
    asyncio.run(replay(cfg, write_log(run2 / "b.log", cells=False), speed=None))
    after = retained(broker.port, subscriber_factory, [f"{HA}/#", "bms/gateway/#"])
    assert not [t for t in after if "/bms_t1_shed/" in t]
    assert cfg_topic("sensor", "house", "voltage_v") in after
    # cells learned by the previous run are kept for a pack that is still configured
    assert cfg_topic("sensor", "house", "cell_08") in after
    reg = json.loads(after["bms/gateway/t1/discovery"])
    assert set(reg["nodes"]) == {"bms_t1_gateway", "bms_t1_house"}
    assert "sensor/cell_08" in reg["nodes"]["bms_t1_house"]


def test_reannounce_on_ha_online_and_reload_removes_pack(tmp_path: Path, broker: Broker,
                                                         subscriber_factory: Any) -> None:
    cfg_path = write_config(tmp_path, broker.url, ["house", "shed"])
    sub = subscriber_factory(broker.port, [f"{HA}/#"])
    house_v = cfg_topic("sensor", "house", "voltage_v")
    shed_v = cfg_topic("sensor", "shed", "voltage_v")

    def count(topic: str, ms: list[tuple[str, bytes, bool]] | None = None) -> int:
        # inside wait_for the subscriber's lock is held: use the list it passes
        return len([p for t, p, _ in (sub.messages if ms is None else ms) if t == topic and p])

    async def scenario() -> None:
        d = Daemon(load_config(cfg_path))
        task = asyncio.create_task(d.serve())
        try:
            assert await asyncio.to_thread(sub.wait_for, lambda ms: count(shed_v, ms) >= 1)
            await asyncio.sleep(0.3)
            assert count(house_v) == 1
            sub.client.publish(f"{HA}/status", b"online")  # HA (re)started
            assert await asyncio.to_thread(sub.wait_for, lambda ms: count(house_v, ms) >= 2), \
                "configs not sent again after homeassistant/status online"

            cfg_path.write_text(cfg_path.read_text().replace(
                ", {id: shed, profile: example-bms, cell_count: 4, id_offset: 256}", ""))
            d._on_hup()
            assert await asyncio.to_thread(sub.wait_for, lambda ms: any(
                t == shed_v and p == b"" for t, p, _ in ms)), "reload did not remove shed"
        finally:
            d._on_term()
            assert await asyncio.wait_for(task, 15) == 0

    asyncio.run(scenario())
    after = retained(broker.port, subscriber_factory, [f"{HA}/#"])
    assert not [t for t in after if "/bms_t1_shed/" in t]
    assert house_v in after


# ----------------------------------------------------------------- no broker needed


def test_per_value_mode_still_uses_json_topics(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, "mqtt://127.0.0.1:1", ["house"],
                                   extra="publish: {per_value_topics: true}\n"))
    d = Discovery(cfg, Pipeline(cfg).topics)
    pubs = {p.topic: json.loads(p.payload) for p in d.on_connect() if "/config" in p.topic}
    for body in pubs.values():
        assert body["state_topic"].rsplit("/", 1)[1] in ("state", "cells", "faults",
                                                          "availability", "status")
    # before any data house has no cell entities: they come with the first cells
    assert cfg_topic("sensor", "house", "cell_01") not in pubs


def test_disabled_discovery_reads_and_writes_nothing(tmp_path: Path) -> None:
    # inbound topics are input any client can write: none without the feature (issue 10)
    cfg = load_config(write_config(tmp_path, "mqtt://127.0.0.1:1", ["house"]))
    on = Discovery(cfg, Pipeline(cfg).topics)
    assert set(on.subscriptions()) == {"bms/gateway/t1/discovery", f"{HA}/status"}
    reg = on.registry()
    off_cfg = load_config(write_config(tmp_path, "mqtt://127.0.0.1:1", ["house"],
                                       discovery=False, name="off.yaml"))
    off = Discovery(off_cfg, Pipeline(off_cfg).topics)
    assert off.subscriptions() == {}
    assert off.on_connect() == []
    assert off.on_registry(reg.payload) == []


@pytest.mark.parametrize("payload", [b"offline", b"", b"junk"])
def test_ha_status_other_than_online_is_ignored(tmp_path: Path, payload: bytes) -> None:
    cfg = load_config(write_config(tmp_path, "mqtt://127.0.0.1:1", ["house"]))
    d = Discovery(cfg, Pipeline(cfg).topics)
    assert d.on_ha_status(payload) == []
    assert len(d.on_ha_status(b"online")) == len(d.configs())
