"""Home Assistant MQTT discovery (issue 7): a device per pack, one for the gateway.

Entities read the gateway's own JSON topics (`<prefix>/<pack>/state`, `cells`, `faults`,
`<prefix>/gateway/<gid>/status`), never the per-value topics, so they work whatever
`publish.per_value_topics` says. Configs are retained, sent on every (re)connect and
again whenever Home Assistant publishes `online` on `<ha_prefix>/status`.

What was announced is kept in a retained registry on the broker,
`<prefix>/gateway/<gid>/discovery`, because that is the one place that survives a
restart together with the configs themselves. On connect the gateway subscribes to it
before its own new registry goes out (the subscription is queued behind the first
publication, the registry is the last one), reads the previous run's list and clears
(empty retained payload) every config it no longer announces: a pack removed from the
config loses its entities. Cell and temperature sensors of packs that are still
configured are kept (adopted): they were learned from data and will be again.

Any MQTT client can write the registry, so it is parsed against a strict schema
(`parse_registry`) and only names of this gateway's own nodes under its own configured
HA prefix are ever cleared; with discovery off nothing is subscribed at all.

A value that is null (or missing) renders as `None`, which HA's MQTT sensor and binary
sensor treat as "unknown"; an empty rendering would keep the old value instead.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from gateway import __version__
from gateway.config import MAX_CELLS, GatewayConfig, PackConfig, id_problem
from gateway.errors import GatewayError
from gateway.faults.rules import RULES
from gateway.model import BMS_STATES, FIELDS, FieldInfo, PackState, Publication
from gateway.publish.publisher import Topics, dumps

log = logging.getLogger("gateway.homeassistant")

Component = Literal["sensor", "binary_sensor"]
Handler = Callable[[bytes], list[Publication]]

REGISTRY_VERSION = 1
MANUFACTURER = "bms-gateway"

# Settings and slow-moving figures: HA lists them under "Diagnostic".
DIAGNOSTIC_FIELDS = frozenset({
    "soh_pct", "cell_count", "cell_v_min_id", "cell_v_max_id", "charge_current_limit_a",
    "discharge_current_limit_a", "charge_voltage_limit_v", "discharge_voltage_limit_v",
    "capacity_ah", "cycles",
})
TOTAL_INCREASING = frozenset({"cycles"})
# Indices and counts: long-term statistics of these mean nothing.
NO_STATE_CLASS = frozenset({"cell_count", "cell_v_min_id", "cell_v_max_id"})
ICONS = {
    "charge_enabled": "mdi:battery-arrow-up", "discharge_enabled": "mdi:battery-arrow-down",
    "contactor_closed": "mdi:electric-switch-closed", "balancing_active": "mdi:scale-balance",
    "cycles": "mdi:battery-sync", "bms_state": "mdi:state-machine",
}
# Faults that describe the link itself must stay available while the pack is offline.
LINK_FAULTS = frozenset({"comm_lost", "can_bus_lost", "can_bus_off", "can_error_passive",
                         "can_error_frames"})
DIAGNOSTIC_FAULTS = frozenset({"decode_error_rate", "implausible_values", "can_error_passive",
                               "can_error_frames"})
_LEARNED = re.compile(r"sensor/(cell|temp)_(\d{2,4})")
_KEY = re.compile(r"(sensor|binary_sensor)/[A-Za-z0-9_]{1,64}")
REGISTRY_MAX_BYTES = 1 << 20
REGISTRY_MAX_KEYS = 20_000


def node_body(gid: str, pack: str) -> str:
    """`<gid>_<pack>` with every '_' of the gateway id doubled: one-to-one.

    Plain `<gid>_<pack>` was ambiguous (gateway `gw` + pack `b_house` and gateway `gw_b`
    + pack `house` shared node ids, config topics and unique ids, so one gateway cleared
    the other's entities). HA node ids take only `[a-zA-Z0-9_-]`, so no separator is
    left that ids cannot contain; instead the first odd run of '_' ends the gateway id
    (its own runs are doubled, even; pack ids never start with '_', config.id_problem).
    A gateway id without '_' (every host name) gives the same ids as before.
    """
    return f"{gid.replace('_', '__')}_{pack}"


class RegistryError(GatewayError, ValueError):
    """A discovery registry on the broker that the gateway will not act on."""


@dataclass(frozen=True, slots=True)
class Entity:
    component: Component
    object_id: str
    body: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.component}/{self.object_id}"


def _value(path: str) -> str:
    # `default(none)`: a missing key renders None (unknown) too, not "" (kept stale).
    return "{{ value_json.%s | default(none) }}" % path  # noqa: UP031 (braces)


def _bool_value(name: str) -> str:
    return ("{% set v = value_json." + name + " | default(none) %}"
            "{{ none if v is none else ('ON' if v else 'OFF') }}")


def _fault_value(code: str) -> str:
    return "{{ 'ON' if value_json | selectattr('code', 'eq', '%s') | list else 'OFF' }}" % code  # noqa: UP031


def _fault_attrs(code: str) -> str:
    return ("{{ {'faults': value_json | selectattr('code', 'eq', '%s') | list} | tojson }}"  # noqa: UP031
            % code)


def pack_fields(pc: PackConfig) -> list[FieldInfo]:
    """The model fields this pack's profile can fill (mapped, or derived from what is)."""
    prof = pc.profile
    mapped = set(prof.fields)
    cells = {k for k, v in prof.cells.items() if v}
    volts = "voltages" in cells
    derivable = {
        "power_w": {"voltage_v", "current_a"} <= mapped,
        "cell_count": volts or pc.cell_count is not None,
        "cell_v_min": volts, "cell_v_max": volts, "cell_v_avg": volts,
        "cell_v_min_id": volts or "cell_v_min" in mapped,
        "cell_v_max_id": volts or "cell_v_max" in mapped,
        "cell_v_delta": volts or {"cell_v_min", "cell_v_max"} <= mapped,
        "temp_min_c": "temps" in cells, "temp_max_c": "temps" in cells,
        "balancing_active": "balancing" in cells,
    }
    return [f for f in FIELDS if f.name in mapped or derivable.get(f.name, False)]


def fault_codes(pc: PackConfig, fields: list[FieldInfo]) -> list[tuple[str, str]]:
    """(code, entity name) for every fault class this pack can raise."""
    have = {f.name for f in fields}
    specs = pc.rules
    out: list[tuple[str, str]] = []
    for code, d in RULES.items():
        spec = specs.get(code)
        if spec is not None and not spec.enabled:
            continue
        if d.kind in ("high", "low") and spec is not None and spec.raise_at is None \
                and (d.limit_field is None or d.limit_field not in have):
            continue  # no threshold and no BMS limit to follow: the rule is off
        if d.field is not None and d.field not in have:
            continue
        name = f"cell {d.label}" if d.element == "cell" else d.label
        out.append((code, name[:1].upper() + name[1:]))
    seen = {c for c, _ in out}
    for f in pc.profile.faults:
        if f.code not in seen:
            seen.add(f.code)
            text = f.text or f.code.removeprefix("bms_").replace("_", " ")
            out.append((f.code, f"BMS {text}"))
    return out


class Discovery:
    """Builds the discovery configs and decides what to announce, re-announce and clear."""

    def __init__(self, cfg: GatewayConfig, topics: Topics) -> None:
        self.topics = topics
        self.gid = cfg.gateway_id
        self.t_registry = topics.gateway("discovery")
        self.t_gw_avail = topics.gateway("availability")
        self.cells: dict[str, int] = {}  # announced cell voltage sensors per pack
        self.temps: dict[str, int] = {}
        self.adopted: dict[str, set[str]] = {}  # node -> keys kept from the last registry
        self.enabled = False
        self.prefix = "homeassistant"
        self.packs: dict[str, PackConfig] = {}
        self.rejected = 0  # inbound registries refused (status: inbound_rejected)
        self.rejected_logged = False
        self._apply(cfg)

    def _apply(self, cfg: GatewayConfig) -> None:
        self.enabled = cfg.homeassistant.discovery
        self.prefix = cfg.homeassistant.prefix.rstrip("/")
        self.packs = {p.id: p for p in cfg.packs}
        for pid in list(self.cells):
            if pid not in self.packs:
                del self.cells[pid]
        for pid in list(self.temps):
            if pid not in self.packs:
                del self.temps[pid]
        for pid, pc in self.packs.items():
            self.cells[pid] = max(self.cells.get(pid, 0), pc.cell_count or 0)
            self.temps.setdefault(pid, 0)
        nodes = {self.node(p) for p in self.packs}
        self.adopted = {n: k for n, k in self.adopted.items() if n in nodes}

    # ------------------------------------------------------------ names

    def node(self, pack_id: str) -> str:
        return f"bms_{node_body(self.gid, pack_id)}"

    @property
    def gateway_node(self) -> str:  # pack id "gateway" is reserved: no clash
        return self.node("gateway")

    @property
    def gateway_device_id(self) -> str:  # only even runs of '_': never a pack device's id
        return f"bms_gateway_{self.gid.replace('_', '__')}"

    def config_topic(self, node: str, key: str, prefix: str | None = None) -> str:
        """`<ha_prefix>/<component>/<node_id>/<object_id>/config` for key `component/object`."""
        component, object_id = key.split("/", 1)
        return f"{prefix or self.prefix}/{component}/{node}/{object_id}/config"

    # ------------------------------------------------------------ entities

    def _gateway_device(self) -> dict[str, Any]:
        return {"identifiers": [self.gateway_device_id], "name": f"BMS gateway {self.gid}",
                "manufacturer": MANUFACTURER, "model": "bms-gateway", "sw_version": __version__}

    def _base(self, node: str, entity_prefix: str, component: Component, object_id: str,
              name: str, device: dict[str, Any], availability: list[str]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": name,
            "unique_id": f"{node}_{object_id}",
            "default_entity_id": f"{component}.{entity_prefix}_{object_id}",
            "device": device,
            "origin": {"name": "bms-gateway", "sw_version": __version__},
            "availability": [{"topic": t} for t in availability],
        }
        if len(availability) > 1:
            body["availability_mode"] = "all"
        return body

    def pack_entities(self, pack_id: str) -> list[Entity]:
        pc = self.packs[pack_id]
        node = self.node(pack_id)
        ep = f"bms_{pack_id}"
        t = self.topics
        t_state, t_cells, t_faults = (t.pack(pack_id, "state"), t.pack(pack_id, "cells"),
                                      t.pack(pack_id, "faults"))
        t_avail = t.pack(pack_id, "availability")
        both = [self.t_gw_avail, t_avail]
        gw_only = [self.t_gw_avail]
        device = {"identifiers": [f"bms_gateway_{node_body(self.gid, pack_id)}"],
                  "name": f"BMS {pack_id}", "model": pc.profile.name,
                  "manufacturer": MANUFACTURER, "via_device": self.gateway_device_id,
                  "sw_version": __version__}
        out: list[Entity] = []

        def add(component: Component, object_id: str, name: str, avail: list[str],
                **extra: Any) -> None:
            body = self._base(node, ep, component, object_id, name, device, avail)
            body.update(extra)
            out.append(Entity(component, object_id, body))

        fields = pack_fields(pc)
        for f in fields:
            cat = {"entity_category": "diagnostic"} if f.name in DIAGNOSTIC_FIELDS else {}
            icon = {"icon": ICONS[f.name]} if f.name in ICONS else {}
            if f.kind == "bool":
                add("binary_sensor", f.name, f.label, both, state_topic=t_state,
                    value_template=_bool_value(f.name), **cat, **icon)
                continue
            extra: dict[str, Any] = {"state_topic": t_state, "value_template": _value(f.name)}
            if f.ha_device_class:
                extra["device_class"] = f.ha_device_class
            if f.kind == "enum":
                extra["options"] = list(BMS_STATES)
            else:
                if f.unit:
                    extra["unit_of_measurement"] = f.unit
                if f.name in TOTAL_INCREASING:
                    extra["state_class"] = "total_increasing"
                elif f.name not in NO_STATE_CLASS:
                    extra["state_class"] = "measurement"
                extra["suggested_display_precision"] = f.precision if f.kind == "float" else 0
            add("sensor", f.name, f.label, both, **extra, **cat, **icon)
        add("binary_sensor", "online", "BMS online", gw_only, state_topic=t_avail,
            payload_on="online", payload_off="offline", device_class="connectivity",
            entity_category="diagnostic")
        add("binary_sensor", "fault", "Fault", gw_only, state_topic=t_faults,
            value_template="{{ 'ON' if value_json | length > 0 else 'OFF' }}",
            device_class="problem", json_attributes_topic=t_faults,
            json_attributes_template="{{ {'codes': value_json | map(attribute='code') | list, "
            "'messages': value_json | map(attribute='message') | list} | tojson }}")
        for code, name in fault_codes(pc, fields):
            cat = {"entity_category": "diagnostic"} if code in DIAGNOSTIC_FAULTS else {}
            add("binary_sensor", f"fault_{code}", name,
                gw_only if code in LINK_FAULTS else both, state_topic=t_faults,
                value_template=_fault_value(code), device_class="problem",
                json_attributes_topic=t_faults, json_attributes_template=_fault_attrs(code),
                **cat)
        for i in range(self.cells.get(pack_id, 0)):
            add("sensor", f"cell_{i + 1:02d}", f"Cell {i + 1} voltage", both,
                state_topic=t_cells, value_template=_value(f"voltages_v[{i}]"),
                device_class="voltage", unit_of_measurement="V", state_class="measurement",
                suggested_display_precision=3)
        for i in range(self.temps.get(pack_id, 0)):
            add("sensor", f"temp_{i + 1:02d}", f"Temperature sensor {i + 1}", both,
                state_topic=t_cells, value_template=_value(f"temps_c[{i}]"),
                device_class="temperature", unit_of_measurement="°C",
                state_class="measurement", suggested_display_precision=1)
        return out

    def gateway_entities(self) -> list[Entity]:
        node = self.gateway_node
        t_status = self.topics.gateway("status")
        dev = self._gateway_device()
        ep = f"bms_gateway_{self.gid}"
        out = []
        for obj, name, unit, prec, cat in (
                ("frames_per_s", "CAN frames per second", "frames/s", 1, None),
                ("outbox_depth", "Outbox depth", "events", 0, "diagnostic"),
                ("mqtt_reconnects", "MQTT reconnects", None, 0, "diagnostic")):
            body = self._base(node, ep, "sensor", obj, name, dev, [self.t_gw_avail])
            body.update({"state_topic": t_status, "value_template": _value(obj),
                         "suggested_display_precision": prec})
            body["state_class"] = "total_increasing" if obj == "mqtt_reconnects" \
                else "measurement"
            if unit:
                body["unit_of_measurement"] = unit
            if cat:
                body["entity_category"] = cat
            out.append(Entity("sensor", obj, body))
        return out

    def entities(self) -> dict[str, list[Entity]]:
        """node -> entities, everything currently announced (empty when disabled)."""
        if not self.enabled:
            return {}
        out = {self.gateway_node: self.gateway_entities()}
        for pid in self.packs:
            out[self.node(pid)] = self.pack_entities(pid)
        return out

    # ------------------------------------------------------------ publications

    def _config(self, node: str, e: Entity) -> Publication:
        return Publication(self.config_topic(node, e.key), dumps(e.body), retain=True, qos=1)

    def _clear(self, topic: str) -> Publication:
        return Publication(topic, b"", retain=True, qos=1)

    def announced(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for node, ents in self.entities().items():
            keys = {e.key for e in ents} | self.adopted.get(node, set())
            out[node] = sorted(keys)
        return out

    def _topics(self, registry: dict[str, list[str]], prefix: str) -> set[str]:
        return {self.config_topic(n, k, prefix) for n, keys in registry.items() for k in keys}

    def registry(self) -> Publication:
        if not self.enabled:
            return self._clear(self.t_registry)
        body = {"v": REGISTRY_VERSION, "prefix": self.prefix, "nodes": self.announced()}
        return Publication(self.t_registry, dumps(body), retain=True, qos=1)

    def configs(self) -> list[Publication]:
        return [self._config(node, e) for node, ents in self.entities().items() for e in ents]

    def on_connect(self) -> list[Publication]:
        """Every config, then the registry (last: the registry subscription goes first)."""
        if not self.enabled:
            return []
        return [*self.configs(), self.registry()]

    def subscriptions(self) -> dict[str, Handler]:
        """Inbound topics, only while discovery is on: each is input any client can write."""
        if not self.enabled:
            return {}
        return {self.t_registry: self.on_registry, f"{self.prefix}/status": self.on_ha_status}

    def on_ha_status(self, payload: bytes) -> list[Publication]:
        if payload.strip().lower() != b"online" or not self.enabled:
            return []
        log.info("Home Assistant is online: announcing %d packs again", len(self.packs))
        return self.configs()

    def parse_registry(self, payload: bytes) -> dict[str, list[str]]:
        """The registry's nodes, or RegistryError: any client can write this topic.

        Strict: `{"v": 1, "prefix": <our HA prefix>, "nodes": {<our node>: [<key>...]}}`,
        nothing else. Only nodes of this gateway (`bms_` + `node_body`) and keys of the
        shape we create (`sensor/<id>`, `binary_sensor/<id>`) under our own configured HA
        prefix pass, so a registry can at most make the gateway clear configs it could
        have announced itself, never another tool's retained topics.
        """
        if len(payload) > REGISTRY_MAX_BYTES:
            msg = f"{len(payload)} bytes, more than {REGISTRY_MAX_BYTES}"
            raise RegistryError(msg)
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError) as e:
            msg = f"not JSON ({e})"
            raise RegistryError(msg) from None
        if not isinstance(body, dict) or set(body) != {"v", "prefix", "nodes"}:
            msg = "not an object with exactly the keys v, prefix, nodes"
            raise RegistryError(msg)
        if body["v"] != REGISTRY_VERSION or isinstance(body["v"], bool):
            msg = f"version {body['v']!r}, not {REGISTRY_VERSION}"
            raise RegistryError(msg)
        if body["prefix"] != self.prefix:
            msg = (f"prefix {body['prefix']!r} is not homeassistant.prefix {self.prefix!r}; "
                   "nothing outside our own prefix is ever cleared")
            raise RegistryError(msg)
        nodes = body["nodes"]
        if not isinstance(nodes, dict):
            msg = "nodes is not an object"
            raise RegistryError(msg)
        out: dict[str, list[str]] = {}
        total = 0
        own = self.node("")
        for node, keys in nodes.items():
            pack = node.removeprefix(own)
            # node_body is one-to-one, so a valid pack id after our own prefix is a node
            # this gateway's config can produce, never another gateway's
            if pack == node or id_problem(pack) is not None or self.node(pack) != node:
                msg = f"node {node!r} is not one of this gateway's ({own}<pack>)"
                raise RegistryError(msg)
            if not isinstance(keys, list) or not all(
                    isinstance(k, str) and _KEY.fullmatch(k) for k in keys):
                msg = f"node {node!r}: keys must be a list of 'sensor/<id>' or 'binary_sensor/<id>'"
                raise RegistryError(msg)
            total += len(keys)
            if total > REGISTRY_MAX_KEYS:
                msg = f"more than {REGISTRY_MAX_KEYS} entities"
                raise RegistryError(msg)
            out[node] = keys
        return out

    def _learnable(self, pack_id: str, key: str) -> bool:
        """A cell or temperature sensor key exactly as `pack_entities` makes it, within the
        pack's bounds: a registry cannot make us adopt (and re-announce forever) more."""
        m = _LEARNED.fullmatch(key)
        if m is None:
            return False
        n = int(m.group(2))
        limit = (self.packs[pack_id].cell_count or MAX_CELLS) if m.group(1) == "cell" \
            else MAX_CELLS
        return 1 <= n <= limit and key == f"sensor/{m.group(1)}_{n:02d}"

    def on_registry(self, payload: bytes) -> list[Publication]:
        """The previous run's registry (or our own echo): clear what we no longer announce."""
        if not payload or not self.enabled:
            return []
        try:
            nodes = self.parse_registry(payload)
        except RegistryError as e:
            self.rejected += 1
            # once per run: a hostile client repeating it must not flood the journal
            if not self.rejected_logged:
                self.rejected_logged = True
                log.warning("ignoring discovery registry on %s: %s (logged once; counted in "
                            "status inbound_rejected)", self.t_registry, e)
            # the topic is ours: put our own registry back so the next run can read it
            return [self.registry()]
        current = {self.node(p): p for p in self.packs}
        for node, keys in nodes.items():
            if node in current:
                learned = {k for k in keys if self._learnable(current[node], k)}
                self.adopted.setdefault(node, set()).update(learned)
        old = self._topics(nodes, self.prefix)
        now = self._topics(self.announced(), self.prefix)
        stale = sorted(old - now)
        out = [self._clear(t) for t in stale]
        if stale:
            log.info("Home Assistant discovery: removing %d entities no longer configured",
                     len(stale))
        reg = self.registry()
        if reg.payload != payload:
            out.append(reg)
        return out

    def learn(self, states: Iterable[PackState]) -> list[Publication]:
        """Cheap per-ship check: cells or temperature sensors beyond what was announced."""
        if not self.enabled:
            return []
        out: list[Publication] = []
        grown = False
        for st in states:
            pid = st.pack_id
            if pid not in self.packs or not st.cells_known:  # no entities in steps
                continue
            n_cells, n_temps = len(st.cell_v), len(st.cell_t)
            if n_cells > self.cells.get(pid, 0) or n_temps > self.temps.get(pid, 0):
                old = {e.key for e in self.pack_entities(pid)}
                self.cells[pid] = max(self.cells.get(pid, 0), n_cells)
                self.temps[pid] = max(self.temps.get(pid, 0), n_temps)
                node = self.node(pid)
                for e in self.pack_entities(pid):
                    if e.key not in old:
                        out.append(self._config(node, e))
                log.info("pack %s: %d cells, %d temperature sensors: announced to Home "
                         "Assistant", pid, self.cells[pid], self.temps[pid])
                grown = True
        if grown:
            out.append(self.registry())
        return out

    def reconfigure(self, cfg: GatewayConfig) -> list[Publication]:
        """SIGHUP reload: clear removed packs' entities, announce the new config."""
        old_prefix = self.prefix
        old = self._topics(self.announced(), old_prefix)
        self._apply(cfg)
        now = self._topics(self.announced(), self.prefix)
        return [*(self._clear(t) for t in sorted(old - now)), *self.configs(), self.registry()]


__all__ = ["Discovery", "Entity", "fault_codes", "pack_fields"]
