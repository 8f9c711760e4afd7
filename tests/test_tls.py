"""Issue 5: TLS and authentication against a real mosquitto.

The test makes its own PKI with `cryptography` (a CA, a server certificate for
localhost/127.0.0.1, one for a wrong name, a client certificate) and a mosquitto with
two TLS listeners, `require_certificate true`, `allow_anonymous false` and a password
file from `mosquitto_passwd`. The gateway runs in-process on a `virtual` bus.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import ipaddress
import json
import logging
import shutil
import ssl
import subprocess
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.runtime.daemon import Daemon
from tests.conftest import Broker, free_port, serving
from tests.test_daemon import pack_frame

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or (
    "/usr/bin/mosquitto_passwd" if Path("/usr/bin/mosquitto_passwd").exists() else None)
GW_USER, GW_PASSWORD = "gateway", "pack-s3cret"
WATCHER, WATCHER_PASSWORD = "watcher", "w4tch"


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    wrong_cert: Path
    wrong_key: Path
    client_cert: Path
    client_key: Path


def _make_pki(d: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, k: ec.EllipticCurvePrivateKey) -> tuple[
            Path, Path]:
        c, kp = d / f"{stem}.crt", d / f"{stem}.key"
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kp.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        kp.chmod(0o600)
        return c, kp

    ca_key = key()
    ca_cert = (x509.CertificateBuilder().subject_name(name("bms-gateway test CA"))
               .issuer_name(name("bms-gateway test CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1))
               .not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    ca_path, _ = write("ca", ca_cert, ca_key)

    def leaf(cn: str, sans: list[x509.GeneralName], usage: Any) -> tuple[
            x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
             .public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(hours=1))
             .not_valid_after(now + dt.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 ca_key.public_key()), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()), k

    server = leaf("localhost", [x509.DNSName("localhost"),
                                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                  ExtendedKeyUsageOID.SERVER_AUTH)
    wrong = leaf("broker.wrong.example", [x509.DNSName("broker.wrong.example")],
                 ExtendedKeyUsageOID.SERVER_AUTH)
    client = leaf("bms-gateway", [], ExtendedKeyUsageOID.CLIENT_AUTH)
    s_c, s_k = write("server", *server)
    w_c, w_k = write("wrong", *wrong)
    c_c, c_k = write("client", *client)
    return Pki(ca_path, s_c, s_k, w_c, w_k, c_c, c_k)


@dataclass
class TlsBroker:
    broker: Broker
    good_port: int  # certificate for localhost and 127.0.0.1
    wrong_port: int  # certificate for broker.wrong.example
    pki: Pki


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    if MOSQUITTO_PASSWD is None:
        pytest.skip("mosquitto_passwd is not installed (it comes with mosquitto)")
    d = tmp_path_factory.mktemp("tls")
    pki = _make_pki(d)
    passwd = d / "passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-b", "-c", str(passwd), GW_USER, GW_PASSWORD],
                   check=True, capture_output=True)
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwd), WATCHER, WATCHER_PASSWORD],
                   check=True, capture_output=True)
    good, wrong = free_port(), free_port()

    def listener(port: int, cert: Path, key: Path) -> str:
        return textwrap.dedent(f"""\
            listener {port} 127.0.0.1
            cafile {pki.ca}
            certfile {cert}
            keyfile {key}
            require_certificate true
            """)

    workdir = d / "broker"
    workdir.mkdir()
    extra = (listener(good, pki.server_cert, pki.server_key)
             + listener(wrong, pki.wrong_cert, pki.wrong_key)
             + f"allow_anonymous false\npassword_file {passwd}\n"
             # as root, mosquitto would switch to its own user, which cannot read the
             # pytest temp dir (0700) where the keys and password file are
             + "user root\n")
    b = Broker(workdir, good, extra_conf=extra)
    b.start()
    try:
        yield TlsBroker(b, good, wrong, pki)
    finally:
        b.stop()


class TlsSubscriber:
    """A paho client over TLS with a client certificate and a password."""

    def __init__(self, tb: TlsBroker, topics: list[str]) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"tls-sub-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv311)
        self.client.tls_set(ca_certs=str(tb.pki.ca), certfile=str(tb.pki.client_cert),
                            keyfile=str(tb.pki.client_key))
        self.client.username_pw_set(WATCHER, WATCHER_PASSWORD)

        def on_connect(c: Any, u: Any, f: Any, rc: Any, p: Any = None) -> None:
            for t in topics:
                c.subscribe(t, qos=1)
            ready.set()

        def on_message(c: Any, u: Any, m: Any) -> None:
            with self.lock:
                self.messages.append((m.topic, bytes(m.payload)))

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect("localhost", tb.good_port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("TLS subscriber could not connect")
        time.sleep(0.1)

    def wait_for(self, pred: Any, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if pred(self.messages):
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def tls_cfg(tmp: Path, tb: TlsBroker, *, gid: str, host: str, port: int, protocol: str,
            password: str, channel: str | None = None) -> Path:
    """password: `file:<pw>` (written to a password_file) or `env:<VAR>`."""
    kind, _, value = password.partition(":")
    if kind == "file":
        pf = tmp / f"{gid}.password"
        pf.write_text(value + "\n")  # a trailing newline from an editor is fine
        pw_line = f"password_file: {pf}"
    else:
        pw_line = f"password_env: {value}"
    cfg = tmp / f"{gid}.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        gateway_id: {gid}
        state_dir: {tmp / gid}
        shutdown_timeout_s: 2
        can: {{interface: virtual, channel: {channel or gid + '-' + uuid.uuid4().hex[:6]}}}
        packs: [{{id: {gid}-pack, profile: example-bms}}]
        publish: {{state: {{min_interval_s: 0.2}}}}
        mqtt:
          url: mqtts://{host}:{port}
          topic_prefix: bms
          protocol: '{protocol}'
          username: {GW_USER}
          {pw_line}
          tls:
            ca_file: {tb.pki.ca}
            cert_file: {tb.pki.client_cert}
            key_file: {tb.pki.client_key}
        """))
    return cfg


