"""Optional Prometheus endpoint (`prometheus: 127.0.0.1:9108`): the status topic as metrics.

Every scrape asks the event loop for a fresh status dict (the same one published on
`<prefix>/gateway/<id>/status`) and turns it into metric families, so the two never
disagree. A scrape that the loop does not answer within two seconds fails: a wedged
loop shows up as a failed scrape rather than as stale numbers.

`prometheus-client` is an optional dependency (`pip install 'bms-gateway[prometheus]'`);
`require()` turns its absence into one clear config problem at start-up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, Problem

log = logging.getLogger("gateway.metrics")

StatusFn = Callable[[], dict[str, Any]]
SCRAPE_TIMEOUT_S = 2.0
NS = "bms_gateway"


def require(config_path: Path | str) -> None:
    """Raise ConfigError when the endpoint is configured but prometheus-client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError([Problem(
            str(config_path), "prometheus",
            "the Prometheus endpoint needs the prometheus-client package, which is not installed",
            "pip install 'bms-gateway[prometheus]' (or prometheus-client), "
            "or remove the `prometheus:` key")]) from None


def parse_address(addr: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\]]*?)\]?:(\d{1,5})", addr)
    if not m:
        msg = f"prometheus: {addr!r} is not host:port"
        raise ValueError(msg)
    return m.group(1), int(m.group(2))


class _StatusCollector:
    """A prometheus_client collector fed from the daemon's status dict."""

    def __init__(self, loop: asyncio.AbstractEventLoop, status: StatusFn) -> None:
        self.loop = loop
        self.status = status

    def _fetch(self) -> dict[str, Any]:
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(self.status())
            except Exception as e:  # reported to the scraper as a failed scrape
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout=SCRAPE_TIMEOUT_S)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        s = self._fetch()
        yield InfoMetricFamily(f"{NS}_build", "bms-gateway version and gateway id",
                               value={"version": str(s.get("version", "")),
                                      "gateway_id": str(s.get("gateway_id", ""))})

        def gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{NS}_{name}", doc, value=float(value or 0))

        def counter(name: str, doc: str, value: Any) -> CounterMetricFamily:
            return CounterMetricFamily(f"{NS}_{name}", doc, value=float(value or 0))

        yield gauge("uptime_seconds", "seconds since the daemon started", s.get("uptime_s"))
        yield gauge("frames_per_second", "CAN frames received per second, all buses",
                    s.get("frames_per_s"))
        yield gauge("outbox_depth", "fault events waiting in the outbox", s.get("outbox_depth"))
        yield counter("outbox_dropped", "fault events dropped by the outbox bounds",
                      s.get("outbox_dropped"))
        yield counter("mqtt_published", "snapshots published", s.get("published"))
        yield counter("mqtt_events_published", "fault events published (PUBACK received)",
                      s.get("events_published"))
        yield counter("mqtt_reconnects", "failed or lost MQTT connections",
                      s.get("mqtt_reconnects"))
        yield counter("mqtt_dropped_oversize", "payloads over mqtt.max_payload not published",
                      s.get("dropped_oversize"))
        yield gauge("mqtt_connected", "1 while connected to the broker",
                    1 if s.get("mqtt_connected") else 0)
        yield gauge("last_error_present", "1 when the status carries a last_error",
                    1 if s.get("last_error") else 0)

        buses = s.get("buses") or {}
        per_bus = [("received", "frames received", "received"),
                   ("decoded", "frames decoded", "decoded"),
                   ("unknown", "frames with an id no profile knows", "unknown"),
                   ("errors", "CAN error frames", "error_frames"),
                   ("transmitted", "frames sent (polling)", "transmitted")]
        for key, doc, name in per_bus:
            fam = CounterMetricFamily(f"{NS}_bus_{name}", doc, labels=["bus"])
            for bus, b in buses.items():
                fam.add_metric([bus], float(b.get(key) or 0))
            yield fam
        up = GaugeMetricFamily(f"{NS}_bus_up", "1 while the bus is open (0 = can_bus_lost)",
                               labels=["bus"])
        for bus, b in buses.items():
            up.add_metric([bus], 0.0 if b.get("state") == "lost" else 1.0)
        yield up

        packs = s.get("packs") or {}
        online = GaugeMetricFamily(f"{NS}_pack_online", "1 while the pack is online",
                                   labels=["pack"])
        faults = GaugeMetricFamily(f"{NS}_pack_active_faults", "active faults",
                                   labels=["pack"])
        states = CounterMetricFamily(f"{NS}_pack_state_published", "state snapshots published",
                                     labels=["pack"])
        cells = CounterMetricFamily(f"{NS}_pack_cells_published", "cell snapshots published",
                                    labels=["pack"])
        for pack, p in packs.items():
            online.add_metric([pack], 1.0 if p.get("online") else 0.0)
            faults.add_metric([pack], float(p.get("active_faults") or 0))
            states.add_metric([pack], float(p.get("state_published") or 0))
            cells.add_metric([pack], float(p.get("cells_published") or 0))
        yield from (online, faults, states, cells)


class MetricsServer:
    """The HTTP endpoint; `start()` binds it, `stop()` shuts it down."""

    def __init__(self, address: str, status: StatusFn) -> None:
        self.host, self.port = parse_address(address)
        self.status = status
        self._server: Any = None

    def start(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_StatusCollector(asyncio.get_running_loop(), self.status))
        result = start_http_server(self.port, addr=self.host, registry=registry)
        self._server = result[0] if isinstance(result, tuple) else None
        log.info("Prometheus metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


__all__ = ["MetricsServer", "parse_address", "require"]
