"""The gateway config: YAML -> `GatewayConfig`, with its profiles; every problem collected."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from pathlib import Path
from typing import Any

from gateway.config.limits import (
    DBC_MAX_BYTES,
    ID_FIX,
    MAX_CELLS,
    YAML_MAX_BYTES,
    can_interface_problem,
    file_problem,
    id_problem,
    state_dir_problem,
    topic_segment_problem,
)
from gateway.config.paths import (
    BUILTIN_DBC,
    available_profiles,
    default_state_dir,
    find_profile,
    resolve_file,
)
from gateway.config.problems import ConfigError, Problem, Reader, nearest
from gateway.config.profile import load_profile, parse_chemistry
from gateway.config.rules import parse_rules
from gateway.config.types import (
    CanBus,
    GatewayConfig,
    HomeAssistantConfig,
    MqttConfig,
    OutboxConfig,
    PackConfig,
    Profile,
    PublishPolicy,
    TlsConfig,
    TopicPolicy,
)
from gateway.config.yamlsafe import read_yaml
from gateway.model import FIELD_BY_NAME

_TOP_KEYS = {"gateway_id", "state_dir", "log_level", "can", "packs", "mqtt", "publish",
             "homeassistant", "outbox", "shutdown_timeout_s", "prometheus", "rules",
             "log_format"}
_CAN_KEYS = {"name", "interface", "channel", "bitrate", "fd", "data_bitrate", "options",
             "receive", "kernel_filter", "bcm_throttle_s"}
_RECEIVE_PATHS = ("raw", "bcm", "python-can")
_PACK_KEYS = {"id", "profile", "dbc", "dbc_lenient", "bus", "id_offset", "transmit", "stale_after_s",
              "cell_count", "publish", "rules", "chemistry"}
_MQTT_KEYS = {"url", "topic_prefix", "client_id", "username", "password", "password_file",
              "password_env", "protocol", "keepalive", "tls", "max_payload"}
_PUBLISH_KEYS = {"state", "cells", "deadband", "cell_deadband_v", "per_value_topics"}


def _publish_policy(r: Reader, key: str, obj: Any, base: PublishPolicy) -> PublishPolicy:
    spec = r.mapping(obj, key)
    r.known(spec, key, _PUBLISH_KEYS)

    def topic(name: str, dflt: TopicPolicy) -> TopicPolicy:
        t = r.mapping(spec.get(name), f"{key}.{name}")
        r.known(t, f"{key}.{name}", {"min_interval_s", "max_interval_s"})
        lo = r.num(t, f"{key}.{name}", "min_interval_s", dflt.min_interval_s, lo=0)
        hi = r.num(t, f"{key}.{name}", "max_interval_s", dflt.max_interval_s, lo=0.1)
        assert lo is not None and hi is not None
        if hi < lo:
            r.bad(f"{key}.{name}", "max_interval_s is smaller than min_interval_s",
                  f"raise max_interval_s to at least {lo:g} or lower min_interval_s")
        return TopicPolicy(lo, hi)

    deadband = dict(base.deadband)
    for name, v in r.mapping(spec.get("deadband"), f"{key}.deadband").items():
        if name not in FIELD_BY_NAME:
            r.bad(f"{key}.deadband.{name}", "not a field of the pack model",
                  nearest(name, FIELD_BY_NAME.keys()))
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 \
                or not math.isfinite(v):
            r.bad(f"{key}.deadband.{name}", f"must be a finite number >= 0, got {v!r}",
                  f"e.g. deadband: {{{name}: 0.1}}")
        else:
            deadband[name] = float(v)
    return PublishPolicy(
        state=topic("state", base.state), cells=topic("cells", base.cells), deadband=deadband,
        cell_deadband_v=r.num(spec, key, "cell_deadband_v", base.cell_deadband_v, lo=0)
        or 0.0,
        per_value_topics=r.bool_(spec, key, "per_value_topics", base.per_value_topics),
    )


def _can_buses(r: Reader, obj: Any) -> list[CanBus]:
    items = obj if isinstance(obj, list) else [obj] if obj is not None else []
    buses: list[CanBus] = []
    for i, item in enumerate(items):
        k = f"can[{i}]" if isinstance(obj, list) else "can"
        spec = r.mapping(item, k)
        r.known(spec, k, _CAN_KEYS)
        interface = r.str_(spec, k, "interface", None)
        channel = r.str_(spec, k, "channel", None)
        if interface is None:
            r.bad(k, "needs `interface`", "e.g. interface: socketcan (or virtual, slcan, ...)")
            continue
        if (prob := can_interface_problem(interface)) is not None:
            r.bad(f"{k}.interface", *prob)
            continue
        if channel is None:
            channel = "can0" if interface == "socketcan" else "0"
        name = r.str_(spec, k, "name", channel) or channel
        opts = r.mapping(spec.get("options"), f"{k}.options")
        receive = r.str_(spec, k, "receive", "raw" if interface == "socketcan" else "python-can")
        if receive not in _RECEIVE_PATHS:
            r.bad(f"{k}.receive", f"unknown receive path {receive!r}",
                  f"use one of {', '.join(_RECEIVE_PATHS)}")
            receive = "python-can"
        elif receive != "python-can" and interface != "socketcan":
            r.bad(f"{k}.receive", f"{receive!r} needs interface: socketcan (got {interface})",
                  "remove `receive` (python-can reads every other interface)")
            receive = "python-can"
        fd = r.bool_(spec, k, "fd", False)
        if fd and receive == "bcm":
            # RX_SETUP without CAN_FD_FRAME subscribes to classic frames: FD ones would
            # never arrive, and nothing would say so
            r.bad(f"{k}.receive", "'bcm' reads classic CAN frames only, and this bus has "
                  "fd: true", "use receive: raw (the default) on a CAN FD bus")
            receive = "raw"
        buses.append(CanBus(name, interface, channel, r.int_(spec, k, "bitrate", None, lo=1000),
                            fd,
                            r.int_(spec, k, "data_bitrate", None, lo=1000), dict(opts),
                            receive,  # type: ignore[arg-type]
                            r.bool_(spec, k, "kernel_filter", True),
                            r.num(spec, k, "bcm_throttle_s", 0.0, lo=0, hi=60) or 0.0))
    names = [b.name for b in buses]
    for n in {x for x in names if names.count(x) > 1}:
        r.bad("can", f"two buses are named {n!r}", "give each a distinct `name`")
    return buses


def _password(r: Reader, spec: dict[str, Any], base: Path) -> str | None:
    if "password" in spec:
        import logging

        logging.getLogger("gateway.config").warning(
            "%s: mqtt.password is inline; prefer password_file or password_env", r.file)
        return r.str_(spec, "mqtt", "password", None)
    if pf := r.str_(spec, "mqtt", "password_file", None):
        p = resolve_file(base, pf, base)
        try:
            return p.read_text(encoding="utf-8").strip()
        except OSError as e:
            r.bad("mqtt.password_file", f"cannot read {p}: {e.strerror or e}",
                  "create the file (mode 0640, owned by root:bms-gateway)")
            return None
    if pe := r.str_(spec, "mqtt", "password_env", None):
        val = os.environ.get(pe)
        if val is None:
            r.bad("mqtt.password_env", f"environment variable {pe} is not set",
                  "set it in the service's Environment= or EnvironmentFile=")
        return val
    return None


def _topic_prefix(r: Reader, key: str, prefix: str, example: str) -> None:
    """A prefix the gateway publishes (and deletes retained topics) under: no wildcards,
    no `$` (brokers reserve `$SYS`... and refuse or drop what clients publish there)."""
    if prefix.startswith("$"):
        r.bad(key, f"{prefix!r} starts with '$' (topics reserved for the broker)",
              f"use a plain prefix, e.g. {key.rsplit('.', 1)[1]}: {example}")
    for seg in prefix.split("/"):
        if (prob := topic_segment_problem(seg)) is not None and seg != "":
            r.bad(key, f"segment {seg!r} {prob}",
                  f"use a plain prefix, e.g. {key.rsplit('.', 1)[1]}: {example}")


def _homeassistant(r: Reader, obj: Any) -> HomeAssistantConfig:
    ha = r.mapping(obj, "homeassistant")
    r.known(ha, "homeassistant", {"discovery", "prefix"})
    prefix = (r.str_(ha, "homeassistant", "prefix", "homeassistant")
              or "homeassistant").rstrip("/")
    _topic_prefix(r, "homeassistant.prefix", prefix, "homeassistant")
    if not prefix:
        r.bad("homeassistant.prefix", "must not be empty", "e.g. prefix: homeassistant")
    return HomeAssistantConfig(r.bool_(ha, "homeassistant", "discovery", False), prefix)


def _mqtt(r: Reader, obj: Any, base: Path) -> MqttConfig:
    if obj is None:
        return MqttConfig(url=None)
    spec = r.mapping(obj, "mqtt")
    r.known(spec, "mqtt", _MQTT_KEYS)
    url = r.str_(spec, "mqtt", "url", None)
    if url in ("-", ""):
        url = None
    prefix = r.str_(spec, "mqtt", "topic_prefix", "bms") or "bms"
    _topic_prefix(r, "mqtt.topic_prefix", prefix, "bms")
    tls_obj = spec.get("tls")
    tls = None
    if tls_obj is not None and tls_obj is not False:
        t = r.mapping(tls_obj if tls_obj is not True else {}, "mqtt.tls")
        r.known(t, "mqtt.tls", {"ca_file", "cert_file", "key_file", "insecure"})
        files = {}
        for n in ("ca_file", "cert_file", "key_file"):
            v = r.str_(t, "mqtt.tls", n, None)
            if v is not None:
                p = resolve_file(base, v, base)
                if not p.exists():
                    r.bad(f"mqtt.tls.{n}", f"file {p} does not exist")
                files[n] = str(p)
        if ("cert_file" in files) != ("key_file" in files):
            r.bad("mqtt.tls", "cert_file and key_file go together")
        tls = TlsConfig(insecure=r.bool_(t, "mqtt.tls", "insecure", False), **files)
    proto = str(spec.get("protocol", "5"))
    if proto not in ("5", "3.1.1"):
        r.bad("mqtt.protocol", f"must be 5 or 3.1.1, got {proto!r}")
        proto = "5"
    cfg = MqttConfig(
        url=url, topic_prefix=prefix, client_id=r.str_(spec, "mqtt", "client_id", None),
        username=r.str_(spec, "mqtt", "username", None), password=_password(r, spec, base),
        protocol=proto,  # type: ignore[arg-type]
        # MQTT carries keepalive in 16 bits: a larger value fails at every connect
        keepalive=r.int_(spec, "mqtt", "keepalive", 30, lo=5, hi=65535) or 30, tls=tls,
        max_payload=r.int_(spec, "mqtt", "max_payload", 65536, lo=1024) or 65536,
    )
    if url is not None:
        try:
            _, _, is_tls = cfg.host_port
        except ValueError as e:
            r.bad("mqtt.url", f"cannot parse {url!r}: {e}",
                  "use mqtt://host:1883 or mqtts://host:8883, or '-' for stdout")
        else:
            if is_tls and tls is None:
                cfg = dataclasses.replace(cfg, tls=TlsConfig())
    return cfg


def _log_format(r: Reader, obj: Any) -> tuple[str, str | None, int | None] | None:
    """`log_format: hex-ms` or `{regex: ..., ts_unit: ms, ts_base: 16}`, checked here."""
    from gateway.source.logformats import FormatError, LineFormat

    if obj is None:
        return None
    spec = {"regex": obj} if isinstance(obj, str) else r.mapping(obj, "log_format")
    r.known(spec, "log_format", {"regex", "preset", "ts_unit", "ts_base"})
    text = r.str_(spec, "log_format", "regex", None) or r.str_(spec, "log_format", "preset", None)
    if text is None:
        r.bad("log_format", "needs `regex` (or `preset`)",
              "e.g. log_format: {preset: hex-ms} or {regex: '^(?P<ts>...) (?P<id>...) "
              "(?P<data>...)$', ts_unit: ms}; docs/config.md")
        return None
    unit = r.str_(spec, "log_format", "ts_unit", None)
    base = r.int_(spec, "log_format", "ts_base", None)
    try:
        LineFormat.parse(text, unit, base)
    except FormatError as e:
        r.bad("log_format", str(e).removeprefix("log format: "),
              "see docs/config.md, Reading logs of other loggers")
        return None
    return text, unit, base


def load_config(path: str | Path, *, mqtt_url: str | None = None) -> GatewayConfig:
    """Parse and check a gateway config and its profiles; raise ConfigError with all problems.

    `mqtt_url` overrides `mqtt.url` (`-` = stdout), as the CLI's --mqtt does.
    """
    p = Path(path)
    problems: list[Problem] = []
    data = read_yaml(p, problems)
    if problems:
        raise ConfigError(problems)
    r = Reader(str(p), problems)
    top = r.mapping(data, "(top level)")
    r.known(top, "", _TOP_KEYS)
    base = p.resolve().parent
    gid = r.str_(top, "", "gateway_id", None) or socket.gethostname().split(".")[0] or "gateway"
    if (prob := id_problem(gid)) is not None:
        r.bad("gateway_id", f"{gid!r} {prob}", ID_FIX)
    sd = r.str_(top, "", "state_dir", None)
    state_dir = (base / os.path.expanduser(sd)) if sd else default_state_dir()
    if (prob := state_dir_problem(state_dir)) is not None:
        # the daemon would exit 3 at start ("cannot create outbox ..."): say it here
        r.bad("state_dir", prob, "point state_dir at a directory the gateway user owns, "
              "e.g. /var/lib/bms-gateway")
    level = (r.str_(top, "", "log_level", "info") or "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        r.bad("log_level", f"unknown level {level!r}", "one of debug, info, warning, error")
        level = "info"
    buses = _can_buses(r, top.get("can"))
    if not buses:
        r.bad("can", "no CAN bus configured",
              "add e.g. can: {interface: socketcan, channel: can0, bitrate: 500000}")
    publish = _publish_policy(r, "publish", top.get("publish"), PublishPolicy())
    global_rules = r.mapping(top.get("rules"), "rules")
    packs: list[PackConfig] = []
    raw_packs = top.get("packs")
    if not isinstance(raw_packs, list) or not raw_packs:
        r.bad("packs", "needs a list with at least one pack",
              "e.g. packs: [{id: house, profile: can-bms}]")
        raw_packs = []
    seen: set[str] = set()
    profiles: dict[Path, Profile | None] = {}
    for i, item in enumerate(raw_packs):
        k = f"packs[{i}]"
        spec = r.mapping(item, k)
        r.known(spec, k, _PACK_KEYS)
        pid = r.str_(spec, k, "id", None)
        if pid is None:
            r.bad(k, "needs an `id`", "e.g. id: house (used in MQTT topics)")
            continue
        if (prob := id_problem(pid)) is not None:
            r.bad(f"{k}.id", f"{pid!r} {prob}", ID_FIX)
        if pid in seen or pid == "gateway":
            r.bad(f"{k}.id", f"{pid!r} is used twice or reserved", "give each pack a unique id")
        seen.add(pid)
        prof_name = r.str_(spec, k, "profile", None)
        if prof_name is None:
            r.bad(f"{k}.profile", "missing",
                  f"name a built-in profile ({', '.join(available_profiles())}) or a path")
            continue
        ppath = find_profile(prof_name, base)
        if not ppath.exists():
            r.bad(f"{k}.profile", f"no profile {prof_name!r} (looked for {ppath})",
                  nearest(prof_name, available_profiles())
                  or f"built-in: {', '.join(available_profiles())}")
            continue
        if (prob := file_problem(ppath, YAML_MAX_BYTES)) is not None:
            r.bad(f"{k}.profile", prob, "point it at a profile YAML file")
            continue
        if ppath not in profiles:  # parsed once: 300 packs of one model cost 17 s before
            profiles[ppath] = load_profile(ppath, problems)
        profile = profiles[ppath]
        if profile is None:
            continue
        extra_dbc = spec.get("dbc")
        if extra_dbc is not None:
            if isinstance(extra_dbc, str):
                extra_dbc = [extra_dbc]
            # Pack-level DBCs come first: they override the profile's (users point a
            # profile at their own copy of a vendor DBC).
            profile = dataclasses.replace(profile, dbc=tuple(
                resolve_file(base, str(d), BUILTIN_DBC) for d in extra_dbc))
        for d in profile.dbc:
            if not d.exists():
                r.bad(f"{k}.dbc" if extra_dbc else "dbc", f"DBC file {d} does not exist",
                      "point `dbc:` at your copy of the file")
            elif (prob := file_problem(d, DBC_MAX_BYTES)) is not None:
                r.bad(f"{k}.dbc" if extra_dbc else "dbc", prob,
                      "point `dbc:` at a DBC file (a regular file, not a device)")
        bus = r.str_(spec, k, "bus", buses[0].name if buses else "can0") or ""
        if buses and bus not in {b.name for b in buses}:
            r.bad(f"{k}.bus", f"no bus named {bus!r}",
                  nearest(bus, {b.name for b in buses}) or "name one of the `can:` entries")
        stale = r.num(spec, k, "stale_after_s", profile.stale_after_s or 10.0, lo=0.1)
        chemistry = parse_chemistry(r, spec, f"{k}.chemistry") or profile.chemistry or "lfp"
        packs.append(PackConfig(
            id=pid, profile=profile, bus=bus, id_offset=r.int_(spec, k, "id_offset", 0) or 0,
            transmit=r.bool_(spec, k, "transmit", False), stale_after_s=stale or 10.0,
            cell_count=r.int_(spec, k, "cell_count", profile.cell_count, lo=1, hi=MAX_CELLS),
            publish=_publish_policy(r, f"{k}.publish", spec.get("publish"), publish),
            # a pack's keys refine the global rules, key by key; a bad global value is
            # reported under `rules.`, where it was written (once: see the end)
            rules=parse_rules(global_rules, r.file, "rules", problems, chemistry,
                              refine=r.mapping(spec.get("rules"), f"{k}.rules"),
                              refine_key=f"{k}.rules"),
            chemistry=chemistry,
            dbc_lenient=r.bool_(spec, k, "dbc_lenient", False),
        ))
    mqtt = _mqtt(r, top.get("mqtt"), base)
    if mqtt_url is not None:
        mqtt = dataclasses.replace(mqtt, url=None if mqtt_url == "-" else mqtt_url)
        if mqtt.url is not None:
            try:
                mqtt.host_port  # noqa: B018
            except ValueError:
                r.bad("--mqtt", f"cannot parse {mqtt_url!r}", "use mqtt://host:port or '-'")
    ha = _homeassistant(r, top.get("homeassistant"))
    ob = r.mapping(top.get("outbox"), "outbox")
    r.known(ob, "outbox", {"max_events", "max_age_s"})
    prom = r.str_(top, "", "prometheus", None)
    if prom is not None and not re.fullmatch(r"(\[[^\]]+\]|[^:]+):\d{1,5}|\d{1,5}", prom):
        r.bad("prometheus", f"{prom!r} is not host:port", "e.g. prometheus: 127.0.0.1:9108")
    port = (prom or "").rsplit(":", 1)[-1]
    if port.isdigit() and not 0 < int(port) < 65536:
        r.bad("prometheus", f"port {port} is not 1..65535", "e.g. prometheus: 127.0.0.1:9108")
    if prom is not None and prom.isdigit():
        prom = f"127.0.0.1:{prom}"
    # parsed before the check below: a problem found after it was silently defaulted
    outbox = OutboxConfig(r.int_(ob, "outbox", "max_events", 100_000, lo=10) or 100_000,
                          r.num(ob, "outbox", "max_age_s", 30 * 86400, lo=60) or 30 * 86400)
    shutdown = r.num(top, "", "shutdown_timeout_s", 10.0, lo=0.1, hi=3600) or 10.0
    log_format = _log_format(r, top.get("log_format"))
    if global_rules and not packs:  # checked with no pack to apply them to
        parse_rules(global_rules, r.file, "rules", problems)
    if problems:
        # a global rule's problem is found once per pack that inherits it: say it once
        raise ConfigError(list(dict.fromkeys(problems)))
    return GatewayConfig(
        path=p, gateway_id=gid, state_dir=state_dir, log_level=level, buses=tuple(buses),
        packs=tuple(packs), mqtt=mqtt,
        homeassistant=ha,
        outbox=outbox,
        shutdown_timeout_s=shutdown,
        prometheus=prom,
        log_format=log_format,
    )

