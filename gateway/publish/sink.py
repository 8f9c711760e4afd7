"""The sink protocol: where the runtime delivers what the pipeline produces.

A `Sink` takes two kinds of output, in the order the pipeline produced them:

- snapshots (`publish`): state, cells, availability, faults, status. Retained and
  latest-only where the sink has to wait (the broker away): only the newest per topic
  matters.
- fault events (`event`), each already stored in the outbox under its `seq`. A sink that
  delivers at once (stdout, the watch dashboard) says so and the runtime acknowledges the
  event; the MQTT sink reads the outbox itself and acknowledges on PUBACK.

Implementations: `StdoutSink` (here), `MqttSink` (gateway.publish.mqtt) and
`WatchSink` (gateway.commands.watch). The runtime runs `run()` as one task of its
TaskGroup and never asks which kind of sink it has.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from gateway.model import Publication


@dataclass(frozen=True, slots=True)
class SinkStatus:
    """What the status topic says about the sink (counters since start)."""

    published: int = 0  # snapshots (and, on stdout, events) delivered
    events_published: int = 0
    connected: bool | None = None  # None: a sink without a connection
    away: bool = False  # its last attempt to connect failed (not merely: not yet connected)
    reconnects: int = 0
    dropped_oversize: int = 0
    last_error: str = ""
    refused: tuple[str, ...] = ()  # topics the broker refuses now
    refused_total: int = 0
    inbound_errors: int = 0
    faults: tuple[dict[str, Any], ...] = ()  # gateway-level faults of the link


class Sink(Protocol):
    """What the runtime needs of an output (see the module docstring)."""

    name: str  # its task's name: "mqtt", "stdout", "watch"
    stopping: bool  # stop() was called: a task that fails now is not restarted

    def publish(self, pub: Publication) -> None:
        """Hand over a snapshot; never blocks."""

    def event(self, seq: int, topic: str, payload: bytes) -> bool:
        """A fault event the outbox stored as `seq`: True when delivered now (the runtime
        acknowledges it), False when the sink delivers it from the outbox later."""

    def flush(self) -> None:
        """The end of a batch: events were stored, output may be pushed out."""

    async def run(self) -> None:
        """Deliver until `stop()` (a task of the runtime's TaskGroup)."""

    async def room(self) -> None:
        """Wait while too much waits for delivery (a replay feeds faster than a broker
        takes); returns at once for a sink that keeps only the newest."""

    async def delivered(self, timeout: float) -> bool:
        """Wait until everything handed over (snapshots and stored events) is delivered,
        at most `timeout` seconds; True when it was."""

    def stop(self) -> None:
        """End `run()` and release whoever waits in `room()` or `delivered()`."""

    def status(self) -> SinkStatus: ...


class ImmediateSink:
    """A sink that delivers as it is handed output (nothing waits, nothing to retry):
    the base of `StdoutSink` and the watch dashboard's sink."""

    name = "immediate"

    def __init__(self) -> None:
        self.stopping = False
        self.count = 0
        self.events_published = 0
        self._stopped = asyncio.Event()

    def publish(self, pub: Publication) -> None:
        self.count += 1

    def event(self, seq: int, topic: str, payload: bytes) -> bool:
        self.publish(Publication(topic, payload, retain=False, qos=1))
        self.events_published += 1
        return True

    def flush(self) -> None:
        return

    async def run(self) -> None:
        await self._stopped.wait()

    async def room(self) -> None:
        return

    async def delivered(self, timeout: float) -> bool:
        self.flush()
        return True

    def stop(self) -> None:
        self.stopping = True
        self._stopped.set()

    def status(self) -> SinkStatus:
        return SinkStatus(published=self.count, events_published=self.events_published)


class StdoutSink(ImmediateSink):
    """What a broker would receive, one `topic payload` line each; events are printed in
    order with the snapshots."""

    name = "stdout"

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream or sys.stdout

    def publish(self, pub: Publication) -> None:
        self.stream.write(f"{pub.topic} {pub.payload.decode(errors='replace')}\n")
        self.count += 1

    def flush(self) -> None:
        self.stream.flush()
