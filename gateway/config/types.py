"""The parsed configuration: frozen dataclasses, built only by gateway.config."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.config.limits import host_problem
from gateway.faults.rules import RuleSpec
from gateway.model import Severity

# ---------------------------------------------------------------- profile schema

UNIT_FACTORS: dict[str, tuple[float, float]] = {
    # unit the signal is in -> (factor, offset) to the model's unit
    "V": (1, 0), "mV": (0.001, 0), "cV": (0.01, 0), "dV": (0.1, 0),
    "A": (1, 0), "mA": (0.001, 0), "cA": (0.01, 0), "dA": (0.1, 0),
    "W": (1, 0), "kW": (1000, 0),
    "C": (1, 0), "degC": (1, 0), "dC": (0.1, 0), "K": (1, -273.15), "dK": (0.1, -273.15),
    "%": (1, 0), "permille": (0.1, 0), "fraction": (100, 0),
    "Ah": (1, 0), "mAh": (0.001, 0), "dAh": (0.1, 0),
    "1": (1, 0),
}


@dataclass(frozen=True, slots=True)
class ValueSpec:
    """How one model value is read: a signal (or a small expression over a message's
    signals, or a constant) and the linear conversion to the model unit."""

    key: str  # where in the profile, for messages
    message: str | None = None
    signal: str | None = None
    expr: str | None = None
    const: float | None = None
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    invert: bool = False
    valid: tuple[float, float] | None = None
    mapping: dict[str | int, str] | None = None  # enum fields: DBC value or choice -> ours
    bit: int | None = None  # bool fields: test one bit of the raw value
    values: tuple[int, ...] | None = None  # bool fields: active when value is one of these
    # format 2: the first of several sources whose message is fresh (highest first)
    sources: tuple[ValueSpec, ...] = ()
    sentinel: tuple[int, ...] = ()  # raw values meaning "not available": published as null
    fresh_s: float | None = None  # a source is fresh this long after its last frame

    def factor_offset(self) -> tuple[float, float]:
        f, o = UNIT_FACTORS.get(self.unit or "1", (1, 0))
        # value_model = ((dbc * scale + offset) * f + o) * (-1 if invert)
        return f, o


@dataclass(frozen=True, slots=True)
class CellSource:
    """Cells (voltages, temperatures or balancing flags) carried by one message."""

    key: str
    message: str
    signals: tuple[str, ...] | str  # explicit names, or an fnmatch pattern
    index_signal: str | None = None  # a signal carrying the cell index (Orion 0x36)
    mux: bool = False  # the message's multiplexer selects the group
    stride: int | None = None  # cells per mux/index step; default: the cells a group carries
    offset: int = 0  # added to the computed cell index (0-based)
    first: int = 0  # constant first cell index (per-module messages)
    order: Literal["position", "name"] = "position"
    name_base: int = 1  # with order: name, the number in the name of the first cell
    invalid: tuple[str, ...] | str | None = None  # invalid-flag signals, paired by slot
    invalid_value: int = 1  # raw value of an invalid flag that means "invalid"
    bitfield: bool = False  # balancing: each bit of the signal is one cell
    unit: str | None = None
    scale: float = 1.0
    valid: tuple[float, float] | None = None
    sentinel: tuple[int, ...] = ()  # raw values meaning "not available": the cell is null

    def start(self, group: int | None, per_group: int) -> int:
        """0-based cell of slot 0 (with `order: name`: of name number `name_base`) when
        the mux or index value is `group`. The parts compose: group x stride + first +
        offset. With `mux` and `order: name` the names number the cells across groups."""
        if group is None or (self.mux and self.order == "name"):
            group = 0
        stride = per_group if self.stride is None else self.stride
        return group * stride + self.first + self.offset


@dataclass(frozen=True, slots=True)
class Gate:
    """While `signal` of `message` has one of `values`, the listed messages are ignored
    (a BMS sends placeholders while it starts up)."""

    key: str
    message: str
    signal: str
    values: tuple[int | str, ...]  # raw values or the DBC's choice names
    ignore: tuple[str, ...] | None  # message names; None: all but the gate's own


@dataclass(frozen=True, slots=True)
class BmsFault:
    key: str
    code: str
    message: str
    signal: str
    severity: Severity
    bit: int | None = None
    values: tuple[int, ...] | None = None  # active when the raw value is one of these
    text: str = ""
    cell_signal: str | None = None  # format 2: the signal carrying the faulty cell's number
    cell_base: int = 1  # the raw value of that signal that means cell 1


CHECKSUM_METHODS = ("sum8", "xor8", "crc8_sae_j1850")


@dataclass(frozen=True, slots=True)
class FrameCheck:
    """Frames of `message` failing the checksum or the rolling counter are dropped."""

    key: str
    message: str
    checksum: str | None = None  # signal holding the checksum (one whole byte)
    method: str = "sum8"  # one of CHECKSUM_METHODS, over the frame's other bytes
    with_id: bool = False  # add the frame id (sum8/xor8 of its bytes; Orion adds 0x36)
    with_length: bool = False  # add the frame length
    counter: str | None = None  # rolling counter signal
    # a counter may advance by 1..max_step (lost frames); default: half its range
    max_step: int | None = None


@dataclass(frozen=True, slots=True)
class DtcStream:
    """A signal carrying one trouble code per frame: each distinct code is a fault
    `<code>_<number>`, raised when first reported, cleared `clear_after_s` after the last."""

    key: str
    message: str
    signal: str
    code: str = "bms_dtc"
    severity: Severity = "warning"
    clear_after_s: float = 5.0
    none: tuple[int, ...] = (0,)  # raw values meaning "no trouble code"


@dataclass(frozen=True, slots=True)
class PollRequest:
    key: str
    period_s: float
    message: str | None = None
    can_id: int | None = None
    extended: bool = False
    data: bytes = b""
    reply: str | None = None  # message name of the reply, for staleness


CellKind = Literal["voltages", "temps"]  # cells a value (not a flag) is read into


@dataclass(frozen=True, slots=True)
class CellBlock:
    """Cells packed back to back in a reassembled payload."""

    kind: CellKind
    offset: int  # byte offset of the first cell in the payload
    count: int
    width: int  # bytes per cell
    scale: float
    signed: bool = False
    big_endian: bool = True
    first: int = 0  # index of the first cell in the pack (0-based)


@dataclass(frozen=True, slots=True)
class IsoTpRequest:
    key: str
    request_id: int
    response_id: int
    request: bytes  # the single frame's bytes, PCI included, before padding
    period_s: float
    timeout_s: float
    extended: bool
    padding: int
    block_size: int
    st_min: int
    cells: CellBlock | None


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    path: Path
    description: str
    dbc: tuple[Path, ...]
    fields: dict[str, ValueSpec]
    cells: dict[str, tuple[CellSource, ...]]  # "voltages", "temps", "balancing"
    faults: tuple[BmsFault, ...]
    poll: tuple[PollRequest, ...]
    cell_count: int | None
    stale_after_s: float | None
    extras: dict[str, ValueSpec]
    chemistry: str | None = None
    isotp: tuple[IsoTpRequest, ...] = ()
    poll_id_offset_shift: int = 0
    gates: tuple[Gate, ...] = ()
    dtcs: tuple[DtcStream, ...] = ()
    checks: tuple[FrameCheck, ...] = ()


# ---------------------------------------------------------------- gateway schema


@dataclass(frozen=True, slots=True)
class CanBus:
    name: str
    interface: str
    channel: str
    bitrate: int | None = None
    fd: bool = False
    data_bitrate: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # socketcan only: "raw" reads the AF_CAN socket directly (gateway/source/socketcan.py),
    # "bcm" lets the kernel's broadcast manager deliver only changes of the bits read,
    # "python-can" goes through can.Bus like every other interface
    receive: Literal["raw", "bcm", "python-can"] = "python-can"
    kernel_filter: bool = True  # raw: the kernel drops ids no profile reads
    bcm_throttle_s: float = 0.0  # bcm: at most one notification per id this often


@dataclass(frozen=True, slots=True)
class TopicPolicy:
    min_interval_s: float
    max_interval_s: float


@dataclass(frozen=True, slots=True)
class PublishPolicy:
    state: TopicPolicy = TopicPolicy(1.0, 60.0)
    cells: TopicPolicy = TopicPolicy(5.0, 60.0)
    deadband: dict[str, float] = field(default_factory=dict)
    cell_deadband_v: float = 0.002
    per_value_topics: bool = False


@dataclass(frozen=True, slots=True)
class PackConfig:
    id: str
    profile: Profile
    bus: str
    id_offset: int
    transmit: bool
    stale_after_s: float
    cell_count: int | None
    publish: PublishPolicy
    rules: dict[str, RuleSpec]  # every gateway rule, defaults merged with the YAML
    chemistry: str = "lfp"  # picks the default cell voltage limits
    dbc_lenient: bool = False  # load DBCs with orphan VAL_ lines ignored (decode.load_dbc)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True, slots=True)
class MqttConfig:
    url: str | None  # None = print to stdout
    topic_prefix: str = "bms"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    protocol: Literal["3.1.1", "5"] = "5"
    keepalive: int = 30
    tls: TlsConfig | None = None
    max_payload: int = 65536

    @property
    def host_port(self) -> tuple[str, int, bool]:
        if "@" in (self.url or ""):
            msg = "credentials in the URL are not supported: use mqtt.username and password_file"
            raise ValueError(msg)
        m = re.match(r"^(mqtts?)://(\[[^\]]+\]|[^:/]+)(?::(\d+))?/?$", self.url or "")
        if not m:
            msg = f"bad MQTT url {self.url!r}"
            raise ValueError(msg)
        tls = m.group(1) == "mqtts"
        host = m.group(2).strip("[]")
        port = int(m.group(3) or (8883 if tls else 1883))
        if not 0 < port < 65536:
            msg = f"port {port} is not 1..65535"
            raise ValueError(msg)
        if (prob := host_problem(host)) is not None:
            raise ValueError(prob)
        return host, port, tls


@dataclass(frozen=True, slots=True)
class HomeAssistantConfig:
    discovery: bool = False
    prefix: str = "homeassistant"


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    max_events: int = 100_000
    max_age_s: float = 30 * 86400


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    path: Path
    gateway_id: str
    state_dir: Path
    log_level: str
    buses: tuple[CanBus, ...]
    packs: tuple[PackConfig, ...]
    mqtt: MqttConfig
    homeassistant: HomeAssistantConfig
    outbox: OutboxConfig
    shutdown_timeout_s: float
    prometheus: str | None  # "host:port" or None
    # `log_format:` for replay/decode/identify (logformats.LineFormat), kept as written
    log_format: tuple[str, str | None, int | None] | None = None

