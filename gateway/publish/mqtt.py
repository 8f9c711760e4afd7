"""The MQTT sink: one aiomqtt connection with reconnect.

Snapshots are retained and latest-only: while the broker is away only the newest
payload per topic is kept. Fault events are different: the sink reads them from the
outbox in `seq` order and acknowledges each there only on an accepting PUBACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from gateway.backoff import backoff
from gateway.config import MqttConfig
from gateway.errors import EXIT_CONFIG, GatewayError
from gateway.model import Publication, iso_ts
from gateway.publish.sink import SinkStatus

log = logging.getLogger("gateway.publish")


def tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    if cfg.tls is None:
        return None
    ctx = ssl.create_default_context(cafile=cfg.tls.ca_file)
    if cfg.tls.cert_file and cfg.tls.key_file:
        try:
            ctx.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
        except ssl.SSLError as e:  # not PEM, or a key of another certificate
            raise _KeyPairError(*e.args) from e
    if cfg.tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class EventStore(Protocol):
    """Where the sink finds the fault events to deliver (the outbox)."""

    def pending(self, limit: int) -> list[tuple[int, str, bytes]]: ...

    def ack(self, seq: int) -> None: ...


class MqttSink:
    """One aiomqtt connection with reconnect; snapshots latest-only, events at least once.

    `publish()` only records the newest payload per topic and wakes the sender; the
    sender task publishes what is pending whenever connected. Events are read from the
    outbox in seq order and acknowledged there after PUBACK.
    """

    name = "mqtt"

    def __init__(self, cfg: MqttConfig, client_id: str, will_topic: str,
                 outbox: EventStore, on_connect: Callable[[], list[Publication]],
                 subscriptions: dict[str, Callable[[bytes], list[Publication]]] | None = None,
                 *, ordered: bool = False) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.will_topic = will_topic
        self.outbox = outbox
        self.on_connect = on_connect
        # the same dict object: handlers registered after construction are honoured
        self.subscriptions = subscriptions if subscriptions is not None else {}
        self.pending: dict[str, Publication] = {}
        # Replays keep every snapshot in order (byte-identical output at any speed);
        # live mode keeps only the newest per topic while the broker is slow or away.
        self.coalesce = not ordered
        self.queue: deque[Publication] = deque()
        self.space = asyncio.Event()
        self.wake = asyncio.Event()
        self.events_dirty = True  # the outbox may hold events from before (a crash)
        self.connected = asyncio.Event()
        # the last connection attempt failed (not merely: not connected yet)
        self.down = False
        self.stopping = False
        self.published = 0
        self.events_published = 0
        self.reconnects = 0
        self.last_error = ""
        self.dropped_oversize = 0
        self._oversize_topics: set[str] = set()
        self.inbound_errors = 0
        self._inbound_logged: set[str] = set()
        # topic -> the broker's refusal (PUBACK reason >= 0x80) while it lasts
        self.refused: dict[str, Refusal] = {}
        self.refused_total = 0
        self._refusal_attempt = 0
        self._events_retry_at = 0.0
        self._client: Any = None

    def publish(self, pub: Publication) -> None:
        if len(pub.payload) > self.cfg.max_payload:
            self.dropped_oversize += 1
            # once per topic: a topic that is too big is too big at every publication
            if pub.topic not in self._oversize_topics:
                self._oversize_topics.add(pub.topic)
                log.warning("payload for %s is %d bytes > mqtt.max_payload %d: not published "
                            "(counted in status dropped_oversize; logged once per topic)",
                            pub.topic, len(pub.payload), self.cfg.max_payload)
            return
        if not self.coalesce:
            self.queue.append(pub)
        else:
            self.pending.pop(pub.topic, None)  # keep insertion order = order of last update
            self.pending[pub.topic] = pub
        self.wake.set()

    def event(self, seq: int, topic: str, payload: bytes) -> bool:
        return False  # delivered from the outbox, in seq order, after flush()

    async def room(self, limit: int = 256) -> None:
        """In replay (no coalescing), wait while too much is queued for the broker."""
        while len(self.queue) > limit and not self.stopping:
            self.space.clear()
            await self.space.wait()

    def flush(self) -> None:
        """New events are in the outbox."""
        self.events_dirty = True
        self.wake.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.space.set()

    def _client_kwargs(self) -> dict[str, Any]:
        import aiomqtt
        import paho.mqtt.client as paho

        host, port, _ = self.cfg.host_port
        return {
            "hostname": host, "port": port, "identifier": self.client_id,
            "username": self.cfg.username, "password": self.cfg.password,
            "keepalive": self.cfg.keepalive, "tls_context": tls_context(self.cfg),
            "protocol": aiomqtt.ProtocolVersion.V5 if self.cfg.protocol == "5"
            else aiomqtt.ProtocolVersion.V311,
            "will": aiomqtt.Will(self.will_topic, b"offline", qos=1, retain=True),
            "clean_session": None if self.cfg.protocol == "5" else True,
            "timeout": 10, "max_queued_outgoing_messages": 0,
            **({"clean_start": paho.MQTT_CLEAN_START_FIRST_ONLY}
               if self.cfg.protocol == "5" else {}),
        }

    async def run(self) -> None:
        import aiomqtt

        attempt = 0
        state = "init"
        while not self.stopping:
            entered = False
            try:
                async with acked_client_class()(**self._client_kwargs()) as client:
                    entered = True
                    self._client = client
                    _nodelay(client)
                    attempt = 0
                    if state != "up":
                        log.info("MQTT connected to %s", self.cfg.url)
                    state = "up"
                    self.down = False
                    self.connected.set()
                    self.events_dirty = True  # unacknowledged events go out first
                    self._events_retry_at = 0.0  # a broker that refused may allow them now
                    for pub in self.on_connect():
                        self.publish(pub)
                    # subscribe before anything is sent: replies to our own on-connect
                    # messages (e.g. the discovery registry) must not be missed
                    for topic in self.subscriptions:
                        await client.subscribe(topic, qos=1)
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._sender(client), name="mqtt.sender")
                        if self.subscriptions:
                            tg.create_task(self._receiver(client), name="mqtt.receiver")
            except ValueError as e:
                # UnicodeError (a host label over 63 characters) or a ValueError from paho
                # while connecting: the address itself is wrong, and retrying cannot fix it
                if entered:
                    raise
                msg = f"cannot connect to {self.cfg.url}: {e}"
                raise BrokerAddressError(msg) from e
            except (aiomqtt.MqttError, ExceptionGroup, OSError) as e:
                # OSError: building the TLS context (unreadable or mismatched cert/key)
                # happens here too; it must not end this task and leave the daemon mute
                err = _first_mqtt_error(e, aiomqtt.MqttError)
                self.connected.clear()
                self.down = True
                self._client = None
                self.last_error = str(err)
                if self.stopping:
                    break
                attempt += 1
                self.reconnects += 1
                if state != "down":
                    log.warning("MQTT connection to %s lost or refused: %s; retrying",
                                self.cfg.url, _explain(err))
                state = "down"
                await asyncio.sleep(backoff(attempt))
            finally:
                # also when run() dies of a bug: the status must not say connected
                self.connected.clear()
        self.connected.clear()

    async def _sender(self, client: Any) -> None:
        while True:
            # events first: they are the ones that must never be lost. The outbox is only
            # asked when something was appended (flush) or after a (re)connect, not on
            # every wake-up: a query per snapshot cost latency on a busy bus.
            if self.events_dirty and time.monotonic() >= self._events_retry_at:
                self.events_dirty = False
                await self._send_events(client)
            while self.queue:
                pub = self.queue[0]
                await self._publish(client, pub.topic, pub.payload, pub.qos, pub.retain)
                self.queue.popleft()
                self.published += 1
                if len(self.queue) < 128:
                    self.space.set()
            while self.pending:
                topic, pub = next(iter(self.pending.items()))
                await self._publish(client, pub.topic, pub.payload, pub.qos, pub.retain)
                # only forget it if nothing newer arrived while we awaited
                if self.pending.get(topic) is pub:
                    del self.pending[topic]
                self.published += 1
            if self.stopping:
                return
            self.wake.clear()
            if self.pending or self.queue:
                continue
            if self.events_dirty:
                wait = self._events_retry_at - time.monotonic()
                if wait <= 0:
                    continue
                # a refused event is retried after its backoff, or sooner when woken
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), wait)
                continue
            await self.wake.wait()

    async def _send_events(self, client: Any) -> None:
        """Outbox events in seq order; one leaves the outbox only on an accepting PUBACK.

        A refusal stops the round (order is kept: later events wait behind it) and the
        same event is tried again after a jittered, capped backoff.
        """
        while batch := self.outbox.pending(100):
            for seq, topic, payload in batch:
                if not await self._publish(client, topic, payload, 1, False):
                    self._refusal_attempt += 1
                    self._events_retry_at = time.monotonic() + backoff(self._refusal_attempt)
                    self.events_dirty = True
                    return
                self._refusal_attempt = 0
                self.outbox.ack(seq)
                self.events_published += 1

    async def _publish(self, client: Any, topic: str, payload: bytes, qos: int,
                       retain: bool) -> bool:
        """Publish; False when the broker answered with a failure reason code."""
        code = await client.publish_acked(topic, payload, qos=qos, retain=retain, timeout=15)
        if code < 0x80:  # 0x10 "no matching subscribers" is a success
            if self.refused.pop(topic, None) is not None:
                log.info("MQTT: the broker accepts %s again", topic)
            return True
        self.refused_total += 1
        if topic not in self.refused:
            self.refused[topic] = Refusal(topic, code, _reason_name(code), time.time())
            log.error("MQTT: the broker refused %s with reason code %d (%s); events stay in "
                      "the outbox and are retried (status: faults mqtt_refused)", topic, code,
                      _reason_name(code))
        return False

    def status(self) -> SinkStatus:
        return SinkStatus(
            published=self.published, events_published=self.events_published,
            connected=self.connected.is_set(), away=self.down, reconnects=self.reconnects,
            dropped_oversize=self.dropped_oversize, last_error=self.last_error,
            refused=tuple(self.refused), refused_total=self.refused_total,
            inbound_errors=self.inbound_errors,
            # gateway-level faults of the MQTT link
            faults=tuple({"code": "mqtt_refused", "severity": "critical", "topic": r.topic,
                          "reason_code": r.code, "reason": r.reason, "since": iso_ts(r.since),
                          "message": f"broker refused {r.topic}: {r.reason} ({r.code})"}
                         for r in self.refused.values()))

    async def _receiver(self, client: Any) -> None:
        async for msg in client.messages:
            topic = str(msg.topic)
            handler = self.subscriptions.get(topic)
            if handler is None:
                continue
            payload = msg.payload if isinstance(msg.payload, bytes) else str(
                msg.payload).encode()
            try:
                pubs = handler(payload)
            except Exception as e:
                # Any client can write what we subscribe to: a handler that fails on it
                # costs that one message, never the connection (issue 10).
                self.inbound_errors += 1
                self.last_error = f"inbound {topic}: {type(e).__name__}: {e}"
                if topic not in self._inbound_logged:
                    self._inbound_logged.add(topic)
                    log.error("message on %s could not be handled, ignored (logged once per "
                              "topic; counted in status inbound_errors)", topic, exc_info=True)
                continue
            for pub in pubs:
                self.publish(pub)

    async def delivered(self, timeout: float) -> bool:
        """Wait until nothing is pending (or timeout); True when all was delivered.
        With the broker away (its last connection attempt failed; not merely a first
        connection still being made) and no event waiting there is nothing worth the
        wait: the snapshots are given up at once."""
        deadline = time.monotonic() + timeout
        self.wake.set()
        while time.monotonic() < deadline and not self.stopping:
            if self.connected.is_set() and not self._undelivered():
                return True
            if self.down and not self.connected.is_set() and not self.outbox.pending(1):
                break
            await asyncio.sleep(0.02)
        return not self._undelivered()

    def _undelivered(self) -> bool:
        return bool(self.pending or self.queue or self.outbox.pending(1))


class BrokerAddressError(GatewayError, ValueError):
    """The broker address cannot be used at all (not a passing network failure): the
    daemon stops with the config exit status instead of restarting the task."""

    exit_code = EXIT_CONFIG


@dataclass(frozen=True, slots=True)
class Refusal:
    topic: str
    code: int
    reason: str
    since: float


def _reason_name(code: int) -> str:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    try:
        return str(ReasonCode(PacketTypes.PUBACK, identifier=code))
    except ValueError:
        return f"reason {code}"


@functools.cache
def acked_client_class() -> type[Any]:
    """aiomqtt's Client, plus `publish_acked` returning the PUBACK reason code.

    aiomqtt 2.x drops the reason code paho hands to `on_publish`; without it a refusal
    (MQTT 5: 0x87 not authorized, 0x97 quota exceeded...) looks like a delivery. With
    MQTT 3.1.1 a PUBACK has no reason code: a broker that drops a publication still acks
    it (mosquitto does, for an ACL-denied topic), and this returns 0.
    """
    import aiomqtt

    class AckedClient(aiomqtt.Client):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._codes: dict[int, int] = {}
            self._last_mid = 0
            paho_publish = self._client.publish

            def publish(*a: Any, **kw: Any) -> Any:
                info = paho_publish(*a, **kw)
                self._last_mid = info.mid
                return info

            self._client.publish = publish  # type: ignore[method-assign]

        def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any,
                        properties: Any) -> None:
            self._codes[mid] = int(getattr(reason_code, "value", 0) or 0)
            super()._on_publish(client, userdata, mid, reason_code, properties)

        async def __aexit__(self, exc_type: type[BaseException] | None,
                            exc: BaseException | None, tb: TracebackType | None) -> None:
            # Leaving because of a bug, not the link: a clean DISCONNECT would discard
            # the last will and leave `online` retained for a gateway that stopped
            # working. MQTT 5 can ask the broker to publish the will anyway (0x04).
            if (isinstance(exc, Exception) and _is_bug(exc, aiomqtt.MqttError)
                    and not self._disconnected.done() and self._client.protocol == 5):
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.reasoncodes import ReasonCode

                with contextlib.suppress(Exception):
                    self._client.disconnect(reasoncode=ReasonCode(
                        PacketTypes.DISCONNECT, "Disconnect with will message"))
                    await self._wait_for(self._disconnected, timeout=5)
            await super().__aexit__(exc_type, exc, tb)

        async def publish_acked(self, topic: str, payload: bytes, *, qos: int, retain: bool,
                                timeout: float) -> int:
            # aiomqtt's publish calls paho's synchronously before its first await, and
            # this client's only publisher (the sender) awaits one publish at a time
            await self.publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
            code = self._codes.pop(self._last_mid, 0)
            return code if qos else 0

    return AckedClient


def _is_bug(e: BaseException, link_error: type[BaseException]) -> bool:
    """True unless `e` is (a group of only) broker link errors."""
    if isinstance(e, BaseExceptionGroup):
        return e.split(link_error)[1] is not None
    return not isinstance(e, link_error)


def _nodelay(client: Any) -> None:
    """Disable Nagle on the broker connection: small publishes waiting behind an unacked
    one for the peer's delayed ACK gave a ~40 ms latency tail (FIELD-NOTES)."""
    with contextlib.suppress(Exception):
        sock = client._client.socket()  # aiomqtt keeps the paho client here
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _first_mqtt_error(e: BaseException, kind: type[BaseException]) -> BaseException:
    """The MqttError inside an ExceptionGroup from the TaskGroup; re-raise anything else."""
    if isinstance(e, BaseExceptionGroup):
        match, rest = e.split(kind)
        if rest is not None:
            raise rest
        assert match is not None
        return _first_mqtt_error(match.exceptions[0], kind)
    return e