@pytest.mark.parametrize(("protocol", "source", "host"), [
    ("5", "file", "localhost"), ("3.1.1", "env", "127.0.0.1"),
    ("3.1.1", "file", "localhost"), ("5", "env", "127.0.0.1")])
def test_good_credentials_connect_and_publish_state(
        tmp_path: Path, tls_broker: TlsBroker, monkeypatch: pytest.MonkeyPatch,
        protocol: str, source: str, host: str) -> None:
    gid = f"tls{protocol.replace('.', '')}{source}"
    channel = f"{gid}-{uuid.uuid4().hex[:6]}"
    if source == "env":
        monkeypatch.setenv("BMS_TEST_MQTT_PASSWORD", GW_PASSWORD)
        password = "env:BMS_TEST_MQTT_PASSWORD"
    else:
        password = f"file:{GW_PASSWORD}"
    cfg = tls_cfg(tmp_path, tls_broker, gid=gid, host=host, port=tls_broker.good_port,
                  protocol=protocol, password=password, channel=channel)
    sub = TlsSubscriber(tls_broker, ["bms/#"])

    async def scenario() -> None:
        async with serving(cfg, channel) as (d, tx):
            for i in range(5):
                tx.send(pack_frame(50.5, i))
                await asyncio.sleep(0.05)
            ok = await asyncio.to_thread(sub.wait_for, lambda ms: any(
                t == f"bms/{gid}-pack/state" and json.loads(p)["voltage_v"] == 50.5
                for t, p in ms))
            assert ok, f"no state over TLS; last error: {d.runtime.status_body()['last_error']}"
            assert (f"bms/gateway/{gid}/availability", b"online") in sub.messages
            assert d.runtime.sink.status().reconnects == 0

    try:
        asyncio.run(scenario())
        assert sub.wait_for(lambda ms: (f"bms/{gid}-pack/availability", b"offline") in ms)
    finally:
        sub.close()


