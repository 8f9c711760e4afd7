"""Shared fixtures: a real mosquitto on a free loopback port, shared data, a subscriber."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "realdata"
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def compile_profile(tmp: Path, profile: Path) -> tuple[Any, dict[int, int]]:
    """One pack of `profile` compiled as the daemon compiles it (a LivePack), and the DBC
    length of each frame key it handles."""
    import textwrap

    from gateway.config import Problem, load_config
    from gateway.decode.dbc import load_dbc
    from gateway.normalize.compiler import DbcCache, compile_pack

    path = tmp / f"gw-{profile.stem}.yaml"
    path.write_text(textwrap.dedent(f"""\
        gateway_id: g
        can: {{interface: virtual, channel: x}}
        packs: [{{id: p, profile: {profile}}}]
        """))
    cfg = load_config(path)
    problems: list[Problem] = []
    pack = compile_pack(cfg.packs[0], DbcCache(), problems)
    assert pack is not None, problems
    lengths = {m.name: m.length for d in cfg.packs[0].profile.dbc for m in load_dbc(d).messages}
    return pack, {key: lengths[name] for key, name in pack.sources.items()}


def shared(rel: str) -> Path:
    """Path into ../shared/realdata, skipping the test when it is absent."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"shared real data not available ({p} missing): these tests read third-party "
                    "logs and DBCs from ../shared/realdata next to the checkout")
    return p


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """A mosquitto we start, stop and restart (same port, same persistence)."""

    workdir: Path
    port: int
    extra_conf: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def conf(self) -> Path:
        c = self.workdir / "mosquitto.conf"
        if not self.extra_conf or "listener" not in self.extra_conf:
            listener = f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        else:
            listener = ""
        # Started as root, mosquitto drops to the `mosquitto` user, which cannot write
        # our temporary directory: persistence (the sessions a broker restart must keep)
        # and the log would be lost silently.
        user = ("user root\n" if os.geteuid() == 0
                and not re.search(r"^user ", self.extra_conf, re.M) else "")
        c.write_text(
            f"{listener}{user}"
            f"persistence true\npersistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            f"log_dest file {self.log}\nlog_type error\nlog_type warning\nlog_type notice\n"
            "set_tcp_nodelay true\nmax_queued_messages 100000\n"
            f"{self.extra_conf}\n")
        return c

    def start(self) -> None:
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf())],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = self.log.read_text() if self.log.exists() else ""
                raise RuntimeError(f"mosquitto exited: {err} {log}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker", free_port())
    b.workdir.mkdir()
    b.start()
    try:
        yield b
    finally:
        b.stop()


class Subscriber:
    """A paho client in its own thread collecting every message (real broker, no mocks)."""

    def __init__(self, port: int, topics: list[str], *, client_id: str | None = None,
                 clean: bool = True, qos: int = 1, host: str = "127.0.0.1", **tls: object) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"test-{os.getpid()}-{id(self)}",
                                  clean_session=clean, protocol=mqtt.MQTTv311)
        self.topics = topics
        self.qos = qos

        def on_connect(c: mqtt.Client, u: object, f: object, rc: object, p: object = None) -> None:
            for t in self.topics:
                c.subscribe(t, qos=self.qos)
            self.connected.set()

        def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
            with self.lock:
                self.messages.append((m.topic, bytes(m.payload), bool(m.retain)))

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise RuntimeError("subscriber could not connect")
        time.sleep(0.1)  # let the SUBACK land before the test publishes

    def topic(self, t: str) -> list[bytes]:
        with self.lock:
            return [p for topic, p, _ in self.messages if topic == t]

    def wait_for(self, pred: object, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                snapshot = list(self.messages)
            if pred(snapshot):  # type: ignore[operator]
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def subscriber_factory() -> Iterator[object]:
    made: list[Subscriber] = []

    def make(*a: object, **kw: object) -> Subscriber:
        s = Subscriber(*a, **kw)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make
    for s in made:
        with contextlib.suppress(Exception):
            s.close()


async def started(d: Any, timeout: float = 10.0) -> None:
    """Until a Daemon's serve() has made its sources and every bus is open."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not (d.runtime.sources and all(s.opened.is_set() for s in d.runtime.sources)):
        assert time.monotonic() < deadline, "the daemon's buses did not open"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def serving(cfg: Any, channel: str | None = None) -> AsyncIterator[tuple[Any, Any]]:
    """A Daemon serving until the block ends, its buses open: `cfg` is a config file, or
    a Daemon the test built (and adjusted) itself. Yields (daemon, tx): tx is a python-can
    virtual bus on `channel` to send frames with, None without one. On leaving, tx is
    shut, the daemon is stopped as SIGTERM stops it, and it must exit 0 within 15 s."""
    import asyncio

    import can

    from gateway.config import load_config
    from gateway.runtime.daemon import Daemon

    d = cfg if isinstance(cfg, Daemon) else Daemon(load_config(cfg))
    task = asyncio.create_task(d.serve())
    tx = can.Bus(interface="virtual", channel=channel) if channel is not None else None
    try:
        await started(d)
        yield d, tx
    finally:
        if tx is not None:
            tx.shutdown()
        d._on_term()
        code = await asyncio.wait_for(task, 15)
    assert code == 0