class _KeyPairError(OSError):
    """mqtt.tls.cert_file and key_file cannot be loaded as a pair (ssl.SSLError's args)."""


# CONNACK refusals that mean the credentials: MQTT 3.1.1 return codes 4 (bad user name or
# password) and 5 (not authorised); MQTT 5 reason codes 0x86 and 0x87, which paho also
# reports for a 3.1.1 broker's 4 and 5.
_AUTH_CODES = frozenset({4, 5, 0x86, 0x87})


def _reason_code(e: BaseException) -> int | None:
    """The MQTT reason code (`rc`) an aiomqtt error carries, if it carries one."""
    import aiomqtt
    from paho.mqtt.reasoncodes import ReasonCode

    if not isinstance(e, aiomqtt.MqttCodeError):
        return None
    rc = e.rc
    return rc.value if isinstance(rc, ReasonCode) else rc


def _tls_failure(e: BaseException) -> ssl.SSLError | None:
    """The TLS error behind `e` (aiomqtt re-raises a failed handshake `from None`, which
    keeps it as the context), or None."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _explain(e: BaseException) -> str:
    """The error and, where its kind says which, the setting to check."""
    text = str(e)
    if _reason_code(e) in _AUTH_CODES:
        return f"{text} (check mqtt.username and the password file)"
    if isinstance(e, _KeyPairError):
        return f"{text} (check mqtt.tls.cert_file and mqtt.tls.key_file: they must be a pair)"
    if _tls_failure(e) is not None:
        return f"{text} (check mqtt.tls.ca_file and that the broker's name matches its certificate)"
    return text