def test_bad_password_logs_once_and_keeps_retrying(
        tmp_path: Path, tls_broker: TlsBroker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    # both protocols at once, told apart in the log by the host in the URL
    cfgs = [tls_cfg(tmp_path, tls_broker, gid="bad5", host="localhost",
                    port=tls_broker.good_port, protocol="5", password="file:wrong"),
            tls_cfg(tmp_path, tls_broker, gid="bad311", host="127.0.0.1",
                    port=tls_broker.good_port, protocol="3.1.1", password="file:wrong")]
    watch_s = 5.0

    async def scenario() -> list[str]:
        ds = [Daemon(load_config(c)) for c in cfgs]
        tasks = [asyncio.create_task(d.serve()) for d in ds]
        await asyncio.sleep(watch_s)
        for d, t in zip(ds, tasks, strict=True):
            assert not t.done(), "the daemon must stay up while the broker refuses it"
            assert d.runtime.sink.status().reconnects >= 3, d.runtime.sink.status().reconnects
            assert not d.runtime.sink.status().connected
        errors = [d.runtime.status_body()["last_error"] for d in ds]
        for d in ds:
            d._on_term()
        for t in tasks:
            assert await asyncio.wait_for(t, 15) == 0
        return errors

    errors = asyncio.run(scenario())
    for host, last in zip(["localhost", "127.0.0.1"], errors, strict=True):
        lines = [r for r in caplog.records if r.name == "gateway.publish"
                 and r.levelno >= logging.WARNING and f"//{host}:" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]  # one per state change
        msg = lines[0].getMessage()
        assert "check mqtt.username and the password file" in msg, msg
        assert lines[0].exc_info is None
        assert last and ("authori" in last.lower() or "password" in last.lower()), last


# paho-mqtt 2.2 (`Client._ssl_wrap_socket`) does not close the socket when the TLS
# handshake fails; the garbage collector closes it and says so with a ResourceWarning.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_certificate_for_another_name_is_refused(
        tmp_path: Path, tls_broker: TlsBroker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    cfg = tls_cfg(tmp_path, tls_broker, gid="wrongname", host="127.0.0.1",
                  port=tls_broker.wrong_port, protocol="5", password=f"file:{GW_PASSWORD}")

    async def scenario() -> None:
        d = Daemon(load_config(cfg))
        task = asyncio.create_task(d.serve())
        await asyncio.sleep(2.0)
        assert not task.done()
        assert not d.runtime.sink.status().connected
        d._on_term()
        assert await asyncio.wait_for(task, 15) == 0

    asyncio.run(scenario())
    gc.collect()  # let those sockets be finalized while the warning filters above apply
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.publish"
             and r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert "certificate" in lines[0].lower() and "127.0.0.1" in lines[0]
    assert "matches its certificate" in lines[0]  # the hint


def test_hostname_check_is_on_by_default(tls_broker: TlsBroker) -> None:
    """The context the sink builds verifies names (no `insecure: true` in the config)."""
    from gateway.config import MqttConfig, TlsConfig
    from gateway.publish.mqtt import tls_context

    ctx = tls_context(MqttConfig(url="mqtts://localhost:1", tls=TlsConfig(
        ca_file=str(tls_broker.pki.ca))))
    assert ctx is not None
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED


def test_tls_setup_errors_are_explained_by_their_kind(tls_broker: TlsBroker,
                                                      tmp_path: Path) -> None:
    """The hint comes from the error's type (a key of another certificate, a CA file that
    is no certificate), not from searching its message text."""
    from gateway.config import MqttConfig, TlsConfig
    from gateway.publish.mqtt import _explain, tls_context

    pki = tls_broker.pki
    mismatch = MqttConfig(url="mqtts://localhost:1", tls=TlsConfig(
        ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.wrong_key)))
    with pytest.raises(OSError) as got:
        tls_context(mismatch)
    assert "cert_file and mqtt.tls.key_file: they must be a pair" in _explain(got.value)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ssl.SSLError) as bad_ca:
        tls_context(MqttConfig(url="mqtts://localhost:1", tls=TlsConfig(ca_file=str(junk))))
    assert "check mqtt.tls.ca_file" in _explain(bad_ca.value)
    assert _explain(ValueError("other")) == "other"
